//! `bench`: the NAT gateway's benchmark (issue 5). Root only; `cargo xtask bench` builds
//! everything and runs it with `--out BENCHMARKS.md`.
//!
//! Phases, each optional with `--only`:
//! - `cost`: per-packet cost of each program path from `BPF_PROG_TEST_RUN`, against an empty
//!   program (see `cost`);
//! - `forwarding`: packets per second through a router namespace for kernel forwarding,
//!   nftables masquerade, our NAT and our NAT with its internal-side fast path, alternated,
//!   driven by an in-kernel generator (see `forwarding`, `generator`);
//! - `scale`: both again with 1 to 1 000 000 live bindings, the new-binding rate and the memory
//!   per binding (see `scale`, `memory`).
//!
//! Everything it creates (namespaces, NAT processes, pinned maps) is removed on exit, also on
//! failure; a final check fails the run if anything of this process is left. `--smoke` runs
//! every path briefly (the test suite's `bench_smoke`).

mod contender;
mod cost;
mod cpu;
mod forwarding;
mod frame;
mod generator;
mod machine;
mod memory;
mod nat_maps;
mod objects;
mod plot;
mod report;
mod scale;
mod sink;
mod stats;
mod test_instance;
mod topology;

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
    cost: cost::Settings,
    scale: scale::Settings,
}

impl Plan {
    /// The full benchmark (about 8 minutes on 2 cores).
    fn full() -> Plan {
        Plan {
            forwarding: forwarding::Settings {
                point: Duration::from_secs(3),
                rounds: 5,
                new_flows: 49_984,
            },
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
}

const USAGE: &str = "usage: bench [--smoke] [--out BENCHMARKS.md] [--json FILE] [--command TEXT] [--only cost|forwarding|scale]...";
const PHASES: [&str; 3] = ["cost", "forwarding", "scale"];

fn parse_args() -> Result<Options> {
    let mut o = Options {
        smoke: false,
        out: None,
        json: None,
        command: "cargo xtask bench".into(),
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value; {USAGE}"));
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--out" => o.out = Some(value()?.into()),
            "--json" => o.json = Some(value()?.into()),
            "--command" => o.command = value()?,
            "--only" => {
                let p = value()?;
                if !PHASES.contains(&p.as_str()) {
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
    Ok(o)
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
    let phase = |p: &str| o.only.is_empty() || o.only.iter().any(|x| x == p);
    let started = Instant::now();
    let mut run = Run::new(machine::Machine::now(), o.command.clone(), o.smoke);
    run.plan = format!("{plan:?}");

    if phase("cost") {
        run.costs = Some(cost_phase(&plan.cost)?);
    }
    let mut gen = None;
    if phase("forwarding") {
        let g = gen.get_or_insert(Generator::load()?);
        run.forwarding = Some(forwarding::run(g, &plan.forwarding, &mut log)?);
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
        run.scale_costs = Some(scale::costs(&plan.scale, &plan.cost, &mut log, |inst| {
            mem = Some(memory::measure(inst)?);
            Ok(())
        })?);
        run.memory = mem;
    }
    drop(gen);
    run.duration = started.elapsed();
    Ok(run)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = run(&o);
    // Whatever happened, nothing of ours may be left behind.
    let left = leftovers();
    let mut run = match result {
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
    let outputs = (|| -> Result<()> {
        if let Some(json) = &o.json {
            write(json, &serde_json::to_string_pretty(&report::json(&run))?)?;
        }
        if let Some(out) = &o.out {
            let names = report::plot_file_names(out);
            write(&out.with_file_name(&names.0), &report::plot(&run))?;
            if let Some(svg) = report::scale_plot(&run) {
                write(&out.with_file_name(&names.1), &svg)?;
            }
            write(out, &report::markdown(&run, &names))?;
            log(&format!("wrote {} and its plots", out.display()));
        } else {
            let none = ("(no plot written)".to_string(), "(no plot written)".to_string());
            println!("{}", report::markdown(&run, &none));
        }
        Ok(())
    })();
    if let Err(e) = outputs {
        eprintln!("bench: {e:#}");
        return ExitCode::FAILURE;
    }
    if !left.is_empty() {
        eprintln!("bench: left behind: {}", left.join(", "));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
