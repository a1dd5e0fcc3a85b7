//! Selecting entries of the NAT table, as `conntrack -L/-D` selects flows: by protocol and by
//! internal, external or remote endpoint, each an address, a port, or both.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Context, Result};

use crate::table::Row;

/// An address, a port, or both: `ADDR`, `ADDR:PORT` or `:PORT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointFilter {
    /// The address it must have, if given.
    pub addr: Option<Ipv4Addr>,
    /// The port (ICMP: echo identifier) it must have, if given.
    pub port: Option<u16>,
}

impl EndpointFilter {
    /// Parses `ADDR`, `ADDR:PORT` or `:PORT`.
    pub fn parse(text: &str) -> Result<Self> {
        let (addr, port) = match text.rsplit_once(':') {
            Some((addr, port)) => (addr, Some(port)),
            None => (text, None),
        };
        let addr = match addr {
            "" => None,
            a => Some(
                a.parse()
                    .with_context(|| format!("{a:?} is not an IPv4 address"))?,
            ),
        };
        let port = match port {
            None => None,
            Some(p) => Some(p.parse().with_context(|| format!("{p:?} is not a port"))?),
        };
        if addr.is_none() && port.is_none() {
            bail!("{text:?} names neither an address nor a port (ADDR, ADDR:PORT or :PORT)");
        }
        Ok(EndpointFilter { addr, port })
    }

    /// Whether `endpoint` (`ip:port` as the table writes it) matches.
    pub fn matches(&self, endpoint: &str) -> bool {
        let Ok(endpoint) = endpoint.parse::<SocketAddrV4>() else {
            return false;
        };
        self.addr.is_none_or(|a| *endpoint.ip() == a) && self.port.is_none_or(|p| endpoint.port() == p)
    }
}

/// The filters of `mappings`, `delete` and `flush`; all given ones must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowFilter {
    /// Protocol name (`udp`, `tcp`, `icmp`).
    pub proto: Option<String>,
    /// Internal endpoint.
    pub internal: Option<EndpointFilter>,
    /// External endpoint.
    pub external: Option<EndpointFilter>,
    /// Remote endpoint (a row without a remote, an idle binding or a forward, never matches).
    pub remote: Option<EndpointFilter>,
}

impl RowFilter {
    /// True when no filter is given (everything matches).
    pub fn is_empty(&self) -> bool {
        *self == RowFilter::default()
    }

    /// Whether `row` passes every given filter.
    pub fn matches(&self, row: &Row) -> bool {
        self.proto.as_deref().is_none_or(|p| row.proto == p)
            && self.internal.is_none_or(|f| f.matches(&row.internal))
            && self.external.is_none_or(|f| f.matches(&row.external))
            && self
                .remote
                .is_none_or(|f| row.remote.as_deref().is_some_and(|r| f.matches(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(remote: Option<&str>) -> Row {
        Row {
            proto: "udp",
            internal: "10.0.0.2:40000".into(),
            external: "198.51.100.254:40000".into(),
            remote: remote.map(str::to_string),
            state: "active".into(),
            expires_in: Some(30),
        }
    }

    #[test]
    fn endpoints_by_address_port_or_both() {
        let both = EndpointFilter::parse("10.0.0.2:40000").unwrap();
        assert!(both.matches("10.0.0.2:40000") && !both.matches("10.0.0.2:40001"));
        let addr = EndpointFilter::parse("10.0.0.2").unwrap();
        assert!(addr.matches("10.0.0.2:1") && !addr.matches("10.0.0.3:1"));
        let port = EndpointFilter::parse(":53").unwrap();
        assert!(port.matches("192.0.2.1:53") && !port.matches("192.0.2.1:54"));
        for bad in ["", ":", "10.0.0", "10.0.0.2:x", ":70000"] {
            assert!(EndpointFilter::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_given_filter_must_match_and_a_remote_filter_needs_a_remote() {
        let mut f = RowFilter::default();
        assert!(f.is_empty() && f.matches(&row(None)));
        f.proto = Some("udp".into());
        f.remote = Some(EndpointFilter::parse("192.0.2.1").unwrap());
        assert!(f.matches(&row(Some("192.0.2.1:3478"))));
        assert!(!f.matches(&row(Some("192.0.2.9:3478"))));
        assert!(!f.matches(&row(None)), "an idle binding has no remote");
        f.proto = Some("tcp".into());
        assert!(!f.matches(&row(Some("192.0.2.1:3478"))));
    }
}
