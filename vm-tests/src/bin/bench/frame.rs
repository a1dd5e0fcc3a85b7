//! The frames the benchmark sends: Ethernet + IPv4 + UDP templates for the generator, and the
//! inputs of the per-packet test runs (UDP and an ICMP error embedding a UDP packet).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Context, Result};
use nat_common::packet::{
    icmp_type, unreach_code, ETH_HLEN, ETH_P_IP_BE, ICMP_CHECK_OFF, ICMP_HLEN, IPV4_CHECK_OFF,
    IPV4_MIN_HLEN as IPV4_HLEN, UDP_HLEN,
};
use nat_common::proto;
use vm_tests::packet::checksum;

pub use nat_common::bench::FRAME_LEN;
/// A MAC address.
pub type Mac = [u8; 6];

/// A fresh TTL: enough for the one router hop, and rewritten on every generated frame anyway.
const TTL: u8 = 64;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC address {s:?}");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC address {s:?}"))?;
    }
    Ok(mac)
}

fn ethernet(out: &mut Vec<u8>, src: Mac, dst: Mac) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ETH_P_IP_BE.to_ne_bytes());
}

/// An IPv4 header without options, checksum filled in.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> [u8; IPV4_HLEN] {
    let mut h = [0u8; IPV4_HLEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IPV4_HLEN + payload_len) as u16).to_be_bytes());
    h[8] = TTL;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[IPV4_CHECK_OFF..IPV4_CHECK_OFF + 2].copy_from_slice(&c.to_be_bytes());
    h
}

/// UDP header with checksum zero ("no checksum", legal for IPv4): the generator varies ports
/// and addresses per packet, and a zero checksum needs no update on the way.
fn udp_header(src: SocketAddrV4, dst: SocketAddrV4, payload_len: usize) -> [u8; UDP_HLEN] {
    let mut h = [0u8; UDP_HLEN];
    h[0..2].copy_from_slice(&src.port().to_be_bytes());
    h[2..4].copy_from_slice(&dst.port().to_be_bytes());
    h[4..6].copy_from_slice(&((UDP_HLEN + payload_len) as u16).to_be_bytes());
    h
}

/// A UDP frame of exactly `FRAME_LEN` bytes from `src` to `dst`.
pub fn udp_frame(src_mac: Mac, dst_mac: Mac, src: SocketAddrV4, dst: SocketAddrV4) -> [u8; FRAME_LEN] {
    let payload_len = FRAME_LEN - ETH_HLEN - IPV4_HLEN - UDP_HLEN;
    let mut out = Vec::with_capacity(FRAME_LEN);
    ethernet(&mut out, src_mac, dst_mac);
    out.extend_from_slice(&ipv4_header(
        *src.ip(),
        *dst.ip(),
        proto::UDP,
        UDP_HLEN + payload_len,
    ));
    out.extend_from_slice(&udp_header(src, dst, payload_len));
    out.resize(FRAME_LEN, 0);
    out.try_into().expect("FRAME_LEN bytes")
}

/// An ICMP port unreachable from `reporter` to `original_src`'s address, about a UDP packet
/// `original_src -> original_dst` (what a remote sends back through a NAT, RFC 5508).
pub fn icmp_error_frame(
    src_mac: Mac,
    dst_mac: Mac,
    reporter: Ipv4Addr,
    original_src: SocketAddrV4,
    original_dst: SocketAddrV4,
) -> Vec<u8> {
    let mut embedded = Vec::new();
    embedded.extend_from_slice(&ipv4_header(
        *original_src.ip(),
        *original_dst.ip(),
        proto::UDP,
        UDP_HLEN,
    ));
    embedded.extend_from_slice(&udp_header(original_src, original_dst, 0));
    let mut icmp = vec![
        icmp_type::DEST_UNREACH,
        unreach_code::PORT_UNREACHABLE,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    icmp.extend_from_slice(&embedded);
    let c = checksum(&icmp);
    icmp[ICMP_CHECK_OFF..ICMP_CHECK_OFF + 2].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::new();
    ethernet(&mut out, src_mac, dst_mac);
    out.extend_from_slice(&ipv4_header(
        reporter,
        *original_src.ip(),
        proto::ICMP,
        icmp.len(),
    ));
    out.extend_from_slice(&icmp);
    debug_assert_eq!(out.len(), ETH_HLEN + IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + UDP_HLEN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_tests::packet::Ipv4;

    #[test]
    fn udp_frame_is_well_formed() {
        let f = udp_frame(
            [2; 6],
            [4; 6],
            "10.0.0.2:60000".parse().unwrap(),
            "198.51.100.1:9".parse().unwrap(),
        );
        let ip = Ipv4::parse(&f[ETH_HLEN..]).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(ip.ports(), Some((60000, 9)));
        assert_eq!(ip.total_len(), FRAME_LEN - ETH_HLEN);
    }

    #[test]
    fn icmp_error_embeds_the_original() {
        let f = icmp_error_frame(
            [2; 6],
            [4; 6],
            "198.51.100.1".parse().unwrap(),
            "198.51.100.254:40000".parse().unwrap(),
            "198.51.100.1:9".parse().unwrap(),
        );
        let ip = Ipv4::parse(&f[ETH_HLEN..]).unwrap();
        assert!(ip.header_checksum_ok());
        let icmp = ip.icmp().unwrap();
        assert!(icmp.checksum_ok());
        assert_eq!(icmp.inner().unwrap().ports(), Some((40000, 9)));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01").unwrap(), [2, 0, 10, 255, 0, 1]);
        assert!(parse_mac("02:00").is_err());
    }
}
