//! Hairpinning on the internal side: UDP and TCP to another internal host's external endpoint
//! (RFC 4787 REQ-9, RFC 5382 REQ-8) and the ICMP errors about such packets (RFC 5508 REQ-7).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use nat_common::{
    config::CONFIG_FLAG_REFUSAL_ICMP,
    maps::NOTICE_REFUSED,
    packet::{Ipv4Header, L4Head, IPV4_DST_OFF, IPV4_SRC_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF},
    proto, Counter, ExternalKey, NatConfig,
};

use crate::{
    access::{read_at, write_at},
    bindings::{self, Refusal},
    flow::OutboundFlow,
    icmp,
    maps::NAT_BINDINGS_IN,
    notices::{self, Source},
    rewrite::{set_ipv4_addr, update_transport_checksum},
    sessions,
    stats::count,
    tcp,
};

/// UDP and TCP from one internal host to another's external endpoint.
/// `partial`: the checksum is an offload seed (see `transport_checksum_is_partial`).
#[inline(always)]
pub(super) fn hairpin_transport(
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
pub(super) fn hairpin_icmp_error(cfg: &NatConfig, l3: usize, l4: usize, end: usize) -> u32 {
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
