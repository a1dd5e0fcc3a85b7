//! Finding the host's bpffs from a private mount namespace.
//!
//! `ip netns exec NS cmd` runs `cmd` in a new mount namespace with a fresh sysfs on `/sys`, so
//! the bpffs at `/sys/fs/bpf` (where every NAT pins its maps) is out of sight there: a query
//! would say that no NAT runs, and an attach would pin into a bpffs that nobody else sees. A
//! mount namespace is not a network namespace, so nat-ctl joins the mount namespace of the
//! shell it came from (the nearest ancestor process in another mount namespace, else pid 1)
//! before it does anything else, and keeps the network namespace it was started in.
//!
//! Ancestors come before pid 1 because pid 1 may not let itself be inspected (an init that is
//! not dumpable, as in some microVMs: `/proc/1/ns/mnt` is then unreadable even for root), while
//! the shell that ran `ip netns exec` is ours to look at. `setns(2)` into a mount namespace
//! needs a single-threaded caller (threads share their filesystem context, `CLONE_FS`), so
//! this runs first thing in `main`.

use std::{
    ffi::CString,
    fs::{self, File},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use anyhow::{bail, Context, Result};

use crate::instance::{BPFFS, PIN_ROOT};

/// Where `ip netns add` names network namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";
/// Most ancestors looked at: process trees are far shallower.
const MAX_ANCESTORS: usize = 64;

/// How well a mount namespace serves nat-ctl: ordered, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum View {
    /// No bpffs at /sys/fs/bpf (attach would mount one there).
    NoBpffs,
    /// A bpffs, but no NAT has pinned anything in it.
    Bpffs,
    /// A bpffs holding the NATs' pin root.
    Pins,
}

/// What `/sys/fs/bpf` is below `root` (`/` for our own view, `/proc/PID/root` for another's).
fn view(root: &Path) -> View {
    let bpffs = root.join(BPFFS.trim_start_matches('/'));
    let Ok(path) = CString::new(bpffs.as_os_str().as_encoded_bytes()) else {
        return View::NoBpffs;
    };
    // SAFETY: statfs(2) with a NUL-terminated path and a zeroed out-struct it fills.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return View::NoBpffs;
    }
    if stat.f_type as u32 != libc::BPF_FS_MAGIC as u32 {
        return View::NoBpffs;
    }
    if root.join(PIN_ROOT.trim_start_matches('/')).is_dir() {
        View::Pins
    } else {
        View::Bpffs
    }
}

/// (device, inode) of a namespace file: equal for the same namespace.
fn ns_id(path: &str) -> std::io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The parent pid from the text of `/proc/PID/stat` (the field after the parenthesised name,
/// which may itself contain spaces and parentheses).
fn parent_from_stat(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Our ancestors, parent first, then pid 1 if the chain did not reach it.
fn ancestors() -> Vec<u32> {
    let mut found = Vec::new();
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 && found.len() < MAX_ANCESTORS {
        found.push(pid);
        let Some(parent) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parent_from_stat(&s))
        else {
            break;
        };
        pid = parent;
    }
    found.push(1);
    found
}

/// The name `ip netns` knows the caller's network namespace by, if any.
fn netns_name() -> Option<String> {
    let own = ns_id("/proc/self/ns/net").ok()?;
    fs::read_dir(NETNS_RUN_DIR)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| matches!(fs::metadata(e.path()), Ok(m) if (m.dev(), m.ino()) == own))
        .and_then(|e| e.file_name().into_string().ok())
}

/// The advice for when the host's bpffs cannot be reached from here.
fn advice(netns: Option<&str>) -> String {
    let path = format!("{NETNS_RUN_DIR}/{}", netns.unwrap_or("NAME"));
    format!("run `nsenter --net={path} nat-ctl ...` instead, which enters only the network namespace")
}

/// Makes the host's bpffs visible: when `/sys/fs/bpf` here holds no NAT pins (as under `ip netns
/// exec`), joins the mount namespace of the nearest ancestor (else pid 1) that sees more of it
/// (pins, else at least a bpffs, else, when we see no bpffs either, the first one in another
/// mount namespace: the shell the user typed in, where attach then mounts bpffs). The working
/// directory is kept, so relative paths (`--config nat.toml`) still mean the same file. Must be
/// called while the process has a single thread.
pub fn use_host_bpffs() -> Result<()> {
    let here = view(Path::new("/"));
    if here == View::Pins {
        return Ok(());
    }
    let Ok(own) = ns_id("/proc/self/ns/mnt") else {
        return Ok(());
    };
    let mut best: Option<(View, u32)> = None;
    for pid in ancestors() {
        // Unreadable (an init that hides itself) or gone: not a namespace we could join.
        let Ok(id) = ns_id(&format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if id == own {
            continue;
        }
        let theirs = view(Path::new(&format!("/proc/{pid}/root")));
        if best.is_none_or(|(v, _)| theirs > v) {
            best = Some((theirs, pid));
        }
        if theirs == View::Pins {
            break;
        }
    }
    let Some((theirs, pid)) = best else {
        // Every ancestor shares our mounts: this is the host's view.
        return Ok(());
    };
    if theirs < here || (theirs == here && here != View::NoBpffs) {
        return Ok(());
    }
    let why = "/sys/fs/bpf here is not the host's bpffs (ip netns exec mounts a private /sys)";
    let cwd = std::env::current_dir().ok();
    let joined = File::open(format!("/proc/{pid}/ns/mnt")).and_then(|ns| {
        // SAFETY: setns(2) on an open namespace descriptor; the process is single-threaded.
        match unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    });
    if let Err(e) = joined {
        bail!(
            "{why}, and joining the mount namespace of pid {pid}, which sees it, failed ({e}); {}",
            advice(netns_name().as_deref())
        );
    }
    // setns(2) moved the root and working directory to the new namespace's root.
    if let Some(cwd) = cwd {
        std::env::set_current_dir(&cwd).with_context(|| {
            format!(
                "joined the mount namespace of pid {pid} to reach its bpffs, but {} does not exist there",
                cwd.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_names_the_namespace() {
        assert!(advice(Some("lab")).contains("nsenter --net=/run/netns/lab nat-ctl"));
        assert!(advice(None).contains("/run/netns/NAME"));
    }

    #[test]
    fn parent_pid_parsed_past_odd_names() {
        assert_eq!(parent_from_stat("42 (bash) S 7 42 42 0"), Some(7));
        assert_eq!(parent_from_stat("42 (a) b (c) S 9 42 42 0"), Some(9));
        assert_eq!(parent_from_stat("garbage"), None);
    }

    #[test]
    fn views_are_ordered() {
        assert!(View::Pins > View::Bpffs && View::Bpffs > View::NoBpffs);
    }
}
