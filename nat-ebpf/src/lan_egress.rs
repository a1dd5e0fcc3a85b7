//! TC egress on the internal interfaces: notes which inbound flows the kernel has forwarded.
//!
//! A packet leaves an internal interface through this hook only when the kernel let it through
//! its forwarding path (the forward chain, routing, reverse-path filtering on the external side)
//! or sent it itself: frames the XDP fast path redirects bypass TC altogether. So an inbound
//! packet of a NAT session seen here, having come in through the external interface, confirms
//! the session's inbound direction for the fast path (`SESSION_FLAG_OFFLOAD_IN`, see
//! `fastpath`). The program never changes or drops a packet and
//! hands every one on to whatever runs after it (`TC_ACT_UNSPEC`).

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use nat_common::{
    packet::{
        icmp_type, ipv4_shape, Fragment, Ipv4Header, L4Head, ETH_HLEN, ETH_P_IP_BE, ETH_TYPE_OFF, ICMP_ID_OFF,
    },
    proto,
};

use crate::{
    access::{ptr_at, read_at, read_u8_at},
    bindings, fastpath,
    flow::OutboundFlow,
    maps::NAT_CONFIG,
};

/// Entry point logic: returns the TC action (always "next").
#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let Some(cfg) = NAT_CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    if !cfg.is_ready() || !fastpath::enabled() {
        return TC_ACT_UNSPEC;
    }
    // Headers outside the linear part are not pulled: such a packet just confirms nothing.
    let (start, end) = (ctx.data(), ctx.data_end());
    if read_at::<u16>(start, end, ETH_TYPE_OFF) != Some(ETH_P_IP_BE) {
        return TC_ACT_UNSPEC;
    }
    let Some(ip) = read_at::<Ipv4Header>(start, end, ETH_HLEN) else {
        return TC_ACT_UNSPEC;
    };
    if cfg.is_external_addr(ip.saddr) {
        // Hairpinned (the sender's external address): never on the fast path.
        return TC_ACT_UNSPEC;
    }
    let received = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let header_len = match ipv4_shape(ip.version_ihl, ip.tot_len, ip.frag_off, received) {
        Ok(shape) if shape.fragment != Fragment::NonFirst => shape.header_len,
        _ => return TC_ACT_UNSPEC,
    };
    let l3 = start + ETH_HLEN;
    let Some(l4) = ptr_at::<L4Head>(l3, end, header_len) else {
        return TC_ACT_UNSPEC;
    };
    let l4 = l4 as usize;
    // The internal port (or echo identifier) and the remote port of the session.
    let (internal_port, remote_port) = match ip.proto {
        proto::UDP | proto::TCP => match read_at::<L4Head>(l4, end, 0) {
            Some(head) => (head.dst, head.src),
            None => return TC_ACT_UNSPEC,
        },
        proto::ICMP if read_u8_at(l4, end, 0) == Some(icmp_type::ECHO_REPLY) => {
            match read_at::<u16>(l4, end, ICMP_ID_OFF) {
                Some(id) => (id, 0),
                None => return TC_ACT_UNSPEC,
            }
        }
        _ => return TC_ACT_UNSPEC,
    };
    let flow = OutboundFlow {
        proto: ip.proto,
        internal_addr: ip.daddr,
        internal_port,
        remote_addr: ip.saddr,
        remote_port,
    };
    let Some(binding) = bindings::outbound_binding(cfg, &flow, false) else {
        // Routed between internal networks, or the gateway's own traffic: not a NAT flow.
        return TC_ACT_UNSPEC;
    };
    // SAFETY: map value pointer from a successful lookup.
    let (external_addr, external_port) =
        unsafe { (binding.as_ref().external_addr, binding.as_ref().external_port) };
    fastpath::confirm_inbound(
        ctx,
        cfg,
        ip.proto,
        external_addr,
        external_port,
        ip.saddr,
        remote_port,
    );
    TC_ACT_UNSPEC
}
