//! Per-interface IPv4 sysctls the NAT needs, set at attach and restored at detach. A persisting
//! instance keeps the previous values in a file next to its lock, for `nat-ctl detach` or the
//! adopting daemon to restore.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

use crate::instance::{Instance, RUN_DIR};

/// A sysctl value changed by us, remembered so it can be put back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    path: PathBuf,
    previous: String,
}

impl Changed {
    /// Puts the previous value back (best effort: the interface may be gone).
    pub fn restore(&self) {
        let _ = fs::write(&self.path, &self.previous);
    }
}

/// Sets `net.ipv4.conf.IFACE.accept_local` to 1. Hairpinned packets come back in with the
/// gateway's own external address as their source; without it the kernel drops them as
/// martians before routing them to the target host.
pub fn accept_local(iface: &str) -> Result<Changed> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"));
    let previous = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    fs::write(&path, "1").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Changed {
        path,
        previous: previous.trim().to_string(),
    })
}

fn saved_path(instance: &Instance) -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("{}-{}.sysctl", instance.netns, instance.iface))
}

/// Records `changed` for a persisting instance (one `path=value` line each).
pub fn save(instance: &Instance, changed: &[Changed]) -> Result<()> {
    let text: String = changed
        .iter()
        .map(|c| format!("{}={}\n", c.path.display(), c.previous))
        .collect();
    fs::write(saved_path(instance), text).context("cannot record the sysctls to restore")
}

/// Takes the values a persisted instance recorded (the file is removed).
pub fn take_saved(instance: &Instance) -> Vec<Changed> {
    let path = saved_path(instance);
    let text = fs::read_to_string(&path).unwrap_or_default();
    let _ = fs::remove_file(&path);
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(p, v)| Changed {
            path: PathBuf::from(p),
            previous: v.to_string(),
        })
        .collect()
}

/// Restores what a persisted instance recorded.
pub fn restore_saved(instance: &Instance) {
    for changed in take_saved(instance) {
        changed.restore();
    }
}
