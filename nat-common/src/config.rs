//! The configuration record the controller writes into the single-entry `CONFIG` map.

use crate::mode::Mode;

/// Most external addresses one NAT instance can own (the pool, RFC 4787 REQ-2 paired pooling).
pub const MAX_EXTERNAL_ADDRS: usize = 8;

/// Lowest external port handed out for internal source ports below 1024. Port 0 is never used.
/// RFC 4787 REQ-3a: privileged source ports map into the privileged range.
pub const PRIVILEGED_PORT_MIN: u16 = 1;
/// Highest privileged port; internal ports up to this value map at or below it.
pub const PRIVILEGED_PORT_MAX: u16 = 1023;

/// Default dynamic range for internal source ports >= 1024 (host byte order).
pub const DEFAULT_PORT_MIN: u16 = 1024;
/// See [`DEFAULT_PORT_MIN`].
pub const DEFAULT_PORT_MAX: u16 = 65535;

/// `NatConfig::flags` bit: the controller has finished writing the config; until it is set
/// the data path passes everything untouched.
pub const CONFIG_FLAG_READY: u8 = 1 << 0;
/// `NatConfig::flags` bit: post unsolicited inbound SYNs for the controller, which answers with
/// ICMP port unreachable after the RFC 5382 REQ-4 hold time. Without it they are dropped silently.
pub const CONFIG_FLAG_SYN_ICMP: u8 = 1 << 1;
/// `NatConfig::flags` bit: post refused new flows (limits, exhaustion) for the controller, which
/// tells the internal host with an ICMP error (RFC 5508 REQ-8, RFC 6888 REQ-11).
pub const CONFIG_FLAG_REFUSAL_ICMP: u8 = 1 << 2;
/// `NatConfig::flags` bit: per-remote bindings made in symmetric mode may still exist after a
/// switch to a cone mode; the data path then looks a flow's own per-remote binding up first, so
/// the flow keeps its external port. Set by `nat-ctl mode`, cleared by the sweep once none is
/// left, so cone modes normally pay no extra lookup.
pub const CONFIG_FLAG_PER_REMOTE_BINDINGS: u8 = 1 << 3;
/// `NatConfig::flags` bit: emit data-path debug lines through aya-log (`attach --datapath-log`).
pub const CONFIG_FLAG_DATAPATH_LOG: u8 = 1 << 4;
/// `NatConfig::flags` bit: the external address is the external interface's primary IPv4
/// address and follows it when it changes (no `--external-addr` given). Only the controller
/// reads it (for `nat-ctl status`); the data path uses whatever address the config holds.
pub const CONFIG_FLAG_FOLLOWS_IFACE: u8 = 1 << 5;

/// Configuration of one NAT instance. Written only by the controller, read by every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// The external (public) addresses, network byte order; the first
    /// `external_addr_count` entries are valid.
    pub external_addrs: [u32; MAX_EXTERNAL_ADDRS],
    /// How many entries of `external_addrs` are in use (1..=MAX_EXTERNAL_ADDRS).
    pub external_addr_count: u32,
    /// Lowest external port for internal ports >= 1024 (host byte order).
    pub port_min: u16,
    /// Highest external port for internal ports >= 1024 (host byte order).
    pub port_max: u16,
    /// [`Mode`] as its `u8` value.
    pub mode: u8,
    /// `CONFIG_FLAG_*` bits.
    pub flags: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
    /// Idle timeouts in seconds, indexed by `Timeout`. Enforced by the controller's expiry
    /// sweep; kept here so every CLI process sees the running values.
    pub timeouts_secs: [u32; TIMEOUT_COUNT],
    /// Most dynamic bindings at once (RFC 6888 REQ-5); static forwards do not count.
    pub max_bindings: u32,
    /// Most dynamic bindings one internal host may hold, 0 for no limit (RFC 6888 REQ-4).
    pub max_bindings_per_host: u32,
    /// Most sessions (remote endpoints) one internal host may hold, 0 for no limit
    /// (RFC 6888 REQ-5).
    pub max_sessions_per_host: u32,
    /// Most sessions one binding may hold, 0 for no limit (RFC 6888 REQ-5).
    pub max_sessions_per_binding: u32,
    /// Interface index of the external interface (for the fast path's route check).
    pub external_ifindex: u32,
}

/// Idle timeouts, as indices into `NatConfig::timeouts_secs`.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// UDP binding/session idle timeout.
    Udp = 0,
    /// TCP session idle timeout once established.
    TcpEstablished = 1,
    /// TCP session idle timeout while opening or closing (and after RST).
    TcpTransitory = 2,
    /// ICMP query idle timeout.
    Icmp = 3,
}

/// Number of `Timeout` kinds.
pub const TIMEOUT_COUNT: usize = 4;

/// RFC 4787 REQ-5c: at least 5 minutes by default.
pub const DEFAULT_UDP_TIMEOUT_SECS: u32 = 300;
/// RFC 5382 REQ-5: at least 2 hours 4 minutes.
pub const DEFAULT_TCP_ESTABLISHED_TIMEOUT_SECS: u32 = 7440;
/// RFC 5382 REQ-5, RFC 7857 §2.1: at least 4 minutes.
pub const DEFAULT_TCP_TRANSITORY_TIMEOUT_SECS: u32 = 240;
/// RFC 5508 REQ-2: at least 60 seconds.
pub const DEFAULT_ICMP_TIMEOUT_SECS: u32 = 60;

impl NatConfig {
    /// A config with no addresses, the default port range, and the ready flag clear.
    pub const fn empty() -> Self {
        NatConfig {
            external_addrs: [0; MAX_EXTERNAL_ADDRS],
            external_addr_count: 0,
            port_min: DEFAULT_PORT_MIN,
            port_max: DEFAULT_PORT_MAX,
            mode: Mode::PortRestricted as u8,
            flags: 0,
            _pad: [0; 2],
            timeouts_secs: [
                DEFAULT_UDP_TIMEOUT_SECS,
                DEFAULT_TCP_ESTABLISHED_TIMEOUT_SECS,
                DEFAULT_TCP_TRANSITORY_TIMEOUT_SECS,
                DEFAULT_ICMP_TIMEOUT_SECS,
            ],
            max_bindings: crate::maps::DEFAULT_MAX_BINDINGS,
            max_bindings_per_host: 0,
            max_sessions_per_host: crate::maps::default_max_sessions_per_host(
                crate::maps::DEFAULT_MAX_BINDINGS,
            ),
            max_sessions_per_binding: crate::maps::default_max_sessions_per_binding(
                crate::maps::DEFAULT_MAX_BINDINGS,
            ),
            external_ifindex: 0,
        }
    }

    /// The configured mode.
    pub const fn mode(&self) -> Mode {
        Mode::from_u8(self.mode)
    }

    /// True once the controller has written a complete config.
    pub const fn is_ready(&self) -> bool {
        self.flags & CONFIG_FLAG_READY != 0
    }

    /// The external addresses in use, in order.
    pub fn external_ipv4_addrs(&self) -> impl Iterator<Item = core::net::Ipv4Addr> {
        let count = (self.external_addr_count as usize).min(MAX_EXTERNAL_ADDRS);
        let addrs = self.external_addrs;
        (0..count).map(move |i| core::net::Ipv4Addr::from(u32::from_be(addrs[i])))
    }

    /// True if `addr` (network byte order) is one of this NAT's external addresses.
    #[inline(always)]
    pub fn is_external_addr(&self, addr: u32) -> bool {
        let mut i = 0;
        while i < MAX_EXTERNAL_ADDRS {
            if (i as u32) < self.external_addr_count && self.external_addrs[i] == addr {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_meet_the_rfc_minimums() {
        let t = NatConfig::empty().timeouts_secs;
        assert!(t[Timeout::Udp as usize] >= 300, "RFC 4787 REQ-5c");
        assert!(t[Timeout::TcpEstablished as usize] >= 7440, "RFC 5382 REQ-5");
        assert!(t[Timeout::TcpTransitory as usize] >= 240, "RFC 5382 REQ-5");
        assert!(t[Timeout::Icmp as usize] >= 60, "RFC 5508 REQ-2");
    }

    #[test]
    fn external_address_membership() {
        let mut cfg = NatConfig::empty();
        cfg.external_addrs[0] = 7;
        cfg.external_addrs[1] = 9;
        cfg.external_addr_count = 1;
        assert!(cfg.is_external_addr(7));
        assert!(!cfg.is_external_addr(9), "entries past the count are ignored");
        assert!(!cfg.is_external_addr(0));
        cfg.external_addrs[0] = u32::from(core::net::Ipv4Addr::new(192, 0, 2, 1)).to_be();
        let mut addrs = cfg.external_ipv4_addrs();
        assert_eq!(addrs.next(), Some(core::net::Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(addrs.next(), None, "entries past the count are ignored");
    }
}
