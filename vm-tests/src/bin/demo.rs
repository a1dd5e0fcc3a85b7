//! Demo: builds a lab (lan, lan2, nat, wan), attaches the NAT in port-restricted mode with the
//! plain one-line command (it finds the internal interfaces itself), sends some traffic through
//! it, hairpins from lan to lan2's external endpoint, shows the status, NAT table and counters,
//! then stops the NAT and removes the lab. Then, in a two-site lab, two peers behind symmetric
//! NATs fail to hole-punch and connect once one maps its port with PCP. Exits non-zero if any
//! step fails. Root only.
//!
//! `NAT_CTL` selects the nat-ctl binary (default: `<workspace>/target/release/nat-ctl`).

use std::net::SocketAddrV4;
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use std::time::Duration;

use vm_tests::lab::{LAN2_IP, LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::nat::nat_ctl_path;
use vm_tests::ops;
use vm_tests::p2p::{Rendezvous, TwoSites, GW_IP, HOST_IP, NAT_A_EXT, NAT_B_EXT, RV_IP};
use vm_tests::port_mapping as pm;
use vm_tests::tools::{self, udp_bind, udp_expect, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn run() -> Result<()> {
    section("lab");
    println!("nat-ctl: {}", nat_ctl_path().display());
    let lab = Lab::with(
        "demo",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    // veths accept XDP-redirected frames only with GRO on their peer (a lab detail, see the
    // README's notes for veth labs): so the fast path can send.
    ops::enable_fast_path_delivery(&lab)?;
    println!(
        "namespaces: lan {} (10.0.0.2), lan2 {} (10.0.1.2), nat {} (10.0.0.1, 10.0.1.1 | {} 198.51.100.254), wan {} (198.51.100.1)",
        lab.lan.name(),
        lab.lan2().name(),
        lab.nat.name(),
        lab.wan_if,
        lab.wan.name()
    );

    section("attach (nat-ctl attach IFACE --mode port-restricted)");
    let nat = NatProcess::attach(&lab, &["--mode", "port-restricted"])?;
    // Without their times, as the README shows them.
    for line in vm_tests::nat::log_lines(&nat.stderr()) {
        println!("{line}");
    }
    println!("{}", nat.attached_line());

    section("ping lan -> wan (3 packets)");
    let out = tools::ping(&lab.lan, WAN_IP, 3, &[])?;
    print!("{}", out.stdout);
    ensure!(
        tools::ping_received(&out) == 3,
        "ping got {} of 3 replies",
        tools::ping_received(&out)
    );

    section("UDP whoami");
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let internal = SocketAddrV4::new(LAN_IP, 40000);
    let sock = udp_bind(&lab.lan, internal)?;
    let seen = whoami(&sock, SocketAddrV4::new(WAN_IP, 9999))?;
    println!("lan {internal} -> wan {WAN_IP}:9999; wan saw the sender as {seen}");
    ensure!(*seen.ip() == NAT_EXT, "wan saw {seen}, not the NAT's address");

    section("TCP transfer (1 MiB echoed by socat)");
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let data = tools::pattern(1 << 20, 42);
    let stream = tools::tcp_connect(&lab.lan, SocketAddrV4::new(WAN_IP, 5001))?;
    let local = stream.local_addr()?;
    let back = tools::tcp_roundtrip(stream, &data)?;
    println!(
        "lan {local} -> wan {WAN_IP}:5001: sent {} bytes, received {} bytes back",
        data.len(),
        back.len()
    );
    ensure!(back == data, "the echoed data differs from what was sent");

    section("hairpin: lan -> lan2's external endpoint");
    let s2 = udp_bind(lab.lan2(), SocketAddrV4::new(LAN2_IP, 40000))?;
    let x2 = whoami(&s2, SocketAddrV4::new(WAN_IP, 9999))?;
    // Port-restricted filtering: lan2 opens its binding towards lan's external endpoint first.
    s2.send_to(b"open", seen)?;
    sock.send_to(b"hairpin", x2)?;
    let from = udp_expect(&s2, b"hairpin", Duration::from_secs(3))?
        .with_context(|| format!("lan's datagram to lan2's external endpoint {x2} never reached lan2"))?;
    println!("lan {internal} -> {x2} (lan2 {LAN2_IP}:40000 outside); lan2 saw it from {from}");
    ensure!(
        from == std::net::SocketAddr::V4(seen),
        "lan2 saw {from}, not lan's external endpoint {seen}"
    );

    section("nat-ctl status");
    print!("{}", nat.ctl_ok("status", &[])?);

    section("nat-ctl mappings");
    print!("{}", nat.ctl_ok("mappings", &[])?);

    section("nat-ctl stats");
    print!("{}", nat.ctl_ok("stats", &[])?);

    section("stop");
    nat.stop().context("stopping the NAT")?;
    println!("detached from {}", lab.wan_if);

    section("teardown");
    drop(lab);
    println!("lab removed");

    p2p_with_pcp()
}

/// The P2P story in the two-site lab: two peers behind symmetric NATs fail to hole-punch, and
/// connect once one maps its port with PCP (`--port-mapping pcp`).
fn p2p_with_pcp() -> Result<()> {
    section("P2P: two peers, each behind a symmetric NAT (attach --mode symmetric --port-mapping pcp)");
    let lab = TwoSites::new("demop2p")?;
    let _rv = Rendezvous::start(&lab.rv)?;
    let nat_a = pm::attach_symmetric_with_pcp(&lab.a)?;
    let nat_b = pm::attach_symmetric_with_pcp(&lab.b)?;
    println!(
        "site a: host {HOST_IP} behind {NAT_A_EXT}; site b: host {HOST_IP} behind {NAT_B_EXT}; rendezvous {RV_IP}"
    );
    let tag = std::process::id();
    let a = udp_bind(&lab.a.host, SocketAddrV4::new(HOST_IP, 43000))?;
    let b = udp_bind(&lab.b.host, SocketAddrV4::new(HOST_IP, 43005))?;
    let (pa, pb) = pm::punch_pair(&a, &b, &format!("{tag}-plain"))?;
    println!(
        "hole punching: a sent {}, received {}; b sent {}, received {} (each NAT maps per remote)",
        pa.sent, pa.received, pb.sent, pb.received
    );
    ensure!(
        pa.received == 0 && pb.received == 0,
        "hole punching crossed two symmetric NATs"
    );
    let a = udp_bind(&lab.a.host, SocketAddrV4::new(HOST_IP, 43100))?;
    let gateway = SocketAddrV4::new(GW_IP, pm::SERVER_PORT);
    let map = pm::pcp(&a, gateway, &pm::Request::map(HOST_IP, 1, 17, 43100, 0, 120))?;
    let mapped = map.external.context("PCP MAP gave no external endpoint")?;
    println!(
        "a: PCP MAP udp {HOST_IP}:43100 -> {mapped} for {} s (result {})",
        map.lifetime, map.result
    );
    let b = udp_bind(&lab.b.host, SocketAddrV4::new(HOST_IP, 43105))?;
    let (pa, pb, learnt) = pm::connect_via_mapping(&a, &b, &format!("{tag}-mapped"))?;
    println!(
        "b punches to {learnt}: a received {}, b received {}; connected both ways: {}",
        pa.received,
        pb.received,
        pa.success() && pb.success()
    );
    ensure!(
        pa.success() && pb.success(),
        "the peers did not connect through A's mapping"
    );
    nat_a.stop()?;
    nat_b.stop()?;
    drop(lab);
    println!("two-site lab removed");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("\ndemo: all steps passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
