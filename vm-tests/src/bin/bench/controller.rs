//! The controller at table scale: with `n` live bindings in a running NAT,
//! the CPU time of one expiry sweep, the time from SIGTERM to exit while sweeps run, the time
//! `nat-ctl attach` takes to create the instance, and the time a second `attach` takes to adopt
//! the running state (restart).
//!
//! The sweep is nat-ctl's own `expiry::sweep`, called by the benchmark on the daemon's pinned
//! maps while the daemon is paused, and timed with the calling thread's CPU clock (user and
//! system time, the latter also reported alone: most of a sweep's work is the kernel's). Two passes: a "steady"
//! one that finds nothing expired (what every sweep of a busy gateway costs), then an
//! "expire-all" one whose clock is an hour ahead, which deletes the whole table.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nat_ctl::{expiry, pinned::PinnedMaps, settings::Timeouts};
use vm_tests::nat::{run_nat_ctl, STOP_TIMEOUT};

use crate::contender::{self, Contender, Paused, Running};
use nat_ctl::clock::monotonic_ns;

use crate::nat_maps::NatMaps;
use crate::scale::{layout, max_bindings_for};
use crate::stats::median;
use crate::topology::Topology;

/// Sweep interval of the daemon: back to back, so SIGTERM always finds a sweep running.
const SWEEP_INTERVAL_MS: &str = "10";
/// Wait after resuming the daemon before SIGTERM: longer than a sweep's start-up, so the
/// signal lands inside a pass.
const INTO_SWEEP: Duration = Duration::from_millis(300);
/// Steady sweeps timed (median reported).
pub const STEADY_REPS: usize = 3;
/// How far ahead the expire-all pass's clock is: past every default timeout but TCP
/// established (no TCP bindings in the filler).
const EXPIRE_ALL_AHEAD_NS: u64 = 3_600 * 1_000_000_000;
/// The daemon's timeouts in the library sweep: nat-ctl's defaults (RFC minimums).
const TIMEOUTS: [u32; 4] = [300, 7440, 240, 60];

/// The controller figures at one table size.
#[derive(Clone, Debug, Default)]
pub struct ControllerPoint {
    /// Live bindings (four map entries each).
    pub bindings: u32,
    /// `nat-ctl attach` to its `attached` line, fresh instance.
    pub attach: Duration,
    /// Filling the table from userspace (one syscall per entry; for the record).
    pub fill: Duration,
    /// CPU time of the steady sweeps (nothing expires).
    pub steady_cpu: Vec<Duration>,
    /// The system (kernel) part of `steady_cpu`.
    pub steady_system: Vec<Duration>,
    /// Wall time of the same sweeps.
    pub steady_wall: Vec<Duration>,
    /// SIGTERM to exit of a daemon sweeping the table (`--persist`: it leaves the data path).
    pub sigterm: Duration,
    /// A second `nat-ctl attach` to its `attached` line, adopting the table.
    pub adoption: Duration,
    /// CPU time of the pass that expires every binding.
    pub expire_all_cpu: Duration,
    /// Wall time of that pass.
    pub expire_all_wall: Duration,
    /// Sessions and bindings that pass removed.
    pub expire_all_removed: (usize, usize),
    /// Why there are no figures.
    pub unavailable: Option<String>,
}

impl ControllerPoint {
    /// Median CPU time of a steady sweep.
    pub fn steady_cpu(&self) -> Option<Duration> {
        median_duration(&self.steady_cpu)
    }
    /// Median system (kernel) time of a steady sweep.
    pub fn steady_system(&self) -> Option<Duration> {
        median_duration(&self.steady_system)
    }
    /// Median wall time of a steady sweep.
    pub fn steady_wall(&self) -> Option<Duration> {
        median_duration(&self.steady_wall)
    }
}

fn median_duration(v: &[Duration]) -> Option<Duration> {
    let secs: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
    median(&secs).map(Duration::from_secs_f64)
}

/// CPU time of the calling thread: (user + system, system).
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    let (user, system) = (tv(usage.ru_utime), tv(usage.ru_stime));
    (user + system, system)
}

/// One timed library sweep.
struct Timed {
    cpu: Duration,
    system: Duration,
    wall: Duration,
    report: expiry::SweepReport,
}

/// Runs one library sweep at `now_ns`.
fn timed_sweep(dir: &std::path::Path, now_ns: u64) -> Result<Timed> {
    let mut maps = PinnedMaps::open(dir)?;
    let never = AtomicBool::new(false);
    let (cpu0, wall0) = (thread_cpu(), Instant::now());
    let report = expiry::sweep(&mut maps, now_ns, &Timeouts(TIMEOUTS), &never)?;
    let cpu1 = thread_cpu();
    Ok(Timed {
        cpu: cpu1.0 - cpu0.0,
        system: cpu1.1 - cpu0.1,
        wall: wall0.elapsed(),
        report,
    })
}

fn attach_args(max: &str) -> [&str; 5] {
    [
        "--max-bindings",
        max,
        "--sweep-interval-ms",
        SWEEP_INTERVAL_MS,
        "--persist",
    ]
}

/// Measures the controller with `n` live bindings in its own topology. Every step that leaves
/// something running is undone on failure (the topology's drop removes the namespaces; the
/// persisted instance is detached).
pub fn measure(n: u32, log: &mut dyn FnMut(&str)) -> ControllerPoint {
    let mut point = ControllerPoint {
        bindings: n,
        ..ControllerPoint::default()
    };
    let topo = match Topology::build() {
        Ok(t) => t,
        Err(e) => {
            point.unavailable = Some(format!("{e:#}"));
            return point;
        }
    };
    if let Err(e) = steps(&topo, &mut point, log) {
        log(&format!("  controller at {n} bindings: {e:#}"));
        point.unavailable = Some(format!("{e:#}"));
    }
    // The persisted instance outlives its daemons: remove it (also after a failure).
    let _ = run_nat_ctl(&topo.rtr, &["detach", &topo.ext_if]);
    point
}

fn steps(topo: &Topology, p: &mut ControllerPoint, log: &mut dyn FnMut(&str)) -> Result<()> {
    let max = max_bindings_for(p.bindings).to_string();
    let started = Instant::now();
    let first = Contender::Nat.start(topo, &attach_args(&max))?;
    p.attach = started.elapsed();
    let dir = contender::pin_dir(&topo.ext_if)?;
    p.fill = NatMaps::open(&dir)?.fill(&layout(), p.bindings)?;
    {
        let _paused = Paused::pause(&first)?;
        for _ in 0..STEADY_REPS {
            let t = timed_sweep(&dir, monotonic_ns())?;
            anyhow::ensure!(
                t.report.bindings == 0 && t.report.sessions == 0,
                "the steady sweep removed {:?} of a live table",
                t.report
            );
            p.steady_cpu.push(t.cpu);
            p.steady_system.push(t.system);
            p.steady_wall.push(t.wall);
        }
    }
    std::thread::sleep(INTO_SWEEP);
    p.sigterm = terminate(first)?;
    let started = Instant::now();
    let second = Contender::Nat.start(topo, &attach_args(&max))?;
    p.adoption = started.elapsed();
    let adopted = second
        .nat()
        .is_some_and(|n| n.attached_line().contains("adopted"));
    anyhow::ensure!(adopted, "the second attach did not adopt the running state");
    {
        let _paused = Paused::pause(&second)?;
        let t = timed_sweep(&dir, monotonic_ns() + EXPIRE_ALL_AHEAD_NS)?;
        p.expire_all_cpu = t.cpu;
        p.expire_all_wall = t.wall;
        p.expire_all_removed = (t.report.sessions, t.report.bindings);
    }
    second.stop().context("stopping the adopting daemon")?;
    log(&format!(
        "  {:>9} bindings: attach {:.2} s, sweep {:.3} s CPU ({:.3} s of it system, {:.3} s wall), SIGTERM to exit {:.3} s, \
         adoption {:.2} s, expire-all sweep {:.3} s CPU ({} sessions, {} bindings; filled in {:.1} s)",
        p.bindings,
        p.attach.as_secs_f64(),
        p.steady_cpu().unwrap_or_default().as_secs_f64(),
        p.steady_system().unwrap_or_default().as_secs_f64(),
        p.steady_wall().unwrap_or_default().as_secs_f64(),
        p.sigterm.as_secs_f64(),
        p.adoption.as_secs_f64(),
        p.expire_all_cpu.as_secs_f64(),
        p.expire_all_removed.0,
        p.expire_all_removed.1,
        p.fill.as_secs_f64()
    ));
    Ok(())
}

/// SIGTERM to `running`'s daemon and the time until it has exited (cleanly).
fn terminate(running: Running) -> Result<Duration> {
    let Running::Nat(mut nat) = running else {
        anyhow::bail!("not our NAT");
    };
    let started = Instant::now();
    let status = nat.terminate()?;
    let took = started.elapsed();
    anyhow::ensure!(
        status.success(),
        "nat-ctl exited with {status} after SIGTERM (waited at most {STOP_TIMEOUT:?}); stderr: {}",
        nat.stderr().trim()
    );
    Ok(took)
}
