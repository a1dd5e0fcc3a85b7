//! Static forwards: `nat-ctl forward add/del/list` deliver to a server behind
//! the NAT in every mode and from any remote, the server's replies leave from the forwarded
//! port, forwards never expire, conflicts and bad input are refused with one line and change
//! nothing. (Restart: restart.rs; a full table: limits.rs.) Root only.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::ops::{self, forward_entry, sa};
use vm_tests::proc::poll;
use vm_tests::tools::{self, tcp_whoami_query, udp_bind, udp_expect, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

const MODES: [&str; 4] = ["full-cone", "restricted-cone", "port-restricted", "symmetric"];

/// Requires that UDP `NAT_EXT:ext_port` reaches the whoami server behind it from `ns` (source
/// port `src_port`): the reply comes from the forwarded endpoint and names the remote's real
/// address (the server sees who talks to it).
fn udp_forward_works(ns: &vm_tests::netns::Netns, src: Ipv4Addr, src_port: u16, ext_port: u16) -> Result<()> {
    let sock = udp_bind(ns, sa(src, src_port))?;
    // `whoami` only accepts a reply whose source is exactly NAT_EXT:ext_port.
    let seen = whoami(&sock, sa(NAT_EXT, ext_port))
        .with_context(|| format!("no reply from the forwarded {NAT_EXT}:{ext_port} to {src}:{src_port}"))?;
    ensure!(
        seen == sa(src, src_port),
        "the server behind udp {ext_port} saw {seen}, expected the remote {src}:{src_port}"
    );
    Ok(())
}

/// The same over TCP: the connection to `NAT_EXT:ext_port` is accepted (so the SYN-ACK came from
/// that endpoint) and the server saw the remote's address.
fn tcp_forward_works(ns: &vm_tests::netns::Netns, src: Ipv4Addr, ext_port: u16) -> Result<()> {
    let (seen, local) = tcp_whoami_query(ns, sa(NAT_EXT, ext_port))
        .with_context(|| format!("TCP via the forward {NAT_EXT}:{ext_port} from {src}"))?;
    ensure!(
        SocketAddr::V4(seen) == local,
        "the server behind tcp {ext_port} saw {seen}, the client is {local}"
    );
    Ok(())
}

#[test]
fn forwards_deliver_in_every_mode_from_any_remote_and_replies_leave_from_the_forwarded_port() -> Result<()> {
    let lab = Lab::new("fwdmodes")?;
    let _udp_srv = udp_whoami(&lab.lan, LAN_IP, 5353)?;
    let _tcp_srv = tools::tcp_whoami(&lab.lan, LAN_IP, 80)?;
    let mut failures = Vec::new();
    for (i, mode) in MODES.iter().enumerate() {
        let nat = NatProcess::attach(&lab, &["--mode", mode])?;
        let added = ops::forward_ok(
            &lab.nat,
            &lab.wan_if,
            "add",
            &["udp", "5353", &format!("{LAN_IP}:5353")],
        )?;
        ensure!(!added.trim().is_empty(), "forward add printed nothing");
        ops::forward_ok(
            &lab.nat,
            &lab.wan_if,
            "add",
            &["tcp", "8080", &format!("{LAN_IP}:80")],
        )?;
        let list = ops::forwards_in(&lab.nat, &lab.wan_if)?;
        let want = vec![
            forward_entry("tcp", sa(NAT_EXT, 8080), sa(LAN_IP, 80)),
            forward_entry("udp", sa(NAT_EXT, 5353), sa(LAN_IP, 5353)),
        ];
        ensure!(list == want, "{mode}: forward list {list:?}, expected {want:?}");
        // Two remotes that lan never talked to, each from a port of its own.
        let port = 7000 + i as u16 * 10;
        for (ns, ip) in [(&lab.wan, WAN_IP), (&lab.wan2, WAN2_IP)] {
            if let Err(e) = udp_forward_works(ns, ip, port, 5353) {
                failures.push(format!("{mode}: {e:#}"));
            }
            if let Err(e) = tcp_forward_works(ns, ip, 8080) {
                failures.push(format!("{mode}: {e:#}"));
            }
        }
        nat.stop()?;
    }
    ensure!(failures.is_empty(), "forwards:\n{}", failures.join("\n"));
    Ok(())
}

#[test]
fn forwards_never_expire_and_are_listed_as_static() -> Result<()> {
    let lab = Lab::new("fwdstatic")?;
    let nat = NatProcess::attach(
        &lab,
        &[
            "--udp-timeout",
            "2",
            "--tcp-transitory-timeout",
            "2",
            "--sweep-interval-ms",
            "100",
        ],
    )?;
    let _srv = udp_whoami(&lab.lan, LAN_IP, 5353)?;
    ops::forward_ok(
        &lab.nat,
        &lab.wan_if,
        "add",
        &["udp", "5353", &format!("{LAN_IP}:5353")],
    )?;
    udp_forward_works(&lab.wan, WAN_IP, 7000, 5353)?;

    // A dynamic binding made now expires after 2 s of silence; the forward must outlive it.
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    whoami(&sock, sa(WAN_IP, 9999))?;
    let expired = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let rows = ops::rows(&nat, &[]).ok()?;
        (!rows.iter().any(|r| r.internal == sa(LAN_IP, 40000))).then_some(rows)
    })
    .context("the dynamic binding of 10.0.0.2:40000 never expired (--udp-timeout 2)")?;
    let fwd = expired
        .iter()
        .find(|r| r.internal == sa(LAN_IP, 5353) && r.remote.is_none())
        .with_context(|| format!("the forward's row is gone from mappings: {expired:#?}"))?;
    ensure!(
        fwd.state == "static" && fwd.expires_in.is_none() && fwd.external == sa(NAT_EXT, 5353),
        "forward row: {fwd:?} (want state static, expires_in null, external {NAT_EXT}:5353)"
    );
    let list = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        list == vec![forward_entry("udp", sa(NAT_EXT, 5353), sa(LAN_IP, 5353))],
        "forward list after the idle period: {list:?}"
    );
    // Still delivers, to a remote that never used it before.
    udp_forward_works(&lab.wan2, WAN2_IP, 7001, 5353)?;
    nat.stop()
}

#[test]
fn conflicting_forwards_are_refused_with_a_reason_and_change_nothing() -> Result<()> {
    let lab = Lab::new("fwdconf")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20099"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let dynamic = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = whoami(&dynamic, sa(WAN_IP, 9999))?;
    let p = ext.port().to_string();

    let mut failures = Vec::new();
    let mut expect_refusal = |what: &str, args: &[&str], words: &[&str]| -> Result<()> {
        let mut full = vec!["forward", "add", "-i", lab.wan_if.as_str()];
        full.extend_from_slice(args);
        let out = ops::ctl(&lab.nat, &full)?;
        match ops::refused(what, &out) {
            Ok(msg) => {
                if !words.iter().all(|w| msg.contains(w)) {
                    failures.push(format!("{what}: reason does not mention {words:?}: {msg}"));
                }
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
        Ok(())
    };
    expect_refusal(
        "external port held by a live dynamic binding",
        &["udp", &p, "10.0.0.2:6000"],
        &[&p, "dynamic"],
    )?;
    expect_refusal(
        "internal endpoint that has a live dynamic binding",
        &["udp", "6001", "10.0.0.2:40000"],
        &["10.0.0.2:40000"],
    )?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["udp", "7000", "10.0.0.2:7000"])?;
    expect_refusal(
        "external port already forwarded",
        &["udp", "7000", "10.0.0.3:7000"],
        &["7000", "10.0.0.2:7000"],
    )?;
    expect_refusal(
        "internal endpoint already forwarded",
        &["udp", "7001", "10.0.0.2:7000"],
        &["10.0.0.2:7000"],
    )?;
    // The same port in the other protocol is another endpoint: no conflict.
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["tcp", "7000", "10.0.0.3:7000"])?;
    ensure!(failures.is_empty(), "conflicts:\n{}", failures.join("\n"));

    let list = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    let want = vec![
        forward_entry("tcp", sa(NAT_EXT, 7000), sa(Ipv4Addr::new(10, 0, 0, 3), 7000)),
        forward_entry("udp", sa(NAT_EXT, 7000), sa(LAN_IP, 7000)),
    ];
    ensure!(
        list == want,
        "after the refusals, forward list is {list:?}, expected {want:?}"
    );
    // The dynamic binding whose port was asked for is untouched.
    ensure!(
        whoami(&dynamic, sa(WAN_IP, 9999))? == ext,
        "the dynamic binding {ext} changed after the refused forward"
    );

    // A forwarded port inside the dynamic range is never handed to a new flow: a socket whose
    // source port is that port (port preservation would pick it) gets another one. The port
    // must not be the one the dynamic binding above drew at random.
    let fwd_port: u16 = if ext.port() == 20050 { 20052 } else { 20050 };
    let fwd = fwd_port.to_string();
    let _srv = udp_whoami(&lab.lan, LAN_IP, 5353)?;
    ops::forward_ok(
        &lab.nat,
        &lab.wan_if,
        "add",
        &["udp", &fwd, &format!("{LAN_IP}:5353")],
    )?;
    let same_port = udp_bind(&lab.lan, sa(LAN_IP, fwd_port))?;
    let got = whoami(&same_port, sa(WAN_IP, 9999))?;
    ensure!(
        got.port() != fwd_port,
        "a new flow from 10.0.0.2:{fwd_port} was given the forwarded port {got}"
    );
    udp_forward_works(&lab.wan2, WAN2_IP, 7002, fwd_port)?;

    // del removes exactly one; deleting it again is refused.
    ops::forward_ok(&lab.nat, &lab.wan_if, "del", &["udp", "7000"])?;
    let list = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        !list.iter().any(|f| f.proto == "udp" && f.external.port() == 7000)
            && list.iter().any(|f| f.proto == "tcp" && f.external.port() == 7000),
        "after `forward del udp 7000`: {list:?}"
    );
    let out = ops::ctl(&lab.nat, &["forward", "del", "-i", &lab.wan_if, "udp", "7000"])?;
    ops::refused("forward del of a forward that is gone", &out)?;
    nat.stop()
}

#[test]
fn a_deleted_forward_no_longer_delivers() -> Result<()> {
    let lab = Lab::new("fwddel")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let server = udp_bind(&lab.lan, sa(LAN_IP, 5353))?;
    let client = udp_bind(&lab.wan, sa(WAN_IP, 7000))?;
    ops::forward_ok(
        &lab.nat,
        &lab.wan_if,
        "add",
        &["udp", "5353", &format!("{LAN_IP}:5353")],
    )?;
    client.send_to(b"while forwarded", sa(NAT_EXT, 5353))?;
    ensure!(
        udp_expect(&server, b"while forwarded", Duration::from_secs(3))?.is_some(),
        "the forward did not deliver"
    );
    ops::forward_ok(&lab.nat, &lab.wan_if, "del", &["udp", "5353"])?;
    client.send_to(b"after del", sa(NAT_EXT, 5353))?;
    ensure!(
        udp_expect(&server, b"after del", Duration::from_secs(2))?.is_none(),
        "a datagram to {NAT_EXT}:5353 still reached the server after `forward del`"
    );
    nat.stop()
}

#[test]
fn bad_forward_input_is_refused_with_one_line_and_changes_nothing() -> Result<()> {
    let lab = Lab::new("fwdbad")?;
    let nat = NatProcess::attach(&lab, &[])?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["udp", "5353", "10.0.0.2:5353"])?;
    let before = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    let rows_before = ops::rows(&nat, &[])?;
    let wan = lab.wan_if.as_str();
    let nosuch = lab.names.iface("zz");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("port 0", vec!["add", "-i", wan, "udp", "0", "10.0.0.2:80"]),
        (
            "port 65536",
            vec!["add", "-i", wan, "udp", "65536", "10.0.0.2:80"],
        ),
        (
            "negative port",
            vec!["add", "-i", wan, "tcp", "-1", "10.0.0.2:80"],
        ),
        ("port name", vec!["add", "-i", wan, "tcp", "http", "10.0.0.2:80"]),
        (
            "IPv6 internal",
            vec!["add", "-i", wan, "tcp", "8080", "[2001:db8::1]:80"],
        ),
        (
            "internal without port",
            vec!["add", "-i", wan, "tcp", "8080", "10.0.0.2"],
        ),
        (
            "internal port 0",
            vec!["add", "-i", wan, "tcp", "8080", "10.0.0.2:0"],
        ),
        (
            "internal port 70000",
            vec!["add", "-i", wan, "tcp", "8080", "10.0.0.2:70000"],
        ),
        (
            "protocol icmp",
            vec!["add", "-i", wan, "icmp", "8080", "10.0.0.2:80"],
        ),
        (
            "external address not the NAT's",
            vec![
                "add",
                "-i",
                wan,
                "--external-addr",
                "198.51.100.9",
                "tcp",
                "8080",
                "10.0.0.2:80",
            ],
        ),
        (
            "-i without a NAT",
            vec!["add", "-i", &nosuch, "tcp", "8080", "10.0.0.2:80"],
        ),
        ("del -i without a NAT", vec!["del", "-i", &nosuch, "udp", "5353"]),
        ("list -i without a NAT", vec!["list", "-i", &nosuch]),
        ("del of no forward", vec!["del", "-i", wan, "tcp", "9"]),
        ("del port 0", vec!["del", "-i", wan, "udp", "0"]),
    ];
    let mut failures = Vec::new();
    for (what, args) in &cases {
        let mut full = vec!["forward"];
        full.extend_from_slice(args);
        let out = ops::ctl(&lab.nat, &full)?;
        if let Err(e) = ops::refused(what, &out) {
            failures.push(format!("{e:#}"));
        }
    }
    let after = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    if after != before {
        failures.push(format!("forward list changed: {before:?} -> {after:?}"));
    }
    let rows_after = ops::rows(&nat, &[])?;
    if rows_after.len() != rows_before.len() {
        failures.push(format!("mappings changed: {rows_before:?} -> {rows_after:?}"));
    }
    ensure!(failures.is_empty(), "bad forward input:\n{}", failures.join("\n"));
    nat.stop()
}

#[test]
fn a_forward_on_a_second_external_address_uses_that_address() -> Result<()> {
    let lab = Lab::new("fwdaddr")?;
    let second = Ipv4Addr::new(198, 51, 100, 253);
    lab.nat
        .ip(&["addr", "add", "198.51.100.253/24", "dev", &lab.wan_if])?;
    let nat = NatProcess::attach(
        &lab,
        &[
            "--external-addr",
            &NAT_EXT.to_string(),
            "--external-addr",
            &second.to_string(),
        ],
    )?;
    let _srv = udp_whoami(&lab.lan, LAN_IP, 5000)?;
    ops::forward_ok(
        &lab.nat,
        &lab.wan_if,
        "add",
        &[
            "--external-addr",
            &second.to_string(),
            "udp",
            "5000",
            "10.0.0.2:5000",
        ],
    )?;
    let list = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        list == vec![forward_entry("udp", sa(second, 5000), sa(LAN_IP, 5000))],
        "forward list: {list:?}"
    );
    let sock = udp_bind(&lab.wan, sa(WAN_IP, 7000))?;
    let seen = whoami(&sock, sa(second, 5000))
        .with_context(|| format!("no reply from the forward on {second}:5000"))?;
    ensure!(seen == sa(WAN_IP, 7000), "server saw {seen}");
    // The first address's port 5000 is not forwarded.
    sock.send_to(b"wrong address", sa(NAT_EXT, 5000))?;
    if let Some((data, from)) = tools::udp_recv(&sock, Duration::from_secs(1))? {
        bail!(
            "{NAT_EXT}:5000 answered ({:?} from {from}) though only {second}:5000 is forwarded",
            String::from_utf8_lossy(&data)
        );
    }
    nat.stop()
}
