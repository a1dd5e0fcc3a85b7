//! The internal side's outbound fast path (see `crate::fastpath` for its policy).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use nat_common::{
    checksum::replace_u16,
    packet::{icmp_type, Ipv4Header, L4Head, ICMP_CHECK_OFF, ICMP_ID_OFF, IPV4_SRC_OFF, L4_SRC_PORT_OFF},
    proto, Counter, NatConfig,
};

use crate::{
    access::{read_at, read_u8_at, write_at},
    bindings, clock, fastpath,
    flow::OutboundFlow,
    rewrite::{set_ipv4_addr, update_transport_checksum},
    sessions,
    stats::count,
    tcp,
};

/// The outbound fast path: UDP, TCP and echo requests of a flow the kernel has already
/// forwarded (see `fastpath`), that the kernel would route out of the external interface, are
/// translated here, exactly as TC egress would, and redirected there. The route is looked up
/// first, on the untouched packet. Returns the action for a packet it took, `None` for one the
/// kernel must handle (and TC egress translate).
#[inline(always)]
pub(super) fn outbound(
    ctx: &XdpContext,
    cfg: &NatConfig,
    (l3, l4, end): (usize, usize, usize),
    ip: &Ipv4Header,
) -> Option<u32> {
    let is_echo_request = ip.proto == proto::ICMP && read_u8_at(l4, end, 0) == Some(icmp_type::ECHO_REQUEST);
    if !(ip.proto == proto::UDP || ip.proto == proto::TCP || is_echo_request)
        || ip.saddr == 0
        || !fastpath::enabled()
    {
        return None;
    }
    let route = fastpath::route(ctx, ip, ctx.ingress_ifindex() as u32)?;
    if route.ifindex != cfg.external_ifindex {
        // Routed between internal networks: not the NAT's business.
        return None;
    }
    let head = read_at::<L4Head>(l4, end, 0)?;
    let (src_port, port_off) = if is_echo_request {
        (read_at::<u16>(l4, end, ICMP_ID_OFF)?, ICMP_ID_OFF)
    } else {
        (head.src, L4_SRC_PORT_OFF)
    };
    let remote_port = if is_echo_request { 0 } else { head.dst };
    let seg = if ip.proto == proto::TCP {
        tcp::segment_in(None, ip, l3, l4, end)?
    } else {
        tcp::Tcp::none()
    };
    if fastpath::kernel_path_tcp(seg.flags()) {
        return None;
    }
    let flow = OutboundFlow {
        proto: ip.proto,
        internal_addr: ip.saddr,
        internal_port: src_port,
        remote_addr: ip.daddr,
        remote_port,
    };
    // Not yet forwarded by the kernel: it decides on this packet.
    let (binding, session) = fastpath::confirmed_binding(cfg, &flow)?;
    let now = clock::now_ns();
    bindings::refresh(binding, now);
    sessions::use_outbound(session, &flow, &seg, now, false);
    // SAFETY: map value pointer from a successful lookup.
    let (external_addr, external_port) =
        unsafe { (binding.as_ref().external_addr, binding.as_ref().external_port) };
    let rewritten = set_ipv4_addr(l3, end, IPV4_SRC_OFF, external_addr).and_then(|_| {
        write_at(l4, end, port_off, external_port)?;
        if is_echo_request {
            let check: u16 = read_at(l4, end, ICMP_CHECK_OFF)?;
            write_at(
                l4,
                end,
                ICMP_CHECK_OFF,
                replace_u16(check, src_port, external_port),
            )
        } else {
            update_transport_checksum(
                l4,
                end,
                ip.proto,
                (ip.saddr, external_addr),
                (src_port, external_port),
                false,
            )
            .map(|_| ())
        }
    });
    if rewritten.is_none() {
        count(Counter::Malformed);
        return Some(XDP_DROP);
    }
    count(Counter::TranslatedOut);
    match fastpath::forward(ctx.data(), end, l3, &route) {
        Some(action) => {
            count(Counter::FastPathRedirected);
            Some(action)
        }
        // Already translated: the kernel forwards it as it is.
        None => Some(XDP_PASS),
    }
}
