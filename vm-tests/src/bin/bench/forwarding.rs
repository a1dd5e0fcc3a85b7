//! Forwarding throughput: the same generator and topology for every contender, alternated
//! within one run, in three directions. Each (round, contender) gets a freshly built topology,
//! so no contender inherits another's conntrack or NAT state, and the contender order rotates
//! every round so slow drifts of the machine hit every contender alike.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::contender::{Contender, Running};
use crate::frame::{udp_frame, FRAME_LEN};
use crate::generator::{Budget, Flows, GenRun, Generator, Vary};
use crate::sink::Sink;
use crate::stats::median;
use crate::topology::{is_build_failure, Topology, DST_IP, HOST_IF, RTR_EXT_IP, SRC_IP};

/// Established flows: this many source ports of `SRC_IP`, from `EST_PORT_BASE` on.
pub const EST_FLOWS: u32 = 16;
/// First source port of the established flows (kept clear of the new-flow ports).
pub const EST_PORT_BASE: u16 = 60_000;
/// The remote's port (all flows go to `DST_IP:REMOTE_PORT`).
pub const REMOTE_PORT: u16 = 4_000;
/// Source of the new flows: a second internal host, so its bindings never collide with the
/// established ones.
pub const NEW_FLOW_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// First source port of the new flows (the first unprivileged port).
pub const NEW_FLOW_PORT_BASE: u16 = 1_024;
/// Packets sent before an established-flow measurement, to create the bindings / conntrack
/// entries (and to warm caches).
const WARMUP_PACKETS: u64 = 10_000;
/// Time for frames still queued downstream to reach the sink after the generator stops.
const SETTLE: Duration = Duration::from_millis(30);
/// Extra `nat-ctl attach` flags of the comparison: no per-host session limit, and the table
/// size conntrack has on this kind of machine. The new-flow burst comes from one internal host
/// and exceeds the default limit (a quarter of the session table: 30 720 with a RAM-derived
/// table of 57 344 here), which would drop the rest of the burst; nftables masquerade has no
/// such limit, and the burst measures the data path's speed at creating flows, not a fairness
/// policy. nftables' conntrack holds up to `nf_conntrack_max` (262 144 with 24 GiB of RAM), so
/// our table gets as much instead of the idle-memory default capped at 57 344, which the
/// 50 000-flow burst would nearly fill.
pub const NAT_ARGS: [&str; 4] = ["--max-sessions-per-host", "0", "--max-bindings", "262144"];
/// A run of a contender with a fast path (ours, the flowtable, the bare XDP forwarder) counts as
/// "not on the fast path" when the kernel forwarded more than this share of the delivered
/// packets.
pub const FAST_PATH_MAX_KERNEL_SHARE: f64 = 0.1;

/// Which traffic a measurement sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// Internal -> remote over already-bound flows.
    OutboundEstablished,
    /// Remote -> external endpoints of live bindings (replies).
    Inbound,
    /// Internal -> remote, every packet a new flow (new binding / conntrack entry).
    OutboundNew,
}

impl Direction {
    /// Every direction, in report order.
    pub const ALL: [Direction; 3] = [
        Direction::OutboundEstablished,
        Direction::Inbound,
        Direction::OutboundNew,
    ];

    /// True when the fast-path contender must carry this traffic past the kernel. The first
    /// packet of every flow goes through the kernel's forwarding path (its forward chain decides,
    /// as for an nftables flowtable), so a new flow per packet never takes the fast path.
    pub fn takes_the_fast_path(self) -> bool {
        self != Direction::OutboundNew
    }

    /// Short stable name.
    pub fn key(self) -> &'static str {
        match self {
            Direction::OutboundEstablished => "out-established",
            Direction::Inbound => "in-established",
            Direction::OutboundNew => "out-new",
        }
    }

    /// Human description.
    pub fn label(self) -> &'static str {
        match self {
            Direction::OutboundEstablished => "outbound, established flows",
            Direction::Inbound => "inbound replies",
            Direction::OutboundNew => "outbound, new flow per packet",
        }
    }
}

/// Run lengths.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Generator time per established-flow point.
    pub point: Duration,
    /// Rounds (each contender measured once per direction per round).
    pub rounds: usize,
    /// New flows per new-flow point (one packet each; a multiple of the generator's batch).
    pub new_flows: u32,
}

/// The samples of one (contender, direction).
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    /// Delivered packets per second, one per round.
    pub pps: Vec<f64>,
    /// Share of delivered packets the router's kernel forwarded (0 = all on an XDP path).
    pub kernel_share: Vec<f64>,
    /// Why there is no number, if there is none.
    pub unavailable: Option<String>,
}

impl Measurement {
    /// Records one point, or why it does not count: it failed, delivered nothing, or (for a
    /// contender with a fast path) the kernel forwarded more than its share. `nat_says` is what
    /// the NAT said about its fast path, quoted in that last case.
    pub fn record(
        &mut self,
        contender: Contender,
        dir: Direction,
        point: Result<impl Delivered>,
        nat_says: Option<&str>,
    ) {
        if self.unavailable.is_some() {
            return;
        }
        let point = match point {
            Ok(point) => point,
            Err(e) => {
                self.unavailable = Some(format!("{e:#}"));
                return;
            }
        };
        if point.delivered() == 0 {
            self.unavailable = Some(format!(
                "no packets delivered ({} sent, {} forwarded by the kernel)",
                point.sent(),
                point.forwarded()
            ));
            return;
        }
        if contender.bypasses_kernel(dir) && point.kernel_share() > FAST_PATH_MAX_KERNEL_SHARE {
            let mut why = format!(
                "not on the fast path: the kernel forwarded {} of {} delivered packets ({:.0}%)",
                point.forwarded(),
                point.delivered(),
                point.kernel_share() * 100.0
            );
            if let Some(said) = nat_says {
                why.push_str(&format!(" (`{said}`)"));
            }
            self.unavailable = Some(why);
            return;
        }
        self.pps.push(point.pps());
        self.kernel_share.push(point.kernel_share());
    }

    /// Median pps, if measured.
    pub fn median_pps(&self) -> Option<f64> {
        if self.unavailable.is_some() {
            return None;
        }
        median(&self.pps)
    }
}

/// Everything the forwarding benchmark measured.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// Per contender and direction.
    pub points: BTreeMap<(Contender, Direction), Measurement>,
    /// The generator's own ceiling: frames dropped by a sink on the router's first interface.
    pub ceiling_pps: Vec<f64>,
}

/// One packet stream: which template, flows and end of the topology.
struct Stream {
    frame: [u8; FRAME_LEN],
    flows: Flows,
    from_src: bool,
}

impl Stream {
    fn outbound_established(topo: &Topology) -> Stream {
        Stream {
            frame: udp_frame(
                topo.src_mac,
                topo.int_mac,
                SocketAddrV4::new(SRC_IP, EST_PORT_BASE),
                SocketAddrV4::new(DST_IP, REMOTE_PORT),
            ),
            flows: Flows {
                count: EST_FLOWS,
                ports_per_addr: EST_FLOWS,
                vary: Vary::Source,
            },
            from_src: true,
        }
    }

    /// Replies to the established flows: to the external endpoint (the internal one itself
    /// when there is no NAT).
    fn inbound(topo: &Topology, contender: Contender) -> Stream {
        let to = if contender.translates() {
            RTR_EXT_IP
        } else {
            SRC_IP
        };
        Stream {
            frame: udp_frame(
                topo.dst_mac,
                topo.ext_mac,
                SocketAddrV4::new(DST_IP, REMOTE_PORT),
                SocketAddrV4::new(to, EST_PORT_BASE),
            ),
            flows: Flows {
                count: EST_FLOWS,
                ports_per_addr: EST_FLOWS,
                vary: Vary::Destination,
            },
            from_src: false,
        }
    }

    fn outbound_new(topo: &Topology, count: u32) -> Stream {
        Stream {
            frame: udp_frame(
                topo.src_mac,
                topo.int_mac,
                SocketAddrV4::new(NEW_FLOW_HOST, NEW_FLOW_PORT_BASE),
                SocketAddrV4::new(DST_IP, REMOTE_PORT),
            ),
            flows: Flows {
                count,
                ports_per_addr: count,
                vary: Vary::Source,
            },
            from_src: true,
        }
    }
}

/// What one measured stream delivered.
pub struct Delivery {
    /// Generator run.
    pub run: GenRun,
    /// Packets counted by the far sink.
    pub delivered: u64,
    /// Packets the router's kernel forwarded meanwhile.
    pub forwarded: u64,
}

impl Delivered for Delivery {
    fn sent(&self) -> u64 {
        self.run.sent
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// Delivered packets per second of generator time.
    fn pps(&self) -> f64 {
        self.run.rate(self.delivered)
    }
}

/// What one measured point delivered, whichever generator sent it (this host's, or pktgen in
/// the VM).
pub trait Delivered {
    /// Packets the generator sent.
    fn sent(&self) -> u64;
    /// Packets counted by the far sink.
    fn delivered(&self) -> u64;
    /// Packets the router's kernel forwarded meanwhile.
    fn forwarded(&self) -> u64;
    /// Delivered packets per second of generator time.
    fn pps(&self) -> f64;

    /// Share of delivered packets that went through the kernel's forwarding path.
    fn kernel_share(&self) -> f64 {
        if self.delivered() == 0 {
            return 0.0;
        }
        (self.forwarded() as f64 / self.delivered() as f64).min(1.0)
    }
}

fn send(
    gen: &mut Generator,
    topo: &Topology,
    stream: &Stream,
    budget: Budget,
    sink: &Sink,
) -> Result<Delivery> {
    let (ns, iface) = if stream.from_src {
        (&topo.src, HOST_IF)
    } else {
        (&topo.dst, HOST_IF)
    };
    gen.configure(&stream.frame, stream.flows)?;
    let before = sink.count()?;
    let fwd_before = topo.forwarded()?;
    let run = gen.run(ns, iface, &stream.frame, budget)?;
    std::thread::sleep(SETTLE);
    let delivered = sink.count()? - before;
    let forwarded = topo.forwarded()? - fwd_before;
    Ok(Delivery {
        run,
        delivered,
        forwarded,
    })
}

/// Warms up the established flows (bindings, conntrack entries), then measures them
/// outbound for `point`.
pub fn outbound_established(gen: &mut Generator, topo: &Topology, point: Duration) -> Result<Delivery> {
    let stream = Stream::outbound_established(topo);
    send(
        gen,
        topo,
        &stream,
        Budget::Packets(WARMUP_PACKETS),
        &topo.dst_sink,
    )?;
    send(gen, topo, &stream, Budget::Time(point), &topo.dst_sink)
}

/// Replies to the established flows for `point`.
pub fn inbound(
    gen: &mut Generator,
    topo: &Topology,
    contender: Contender,
    point: Duration,
) -> Result<Delivery> {
    send(
        gen,
        topo,
        &Stream::inbound(topo, contender),
        Budget::Time(point),
        &topo.src_sink,
    )
}

/// `count` new flows, one packet each.
pub fn outbound_new(gen: &mut Generator, topo: &Topology, count: u32) -> Result<Delivery> {
    send(
        gen,
        topo,
        &Stream::outbound_new(topo, count),
        Budget::Packets(count as u64),
        &topo.dst_sink,
    )
}

/// Checks that our NAT kept the established flows' ports, which the inbound stream assumes
/// (it addresses `RTR_EXT_IP:EST_PORT_BASE + i`).
pub fn check_preserved_ports(running: &Running) -> Result<()> {
    let Some(nat) = running.nat() else {
        return Ok(());
    };
    let mappings = nat.mappings()?;
    for i in 0..EST_FLOWS as u16 {
        let port = EST_PORT_BASE + i;
        let found = mappings
            .iter()
            .find(|m| *m.internal.ip() == SRC_IP && m.internal.port() == port)
            .with_context(|| format!("no binding for {SRC_IP}:{port} after the warm-up"))?;
        if found.external.port() != port || *found.external.ip() != RTR_EXT_IP {
            bail!(
                "binding {SRC_IP}:{port} got external endpoint {}, not {RTR_EXT_IP}:{port}",
                found.external
            );
        }
    }
    Ok(())
}

/// Measures one contender in a fresh topology: established out, inbound, new flows out (last,
/// since it fills the tables). With `ceiling`, also the generator's ceiling at the end.
fn round(
    gen: &mut Generator,
    contender: Contender,
    settings: &Settings,
    results: &mut Results,
    ceiling: bool,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let topo = Topology::build()?;
    let running = contender.start(&topo, &NAT_ARGS)?;
    let est = outbound_established(gen, &topo, settings.point);
    let inb = check_preserved_ports(&running).and_then(|_| inbound(gen, &topo, contender, settings.point));
    let new = outbound_new(gen, &topo, settings.new_flows);
    for (dir, d) in [
        (Direction::OutboundEstablished, est),
        (Direction::Inbound, inb),
        (Direction::OutboundNew, new),
    ] {
        match &d {
            Ok(d) => log(&format!(
                "  {:<34} {:<30} {:>10.0} pps ({} of {} delivered, kernel-forwarded {:.0}%)",
                contender.label(),
                dir.label(),
                d.pps(),
                d.delivered,
                d.run.sent,
                d.kernel_share() * 100.0
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
            .record(contender, dir, d, None);
    }
    if ceiling {
        // Frames dropped on arrival at the router: what the generator and veth alone can do.
        let sink = Sink::attach(&topo.rtr, &topo.int_if)?;
        let stream = Stream::outbound_established(&topo);
        let d = send(gen, &topo, &stream, Budget::Time(settings.point), &sink)?;
        log(&format!("  {:<34} {:>41.0} pps", "generator ceiling", d.pps()));
        results.ceiling_pps.push(d.pps());
    }
    running.stop()?;
    Ok(())
}

/// Runs every round. Errors that concern one contender are recorded as "unavailable" for it;
/// errors building the topology stop the benchmark.
pub fn run(gen: &mut Generator, settings: &Settings, log: &mut dyn FnMut(&str)) -> Result<Results> {
    let mut results = Results::default();
    let n = Contender::ALL.len();
    for r in 0..settings.rounds {
        log(&format!("forwarding round {}/{}", r + 1, settings.rounds));
        for i in 0..n {
            let contender = Contender::ALL[(r + i) % n];
            if let Err(e) = round(
                gen,
                contender,
                settings,
                &mut results,
                contender == Contender::Kernel,
                log,
            ) {
                if is_build_failure(&e) {
                    return Err(e);
                }
                log(&format!("  {}: {e:#}", contender.label()));
                for dir in Direction::ALL {
                    let m = results.points.entry((contender, dir)).or_default();
                    if m.unavailable.is_none() {
                        m.unavailable = Some(format!("{e:#}"));
                    }
                }
            }
        }
    }
    Ok(results)
}
