//! Hairpinning (RFC 4787 REQ-9/9a) with `--internal-iface` and with the internal interfaces
//! found by the plain one-line attach, and switching the mode of a running NAT (`nat-ctl
//! mode`). Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::classify::{vovida, Verdict};
use vm_tests::lab::{LAN2_IP, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP, WAN_IP2};
use vm_tests::ops;
use vm_tests::tools::{udp_bind, udp_expect, udp_recv, udp_whoami, whoami, Turnserver};
use vm_tests::{Lab, LabOptions, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn hairpin_lab(tag: &str) -> Result<Lab> {
    Lab::with(
        tag,
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )
}

#[test]
fn traffic_to_and_from_the_internet_still_flows_with_internal_iface() -> Result<()> {
    // --internal-iface adds an XDP program on the internal side; ordinary traffic through the
    // NAT must keep working in both directions, on the first packet.
    let lab = Lab::new("hpflow")?;
    let nat = NatProcess::attach(&lab, &["--internal-iface", &lab.lan_if])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let before = nat.stats()?;
    lan.send_to(b"out", sa(WAN_IP, 9999))?;
    let got = udp_recv(&remote, Duration::from_secs(3))?;
    let after = nat.stats()?;
    let (_, ext) = got.with_context(|| {
        format!(
            "with --internal-iface, lan's datagram never reached wan; counters: {}",
            after.changes(&before)
        )
    })?;
    ensure!(
        matches!(ext, SocketAddr::V4(a) if *a.ip() == NAT_EXT),
        "wan saw source {ext}"
    );
    let before = nat.stats()?;
    remote.send_to(b"back", ext)?;
    let got = udp_expect(&lan, b"back", Duration::from_secs(3))?;
    let after = nat.stats()?;
    ensure!(
        got.is_some(),
        "with --internal-iface, wan's reply never reached lan; counters: {}",
        after.changes(&before)
    );
    nat.stop()
}

#[test]
fn internal_hosts_reach_each_other_through_their_external_endpoints() -> Result<()> {
    let lab = hairpin_lab("hpin")?;
    let lan2_if = lab.lan2_if.clone().unwrap();
    let nat = NatProcess::attach(
        &lab,
        &[
            "--mode",
            "full-cone",
            "--internal-iface",
            &lab.lan_if,
            "--internal-iface",
            &lan2_if,
        ],
    )?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let s1 = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, 40000))?;
    let x1 = whoami(&s1, sa(WAN_IP, 9999))?;
    let x2 = whoami(&s2, sa(WAN_IP, 9999))?;
    ensure!(
        *x1.ip() == NAT_EXT && *x2.ip() == NAT_EXT && x1 != x2,
        "mappings {x1} and {x2}"
    );

    // lan -> lan2's external endpoint arrives at lan2 from lan's external endpoint (REQ-9a).
    s1.send_to(b"hairpin 1->2", x2)?;
    let from = udp_expect(&s2, b"hairpin 1->2", Duration::from_secs(3))?
        .with_context(|| format!("lan's datagram to lan2's external endpoint {x2} never reached lan2"))?;
    ensure!(
        from == SocketAddr::V4(x1),
        "lan2 saw the hairpinned datagram from {from}, expected lan's external {x1}"
    );

    // And the answer goes back the same way.
    s2.send_to(b"hairpin 2->1", x1)?;
    let from = udp_expect(&s1, b"hairpin 2->1", Duration::from_secs(3))?
        .with_context(|| format!("lan2's answer to {x1} never reached lan"))?;
    ensure!(
        from == SocketAddr::V4(x2),
        "lan saw the answer from {from}, expected lan2's external {x2}"
    );
    nat.stop()
}

#[test]
fn hole_punching_between_internal_hosts_works_in_port_restricted_mode() -> Result<()> {
    let lab = hairpin_lab("hpunch")?;
    let lan2_if = lab.lan2_if.clone().unwrap();
    let nat = NatProcess::attach(
        &lab,
        &["--internal-iface", &lab.lan_if, "--internal-iface", &lan2_if],
    )?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let s1 = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, 40000))?;
    let x1 = whoami(&s1, sa(WAN_IP, 9999))?;
    let x2 = whoami(&s2, sa(WAN_IP, 9999))?;

    // Each side sends to the other's external endpoint; the first may be filtered, but after
    // both have sent, each one's datagrams reach the other (what P2P applications rely on).
    s1.send_to(b"punch 1", x2)?;
    s2.send_to(b"punch 2", x1)?;
    let _ = udp_recv(&s1, Duration::from_millis(500))?;
    let _ = udp_recv(&s2, Duration::from_millis(500))?;
    s1.send_to(b"after punch 1->2", x2)?;
    let from = udp_expect(&s2, b"after punch 1->2", Duration::from_secs(3))?
        .context("after hole punching, lan's datagram did not reach lan2")?;
    ensure!(
        from == SocketAddr::V4(x1),
        "lan2 saw it from {from}, expected {x1}"
    );
    s2.send_to(b"after punch 2->1", x1)?;
    let from = udp_expect(&s1, b"after punch 2->1", Duration::from_secs(3))?
        .context("after hole punching, lan2's datagram did not reach lan")?;
    ensure!(
        from == SocketAddr::V4(x2),
        "lan saw it from {from}, expected {x2}"
    );
    nat.stop()
}

#[test]
fn mode_switch_changes_filtering_and_keeps_bindings() -> Result<()> {
    let lab = Lab::new("modesw")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let stranger = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    lan.send_to(b"hello", sa(WAN_IP, 9999))?;
    let (_, ext) = udp_recv(&remote, Duration::from_secs(5))?.context("remote got nothing")?;
    let SocketAddr::V4(ext) = ext else {
        anyhow::bail!("IPv6 source {ext}")
    };

    stranger.send_to(b"stranger 1", ext)?;
    ensure!(
        udp_expect(&lan, b"stranger 1", Duration::from_secs(2))?.is_none(),
        "port-restricted NAT let an unrelated host through"
    );

    nat.ctl_ok("mode", &["full-cone"])?;
    let status = nat.ctl_ok("status", &[])?;
    ensure!(
        status.contains("full-cone"),
        "status after `mode full-cone`:\n{status}"
    );
    ensure!(
        nat.mappings()?
            .iter()
            .any(|m| m.internal == sa(LAN_IP, 40000) && m.external == ext),
        "the binding {ext} was lost by the mode switch"
    );
    stranger.send_to(b"stranger 2", ext)?;
    ensure!(
        udp_expect(&lan, b"stranger 2", Duration::from_secs(3))?.is_some(),
        "after `mode full-cone`, an unrelated host still cannot reach the existing binding {ext}"
    );

    nat.ctl_ok("mode", &["port-restricted"])?;
    stranger.send_to(b"stranger 3", ext)?;
    ensure!(
        udp_expect(&lan, b"stranger 3", Duration::from_secs(2))?.is_none(),
        "after switching back to port-restricted, an unrelated host still gets through"
    );
    remote.send_to(b"remote", ext)?;
    ensure!(
        udp_expect(&lan, b"remote", Duration::from_secs(3))?.is_some(),
        "the original remote was cut off"
    );
    nat.stop()
}

/// `status --json`'s internal interfaces, sorted, and how they were chosen.
fn internal_of(nat: &NatProcess) -> Result<(Vec<String>, serde_json::Value)> {
    let status = ops::status(nat)?;
    let mut names: Vec<String> = status["internal_ifaces"]
        .as_array()
        .with_context(|| format!("no internal_ifaces in status: {status:#}"))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    Ok((names, status["internal_ifaces_chosen"].clone()))
}

/// A real hairpin exchange: lan's datagram to lan2's external endpoint reaches lan2 from lan's
/// external endpoint (REQ-9a). Ports differ per call so every mode starts fresh bindings.
fn hairpin_exchange(lab: &Lab, port: u16) -> Result<()> {
    let s1 = udp_bind(&lab.lan, sa(LAN_IP, port))?;
    let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, port))?;
    let x1 = whoami(&s1, sa(WAN_IP, 9999))?;
    let x2 = whoami(&s2, sa(WAN_IP, 9999))?;
    // Filtering modes other than full cone admit lan only once lan2 has sent to it.
    s2.send_to(b"open", x1)?;
    let _ = udp_recv(&s1, Duration::from_millis(500))?;
    s1.send_to(b"hairpin", x2)?;
    let from = udp_expect(&s2, b"hairpin", Duration::from_secs(3))?
        .with_context(|| format!("lan's datagram to lan2's external endpoint {x2} never reached lan2"))?;
    ensure!(
        from == SocketAddr::V4(x1),
        "lan2 saw the hairpinned datagram from {from}, expected lan's external {x1}"
    );
    Ok(())
}

#[test]
fn the_one_line_attach_hairpins_and_takes_the_fast_path_in_every_cone_mode() -> Result<()> {
    // `nat-ctl attach IFACE --mode X` and nothing else: the internal interfaces (both of the
    // lab's LAN links, 10.0.0.1 and 10.0.1.1) are found automatically, so hairpinning (RFC 4787
    // REQ-9) works as a third-party STUN client sees it, and established flows take the fast
    // path where the kernel has one.
    let lab = hairpin_lab("hpdef")?;
    ops::enable_fast_path_delivery(&lab)?;
    let _turn = Turnserver::start(&lab.wan, WAN_IP, WAN_IP2, lab.names.ns("turn").as_str())?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let mut expected = vec![lab.lan_if.clone(), lab.lan2_if.clone().unwrap()];
    expected.sort();
    let mut failures = Vec::new();
    for (i, mode) in ["full-cone", "restricted-cone", "port-restricted"]
        .into_iter()
        .enumerate()
    {
        let nat = NatProcess::attach(&lab, &["--mode", mode])?;
        let notice = nat
            .stderr()
            .lines()
            .find(|l| l.contains("internal interfaces (found automatically)"))
            .map(str::to_string);
        if !notice
            .as_ref()
            .is_some_and(|l| expected.iter().all(|i| l.contains(i.as_str())))
        {
            failures.push(format!(
                "{mode}: attach did not say it took {expected:?}: {}",
                nat.stderr()
            ));
        }
        let (internal, chosen) = internal_of(&nat)?;
        if internal != expected || chosen != "auto" {
            failures.push(format!(
                "{mode}: status shows internal interfaces {internal:?} ({chosen}), expected {expected:?} (auto)"
            ));
        }
        let Verdict { result, output: text } = vovida(&lab.lan, WAN_IP, 21000 + 10 * i as u16)?;
        if !result.contains("will hairpin") {
            failures.push(format!(
                "{mode}: Vovida stun says {result:?}, expected \"will hairpin\"\n{text}"
            ));
        }
        if let Err(e) = hairpin_exchange(&lab, 41000 + i as u16) {
            failures.push(format!("{mode}: {e:#}"));
        }
        match ops::fast_path_unavailable(&nat)? {
            Some(reason) => println!("{mode}: no fast path on this kernel: {reason}"),
            None => {
                let towards = ops::status(&nat)?["fast_path_towards"].clone();
                let sock = udp_bind(&lab.lan, sa(LAN_IP, 42000 + i as u16))?;
                let before = nat.stats()?;
                for _ in 0..10 {
                    whoami(&sock, sa(WAN_IP, 9999))?;
                }
                let after = nat.stats()?;
                let fp = after.delta(&before, "fast_path_redirected")?;
                if fp == 0 || towards.as_array().map_or(0, Vec::len) == 0 {
                    failures.push(format!(
                        "{mode}: no fast path (towards {towards}, fast_path_redirected +{fp}): {}",
                        after.changes(&before)
                    ));
                }
            }
        }
        nat.stop()?;
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn internal_iface_none_attaches_no_internal_program() -> Result<()> {
    let lab = hairpin_lab("hpnone")?;
    let _turn = Turnserver::start(&lab.wan, WAN_IP, WAN_IP2, lab.names.ns("turn").as_str())?;
    let nat = NatProcess::attach(&lab, &["--mode", "full-cone", "--internal-iface", "none"])?;
    let (internal, chosen) = internal_of(&nat)?;
    ensure!(
        internal.is_empty() && chosen == "off",
        "status shows internal interfaces {internal:?} ({chosen}), expected none (off)"
    );
    let status = ops::status(&nat)?;
    ensure!(
        status["xdp_modes"].as_object().map(|m| m.len()) == Some(1)
            && status["fast_path_towards"]
                .as_array()
                .is_some_and(|a| a.is_empty()),
        "an internal program or fast path with --internal-iface none: {status:#}"
    );
    for dev in [&lab.lan_if, lab.lan2_if.as_ref().unwrap()] {
        let link = lab.nat.ip_out(&["link", "show", "dev", dev])?;
        ensure!(!link.contains("xdp"), "{dev} has an XDP program: {link}");
    }
    ensure!(
        !nat.stderr().contains("found automatically"),
        "attach looked for internal interfaces although told not to: {}",
        nat.stderr()
    );
    let Verdict { result, output: text } = vovida(&lab.lan, WAN_IP, 21100)?;
    ensure!(
        result.contains("no hairpin"),
        "Vovida stun says {result:?} without internal interfaces\n{text}"
    );
    nat.stop()
}
