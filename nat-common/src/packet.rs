//! Header layouts and the header checks that decide whether the NAT may touch a packet.
//!
//! The data path reads headers straight from packet memory into these `#[repr(C)]` structs
//! (every field in network byte order, as on the wire) and asks the pure functions here what
//! kind of packet it holds. A packet that fails a check is counted as malformed and never
//! translated.

/// Ethernet header length (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
pub const ETH_TYPE_OFF: usize = 12;
/// EtherType of IPv4, network byte order as loaded natively from the packet.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Minimum IPv4 header length (IHL 5).
pub const IPV4_MIN_HLEN: usize = 20;
/// Maximum IPv4 header length (IHL 15).
pub const IPV4_MAX_HLEN: usize = 60;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// TCP header length without options.
pub const TCP_MIN_HLEN: usize = 20;
/// ICMP header length (type, code, checksum, and four bytes of rest-of-header).
pub const ICMP_HLEN: usize = 8;
/// Bytes of the embedded transport header an ICMP error must carry (RFC 792: 64 bits).
pub const ICMP_EMBEDDED_L4_MIN: usize = 8;

/// Offset of the source port inside a UDP or TCP header.
pub const L4_SRC_PORT_OFF: usize = 0;
/// Offset of the destination port inside a UDP or TCP header.
pub const L4_DST_PORT_OFF: usize = 2;
/// Offset of the checksum field inside a UDP header.
pub const UDP_CHECK_OFF: usize = 6;
/// Offset of the flags byte inside a TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
/// Offset of the checksum field inside a TCP header.
pub const TCP_CHECK_OFF: usize = 16;
/// Offset of the checksum field inside an ICMP header.
pub const ICMP_CHECK_OFF: usize = 2;
/// Offset of the echo identifier inside an ICMP header.
pub const ICMP_ID_OFF: usize = 4;
/// Offset of the checksum inside an IPv4 header.
pub const IPV4_CHECK_OFF: usize = 10;
/// Offset of the source address inside an IPv4 header.
pub const IPV4_SRC_OFF: usize = 12;
/// Offset of the destination address inside an IPv4 header.
pub const IPV4_DST_OFF: usize = 16;

/// ICMP types the NAT handles (RFC 792).
pub mod icmp_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable (includes "fragmentation needed", code 4).
    pub const DEST_UNREACH: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded (traceroute).
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 12;

    /// True for the error types whose embedded header the NAT translates (RFC 5508 REQ-4/5).
    pub const fn is_error(ty: u8) -> bool {
        matches!(ty, DEST_UNREACH | TIME_EXCEEDED | PARAMETER_PROBLEM)
    }
}

/// Codes of the ICMP "destination unreachable" errors the NAT sends (RFC 792, RFC 1812 §5.2.7.1).
pub mod unreach_code {
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 1;
    /// Port unreachable.
    pub const PORT_UNREACHABLE: u8 = 3;
    /// Communication administratively prohibited.
    pub const ADMIN_PROHIBITED: u8 = 13;
}

/// The fixed part of an IPv4 header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Ipv4Header {
    /// Version (high nibble) and IHL (low nibble, 32-bit words).
    pub version_ihl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Total length (network order).
    pub tot_len: u16,
    /// Identification (network order).
    pub id: u16,
    /// Flags and fragment offset (network order).
    pub frag_off: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address (network order).
    pub saddr: u32,
    /// Destination address (network order).
    pub daddr: u32,
}

/// The IP version this NAT translates.
pub const IPV4_VERSION: u8 = 4;
/// Offset of the TTL (and, after it, the protocol: the two form one checksummed word).
pub const IPV4_TTL_OFF: usize = 8;

impl Ipv4Header {
    /// Header length in bytes, from the IHL field.
    pub const fn header_len(&self) -> usize {
        (self.version_ihl & 0x0f) as usize * 4
    }

    /// The fixed header at the start of `bytes` (a packet in a user-space buffer), fields in
    /// network order as the data path sees them. None when shorter than a header or not IPv4.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; IPV4_MIN_HLEN] = bytes.get(..IPV4_MIN_HLEN)?.try_into().ok()?;
        let header = Ipv4Header {
            version_ihl: b[0],
            tos: b[1],
            tot_len: u16::from_ne_bytes([b[2], b[3]]),
            id: u16::from_ne_bytes([b[4], b[5]]),
            frag_off: u16::from_ne_bytes([b[6], b[7]]),
            ttl: b[IPV4_TTL_OFF],
            proto: b[IPV4_TTL_OFF + 1],
            check: u16::from_ne_bytes([b[IPV4_CHECK_OFF], b[IPV4_CHECK_OFF + 1]]),
            saddr: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            daddr: u32::from_ne_bytes([b[16], b[17], b[18], b[19]]),
        };
        (header.version_ihl >> 4 == IPV4_VERSION).then_some(header)
    }

    /// Writes the fixed header into the first `IPV4_MIN_HLEN` bytes of `out` (which must hold
    /// them), fields as they are (network order).
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..IPV4_MIN_HLEN];
        out[0] = self.version_ihl;
        out[1] = self.tos;
        out[2..4].copy_from_slice(&self.tot_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.id.to_ne_bytes());
        out[6..8].copy_from_slice(&self.frag_off.to_ne_bytes());
        out[IPV4_TTL_OFF] = self.ttl;
        out[IPV4_TTL_OFF + 1] = self.proto;
        out[IPV4_CHECK_OFF..IPV4_CHECK_OFF + 2].copy_from_slice(&self.check.to_ne_bytes());
        out[IPV4_SRC_OFF..IPV4_SRC_OFF + 4].copy_from_slice(&self.saddr.to_ne_bytes());
        out[IPV4_DST_OFF..IPV4_DST_OFF + 4].copy_from_slice(&self.daddr.to_ne_bytes());
    }

    /// What forwarding does to the header: one off the TTL, the checksum updated incrementally
    /// (RFC 1624). False, and nothing changed, when the TTL would reach zero (RFC 1812 §5.3.1:
    /// the packet must not be forwarded).
    pub fn decrement_ttl(&mut self) -> bool {
        if self.ttl <= 1 {
            return false;
        }
        let old = u16::from_ne_bytes([self.ttl, self.proto]);
        self.ttl -= 1;
        self.check =
            crate::checksum::replace_u16(self.check, old, u16::from_ne_bytes([self.ttl, self.proto]));
        true
    }

    /// Sets the destination address (network order), updating the checksum incrementally.
    pub fn set_daddr(&mut self, daddr: u32) {
        self.check = crate::checksum::replace_u32(self.check, self.daddr, daddr);
        self.daddr = daddr;
    }
}

/// The first eight bytes of a UDP or TCP header, or of an ICMP header (where the
/// "ports" are type/code and checksum and the echo identifier is `id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct L4Head {
    /// Source port (network order), or ICMP type and code.
    pub src: u16,
    /// Destination port (network order), or ICMP checksum.
    pub dst: u16,
    /// UDP length and checksum, TCP sequence number, or ICMP identifier and sequence.
    pub rest: u32,
}

/// "More fragments" flag in `frag_off` (host order).
const IP_MF: u16 = 0x2000;
/// Fragment offset mask in `frag_off` (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Where a packet stands with respect to IP fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// Offset 0 with "more fragments": carries the transport header.
    First,
    /// Offset > 0: no transport header; only its addresses can be translated.
    NonFirst,
}

/// Why the NAT refuses to translate a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Version field is not 4.
    NotIpv4,
    /// IHL below 5.
    BadHeaderLength,
    /// Total length smaller than the header, or larger than the bytes received.
    BadTotalLength,
    /// The transport header does not fit in the packet.
    TruncatedTransport,
}

/// What the IPv4 header says about the packet, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Shape {
    /// Header length in bytes (20..=60; more than 20 means options).
    pub header_len: usize,
    /// Total length in bytes, from the header.
    pub total_len: usize,
    /// Fragmentation status.
    pub fragment: Fragment,
}

/// Checks an IPv4 header against the bytes actually received from it onwards (`received`,
/// which may exceed `tot_len` because of link-layer padding).
pub const fn ipv4_shape(
    version_ihl: u8,
    tot_len_be: u16,
    frag_off_be: u16,
    received: usize,
) -> Result<Ipv4Shape, Malformed> {
    if version_ihl >> 4 != 4 {
        return Err(Malformed::NotIpv4);
    }
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if header_len < IPV4_MIN_HLEN {
        return Err(Malformed::BadHeaderLength);
    }
    let total_len = u16::from_be(tot_len_be) as usize;
    if total_len < header_len || total_len > received {
        return Err(Malformed::BadTotalLength);
    }
    let frag = u16::from_be(frag_off_be);
    let fragment = if frag & IP_OFFSET_MASK != 0 {
        Fragment::NonFirst
    } else if frag & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    Ok(Ipv4Shape {
        header_len,
        total_len,
        fragment,
    })
}

/// Minimum transport header the NAT needs to read and rewrite for `proto`, or `None` for a
/// protocol it does not translate.
pub const fn transport_min_len(proto: u8) -> Option<usize> {
    match proto {
        crate::proto::UDP => Some(UDP_HLEN),
        crate::proto::TCP => Some(TCP_MIN_HLEN),
        crate::proto::ICMP => Some(ICMP_HLEN),
        _ => None,
    }
}

/// Checks that the transport header of a whole datagram or first fragment fits in its IP
/// payload (`total_len - header_len` bytes).
pub const fn check_transport(shape: &Ipv4Shape, proto: u8) -> Result<(), Malformed> {
    if let Fragment::NonFirst = shape.fragment {
        return Ok(());
    }
    match transport_min_len(proto) {
        Some(min) if shape.total_len - shape.header_len < min => Err(Malformed::TruncatedTransport),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    const fn be(v: u16) -> u16 {
        v.to_be()
    }

    #[test]
    fn plain_header() {
        let s = ipv4_shape(0x45, be(60), 0, 60).unwrap();
        assert_eq!(
            s,
            Ipv4Shape {
                header_len: 20,
                total_len: 60,
                fragment: Fragment::None
            }
        );
        assert_eq!(check_transport(&s, proto::TCP), Ok(()));
    }

    #[test]
    fn ethernet_padding_is_fine() {
        // A 28-byte ICMP packet padded to the 46-byte minimum payload.
        assert!(ipv4_shape(0x45, be(28), 0, 46).is_ok());
    }

    #[test]
    fn options_are_accepted_with_their_length() {
        let s = ipv4_shape(0x46, be(32), 0, 32).unwrap();
        assert_eq!(s.header_len, 24);
        assert_eq!(check_transport(&s, proto::UDP), Ok(()));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(ipv4_shape(0x65, be(40), 0, 40), Err(Malformed::NotIpv4));
        assert_eq!(ipv4_shape(0x44, be(40), 0, 40), Err(Malformed::BadHeaderLength));
        assert_eq!(ipv4_shape(0x45, be(19), 0, 40), Err(Malformed::BadTotalLength));
        assert_eq!(
            ipv4_shape(0x45, be(100), 0, 40),
            Err(Malformed::BadTotalLength),
            "truncated"
        );
        assert_eq!(
            ipv4_shape(0x4f, be(40), 0, 40),
            Err(Malformed::BadTotalLength),
            "IHL 15 > total"
        );
    }

    #[test]
    fn truncated_transport_is_refused() {
        let s = ipv4_shape(0x45, be(24), 0, 24).unwrap();
        assert_eq!(
            check_transport(&s, proto::UDP),
            Err(Malformed::TruncatedTransport)
        );
        let s = ipv4_shape(0x45, be(36), 0, 36).unwrap();
        assert_eq!(
            check_transport(&s, proto::TCP),
            Err(Malformed::TruncatedTransport)
        );
        assert_eq!(check_transport(&s, proto::UDP), Ok(()));
        assert_eq!(
            check_transport(&s, 47),
            Ok(()),
            "other protocols are not the NAT's to judge"
        );
    }

    #[test]
    fn fragments() {
        let first = ipv4_shape(0x45, be(1500), be(0x2000), 1500).unwrap();
        assert_eq!(first.fragment, Fragment::First);
        let middle = ipv4_shape(0x45, be(1500), be(0x2000 | 185), 1500).unwrap();
        assert_eq!(middle.fragment, Fragment::NonFirst);
        let last = ipv4_shape(0x45, be(100), be(370), 100).unwrap();
        assert_eq!(last.fragment, Fragment::NonFirst);
        // A non-first fragment has no transport header to check.
        let tiny = ipv4_shape(0x45, be(21), be(10), 21).unwrap();
        assert_eq!(check_transport(&tiny, proto::TCP), Ok(()));
        let df = ipv4_shape(0x45, be(100), be(0x4000), 100).unwrap();
        assert_eq!(df.fragment, Fragment::None, "DF alone is not a fragment");
    }

    #[test]
    fn icmp_error_types() {
        assert!(icmp_type::is_error(3));
        assert!(icmp_type::is_error(11));
        assert!(!icmp_type::is_error(8));
        assert!(!icmp_type::is_error(0));
    }

    /// A UDP header 198.51.100.1 -> 198.51.100.254, TTL 64, with a valid checksum.
    fn header_bytes() -> [u8; IPV4_MIN_HLEN] {
        let mut b = [
            0x45, 0, 0, 28, 0x12, 0x34, 0, 0, 64, 17, 0, 0, 198, 51, 100, 1, 198, 51, 100, 254,
        ];
        let sum = crate::checksum::checksum(&b);
        b[IPV4_CHECK_OFF..IPV4_CHECK_OFF + 2].copy_from_slice(&sum.to_ne_bytes());
        b
    }

    #[test]
    fn a_header_read_from_bytes_writes_back_the_same_bytes() {
        let bytes = header_bytes();
        let ip = Ipv4Header::read(&bytes).unwrap();
        assert_eq!(ip.header_len(), IPV4_MIN_HLEN);
        assert_eq!(ip.saddr.to_ne_bytes(), [198, 51, 100, 1]);
        assert_eq!(u16::from_be(ip.tot_len), 28);
        let mut out = [0u8; IPV4_MIN_HLEN];
        ip.write(&mut out);
        assert_eq!(out, bytes);
        assert!(Ipv4Header::read(&bytes[..19]).is_none(), "too short");
        let mut v6 = bytes;
        v6[0] = 0x65;
        assert!(Ipv4Header::read(&v6).is_none(), "not IPv4");
    }

    #[test]
    fn ttl_and_destination_changes_keep_the_checksum_valid() {
        let mut ip = Ipv4Header::read(&header_bytes()).unwrap();
        assert!(ip.decrement_ttl());
        ip.set_daddr(u32::from_ne_bytes([10, 0, 0, 2]));
        let mut out = [0u8; IPV4_MIN_HLEN];
        ip.write(&mut out);
        assert_eq!(out[IPV4_TTL_OFF], 63);
        assert_eq!(&out[IPV4_DST_OFF..IPV4_DST_OFF + 4], &[10, 0, 0, 2]);
        assert_eq!(crate::checksum::checksum(&out), 0, "checksum still valid");
        ip.ttl = 1;
        let before = ip.check;
        assert!(!ip.decrement_ttl(), "a TTL of 1 is not forwarded");
        assert_eq!((ip.ttl, ip.check), (1, before), "and nothing changed");
    }
}
