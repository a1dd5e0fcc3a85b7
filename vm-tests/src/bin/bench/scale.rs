//! How forwarding rate and per-packet cost change with the number of live bindings.
//!
//! The bindings are filled from userspace (see `nat_maps::ScaleLayout`). Two traffic patterns:
//! the generator spreads its packets over *all* of them (inbound: over all those on the NAT's
//! external address), so a large table really is touched all over, as with that many active
//! flows; and over a hot subset of `HOT_FLOWS` while the rest sit idle, which isolates the cost
//! of the table's size from the cost of touching many entries.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Result;
use nat_common::maps::DEFAULT_MAX_BINDINGS;

use crate::contender::{self, Contender, Paused, Running};
use crate::cost::{self, Cost, MAX_NEW_BINDING_RUNS};
use crate::frame::udp_frame;
use crate::generator::{Budget, Flows, Generator, Vary};
use crate::nat_maps::{NatMaps, ScaleLayout};
use crate::stats::median;
use crate::test_instance::TestInstance;
use crate::topology::{is_build_failure, Topology, DST_IP, HOST_IF, RTR_EXT_IP};

/// The binding counts of the issue.
pub const SCALES: [u32; 4] = [1, 1_000, 100_000, 1_000_000];
/// Sweep interval for the scale runs: the longest nat-ctl accepts, so a sweep over a million
/// bindings (a control-plane cost, on the other CPU) does not run during the measurement.
const SWEEP_INTERVAL_MS: &str = "60000";
/// Time for frames still queued downstream to reach the sink.
const SETTLE: Duration = Duration::from_millis(30);
/// Flows of the "hot subset" pattern: the first this many bindings carry all the traffic while
/// the rest of the table sits idle (many live but quiet flows, a few busy ones).
pub const HOT_FLOWS: u32 = 1_000;
/// The remote port of every filler binding.
const REMOTE_PORT: u16 = crate::forwarding::REMOTE_PORT;

/// The layout used everywhere in the scale runs.
pub fn layout() -> ScaleLayout {
    ScaleLayout {
        host_base: Ipv4Addr::new(10, 64, 0, 1),
        external: RTR_EXT_IP,
        filler_external_base: Ipv4Addr::new(100, 64, 0, 0),
        remote: SocketAddrV4::new(DST_IP, REMOTE_PORT),
    }
}

/// `--max-bindings` for `n` live bindings: the default table unless more is needed, so the
/// small scales share one table size.
pub fn max_bindings_for(n: u32) -> u32 {
    n.max(DEFAULT_MAX_BINDINGS)
}

/// Run lengths.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Binding counts.
    pub scales: Vec<u32>,
    /// Generator time per point.
    pub point: Duration,
    /// Repetitions per point (median reported).
    pub reps: usize,
}

/// Forwarding at one scale for one contender.
#[derive(Clone, Debug)]
pub struct ForwardingPoint {
    /// Live bindings.
    pub bindings: u32,
    /// Contender (one of ours).
    pub contender: Contender,
    /// Outbound pps samples, traffic spread over all bindings.
    pub out_pps: Vec<f64>,
    /// Inbound pps samples, traffic spread over all bindings on the external address.
    pub in_pps: Vec<f64>,
    /// Outbound pps samples, traffic on the first `HOT_FLOWS` bindings only.
    pub out_hot_pps: Vec<f64>,
    /// Inbound pps samples, traffic on the first `HOT_FLOWS` bindings only.
    pub in_hot_pps: Vec<f64>,
    /// How long filling the maps took.
    pub fill: Duration,
    /// Why there is no number.
    pub unavailable: Option<String>,
}

impl ForwardingPoint {
    /// Median outbound pps.
    pub fn out(&self) -> Option<f64> {
        self.unavailable
            .is_none()
            .then(|| median(&self.out_pps))
            .flatten()
    }
    /// Median inbound pps.
    pub fn inbound(&self) -> Option<f64> {
        self.unavailable.is_none().then(|| median(&self.in_pps)).flatten()
    }
    /// Median outbound pps, hot subset.
    pub fn out_hot(&self) -> Option<f64> {
        self.unavailable
            .is_none()
            .then(|| median(&self.out_hot_pps))
            .flatten()
    }
    /// Median inbound pps, hot subset.
    pub fn in_hot(&self) -> Option<f64> {
        self.unavailable
            .is_none()
            .then(|| median(&self.in_hot_pps))
            .flatten()
    }
}

/// Sends for `point` over the first `flows` bindings of the layout (outbound: any binding;
/// inbound: only those on the external address are reachable, so at most `PORTS_PER_HOST`).
fn spread(gen: &mut Generator, topo: &Topology, flows: u32, outbound: bool, point: Duration) -> Result<f64> {
    let l = layout();
    let first = l.binding(0);
    let (frame, flows, ns, sink) = if outbound {
        (
            udp_frame(topo.src_mac, topo.int_mac, first.internal, first.remote),
            Flows {
                count: flows,
                ports_per_addr: ScaleLayout::PORTS_PER_HOST,
                vary: Vary::Source,
            },
            &topo.src,
            &topo.dst_sink,
        )
    } else {
        (
            udp_frame(topo.dst_mac, topo.ext_mac, first.remote, first.external),
            Flows {
                count: ScaleLayout::inbound_reachable(flows),
                ports_per_addr: ScaleLayout::PORTS_PER_HOST,
                vary: Vary::Destination,
            },
            &topo.dst,
            &topo.src_sink,
        )
    };
    gen.configure(&frame, flows)?;
    let before = sink.count()?;
    let run = gen.run(ns, HOST_IF, &frame, Budget::Time(point))?;
    std::thread::sleep(SETTLE);
    let delivered = sink.count()? - before;
    if delivered == 0 {
        anyhow::bail!("no packets delivered ({} sent)", run.sent);
    }
    Ok(run.rate(delivered))
}

/// One NAT with its bindings filled, in its own topology, waiting to be measured. Fields drop
/// in order: the controller resumes before it is stopped, and stops before its namespaces go.
struct Setup {
    point: ForwardingPoint,
    paused: Option<Paused>,
    running: Running,
    topo: Topology,
}

fn set_up(contender: Contender, n: u32) -> Result<(Topology, Running, Duration)> {
    let topo = Topology::build()?;
    let max = max_bindings_for(n).to_string();
    let running = contender.start(
        &topo,
        &["--max-bindings", &max, "--sweep-interval-ms", SWEEP_INTERVAL_MS],
    )?;
    let mut maps = NatMaps::open(&contender::pin_dir(&topo.ext_if)?)?;
    let fill = maps.fill(&layout(), n)?;
    Ok((topo, running, fill))
}

impl ForwardingPoint {
    fn new(contender: Contender, bindings: u32, fill: Duration, unavailable: Option<String>) -> Self {
        ForwardingPoint {
            bindings,
            contender,
            out_pps: Vec::new(),
            in_pps: Vec::new(),
            out_hot_pps: Vec::new(),
            in_hot_pps: Vec::new(),
            fill,
            unavailable,
        }
    }
}

/// The four measurements of one repetition at one setup.
fn measure(gen: &mut Generator, setup: &mut Setup, point: Duration) -> Result<()> {
    let (n, topo) = (setup.point.bindings, &setup.topo);
    let hot = n.min(HOT_FLOWS);
    let p = &mut setup.point;
    p.out_pps.push(spread(gen, topo, n, true, point)?);
    p.in_pps.push(spread(gen, topo, n, false, point)?);
    p.out_hot_pps.push(spread(gen, topo, hot, true, point)?);
    p.in_hot_pps.push(spread(gen, topo, hot, false, point)?);
    Ok(())
}

/// Forwarding at every scale for each of `contenders`. Every (scale, contender) gets its own
/// topology and NAT, all set up first, then measured in turn once per repetition, so a slow
/// drift of the machine affects every scale alike (as the rounds do in the comparison).
pub fn forwarding(
    gen: &mut Generator,
    contenders: &[Contender],
    s: &Settings,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<ForwardingPoint>> {
    let mut setups: Vec<Setup> = Vec::new();
    let mut failed: Vec<ForwardingPoint> = Vec::new();
    for &n in &s.scales {
        for &c in contenders {
            match set_up(c, n) {
                Ok((topo, running, fill)) => {
                    log(&format!(
                        "  {:<34} {:>9} bindings filled in {:.1} s",
                        c.label(),
                        n,
                        fill.as_secs_f64()
                    ));
                    let point = ForwardingPoint::new(c, n, fill, None);
                    setups.push(Setup {
                        point,
                        paused: None,
                        running,
                        topo,
                    });
                }
                Err(e) if is_build_failure(&e) => return Err(e),
                Err(e) => {
                    log(&format!("  {} at {n} bindings: {e:#}", c.label()));
                    failed.push(ForwardingPoint::new(c, n, Duration::ZERO, Some(format!("{e:#}"))));
                }
            }
        }
    }
    for setup in &mut setups {
        setup.paused = Paused::pause(&setup.running)?;
    }
    for rep in 0..s.reps {
        log(&format!("  repetition {}/{}", rep + 1, s.reps));
        for setup in setups.iter_mut().filter(|s| s.point.unavailable.is_none()) {
            if let Err(e) = measure(gen, setup, s.point) {
                log(&format!(
                    "  {} at {} bindings: {e:#}",
                    setup.point.contender.label(),
                    setup.point.bindings
                ));
                setup.point.unavailable = Some(format!("{e:#}"));
            }
        }
    }
    let mut points = failed;
    for setup in setups {
        // Empty the tables while the controller is still paused: on resuming, it catches up
        // with the sweeps it missed, and a sweep over a million bindings would hold up its
        // exit for longer than it is given.
        let missing =
            NatMaps::open(&contender::pin_dir(&setup.topo.ext_if)?)?.unfill(&layout(), setup.point.bindings);
        if missing > 0 {
            log(&format!(
                "  {} at {} bindings: {missing} filled entries were already gone",
                setup.point.contender.label(),
                setup.point.bindings
            ));
        }
        let p = setup.point;
        if p.unavailable.is_none() {
            log(&format!(
                "  {:<34} {:>9} bindings: all: out {:>9.0} in {:>9.0} pps; {} hot: out {:>9.0} in {:>9.0} pps",
                p.contender.label(),
                p.bindings,
                p.out().unwrap_or(f64::NAN),
                p.inbound().unwrap_or(f64::NAN),
                p.bindings.min(HOT_FLOWS),
                p.out_hot().unwrap_or(f64::NAN),
                p.in_hot().unwrap_or(f64::NAN),
            ));
        }
        drop(setup.paused);
        if let Err(e) = setup.running.stop() {
            // Recorded, not fatal: the results stand, and the leftover check at the end fails
            // the run if the NAT left anything behind.
            log(&format!(
                "  stopping {} at {} bindings: {e:#}",
                p.contender.label(),
                p.bindings
            ));
        }
        drop(setup.topo);
        points.push(p);
    }
    points.sort_by_key(|p| (p.bindings, p.contender));
    Ok(points)
}

/// Per-packet cost at one scale.
#[derive(Clone, Debug)]
pub struct CostPoint {
    /// Live bindings (filler; the three test bindings come on top).
    pub bindings: u32,
    /// `--max-bindings` of the instance.
    pub max_bindings: u32,
    /// nat_ingress established hit.
    pub ingress: Cost,
    /// nat_egress established hit.
    pub egress: Cost,
    /// nat_egress new binding.
    pub new_binding: Cost,
}

/// Per-packet cost at every scale, each in a fresh test instance. `with` runs on the largest
/// instance before it is unloaded (the memory cross-check).
pub fn costs(
    s: &Settings,
    cs: &cost::Settings,
    log: &mut dyn FnMut(&str),
    mut with_largest: impl FnMut(&TestInstance) -> Result<()>,
) -> Result<Vec<CostPoint>> {
    let mut points = Vec::new();
    let largest = s.scales.iter().copied().max().unwrap_or(0);
    for &n in &s.scales {
        let max = max_bindings_for(n.saturating_add(MAX_NEW_BINDING_RUNS + 8));
        let mut inst = TestInstance::load(max)?;
        let fill = inst.maps.fill(&layout(), n)?;
        cost::insert_test_bindings(&mut inst)?;
        let (ingress, egress, new_binding) = cost::on_bench_cpu(|| {
            Ok((
                cost::ingress_established(&inst, cs)?,
                cost::egress_established(&inst, cs)?,
                cost::egress_new_binding(&inst, cs, 0)?,
            ))
        })?;
        log(&format!(
            "  {:>9} bindings: ingress hit {:.1} ns, egress hit {:.1} ns, new binding {:.1} ns (filled in {:.1} s)",
            n,
            ingress.ns,
            egress.ns,
            new_binding.ns,
            fill.as_secs_f64()
        ));
        if n == largest {
            with_largest(&inst)?;
        }
        points.push(CostPoint {
            bindings: n,
            max_bindings: max,
            ingress,
            egress,
            new_binding,
        });
    }
    Ok(points)
}
