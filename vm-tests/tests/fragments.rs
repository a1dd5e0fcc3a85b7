//! Fragmented UDP datagrams cross the NAT in both directions, and inbound fragments may come
//! in any order (RFC 4787 REQ-13a, REQ-14). Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
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

#[test]
fn fragmented_udp_crosses_the_nat_both_ways_and_in_any_order() -> Result<()> {
    let lab = Lab::new("frag")?;
    // Ports outside the internal ones, so fragments need real translation.
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let data = payload();
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let before = nat.stats()?;

    // Outbound: lan's kernel fragments the 3000-byte datagram (MTU 1500).
    lan.send_to(&data, sa(WAN_IP, 9999))?;
    let (got, from) = udp_recv(&remote, Duration::from_secs(5))?
        .context("the fragmented datagram from lan never arrived")?;
    let SocketAddr::V4(ext) = from else {
        anyhow::bail!("IPv6 source {from}")
    };
    ensure!(*ext.ip() == NAT_EXT, "wan saw source {ext}");
    ensure!(
        got == data,
        "wan reassembled {} bytes that differ from the 3000 sent",
        got.len()
    );

    // Inbound, in order: wan's kernel fragments the answer.
    remote.send_to(&data, ext)?;
    let (got, from) = udp_recv(&lan, Duration::from_secs(5))?
        .context("the fragmented datagram from wan never reached lan")?;
    ensure!(from == SocketAddr::V4(sa(WAN_IP, 9999)), "arrived from {from}");
    ensure!(
        got == data,
        "lan reassembled {} bytes that differ from the 3000 sent",
        got.len()
    );

    // Inbound, last fragment first (RFC 4787 REQ-14).
    let nat_mac = vm_tests::Lab::mac(&lab.nat, &lab.wan_if)?;
    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    let mid = nat.stats()?;
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
            nat.stats().map(|s| s.changes(&mid)).unwrap_or_default()
        )
    })?;
    ensure!(from == SocketAddr::V4(sa(WAN_IP, 9999)), "arrived from {from}");
    ensure!(
        got == data,
        "lan reassembled {} bytes that differ from the 3000 sent (reversed fragments)",
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
