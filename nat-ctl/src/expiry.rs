//! Timer expiry: the sweep that removes idle sessions, then idle bindings.
//!
//! Rules (RFC 4787 REQ-5/REQ-6, RFC 5382 REQ-5, RFC 5508 REQ-2, RFC 7857 §2):
//! - an address-and-port session expires when idle longer than its protocol's timeout (for TCP,
//!   the established or the transitory timeout, by state);
//! - an address-only session lives as long as any address-and-port session with the same remote
//!   address on the same binding;
//! - a binding expires when it has no live session left and has itself been idle longer than
//!   its protocol's timeout (TCP: the transitory one). Static forwards never expire.
//!
//! Only outbound packets refresh timers, so the data path's timestamps are "last outbound".

use std::collections::HashSet;

use anyhow::Result;
use nat_common::{
    config::{Timeout, CONFIG_FLAG_PER_REMOTE_BINDINGS},
    maps::{BINDING_FLAG_STATIC, SESSION_KIND_ADDRESS},
    proto,
    tcp_state::TcpState,
    BindingKey, BindingValue, ExternalKey, SessionKey, SessionValue,
};

use crate::{pinned::PinnedMaps, session_usage, settings::Timeouts};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Idle timeout of a session, in seconds.
pub fn session_timeout_secs(proto: u8, tcp_state: u8, timeouts: &Timeouts) -> u32 {
    match proto {
        proto::TCP if TcpState::from_u8(tcp_state).is_transitory() => timeouts.get(Timeout::TcpTransitory),
        proto::TCP => timeouts.get(Timeout::TcpEstablished),
        proto::ICMP => timeouts.get(Timeout::Icmp),
        _ => timeouts.get(Timeout::Udp),
    }
}

/// Idle timeout of a binding without sessions, in seconds.
pub fn binding_timeout_secs(proto: u8, timeouts: &Timeouts) -> u32 {
    match proto {
        proto::TCP => timeouts.get(Timeout::TcpTransitory),
        proto::ICMP => timeouts.get(Timeout::Icmp),
        _ => timeouts.get(Timeout::Udp),
    }
}

/// Seconds left before an entry last used at `last_seen_ns` expires (0 when overdue).
pub fn remaining_secs(now_ns: u64, last_seen_ns: u64, timeout_secs: u32) -> u64 {
    let idle = now_ns.saturating_sub(last_seen_ns);
    (timeout_secs as u64 * NS_PER_SEC)
        .saturating_sub(idle)
        .div_ceil(NS_PER_SEC)
}

fn expired(now_ns: u64, last_seen_ns: u64, timeout_secs: u32) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_secs as u64 * NS_PER_SEC
}

/// A binding's identity in session keys: protocol, external address, external port.
type BindingId = (u8, u32, u16);

/// The inbound key of the binding stored under outbound key `key` with value `value`.
pub fn external_key(key: &BindingKey, value: &BindingValue) -> ExternalKey {
    ExternalKey {
        external_addr: value.external_addr,
        external_port: value.external_port,
        proto: key.proto,
        _pad: 0,
    }
}

/// Removes one dynamic binding by both of its keys and accounts for the freed quota. The one
/// definition of how a binding goes, used by the sweep and when an external address leaves the
/// interface (`addr_watch`), which both remove its sessions first. Returns false when it was
/// already gone.
pub fn remove_binding(maps: &mut PinnedMaps, out_key: &BindingKey, in_key: &ExternalKey) -> Result<bool> {
    // Outbound entry first, so no new packet can find the binding; then free the port.
    if maps.bindings_out.remove(out_key).is_err() {
        return Ok(false);
    }
    let _ = maps.bindings_in.remove(in_key);
    maps.record_released(out_key.internal_addr)?;
    session_usage::forget_binding(maps, in_key.proto, in_key.external_addr, in_key.external_port);
    Ok(true)
}

/// What one sweep removes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepPlan {
    /// Sessions to delete.
    pub sessions: Vec<SessionKey>,
    /// Bindings to delete, by both of their keys.
    pub bindings: Vec<(BindingKey, ExternalKey)>,
}

/// Decides what has expired at `now_ns`.
pub fn plan(
    now_ns: u64,
    bindings: &[(BindingKey, BindingValue)],
    sessions: &[(SessionKey, SessionValue)],
    timeouts: &Timeouts,
) -> SweepPlan {
    let mut plan = SweepPlan::default();
    let mut live_bindings: HashSet<BindingId> = HashSet::new();
    let mut live_remotes: HashSet<(BindingId, u32)> = HashSet::new();
    for (key, value) in sessions.iter().filter(|(k, _)| k.kind != SESSION_KIND_ADDRESS) {
        if expired(
            now_ns,
            value.last_seen_ns,
            session_timeout_secs(key.proto, value.tcp_state, timeouts),
        ) {
            plan.sessions.push(*key);
        } else {
            let id = (key.proto, key.external_addr, key.external_port);
            live_bindings.insert(id);
            live_remotes.insert((id, key.remote_addr));
        }
    }
    for (key, _) in sessions.iter().filter(|(k, _)| k.kind == SESSION_KIND_ADDRESS) {
        if !live_remotes.contains(&((key.proto, key.external_addr, key.external_port), key.remote_addr)) {
            plan.sessions.push(*key);
        }
    }
    for (key, value) in bindings {
        if value.flags & BINDING_FLAG_STATIC != 0 {
            continue;
        }
        let id = (key.proto, value.external_addr, value.external_port);
        if !live_bindings.contains(&id)
            && expired(
                now_ns,
                value.last_seen_ns,
                binding_timeout_secs(key.proto, timeouts),
            )
        {
            plan.bindings.push((*key, external_key(key, value)));
        }
    }
    plan
}

/// Clears `CONFIG_FLAG_PER_REMOTE_BINDINGS` once a cone mode runs and no per-remote binding
/// outlives this sweep, so cone modes stop paying the extra lookup.
fn clear_per_remote_flag(
    maps: &mut PinnedMaps,
    bindings: &[(BindingKey, BindingValue)],
    plan: &SweepPlan,
) -> Result<()> {
    let mut config = maps.read_config()?;
    if config.flags & CONFIG_FLAG_PER_REMOTE_BINDINGS == 0 || config.mode().mapping_is_remote_dependent() {
        return Ok(());
    }
    let expiring: HashSet<&BindingKey> = plan.bindings.iter().map(|(k, _)| k).collect();
    if bindings
        .iter()
        .any(|(k, _)| k.remote_addr != 0 && !expiring.contains(k))
    {
        return Ok(());
    }
    config.flags &= !CONFIG_FLAG_PER_REMOTE_BINDINGS;
    maps.write_config(&config)
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Sessions removed.
    pub sessions: usize,
    /// Bindings removed.
    pub bindings: usize,
}

/// Runs one sweep over the live maps.
pub fn sweep(maps: &mut PinnedMaps, now_ns: u64, timeouts: &Timeouts) -> Result<SweepReport> {
    let bindings = maps.bindings()?;
    let sessions = maps.sessions()?;
    let plan = plan(now_ns, &bindings, &sessions, timeouts);
    clear_per_remote_flag(maps, &bindings, &plan)?;
    let mut report = SweepReport {
        sessions: session_usage::remove_sessions(maps, &plan.sessions, &sessions)?,
        ..SweepReport::default()
    };
    for (out_key, in_key) in &plan.bindings {
        // A packet may have refreshed the binding since the plan was made: check again.
        let Ok(current) = maps.bindings_out.get(out_key, 0) else {
            continue;
        };
        if !expired(
            crate::clock::monotonic_ns(),
            current.last_seen_ns,
            binding_timeout_secs(out_key.proto, timeouts),
        ) {
            continue;
        }
        if remove_binding(maps, out_key, in_key)? {
            report.bindings += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use nat_common::maps::SESSION_KIND_ENDPOINT;

    use super::*;

    const S: u64 = NS_PER_SEC;

    fn timeouts() -> Timeouts {
        Timeouts([10, 100, 20, 5])
    }

    fn binding(proto: u8, port: u16, last_seen: u64) -> (BindingKey, BindingValue) {
        (
            BindingKey {
                internal_addr: 1,
                internal_port: port,
                proto,
                ..Default::default()
            },
            BindingValue {
                last_seen_ns: last_seen,
                external_addr: 9,
                external_port: port,
                ..Default::default()
            },
        )
    }

    fn session(
        proto: u8,
        port: u16,
        remote: u32,
        kind: u8,
        last_seen: u64,
        tcp: TcpState,
    ) -> (SessionKey, SessionValue) {
        (
            SessionKey {
                external_addr: 9,
                remote_addr: remote,
                external_port: port,
                remote_port: if kind == SESSION_KIND_ADDRESS { 0 } else { 80 },
                proto,
                kind,
                _pad: [0; 2],
            },
            SessionValue {
                last_seen_ns: last_seen,
                tcp_state: tcp as u8,
                ..Default::default()
            },
        )
    }

    #[test]
    fn udp_binding_lives_exactly_its_timeout() {
        let b = [binding(proto::UDP, 4000, 100 * S)];
        let s = [
            session(
                proto::UDP,
                4000,
                7,
                SESSION_KIND_ENDPOINT,
                100 * S,
                TcpState::None,
            ),
            session(proto::UDP, 4000, 7, SESSION_KIND_ADDRESS, 100 * S, TcpState::None),
        ];
        assert_eq!(
            plan(110 * S, &b, &s, &timeouts()),
            SweepPlan::default(),
            "not before the timeout"
        );
        let p = plan(110 * S + 1, &b, &s, &timeouts());
        assert_eq!(p.sessions.len(), 2, "both session entries go");
        assert_eq!(p.bindings.len(), 1);
        assert_eq!(p.bindings[0].1.external_port, 4000);
    }

    #[test]
    fn live_session_keeps_binding_and_its_address_twin() {
        let b = [binding(proto::UDP, 4000, 0)];
        let s = [
            session(proto::UDP, 4000, 7, SESSION_KIND_ENDPOINT, 50 * S, TcpState::None),
            session(proto::UDP, 4000, 7, SESSION_KIND_ADDRESS, 0, TcpState::None),
            session(proto::UDP, 4000, 8, SESSION_KIND_ADDRESS, 0, TcpState::None),
        ];
        let p = plan(55 * S, &b, &s, &timeouts());
        assert!(p.bindings.is_empty(), "binding kept by its session");
        assert_eq!(p.sessions.len(), 1, "only the twin of the dead remote goes");
        assert_eq!(p.sessions[0].remote_addr, 8);
    }

    #[test]
    fn tcp_timeout_follows_state() {
        let b = [binding(proto::TCP, 5000, 0)];
        let est = [session(
            proto::TCP,
            5000,
            7,
            SESSION_KIND_ENDPOINT,
            0,
            TcpState::Established,
        )];
        assert!(
            plan(50 * S, &b, &est, &timeouts()).sessions.is_empty(),
            "established: long timer"
        );
        let closing = [session(
            proto::TCP,
            5000,
            7,
            SESSION_KIND_ENDPOINT,
            0,
            TcpState::Reset,
        )];
        assert_eq!(
            plan(21 * S, &b, &closing, &timeouts()).sessions.len(),
            1,
            "reset: transitory timer"
        );
        assert_eq!(
            plan(19 * S, &b, &closing, &timeouts()).sessions.len(),
            0,
            "kept after RST until then"
        );
    }

    #[test]
    fn static_forwards_never_expire() {
        let (k, mut v) = binding(proto::UDP, 53, 0);
        v.flags = BINDING_FLAG_STATIC;
        assert!(plan(1_000_000 * S, &[(k, v)], &[], &timeouts())
            .bindings
            .is_empty());
    }

    #[test]
    fn remaining_rounds_up() {
        assert_eq!(remaining_secs(10 * S, 10 * S, 4), 4);
        assert_eq!(remaining_secs(10 * S + 1, 10 * S, 4), 4);
        assert_eq!(remaining_secs(20 * S, 10 * S, 4), 0);
        assert_eq!(remaining_secs(S, 2 * S, 4), 4, "clock skew never adds time");
    }
}
