//! `cargo xtask bench`: builds everything and runs the vm-tests `bench` binary, which measures
//! forwarding rate (kernel forwarding, nftables masquerade, our NAT with and without its XDP
//! fast path), per-packet cost and scale, and writes BENCHMARKS.md and its plot at the
//! workspace root. Root only; about ten minutes on two cores.
//!
//! Then the VM phase: the same binary, booted into Debian 12's 6.1 kernel in qemu (see `vm`),
//! drives the kernel's `pktgen` (which the host's kernel lacks) through the same contenders and
//! writes one section on the VM's writable share; the host merges that section into the report
//! (the host phases keep an existing one). About eight more minutes.
//!
//! Our own arguments (not passed to the binary): `--vm-only` runs only the VM phase, `--no-vm`
//! only the host phases.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::build::{build_all, nat_ctl_path};
use crate::cmd::{is_root, shell_quote, target_dir, workspace_root, Cmd};
use crate::setup;
use crate::vm;

/// The report the benchmark writes (its plot lands next to it).
const REPORT: &str = "BENCHMARKS.md";
/// How the report names the command that produced it.
const COMMAND: &str = "cargo xtask bench";
/// Runs only the VM phase.
const VM_ONLY: &str = "--vm-only";
/// Skips the VM phase.
const NO_VM: &str = "--no-vm";
/// The bench binary's name for the VM phase.
const PKTGEN_PHASE: &str = "pktgen";
/// qemu is killed after this long: the full VM phase takes about 8 minutes under TCG.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// The same for `--smoke` (about 2 minutes).
const VM_SMOKE_TIMEOUT: Duration = Duration::from_secs(8 * 60);
/// The section file the guest writes into the run directory.
const SECTION_FILE: &str = "pktgen-section.md";

/// Which phases run, and what goes to the binary.
#[derive(Debug, PartialEq, Eq)]
struct Phases {
    host: bool,
    vm: bool,
    /// Arguments for the bench binary (ours removed).
    args: Vec<String>,
}

/// Splits our flags from the binary's. `--only` naming host phases only skips the VM phase;
/// `--only pktgen` alone is `--vm-only`.
fn phases(args: &[String]) -> Result<Phases> {
    let vm_only = args.iter().any(|a| a == VM_ONLY);
    let no_vm = args.iter().any(|a| a == NO_VM);
    if vm_only && no_vm {
        bail!("{VM_ONLY} and {NO_VM} exclude each other");
    }
    let mut rest = Vec::new();
    let mut only = Vec::new();
    let mut it = args.iter().filter(|a| *a != VM_ONLY && *a != NO_VM);
    while let Some(a) = it.next() {
        if a == "--only" {
            if let Some(p) = it.next() {
                only.push(p.clone());
                if p != PKTGEN_PHASE {
                    rest.extend([a.clone(), p.clone()]);
                }
                continue;
            }
        }
        rest.push(a.clone());
    }
    let only_pktgen = !only.is_empty() && only.iter().all(|p| p == PKTGEN_PHASE);
    let names_pktgen = only.iter().any(|p| p == PKTGEN_PHASE);
    Ok(Phases {
        host: !vm_only && !only_pktgen,
        vm: !no_vm && (only.is_empty() || names_pktgen || vm_only),
        args: rest,
    })
}

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark needs root (it creates network namespaces and loads eBPF programs); \
             run `cargo xtask bench` as root"
        );
    }
    let phases = phases(args)?;
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
    let smoke = phases.args.iter().any(|a| a == "--smoke");
    let report = if smoke {
        target_dir().join("bench-smoke").join(REPORT)
    } else {
        workspace_root().join(REPORT)
    };
    let mut command = COMMAND.to_string();
    if !args.is_empty() {
        command = format!("{command} -- {}", args.join(" "));
    }
    if phases.host {
        Cmd::new(&bench)
            .env("NAT_CTL", nat_ctl_path())
            .env("BENCH_EBPF_DIR", ebpf_dir())
            .arg("--out")
            .arg(&report)
            .args(["--command", &command])
            .args(&phases.args)
            .run()?;
    }
    if phases.vm {
        vm_phase(&bench, &report, &command, smoke)?;
    }
    Ok(())
}

fn ebpf_dir() -> std::path::PathBuf {
    target_dir().join("bpfel-unknown-none").join("release")
}

/// Boots the VM, runs the pktgen phase there, and merges its section into `report`.
fn vm_phase(bench: &Path, report: &Path, command: &str, smoke: bool) -> Result<()> {
    let started = Instant::now();
    setup::ensure(setup::VM)?;
    let kernel = vm::kernel::ensure()?;
    let run = vm::RunDir::create()?;
    let section = run.path.join(SECTION_FILE);
    let mut words = vec![
        bench.to_string_lossy().into_owned(),
        "--only".into(),
        PKTGEN_PHASE.into(),
        "--section-out".into(),
        section.to_string_lossy().into_owned(),
        "--command".into(),
        command.into(),
    ];
    if smoke {
        words.push("--smoke".into());
    }
    let body = words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ");
    let mut env = vm::guest_env();
    env.retain(|(k, _)| k != "BENCH_EBPF_DIR");
    env.push(("BENCH_EBPF_DIR".into(), ebpf_dir().to_string_lossy().into_owned()));
    run.write_command(&env, &workspace_root(), &body)?;
    let timeout = if smoke { VM_SMOKE_TIMEOUT } else { VM_TIMEOUT };
    let finished = vm::boot(&kernel, &run, timeout, vm::Show::Command)?;
    let status = finished.status()?;
    eprintln!("vm: bench exit status {status} ({})", finished.timing());
    if status != 0 {
        bail!(
            "the VM phase failed (exit status {status}); console: {}",
            finished.console_log.display()
        );
    }
    Cmd::new(bench)
        .arg("--merge-section")
        .arg(&section)
        .arg("--out")
        .arg(report)
        .run()?;
    eprintln!(
        "bench: VM phase done in {:.0} s (boot included)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn both_phases_by_default_and_flags_stay_ours() {
        let p = phases(&args(&["--smoke"])).unwrap();
        assert_eq!((p.host, p.vm, p.args), (true, true, args(&["--smoke"])));
        let p = phases(&args(&["--vm-only", "--smoke"])).unwrap();
        assert_eq!((p.host, p.vm, p.args), (false, true, args(&["--smoke"])));
        let p = phases(&args(&["--no-vm"])).unwrap();
        assert_eq!((p.host, p.vm, p.args), (true, false, args(&[])));
        assert!(phases(&args(&["--no-vm", "--vm-only"])).is_err());
    }

    #[test]
    fn only_selects_host_phases_or_the_vm() {
        let p = phases(&args(&["--only", "forwarding"])).unwrap();
        assert_eq!(
            (p.host, p.vm, p.args),
            (true, false, args(&["--only", "forwarding"]))
        );
        let p = phases(&args(&["--only", "pktgen"])).unwrap();
        assert_eq!((p.host, p.vm, p.args), (false, true, args(&[])));
        let p = phases(&args(&["--only", "cost", "--only", "pktgen"])).unwrap();
        assert_eq!((p.host, p.vm, p.args), (true, true, args(&["--only", "cost"])));
    }
}
