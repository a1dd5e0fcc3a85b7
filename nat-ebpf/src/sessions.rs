//! Sessions: which remotes a binding has sent to. They drive inbound filtering (RFC 4787 §5)
//! and TCP state tracking (RFC 7857 §2, with RFC 5961 window checks, `tcp_track`), and are
//! limited per internal host and per binding (`usage`).

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use nat_common::{
    maps::{
        SESSION_FLAG_INTERNAL_ENDPOINT, SESSION_FLAG_OFFLOAD_OUT, SESSION_KIND_ADDRESS, SESSION_KIND_ENDPOINT,
    },
    mode::Filtering,
    proto,
    tcp_state::Direction,
    tcp_track::Verdict,
    Counter, NatConfig, SessionKey, SessionValue,
};

use crate::{clock, fastpath, flow::OutboundFlow, maps::NAT_SESSIONS, stats::count, tcp::Tcp, usage};

/// `-EEXIST`, returned by a `BPF_NOEXIST` insert when the key is taken.
const EEXIST: i32 = 17;

/// True if the binding `external_addr:external_port` has a session of `kind` with the remote.
#[inline(always)]
pub fn exists(
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
    kind: u8,
) -> bool {
    NAT_SESSIONS
        .get_ptr(SessionKey::new(
            proto,
            kind,
            external_addr,
            external_port,
            remote_addr,
            remote_port,
        ))
        .is_some()
}

/// The address-and-port session of binding `external_addr:external_port` with the remote, if
/// there is one: the one hash lookup of an established packet in either direction.
#[inline(always)]
pub fn endpoint(
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
) -> Option<*mut SessionValue> {
    NAT_SESSIONS.get_ptr_mut(SessionKey::new(
        proto,
        SESSION_KIND_ENDPOINT,
        external_addr,
        external_port,
        remote_addr,
        remote_port,
    ))
}

/// Records an outbound packet of `flow` on its binding `external_addr:external_port`:
/// refreshes the session (RFC 4787 REQ-6) and follows a TCP segment `seg` in its state
/// (`tcp_track`), or creates the session together with its address-only twin (used by
/// address-dependent filtering) when the host and the binding are under their session limits.
/// `forwarded`: the kernel forwarded this packet (TC egress of a packet that arrived on another
/// interface), which confirms the session's outbound direction for the fast path (`fastpath`).
/// Fails, counted, when a limit refuses the new session or the session map is full.
#[inline(always)]
pub fn touch_outbound(
    cfg: &NatConfig,
    flow: &OutboundFlow,
    (external_addr, external_port): (u32, u16),
    seg: &Tcp,
    now: u64,
    forwarded: bool,
) -> Result<(), ()> {
    if let Some(session) = endpoint(
        flow.proto,
        external_addr,
        external_port,
        flow.remote_addr,
        flow.remote_port,
    ) {
        use_outbound(session, flow, seg, now, forwarded);
        return Ok(());
    }
    if !usage::may_create_session(cfg, flow.internal_addr, flow.proto, external_addr, external_port) {
        return Err(());
    }
    let confirmed = if forwarded && fastpath::enabled() {
        SESSION_FLAG_OFFLOAD_OUT
    } else {
        0
    };
    let mut value = SessionValue {
        last_seen_ns: now,
        internal_addr: flow.internal_addr,
        internal_port: flow.internal_port,
        flags: SESSION_FLAG_INTERNAL_ENDPOINT | confirmed,
        ..SessionValue::default()
    };
    if flow.proto == proto::TCP {
        seg.track(&mut value, Direction::Outbound);
    }
    let endpoint = SessionKey::new(
        flow.proto,
        SESSION_KIND_ENDPOINT,
        external_addr,
        external_port,
        flow.remote_addr,
        flow.remote_port,
    );
    match NAT_SESSIONS.insert(endpoint, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            usage::record_session_created(flow.internal_addr, flow.proto, external_addr, external_port);
            count(Counter::NewSession);
        }
        // Another CPU created it at the same moment; that one is counted.
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            count(Counter::TableFull);
            return Err(());
        }
    }
    let address = SessionKey::new(
        flow.proto,
        SESSION_KIND_ADDRESS,
        external_addr,
        external_port,
        flow.remote_addr,
        0,
    );
    // The address-only twin is only looked for; it needs no endpoint or fast-path bits.
    value.flags = 0;
    if NAT_SESSIONS.insert(address, value, BPF_ANY as u64).is_err() {
        count(Counter::TableFull);
        return Err(());
    }
    Ok(())
}

/// What an outbound packet of `flow` does to its existing session `session`: TCP tracking, the
/// refresh stamp (written only when stale, so a busy session's cache line is not dirtied per
/// packet), and the flag bits, each written only when missing (see `set_flags` for the race).
///
/// The internal endpoint is the truth of the binding the packet was translated by: a session
/// that holds another port (left over from a binding that went while the packet that created
/// it was in flight) takes this one; one that belongs to another host keeps that host, which
/// the controller's per-host session count releases, and loses its endpoint bit, so inbound
/// packets look the binding up instead.
#[inline(always)]
pub fn use_outbound(session: *mut SessionValue, flow: &OutboundFlow, seg: &Tcp, now: u64, forwarded: bool) {
    // SAFETY: map value pointer from a successful lookup; racing writes are benign.
    unsafe {
        // An outbound segment out of window is still translated (the remote's TCP judges
        // it again); it only changes nothing here.
        if flow.proto == proto::TCP && seg.track(&mut *session, Direction::Outbound) != Verdict::Pass {
            count(Counter::TcpOutOfWindow);
        }
        clock::refresh(&mut (*session).last_seen_ns, now);
        let old = (*session).flags;
        let mut flags = old;
        if (*session).internal_addr == flow.internal_addr {
            if old & SESSION_FLAG_INTERNAL_ENDPOINT == 0 || (*session).internal_port != flow.internal_port {
                (*session).internal_port = flow.internal_port;
            }
            flags |= SESSION_FLAG_INTERNAL_ENDPOINT;
        } else {
            flags &= !SESSION_FLAG_INTERNAL_ENDPOINT;
        }
        if forwarded && old & SESSION_FLAG_OFFLOAD_OUT == 0 && fastpath::enabled() {
            flags |= SESSION_FLAG_OFFLOAD_OUT;
        }
        if flags != old {
            (*session).flags = flags;
        }
    }
}

/// The mode's inbound filter (RFC 4787 §5): may this remote send to this binding?
#[inline(always)]
pub fn filter_allows(
    cfg: &NatConfig,
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
) -> bool {
    match cfg.mode().filtering() {
        Filtering::EndpointIndependent => true,
        Filtering::AddressDependent => exists(
            proto,
            external_addr,
            external_port,
            remote_addr,
            0,
            SESSION_KIND_ADDRESS,
        ),
        Filtering::AddressAndPortDependent => exists(
            proto,
            external_addr,
            external_port,
            remote_addr,
            remote_port,
            SESSION_KIND_ENDPOINT,
        ),
    }
}

/// Follows an inbound TCP segment in its address-and-port session `session` (`tcp_track`:
/// FIN, RST, simultaneous open, and whether they are in window). Returns true when the segment
/// must be dropped: a RST outside the window (RFC 5961), counted. Inbound packets do not
/// refresh timers (RFC 4787 REQ-6a is optional; RFC 7857 §7).
#[inline(always)]
pub fn track_inbound_tcp(session: *mut SessionValue, seg: &Tcp) -> bool {
    // SAFETY: map value pointer from a successful lookup; racing writes are benign.
    let verdict = unsafe { seg.track(&mut *session, Direction::Inbound) };
    if verdict == Verdict::Pass {
        return false;
    }
    count(Counter::TcpOutOfWindow);
    verdict == Verdict::Drop
}

/// Sets `flags` on the endpoint session of binding `external_addr:external_port` with the
/// remote, if there is one. Written only when a bit is missing, so a busy session's cache line
/// is not dirtied per packet. Two CPUs setting different bits at once may lose one (BPF has no
/// byte-wide atomic or); a lost bit is set again by the session's next such packet.
#[inline(always)]
pub fn set_flags(
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
    flags: u8,
) {
    let endpoint = SessionKey::new(
        proto,
        SESSION_KIND_ENDPOINT,
        external_addr,
        external_port,
        remote_addr,
        remote_port,
    );
    if let Some(session) = NAT_SESSIONS.get_ptr_mut(endpoint) {
        // SAFETY: map value pointer from a successful lookup; a racing byte write is benign.
        unsafe {
            let old = (*session).flags;
            if old & flags != flags {
                (*session).flags = old | flags;
            }
        }
    }
}
