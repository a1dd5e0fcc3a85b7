//! IPv4 sysctls the NAT needs, set at attach and restored at detach. A persisting instance keeps
//! the previous values in a file next to its lock, for `nat-ctl detach` or the adopting daemon
//! to restore.
//!
//! `net.ipv4.ip_forward` is one per network namespace and may serve several NATs there (one per
//! external interface): whoever turns it on records the old value in a file of the namespace,
//! and it is put back when the last NAT of the namespace goes.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

use crate::instance::{list_in_netns, Instance, RUN_DIR};

/// IPv4 forwarding of the caller's network namespace (each namespace has its own).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

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
/// martians before routing them to the target host. It cannot be abused: the internal-side XDP
/// program, attached to the same interface first, drops every packet whose source is one of
/// the gateway's addresses before the kernel sees it (`spoofed_source`); only the hairpin path
/// writes such a source, after that check.
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
    instance.state_file("sysctl")
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

/// Restores what a persisted instance recorded, `ip_forward` included when it is the last NAT
/// of its network namespace.
pub fn restore_saved(instance: &Instance) {
    for changed in take_saved(instance) {
        changed.restore();
    }
    release_ip_forward(instance);
}

/// Where the value `ip_forward` had before a NAT of network namespace `netns` turned it on.
fn ip_forward_record(netns: u64) -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("{netns}.ip_forward"))
}

/// IPv4 forwarding held on for a running NAT. Dropping it puts the old value back (see
/// `release_ip_forward`) unless the instance persists: then `nat-ctl detach` does.
pub struct IpForwarding {
    instance: Instance,
    persist: bool,
    /// The value before this attach turned forwarding on, if it did.
    pub was: Option<String>,
}

impl IpForwarding {
    /// Turns on IPv4 forwarding in the caller's network namespace if it is off: a NAT gateway
    /// forwards every packet it translates, so without it every flow would be lost without a
    /// word. The old value is recorded before it is changed, so it is put back even after a
    /// crash (by the next detach in this namespace).
    pub fn enable(instance: &Instance, persist: bool) -> Result<IpForwarding> {
        let mut held = IpForwarding {
            instance: instance.clone(),
            persist,
            was: None,
        };
        let previous = fs::read_to_string(IP_FORWARD).with_context(|| format!("cannot read {IP_FORWARD}"))?;
        let previous = previous.trim();
        if previous != "0" {
            return Ok(held);
        }
        let record = ip_forward_record(instance.netns);
        if !record.exists() {
            fs::write(&record, previous).with_context(|| {
                format!("cannot record the value of {IP_FORWARD} in {}", record.display())
            })?;
        }
        fs::write(IP_FORWARD, "1").with_context(|| format!("cannot turn on {IP_FORWARD}"))?;
        held.was = Some(previous.to_string());
        Ok(held)
    }
}

impl Drop for IpForwarding {
    fn drop(&mut self) {
        if !self.persist {
            release_ip_forward(&self.instance);
        }
    }
}

/// Puts IPv4 forwarding back as it was before a NAT turned it on, unless another NAT of this
/// network namespace still needs it (that one puts it back when it goes).
pub fn release_ip_forward(instance: &Instance) {
    let record = ip_forward_record(instance.netns);
    let Ok(previous) = fs::read_to_string(&record) else {
        return;
    };
    if list_in_netns(instance.netns)
        .iter()
        .any(|other| other != instance)
    {
        return;
    }
    if fs::write(IP_FORWARD, previous.trim()).is_ok() {
        let _ = fs::remove_file(&record);
    }
}
