//! Sending whole IPv4 packets the controller builds or re-sends (parked fragments, ICMP errors)
//! through a raw socket with our own IP header (`IPPROTO_RAW` implies `IP_HDRINCL`; the kernel
//! fills in the header checksum, and the source address when it is zero).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};
use nat_common::{
    checksum::checksum,
    packet::{Ipv4Header, ICMP_CHECK_OFF, ICMP_HLEN, IPV4_MIN_HLEN},
    proto,
};

/// TTL of the ICMP errors the controller sends.
const ICMP_ERROR_TTL: u8 = 64;
/// Version 4, header length 5 words: a header without options.
const VERSION_IHL_NO_OPTIONS: u8 = 0x45;

/// A raw IPv4 socket.
pub struct RawSocket(OwnedFd);

impl RawSocket {
    /// Opens the socket (needs CAP_NET_RAW).
    pub fn open() -> Result<Self> {
        // SAFETY: plain socket call; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("cannot open a raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(RawSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `packet` (a whole IPv4 packet) towards `dst` (raw, network order).
    pub fn send(&self, packet: &[u8], dst: u32) -> bool {
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: dst },
            sin_zero: [0; 8],
        };
        // SAFETY: valid socket, buffer and address of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        sent == packet.len() as isize
    }
}

/// Builds an ICMP error (`icmp_type`/`code`) from `src` to `dst` (raw addresses; `src` 0 lets
/// the kernel choose) quoting `quoted` (the offending packet's IP header and first 8 transport
/// bytes). The outer TOS copies the offending packet's (RFC 5508 §7.7).
pub fn icmp_error(src: u32, dst: u32, icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let total = IPV4_MIN_HLEN + ICMP_HLEN + quoted.len();
    let mut p = vec![0u8; total];
    let mut ip = Ipv4Header {
        version_ihl: VERSION_IHL_NO_OPTIONS,
        tos: Ipv4Header::read(quoted).map_or(0, |offending| offending.tos),
        tot_len: (total as u16).to_be(),
        ttl: ICMP_ERROR_TTL,
        proto: proto::ICMP,
        saddr: src,
        daddr: dst,
        ..Ipv4Header::default()
    };
    ip.write(&mut p);
    ip.check = checksum(&p[..IPV4_MIN_HLEN]);
    ip.write(&mut p);
    let icmp = &mut p[IPV4_MIN_HLEN..];
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[ICMP_HLEN..].copy_from_slice(quoted);
    let sum = checksum(icmp);
    icmp[ICMP_CHECK_OFF..ICMP_CHECK_OFF + 2].copy_from_slice(&sum.to_ne_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_error_is_well_formed() {
        let quoted = [
            0x45, 0xb8, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0, 198, 51, 100, 1, 198, 51, 100, 254, 0x1f, 0x90, 0x9c,
            0x40, 0, 0, 0, 1,
        ];
        let src = u32::from_ne_bytes([198, 51, 100, 254]);
        let dst = u32::from_ne_bytes([198, 51, 100, 1]);
        let p = icmp_error(
            src,
            dst,
            nat_common::packet::icmp_type::DEST_UNREACH,
            nat_common::packet::unreach_code::PORT_UNREACHABLE,
            &quoted,
        );
        assert_eq!(p.len(), 20 + 8 + quoted.len());
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum valid");
        assert_eq!(checksum(&p[20..]), 0, "ICMP checksum valid");
        assert_eq!((p[20], p[21]), (3, 3));
        assert_eq!(p[1], 0xb8, "TOS copied from the offending packet");
        assert_eq!(&p[12..16], &[198, 51, 100, 254]);
        assert_eq!(&p[28..], &quoted);
    }
}
