//! `cargo xtask bench`: builds everything and runs the vm-tests `bench` binary, which measures
//! forwarding rate (kernel forwarding, nftables masquerade, our NAT with and without its XDP
//! fast path), per-packet cost and scale, and writes BENCHMARKS.md and its plot at the
//! workspace root. Root only; about ten minutes on two cores.

use anyhow::{bail, Result};

use crate::build::{build_all, nat_ctl_path};
use crate::cmd::{is_root, target_dir, workspace_root, Cmd};
use crate::setup;

/// The report the benchmark writes (its plot lands next to it).
const REPORT: &str = "BENCHMARKS.md";
/// How the report names the command that produced it.
const COMMAND: &str = "cargo xtask bench";

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark needs root (it creates network namespaces and loads eBPF programs); \
             run `cargo xtask bench` as root"
        );
    }
    setup::ensure(setup::ALL)?;
    build_all()?;
    let bench = target_dir().join("release").join("bench");
    if !bench.is_file() {
        bail!(
            "{} was not built: the vm-tests crate has no `bench` binary",
            bench.display()
        );
    }
    // A smoke run's numbers mean nothing: keep them away from the committed report.
    let report = if args.iter().any(|a| a == "--smoke") {
        target_dir().join("bench-smoke").join(REPORT)
    } else {
        workspace_root().join(REPORT)
    };
    let mut command = COMMAND.to_string();
    if !args.is_empty() {
        command = format!("{command} -- {}", args.join(" "));
    }
    Cmd::new(&bench)
        .env("NAT_CTL", nat_ctl_path())
        .env(
            "BENCH_EBPF_DIR",
            target_dir().join("bpfel-unknown-none").join("release"),
        )
        .arg("--out")
        .arg(report)
        .args(["--command", &command])
        .args(args)
        .run()
}
