//! Which interfaces the XDP fast path may redirect to. A device is registered in the
//! `FAST_PATH_IFACES` map only while it accepts redirected frames (see `xdp_features`); the
//! others get their packets through the kernel's forwarding, which never drops them silently.
//! Checked at attach and at every sweep, since a veth's answer changes with its peer's settings.

use std::collections::BTreeSet;

use anyhow::Result;

use crate::{pinned::PinnedMaps, xdp_features::NetdevFamily};

/// Why there is no fast path on kernels without the `netdev` generic netlink family (before
/// Linux 6.3): a device that lacks `ndo_xdp_xmit`, or a veth whose peer has neither GRO nor an
/// XDP program, drops redirected frames silently, and nothing else tells us which devices do.
pub const NO_NETDEV_FAMILY: &str =
    "this kernel cannot report which devices accept XDP-redirected frames (xdp-features, Linux 6.3+); packets take the kernel's forwarding path";

/// The reason the fast path cannot run on this kernel at all, if it cannot.
pub fn unavailable_reason() -> Option<&'static str> {
    match NetdevFamily::open() {
        Ok(Some(_)) => None,
        _ => Some(NO_NETDEV_FAMILY),
    }
}

/// The fast path's candidate devices and the kernel interface that vouches for them.
pub struct FastPathDevices {
    candidates: Vec<(String, u32)>,
    netdev: Option<NetdevFamily>,
    active: BTreeSet<u32>,
}

impl FastPathDevices {
    /// Candidates: the external interface and the internal ones (empty when there are no
    /// internal interfaces: then there is no fast path at all).
    pub fn new(candidates: Vec<(String, u32)>) -> Result<Self> {
        let netdev = if candidates.is_empty() {
            None
        } else {
            NetdevFamily::open()?
        };
        if !candidates.is_empty() && netdev.is_none() {
            tracing::info!("the fast path stays off: {NO_NETDEV_FAMILY}");
        }
        Ok(FastPathDevices {
            candidates,
            netdev,
            active: BTreeSet::new(),
        })
    }

    /// Brings the map in line with what the devices accept now; reports each change on stderr.
    pub fn refresh(&mut self, maps: &mut PinnedMaps) -> Result<()> {
        let Some(netdev) = &self.netdev else { return Ok(()) };
        for (name, ifindex) in &self.candidates {
            let accepts = netdev.accepts_redirects(*ifindex);
            if accepts && self.active.insert(*ifindex) {
                maps.fast_path_ifaces.insert(*ifindex, 0, 0)?;
                tracing::info!("fast path on towards {name}");
            } else if !accepts
                && (self.active.remove(ifindex) || maps.fast_path_ifaces.get(ifindex, 0).is_ok())
            {
                let _ = maps.fast_path_ifaces.remove(ifindex);
                tracing::info!("fast path off towards {name}: it does not accept XDP-redirected frames (a veth needs GRO or XDP on its peer)");
            }
        }
        // Written every time, not only on a change: a switch left on by an earlier daemon
        // (adoption) is corrected on the first refresh.
        maps.fast_path_on.set(0, u32::from(!self.active.is_empty()), 0)?;
        Ok(())
    }
}
