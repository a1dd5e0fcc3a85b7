//! `nat-ctl delete` and `nat-ctl flush`: removing bindings from a running NAT, as
//! `conntrack -D` and `-F` remove flows. A binding goes with every session it has, through the
//! same steps as the expiry sweep (sessions first, their quota released; then both binding
//! entries, the host's quota released), so every count and limit stays consistent, and the
//! next packet of a deleted flow is a new flow: it gets a new binding and, inbound, meets the
//! mode's filter as an unsolicited packet would.
//!
//! Static forwards are kept unless asked for (`--forwards`); port mappings (PCP, NAT-PMP) are
//! always kept: their lifetimes belong to the hosts that asked for them.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::Result;
use nat_common::{
    maps::{BINDING_FLAGS_PORT_MAPPING, BINDING_FLAG_STATIC},
    proto, BindingKey, BindingValue, SessionKey,
};

use crate::{
    clock::monotonic_ns,
    expiry, forwards,
    pinned::PinnedMaps,
    session_usage,
    settings::Timeouts,
    table::{self, Row},
    table_filter::RowFilter,
};

/// A binding as a row names it: protocol name and external endpoint.
type RowBinding = (&'static str, SocketAddrV4);

/// What a delete removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Dynamic bindings.
    pub bindings: usize,
    /// Their sessions.
    pub sessions: usize,
    /// Static forwards (only with `--forwards`).
    pub forwards: usize,
}

/// The bindings with at least one row that `filter` selects.
pub fn chosen_bindings(rows: &[Row], filter: &RowFilter) -> HashSet<RowBinding> {
    rows.iter()
        .filter(|row| filter.matches(row))
        .filter_map(|row| Some((row.proto, row.external.parse().ok()?)))
        .collect()
}

/// The external endpoint of a binding value.
fn external_of(value: &BindingValue) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(value.external_addr)),
        u16::from_be(value.external_port),
    )
}

/// The sessions of the binding `(key, value)` among `sessions`: those on its external endpoint
/// (and, for a per-remote binding of symmetric mode, with its remote).
fn sessions_of<'a>(
    key: &BindingKey,
    value: &BindingValue,
    sessions: &'a [(SessionKey, nat_common::SessionValue)],
) -> impl Iterator<Item = SessionKey> + 'a {
    let (proto, addr, port) = (key.proto, value.external_addr, value.external_port);
    let (remote_addr, remote_port) = (key.remote_addr, key.remote_port);
    sessions
        .iter()
        .filter(move |(s, _)| s.proto == proto && s.external_addr == addr && s.external_port == port)
        .filter(move |(s, _)| {
            remote_addr == 0 || (s.remote_addr == remote_addr && s.remote_port == remote_port)
        })
        .map(|(s, _)| *s)
}

/// Removes the bindings that have a row matching `filter` (everything dynamic when it is
/// empty), with their sessions; static forwards too when `with_forwards`.
pub fn delete(
    maps: &mut PinnedMaps,
    filter: &RowFilter,
    timeouts: &Timeouts,
    with_forwards: bool,
) -> Result<Deleted> {
    let bindings = maps.bindings()?;
    let sessions = maps.sessions()?;
    let rows = table::build(monotonic_ns(), &bindings, &sessions, timeouts);
    let chosen = chosen_bindings(&rows, filter);
    let mut deleted = Deleted::default();
    for (key, value) in &bindings {
        let external = external_of(value);
        if !chosen.contains(&(proto::name(key.proto), external)) {
            continue;
        }
        if value.flags & BINDING_FLAG_STATIC != 0 {
            let port_mapping = value.flags & BINDING_FLAGS_PORT_MAPPING != 0;
            if with_forwards && !port_mapping && forwards::remove(maps, key.proto, external).is_ok() {
                deleted.forwards += 1;
            }
            continue;
        }
        let doomed: Vec<SessionKey> = sessions_of(key, value, &sessions).collect();
        deleted.sessions += session_usage::remove_sessions(maps, &doomed, &sessions)?;
        if expiry::remove_binding(maps, key, &expiry::external_key(key, value))? {
            deleted.bindings += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_filter::EndpointFilter;

    fn row(proto: &'static str, external: &str, remote: Option<&str>, state: &str) -> Row {
        Row {
            proto,
            internal: "10.0.0.2:40000".into(),
            external: external.into(),
            remote: remote.map(str::to_string),
            state: state.into(),
            expires_in: None,
        }
    }

    #[test]
    fn a_binding_is_chosen_when_any_of_its_rows_matches() {
        let rows = [
            row("udp", "198.51.100.254:1000", Some("192.0.2.1:53"), "active"),
            row("udp", "198.51.100.254:1000", Some("192.0.2.2:53"), "active"),
            row("udp", "198.51.100.254:2000", None, "idle"),
        ];
        let filter = RowFilter {
            remote: Some(EndpointFilter::parse("192.0.2.2").unwrap()),
            ..RowFilter::default()
        };
        let chosen = chosen_bindings(&rows, &filter);
        assert_eq!(chosen.len(), 1);
        assert!(chosen.contains(&("udp", "198.51.100.254:1000".parse().unwrap())));
        assert_eq!(
            chosen_bindings(&rows, &RowFilter::default()).len(),
            2,
            "flush: all"
        );
    }
}
