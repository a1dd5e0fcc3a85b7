//! Basic connectivity through the NAT in its default (port-restricted) mode: ICMP echo, UDP,
//! TCP, and two internal hosts sharing the external address. Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN2_IP, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::packet::Sniffer;
use vm_tests::tools::{self, udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn ping_gets_replies_and_wan_sees_the_external_address() -> Result<()> {
    let lab = Lab::new("ping")?;
    let nat = NatProcess::attach(&lab, &[])?;
    ensure!(
        nat.attached_line().contains(&lab.wan_if),
        "attached line: {}",
        nat.attached_line()
    );

    let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    let out = tools::ping(&lab.lan, WAN_IP, 3, &[])?;
    ensure!(
        tools::ping_received(&out) == 3,
        "ping lan -> wan: {}{}",
        out.stdout,
        out.stderr
    );

    // Every echo request that reached wan carries the NAT's address, with valid checksums.
    let frames = sniff.capture_for(Duration::from_millis(300));
    let requests: Vec<_> = frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| ip.icmp().is_some_and(|i| i.kind() == 8))
        .collect();
    ensure!(requests.len() >= 3, "wan saw {} echo requests", requests.len());
    for ip in &requests {
        ensure!(
            ip.src() == NAT_EXT && ip.dst() == WAN_IP,
            "echo request {} -> {}",
            ip.src(),
            ip.dst()
        );
        ensure!(ip.header_checksum_ok(), "echo request with a bad IP checksum");
        ensure!(
            ip.icmp().unwrap().checksum_ok(),
            "echo request with a bad ICMP checksum"
        );
    }

    // A UDP whoami reflector on wan reports the NAT's external address as our source.
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let seen = whoami(&sock, sa(WAN_IP, 9999))?;
    ensure!(
        *seen.ip() == NAT_EXT,
        "wan saw source {seen}, expected {NAT_EXT}:<port>"
    );
    nat.stop()
}

#[test]
fn udp_mapping_is_endpoint_independent_and_listed() -> Result<()> {
    let lab = Lab::new("udp")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _w1 = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let _w2 = udp_whoami(&lab.wan2, WAN2_IP, 9999)?;

    let internal = sa(LAN_IP, 40000);
    let sock = udp_bind(&lab.lan, internal)?;
    let seen1 = whoami(&sock, sa(WAN_IP, 9999))?;
    let seen2 = whoami(&sock, sa(WAN2_IP, 9999))?;
    ensure!(
        *seen1.ip() == NAT_EXT,
        "wan saw {seen1}, expected the NAT's address {NAT_EXT}"
    );
    ensure!(
        seen1 == seen2,
        "same internal endpoint got {seen1} towards wan but {seen2} towards wan2 (not EIM)"
    );

    let maps = nat.mappings()?;
    let mine: Vec<_> = maps
        .iter()
        .filter(|m| m.proto == "udp" && m.internal == internal)
        .collect();
    ensure!(!mine.is_empty(), "no udp mapping for {internal} in {maps:#?}");
    for m in &mine {
        ensure!(
            m.external == seen1,
            "mapping lists external {} but the remote saw {seen1}: {m:?}",
            m.external
        );
        ensure!(
            m.expires_in.is_some_and(|s| s > 0),
            "mapping already expired: {m:?}"
        );
        if let Some(r) = m.remote {
            ensure!(
                r == sa(WAN_IP, 9999) || r == sa(WAN2_IP, 9999),
                "unexpected remote in {m:?}"
            );
        }
    }
    nat.stop()
}

#[test]
fn tcp_transfers_data_both_ways() -> Result<()> {
    let lab = Lab::new("tcp")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _who = tools::tcp_whoami(&lab.wan, WAN_IP, 9998)?;
    let (seen, _) = tools::tcp_whoami_query(&lab.lan, sa(WAN_IP, 9998))?;
    ensure!(
        *seen.ip() == NAT_EXT,
        "TCP whoami saw {seen}, expected {NAT_EXT}:<port>"
    );

    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let stream = tools::tcp_connect(&lab.lan, sa(WAN_IP, 5001))?;
    let local = match stream.local_addr()? {
        SocketAddr::V4(a) => a,
        a => anyhow::bail!("unexpected local address {a}"),
    };
    // While the connection is open, the table lists it.
    let maps = nat.mappings()?;
    let m = maps
        .iter()
        .find(|m| m.proto == "tcp" && m.internal == local)
        .with_context(|| format!("no tcp mapping for {local} in {maps:#?}"))?;
    ensure!(*m.external.ip() == NAT_EXT, "tcp mapping external {}", m.external);

    let data = tools::pattern(1 << 20, 0x5eed);
    let back = tools::tcp_roundtrip(stream, &data)?;
    ensure!(
        back.len() == data.len(),
        "sent {} bytes, got {} back",
        data.len(),
        back.len()
    );
    ensure!(back == data, "the echoed 1 MiB differs from what was sent");
    nat.stop()
}

#[test]
fn two_internal_hosts_never_share_an_external_endpoint() -> Result<()> {
    let lab = Lab::with(
        "ovl",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let s1 = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, 40000))?;
    let seen1 = whoami(&s1, sa(WAN_IP, 9999))?;
    let seen2 = whoami(&s2, sa(WAN_IP, 9999))?;
    ensure!(
        *seen1.ip() == NAT_EXT && *seen2.ip() == NAT_EXT,
        "sources {seen1}, {seen2}"
    );
    ensure!(
        seen1 != seen2,
        "lan and lan2 (both source port 40000) share {seen1} towards the same remote"
    );
    // Both keep working after the other was mapped.
    ensure!(whoami(&s1, sa(WAN_IP, 9999))? == seen1, "lan's mapping changed");
    ensure!(whoami(&s2, sa(WAN_IP, 9999))? == seen2, "lan2's mapping changed");
    nat.stop()
}
