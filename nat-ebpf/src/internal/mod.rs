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

mod hairpin;
mod outbound;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use nat_common::{
    packet::{
        check_transport, icmp_type, ipv4_shape, Fragment, Ipv4Header, L4Head, ETH_HLEN, ETH_P_IP_BE,
        ETH_TYPE_OFF,
    },
    proto, Counter, NatConfig,
};

use self::{
    hairpin::{hairpin_icmp_error, hairpin_transport},
    outbound::outbound,
};
use crate::{
    access::{ptr_at, read_at, read_u8_at},
    maps::NAT_CONFIG,
    rewrite::transport_checksum_is_partial,
    source_check,
    stats::count,
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
