//! Binding created/removed events for `attach --debug`, with the RFC 6888 §4 fields: protocol,
//! internal address, external address and port, and time. Remote addresses are never logged
//! (RFC 6888 REQ-12). Bindings are observed at each sweep, so an event's time is accurate to
//! the sweep interval.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{SystemTime, UNIX_EPOCH},
};

use nat_common::{proto, BindingKey, BindingValue};

/// Remembers the bindings seen at the last sweep.
#[derive(Default)]
pub struct BindingEvents {
    known: HashMap<BindingKey, BindingValue>,
}

fn endpoint(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be))
}

/// A binding created or removed, with the fields RFC 6888 §4 asks for (the time is the log's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `created` or `removed`.
    pub what: &'static str,
    /// `udp`, `tcp` or `icmp`.
    pub proto: &'static str,
    /// Internal endpoint.
    pub internal: SocketAddrV4,
    /// External endpoint.
    pub external: SocketAddrV4,
}

impl Event {
    fn new(what: &'static str, key: &BindingKey, value: &BindingValue) -> Event {
        Event {
            what,
            proto: proto::name(key.proto),
            internal: endpoint(key.internal_addr, key.internal_port),
            external: endpoint(value.external_addr, value.external_port),
        }
    }

    /// One log line: `binding created proto=udp internal=IP:PORT external=IP:PORT`.
    pub fn log(&self) {
        tracing::info!(
            target: "nat_ctl::binding",
            proto = self.proto,
            internal = %self.internal,
            external = %self.external,
            "binding {}",
            self.what
        );
    }
}

impl BindingEvents {
    /// Compares `current` with the last sweep and returns one event per created or removed
    /// binding.
    pub fn observe(&mut self, current: Vec<(BindingKey, BindingValue)>) -> Vec<Event> {
        let current: HashMap<BindingKey, BindingValue> = current.into_iter().collect();
        let mut lines: Vec<Event> = current
            .iter()
            .filter(|(k, _)| !self.known.contains_key(k))
            .map(|(k, v)| Event::new("created", k, v))
            .collect();
        lines.extend(
            self.known
                .iter()
                .filter(|(k, _)| !current.contains_key(k))
                .map(|(k, v)| Event::new("removed", k, v)),
        );
        self.known = current;
        lines
    }
}

/// The current UTC time as RFC 3339 (`2026-11-21T15:52:03Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// `secs` since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    const SECS_PER_DAY: u64 = 86_400;
    let (days, rem) = ((secs / SECS_PER_DAY) as i64, secs % SECS_PER_DAY);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn created_then_removed_without_remote() {
        let key = BindingKey {
            internal_addr: u32::from(Ipv4Addr::new(10, 0, 0, 2)).to_be(),
            internal_port: 40000u16.to_be(),
            remote_addr: u32::from(Ipv4Addr::new(198, 51, 100, 1)).to_be(),
            proto: proto::UDP,
            ..Default::default()
        };
        let value = BindingValue {
            external_addr: u32::from(Ipv4Addr::new(198, 51, 100, 254)).to_be(),
            external_port: 40001u16.to_be(),
            ..Default::default()
        };
        let mut events = BindingEvents::default();
        let created = events.observe(vec![(key, value)]);
        let expected = Event {
            what: "created",
            proto: "udp",
            internal: "10.0.0.2:40000".parse().unwrap(),
            external: "198.51.100.254:40001".parse().unwrap(),
        };
        assert_eq!(created, vec![expected.clone()]);
        assert!(
            events.observe(vec![(key, value)]).is_empty(),
            "no news, no events"
        );
        let removed = events.observe(vec![]);
        assert_eq!(
            removed,
            vec![Event {
                what: "removed",
                ..expected
            }]
        );
    }
}
