//! An outbound flow as the internal host sent it: the one description of its endpoints that
//! binding lookup, session bookkeeping and the fast path all take.

use nat_common::BindingKey;

/// The endpoints of an outbound flow as the internal host sent it (ports in network order; for
/// ICMP echo the identifier is `internal_port` and `remote_port` is zero).
#[derive(Clone, Copy)]
pub struct OutboundFlow {
    /// IP protocol.
    pub proto: u8,
    /// Internal host address.
    pub internal_addr: u32,
    /// Internal port or echo identifier.
    pub internal_port: u16,
    /// Remote address.
    pub remote_addr: u32,
    /// Remote port, zero for ICMP.
    pub remote_port: u16,
}

impl OutboundFlow {
    /// The binding key of this flow: per remote (symmetric mode) or endpoint-independent.
    #[inline(always)]
    pub fn key(&self, with_remote: bool) -> BindingKey {
        BindingKey {
            internal_addr: self.internal_addr,
            remote_addr: if with_remote { self.remote_addr } else { 0 },
            internal_port: self.internal_port,
            remote_port: if with_remote { self.remote_port } else { 0 },
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}
