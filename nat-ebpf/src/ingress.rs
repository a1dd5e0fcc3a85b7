//! XDP on the external interface: inbound translation (remote -> internal host).
//!
//! Packets addressed to one of the NAT's external addresses are looked up by external endpoint,
//! filtered by the mode, rewritten to the internal endpoint and handed to the kernel, which
//! routes them to the internal interface. Everything else passes untouched. A packet the filter
//! rejects is dropped here, so it can never reach an internal host.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use nat_common::{
    checksum::replace_u16,
    config::CONFIG_FLAG_SYN_ICMP,
    maps::NOTICE_UNSOLICITED_SYN,
    maps::{SESSION_FLAG_INTERNAL_ENDPOINT, SESSION_KIND_ENDPOINT},
    packet::{
        check_transport, icmp_type, ipv4_shape, Fragment, Ipv4Header, Ipv4Shape, L4Head, ETH_HLEN,
        ETH_P_IP_BE, ETH_TYPE_OFF, ICMP_CHECK_OFF, ICMP_ID_OFF, IPV4_DST_OFF, L4_DST_PORT_OFF,
    },
    proto,
    tcp_state::flags as tcp_flags,
    Counter, ExternalKey, ExternalValue, NatConfig, SessionValue,
};

use crate::{
    access::{ptr_at, read_at, read_u8_at, write_at},
    bindings::{self, Refusal},
    fastpath, fragments, icmp, local,
    maps::{NAT_BINDINGS_IN, NAT_CONFIG},
    notices::{self, Source},
    rewrite::{set_ipv4_addr, transport_checksum_is_partial, update_transport_checksum},
    sessions,
    stats::count,
    tcp, trace,
};

/// Entry point logic: returns the XDP action.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(cfg) = NAT_CONFIG.get(0) else {
        return XDP_PASS;
    };
    if !cfg.is_ready() {
        return XDP_PASS;
    }
    let Some(eth_type) = read_at::<u16>(start, end, ETH_TYPE_OFF) else {
        return XDP_PASS;
    };
    if eth_type != ETH_P_IP_BE {
        count(Counter::PassedNotNat);
        return XDP_PASS;
    }
    let Some(ip) = read_at::<Ipv4Header>(start, end, ETH_HLEN) else {
        count(Counter::PassedNotNat);
        return XDP_PASS;
    };
    if !cfg.is_external_addr(ip.daddr) {
        count(Counter::PassedNotNat);
        return XDP_PASS;
    }
    let shape = match ipv4_shape(ip.version_ihl, ip.tot_len, ip.frag_off, end - start - ETH_HLEN) {
        Ok(shape) if check_transport(&shape, ip.proto).is_ok() => shape,
        _ => {
            count(Counter::Malformed);
            return XDP_DROP;
        }
    };
    let l3 = start + ETH_HLEN;
    if shape.fragment == Fragment::NonFirst {
        return non_first_fragment(ctx, l3, end, &ip, &shape);
    }
    // The one pointer every transport-header access is made from (see `access`).
    let Some(l4) = ptr_at::<L4Head>(l3, end, shape.header_len) else {
        return malformed();
    };
    let l4 = l4 as usize;
    match ip.proto {
        proto::UDP | proto::TCP => transport(ctx, cfg, (l3, l4, end), &ip, &shape),
        proto::ICMP => match read_u8_at(l4, end, 0) {
            Some(icmp_type::ECHO_REPLY) => echo_reply(ctx, cfg, (l3, l4, end), &ip),
            Some(ty) if icmp_type::is_error(ty) => {
                icmp_error(cfg, (l3, l4, end), shape.total_len - shape.header_len)
            }
            // Echo requests and other ICMP to the gateway itself.
            _ => {
                count(Counter::PassedNotNat);
                XDP_PASS
            }
        },
        _ => {
            count(Counter::PassedNotNat);
            XDP_PASS
        }
    }
}

/// The binding an inbound packet may use, or the action for a packet that has none: the
/// gateway's own stack gets packets for endpoints the NAT does not own (they are addressed to
/// the gateway, so the kernel never forwards them); filtered packets are dropped.
#[inline(always)]
fn admit(
    ctx: &XdpContext,
    cfg: &NatConfig,
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
) -> Result<ExternalValue, u32> {
    bindings::inbound_binding(cfg, proto, external_addr, external_port, remote_addr, remote_port).map_err(
        |refusal| match refusal {
            Refusal::NoBinding => {
                count(Counter::InboundNoBinding);
                XDP_PASS
            }
            Refusal::Filtered => {
                count(Counter::FilteredIn);
                let (remote, external) = ((remote_addr, remote_port), (external_addr, external_port));
                trace::inbound(ctx, cfg, trace::Event::Filtered, proto, remote, external);
                XDP_DROP
            }
        },
    )
}

/// Pointers to the IPv4 header, the transport header, and the packet end.
type Headers = (usize, usize, usize);

/// UDP and TCP (whole datagrams and first fragments).
#[inline(always)]
fn transport(
    ctx: &XdpContext,
    cfg: &NatConfig,
    (l3, l4, end): Headers,
    ip: &Ipv4Header,
    shape: &Ipv4Shape,
) -> u32 {
    let Some(head) = read_at::<L4Head>(l4, end, 0) else {
        return malformed();
    };
    let seg = if ip.proto == proto::TCP {
        let Some(seg) = tcp::segment_in(Some(Source::Xdp(ctx)), ip, l3, l4, end) else {
            return malformed();
        };
        seg
    } else {
        tcp::Tcp::none()
    };
    let tcp_flags = seg.flags();
    let session = sessions::endpoint(ip.proto, ip.daddr, head.dst, ip.saddr, head.src);
    let (internal_addr, internal_port) = match established(session) {
        Some(internal) => internal,
        None => match admit(ctx, cfg, ip.proto, ip.daddr, head.dst, ip.saddr, head.src) {
            Ok(binding) => (binding.internal_addr, binding.internal_port),
            // RFC 5382 REQ-4: no reply to an unsolicited SYN. The gateway's own listeners
            // still get theirs; anything else would be answered with a RST by the gateway's
            // stack.
            Err(XDP_PASS)
                if ip.proto == proto::TCP
                    && tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
                    && !local::tcp_socket_exists(ctx, ip, head.src, head.dst) =>
            {
                count(Counter::UnsolicitedSyn);
                let (remote, external) = ((ip.saddr, head.src), (ip.daddr, head.dst));
                trace::inbound(ctx, cfg, trace::Event::UnsolicitedSyn, ip.proto, remote, external);
                if cfg.flags & CONFIG_FLAG_SYN_ICMP != 0 {
                    notices::post(Source::Xdp(ctx), NOTICE_UNSOLICITED_SYN, shape.header_len);
                }
                return XDP_DROP;
            }
            Err(action) => return action,
        },
    };
    // An out-of-window RST (RFC 5961) is dropped, counted.
    if ip.proto == proto::TCP {
        if let Some(session) = session {
            if sessions::track_inbound_tcp(session, &seg) {
                return XDP_DROP;
            }
        }
    }
    let l4_len = shape.total_len - shape.header_len;
    let partial = transport_checksum_is_partial(l4, end, ip.proto, ip.saddr, ip.daddr, l4_len);
    let rewritten = set_ipv4_addr(l3, end, IPV4_DST_OFF, internal_addr).and_then(|_| {
        write_at(l4, end, L4_DST_PORT_OFF, internal_port)?;
        update_transport_checksum(
            l4,
            end,
            ip.proto,
            (ip.daddr, internal_addr),
            (head.dst, internal_port),
            partial,
        )
    });
    if rewritten.is_none() {
        return malformed();
    }
    if shape.fragment == Fragment::First {
        fragments::remember(ip, internal_addr);
    }
    count(Counter::TranslatedIn);
    if shape.fragment == Fragment::First || partial {
        // The rest of the datagram takes the kernel path, so its first part goes with it; a
        // seed checksum needs the kernel to complete it.
        return XDP_PASS;
    }
    deliver(ctx, l3, end, ip, internal_addr, session, tcp_flags)
}

/// The internal endpoint of an established session `session` (the packet's address-and-port
/// session, if any): the one hash lookup of an established inbound packet. Its existence is
/// the filter's verdict in every mode (the remote endpoint has been sent to, RFC 4787 §5), and
/// it holds the binding's internal endpoint (`SESSION_FLAG_INTERNAL_ENDPOINT`). `None`: the
/// packet goes through the binding and the mode's filter (`admit`).
#[inline(always)]
fn established(session: Option<*mut SessionValue>) -> Option<(u32, u16)> {
    let session = session?;
    // SAFETY: map value pointer from a successful lookup.
    let (flags, addr, port) = unsafe {
        (
            (*session).flags,
            (*session).internal_addr,
            (*session).internal_port,
        )
    };
    (flags & SESSION_FLAG_INTERNAL_ENDPOINT != 0).then_some((addr, port))
}

/// Hands a translated inbound packet on: straight to the internal interface when the fast path
/// serves it and the kernel has already forwarded one of the session's inbound packets (see
/// `fastpath`; `session` is the packet's address-and-port session), to the kernel's forwarding
/// otherwise. `tcp_flags` is zero for other protocols.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    l3: usize,
    end: usize,
    ip: &Ipv4Header,
    internal_addr: u32,
    session: Option<*mut SessionValue>,
    tcp_flags: u8,
) -> u32 {
    let Some(session) = session else {
        return XDP_PASS;
    };
    // SAFETY: map value pointer from a successful lookup.
    let flags = unsafe { (*session).flags };
    // The session's flag first: it is in the cache line just read, and a session is confirmed
    // only while the fast path is on.
    if !fastpath::inbound_confirmed(flags) || fastpath::kernel_path_tcp(tcp_flags) || !fastpath::enabled() {
        return XDP_PASS;
    }
    let translated = Ipv4Header {
        daddr: internal_addr,
        ..*ip
    };
    let Some(route) = fastpath::route(ctx, &translated, ctx.ingress_ifindex() as u32) else {
        return XDP_PASS;
    };
    match fastpath::forward(ctx.data(), end, l3, &route) {
        Some(action) => {
            count(Counter::FastPathRedirected);
            action
        }
        None => XDP_PASS,
    }
}

/// ICMP echo replies: the identifier plays the port (RFC 5508 REQ-1).
#[inline(always)]
fn echo_reply(ctx: &XdpContext, cfg: &NatConfig, (l3, l4, end): Headers, ip: &Ipv4Header) -> u32 {
    let Some(id) = read_at::<u16>(l4, end, ICMP_ID_OFF) else {
        return malformed();
    };
    let session = sessions::endpoint(proto::ICMP, ip.daddr, id, ip.saddr, 0);
    let (internal_addr, internal_id) = match established(session) {
        Some(internal) => internal,
        None => match admit(ctx, cfg, proto::ICMP, ip.daddr, id, ip.saddr, 0) {
            Ok(binding) => (binding.internal_addr, binding.internal_port),
            Err(action) => return action,
        },
    };
    let rewritten = set_ipv4_addr(l3, end, IPV4_DST_OFF, internal_addr).and_then(|_| {
        let check: u16 = read_at(l4, end, ICMP_CHECK_OFF)?;
        write_at(l4, end, ICMP_ID_OFF, internal_id)?;
        write_at(l4, end, ICMP_CHECK_OFF, replace_u16(check, id, internal_id))
    });
    if rewritten.is_none() {
        return malformed();
    }
    count(Counter::TranslatedIn);
    deliver(ctx, l3, end, ip, internal_addr, session, 0)
}

/// ICMP errors about a packet we sent out (RFC 5508 REQ-4). The error may come from any router
/// on the path, so its source is not filtered (RFC 4787 REQ-12a); but the embedded packet must
/// match a binding *and* a session with its destination, so a forged error about a mapping or
/// remote that does not exist is dropped. Errors never change or delete state (RFC 4787 REQ-12).
#[inline(always)]
fn icmp_error(cfg: &NatConfig, (l3, l4, end): Headers, icmp_len: usize) -> u32 {
    let Some(emb) = icmp::parse_embedded(l4, end) else {
        return icmp_error_dropped();
    };
    if !icmp::checksums_valid(l4, end, icmp_len, &emb) {
        return icmp_error_dropped();
    }
    if !cfg.is_external_addr(emb.ip.saddr) {
        return icmp_error_dropped();
    }
    let key = ExternalKey::of_network_order(emb.ip.proto, emb.ip.saddr, emb.src_port);
    // SAFETY: plain data copied out at once.
    let Some(binding) = (unsafe { NAT_BINDINGS_IN.get(key) }).copied() else {
        return icmp_error_dropped();
    };
    if !sessions::exists(
        emb.ip.proto,
        emb.ip.saddr,
        emb.src_port,
        emb.ip.daddr,
        emb.dst_port,
        SESSION_KIND_ENDPOINT,
    ) {
        return icmp_error_dropped();
    }
    if icmp::rewrite(
        l3,
        l4,
        end,
        &emb,
        icmp::Side::Inbound,
        binding.internal_addr,
        binding.internal_port,
    )
    .is_none()
    {
        return icmp_error_dropped();
    }
    count(Counter::IcmpErrorIn);
    XDP_PASS
}

/// Non-first fragments carry no ports: they follow their first fragment, or are parked for
/// the controller when it has not been seen yet.
#[inline(always)]
fn non_first_fragment(ctx: &XdpContext, l3: usize, end: usize, ip: &Ipv4Header, shape: &Ipv4Shape) -> u32 {
    let Some(internal_addr) = fragments::translated_addr(ip) else {
        // Arrived before its first fragment (RFC 4787 REQ-14): the controller sends it on once
        // the first fragment has been translated. Either way it never goes in untranslated.
        if fragments::park(ctx, ETH_HLEN, shape.total_len) {
            count(Counter::FragmentParked);
        } else {
            count(Counter::FragmentNoState);
        }
        return XDP_DROP;
    };
    if set_ipv4_addr(l3, end, IPV4_DST_OFF, internal_addr).is_none() {
        return malformed();
    }
    count(Counter::FragmentTranslated);
    XDP_PASS
}

#[inline(always)]
fn malformed() -> u32 {
    count(Counter::Malformed);
    XDP_DROP
}

#[inline(always)]
fn icmp_error_dropped() -> u32 {
    count(Counter::IcmpErrorDropped);
    XDP_DROP
}
