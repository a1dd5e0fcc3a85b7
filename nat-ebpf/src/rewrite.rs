//! Header rewrites with incremental checksum updates (RFC 1624), on directly accessible packet
//! memory (XDP, or TC after `bpf_skb_pull_data`).

use nat_common::{
    checksum::{looks_partial, replace_u16, replace_u32, udp_nonzero},
    packet::{IPV4_CHECK_OFF, UDP_CHECK_OFF},
    proto,
};

use crate::access::{read_at, write_at};

/// Replaces the address at `addr_off` in the IPv4 header at `ip` with `new` and updates the
/// header checksum. Returns the old address.
#[inline(always)]
pub fn set_ipv4_addr(ip: usize, end: usize, addr_off: usize, new: u32) -> Option<u32> {
    let old: u32 = read_at(ip, end, addr_off)?;
    let check: u16 = read_at(ip, end, IPV4_CHECK_OFF)?;
    write_at(ip, end, addr_off, new)?;
    write_at(ip, end, IPV4_CHECK_OFF, replace_u32(check, old, new))?;
    Some(old)
}

/// Updates the checksum of the TCP or UDP header at `l4` for an address change and a port
/// change (both covered by it, the address through the pseudo-header). A zero UDP checksum
/// means "none" and stays zero; a computed zero is sent as all ones (RFC 768). Returns the old
/// and new checksum.
///
/// With `partial` (the field holds an offload seed, see `transport_checksum_is_partial`) only
/// the pseudo-header part is updated, as the kernel does for `CHECKSUM_PARTIAL`: the port is
/// summed in when the checksum is completed.
#[inline(always)]
pub fn update_transport_checksum(
    l4: usize,
    end: usize,
    l4_proto: u8,
    addrs: (u32, u32),
    ports: (u16, u16),
    partial: bool,
) -> Option<(u16, u16)> {
    let check_at = transport_check_off(l4_proto);
    let old: u16 = read_at(l4, end, check_at)?;
    if l4_proto == proto::UDP && old == 0 {
        return Some((0, 0));
    }
    let mut new = replace_u32(old, addrs.0, addrs.1);
    if partial {
        write_at(l4, end, check_at, new)?;
        return Some((old, new));
    }
    new = replace_u16(new, ports.0, ports.1);
    if l4_proto == proto::UDP {
        new = udp_nonzero(new);
    }
    write_at(l4, end, check_at, new)?;
    Some((old, new))
}

/// Offset of the transport checksum field inside a TCP or UDP header.
#[inline(always)]
pub const fn transport_check_off(l4_proto: u8) -> usize {
    if l4_proto == proto::UDP {
        UDP_CHECK_OFF
    } else {
        nat_common::packet::TCP_CHECK_OFF
    }
}

/// True if the TCP/UDP checksum of the segment at `l4` (from `saddr` to `daddr`, `l4_len`
/// bytes) is still an offload seed: a veth from a local sender hands XDP such packets. They
/// must take the kernel path, which completes the checksum; a redirect would send the seed.
#[inline(always)]
pub fn transport_checksum_is_partial(
    l4: usize,
    end: usize,
    l4_proto: u8,
    saddr: u32,
    daddr: u32,
    l4_len: usize,
) -> bool {
    match read_at::<u16>(l4, end, transport_check_off(l4_proto)) {
        Some(field) => looks_partial(field, saddr, daddr, l4_proto, l4_len as u16),
        None => false,
    }
}
