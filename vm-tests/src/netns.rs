//! Named network namespaces that are removed when dropped, and ways to run things inside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::proc::{self, Output};

/// Every namespace this crate creates starts with this.
pub const NS_PREFIX: &str = "vt-";
/// Time limit for setup commands (`ip`, `sysctl`, `ethtool`).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Names unique to one lab: namespace names `vt-<tag>-<pid>-<n>-<role>` and a short id
/// `<pid hex>x<n hex>` (at most 11 characters) for interface names, which the kernel limits to
/// 15 characters and which must be unique because the NAT names its bpffs pin directory after
/// the interface.
#[derive(Clone, Debug)]
pub struct Names {
    ns_stem: String,
    short: String,
}

impl Names {
    /// New unique names for a lab tagged `tag` (a few lowercase letters naming the test).
    pub fn new(tag: &str) -> Names {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        Names {
            ns_stem: format!("{NS_PREFIX}{tag}-{pid}-{n}"),
            short: format!("{pid:x}x{n:x}"),
        }
    }

    /// Namespace name for `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.ns_stem)
    }

    /// Interface name: `prefix` (1-3 characters) followed by the short id.
    pub fn iface(&self, prefix: &str) -> String {
        let name = format!("{prefix}{}", self.short);
        assert!(name.len() <= 15, "interface name {name} too long");
        name
    }
}

/// A network namespace created by this process; `ip netns del` on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, brings `lo` up and turns IPv6 off (keeps captures quiet).
    pub fn create(name: &str) -> Result<Netns> {
        if name.len() > 200 || name.contains('/') {
            bail!("bad namespace name {name}");
        }
        proc::run_ok(
            "ip netns add",
            proc::command("ip", &["netns", "add", name]),
            SETUP_TIMEOUT,
        )?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip netns exec <name> prog args...` (third-party tools).
    pub fn cmd<S: AsRef<std::ffi::OsStr>>(&self, prog: &str, args: &[S]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]).args(args);
        c
    }

    /// `nsenter --net=/var/run/netns/<name> -- prog args...`: enters only the network
    /// namespace, so the process sees the host's bpffs (needed for nat-ctl and bpftool).
    pub fn nsenter<S: AsRef<std::ffi::OsStr>>(&self, prog: &str, args: &[S]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(prog)
            .args(args);
        c
    }

    /// `ip -n <name> args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        proc::run_ok(
            &format!("ip {}", args.join(" ")),
            proc::command("ip", &full),
            SETUP_TIMEOUT,
        )
    }

    /// `ip -n <name> args...`, returning its stdout (which must succeed).
    pub fn ip_out(&self, args: &[&str]) -> Result<String> {
        Ok(self.ip(args)?.stdout)
    }

    /// Runs a tool inside the namespace (`ip netns exec`) with a time limit; any exit status.
    pub fn run(&self, prog: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        proc::run(
            &format!("{prog} {}", args.join(" ")),
            self.cmd(prog, args),
            timeout,
        )
    }

    /// Like [`Netns::run`] but the tool must exit 0.
    pub fn run_ok(&self, prog: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        proc::run_ok(
            &format!("{prog} {} in {}", args.join(" "), self.name),
            self.cmd(prog, args),
            timeout,
        )
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run_ok("sysctl", &["-q", "-w", &format!("{key}={value}")], SETUP_TIMEOUT)?;
        Ok(())
    }

    /// `ethtool -K dev tx off`: make the kernel write full checksums, so an XDP program on the
    /// other end of a veth sees complete checksums rather than a partial one.
    pub fn tx_csum_off(&self, dev: &str) -> Result<()> {
        self.run_ok("ethtool", &["-K", dev, "tx", "off"], SETUP_TIMEOUT)?;
        Ok(())
    }

    /// Creates a veth pair: `own_if` in this namespace, `peer_if` in `peer`. `queues` sets
    /// both ends' transmit and receive queue counts (a veth hands a frame sent from CPU `c` to
    /// its peer's queue `c % queues`); `None` keeps the kernel's default.
    pub fn add_veth(&self, own_if: &str, peer: &Netns, peer_if: &str, queues: Option<u32>) -> Result<()> {
        let queues = queues.map(|q| q.to_string());
        let queue_args: Vec<&str> = match &queues {
            Some(q) => vec!["numtxqueues", q, "numrxqueues", q],
            None => Vec::new(),
        };
        let mut args = vec!["link", "add", own_if];
        args.extend(&queue_args);
        args.extend(["netns", self.name(), "type", "veth", "peer", "name", peer_if]);
        args.extend(&queue_args);
        args.extend(["netns", peer.name()]);
        proc::run_ok("ip link add veth", proc::command("ip", &args), SETUP_TIMEOUT)?;
        Ok(())
    }

    /// Gives `dev` its addresses, makes it write full checksums ([`Netns::tx_csum_off`]) and
    /// brings it up.
    pub fn if_up(&self, dev: &str, addrs: &[&str]) -> Result<()> {
        for addr in addrs {
            self.ip(&["addr", "add", addr, "dev", dev])?;
        }
        self.tx_csum_off(dev)?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Runs `f` on a thread that has joined this network namespace, so sockets it opens live
    /// in the namespace (and stay there after the thread ends). Panics in `f` propagate.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = self.path();
        thread::scope(|s| {
            let h = s.spawn(move || -> Result<T> {
                let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                // SAFETY: setns(2) on a valid fd; affects only this (scoped, short-lived) thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(anyhow!(std::io::Error::last_os_error())).context("setns");
                }
                f()
            });
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = proc::run(
            "ip netns del",
            proc::command("ip", &["netns", "del", &self.name]),
            SETUP_TIMEOUT,
        );
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("warning: ip netns del {}: {}", self.name, o.stderr.trim()),
            Err(e) => eprintln!("warning: ip netns del {}: {e:#}", self.name),
        }
    }
}

/// Removes namespaces left by earlier runs of these tests that were killed before they could
/// clean up: only names of the form `vt-<tag>-<pid>-...` whose pid no longer exists. Runs once
/// per process.
pub fn remove_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(remove_stale_now);
}

fn remove_stale_now() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        if parts.len() != 4 {
            continue;
        }
        let Ok(pid) = parts[1].parse::<u32>() else {
            continue;
        };
        if parts[2].parse::<u32>().is_err() || pid == std::process::id() {
            continue;
        }
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            eprintln!("removing stale namespace {name} (pid {pid} is gone)");
            drop(Netns { name });
        }
    }
}
