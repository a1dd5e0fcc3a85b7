//! The VM phase (`--only pktgen`): the forwarding comparison again, driven by the kernel's
//! `pktgen` instead of our XDP generator, meant for Debian 12's 6.1 kernel booted in qemu by
//! `cargo xtask bench` (the host's kernel has no pktgen).
//!
//! Same topology (sinks included), same contenders and the same flows as `forwarding`, alternated
//! the same way: every (round, contender) gets a fresh topology, and the order rotates every
//! round. pktgen sends a fixed number of packets per point from the end host's veth; the rate is
//! the far sink's count over pktgen's own elapsed time. Under TCG emulation absolute rates are
//! tens of times below the host's; only the ratios between contenders mean something.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::contender::{Contender, Running};
use crate::cpu;
use crate::forwarding::{
    check_preserved_ports, Delivered, Direction, Results, EST_FLOWS, EST_PORT_BASE, NEW_FLOW_HOST,
    NEW_FLOW_PORT_BASE, REMOTE_PORT,
};
use crate::pktgen::{self, Generator, Outcome, Stream};
use crate::sink::Sink;
use vm_tests::netns::SETUP_TIMEOUT;

use crate::topology::{is_build_failure, Topology, DST_IP, HOST_IF, RTR_EXT_IP, SRC_IP};

/// Packets sent before each measurement, in the same direction: they create the established
/// flows' bindings / conntrack entries, and they make qemu translate the code of that path
/// (TCG translates guest code the first time it runs, which would slow whichever contender
/// comes first).
const WARMUP_PACKETS: u64 = 1_000;
/// First source port of the new flows of the warm-up before the new-flow measurement: above
/// the measured new flows' ports, below the established flows'.
const WARMUP_NEW_PORT_BASE: u16 = 40_000;
/// Time for packets still queued downstream to reach the sink after pktgen stops (generous:
/// everything is slow under TCG).
const SETTLE: Duration = Duration::from_millis(100);
/// pktgen is stopped and the point counted as failed if it sends slower than this on average
/// (far below anything TCG gives; only a stuck path gets there).
const MIN_PPS: u64 = 500;
/// Slack on top of that time limit: start-up, and the 125 ms pktgen waits before it starts.
const TIMEOUT_SLACK: Duration = Duration::from_secs(10);

/// Run lengths.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Rounds (each contender measured once per direction per round).
    pub rounds: usize,
    /// Packets per established-flow point (outbound and inbound).
    pub packets: u64,
    /// New flows per new-flow point, one packet each (at most the unprivileged ports).
    pub new_flows: u16,
}

fn timeout(packets: u64) -> Duration {
    TIMEOUT_SLACK + Duration::from_secs(packets / MIN_PPS)
}

/// What one point delivered.
struct Sample {
    outcome: Outcome,
    delivered: u64,
    forwarded: u64,
}

impl Delivered for Sample {
    fn sent(&self) -> u64 {
        self.outcome.sent
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// Delivered packets per second of pktgen's time.
    fn pps(&self) -> f64 {
        if self.outcome.elapsed_us == 0 {
            return 0.0;
        }
        self.delivered as f64 * 1e6 / self.outcome.elapsed_us as f64
    }
}

fn outbound_established(topo: &Topology, count: u64) -> Stream {
    Stream {
        dst_mac: topo.int_mac,
        src: SRC_IP,
        dst: DST_IP,
        src_ports: EST_PORT_BASE..EST_PORT_BASE + EST_FLOWS as u16,
        dst_ports: REMOTE_PORT..REMOTE_PORT + 1,
        count,
    }
}

/// Replies to the established flows: to the external endpoints (the internal ones without NAT).
fn inbound(topo: &Topology, contender: Contender, count: u64) -> Stream {
    Stream {
        dst_mac: topo.ext_mac,
        src: DST_IP,
        dst: if contender.translates() {
            RTR_EXT_IP
        } else {
            SRC_IP
        },
        src_ports: REMOTE_PORT..REMOTE_PORT + 1,
        dst_ports: EST_PORT_BASE..EST_PORT_BASE + EST_FLOWS as u16,
        count,
    }
}

/// `flows` new flows from `port` up, one packet each.
fn outbound_new(topo: &Topology, port: u16, flows: u16) -> Stream {
    Stream {
        dst_mac: topo.int_mac,
        src: NEW_FLOW_HOST,
        dst: DST_IP,
        src_ports: port..port.saturating_add(flows),
        dst_ports: REMOTE_PORT..REMOTE_PORT + 1,
        count: flows as u64,
    }
}

fn send(gen: &Generator, topo: &Topology, stream: &Stream, sink: &Sink) -> Result<Sample> {
    let before = sink.count()?;
    let fwd_before = topo.forwarded()?;
    let outcome = gen.run(stream, timeout(stream.count))?;
    std::thread::sleep(SETTLE);
    let delivered = sink.count()? - before;
    let forwarded = topo.forwarded()? - fwd_before;
    Ok(Sample {
        outcome,
        delivered,
        forwarded,
    })
}

/// Records one sample, or why it does not count (the same rules as the host comparison).
/// `nat_says` is what our NAT printed about its fast path, if anything: the reason when the
/// fast path did not take the packets.
/// Sends `warmup` (unmeasured), then measures `stream`.
fn warm_and_send(
    gen: &Generator,
    topo: &Topology,
    warmup: &Stream,
    stream: &Stream,
    sink: &Sink,
) -> Result<Sample> {
    send(gen, topo, warmup, sink)?;
    send(gen, topo, stream, sink)
}

/// One contender in a fresh topology: established out, inbound, new flows out (last, as it
/// fills the tables), each after a warm-up.
fn round(
    contender: Contender,
    settings: &Settings,
    results: &mut Results,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let started = Instant::now();
    let topo = Topology::build()?;
    let built = started.elapsed();
    let running: Running = contender.start(&topo, &[]).map_err(|e| e.context(StartFailed))?;
    let cpu = cpu::generator_cpu();
    let from_src = Generator::add(&topo.src, HOST_IF, cpu)?;
    let from_dst = Generator::add(&topo.dst, HOST_IF, cpu)?;
    log(&format!(
        "  {:<34} set up in {:.1} s (topology {:.1} s)",
        contender.label(),
        started.elapsed().as_secs_f64(),
        built.as_secs_f64()
    ));

    let est = warm_and_send(
        &from_src,
        &topo,
        &outbound_established(&topo, WARMUP_PACKETS),
        &outbound_established(&topo, settings.packets),
        &topo.dst_sink,
    );
    let inb = check_preserved_ports(&running).and_then(|_| {
        warm_and_send(
            &from_dst,
            &topo,
            &inbound(&topo, contender, WARMUP_PACKETS),
            &inbound(&topo, contender, settings.packets),
            &topo.src_sink,
        )
    });
    let new = warm_and_send(
        &from_src,
        &topo,
        &outbound_new(&topo, WARMUP_NEW_PORT_BASE, WARMUP_PACKETS as u16),
        &outbound_new(&topo, NEW_FLOW_PORT_BASE, settings.new_flows),
        &topo.dst_sink,
    );
    // nat-ctl's notice about its fast path (e.g. why it stays off on this kernel).
    let nat_says = running.nat().and_then(|n| {
        n.stderr()
            .lines()
            .find(|l| l.contains("fast path"))
            .map(|l| l.trim().to_string())
    });
    for (dir, s) in [
        (Direction::OutboundEstablished, est),
        (Direction::Inbound, inb),
        (Direction::OutboundNew, new),
    ] {
        match &s {
            Ok(s) => log(&format!(
                "  {:<34} {:<30} {:>8.0} pps ({} of {} delivered in {} µs, kernel-forwarded {:.0}%)",
                contender.label(),
                dir.label(),
                s.pps(),
                s.delivered,
                s.outcome.sent,
                s.outcome.elapsed_us,
                s.kernel_share() * 100.0
            )),
            Err(e) => log(&format!(
                "  {:<34} {:<30} failed: {e:#}",
                contender.label(),
                dir.label()
            )),
        }
        results
            .points
            .entry((contender, dir))
            .or_default()
            .record(contender, dir, s, nat_says.as_deref());
    }
    if contender == Contender::Kernel {
        // Without it the section only lacks its floor row: the measurements above stand.
        match generator_floor(&from_src, &topo, settings.packets) {
            Ok(floor) => {
                log(&format!(
                    "  {:<34} {:<30} {:>8.0} pps",
                    "pktgen floor", "dropped at the router's ingress", floor
                ));
                results.ceiling_pps.push(floor);
            }
            Err(e) => log(&format!("  pktgen floor failed: {e:#}")),
        }
    }
    drop((from_src, from_dst));
    running.stop()?;
    Ok(())
}

/// pktgen's rate into the router when the router drops everything at its first interface's tc
/// ingress hook: the generator's and the veth's share of every point's time. Its own rate
/// (sent / elapsed) is the rate here: every packet it sent reached the drop (the router
/// receives in the sending softirq).
fn generator_floor(gen: &Generator, topo: &Topology, packets: u64) -> Result<f64> {
    let dev = topo.int_if.as_str();
    topo.rtr
        .run_ok("tc", &["qdisc", "add", "dev", dev, "clsact"], SETUP_TIMEOUT)?;
    topo.rtr.run_ok(
        "tc",
        &[
            "filter", "add", "dev", dev, "ingress", "matchall", "action", "drop",
        ],
        SETUP_TIMEOUT,
    )?;
    gen.run(
        &outbound_established(topo, WARMUP_PACKETS),
        timeout(WARMUP_PACKETS),
    )?;
    let o = gen.run(&outbound_established(topo, packets), timeout(packets))?;
    if o.elapsed_us == 0 {
        bail!("pktgen reported no elapsed time");
    }
    Ok(o.sent as f64 * 1e6 / o.elapsed_us as f64)
}

/// Context of a contender's start-up error: it will fail the same way in every round.
#[derive(Debug)]
struct StartFailed;

impl std::fmt::Display for StartFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot start the contender")
    }
}

/// Start-up failures after which a contender is left out of the remaining rounds.
const MAX_START_FAILURES: usize = 2;
/// Longest reason kept in the report (a verifier log can run to pages).
const MAX_REASON_CHARS: usize = 300;

/// Why `contender` has no numbers, on one line and of bounded length.
fn reason(contender: Contender, e: &anyhow::Error) -> String {
    let start_failed = e.downcast_ref::<StartFailed>().is_some();
    // The marker context says nothing the prefix below does not.
    let chain: Vec<String> = e
        .chain()
        .skip(usize::from(start_failed))
        .map(|c| c.to_string())
        .collect();
    let mut why: String = chain.join(": ").split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = why.char_indices().nth(MAX_REASON_CHARS) {
        why.truncate(cut);
        why.push('…');
    }
    match (start_failed, contender) {
        (true, Contender::Nat | Contender::NatFastPath) => format!("failed to attach: {why}"),
        (true, _) => format!("failed to set up: {why}"),
        (false, _) => format!("failed: {why}"),
    }
}

/// Runs every round. As in the host comparison, an error that concerns one contender (our NAT
/// failing to attach on this kernel, say) is recorded against it and the others go on; an error
/// building the topology stops the phase.
pub fn run(settings: &Settings, log: &mut dyn FnMut(&str)) -> Result<Results> {
    if settings.new_flows == 0 || settings.packets == 0 {
        bail!("the pktgen phase needs packets and new flows above 0");
    }
    if u32::from(NEW_FLOW_PORT_BASE) + u32::from(settings.new_flows) > u32::from(WARMUP_NEW_PORT_BASE) {
        bail!(
            "at most {} new flows: their ports must stay below the warm-up's",
            WARMUP_NEW_PORT_BASE - NEW_FLOW_PORT_BASE
        );
    }
    pktgen::load_module()?;
    let mut results = Results::default();
    // Start-up failures per contender: after `MAX_START_FAILURES` it is not tried again (a
    // verifier that refuses a program refuses it every time; one time-out may be bad luck).
    let mut start_failures: BTreeMap<Contender, usize> = BTreeMap::new();
    let n = Contender::IN_VM.len();
    for r in 0..settings.rounds {
        log(&format!("pktgen round {}/{}", r + 1, settings.rounds));
        for i in 0..n {
            let contender = Contender::IN_VM[(r + i) % n];
            if start_failures.get(&contender).copied().unwrap_or(0) >= MAX_START_FAILURES {
                continue;
            }
            if let Err(e) = round(contender, settings, &mut results, log) {
                if is_build_failure(&e) {
                    return Err(e);
                }
                if e.downcast_ref::<StartFailed>().is_some() {
                    *start_failures.entry(contender).or_default() += 1;
                }
                let why = reason(contender, &e);
                log(&format!("  {}: {why}", contender.label()));
                for dir in Direction::ALL {
                    let m = results.points.entry((contender, dir)).or_default();
                    if m.unavailable.is_none() {
                        m.unavailable = Some(why.clone());
                    }
                }
            }
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarding::Measurement;

    fn sample(delivered: u64, forwarded: u64) -> Sample {
        Sample {
            outcome: Outcome {
                elapsed_us: 2_000_000,
                sent: 100_000,
                pps: 50_000,
                errors: 0,
            },
            delivered,
            forwarded,
        }
    }

    #[test]
    fn rate_is_delivered_packets_over_pktgen_time() {
        assert_eq!(sample(80_000, 0).pps(), 40_000.0);
        assert_eq!(sample(80_000, 40_000).kernel_share(), 0.5);
    }

    #[test]
    fn a_fast_path_point_taken_by_the_kernel_does_not_count() {
        let mut m = Measurement::default();
        m.record(
            Contender::NatFastPath,
            Direction::OutboundEstablished,
            Ok(sample(80_000, 80_000)),
            Some("nat-ctl: the fast path stays off"),
        );
        let why = m.unavailable.as_deref().unwrap();
        assert!(
            why.contains("not on the fast path") && why.contains("stays off"),
            "{why}"
        );
        assert!(m.pps.is_empty());
        let mut m = Measurement::default();
        m.record(
            Contender::Nat,
            Direction::OutboundEstablished,
            Ok(sample(80_000, 80_000)),
            None,
        );
        assert_eq!(m.pps, vec![40_000.0]);
    }

    #[test]
    fn nothing_delivered_is_unavailable_not_zero() {
        let mut m = Measurement::default();
        m.record(
            Contender::Nftables,
            Direction::OutboundEstablished,
            Ok(sample(0, 0)),
            None,
        );
        assert!(m.unavailable.is_some());
        assert!(m.median_pps().is_none());
    }

    #[test]
    fn a_failed_attach_is_named_as_such_on_one_bounded_line() {
        let e = anyhow::anyhow!(
            "verifier says\nR9 invalid mem access 'scalar'\n{}",
            "x".repeat(1000)
        )
        .context(StartFailed);
        let why = reason(Contender::Nat, &e);
        assert!(why.starts_with("failed to attach: verifier says R9"), "{why}");
        assert!(!why.contains('\n'));
        assert!(why.chars().count() < MAX_REASON_CHARS + 30, "{why}");
        let e = anyhow::anyhow!("nft: no such table").context(StartFailed);
        assert!(reason(Contender::Nftables, &e).starts_with("failed to set up: "));
        assert!(reason(Contender::Kernel, &anyhow::anyhow!("pktgen stuck")).starts_with("failed: "));
    }
}
