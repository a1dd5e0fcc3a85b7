//! `nat-ctl attach`: resolve settings (config file, then flags), attach or adopt, install the
//! configured forwards, sweep timers until a signal, detach (or leave running with --persist).

use std::{io::Write, time::Duration};

use anyhow::{bail, Context, Result};
use nat_common::{config::Timeout, Counter};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    addr_watch::{self, AddrWatch, Follower},
    cli::{AttachArgs, SWEEP_INTERVAL_MS_DEFAULT},
    clock::monotonic_ns,
    config_file::{self, FileConfig},
    events::BindingEvents,
    expiry,
    fastpath::FastPathDevices,
    forwards::{self, Forward},
    iface,
    instance::{ensure_bpffs, Instance, InstanceLock},
    internal_ifaces::{self, InternalIfaces, Resolution},
    loader::{self, AttachPlan, Attached},
    metrics,
    notices::Notifier,
    pinned::PinnedMaps,
    reinject::{self, Reinjector},
    reload::Reloader,
    service_notify,
    settings::Settings,
    stop::StopFlag,
    sysctl, xdp_mode,
};

/// How often parked out-of-order fragments and notices are handled: short next to the time a
/// sender's fragments take to arrive, so reassembly at the receiver is not held up noticeably.
const FRAGMENT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Everything `attach` runs with, once file and flags are merged and validated.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// NAT settings.
    pub settings: Settings,
    /// Forwards to install.
    pub forwards: Vec<config_file::ForwardSpec>,
    /// Sweep interval.
    pub sweep_interval_ms: u64,
    /// Prometheus listen address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Keep running after exit.
    pub persist: bool,
    /// Log binding events.
    pub debug: bool,
}

/// The flags, as the same kind of override record a config file gives.
pub(crate) fn flag_overrides(args: &AttachArgs) -> Result<FileConfig> {
    let mut timeouts = [None; nat_common::config::TIMEOUT_COUNT];
    timeouts[Timeout::Udp as usize] = args.udp_timeout;
    timeouts[Timeout::TcpEstablished as usize] = args.tcp_established_timeout;
    timeouts[Timeout::TcpTransitory as usize] = args.tcp_transitory_timeout;
    timeouts[Timeout::Icmp as usize] = args.icmp_timeout;
    Ok(FileConfig {
        interface: args.iface.clone(),
        mode: args.mode,
        external_addrs: (!args.external_addrs.is_empty()).then(|| args.external_addrs.clone()),
        ports: args.ports,
        internal_ifaces: InternalIfaces::from_flags(&args.internal_ifaces)?,
        max_bindings: args.max_bindings,
        max_bindings_per_host: args.max_bindings_per_host,
        max_sessions_per_host: args.max_sessions_per_host,
        max_sessions_per_binding: args.max_sessions_per_binding,
        sweep_interval_ms: args.sweep_interval_ms,
        metrics: args.metrics,
        persist: args.persist.then_some(true),
        debug: args.debug.then_some(true),
        datapath_log: args.datapath_log.then_some(true),
        xdp_mode: args.xdp_mode,
        unsolicited_syn_icmp: args.unsolicited_syn,
        refusal_icmp: args.refusal_icmp,
        timeouts,
        forwards: Vec::new(),
        port_mapping: args.port_mapping,
    })
}

/// Merges the config file (if any) and the flags; flags win.
pub fn resolve(args: &AttachArgs) -> Result<Resolved> {
    let file = match &args.config {
        Some(path) => config_file::load(path)?,
        None => FileConfig::default(),
    };
    let flags = flag_overrides(args)?;
    let Some(iface) = flags.interface.clone().or_else(|| file.interface.clone()) else {
        bail!("no interface given: name it on the command line or as `interface` in the config file");
    };
    let mut settings = Settings::new(&iface);
    file.apply(&mut settings);
    flags.apply(&mut settings);
    settings.validate()?;
    Ok(Resolved {
        settings,
        forwards: file.forwards,
        sweep_interval_ms: flags
            .sweep_interval_ms
            .or(file.sweep_interval_ms)
            .unwrap_or(SWEEP_INTERVAL_MS_DEFAULT),
        metrics: flags.metrics.or(file.metrics),
        persist: flags.persist.or(file.persist).unwrap_or(false),
        debug: flags.debug.or(file.debug).unwrap_or(false),
    })
}

/// Runs `nat-ctl attach` to completion.
pub fn attach(args: &AttachArgs) -> Result<()> {
    let resolved = resolve(args)?;
    let settings = &resolved.settings;
    iface::index(&settings.iface)?;
    if iface::is_loopback(&settings.iface)? {
        bail!(
            "{} is a loopback interface: the NAT attaches to the external interface (the one facing the remotes)",
            settings.iface
        );
    }
    for internal in settings.internal_ifaces.named() {
        iface::index(internal)?;
    }
    let internal = internal_ifaces::resolve(&settings.iface, &settings.internal_ifaces)?;
    crate::port_mapping::check(settings.port_mapping, &internal.names)?;
    let addrs = if settings.external_addrs.is_empty() {
        match iface::ipv4_addrs(&settings.iface)?.first() {
            Some(primary) => vec![*primary],
            None => bail!(
                "interface {} has no IPv4 address; give one with --external-addr",
                settings.iface
            ),
        }
    } else {
        settings.external_addrs.clone()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // SIGHUP asks for a reload: its default action would end the daemon without detaching, so
    // the handler is in place before anything is attached (a reload asked for meanwhile is
    // answered once the NAT runs).
    let hangup = {
        let _runtime = runtime.enter();
        signal(SignalKind::hangup())?
    };
    // Bound before attaching, so a taken port fails with nothing attached.
    let metrics_listener = match resolved.metrics {
        Some(addr) => Some(runtime.block_on(metrics::bind(addr))?),
        None => None,
    };
    let instance = Instance::here(&settings.iface)?;
    ensure_bpffs()?;
    crate::instance::remove_stale_in_netns(instance.netns);
    let mut lock = InstanceLock::acquire(&instance)?;
    let mut config = settings.to_config(&addrs);
    config.external_ifindex = iface::index(&settings.iface)?;
    if loader::is_persisted(&instance) {
        // The persisted tables were sized at their first attach and cannot be resized live.
        let running = loader::persisted_config(&instance)?;
        // Per-remote bindings made before may live on under a cone mode: keep finding them.
        let per_remote = running.mode().mapping_is_remote_dependent()
            || running.flags & nat_common::config::CONFIG_FLAG_PER_REMOTE_BINDINGS != 0;
        if per_remote && !config.mode().mapping_is_remote_dependent() {
            config.flags |= nat_common::config::CONFIG_FLAG_PER_REMOTE_BINDINGS;
        }
        if running.max_bindings != config.max_bindings {
            tracing::info!(
                "keeping the running table size (--max-bindings {}); detach first to change it",
                running.max_bindings
            );
            config.max_bindings = running.max_bindings;
            settings.set_session_limits(&mut config);
        }
        if let Some(line) = xdp_mode::adoption_notice(settings.xdp_mode, &xdp_mode::load(&instance)) {
            crate::logging::notice(&line);
        }
    } else {
        // Left over by a daemon that was killed: nothing runs it any more (we hold the lock).
        instance.remove_pins()?;
    }

    let plan = AttachPlan {
        internal_ifaces: &internal.names,
        persist: resolved.persist,
        xdp_mode: settings.xdp_mode,
    };
    let mut attached = Attached::attach(&instance, &config, &plan).map_err(|e| {
        // A failure on an interface the user did not name says why it was taken.
        let text = format!("{e:#}");
        if internal.source == internal_ifaces::Source::Auto
            && internal.names.iter().any(|n| text.contains(n.as_str()))
        {
            e.context(format!(
                "attaching to the internal interfaces found automatically ({}); choose them with --internal-iface NAME or turn them off with --internal-iface none",
                internal.names.join(", ")
            ))
        } else {
            e
        }
    })?;
    report_internal(&settings.iface, &internal, &attached);
    // Mistakes that would leave the NAT attached but useless, said once here.
    let forwarding = sysctl::IpForwarding::enable(&instance, resolved.persist)?;
    if let Some(was) = &forwarding.was {
        tracing::info!("enabled net.ipv4.ip_forward (was {was}); it is restored on detach");
    }
    warn_foreign_addrs(&settings.iface, &settings.external_addrs)?;
    let datapath_logger = if settings.datapath_log {
        Some(attached.datapath_logger()?)
    } else {
        None
    };
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    let mut follower = Follower::new(
        &settings.iface,
        config.external_ifindex,
        settings.external_addrs.is_empty(),
    );
    // Before the forwards: adopted state on an address that has left moves or goes first.
    follower.reconcile(&mut maps)?;
    let mut fast_path =
        FastPathDevices::new(fast_path_candidates(&settings.iface, &attached.internal_ifaces)?)?;
    fast_path.refresh(&mut maps)?;
    install_forwards(&mut maps, &config, &resolved.forwards)?;
    record_internal(&instance, &internal, &attached)?;
    lock.write_info(&attached.description)?;

    let addr_list: Vec<String> = config.external_ipv4_addrs().map(|a| a.to_string()).collect();
    // A closed stdout (the reader of a pipe gone) must not stop the NAT: the line is for the
    // reader, so it is written when possible and otherwise dropped.
    let attached_line = format!(
        "attached {} mode={} external={} ports={}-{} xdp={}{}",
        settings.iface,
        settings.mode.name(),
        addr_list.join(","),
        settings.ports.min,
        settings.ports.max,
        xdp_mode::mode_of(&attached.xdp_modes, &settings.iface),
        if attached.adopted {
            " (adopted running state)"
        } else {
            ""
        }
    );
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{attached_line}").and_then(|()| stdout.flush());
    // `Type=notify`: systemd starts the units ordered after this one only now.
    service_notify::send(&service_notify::ready_message(&attached_line));

    let result = runtime.block_on(async {
        if let Some(listener) = metrics_listener {
            tokio::spawn(metrics::serve(listener, instance.pin_dir()));
        }
        if let Some(logger) = datapath_logger {
            // SAFETY: the logger owns its ring buffer's descriptor, open for as long as it lives.
            let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
            let mut logger =
                registered.map_err(|e| anyhow::anyhow!("cannot poll the data path's log: {e}"))?;
            tokio::spawn(async move {
                while let Ok(mut ready) = logger.readable_mut().await {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
            });
        }
        crate::port_mapping::spawn(settings.port_mapping, &attached.internal_ifaces, &instance)?;
        let reinjector = Reinjector::open(&instance.pin_dir())?;
        let notifier = Notifier::open(&instance.pin_dir(), settings.refusal_icmp)?;
        let watch = AddrWatch::open(follower.ifindex())?;
        // Whatever changed before the subscription.
        follower.handle(addr_watch::Event::AddressesChanged, &mut maps)?;
        let reloader = Reloader::new(args, &instance, resolved.clone());
        run_until_signal(
            &mut maps,
            (reinjector, notifier, fast_path),
            (watch, follower),
            (hangup, reloader),
        )
        .await
    });
    crate::reload::forget(&instance);
    let removed = matches!(&result, Err(e) if addr_watch::is_interface_removed(e));
    service_notify::send(&service_notify::stopping_message(
        if resolved.persist && !removed {
            "exiting; the NAT keeps translating"
        } else {
            "detaching"
        },
    ));
    if removed {
        tracing::info!("interface {} was removed; detaching", settings.iface);
    } else if resolved.persist {
        tracing::info!(
            "exiting; the NAT keeps running on {} (nat-ctl detach {0} removes it)",
            settings.iface
        );
    } else {
        tracing::info!("detaching from {}", settings.iface);
    }
    drop(maps);
    drop(attached);
    if removed || !resolved.persist {
        internal_ifaces::forget(&instance);
    }
    if removed && resolved.persist {
        // Nothing is left to persist for: the interface took its programs with it.
        if let Err(e) = loader::remove_persisted(&instance) {
            tracing::warn!("{e:#}");
        }
    }
    drop(lock);
    result
}

/// Says which internal interfaces the NAT took when it chose them itself (one line, before the
/// fast path's lines about them). An adopted instance keeps the ones it runs with: detection
/// found nothing meaningful there (the running programs hold the interfaces), so only a choice
/// the user made that adoption cannot honour is worth a line.
fn report_internal(external: &str, internal: &Resolution, attached: &Attached) {
    if !attached.adopted {
        if let Some(line) = internal_ifaces::notice(external, internal) {
            crate::logging::notice(&line);
        }
    } else if internal.source != internal_ifaces::Source::Auto && attached.internal_ifaces != internal.names {
        let kept = match attached.internal_ifaces.as_slice() {
            [] => "none".to_string(),
            names => names.join(", "),
        };
        tracing::info!(
            "internal interfaces: {kept} (kept from the running instance; detach first to change them)"
        );
    }
}

/// Records how the internal interfaces were chosen, for `status` (an adopted instance keeps
/// the record of the attach that chose them).
fn record_internal(instance: &Instance, internal: &Resolution, attached: &Attached) -> Result<()> {
    let source = if attached.adopted {
        internal_ifaces::load(instance).map_or(internal_ifaces::Source::Named, |(s, _)| s)
    } else {
        internal.source
    };
    internal_ifaces::save(instance, source, &attached.internal_ifaces)
}

/// Warns about each given external address that is not on the interface: legitimate for a
/// pool routed to the gateway, but otherwise nobody answers ARP for it and no reply arrives.
fn warn_foreign_addrs(iface_name: &str, given: &[std::net::Ipv4Addr]) -> Result<()> {
    let present = iface::ipv4_addrs(iface_name)?;
    for addr in given.iter().filter(|a| !present.contains(a)) {
        tracing::warn!(
            "{addr} is not an address of {iface_name}: the gateway will not answer ARP for it unless it is routed here"
        );
    }
    Ok(())
}

/// The devices the fast path may send to: all of the NAT's interfaces, when it has internal
/// ones (the internal-side program is what does outbound fast-path translation).
fn fast_path_candidates(external: &str, internal: &[String]) -> Result<Vec<(String, u32)>> {
    if internal.is_empty() {
        return Ok(Vec::new());
    }
    std::iter::once(external)
        .chain(internal.iter().map(String::as_str))
        .map(|name| Ok((name.to_string(), iface::index(name)?)))
        .collect()
}

/// Installs the config file's forwards; one already in place (adopted state) is kept.
fn install_forwards(
    maps: &mut PinnedMaps,
    config: &nat_common::NatConfig,
    specs: &[config_file::ForwardSpec],
) -> Result<()> {
    let existing = forwards::list(maps);
    for spec in specs {
        let external_addr = forwards::external_addr_for(config, spec.external_addr)?;
        let forward = Forward {
            proto: spec.proto,
            external: std::net::SocketAddrV4::new(external_addr, spec.external_port),
            internal: spec.internal,
        };
        if existing.contains(&forward) {
            continue;
        }
        forwards::add(maps, &forward).context("cannot install a forward from the config file")?;
    }
    Ok(())
}

/// Sweeps expired entries and follows the interface's address until SIGINT or SIGTERM, or
/// until the interface is removed (`addr_watch::InterfaceRemoved`); reloads the config file on
/// SIGHUP.
async fn run_until_signal(
    maps: &mut PinnedMaps,
    (mut reinjector, mut notifier, mut fast_path): (Reinjector, Notifier, FastPathDevices),
    (mut watch, mut follower): (AddrWatch, Follower),
    (mut hangup, mut reloader): (tokio::signal::unix::Signal, Reloader<'_>),
) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    // Seen by the sweep between its chunks: a signal stops a sweep over any table in time.
    let stop = StopFlag::on_signals()?;
    let mut interval_ms = reloader.current().sweep_interval_ms;
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
    let mut fragment_ticker = tokio::time::interval(FRAGMENT_POLL_INTERVAL);
    let mut events = BindingEvents::default();
    let mut published = (0, 0);
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => {
                service_notify::send(&service_notify::reloading_message("reloading the configuration"));
                let outcome = reloader.reload(maps);
                if outcome.ok {
                    tracing::info!("{}", outcome.message);
                } else {
                    tracing::warn!("{}", outcome.message);
                }
                let now = reloader.current();
                notifier.set_refusal(now.settings.refusal_icmp);
                if now.sweep_interval_ms != interval_ms {
                    interval_ms = now.sweep_interval_ms;
                    ticker = tokio::time::interval(Duration::from_millis(interval_ms));
                }
                service_notify::send(&service_notify::ready_message(&outcome.message));
            }
            event = watch.next() => follower.handle(event?, maps)?,
            _ = fragment_ticker.tick() => {
                let now = std::time::Instant::now();
                notifier.poll(now, maps);
                let totals = reinjector.poll(now);
                if totals != published {
                    reinject::publish(&mut maps.counters, Counter::FragmentReinjected, totals.0)?;
                    reinject::publish(&mut maps.counters, Counter::FragmentParkExpired, totals.1)?;
                    published = totals;
                }
            }
            _ = ticker.tick() => {
                let timeouts = &reloader.current().settings.timeouts;
                if let Err(e) = expiry::sweep(maps, monotonic_ns(), timeouts, stop.flag()) {
                    tracing::error!("expiry sweep failed: {e:#}");
                }
                if stop.is_set() {
                    return Ok(());
                }
                fast_path.refresh(maps)?;
                if reloader.current().debug {
                    for event in events.observe(maps.bindings()?) {
                        event.log();
                    }
                }
            }
        }
    }
}
