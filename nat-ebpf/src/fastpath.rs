//! The XDP fast path: send a packet straight out of its egress interface (`bpf_fib_lookup` +
//! `bpf_redirect`) instead of handing it to the kernel's forwarding path. Whenever the kernel
//! would do something the fast path cannot (no route or neighbour entry yet, a packet over the
//! egress MTU, TTL about to expire, an interface not registered for the fast path), the lookup
//! says so and the caller passes the packet to the kernel, which then gives identical results.
//!
//! The fast path obeys the host's forwarding policy the way an nftables flowtable does: a flow
//! is offloaded only after the kernel has forwarded it. Each direction of a session is confirmed
//! on its own (`SESSION_FLAG_OFFLOAD_OUT`, `SESSION_FLAG_OFFLOAD_IN`) by a TC egress program that
//! sees only what the kernel let through: the external interface's for outbound packets, the
//! internal interfaces' for inbound ones. Until then, and for every TCP segment that opens a
//! connection, packets take the kernel path, where the forward chain, rp_filter and routing
//! decide as they would without the NAT's fast path.

use core::ptr::NonNull;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nat_common::{
    checksum::replace_u16,
    maps::{SESSION_FLAG_OFFLOAD_IN, SESSION_FLAG_OFFLOAD_OUT},
    packet::Ipv4Header,
    tcp_state::flags as tcp_flags,
    BindingValue, NatConfig, SessionValue,
};

use crate::{
    access::{read_at, write_at},
    bindings,
    flow::OutboundFlow,
    maps::{NAT_FAST_PATH_IFACES, NAT_FAST_PATH_ON},
    sessions,
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

/// TCP flags of segments that always take the kernel path.
const KERNEL_PATH_TCP_FLAGS: u8 = tcp_flags::SYN;

/// True while any device is registered for the fast path: one inlined array load that spares
/// every other fast-path step when it is off.
#[inline(always)]
pub fn enabled() -> bool {
    NAT_FAST_PATH_ON.get(0).is_some_and(|on| *on != 0)
}

/// True for TCP segments that open a connection (`tcp_flags` is 0 for other protocols): they
/// take the kernel path, so the host's firewall judges every new connection, one that reuses
/// the ports of an offloaded connection included. FIN and RST stay on the fast path: conntrack,
/// which saw only a connection's first packets, would judge them out of its window (invalid),
/// and the common `ct state invalid drop` would then keep the connection from closing (a
/// flowtable avoids that by making an offloaded connection's conntrack entry liberal, which
/// XDP cannot).
#[inline(always)]
pub fn kernel_path_tcp(tcp_flags: u8) -> bool {
    tcp_flags & KERNEL_PATH_TCP_FLAGS != 0
}

/// The binding of `flow` and its session with the remote if an outbound packet of it may take
/// the fast path: the session has had a packet forwarded by the kernel (see the module
/// comment). Creates nothing: a new flow's first packets go through the kernel, which may drop
/// them, and TC egress creates its state when the kernel lets one out.
#[inline(always)]
pub fn confirmed_binding(
    cfg: &NatConfig,
    flow: &OutboundFlow,
) -> Option<(NonNull<BindingValue>, *mut SessionValue)> {
    let binding = bindings::outbound_binding(cfg, flow, false)?;
    // SAFETY: map value pointer from a successful lookup.
    let (external_addr, external_port) =
        unsafe { (binding.as_ref().external_addr, binding.as_ref().external_port) };
    let session = sessions::endpoint(
        flow.proto,
        external_addr,
        external_port,
        flow.remote_addr,
        flow.remote_port,
    )?;
    // SAFETY: map value pointer from a successful lookup.
    let flags = unsafe { (*session).flags };
    (flags & SESSION_FLAG_OFFLOAD_OUT != 0).then_some((binding, session))
}

/// True if an inbound packet of the session whose flags are `session_flags` may take the fast
/// path: the kernel has forwarded one of the session's inbound packets.
#[inline(always)]
pub fn inbound_confirmed(session_flags: u8) -> bool {
    session_flags & SESSION_FLAG_OFFLOAD_IN != 0
}

/// The interface a packet seen by TC arrived on; 0 for one the gateway itself sent.
#[inline(always)]
fn arrived_on(ctx: &TcContext) -> u32 {
    // SAFETY: the context's socket buffer, valid for the whole program run.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// True if the kernel forwarded the packet TC egress on the external interface sees: only such
/// a packet confirms its session for the fast path (`sessions::touch_outbound`). The gateway's
/// own traffic (from an address that is not external) never went through an internal
/// interface's source check, and the fast path never serves it anyway.
#[inline(always)]
pub fn forwarded(ctx: &TcContext) -> bool {
    arrived_on(ctx) != 0
}

/// Records that the kernel forwarded an inbound packet of the session to an internal interface
/// (TC egress there saw it leave). Only a packet that came in through the external interface
/// counts.
#[inline(always)]
pub fn confirm_inbound(
    ctx: &TcContext,
    cfg: &NatConfig,
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
) {
    if arrived_on(ctx) == cfg.external_ifindex && enabled() {
        sessions::set_flags(
            proto,
            external_addr,
            external_port,
            remote_addr,
            remote_port,
            SESSION_FLAG_OFFLOAD_IN,
        );
    }
}

/// Looks up the route for `ip` (as it is now) arriving on `ingress_ifindex`. `None` when the
/// kernel must handle the packet: TTL about to expire, no route, no neighbour entry, over the
/// MTU, or an egress interface the fast path does not serve. Callers check `enabled` first.
#[inline(always)]
pub fn route(ctx: &XdpContext, ip: &Ipv4Header, ingress_ifindex: u32) -> Option<Route> {
    if ip.ttl <= 1 {
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
