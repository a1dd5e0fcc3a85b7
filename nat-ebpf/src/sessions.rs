//! Sessions: which remotes a binding has sent to. They drive inbound filtering (RFC 4787 §5)
//! and TCP state tracking (RFC 7857 §2).

use aya_ebpf::bindings::BPF_ANY;
use nat_common::{
    maps::{SESSION_KIND_ADDRESS, SESSION_KIND_ENDPOINT},
    mode::Filtering,
    proto,
    tcp_state::{Direction, TcpState},
    Counter, NatConfig, SessionKey, SessionValue,
};

use crate::{bindings::REFRESH_GRANULARITY_NS, maps::NAT_SESSIONS, stats::count};

#[inline(always)]
fn key(
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
    kind: u8,
) -> SessionKey {
    SessionKey {
        external_addr,
        remote_addr,
        external_port,
        remote_port: if kind == SESSION_KIND_ADDRESS {
            0
        } else {
            remote_port
        },
        proto,
        kind,
        _pad: [0; 2],
    }
}

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
        .get_ptr(key(
            proto,
            external_addr,
            external_port,
            remote_addr,
            remote_port,
            kind,
        ))
        .is_some()
}

/// Records an outbound packet: refreshes the session (RFC 4787 REQ-6) and its TCP state, or
/// creates it together with its address-only twin (used by address-dependent filtering).
/// Fails, counted, only when the session map is full.
#[inline(always)]
pub fn touch_outbound(
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
    tcp_flags: u8,
    now: u64,
) -> Result<(), ()> {
    let endpoint = key(
        proto,
        external_addr,
        external_port,
        remote_addr,
        remote_port,
        SESSION_KIND_ENDPOINT,
    );
    if let Some(session) = NAT_SESSIONS.get_ptr_mut(endpoint) {
        // SAFETY: map value pointer from a successful lookup; racing writes are benign.
        unsafe {
            if proto == proto::TCP {
                let next = TcpState::from_u8((*session).tcp_state).next(Direction::Outbound, tcp_flags) as u8;
                if next != (*session).tcp_state {
                    (*session).tcp_state = next;
                }
            }
            if now.wrapping_sub((*session).last_seen_ns) > REFRESH_GRANULARITY_NS {
                (*session).last_seen_ns = now;
            }
        }
        return Ok(());
    }
    let tcp_state = if proto == proto::TCP {
        TcpState::None.next(Direction::Outbound, tcp_flags)
    } else {
        TcpState::None
    };
    let value = SessionValue {
        last_seen_ns: now,
        tcp_state: tcp_state as u8,
        _pad: [0; 7],
    };
    let address = key(
        proto,
        external_addr,
        external_port,
        remote_addr,
        0,
        SESSION_KIND_ADDRESS,
    );
    if NAT_SESSIONS.insert(endpoint, value, BPF_ANY as u64).is_err()
        || NAT_SESSIONS.insert(address, value, BPF_ANY as u64).is_err()
    {
        count(Counter::TableFull);
        return Err(());
    }
    count(Counter::NewSession);
    Ok(())
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

/// Follows an inbound TCP packet's flags in its session's state (FIN, RST, simultaneous open).
/// Inbound packets do not refresh timers (RFC 4787 REQ-6a is optional; RFC 7857 §7).
#[inline(always)]
pub fn track_inbound_tcp(
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
    tcp_flags: u8,
) {
    let endpoint = key(
        proto::TCP,
        external_addr,
        external_port,
        remote_addr,
        remote_port,
        SESSION_KIND_ENDPOINT,
    );
    if let Some(session) = NAT_SESSIONS.get_ptr_mut(endpoint) {
        // SAFETY: map value pointer from a successful lookup; racing writes are benign.
        unsafe {
            let next = TcpState::from_u8((*session).tcp_state).next(Direction::Inbound, tcp_flags) as u8;
            if next != (*session).tcp_state {
                (*session).tcp_state = next;
            }
        }
    }
}
