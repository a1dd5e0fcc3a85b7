//! Fragmented UDP datagrams cross the NAT in both directions, and inbound fragments may come
//! in any order (RFC 4787 REQ-13a, REQ-14). Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::packet::{describe, Sniffer};
use vm_tests::tools::{scapy, udp_bind, udp_recv};
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// 3000 bytes, the same as the scapy expression `bytes(i % 251 for i in range(3000))`.
fn payload() -> Vec<u8> {
    (0..3000u32).map(|i| (i % 251) as u8).collect()
}

/// A lab and NAT (with a port range, so fragments need real port translation), and a UDP
/// binding lan 10.0.0.2:40000 <-> wan 198.51.100.1:9999 made by one outbound 3000-byte
/// datagram that lan's kernel fragments. Checks that wan reassembles it, from the NAT's address.
fn setup(tag: &str) -> Result<(Lab, NatProcess, UdpSocket, UdpSocket, SocketAddrV4)> {
    let lab = Lab::new(tag)?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    lan.send_to(&payload(), sa(WAN_IP, 9999))?;
    let (got, from) = udp_recv(&remote, Duration::from_secs(5))?
        .context("the fragmented datagram from lan never arrived")?;
    let SocketAddr::V4(ext) = from else {
        anyhow::bail!("IPv6 source {from}")
    };
    ensure!(*ext.ip() == NAT_EXT, "wan saw source {ext}");
    ensure!(
        got == payload(),
        "wan reassembled {} bytes that differ from the 3000 sent",
        got.len()
    );
    Ok((lab, nat, lan, remote, ext))
}

#[test]
fn fragmented_udp_crosses_the_nat_both_ways() -> Result<()> {
    let (_lab, nat, lan, remote, ext) = setup("frag")?;
    let before = nat.stats()?;
    // Inbound, in order: wan's kernel fragments the answer.
    remote.send_to(&payload(), ext)?;
    let (got, from) = udp_recv(&lan, Duration::from_secs(5))?
        .context("the fragmented datagram from wan never reached lan")?;
    ensure!(from == SocketAddr::V4(sa(WAN_IP, 9999)), "arrived from {from}");
    ensure!(
        got == payload(),
        "lan reassembled {} bytes that differ from the 3000 sent",
        got.len()
    );
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "fragment_translated")? >= 1,
        "fragment_translated did not grow ({})",
        after.changes(&before)
    );
    nat.stop()
}

#[test]
fn inbound_fragments_arriving_last_first_are_delivered() -> Result<()> {
    // RFC 4787 REQ-14: "Received Fragment Out of Order" behaviour is a MUST.
    let (lab, nat, lan, _remote, ext) = setup("fragrev")?;
    let nat_mac = Lab::mac(&lab.nat, &lab.wan_if)?;
    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    let before = nat.stats()?;
    scapy(
        &lab.wan,
        &format!(
            "data = bytes(i % 251 for i in range(3000))\n\
             pkt = IP(src='{WAN_IP}', dst='{NAT_EXT}', id=0x1234)/UDP(sport=9999, dport={})/Raw(data)\n\
             frags = fragment(pkt, fragsize=1000)\n\
             assert len(frags) >= 3\n\
             sendp([Ether(dst='{nat_mac}')/f for f in reversed(frags)], iface='eth0')",
            ext.port()
        ),
    )?;
    let got = udp_recv(&lan, Duration::from_secs(5))?;
    let seen: Vec<String> = sniff
        .capture_for(Duration::from_millis(200))
        .iter()
        .filter(|f| !f.outgoing)
        .map(describe)
        .collect();
    let (got, from) = got.with_context(|| {
        format!(
            "fragments sent last-first to {ext} never reached lan as a datagram; lan received {seen:?}; counters: {}",
            nat.stats().map(|s| s.changes(&before)).unwrap_or_default()
        )
    })?;
    ensure!(from == SocketAddr::V4(sa(WAN_IP, 9999)), "arrived from {from}");
    ensure!(
        got == payload(),
        "lan reassembled {} bytes that differ from the 3000 sent",
        got.len()
    );
    nat.stop()
}
