//! Fair tables: one internal host flooding new remotes cannot fill the session table
//! (RFC 6888 REQ-5 limits per subscriber and per mapping, REQ-11: refuse, never evict). Root
//! only.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN2_IP, LAN_IP, WAN2_IP, WAN_IP};
use vm_tests::netns::Netns;
use vm_tests::ops;
use vm_tests::proc::poll;
use vm_tests::tools::{udp_bind, udp_expect, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// UDP timeout of the test with explicit limits: long enough that the flood's sessions are all
/// still there while the test looks at them, even on a slow machine; short enough to wait out.
const UDP_TIMEOUT_SECS: u64 = 15;

/// First destination port of a flood: wan has nothing listening there, and needs nothing (the
/// NAT creates a session per remote endpoint whatever answers).
const FLOOD_PORT: u16 = 10_000;

/// Sends a datagram from `sock` to each of `count` ports of `remote` from `first` on: every
/// one a new remote endpoint, so a new session of the socket's binding. Twice, so that a
/// datagram lost in a full queue of the lab's links is sent again (a second datagram of a
/// session changes nothing).
fn flood(sock: &UdpSocket, remote: Ipv4Addr, first: u16, count: u16) -> Result<()> {
    for _ in 0..2 {
        for port in first..first + count {
            sock.send_to(b"flood", sa(remote, port))
                .with_context(|| format!("send to {remote}:{port}"))?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The sessions `host` holds according to `nat-ctl status --json` (0 when not listed).
fn sessions_of(status: &serde_json::Value, host: Ipv4Addr) -> u64 {
    status["sessions_by_host"][host.to_string()].as_u64().unwrap_or(0)
}

/// Waits (bounded) until `status` reports `n` sessions for `host`; returns the status.
fn wait_sessions(nat: &NatProcess, host: Ipv4Addr, n: u64) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    poll(Duration::from_secs(20), Duration::from_millis(100), || {
        last = ops::status(nat).ok()?;
        (sessions_of(&last, host) == n).then(|| last.clone())
    })
    .with_context(|| {
        format!(
            "status never showed {n} sessions for {host}: {}",
            last["sessions_by_host"]
        )
    })
}

/// True if a datagram sent from `ns` at `from` to `to` (where `sink` listens) arrives.
fn new_flow_arrives(ns: &Netns, from: SocketAddrV4, to: SocketAddrV4, sink: &UdpSocket) -> Result<bool> {
    let s = udp_bind(ns, from)?;
    let payload = format!("new flow from {from}");
    for _ in 0..3 {
        s.send_to(payload.as_bytes(), to)?;
    }
    Ok(udp_expect(sink, payload.as_bytes(), Duration::from_secs(1))?.is_some())
}

#[test]
fn a_host_flooding_new_remotes_is_stopped_at_its_limits_and_others_are_still_served() -> Result<()> {
    let lab = Lab::with(
        "sesslim",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let (per_binding, per_host) = (40u64, 60u64);
    let nat = NatProcess::attach(
        &lab,
        &[
            "--max-sessions-per-binding",
            &per_binding.to_string(),
            "--max-sessions-per-host",
            &per_host.to_string(),
            "--udp-timeout",
            &UDP_TIMEOUT_SECS.to_string(),
            "--sweep-interval-ms",
            "200",
        ],
    )?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let _who2 = udp_whoami(&lab.wan2, WAN2_IP, 9999)?;
    let sink = udp_bind(&lab.wan2, sa(WAN2_IP, 9998))?;

    // lan: one socket, a first remote that answers, then a flood to 100 more remotes.
    let busy = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = whoami(&busy, sa(WAN_IP, 9999)).context("lan's first flow")?;
    let before = nat.stats()?;
    flood(&busy, WAN_IP, FLOOD_PORT, 100)?;
    wait_sessions(&nat, LAN_IP, per_binding)?;
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "session_limit")? >= 100 - (per_binding - 1),
        "session_limit did not count the refused remotes: {}",
        after.changes(&before)
    );
    // Never evicted: the first remote still answers, from the same external endpoint.
    ensure!(
        whoami(&busy, sa(WAN_IP, 9999)).context("lan's first flow after the flood")? == ext,
        "lan's first flow changed its external endpoint"
    );
    // A second socket of lan's reaches the per-host limit.
    let second = udp_bind(&lab.lan, sa(LAN_IP, 40001))?;
    flood(&second, WAN_IP, FLOOD_PORT, 100)?;
    let st = wait_sessions(&nat, LAN_IP, per_host)?;

    // status shows the limits and the use, in JSON and for people (all of this well within the
    // UDP timeout of the flood's sessions).
    for (key, want) in [
        ("max_sessions_per_binding", per_binding),
        ("max_sessions_per_host", per_host),
    ] {
        ensure!(st[key] == want, "status {key} = {}, want {want}", st[key]);
    }
    ensure!(
        st["sessions_in_use"].as_u64().is_some_and(|n| n >= per_host),
        "sessions_in_use {} with lan at {per_host}",
        st["sessions_in_use"]
    );
    let text = ops::ctl_ok(&lab.nat, &["status", "-i", &lab.wan_if])?;
    let line = text
        .lines()
        .find(|l| l.starts_with("sessions:"))
        .with_context(|| format!("no sessions line in status:\n{text}"))?;
    ensure!(
        line.contains(&format!("{per_host} per host"))
            && line.contains(&format!("{per_binding} per binding")),
        "status does not show the limits: {line}"
    );
    ensure!(
        text.lines()
            .any(|l| l.starts_with("by host:") && l.contains(&format!("{LAN_IP} {per_host}"))),
        "status does not show lan's sessions:\n{text}"
    );
    ensure!(
        !new_flow_arrives(&lab.lan, sa(LAN_IP, 40002), sa(WAN2_IP, 9998), &sink)?,
        "lan opened a new flow beyond its {per_host} sessions"
    );

    // lan2 is served: a new flow, a new remote.
    let other = udp_bind(lab.lan2(), sa(LAN2_IP, 40000))?;
    let seen = whoami(&other, sa(WAN_IP, 9999)).context("lan2's new flow while lan is at its limit")?;
    ensure!(seen.ip() == ext.ip(), "lan2 left as {seen}");
    whoami(&other, sa(WAN2_IP, 9999)).context("lan2's new remote while lan is at its limit")?;
    ensure!(
        new_flow_arrives(lab.lan2(), sa(LAN2_IP, 40001), sa(WAN2_IP, 9998), &sink)?,
        "lan2's datagram to a new remote did not arrive"
    );

    // Once lan's sessions expire (no outbound traffic for the UDP timeout), its count is back
    // to zero and it opens new flows again.
    drop((busy, second));
    poll(
        Duration::from_secs(3 * UDP_TIMEOUT_SECS),
        Duration::from_millis(200),
        || ops::status(&nat).ok().filter(|st| sessions_of(st, LAN_IP) == 0),
    )
    .context("lan's sessions never expired")?;
    ensure!(
        new_flow_arrives(&lab.lan, sa(LAN_IP, 40003), sa(WAN2_IP, 9998), &sink)?,
        "lan could not open a new flow after its sessions expired"
    );
    nat.stop()
}

#[test]
fn by_default_one_host_is_held_to_a_quarter_of_the_session_table() -> Result<()> {
    // A small table: (100 + 4096) * 4 entries, two per session, so 8 392 sessions; the
    // defaults give a host a quarter (2 098) and a binding a quarter of that (524).
    let lab = Lab::with(
        "sessdef",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let nat = NatProcess::attach(&lab, &["--max-bindings", "100"])?;
    let st = ops::status(&nat)?;
    let (per_host, per_binding) = (2098u64, 524u64);
    ensure!(
        st["max_sessions_per_host"] == per_host && st["max_sessions_per_binding"] == per_binding,
        "default limits for --max-bindings 100: {} per host, {} per binding",
        st["max_sessions_per_host"],
        st["max_sessions_per_binding"]
    );
    // lan floods 5 x 600 remotes from five ports: more than the whole table it could fill
    // before the limits.
    let socks: Vec<UdpSocket> = (0..5)
        .map(|i| udp_bind(&lab.lan, sa(LAN_IP, 41000 + i)))
        .collect::<Result<_>>()?;
    for s in &socks {
        flood(s, WAN_IP, FLOOD_PORT, 600)?;
    }
    let st = wait_sessions(&nat, LAN_IP, per_host)?;
    let entries = st["sessions"].as_u64().unwrap_or(u64::MAX);
    let capacity = st["sessions_capacity"].as_u64().unwrap_or(0);
    ensure!(
        entries * 4 <= capacity + 4,
        "lan holds {entries} of {capacity} session entries"
    );
    // lan2 still gets new flows and new remotes.
    let _who = udp_whoami(&lab.wan2, WAN2_IP, 9999)?;
    let other = udp_bind(lab.lan2(), sa(LAN2_IP, 40000))?;
    let seen = whoami(&other, sa(WAN2_IP, 9999)).context("lan2's new flow next to a flooding lan")?;
    ensure!(*seen.ip() != LAN2_IP, "lan2 left untranslated: {seen}");
    drop(socks);
    nat.stop()
}
