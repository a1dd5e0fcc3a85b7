//! Source checks on the internal interfaces: no internal host may send as the gateway.
//!
//! Hairpinned packets go back into the kernel with the gateway's own external address as their
//! source, so the NAT turns `accept_local` on for the internal interfaces; the kernel then no
//! longer drops packets from there whose source is one of its own addresses (RFC 1812 §5.3.7
//! calls them martians). Without a check, a host could send with the external address and
//! another host's external port and have the replies translated to that host. So every packet
//! from an internal interface is checked before the kernel (or the fast path) sees it, and
//! dropped when the gateway would not route a reply to its source back out of the internal
//! side: one of the NAT's external addresses, another address of the gateway itself, a
//! broadcast or multicast address, a source with no route, or one whose route leads out of the
//! external interface (a host on the inside claiming an Internet address); the route lookup's
//! answer is judged by `nat_common::source`. That is the kernel's martian check without
//! `accept_local`, plus loose reverse-path filtering (RFC 3704 §2.4), plus "not from the
//! outside". The hairpin path rewrites the source only after this check.
//!
//! The outbound fast path takes a packet before the route lookup (the external-address check
//! comes first, always): it serves only flows the kernel has forwarded, whose source passed
//! this check (or the kernel's own, on an interface without this program) on their first
//! packet, and the lookup would cost as much as the fast path's own route lookup.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_md},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
    EbpfContext,
};
use nat_common::{packet::Ipv4Header, source::refused_by_reverse_route, NatConfig};

/// `AF_INET`.
const AF_INET: u8 = 2;

/// True if `ip`, received on an internal interface, carries a source the gateway would not
/// route back there (see the module comment). The unspecified source (DHCP before a lease) is
/// never judged: the gateway's own DHCP server must get it.
#[inline(always)]
pub fn spoofed(ctx: &XdpContext, cfg: &NatConfig, ip: &Ipv4Header) -> bool {
    if ip.saddr == 0 {
        return false;
    }
    // Also when the address is a routed pool address the gateway does not hold itself.
    cfg.is_external_addr(ip.saddr) || unroutable(ctx.as_ptr(), ip.saddr, ip.daddr, cfg.external_ifindex) != 0
}

/// 1 if the gateway has no route for a reply to `saddr` that leads back to the inside, else
/// 0. A subprogram of its own (the callers are several, and the lookup's request buffer is
/// large), returning a plain integer, which every verifier tracks.
#[inline(never)]
fn unroutable(ctx: *mut c_void, saddr: u32, daddr: u32, external_ifindex: u32) -> u32 {
    // The route a reply would take, looked up as the kernel's reverse-path check does: from
    // the packet's destination to its source, for the interface it came in on. No length is
    // given, so no MTU check applies.
    // SAFETY: all-zero is a valid lookup request; the IPv4 fields are set below.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    // SAFETY: `ctx` is the program's `xdp_md`.
    params.ifindex = unsafe { (*ctx.cast::<xdp_md>()).ingress_ifindex };
    params.__bindgen_anon_3.ipv4_src = daddr;
    params.__bindgen_anon_4.ipv4_dst = saddr;
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: valid context and request buffer of the size given.
    let rc = unsafe { fib_lookup(ctx, &mut params, size, 0) };
    u32::from(refused_by_reverse_route(rc, params.ifindex, external_ifindex))
}
