//! Loading the eBPF object, attaching it to the interfaces, and taking it all down again.
//!
//! `Attached` is the only owner of kernel state: dropping it, on success or half-way through a
//! failed attach, detaches the programs and removes the pins, sysctl changes and any qdisc we
//! added, unless the instance persists (`--persist`). A persisting instance pins its links next
//! to its maps, so the programs keep translating after the daemon exits; the next attach
//! *adopts* them, swapping in freshly loaded programs atomically (`bpf_link_update`) over the
//! same maps, so no binding, session or forward is lost.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use nat_common::{
    maps::{binding_map_capacity, names, session_map_capacity, session_usage_capacity},
    NatConfig,
};

use crate::{
    instance::Instance,
    pinned::PinnedMaps,
    sysctl, tc_filter,
    xdp_mode::{self, XdpModeChoice},
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat.bpf.o"));

/// Name of the XDP (inbound) program in the object.
const INGRESS_PROGRAM: &str = "nat_ingress";
/// Name of the internal-side XDP (hairpinning) program in the object.
const INTERNAL_PROGRAM: &str = "nat_internal";
/// Name of the TC egress (outbound) program in the object.
const EGRESS_PROGRAM: &str = "nat_egress";
/// Name of the internal interfaces' TC egress program, which confirms inbound flows for the
/// fast path once the kernel has forwarded them (attached with TCX only; without it inbound
/// packets keep taking the kernel path).
const LAN_EGRESS_PROGRAM: &str = "nat_lan_egress";
/// First kernel with TCX; older ones need a clsact qdisc (added by us, removed by us).
const TCX_MIN_KERNEL: (u8, u8, u16) = (6, 6, 0);
/// Oldest kernel the programs are verified on (Debian 12's 6.1, in the VM tests); they need
/// `bpf_loop` (5.17) and XDP bpf links (5.9) at least, and nothing older is tested.
const MIN_KERNEL: (u8, u8, u16) = (6, 1, 0);

/// True when the running kernel is `min` or newer (false when its version cannot be read).
fn kernel_at_least(min: (u8, u8, u16)) -> bool {
    KernelVersion::current()
        .map(|v| v >= KernelVersion::new(min.0, min.1, min.2))
        .unwrap_or(false)
}
/// Pin name of the external interface's XDP link.
const INGRESS_LINK_PIN: &str = "link_ingress";
/// Pin name of the external interface's TC egress link.
const EGRESS_LINK_PIN: &str = "link_egress";
/// Pin name prefix of the internal interfaces' XDP links.
const INTERNAL_LINK_PIN_PREFIX: &str = "link_internal_";
/// Said when the fast path runs without its inbound half.
const NO_INBOUND_FAST_PATH: &str = "nat-ctl: inbound packets take the kernel's forwarding path: confirming that the kernel forwarded an inbound flow needs TCX (Linux 6.6+) on the internal interfaces";
/// Pin name prefix of the internal interfaces' TC egress links (not a prefix of the above).
const LAN_EGRESS_LINK_PIN_PREFIX: &str = "link_lan_egress_";
/// Where the verifier's log goes when it rejects a program: too long for a terminal line.
const VERIFIER_LOG: &str = "/tmp/nat-ctl-verifier.log";

/// How to attach.
pub struct AttachPlan<'a> {
    /// Internal interfaces that get the hairpinning program.
    pub internal_ifaces: &'a [String],
    /// Keep running after the daemon exits.
    pub persist: bool,
    /// How the XDP programs attach (an adopted instance keeps the modes it has).
    pub xdp_mode: XdpModeChoice,
}

/// A NAT attached to an interface.
pub struct Attached {
    instance: Instance,
    ebpf: Option<Ebpf>,
    added_clsact: bool,
    sysctls: Vec<sysctl::Changed>,
    persist: bool,
    /// True when this attach took over a persisted instance.
    pub adopted: bool,
    /// Internal interfaces carrying the internal-side program (adopted ones included).
    pub internal_ifaces: Vec<String>,
    /// The mode each XDP program got, external interface first (as recorded, when adopted).
    pub xdp_modes: xdp_mode::Modes,
    /// The netlink egress filter (kernels without TCX) to let go of once a persisting attach
    /// has fully succeeded.
    egress_filter: Option<SchedClassifierLinkId>,
    /// How the programs are attached, for `nat-ctl status`.
    pub description: String,
}

/// Passes the data path's aya-log records (which come as `log` records) into the daemon's log,
/// at their own level, under the target `nat_ctl::datapath` (`RUST_LOG=nat_ctl::datapath=...`).
pub struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        // The data path logs only while `--datapath-log` is on: its lines are shown at info
        // level whatever their own, so asking for them is enough to see them.
        match record.level() {
            log::Level::Error => tracing::error!(target: "nat_ctl::datapath", "data path: {}", record.args()),
            log::Level::Warn => tracing::warn!(target: "nat_ctl::datapath", "data path: {}", record.args()),
            _ => tracing::info!(target: "nat_ctl::datapath", "data path: {}", record.args()),
        }
    }

    fn flush(&self) {}
}

impl Attached {
    /// Starts reading the data path's aya-log records (emitted only while the config says so).
    /// The reader must be flushed whenever its descriptor is readable.
    pub fn datapath_logger(&mut self) -> Result<aya_log::EbpfLogger<StderrLog>> {
        let ebpf = self.ebpf.as_mut().context("programs not loaded")?;
        aya_log::EbpfLogger::init_with_logger(ebpf, StderrLog).context("cannot read the data path's log")
    }
}

/// True if `instance` was left running by `attach --persist`.
pub fn is_persisted(instance: &Instance) -> bool {
    instance.pin_dir().join(INGRESS_LINK_PIN).exists()
}

/// The config of a persisted instance, from its pinned map.
pub fn persisted_config(instance: &Instance) -> Result<NatConfig> {
    let maps = PinnedMaps::open(&instance.pin_dir()).with_context(|| {
        format!(
            "the NAT running on {0} was left by an incompatible nat-ctl (its pinned maps differ); \
             remove it with `nat-ctl detach {0}`, then attach",
            instance.iface
        )
    })?;
    maps.read_config()
}

fn internal_pin(iface: &str) -> String {
    format!("{INTERNAL_LINK_PIN_PREFIX}{iface}")
}

fn lan_egress_pin(iface: &str) -> String {
    format!("{LAN_EGRESS_LINK_PIN_PREFIX}{iface}")
}

/// Attaches the fast-path confirmation program to the TC egress of internal interface `lan`
/// (TCX) and pins its link with the others.
fn attach_lan_egress(ebpf: &mut Ebpf, pin_dir: &Path, lan: &str) -> Result<()> {
    let program: &mut SchedClassifier = tc_program(ebpf, LAN_EGRESS_PROGRAM)?;
    let id = program
        .attach(lan, TcAttachType::Egress)
        .with_context(|| format!("cannot attach the TC egress program to {lan}"))?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    link.pin(pin_dir.join(lan_egress_pin(lan)))
        .with_context(|| format!("cannot pin the TC link of {lan}"))?;
    Ok(())
}

/// Every link pin in a pin directory.
fn link_pins(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| e.path())
        .collect()
}

/// Removes a persisted instance: unpinning its links detaches its programs; then its maps go.
pub fn remove_persisted(instance: &Instance) -> Result<()> {
    for pin in link_pins(&instance.pin_dir()) {
        fs::remove_file(&pin).with_context(|| format!("cannot unpin {}", pin.display()))?;
    }
    tc_filter::remove(instance)?;
    sysctl::restore_saved(instance);
    xdp_mode::forget(instance);
    instance.remove_pins()
}

impl Attached {
    /// Loads the programs with maps pinned in the instance's directory, writes `config`, and
    /// attaches (or adopts) XDP ingress and TC egress on the interface and the hairpinning XDP
    /// program on each internal interface. On error everything done so far is undone (an
    /// adopted instance is left as it was found).
    pub fn attach(instance: &Instance, config: &NatConfig, plan: &AttachPlan) -> Result<Attached> {
        if EBPF_OBJECT.is_empty() {
            bail!("this nat-ctl was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild nat-ctl");
        }
        if !kernel_at_least(MIN_KERNEL) {
            let found = KernelVersion::current().map_or("an unknown version".to_string(), |v| v.to_string());
            bail!(
                "this NAT needs Linux {}.{} or newer; the kernel is {found}",
                MIN_KERNEL.0,
                MIN_KERNEL.1
            );
        }
        let tcx = kernel_at_least(TCX_MIN_KERNEL);
        let pin_dir = instance.pin_dir();
        let adopted = is_persisted(instance);
        fs::create_dir_all(&pin_dir).with_context(|| format!("cannot create {}", pin_dir.display()))?;
        let mut attached = Attached {
            instance: instance.clone(),
            ebpf: None,
            added_clsact: false,
            sysctls: Vec::new(),
            // Until the new programs are in place, a failure must leave an adopted instance
            // alone, and undo everything of a new one (pinned links included).
            persist: adopted,
            adopted,
            internal_ifaces: Vec::new(),
            xdp_modes: Vec::new(),
            egress_filter: None,
            description: String::new(),
        };
        let bindings = binding_map_capacity(config.max_bindings);
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(names::BINDINGS_OUT, bindings)
            .map_max_entries(names::BINDINGS_IN, bindings)
            .map_max_entries(names::SESSIONS, session_map_capacity(config.max_bindings))
            .map_max_entries(
                names::SESSION_USAGE_CREATED,
                session_usage_capacity(config.max_bindings),
            )
            .map_max_entries(
                names::SESSION_USAGE_RELEASED,
                session_usage_capacity(config.max_bindings),
            )
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF programs")?;
        let ebpf = attached.ebpf.insert(ebpf);

        // Config first: the programs see a complete config from their first packet.
        PinnedMaps::open(&pin_dir)?.write_config(config)?;

        let iface = instance.iface.as_str();
        let ingress: &mut Xdp = xdp_program(ebpf, INGRESS_PROGRAM)?;
        ingress.load().map_err(|e| rejected("XDP", e))?;
        let egress_ok = {
            let egress: &mut SchedClassifier = tc_program(ebpf, EGRESS_PROGRAM)?;
            egress.load().map_err(|e| rejected("TC", e))
        };
        egress_ok?;
        let internal_needed = !plan.internal_ifaces.is_empty() || adopted;
        if internal_needed {
            let internal: &mut Xdp = xdp_program(ebpf, INTERNAL_PROGRAM)?;
            internal.load().map_err(|e| rejected("internal XDP", e))?;
            if tcx {
                let lan_egress: &mut SchedClassifier = tc_program(ebpf, LAN_EGRESS_PROGRAM)?;
                lan_egress.load().map_err(|e| rejected("internal TC", e))?;
            }
        }

        if adopted {
            attached.egress_filter = adopt_links(ebpf, instance, tcx)?;
        } else {
            let ingress: &mut Xdp = xdp_program(ebpf, INGRESS_PROGRAM)?;
            let (id, mode) = xdp_mode::attach(ingress, iface, plan.xdp_mode)?;
            attached.xdp_modes.push((iface.to_string(), mode));
            let link: FdLink = ingress.take_link(id)?.try_into()?;
            link.pin(pin_dir.join(INGRESS_LINK_PIN))
                .context("cannot pin the XDP link")?;
            if !tcx {
                // A filter of ours left by a daemon that was killed would translate again
                // with its orphaned maps: remove it first (none found is the usual case).
                let _ = tc::qdisc_detach_program(iface, TcAttachType::Egress, EGRESS_PROGRAM);
                attached.added_clsact = tc::qdisc_add_clsact(iface).is_ok();
            }
            let egress: &mut SchedClassifier = tc_program(ebpf, EGRESS_PROGRAM)?;
            let id = egress
                .attach(iface, TcAttachType::Egress)
                .with_context(|| format!("cannot attach the TC egress program to {iface}"))?;
            if tcx {
                let link: FdLink = egress.take_link(id)?.try_into()?;
                link.pin(pin_dir.join(EGRESS_LINK_PIN))
                    .context("cannot pin the TC link")?;
            } else {
                // Left to the end: a filter let go of cannot be undone by dropping the object.
                attached.egress_filter = Some(id);
            }
            if !plan.internal_ifaces.is_empty() {
                let internal: &mut Xdp = xdp_program(ebpf, INTERNAL_PROGRAM)?;
                for lan in plan.internal_ifaces {
                    let (id, mode) = xdp_mode::attach(internal, lan, plan.xdp_mode)?;
                    attached.xdp_modes.push((lan.clone(), mode));
                    let link: FdLink = internal.take_link(id)?.try_into()?;
                    link.pin(pin_dir.join(internal_pin(lan)))
                        .with_context(|| format!("cannot pin the XDP link of {lan}"))?;
                    // Only once the program that drops spoofed sources runs there.
                    attached.sysctls.push(sysctl::accept_local(lan)?);
                }
                if tcx {
                    for lan in plan.internal_ifaces {
                        attach_lan_egress(ebpf, &pin_dir, lan)?;
                    }
                } else if crate::fastpath::unavailable_reason().is_none() {
                    // Linux 6.3-6.5: a fast path, but no TCX to confirm inbound flows with.
                    crate::logging::notice(NO_INBOUND_FAST_PATH);
                }
            }
            sysctl::save(instance, &attached.sysctls)?;
        }
        if adopted {
            // bpf_link_update swapped the programs; each link kept the mode it had.
            attached.xdp_modes = xdp_mode::load(instance);
        } else {
            xdp_mode::save(instance, &attached.xdp_modes)?;
        }
        let internal: Vec<String> = if adopted {
            attached_internal_ifaces(&pin_dir)
        } else {
            plan.internal_ifaces.to_vec()
        };
        // From here on the new programs run. Their links stay pinned (and a netlink egress
        // filter recorded) while this daemon runs, so a daemon that dies without cleaning up
        // (SIGKILL, a panic, the OOM killer) leaves the NAT translating for the next attach to
        // adopt; only a clean stop of a non-persisting daemon takes it down.
        attached.persist = plan.persist;
        if adopted {
            // Restored by a clean stop, and still recorded for the next adoption.
            attached.sysctls = sysctl::take_saved(instance);
            sysctl::save(instance, &attached.sysctls)?;
        }
        if let Some(id) = attached.egress_filter.take() {
            // A netlink filter outlives this process once we let go of it; its record lets the
            // next attach replace its program and a clean stop or `detach` remove it.
            let added_clsact =
                attached.added_clsact || tc_filter::load(instance).is_some_and(|r| r.added_clsact);
            let egress: &mut SchedClassifier = tc_program(ebpf_of(&mut attached)?, EGRESS_PROGRAM)?;
            let link = egress.take_link(id)?;
            let record = tc_filter::FilterRecord {
                priority: link.priority()?,
                handle: link.handle()?.into(),
                added_clsact,
            };
            tc_filter::save(instance, &record)?;
            std::mem::forget(link);
        }
        let mut description = format!(
            "xdp ingress ({}) + {} egress on {iface}",
            xdp_mode::mode_of(&attached.xdp_modes, iface),
            if tcx { "tcx" } else { "tc clsact" }
        );
        if !internal.is_empty() {
            let lans: Vec<String> = internal
                .iter()
                .map(|lan| format!("{lan} ({})", xdp_mode::mode_of(&attached.xdp_modes, lan)))
                .collect();
            description += &format!("; xdp fast path and hairpinning on {}", lans.join(", "));
        }
        if plan.persist {
            description += "; persistent";
        }
        attached.description = description;
        attached.internal_ifaces = internal;
        Ok(attached)
    }
}

/// The loaded object of an attach in progress.
fn ebpf_of(attached: &mut Attached) -> Result<&mut Ebpf> {
    attached.ebpf.as_mut().context("programs not loaded")
}

/// The XDP program `name` of the loaded object.
fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}

/// The TC program `name` of the loaded object.
fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}

/// Internal interfaces named by the link pins of a persisted instance.
fn attached_internal_ifaces(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = link_pins(dir)
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix(INTERNAL_LINK_PIN_PREFIX)
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// Swaps the freshly loaded programs into the pinned links of a persisted instance (and into
/// its recorded egress filter, on kernels without TCX, whose id is returned). An internal
/// interface without the TC egress link (left by an older nat-ctl) gets one when `tcx`.
fn adopt_links(ebpf: &mut Ebpf, instance: &Instance, tcx: bool) -> Result<Option<SchedClassifierLinkId>> {
    let dir = &instance.pin_dir();
    let iface = instance.iface.as_str();
    let pinned = |name: &str| -> Result<FdLink> {
        let path = dir.join(name);
        Ok(PinnedLink::from_pin(&path)
            .with_context(|| format!("cannot open pinned link {}", path.display()))?
            .into())
    };
    let ingress: &mut Xdp = xdp_program(ebpf, INGRESS_PROGRAM)?;
    ingress
        .attach_to_link(XdpLink::try_from(pinned(INGRESS_LINK_PIN)?)?)
        .context("cannot replace the XDP program")?;
    let egress: &mut SchedClassifier = tc_program(ebpf, EGRESS_PROGRAM)?;
    let egress_filter = match tc_filter::load(instance) {
        Some(record) => Some(
            egress
                .attach_to_link(record.link(iface)?)
                .context("cannot replace the TC filter's program")?,
        ),
        None => {
            egress
                .attach_to_link(SchedClassifierLink::try_from(pinned(EGRESS_LINK_PIN)?)?)
                .context("cannot replace the TC program")?;
            None
        }
    };
    let internal: &mut Xdp = xdp_program(ebpf, INTERNAL_PROGRAM)?;
    let lans = attached_internal_ifaces(dir);
    for lan in &lans {
        internal
            .attach_to_link(XdpLink::try_from(pinned(&internal_pin(lan))?)?)
            .with_context(|| format!("cannot replace the XDP program on {lan}"))?;
    }
    if tcx {
        for lan in &lans {
            if !dir.join(lan_egress_pin(lan)).exists() {
                attach_lan_egress(ebpf, dir, lan)?;
                continue;
            }
            let lan_egress: &mut SchedClassifier = tc_program(ebpf, LAN_EGRESS_PROGRAM)?;
            lan_egress
                .attach_to_link(SchedClassifierLink::try_from(pinned(&lan_egress_pin(lan))?)?)
                .with_context(|| format!("cannot replace the TC program on {lan}"))?;
        }
    }
    Ok(egress_filter)
}

/// A one-line error for a program the kernel refused, with the verifier's log saved to a file.
fn rejected(kind: &str, error: aya::programs::ProgramError) -> anyhow::Error {
    let full = format!("{error:#}");
    let saved = fs::write(VERIFIER_LOG, &full).is_ok();
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
        if self.persist || std::thread::panicking() {
            // Links are pinned: dropping our handles leaves the programs running over the maps.
            // A panic is no clean stop: the next attach adopts what runs.
            drop(self.ebpf.take());
            return;
        }
        // Dropping the loaded object releases our handles; removing the pins below detaches.
        drop(self.ebpf.take());
        let _ = sysctl::take_saved(&self.instance);
        for changed in &self.sysctls {
            changed.restore();
        }
        if let Err(e) = tc_filter::remove(&self.instance) {
            tracing::warn!("{e:#}");
        }
        if self.added_clsact {
            tc_filter::remove_clsact(&self.instance.iface);
        }
        for pin in link_pins(&self.instance.pin_dir()) {
            let _ = fs::remove_file(pin);
        }
        xdp_mode::forget(&self.instance);
        if let Err(e) = self.instance.remove_pins() {
            tracing::warn!("{e:#}");
        }
    }
}
