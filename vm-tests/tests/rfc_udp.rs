//! RFC 4787 (UDP) and RFC 7857 requirements, one test per requirement, beyond what basic.rs,
//! ports.rs, expiry.rs and fragments.rs already cover: port overloading under concurrent new
//! flows, determinism under collisions, privileged ports and parity under collision, port
//! preservation, paired pooling, protocol-dependent bindings, no inbound refresh, fragments
//! out of order outbound, and fragment floods. Root only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vm_tests::classify::{natdiscovery, vovida};
use vm_tests::flows::{concurrent_bursts, reflector, shared_external, unanswered, Burst};
use vm_tests::lab::{HOST_IF, LAN2_IP, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP, WAN_IP2};
use vm_tests::nat::{nat_ctl, Leftovers};
use vm_tests::packet::{Sniffer, PROTO_ICMP};
use vm_tests::proc::{poll, Proc};
use vm_tests::tools::{self, scapy, udp_bind, udp_expect, udp_recv, whoami, Turnserver};
use vm_tests::{Lab, LabOptions, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn lab2(tag: &str) -> Result<Lab> {
    Lab::with(
        tag,
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )
}

/// The reflector every test here asks "which source did you see?".
const WHOAMI_PORT: u16 = 9999;

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

/// Four processes (two per internal host) open `per_proc` flows each at the same moment,
/// both hosts from the same source ports. Checks every flow got an answer and no external
/// endpoint serves two internal endpoints; returns what each flow got.
fn burst_from_both_hosts(
    lab: &Lab,
    first_port: u16,
    per_proc: u16,
) -> Result<BTreeMap<SocketAddrV4, SocketAddrV4>> {
    let bursts = [
        Burst {
            ns: &lab.lan,
            local_ip: LAN_IP,
            first_port,
            count: per_proc,
        },
        Burst {
            ns: &lab.lan,
            local_ip: LAN_IP,
            first_port: first_port + per_proc,
            count: per_proc,
        },
        Burst {
            ns: lab.lan2(),
            local_ip: LAN2_IP,
            first_port,
            count: per_proc,
        },
        Burst {
            ns: lab.lan2(),
            local_ip: LAN2_IP,
            first_port: first_port + per_proc,
            count: per_proc,
        },
    ];
    let seen = concurrent_bursts(&bursts, sa(WAN_IP, WHOAMI_PORT))?;
    let lost = unanswered(&bursts, &seen);
    ensure!(
        lost.is_empty(),
        "{} of {} concurrent flows got no answer (first: {:?})",
        lost.len(),
        4 * per_proc,
        &lost[..lost.len().min(8)]
    );
    let shared = shared_external(&seen);
    ensure!(
        shared.is_empty(),
        "port overloading (RFC 4787 REQ-3): {} external endpoints serve two internal endpoints: {:?}",
        shared.len(),
        &shared[..shared.len().min(8)]
    );
    Ok(seen)
}

#[test]
fn rfc4787_req3_no_port_overloading_under_concurrency() -> Result<()> {
    let lab = lab2("ovlconc")?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;

    // Default range: both hosts race for the same preserved ports.
    let nat = NatProcess::attach(&lab, &[])?;
    let seen = burst_from_both_hosts(&lab, 40000, 100)?;
    ensure!(
        seen.values().all(|e| *e.ip() == NAT_EXT),
        "a flow left with another source address"
    );
    // The table agrees: no external endpoint is listed for two internal endpoints.
    let mut owners: BTreeMap<SocketAddrV4, BTreeSet<SocketAddrV4>> = BTreeMap::new();
    for m in nat.mappings()?.into_iter().filter(|m| m.proto == "udp") {
        owners.entry(m.external).or_default().insert(m.internal);
    }
    let doubled: Vec<_> = owners.iter().filter(|(_, v)| v.len() > 1).collect();
    ensure!(
        doubled.is_empty(),
        "the table gives one external endpoint to several internal ones: {doubled:?}"
    );
    nat.stop()?;

    // A small range: every flow needs a random port, so the allocators collide while probing.
    let nat = NatProcess::attach(&lab, &["--ports", "20000-21023"])?;
    let seen = burst_from_both_hosts(&lab, 41000, 100)?;
    for (int, ext) in &seen {
        ensure!(
            (20000..=21023).contains(&ext.port()),
            "{int} got {ext}, outside --ports 20000-21023"
        );
        ensure!(
            ext.port() % 2 == int.port() % 2,
            "{int} got {ext}: parity not kept with half the range free (RFC 4787 REQ-4)"
        );
    }
    nat.stop()
}

#[test]
fn rfc4787_req3_ports_found_when_hosts_share_source_ports() -> Result<()> {
    // Two hosts, two processes each, opening 4000 flows from the same 2000 source ports: the
    // first host to claim a port keeps it, the other needs a free port elsewhere while a block
    // of taken ports grows. Every flow must get one (an earlier sequential walk from a random
    // start refused the flows whose start fell deep inside the block, with 88% of the range
    // free).
    let lab = lab2("sharedsrc")?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let nat = NatProcess::attach(&lab, &[])?;
    let seen = burst_from_both_hosts(&lab, 40000, 1000)?;
    ensure!(seen.len() == 4000, "{} of 4000 flows answered", seen.len());
    let refused = nat.stats()?.get("port_exhausted")?;
    ensure!(
        refused == 0,
        "{refused} flows refused as port_exhausted with most of the range free"
    );
    nat.stop()
}

/// Classifies the NAT from lan with natdiscovery and the Vovida client (fresh ports).
fn classify(lab: &Lab, vovida_port: u16) -> Result<(String, String, String)> {
    let (map, filt) = natdiscovery(&lab.lan, LAN_IP, WAN_IP)?;
    let vo = vovida(&lab.lan, WAN_IP, vovida_port)?;
    ensure!(
        !map.result.is_empty() && !filt.result.is_empty(),
        "natdiscovery gave no verdict:\n{}",
        map.output
    );
    ensure!(
        !vo.result.is_empty(),
        "Vovida stun gave no result:\n{}",
        vo.output
    );
    Ok((map.result, filt.result, vo.result))
}

#[test]
fn rfc4787_req11_deterministic_under_collisions() -> Result<()> {
    let lab = lab2("determ")?;
    let _turn = Turnserver::start(&lab.wan, WAN_IP, WAN_IP2, lab.names.ns("turn").as_str())?;
    let _who = reflector(&lab.wan2, WAN2_IP, WHOAMI_PORT)?;
    // 256 ports: the collisions below fill about 40% of it.
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20255"])?;
    let first = classify(&lab, 23000)?;
    ensure!(
        first.0 == "NAT with Endpoint Independent Mapping!"
            && first.1 == "NAT with Address and Port Dependent Filtering!"
            && first.2.starts_with("Independent Mapping, Port Dependent Filter"),
        "port-restricted NAT classified as {first:?}"
    );
    // Both hosts, same source ports, at the same moment, towards another remote.
    let bursts = [
        Burst {
            ns: &lab.lan,
            local_ip: LAN_IP,
            first_port: 40000,
            count: 50,
        },
        Burst {
            ns: lab.lan2(),
            local_ip: LAN2_IP,
            first_port: 40000,
            count: 50,
        },
    ];
    let seen = concurrent_bursts(&bursts, sa(WAN2_IP, WHOAMI_PORT))?;
    ensure!(
        unanswered(&bursts, &seen).is_empty() && shared_external(&seen).is_empty(),
        "the colliding flows: unanswered {:?}, shared {:?}",
        unanswered(&bursts, &seen),
        shared_external(&seen)
    );
    let second = classify(&lab, 23010)?;
    ensure!(
        second == first,
        "the classification changed after port collisions (RFC 4787 REQ-11): before {first:?}, after {second:?}"
    );
    nat.stop()
}

#[test]
fn rfc4787_req3a_privileged_ports_stay_privileged() -> Result<()> {
    let lab = lab2("priv")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let to = sa(WAN_IP, WHOAMI_PORT);
    for port in [123u16, 1023] {
        let s1 = udp_bind(&lab.lan, sa(LAN_IP, port))?;
        let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, port))?;
        let e1 = whoami(&s1, to)?;
        let e2 = whoami(&s2, to)?;
        for (who, e) in [("lan", e1), ("lan2", e2)] {
            ensure!(
                (1..=1023).contains(&e.port()),
                "{who}:{port} mapped to {e}, outside 1-1023 (RFC 4787 REQ-3a)"
            );
            ensure!(
                e.port() % 2 == port % 2,
                "{who}:{port} mapped to {e}: parity lost"
            );
        }
        ensure!(e1 != e2, "lan:{port} and lan2:{port} share {e1}");
    }
    // The first port above the privileged range maps into the dynamic range.
    let s = udp_bind(&lab.lan, sa(LAN_IP, 1024))?;
    let e = whoami(&s, to)?;
    ensure!(
        (20000..=20099).contains(&e.port()),
        "lan:1024 mapped to {e}, outside --ports 20000-20099"
    );
    nat.stop()
}

#[test]
fn rfc4787_req4_parity_kept_under_collision() -> Result<()> {
    let lab = lab2("parity")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let to = sa(WAN_IP, WHOAMI_PORT);
    let mut held = Vec::new();
    for port in [40000u16, 40001] {
        let s1 = udp_bind(&lab.lan, sa(LAN_IP, port))?;
        let e1 = whoami(&s1, to)?;
        ensure!(
            e1.port() == port,
            "lan:{port} got {e1}: a free port was not preserved"
        );
        // lan2 wants the same port: it must get another one of the same parity.
        let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, port))?;
        let e2 = whoami(&s2, to)?;
        ensure!(e2 != e1, "lan2:{port} shares {e1} with lan:{port}");
        ensure!(
            e2.port() % 2 == port % 2,
            "lan2:{port} got {e2}: parity not kept under collision (RFC 4787 REQ-4)"
        );
        held.push((s1, s2));
    }
    nat.stop()
}

#[test]
fn rfc4787_port_preservation() -> Result<()> {
    let lab = Lab::new("preserve")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let s = udp_bind(&lab.lan, sa(LAN_IP, 40002))?;
    let e = whoami(&s, sa(WAN_IP, WHOAMI_PORT))?;
    ensure!(
        e == sa(NAT_EXT, 40002),
        "UDP lan:40002 left as {e}, expected {NAT_EXT}:40002"
    );

    let _tcp = tools::tcp_whoami(&lab.wan, WAN_IP, 9998)?;
    let stream = lab.lan.enter(|| {
        vm_tests::p2p::tcp_connect_from(sa(LAN_IP, 40004), sa(WAN_IP, 9998), Duration::from_secs(10))
    })?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &stream, &mut text)?;
    ensure!(
        text.trim() == format!("{NAT_EXT}:40004"),
        "TCP lan:40004 left as {}, expected {NAT_EXT}:40004",
        text.trim()
    );
    nat.stop()
}

/// The external address a source address of lan gets: one UDP flow from `ip` to the reflector.
fn udp_source_ip(lab: &Lab, ip: Ipv4Addr, port: u16) -> Result<Ipv4Addr> {
    let s = udp_bind(&lab.lan, sa(ip, port))?;
    Ok(*whoami(&s, sa(WAN_IP, WHOAMI_PORT))?.ip())
}

/// A NAT with a pool of two external addresses, both on its external interface.
const POOL: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 51, 100, 253), NAT_EXT];

fn attach_pool(lab: &Lab) -> Result<NatProcess> {
    lab.nat
        .ip(&["addr", "add", "198.51.100.253/24", "dev", &lab.wan_if])?;
    let nat = NatProcess::attach(
        lab,
        &[
            "--external-addr",
            &POOL[0].to_string(),
            "--external-addr",
            &POOL[1].to_string(),
        ],
    )?;
    ensure!(
        nat.attached_line().contains(&POOL[0].to_string())
            && nat.attached_line().contains(&POOL[1].to_string()),
        "attached line does not list the pool: {}",
        nat.attached_line()
    );
    Ok(nat)
}

#[test]
fn rfc4787_req2_paired_pooling() -> Result<()> {
    let lab = lab2("pool")?;
    let nat = attach_pool(&lab)?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let _tcp = tools::tcp_whoami(&lab.wan, WAN_IP, 9998)?;
    let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    let mut used = Vec::new();
    for (host, ns, ip) in [("lan", &lab.lan, LAN_IP), ("lan2", lab.lan2(), LAN2_IP)] {
        let mut seen = BTreeSet::new();
        // 20 UDP flows, each answered (so inbound works on whichever address it got).
        for port in 40000..40020u16 {
            let s = udp_bind(ns, sa(ip, port))?;
            seen.insert(*whoami(&s, sa(WAN_IP, WHOAMI_PORT))?.ip());
        }
        // 5 TCP connections.
        for _ in 0..5 {
            let (ext, _) = tools::tcp_whoami_query(ns, sa(WAN_IP, 9998))?;
            seen.insert(*ext.ip());
        }
        ensure!(
            seen.len() == 1,
            "{host} ({ip}) used several external addresses: {seen:?} (RFC 4787 REQ-2)"
        );
        let addr = *seen.iter().next().unwrap();
        ensure!(POOL.contains(&addr), "{host} left as {addr}, not from the pool");
        // ICMP echo leaves from the same address, and the replies come back.
        let out = tools::ping(ns, WAN_IP, 3, &[])?;
        ensure!(
            tools::ping_received(&out) == 3,
            "{host}: ping through the pool: {}",
            out.stdout
        );
        used.push((host, addr));
    }
    // Every echo request wan saw came from the address of its host's other flows.
    let frames = sniff.capture_for(Duration::from_millis(300));
    let echo_sources: BTreeSet<Ipv4Addr> = frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| ip.proto() == PROTO_ICMP && ip.icmp().is_some_and(|i| i.kind() == 8))
        .map(|ip| ip.src())
        .collect();
    let flow_sources: BTreeSet<Ipv4Addr> = used.iter().map(|(_, a)| *a).collect();
    ensure!(
        echo_sources == flow_sources,
        "echo requests left from {echo_sources:?}, the hosts' UDP/TCP flows from {used:?}"
    );
    // The table agrees: one external address per internal address.
    for m in nat.mappings()? {
        let want = if *m.internal.ip() == LAN_IP {
            used[0].1
        } else {
            used[1].1
        };
        ensure!(
            *m.external.ip() == want,
            "the table maps {} ({}) to {}, but that host's flows use {want}",
            m.internal,
            m.proto,
            m.external
        );
    }
    nat.stop()
}

#[test]
fn rfc6888_req13_pool_addresses_all_used() -> Result<()> {
    // With two external addresses, sixteen hosts of one /24 must not all be put on one of
    // them: that would leave half the pool's ports unused (RFC 6888 REQ-13: maximise port
    // use). The choice is a fixed function of the host address, so this is deterministic.
    let lab = Lab::new("poolspread")?;
    let hosts: Vec<Ipv4Addr> = (10..26).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
    for h in &hosts {
        lab.lan.ip(&["addr", "add", &format!("{h}/24"), "dev", HOST_IF])?;
    }
    let nat = attach_pool(&lab)?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let mut by_addr: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> = BTreeMap::new();
    for h in &hosts {
        let ext = udp_source_ip(&lab, *h, 40000)?;
        // Paired: a second flow of the same host uses the same address.
        ensure!(
            udp_source_ip(&lab, *h, 40001)? == ext,
            "{h}: two flows left from different addresses"
        );
        by_addr.entry(ext).or_default().push(*h);
    }
    ensure!(
        by_addr.len() == POOL.len(),
        "16 hosts of 10.0.0.0/24 all use {:?}; the other pool address is never used",
        by_addr.keys().collect::<Vec<_>>()
    );
    nat.stop()
}

#[test]
fn rfc4787_req2_duplicate_external_address_refused() -> Result<()> {
    let lab = Lab::new("pooldup")?;
    lab.nat
        .ip(&["addr", "add", "198.51.100.253/24", "dev", &lab.wan_if])?;
    let cases: [(&str, Vec<&str>); 2] = [
        (
            "the same address twice",
            vec![
                "--external-addr",
                "198.51.100.253",
                "--external-addr",
                "198.51.100.253",
            ],
        ),
        (
            "the primary address twice among others",
            vec![
                "--external-addr",
                "198.51.100.254",
                "--external-addr",
                "198.51.100.253",
                "--external-addr",
                "198.51.100.254",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (what, extra) in &cases {
        let mut args = vec!["attach", lab.wan_if.as_str()];
        args.extend(extra.iter().copied());
        let mut p = Proc::spawn(&format!("nat-ctl {}", args.join(" ")), nat_ctl(&lab.nat, &args))?;
        let exited = poll(Duration::from_secs(30), Duration::from_millis(20), || {
            if p.stdout().contains("attached ") {
                return Some(false);
            }
            matches!(p.try_wait(), Ok(Some(_))).then_some(true)
        });
        if exited != Some(true) {
            let _ = p.terminate(Duration::from_secs(20));
            failures.push(format!(
                "{what}: attached (or hung) instead of refusing: {}",
                p.stdout()
            ));
            continue;
        }
        let out = p.finish(Duration::from_secs(5))?;
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        if out.status.success() {
            failures.push(format!("{what}: exited 0"));
        }
        if lines.len() != 1 || !out.stderr.contains("198.51.100.") {
            failures.push(format!(
                "{what}: expected one stderr line naming the address, got:\n{}",
                out.stderr
            ));
        }
        let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
        if !left.is_clean() {
            failures.push(format!("{what}: left behind {left:?}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "duplicate external addresses:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn rfc7857_s5_protocol_dependent_mapping() -> Result<()> {
    // RFC 7857 §5 (protocol-dependent mapping) and §6 (protocol-dependent filtering, the
    // TCP -> UDP direction; filtering.rs checks UDP -> TCP).
    let lab = Lab::new("protodep")?;
    let nat = NatProcess::attach(&lab, &["--mode", "full-cone"])?;
    let port = 40000;
    let _tcp = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let stream = lab.lan.enter(|| {
        vm_tests::p2p::tcp_connect_from(sa(LAN_IP, port), sa(WAN_IP, 5001), Duration::from_secs(10))
    })?;
    let maps = nat.mappings()?;
    let tcp = maps
        .iter()
        .find(|m| m.proto == "tcp" && m.internal == sa(LAN_IP, port))
        .with_context(|| format!("no TCP binding for lan:{port}: {maps:#?}"))?
        .external;
    ensure!(
        !maps
            .iter()
            .any(|m| m.proto == "udp" && m.internal == sa(LAN_IP, port)),
        "a TCP connection created a UDP binding: {maps:#?}"
    );

    // A stranger's UDP datagram to the TCP binding's endpoint does not reach lan's UDP socket
    // on the same port, although the NAT is full cone.
    let lan_udp = udp_bind(&lab.lan, sa(LAN_IP, port))?;
    let stranger = udp_bind(&lab.wan2, sa(WAN2_IP, 5555))?;
    stranger.send_to(b"udp to a tcp binding", tcp)?;
    ensure!(
        udp_expect(&lan_udp, b"udp to a tcp binding", Duration::from_secs(2))?.is_none(),
        "a UDP datagram to the TCP binding {tcp} reached lan (RFC 7857 §6)"
    );

    // Now UDP from the same port: its own binding, listed separately.
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let udp = open_mapping(&lan_udp, &remote)?;
    let maps = nat.mappings()?;
    let rows: Vec<_> = maps.iter().filter(|m| m.internal == sa(LAN_IP, port)).collect();
    ensure!(
        rows.iter().any(|m| m.proto == "udp" && m.external == udp)
            && rows.iter().any(|m| m.proto == "tcp" && m.external == tcp),
        "UDP ({udp}) and TCP ({tcp}) bindings of lan:{port} not both listed: {rows:#?}"
    );
    // Both work: the stranger now reaches the UDP binding (full cone), the TCP connection echoes.
    stranger.send_to(b"udp to the udp binding", udp)?;
    ensure!(
        udp_expect(&lan_udp, b"udp to the udp binding", Duration::from_secs(3))?.is_some(),
        "full cone: the stranger's datagram to the UDP binding {udp} did not arrive"
    );
    let data = tools::pattern(4096, 7);
    let back = tools::tcp_roundtrip(stream, &data)?;
    ensure!(back == data, "the TCP connection broke");
    nat.stop()
}

#[test]
fn rfc4787_req6a_inbound_does_not_refresh() -> Result<()> {
    // Outbound refresh only (REQ-6; inbound refresh is a MAY that this NAT does not do, and
    // RFC 7857 §7 warns against it). expiry.rs shows outbound traffic keeps a mapping alive.
    let lab = Lab::new("inrefresh")?;
    let nat = NatProcess::attach(&lab, &["--udp-timeout", "3"])?;
    let internal = sa(LAN_IP, 40000);
    let lan = udp_bind(&lab.lan, internal)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let ext = open_mapping(&lan, &remote)?;
    // The remote keeps sending, twice a second; lan never answers. The mapping must still
    // go away (bounded: 20 s).
    let start = Instant::now();
    let mut delivered = 0;
    let mut gone = false;
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(20) {
        remote.send_to(format!("inbound {i}").as_bytes(), ext)?;
        if udp_expect(
            &lan,
            format!("inbound {i}").as_bytes(),
            Duration::from_millis(500),
        )?
        .is_some()
        {
            delivered += 1;
        }
        i += 1;
        if !nat
            .mappings()?
            .iter()
            .any(|m| m.proto == "udp" && m.internal == internal)
        {
            gone = true;
            break;
        }
    }
    ensure!(
        delivered > 0,
        "the remote never reached lan through the fresh mapping {ext}"
    );
    ensure!(
        gone,
        "inbound-only traffic kept the mapping {internal} -> {ext} alive for {:?} (--udp-timeout 3)",
        start.elapsed()
    );
    remote.send_to(b"after expiry", ext)?;
    ensure!(
        udp_expect(&lan, b"after expiry", Duration::from_secs(2))?.is_none(),
        "a datagram to the expired mapping {ext} still reached lan"
    );
    nat.stop()
}

#[test]
fn rfc4787_req10_payload_untouched() -> Result<()> {
    // No ALG by default: addresses and ports in payloads (SIP-like text and raw bytes) cross
    // the NAT byte for byte, both ways.
    let lab = Lab::new("noalg")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 5060))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 5060))?;
    let ext = open_mapping(&lan, &remote)?;
    let mut out = format!(
        "INVITE sip:bob@{WAN_IP} SIP/2.0\r\nVia: SIP/2.0/UDP {LAN_IP}:5060\r\nContact: <sip:alice@{LAN_IP}:5060>\r\n\r\nc=IN IP4 {LAN_IP}\r\n"
    )
    .into_bytes();
    out.extend_from_slice(&LAN_IP.octets());
    out.extend_from_slice(&5060u16.to_be_bytes());
    lan.send_to(&out, sa(WAN_IP, 5060))?;
    let (got, _) =
        udp_recv(&remote, Duration::from_secs(3))?.context("the SIP-like datagram never arrived")?;
    ensure!(
        got == out,
        "the outbound payload was changed:\nsent {out:?}\ngot  {got:?}"
    );
    let mut back = format!("SIP/2.0 200 OK\r\nContact: <sip:alice@{ext}>\r\n").into_bytes();
    back.extend_from_slice(&ext.ip().octets());
    back.extend_from_slice(&ext.port().to_be_bytes());
    remote.send_to(&back, ext)?;
    let (got, _) = udp_recv(&lan, Duration::from_secs(3))?.context("the answer never reached lan")?;
    ensure!(
        got == back,
        "the inbound payload was changed:\nsent {back:?}\ngot  {got:?}"
    );
    nat.stop()
}

/// 3000 bytes, the same as the scapy expression `bytes(i % 251 for i in range(3000))`.
fn payload() -> Vec<u8> {
    (0..3000u32).map(|i| (i % 251) as u8).collect()
}

#[test]
fn rfc4787_req14_outbound_fragments_out_of_order() -> Result<()> {
    let lab = Lab::new("fragout")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let gw_mac = Lab::mac(&lab.nat, &lab.lan_if)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    // Two datagrams, each sent last fragment first: one of a new flow (its first fragment,
    // which creates the binding, arrives last), one of the now existing flow.
    for (i, id) in [0x2345, 0x2346].iter().enumerate() {
        scapy(
            &lab.lan,
            &format!(
                "data = bytes(i % 251 for i in range(3000))\n\
                 pkt = IP(src='{LAN_IP}', dst='{WAN_IP}', id={id})/UDP(sport=40100, dport=9999)/Raw(data)\n\
                 frags = fragment(pkt, fragsize=1000)\n\
                 assert len(frags) >= 3\n\
                 sendp([Ether(dst='{gw_mac}')/f for f in reversed(frags)], iface='eth0')"
            ),
        )?;
        let (got, from) = udp_recv(&remote, Duration::from_secs(5))?
            .with_context(|| format!("datagram {i} (fragments sent last-first) never arrived at wan"))?;
        let SocketAddr::V4(from) = from else {
            bail!("IPv6 source {from}")
        };
        ensure!(
            *from.ip() == NAT_EXT && (20000..=20099).contains(&from.port()),
            "datagram {i} arrived from {from}, expected {NAT_EXT}:<20000-20099>"
        );
        ensure!(
            got == payload(),
            "datagram {i}: wan reassembled {} bytes that differ from the 3000 sent",
            got.len()
        );
    }
    nat.stop()
}

#[test]
fn rfc4787_req14a_fragment_flood_does_not_starve_traffic() -> Result<()> {
    let lab = Lab::new("fragflood")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let nat_mac = Lab::mac(&lab.nat, &lab.wan_if)?;
    let _who = reflector(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9000))?;
    let ext = open_mapping(&lan, &remote)?;
    let before = nat.stats()?;

    // 4000 non-first fragments with random IDs from wan2 to the NAT's address (bounded), in
    // the background.
    const FLOOD: u32 = 4000;
    let script = format!(
        "import logging\nlogging.getLogger('scapy.runtime').setLevel(logging.ERROR)\n\
         from scapy.all import *\nimport random\nconf.verb = 0\n\
         pkts = [Ether(dst='{nat_mac}')/IP(src='{WAN2_IP}', dst='{NAT_EXT}', proto=17, id=random.randrange(65536), \
         flags=random.choice([0, 1]), frag=random.randrange(1, 8000))/Raw(b'F' * 200) for _ in range({FLOOD})]\n\
         print('built', flush=True)\n\
         sendp(pkts, iface='eth0')\nprint('sent', flush=True)\n"
    );
    let flood = Proc::spawn(
        "scapy fragment flood",
        lab.wan2.cmd("/usr/bin/python3", &["-c", &script]),
    )?;
    poll(Duration::from_secs(30), Duration::from_millis(20), || {
        flood.stdout().contains("built").then_some(())
    })
    .with_context(|| format!("the flood generator did not start: {}", flood.stderr()))?;

    // While the flood runs: ping, unfragmented UDP both ways, and an in-order fragmented
    // datagram inbound.
    let (ping, udp) = thread::scope(|s| {
        let ping = s.spawn(|| tools::ping(&lab.lan, WAN_IP, 10, &["-W", "3"]));
        let udp = s.spawn(|| -> Result<u32> {
            let mut answered = 0;
            let sock = udp_bind(&lab.lan, sa(LAN_IP, 40001))?;
            for _ in 0..10 {
                if whoami(&sock, sa(WAN_IP, WHOAMI_PORT)).is_ok() {
                    answered += 1;
                }
                thread::sleep(Duration::from_millis(150));
            }
            Ok(answered)
        });
        (ping.join().expect("ping thread"), udp.join().expect("udp thread"))
    });
    remote.send_to(&payload(), ext)?;
    let frag_in = udp_recv(&lan, Duration::from_secs(5))?;
    let flood_out = flood.finish(Duration::from_secs(60))?;
    ensure!(
        flood_out.stdout.contains("sent"),
        "the flood generator failed: {}",
        flood_out.stderr
    );
    let after = nat.stats()?;
    let ping = ping?;
    ensure!(
        tools::ping_received(&ping) == 10,
        "ping during a stray fragment flood lost replies ({}):\n{}",
        after.changes(&before),
        ping.stdout
    );
    ensure!(udp? == 10, "UDP requests during the flood went unanswered");
    let (got, _) =
        frag_in.context("an in-order fragmented datagram sent during the flood never reached lan")?;
    ensure!(got == payload(), "the fragmented datagram arrived damaged");
    let stray = after.delta(&before, "fragment_parked")? + after.delta(&before, "fragment_no_state")?;
    ensure!(
        stray >= u64::from(FLOOD) / 2,
        "the NAT did not see the flood: {}",
        after.changes(&before)
    );

    // After the flood, out-of-order fragments of a real datagram are still reassembled.
    scapy(
        &lab.wan,
        &format!(
            "data = bytes(i % 251 for i in range(3000))\n\
             pkt = IP(src='{WAN_IP}', dst='{NAT_EXT}', id=0x3456)/UDP(sport=9000, dport={})/Raw(data)\n\
             frags = fragment(pkt, fragsize=1000)\n\
             sendp([Ether(dst='{nat_mac}')/f for f in reversed(frags)], iface='eth0')",
            ext.port()
        ),
    )?;
    let sniff_hint = || nat.stats().map(|s| s.changes(&after)).unwrap_or_default();
    let (got, from) = udp_recv(&lan, Duration::from_secs(5))?.with_context(|| {
        format!(
            "after the flood, a datagram sent last-fragment-first never reached lan ({})",
            sniff_hint()
        )
    })?;
    ensure!(from == SocketAddr::V4(sa(WAN_IP, 9000)), "arrived from {from}");
    ensure!(got == payload(), "the out-of-order datagram arrived damaged");
    nat.stop()
}
