//! The packet generator: `bench_generator` run with `BPF_PROG_TEST_RUN` in XDP live-frames
//! mode, so the kernel transmits every frame it writes out of a veth (`XDP_TX`).
//!
//! The test run executes on the calling thread's CPU, and so does everything downstream (the
//! peer veth's NAPI poll, forwarding, the sink): the generator's rate *is* the path's rate. The
//! calling thread joins the generator's network namespace (the kernel resolves
//! `ingress_ifindex` there) and is pinned to one CPU so runs are comparable.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};
use aya::Ebpf;
use nat_common::bench::{GenClock, GenParams, STAMP_EVERY, VARY_DESTINATION, VARY_SOURCE};
use vm_tests::netns::Netns;

use crate::cpu;
use crate::frame::FRAME_LEN;
use crate::objects;

/// Program name in the bench object.
const PROGRAM: &str = "bench_generator";
/// Frames per live-frames batch: one timestamp per batch (see `STAMP_EVERY`).
pub const BATCH: u32 = STAMP_EVERY;
/// Frames per `BPF_PROG_TEST_RUN` call: every call costs tens of ms of set-up (left out of the
/// timing, but wall time all the same), so calls are long, yet short enough (well under a
/// second) to stop near a deadline. A multiple of `BATCH`.
const CHUNK: u32 = BATCH * 4_096;

/// `GenParams::vary` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// Source address/port vary per flow (outbound traffic from many internal endpoints).
    Source = VARY_SOURCE as isize,
    /// Destination address/port vary per flow (inbound traffic to many external endpoints).
    Destination = VARY_DESTINATION as isize,
}

/// Which flows the generator cycles through: flow `f` uses address `template + f / ports_per_addr`
/// and port `template + f % ports_per_addr` on the `vary` side.
#[derive(Clone, Copy, Debug)]
pub struct Flows {
    /// Distinct flows, cycled.
    pub count: u32,
    /// Ports per address before the address is incremented.
    pub ports_per_addr: u32,
    /// Which side varies.
    pub vary: Vary,
}

/// What one generator run did.
#[derive(Clone, Copy, Debug)]
pub struct GenRun {
    /// Frames generated (the program's own count).
    pub sent: u64,
    /// Time the generator was generating: the sum over test-run calls of the span between its
    /// first and last timestamped frame, scaled to all frames of the call. Leaves out each
    /// call's fixed set-up cost; includes everything that ran on the CPU meanwhile.
    pub active: Duration,
}

impl GenRun {
    /// `packets` per second of active generator time.
    pub fn rate(&self, packets: u64) -> f64 {
        packets as f64 / self.active.as_secs_f64()
    }
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// This many frames, rounded up to whole batches.
    Packets(u64),
    /// Calls of `CHUNK` frames until this much wall time has passed.
    Time(Duration),
}

/// The loaded generator and its maps.
pub struct Generator {
    ebpf: Ebpf,
    frame: Array<MapData, [u8; FRAME_LEN]>,
    params: Array<MapData, GenParams>,
    seq: PerCpuArray<MapData, u64>,
    clock: PerCpuArray<MapData, GenClock>,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the bench object"))
}

fn cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))
}

impl Generator {
    /// Loads a private copy of the bench object and verifies the generator.
    pub fn load() -> Result<Generator> {
        let mut ebpf = objects::load_bench()?;
        objects::xdp(&mut ebpf, PROGRAM)?;
        Ok(Generator {
            frame: Array::try_from(take_map(&mut ebpf, "BENCH_FRAME")?)?,
            params: Array::try_from(take_map(&mut ebpf, "BENCH_PARAMS")?)?,
            seq: PerCpuArray::try_from(take_map(&mut ebpf, "BENCH_SEQ")?)?,
            clock: PerCpuArray::try_from(take_map(&mut ebpf, "BENCH_CLOCK")?)?,
            ebpf,
        })
    }

    /// Sets the frame template and flows, and restarts the flow sequence at flow 0.
    pub fn configure(&mut self, frame: &[u8; FRAME_LEN], flows: Flows) -> Result<()> {
        self.frame.set(0, frame, 0)?;
        self.params.set(
            0,
            GenParams {
                flow_count: flows.count,
                ports_per_addr: flows.ports_per_addr,
                vary: flows.vary as u32,
                _pad: 0,
            },
            0,
        )?;
        self.seq.set(0, PerCpuValues::try_from(vec![0u64; cpus()?])?, 0)?;
        Ok(())
    }

    /// Sends frames out of `iface` in `ns` (they arrive at its veth peer) until `budget` is
    /// spent, on the generator CPU. `frame` must be the configured template (it seeds the page
    /// pool; the program rewrites every frame anyway).
    pub fn run(
        &mut self,
        ns: &Netns,
        iface: &str,
        frame: &[u8; FRAME_LEN],
        budget: Budget,
    ) -> Result<GenRun> {
        self.run_on(cpu::generator_cpu(), ns, iface, frame, budget)
    }

    /// `run` on CPU `cpu`. Two generators (two loaded copies: each times its own calls) may run
    /// at once on two CPUs.
    pub fn run_on(
        &mut self,
        cpu: usize,
        ns: &Netns,
        iface: &str,
        frame: &[u8; FRAME_LEN],
        budget: Budget,
    ) -> Result<GenRun> {
        let Generator { ebpf, seq, clock, .. } = self;
        let prog: &Xdp = ebpf
            .program(PROGRAM)
            .context("generator program missing")?
            .try_into()?;
        let iface = iface.to_string();
        let sent_before = total(seq)?;
        let ncpus = cpus()?;
        let mut run = ns.enter(|| {
            cpu::pin_thread(cpu)?;
            let name = std::ffi::CString::new(iface.clone())?;
            // SAFETY: valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {iface} in the generator's namespace");
            }
            let ctx = xdp_md(FRAME_LEN as u32, ifindex);
            let start = Instant::now();
            let mut queued = 0u64;
            let mut active = Duration::ZERO;
            loop {
                let frames = match budget {
                    Budget::Packets(n) if queued >= n => break,
                    Budget::Packets(n) => whole_batches(n - queued).min(CHUNK as u64) as u32,
                    Budget::Time(d) if start.elapsed() >= d => break,
                    Budget::Time(_) => CHUNK,
                };
                clock.set(0, PerCpuValues::try_from(vec![GenClock::default(); ncpus])?, 0)?;
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat: frames,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..TestRunOptions::new()
                };
                prog.test_run(opts)
                    .with_context(|| format!("generator test run on {iface}"))?;
                let c = clock
                    .get(&0, 0)?
                    .iter()
                    .copied()
                    .find(|c| c.first_ns != 0)
                    .context("the generator recorded no timestamp")?;
                if c.frames_between == 0 {
                    bail!("a generator call of {frames} frames is too short to time");
                }
                let span = c.last_ns.saturating_sub(c.first_ns) as f64;
                active += Duration::from_nanos((span * frames as f64 / c.frames_between as f64) as u64);
                queued += frames as u64;
            }
            Ok(GenRun { sent: 0, active })
        })?;
        run.sent = total(seq)? - sent_before;
        Ok(run)
    }
}

/// `n` rounded up to whole batches.
fn whole_batches(n: u64) -> u64 {
    n.div_ceil(BATCH as u64) * BATCH as u64
}

fn total(seq: &PerCpuArray<MapData, u64>) -> Result<u64> {
    Ok(seq.get(&0, 0)?.iter().sum())
}

/// `struct xdp_md` for a live-frames run: `data_end` = frame length, and the interface the
/// frames are "received" on, which is where `XDP_TX` sends them.
fn xdp_md(len: u32, ifindex: u32) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0, len, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect()
}
