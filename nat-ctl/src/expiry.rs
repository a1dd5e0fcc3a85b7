//! Timer expiry: the sweep that removes idle sessions, then idle bindings.
//!
//! Rules (RFC 4787 REQ-5/REQ-6, RFC 5382 REQ-5, RFC 5508 REQ-2, RFC 7857 §2):
//! - an address-and-port session expires when idle longer than its protocol's timeout (for TCP,
//!   the established or the transitory timeout, by state);
//! - an address-only session lives as long as any address-and-port session with the same remote
//!   address on the same binding, and at least its own timeout from when it was last written;
//! - a binding expires when it has no live session left and has itself been idle longer than
//!   its protocol's timeout (TCP: the transitory one). Static forwards never expire.
//!
//! Only outbound packets refresh timers, so the data path's timestamps are "last outbound".

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;
use nat_common::{
    config::{Timeout, CONFIG_FLAG_PER_REMOTE_BINDINGS},
    maps::{SessionUsageKey, BINDING_FLAG_STATIC, SESSION_KIND_ADDRESS, USAGE_ALL_HOSTS},
    proto,
    tcp_state::TcpState,
    BindingKey, BindingValue, ExternalKey, SessionKey, SessionValue,
};

use crate::{
    batch::{self, BatchReader},
    pinned::PinnedMaps,
    session_usage,
    settings::Timeouts,
};

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

/// The sweep's decisions, built entry by entry as the maps are read (bindings first, then
/// sessions), so the sweep never holds a copy of a whole map and does hash-set work only for
/// the few bindings that are idle: a binding used within its timeout stays whatever its
/// sessions say, so only idle ones ask whether a session is live.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Idle dynamic bindings, by both keys, in the order seen.
    candidates: Vec<(BindingKey, ExternalKey)>,
    /// Index into `candidates` by the binding's identity in session keys.
    candidate_ids: HashMap<BindingId, usize>,
    /// Whether a live session keeps `candidates[i]`.
    kept: Vec<bool>,
    /// A per-remote binding (symmetric mode's) that is not idle was seen.
    per_remote_live: bool,
    /// Expired address-and-port sessions, with their values (for the usage accounting).
    pub expired: Vec<(SessionKey, SessionValue)>,
    /// Live address-and-port sessions, as (binding, remote address): what keeps an idle
    /// address-only session.
    live_remotes: Vec<(BindingId, u32)>,
    /// Address-only sessions idle past their timeout.
    idle_address: Vec<SessionKey>,
}

impl Decisions {
    /// Takes in one outbound binding entry.
    pub fn observe_binding(
        &mut self,
        now_ns: u64,
        key: &BindingKey,
        value: &BindingValue,
        timeouts: &Timeouts,
    ) {
        let idle = value.flags & BINDING_FLAG_STATIC == 0
            && expired(
                now_ns,
                value.last_seen_ns,
                binding_timeout_secs(key.proto, timeouts),
            );
        if !idle {
            self.per_remote_live |= key.remote_addr != 0;
            return;
        }
        self.candidate_ids.insert(
            (key.proto, value.external_addr, value.external_port),
            self.candidates.len(),
        );
        self.candidates.push((*key, external_key(key, value)));
        self.kept.push(false);
    }

    /// Takes in one session entry.
    pub fn observe_session(
        &mut self,
        now_ns: u64,
        key: &SessionKey,
        value: &SessionValue,
        timeouts: &Timeouts,
    ) {
        let idle = expired(
            now_ns,
            value.last_seen_ns,
            session_timeout_secs(key.proto, value.tcp_state, timeouts),
        );
        if key.kind == SESSION_KIND_ADDRESS {
            // One written within its timeout stays whatever else the walk saw: the data path
            // inserts it right after its address-and-port session, and a walk over the hash
            // map (bucket by bucket, not a snapshot) can see the second and miss the first.
            // Deleted, it would not come back while that session lives (only a new session
            // inserts it), and ADF would drop the remote's packets.
            if idle {
                self.idle_address.push(*key);
            }
            return;
        }
        if idle {
            self.expired.push((*key, *value));
            return;
        }
        let id = (key.proto, key.external_addr, key.external_port);
        if let Some(&i) = self.candidate_ids.get(&id) {
            self.kept[i] = true;
        }
        self.live_remotes.push((id, key.remote_addr));
    }

    /// The address-only sessions that go: idle, and no address-and-port session with their
    /// remote on their binding is live (RFC 4787 ADF state lives as long as the APDF state
    /// behind it).
    pub fn expired_address_sessions(&self) -> Vec<SessionKey> {
        if self.idle_address.is_empty() {
            return Vec::new();
        }
        let mut idle: HashSet<(BindingId, u32)> = self
            .idle_address
            .iter()
            .map(|k| ((k.proto, k.external_addr, k.external_port), k.remote_addr))
            .collect();
        for pair in &self.live_remotes {
            idle.remove(pair);
        }
        self.idle_address
            .iter()
            .filter(|k| idle.contains(&((k.proto, k.external_addr, k.external_port), k.remote_addr)))
            .copied()
            .collect()
    }

    /// The bindings that go, by both keys: idle, dynamic, and no live session.
    pub fn expired_bindings(&self) -> Vec<(BindingKey, ExternalKey)> {
        self.candidates
            .iter()
            .zip(&self.kept)
            .filter(|(_, kept)| !**kept)
            .map(|(c, _)| *c)
            .collect()
    }

    /// Whether a per-remote binding outlives this sweep (counting only what was decided here).
    pub fn per_remote_left(&self) -> bool {
        self.per_remote_live
            || self
                .candidates
                .iter()
                .zip(&self.kept)
                .any(|((k, _), kept)| *kept && k.remote_addr != 0)
    }
}

/// Decides what has expired at `now_ns` (the sweep's decisions over whole-map snapshots).
pub fn plan(
    now_ns: u64,
    bindings: &[(BindingKey, BindingValue)],
    sessions: &[(SessionKey, SessionValue)],
    timeouts: &Timeouts,
) -> SweepPlan {
    let mut d = Decisions::default();
    for (key, value) in bindings {
        d.observe_binding(now_ns, key, value, timeouts);
    }
    for (key, value) in sessions {
        d.observe_session(now_ns, key, value, timeouts);
    }
    let mut plan = SweepPlan::default();
    plan.sessions.extend(d.expired.iter().map(|(k, _)| *k));
    plan.sessions.extend(d.expired_address_sessions());
    plan.bindings = d.expired_bindings();
    plan
}

/// Clears `CONFIG_FLAG_PER_REMOTE_BINDINGS` once a cone mode runs and no per-remote binding
/// outlived a complete sweep, so cone modes stop paying the extra lookup.
fn clear_per_remote_flag(maps: &mut PinnedMaps) -> Result<()> {
    let mut config = maps.read_config()?;
    if config.flags & CONFIG_FLAG_PER_REMOTE_BINDINGS == 0 || config.mode().mapping_is_remote_dependent() {
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
    /// The sweep saw the stop flag and returned before its end (what it removed until then is
    /// removed and accounted for; the next sweep does the rest).
    pub interrupted: bool,
}

fn stopping(stop: &AtomicBool) -> bool {
    stop.load(Ordering::Relaxed)
}

/// Runs one sweep over the live maps, `batch::CHUNK` entries per map operation, and returns
/// early when `stop` is set (looked at between chunks, so within milliseconds at any table
/// size). Order as the data path needs it: both maps are read whole first (a binding with a
/// live session stays), expired sessions are deleted before any binding, and a binding goes
/// by its outbound entry first, so no new packet finds it while its port is freed.
pub fn sweep(
    maps: &mut PinnedMaps,
    now_ns: u64,
    timeouts: &Timeouts,
    stop: &AtomicBool,
) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let per_remote_left;
    {
        let maps: &PinnedMaps = maps;
        let Some(decisions) = decide(maps, now_ns, timeouts, stop)? else {
            report.interrupted = true;
            return Ok(report);
        };
        if !remove_expired_sessions(maps, &decisions, stop, &mut report)? {
            report.interrupted = true;
            return Ok(report);
        }
        let expiring = decisions.expired_bindings();
        // A packet may have refreshed a binding since it was read: read them again (its new
        // stamp is then later than `now_ns`, so it is not idle).
        let out_keys: Vec<BindingKey> = expiring.iter().map(|(k, _)| *k).collect();
        let current = batch::lookup_many(&maps.bindings_out, &out_keys)?;
        let mut refreshed_per_remote = false;
        let still: Vec<(BindingKey, ExternalKey)> = expiring
            .into_iter()
            .filter(|(k, _)| match current.get(k) {
                Some(v) if expired(now_ns, v.last_seen_ns, binding_timeout_secs(k.proto, timeouts)) => true,
                Some(_) => {
                    refreshed_per_remote |= k.remote_addr != 0;
                    false
                }
                None => false,
            })
            .collect();
        per_remote_left = decisions.per_remote_left() || refreshed_per_remote;
        let mut released_hosts: HashMap<u32, u64> = HashMap::new();
        let result = (|| -> Result<()> {
            for chunk in still.chunks(batch::CHUNK) {
                let out: Vec<BindingKey> = chunk.iter().map(|(k, _)| *k).collect();
                let inb: Vec<ExternalKey> = chunk.iter().map(|(_, k)| *k).collect();
                report.bindings += remove_bindings(maps, &out, &inb, &mut released_hosts)?;
                if stopping(stop) {
                    report.interrupted = true;
                    break;
                }
            }
            Ok(())
        })();
        // Whatever was removed is accounted for, also after a failure part way.
        batch::add_to_counts(&maps.usage_released, &released_hosts)?;
        result?;
    }
    if !report.interrupted && !per_remote_left {
        clear_per_remote_flag(maps)?;
    }
    Ok(report)
}

/// Reads both maps into `Decisions`; `None` when stopped part way.
fn decide(
    maps: &PinnedMaps,
    now_ns: u64,
    timeouts: &Timeouts,
    stop: &AtomicBool,
) -> Result<Option<Decisions>> {
    let mut d = Decisions::default();
    let mut bindings = BatchReader::new(&maps.bindings_out);
    while let Some((keys, values)) = bindings.next_chunk()? {
        for (key, value) in keys.iter().zip(values) {
            d.observe_binding(now_ns, key, value, timeouts);
        }
        if stopping(stop) {
            return Ok(None);
        }
    }
    let mut sessions = BatchReader::new(&maps.sessions);
    while let Some((keys, values)) = sessions.next_chunk()? {
        for (key, value) in keys.iter().zip(values) {
            d.observe_session(now_ns, key, value, timeouts);
        }
        if stopping(stop) {
            return Ok(None);
        }
    }
    Ok(Some(d))
}

/// Deletes the expired sessions, chunk by chunk, recording each chunk's releases (RFC 6888
/// REQ-5 counts) as it goes. Returns false when stopped part way.
fn remove_expired_sessions(
    maps: &PinnedMaps,
    decisions: &Decisions,
    stop: &AtomicBool,
    report: &mut SweepReport,
) -> Result<bool> {
    for chunk in decisions.expired.chunks(batch::CHUNK) {
        let keys: Vec<SessionKey> = chunk.iter().map(|(k, _)| *k).collect();
        let missing = batch::delete(&maps.sessions, &keys)?;
        let mut releases = session_usage::Releases::default();
        for (i, (key, value)) in chunk.iter().enumerate() {
            if missing.binary_search(&i).is_err() {
                releases.add(key, value);
            }
        }
        report.sessions += chunk.len() - missing.len();
        session_usage::record_batched(maps, &releases)?;
        if stopping(stop) {
            return Ok(false);
        }
    }
    for chunk in decisions.expired_address_sessions().chunks(batch::CHUNK) {
        let missing = batch::delete(&maps.sessions, chunk)?;
        report.sessions += chunk.len() - missing.len();
        if stopping(stop) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes bindings by both of their keys (`out_keys[i]` with `in_keys[i]`), adds the freed
/// quota per host to `released_hosts` and settles their session counts. Returns how many were
/// removed (one already gone is skipped).
fn remove_bindings(
    maps: &PinnedMaps,
    out_keys: &[BindingKey],
    in_keys: &[ExternalKey],
    released_hosts: &mut HashMap<u32, u64>,
) -> Result<usize> {
    if out_keys.is_empty() {
        return Ok(0);
    }
    // Outbound entries first, so no new packet can find the binding; then free the ports.
    let missing = batch::delete(&maps.bindings_out, out_keys)?;
    let gone: Vec<usize> = (0..out_keys.len())
        .filter(|i| missing.binary_search(i).is_err())
        .collect();
    let freed: Vec<ExternalKey> = gone.iter().map(|&i| in_keys[i]).collect();
    batch::delete(&maps.bindings_in, &freed)?;
    for &i in &gone {
        for host in [USAGE_ALL_HOSTS, out_keys[i].internal_addr] {
            *released_hosts.entry(host).or_default() += 1;
        }
    }
    let usage: Vec<SessionUsageKey> = freed
        .iter()
        .map(|k| SessionUsageKey::binding(k.proto, k.external_addr, k.external_port))
        .collect();
    session_usage::forget_bindings(maps, &usage)?;
    Ok(gone.len())
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
    fn a_fresh_address_session_stays_even_when_its_twin_was_not_seen() {
        // The walk saw the address-only session the data path has just written, but not the
        // address-and-port session written just before it (an earlier bucket).
        let b = [binding(proto::UDP, 4000, 50 * S)];
        let s = [session(
            proto::UDP,
            4000,
            7,
            SESSION_KIND_ADDRESS,
            50 * S,
            TcpState::None,
        )];
        let p = plan(55 * S, &b, &s, &timeouts());
        assert!(p.sessions.is_empty(), "kept until its own timeout");
        assert_eq!(
            plan(61 * S, &b, &s, &timeouts()).sessions.len(),
            1,
            "then it goes"
        );
    }

    #[test]
    fn only_idle_bindings_ask_about_sessions_and_per_remote_ones_are_tracked() {
        let timeouts = timeouts();
        let mut d = Decisions::default();
        // A busy binding without any session: it stays (its own stamp is fresh).
        let (busy, busy_v) = binding(proto::UDP, 4000, 50 * S);
        // An idle per-remote binding kept by a live session, and an idle one without.
        let (mut kept, kept_v) = binding(proto::UDP, 4001, 0);
        kept.remote_addr = 7;
        let (gone, gone_v) = binding(proto::UDP, 4002, 0);
        for (k, v) in [(busy, busy_v), (kept, kept_v), (gone, gone_v)] {
            d.observe_binding(55 * S, &k, &v, &timeouts);
        }
        let (s, sv) = session(proto::UDP, 4001, 7, SESSION_KIND_ENDPOINT, 50 * S, TcpState::None);
        d.observe_session(55 * S, &s, &sv, &timeouts);
        let expired: Vec<u16> = d
            .expired_bindings()
            .iter()
            .map(|(k, _)| k.internal_port)
            .collect();
        assert_eq!(expired, [4002]);
        assert!(
            d.per_remote_left(),
            "the kept per-remote binding outlives the sweep"
        );
        let mut alone = Decisions::default();
        alone.observe_binding(55 * S, &kept, &kept_v, &timeouts);
        assert!(!alone.per_remote_left(), "without its session it goes too");
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
