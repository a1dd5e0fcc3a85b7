//! Sending whole IPv4 packets the controller builds or re-sends (parked fragments, ICMP errors)
//! through a raw socket with our own IP header (`IPPROTO_RAW` implies `IP_HDRINCL`; the kernel
//! fills in the header checksum, and the source address when it is zero).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};
use nat_common::checksum::checksum;

/// TTL of the ICMP errors the controller sends.
const ICMP_ERROR_TTL: u8 = 64;
/// ICMP destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Code: port unreachable (RFC 5382 REQ-4).
pub const CODE_PORT_UNREACHABLE: u8 = 3;
/// Code: host unreachable (RFC 6888 REQ-11 for a refused flow).
pub const CODE_HOST_UNREACHABLE: u8 = 1;
/// Code: communication administratively prohibited (RFC 5508 REQ-8 for a refused flow).
pub const CODE_ADMIN_PROHIBITED: u8 = 13;

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
    const IP_HLEN: usize = 20;
    const ICMP_HLEN: usize = 8;
    let total = IP_HLEN + ICMP_HLEN + quoted.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[1] = quoted.get(1).copied().unwrap_or(0);
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = ICMP_ERROR_TTL;
    p[9] = nat_common::proto::ICMP;
    p[12..16].copy_from_slice(&src.to_ne_bytes());
    p[16..20].copy_from_slice(&dst.to_ne_bytes());
    let header = checksum(&p[..IP_HLEN]);
    p[10..12].copy_from_slice(&header.to_ne_bytes());
    p[IP_HLEN] = icmp_type;
    p[IP_HLEN + 1] = code;
    p[IP_HLEN + ICMP_HLEN..].copy_from_slice(quoted);
    let icmp = checksum(&p[IP_HLEN..]);
    p[IP_HLEN + 2..IP_HLEN + 4].copy_from_slice(&icmp.to_ne_bytes());
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
        let p = icmp_error(src, dst, ICMP_DEST_UNREACH, CODE_PORT_UNREACHABLE, &quoted);
        assert_eq!(p.len(), 20 + 8 + quoted.len());
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum valid");
        assert_eq!(checksum(&p[20..]), 0, "ICMP checksum valid");
        assert_eq!((p[20], p[21]), (3, 3));
        assert_eq!(p[1], 0xb8, "TOS copied from the offending packet");
        assert_eq!(&p[12..16], &[198, 51, 100, 254]);
        assert_eq!(&p[28..], &quoted);
    }
}
