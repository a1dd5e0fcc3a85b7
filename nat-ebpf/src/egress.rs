//! TC egress on the external interface: outbound translation (internal host -> remote).
//!
//! Every IPv4 packet leaving the interface whose source is not one of the NAT's external
//! addresses is translated, like nftables masquerade: the binding is found or created on the
//! first packet, the source rewritten, checksums fixed. A packet the NAT cannot translate is
//! dropped and counted rather than leaked with an internal source address.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use nat_common::{
    config::CONFIG_FLAG_REFUSAL_ICMP,
    maps::NOTICE_REFUSED,
    packet::{
        check_transport, icmp_type, ipv4_shape, Fragment, Ipv4Header, Ipv4Shape, L4Head, ETH_HLEN,
        ETH_P_IP_BE, ETH_TYPE_OFF, ICMP_CHECK_OFF, ICMP_EMBEDDED_L4_MIN, ICMP_HLEN, ICMP_ID_OFF,
        IPV4_MAX_HLEN, IPV4_SRC_OFF, L4_SRC_PORT_OFF, TCP_MIN_HLEN,
    },
    proto, Counter, NatConfig,
};

use crate::{
    access::{ptr_at, read_at, read_u8_at, write_at},
    bindings::{self, external_addr_for},
    fastpath,
    flow::OutboundFlow,
    fragments, icmp,
    maps::NAT_CONFIG,
    notices::{self, Source},
    rewrite::{set_ipv4_addr, transport_check_off},
    stats::count,
    tcp,
};

/// Headers that must be in the linear part of the skb for direct access: the deepest case is
/// an ICMP error (outer IP with options, ICMP, embedded IP with options, embedded TCP).
const PULL_LEN: u32 = (ETH_HLEN + IPV4_MAX_HLEN + ICMP_HLEN + IPV4_MAX_HLEN + TCP_MIN_HLEN) as u32;
/// Size field of `bpf_l4_csum_replace` flags for a 4-byte and a 2-byte change.
const CSUM_SIZE_U32: u64 = 4;
const CSUM_SIZE_U16: u64 = 2;
/// Multicast 224.0.0.0/4 and limited broadcast are never translated (first byte in memory).
const MULTICAST_FIRST_OCTET_MIN: u8 = 224;

/// Entry point logic: returns the TC action.
#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let Some(cfg) = NAT_CONFIG.get(0) else {
        return TC_ACT_OK;
    };
    if !cfg.is_ready() {
        return TC_ACT_OK;
    }
    let len = ctx.len();
    let wanted = if len < PULL_LEN { len } else { PULL_LEN };
    if ctx.data_end() - ctx.data() < wanted as usize {
        // Best effort: a short packet cannot be pulled further; the bounds checks catch it.
        let _ = ctx.pull_data(wanted);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(eth_type) = read_at::<u16>(start, end, ETH_TYPE_OFF) else {
        return TC_ACT_OK;
    };
    if eth_type != ETH_P_IP_BE {
        count(Counter::PassedNotNat);
        return TC_ACT_OK;
    }
    let Some(ip) = read_at::<Ipv4Header>(start, end, ETH_HLEN) else {
        return dropped(Counter::Malformed);
    };
    if cfg.is_external_addr(ip.saddr) {
        // The gateway's own traffic.
        count(Counter::PassedLocal);
        return TC_ACT_OK;
    }
    if ip.saddr == 0 || ip.daddr.to_ne_bytes()[0] >= MULTICAST_FIRST_OCTET_MIN {
        // DHCP from an unconfigured address, multicast, broadcast: not flows to translate.
        count(Counter::PassedNotNat);
        return TC_ACT_OK;
    }
    let shape = match ipv4_shape(
        ip.version_ihl,
        ip.tot_len,
        ip.frag_off,
        (len as usize).saturating_sub(ETH_HLEN),
    ) {
        Ok(shape) if check_transport(&shape, ip.proto).is_ok() => shape,
        _ => return dropped(Counter::Malformed),
    };
    let l3 = start + ETH_HLEN;
    if shape.fragment == Fragment::NonFirst {
        return non_first_fragment(cfg, l3, end, &ip);
    }
    // The one pointer every transport-header access is made from (see `access`).
    let Some(l4) = ptr_at::<L4Head>(l3, end, shape.header_len) else {
        return dropped(Counter::Malformed);
    };
    let l4 = l4 as usize;
    let l4_off = ETH_HLEN + shape.header_len;
    match ip.proto {
        proto::UDP | proto::TCP => transport(ctx, cfg, (l3, l4, end), l4_off, &ip, &shape),
        proto::ICMP => match read_u8_at(l4, end, 0) {
            Some(icmp_type::ECHO_REQUEST) => echo_request(ctx, cfg, (l3, l4, end), l4_off, &ip),
            Some(ty) if icmp_type::is_error(ty) => icmp_error(cfg, (l3, l4, end), &shape),
            _ => dropped(Counter::UnsupportedProtocol),
        },
        _ => dropped(Counter::UnsupportedProtocol),
    }
}

/// Pointers to the IPv4 header, the transport header, and the packet end.
type Headers = (usize, usize, usize);

/// UDP and TCP (whole datagrams and first fragments). `l4_off` is the transport header's
/// offset from the packet start, for the checksum helper.
#[inline(always)]
fn transport(
    ctx: &TcContext,
    cfg: &NatConfig,
    (l3, l4, end): Headers,
    l4_off: usize,
    ip: &Ipv4Header,
    shape: &Ipv4Shape,
) -> i32 {
    let Some(head) = read_at::<L4Head>(l4, end, 0) else {
        return dropped(Counter::Malformed);
    };
    let seg = if ip.proto == proto::TCP {
        let Some(seg) = tcp::segment_in(Some(Source::Tc(ctx)), ip, l3, l4, end) else {
            return dropped(Counter::Malformed);
        };
        seg
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
    // Failures were counted where they happened (port exhaustion, table full). A packet the
    // kernel forwarded confirms its session for the fast path.
    let Some((external_addr, external_port)) = bindings::bind(cfg, &flow, &seg, fastpath::forwarded(ctx))
    else {
        return refused(ctx, cfg, l4_off - ETH_HLEN);
    };
    if shape.fragment == Fragment::First {
        fragments::remember(ip, external_addr);
    }
    if set_ipv4_addr(l3, end, IPV4_SRC_OFF, external_addr).is_none()
        || write_at(l4, end, L4_SRC_PORT_OFF, external_port).is_none()
    {
        return dropped(Counter::Malformed);
    }
    // The kernel helper, unlike a plain incremental update, also handles skbs whose transport
    // checksum is still to be completed by offload (CHECKSUM_PARTIAL): there only the
    // pseudo-header part may change. UDP's zero checksum stays zero (MARK_MANGLED_0).
    let check_off = l4_off + transport_check_off(ip.proto);
    let mangled = if ip.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let fixed = ctx.l4_csum_replace(
        check_off,
        ip.saddr as u64,
        external_addr as u64,
        BPF_F_PSEUDO_HDR as u64 | CSUM_SIZE_U32 | mangled,
    );
    let fixed = fixed.and_then(|_| {
        ctx.l4_csum_replace(
            check_off,
            head.src as u64,
            external_port as u64,
            CSUM_SIZE_U16 | mangled,
        )
    });
    if fixed.is_err() {
        return dropped(Counter::Malformed);
    }
    count(Counter::TranslatedOut);
    TC_ACT_OK
}

/// ICMP echo requests: the identifier plays the port (RFC 5508 REQ-1, REQ-1a).
#[inline(always)]
fn echo_request(
    ctx: &TcContext,
    cfg: &NatConfig,
    (l3, l4, end): Headers,
    l4_off: usize,
    ip: &Ipv4Header,
) -> i32 {
    let Some(id) = read_at::<u16>(l4, end, ICMP_ID_OFF) else {
        return dropped(Counter::Malformed);
    };
    let flow = OutboundFlow {
        proto: proto::ICMP,
        internal_addr: ip.saddr,
        internal_port: id,
        remote_addr: ip.daddr,
        remote_port: 0,
    };
    let Some((external_addr, external_id)) =
        bindings::bind(cfg, &flow, &tcp::Tcp::none(), fastpath::forwarded(ctx))
    else {
        return refused(ctx, cfg, l4_off - ETH_HLEN);
    };
    if set_ipv4_addr(l3, end, IPV4_SRC_OFF, external_addr).is_none()
        || write_at(l4, end, ICMP_ID_OFF, external_id).is_none()
    {
        return dropped(Counter::Malformed);
    }
    if ctx
        .l4_csum_replace(
            l4_off + ICMP_CHECK_OFF,
            id as u64,
            external_id as u64,
            CSUM_SIZE_U16,
        )
        .is_err()
    {
        return dropped(Counter::Malformed);
    }
    count(Counter::TranslatedOut);
    TC_ACT_OK
}

/// ICMP errors from an internal host about a packet it received through the NAT
/// (RFC 5508 REQ-5). They do not refresh the binding (RFC 7857 §7.1): an error answering
/// inbound traffic must not keep a mapping alive. Errors about unknown bindings are dropped.
#[inline(always)]
fn icmp_error(cfg: &NatConfig, (l3, l4, end): Headers, shape: &Ipv4Shape) -> i32 {
    if shape.total_len
        < shape.header_len + ICMP_HLEN + nat_common::packet::IPV4_MIN_HLEN + ICMP_EMBEDDED_L4_MIN
    {
        return dropped(Counter::IcmpErrorDropped);
    }
    let Some(emb) = icmp::parse_embedded(l4, end) else {
        return dropped(Counter::IcmpErrorDropped);
    };
    if emb.ip.proto == proto::ICMP {
        // An internal host never receives echo requests through the NAT to complain about.
        return dropped(Counter::IcmpErrorDropped);
    }
    let flow = OutboundFlow {
        proto: emb.ip.proto,
        internal_addr: emb.ip.daddr,
        internal_port: emb.dst_port,
        remote_addr: emb.ip.saddr,
        remote_port: emb.src_port,
    };
    let Some(binding) = bindings::outbound_binding(cfg, &flow, false) else {
        return dropped(Counter::IcmpErrorDropped);
    };
    // SAFETY: map value pointer from a successful lookup.
    let binding = unsafe { binding.as_ref() };
    let (external_addr, external_port) = (binding.external_addr, binding.external_port);
    if icmp::rewrite(
        l3,
        l4,
        end,
        &emb,
        icmp::Side::Outbound,
        external_addr,
        external_port,
    )
    .is_none()
    {
        return dropped(Counter::IcmpErrorDropped);
    }
    count(Counter::IcmpErrorOut);
    TC_ACT_OK
}

/// Non-first fragments: same source address as their first fragment, or, if it has not been
/// seen yet, the host's paired external address (which is what the first fragment will get).
#[inline(always)]
fn non_first_fragment(cfg: &NatConfig, l3: usize, end: usize, ip: &Ipv4Header) -> i32 {
    let external_addr = fragments::translated_addr(ip).unwrap_or_else(|| external_addr_for(cfg, ip.saddr));
    if set_ipv4_addr(l3, end, IPV4_SRC_OFF, external_addr).is_none() {
        return dropped(Counter::Malformed);
    }
    count(Counter::FragmentTranslated);
    TC_ACT_OK
}

/// A new flow the NAT refused (no port, table or host limit, counted where it happened): drop
/// it, and let the controller tell the host when configured to (RFC 5508 REQ-8).
#[inline(always)]
fn refused(ctx: &TcContext, cfg: &NatConfig, header_len: usize) -> i32 {
    if cfg.flags & CONFIG_FLAG_REFUSAL_ICMP != 0 {
        notices::post(Source::Tc(ctx), NOTICE_REFUSED, header_len);
    }
    TC_ACT_SHOT
}

#[inline(always)]
fn dropped(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_SHOT
}
