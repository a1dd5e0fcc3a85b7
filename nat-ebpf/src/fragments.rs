//! IP fragments: only the first fragment carries ports, so the translation chosen for it is
//! remembered (keyed by source, destination, protocol and IP ID, RFC 791) and applied to the
//! rest of the datagram.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::generated::bpf_xdp_load_bytes, programs::XdpContext, EbpfContext,
};
use nat_common::{
    maps::{ParkedFragment, MAX_PARKED_FRAGMENT_BYTES, PARKED_FRAGMENT_ROOM},
    packet::Ipv4Header,
    FragmentKey, FragmentValue,
};

use crate::maps::{NAT_FRAGMENTS, NAT_PARKED_FRAGMENTS};

/// Remembers the address the first fragment of `ip`'s datagram was translated to. Best effort:
/// the map is LRU, so this never fails for lack of room.
#[inline(always)]
pub fn remember(ip: &Ipv4Header, translated_addr: u32) {
    let _ = NAT_FRAGMENTS.insert(
        FragmentKey::of(ip),
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
    unsafe { NAT_FRAGMENTS.get(FragmentKey::of(ip)) }.map(|v| v.translated_addr)
}

/// Hands an inbound non-first fragment whose first fragment has not been seen (`len` bytes
/// from the IPv4 header at packet offset `l3_off`) to the controller. False when it cannot be
/// parked (too large, or the ring is full): the caller drops it.
#[inline(always)]
pub fn park(ctx: &XdpContext, l3_off: usize, len: usize) -> bool {
    if len == 0 || len > MAX_PARKED_FRAGMENT_BYTES {
        return false;
    }
    let Some(mut entry) = NAT_PARKED_FRAGMENTS.reserve::<ParkedFragment>(0) else {
        return false;
    };
    let parked = entry.as_mut_ptr();
    // SAFETY: `parked` is a reserved ring entry of the right size, and `len` was checked above.
    // The helper's length is that value read back from the entry and masked into [1, room]
    // right before the call, so the bound sits on the very register the helper gets: the 6.1
    // verifier neither carries a bound checked on one fill of a stack slot to a second fill,
    // nor learns a lower bound of 1 from a test against zero. Without the volatile read the
    // compiler would drop the mask as redundant. For a checked `len` the mask changes nothing;
    // the helper itself checks the length against the packet.
    let copied = unsafe {
        (*parked).len = len as u32;
        (*parked)._pad = 0;
        let stored = u64::from(core::ptr::read_volatile(&raw const (*parked).len));
        let copy_len = (stored.wrapping_sub(1) & (PARKED_FRAGMENT_ROOM as u64 - 1)) + 1;
        bpf_xdp_load_bytes(
            ctx.as_ptr().cast(),
            l3_off as u32,
            (*parked).packet.as_mut_ptr().cast(),
            copy_len as u32,
        )
    };
    if copied < 0 {
        entry.discard(0);
        return false;
    }
    entry.submit(0);
    true
}
