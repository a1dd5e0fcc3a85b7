//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All 16-bit values are taken exactly as they sit in packet memory (native loads of
//! network-order bytes). The one's complement sum is byte-order independent (RFC 1071 §2(B)), so
//! the incremental formulas work on such values without any conversion, on any host.

/// Folds a 32-bit accumulator of 16-bit words into a 16-bit one's complement sum.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two 16-bit halves of a 32-bit value to an accumulator.
#[inline(always)]
const fn add32(acc: u32, value: u32) -> u32 {
    acc + (value & 0xffff) + (value >> 16)
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word changes from `old` to `new`.
/// `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn replace_u16(checksum: u16, old: u16, new: u16) -> u16 {
    let sum = (!checksum) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// RFC 1624 eqn. 3 for a 32-bit field (two adjacent words, e.g. an IPv4 address).
#[inline(always)]
pub const fn replace_u32(checksum: u16, old: u32, new: u32) -> u16 {
    let sum = add32(add32((!checksum) as u32, !old), new);
    !fold(sum)
}

/// UDP (RFC 768): a transmitted checksum of zero means "no checksum", so a computed zero is sent
/// as all ones. Apply after an incremental update of a UDP checksum that was not zero.
#[inline(always)]
pub const fn udp_nonzero(checksum: u16) -> u16 {
    if checksum == 0 {
        0xffff
    } else {
        checksum
    }
}

/// The folded pseudo-header sum (RFC 768, RFC 9293 §3.1) of a TCP or UDP segment of
/// `l4_len` bytes, from raw (network-order, natively loaded) addresses.
///
/// When a sender offloads its checksum (Linux `CHECKSUM_PARTIAL`), the checksum field holds
/// exactly this value as a seed until a NIC or the kernel completes it; see `looks_partial`.
#[inline(always)]
pub const fn pseudo_header_sum(saddr: u32, daddr: u32, proto: u8, l4_len: u16) -> u16 {
    let proto_word = u16::from_ne_bytes([0, proto]) as u32;
    fold(add32(add32(proto_word + l4_len.to_be() as u32, saddr), daddr))
}

/// True if a TCP/UDP checksum field holds an offload seed rather than a final checksum. A
/// final checksum equals the seed by chance once in 65536 packets; callers only ever take a
/// slower, equally correct path for such a packet.
#[inline(always)]
pub const fn looks_partial(field: u16, saddr: u32, daddr: u32, proto: u8, l4_len: u16) -> bool {
    field == pseudo_header_sum(saddr, daddr, proto, l4_len)
}

/// Full Internet checksum of `bytes` (odd length padded with a zero byte), as stored in a header.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_words(bytes, 0))
}

/// One's complement accumulation of `bytes` as native-order 16-bit words onto `acc`.
pub fn sum_words(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        acc = fold(acc + u16::from_ne_bytes([pair[0], pair[1]]) as u32) as u32;
    }
    if let [last] = chunks.remainder() {
        acc = fold(acc + u16::from_ne_bytes([*last, 0]) as u32) as u32;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP-like 20-byte header with its checksum in bytes 10..12.
    fn sample() -> [u8; 20] {
        [
            0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 0xac, 0x10, 0x0a, 0x63,
            0xac, 0x10, 0x0a, 0x0c,
        ]
    }

    fn with_checksum(mut header: [u8; 20]) -> [u8; 20] {
        header[10] = 0;
        header[11] = 0;
        let c = checksum(&header);
        header[10..12].copy_from_slice(&c.to_ne_bytes());
        header
    }

    fn stored(header: &[u8; 20]) -> u16 {
        u16::from_ne_bytes([header[10], header[11]])
    }

    #[test]
    fn rfc1071_example_header_checksum() {
        // The classic example header: checksum 0xb1e6 in network order.
        let h = with_checksum(sample());
        assert_eq!([h[10], h[11]], [0xb1, 0xe6]);
        assert_eq!(checksum(&h), 0, "a header with a valid checksum sums to zero");
    }

    #[test]
    fn incremental_u32_matches_full_recompute() {
        let before = with_checksum(sample());
        for new_addr in [
            [10, 0, 0, 2],
            [198, 51, 100, 254],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
        ] {
            let mut after = before;
            let old = u32::from_ne_bytes(after[16..20].try_into().unwrap());
            after[16..20].copy_from_slice(&new_addr);
            let new = u32::from_ne_bytes(new_addr);
            let incremental = replace_u32(stored(&before), old, new);
            assert_eq!(incremental, stored(&with_checksum(after)), "addr {new_addr:?}");
        }
    }

    #[test]
    fn incremental_u16_matches_full_recompute() {
        let before = with_checksum(sample());
        for new_word in [0u16, 1, 0x8000, 0xffff, 0x1234] {
            let mut after = before;
            let old = u16::from_ne_bytes([after[4], after[5]]);
            after[4..6].copy_from_slice(&new_word.to_ne_bytes());
            let incremental = replace_u16(stored(&before), old, new_word);
            assert_eq!(incremental, stored(&with_checksum(after)), "word {new_word:#x}");
        }
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(checksum(&[0x01]), checksum(&[0x01, 0x00]));
    }

    /// A UDP datagram 10.0.0.2:40000 -> 198.51.100.1:9999 carrying "hello".
    fn udp_segment() -> ([u8; 4], [u8; 4], [u8; 13]) {
        let mut udp = [0u8; 13];
        udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&9999u16.to_be_bytes());
        udp[4..6].copy_from_slice(&13u16.to_be_bytes());
        udp[8..].copy_from_slice(b"hello");
        ([10, 0, 0, 2], [198, 51, 100, 1], udp)
    }

    #[test]
    fn offload_seed_completes_to_the_real_checksum() {
        let (src, dst, mut udp) = udp_segment();
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&src);
        pseudo[4..8].copy_from_slice(&dst);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&13u16.to_be_bytes());
        let full = !fold(sum_words(&udp, sum_words(&pseudo, 0)));
        let seed = pseudo_header_sum(u32::from_ne_bytes(src), u32::from_ne_bytes(dst), 17, 13);
        // What a NIC does with CHECKSUM_PARTIAL: sum the segment with the seed in the field.
        udp[6..8].copy_from_slice(&seed.to_ne_bytes());
        assert_eq!(checksum(&udp), full);
        assert!(looks_partial(
            seed,
            u32::from_ne_bytes(src),
            u32::from_ne_bytes(dst),
            17,
            13
        ));
        assert!(!looks_partial(
            full,
            u32::from_ne_bytes(src),
            u32::from_ne_bytes(dst),
            17,
            13
        ));
    }

    #[test]
    fn udp_zero_is_sent_as_all_ones() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }
}
