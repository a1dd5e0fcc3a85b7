//! XDP on the internal interface(s): the outbound fast path, and hairpinning (RFC 4787 REQ-9,
//! RFC 5382 REQ-8, RFC 5508 REQ-7).
//!
//! An internal host that sends to another internal host's *external* endpoint addresses the
//! gateway itself, so the kernel would deliver it locally. Here such a packet is translated on
//! both sides, exactly as if it had left and come back: the source becomes the sender's own
//! external endpoint (created or refreshed like any outbound flow, REQ-9a), the destination
//! the target's internal endpoint, subject to the target binding's filter. The kernel then
//! routes it back out to the target. Everything else passes untouched, except packets whose
//! source no internal host may use (`source_check`): those are dropped first.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use nat_common::{
    checksum::replace_u16,
    config::CONFIG_FLAG_REFUSAL_ICMP,
    maps::NOTICE_REFUSED,
    packet::{
        check_transport, icmp_type, ipv4_shape, Fragment, Ipv4Header, L4Head, ETH_HLEN, ETH_P_IP_BE,
        ETH_TYPE_OFF, ICMP_CHECK_OFF, ICMP_ID_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, L4_DST_PORT_OFF,
        L4_SRC_PORT_OFF,
    },
    proto, Counter, ExternalKey, NatConfig,
};

use crate::{
    access::{ptr_at, read_at, read_u8_at, write_at},
    bindings::{self, Refusal},
    clock, fastpath,
    flow::OutboundFlow,
    icmp,
    maps::{NAT_BINDINGS_IN, NAT_CONFIG},
    notices::{self, Source},
    rewrite::{set_ipv4_addr, transport_checksum_is_partial, update_transport_checksum},
    sessions, source_check,
    stats::count,
    tcp,
};

/// Entry point logic: returns the XDP action.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(cfg) = NAT_CONFIG.get(0) else {
        return XDP_PASS;
    };
    if !cfg.is_ready() || read_at::<u16>(start, end, ETH_TYPE_OFF) != Some(ETH_P_IP_BE) {
        return XDP_PASS;
    }
    let l3 = start + ETH_HLEN;
    let Some(ip) = read_at::<Ipv4Header>(l3, end, 0) else {
        return XDP_PASS;
    };
    if cfg.is_external_addr(ip.saddr) {
        // Forging the NAT's own address (see `source_check`), checked before anything else.
        return spoofed();
    }
    let shape = match ipv4_shape(ip.version_ihl, ip.tot_len, ip.frag_off, end - l3) {
        // Fragments and broken headers are left to the kernel path (TC egress translates
        // outbound fragments; hairpinning fragments is not supported).
        Ok(shape) if shape.fragment == Fragment::None && check_transport(&shape, ip.proto).is_ok() => shape,
        _ => return kernel_path(ctx, cfg, &ip),
    };
    let Some(l4) = ptr_at::<L4Head>(l3, end, shape.header_len) else {
        return kernel_path(ctx, cfg, &ip);
    };
    let l4 = l4 as usize;
    let l4_len = shape.total_len - shape.header_len;
    let partial = (ip.proto == proto::UDP || ip.proto == proto::TCP)
        && transport_checksum_is_partial(l4, end, ip.proto, ip.saddr, ip.daddr, l4_len);
    if !cfg.is_external_addr(ip.daddr) {
        // Only the kernel can complete a seed checksum: TC egress translates such a packet.
        if !partial {
            if let Some(action) = outbound(ctx, cfg, (l3, l4, end), &ip) {
                return action;
            }
        }
        return kernel_path(ctx, cfg, &ip);
    }
    if source_check::spoofed(ctx, cfg, &ip) {
        return spoofed();
    }
    // To one of the gateway's external addresses: hairpinning, or the gateway itself.
    match ip.proto {
        proto::UDP | proto::TCP => hairpin_transport(ctx, cfg, (l3, l4, end), &ip, partial),
        proto::ICMP => match read_u8_at(l4, end, 0) {
            Some(ty) if icmp_type::is_error(ty) => hairpin_icmp_error(cfg, l3, l4, end),
            // Echo requests to an external address are for the gateway itself.
            _ => XDP_PASS,
        },
        _ => XDP_PASS,
    }
}

/// Hands the packet to the kernel, unless its source is one no internal host may use.
#[inline(always)]
fn kernel_path(ctx: &XdpContext, cfg: &NatConfig, ip: &Ipv4Header) -> u32 {
    if source_check::spoofed(ctx, cfg, ip) {
        return spoofed();
    }
    XDP_PASS
}

/// A packet whose source no internal host may use: dropped and counted.
#[inline(always)]
fn spoofed() -> u32 {
    count(Counter::SpoofedSource);
    XDP_DROP
}

/// The outbound fast path: UDP, TCP and echo requests of a flow the kernel has already
/// forwarded (see `fastpath`), that the kernel would route out of the external interface, are
/// translated here, exactly as TC egress would, and redirected there. The route is looked up
/// first, on the untouched packet. Returns the action for a packet it took, `None` for one the
/// kernel must handle (and TC egress translate).
#[inline(always)]
fn outbound(
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

/// UDP and TCP from one internal host to another's external endpoint.
/// `partial`: the checksum is an offload seed (see `transport_checksum_is_partial`).
#[inline(always)]
fn hairpin_transport(
    ctx: &XdpContext,
    cfg: &NatConfig,
    (l3, l4, end): (usize, usize, usize),
    ip: &Ipv4Header,
    partial: bool,
) -> u32 {
    let Some(head) = read_at::<L4Head>(l4, end, 0) else {
        return XDP_PASS;
    };
    let key = ExternalKey::of_network_order(ip.proto, ip.daddr, head.dst);
    if NAT_BINDINGS_IN.get_ptr(key).is_none() {
        // A service of the gateway itself, not another host's binding.
        return XDP_PASS;
    }
    let seg = if ip.proto == proto::TCP {
        tcp::segment_in(None, ip, l3, l4, end).unwrap_or_else(tcp::Tcp::none)
    } else {
        tcp::Tcp::none()
    };
    let flow = OutboundFlow {
        proto: ip.proto,
        internal_addr: ip.saddr,
        internal_port: head.src,
        remote_addr: ip.daddr,
        remote_port: head.dst,
    };
    let Some((src_addr, src_port)) = bindings::bind(cfg, &flow, &seg, false) else {
        return refused(ctx, cfg, l4 - l3);
    };
    let target = match bindings::inbound_binding(cfg, ip.proto, ip.daddr, head.dst, src_addr, src_port) {
        Ok(target) => target,
        Err(Refusal::NoBinding) => return XDP_PASS,
        Err(Refusal::Filtered) => {
            count(Counter::FilteredIn);
            return XDP_DROP;
        }
    };
    // Seen from the target, the segment comes in: an out-of-window RST is dropped (RFC 5961).
    if ip.proto == proto::TCP {
        if let Some(session) = sessions::endpoint(ip.proto, ip.daddr, head.dst, src_addr, src_port) {
            if sessions::track_inbound_tcp(session, &seg) {
                return XDP_DROP;
            }
        }
    }
    let rewritten = set_ipv4_addr(l3, end, IPV4_SRC_OFF, src_addr)
        .and_then(|_| set_ipv4_addr(l3, end, IPV4_DST_OFF, target.internal_addr))
        .and_then(|_| write_at(l4, end, L4_SRC_PORT_OFF, src_port))
        .and_then(|_| write_at(l4, end, L4_DST_PORT_OFF, target.internal_port))
        .and_then(|_| {
            update_transport_checksum(
                l4,
                end,
                ip.proto,
                (ip.saddr, src_addr),
                (head.src, src_port),
                partial,
            )
        })
        .and_then(|_| {
            update_transport_checksum(
                l4,
                end,
                ip.proto,
                (ip.daddr, target.internal_addr),
                (head.dst, target.internal_port),
                partial,
            )
        });
    if rewritten.is_none() {
        count(Counter::Malformed);
        return XDP_DROP;
    }
    count(Counter::Hairpinned);
    XDP_PASS
}

/// An ICMP error from internal host T about a hairpinned packet from S (RFC 5508 REQ-7):
/// seen from T it goes out (its embedded destination, T, becomes T's external endpoint, the
/// outer source T's external address), seen from S it comes in (the embedded source, S's
/// external endpoint, becomes S again, and so does the outer destination, REQ-7a).
#[inline(always)]
fn hairpin_icmp_error(cfg: &NatConfig, l3: usize, l4: usize, end: usize) -> u32 {
    let Some(emb) = icmp::parse_embedded(l4, end) else {
        return XDP_PASS;
    };
    let reporter = OutboundFlow {
        proto: emb.ip.proto,
        internal_addr: emb.ip.daddr,
        internal_port: emb.dst_port,
        remote_addr: emb.ip.saddr,
        remote_port: emb.src_port,
    };
    let Some(reporter_binding) = bindings::outbound_binding(cfg, &reporter, false) else {
        // Not about a hairpinned packet: the gateway's own business.
        return XDP_PASS;
    };
    // SAFETY: map value pointer from a successful lookup.
    let reporter_binding = unsafe { reporter_binding.as_ref() };
    let (reporter_addr, reporter_port) = (reporter_binding.external_addr, reporter_binding.external_port);
    let key = ExternalKey::of_network_order(emb.ip.proto, emb.ip.saddr, emb.src_port);
    // SAFETY: plain data copied out at once.
    let Some(origin) = (unsafe { NAT_BINDINGS_IN.get(key) }).copied() else {
        count(Counter::IcmpErrorDropped);
        return XDP_DROP;
    };
    let rewritten = icmp::rewrite(
        l3,
        l4,
        end,
        &emb,
        icmp::Side::Outbound,
        reporter_addr,
        reporter_port,
    )
    .and_then(|_| {
        icmp::rewrite(
            l3,
            l4,
            end,
            &emb,
            icmp::Side::Inbound,
            origin.internal_addr,
            origin.internal_port,
        )
    });
    if rewritten.is_none() {
        count(Counter::IcmpErrorDropped);
        return XDP_DROP;
    }
    count(Counter::Hairpinned);
    XDP_PASS
}

/// A new flow the NAT refused (counted where it happened): drop it, and let the controller tell
/// the host when configured to (RFC 5508 REQ-8).
#[inline(always)]
fn refused(ctx: &XdpContext, cfg: &NatConfig, header_len: usize) -> u32 {
    if cfg.flags & CONFIG_FLAG_REFUSAL_ICMP != 0 {
        notices::post(Source::Xdp(ctx), NOTICE_REFUSED, header_len);
    }
    XDP_DROP
}
