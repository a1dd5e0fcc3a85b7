//! Two cores: the forwarding path spread over both CPUs against one.
//!
//! The topology's veths get one queue per CPU: a veth hands a frame sent from CPU `c` to its
//! peer's receive queue `c % queues`, whose NAPI then runs on `c`, so two generators on two CPUs
//! drive two separate copies of the whole path, as RSS spreads flows over a NIC's queues. Each
//! generator sends its own established flows (RSS keeps a flow on one CPU), so what the two
//! CPUs share is what the contender shares between flows: its tables, counters and locks.
//!
//! Per (round, contender): a fresh topology, the contender, a warm-up of both flow sets, then
//! one generator alone (the one-core rate, in the same topology), then both at once. The
//! two-core rate is every packet the far sink counted over the longer of the two generators'
//! active times. The controller of our NAT is paused meanwhile (as in the scale runs): it is
//! pinned to CPU 0, which now carries traffic.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::contender::{Contender, Paused};
use crate::forwarding::{EST_FLOWS, EST_PORT_BASE, FAST_PATH_MAX_KERNEL_SHARE, REMOTE_PORT};
use crate::frame::{udp_frame, FRAME_LEN};
use crate::generator::{Budget, Flows, GenRun, Generator, Vary};
use crate::stats::median;
use crate::topology::{is_build_failure, Topology, DST_IP, HOST_IF, SRC_IP};

/// The contenders of the two-core runs: the kernel's NAT and ours with its fast path.
pub const CONTENDERS: [Contender; 2] = [Contender::Nftables, Contender::NatFastPath];
/// CPUs (and veth queues) used.
const CORES: usize = 2;
/// Warm-up packets per flow set (bindings, conntrack entries, fast-path confirmation).
const WARMUP_PACKETS: u64 = 10_000;
/// Time for frames still queued downstream to reach the sink after the generators stop.
const SETTLE: Duration = Duration::from_millis(30);

/// One contender's samples.
#[derive(Clone, Debug)]
pub struct Scaling {
    /// Contender.
    pub contender: Contender,
    /// One generator on one CPU, pps per round.
    pub one: Vec<f64>,
    /// Two generators on two CPUs, pps per round.
    pub two: Vec<f64>,
    /// Why there is no number, if there is none.
    pub unavailable: Option<String>,
}

impl Scaling {
    /// Two-core rate over one-core rate (medians).
    pub fn factor(&self) -> Option<f64> {
        if self.unavailable.is_some() {
            return None;
        }
        Some(median(&self.two)? / median(&self.one)?)
    }
}

/// The outbound established stream of generator `k`: its own `EST_FLOWS` source ports.
fn stream(topo: &Topology, k: usize) -> ([u8; FRAME_LEN], Flows) {
    let first_port = EST_PORT_BASE + (k as u32 * EST_FLOWS) as u16;
    (
        udp_frame(
            topo.src_mac,
            topo.int_mac,
            SocketAddrV4::new(SRC_IP, first_port),
            SocketAddrV4::new(DST_IP, REMOTE_PORT),
        ),
        Flows {
            count: EST_FLOWS,
            ports_per_addr: EST_FLOWS,
            vary: Vary::Source,
        },
    )
}

/// Delivered pps of `gens[k]` sending stream `k` on CPU `k` for `point`, all at once. Checks
/// that a contender with a fast path kept its packets off the kernel's forwarding path.
fn send(gens: &mut [Generator], topo: &Topology, contender: Contender, point: Duration) -> Result<Sample> {
    let streams: Vec<_> = (0..gens.len()).map(|k| stream(topo, k)).collect();
    for (g, (frame, flows)) in gens.iter_mut().zip(&streams) {
        g.configure(frame, *flows)?;
    }
    let before = topo.dst_sink.count_per_cpu()?;
    let fwd_before = topo.forwarded()?;
    let src = &topo.src;
    // With one generator it runs on the generator CPU, as in the one-core comparison.
    let cpus: Vec<usize> = if gens.len() == 1 {
        vec![crate::cpu::generator_cpu()]
    } else {
        (0..gens.len()).collect()
    };
    let runs: Vec<GenRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = gens
            .iter_mut()
            .zip(&streams)
            .zip(cpus)
            .map(|((g, (frame, _)), cpu)| {
                scope.spawn(move || g.run_on(cpu, src, HOST_IF, frame, Budget::Time(point)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>>>()
    })?;
    std::thread::sleep(SETTLE);
    let per_cpu: Vec<u64> = topo
        .dst_sink
        .count_per_cpu()?
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let delivered: u64 = per_cpu.iter().sum();
    let forwarded = topo.forwarded()? - fwd_before;
    if delivered == 0 {
        bail!("no packets delivered");
    }
    if contender.bypasses_kernel(crate::forwarding::Direction::OutboundEstablished)
        && forwarded as f64 > FAST_PATH_MAX_KERNEL_SHARE * delivered as f64
    {
        bail!("not on the fast path: the kernel forwarded {forwarded} of {delivered} delivered packets");
    }
    let active = runs.iter().map(|r| r.active).max().context("no generator ran")?;
    Ok(Sample {
        pps: delivered as f64 / active.as_secs_f64(),
        per_cpu,
    })
}

/// One measurement: delivered pps, and the packets each CPU delivered (the path stays on the
/// CPU whose generator sent the frame, so two busy CPUs show that both carried traffic).
struct Sample {
    pps: f64,
    per_cpu: Vec<u64>,
}

/// One round of one contender: `(one core, two cores)`.
fn round(gens: &mut [Generator], contender: Contender, point: Duration) -> Result<(Sample, Sample)> {
    let topo = Topology::build_multiqueue(CORES as u32)?;
    let running = contender.start(&topo, &crate::forwarding::NAT_ARGS)?;
    let measured = (|| {
        for k in 0..CORES {
            let (frame, flows) = stream(&topo, k);
            gens[0].configure(&frame, flows)?;
            gens[0].run(&topo.src, HOST_IF, &frame, Budget::Packets(WARMUP_PACKETS))?;
        }
        let _paused = Paused::pause(&running)?;
        let one = send(&mut gens[..1], &topo, contender, point)?;
        let two = send(gens, &topo, contender, point)?;
        Ok((one, two))
    })();
    running.stop()?;
    measured
}

/// Runs `rounds` rounds over `CONTENDERS` (order rotated per round), with two generators of
/// its own (each a private copy that times its own calls). Needs two CPUs.
pub fn run(rounds: usize, point: Duration, log: &mut dyn FnMut(&str)) -> Result<Vec<Scaling>> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cpus < CORES {
        bail!("the two-core runs need {CORES} CPUs, this machine has {cpus}");
    }
    let mut gens = [Generator::load()?, Generator::load()?];
    let mut results: Vec<Scaling> = CONTENDERS
        .iter()
        .map(|&contender| Scaling {
            contender,
            one: Vec::new(),
            two: Vec::new(),
            unavailable: None,
        })
        .collect();
    for r in 0..rounds {
        log(&format!("two cores, round {}/{rounds}", r + 1));
        for i in 0..CONTENDERS.len() {
            let s = &mut results[(r + i) % CONTENDERS.len()];
            if s.unavailable.is_some() {
                continue;
            }
            match round(&mut gens, s.contender, point) {
                Ok((one, two)) => {
                    log(&format!(
                        "  {:<34} one core {:>9.0} pps, two cores {:>9.0} pps ({:.2}×; delivered per CPU {:?})",
                        s.contender.label(),
                        one.pps,
                        two.pps,
                        two.pps / one.pps,
                        two.per_cpu
                    ));
                    s.one.push(one.pps);
                    s.two.push(two.pps);
                }
                Err(e) if is_build_failure(&e) => return Err(e),
                Err(e) => {
                    log(&format!("  {}: {e:#}", s.contender.label()));
                    s.unavailable = Some(format!("{e:#}"));
                }
            }
        }
    }
    Ok(results)
}

/// Every contender marked unavailable for `why` (the runs could not start).
pub fn unavailable(why: &str) -> Vec<Scaling> {
    CONTENDERS
        .iter()
        .map(|&contender| Scaling {
            contender,
            one: Vec::new(),
            two: Vec::new(),
            unavailable: Some(why.to_string()),
        })
        .collect()
}
