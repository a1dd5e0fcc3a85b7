//! RFC 5508 (ICMP) requirements, with RFC 4787 REQ-12 and RFC 5382 REQ-9/10, beyond
//! icmp.rs: errors checked by scapy (every checksum, embedded transport included), errors of
//! several types about TCP and UDP flows and with embedded IP options, corrupt and unmatched
//! errors dropped, errors from inside translated out, hairpinned errors, and echo identifier
//! mapping. Root only.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::icmpcheck::{icmp_error_expr, scapy_parse, ScapyIcmpError};
use vm_tests::lab::{HOST_IF, LAN2_IP, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::packet::{describe, Frame, Sniffer, PROTO_ICMP, PROTO_UDP};
use vm_tests::tools::{self, scapy, udp_bind, udp_expect, udp_recv};
use vm_tests::{Lab, LabOptions, NatProcess};

/// External ports away from every internal port used here, so translation is visible.
const PORTS: &str = "20000-20099";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Sends one datagram from `lan` to `remote` and returns the source the remote saw.
fn open_mapping(lan: &UdpSocket, remote: &UdpSocket) -> Result<SocketAddrV4> {
    let to = remote.local_addr()?;
    lan.send_to(b"open", to)?;
    let (_, from) = udp_recv(remote, Duration::from_secs(5))?
        .with_context(|| format!("{to} got nothing from {}", lan.local_addr().unwrap()))?;
    match from {
        SocketAddr::V4(a) => Ok(a),
        a => bail!("IPv6 source {a}"),
    }
}

/// ICMP error frames received (not sent) on a capture.
fn icmp_errors(frames: &[Frame]) -> Vec<&Frame> {
    frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter(|f| {
            f.ipv4()
                .is_some_and(|ip| ip.proto() == PROTO_ICMP && ip.icmp().is_some_and(|i| i.is_error()))
        })
        .collect()
}

/// Sends the scapy packet expressions from wan2 to the NAT's external MAC.
fn inject_from_wan2(lab: &Lab, packets: &[String]) -> Result<()> {
    let nat_mac = Lab::mac(&lab.nat, &lab.wan_if)?;
    let list: Vec<String> = packets
        .iter()
        .map(|p| format!("Ether(dst='{nat_mac}')/{p}"))
        .collect();
    scapy(&lab.wan2, &format!("sendp([{}], iface='eth0')", list.join(", ")))?;
    Ok(())
}

#[test]
fn rfc5508_req4_inbound_errors_translated_for_tcp_and_udp() -> Result<()> {
    // Errors of several types, sent by a third host (a router on the path, RFC 4787 REQ-12a),
    // about a TCP connection and a UDP flow. Each reaches lan with type and code kept, the
    // outer destination and the embedded header restored, and every checksum right as scapy
    // computes it (RFC 5508 REQ-4, RFC 5382 REQ-9); an embedded header with IP options is
    // handled (REQ-3b). None tears anything down (RFC 4787 REQ-12, RFC 5382 REQ-10).
    let lab = Lab::new("icmpin")?;
    let nat = NatProcess::attach(&lab, &["--ports", PORTS])?;
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let tcp_local = sa(LAN_IP, 40500);
    let stream = lab
        .lan
        .enter(|| vm_tests::p2p::tcp_connect_from(tcp_local, sa(WAN_IP, 5001), Duration::from_secs(10)))?;
    let tcp_ext = nat
        .mappings()?
        .into_iter()
        .find(|m| m.proto == "tcp" && m.internal == tcp_local)
        .context("no TCP binding")?
        .external;
    let udp_local = sa(LAN_IP, 40501);
    let lan_udp = udp_bind(&lab.lan, udp_local)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let udp_ext = open_mapping(&lan_udp, &remote)?;

    let tcp_inner = format!(
        "IP(src='{NAT_EXT}', dst='{WAN_IP}')/TCP(sport={}, dport=5001, flags='A', seq=1, ack=1)",
        tcp_ext.port()
    );
    let udp_inner = format!(
        "IP(src='{NAT_EXT}', dst='{WAN_IP}', options=[IPOption_NOP()]*4)/UDP(sport={}, dport=9999)/Raw(b'abcd')",
        udp_ext.port()
    );
    // (what, ICMP type, code, MTU, embedded, expected inner src, dst)
    let cases = [
        (
            "3/1 about TCP",
            3u8,
            1u8,
            None,
            &tcp_inner,
            tcp_local,
            sa(WAN_IP, 5001),
        ),
        (
            "3/4 about TCP",
            3,
            4,
            Some(1400),
            &tcp_inner,
            tcp_local,
            sa(WAN_IP, 5001),
        ),
        (
            "11/0 about TCP",
            11,
            0,
            None,
            &tcp_inner,
            tcp_local,
            sa(WAN_IP, 5001),
        ),
        (
            "3/0 about UDP, embedded IP options",
            3,
            0,
            None,
            &udp_inner,
            udp_local,
            sa(WAN_IP, 9999),
        ),
    ];
    let before = nat.stats()?;
    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    let packets: Vec<String> = cases
        .iter()
        .map(|(_, t, c, mtu, inner, _, _)| icmp_error_expr(WAN2_IP, NAT_EXT, *t, *c, *mtu, inner))
        .collect();
    inject_from_wan2(&lab, &packets)?;
    let frames = sniff.capture_for(Duration::from_secs(1));
    let received = icmp_errors(&frames);
    let parsed = scapy_parse(&lab.wan2, &received)?;
    let mut failures = Vec::new();
    for (what, kind, code, _, _, src, dst) in &cases {
        let Some(e) = parsed.iter().find(|e| (e.kind, e.code) == (*kind, *code)) else {
            failures.push(format!("{what}: never reached lan"));
            continue;
        };
        if e.outer_src != WAN2_IP || e.outer_dst != LAN_IP {
            failures.push(format!(
                "{what}: outer {} -> {}, expected {WAN2_IP} -> {LAN_IP}",
                e.outer_src, e.outer_dst
            ));
        }
        if e.inner_src != *src || e.inner_dst != *dst {
            failures.push(format!(
                "{what}: embedded {} -> {}, expected {src} -> {dst}",
                e.inner_src, e.inner_dst
            ));
        }
        if let Err(err) = e.checksums_ok() {
            failures.push(format!("{what}: {err:#}"));
        }
    }
    if let Some(e) = parsed.iter().find(|e| e.inner_proto == PROTO_UDP) {
        if e.inner_ihl != 24 {
            failures.push(format!(
                "the embedded IP options were lost: IHL {} bytes",
                e.inner_ihl
            ));
        }
        if e.inner_l4_ok.is_none() {
            failures.push("the complete embedded UDP datagram could not be checked".into());
        }
    }
    if received.len() != cases.len() {
        failures.push(format!(
            "lan received {} errors for {} sent: {:?}",
            received.len(),
            cases.len(),
            received.iter().map(|f| describe(f)).collect::<Vec<_>>()
        ));
    }
    ensure!(
        failures.is_empty(),
        "inbound ICMP errors:\n{}",
        failures.join("\n")
    );
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "icmp_error_in")? >= cases.len() as u64,
        "icmp_error_in did not count them ({})",
        after.changes(&before)
    );

    // Nothing was torn down: the TCP connection echoes, the UDP binding delivers.
    let data = tools::pattern(256 * 1024, 11);
    let back = tools::tcp_roundtrip(stream, &data)?;
    ensure!(
        back == data,
        "the TCP connection broke after ICMP errors about it"
    );
    remote.send_to(b"still mapped", udp_ext)?;
    ensure!(
        udp_expect(&lan_udp, b"still mapped", Duration::from_secs(3))?.is_some(),
        "after ICMP errors, the UDP binding {udp_ext} no longer delivers"
    );
    nat.stop()
}

#[test]
fn rfc5508_req3_bad_checksums_dropped() -> Result<()> {
    let lab = Lab::new("icmpcsum")?;
    let nat = NatProcess::attach(&lab, &["--ports", PORTS])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 41000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let ext = open_mapping(&lan, &remote)?;
    let inner = |ip_chksum: &str| {
        format!(
            "IP(src='{NAT_EXT}', dst='{WAN_IP}'{ip_chksum})/UDP(sport={}, dport=9999)/Raw(b'x')",
            ext.port()
        )
    };
    let cases = [
        (
            "bad ICMP checksum",
            format!(
                "IP(src='{WAN2_IP}', dst='{NAT_EXT}')/ICMP(type=3, code=1, chksum=0x1234)/{}",
                inner("")
            ),
            false,
        ),
        (
            "bad embedded IP checksum",
            icmp_error_expr(WAN2_IP, NAT_EXT, 3, 2, None, &inner(", chksum=0x1234")),
            false,
        ),
        (
            "valid",
            icmp_error_expr(WAN2_IP, NAT_EXT, 3, 3, None, &inner("")),
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (what, pkt, delivered) in &cases {
        let before = nat.stats()?;
        let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
        inject_from_wan2(&lab, std::slice::from_ref(pkt))?;
        let frames = sniff.capture_for(Duration::from_millis(700));
        let got = icmp_errors(&frames);
        let after = nat.stats()?;
        if got.is_empty() == *delivered {
            failures.push(format!(
                "{what}: {} ({})",
                if *delivered {
                    "never reached lan"
                } else {
                    "reached lan"
                },
                after.changes(&before)
            ));
        }
        if !delivered && after.delta(&before, "icmp_error_dropped")? < 1 {
            failures.push(format!(
                "{what}: icmp_error_dropped did not count it ({})",
                after.changes(&before)
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "ICMP error checksums (RFC 5508 REQ-3, 3a):\n{}",
        failures.join("\n")
    );
    nat.stop()
}

#[test]
fn rfc5508_req4_errors_about_unknown_mappings_dropped() -> Result<()> {
    let lab = Lab::new("icmpunk")?;
    let nat = NatProcess::attach(&lab, &["--ports", PORTS])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 41000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let ext = open_mapping(&lan, &remote)?;
    let unused = if ext.port() == 20099 { 20098 } else { 20099 };
    let cases = [
        (
            "an error about an external port nobody has",
            icmp_error_expr(
                WAN2_IP,
                NAT_EXT,
                3,
                3,
                None,
                &format!("IP(src='{NAT_EXT}', dst='{WAN_IP}')/UDP(sport={unused}, dport=9999)"),
            ),
        ),
        (
            "an error about lan's binding, but towards a remote it never talked to (spoofed)",
            icmp_error_expr(
                WAN2_IP,
                NAT_EXT,
                3,
                3,
                None,
                &format!(
                    "IP(src='{NAT_EXT}', dst='{WAN2_IP}')/UDP(sport={}, dport=1234)",
                    ext.port()
                ),
            ),
        ),
        (
            "an error about lan's binding and remote, but the wrong protocol",
            icmp_error_expr(
                WAN2_IP,
                NAT_EXT,
                3,
                3,
                None,
                &format!(
                    "IP(src='{NAT_EXT}', dst='{WAN_IP}')/TCP(sport={}, dport=9999, flags='S')",
                    ext.port()
                ),
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (what, pkt) in &cases {
        let before = nat.stats()?;
        let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
        inject_from_wan2(&lab, std::slice::from_ref(pkt))?;
        let frames = sniff.capture_for(Duration::from_millis(700));
        let leaked: Vec<String> = frames
            .iter()
            .filter(|f| !f.outgoing && f.ipv4().is_some_and(|ip| ip.proto() == PROTO_ICMP))
            .map(describe)
            .collect();
        let after = nat.stats()?;
        if !leaked.is_empty() {
            failures.push(format!("{what}: reached lan: {leaked:?}"));
        }
        if after.delta(&before, "icmp_error_dropped")? < 1 {
            failures.push(format!(
                "{what}: icmp_error_dropped did not count it ({})",
                after.changes(&before)
            ));
        }
    }
    // The binding is untouched.
    remote.send_to(b"still mapped", ext)?;
    if udp_expect(&lan, b"still mapped", Duration::from_secs(3))?.is_none() {
        failures.push(format!(
            "after the dropped errors, the binding {ext} no longer delivers"
        ));
    }
    ensure!(
        failures.is_empty(),
        "unmatched ICMP errors:\n{}",
        failures.join("\n")
    );
    nat.stop()
}

#[test]
fn rfc5508_req5_outbound_error_translated() -> Result<()> {
    // lan's kernel answers a datagram for a closed port with 3/3; the NAT must send it out
    // with its own address outside and the external endpoint inside: nothing internal leaks.
    let lab = Lab::new("icmpout")?;
    let nat = NatProcess::attach(&lab, &["--mode", "full-cone", "--ports", PORTS])?;
    let internal = sa(LAN_IP, 41000);
    let lan = udp_bind(&lab.lan, internal)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let ext = open_mapping(&lan, &remote)?;
    drop(lan);

    let stranger = udp_bind(&lab.wan2, sa(WAN2_IP, 5555))?;
    let before = nat.stats()?;
    let sniff = Sniffer::open(&lab.wan2, HOST_IF)?;
    stranger.connect(ext)?;
    stranger.send(b"anyone home?")?;
    // wan2's connected socket sees the error as ECONNREFUSED.
    match udp_recv(&stranger, Duration::from_secs(3)) {
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(|e| e.kind()) == Some(ErrorKind::ConnectionRefused) => {
        }
        other => bail!("wan2 expected ECONNREFUSED from lan's port unreachable, got {other:?}"),
    }
    let frames = sniff.capture_for(Duration::from_millis(300));
    let errors = icmp_errors(&frames);
    ensure!(errors.len() == 1, "wan2 captured {} ICMP errors", errors.len());
    ensure!(
        !ScapyIcmpError::frame_contains(errors[0], LAN_IP),
        "the error leaving the NAT still holds the internal address {LAN_IP}: {}",
        describe(errors[0])
    );
    let e = &scapy_parse(&lab.wan2, &errors)?[0];
    ensure!((e.kind, e.code) == (3, 3), "ICMP {}/{}", e.kind, e.code);
    ensure!(
        e.outer_src == NAT_EXT && e.outer_dst == WAN2_IP,
        "outer {} -> {}, expected {NAT_EXT} -> {WAN2_IP} (RFC 5508 REQ-5c)",
        e.outer_src,
        e.outer_dst
    );
    ensure!(
        e.inner_src == sa(WAN2_IP, 5555) && e.inner_dst == ext,
        "embedded {} -> {}, expected {WAN2_IP}:5555 -> {ext}",
        e.inner_src,
        e.inner_dst
    );
    e.checksums_ok()?;
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "icmp_error_out")? >= 1,
        "icmp_error_out did not count it ({})",
        after.changes(&before)
    );
    ensure!(
        nat.mappings()?
            .iter()
            .any(|m| m.proto == "udp" && m.internal == internal && m.external == ext),
        "the outbound error tore the binding down"
    );
    nat.stop()
}

#[test]
fn rfc5508_req7_hairpinned_error() -> Result<()> {
    let lab = Lab::with(
        "icmphp",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let lan2_if = lab.lan2_if.clone().unwrap();
    let nat = NatProcess::attach(
        &lab,
        &[
            "--mode",
            "full-cone",
            "--ports",
            PORTS,
            "--internal-iface",
            &lab.lan_if,
            "--internal-iface",
            &lan2_if,
        ],
    )?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    // lan2 gets a binding, then closes its socket: its kernel will refuse what arrives.
    let lan2 = udp_bind(lab.lan2(), sa(LAN2_IP, 42000))?;
    let x2 = open_mapping(&lan2, &remote)?;
    drop(lan2);
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 41000))?;
    let x1 = open_mapping(&lan, &remote)?;

    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    lan.connect(x2)?;
    lan.send(b"to lan2's external endpoint")?;
    match udp_recv(&lan, Duration::from_secs(3)) {
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(|e| e.kind()) == Some(ErrorKind::ConnectionRefused) => {
        }
        other => bail!("lan expected ECONNREFUSED (lan2's port unreachable, hairpinned), got {other:?}"),
    }
    let frames = sniff.capture_for(Duration::from_millis(300));
    let errors = icmp_errors(&frames);
    ensure!(errors.len() == 1, "lan captured {} ICMP errors", errors.len());
    ensure!(
        !ScapyIcmpError::frame_contains(errors[0], LAN2_IP),
        "the hairpinned error shows lan2's internal address: {}",
        describe(errors[0])
    );
    let e = &scapy_parse(&lab.lan, &errors)?[0];
    ensure!((e.kind, e.code) == (3, 3), "ICMP {}/{}", e.kind, e.code);
    ensure!(
        e.outer_src == NAT_EXT && e.outer_dst == LAN_IP,
        "outer {} -> {}, expected {NAT_EXT} -> {LAN_IP} (RFC 5508 REQ-7a)",
        e.outer_src,
        e.outer_dst
    );
    ensure!(
        e.inner_src == sa(LAN_IP, 41000) && e.inner_dst == x2,
        "embedded {} -> {}, expected lan's original datagram {LAN_IP}:41000 -> {x2} (lan's external was {x1})",
        e.inner_src,
        e.inner_dst
    );
    e.checksums_ok()?;
    nat.stop()
}

#[test]
fn rfc5508_req1a_echo_identifier_mapping() -> Result<()> {
    let lab = Lab::with(
        "icmpid",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let nat = NatProcess::attach(&lab, &["--ports", PORTS])?;
    let sniff = Sniffer::open(&lab.nat, &lab.wan_if)?;
    // lan pings two hosts with identifier 4242 at once; lan2 uses 4242 too.
    let (a, b, c) = std::thread::scope(|s| {
        let a = s.spawn(|| tools::ping(&lab.lan, WAN_IP, 3, &["-e", "4242"]));
        let b = s.spawn(|| tools::ping(&lab.lan, WAN2_IP, 3, &["-e", "4242"]));
        let c = s.spawn(|| tools::ping(lab.lan2(), WAN_IP, 3, &["-e", "4242"]));
        (
            a.join().expect("ping"),
            b.join().expect("ping"),
            c.join().expect("ping"),
        )
    });
    for (what, out) in [("lan -> wan", a?), ("lan -> wan2", b?), ("lan2 -> wan", c?)] {
        ensure!(
            tools::ping_received(&out) == 3,
            "{what} with identifier 4242: {}{}",
            out.stdout,
            out.stderr
        );
    }
    let frames = sniff.capture_for(Duration::from_millis(300));
    // Echo requests leaving the NAT: (destination, identifier).
    let sent: Vec<(Ipv4Addr, u16)> = frames
        .iter()
        .filter(|f| f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| ip.src() == NAT_EXT)
        .filter_map(|ip| {
            ip.icmp()
                .filter(|i| i.kind() == 8)
                .map(|i| (ip.dst(), i.echo_id()))
        })
        .collect();
    let ids_to = |dst: Ipv4Addr| -> std::collections::BTreeSet<u16> {
        sent.iter()
            .filter(|(d, _)| *d == dst)
            .map(|(_, id)| *id)
            .collect()
    };
    let to_wan2 = ids_to(WAN2_IP);
    ensure!(
        to_wan2.len() == 1,
        "lan's pings to wan2 left with identifiers {to_wan2:?}"
    );
    let lan_id = *to_wan2.iter().next().unwrap();
    ensure!(
        (20000..=20099).contains(&lan_id),
        "identifier 4242 left as {lan_id}, outside --ports {PORTS}"
    );
    let to_wan = ids_to(WAN_IP);
    ensure!(
        to_wan.len() == 2 && to_wan.contains(&lan_id),
        "towards wan the identifiers were {to_wan:?}: expected lan's {lan_id} (the same as towards wan2, RFC 5508 REQ-1a) and another one for lan2"
    );
    nat.stop()
}
