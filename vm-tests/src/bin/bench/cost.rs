//! Per-packet cost of each program path, from `BPF_PROG_TEST_RUN`, against the floor of an
//! empty program.
//!
//! A test run with `repeat` runs the program on the *same* buffer again and again, so changes
//! it makes stay for the next repeat: a translated packet would no longer match its binding.
//! The hit cases therefore use bindings whose translated endpoint equals the original one
//! (the inbound test binding maps external `E:p` to internal `E:p`, the outbound one internal
//! `I:q` to "external" `I:q`): the program looks up, filters, refreshes and rewrites exactly as
//! for any binding, but writes back the same bytes, so every repeat takes the same path. A new
//! binding cannot repeat at all, so it is timed over many single runs with a fresh source port
//! each, against the single-run floor of an empty TC program.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions, XdpMode};
use aya::Ebpf;
use aya::TestRunResult;
use nat_common::Counter;

use crate::contender::Contender;
use crate::cpu;
use crate::forwarding::{self, Delivered, FAST_PATH_MAX_KERNEL_SHARE};
use crate::frame::{icmp_error_frame, udp_frame, Mac};
use crate::generator::Generator;
use nat_ctl::clock::monotonic_ns;

use crate::nat_maps::Binding;
use crate::objects;
use crate::stats::median;
use crate::test_instance::TestInstance;
use crate::topology::{Topology, DST_IP, RTR_EXT_IP};

/// XDP_DROP / XDP_PASS and TC_ACT_OK as the test run returns them.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
/// Made-up MACs: the programs never look at them.
const MAC_A: Mac = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: Mac = [0x02, 0, 0, 0, 0, 0x0b];
/// The remote of every test binding.
const REMOTE: SocketAddrV4 = SocketAddrV4::new(DST_IP, 4_000);
/// A remote no binding has talked to (filtered by port-restricted filtering).
const STRANGER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 99), 4_000);
/// An address that is not the NAT's (pass-through).
const NOT_OURS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
/// Test bindings use ports above the scale layout's (10 000..59 999).
const EST_PORT: u16 = 61_000;
const FILTERED_PORT: u16 = 61_001;
const EGRESS_PORT: u16 = 61_002;
/// Internal hosts of the test bindings, outside the scale layout's 10.64.0.0/16.
const FILTERED_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const EGRESS_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const NEW_BINDING_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// New bindings take ports from here up, below the scale layout's ports so port preservation
/// succeeds at every scale (the allocator's cheapest case, as for most real flows).
const NEW_BINDING_PORT_BASE: u16 = 1_024;
/// Most single runs of the new-binding case (ports 1024..9999 are free at every scale).
pub const MAX_NEW_BINDING_RUNS: u32 = 8_000;

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Repeats per test run.
    pub repeat: u32,
    /// Test runs per case (the median is reported).
    pub runs: usize,
    /// Single runs of the new-binding case.
    pub new_bindings: u32,
}

/// One measured path.
#[derive(Clone, Debug)]
pub struct Cost {
    /// Program name.
    pub program: &'static str,
    /// What the packet exercises.
    pub path: &'static str,
    /// ns per packet from the duration the kernel returns: for repeated runs its per-run
    /// average (whole ns), median over the calls; for single runs the median over all of them.
    /// (Wall time is no use here: around every repeated XDP call the kernel swaps its XDP
    /// dispatcher image, an RCU grace period of tens of ms.)
    pub ns: f64,
    /// Timed as single runs (new bindings) rather than repeats.
    pub single_runs: bool,
    /// Measured on the live path by the kernel's run-time statistics rather than by test runs
    /// (see `live_internal`).
    pub live: bool,
}

/// The floors: empty programs from the bench object.
pub struct Floors {
    ebpf: Ebpf,
}

impl Floors {
    /// Loads the empty programs.
    pub fn load() -> Result<Floors> {
        let mut ebpf = objects::load_bench()?;
        objects::xdp(&mut ebpf, "bench_empty_xdp")?;
        objects::classifier(&mut ebpf, "bench_empty_tc")?;
        Ok(Floors { ebpf })
    }

    /// Empty XDP, repeated.
    pub fn xdp(&self, s: &Settings) -> Result<Cost> {
        let prog: &aya::programs::Xdp = self
            .ebpf
            .program("bench_empty_xdp")
            .context("no empty xdp")?
            .try_into()?;
        let data = udp_frame(MAC_A, MAC_B, REMOTE, SocketAddrV4::new(RTR_EXT_IP, EST_PORT));
        repeated(
            prog,
            "bench_empty_xdp",
            "empty XDP program (floor)",
            &data,
            XDP_PASS,
            s,
        )
    }

    /// Empty TC, repeated.
    pub fn tc(&self, s: &Settings) -> Result<Cost> {
        let prog: &aya::programs::SchedClassifier = self
            .ebpf
            .program("bench_empty_tc")
            .context("no empty tc")?
            .try_into()?;
        let data = udp_frame(MAC_A, MAC_B, REMOTE, SocketAddrV4::new(RTR_EXT_IP, EST_PORT));
        repeated(prog, "bench_empty_tc", "empty TC program", &data, TC_ACT_OK, s)
    }

    /// Empty TC, single runs (the floor of the new-binding case).
    pub fn tc_single(&self, s: &Settings) -> Result<Cost> {
        let prog: &aya::programs::SchedClassifier = self
            .ebpf
            .program("bench_empty_tc")
            .context("no empty tc")?
            .try_into()?;
        let data = udp_frame(MAC_A, MAC_B, REMOTE, SocketAddrV4::new(RTR_EXT_IP, EST_PORT));
        let mut times = Vec::new();
        for _ in 0..s.new_bindings {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&data),
                ..TestRunOptions::new()
            })?;
            times.push(r.duration.as_nanos() as f64);
        }
        Ok(Cost {
            program: "bench_empty_tc",
            path: "empty TC program, single runs",
            ns: single_run_ns(&times),
            single_runs: true,
            live: false,
        })
    }
}

/// The figure of a series of single runs: their median, so the odd run hit by an interrupt or
/// by other work on the CPU does not move it.
fn single_run_ns(times: &[f64]) -> f64 {
    median(times).unwrap_or(f64::NAN)
}

/// Times `repeat` runs of `prog` on `data`, `s.runs` times; checks the verdict.
fn repeated<P>(
    prog: &P,
    program: &'static str,
    path: &'static str,
    data: &[u8],
    expect: u32,
    s: &Settings,
) -> Result<Cost>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut kernel = Vec::new();
    for _ in 0..s.runs {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                repeat: s.repeat,
                ..TestRunOptions::new()
            })
            .with_context(|| format!("test run of {program} ({path})"))?;
        if r.return_value != expect {
            bail!(
                "{program} ({path}) returned {} instead of {expect}",
                r.return_value
            );
        }
        kernel.push(r.duration.as_nanos() as f64);
    }
    Ok(Cost {
        program,
        path,
        ns: median(&kernel).unwrap_or(f64::NAN),
        single_runs: false,
        live: false,
    })
}

/// Inserts the test bindings (see the module comment).
pub fn insert_test_bindings(inst: &mut TestInstance) -> Result<()> {
    let now = monotonic_ns();
    let ext = |p| SocketAddrV4::new(RTR_EXT_IP, p);
    for b in [
        // Inbound hit: external E:p -> internal E:p.
        Binding {
            internal: ext(EST_PORT),
            external: ext(EST_PORT),
            remote: REMOTE,
        },
        // Filtered: a normal binding; the test packet comes from a stranger.
        Binding {
            internal: SocketAddrV4::new(FILTERED_HOST, FILTERED_PORT),
            external: ext(FILTERED_PORT),
            remote: REMOTE,
        },
        // Outbound hit: internal I:q -> "external" I:q.
        Binding {
            internal: SocketAddrV4::new(EGRESS_HOST, EGRESS_PORT),
            external: SocketAddrV4::new(EGRESS_HOST, EGRESS_PORT),
            remote: REMOTE,
        },
    ] {
        inst.maps.insert(&b, now)?;
    }
    Ok(())
}

/// Runs `case` and checks that `counter` grew by at least `expected`: the packet really took
/// the path the table says.
fn checked(
    inst: &TestInstance,
    counter: Counter,
    expected: u64,
    case: impl FnOnce() -> Result<Cost>,
) -> Result<Cost> {
    let before = inst.maps.counter(counter)?;
    let cost = case()?;
    let grew = inst.maps.counter(counter)? - before;
    if grew < expected {
        bail!(
            "{} ({}): counter {} grew by {grew}, expected {expected}",
            cost.program,
            cost.path,
            counter.name()
        );
    }
    Ok(cost)
}

/// nat_ingress: established hit.
pub fn ingress_established(inst: &TestInstance, s: &Settings) -> Result<Cost> {
    let data = udp_frame(MAC_A, MAC_B, REMOTE, SocketAddrV4::new(RTR_EXT_IP, EST_PORT));
    let n = s.repeat as u64 * s.runs as u64;
    checked(inst, Counter::TranslatedIn, n, || {
        repeated(
            inst.ingress()?,
            "nat_ingress",
            "established hit (UDP)",
            &data,
            XDP_PASS,
            s,
        )
    })
}

/// nat_ingress: a stranger's packet to a bound port, dropped by the filter.
pub fn ingress_filtered(inst: &TestInstance, s: &Settings) -> Result<Cost> {
    let data = udp_frame(
        MAC_A,
        MAC_B,
        STRANGER,
        SocketAddrV4::new(RTR_EXT_IP, FILTERED_PORT),
    );
    let n = s.repeat as u64 * s.runs as u64;
    checked(inst, Counter::FilteredIn, n, || {
        repeated(
            inst.ingress()?,
            "nat_ingress",
            "filtered drop (APDF)",
            &data,
            XDP_DROP,
            s,
        )
    })
}

/// nat_ingress: ICMP port unreachable about a packet of the established binding.
pub fn ingress_icmp_error(inst: &TestInstance, s: &Settings) -> Result<Cost> {
    let data = icmp_error_frame(
        MAC_A,
        MAC_B,
        *REMOTE.ip(),
        SocketAddrV4::new(RTR_EXT_IP, EST_PORT),
        REMOTE,
    );
    let n = s.repeat as u64 * s.runs as u64;
    checked(inst, Counter::IcmpErrorIn, n, || {
        repeated(
            inst.ingress()?,
            "nat_ingress",
            "ICMP error translated",
            &data,
            XDP_PASS,
            s,
        )
    })
}

/// nat_ingress: a packet not addressed to the NAT.
pub fn ingress_pass(inst: &TestInstance, s: &Settings) -> Result<Cost> {
    let data = udp_frame(MAC_A, MAC_B, REMOTE, SocketAddrV4::new(NOT_OURS, EST_PORT));
    let n = s.repeat as u64 * s.runs as u64;
    checked(inst, Counter::PassedNotNat, n, || {
        repeated(
            inst.ingress()?,
            "nat_ingress",
            "pass-through (not for the NAT)",
            &data,
            XDP_PASS,
            s,
        )
    })
}

/// nat_egress: established hit.
pub fn egress_established(inst: &TestInstance, s: &Settings) -> Result<Cost> {
    let data = udp_frame(MAC_A, MAC_B, SocketAddrV4::new(EGRESS_HOST, EGRESS_PORT), REMOTE);
    let n = s.repeat as u64 * s.runs as u64;
    checked(inst, Counter::TranslatedOut, n, || {
        repeated(
            inst.egress()?,
            "nat_egress",
            "established hit (UDP)",
            &data,
            TC_ACT_OK,
            s,
        )
    })
}

/// nat_egress: established hit timed like the new-binding case (single runs), so the two
/// compare directly.
pub fn egress_established_single(inst: &TestInstance, s: &Settings) -> Result<Cost> {
    let data = udp_frame(MAC_A, MAC_B, SocketAddrV4::new(EGRESS_HOST, EGRESS_PORT), REMOTE);
    checked(inst, Counter::TranslatedOut, s.new_bindings as u64, || {
        let prog = inst.egress()?;
        let mut times = Vec::new();
        for _ in 0..s.new_bindings {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&data),
                ..TestRunOptions::new()
            })?;
            if r.return_value != TC_ACT_OK {
                bail!("nat_egress (established, single run) returned {}", r.return_value);
            }
            times.push(r.duration.as_nanos() as f64);
        }
        Ok(Cost {
            program: "nat_egress",
            path: "established hit (single runs)",
            ns: single_run_ns(&times),
            single_runs: true,
            live: false,
        })
    })
}

/// nat_egress: a new binding per packet (single runs, fresh source port each). Ports of
/// `NEW_BINDING_HOST` from `NEW_BINDING_PORT_BASE + offset` on are used, so a caller measuring
/// the same instance twice passes a different offset.
pub fn egress_new_binding(inst: &TestInstance, s: &Settings, offset: u32) -> Result<Cost> {
    let runs = s.new_bindings.min(MAX_NEW_BINDING_RUNS.saturating_sub(offset));
    if runs == 0 {
        bail!("no free ports left for the new-binding case");
    }
    checked(inst, Counter::NewBinding, runs as u64, || {
        let prog = inst.egress()?;
        let mut times = Vec::new();
        for i in 0..runs {
            let port = NEW_BINDING_PORT_BASE + (offset + i) as u16;
            let data = udp_frame(MAC_A, MAC_B, SocketAddrV4::new(NEW_BINDING_HOST, port), REMOTE);
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&data),
                ..TestRunOptions::new()
            })?;
            if r.return_value != TC_ACT_OK {
                bail!("nat_egress (new binding) returned {}", r.return_value);
            }
            times.push(r.duration.as_nanos() as f64);
        }
        Ok(Cost {
            program: "nat_egress",
            path: "new binding (single runs)",
            ns: single_run_ns(&times),
            single_runs: true,
            live: false,
        })
    })
}

/// Runs `f` on a thread pinned to the generator CPU, so test runs are timed on the same core
/// as the forwarding runs and do not migrate.
pub fn on_bench_cpu<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                cpu::pin_thread(cpu::generator_cpu())?;
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Run time per packet of the XDP program attached to `iface` on `topo`'s router while
/// `traffic` runs, from the kernel's own statistics (`BPF_ENABLE_STATS`: the kernel times every
/// run of every program while the returned descriptor is open, at the price of two clock reads
/// per run, which every figure taken this way includes alike).
fn live_xdp_ns(topo: &Topology, iface: &str, traffic: impl FnOnce() -> Result<()>) -> Result<f64> {
    let id = xdp_program_id(topo, iface)?;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable the kernel's BPF run-time statistics")?;
    let before = program_stats(id)?;
    traffic()?;
    let after = program_stats(id)?;
    drop(stats);
    let runs = after.1 - before.1;
    if runs == 0 {
        bail!("the XDP program on {iface} did not run");
    }
    Ok((after.0 - before.0) as f64 / runs as f64)
}

/// Id of the XDP program attached to `iface` on the router (`ip -j link show`).
fn xdp_program_id(topo: &Topology, iface: &str) -> Result<u32> {
    let out = topo.rtr.run_ok(
        "ip",
        &["-j", "link", "show", "dev", iface],
        vm_tests::netns::SETUP_TIMEOUT,
    )?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("ip -j link show: not JSON")?;
    v[0]["xdp"]["prog"]["id"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .with_context(|| format!("no XDP program on {iface}"))
}

/// `(run time ns, run count)` of loaded program `id`.
fn program_stats(id: u32) -> Result<(u64, u64)> {
    // Programs unloaded while the list is walked show up as errors: not ours, skipped.
    for info in aya::programs::loaded_programs().flatten() {
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("program {id} is no longer loaded")
}

/// The internal side's established hit, which a test run cannot time: its fast path looks the
/// route up in the namespace of a real interface and decrements the TTL, so repeats on one
/// buffer would leave the path after a few hundred runs. Instead both it and its floor are timed
/// on the benchmark's path by the kernel's run-time statistics while the outbound established
/// flows run for `point`: `bench_empty_xdp` on the router's internal interface (plain kernel
/// forwarding behind it), and `nat_internal` of our NAT with the fast path, after a warm-up
/// that puts the flows on it (the run does not count if the kernel forwarded more than
/// `FAST_PATH_MAX_KERNEL_SHARE` of them).
pub fn live_internal(gen: &mut Generator, point: std::time::Duration) -> Result<Vec<Cost>> {
    let floor = {
        let topo = Topology::build()?;
        let mut ebpf = objects::load_bench()?;
        let prog = objects::xdp(&mut ebpf, "bench_empty_xdp")?;
        topo.rtr.enter(|| {
            prog.attach(&topo.int_if, XdpMode::Driver)
                .context("cannot attach bench_empty_xdp to the router")
        })?;
        live_xdp_ns(&topo, &topo.int_if, || {
            forwarding::outbound_established(gen, &topo, point).map(drop)
        })?
    };
    let hit = {
        let topo = Topology::build()?;
        let running = Contender::NatFastPath.start(&topo, &[])?;
        let measured = forwarding::outbound_established(gen, &topo, point).and_then(|_| {
            live_xdp_ns(&topo, &topo.int_if, || {
                let d = forwarding::outbound_established(gen, &topo, point)?;
                if d.kernel_share() > FAST_PATH_MAX_KERNEL_SHARE {
                    bail!(
                        "not on the fast path: the kernel forwarded {} of {} delivered packets",
                        d.forwarded,
                        d.delivered
                    );
                }
                Ok(())
            })
        });
        running.stop()?;
        measured?
    };
    Ok(vec![
        Cost {
            program: "bench_empty_xdp",
            path: "empty XDP program on the router's internal interface (live, run-time statistics)",
            ns: floor,
            single_runs: false,
            live: true,
        },
        Cost {
            program: "nat_internal",
            path: "established hit, fast path (live, run-time statistics)",
            ns: hit,
            single_runs: false,
            live: true,
        },
    ])
}
