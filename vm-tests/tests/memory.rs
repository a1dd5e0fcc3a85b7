//! Memory: a default attach with no traffic holds at most 16 MiB of map
//! memory, its table size follows the machine's RAM as conntrack's does, and the memory of the
//! binding and session maps follows the live bindings: it grows with new flows and goes back
//! when they expire. Root only.
//!
//! The figures are the kernel's own accounting (bpftool `bytes_memlock`), which counts the
//! live entries of a map that is not preallocated only since Linux 6.4; on older kernels the
//! test checks that the maps are not preallocated and leaves the figures out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nat_common::{maps::names, table_size};
use vm_tests::lab::{LAN_IP, WAN_IP};
use vm_tests::nat::PIN_ROOT;
use vm_tests::ops::{self, sa};
use vm_tests::proc::{self, poll};
use vm_tests::tools::{udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

/// `BPF_F_NO_PREALLOC` in a map's flags.
const NO_PREALLOC: u64 = 1;
/// The first kernel whose `bytes_memlock` counts a non-preallocated map's live entries
/// (`map_mem_usage`).
const MEM_USAGE_KERNEL: (u32, u32) = (6, 4);
/// Flows the test opens.
const FLOWS: u16 = 64;
/// UDP timeout of the test's NAT, in seconds: long enough for every flow to be open at once
/// (a round trip through a slow guest can take a quarter second), short enough to wait for.
const UDP_TIMEOUT_SECS: &str = "30";
/// Least growth per live binding the kernel must account for: its two binding entries and
/// two session entries are 376 bytes of elements and list nodes on 64-bit kernels.
const MIN_BYTES_PER_BINDING: u64 = 300;
/// Slack allowed over the idle figure once every binding has expired.
const IDLE_SLACK_BYTES: u64 = 16 * 1024;

/// `(major, minor)` of the running kernel.
fn kernel_version() -> Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next().context("kernel release")?.parse()?;
    let minor = parts.next().context("kernel release")?.parse()?;
    Ok((major, minor))
}

/// The machine's RAM as conntrack sees it (`MemTotal`).
fn mem_total_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .context("no MemTotal")?;
    let kib: u64 = line.split_whitespace().nth(1).context("MemTotal")?.parse()?;
    Ok(kib * 1024)
}

/// The pin directory of the NAT on `iface`.
fn pin_dir(iface: &str) -> Result<PathBuf> {
    let dirs = vm_tests::nat::Leftovers::inspect_pins(iface);
    match dirs.as_slice() {
        [one] => Ok(Path::new(PIN_ROOT).join(one)),
        _ => bail!("expected one pin directory for {iface} under {PIN_ROOT}, found {dirs:?}"),
    }
}

/// `(bytes_memlock, flags)` of one pinned map.
fn map_info(dir: &Path, name: &str) -> Result<(u64, u64)> {
    let path = dir.join(name);
    let out = proc::run_ok(
        "bpftool map show",
        proc::command(
            "bpftool",
            &["map", "show", "pinned", &path.to_string_lossy(), "--json"],
        ),
        Duration::from_secs(30),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("bpftool JSON")?;
    let memlock = v["bytes_memlock"]
        .as_u64()
        .or_else(|| v["bytes_memlock"].as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("no bytes_memlock for {name}: {}", out.stdout))?;
    Ok((memlock, v["flags"].as_u64().unwrap_or(0)))
}

/// `bytes_memlock` summed over `maps`.
fn memlock(dir: &Path, maps: &[&str]) -> Result<u64> {
    maps.iter().map(|m| map_info(dir, m).map(|(b, _)| b)).sum()
}

#[test]
fn an_idle_default_attach_fits_16_mib_and_memory_follows_the_live_bindings() -> Result<()> {
    let lab = Lab::new("memory")?;
    let nat = NatProcess::attach(
        &lab,
        &["--udp-timeout", UDP_TIMEOUT_SECS, "--sweep-interval-ms", "100"],
    )?;
    let status = ops::status(&nat)?;
    let expected = table_size::default_max_bindings(mem_total_bytes()?);
    ensure!(
        status["max_bindings"] == expected,
        "default --max-bindings {} for this RAM, expected {expected} (conntrack's rule, capped)",
        status["max_bindings"]
    );
    let dir = pin_dir(nat.iface())?;
    let table = [names::BINDINGS_OUT, names::BINDINGS_IN, names::SESSIONS];
    for name in table.iter().chain(&[
        names::USAGE_CREATED,
        names::USAGE_RELEASED,
        names::SESSION_USAGE_CREATED,
    ]) {
        let (_, flags) = map_info(&dir, name)?;
        ensure!(
            flags & NO_PREALLOC != 0,
            "{name} is preallocated (flags {flags:#x})"
        );
    }
    if kernel_version()? < MEM_USAGE_KERNEL {
        eprintln!("memory: bytes_memlock does not follow live entries before Linux 6.4; figures not checked");
        return nat.stop();
    }

    let idle_all = memlock(&dir, &names::ALL)?;
    ensure!(
        idle_all <= table_size::IDLE_MAP_BUDGET_BYTES,
        "an idle default attach holds {idle_all} bytes of maps (budget {})",
        table_size::IDLE_MAP_BUDGET_BYTES
    );
    let idle = memlock(&dir, &table)?;

    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let flows = (0..FLOWS)
        .map(|i| {
            let s = udp_bind(&lab.lan, sa(LAN_IP, 41000 + i))?;
            whoami(&s, sa(WAN_IP, 9999)).with_context(|| format!("flow {i}"))?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let busy = memlock(&dir, &table)?;
    let live = ops::status(&nat)?["dynamic_bindings"].as_u64().unwrap_or(0);
    ensure!(
        live >= u64::from(FLOWS),
        "{live} live bindings after {FLOWS} flows"
    );
    ensure!(
        busy >= idle + u64::from(FLOWS) * MIN_BYTES_PER_BINDING,
        "{FLOWS} live bindings grew the binding and session maps from {idle} to only {busy} bytes"
    );

    drop(flows);
    poll(Duration::from_secs(90), Duration::from_millis(500), || {
        let st = ops::status(&nat).ok()?;
        (st["dynamic_bindings"] == 0).then_some(())
    })
    .context("the idle bindings never expired")?;
    let after = memlock(&dir, &table)?;
    ensure!(
        after <= idle + IDLE_SLACK_BYTES,
        "after every binding expired the maps hold {after} bytes, {idle} when idle"
    );
    nat.stop()
}
