//! The NAT table as a user reads it: one row per (binding, remote), or one per binding that
//! has no session (yet, or any more).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use nat_common::{
    maps::{BINDING_FLAG_STATIC, SESSION_KIND_ENDPOINT},
    proto,
    tcp_state::TcpState,
    BindingKey, BindingValue, SessionKey, SessionValue,
};
use serde::Serialize;

use crate::{
    expiry::{binding_timeout_secs, remaining_secs, session_timeout_secs},
    settings::Timeouts,
};

/// One line of `nat-ctl mappings`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// "udp", "tcp" or "icmp".
    pub proto: &'static str,
    /// Internal endpoint, "ip:port" (port = echo identifier for ICMP).
    pub internal: String,
    /// External endpoint.
    pub external: String,
    /// Remote endpoint the binding talked to, if any.
    pub remote: Option<String>,
    /// TCP state, "active" for UDP/ICMP sessions, "idle" for a binding without sessions,
    /// "static" for a static forward, "pcp" or "nat-pmp" for a host's port mapping.
    pub state: String,
    /// Seconds until expiry; `None` for static forwards (a port mapping's remaining lifetime
    /// is filled in from the server's record, `port_mapping::annotate`).
    pub expires_in: Option<u64>,
}

fn endpoint(addr_be: u32, port_be: u16) -> String {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be)).to_string()
}

/// A binding as sessions name it: protocol, external address, external port.
type BindingId = (u8, u32, u16);

/// Builds the table from the map contents at `now_ns`, sorted by protocol, internal, remote.
pub fn build(
    now_ns: u64,
    bindings: &[(BindingKey, BindingValue)],
    sessions: &[(SessionKey, SessionValue)],
    timeouts: &Timeouts,
) -> Vec<Row> {
    let mut by_binding: HashMap<BindingId, Vec<&(SessionKey, SessionValue)>> = HashMap::new();
    for entry in sessions.iter().filter(|(k, _)| k.kind == SESSION_KIND_ENDPOINT) {
        by_binding
            .entry((entry.0.proto, entry.0.external_addr, entry.0.external_port))
            .or_default()
            .push(entry);
    }
    let mut rows = Vec::new();
    for (key, value) in bindings {
        let internal = endpoint(key.internal_addr, key.internal_port);
        let external = endpoint(value.external_addr, value.external_port);
        let is_static = value.flags & BINDING_FLAG_STATIC != 0;
        let sessions = by_binding.get(&(key.proto, value.external_addr, value.external_port));
        // In symmetric mode a binding belongs to one remote: show only that remote's session.
        let mine = sessions.into_iter().flatten().filter(|(s, _)| {
            key.remote_addr == 0 || (s.remote_addr == key.remote_addr && s.remote_port == key.remote_port)
        });
        let mut any = false;
        for (s, v) in mine {
            any = true;
            let state = if key.proto == proto::TCP {
                TcpState::from_u8(v.tcp_state).name().to_string()
            } else {
                "active".to_string()
            };
            let timeout = session_timeout_secs(key.proto, v.tcp_state, timeouts);
            rows.push(Row {
                proto: proto::name(key.proto),
                internal: internal.clone(),
                external: external.clone(),
                remote: Some(endpoint(s.remote_addr, s.remote_port)),
                state,
                expires_in: Some(remaining_secs(now_ns, v.last_seen_ns, timeout)),
            });
        }
        // A forward is listed itself, sessions or not; a dynamic binding only while it has none.
        if is_static || !any {
            let timeout = binding_timeout_secs(key.proto, timeouts);
            rows.push(Row {
                proto: proto::name(key.proto),
                internal,
                external,
                remote: None,
                state: static_state(value.flags).unwrap_or("idle").to_string(),
                expires_in: (!is_static).then(|| remaining_secs(now_ns, value.last_seen_ns, timeout)),
            });
        }
    }
    rows.sort_by(|a, b| (a.proto, &a.internal, &a.remote).cmp(&(b.proto, &b.internal, &b.remote)));
    rows
}

/// The state a static binding shows: `static` for an operator's forward, `pcp`, `nat-pmp` or
/// `upnp` for a host's port mapping; `None` for a dynamic binding.
fn static_state(flags: u8) -> Option<&'static str> {
    use nat_common::maps::{BINDING_FLAG_NATPMP, BINDING_FLAG_PCP};
    if flags & BINDING_FLAG_STATIC == 0 {
        None
    } else if flags & BINDING_FLAG_PCP != 0 {
        Some("pcp")
    } else if flags & BINDING_FLAG_NATPMP != 0 {
        Some("nat-pmp")
    } else if flags & nat_common::maps::BINDING_FLAG_UPNP != 0 {
        Some("upnp")
    } else {
        Some("static")
    }
}

/// Renders rows as an aligned text table.
pub fn render(rows: &[Row]) -> String {
    let header = ["PROTO", "INTERNAL", "EXTERNAL", "REMOTE", "STATE", "EXPIRES"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.proto.to_string(),
                r.internal.clone(),
                r.external.clone(),
                r.remote.clone().unwrap_or_else(|| "*".to_string()),
                r.state.clone(),
                r.expires_in
                    .map_or_else(|| "never".to_string(), |s| format!("{s}s")),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| -> String {
        let mut s = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(&header.map(String::from));
    for row in &cells {
        out += &line(row);
    }
    if rows.is_empty() {
        out += "(no bindings)\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(a: [u8; 4]) -> u32 {
        u32::from_be_bytes(a).to_be()
    }

    #[test]
    fn rows_per_session_and_idle_binding() {
        let timeouts = Timeouts([300, 7440, 240, 60]);
        let key = BindingKey {
            internal_addr: be([10, 0, 0, 2]),
            internal_port: 40000u16.to_be(),
            proto: proto::UDP,
            ..Default::default()
        };
        let value = BindingValue {
            last_seen_ns: 0,
            external_addr: be([198, 51, 100, 254]),
            external_port: 40000u16.to_be(),
            ..Default::default()
        };
        let idle_key = BindingKey {
            internal_port: 40001u16.to_be(),
            ..key
        };
        let idle_value = BindingValue {
            external_port: 40001u16.to_be(),
            ..value
        };
        let session = (
            SessionKey {
                external_addr: value.external_addr,
                remote_addr: be([198, 51, 100, 1]),
                external_port: value.external_port,
                remote_port: 9999u16.to_be(),
                proto: proto::UDP,
                kind: SESSION_KIND_ENDPOINT,
                _pad: [0; 2],
            },
            SessionValue {
                last_seen_ns: 100_000_000_000,
                ..Default::default()
            },
        );
        let rows = build(
            160_000_000_000,
            &[(key, value), (idle_key, idle_value)],
            &[session],
            &timeouts,
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].internal, "10.0.0.2:40000");
        assert_eq!(rows[0].external, "198.51.100.254:40000");
        assert_eq!(rows[0].remote.as_deref(), Some("198.51.100.1:9999"));
        assert_eq!(rows[0].state, "active");
        assert_eq!(rows[0].expires_in, Some(240));
        assert_eq!(rows[1].remote, None);
        assert_eq!(rows[1].state, "idle");
        assert_eq!(rows[1].expires_in, Some(140));
        let text = render(&rows);
        assert!(text.starts_with("PROTO"));
        assert!(text.contains("198.51.100.1:9999"));
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[1]["remote"], serde_json::Value::Null);
        assert_eq!(json[0]["expires_in"], 240);
    }
}
