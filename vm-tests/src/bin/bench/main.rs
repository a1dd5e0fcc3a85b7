//! `bench`: the NAT gateway's benchmark (issues 5 and 10). Root only; `cargo xtask bench` builds
//! everything and runs it with `--out BENCHMARKS.md`.
//!
//! Phases, each optional with `--only`:
//! - `cost`: per-packet cost of each program path from `BPF_PROG_TEST_RUN`, against an empty
//!   program, and of the internal side's fast path on the live path from the kernel's run-time
//!   statistics (see `cost`);
//! - `forwarding`: packets per second through a router namespace for kernel forwarding,
//!   nftables masquerade (alone and with a flowtable), our NAT, our NAT with its internal-side
//!   fast path and a bare XDP forwarder, alternated, driven by an in-kernel generator (see
//!   `forwarding`, `generator`);
//! - `scale`: both again with 1 to 1 000 000 live bindings, the new-binding rate and the memory
//!   per binding (see `scale`, `memory`);
//! - `controller`: nat-ctl with the largest scale's live bindings: one expiry sweep's CPU time,
//!   SIGTERM to exit, attach and adoption times (see `controller`);
//! - `pktgen`, only when named: the forwarding comparison driven by the kernel's pktgen, for
//!   Debian 12's 6.1 kernel in a VM (see `vm_forwarding`). Its results form one section of the
//!   report (see `vm_report`): `--section-out FILE` writes just that section, and
//!   `--merge-section FILE --out REPORT` puts it into the report on the host; the host phases
//!   keep the section of the report they rewrite.
//!
//! Everything it creates (namespaces, NAT processes, pinned maps) is removed on exit, also on
//! failure; a final check fails the run if anything of this process is left. `--smoke` runs
//! every path briefly (the test suite's `bench_smoke`).

mod contender;
mod controller;
mod cost;
mod cpu;
mod forwarding;
mod frame;
mod generator;
mod machine;
mod memory;
mod nat_maps;
mod objects;
mod pktgen;
mod plot;
mod report;
mod scale;
mod sink;
mod stats;
mod test_instance;
mod topology;
mod two_cores;
mod vm_forwarding;
mod vm_report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nat_common::maps::DEFAULT_MAX_BINDINGS;

use contender::Contender;
use forwarding::Direction;
use generator::Generator;
use report::Run;
use test_instance::TestInstance;

/// Where nat-ctl keeps the lock file of each running instance.
const NAT_CTL_RUN_DIR: &str = "/run/nat-ctl";
/// Tools the benchmark runs.
const TOOLS: [&str; 6] = ["ip", "nft", "ethtool", "bpftool", "nsenter", "sysctl"];

/// How long everything runs.
#[derive(Clone, Debug)]
struct Plan {
    forwarding: forwarding::Settings,
    /// Rounds of the two-core runs (each: both contenders, one and two cores).
    two_core_rounds: usize,
    cost: cost::Settings,
    scale: scale::Settings,
}

/// The pktgen phase's run lengths (full, five contenders: about 10 minutes in the VM under TCG,
/// most of it setting up topologies and contenders; smoke: about 2 minutes).
fn pktgen_settings(smoke: bool) -> vm_forwarding::Settings {
    if smoke {
        vm_forwarding::Settings {
            rounds: 1,
            packets: 2_000,
            new_flows: 1_000,
        }
    } else {
        vm_forwarding::Settings {
            rounds: 5,
            packets: 50_000,
            new_flows: 20_000,
        }
    }
}

impl Plan {
    /// The full benchmark (on 2 cores: about 12 minutes, an estimate since six contenders, the
    /// two-core runs and the controller at a million bindings joined).
    fn full() -> Plan {
        Plan {
            forwarding: forwarding::Settings {
                point: Duration::from_secs(3),
                rounds: 5,
                new_flows: 49_984,
            },
            two_core_rounds: 3,
            cost: cost::Settings {
                repeat: 1_000_000,
                runs: 5,
                new_bindings: cost::MAX_NEW_BINDING_RUNS,
            },
            scale: scale::Settings {
                scales: scale::SCALES.to_vec(),
                point: Duration::from_millis(1_500),
                reps: 5,
            },
        }
    }

    /// Every path, briefly (seconds, not minutes).
    fn smoke() -> Plan {
        Plan {
            forwarding: forwarding::Settings {
                point: Duration::from_millis(200),
                rounds: 1,
                new_flows: 1_984,
            },
            two_core_rounds: 1,
            cost: cost::Settings {
                repeat: 10_000,
                runs: 2,
                new_bindings: 200,
            },
            scale: scale::Settings {
                scales: vec![1, 1_000],
                point: Duration::from_millis(200),
                reps: 1,
            },
        }
    }
}

/// Command-line options.
struct Options {
    smoke: bool,
    out: Option<PathBuf>,
    json: Option<PathBuf>,
    command: String,
    only: Vec<String>,
    section_out: Option<PathBuf>,
    merge_section: Option<PathBuf>,
}

const USAGE: &str = "usage: bench [--smoke] [--out BENCHMARKS.md] [--json FILE] [--command TEXT] \
[--only cost|forwarding|scale|controller|pktgen]... [--section-out FILE] | bench --merge-section FILE --out BENCHMARKS.md";
/// The phases run when `--only` names none.
const HOST_PHASES: [&str; 4] = ["cost", "forwarding", "scale", "controller"];
/// The phase that needs pktgen (a VM): run only when named.
const PKTGEN_PHASE: &str = "pktgen";

fn parse_args() -> Result<Options> {
    let mut o = Options {
        smoke: false,
        out: None,
        json: None,
        command: "cargo xtask bench".into(),
        only: Vec::new(),
        section_out: None,
        merge_section: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value; {USAGE}"));
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--out" => o.out = Some(value()?.into()),
            "--json" => o.json = Some(value()?.into()),
            "--command" => o.command = value()?,
            "--section-out" => o.section_out = Some(value()?.into()),
            "--merge-section" => o.merge_section = Some(value()?.into()),
            "--only" => {
                let p = value()?;
                if !HOST_PHASES.contains(&p.as_str()) && p != PKTGEN_PHASE {
                    bail!("unknown phase {p}; {USAGE}");
                }
                o.only.push(p);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a}; {USAGE}"),
        }
    }
    if o.merge_section.is_some() && o.out.is_none() {
        bail!("--merge-section needs --out; {USAGE}");
    }
    Ok(o)
}

impl Options {
    /// Whether phase `p` runs: the host phases when `--only` names none or names them, the
    /// pktgen phase only when named.
    fn phase(&self, p: &str) -> bool {
        self.only.iter().any(|x| x == p) || (self.only.is_empty() && p != PKTGEN_PHASE)
    }

    fn host_phases(&self) -> bool {
        HOST_PHASES.iter().any(|p| self.phase(p))
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Everything the run needs, checked up front so a missing piece is one clear line.
fn preflight() -> Result<()> {
    vm_tests::require_root()?;
    for tool in TOOLS {
        if !on_path(tool) {
            bail!("{tool} is not installed (run `cargo xtask setup`)");
        }
    }
    objects::object(objects::BENCH_OBJECT)?;
    objects::object(objects::NAT_OBJECT)?;
    let nat_ctl = vm_tests::nat::nat_ctl_path();
    if !nat_ctl.is_file() {
        bail!(
            "nat-ctl is not built at {} (run `cargo xtask build`)",
            nat_ctl.display()
        );
    }
    vm_tests::nat::ensure_bpffs()?;
    Ok(())
}

fn log(line: &str) {
    eprintln!("{line}");
}

/// The per-packet table: floors and every NAT path, in one fresh instance.
fn cost_phase(s: &cost::Settings) -> Result<Vec<cost::Cost>> {
    log("per-packet cost (BPF_PROG_TEST_RUN)");
    let floors = cost::Floors::load()?;
    let mut inst = TestInstance::load(DEFAULT_MAX_BINDINGS)?;
    cost::insert_test_bindings(&mut inst)?;
    let costs = cost::on_bench_cpu(|| {
        Ok(vec![
            floors.xdp(s)?,
            floors.tc(s)?,
            floors.tc_single(s)?,
            cost::ingress_established(&inst, s)?,
            cost::ingress_filtered(&inst, s)?,
            cost::ingress_icmp_error(&inst, s)?,
            cost::ingress_pass(&inst, s)?,
            cost::egress_established(&inst, s)?,
            cost::egress_established_single(&inst, s)?,
            cost::egress_new_binding(&inst, s, 0)?,
        ])
    })?;
    for c in &costs {
        log(&format!("  {:<16} {:<36} {:>8.1} ns", c.program, c.path, c.ns));
    }
    Ok(costs)
}

/// Namespaces and pin directories of this process still present.
fn leftovers() -> Vec<String> {
    let pid = std::process::id();
    let mut left: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(vm_tests::netns::NS_PREFIX) && n.contains(&format!("-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    left.extend(test_instance::own_pin_dirs());
    // nat-ctl names its pin directory and lock file after the interface, whose name holds our
    // pid in hex.
    let ours = format!("{pid:x}x");
    for dir in [vm_tests::nat::PIN_ROOT, NAT_CTL_RUN_DIR] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            left.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(&ours))
                    .map(|n| format!("{dir}/{n}")),
            );
        }
    }
    left
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn run(o: &Options) -> Result<Run> {
    preflight()?;
    vm_tests::netns::remove_stale();
    test_instance::remove_stale();
    let plan = if o.smoke { Plan::smoke() } else { Plan::full() };
    let phase = |p: &str| o.phase(p);
    let started = Instant::now();
    let mut run = Run::new(machine::Machine::now(), o.command.clone(), o.smoke);
    run.plan = format!("{plan:?}");

    let mut gen = None;
    if phase("cost") {
        let mut costs = cost_phase(&plan.cost)?;
        let g = gen.get_or_insert(Generator::load()?);
        log("per-packet cost of the internal side on the live path (run-time statistics)");
        match cost::live_internal(g, plan.forwarding.point) {
            Ok(live) => {
                for c in &live {
                    log(&format!("  {:<16} {:<36} {:>8.1} ns", c.program, c.path, c.ns));
                }
                costs.extend(live);
            }
            Err(e) if topology::is_build_failure(&e) => return Err(e),
            // The targets table then says the internal side was not measured.
            Err(e) => log(&format!("  live internal-side cost unavailable: {e:#}")),
        }
        run.costs = Some(costs);
    }
    if phase("forwarding") {
        let g = match gen.as_mut() {
            Some(g) => g,
            None => gen.insert(Generator::load()?),
        };
        run.forwarding = Some(forwarding::run(g, &plan.forwarding, &mut log)?);
        log("two cores against one");
        run.two_cores = Some(
            match two_cores::run(plan.two_core_rounds, plan.forwarding.point, &mut log) {
                Ok(s) => s,
                Err(e) if topology::is_build_failure(&e) => return Err(e),
                Err(e) => {
                    log(&format!("  two-core runs unavailable: {e:#}"));
                    two_cores::unavailable(&format!("{e:#}"))
                }
            },
        );
    }
    if phase("scale") {
        let g = match gen.as_mut() {
            Some(g) => g,
            None => gen.insert(Generator::load()?),
        };
        // The fast path joins the scale runs when it worked in the comparison (or when the
        // comparison did not run).
        let mut contenders = vec![Contender::Nat];
        let fast_path_ok = run.forwarding.as_ref().is_none_or(|f| {
            f.points
                .get(&(Contender::NatFastPath, Direction::OutboundEstablished))
                .is_some_and(|m| m.unavailable.is_none())
        });
        if fast_path_ok {
            contenders.push(Contender::NatFastPath);
        } else {
            run.scale_notes.push(
                "the fast path is left out of the scale runs: it was unavailable in the comparison".into(),
            );
        }
        log("scale: forwarding with live bindings");
        run.scale_forwarding = Some(scale::forwarding(g, &contenders, &plan.scale, &mut log)?);
        log("scale: per-packet cost with live bindings");
        let mut mem = None;
        let ram_bytes = run.machine.memory_mib * 1024 * 1024;
        run.scale_costs = Some(scale::costs(&plan.scale, &plan.cost, &mut log, |inst| {
            mem = Some(memory::measure(inst, ram_bytes)?);
            Ok(())
        })?);
        run.memory = mem;
    }
    if phase("controller") {
        // The controller at the largest scale: sweep, SIGTERM, attach, adoption.
        if let Some(&n) = plan.scale.scales.iter().max() {
            log(&format!(
                "controller: sweep, SIGTERM, attach and adoption with {n} live bindings"
            ));
            run.scale_controller = Some(vec![controller::measure(n, &mut log)]);
        }
    }
    drop(gen);
    if phase(PKTGEN_PHASE) {
        log("forwarding driven by pktgen");
        run.pktgen = Some(vm_forwarding::run(&pktgen_settings(o.smoke), &mut log)?);
    }
    run.duration = started.elapsed();
    Ok(run)
}

/// The report at `out` now, if there is one.
fn read_report(out: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(out) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", out.display())),
    }
}

/// Puts the section in `section` (a file) into the report at `out`.
fn merge_section(section: &Path, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(section).with_context(|| format!("cannot read {}", section.display()))?;
    let Some(part) = vm_report::extract(&text) else {
        bail!("{} holds no pktgen section", section.display());
    };
    let old = read_report(out)?.unwrap_or_default();
    write(out, &vm_report::merge(&old, part))?;
    log(&format!("wrote the pktgen section into {}", out.display()));
    Ok(())
}

/// Writes what `run` measured: the host report (keeping the report's pktgen section), the
/// pktgen section (into `--section-out` and/or the report), JSON.
fn write_outputs(o: &Options, run: &Run) -> Result<()> {
    if let Some(json) = &o.json {
        write(json, &serde_json::to_string_pretty(&report::json(run))?)?;
    }
    let section = run
        .pktgen
        .is_some()
        .then(|| vm_report::section(run, &format!("{:?}", pktgen_settings(run.smoke))));
    if let (Some(path), Some(s)) = (&o.section_out, &section) {
        write(path, s)?;
        log(&format!("wrote the pktgen section to {}", path.display()));
    }
    let host = o.host_phases();
    match &o.out {
        Some(out) => {
            let old = read_report(out)?;
            let mut text = if host {
                let names = report::plot_file_names(out);
                write(&out.with_file_name(&names.0), &report::plot(run))?;
                if let Some(svg) = report::scale_plot(run) {
                    write(&out.with_file_name(&names.1), &svg)?;
                }
                let md = report::markdown(run, &names);
                // The VM phase's section outlives host runs.
                match old.as_deref().and_then(vm_report::extract) {
                    Some(kept) => vm_report::merge(&md, kept),
                    None => md,
                }
            } else {
                old.unwrap_or_default()
            };
            if let Some(s) = &section {
                text = vm_report::merge(&text, s);
            }
            write(out, &text)?;
            log(&format!("wrote {}", out.display()));
        }
        None if o.section_out.is_none() => {
            if host {
                let none = ("(no plot written)".to_string(), "(no plot written)".to_string());
                println!("{}", report::markdown(run, &none));
            }
            if let Some(s) = &section {
                println!("{s}");
            }
        }
        None => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let (Some(section), Some(out)) = (&o.merge_section, &o.out) {
        return match merge_section(section, out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = run(&o);
    // Whatever happened, nothing of ours may be left behind.
    let left = leftovers();
    let mut run: Run = match result {
        Ok(run) => run,
        Err(e) => {
            // One line: tool output inside the error may span several.
            eprintln!("bench: {}", format!("{e:#}").replace('\n', " "));
            if !left.is_empty() {
                eprintln!("bench: left behind: {}", left.join(", "));
            }
            return ExitCode::FAILURE;
        }
    };
    run.leftovers = left.clone();
    if let Err(e) = write_outputs(&o, &run) {
        eprintln!("bench: {e:#}");
        return ExitCode::FAILURE;
    }
    if !left.is_empty() {
        eprintln!("bench: left behind: {}", left.join(", "));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
