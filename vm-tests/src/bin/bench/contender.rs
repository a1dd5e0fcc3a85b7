//! The contenders: what runs on the router while traffic goes through it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use vm_tests::nat::PIN_ROOT;
use vm_tests::netns::SETUP_TIMEOUT;
use vm_tests::NatProcess;

use crate::cpu;
use crate::topology::{Topology, RTR_EXT_IP};

/// Name of the nftables table the masquerade contender adds.
const NFT_TABLE: &str = "bench_nat";

/// One way to get packets through the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Contender {
    /// Plain kernel forwarding, no NAT (and no conntrack).
    Kernel,
    /// nftables masquerade on the external interface (conntrack).
    Nftables,
    /// Our NAT, port-restricted, XDP ingress + TC egress on the external interface.
    Nat,
    /// Our NAT with the internal-side XDP fast path (`--internal-iface`).
    NatFastPath,
}

impl Contender {
    /// Every contender, in report order.
    pub const ALL: [Contender; 4] = [
        Contender::Kernel,
        Contender::Nftables,
        Contender::Nat,
        Contender::NatFastPath,
    ];

    /// Short stable name (JSON, plot legend).
    pub fn key(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel",
            Contender::Nftables => "nftables",
            Contender::Nat => "nat",
            Contender::NatFastPath => "nat-fastpath",
        }
    }

    /// Human description for the tables.
    pub fn label(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel forwarding (no NAT)",
            Contender::Nftables => "nftables masquerade",
            Contender::Nat => "our NAT (port-restricted)",
            Contender::NatFastPath => "our NAT + internal XDP fast path",
        }
    }

    /// Sets the contender up on `topo`'s router. `nat_args` are extra `nat-ctl attach` flags.
    pub fn start(self, topo: &Topology, nat_args: &[&str]) -> Result<Running> {
        match self {
            Contender::Kernel => Ok(Running::Nothing),
            Contender::Nftables => {
                let rules = format!(
                    "add table ip {NFT_TABLE}; \
                     add chain ip {NFT_TABLE} post {{ type nat hook postrouting priority srcnat; policy accept; }}; \
                     add rule ip {NFT_TABLE} post oifname \"{}\" masquerade",
                    topo.ext_if
                );
                topo.rtr
                    .run_ok("nft", &[&rules], SETUP_TIMEOUT)
                    .context("cannot add the nftables masquerade rule")?;
                Ok(Running::Nftables)
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

/// A contender set up on a router; the NAT process is stopped on drop (the nftables rule goes
/// with the namespace).
pub enum Running {
    /// Kernel forwarding: nothing to run.
    Nothing,
    /// The masquerade rule is in place.
    Nftables,
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
