//! Loading the eBPF object, attaching it to the external interface, and taking it all down
//! again. `Attached` is the only owner of kernel state: dropping it, on success or half-way
//! through a failed attach, detaches the programs and removes the pins and any qdisc we added.

use std::process::Command;

use anyhow::{bail, Context, Result};
use aya::{
    programs::{tc, SchedClassifier, TcAttachType, Xdp, XdpMode},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use nat_common::{
    maps::{binding_map_capacity, names, session_map_capacity},
    NatConfig,
};

use crate::{instance::Instance, pinned::PinnedMaps, sysctl};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat.bpf.o"));

/// Name of the XDP (inbound) program in the object.
const INGRESS_PROGRAM: &str = "nat_ingress";
/// Name of the internal-side XDP (hairpinning) program in the object.
const INTERNAL_PROGRAM: &str = "nat_internal";
/// Name of the TC egress (outbound) program in the object.
const EGRESS_PROGRAM: &str = "nat_egress";
/// First kernel with TCX; older ones need a clsact qdisc (added by us, removed by us).
const TCX_MIN_KERNEL: (u8, u8, u16) = (6, 6, 0);

/// A NAT attached to an interface.
pub struct Attached {
    instance: Instance,
    ebpf: Option<Ebpf>,
    added_clsact: bool,
    sysctls: Vec<sysctl::Changed>,
    /// How the programs are attached, for `nat-ctl status`.
    pub description: String,
}

impl Attached {
    /// Loads the programs with maps pinned in the instance's directory, writes `config`, and
    /// attaches XDP ingress and TC egress to the interface, and the hairpinning XDP program to
    /// each internal interface. On error everything done so far is undone.
    pub fn attach(instance: &Instance, config: &NatConfig, internal_ifaces: &[String]) -> Result<Attached> {
        if EBPF_OBJECT.is_empty() {
            bail!("this nat-ctl was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild nat-ctl");
        }
        let pin_dir = instance.pin_dir();
        std::fs::create_dir_all(&pin_dir).with_context(|| format!("cannot create {}", pin_dir.display()))?;
        let mut attached = Attached {
            instance: instance.clone(),
            ebpf: None,
            added_clsact: false,
            sysctls: Vec::new(),
            description: String::new(),
        };
        let bindings = binding_map_capacity(config.max_bindings);
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(names::BINDINGS_OUT, bindings)
            .map_max_entries(names::BINDINGS_IN, bindings)
            .map_max_entries(names::SESSIONS, session_map_capacity(config.max_bindings))
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF programs")?;
        let ebpf = attached.ebpf.insert(ebpf);

        // Config first: the programs see a complete config from their first packet.
        PinnedMaps::open(&pin_dir)?.write_config(config)?;

        let iface = instance.iface.as_str();
        let ingress: &mut Xdp = ebpf
            .program_mut(INGRESS_PROGRAM)
            .context("XDP program missing")?
            .try_into()?;
        ingress.load().map_err(|e| rejected("XDP", e))?;
        ingress
            .attach(iface, XdpMode::default())
            .with_context(|| format!("cannot attach XDP to {iface}"))?;

        let tcx = KernelVersion::current()
            .map(|v| v >= KernelVersion::new(TCX_MIN_KERNEL.0, TCX_MIN_KERNEL.1, TCX_MIN_KERNEL.2))
            .unwrap_or(false);
        if !tcx {
            attached.added_clsact = tc::qdisc_add_clsact(iface).is_ok();
        }
        let ebpf = attached.ebpf.as_mut().expect("loaded above");
        let egress: &mut SchedClassifier = ebpf
            .program_mut(EGRESS_PROGRAM)
            .context("TC program missing")?
            .try_into()?;
        egress.load().map_err(|e| rejected("TC", e))?;
        egress
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("cannot attach the TC egress program to {iface}"))?;
        let mut description = format!(
            "xdp ingress + {} egress on {iface}",
            if tcx { "tcx" } else { "tc clsact" }
        );
        if !internal_ifaces.is_empty() {
            let internal: &mut Xdp = ebpf
                .program_mut(INTERNAL_PROGRAM)
                .context("internal XDP program missing")?
                .try_into()?;
            internal.load().map_err(|e| rejected("internal XDP", e))?;
            for lan in internal_ifaces {
                let changed = sysctl::accept_local(lan)?;
                attached.sysctls.push(changed);
                internal
                    .attach(lan, XdpMode::default())
                    .with_context(|| format!("cannot attach XDP to {lan}"))?;
            }
            description += &format!("; xdp hairpinning on {}", internal_ifaces.join(", "));
        }
        attached.description = description;
        Ok(attached)
    }
}

/// Where the verifier's log goes when it rejects a program: too long for a terminal line.
const VERIFIER_LOG: &str = "/tmp/nat-ctl-verifier.log";

/// A one-line error for a program the kernel refused, with the verifier's log saved to a file.
fn rejected(kind: &str, error: aya::programs::ProgramError) -> anyhow::Error {
    let full = format!("{error:#}");
    let saved = std::fs::write(VERIFIER_LOG, &full).is_ok();
    let reason = full
        .lines()
        .rev()
        .find(|l| {
            !l.trim().is_empty()
                && !l.starts_with("verification time")
                && !l.starts_with("processed")
                && !l.starts_with("stack depth")
        })
        .unwrap_or("unknown reason")
        .trim()
        .trim_end_matches(": Permission denied (os error 13)");
    if saved {
        anyhow::anyhow!("the kernel rejected the {kind} program ({reason}); verifier log in {VERIFIER_LOG}")
    } else {
        anyhow::anyhow!("the kernel rejected the {kind} program ({reason})")
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Dropping the loaded object detaches the links and unloads the programs.
        drop(self.ebpf.take());
        for changed in &self.sysctls {
            changed.restore();
        }
        if self.added_clsact {
            let _ = Command::new("tc")
                .args(["qdisc", "del", "dev", &self.instance.iface, "clsact"])
                .status();
        }
        if let Err(e) = self.instance.remove_pins() {
            eprintln!("nat-ctl: warning: {e:#}");
        }
    }
}
