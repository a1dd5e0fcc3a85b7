//! Malformed and odd packets crafted with scapy: never translated into the internal network,
//! never leaked untranslated, and counted. Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::packet::{describe, Sniffer};
use vm_tests::tools::{scapy, udp_bind, udp_expect, udp_recv};
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn malformed_inbound_packets_never_reach_lan_and_are_counted() -> Result<()> {
    let lab = Lab::new("malin")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let nat_mac = Lab::mac(&lab.nat, &lab.wan_if)?;

    // A live binding lan:40000 <-> wan 198.51.100.1:9999 (so a lax NAT would translate).
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    lan.send_to(b"open", sa(WAN_IP, 9999))?;
    let (_, ext) = udp_recv(&remote, Duration::from_secs(5))?.context("remote got nothing")?;
    let SocketAddr::V4(ext) = ext else {
        anyhow::bail!("IPv6 source {ext}")
    };
    ensure!(*ext.ip() == NAT_EXT, "remote saw {ext}");
    let port = ext.port();

    let head = format!("e = Ether(dst='{nat_mac}')\nip = dict(src='{WAN_IP}', dst='{NAT_EXT}')\n");
    let cases: [(&str, String, &[&str]); 3] = [
        (
            "UDP header truncated to 4 bytes (IP total length 24)",
            format!(
                "sendp(e/IP(proto=17, len=24, **ip)/Raw(struct.pack('!HH', 9999, {port}))/Raw(b'MALFORMED-1'), iface='eth0')"
            ),
            &["malformed"],
        ),
        (
            "IPv4 header with IHL=4",
            format!("sendp(e/IP(ihl=4, **ip)/UDP(sport=9999, dport={port})/Raw(b'MALFORMED-2'), iface='eth0')"),
            &["malformed"],
        ),
        (
            "non-first fragment without a first fragment",
            "sendp(e/IP(proto=17, id=0x4242, flags=0, frag=185, **ip)/Raw(b'MALFORMED-3' * 8), iface='eth0')".into(),
            &["fragment_no_state", "fragment_parked", "malformed"],
        ),
    ];

    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    let mut failures = Vec::new();
    for (what, send, counters) in &cases {
        let before = nat.stats()?;
        scapy(&lab.wan, &format!("import struct\n{head}{send}"))?;
        let frames = sniff.capture_for(Duration::from_secs(1));
        let leaked: Vec<_> = frames
            .iter()
            .filter(|f| {
                !f.outgoing && f.ipv4().is_some_and(|ip| ip.src() == WAN_IP) || f.contains(b"MALFORMED")
            })
            .map(describe)
            .collect();
        if !leaked.is_empty() {
            failures.push(format!("{what}: reached lan: {leaked:?}"));
        }
        let after = nat.stats()?;
        // A counter the NAT does not have counts as unchanged (fragment_parked is newer than
        // the others: an orphan fragment may be parked, waiting for its first fragment).
        let grew: u64 = counters
            .iter()
            .map(|c| after.delta(&before, c).unwrap_or(0))
            .sum();
        if grew == 0 {
            failures.push(format!(
                "{what}: none of {counters:?} grew ({})",
                after.changes(&before)
            ));
        }
    }

    // The binding still works for a well-formed datagram.
    remote.send_to(b"well-formed", ext)?;
    if udp_expect(&lan, b"well-formed", Duration::from_secs(5))?.is_none() {
        failures.push("after the malformed packets, a well-formed datagram no longer reaches lan".into());
    }
    ensure!(
        failures.is_empty(),
        "malformed inbound packets:\n{}",
        failures.join("\n")
    );
    nat.stop()
}

#[test]
fn outbound_packet_with_ip_options_is_translated_or_dropped_never_leaked() -> Result<()> {
    let lab = Lab::new("malopt")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let gw_mac = Lab::mac(&lab.nat, &lab.lan_if)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    let before = nat.stats()?;

    // IHL=6: four NOP options.
    scapy(
        &lab.lan,
        &format!(
            "sendp(Ether(dst='{gw_mac}')/IP(src='{LAN_IP}', dst='{WAN_IP}', options=[IPOption_NOP()]*4)/UDP(sport=40000, dport=9999)/Raw(b'OPTIONS-MARK'), iface='eth0')"
        ),
    )?;
    let frames = sniff.capture(Duration::from_secs(2), |f| f.contains(b"OPTIONS-MARK"));
    let seen: Vec<_> = frames
        .iter()
        .filter(|f| !f.outgoing && f.contains(b"OPTIONS-MARK"))
        .collect();
    for f in &seen {
        let ip = f.ipv4().context("marker in a non-IPv4 frame")?;
        ensure!(
            ip.src() != LAN_IP,
            "packet left the NAT untranslated: {}",
            describe(f)
        );
        ensure!(
            ip.src() == NAT_EXT,
            "packet left with source {}: {}",
            ip.src(),
            describe(f)
        );
        ensure!(
            ip.header_checksum_ok(),
            "translated packet has a bad IP checksum: {}",
            describe(f)
        );
        ensure!(
            ip.l4_checksum_ok(),
            "translated packet has a bad UDP checksum: {}",
            describe(f)
        );
    }
    if seen.is_empty() {
        let after = nat.stats()?;
        let grew = after.delta(&before, "malformed")? + after.delta(&before, "unsupported_protocol")?;
        ensure!(
            grew > 0,
            "the packet with IP options vanished without being counted"
        );
    } else {
        let got = udp_expect(&remote, b"OPTIONS-MARK", Duration::from_secs(2))?;
        let from = got.context("wan captured the translated packet but its socket did not receive it")?;
        ensure!(
            matches!(from, SocketAddr::V4(a) if *a.ip() == NAT_EXT),
            "wan socket saw source {from}"
        );
    }
    nat.stop()
}
