//! A short run of the benchmark (`bench --smoke`), so it cannot rot: every contender, direction,
//! per-packet path and scale point runs briefly. It asserts only that each produced packets or
//! a finite cost, that the report and plot were written, and that nothing was left behind —
//! no timing assertion. Root only.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use vm_tests::proc::Proc;

/// The smoke run takes about half a minute; allow for a loaded machine.
const SMOKE_TIMEOUT: Duration = Duration::from_secs(240);

fn positive(v: &Value) -> bool {
    v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0)
}

fn all_positive(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(positive))
}

/// Entries of `dir` whose name contains `needle`.
fn entries_containing(dir: &str, needle: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_benchmark_path_produces_numbers_and_cleans_up() -> Result<()> {
    vm_tests::require_root()?;
    let dir = std::env::temp_dir().join(format!("bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let json_path = dir.join("results.json");
    let report: PathBuf = dir.join("BENCHMARKS.md");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bench"));
    cmd.arg("--smoke")
        .arg("--json")
        .arg(&json_path)
        .arg("--out")
        .arg(&report);
    let proc = Proc::spawn("bench --smoke", cmd)?;
    let pid = proc.pid();
    let out = proc.finish(SMOKE_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "bench --smoke failed ({}): {}",
        out.status,
        out.stderr
    );

    // Nothing of the run is left: namespaces (named after its pid), test-instance pins, and
    // NAT pin directories and lock files (named after interfaces that carry its pid in hex).
    let left: Vec<String> = [
        entries_containing("/var/run/netns", &format!("-{pid}-")),
        entries_containing("/sys/fs/bpf", &format!("nat-bench-{pid}-")),
        entries_containing(vm_tests::nat::PIN_ROOT, &format!("{pid:x}x")),
        entries_containing("/run/nat-ctl", &format!("{pid:x}x")),
    ]
    .concat();
    ensure!(left.is_empty(), "left behind: {left:?}");

    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?).context("results JSON")?;
    ensure!(
        v["leftovers"].as_array().is_some_and(|a| a.is_empty()),
        "bench reported leftovers: {}",
        v["leftovers"]
    );

    let costs = v["costs"].as_array().context("no costs")?;
    ensure!(costs.len() >= 9, "expected every per-packet path, got {costs:?}");
    for c in costs {
        ensure!(positive(&c["ns"]), "no finite cost: {c}");
    }

    let points = v["forwarding"]["points"]
        .as_array()
        .context("no forwarding points")?;
    ensure!(
        points.len() == 18,
        "expected 6 contenders x 3 directions, got {}",
        points.len()
    );
    for p in points {
        // A kernel built without flowtables (this machine's) cannot run that contender; the
        // report says so instead of a number.
        if p["contender"] == "nftables-flowtable"
            && p["unavailable"]
                .as_str()
                .is_some_and(|why| why.contains("no nftables flowtables"))
        {
            continue;
        }
        ensure!(
            p["unavailable"].is_null() && all_positive(&p["pps"]),
            "no packets for {} {}: {p}",
            p["contender"],
            p["direction"]
        );
    }
    ensure!(
        all_positive(&v["forwarding"]["ceiling_pps"]),
        "no generator ceiling"
    );
    let two_cores = v["two_cores"].as_array().context("no two-core runs")?;
    ensure!(!two_cores.is_empty(), "no two-core runs");
    for p in two_cores {
        // A one-CPU machine cannot run them, and the report says so.
        let one_cpu = p["unavailable"]
            .as_str()
            .is_some_and(|why| why.contains("need 2 CPUs"));
        ensure!(
            one_cpu
                || (p["unavailable"].is_null() && all_positive(&p["one_pps"]) && all_positive(&p["two_pps"])),
            "no packets in the two-core run of {}: {p}",
            p["contender"]
        );
    }
    ensure!(
        costs.iter().any(|c| c["program"] == "nat_internal"),
        "no internal-side cost"
    );

    let scale = v["scale_forwarding"].as_array().context("no scale runs")?;
    ensure!(!scale.is_empty(), "no scale runs");
    for p in scale {
        ensure!(
            p["unavailable"].is_null()
                && ["out_pps", "in_pps", "out_hot_pps", "in_hot_pps"]
                    .iter()
                    .all(|k| all_positive(&p[k])),
            "no packets at scale: {p}"
        );
    }
    for p in v["scale_costs"].as_array().context("no scale costs")? {
        for case in ["ingress", "egress", "new_binding"] {
            ensure!(positive(&p[case]["ns"]), "no finite {case} cost at scale: {p}");
        }
    }
    ensure!(positive(&v["memory"]["per_live_binding"]), "no memory figure");

    let md = std::fs::read_to_string(&report)?;
    ensure!(
        md.contains("## Forwarding throughput"),
        "report lacks the forwarding table"
    );
    for plot in ["BENCHMARKS.svg", "BENCHMARKS-scale.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).with_context(|| format!("no {plot}"))?;
        ensure!(svg.starts_with("<svg"), "{plot} is not an SVG");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
