//! IP fragments: only the first fragment carries ports, so the translation chosen for it is
//! remembered (keyed by source, destination, protocol and IP ID, RFC 791) and applied to the
//! rest of the datagram.

use aya_ebpf::bindings::BPF_ANY;
use nat_common::{packet::Ipv4Header, FragmentKey, FragmentValue};

use crate::maps::NAT_FRAGMENTS;

/// The key of the datagram `ip` belongs to, as received.
#[inline(always)]
pub fn key_of(ip: &Ipv4Header) -> FragmentKey {
    FragmentKey {
        src_addr: ip.saddr,
        dst_addr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    }
}

/// Remembers the address the first fragment of `ip`'s datagram was translated to. Best effort:
/// the map is LRU, so this never fails for lack of room.
#[inline(always)]
pub fn remember(ip: &Ipv4Header, translated_addr: u32) {
    let _ = NAT_FRAGMENTS.insert(
        key_of(ip),
        FragmentValue {
            translated_addr,
            _pad: 0,
        },
        BPF_ANY as u64,
    );
}

/// The address the first fragment of `ip`'s datagram was translated to, if it has been seen.
#[inline(always)]
pub fn translated_addr(ip: &Ipv4Header) -> Option<u32> {
    // SAFETY: the value is plain data copied out at once.
    unsafe { NAT_FRAGMENTS.get(key_of(ip)) }.map(|v| v.translated_addr)
}
