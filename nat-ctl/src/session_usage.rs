//! Session counts per internal host, per binding and in all, the controller's side (RFC 6888
//! REQ-5; the data path's side is `nat-ebpf/src/usage.rs`). The data path adds each session it
//! creates to `SESSION_USAGE_CREATED`; the controller adds each one it removes to
//! `SESSION_USAGE_RELEASED`, which only it writes; the difference is what is in use. Only
//! endpoint sessions count (the rows of the NAT table), not their address-only twins.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use anyhow::Result;
use nat_common::{
    maps::{SessionUsageKey, SESSION_KIND_ENDPOINT, SESSION_USAGE_HOST},
    SessionKey, SessionValue,
};

use crate::{batch, pinned::PinnedMaps};

/// Removed sessions, tallied per usage key, to be recorded in one write per key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Releases(pub HashMap<SessionUsageKey, u64>);

impl Releases {
    /// Counts the removal of session `key` (whose value is `value`).
    pub fn add(&mut self, key: &SessionKey, value: &SessionValue) {
        if key.kind != SESSION_KIND_ENDPOINT {
            return;
        }
        for usage in [
            SessionUsageKey::all(),
            SessionUsageKey::host(value.internal_addr),
            SessionUsageKey::binding(key.proto, key.external_addr, key.external_port),
        ] {
            *self.0.entry(usage).or_default() += 1;
        }
    }
}

/// Adds `releases` to the released counts in batches (the sweep's path, for thousands of keys
/// at a time; `record` is the same for a few).
pub fn record_batched(maps: &PinnedMaps, releases: &Releases) -> Result<()> {
    Ok(batch::add_to_counts(&maps.session_usage_released, &releases.0)?)
}

/// `forget_binding` for many bindings at once (given by their usage keys), in batches.
pub fn forget_bindings(maps: &PinnedMaps, keys: &[SessionUsageKey]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let created = batch::lookup_many(&maps.session_usage_created, keys)?;
    let released = batch::lookup_many(&maps.session_usage_released, keys)?;
    let settled: Vec<SessionUsageKey> = keys
        .iter()
        .filter(|k| created.get(k).copied().unwrap_or(0) == released.get(k).copied().unwrap_or(0))
        .filter(|k| created.contains_key(k) || released.contains_key(k))
        .copied()
        .collect();
    batch::delete(&maps.session_usage_created, &settled)?;
    batch::delete(&maps.session_usage_released, &settled)?;
    Ok(())
}

/// Sessions in use under `key`.
pub fn in_use(maps: &PinnedMaps, key: SessionUsageKey) -> u64 {
    let created = maps.session_usage_created.get(&key, 0).unwrap_or(0);
    created.saturating_sub(maps.session_usage_released.get(&key, 0).unwrap_or(0))
}

/// Adds `releases` to the released counts.
pub fn record(maps: &mut PinnedMaps, releases: &Releases) -> Result<()> {
    for (key, n) in &releases.0 {
        let released = maps.session_usage_released.get(key, 0).unwrap_or(0);
        maps.session_usage_released.insert(key, released + n, 0)?;
    }
    Ok(())
}

/// Removes the sessions `keys` (their values taken from `snapshot`, a recent copy of the
/// session map) and records them as released. Returns how many were removed.
pub fn remove_sessions(
    maps: &mut PinnedMaps,
    keys: &[SessionKey],
    snapshot: &[(SessionKey, SessionValue)],
) -> Result<usize> {
    let wanted: HashSet<&SessionKey> = keys.iter().filter(|k| k.kind == SESSION_KIND_ENDPOINT).collect();
    let values: HashMap<&SessionKey, &SessionValue> = snapshot
        .iter()
        .filter(|(k, _)| wanted.contains(k))
        .map(|(k, v)| (k, v))
        .collect();
    let mut releases = Releases::default();
    let mut removed = 0;
    for key in keys {
        if maps.sessions.remove(key).is_err() {
            continue;
        }
        removed += 1;
        if let Some(value) = values.get(key) {
            releases.add(key, value);
        }
    }
    record(maps, &releases)?;
    Ok(removed)
}

/// Drops the counts of the binding `external_addr:external_port` (`proto`) once it is gone and
/// every session it had is released, so the maps hold entries only for live bindings. A count
/// still open (a session created while the binding went) stays, and balances out when that
/// session is removed.
pub fn forget_binding(maps: &mut PinnedMaps, proto: u8, external_addr: u32, external_port: u16) {
    let key = SessionUsageKey::binding(proto, external_addr, external_port);
    let created = maps.session_usage_created.get(&key, 0).unwrap_or(0);
    let released = maps.session_usage_released.get(&key, 0).unwrap_or(0);
    if created == released {
        let _ = maps.session_usage_created.remove(&key);
        let _ = maps.session_usage_released.remove(&key);
    }
}

/// The internal hosts holding sessions, with how many, most first.
pub fn by_host(maps: &PinnedMaps) -> Vec<(Ipv4Addr, u64)> {
    let mut hosts: Vec<(Ipv4Addr, u64)> = maps
        .session_usage_created
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.kind == SESSION_USAGE_HOST)
        .map(|k| (Ipv4Addr::from(u32::from_be(k.addr)), in_use(maps, k)))
        .filter(|(_, n)| *n != 0)
        .collect();
    hosts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    hosts
}

#[cfg(test)]
mod tests {
    use nat_common::maps::SESSION_KIND_ADDRESS;

    use super::*;

    #[test]
    fn only_endpoint_sessions_are_released_per_host_binding_and_in_all() {
        let key = SessionKey {
            external_addr: 9,
            remote_addr: 7,
            external_port: 4000,
            remote_port: 80,
            proto: 17,
            kind: SESSION_KIND_ENDPOINT,
            _pad: [0; 2],
        };
        let value = SessionValue {
            internal_addr: 5,
            ..Default::default()
        };
        let mut r = Releases::default();
        r.add(&key, &value);
        r.add(
            &SessionKey {
                remote_port: 81,
                ..key
            },
            &value,
        );
        r.add(
            &SessionKey {
                kind: SESSION_KIND_ADDRESS,
                remote_port: 0,
                ..key
            },
            &value,
        );
        assert_eq!(r.0.len(), 3);
        assert_eq!(r.0[&SessionUsageKey::all()], 2);
        assert_eq!(r.0[&SessionUsageKey::host(5)], 2);
        assert_eq!(r.0[&SessionUsageKey::binding(17, 9, 4000)], 2);
    }
}
