//! Per-interface IPv4 sysctls the NAT needs, set at attach and restored at detach.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

/// A sysctl value changed by us, remembered so it can be put back.
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
