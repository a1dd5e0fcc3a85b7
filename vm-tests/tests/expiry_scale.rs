//! The expiry sweep at table scale: with 100 000 bindings filled into the
//! maps (as the benchmark fills them; half of them idle past the timeout), the sweep removes every expired binding with its
//! sessions and keeps every live one and the static forwards; and a daemon sweeping such a
//! table stops on SIGTERM (bounded wait, no timing assertion: how fast is the benchmark's
//! business) and leaves nothing behind. Root only.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::nat::{Leftovers, PIN_ROOT};
use vm_tests::ops;
use vm_tests::proc::poll;
use vm_tests::{Lab, NatProcess};

// The benchmark's map filler, shared rather than copied.
#[allow(dead_code)]
#[path = "../src/bin/bench/nat_maps.rs"]
mod nat_maps;

use nat_ctl::clock::monotonic_ns;
use nat_maps::{NatMaps, ScaleLayout};

/// Bindings in the table.
const BINDINGS: u32 = 100_000;
/// UDP timeout of the NAT under test, in seconds.
const UDP_TIMEOUT: u64 = 5;
/// How far ahead the live half is stamped: the NAT reads a stamp in the future as "just used",
/// so the live half stays live for the whole test however slow the machine.
const AHEAD_NS: u64 = 3_600 * 1_000_000_000;

fn layout() -> ScaleLayout {
    ScaleLayout {
        host_base: std::net::Ipv4Addr::new(10, 64, 0, 1),
        external: NAT_EXT,
        filler_external_base: std::net::Ipv4Addr::new(100, 64, 0, 0),
        remote: std::net::SocketAddrV4::new(WAN_IP, 9999),
    }
}

/// The pin directory of the NAT on `iface` (`<netns inode>-<iface>` under PIN_ROOT).
fn pin_dir(iface: &str) -> Result<PathBuf> {
    let suffix = format!("-{iface}");
    let found: Vec<PathBuf> = std::fs::read_dir(PIN_ROOT)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one pin directory for {iface} under {PIN_ROOT}, found {found:?}"),
    }
}

/// Entries of a map, counted (with aya's one-at-a-time iteration: independent of the batch
/// code under test).
fn count<K: aya::Pod, V: aya::Pod>(map: &aya::maps::HashMap<aya::maps::MapData, K, V>) -> usize {
    map.keys().filter(|k| k.is_ok()).count()
}

#[test]
fn expiry_sweep_of_a_large_table_removes_every_expired_binding_and_keeps_live_ones() -> Result<()> {
    let lab = Lab::new("expbig")?;
    let max = (BINDINGS * 2).to_string();
    let timeout = UDP_TIMEOUT.to_string();
    let nat = NatProcess::attach(&lab, &["--max-bindings", &max, "--udp-timeout", &timeout])?;
    ops::ctl_ok(
        &lab.nat,
        &[
            "forward",
            "add",
            "-i",
            &lab.wan_if,
            "udp",
            "5353",
            &format!("{LAN_IP}:53"),
        ],
    )?;
    let mut maps = NatMaps::open(&pin_dir(nat.iface())?)?;
    let l = layout();
    // The second half is stamped at boot (0), idle past the timeout once the clock is past it
    // (a VM may have booted seconds ago).
    let past_timeout = Duration::from_secs(UDP_TIMEOUT + 1);
    let uptime = Duration::from_nanos(monotonic_ns());
    std::thread::sleep(past_timeout.saturating_sub(uptime));
    let live = (BINDINGS / 2) as usize;
    maps.fill_range(&l, 0..BINDINGS / 2, monotonic_ns() + AHEAD_NS)?;
    maps.fill_range(&l, BINDINGS / 2..BINDINGS, 0)?;
    // The daemon sweeps every second; bounded wait for the expired half to go.
    let settled = poll(Duration::from_secs(60), Duration::from_millis(500), || {
        (count(&maps.bindings_out) == live + 1).then_some(())
    });
    ensure!(
        settled.is_some(),
        "after 60 s the table holds {} outbound bindings; expected {} live ones and the forward; nat-ctl: {}",
        count(&maps.bindings_out),
        live,
        nat.stderr().trim()
    );
    let outbound: HashSet<(u32, u16)> = maps
        .bindings_out
        .keys()
        .flatten()
        .map(|k| (k.internal_addr, k.internal_port))
        .collect();
    for i in 0..BINDINGS {
        let b = l.binding(i);
        let key = (nat_maps::be(*b.internal.ip()), nat_maps::be16(b.internal.port()));
        let is_live = (i as usize) < live;
        ensure!(
            outbound.contains(&key) == is_live,
            "binding {i} ({}, {}) is {} after the sweep",
            b.internal,
            if is_live { "live" } else { "expired" },
            if outbound.contains(&key) {
                "present"
            } else {
                "gone"
            }
        );
    }
    ensure!(
        count(&maps.bindings_in) == live + 1,
        "inbound entries: {} (expected {live} and the forward's)",
        count(&maps.bindings_in)
    );
    // Each live binding keeps both of its sessions (address and port, address only); the
    // expired ones lost both.
    ensure!(
        count(&maps.sessions) == 2 * live,
        "sessions: {} (expected {})",
        count(&maps.sessions),
        2 * live
    );
    let forwards = ops::ctl_ok(&lab.nat, &["forward", "list", "-i", &lab.wan_if])?;
    ensure!(
        forwards.contains("5353"),
        "the static forward is gone: {forwards}"
    );
    drop(maps);
    nat.stop()
}

#[test]
fn expiry_daemon_sweeping_a_large_table_stops_on_sigterm_and_leaves_nothing() -> Result<()> {
    let lab = Lab::new("expterm")?;
    let max = BINDINGS.to_string();
    // Sweeps back to back, so SIGTERM arrives while one is running.
    let nat = NatProcess::attach(&lab, &["--max-bindings", &max, "--sweep-interval-ms", "10"])?;
    let mut maps = NatMaps::open(&pin_dir(nat.iface())?)?;
    maps.fill(&layout(), BINDINGS)?;
    drop(maps);
    let iface = nat.iface().to_string();
    // `stop` sends SIGTERM, waits (bounded) and requires a clean exit.
    nat.stop()?;
    let left = Leftovers::inspect(&lab.nat, &iface)?;
    ensure!(left.is_clean(), "the NAT left {left:?} after SIGTERM");
    Ok(())
}
