//! TCP sequence tracking: enough of each direction's sequence space to tell a RST, FIN or SYN
//! that belongs to a connection from one that an off-path attacker made up (RFC 5961), the way
//! Linux conntrack's window tracking (`tcp_in_window`) does for nftables masquerade.
//!
//! Without it, anyone who knows a flow's four-tuple could move its session to `reset` or
//! `fin_in` with one segment and have the sweep delete it after the transitory timeout, even
//! though the hosts ignored that segment. With it:
//!
//! - each direction keeps the end of the sequence space it has used (`SeqSpace::end`, the
//!   highest sequence number plus length) and the largest window it has advertised, scaled
//!   (RFC 7323 window scale, read from the SYNs);
//! - a RST, FIN or SYN is *in window* when its sequence numbers lie within the receiver's
//!   largest window of the sender's end (the segment may be a retransmission from up to a
//!   window back, or run up to a window ahead); a segment from a side not seen yet must instead
//!   acknowledge what the other side sent (as in SYN-SENT, RFC 9293 §3.10.7.3);
//! - out-of-window RST, FIN and SYN change no state ([`Verdict`]); inbound RSTs are dropped as
//!   well (conntrack marks them INVALID, and masquerade rulesets drop invalid packets), while
//!   FINs and SYNs are still delivered: the host's own TCP ignores them or answers with an ACK
//!   (RFC 5961 §4), and a FIN misjudged here then still reaches it;
//! - a session that looks closed or reset (or was never seen opening) but then carries new data
//!   in both directions is established again: the hosts did not accept the close.
//!
//! The established fast path stays cheap: a segment writes the session only when it moves a
//! stored value (its side's end by more than an eighth of the receiver's window, a larger
//! window, a state change), so a bulk transfer writes about eight times per window, not per
//! segment. The window checks allow for that lag.

use crate::{
    maps::SessionValue,
    tcp_state::{flags, Direction, TcpState},
};

/// One direction's sequence space as the NAT has seen it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqSpace {
    /// Just past the highest sequence number this side has sent (sequence number plus length;
    /// SYN and FIN count one), host byte order. Stored lazily: it may lag the real end by up to
    /// [`end_lag`] of the other side's window.
    pub end: u32,
    /// The largest receive window this side has advertised, scaled; 0 while unknown.
    pub max_window: u32,
}

/// `SessionValue::tcp_track` bit: the outbound side (internal host) has been seen.
pub const TRACK_SEEN_OUT: u8 = 1 << 0;
/// `SessionValue::tcp_track` bit: the inbound side (remote) has been seen.
pub const TRACK_SEEN_IN: u8 = 1 << 1;
/// `SessionValue::tcp_track` bit: the outbound side's tracking began with its SYN, so its end
/// is exact until it sends data.
pub const TRACK_SYN_OUT: u8 = 1 << 2;
/// `SessionValue::tcp_track` bit: the same for the inbound side.
pub const TRACK_SYN_IN: u8 = 1 << 3;
/// `SessionValue::tcp_track` bit: new data from the outbound side since the session last
/// looked closed (see the module comment).
pub const TRACK_DATA_OUT: u8 = 1 << 4;
/// `SessionValue::tcp_track` bit: new data from the inbound side since then.
pub const TRACK_DATA_IN: u8 = 1 << 5;
/// `SessionValue::tcp_track` bit: the connection was picked up without both SYNs (a restart,
/// an expired session, a static forward's first packet), so the window scale is not known and
/// the largest one (14) is assumed for both sides, as conntrack turns liberal for connections
/// it picks up.
pub const TRACK_LIBERAL: u8 = 1 << 6;

/// Largest window scale shift (RFC 7323 §2.3).
pub const MAX_WSCALE: u8 = 14;
/// `Segment::wscale` and `SessionValue::tcp_wscale` nibble: the SYN carried no window scale
/// option, so scaling is off for the connection.
pub const WSCALE_ABSENT: u8 = 15;
/// `Segment::wscale`: the options could not be read; whether scaling is on is not known.
pub const WSCALE_UNKNOWN: u8 = 0xff;
/// The largest window a TCP can advertise: 65535 scaled by 2^14.
pub const MAX_WINDOW: u32 = 0xffff << MAX_WSCALE;
/// The largest window without scaling (and in any SYN, whose window is never scaled). It also
/// bounds the data a SYN may carry (TCP Fast Open), for checking an answer to it.
pub const MAX_UNSCALED_WINDOW: u32 = 0xffff;
/// A side's stored end is rewritten once the real end is more than `window >> END_LAG_SHIFT`
/// ahead of it (the window being the receiver's largest).
pub const END_LAG_SHIFT: u32 = 3;
/// Most bytes of TCP options (a 60-byte header less the fixed 20).
pub const MAX_OPTION_BYTES: usize = 40;
/// Most options read while looking for the window scale: real SYNs carry at most five
/// (MSS, SACK-permitted, timestamps, window scale, and padding NOPs, which count one each; the
/// longest layout seen, `MSS NOP WS NOP NOP TS SACK EOL`, needs eight steps).
pub const MAX_OPTIONS_READ: usize = 10;

/// Option kinds (RFC 9293 §3.1, RFC 7323 §2.2).
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_WSCALE: u8 = 3;
const OPT_WSCALE_LEN: u8 = 3;

/// The parts of a TCP segment the tracking needs (host byte order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Header flags (`tcp_state::flags`).
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with ACK).
    pub ack: u32,
    /// Payload bytes.
    pub payload_len: u32,
    /// Window field, unscaled.
    pub window: u16,
}

/// Where [`track`] reads a SYN's window scale option from, when it needs it. A value for the
/// unit tests; the data path reads the packet then, and only then, so that the verifier does
/// not follow every possible result through the rest of the program.
pub trait SynOptions {
    /// The window scale option: the shift, [`WSCALE_ABSENT`] or [`WSCALE_UNKNOWN`].
    fn wscale(&self) -> u8;
}

impl SynOptions for u8 {
    fn wscale(&self) -> u8 {
        *self
    }
}

/// What the data path does with a segment once its session has seen it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Translate and deliver it (its session's state may have changed).
    Pass = 0,
    /// An out-of-window RST, FIN or SYN: counted, changes nothing, still delivered.
    OutOfWindow = 1,
    /// An inbound out-of-window RST: counted and dropped.
    Drop = 2,
}

/// Room for a copy of a SYN's options: the power of two at or above [`MAX_OPTION_BYTES`], so
/// that the data path can mask every index (and the copy's length) into it.
pub const OPTION_ROOM: usize = 64;

/// One step of the search for the window scale option in a copy of a SYN's TCP options
/// (`bytes`, `len` of them valid): looks at the option at offset `*at`. Returns `None` to go on
/// (with `*at` at the next option), or the search's result: the shift (capped at 14, RFC 7323
/// §2.3), [`WSCALE_ABSENT`] when the options end without one, or [`WSCALE_UNKNOWN`] when they
/// are malformed. One step at a time, so that the data path runs it in a `bpf_loop`, whose
/// callback the verifier checks once rather than along every path through the options.
#[inline(always)]
pub fn wscale_step(bytes: &[u8; OPTION_ROOM], len: usize, at: &mut usize) -> Option<u8> {
    let i = *at;
    // The constant bound keeps every index provably inside `bytes` for the eBPF verifier.
    if i >= len || i >= MAX_OPTION_BYTES {
        return Some(WSCALE_ABSENT);
    }
    let byte = |k: usize| bytes[k & (OPTION_ROOM - 1)];
    let kind = byte(i);
    if kind == OPT_EOL {
        return Some(WSCALE_ABSENT);
    }
    if kind == OPT_NOP {
        *at = i + 1;
        return None;
    }
    if i + 1 >= len {
        return Some(WSCALE_UNKNOWN);
    }
    let opt_len = byte(i + 1) as usize;
    if kind == OPT_WSCALE && opt_len == OPT_WSCALE_LEN as usize && i + 2 < len {
        let shift = byte(i + 2);
        return Some(if shift > MAX_WSCALE { MAX_WSCALE } else { shift });
    }
    if opt_len < 2 || i + opt_len > len {
        // A zero-length option, or one running past the header: nothing after it can be read.
        return Some(WSCALE_UNKNOWN);
    }
    *at = i + opt_len;
    None
}

/// The window scale a SYN offers in `len` bytes of TCP options (`bytes`): [`wscale_step`] run
/// over at most [`MAX_OPTIONS_READ`] options ([`WSCALE_UNKNOWN`] if that is not enough).
pub fn find_wscale(bytes: &[u8; OPTION_ROOM], len: usize) -> u8 {
    let mut at = 0;
    for _ in 0..MAX_OPTIONS_READ {
        if let Some(result) = wscale_step(bytes, len, &mut at) {
            return result;
        }
    }
    WSCALE_UNKNOWN
}

/// `a` is after `b` in sequence space (RFC 9293 §3.4, modulo 2^32).
#[inline(always)]
const fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// How far a side's stored end may lag its real one, for a receiver window `window`.
#[inline(always)]
pub const fn end_lag(window: u32) -> u32 {
    window >> END_LAG_SHIFT
}

#[inline(always)]
const fn index(d: Direction) -> usize {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

#[inline(always)]
const fn other(d: Direction) -> Direction {
    match d {
        Direction::Outbound => Direction::Inbound,
        Direction::Inbound => Direction::Outbound,
    }
}

#[inline(always)]
const fn seen_bit(d: Direction) -> u8 {
    match d {
        Direction::Outbound => TRACK_SEEN_OUT,
        Direction::Inbound => TRACK_SEEN_IN,
    }
}

#[inline(always)]
const fn syn_bit(d: Direction) -> u8 {
    match d {
        Direction::Outbound => TRACK_SYN_OUT,
        Direction::Inbound => TRACK_SYN_IN,
    }
}

#[inline(always)]
const fn data_bit(d: Direction) -> u8 {
    match d {
        Direction::Outbound => TRACK_DATA_OUT,
        Direction::Inbound => TRACK_DATA_IN,
    }
}

/// The nibble of `tcp_wscale` that holds side `d`'s offered shift.
#[inline(always)]
const fn wscale_shift(d: Direction) -> u32 {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 4,
    }
}

/// The shift side `d`'s window fields carry: its offer when both SYNs offered scaling
/// (RFC 7323 §2.2), none when either did not, the largest when the SYNs were not seen.
#[inline(always)]
pub const fn window_shift(track: u8, wscale: u8, d: Direction) -> u8 {
    if track & TRACK_LIBERAL != 0 {
        return MAX_WSCALE;
    }
    let out = wscale & 0x0f;
    let inb = wscale >> 4;
    if out > MAX_WSCALE || inb > MAX_WSCALE {
        return 0;
    }
    (wscale >> wscale_shift(d)) & 0x0f
}

/// True for states in which a bare SYN from `d` begins a connection (again): nothing open yet,
/// the previous connection closed or reset (port reuse), or `d` is the side that is opening.
#[inline(always)]
const fn opens(state: TcpState, d: Direction) -> bool {
    match state {
        TcpState::None | TcpState::Closing | TcpState::Reset => true,
        TcpState::SynSent => matches!(d, Direction::Outbound),
        TcpState::SynReceived => matches!(d, Direction::Inbound),
        _ => false,
    }
}

/// True for the states a close or a reset leads to.
#[inline(always)]
const fn looks_closed(state: TcpState) -> bool {
    matches!(
        state,
        TcpState::FinOut | TcpState::FinIn | TcpState::Closing | TcpState::Reset
    )
}

/// The end of `seg`'s sequence space: sequence number plus length, SYN and FIN counting one.
#[inline(always)]
const fn seg_end(seg: &Segment) -> u32 {
    let mut end = seg.seq.wrapping_add(seg.payload_len);
    if seg.flags & flags::SYN != 0 {
        end = end.wrapping_add(1);
    }
    if seg.flags & flags::FIN != 0 {
        end = end.wrapping_add(1);
    }
    end
}

/// Follows TCP segment `seg` crossing in `dir` in `session`'s state and sequence tracking,
/// writing only the fields that change; `options` gives a SYN's window scale. Returns what to
/// do with the segment.
#[inline(always)]
pub fn track(
    session: &mut SessionValue,
    dir: Direction,
    seg: &Segment,
    options: &impl SynOptions,
) -> Verdict {
    let s = index(dir);
    let r_dir = other(dir);
    let r = index(r_dir);
    let syn = seg.flags & flags::SYN != 0;
    let ack = seg.flags & flags::ACK != 0;
    let rst = seg.flags & flags::RST != 0;
    let fin = seg.flags & flags::FIN != 0;
    let state = TcpState::from_u8(session.tcp_state);
    let end = seg_end(seg);
    let bits = session.tcp_track;
    // Read once, here, and only for a SYN (the data path reads it from the packet).
    let wscale = if syn { options.wscale() } else { WSCALE_ABSENT };

    if syn && !ack && !rst && opens(state, dir) {
        start(session, dir, seg, end, wscale);
        set_state(session, TcpState::None.next(dir, seg.flags));
        return Verdict::Pass;
    }

    if bits & seen_bit(dir) == 0 {
        return first_from(session, dir, seg, end, state, wscale);
    }

    let sender = session.tcp_seq[s];
    let receiver = session.tcp_seq[r];
    let window = if bits & seen_bit(r_dir) != 0 && receiver.max_window != 0 {
        receiver.max_window
    } else {
        MAX_WINDOW
    };
    let lag = end_lag(window);
    // From up to a window back (a retransmission) to a window ahead, plus the stored end's lag.
    let in_window = !after(sender.end.wrapping_sub(window), end)
        && !after(seg.seq, sender.end.wrapping_add(window).wrapping_add(lag));
    if !in_window {
        if syn && !ack && !rst && matches!(dir, Direction::Outbound) {
            // The internal host opens a new connection on the same ports (an off-path attacker
            // cannot send from inside): start over.
            start(session, dir, seg, end, wscale);
            set_state(session, TcpState::None.next(dir, seg.flags));
            return Verdict::Pass;
        }
        if rst && matches!(dir, Direction::Inbound) {
            return Verdict::Drop;
        }
        if rst || fin || syn {
            return Verdict::OutOfWindow;
        }
        // Data out of window: the host's TCP judges it; the tracking learns nothing from it.
        return Verdict::Pass;
    }

    let mut new_data = false;
    if after(end, sender.end) {
        new_data = seg.payload_len != 0;
        // Exact for the segments that open or close, lazily for data.
        if rst || fin || syn || after(end, sender.end.wrapping_add(lag)) {
            session.tcp_seq[s].end = end;
        }
    }
    learn_window(session, dir, seg, bits);
    if ack && bits & seen_bit(r_dir) == 0 {
        // Picked up mid-stream: the other side has sent up to what this side acknowledges.
        pick_up(session, r_dir, seg.ack, 0);
    }
    advance_state(session, dir, seg, state, new_data);
    Verdict::Pass
}

/// The first segment from side `dir` (not a SYN that opens a connection).
#[inline(always)]
fn first_from(
    session: &mut SessionValue,
    dir: Direction,
    seg: &Segment,
    end: u32,
    state: TcpState,
    wscale: u8,
) -> Verdict {
    let r_dir = other(dir);
    let r = index(r_dir);
    let syn = seg.flags & flags::SYN != 0;
    let ack = seg.flags & flags::ACK != 0;
    let rst = seg.flags & flags::RST != 0;
    let fin = seg.flags & flags::FIN != 0;
    let bits = session.tcp_track;
    if bits & seen_bit(r_dir) == 0 {
        // Nothing seen either way (the session's first packet was not a SYN that opens, say a
        // static forward's SYN-ACK or data after a restart): take it as it is. A SYN's window
        // is never scaled.
        let window = if syn {
            seg.window as u32
        } else {
            (seg.window as u32) << MAX_WSCALE
        };
        pick_up(session, dir, end, window);
        if ack {
            pick_up(session, r_dir, seg.ack, 0);
        }
        advance_state(session, dir, seg, state, false);
        return Verdict::Pass;
    }
    // The other side is known: this side's segment must acknowledge what it sent. While that
    // side has sent no more than its SYN (and perhaps Fast Open data), its end is exact and the
    // answer must fall within that SYN; otherwise it may lag behind by up to a window.
    let receiver_end = session.tcp_seq[r].end;
    let acceptable = if bits & syn_bit(r_dir) != 0 && bits & TRACK_LIBERAL == 0 {
        !after(seg.ack, receiver_end) && !after(receiver_end.wrapping_sub(MAX_UNSCALED_WINDOW), seg.ack)
    } else {
        !after(seg.ack, receiver_end.wrapping_add(end_lag(MAX_WINDOW)))
            && !after(receiver_end.wrapping_sub(MAX_WINDOW), seg.ack)
    };
    if syn && !ack && !rst {
        // Simultaneous open (RFC 9293 §3.5): a bare SYN answers a bare SYN.
        start_side(session, dir, seg, end, wscale);
        set_state(session, state.next(dir, seg.flags));
        return Verdict::Pass;
    }
    if !ack || !acceptable {
        if rst && matches!(dir, Direction::Inbound) {
            return Verdict::Drop;
        }
        if rst || fin || syn {
            return Verdict::OutOfWindow;
        }
        return Verdict::Pass;
    }
    if syn {
        // The answer to the other side's SYN.
        start_side(session, dir, seg, end, wscale);
    } else if !rst {
        let scaled = (seg.window as u32) << MAX_WSCALE;
        pick_up(session, dir, end, scaled);
    }
    advance_state(session, dir, seg, state, false);
    Verdict::Pass
}

/// Starts tracking afresh with `dir`'s SYN: the other side is not known yet.
#[inline(always)]
fn start(session: &mut SessionValue, dir: Direction, seg: &Segment, end: u32, wscale: u8) {
    session.tcp_track = 0;
    session.tcp_wscale = (WSCALE_ABSENT << wscale_shift(other(dir))) | (WSCALE_ABSENT << wscale_shift(dir));
    session.tcp_seq = [SeqSpace::default(); 2];
    start_side(session, dir, seg, end, wscale);
}

/// Records side `dir`'s SYN: its initial end, its (never scaled) window, its scale offer
/// `wscale`.
#[inline(always)]
fn start_side(session: &mut SessionValue, dir: Direction, seg: &Segment, end: u32, wscale: u8) {
    session.tcp_seq[index(dir)] = SeqSpace {
        end,
        max_window: seg.window as u32,
    };
    let mut bits = session.tcp_track | seen_bit(dir) | syn_bit(dir);
    let shift = if wscale == WSCALE_UNKNOWN {
        bits |= TRACK_LIBERAL;
        WSCALE_ABSENT
    } else {
        wscale & 0x0f
    };
    let keep = session.tcp_wscale & !(0x0f << wscale_shift(dir));
    session.tcp_wscale = keep | (shift << wscale_shift(dir));
    session.tcp_track = bits;
}

/// Starts tracking side `dir` from the middle of a connection.
#[inline(always)]
fn pick_up(session: &mut SessionValue, dir: Direction, end: u32, max_window: u32) {
    session.tcp_seq[index(dir)] = SeqSpace { end, max_window };
    session.tcp_track |= seen_bit(dir) | TRACK_LIBERAL;
}

/// Raises side `dir`'s largest advertised window when `seg` advertises a larger one.
#[inline(always)]
fn learn_window(session: &mut SessionValue, dir: Direction, seg: &Segment, bits: u8) {
    let window = if seg.flags & flags::SYN != 0 {
        seg.window as u32
    } else {
        (seg.window as u32) << window_shift(bits, session.tcp_wscale, dir)
    };
    let s = index(dir);
    if window > session.tcp_seq[s].max_window {
        session.tcp_seq[s].max_window = window;
    }
}

/// Moves the state after a segment that has been accepted; `new_data`: it carried data beyond
/// what its side had sent before.
#[inline(always)]
fn advance_state(session: &mut SessionValue, dir: Direction, seg: &Segment, state: TcpState, new_data: bool) {
    let next = state.next(dir, seg.flags);
    if next as u8 != state as u8 {
        if looks_closed(next) {
            let bits = session.tcp_track & !(TRACK_DATA_OUT | TRACK_DATA_IN);
            if bits != session.tcp_track {
                session.tcp_track = bits;
            }
        }
        set_state(session, next);
        return;
    }
    if !new_data || matches!(state, TcpState::Established) {
        return;
    }
    let bits = session.tcp_track | data_bit(dir);
    if bits & (TRACK_DATA_OUT | TRACK_DATA_IN) == TRACK_DATA_OUT | TRACK_DATA_IN {
        // New data both ways: whatever the NAT saw, the hosts' connection is alive.
        session.tcp_track = bits & !(TRACK_DATA_OUT | TRACK_DATA_IN);
        set_state(session, TcpState::Established);
    } else if bits != session.tcp_track {
        session.tcp_track = bits;
    }
}

#[inline(always)]
fn set_state(session: &mut SessionValue, state: TcpState) {
    if session.tcp_state != state as u8 {
        session.tcp_state = state as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::Direction::*;
    use super::*;

    const OUT_ISN: u32 = 1_000_000;
    const IN_ISN: u32 = 0xfff0_0000; // wraps around during the tests

    /// A segment, and the window scale its options offer (read only for SYNs).
    type Seg = (Segment, u8);

    fn seg(flags: u8, seq: u32, ack: u32, len: u32, window: u16) -> Seg {
        (
            Segment {
                flags,
                seq,
                ack,
                payload_len: len,
                window,
            },
            WSCALE_ABSENT,
        )
    }

    fn syn(flags: u8, seq: u32, ack: u32, wscale: u8) -> Seg {
        (seg(flags, seq, ack, 0, 64240).0, wscale)
    }

    fn track(s: &mut SessionValue, dir: Direction, (seg, wscale): &Seg) -> Verdict {
        super::track(s, dir, seg, wscale)
    }

    fn state(s: &SessionValue) -> TcpState {
        TcpState::from_u8(s.tcp_state)
    }

    /// A connection opened from inside with window scaling 7 both ways, then 3000 bytes
    /// each way. Returns the session and the next sequence numbers (out, in).
    fn established() -> (SessionValue, u32, u32) {
        let mut s = SessionValue::default();
        assert_eq!(track(&mut s, Outbound, &syn(SYN, OUT_ISN, 0, 7)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::SynSent);
        let synack = syn(SYN | ACK, IN_ISN, OUT_ISN + 1, 7);
        assert_eq!(track(&mut s, Inbound, &synack), Verdict::Pass);
        assert_eq!(state(&s), TcpState::Established);
        let (mut o, mut i) = (OUT_ISN + 1, IN_ISN.wrapping_add(1));
        assert_eq!(track(&mut s, Outbound, &seg(ACK, o, i, 0, 502)), Verdict::Pass);
        for _ in 0..3 {
            assert_eq!(track(&mut s, Outbound, &seg(ACK, o, i, 1000, 502)), Verdict::Pass);
            o += 1000;
            assert_eq!(track(&mut s, Inbound, &seg(ACK, i, o, 1000, 502)), Verdict::Pass);
            i = i.wrapping_add(1000);
        }
        (s, o, i)
    }

    #[test]
    fn window_scale_option_is_found_in_real_layouts() {
        let read = |opts: &[u8]| {
            let mut bytes = [0u8; OPTION_ROOM];
            bytes[..opts.len()].copy_from_slice(opts);
            find_wscale(&bytes, opts.len())
        };
        // Linux: MSS, SACK-permitted, timestamps, NOP, window scale 7.
        let linux: &[u8] = &[2, 4, 5, 180, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7];
        assert_eq!(read(linux), 7);
        // Windows: MSS, NOP, window scale 8, NOP, NOP, SACK-permitted.
        assert_eq!(read(&[2, 4, 5, 180, 1, 3, 3, 8, 1, 1, 4, 2]), 8);
        // macOS: MSS, NOP, WS 6, NOP, NOP, timestamps, SACK-permitted, EOL.
        let mac: &[u8] = &[
            2, 4, 5, 180, 1, 3, 3, 6, 1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 4, 2, 0, 0,
        ];
        assert_eq!(read(mac), 6);
        assert_eq!(read(&[2, 4, 5, 180]), WSCALE_ABSENT, "MSS only");
        assert_eq!(read(&[]), WSCALE_ABSENT, "no options");
        assert_eq!(read(&[1, 3, 3, 20]), MAX_WSCALE, "shift capped at 14");
        assert_eq!(read(&[2, 0, 1, 1]), WSCALE_UNKNOWN, "zero length: malformed");
        assert_eq!(read(&[2, 4, 5]), WSCALE_UNKNOWN, "truncated");
        assert_eq!(read(&[1; 12]), WSCALE_UNKNOWN, "more options than read");
    }

    #[test]
    fn a_normal_connection_opens_carries_data_and_closes() {
        let (mut s, o, i) = established();
        assert_eq!(
            s.tcp_track & (TRACK_SEEN_OUT | TRACK_SEEN_IN),
            TRACK_SEEN_OUT | TRACK_SEEN_IN
        );
        assert_eq!(window_shift(s.tcp_track, s.tcp_wscale, Inbound), 7);
        assert_eq!(s.tcp_seq[1].max_window, 502 << 7, "the remote's window, scaled");
        assert_eq!(
            track(&mut s, Inbound, &seg(FIN | ACK, i, o, 0, 502)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::FinIn);
        assert_eq!(
            track(&mut s, Outbound, &seg(FIN | ACK, o, i + 1, 0, 502)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Closing);
    }

    #[test]
    fn blind_rst_fin_and_syn_far_from_the_window_change_nothing() {
        let (s0, o, i) = established();
        let far = i.wrapping_add(1 << 31);
        for (flags, verdict) in [
            (RST, Verdict::Drop),
            (RST | ACK, Verdict::Drop),
            (FIN | ACK, Verdict::OutOfWindow),
            (SYN, Verdict::OutOfWindow),
            (SYN | ACK, Verdict::OutOfWindow),
        ] {
            let mut s = s0;
            assert_eq!(
                track(&mut s, Inbound, &seg(flags, far, o, 0, 502)),
                verdict,
                "flags {flags:#x}"
            );
            assert_eq!(s, s0, "flags {flags:#x} changed the session");
        }
        // A sequence number just beyond the window as well.
        let mut s = s0;
        let beyond = i.wrapping_add(2 * (502 << 7));
        assert_eq!(track(&mut s, Inbound, &seg(RST, beyond, 0, 0, 0)), Verdict::Drop);
        // Outbound ones are judged too, but delivered: the remote's TCP judges them again.
        let mut s = s0;
        assert_eq!(
            track(&mut s, Outbound, &seg(RST, o.wrapping_add(1 << 31), 0, 0, 0)),
            Verdict::OutOfWindow
        );
        assert_eq!(s, s0);
    }

    #[test]
    fn an_in_window_rst_resets_and_the_session_stays_reset_when_the_peer_is_gone() {
        let (mut s, o, i) = established();
        assert_eq!(track(&mut s, Inbound, &seg(RST, i, 0, 0, 0)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::Reset);
        // The internal host still had data in flight; the remote's stack answers with RSTs.
        assert_eq!(track(&mut s, Outbound, &seg(ACK, o, i, 1000, 502)), Verdict::Pass);
        assert_eq!(track(&mut s, Inbound, &seg(RST, i, 0, 0, 0)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::Reset, "data one way does not revive it");
        // A RST from inside with the sequence number the remote expects also counts.
        let (mut s, o, _) = established();
        assert_eq!(
            track(&mut s, Outbound, &seg(RST | ACK, o, 0, 0, 0)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Reset);
    }

    #[test]
    fn a_reset_or_half_closed_session_carrying_data_both_ways_is_established_again() {
        // An in-window RST that the host ignored (RFC 5961 challenge ACK): data goes on.
        let (mut s, mut o, mut i) = established();
        assert_eq!(track(&mut s, Inbound, &seg(RST, i + 100, 0, 0, 0)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::Reset);
        for _ in 0..2 {
            track(&mut s, Outbound, &seg(ACK, o, i, 1000, 502));
            o += 1000;
            track(&mut s, Inbound, &seg(ACK, i, o, 1000, 502));
            i = i.wrapping_add(1000);
        }
        assert_eq!(state(&s), TcpState::Established);
        // The same after a FIN that the host did not take.
        assert_eq!(
            track(&mut s, Inbound, &seg(FIN | ACK, i + 10, o, 0, 502)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::FinIn);
        track(&mut s, Inbound, &seg(ACK, i, o, 1000, 502));
        i = i.wrapping_add(1000);
        assert_eq!(state(&s), TcpState::FinIn, "one way only");
        track(&mut s, Outbound, &seg(ACK, o, i, 1000, 502));
        assert_eq!(state(&s), TcpState::Established);
    }

    #[test]
    fn a_real_half_close_stays_half_closed() {
        let (mut s, mut o, i) = established();
        track(&mut s, Inbound, &seg(FIN | ACK, i, o, 0, 502));
        assert_eq!(state(&s), TcpState::FinIn);
        // The remote may only retransmit; the internal host may go on sending.
        for _ in 0..3 {
            track(&mut s, Inbound, &seg(ACK, i - 1000, o, 1000, 502));
            track(&mut s, Inbound, &seg(FIN | ACK, i, o, 0, 502));
            track(&mut s, Outbound, &seg(ACK, o, i + 1, 1000, 502));
            o += 1000;
        }
        assert_eq!(state(&s), TcpState::FinIn);
    }

    #[test]
    fn bulk_data_writes_the_session_rarely() {
        let (mut s, mut o, i) = established();
        let mut writes = 0;
        for _ in 0..1000 {
            let before = s;
            assert_eq!(track(&mut s, Outbound, &seg(ACK, o, i, 1448, 502)), Verdict::Pass);
            o += 1448;
            writes += usize::from(s != before);
        }
        // An eighth of the remote's 64 KiB window is 8 KiB: one write per 6 segments.
        assert!(writes <= 1000 / 5, "{writes} writes for 1000 segments");
        // The lag never makes the sender's own in-window segments look out of window.
        assert_eq!(
            track(&mut s, Outbound, &seg(FIN | ACK, o, i, 0, 502)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::FinOut);
    }

    #[test]
    fn retransmissions_and_window_edges_stay_in_window() {
        let (s0, o, i) = established();
        let window = 502u32 << 7;
        for seq in [i - window, i - 1, i, i + window - 1, i + window] {
            let mut s = s0;
            assert_eq!(
                track(&mut s, Inbound, &seg(FIN | ACK, seq, o, 0, 502)),
                Verdict::Pass,
                "seq {seq}"
            );
        }
        let mut s = s0;
        // The stored end lags the real one (3000 bytes here, less than an eighth of the
        // window), which widens the lower bound by as much.
        let too_old = i - window - 4000;
        assert_eq!(
            track(&mut s, Inbound, &seg(FIN | ACK, too_old, o, 0, 502)),
            Verdict::OutOfWindow
        );
    }

    #[test]
    fn syn_sent_accepts_only_an_rst_or_synack_that_acknowledges_the_syn() {
        let mut s = SessionValue::default();
        track(&mut s, Outbound, &syn(SYN, OUT_ISN, 0, 7));
        let s0 = s;
        for ack in [OUT_ISN + 1 + (1 << 31), OUT_ISN + 2, OUT_ISN - 100_000] {
            let mut s = s0;
            assert_eq!(
                track(&mut s, Inbound, &seg(RST | ACK, 0, ack, 0, 0)),
                Verdict::Drop,
                "ack {ack}"
            );
            assert_eq!(
                track(&mut s, Inbound, &syn(SYN | ACK, 5, ack, 7)),
                Verdict::OutOfWindow,
                "ack {ack}"
            );
            assert_eq!(s, s0);
        }
        let mut s = s0;
        assert_eq!(
            track(&mut s, Inbound, &seg(RST, 0, 0, 0, 0)),
            Verdict::Drop,
            "a RST without ACK"
        );
        // Connection refused: RST, ACK of the SYN.
        let mut s = s0;
        assert_eq!(
            track(&mut s, Inbound, &seg(RST | ACK, 0, OUT_ISN + 1, 0, 0)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Reset);
    }

    #[test]
    fn without_scaling_on_both_sides_windows_are_not_scaled() {
        let mut s = SessionValue::default();
        track(&mut s, Outbound, &syn(SYN, OUT_ISN, 0, 7));
        track(
            &mut s,
            Inbound,
            &syn(SYN | ACK, IN_ISN, OUT_ISN + 1, WSCALE_ABSENT),
        );
        assert_eq!(window_shift(s.tcp_track, s.tcp_wscale, Outbound), 0);
        track(&mut s, Outbound, &seg(ACK, OUT_ISN + 1, IN_ISN + 1, 0, 65000));
        assert_eq!(s.tcp_seq[0].max_window, 65000);
    }

    #[test]
    fn a_connection_picked_up_mid_stream_is_judged_liberally() {
        let mut s = SessionValue::default();
        let (o, i) = (5_000u32, 9_000_000u32);
        assert_eq!(track(&mut s, Outbound, &seg(ACK, o, i, 100, 500)), Verdict::Pass);
        assert_ne!(s.tcp_track & TRACK_LIBERAL, 0);
        assert_eq!(s.tcp_seq[1].end, i, "the remote's end, from the ACK");
        assert_eq!(
            track(&mut s, Inbound, &seg(ACK, i, o + 100, 100, 400)),
            Verdict::Pass
        );
        // The windows are taken as scaled by 2^14: wide, but not half the sequence space.
        assert_eq!(
            track(&mut s, Inbound, &seg(RST, i.wrapping_add(1 << 31), 0, 0, 0)),
            Verdict::Drop
        );
        // Data both ways makes it established (it was never seen opening).
        assert_eq!(
            track(&mut s, Outbound, &seg(ACK, o + 100, i + 100, 100, 500)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Established);
        assert_eq!(track(&mut s, Inbound, &seg(RST, i + 100, 0, 0, 0)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::Reset);
    }

    #[test]
    fn ports_are_reused_after_a_close_and_a_new_connection_from_inside_starts_over() {
        let (mut s, o, i) = established();
        track(&mut s, Inbound, &seg(RST, i, 0, 0, 0));
        let isn = o.wrapping_add(123_456_789);
        assert_eq!(track(&mut s, Outbound, &syn(SYN, isn, 0, 7)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::SynSent);
        assert_eq!(
            track(&mut s, Inbound, &syn(SYN | ACK, 77, isn + 1, 7)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Established);
        // A new SYN from inside while the NAT still thinks the old connection is up.
        let (mut s, o, _) = established();
        let isn = o.wrapping_add(1 << 31);
        assert_eq!(track(&mut s, Outbound, &syn(SYN, isn, 0, 7)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::SynSent);
        assert_eq!(
            track(&mut s, Inbound, &syn(SYN | ACK, 77, isn + 1, 7)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Established);
    }

    #[test]
    fn simultaneous_open_and_an_inbound_open_are_tracked() {
        let mut s = SessionValue::default();
        track(&mut s, Outbound, &syn(SYN, OUT_ISN, 0, 7));
        assert_eq!(track(&mut s, Inbound, &syn(SYN, IN_ISN, 0, 7)), Verdict::Pass);
        assert_eq!(state(&s), TcpState::Established);
        assert_eq!(s.tcp_seq[1].end, IN_ISN.wrapping_add(1));
        // A static forward: the session's first packet is the server's SYN-ACK.
        let mut s = SessionValue::default();
        assert_eq!(
            track(&mut s, Outbound, &syn(SYN | ACK, OUT_ISN, IN_ISN + 1, 7)),
            Verdict::Pass
        );
        assert_eq!(
            track(&mut s, Inbound, &seg(ACK, IN_ISN + 1, OUT_ISN + 1, 0, 500)),
            Verdict::Pass
        );
        assert_eq!(
            track(&mut s, Inbound, &seg(ACK, IN_ISN + 1, OUT_ISN + 1, 10, 500)),
            Verdict::Pass
        );
        assert_eq!(
            track(&mut s, Outbound, &seg(ACK, OUT_ISN + 1, IN_ISN + 11, 10, 500)),
            Verdict::Pass
        );
        assert_eq!(state(&s), TcpState::Established, "data both ways");
        assert_eq!(
            track(&mut s, Inbound, &seg(RST, IN_ISN.wrapping_add(1 << 31), 0, 0, 0)),
            Verdict::Drop
        );
    }
}
