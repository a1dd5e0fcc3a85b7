//! Notices: packets the controller answers with an ICMP error, because building and sending one
//! is no job for the data path (and the RFC 5382 REQ-4 hold needs a timer). Posted only when the
//! matching config flag is set; a full ring just means no ICMP is sent.

use aya_ebpf::{
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nat_common::{
    maps::Notice,
    packet::{ETH_HLEN, ICMP_EMBEDDED_L4_MIN, IPV4_MIN_HLEN},
};

use crate::maps::NAT_NOTICES;

/// Which program is posting, with the helper that copies its packet bytes.
pub enum Source<'a> {
    /// An XDP program.
    Xdp(&'a XdpContext),
    /// A TC program.
    Tc(&'a TcContext),
}

/// Bytes a notice quotes: an option-less IPv4 header and the 8 transport bytes an ICMP error
/// carries (RFC 792). A constant size keeps the copy verifiable.
const QUOTED_BYTES: usize = IPV4_MIN_HLEN + ICMP_EMBEDDED_L4_MIN;

/// Posts `kind` for the packet whose IPv4 header is `header_len` bytes long. Packets with IP
/// options are not posted (no ICMP is sent for them): they are rare, and quoting them would need
/// a variable-size copy.
#[inline(always)]
pub fn post(source: Source, kind: u32, header_len: usize) {
    if header_len != IPV4_MIN_HLEN {
        return;
    }
    let Some(mut entry) = NAT_NOTICES.reserve::<Notice>(0) else {
        return;
    };
    let notice = entry.as_mut_ptr();
    // SAFETY: a reserved ring entry large enough for QUOTED_BYTES; the helpers check the packet.
    let copied = unsafe {
        (*notice).kind = kind;
        (*notice).len = QUOTED_BYTES as u32;
        let to = (*notice).packet.as_mut_ptr().cast();
        match source {
            Source::Xdp(ctx) => {
                bpf_xdp_load_bytes(ctx.as_ptr().cast(), ETH_HLEN as u32, to, QUOTED_BYTES as u32)
            }
            Source::Tc(ctx) => bpf_skb_load_bytes(ctx.as_ptr(), ETH_HLEN as u32, to, QUOTED_BYTES as u32),
        }
    };
    if copied < 0 {
        entry.discard(0);
    } else {
        entry.submit(0);
    }
}
