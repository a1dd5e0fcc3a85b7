//! The contenders: what runs on the router while traffic goes through it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use aya::Ebpf;
use vm_tests::nat::PIN_ROOT;
use vm_tests::netns::SETUP_TIMEOUT;
use vm_tests::NatProcess;

use crate::cpu;
use crate::forwarding::Direction;
use crate::objects;
use crate::topology::{Topology, RTR_EXT_IP};

/// Name of the nftables table the masquerade contenders add.
const NFT_TABLE: &str = "bench_nat";
/// The bare XDP forwarder's program in the bench object.
const XDP_FORWARD_PROGRAM: &str = "bench_xdp_forward";

/// One way to get packets through the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Contender {
    /// Plain kernel forwarding, no NAT (and no conntrack).
    Kernel,
    /// nftables masquerade on the external interface (conntrack).
    Nftables,
    /// nftables masquerade plus a software flowtable on both router interfaces: nftables' own
    /// fast path, which forwards a flow's later packets from the ingress hook.
    NftFlowtable,
    /// Our NAT as a user attaches it: `nat-ctl attach IFACE --mode port-restricted`, no other
    /// flag. It finds the internal interface itself, so it hairpins and takes the
    /// fast path wherever the kernel allows, as the explicit contender below.
    Nat,
    /// Our NAT with the internal interface named (`--internal-iface`): the fast path on
    /// purpose.
    NatFastPath,
    /// `bench_xdp_forward` on both router interfaces: route lookup + MAC rewrite + redirect,
    /// no NAT. The limit of any XDP data path on this path.
    XdpForward,
}

impl Contender {
    /// Every contender, in report order.
    pub const ALL: [Contender; 6] = [
        Contender::Kernel,
        Contender::Nftables,
        Contender::NftFlowtable,
        Contender::Nat,
        Contender::NatFastPath,
        Contender::XdpForward,
    ];

    /// The contenders of the VM phase (pktgen on 6.1 under emulation, where every contender
    /// costs minutes): all but the bare XDP forwarder, whose limit matters beside our fast
    /// path, which stays off on 6.1. The flowtable is measured there because Debian's 6.1 has
    /// flowtables (this machine's 6.18 build has none).
    pub const IN_VM: [Contender; 5] = [
        Contender::Kernel,
        Contender::Nftables,
        Contender::NftFlowtable,
        Contender::Nat,
        Contender::NatFastPath,
    ];

    /// True for contenders that translate addresses (replies go to the external endpoint).
    pub fn translates(self) -> bool {
        !matches!(self, Contender::Kernel | Contender::XdpForward)
    }

    /// True when this contender must carry `dir`'s traffic past the kernel's forwarding path
    /// (`ForwDatagrams`): a result where the kernel forwarded more is not counted. A flow's first
    /// packet always takes the kernel path for our fast path and for a flowtable (the forward
    /// chain decides), so a new flow per packet never takes their fast paths; the bare forwarder
    /// keeps no state and takes every packet.
    pub fn bypasses_kernel(self, dir: Direction) -> bool {
        match self {
            Contender::NatFastPath | Contender::NftFlowtable => dir.takes_the_fast_path(),
            Contender::XdpForward => true,
            _ => false,
        }
    }
    /// Short stable name (JSON, plot legend).
    pub fn key(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel",
            Contender::Nftables => "nftables",
            Contender::NftFlowtable => "nftables-flowtable",
            Contender::Nat => "nat",
            Contender::NatFastPath => "nat-fastpath",
            Contender::XdpForward => "xdp-forward",
        }
    }

    /// Human description for the tables.
    pub fn label(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel forwarding (no NAT)",
            Contender::Nftables => "nftables masquerade",
            Contender::NftFlowtable => "nftables masquerade + flowtable",
            Contender::Nat => "our NAT (default attach)",
            Contender::NatFastPath => "our NAT + internal XDP fast path",
            Contender::XdpForward => "bare XDP forwarder (no NAT)",
        }
    }

    /// Sets the contender up on `topo`'s router. `nat_args` are extra `nat-ctl attach` flags.
    pub fn start(self, topo: &Topology, nat_args: &[&str]) -> Result<Running> {
        match self {
            Contender::Kernel => Ok(Running::Nothing),
            Contender::Nftables | Contender::NftFlowtable => {
                let rules = format!(
                    "add table ip {NFT_TABLE}; \
                     add chain ip {NFT_TABLE} post {{ type nat hook postrouting priority srcnat; policy accept; }}; \
                     add rule ip {NFT_TABLE} post oifname \"{}\" masquerade",
                    topo.ext_if
                );
                topo.rtr
                    .run_ok("nft", &[&rules], SETUP_TIMEOUT)
                    .context("cannot add the nftables masquerade rule")?;
                if self == Contender::NftFlowtable {
                    add_flowtable(topo)?;
                }
                Ok(Running::Nftables)
            }
            Contender::XdpForward => {
                let mut ebpf = objects::load_bench()?;
                let prog = objects::xdp(&mut ebpf, XDP_FORWARD_PROGRAM)?;
                // Native XDP on both router interfaces; the links belong to `ebpf` and go with
                // it. A veth redirects a frame into its peer only when the peer runs NAPI: the
                // end hosts' sinks are XDP programs, so both targets qualify.
                for iface in [&topo.int_if, &topo.ext_if] {
                    topo.rtr.enter(|| {
                        prog.attach(iface, XdpMode::Driver)
                            .with_context(|| format!("cannot attach {XDP_FORWARD_PROGRAM} to {iface}"))
                    })?;
                }
                Ok(Running::Xdp {
                    _object: Box::new(ebpf),
                })
            }
            Contender::Nat | Contender::NatFastPath => {
                let ext = RTR_EXT_IP.to_string();
                let mut args = vec!["--mode", "port-restricted", "--external-addr", &ext];
                if self == Contender::NatFastPath {
                    args.extend(["--internal-iface", &topo.int_if]);
                }
                args.extend_from_slice(nat_args);
                let nat = NatProcess::attach_in(&topo.rtr, &topo.ext_if, &args)
                    .with_context(|| format!("cannot start {}", self.label()))?;
                cpu::pin_process(nat.pid(), cpu::HOUSEKEEPING_CPU)?;
                Ok(Running::Nat(Box::new(nat)))
            }
        }
    }
}

/// The flowtable part of `Contender::NftFlowtable`: a software flowtable on both router
/// interfaces (its ingress hook forwards offloaded flows before the kernel's IP layer sees them)
/// and a forward chain that offloads every UDP and TCP flow. The flow expression offloads a flow
/// once conntrack has confirmed it, so from its second packet on, in both directions: the
/// kernel's own documentation (nf_flowtable) writes the rule this way. (`ct state established`
/// in front of it would never offload the benchmark's outbound-only streams: a UDP flow becomes
/// established only when a reply is seen.) Our fast path likewise offloads each direction after
/// the kernel forwarded one of its packets.
///
/// A kernel built without flowtables (`CONFIG_NF_FLOW_TABLE`, as this machine's 6.18 build)
/// refuses the flowtable with ENOENT; the error then says so in one line.
fn add_flowtable(topo: &Topology) -> Result<()> {
    let rules = format!(
        "add flowtable ip {NFT_TABLE} ft {{ hook ingress priority filter; devices = {{ \"{}\", \"{}\" }}; }}; \
         add chain ip {NFT_TABLE} to_flowtable {{ type filter hook forward priority filter; policy accept; }}; \
         add rule ip {NFT_TABLE} to_flowtable meta l4proto {{ tcp, udp }} flow add @ft",
        topo.int_if, topo.ext_if
    );
    let out = topo.rtr.run("nft", &[&rules], SETUP_TIMEOUT)?;
    if out.status.success() {
        return Ok(());
    }
    let why = out
        .stderr
        .lines()
        .find(|l| l.starts_with("Error:"))
        .unwrap_or("nft failed")
        .trim_start_matches("Error: ");
    if why.contains("No such file or directory") {
        bail!(
            "this kernel has no nftables flowtables (nft: {why}; kernel built without CONFIG_NF_FLOW_TABLE?)"
        );
    }
    bail!("cannot add the nftables flowtable: {why}");
}

/// A contender set up on a router; the NAT process is stopped on drop (the nftables rule goes
/// with the namespace).
pub enum Running {
    /// Kernel forwarding: nothing to run.
    Nothing,
    /// The masquerade rule (and the flowtable, if any) is in place.
    Nftables,
    /// The bare XDP forwarder is attached: its links belong to the loaded object, so dropping
    /// it detaches them.
    Xdp {
        /// The loaded bench object, held only for its links.
        _object: Box<Ebpf>,
    },
    /// `nat-ctl attach` is running.
    Nat(Box<NatProcess>),
}

impl Running {
    /// The NAT process, if this is our NAT.
    pub fn nat(&self) -> Option<&NatProcess> {
        match self {
            Running::Nat(n) => Some(n),
            _ => None,
        }
    }

    /// Stops the NAT (if any) and requires a clean exit.
    pub fn stop(self) -> Result<()> {
        match self {
            Running::Nat(n) => n.stop(),
            _ => Ok(()),
        }
    }
}

/// Keeps our NAT's controller process stopped (SIGSTOP) while it lives; SIGCONT on drop. The
/// data path runs in the kernel and does not need the controller for a while; pausing it keeps
/// its expiry sweep (a walk over every binding, up to a million) off a machine being measured.
pub struct Paused {
    pid: libc::pid_t,
}

impl Paused {
    /// Stops `running`'s controller, if it has one.
    pub fn pause(running: &Running) -> Result<Option<Paused>> {
        let Some(nat) = running.nat() else {
            return Ok(None);
        };
        let pid = nat.pid() as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own running child (NatProcess owns and reaps it).
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot pause nat-ctl");
        }
        Ok(Some(Paused { pid }))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as in `pause`; the child is not reaped while stopped.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

/// The pin directory of the NAT attached to `iface` (`<netns inode>-<iface>` under PIN_ROOT).
pub fn pin_dir(iface: &str) -> Result<PathBuf> {
    let suffix = format!("-{iface}");
    let found: Vec<PathBuf> = std::fs::read_dir(PIN_ROOT)
        .with_context(|| format!("cannot read {PIN_ROOT}"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no pin directory for {iface} under {PIN_ROOT}"),
        _ => bail!("several pin directories for {iface} under {PIN_ROOT}: {found:?}"),
    }
}
