//! ICMP errors (destination unreachable, time exceeded, parameter problem) carry the start of
//! the packet that caused them. RFC 5508 REQ-4/REQ-5: translate the embedded IP and transport
//! header back to the form the receiver sent or will recognise, keep type and code, and fix
//! the outer address, the embedded checksums and the ICMP checksum.

use nat_common::{
    checksum::{replace_u16, replace_u32},
    packet::{icmp_type, Ipv4Header, L4Head, ICMP_CHECK_OFF, ICMP_HLEN, ICMP_ID_OFF, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_MIN_HLEN, IPV4_SRC_OFF},
    proto,
};

use crate::{
    access::{read_at, write_at},
    rewrite::{set_ipv4_addr, transport_check_off, update_transport_checksum},
};

/// Which way the error crosses the NAT, and so which side of the embedded packet is ours.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From a remote or a router: the embedded packet is one we sent out; its *source* is the
    /// external endpoint and becomes the internal one again.
    Inbound,
    /// From an internal host: the embedded packet is one we delivered; its *destination* is the
    /// internal endpoint and becomes the external one.
    Outbound,
}

/// The packet embedded in an ICMP error.
#[derive(Clone, Copy)]
pub struct Embedded {
    /// Offset of the embedded IPv4 header.
    pub l3: usize,
    /// Offset of the embedded transport header.
    pub l4: usize,
    /// The embedded IPv4 header.
    pub ip: Ipv4Header,
    /// Source port, or the echo identifier for an embedded echo request.
    pub src_port: u16,
    /// Destination port, or zero for an embedded echo request.
    pub dst_port: u16,
}

/// Parses the packet embedded after the ICMP header at `l4`. Options in the embedded header
/// are skipped (RFC 5508 REQ-3b). Only TCP, UDP and echo requests are translatable.
#[inline(always)]
pub fn parse_embedded(start: usize, end: usize, l4: usize) -> Option<Embedded> {
    let l3 = l4 + ICMP_HLEN;
    let ip: Ipv4Header = read_at(start, end, l3)?;
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return None;
    }
    let inner_l4 = l3 + header_len;
    let (src_port, dst_port) = match ip.proto {
        proto::UDP | proto::TCP => {
            let head: L4Head = read_at(start, end, inner_l4)?;
            (head.src, head.dst)
        }
        proto::ICMP => {
            let ty: u8 = read_at(start, end, inner_l4)?;
            if ty != icmp_type::ECHO_REQUEST {
                return None;
            }
            (read_at::<u16>(start, end, inner_l4 + ICMP_ID_OFF)?, 0)
        }
        _ => return None,
    };
    Some(Embedded { l3, l4: inner_l4, ip, src_port, dst_port })
}

/// Rewrites the error at `l3`/`l4` so that our side of the embedded packet becomes
/// `new_addr:new_port`, and the outer address on the same side (destination inbound, source
/// outbound) becomes `new_addr` (RFC 5508 REQ-4c, REQ-5c).
#[inline(always)]
pub fn rewrite(start: usize, end: usize, l3: usize, l4: usize, emb: &Embedded, side: Side, new_addr: u32, new_port: u16) -> Option<()> {
    // Inbound: outer destination, embedded source. Outbound: outer source, embedded destination.
    let (outer_addr_off, inner_addr_off, old_addr, old_port, port_off) = match side {
        Side::Inbound => (IPV4_DST_OFF, IPV4_SRC_OFF, emb.ip.saddr, emb.src_port, 0),
        Side::Outbound => (IPV4_SRC_OFF, IPV4_DST_OFF, emb.ip.daddr, emb.dst_port, 2),
    };
    let port_off = if emb.ip.proto == proto::ICMP { ICMP_ID_OFF } else { port_off };

    set_ipv4_addr(start, end, l3, outer_addr_off, new_addr)?;

    // Embedded IP header: address and its checksum.
    let inner_check_old: u16 = read_at(start, end, emb.l3 + IPV4_CHECK_OFF)?;
    let inner_check_new = replace_u32(inner_check_old, old_addr, new_addr);
    write_at(start, end, emb.l3 + inner_addr_off, new_addr)?;
    write_at(start, end, emb.l3 + IPV4_CHECK_OFF, inner_check_new)?;

    // Embedded transport header: port (or identifier) and, when present, its checksum. It is
    // updated, not validated: the embedded payload is usually truncated (RFC 5508 REQ-3c).
    write_at(start, end, emb.l4 + port_off, new_port)?;
    let (l4_check_old, l4_check_new) = match emb.ip.proto {
        proto::ICMP => {
            let old: u16 = read_at(start, end, emb.l4 + ICMP_CHECK_OFF)?;
            let new = replace_u16(old, old_port, new_port);
            write_at(start, end, emb.l4 + ICMP_CHECK_OFF, new)?;
            (old, new)
        }
        inner_proto => update_transport_checksum(
            start,
            end,
            inner_proto,
            emb.l4 + transport_check_off(inner_proto),
            (old_addr, new_addr),
            (old_port, new_port),
        )
        // A TCP checksum beyond the quoted 8 bytes is simply not there to update.
        .unwrap_or((0, 0)),
    };

    // The ICMP checksum covers every embedded byte changed above.
    let mut check: u16 = read_at(start, end, l4 + ICMP_CHECK_OFF)?;
    check = replace_u32(check, old_addr, new_addr);
    check = replace_u16(check, inner_check_old, inner_check_new);
    check = replace_u16(check, old_port, new_port);
    check = replace_u16(check, l4_check_old, l4_check_new);
    write_at(start, end, l4 + ICMP_CHECK_OFF, check)
}
