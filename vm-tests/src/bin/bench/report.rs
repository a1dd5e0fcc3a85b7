//! The results of a run, as BENCHMARKS.md (tables, targets, method), JSON and an SVG plot.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::contender::Contender;
use crate::controller::ControllerPoint;
use crate::cost::Cost;
use crate::forwarding::{self, Direction, Measurement};
use crate::machine::Machine;
use crate::memory::{Memory, SESSIONS_PER_LIVE_BINDING};
use crate::plot::{bars_svg, Bar, Group, CONTENDER_COLOURS, SCALE_COLOURS};
use crate::scale::{CostPoint, ForwardingPoint};
use crate::stats::{median, range};
use crate::two_cores::Scaling;

/// Issue 10 targets.
/// Established hit of the XDP programs (ingress, internal side), in empty XDP programs.
const TARGET_XDP_HIT_VS_EMPTY: f64 = 2.5;
/// Established hit of TC egress, in empty TC programs.
const TARGET_TC_HIT_VS_EMPTY: f64 = 3.0;
/// Whole path with the fast path, as a share of the bare XDP forwarder, both directions.
const TARGET_VS_XDP_FORWARDER: f64 = 0.8;
/// New flow per packet, in nftables masquerade's rate.
const TARGET_NEW_FLOWS_VS_NFTABLES: f64 = 3.0;
/// New bindings per second per core in the data path.
const TARGET_NEW_BINDINGS_PER_SEC: f64 = 1_000_000.0;
/// Largest slowdown with 1 000 000 live bindings against 1 000.
const TARGET_SCALE_LOSS: f64 = 0.25;
/// Map memory of a default attach with no traffic: the budget the default table size keeps to.
const TARGET_IDLE_MAP_MIB: f64 = nat_common::table_size::IDLE_MAP_BUDGET_BYTES as f64 / (1024.0 * 1024.0);
/// CPU time of one sweep over 1 000 000 bindings, and time to honour SIGTERM at that size.
const TARGET_CONTROLLER_SECS: f64 = 1.0;
/// The scale points the scale target compares.
const SCALE_SMALL: u32 = 1_000;
const SCALE_LARGE: u32 = 1_000_000;
/// The verdict of a target nothing in the run measured.
const NOT_MEASURED: &str = "not measured";

/// Everything one run measured.
pub struct Run {
    /// Where.
    pub machine: Machine,
    /// The command that produced it.
    pub command: String,
    /// A short smoke run (numbers not meaningful).
    pub smoke: bool,
    /// The settings, for the record.
    pub plan: String,
    /// Per-packet costs.
    pub costs: Option<Vec<Cost>>,
    /// The forwarding comparison.
    pub forwarding: Option<forwarding::Results>,
    /// Two cores against one (run with the forwarding comparison).
    pub two_cores: Option<Vec<Scaling>>,
    /// The forwarding comparison driven by pktgen (the VM phase; see `vm_report`).
    pub pktgen: Option<forwarding::Results>,
    /// Forwarding at each scale.
    pub scale_forwarding: Option<Vec<ForwardingPoint>>,
    /// Per-packet cost at each scale.
    pub scale_costs: Option<Vec<CostPoint>>,
    /// Memory per binding.
    pub memory: Option<Memory>,
    /// The controller at scale (sweep, SIGTERM, attach, adoption).
    pub scale_controller: Option<Vec<ControllerPoint>>,
    /// Remarks about the scale runs.
    pub scale_notes: Vec<String>,
    /// Anything of this run still present at the end (should be empty).
    pub leftovers: Vec<String>,
    /// Wall time of the whole run.
    pub duration: Duration,
}

impl Run {
    /// An empty run record.
    pub fn new(machine: Machine, command: String, smoke: bool) -> Run {
        Run {
            machine,
            command,
            smoke,
            plan: String::new(),
            costs: None,
            forwarding: None,
            two_cores: None,
            pktgen: None,
            scale_forwarding: None,
            scale_costs: None,
            memory: None,
            scale_controller: None,
            scale_notes: Vec::new(),
            leftovers: Vec::new(),
            duration: Duration::ZERO,
        }
    }

    fn cost(&self, program: &str, path_prefix: &str) -> Option<&Cost> {
        self.costs
            .as_ref()?
            .iter()
            .find(|c| c.program == program && c.path.starts_with(path_prefix))
    }

    fn point(&self, c: Contender, d: Direction) -> Option<&Measurement> {
        self.forwarding.as_ref()?.points.get(&(c, d))
    }
}

/// The plots' file names for a report at `out`: `BENCHMARKS.md` -> `BENCHMARKS.svg` (the
/// comparison) and `BENCHMARKS-scale.svg`.
pub fn plot_file_names(out: &Path) -> (String, String) {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "BENCHMARKS".into());
    (format!("{stem}.svg"), format!("{stem}-scale.svg"))
}

fn mpps(pps: f64) -> String {
    format!("{:.3}", pps / 1e6)
}

/// `n` with a thin space between groups of three digits (1 000 000).
pub fn thousands(n: impl Into<u64>) -> String {
    let digits = n.into().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `median (min–max)` in Mpps.
fn samples(v: &[f64]) -> String {
    match (median(v), range(v)) {
        (Some(m), Some((lo, hi))) => format!("{} ({}–{})", mpps(m), mpps(lo), mpps(hi)),
        _ => String::new(),
    }
}

/// A contender's figure with its ratio to nftables masquerade and to nftables with a
/// flowtable (`refs`, where measured).
fn cell(m: Option<&Measurement>, refs: [Option<f64>; 2]) -> String {
    let Some(m) = m else {
        return "not run".into();
    };
    if let Some(why) = &m.unavailable {
        return format!("unavailable: {}", why.replace('|', "/"));
    }
    let Some(med) = median(&m.pps) else {
        return "no samples".into();
    };
    let mut s = mpps(med);
    if let Some((lo, hi)) = range(&m.pps) {
        let _ = write!(s, " ({}–{})", mpps(lo), mpps(hi));
    }
    for (r, name) in refs.into_iter().zip(["nft", "flowtable"]) {
        if let Some(r) = r.filter(|r| *r > 0.0) {
            let _ = write!(s, ", {:.2}× {name}", med / r);
        }
    }
    s
}

/// The SVG plot of forwarding against live bindings (traffic over all of them), if scale runs
/// were made.
pub fn scale_plot(run: &Run) -> Option<String> {
    let points = run.scale_forwarding.as_ref()?;
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| points.iter().any(|p| p.contender == *c))
        .collect();
    let mut scales: Vec<u32> = points.iter().map(|p| p.bindings).collect();
    scales.dedup();
    let names: Vec<String> = contenders
        .iter()
        .flat_map(|c| {
            [
                format!("{}, outbound", c.label()),
                format!("{}, inbound", c.label()),
            ]
        })
        .collect();
    let series: Vec<&str> = names.iter().map(String::as_str).collect();
    let groups: Vec<Group> = scales
        .iter()
        .map(|&n| Group {
            label: format!("{} live bindings", thousands(n)),
            bars: contenders
                .iter()
                .flat_map(|&c| {
                    let p = points.iter().find(|p| p.bindings == n && p.contender == c);
                    [
                        Bar {
                            value: p.and_then(ForwardingPoint::out),
                            range: p.and_then(|p| range(&p.out_pps)),
                        },
                        Bar {
                            value: p.and_then(ForwardingPoint::inbound),
                            range: p.and_then(|p| range(&p.in_pps)),
                        },
                    ]
                })
                .collect(),
        })
        .collect();
    Some(bars_svg(
        "Our NAT: packets per second with N live bindings, traffic over all of them",
        &series,
        &SCALE_COLOURS,
        &groups,
        None,
    ))
}

/// The SVG plot of the forwarding comparison.
pub fn plot(run: &Run) -> String {
    let series: Vec<&str> = Contender::ALL.iter().map(|c| c.label()).collect();
    let groups: Vec<Group> = Direction::ALL
        .iter()
        .map(|&d| Group {
            label: d.label().into(),
            bars: Contender::ALL
                .iter()
                .map(|&c| {
                    let m = run.point(c, d);
                    Bar {
                        value: m.and_then(|m| m.median_pps()),
                        range: m.filter(|m| m.unavailable.is_none()).and_then(|m| range(&m.pps)),
                    }
                })
                .collect(),
        })
        .collect();
    let ceiling = run
        .forwarding
        .as_ref()
        .and_then(|f| median(&f.ceiling_pps))
        .map(|c| ("generator ceiling", c));
    bars_svg(
        &format!(
            "Packets per second through the router ({} CPU{}, kernel {})",
            run.machine.cpus,
            if run.machine.cpus == 1 { "" } else { "s" },
            run.machine.kernel
        ),
        &series,
        &CONTENDER_COLOURS,
        &groups,
        ceiling,
    )
}

/// One part of a target: what was compared, and whether it met the target (None: no number).
struct Part {
    what: String,
    met: Option<bool>,
}

/// "met" if every part met, "**missed**" if none did, else which parts did and which did not.
fn overall(parts: &[Part]) -> String {
    let met: Vec<&str> = parts
        .iter()
        .filter(|p| p.met == Some(true))
        .map(|p| p.what.as_str())
        .collect();
    if met.len() == parts.len() {
        return "met".into();
    }
    if met.is_empty() {
        return "**missed**".into();
    }
    let missed: Vec<&str> = parts
        .iter()
        .filter(|p| p.met != Some(true))
        .map(|p| p.what.as_str())
        .collect();
    format!("met for {}; **missed** for {}", met.join(", "), missed.join(", "))
}

fn target_row(md: &mut String, target: &str, measured: &[String], parts: &[Part]) {
    let _ = writeln!(md, "| {target} | {} | {} |", measured.join("; "), overall(parts));
}

/// `ours` against `reference` (at least `factor` times its rate) in `dirs`: measured strings and
/// parts for a target row.
fn ratio_parts(
    run: &Run,
    ours: Contender,
    reference: Contender,
    factor: f64,
    dirs: &[Direction],
    measured: &mut Vec<String>,
    parts: &mut Vec<Part>,
) {
    for &d in dirs {
        let what = format!("{}, {}", short(ours), d.label());
        let v = run.point(ours, d).and_then(|m| m.median_pps());
        let r = run.point(reference, d).and_then(|m| m.median_pps());
        match (v, r) {
            (Some(v), Some(r)) => {
                measured.push(format!("{what}: {} vs {} Mpps = {:.2}×", mpps(v), mpps(r), v / r));
                parts.push(Part {
                    what,
                    met: Some(v / r >= factor),
                });
            }
            _ => {
                measured.push(format!("{what}: unavailable"));
                parts.push(Part { what, met: None });
            }
        }
    }
}

/// Short contender names for the targets table.
fn short(c: Contender) -> &'static str {
    match c {
        Contender::Kernel => "kernel",
        Contender::Nftables => "nftables",
        Contender::NftFlowtable => "nftables flowtable",
        Contender::Nat => "our NAT",
        Contender::NatFastPath => "our NAT + fast path",
        Contender::XdpForward => "bare XDP forwarder",
    }
}

/// How a cost was timed: repeated test runs, single test runs, or live (run-time statistics).
fn timing(c: &Cost) -> (bool, bool) {
    (c.single_runs, c.live)
}

/// The first cost of `program` whose path starts with `path_prefix`, timed as `how`.
fn cost_of<'a>(run: &'a Run, program: &str, path_prefix: &str, how: (bool, bool)) -> Option<&'a Cost> {
    run.costs
        .as_ref()?
        .iter()
        .find(|c| c.program == program && c.path.starts_with(path_prefix) && timing(c) == how)
}

/// The empty program `floor` timed like `c`.
fn floor_for<'a>(run: &'a Run, floor: &str, c: &Cost) -> Option<&'a Cost> {
    cost_of(run, floor, "empty", timing(c))
}

/// An established hit of `program` against the empty program `floor` timed the same way
/// (repeated test runs where there are some, else the live figures).
fn cost_row(run: &Run, md: &mut String, target: &str, program: &str, floor: &str, limit: f64) {
    let hit = cost_of(run, program, "established", (false, false))
        .or_else(|| cost_of(run, program, "established", (false, true)));
    let Some(hit) = hit else {
        unmeasured_row(md, target, &format!("no figure for `{program}` in this run"));
        return;
    };
    let Some(empty) = floor_for(run, floor, hit) else {
        unmeasured_row(md, target, &format!("no figure for `{floor}` in this run"));
        return;
    };
    let r = hit.ns / empty.ns;
    target_row(
        md,
        target,
        &[format!(
            "`{program}` {:.1} ns / `{floor}` {:.1} ns{} = {r:.2}×",
            hit.ns,
            empty.ns,
            if hit.live {
                " (both on the live path, kernel run-time statistics)"
            } else {
                ""
            }
        )],
        &[Part {
            what: format!("`{program}`"),
            met: Some(r <= limit),
        }],
    );
}

/// A target this run has no figure for (yet).
fn unmeasured_row(md: &mut String, target: &str, why: &str) {
    let _ = writeln!(md, "| {target} | {why} | {NOT_MEASURED} |");
}

fn targets(run: &Run, md: &mut String) {
    let _ = writeln!(md, "## Targets of issue 10\n");
    let _ = writeln!(
        md,
        "Every target with the figures of this run (medians) and its verdict.\n\n\
         | target | measured | verdict |\n|---|---|---|"
    );
    cost_row(
        run,
        md,
        &format!("ingress established hit ≤ {TARGET_XDP_HIT_VS_EMPTY}× the empty XDP program"),
        "nat_ingress",
        "bench_empty_xdp",
        TARGET_XDP_HIT_VS_EMPTY,
    );
    cost_row(
        run,
        md,
        &format!("internal-side established hit ≤ {TARGET_XDP_HIT_VS_EMPTY}× the empty XDP program"),
        "nat_internal",
        "bench_empty_xdp",
        TARGET_XDP_HIT_VS_EMPTY,
    );
    cost_row(
        run,
        md,
        &format!("TC egress established hit ≤ {TARGET_TC_HIT_VS_EMPTY}× the empty TC program"),
        "nat_egress",
        "bench_empty_tc",
        TARGET_TC_HIT_VS_EMPTY,
    );
    let forwarding_target =
        |md: &mut String, target: &str, build: &dyn Fn(&mut Vec<String>, &mut Vec<Part>)| {
            if run.forwarding.is_none() {
                unmeasured_row(md, target, "the forwarding phase did not run");
                return;
            }
            let (mut measured, mut parts) = (Vec::new(), Vec::new());
            build(&mut measured, &mut parts);
            target_row(md, target, &measured, &parts);
        };
    forwarding_target(
        md,
        &format!("whole path with the fast path ≥ {TARGET_VS_XDP_FORWARDER}× the bare XDP forwarder, both directions"),
        &|m, p| {
            ratio_parts(
                run,
                Contender::NatFastPath,
                Contender::XdpForward,
                TARGET_VS_XDP_FORWARDER,
                &[Direction::OutboundEstablished, Direction::Inbound],
                m,
                p,
            )
        },
    );
    forwarding_target(
        md,
        &format!("new flow per packet ≥ {TARGET_NEW_FLOWS_VS_NFTABLES}× nftables masquerade"),
        &|m, p| {
            for ours in [Contender::NatFastPath, Contender::Nat] {
                ratio_parts(
                    run,
                    ours,
                    Contender::Nftables,
                    TARGET_NEW_FLOWS_VS_NFTABLES,
                    &[Direction::OutboundNew],
                    m,
                    p,
                );
            }
        },
    );
    new_binding_row(run, md);
    scale_row(run, md);
    memory_rows(run, md);
    controller_rows(run, md);
    two_cores_row(run, md);
    md.push('\n');
}

/// Two cores: the scaling of the outbound established path over both CPUs, reported.
fn two_cores_row(run: &Run, md: &mut String) {
    let target = "two cores: scaling of the path over both CPUs against one reported";
    let Some(points) = &run.two_cores else {
        unmeasured_row(md, target, "the forwarding phase did not run");
        return;
    };
    let measured: Vec<String> = points.iter().map(scaling_text).collect();
    let any = points.iter().any(|p| p.factor().is_some());
    let _ = writeln!(
        md,
        "| {target} | {} | {} |",
        measured.join("; "),
        if any { "reported" } else { NOT_MEASURED }
    );
}

/// "contender: one core X, two cores Y Mpps = F×", or why not.
fn scaling_text(p: &Scaling) -> String {
    match (p.factor(), median(&p.one), median(&p.two)) {
        (Some(f), Some(one), Some(two)) => format!(
            "{}: one core {} Mpps, two cores {} Mpps = {f:.2}×",
            short(p.contender),
            mpps(one),
            mpps(two)
        ),
        _ => format!(
            "{}: unavailable ({})",
            short(p.contender),
            p.unavailable.as_deref().unwrap_or("no samples").replace('|', "/")
        ),
    }
}

/// ≥ 1 000 000 new bindings per second per core in the data path.
fn new_binding_row(run: &Run, md: &mut String) {
    let target = "≥ 1 000 000 new bindings per second per core in the data path";
    let new_binding = run
        .scale_costs
        .as_ref()
        .and_then(|p| {
            p.iter()
                .find(|p| p.bindings == SCALE_SMALL)
                .map(|p| p.new_binding.ns)
        })
        .or_else(|| run.cost("nat_egress", "new binding").map(|c| c.ns));
    let Some(ns) = new_binding else {
        unmeasured_row(md, target, "no new-binding cost in this run");
        return;
    };
    let rate = 1e9 / ns;
    let mut measured = vec![format!("{ns:.0} ns per new binding = {:.2} M/s", rate / 1e6)];
    let mut parts = vec![Part {
        what: "1 000 live".into(),
        met: Some(rate >= TARGET_NEW_BINDINGS_PER_SEC),
    }];
    if let Some(large) = run
        .scale_costs
        .as_ref()
        .and_then(|p| p.iter().find(|p| p.bindings == SCALE_LARGE))
    {
        let rate = 1e9 / large.new_binding.ns;
        measured.push(format!(
            "{:.0} ns = {:.2} M/s with 1 000 000 live",
            large.new_binding.ns,
            rate / 1e6
        ));
        parts.push(Part {
            what: "1 000 000 live".into(),
            met: Some(rate >= TARGET_NEW_BINDINGS_PER_SEC),
        });
    }
    target_row(md, target, &measured, &parts);
}

/// 1 000 000 live bindings within 25% of 1 000 (traffic spread over all of them).
fn scale_row(run: &Run, md: &mut String) {
    let target = format!(
        "1 000 000 live bindings within {:.0}% of 1 000 (traffic over all of them)",
        TARGET_SCALE_LOSS * 100.0
    );
    let Some(points) = &run.scale_forwarding else {
        unmeasured_row(md, &target, "the scale phase did not run");
        return;
    };
    let (mut measured, mut parts) = (Vec::new(), Vec::new());
    for c in [Contender::NatFastPath, Contender::Nat] {
        let at = |n: u32| points.iter().find(|p| p.contender == c && p.bindings == n);
        let (Some(small), Some(large)) = (at(SCALE_SMALL), at(SCALE_LARGE)) else {
            continue;
        };
        for (dir, s, l) in [
            ("out", small.out(), large.out()),
            ("in", small.inbound(), large.inbound()),
        ] {
            let what = format!("{}, {dir}", short(c));
            match (s, l) {
                (Some(s), Some(l)) => {
                    let change = l / s - 1.0;
                    measured.push(format!(
                        "{what}: {} vs {} Mpps = {:+.0}%",
                        mpps(l),
                        mpps(s),
                        change * 100.0
                    ));
                    parts.push(Part {
                        what,
                        met: Some(-change <= TARGET_SCALE_LOSS),
                    });
                }
                _ => {
                    measured.push(format!("{what}: unavailable"));
                    parts.push(Part { what, met: None });
                }
            }
        }
    }
    if parts.is_empty() {
        unmeasured_row(md, &target, "no runs at both 1 000 and 1 000 000 bindings");
    } else {
        target_row(md, &target, &measured, &parts);
    }
}

/// Map memory of a default attach with no traffic, and memory per live binding.
fn memory_rows(run: &Run, md: &mut String) {
    const MIB: f64 = 1024.0 * 1024.0;
    let idle_target = format!("default attach with no traffic ≤ {TARGET_IDLE_MAP_MIB:.0} MiB of map memory");
    let live_target = "memory per live binding stated";
    let Some(m) = &run.memory else {
        unmeasured_row(md, &idle_target, "the memory phase did not run");
        unmeasured_row(md, live_target, "the memory phase did not run");
        return;
    };
    let idle = m.idle.memlock as f64 / MIB;
    target_row(
        md,
        &idle_target,
        &[format!(
            "{idle:.1} MiB in all maps (kernel accounting, bpftool `bytes_memlock`; computed {:.1} MiB) \
             with the default `--max-bindings` {} for {} MiB of RAM",
            m.idle.computed as f64 / MIB,
            thousands(m.idle.max_bindings),
            thousands(run.machine.memory_mib)
        )],
        &[Part {
            what: "idle attach".into(),
            met: Some(idle <= TARGET_IDLE_MAP_MIB),
        }],
    );
    let measured = match m.memlock_per_live_binding() {
        Some(k) => format!(" (the kernel's accounting: {k:.0} bytes)"),
        None => String::new(),
    };
    let _ = writeln!(
        md,
        "| {live_target} | {} bytes per live binding (both binding entries and two sessions, as allocated){measured} | stated |",
        m.per_live_binding()
    );
}

/// The controller point at 1 000 000 bindings, if measured.
fn controller_at_target(run: &Run) -> Option<&ControllerPoint> {
    run.scale_controller
        .as_ref()?
        .iter()
        .find(|p| p.bindings == 1_000_000 && p.unavailable.is_none())
}

/// The controller at 1 000 000 bindings: sweep CPU, SIGTERM, attach and adoption.
fn controller_rows(run: &Run, md: &mut String) {
    let sweep_target = format!("sweep over 1 000 000 bindings < {TARGET_CONTROLLER_SECS:.0} s of CPU");
    let term_target = format!("SIGTERM honoured < {TARGET_CONTROLLER_SECS:.0} s at 1 000 000 bindings");
    let times_target = "attach and adoption times at 1 000 000 bindings measured".to_string();
    let Some(p) = controller_at_target(run) else {
        let why = match run
            .scale_controller
            .as_ref()
            .and_then(|v| v.iter().find(|p| p.bindings == 1_000_000))
        {
            Some(p) => format!("unavailable: {}", p.unavailable.as_deref().unwrap_or("?")),
            None => "the scale phase did not run at 1 000 000 bindings".to_string(),
        };
        for target in [sweep_target, term_target, times_target] {
            unmeasured_row(md, &target, &why);
        }
        return;
    };
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let sweep = p.steady_cpu().unwrap_or_default().as_secs_f64();
    let _ = writeln!(
        md,
        "| {sweep_target} | {sweep:.3} s CPU per pass with every binding live ({:.3} s of it in the kernel, {:.3} s wall); a pass that expires all of them: {:.3} s CPU | {} |",
        p.steady_system().unwrap_or_default().as_secs_f64(),
        p.steady_wall().unwrap_or_default().as_secs_f64(),
        p.expire_all_cpu.as_secs_f64(),
        verdict(sweep < TARGET_CONTROLLER_SECS)
    );
    let term = p.sigterm.as_secs_f64();
    let _ = writeln!(
        md,
        "| {term_target} | {term:.3} s from SIGTERM to exit, sweeping back to back | {} |",
        verdict(term < TARGET_CONTROLLER_SECS)
    );
    let _ = writeln!(
        md,
        "| {times_target} | attach {:.2} s, adoption {:.2} s | measured |",
        p.attach.as_secs_f64(),
        p.adoption.as_secs_f64()
    );
}

/// The controller section: every figure of every measured table size.
fn controller_section(points: &[ControllerPoint], md: &mut String) {
    let _ = writeln!(
        md,
        "## The controller with live bindings\n\n\
         Each binding is four map entries (two binding entries, two sessions). The sweep is \
         nat-ctl's `expiry::sweep` (batched map reads and deletes, 4096 entries per call) run by the \
         benchmark on the daemon's pinned maps while the daemon is paused, timed with the thread's \
         CPU clock (user + system): the steady pass finds every binding live (median of \
         {} passes); the expire-all pass runs with its clock an hour ahead and deletes the whole table. \
         SIGTERM to exit: a `--persist` daemon sweeping back to back (`--sweep-interval-ms 10`), \
         signalled mid-sweep; the time until its process has exited (polled every 20 ms). Attach: \
         `nat-ctl attach` to its `attached` line on a fresh instance; adoption: a second `attach` \
         taking over the running table.\n",
        crate::controller::STEADY_REPS
    );
    let _ = writeln!(
        md,
        "| live bindings | sweep CPU | of it system | sweep wall | expire-all CPU | expire-all wall | SIGTERM to exit | attach | adoption |\n|---|---|---|---|---|---|---|---|---|"
    );
    for p in points {
        if let Some(why) = &p.unavailable {
            let _ = writeln!(
                md,
                "| {} | unavailable: {why} | | | | | | | |",
                thousands(p.bindings)
            );
            continue;
        }
        let _ = writeln!(
            md,
            "| {} | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.2} s | {:.2} s |",
            thousands(p.bindings),
            p.steady_cpu().unwrap_or_default().as_secs_f64(),
            p.steady_system().unwrap_or_default().as_secs_f64(),
            p.steady_wall().unwrap_or_default().as_secs_f64(),
            p.expire_all_cpu.as_secs_f64(),
            p.expire_all_wall.as_secs_f64(),
            p.sigterm.as_secs_f64(),
            p.attach.as_secs_f64(),
            p.adoption.as_secs_f64()
        );
    }
    md.push('\n');
}

fn forwarding_section(run: &Run, plot_name: &str, md: &mut String) {
    let Some(f) = &run.forwarding else {
        return;
    };
    let _ = writeln!(md, "## Forwarding throughput\n");
    let _ = writeln!(md, "![packets per second per contender]({plot_name})\n");
    let _ = writeln!(
        md,
        "Median delivered Mpps over the rounds (min–max in brackets) and the ratios to nftables \
         masquerade (nft) and to nftables masquerade with a flowtable (flowtable).\n"
    );
    let _ = write!(md, "| contender |");
    for d in Direction::ALL {
        let _ = write!(md, " {} |", d.label());
    }
    let _ = writeln!(md, "\n|---|---|---|---|");
    for c in Contender::ALL {
        let _ = write!(md, "| {} |", c.label());
        for d in Direction::ALL {
            let refs = [Contender::Nftables, Contender::NftFlowtable]
                .map(|r| run.point(r, d).and_then(|m| m.median_pps()));
            let _ = write!(md, " {} |", cell(run.point(c, d), refs));
        }
        md.push('\n');
    }
    if let Some(c) = median(&f.ceiling_pps) {
        let _ = writeln!(
            md,
            "| generator ceiling (frames dropped on arrival at the router) | {} | | |",
            mpps(c)
        );
    }
    let _ = writeln!(
        md,
        "\nShare of delivered packets that went through the router's kernel forwarding path \
         (`ForwDatagrams`; 0% = all on an XDP path):\n"
    );
    let _ = writeln!(
        md,
        "| contender | {} |",
        Direction::ALL.map(|d| d.label()).join(" | ")
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for c in Contender::ALL {
        let shares: Vec<String> = Direction::ALL
            .iter()
            .map(|&d| match run.point(c, d) {
                Some(m) if m.unavailable.is_none() => median(&m.kernel_share)
                    .map(|s| format!("{:.0}%", s * 100.0))
                    .unwrap_or_default(),
                _ => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", c.label(), shares.join(" | "));
    }
    md.push('\n');
    if let Some(points) = &run.two_cores {
        let _ = writeln!(
            md,
            "Two cores: outbound established flows with one generator on one CPU, then a generator on \
             each CPU (own flows each, one veth queue per CPU, so each CPU carries its own copy of the \
             path, as RSS would); median Mpps (min–max):\n\n\
             | contender | one core | two cores | scaling |\n|---|---|---|---|"
        );
        for p in points {
            match p.factor() {
                Some(f) => {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {f:.2}× |",
                        p.contender.label(),
                        samples(&p.one),
                        samples(&p.two)
                    );
                }
                None => {
                    let _ = writeln!(md, "| {} | {} | | |", p.contender.label(), scaling_text(p));
                }
            }
        }
        md.push('\n');
    }
}

fn cost_section(run: &Run, md: &mut String) {
    let Some(costs) = &run.costs else {
        return;
    };
    let _ = writeln!(md, "## Per-packet cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        md,
        "The last rows, marked live, are timed on the benchmark's path by the kernel's run-time \
         statistics instead (`BPF_ENABLE_STATS`), each against the empty XDP program timed the same way.\n"
    );
    let _ = writeln!(
        md,
        "| program | path | ns per packet | × empty XDP |\n|---|---|---|---|"
    );
    for c in costs {
        // Against the empty XDP program timed the same way (repeats for single TC runs).
        let floor = floor_for(run, "bench_empty_xdp", c)
            .or_else(|| cost_of(run, "bench_empty_xdp", "empty", (false, c.live)))
            .map(|f| f.ns);
        let ratio = floor
            .filter(|f| *f > 0.0)
            .map(|f| format!("{:.1}×", c.ns / f))
            .unwrap_or_default();
        let _ = writeln!(md, "| `{}` | {} | {:.1} | {} |", c.program, c.path, c.ns, ratio);
    }
    if let (Some(new), Some(single)) = (
        run.cost("nat_egress", "new binding"),
        run.cost("bench_empty_tc", "empty TC program, single"),
    ) {
        let _ = writeln!(
            md,
            "\nThe new-binding case can only be timed one run at a time; compare it with the single-run \
             floor of an empty TC program ({:.1} ns): a new binding costs about {:.0} ns more than doing nothing.",
            single.ns,
            new.ns - single.ns
        );
    }
    md.push('\n');
}

fn scale_section(run: &Run, plot_name: &str, md: &mut String) {
    if run.scale_forwarding.is_none() && run.scale_costs.is_none() {
        return;
    }
    let _ = writeln!(md, "## Scale: live bindings\n");
    for n in &run.scale_notes {
        let _ = writeln!(md, "Note: {n}.\n");
    }
    if let Some(points) = &run.scale_forwarding {
        let _ = writeln!(md, "![packets per second with N live bindings]({plot_name})\n");
        scale_forwarding_tables(points, md);
    }
    if let Some(points) = &run.scale_costs {
        let floor = run.cost("bench_empty_xdp", "").map(|c| c.ns);
        let _ = writeln!(
            md,
            "Per-packet cost (ns) with N live bindings in the maps, and the new-binding rate on one core \
             (10⁹ / ns per new binding).\n"
        );
        let _ = writeln!(
            md,
            "| live bindings | `--max-bindings` | ingress hit | egress hit | ingress hit × empty XDP | new binding | new bindings/s |\n|---|---|---|---|---|---|---|"
        );
        for p in points {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.2} M |",
                thousands(p.bindings),
                thousands(p.max_bindings),
                p.ingress.ns,
                p.egress.ns,
                floor
                    .map(|f| format!("{:.1}×", p.ingress.ns / f))
                    .unwrap_or_default(),
                p.new_binding.ns,
                1e3 / p.new_binding.ns
            );
        }
        md.push('\n');
    }
    if let Some(m) = &run.memory {
        memory_section(m, md);
    }
}

/// One table per traffic pattern: rows are binding counts, columns contender x direction.
fn scale_forwarding_tables(points: &[ForwardingPoint], md: &mut String) {
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| points.iter().any(|p| p.contender == *c))
        .collect();
    let mut scales: Vec<u32> = points.iter().map(|p| p.bindings).collect();
    scales.dedup();
    type Pick = for<'a> fn(&'a ForwardingPoint) -> (&'a [f64], &'a [f64]);
    let patterns: [(&str, Pick); 2] = [
        (
            "Traffic spread over all N bindings (inbound: over all on the NAT's external address, \
             at most 50 000)",
            |p| (&p.out_pps, &p.in_pps),
        ),
        (
            "Traffic on 1 000 hot bindings (fewer when N is smaller), the rest of the N idle",
            |p| (&p.out_hot_pps, &p.in_hot_pps),
        ),
    ];
    for (title, pick) in patterns {
        let _ = writeln!(md, "{title}; median Mpps (min–max):\n");
        let _ = write!(md, "| live bindings |");
        for c in &contenders {
            let _ = write!(md, " {} out | {} in |", c.label(), c.label());
        }
        let _ = writeln!(md, "\n|---|{}", "---|".repeat(contenders.len() * 2));
        for &n in &scales {
            let _ = write!(md, "| {} |", thousands(n));
            for c in &contenders {
                match points.iter().find(|p| p.bindings == n && p.contender == *c) {
                    Some(p) if p.unavailable.is_none() => {
                        let (o, i) = pick(p);
                        let _ = write!(md, " {} | {} |", samples(o), samples(i));
                    }
                    Some(p) => {
                        let why = p.unavailable.clone().unwrap_or_default().replace('|', "/");
                        let _ = write!(md, " unavailable: {why} | |");
                    }
                    None => {
                        let _ = write!(md, " | |");
                    }
                }
            }
            md.push('\n');
        }
        md.push('\n');
    }
    let fills: Vec<String> = scales
        .iter()
        .filter_map(|&n| {
            let fill = points.iter().filter(|p| p.bindings == n).map(|p| p.fill).max()?;
            Some(format!("{}: {:.1} s", thousands(n), fill.as_secs_f64()))
        })
        .collect();
    let _ = writeln!(
        md,
        "Time to insert the bindings (4 map entries each) from userspace: {}.\n",
        fills.join(", ")
    );
}

fn memory_section(m: &Memory, md: &mut String) {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    let _ = writeln!(md, "### Memory per binding\n");
    let _ = writeln!(
        md,
        "The binding, session and usage maps are not preallocated (`BPF_F_NO_PREALLOC`): an entry is \
         allocated when it is inserted, so memory follows the live bindings. Kernel hash-map element = \
         `struct htab_elem` ({} bytes) + key + value, each rounded up to 8; the allocator \
         (`bpf_mem_alloc`) adds an 8-byte list node and kmalloc rounds to its size class. An idle map \
         holds one bucket ({} bytes) per power-of-two slot. Sizes from {}. Measured instance: \
         `--max-bindings` {}, {} live bindings; memlock is bpftool's `bytes_memlock` (the kernel's \
         `map_mem_usage`, which counts live entries since Linux 6.4).\n",
        m.htab_elem,
        m.bucket,
        m.source,
        thousands(m.max_bindings),
        thousands(m.live_bindings)
    );
    let _ = writeln!(
        md,
        "| map | key | value | bytes per element | allocated per element | capacity | memlock empty | memlock filled |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for map in &m.maps {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} |",
            map.name,
            map.key,
            map.value,
            map.elem,
            map.allocated,
            thousands(map.max_entries),
            map.memlock_empty.map(mib).unwrap_or_else(|| "n/a".into()),
            map.memlock.map(mib).unwrap_or_else(|| "n/a".into())
        );
    }
    let _ = write!(
        md,
        "\n- **Per live binding: {} bytes** allocated = outbound entry {} + inbound entry {} + \
         {SESSIONS_PER_LIVE_BINDING} sessions × {} (one remote: address-and-port and address-only)",
        m.per_live_binding(),
        m.maps[0].allocated,
        m.maps[1].allocated,
        m.maps[2].allocated
    );
    match m.memlock_per_live_binding() {
        Some(k) => {
            let _ = writeln!(
                md,
                "; the kernel's accounting (memlock filled minus empty, per live binding) says {k:.0} \
                 bytes (elements and list nodes, before kmalloc's rounding)."
            );
        }
        None => {
            let _ = writeln!(
                md,
                "; the kernel's accounting did not grow with the entries (it counts live entries only \
                 since Linux 6.4)."
            );
        }
    }
    let _ = writeln!(
        md,
        "- Idle: **{:.0} bytes per configured binding** (bucket arrays of both binding maps and of the \
         session map, which has room for {} entries per binding).\n\
         - A default attach on this machine (`--max-bindings` {}: conntrack's default for its RAM, at most {}) \
         holds **{}** in all its maps before the first packet by the kernel's accounting ({} computed).",
        m.idle_per_configured_binding(),
        nat_common::maps::SESSIONS_PER_BINDING,
        thousands(m.idle.max_bindings),
        thousands(nat_common::table_size::MAX_DEFAULT_MAX_BINDINGS),
        mib(m.idle.memlock),
        mib(m.idle.computed)
    );
    md.push('\n');
}

const METHOD: &str = "\
## Method

- **Topology** (fresh for every contender in every round, removed afterwards): namespace `src` \
(internal host) — veth — `rtr` (forwards, `rp_filter` off, static neighbours) — veth — `dst` \
(remote). The NAT attaches to `rtr`'s external veth; nftables masquerades on it.
- **Generator**: `bench_generator` (nat-ebpf/src/bench.rs) run with `BPF_PROG_TEST_RUN` in XDP \
live-frames mode, transmitting with `XDP_TX` out of the end host's veth into the router, batches \
of 64. It rewrites the whole 64-byte UDP frame from a template on every run (the page pool \
recycles pages without resetting them) and varies the source (outbound) or destination (inbound) \
endpoint per flow. All of the path — the router's NAPI poll, forwarding or XDP, the far veth, \
the sink — runs on the generator's CPU (pinned to the last CPU), so the generator's rate is the \
path's rate. The router's veths have GRO on so they accept `XDP_TX` frames without an XDP \
program of their own.
- **Timing**: every test-run call of more than one frame costs tens of milliseconds of set-up \
(the kernel swaps its XDP dispatcher image around it, waiting for an RCU grace period). So the \
generator timestamps the first frame of every batch (`bpf_ktime_get_ns`), and a call's time is \
the span from its first to its last batch, scaled to all its frames: wall-clock time while \
frames were being generated, including everything else that ran on that CPU meanwhile, \
excluding the set-up. *Packets per second = packets counted by the far sink / that time.*
- **Sinks**: `bench_sink`, native XDP on both end veths, counts UDP per CPU and drops it. The \
generator-ceiling row is the same generator with a sink on the router's first veth (no \
forwarding at all).
- **Contenders**, alternated within one process, order rotated every round: plain kernel \
forwarding (no NAT, no conntrack); nftables `masquerade` in a `postrouting` nat chain (conntrack); \
the same plus a software flowtable on both router interfaces (`flowtable ft { hook ingress \
priority filter; devices = { lan, wan }; }` and `meta l4proto { tcp, udp } flow add @ft` in a \
forward chain: nftables' own fast path, which forwards a flow's packets from the ingress hook once \
conntrack has confirmed it; a kernel built without `CONFIG_NF_FLOW_TABLE` cannot run it, and the \
row then says so); `nat-ctl attach --mode port-restricted` with no other flag (the default \
attach, which finds the internal interface itself and so takes the fast path where it can); the \
same with `--internal-iface` naming it (the XDP fast path on purpose), both with `--max-sessions-per-host 0` (the new-flow burst comes from \
one internal host and would exceed the default per-host limit, a fairness policy nftables does \
not have) and `--max-bindings 262144` (the size of conntrack's table here, `nf_conntrack_max`, \
instead of the idle-memory default of at most 57 344, which the burst would nearly fill); a bare XDP forwarder (`bench_xdp_forward` in nat-ebpf/src/bench.rs on both router \
interfaces: `bpf_fib_lookup`, TTL decrement, MAC rewrite, `bpf_redirect`, no NAT), the limit of any \
XDP data path on this path. A result of a contender with a fast path (ours, the flowtable, the bare \
forwarder) only counts if the router's kernel forwarded at most 10% of the delivered packets \
(`ForwDatagrams`, which packets forwarded by a flowtable or XDP do not increment); otherwise the \
row says so instead of showing a number. New flows take the kernel path on their first packet \
with our fast path and with the flowtable alike, so their new-flow rows are not held to that.
- **Directions**: *outbound, established*: 16 flows of one internal host, warmed up with 10 000 \
packets first; *inbound replies*: the remote sends to the external endpoints of those 16 \
bindings (for plain forwarding: to the internal endpoints), after checking that our NAT kept \
their ports; *outbound, new flow per packet*: a burst of new flows, one packet each, from a \
second internal host (source ports 1024 up), into fresh tables. The burst is short (about a \
tenth of a second) because one external address has 64 512 ports per protocol: a port-preserving NAT cannot \
create new flows for seconds on end without running out, so each round measures one burst.
- **Per-packet cost**: the NAT object loaded unattached, with its maps pinned in a private \
bpffs directory, a ready config and test bindings. `BPF_PROG_TEST_RUN` repeats a program on the \
same buffer, so hit cases use bindings whose translated endpoint equals the original (the rewrite \
writes back the same bytes and every repeat takes the full path); each case checks the counter \
it must bump. ns per packet = the duration the kernel returns (its average per repeat, in whole \
ns; median over the calls). It includes the test-run loop's own overhead, which is what the \
empty programs measure. A new binding cannot repeat: it is the median of the kernel's times \
over single runs with a fresh source port each, to compare with single runs of the established \
hit and of the empty TC program.
- **Scale**: bindings (with their two sessions) are inserted from userspace into the running \
NAT's pinned maps (or the test instance's): binding *i* is internal `10.64.0.1 + i / 50 000 : \
10 000 + i % 50 000`, keeping its port; the first 50 000 use the NAT's external address, the rest \
addresses from 100.64.0.1 on (one address cannot hold more; the data path does not check it). \
The generator cycles through all N (outbound) or all on the external address (inbound), or \
through the first 1 000 only. Each (N, contender) has its own topology and NAT; all are set up \
first and then measured in turn, once per repetition. While they are measured their `nat-ctl` \
processes are paused (SIGSTOP; the data path does not need them), so no expiry sweep walks a \
million entries during a measurement; they resume before they are stopped. `nat-ctl` is pinned \
to CPU 0 throughout, away from the measured CPU.

## Caveats

- This is a 2-vCPU virtual machine that other work may share; interference shows up as low \
minimums. Contenders are alternated and medians reported, but single numbers move by 10-20% \
between runs; compare ratios within one run.
- Everything runs on one CPU and every packet crosses two veth pairs: absolute rates are far \
below what physical NICs and several cores would give. The generator alone reaches the ceiling \
row, well above every contender, so it does not limit them.
- Plain kernel forwarding keeps no per-flow state, so its \"new flow\" rate equals its \
established rate; the new-flow comparison that matters is against nftables (conntrack creates \
an entry per flow, as our NAT creates a binding).
- Per-packet costs include the test-run loop's own overhead (the empty-program rows); the \
targets' ratios are applied to the figures as measured. The internal side's fast path cannot be \
timed by test runs (it needs a real route and decrements the TTL on every repeat), so it and an \
empty XDP program are timed on the live path by the kernel's run-time statistics, which add two \
clock reads to every run of both.
- With traffic spread over a million bindings, every packet's binding and session entries are \
most likely cache misses, and since each flow is then seen less often than the NAT's 100 ms \
timestamp-refresh granularity, every packet also writes both timestamps. The hot-subset table \
separates that from the cost of the table's size alone.
";

/// BENCHMARKS.md; `plots` are the file names of the comparison and scale plots.
pub fn markdown(run: &Run, plots: &(String, String)) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    if run.smoke {
        let _ = writeln!(
            md,
            "**Smoke run: every path ran only briefly; the numbers are not meaningful.**\n"
        );
    }
    let m = &run.machine;
    let _ = writeln!(
        md,
        "Produced by `{}` (as root) on {}, in {:.0} s, from source {}.\n\n\
         - Machine: {} CPUs ({}), {} MiB RAM, kernel {}.\n\
         - The whole forwarding path runs on one CPU (see Method); numbers are per core.\n",
        run.command,
        m.date,
        run.duration.as_secs_f64(),
        m.revision,
        m.cpus,
        m.cpu_model,
        m.memory_mib,
        m.kernel
    );
    targets(run, &mut md);
    forwarding_section(run, &plots.0, &mut md);
    cost_section(run, &mut md);
    scale_section(run, &plots.1, &mut md);
    if let Some(points) = &run.scale_controller {
        controller_section(points, &mut md);
    }
    md.push_str(METHOD);
    let _ = writeln!(md, "\nSettings of this run: `{}`", run.plan);
    md
}

fn cost_json(c: &Cost) -> Value {
    json!({
        "program": c.program,
        "path": c.path,
        "ns": finite(c.ns),
        "single_runs": c.single_runs,
        "live": c.live,
    })
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

fn forwarding_json(f: &forwarding::Results) -> Value {
    let points: Vec<Value> = f
        .points
        .iter()
        .map(|((c, d), m)| {
            json!({
                "contender": c.key(),
                "direction": d.key(),
                "pps": m.pps,
                "median_pps": m.median_pps(),
                "kernel_share": m.kernel_share,
                "unavailable": m.unavailable,
            })
        })
        .collect();
    json!({ "points": points, "ceiling_pps": f.ceiling_pps })
}

fn controller_json(p: &ControllerPoint) -> Value {
    let secs = |d: Duration| d.as_secs_f64();
    json!({
        "bindings": p.bindings,
        "sweep_cpu_s": p.steady_cpu.iter().copied().map(secs).collect::<Vec<_>>(),
        "sweep_system_s": p.steady_system.iter().copied().map(secs).collect::<Vec<_>>(),
        "sweep_wall_s": p.steady_wall.iter().copied().map(secs).collect::<Vec<_>>(),
        "expire_all_cpu_s": secs(p.expire_all_cpu),
        "expire_all_wall_s": secs(p.expire_all_wall),
        "sigterm_to_exit_s": secs(p.sigterm),
        "attach_s": secs(p.attach),
        "adoption_s": secs(p.adoption),
        "unavailable": p.unavailable,
    })
}

/// Machine-readable results (used by the smoke test).
pub fn json(run: &Run) -> Value {
    let forwarding = run.forwarding.as_ref().map(forwarding_json);
    let scale_forwarding = run.scale_forwarding.as_ref().map(|ps| {
        ps.iter()
            .map(|p| {
                json!({
                    "bindings": p.bindings,
                    "contender": p.contender.key(),
                    "out_pps": p.out_pps,
                    "in_pps": p.in_pps,
                    "out_hot_pps": p.out_hot_pps,
                    "in_hot_pps": p.in_hot_pps,
                    "unavailable": p.unavailable,
                })
            })
            .collect::<Vec<_>>()
    });
    let scale_costs = run.scale_costs.as_ref().map(|ps| {
        ps.iter()
            .map(|p| {
                json!({
                    "bindings": p.bindings,
                    "max_bindings": p.max_bindings,
                    "ingress": cost_json(&p.ingress),
                    "egress": cost_json(&p.egress),
                    "new_binding": cost_json(&p.new_binding),
                })
            })
            .collect::<Vec<_>>()
    });
    let memory = run.memory.as_ref().map(|m| {
        json!({
            "per_live_binding": m.per_live_binding(),
            "memlock_per_live_binding": m.memlock_per_live_binding(),
            "idle_per_configured_binding": m.idle_per_configured_binding(),
            "idle_default_attach": {
                "max_bindings": m.idle.max_bindings,
                "memlock_bytes": m.idle.memlock,
                "computed_bytes": m.idle.computed,
            },
        })
    });
    json!({
        "smoke": run.smoke,
        "command": run.command,
        "machine": {
            "cpus": run.machine.cpus,
            "kernel": run.machine.kernel,
            "cpu_model": run.machine.cpu_model,
            "date": run.machine.date,
            "revision": run.machine.revision,
        },
        "costs": run.costs.as_ref().map(|cs| cs.iter().map(cost_json).collect::<Vec<_>>()),
        "forwarding": forwarding,
        "pktgen": run.pktgen.as_ref().map(forwarding_json),
        "two_cores": run.two_cores.as_ref().map(|ps| {
            ps.iter()
                .map(|p| {
                    json!({
                        "contender": p.contender.key(),
                        "one_pps": p.one,
                        "two_pps": p.two,
                        "scaling": p.factor(),
                        "unavailable": p.unavailable,
                    })
                })
                .collect::<Vec<_>>()
        }),
        "scale_forwarding": scale_forwarding,
        "scale_costs": scale_costs,
        "controller": run.scale_controller.as_ref().map(|ps| ps.iter().map(controller_json).collect::<Vec<_>>()),
        "memory": memory,
        "leftovers": run.leftovers,
        "seconds": run.duration.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_digits_and_sums_up_verdicts() {
        assert_eq!(thousands(1u32), "1");
        assert_eq!(thousands(1_000u32), "1 000");
        assert_eq!(thousands(1_000_000u64), "1 000 000");
        let part = |what: &str, met| Part {
            what: what.into(),
            met,
        };
        assert_eq!(overall(&[part("a", Some(true))]), "met");
        assert_eq!(overall(&[part("a", Some(false)), part("b", None)]), "**missed**");
        assert_eq!(
            overall(&[part("a", Some(true)), part("b", Some(false))]),
            "met for a; **missed** for b"
        );
    }

    fn cost(program: &'static str, path: &'static str, ns: f64, live: bool) -> Cost {
        Cost {
            program,
            path,
            ns,
            single_runs: false,
            live,
        }
    }

    fn machine() -> Machine {
        Machine {
            cpus: 2,
            kernel: "k".into(),
            cpu_model: "c".into(),
            memory_mib: 1024,
            date: "d".into(),
            revision: "r".into(),
        }
    }

    #[test]
    fn each_hit_is_held_to_its_floor_timed_the_same_way_and_unmeasured_targets_say_so() {
        let mut run = Run::new(machine(), "bench".into(), false);
        run.costs = Some(vec![
            cost("bench_empty_xdp", "empty XDP program (floor)", 40.0, false),
            cost("bench_empty_tc", "empty TC program", 50.0, false),
            cost("nat_ingress", "established hit (UDP)", 90.0, false),
            cost("nat_egress", "established hit (UDP)", 200.0, false),
            cost(
                "bench_empty_xdp",
                "empty XDP program on the path (live)",
                100.0,
                true,
            ),
            cost("nat_internal", "established hit, fast path (live)", 200.0, true),
        ]);
        let mut md = String::new();
        targets(&run, &mut md);
        let row = |start: &str| md.lines().find(|l| l.starts_with(start)).unwrap().to_string();
        // 90 / 40 = 2.25: met; the live internal hit against the live floor: 2.00, met.
        assert!(row("| ingress").contains("= 2.25×") && row("| ingress").ends_with("| met |"));
        assert!(
            row("| internal-side").contains("= 2.00×"),
            "{}",
            row("| internal-side")
        );
        // 200 / 50 = 4 > 3.
        assert!(row("| TC egress").ends_with("| **missed** |"));
        assert!(row("| whole path").ends_with(&format!("| {NOT_MEASURED} |")));
        assert!(row("| two cores").ends_with(&format!("| {NOT_MEASURED} |")));
    }

    #[test]
    fn two_core_scaling_is_the_ratio_of_the_medians() {
        let s = Scaling {
            contender: Contender::NatFastPath,
            one: vec![1e6, 1.2e6, 0.8e6],
            two: vec![1.8e6],
            unavailable: None,
        };
        assert_eq!(s.factor(), Some(1.8));
        assert!(scaling_text(&s).contains("= 1.80×"));
        let gone = Scaling {
            unavailable: Some("need 2 CPUs".into()),
            ..s
        };
        assert_eq!(gone.factor(), None);
        assert!(scaling_text(&gone).contains("unavailable (need 2 CPUs)"));
    }
}
