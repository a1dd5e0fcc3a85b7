//! The XDP fast path: send a packet straight out of its egress interface (`bpf_fib_lookup` +
//! `bpf_redirect`) instead of handing it to the kernel's forwarding path. Whenever the kernel
//! would do something the fast path cannot (no route or neighbour entry yet, a packet over the
//! egress MTU, TTL about to expire, an interface not registered for the fast path), the lookup
//! says so and the caller passes the packet to the kernel, which then gives identical results.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use nat_common::{checksum::replace_u16, maps::FAST_PATH_ANY, packet::Ipv4Header};

use crate::{
    access::{read_at, write_at},
    maps::NAT_FAST_PATH_IFACES,
};

/// `AF_INET`.
const AF_INET: u8 = 2;
/// Offset of the TTL (and, with it, the protocol) word in the IPv4 header.
const IPV4_TTL_OFF: usize = 8;
/// Offset of the IPv4 checksum.
const IPV4_CHECK_OFF: usize = 10;
/// Ethernet address length.
const ETH_ALEN: usize = 6;
/// One TTL step in the host-order TTL/protocol word.
const TTL_ONE: u16 = 0x0100;

/// Where a packet leaves, found by the kernel's routing and neighbour tables.
#[derive(Clone, Copy)]
pub struct Route {
    /// Egress interface.
    pub ifindex: u32,
    smac: [u8; ETH_ALEN],
    dmac: [u8; ETH_ALEN],
}

/// Looks up the route for `ip` (as it is now) arriving on `ingress_ifindex`. `None` when the
/// kernel must handle the packet: TTL about to expire, no route, no neighbour entry, over the
/// MTU, or an egress interface the fast path does not serve.
#[inline(always)]
pub fn route(ctx: &XdpContext, ip: &Ipv4Header, ingress_ifindex: u32) -> Option<Route> {
    if ip.ttl <= 1 || NAT_FAST_PATH_IFACES.get_ptr(FAST_PATH_ANY).is_none() {
        return None;
    }
    // SAFETY: all-zero is a valid lookup request; the IPv4 fields are set below.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
    params.__bindgen_anon_2.tos = ip.tos;
    params.__bindgen_anon_3.ipv4_src = ip.saddr;
    params.__bindgen_anon_4.ipv4_dst = ip.daddr;
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: valid context and request buffer of the size given.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut params, size, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    NAT_FAST_PATH_IFACES.get_ptr(params.ifindex)?;
    Some(Route {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// Forwards the packet along `route`: decrements the TTL (as the kernel's forwarding would,
/// with the checksum fixed, RFC 1624), sets the Ethernet addresses and redirects.
#[inline(always)]
pub fn forward(start: usize, end: usize, l3: usize, route: &Route) -> Option<u32> {
    // TTL and protocol form one 16-bit word, TTL in the high byte on the wire.
    let old_word: u16 = read_at(l3, end, IPV4_TTL_OFF)?;
    let new_word = (u16::from_be(old_word) - TTL_ONE).to_be();
    let check: u16 = read_at(l3, end, IPV4_CHECK_OFF)?;
    write_at(l3, end, IPV4_TTL_OFF, new_word)?;
    write_at(l3, end, IPV4_CHECK_OFF, replace_u16(check, old_word, new_word))?;
    write_at(start, end, 0, route.dmac)?;
    write_at(start, end, ETH_ALEN, route.smac)?;
    // SAFETY: plain helper call; with no flags it can only return XDP_REDIRECT.
    Some(unsafe { bpf_redirect(route.ifindex, 0) } as u32)
}
