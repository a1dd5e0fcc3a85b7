//! One NAT instance = one external interface in one network namespace. This module owns where
//! its state lives: the bpffs pin directory (maps, readable by any `nat-ctl` in the same
//! namespace) and the lock file that says a daemon is running for it.
//!
//! Pin directories are named `<netns inode>-<interface>`, so two NATs in two network namespaces
//! never collide, even when both interfaces are called `eth0`.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use nat_common::maps::names;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Parent of every instance's pin directory.
pub const PIN_ROOT: &str = "/sys/fs/bpf/nat-gw";
/// Parent of every instance's lock file.
pub const RUN_DIR: &str = "/run/nat-ctl";

/// Identifies a NAT instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// External interface name.
    pub iface: String,
    /// Inode of the network namespace the interface lives in.
    pub netns: u64,
}

impl Instance {
    /// The instance for `iface` in the caller's network namespace.
    pub fn here(iface: &str) -> Result<Self> {
        Ok(Instance {
            iface: iface.to_string(),
            netns: current_netns()?,
        })
    }

    /// Directory name shared by the pin directory and the lock file.
    fn tag(&self) -> String {
        format!("{}-{}", self.netns, self.iface)
    }

    /// The bpffs directory holding this instance's pinned maps.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(PIN_ROOT).join(self.tag())
    }

    /// The lock file a running daemon holds.
    pub fn lock_path(&self) -> PathBuf {
        self.state_file("lock")
    }

    /// A file of this instance's kind `kind` in the run directory. bpffs holds only pinned
    /// objects, so what a persisting instance must remember besides its maps and links (sysctls
    /// to restore, its egress filter) is kept here, next to the lock.
    pub fn state_file(&self, kind: &str) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{}.{kind}", self.tag()))
    }

    /// The running instance a CLI subcommand talks to: `iface` if given, else the only NAT in
    /// this network namespace.
    pub fn find(iface: Option<&str>) -> Result<Self> {
        let netns = current_netns()?;
        if let Some(iface) = iface {
            let instance = Instance {
                iface: iface.to_string(),
                netns,
            };
            if !instance.pin_dir().is_dir() {
                bail!("no NAT is attached to {iface} in this network namespace");
            }
            return Ok(instance);
        }
        let running = list_in_netns(netns);
        match running.as_slice() {
            [only] => Ok(only.clone()),
            [] => bail!("no NAT is attached in this network namespace"),
            many => {
                let names: Vec<&str> = many.iter().map(|i| i.iface.as_str()).collect();
                bail!(
                    "several NATs run in this network namespace ({}): choose one with -i",
                    names.join(", ")
                )
            }
        }
    }

    /// Removes the pinned maps and the pin directory, if present.
    pub fn remove_pins(&self) -> Result<()> {
        let dir = self.pin_dir();
        for name in names::ALL {
            match fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot unpin {}", dir.join(name).display()))
                }
            }
        }
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
}

/// Every instance of network namespace `netns` (the caller's) whose interface exists. Pin
/// directories are named by the namespace's inode number, which the kernel reuses once a
/// namespace is gone: a directory left by a NAT of a dead namespace (its daemon killed, or the
/// namespace deleted under it) names an interface that does not exist here, and is not ours.
pub fn list_in_netns(netns: u64) -> Vec<Instance> {
    let (live, _stale) = pin_dirs_in_netns(netns);
    live
}

/// Removes the pin directories of `netns` whose interface does not exist here (see
/// `list_in_netns`); their links were detached when their interface went.
pub fn remove_stale_in_netns(netns: u64) {
    let (_, stale) = pin_dirs_in_netns(netns);
    for instance in stale {
        let _ = instance.remove_pins();
    }
}

/// The instances with a pin directory named for `netns`: (interface exists, interface gone).
fn pin_dirs_in_netns(netns: u64) -> (Vec<Instance>, Vec<Instance>) {
    let all = all_pin_dirs_in_netns(netns);
    all.into_iter()
        .partition(|instance| crate::iface::index(&instance.iface).is_ok())
}

/// Every instance with a pin directory named for `netns`.
fn all_pin_dirs_in_netns(netns: u64) -> Vec<Instance> {
    let prefix = format!("{netns}-");
    let Ok(entries) = fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    let mut found: Vec<Instance> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            name.strip_prefix(&prefix).map(|iface| Instance {
                iface: iface.to_string(),
                netns,
            })
        })
        .collect();
    found.sort_by(|a, b| a.iface.cmp(&b.iface));
    found
}

/// Inode number of the caller's network namespace.
pub fn current_netns() -> Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")
        .context("cannot identify the network namespace")?
        .ino())
}

/// Mounts bpffs at `/sys/fs/bpf` when it is not mounted there yet.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.nth(1) == Some(BPFFS) && fields.next() == Some("bpf")
    }) {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .context("cannot run mount to mount bpffs")?;
    if !status.success() {
        bail!("bpffs is not mounted at {BPFFS} and mounting it failed");
    }
    Ok(())
}

/// Held by the daemon for its whole life; the kernel releases the `flock` if it dies.
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock of `instance`, or says who holds it.
    pub fn acquire(instance: &Instance) -> Result<Self> {
        fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
        let path = instance.lock_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: valid open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let pid = holder.lines().next().unwrap_or("?").trim().to_string();
            bail!(
                "a NAT is already attached to {} (nat-ctl pid {pid})",
                instance.iface
            );
        }
        Ok(InstanceLock { file, path })
    }

    /// Records the daemon's pid and a one-line description for `nat-ctl status`.
    pub fn write_info(&mut self, info: &str) -> Result<()> {
        self.file.set_len(0)?;
        let text = format!("{}\n{info}\n", std::process::id());
        use std::io::Seek;
        self.file.seek(std::io::SeekFrom::Start(0))?;
        self.file.write_all(text.as_bytes())?;
        Ok(())
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Who runs an instance, as its lock file and the process table tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Daemon {
    /// A nat-ctl daemon with this pid runs it.
    Running(String),
    /// The daemon with this pid ended without a clean stop (killed, crashed): the data path
    /// keeps translating, but nothing sweeps timers until an attach adopts it.
    Gone(String),
    /// No daemon ever ran it from this machine's run directory (or it was stopped cleanly with
    /// `--persist`, which removes the lock file).
    None,
}

impl Daemon {
    /// The daemon of `instance`.
    pub fn of(instance: &Instance) -> Daemon {
        let Some((pid, _)) = read_info(instance) else {
            return Daemon::None;
        };
        // The kernel drops the flock of a dead daemon but not its file: check the pid.
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "nat-ctl" && pid.parse::<u32>().is_ok() {
            Daemon::Running(pid)
        } else {
            Daemon::Gone(pid)
        }
    }

    /// `running`, `gone` or `none`, for `status --json`.
    pub fn name(&self) -> &'static str {
        match self {
            Daemon::Running(_) => "running",
            Daemon::Gone(_) => "gone",
            Daemon::None => "none",
        }
    }
}

/// What the running daemon wrote into its lock file: pid, then a description line.
pub fn read_info(instance: &Instance) -> Option<(String, String)> {
    let text = fs::read_to_string(instance.lock_path()).ok()?;
    let mut lines = text.lines();
    Some((lines.next()?.to_string(), lines.next().unwrap_or("").to_string()))
}
