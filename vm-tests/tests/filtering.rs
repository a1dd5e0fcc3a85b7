//! Inbound filtering: which remotes may send to a mapping, per mode (RFC 4787 §5). Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP, WAN_IP2};
use vm_tests::packet::{describe, Sniffer};
use vm_tests::tools::{self, scapy, udp_bind, udp_expect, udp_recv};
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// How long a test waits for a datagram that must not arrive.
const QUIET: Duration = Duration::from_secs(2);

/// The probes: (name, source ip, source port). The mapping was made towards WAN_IP:9999.
const PROBES: [(&str, Ipv4Addr, u16); 3] = [
    ("other host (wan2 198.51.100.3:9999)", WAN2_IP, 9999),
    ("same address, other port (198.51.100.1:9998)", WAN_IP, 9998),
    ("same host, other address (198.51.100.2:9999)", WAN_IP2, 9999),
];

/// Makes a mapping from lan:`port` to wan 198.51.100.1:9999, then sends one datagram from
/// each probe source to the external endpoint, and finally one from 198.51.100.1:9999 itself.
/// Returns which probes reached lan (in PROBES order) and the filtered_in increase.
fn probe(lab: &Lab, nat: &NatProcess, port: u16) -> Result<(Vec<bool>, u64)> {
    let lan = udp_bind(&lab.lan, sa(LAN_IP, port))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    lan.send_to(b"hello", sa(WAN_IP, 9999))?;
    let (_, ext) = udp_recv(&remote, Duration::from_secs(5))?.context("the remote got nothing from lan")?;
    let SocketAddr::V4(ext) = ext else {
        anyhow::bail!("IPv6 source {ext}")
    };
    ensure!(
        *ext.ip() == NAT_EXT,
        "remote saw {ext}, expected the NAT's address"
    );

    let before = nat.stats()?;
    // Send every probe, then collect everything lan receives in a quiet period: a probe
    // "arrived" if its payload shows up at any time.
    for (i, (_, ip, p)) in PROBES.iter().enumerate() {
        let ns = if *ip == WAN2_IP { &lab.wan2 } else { &lab.wan };
        let s = udp_bind(ns, sa(*ip, *p))?;
        s.send_to(format!("probe-{i}").as_bytes(), ext)?;
    }
    let mut received = Vec::new();
    let deadline = Instant::now() + QUIET;
    while let Some(d) = udp_recv(&lan, deadline.saturating_duration_since(Instant::now()))? {
        received.push(d);
    }
    let mut arrived = Vec::new();
    for (i, (name, ip, p)) in PROBES.iter().enumerate() {
        let payload = format!("probe-{i}");
        let got = received.iter().find(|(d, _)| d == payload.as_bytes());
        if let Some((_, from)) = got {
            ensure!(
                *from == SocketAddr::V4(sa(*ip, *p)),
                "probe from {name} arrived with source {from}"
            );
        }
        arrived.push(got.is_some());
    }
    // The remote lan talked to can always answer.
    remote.send_to(b"from-remote", ext)?;
    let from = udp_expect(&lan, b"from-remote", Duration::from_secs(5))?
        .context("datagram from the remote lan talked to (198.51.100.1:9999) did not reach lan")?;
    ensure!(
        from == SocketAddr::V4(sa(WAN_IP, 9999)),
        "reply arrived with source {from}"
    );
    let after = nat.stats()?;
    Ok((arrived, after.delta(&before, "filtered_in")?))
}

#[test]
fn port_restricted_admits_only_the_remote_endpoint_lan_talked_to() -> Result<()> {
    let lab = Lab::new("filt")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let (arrived, filtered) = probe(&lab, &nat, 40000)?;
    for ((name, _, _), got) in PROBES.iter().zip(&arrived) {
        ensure!(!got, "port-restricted NAT let a datagram from {name} reach lan");
    }
    ensure!(
        filtered >= 3,
        "filtered_in grew by {filtered}, expected at least 3"
    );
    nat.stop()
}

#[test]
fn filtering_follows_the_mode() -> Result<()> {
    let lab = Lab::new("fmod")?;
    // (mode, expected arrival of each probe in PROBES order)
    let cases: [(&str, [bool; 3]); 4] = [
        ("full-cone", [true, true, true]),
        ("restricted-cone", [false, true, false]),
        ("port-restricted", [false, false, false]),
        ("symmetric", [false, false, false]),
    ];
    let mut failures = Vec::new();
    for (i, (mode, expected)) in cases.iter().enumerate() {
        let nat = NatProcess::attach(&lab, &["--mode", mode])?;
        ensure!(
            nat.attached_line().contains(&format!("mode={mode}")),
            "attached line: {}",
            nat.attached_line()
        );
        let (arrived, filtered) = probe(&lab, &nat, 41000 + i as u16)?;
        for (((name, _, _), got), want) in PROBES.iter().zip(&arrived).zip(expected) {
            if got != want {
                failures.push(format!(
                    "{mode}: datagram from {name} {}",
                    if *got {
                        "reached lan but must be filtered"
                    } else {
                        "was filtered but must reach lan"
                    }
                ));
            }
        }
        let dropped = expected.iter().filter(|e| !**e).count() as u64;
        if filtered < dropped {
            failures.push(format!(
                "{mode}: filtered_in grew by {filtered}, expected at least {dropped}"
            ));
        }
        nat.stop()?;
    }
    ensure!(
        failures.is_empty(),
        "filtering does not match the modes:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Sends one TCP SYN from wan2 (198.51.100.3:5555) to `ext` with scapy, and returns a
/// description of every packet from wan2 that reached lan.
fn stranger_syn(lab: &Lab, ext: SocketAddrV4) -> Result<Vec<String>> {
    let nat_mac = Lab::mac(&lab.nat, &lab.wan_if)?;
    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    scapy(
        &lab.wan2,
        &format!(
            "sendp(Ether(dst='{nat_mac}')/IP(src='{WAN2_IP}', dst='{}')/TCP(sport=5555, dport={}, flags='S', seq=1000), iface='eth0')",
            ext.ip(),
            ext.port()
        ),
    )?;
    Ok(sniff
        .capture_for(Duration::from_secs(1))
        .iter()
        .filter(|f| !f.outgoing && f.ipv4().is_some_and(|ip| ip.src() == WAN2_IP))
        .map(describe)
        .collect())
}

#[test]
fn port_restricted_drops_a_strangers_tcp_syn_to_a_live_connection() -> Result<()> {
    let lab = Lab::new("ftcp")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let stream = tools::tcp_connect(&lab.lan, sa(WAN_IP, 5001))?;
    let SocketAddr::V4(local) = stream.local_addr()? else {
        anyhow::bail!("IPv6 socket")
    };
    let maps = nat.mappings()?;
    let ext = maps
        .iter()
        .find(|m| m.proto == "tcp" && m.internal == local)
        .with_context(|| format!("no tcp mapping for {local}: {maps:#?}"))?
        .external;

    let before = nat.stats()?;
    let leaked = stranger_syn(&lab, ext)?;
    ensure!(
        leaked.is_empty(),
        "a stranger's SYN to the connection's mapping {ext} reached lan: {leaked:?}"
    );
    let after = nat.stats()?;
    let counted = after.delta(&before, "filtered_in")? + after.delta(&before, "unsolicited_syn").unwrap_or(0);
    ensure!(
        counted >= 1,
        "the dropped SYN was not counted ({})",
        after.changes(&before)
    );

    // The connection itself is unharmed.
    let data = tools::pattern(64 * 1024, 3);
    let back = tools::tcp_roundtrip(stream, &data)?;
    ensure!(back == data, "the connection broke after the stranger's SYN");
    nat.stop()
}

#[test]
fn full_cone_udp_mapping_does_not_admit_tcp() -> Result<()> {
    // RFC 7857 §6: endpoint-independent filtering is per protocol by default.
    let lab = Lab::new("fproto")?;
    let nat = NatProcess::attach(&lab, &["--mode", "full-cone"])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    lan.send_to(b"hello", sa(WAN_IP, 9999))?;
    let (_, ext) = udp_recv(&remote, Duration::from_secs(5))?.context("remote got nothing")?;
    let SocketAddr::V4(ext) = ext else {
        anyhow::bail!("IPv6 source {ext}")
    };

    let leaked = stranger_syn(&lab, ext)?;
    ensure!(
        leaked.is_empty(),
        "a TCP SYN to the UDP mapping {ext} reached lan: {leaked:?}"
    );
    // While a UDP datagram from the same stranger does reach lan (full cone).
    let stranger = udp_bind(&lab.wan2, sa(WAN2_IP, 5555))?;
    stranger.send_to(b"udp from stranger", ext)?;
    ensure!(
        udp_expect(&lan, b"udp from stranger", Duration::from_secs(3))?.is_some(),
        "full-cone NAT filtered a UDP datagram from another host"
    );
    nat.stop()
}
