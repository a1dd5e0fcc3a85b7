//! Changing a running NAT's configuration in place, without detaching: the mode switch of
//! `nat-ctl mode`, and the reload of the config file (SIGHUP to the daemon, or `nat-ctl
//! reload`, which is what the systemd unit's `ExecReload=` runs).
//!
//! A reload re-reads the file (flags given to `attach` still override it) and validates all of
//! it before touching anything. What the programs read from the config map on every packet
//! (mode, port range for new flows, limits, the unsolicited-SYN and refusal flags), what the
//! daemon itself uses (timeouts for the sweep, the sweep interval, binding logs, the kind of
//! refusal ICMP) and the file's forwards change in place; bindings and sessions are not
//! touched, so established flows keep their external ports. What was fixed when the programs
//! were loaded and attached (interfaces, external addresses, table size, XDP mode, data-path
//! logging, port mapping, the metrics listener, persist) cannot change in place: a reload that
//! would change any of it is refused whole and names it, as a file that fails to parse or
//! validate is, so the running NAT always follows exactly one version of the file.
//!
//! A signal carries no answer, so the daemon records the outcome of each reload in the run
//! directory (a sequence number, ok or refused, the message), and `nat-ctl reload` waits for a
//! record newer than the one it saw before signalling.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nat_common::{
    config::{Timeout, CONFIG_FLAG_PER_REMOTE_BINDINGS, CONFIG_FLAG_REFUSAL_ICMP, CONFIG_FLAG_SYN_ICMP},
    Mode, NatConfig,
};

use crate::{
    cli::AttachArgs,
    config_file::{self, FileConfig, ForwardSpec},
    daemon::{self, Resolved},
    forwards::{self, Forward},
    instance::{Daemon, Instance},
    pinned::PinnedMaps,
    settings::RefusalIcmp,
};

/// Name of the state file (`Instance::state_file`) holding the outcome of the last reload.
const RECORD_KIND: &str = "reload";
/// How long `nat-ctl reload` waits for the daemon's answer: a reload reads one file and writes
/// a few map entries, so this bounds a daemon that is stuck, not one that is slow.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `nat-ctl reload` looks for the answer.
const ANSWER_POLL: Duration = Duration::from_millis(20);

/// Switches `config` to `mode`. Per-remote bindings made under symmetric mode live on under a
/// cone mode until they expire, and the data path must keep finding them (README, "Switching
/// modes at run time").
pub fn switch_mode(config: &mut NatConfig, mode: Mode) {
    if config.mode().mapping_is_remote_dependent() && !mode.mapping_is_remote_dependent() {
        config.flags |= CONFIG_FLAG_PER_REMOTE_BINDINGS;
    }
    config.mode = mode as u8;
}

/// The config keys of timeouts, by `Timeout` kind.
const TIMEOUT_KEYS: [(Timeout, &str); 4] = [
    (Timeout::Udp, "timeouts.udp"),
    (Timeout::TcpEstablished, "timeouts.tcp_established"),
    (Timeout::TcpTransitory, "timeouts.tcp_transitory"),
    (Timeout::Icmp, "timeouts.icmp"),
];

/// The settings of `new` that differ from `old` but cannot change while the NAT runs, by
/// config key with the old and new value.
pub fn fixed_changes(old: &Resolved, new: &Resolved) -> Vec<String> {
    let (o, n) = (&old.settings, &new.settings);
    let mut fixed = Vec::new();
    let mut differs = |key: &str, old: String, new: String| {
        if old != new {
            fixed.push(format!("{key} ({old} -> {new})"));
        }
    };
    differs("interface", o.iface.clone(), n.iface.clone());
    let addrs = |a: &[std::net::Ipv4Addr]| match a {
        [] => "the interface's".to_string(),
        a => a.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
    };
    differs(
        "external_addrs",
        addrs(&o.external_addrs),
        addrs(&n.external_addrs),
    );
    differs(
        "internal_ifaces",
        format!("{:?}", o.internal_ifaces),
        format!("{:?}", n.internal_ifaces),
    );
    differs(
        "max_bindings",
        o.max_bindings.to_string(),
        n.max_bindings.to_string(),
    );
    differs("xdp_mode", o.xdp_mode.name().into(), n.xdp_mode.name().into());
    differs(
        "datapath_log",
        o.datapath_log.to_string(),
        n.datapath_log.to_string(),
    );
    differs(
        "port_mapping",
        format!("{:?}", o.port_mapping),
        format!("{:?}", n.port_mapping),
    );
    let metrics = |m: Option<std::net::SocketAddr>| m.map_or("off".to_string(), |a| a.to_string());
    differs("metrics", metrics(old.metrics), metrics(new.metrics));
    differs("persist", old.persist.to_string(), new.persist.to_string());
    fixed
}

/// The reloadable keys that `attach`'s flags set to something else than the file does: the
/// flag wins on reload as at attach, so an edit of such a key in the file changes nothing, and
/// the reload says so.
pub fn overridden(file: &FileConfig, flags: &FileConfig) -> Vec<&'static str> {
    fn wins<T: PartialEq>(flag: &Option<T>, file: &Option<T>) -> bool {
        flag.is_some() && file.is_some() && flag != file
    }
    let mut keys = Vec::new();
    for (key, differs) in [
        ("mode", wins(&flags.mode, &file.mode)),
        ("ports", wins(&flags.ports, &file.ports)),
        (
            "max_bindings_per_host",
            wins(&flags.max_bindings_per_host, &file.max_bindings_per_host),
        ),
        (
            "max_sessions_per_host",
            wins(&flags.max_sessions_per_host, &file.max_sessions_per_host),
        ),
        (
            "max_sessions_per_binding",
            wins(&flags.max_sessions_per_binding, &file.max_sessions_per_binding),
        ),
        (
            "unsolicited_syn",
            wins(&flags.unsolicited_syn_icmp, &file.unsolicited_syn_icmp),
        ),
        ("refusal_icmp", wins(&flags.refusal_icmp, &file.refusal_icmp)),
        (
            "sweep_interval_ms",
            wins(&flags.sweep_interval_ms, &file.sweep_interval_ms),
        ),
        ("debug", wins(&flags.debug, &file.debug)),
    ] {
        if differs {
            keys.push(key);
        }
    }
    for (kind, key) in TIMEOUT_KEYS {
        if wins(&flags.timeouts[kind as usize], &file.timeouts[kind as usize]) {
            keys.push(key);
        }
    }
    keys
}

/// What a reload writes: the new config record and the forwards to take away and to install.
#[derive(Debug)]
pub struct Plan {
    /// The running config record with the new reloadable values.
    pub config: NatConfig,
    /// What changes, one `key old -> new` each (forwards are reported by `apply`).
    pub changes: Vec<String>,
    /// The old file's forwards that the new one no longer has.
    pub remove: Vec<ForwardSpec>,
    /// Every forward of the new file (those already in place are kept as they are).
    pub add: Vec<ForwardSpec>,
}

/// Plans the reload from `old` (what the daemon runs with) to `new` over the `running` config
/// record (which `nat-ctl mode` and the address follower may have changed since); refused
/// whole when something in `new` cannot change in place.
pub fn plan(old: &Resolved, new: &Resolved, running: &NatConfig) -> Result<Plan> {
    let fixed = fixed_changes(old, new);
    if !fixed.is_empty() {
        bail!(
            "{} cannot change while the NAT runs (restart nat-ctl to apply {})",
            fixed.join(", "),
            if fixed.len() == 1 { "it" } else { "them" }
        );
    }
    let s = &new.settings;
    let mut config = *running;
    let mut changes = Vec::new();
    let mut note = |key: &str, old: String, new: String| {
        if old != new {
            changes.push(format!("{key} {old} -> {new}"));
        }
    };
    note("mode", running.mode().name().into(), s.mode.name().into());
    switch_mode(&mut config, s.mode);
    note(
        "ports",
        format!("{}-{}", running.port_min, running.port_max),
        format!("{}-{}", s.ports.min, s.ports.max),
    );
    config.port_min = s.ports.min;
    config.port_max = s.ports.max;
    for (kind, key) in TIMEOUT_KEYS {
        note(
            key,
            running.timeouts_secs[kind as usize].to_string(),
            s.timeouts.get(kind).to_string(),
        );
    }
    config.timeouts_secs = s.timeouts.0;
    config.max_bindings_per_host = s.max_bindings_per_host;
    // The session defaults are shares of the running table, which a reload cannot resize.
    s.set_session_limits(&mut config);
    for (key, old, new) in [
        (
            "max_bindings_per_host",
            running.max_bindings_per_host,
            config.max_bindings_per_host,
        ),
        (
            "max_sessions_per_host",
            running.max_sessions_per_host,
            config.max_sessions_per_host,
        ),
        (
            "max_sessions_per_binding",
            running.max_sessions_per_binding,
            config.max_sessions_per_binding,
        ),
    ] {
        note(key, old.to_string(), new.to_string());
    }
    let syn = |icmp: bool| if icmp { "icmp" } else { "drop" }.to_string();
    note(
        "unsolicited_syn",
        syn(running.flags & CONFIG_FLAG_SYN_ICMP != 0),
        syn(s.unsolicited_syn_icmp),
    );
    set_flag(&mut config, CONFIG_FLAG_SYN_ICMP, s.unsolicited_syn_icmp);
    note(
        "refusal_icmp",
        refusal_name(old.settings.refusal_icmp),
        refusal_name(s.refusal_icmp),
    );
    set_flag(
        &mut config,
        CONFIG_FLAG_REFUSAL_ICMP,
        s.refusal_icmp != RefusalIcmp::Off,
    );
    note(
        "sweep_interval_ms",
        old.sweep_interval_ms.to_string(),
        new.sweep_interval_ms.to_string(),
    );
    note("debug", old.debug.to_string(), new.debug.to_string());
    let remove = old
        .forwards
        .iter()
        .filter(|f| !new.forwards.contains(f))
        .cloned()
        .collect();
    Ok(Plan {
        config,
        changes,
        remove,
        add: new.forwards.clone(),
    })
}

fn set_flag(config: &mut NatConfig, flag: u8, on: bool) {
    if on {
        config.flags |= flag;
    } else {
        config.flags &= !flag;
    }
}

fn refusal_name(kind: RefusalIcmp) -> String {
    format!("{kind:?}").to_lowercase()
}

/// A forward of the file, on the external address it resolves to in `config`.
fn resolve_forward(config: &NatConfig, spec: &ForwardSpec) -> Result<Forward> {
    let addr = forwards::external_addr_for(config, spec.external_addr)?;
    Ok(Forward {
        proto: spec.proto,
        external: SocketAddrV4::new(addr, spec.external_port),
        internal: spec.internal,
    })
}

fn describe(f: &Forward) -> String {
    format!(
        "{} {} -> {}",
        nat_common::proto::name(f.proto),
        f.external,
        f.internal
    )
}

/// Applies `plan`: forwards first (the old file's forwards that went away are removed, the new
/// file's that are missing installed), then the config record in one write. A forward that
/// cannot be installed (its port held by a live flow, say) undoes the forward changes made so
/// far and fails before the config is written, so a failed reload changes nothing. Returns the
/// forward changes, one line each.
pub fn apply(maps: &mut PinnedMaps, plan: &Plan) -> Result<Vec<String>> {
    let adding: Vec<Forward> = plan
        .add
        .iter()
        .map(|spec| {
            resolve_forward(&plan.config, spec)
                .with_context(|| format!("forward of port {} to {}", spec.external_port, spec.internal))
        })
        .collect::<Result<_>>()?;
    // An old forward whose address no longer resolves is not there to remove.
    let removing: Vec<Forward> = plan
        .remove
        .iter()
        .filter_map(|spec| resolve_forward(&plan.config, spec).ok())
        .collect();
    let existing = forwards::list(maps);
    let mut removed = Vec::new();
    for f in removing.into_iter().filter(|f| existing.contains(f)) {
        forwards::remove(maps, f.proto, f.external)?;
        removed.push(f);
    }
    let mut added: Vec<Forward> = Vec::new();
    for f in adding {
        if existing.contains(&f) && !removed.contains(&f) {
            continue;
        }
        if let Err(e) = forwards::add(maps, &f) {
            for a in &added {
                let _ = forwards::remove(maps, a.proto, a.external);
            }
            for r in &removed {
                let _ = forwards::add(maps, r);
            }
            return Err(e.context(format!("cannot install the forward {}", describe(&f))));
        }
        added.push(f);
    }
    maps.write_config(&plan.config)?;
    let mut changes: Vec<String> = removed
        .iter()
        .filter(|r| !added.contains(r))
        .map(|f| format!("forward removed: {}", describe(f)))
        .collect();
    changes.extend(
        added
            .iter()
            .filter(|a| !removed.contains(a))
            .map(|f| format!("forward added: {}", describe(f))),
    );
    Ok(changes)
}

/// The outcome of one reload, as the daemon records it for `nat-ctl reload`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Counts the daemon's reloads from 1.
    pub seq: u64,
    /// Whether the new configuration runs.
    pub ok: bool,
    /// What changed, or why nothing did (one line).
    pub message: String,
}

impl Outcome {
    fn to_text(&self) -> String {
        let status = if self.ok { "ok" } else { "refused" };
        format!("{}\n{status}\n{}\n", self.seq, self.message.replace('\n', " "))
    }

    fn from_text(text: &str) -> Option<Outcome> {
        let mut lines = text.lines();
        let seq = lines.next()?.parse().ok()?;
        let ok = match lines.next()? {
            "ok" => true,
            "refused" => false,
            _ => return None,
        };
        Some(Outcome {
            seq,
            ok,
            message: lines.next()?.to_string(),
        })
    }
}

/// The last reload's outcome recorded for `instance`.
pub fn read_record(instance: &Instance) -> Option<Outcome> {
    Outcome::from_text(&std::fs::read_to_string(instance.state_file(RECORD_KIND)).ok()?)
}

/// Records `outcome`, replaced whole (written aside, then renamed) so a reader never sees half.
pub fn write_record(instance: &Instance, outcome: &Outcome) -> Result<()> {
    let path = instance.state_file(RECORD_KIND);
    let aside = path.with_extension("reload.new");
    std::fs::write(&aside, outcome.to_text()).with_context(|| format!("cannot write {}", aside.display()))?;
    std::fs::rename(&aside, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the record (a daemon starts counting at 1; an old record would confuse the wait).
pub fn forget(instance: &Instance) {
    let _ = std::fs::remove_file(instance.state_file(RECORD_KIND));
}

/// The daemon's side of reloads: what it runs with, and how many reloads it answered.
pub struct Reloader<'a> {
    args: &'a AttachArgs,
    instance: Instance,
    current: Resolved,
    seq: u64,
}

impl<'a> Reloader<'a> {
    /// A reloader for a daemon started with `args` that runs with `current`.
    pub fn new(args: &'a AttachArgs, instance: &Instance, current: Resolved) -> Self {
        forget(instance);
        Reloader {
            args,
            instance: instance.clone(),
            current,
            seq: 0,
        }
    }

    /// What the daemon runs with now.
    pub fn current(&self) -> &Resolved {
        &self.current
    }

    /// Re-reads the config file and applies it, or nothing; records and returns the outcome.
    pub fn reload(&mut self, maps: &mut PinnedMaps) -> Outcome {
        self.seq += 1;
        let path = self
            .args
            .config
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        let outcome = match self.try_reload(maps) {
            Ok((changes, overridden)) => {
                let mut message = match changes.as_slice() {
                    [] => format!("reloaded {path}: nothing changed"),
                    changes => format!("reloaded {path}: {}", changes.join(", ")),
                };
                if !overridden.is_empty() {
                    message += &format!(
                        "; attach's command line overrides the file's {}",
                        overridden.join(", ")
                    );
                }
                (true, message)
            }
            Err(e) => (false, format!("reload refused, nothing changed: {e:#}")),
        };
        let outcome = Outcome {
            seq: self.seq,
            ok: outcome.0,
            message: outcome.1,
        };
        if let Err(e) = write_record(&self.instance, &outcome) {
            tracing::warn!("{e:#}");
        }
        outcome
    }

    /// The changes made, and the keys the command line overrides.
    fn try_reload(&mut self, maps: &mut PinnedMaps) -> Result<(Vec<String>, Vec<&'static str>)> {
        let Some(path) = &self.args.config else {
            bail!("nat-ctl attach was started without --config, so there is no file to re-read");
        };
        let new = daemon::resolve(self.args)?;
        let overridden = overridden(&config_file::load(path)?, &daemon::flag_overrides(self.args)?);
        let plan = plan(&self.current, &new, &maps.read_config()?)?;
        let mut changes = plan.changes.clone();
        changes.extend(apply(maps, &plan)?);
        self.current = new;
        Ok((changes, overridden))
    }
}

/// `nat-ctl reload`: signals the daemon of `instance` and waits (bounded) for its answer.
pub fn request(instance: &Instance) -> Result<Outcome> {
    let pid = match Daemon::of(instance) {
        Daemon::Running(pid) => pid,
        Daemon::Gone(pid) => bail!(
            "no daemon runs the NAT on {0} (pid {pid} ended); `nat-ctl attach` adopts it with the configuration of its file",
            instance.iface
        ),
        Daemon::None => bail!(
            "no daemon runs the NAT on {0}; `nat-ctl attach` adopts it with the configuration of its file",
            instance.iface
        ),
    };
    let pid: libc::pid_t = pid.parse().context("the lock file names no pid")?;
    let before = read_record(instance).map_or(0, |o| o.seq);
    // SAFETY: kill(2) with a pid read from the daemon's lock file and checked to be nat-ctl.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot signal the daemon (pid {pid}): {e}");
    }
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(outcome) = read_record(instance).filter(|o| o.seq > before) {
            return Ok(outcome);
        }
        std::thread::sleep(ANSWER_POLL);
    }
    bail!(
        "the daemon (pid {pid}) did not answer within {} s; its log says what happened",
        ANSWER_TIMEOUT.as_secs()
    )
}

/// Whether the daemon of `instance` has pid `pid` (for `nat-ctl reload --pid`, which is what
/// the systemd unit knows: `$MAINPID`).
pub fn runs_as(instance: &Instance, pid: u32) -> bool {
    crate::instance::read_info(instance).is_some_and(|(p, _)| p == pid.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use nat_common::proto;

    use super::*;
    use crate::settings::Settings;

    fn resolved(edit: impl FnOnce(&mut Resolved)) -> Resolved {
        let mut settings = Settings::new("wan0");
        settings.max_bindings = 4096;
        let mut r = Resolved {
            settings,
            forwards: vec![ForwardSpec {
                proto: proto::TCP,
                external_port: 8080,
                internal: "10.0.0.2:80".parse().unwrap(),
                external_addr: None,
            }],
            sweep_interval_ms: 1000,
            metrics: None,
            persist: false,
            debug: false,
        };
        edit(&mut r);
        r
    }

    fn running(r: &Resolved) -> NatConfig {
        r.settings.to_config(&[Ipv4Addr::new(198, 51, 100, 254)])
    }

    #[test]
    fn reloadable_settings_are_written_into_the_running_record() {
        let old = resolved(|_| {});
        let new = resolved(|r| {
            r.settings.mode = Mode::Symmetric;
            r.settings.ports.min = 20000;
            r.settings.timeouts.set(Timeout::Udp, Some(30));
            r.settings.max_bindings_per_host = 7;
            r.settings.unsolicited_syn_icmp = true;
            r.forwards.clear();
        });
        let mut before = running(&old);
        // The follower moved the address meanwhile: a reload keeps what it found.
        before.external_addrs[0] = u32::from(Ipv4Addr::new(198, 51, 100, 9)).to_be();
        let planned = plan(&old, &new, &before).unwrap();
        let c = planned.config;
        assert_eq!(c.mode(), Mode::Symmetric);
        assert_eq!((c.port_min, c.timeouts_secs[Timeout::Udp as usize]), (20000, 30));
        assert_eq!(c.max_bindings_per_host, 7);
        assert_ne!(c.flags & CONFIG_FLAG_SYN_ICMP, 0);
        assert_eq!(c.external_addrs, before.external_addrs);
        assert_eq!(c.max_bindings, before.max_bindings);
        for key in [
            "mode port-restricted -> symmetric",
            "ports 1024-65535 -> 20000-65535",
            "timeouts.udp 300 -> 30",
            "max_bindings_per_host 0 -> 7",
            "unsolicited_syn drop -> icmp",
        ] {
            assert!(
                planned.changes.iter().any(|c| c == key),
                "{key} in {:?}",
                planned.changes
            );
        }
        assert_eq!(planned.remove, old.forwards);
        assert!(planned.add.is_empty());
        assert!(
            plan(&old, &old, &running(&old)).unwrap().changes.is_empty(),
            "the same file changes nothing"
        );
    }

    #[test]
    fn what_was_fixed_at_attach_is_named_and_refused() {
        let old = resolved(|_| {});
        let new = resolved(|r| {
            r.settings.mode = Mode::FullCone;
            r.settings.iface = "wan1".into();
            r.settings.max_bindings = 9000;
            r.persist = true;
        });
        let e = format!("{:#}", plan(&old, &new, &running(&old)).unwrap_err());
        for named in [
            "interface (wan0 -> wan1)",
            "max_bindings (4096 -> 9000)",
            "persist (false -> true)",
        ] {
            assert!(e.contains(named), "{named} in {e}");
        }
        assert!(!e.contains("mode"), "{e}");
    }

    #[test]
    fn leaving_symmetric_keeps_finding_per_remote_bindings() {
        let mut config = NatConfig::empty();
        config.mode = Mode::Symmetric as u8;
        switch_mode(&mut config, Mode::FullCone);
        assert_eq!(config.mode(), Mode::FullCone);
        assert_ne!(config.flags & CONFIG_FLAG_PER_REMOTE_BINDINGS, 0);
        let mut config = NatConfig::empty();
        switch_mode(&mut config, Mode::Symmetric);
        assert_eq!(config.flags & CONFIG_FLAG_PER_REMOTE_BINDINGS, 0);
    }

    #[test]
    fn a_flag_that_overrides_a_changed_key_is_named() {
        let file = FileConfig {
            mode: Some(Mode::FullCone),
            ports: Some(nat_common::alloc::PortRange { min: 2000, max: 3000 }),
            ..Default::default()
        };
        let mut flags = FileConfig {
            mode: Some(Mode::Symmetric),
            ..Default::default()
        };
        flags.timeouts[Timeout::Udp as usize] = Some(30);
        assert_eq!(
            overridden(&file, &flags),
            ["mode"],
            "only keys both set, to different values"
        );
        flags.mode = Some(Mode::FullCone);
        assert!(overridden(&file, &flags).is_empty());
    }

    #[test]
    fn outcome_records_round_trip() {
        let o = Outcome {
            seq: 3,
            ok: false,
            message: "reload refused\nsecond line".into(),
        };
        let back = Outcome::from_text(&o.to_text()).unwrap();
        assert_eq!((back.seq, back.ok), (3, false));
        assert_eq!(back.message, "reload refused second line");
        assert_eq!(Outcome::from_text("x\nok\n"), None);
    }
}
