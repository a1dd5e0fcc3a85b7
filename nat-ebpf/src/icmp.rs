//! ICMP errors (destination unreachable, time exceeded, parameter problem) carry the start of
//! the packet that caused them. RFC 5508 REQ-4/REQ-5: translate the embedded IP and transport
//! header back to the form the receiver sent or will recognise, keep type and code, and fix
//! the outer address, the embedded checksums and the ICMP checksum.

use nat_common::{
    checksum::{fold, replace_u16, replace_u32},
    packet::{
        icmp_type, Ipv4Header, L4Head, ICMP_CHECK_OFF, ICMP_HLEN, ICMP_ID_OFF, IPV4_CHECK_OFF, IPV4_DST_OFF,
        IPV4_MIN_HLEN, IPV4_SRC_OFF,
    },
    proto,
};

use crate::{
    access::{ptr_at, read_at, read_u8_at, write_at},
    rewrite::{set_ipv4_addr, update_transport_checksum},
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
    /// Pointer to the embedded IPv4 header (checked for its fixed part).
    pub l3: usize,
    /// Pointer to the embedded transport header (checked for 8 bytes).
    pub l4: usize,
    /// Copy of the embedded IPv4 header.
    pub ip: Ipv4Header,
    /// Source port, or the echo identifier for an embedded echo request.
    pub src_port: u16,
    /// Destination port, or zero for an embedded echo request.
    pub dst_port: u16,
}

/// Parses the packet embedded after the ICMP header at `icmp` (a pointer). Options in the
/// embedded header are skipped (RFC 5508 REQ-3b). Only TCP, UDP and echo requests are
/// translatable.
#[inline(always)]
pub fn parse_embedded(icmp: usize, end: usize) -> Option<Embedded> {
    let l3 = ptr_at::<Ipv4Header>(icmp, end, ICMP_HLEN)? as usize;
    // SAFETY: checked by `ptr_at` just above.
    let ip = unsafe { core::ptr::read_unaligned(l3 as *const Ipv4Header) };
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return None;
    }
    let l4 = ptr_at::<L4Head>(l3, end, header_len)? as usize;
    // SAFETY: checked by `ptr_at` just above.
    let head = unsafe { core::ptr::read_unaligned(l4 as *const L4Head) };
    let (src_port, dst_port) = match ip.proto {
        proto::UDP | proto::TCP => (head.src, head.dst),
        proto::ICMP => {
            if read_u8_at(l4, end, 0)? != icmp_type::ECHO_REQUEST {
                return None;
            }
            (read_at::<u16>(l4, end, ICMP_ID_OFF)?, 0)
        }
        _ => return None,
    };
    Some(Embedded {
        l3,
        l4,
        ip,
        src_port,
        dst_port,
    })
}

/// Rewrites the error whose outer IPv4 header is at `ip` and ICMP header at `icmp` so that
/// our side of the embedded packet becomes `new_addr:new_port`, and the outer address on the
/// same side (destination inbound, source outbound) becomes `new_addr` (RFC 5508 REQ-4c,
/// REQ-5c).
#[inline(always)]
pub fn rewrite(
    ip: usize,
    icmp: usize,
    end: usize,
    emb: &Embedded,
    side: Side,
    new_addr: u32,
    new_port: u16,
) -> Option<()> {
    // Inbound: outer destination, embedded source. Outbound: outer source, embedded destination.
    let (outer_addr_off, inner_addr_off, old_addr, old_port, port_off) = match side {
        Side::Inbound => (IPV4_DST_OFF, IPV4_SRC_OFF, emb.ip.saddr, emb.src_port, 0),
        Side::Outbound => (IPV4_SRC_OFF, IPV4_DST_OFF, emb.ip.daddr, emb.dst_port, 2),
    };
    let port_off = if emb.ip.proto == proto::ICMP {
        ICMP_ID_OFF
    } else {
        port_off
    };

    set_ipv4_addr(ip, end, outer_addr_off, new_addr)?;

    // Embedded IP header: address and its checksum.
    let inner_check_old: u16 = read_at(emb.l3, end, IPV4_CHECK_OFF)?;
    let inner_check_new = replace_u32(inner_check_old, old_addr, new_addr);
    write_at(emb.l3, end, inner_addr_off, new_addr)?;
    write_at(emb.l3, end, IPV4_CHECK_OFF, inner_check_new)?;

    // Embedded transport header: port (or identifier) and, when present, its checksum. It is
    // updated, not validated: the embedded payload is usually truncated (RFC 5508 REQ-3c).
    write_at(emb.l4, end, port_off, new_port)?;
    let (l4_check_old, l4_check_new) = match emb.ip.proto {
        proto::ICMP => {
            let old: u16 = read_at(emb.l4, end, ICMP_CHECK_OFF)?;
            let new = replace_u16(old, old_port, new_port);
            write_at(emb.l4, end, ICMP_CHECK_OFF, new)?;
            (old, new)
        }
        // The embedded header is a copy of a packet long sent, so its checksum is final. A TCP
        // checksum beyond the quoted 8 bytes is simply not there to update.
        inner_proto => update_transport_checksum(
            emb.l4,
            end,
            inner_proto,
            (old_addr, new_addr),
            (old_port, new_port),
            false,
        )
        .unwrap_or((0, 0)),
    };

    // The ICMP checksum covers every embedded byte changed above.
    let mut check: u16 = read_at(icmp, end, ICMP_CHECK_OFF)?;
    check = replace_u32(check, old_addr, new_addr);
    check = replace_u16(check, inner_check_old, inner_check_new);
    check = replace_u16(check, old_port, new_port);
    check = replace_u16(check, l4_check_old, l4_check_new);
    write_at(icmp, end, ICMP_CHECK_OFF, check)
}

/// Largest ICMP error whose checksum is verified: RFC 1812 §4.3.2.3 keeps errors within 576
/// bytes, which is what routers send. A longer one is passed on unverified.
pub const VERIFY_MAX_BYTES: usize = 576;

/// One's complement sum of `len` bytes at `at` as 16-bit words (`len` even, at most
/// `max_bytes`), or `None` if they are not all inside the packet.
#[inline(always)]
fn sum_words(at: usize, end: usize, len: usize, max_bytes: usize) -> Option<u32> {
    let mut sum = 0u32;
    let mut off = 0;
    while off < max_bytes {
        if off >= len {
            break;
        }
        sum += read_at::<u16>(at, end, off)? as u32;
        off += 2;
    }
    Some(sum)
}

/// RFC 5508 REQ-3 and REQ-3a: an error whose ICMP checksum (over `icmp_len` bytes) or whose
/// embedded IPv4 header checksum is wrong is dropped. The embedded transport checksum is not
/// checked (REQ-3c): the quoted payload is usually truncated.
#[inline(always)]
pub fn checksums_valid(icmp: usize, end: usize, icmp_len: usize, emb: &Embedded) -> bool {
    let inner_header_len = ((emb.ip.version_ihl & 0x0f) as usize) * 4;
    match sum_words(emb.l3, end, inner_header_len, nat_common::packet::IPV4_MAX_HLEN) {
        Some(sum) if fold(sum) == 0xffff => {}
        _ => return false,
    }
    if icmp_len > VERIFY_MAX_BYTES {
        return true;
    }
    let even = icmp_len & !1;
    let Some(mut sum) = sum_words(icmp, end, even, VERIFY_MAX_BYTES) else {
        return false;
    };
    if icmp_len & 1 == 1 {
        // The odd last byte counts as the high byte of a zero-padded word (RFC 1071). It may
        // be the packet's last byte, so read the two bytes that end with it (an ICMP message is
        // at least 8 bytes long, so `even - 1` is inside it).
        match read_at::<[u8; 2]>(icmp, end, even - 1) {
            Some([_, last]) => sum += u16::from_ne_bytes([last, 0]) as u32,
            None => return false,
        }
    }
    fold(sum) == 0xffff
}
