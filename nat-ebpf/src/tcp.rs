//! The TCP header fields that session tracking (`nat_common::tcp_track`) needs, read from the
//! packet.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    EbpfContext,
};
use nat_common::{
    packet::{Ipv4Header, TCP_MIN_HLEN},
    tcp_state::flags,
    tcp_track::{
        wscale_step, Segment, SynOptions, MAX_OPTIONS_READ, MAX_OPTION_BYTES, OPTION_ROOM, WSCALE_ABSENT,
        WSCALE_UNKNOWN,
    },
};

use crate::{access::read_at, notices::Source};

/// The fixed part of a TCP header up to the window (RFC 9293 §3.1), network order.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    src: u16,
    dst: u16,
    seq: u32,
    ack: u32,
    /// Data offset (high nibble, 32-bit words) and reserved bits.
    doff: u8,
    flags: u8,
    window: u16,
}

/// A TCP segment as session tracking sees it (all zero for other protocols), and where its
/// options are, should tracking need a SYN's window scale.
pub struct Tcp<'a> {
    /// The header fields.
    pub seg: Segment,
    options: Options<'a>,
}

/// Where a segment's TCP options are in its packet.
struct Options<'a> {
    /// The program, for its load-bytes helper; `None` when there is nothing to read.
    source: Option<Source<'a>>,
    /// Packet offset of the first option byte.
    offset: u32,
    /// Option bytes.
    len: usize,
}

impl<'a> Tcp<'a> {
    /// No TCP segment: UDP and ICMP.
    #[inline(always)]
    pub fn none() -> Tcp<'a> {
        Tcp {
            seg: Segment::default(),
            options: Options {
                source: None,
                offset: 0,
                len: 0,
            },
        }
    }

    /// The header flags (0 for other protocols).
    #[inline(always)]
    pub fn flags(&self) -> u8 {
        self.seg.flags
    }

    /// Follows the segment crossing in `dir` in `session` (`tcp_track::track`).
    #[inline(always)]
    pub fn track(
        &self,
        session: &mut nat_common::SessionValue,
        dir: nat_common::tcp_state::Direction,
    ) -> nat_common::tcp_track::Verdict {
        nat_common::tcp_track::track(session, dir, &self.seg, &self.options)
    }
}

impl SynOptions for Options<'_> {
    /// Read from the packet only when tracking starts a side (a SYN): the verifier then follows
    /// the search's possible results only as far as the session write that stores them.
    #[inline(always)]
    fn wscale(&self) -> u8 {
        match &self.source {
            None => WSCALE_UNKNOWN,
            Some(_) if self.len == 0 => WSCALE_ABSENT,
            // SAFETY: each context pointer is the running program's own, with its own helper.
            Some(Source::Xdp(ctx)) => unsafe { window_scale_xdp(ctx.as_ptr(), self.offset, self.len as u32) },
            Some(Source::Tc(ctx)) => unsafe { window_scale_tc(ctx.as_ptr(), self.offset, self.len as u32) },
        }
    }
}

/// The segment whose TCP header is at `l4` in the IPv4 packet `ip` at `l3`, or `None` when the
/// header is cut short. `source` is the program, for copying a SYN's options; without it a SYN's
/// window scale counts as unknown (`WSCALE_UNKNOWN`: the session's windows are judged
/// liberally). The internal-side program passes none: its fast path never sees a SYN (they take
/// the kernel path, where TC egress reads them), and hairpinned connections join two internal
/// hosts, out of an off-path attacker's reach; the copy and search would only add to the
/// verifier's work on that largest program.
#[inline(always)]
pub fn segment_in<'a>(
    source: Option<Source<'a>>,
    ip: &Ipv4Header,
    l3: usize,
    l4: usize,
    end: usize,
) -> Option<Tcp<'a>> {
    let head: TcpHead = read_at(l4, end, 0)?;
    let l4_len = (u16::from_be(ip.tot_len) as usize).saturating_sub(l4 - l3);
    let header_len = ((head.doff >> 4) as usize) * 4;
    let payload_len = l4_len.saturating_sub(header_len) as u32;
    let start = match &source {
        Some(Source::Xdp(ctx)) => ctx.data(),
        Some(Source::Tc(ctx)) => ctx.data(),
        None => l4,
    };
    // Window scale is read from SYNs only: it is meaningless elsewhere (RFC 7323 §2.2).
    let len = if head.flags & flags::SYN != 0 {
        header_len.saturating_sub(TCP_MIN_HLEN)
    } else {
        0
    };
    Some(Tcp {
        seg: Segment {
            flags: head.flags,
            seq: u32::from_be(head.seq),
            ack: u32::from_be(head.ack),
            payload_len,
            window: u16::from_be(head.window),
        },
        options: Options {
            source,
            offset: (l4 - start + TCP_MIN_HLEN) as u32,
            len,
        },
    })
}

/// A SYN's options, copied out of the packet, and the search through them.
#[repr(C)]
struct OptionScan {
    bytes: [u8; OPTION_ROOM],
    /// Option bytes in `bytes`.
    len: u32,
    /// Offset of the next option to look at.
    at: u32,
    /// The result (see `wscale_step`); `WSCALE_UNKNOWN` until one is found.
    wscale: u8,
    /// Explicit padding, so the verifier sees every byte initialised.
    _pad: [u8; 7],
}

/// One step of the search, as a `bpf_loop` callback: returns 1 (stop) once there is a result.
extern "C" fn scan_option(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `OptionScan` that `window_scale` handed to `bpf_loop`.
    let scan = unsafe { &mut *ctx.cast::<OptionScan>() };
    let mut at = scan.at as usize;
    match wscale_step(&scan.bytes, scan.len as usize, &mut at) {
        Some(result) => {
            scan.wscale = result;
            1
        }
        None => {
            scan.at = at as u32;
            0
        }
    }
}

/// [`window_scale`] for an XDP program's context `ctx`.
///
/// # Safety
/// `ctx` must be the running XDP program's context.
#[inline(never)]
unsafe fn window_scale_xdp(ctx: *mut c_void, offset: u32, len: u32) -> u8 {
    // SAFETY: the helper copies at most `copy_len` bytes to `to`, which has that much room.
    window_scale(len, |to, copy_len| unsafe {
        bpf_xdp_load_bytes(ctx.cast(), offset, to, copy_len)
    })
}

/// [`window_scale`] for a TC program's context `ctx`.
///
/// # Safety
/// `ctx` must be the running TC program's context.
#[inline(never)]
unsafe fn window_scale_tc(ctx: *mut c_void, offset: u32, len: u32) -> u8 {
    // SAFETY: as above.
    window_scale(len, |to, copy_len| unsafe {
        bpf_skb_load_bytes(ctx.cast(), offset, to, copy_len)
    })
}

/// The window scale offered by `len` option bytes that `copy(to, n)` copies out of the packet
/// (the program's load-bytes helper). The options are copied and searched in a `bpf_loop`:
/// walking them in place made the verifier follow every combination of option lengths, each
/// with its own checked packet range, through the rest of the program (it ran out of its
/// million instructions). Called from a subprogram of its own per program type, so that the
/// copy's room is not on the caller's stack (6.1 refuses more than 512 bytes along a call
/// chain), and its arguments are plain integers and the context.
#[inline(always)]
fn window_scale(len: u32, copy: impl FnOnce(*mut c_void, u32) -> i64) -> u8 {
    if len == 0 || len as usize > MAX_OPTION_BYTES {
        return WSCALE_UNKNOWN;
    }
    let mut scan = OptionScan {
        bytes: [0; OPTION_ROOM],
        len,
        at: 0,
        wscale: WSCALE_UNKNOWN,
        _pad: [0; 7],
    };
    // SAFETY: `scan` lives on this frame for both calls; the copy's length is the checked
    // `len` read back and masked into [1, OPTION_ROOM] right before the call, so the bound sits
    // on the register the helper gets (the 6.1 verifier keeps no bound across a spill, and
    // learns no lower bound from a test against zero); the volatile read stops the compiler
    // from dropping the mask as redundant. The callback takes an `OptionScan`.
    unsafe {
        let stored = u64::from(core::ptr::read_volatile(&raw const scan.len));
        let copy_len = ((stored.wrapping_sub(1) & (OPTION_ROOM as u64 - 1)) + 1) as u32;
        if copy(scan.bytes.as_mut_ptr().cast(), copy_len) < 0 {
            return WSCALE_UNKNOWN;
        }
        bpf_loop(
            MAX_OPTIONS_READ as u32,
            scan_option as *mut c_void,
            (&raw mut scan).cast(),
            0,
        );
    }
    scan.wscale
}
