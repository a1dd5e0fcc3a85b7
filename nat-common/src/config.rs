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
}

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
