//! The subcommands on a running NAT's table and state: `mappings`, `delete`, `flush`, `stats`,
//! `status`, `mode`, `forward`. They open the running NAT's pinned maps directly, so they work
//! from any shell in the same network namespace.

use anyhow::{bail, Result};
use nat_common::{config::CONFIG_FLAG_FOLLOWS_IFACE, Mode};

use crate::{
    cli::{
        DeleteArgs, FlushArgs, ForwardAddArgs, ForwardCommand, ForwardDelArgs, MappingsArgs, ModeArgs,
        QueryArgs,
    },
    clock::monotonic_ns,
    forwards::{self, Forward, ForwardRow},
    instance::{read_info, Daemon, Instance},
    pinned::PinnedMaps,
    session_usage,
    settings::Timeouts,
    table, table_delete,
    table_fill::TableFill,
    table_filter::RowFilter,
};

/// Hosts named on the `by host:` line of `status` (most sessions first; `--json` lists all).
const BUSIEST_HOSTS_SHOWN: usize = 5;

fn open(query: &QueryArgs) -> Result<(Instance, PinnedMaps)> {
    let instance = Instance::find(query.iface.as_deref())?;
    let maps = PinnedMaps::open(&instance.pin_dir())?;
    Ok((instance, maps))
}

/// `nat-ctl mappings`.
pub fn mappings(args: &MappingsArgs) -> Result<()> {
    let (instance, maps) = open(&args.query)?;
    let config = maps.read_config()?;
    let mut rows = table::build(
        monotonic_ns(),
        &maps.bindings()?,
        &maps.sessions()?,
        &Timeouts(config.timeouts_secs),
    );
    crate::port_mapping::annotate(&instance, &mut rows, monotonic_ns());
    let filter = args.filter.to_filter();
    rows.retain(|r| filter.matches(r));
    if args.count {
        if args.query.json {
            println!("{}", serde_json::json!({ "count": rows.len() }));
        } else {
            println!("{}", rows.len());
        }
    } else if args.query.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table::render(&rows));
    }
    Ok(())
}

/// `nat-ctl delete`: the bindings that match, with their sessions.
pub fn delete(args: &DeleteArgs) -> Result<()> {
    let filter = args.filter.to_filter();
    if filter.is_empty() {
        bail!("delete needs a filter (--proto, --internal, --external, --remote); `nat-ctl flush` deletes every dynamic binding");
    }
    remove(args.iface.as_deref(), &filter, args.forwards)
}

/// `nat-ctl flush`: every dynamic binding.
pub fn flush(args: &FlushArgs) -> Result<()> {
    remove(args.iface.as_deref(), &RowFilter::default(), args.forwards)
}

fn remove(iface: Option<&str>, filter: &RowFilter, with_forwards: bool) -> Result<()> {
    let instance = Instance::find(iface)?;
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    let config = maps.read_config()?;
    let deleted = table_delete::delete(&mut maps, filter, &Timeouts(config.timeouts_secs), with_forwards)?;
    print!(
        "deleted {} binding(s) with {} session(s)",
        deleted.bindings, deleted.sessions
    );
    if with_forwards {
        print!(" and {} forward(s)", deleted.forwards);
    }
    println!();
    Ok(())
}

/// `nat-ctl stats`.
pub fn stats(query: &QueryArgs) -> Result<()> {
    let (_, maps) = open(query)?;
    let counters = maps.counters()?;
    if query.json {
        let object: serde_json::Map<String, serde_json::Value> = counters
            .iter()
            .map(|(c, v)| (c.name().to_string(), (*v).into()))
            .collect();
        println!("{}", serde_json::to_string_pretty(&object)?);
    } else {
        let width = counters.iter().map(|(c, _)| c.name().len()).max().unwrap_or(0);
        for (counter, value) in counters {
            println!("{:<width$}  {value}", counter.name());
        }
    }
    Ok(())
}

/// `nat-ctl status`.
pub fn status(query: &QueryArgs) -> Result<()> {
    let (instance, maps) = open(query)?;
    let config = maps.read_config()?;
    let (pid, programs) = read_info(&instance).unwrap_or_else(|| ("-".into(), "no daemon running".into()));
    let daemon = Daemon::of(&instance);
    // Whole-map batched reads: one syscall per chunk, not per key, at any table size.
    let fill = TableFill::read(&maps, &config, maps.bindings()?.len(), maps.sessions()?.len());
    let by_host = session_usage::by_host(&maps);
    let (pcp_mappings, natpmp_mappings, upnp_mappings) = crate::port_mapping::count(&maps);
    let limit = |n: u32| match n {
        0 => "no limit".to_string(),
        n => n.to_string(),
    };
    let per_host = match config.max_bindings_per_host {
        0 => "no limit".to_string(),
        n => n.to_string(),
    };
    let addrs: Vec<String> = config.external_ipv4_addrs().map(|a| a.to_string()).collect();
    // Without --external-addr the daemon keeps the address on the interface's (addr_watch).
    let follows = config.flags & CONFIG_FLAG_FOLLOWS_IFACE != 0;
    let mut fast_path: Vec<String> = maps
        .fast_path_ifaces
        .keys()
        .filter_map(|k| k.ok())
        // Index 0 is no interface (a NAT attached by an older nat-ctl kept its on-switch there).
        .filter(|k| *k != 0)
        .map(crate::iface::name)
        .collect();
    fast_path.sort();
    let mode: Mode = config.mode();
    let t = config.timeouts_secs;
    // Recorded at attach: the kernel's link info does not carry the XDP mode.
    let xdp_modes = crate::xdp_mode::load(&instance);
    // Recorded at attach; a NAT attached by an older nat-ctl has no record: its internal
    // interfaces are the XDP programs recorded besides the external one.
    let (internal_source, internal) = match crate::internal_ifaces::load(&instance) {
        Some((source, names)) => (Some(source), names),
        None => (
            None,
            xdp_modes
                .iter()
                .map(|(i, _)| i.clone())
                .filter(|i| *i != instance.iface)
                .collect(),
        ),
    };
    if query.json {
        let value = serde_json::json!({
            "iface": instance.iface,
            "pid": pid,
            "daemon": daemon.name(),
            "mode": mode.name(),
            "external_addrs": addrs,
            "external_follows_iface": follows,
            "ports": format!("{}-{}", config.port_min, config.port_max),
            "timeouts": {"udp": t[0], "tcp_established": t[1], "tcp_transitory": t[2], "icmp": t[3]},
            "programs": programs,
            "internal_ifaces": internal,
            "internal_ifaces_chosen": internal_source.map(|s| s.name()),
            "xdp_modes": xdp_modes
                .iter()
                .map(|(iface, m)| (iface.clone(), serde_json::Value::from(m.name())))
                .collect::<serde_json::Map<_, _>>(),
            "fast_path_towards": fast_path,
            "fast_path_unavailable": crate::fastpath::unavailable_reason(),
            "bindings": fill.binding_entries, "bindings_capacity": fill.binding_capacity,
            "dynamic_bindings": fill.dynamic_bindings, "max_bindings": fill.max_bindings,
            "max_bindings_per_host": config.max_bindings_per_host,
            "sessions": fill.session_entries, "sessions_capacity": fill.session_capacity,
            "sessions_in_use": fill.sessions_in_use,
            "max_sessions_per_host": config.max_sessions_per_host,
            "max_sessions_per_binding": config.max_sessions_per_binding,
            "sessions_by_host": by_host
                .iter()
                .map(|(host, n)| (host.to_string(), serde_json::Value::from(*n)))
                .collect::<serde_json::Map<_, _>>(),
            "port_mappings": {"pcp": pcp_mappings, "nat_pmp": natpmp_mappings, "upnp": upnp_mappings},
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let daemon_line = match &daemon {
            Daemon::Running(pid) => format!("daemon pid {pid}"),
            Daemon::Gone(pid) => format!(
                "no daemon: pid {pid} ended without detaching; the data path keeps translating but \
                 timers are not swept until `nat-ctl attach {}` adopts it",
                instance.iface
            ),
            Daemon::None => "no daemon running".to_string(),
        };
        println!("interface:  {} ({daemon_line})", instance.iface);
        println!("mode:       {}", mode.name());
        let following = match (follows, pid.as_str()) {
            (false, _) => String::new(),
            (true, "-") => format!(" (follows {} while a daemon runs)", instance.iface),
            (true, _) => format!(" (follows {})", instance.iface),
        };
        println!("external:   {}{following}", addrs.join(", "));
        println!(
            "ports:      {}-{} (source ports < 1024 map to 1-1023)",
            config.port_min, config.port_max
        );
        println!(
            "timeouts:   udp {}s, tcp established {}s, tcp transitory {}s, icmp {}s",
            t[0], t[1], t[2], t[3]
        );
        println!("programs:   {programs}");
        println!("internal:   {}", internal_line(&internal, internal_source));
        let modes: Vec<String> = xdp_modes
            .iter()
            .map(|(i, m)| format!("{i} {}", m.name()))
            .collect();
        if modes.is_empty() {
            println!("xdp mode:   unknown (not recorded)");
        } else {
            println!("xdp mode:   {}", modes.join(", "));
        }
        let towards = if fast_path.is_empty() {
            match crate::fastpath::unavailable_reason() {
                Some(reason) => format!("off ({reason})"),
                None => "off".to_string(),
            }
        } else {
            format!("towards {}", fast_path.join(", "))
        };
        println!("fast path:  {towards}");
        if pcp_mappings + natpmp_mappings + upnp_mappings > 0 {
            println!("port maps:  {pcp_mappings} pcp, {natpmp_mappings} nat-pmp, {upnp_mappings} upnp");
        }
        println!(
            "bindings:   {} dynamic / {} allowed ({per_host} per host); {} entries in all",
            fill.dynamic_bindings, fill.max_bindings, fill.binding_entries
        );
        println!(
            "sessions:   {} in use, {} entries / {} ({} per host, {} per binding)",
            fill.sessions_in_use,
            fill.session_entries,
            fill.session_capacity,
            limit(config.max_sessions_per_host),
            limit(config.max_sessions_per_binding)
        );
        if !by_host.is_empty() {
            let busiest: Vec<String> = by_host
                .iter()
                .take(BUSIEST_HOSTS_SHOWN)
                .map(|(host, n)| format!("{host} {n}"))
                .collect();
            println!("by host:    {}", busiest.join(", "));
        }
    }
    Ok(())
}

/// The `internal:` line of `status`: the internal interfaces and how they were chosen.
fn internal_line(names: &[String], source: Option<crate::internal_ifaces::Source>) -> String {
    use crate::internal_ifaces::Source;
    match (names, source) {
        ([], Some(Source::Off)) => "none (--internal-iface none: no hairpinning, no fast path)".to_string(),
        ([], Some(Source::Auto)) => {
            "none found automatically (no hairpinning, no fast path; name them with --internal-iface)"
                .to_string()
        }
        ([], _) => "none (no hairpinning, no fast path)".to_string(),
        (names, Some(Source::Auto)) => format!("{} (found automatically)", names.join(", ")),
        (names, Some(Source::Named)) => format!("{} (named)", names.join(", ")),
        (names, _) => names.join(", "),
    }
}

/// `nat-ctl mode`: switches the filtering and mapping behaviour of a running NAT. Existing
/// bindings and sessions stay; see the README for how each switch treats them.
pub fn mode(args: &ModeArgs) -> Result<()> {
    let instance = Instance::find(args.iface.as_deref())?;
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    let mut config = maps.read_config()?;
    let old = config.mode();
    if old == args.mode {
        anyhow::bail!(
            "{} already runs in {} mode; nothing changed",
            instance.iface,
            old.name()
        );
    }
    crate::reload::switch_mode(&mut config, args.mode);
    maps.write_config(&config)?;
    println!("{}: mode {} -> {}", instance.iface, old.name(), args.mode.name());
    Ok(())
}

/// `nat-ctl reload`: the daemon re-reads its config file; prints what changed, or fails with
/// why nothing did.
pub fn reload(args: &crate::cli::ReloadArgs) -> Result<()> {
    let instance = match args.pid {
        Some(pid) => crate::instance::list_in_netns(crate::instance::current_netns()?)
            .into_iter()
            .find(|i| crate::reload::runs_as(i, pid))
            .ok_or_else(|| anyhow::anyhow!("no NAT daemon with pid {pid} runs in this network namespace"))?,
        None => Instance::find(args.iface.as_deref())?,
    };
    let outcome = crate::reload::request(&instance)?;
    if !outcome.ok {
        bail!("{}: {}", instance.iface, outcome.message);
    }
    println!("{}: {}", instance.iface, outcome.message);
    Ok(())
}

/// `nat-ctl forward ...`.
pub fn forward(command: &ForwardCommand) -> Result<()> {
    match command {
        ForwardCommand::Add(args) => forward_add(args),
        ForwardCommand::Del(args) => forward_del(args),
        ForwardCommand::List(query) => forward_list(query),
    }
}

fn forward_add(args: &ForwardAddArgs) -> Result<()> {
    // Everything is parsed before the NAT is touched.
    let proto = forwards::parse_proto(&args.proto)?;
    let port = forwards::parse_port(&args.external_port)?;
    let internal = forwards::parse_internal(&args.internal)?;
    let instance = Instance::find(args.iface.as_deref())?;
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    let external_addr = forwards::external_addr_for(&maps.read_config()?, args.external_addr)?;
    let forward = Forward {
        proto,
        external: std::net::SocketAddrV4::new(external_addr, port),
        internal,
    };
    forwards::add(&mut maps, &forward)?;
    println!(
        "forwarding {} {} -> {}",
        args.proto, forward.external, forward.internal
    );
    Ok(())
}

fn forward_del(args: &ForwardDelArgs) -> Result<()> {
    let proto = forwards::parse_proto(&args.proto)?;
    let port = forwards::parse_port(&args.external_port)?;
    let instance = Instance::find(args.iface.as_deref())?;
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    let external_addr = forwards::external_addr_for(&maps.read_config()?, args.external_addr)?;
    let removed = forwards::remove(&mut maps, proto, std::net::SocketAddrV4::new(external_addr, port))?;
    println!(
        "removed forward {} {} -> {}",
        args.proto, removed.external, removed.internal
    );
    Ok(())
}

fn forward_list(query: &QueryArgs) -> Result<()> {
    let (_, maps) = open(query)?;
    let rows: Vec<ForwardRow> = forwards::list_operator(&maps)
        .iter()
        .map(ForwardRow::from)
        .collect();
    if query.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("(no forwards)");
    } else {
        for row in rows {
            println!("{:<4} {:<22} -> {}", row.proto, row.external, row.internal);
        }
    }
    Ok(())
}

/// `nat-ctl check --config FILE`: validates without attaching.
pub fn check(args: &crate::cli::CheckArgs) -> Result<()> {
    let file = crate::config_file::load(&args.config)?;
    let mut settings = crate::settings::Settings::new(file.interface.as_deref().unwrap_or("-"));
    file.apply(&mut settings);
    settings
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", args.config.display()))?;
    println!(
        "{}: ok (mode {}, {} forward{})",
        args.config.display(),
        settings.mode.name(),
        file.forwards.len(),
        if file.forwards.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `nat-ctl detach IFACE`: removes a NAT left running by `attach --persist`.
pub fn detach(args: &crate::cli::DetachArgs) -> Result<()> {
    let instance = Instance::here(&args.iface)?;
    if !instance.pin_dir().is_dir() {
        anyhow::bail!("no NAT is attached to {} in this network namespace", args.iface);
    }
    // Holding the lock proves no daemon runs it; a running daemon detaches on SIGTERM itself.
    let _lock = crate::instance::InstanceLock::acquire(&instance)
        .map_err(|e| anyhow::anyhow!("{e:#}; stop that daemon (SIGTERM) instead"))?;
    crate::loader::remove_persisted(&instance)?;
    crate::internal_ifaces::forget(&instance);
    println!("detached {}", args.iface);
    Ok(())
}
