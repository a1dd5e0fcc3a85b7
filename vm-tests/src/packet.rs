//! Packet capture (an AF_PACKET socket inside a namespace) and the few header parsers and
//! checksum checks the tests need.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// IP protocol numbers (nat-common's, under the names the tests use).
pub use nat_common::proto::{ICMP as PROTO_ICMP, TCP as PROTO_TCP, UDP as PROTO_UDP};

/// One captured Ethernet frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The frame from the Ethernet header on.
    pub data: Vec<u8>,
    /// Sent by this host (rather than received).
    pub outgoing: bool,
}

impl Frame {
    /// The IPv4 packet inside, if the frame carries one.
    pub fn ipv4(&self) -> Option<Ipv4<'_>> {
        if self.data.len() < 14 + 20 || self.data[12..14] != [0x08, 0x00] {
            return None;
        }
        Ipv4::parse(&self.data[14..])
    }

    /// Whether `needle` occurs anywhere in the frame.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.data.windows(needle.len()).any(|w| w == needle)
    }
}

/// A capture on one interface of one namespace. Capturing starts when it is opened.
pub struct Sniffer {
    fd: OwnedFd,
}

fn os_err(what: &str) -> anyhow::Error {
    anyhow!(std::io::Error::last_os_error()).context(what.to_string())
}

impl Sniffer {
    /// Opens a raw packet socket on `dev` inside `ns`.
    pub fn open(ns: &Netns, dev: &str) -> Result<Sniffer> {
        let dev = std::ffi::CString::new(dev)?;
        ns.enter(move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is wrapped in OwnedFd at once.
            let raw =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) };
            if raw < 0 {
                return Err(os_err("socket(AF_PACKET)"));
            }
            // SAFETY: raw is a fresh, owned fd.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: dev is a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
            if ifindex == 0 {
                return Err(os_err("if_nametoindex"));
            }
            // SAFETY: zeroed sockaddr_ll is valid; fields set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: bind with a properly sized sockaddr_ll.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(os_err("bind(AF_PACKET)"));
            }
            let rcvbuf: libc::c_int = 4 << 20;
            // SAFETY: setsockopt with an int option.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    &rcvbuf as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: setsockopt with a timeval option.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            if rc != 0 {
                return Err(os_err("SO_RCVTIMEO"));
            }
            Ok(Sniffer { fd })
        })
    }

    /// Collects frames for at most `max`, stopping early once `done` returns true for a frame.
    pub fn capture(&self, max: Duration, mut done: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
        let deadline = Instant::now() + max;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: zeroed sockaddr_ll is valid as an out parameter.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom into a buffer of the given length.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 {
                continue;
            }
            let f = Frame {
                data: buf[..n as usize].to_vec(),
                outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
            };
            let stop = done(&f);
            frames.push(f);
            if stop {
                break;
            }
        }
        frames
    }

    /// Collects frames for exactly `dur` (bounded; nothing stops it early).
    pub fn capture_for(&self, dur: Duration) -> Vec<Frame> {
        self.capture(dur, |_| false)
    }
}

/// Internet checksum (RFC 1071) of `data`, folded and complemented, as a number written
/// big-endian (nat-common's sums native-order words, for storing with `to_ne_bytes`).
pub fn checksum(data: &[u8]) -> u16 {
    u16::from_be(nat_common::checksum::checksum(data))
}

/// A parsed IPv4 packet (header fields read on demand).
#[derive(Clone, Copy, Debug)]
pub struct Ipv4<'a> {
    /// The bytes from the IP header on (possibly truncated, e.g. inside an ICMP error).
    pub bytes: &'a [u8],
}

impl<'a> Ipv4<'a> {
    /// Parses the fixed part; `None` unless version 4 and at least 20 bytes.
    pub fn parse(bytes: &'a [u8]) -> Option<Ipv4<'a>> {
        (bytes.len() >= 20 && bytes[0] >> 4 == 4).then_some(Ipv4 { bytes })
    }

    /// Header length in bytes (IHL * 4).
    pub fn header_len(&self) -> usize {
        ((self.bytes[0] & 0x0f) as usize) * 4
    }

    /// Total length field.
    pub fn total_len(&self) -> usize {
        u16::from_be_bytes([self.bytes[2], self.bytes[3]]) as usize
    }

    /// Identification.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.bytes[4], self.bytes[5]])
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        ((u16::from_be_bytes([self.bytes[6], self.bytes[7]]) & 0x1fff) as usize) * 8
    }

    /// More-fragments flag.
    pub fn more_fragments(&self) -> bool {
        self.bytes[6] & 0x20 != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.bytes[8]
    }

    /// Protocol.
    pub fn proto(&self) -> u8 {
        self.bytes[9]
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.bytes[12], self.bytes[13], self.bytes[14], self.bytes[15])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.bytes[16], self.bytes[17], self.bytes[18], self.bytes[19])
    }

    /// Whether the header checksum is right (false if the header is malformed or truncated).
    pub fn header_checksum_ok(&self) -> bool {
        let hl = self.header_len();
        hl >= 20 && self.bytes.len() >= hl && checksum(&self.bytes[..hl]) == 0
    }

    /// The payload: from the end of the header to the total length (or the end of the bytes
    /// when truncated). Empty if the header is malformed.
    pub fn payload(&self) -> &'a [u8] {
        let hl = self.header_len();
        if hl < 20 || self.bytes.len() < hl {
            return &[];
        }
        let end = self.total_len().clamp(hl, self.bytes.len());
        &self.bytes[hl..end]
    }

    /// Source and destination port of a TCP or UDP payload (first fragment).
    pub fn ports(&self) -> Option<(u16, u16)> {
        let p = self.payload();
        if !matches!(self.proto(), PROTO_TCP | PROTO_UDP) || p.len() < 4 || self.frag_offset() != 0 {
            return None;
        }
        Some((u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])))
    }

    /// The UDP payload (after the 8-byte header), if this is an unfragmented UDP packet.
    pub fn udp_data(&self) -> Option<&'a [u8]> {
        let p = self.payload();
        (self.proto() == PROTO_UDP && p.len() >= 8 && self.frag_offset() == 0).then(|| &p[8..])
    }

    /// Whether the TCP/UDP checksum over the pseudo-header is right. A UDP checksum of 0 means
    /// "none" and counts as right. False if the segment is truncated.
    pub fn l4_checksum_ok(&self) -> bool {
        let p = self.payload();
        if self.total_len() > self.bytes.len() || self.frag_offset() != 0 || self.more_fragments() {
            return false;
        }
        match self.proto() {
            PROTO_UDP if p.len() >= 8 && p[6] == 0 && p[7] == 0 => true,
            PROTO_UDP | PROTO_TCP => {
                let mut covered = Vec::with_capacity(12 + p.len());
                covered.extend_from_slice(&self.bytes[12..20]);
                covered.extend_from_slice(&[0, self.proto()]);
                covered.extend_from_slice(&(p.len() as u16).to_be_bytes());
                covered.extend_from_slice(p);
                checksum(&covered) == 0
            }
            _ => false,
        }
    }

    /// The ICMP message, if this is ICMP.
    pub fn icmp(&self) -> Option<Icmp<'a>> {
        let p = self.payload();
        (self.proto() == PROTO_ICMP && p.len() >= 8 && self.frag_offset() == 0).then_some(Icmp { bytes: p })
    }
}

/// An ICMP message.
#[derive(Clone, Copy, Debug)]
pub struct Icmp<'a> {
    /// From the ICMP type on.
    pub bytes: &'a [u8],
}

impl<'a> Icmp<'a> {
    /// Type.
    pub fn kind(&self) -> u8 {
        self.bytes[0]
    }

    /// Code.
    pub fn code(&self) -> u8 {
        self.bytes[1]
    }

    /// Whether the ICMP checksum (over the whole message) is right.
    pub fn checksum_ok(&self) -> bool {
        checksum(self.bytes) == 0
    }

    /// Echo identifier (types 0 and 8).
    pub fn echo_id(&self) -> u16 {
        u16::from_be_bytes([self.bytes[4], self.bytes[5]])
    }

    /// Whether this is an error message (destination unreachable, time exceeded, parameter problem).
    pub fn is_error(&self) -> bool {
        matches!(self.kind(), 3 | 11 | 12)
    }

    /// The embedded ("inner") IP packet of an error message.
    pub fn inner(&self) -> Option<Ipv4<'a>> {
        if !self.is_error() {
            return None;
        }
        Ipv4::parse(&self.bytes[8..])
    }
}

/// Checks an ICMP error received by an internal host: valid outer IP and ICMP checksums, the
/// outer destination, a valid inner IP header checksum, and the inner source and destination
/// endpoints. Returns a description of the first problem.
pub fn check_icmp_error(
    ip: &Ipv4<'_>,
    outer_dst: Ipv4Addr,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    inner_ports: Option<(u16, u16)>,
) -> Result<()> {
    if !ip.header_checksum_ok() {
        bail!("outer IP header checksum is wrong");
    }
    if ip.dst() != outer_dst {
        bail!("outer destination is {}, expected {outer_dst}", ip.dst());
    }
    let icmp = ip.icmp().context("not an ICMP message")?;
    if !icmp.checksum_ok() {
        bail!("ICMP checksum is wrong");
    }
    let inner = icmp.inner().context("no embedded IP header")?;
    if !inner.header_checksum_ok() {
        bail!("embedded IP header checksum is wrong");
    }
    if inner.src() != inner_src || inner.dst() != inner_dst {
        bail!(
            "embedded header is {} -> {}, expected {inner_src} -> {inner_dst}",
            inner.src(),
            inner.dst()
        );
    }
    if let Some((sp, dp)) = inner_ports {
        let p = inner.payload();
        if p.len() < 4 {
            bail!("embedded transport header missing");
        }
        let got = (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
        if got != (sp, dp) {
            bail!("embedded ports are {}:{}, expected {sp}:{dp}", got.0, got.1);
        }
    }
    Ok(())
}

/// Short human summary of a frame, for failure messages.
pub fn describe(f: &Frame) -> String {
    match f.ipv4() {
        Some(ip) => {
            let ports = ip.ports().map(|(s, d)| format!(" {s}->{d}")).unwrap_or_default();
            let icmp = ip
                .icmp()
                .map(|i| format!(" icmp {}/{}", i.kind(), i.code()))
                .unwrap_or_default();
            format!(
                "{}{} -> {} proto {}{ports}{icmp} len {} ihl {} frag {}{}",
                if f.outgoing { "out " } else { "" },
                ip.src(),
                ip.dst(),
                ip.proto(),
                ip.total_len(),
                ip.header_len(),
                ip.frag_offset(),
                if ip.more_fragments() { "+MF" } else { "" }
            )
        }
        None => format!("non-IPv4 frame of {} bytes", f.data.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_header() {
        // Example header from RFC 1071 discussions: checksum field filled in must verify to 0.
        let mut h = [
            0x45, 0, 0, 0x54, 0, 0, 0x40, 0, 0x40, 1, 0, 0, 10, 0, 0, 2, 198, 51, 100, 1,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h), 0);
        let ip = Ipv4::parse(&h).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(ip.src(), Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn udp_checksum_roundtrip() {
        let mut p = vec![
            0x45, 0, 0, 30, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 198, 51, 100, 1,
        ];
        p.extend_from_slice(&[0x9c, 0x40, 0x27, 0x0f, 0, 10, 0, 0, b'h', b'i']);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17, 0, 10]);
        pseudo.extend_from_slice(&p[20..]);
        let uc = checksum(&pseudo);
        p[26..28].copy_from_slice(&uc.to_be_bytes());
        let ip = Ipv4::parse(&p).unwrap();
        assert!(ip.l4_checksum_ok());
        assert_eq!(ip.ports(), Some((40000, 9999)));
        assert_eq!(ip.udp_data(), Some(&b"hi"[..]));
        p[29] ^= 1;
        assert!(!Ipv4::parse(&p).unwrap().l4_checksum_ok());
    }
}
