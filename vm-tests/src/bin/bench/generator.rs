//! The packet generator: `bench_generator` run with `BPF_PROG_TEST_RUN` in XDP live-frames
//! mode, so the kernel transmits every frame it writes out of a veth (`XDP_TX`).
//!
//! The test run executes on the calling thread's CPU, and so does everything downstream (the
//! peer veth's NAPI poll, forwarding, the sink): the generator's rate *is* the path's rate. The
//! calling thread joins the generator's network namespace (the kernel resolves
//! `ingress_ifindex` there) and is pinned to one CPU so runs are comparable.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, PerCpuArray, PerCpuValues};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
use aya::Ebpf;
use vm_tests::netns::Netns;

use crate::frame::FRAME_LEN;
use crate::objects;

/// Program name in the bench object.
const PROGRAM: &str = "bench_generator";
/// Frames per live-frames batch: the kernel's NAPI budget, so each batch is one poll downstream.
const BATCH: u32 = 64;
/// Frames per `BPF_PROG_TEST_RUN` call when running for a duration: short enough (tens of ms)
/// to stop close to the deadline.
const CHUNK: u32 = 50_000;
/// The CPU the generator (and so the whole path) runs on: the last one, leaving CPU 0 to the
/// harness, nat-ctl and the rest of the machine.
fn generator_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

/// `GenParams::vary` values (see nat-ebpf/src/bench.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// Source address/port vary per flow (outbound traffic from many internal endpoints).
    Source = 0,
    /// Destination address/port vary per flow (inbound traffic to many external endpoints).
    Destination = 1,
}

/// Mirror of `GenParams` in nat-ebpf/src/bench.rs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenParams {
    flow_count: u32,
    ports_per_addr: u32,
    vary: u32,
    _pad: u32,
}

// SAFETY: repr(C), integers only, no padding bytes.
unsafe impl aya::Pod for GenParams {}

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
    /// Frames generated.
    pub sent: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// Exactly this many frames.
    Packets(u64),
    /// Chunks of frames until this much time has passed.
    Time(Duration),
}

/// The loaded generator.
pub struct Generator {
    ebpf: Ebpf,
}

impl Generator {
    /// Loads a private copy of the bench object and verifies the generator.
    pub fn load() -> Result<Generator> {
        let mut ebpf = objects::load_bench()?;
        objects::xdp(&mut ebpf, PROGRAM)?;
        Ok(Generator { ebpf })
    }

    /// Sets the frame template and flows, and restarts the flow sequence at flow 0.
    pub fn configure(&mut self, frame: &[u8; FRAME_LEN], flows: Flows) -> Result<()> {
        let mut template: Array<_, [u8; FRAME_LEN]> =
            Array::try_from(self.ebpf.map_mut("BENCH_FRAME").context("BENCH_FRAME missing")?)?;
        template.set(0, frame, 0)?;
        let mut params: Array<_, GenParams> =
            Array::try_from(self.ebpf.map_mut("BENCH_PARAMS").context("BENCH_PARAMS missing")?)?;
        params.set(
            0,
            GenParams {
                flow_count: flows.count,
                ports_per_addr: flows.ports_per_addr,
                vary: flows.vary as u32,
                _pad: 0,
            },
            0,
        )?;
        let mut seq: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map_mut("BENCH_SEQ").context("BENCH_SEQ missing")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        seq.set(0, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        Ok(())
    }

    /// Sends frames out of `iface` in `ns` (the frames arrive at its veth peer) until `budget`
    /// is spent, on the generator CPU. `frame` must be the configured template (it seeds the
    /// page pool; the program rewrites every frame anyway).
    pub fn run(&self, ns: &Netns, iface: &str, frame: &[u8; FRAME_LEN], budget: Budget) -> Result<GenRun> {
        let prog: &aya::programs::Xdp = self
            .ebpf
            .program(PROGRAM)
            .context("generator program missing")?
            .try_into()?;
        let iface = iface.to_string();
        let prog_ref = &prog;
        ns.enter(move || {
            pin_to_cpu(generator_cpu())?;
            let name = std::ffi::CString::new(iface.clone())?;
            // SAFETY: valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {iface} in the generator's namespace");
            }
            let ctx = xdp_md(FRAME_LEN as u32, ifindex);
            let start = Instant::now();
            let mut sent = 0u64;
            loop {
                let chunk = match budget {
                    Budget::Packets(n) if sent >= n => break,
                    Budget::Packets(n) => (n - sent).min(CHUNK as u64) as u32,
                    Budget::Time(d) if start.elapsed() >= d => break,
                    Budget::Time(_) => CHUNK,
                };
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat: chunk,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..TestRunOptions::new()
                };
                prog_ref
                    .test_run(opts)
                    .with_context(|| format!("generator test run on {iface}"))?;
                sent += chunk as u64;
            }
            Ok(GenRun {
                sent,
                elapsed: start.elapsed(),
            })
        })
    }
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

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity(0 = this thread) are
    // plain libc calls on it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot pin to CPU {cpu}"));
        }
    }
    Ok(())
}
