//! `nat-ctl attach`: validate, attach, sweep timers until a signal, detach.

use std::io::Write;

use anyhow::{bail, Result};
use nat_common::config::Timeout;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::AttachArgs,
    clock::monotonic_ns,
    commands::external_addrs,
    expiry, iface,
    instance::{ensure_bpffs, Instance, InstanceLock},
    loader::Attached,
    pinned::PinnedMaps,
    settings::{Settings, Timeouts},
};

/// Turns the flags into validated settings.
pub fn settings_from_args(args: &AttachArgs) -> Result<Settings> {
    let mut settings = Settings::new(&args.iface);
    settings.mode = args.mode;
    settings.external_addrs = args.external_addrs.clone();
    if let Some(ports) = args.ports {
        settings.ports = ports;
    }
    settings.timeouts.set(Timeout::Udp, args.udp_timeout);
    settings
        .timeouts
        .set(Timeout::TcpEstablished, args.tcp_established_timeout);
    settings
        .timeouts
        .set(Timeout::TcpTransitory, args.tcp_transitory_timeout);
    settings.timeouts.set(Timeout::Icmp, args.icmp_timeout);
    settings.internal_ifaces = args.internal_ifaces.clone();
    if let Some(n) = args.max_bindings {
        settings.max_bindings = n;
    }
    if let Some(n) = args.max_bindings_per_host {
        settings.max_bindings_per_host = n;
    }
    settings.validate()?;
    Ok(settings)
}

/// Runs `nat-ctl attach` to completion.
pub fn attach(args: &AttachArgs) -> Result<()> {
    let settings = settings_from_args(args)?;
    iface::index(&settings.iface)?;
    for internal in &settings.internal_ifaces {
        iface::index(internal)?;
    }
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
    let instance = Instance::here(&settings.iface)?;
    ensure_bpffs()?;
    let mut lock = InstanceLock::acquire(&instance)?;
    // Left over by a daemon that was killed: nothing runs it any more (we hold the lock).
    instance.remove_pins()?;

    let config = settings.to_config(&addrs);
    let attached = Attached::attach(&instance, &config, &settings.internal_ifaces)?;
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    lock.write_info(&attached.description)?;

    let addr_list: Vec<String> = external_addrs(&config).iter().map(|a| a.to_string()).collect();
    println!(
        "attached {} mode={} external={} ports={}-{}",
        settings.iface,
        settings.mode.name(),
        addr_list.join(","),
        settings.ports.min,
        settings.ports.max
    );
    std::io::stdout().flush()?;

    let result = run_until_signal(&mut maps, &settings.timeouts, args.sweep_interval_ms);
    eprintln!("nat-ctl: detaching from {}", settings.iface);
    drop(maps);
    drop(attached);
    drop(lock);
    result
}

/// Sweeps expired entries every `interval_ms` until SIGINT or SIGTERM.
fn run_until_signal(maps: &mut PinnedMaps, timeouts: &Timeouts, interval_ms: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(interval_ms));
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                _ = ticker.tick() => {
                    if let Err(e) = expiry::sweep(maps, monotonic_ns(), timeouts) {
                        eprintln!("nat-ctl: expiry sweep failed: {e:#}");
                    }
                }
            }
        }
    })
}
