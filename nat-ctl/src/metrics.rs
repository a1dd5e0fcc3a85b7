//! Prometheus metrics, served at `/metrics` by `nat-ctl attach --metrics ADDR:PORT` in the text
//! format (0.0.4), encoded by the `prometheus-client` crate.
//!
//! Every data-path counter is exported once: counters that are variants of one thing are one
//! family with a label (drops by `reason`, refused flows by `reason`, translations by
//! `direction`, ...), the rest are metrics of their own; `exported` says where each goes. The
//! table's fill levels are gauges, with the table's entries by protocol and state, and
//! `nat_build_info` names the version and revision.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use nat_common::Counter;
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter as PromCounter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{clock::monotonic_ns, pinned::PinnedMaps, settings::Timeouts, table, table_fill::TableFill};

/// Largest request head read before answering; a scrape's is a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8192;
/// How long a client may take to send its request before the connection is closed, so idle
/// connections cannot pile up.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The path metrics are served at.
const METRICS_PATH: &str = "/metrics";

/// Where a data-path counter appears in the exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exported {
    /// A counter of its own (the name without `_total`, which the encoder appends).
    Own(&'static str),
    /// One label value of a family: (family, label, value).
    Labelled(&'static str, &'static str, &'static str),
}

/// Family of packets dropped by the data path, by `reason`.
const DROPPED: &str = "nat_dropped_packets";
/// Family of new flows refused, by `reason`.
const REFUSED: &str = "nat_refused_flows";
/// Family of packets passed untouched, by `reason`.
const PASSED: &str = "nat_passed_packets";
/// Family of translated packets, by `direction`.
const TRANSLATED: &str = "nat_translated_packets";
/// Family of translated ICMP errors, by `direction`.
const ICMP_TRANSLATED: &str = "nat_icmp_errors_translated";
/// Family of handled non-first fragments, by `outcome`.
const FRAGMENTS: &str = "nat_fragments";

/// Where `counter` is exported. Exhaustive: a new counter must be placed here to build.
pub const fn exported(counter: Counter) -> Exported {
    use Exported::{Labelled, Own};
    match counter {
        Counter::TranslatedOut => Labelled(TRANSLATED, "direction", "out"),
        Counter::TranslatedIn => Labelled(TRANSLATED, "direction", "in"),
        Counter::NewBinding => Own("nat_bindings_created"),
        Counter::NewSession => Own("nat_sessions_created"),
        Counter::FilteredIn => Labelled(DROPPED, "reason", "filtered"),
        Counter::PortExhausted => Labelled(REFUSED, "reason", "port_exhausted"),
        Counter::TableFull => Labelled(REFUSED, "reason", "table_full"),
        Counter::HostLimit => Labelled(REFUSED, "reason", "host_limit"),
        Counter::SessionLimit => Labelled(REFUSED, "reason", "session_limit"),
        Counter::InboundNoBinding => Labelled(PASSED, "reason", "inbound_no_binding"),
        Counter::PassedNotNat => Labelled(PASSED, "reason", "not_nat"),
        Counter::PassedLocal => Labelled(PASSED, "reason", "local"),
        Counter::Malformed => Labelled(DROPPED, "reason", "malformed"),
        Counter::UnsupportedProtocol => Labelled(DROPPED, "reason", "unsupported_protocol"),
        Counter::IcmpErrorOut => Labelled(ICMP_TRANSLATED, "direction", "out"),
        Counter::IcmpErrorIn => Labelled(ICMP_TRANSLATED, "direction", "in"),
        Counter::IcmpErrorDropped => Labelled(DROPPED, "reason", "icmp_error_unmatched"),
        Counter::FragmentTranslated => Labelled(FRAGMENTS, "outcome", "translated"),
        Counter::FragmentNoState => Labelled(DROPPED, "reason", "fragment_no_state"),
        Counter::FragmentParked => Labelled(FRAGMENTS, "outcome", "parked"),
        Counter::FragmentReinjected => Labelled(FRAGMENTS, "outcome", "reinjected"),
        Counter::FragmentParkExpired => Labelled(DROPPED, "reason", "fragment_park_expired"),
        Counter::UnsolicitedSyn => Labelled(DROPPED, "reason", "unsolicited_syn"),
        Counter::FastPathRedirected => Own("nat_fast_path_redirected_packets"),
        Counter::Hairpinned => Own("nat_hairpinned_packets"),
        Counter::SpoofedSource => Labelled(DROPPED, "reason", "spoofed_source"),
        Counter::TcpOutOfWindow => Own("nat_tcp_out_of_window_segments"),
    }
}

/// Help text of a family (a labelled counter's own help names one variant only).
fn family_help(family: &str) -> &'static str {
    match family {
        DROPPED => "Packets dropped by the data path, by reason (see nat-ctl stats for each).",
        REFUSED => "New flows refused, by reason (no free port, table full, a host or session limit).",
        PASSED => "Packets passed to the kernel untouched, by reason.",
        TRANSLATED => "Packets translated, by direction.",
        ICMP_TRANSLATED => "ICMP errors translated (RFC 5508), by direction.",
        _ => "Non-first IP fragments handled, by outcome (RFC 4787 REQ-14).",
    }
}

/// A label set of one pair, as the families use.
type Labels = Vec<(&'static str, String)>;

/// Renders every metric from the maps (text format 0.0.4).
pub fn render(maps: &PinnedMaps) -> Result<String> {
    let mut registry = Registry::default();
    let mut families: BTreeMap<&'static str, Family<Labels, PromCounter>> = BTreeMap::new();
    for (counter, value) in maps.counters()? {
        match exported(counter) {
            Exported::Own(name) => {
                let metric = PromCounter::<u64>::default();
                metric.inc_by(value);
                registry.register(name, one_line(counter.help()), metric);
            }
            Exported::Labelled(family, label, label_value) => {
                families
                    .entry(family)
                    .or_default()
                    .get_or_create(&vec![(label, label_value.to_string())])
                    .inc_by(value);
            }
        }
    }
    for (family, metric) in families {
        registry.register(family, family_help(family), metric);
    }

    let config = maps.read_config()?;
    let bindings = maps.bindings()?;
    let sessions = maps.sessions()?;
    let fill = TableFill::read(maps, &config, bindings.len(), sessions.len());
    let gauges = [
        (
            "nat_bindings",
            "Dynamic bindings in the NAT table.",
            fill.dynamic_bindings,
        ),
        (
            "nat_bindings_limit",
            "Most dynamic bindings allowed (--max-bindings).",
            fill.max_bindings as u64,
        ),
        (
            "nat_binding_entries",
            "Entries in the outbound binding map, forwards included.",
            fill.binding_entries as u64,
        ),
        (
            "nat_binding_capacity",
            "Capacity of each binding map.",
            fill.binding_capacity as u64,
        ),
        (
            "nat_sessions",
            "Entries in the session map.",
            fill.session_entries as u64,
        ),
        (
            "nat_session_capacity",
            "Capacity of the session map.",
            fill.session_capacity as u64,
        ),
        (
            "nat_sessions_in_use",
            "Sessions (remote endpoints of bindings) in use.",
            fill.sessions_in_use,
        ),
        (
            "nat_sessions_per_host_limit",
            "Most sessions per internal host (--max-sessions-per-host; 0: no limit).",
            config.max_sessions_per_host as u64,
        ),
        (
            "nat_sessions_per_binding_limit",
            "Most sessions per binding (--max-sessions-per-binding; 0: no limit).",
            config.max_sessions_per_binding as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }

    // The rows of `nat-ctl mappings`, by protocol and state.
    let rows = table::build(
        monotonic_ns(),
        &bindings,
        &sessions,
        &Timeouts(config.timeouts_secs),
    );
    let entries = Family::<Labels, Gauge>::default();
    for row in &rows {
        entries
            .get_or_create(&vec![
                ("proto", row.proto.to_string()),
                ("state", row.state.clone()),
            ])
            .inc();
    }
    registry.register(
        "nat_table_entries",
        "Entries of the NAT table (the rows of nat-ctl mappings), by protocol and state.",
        entries,
    );
    registry.register(
        "nat_build",
        "The nat-ctl that serves these metrics.",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("revision", env!("NAT_CTL_REVISION").to_string()),
        ]),
    );

    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).context("cannot encode the metrics")?;
    Ok(out)
}

/// Help texts are one line in the exposition.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Binds the listener (so a bad address fails before anything is attached).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics"))
}

/// Serves scrapes until the task is dropped. Each connection gets one response; GET and HEAD
/// of `/metrics` are answered, anything else gets 404 (405 for other methods on the path).
pub async fn serve(listener: TcpListener, pin_dir: PathBuf) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let pin_dir = pin_dir.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_REQUEST_BYTES];
            let Ok(Ok(n)) = tokio::time::timeout(REQUEST_READ_TIMEOUT, stream.read(&mut buf)).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let response = match request_line(&head) {
                Some((method @ ("GET" | "HEAD"), METRICS_PATH)) => {
                    let body = match PinnedMaps::open(&pin_dir).and_then(|maps| render(&maps)) {
                        Ok(body) => reply("200 OK", prometheus_text::CONTENT_TYPE, &body),
                        Err(e) => reply("500 Internal Server Error", "text/plain", &format!("{e:#}\n")),
                    };
                    if method == "HEAD" {
                        without_body(&body)
                    } else {
                        body
                    }
                }
                Some((_, METRICS_PATH)) => reply("405 Method Not Allowed", "text/plain", "GET or HEAD\n"),
                _ => reply("404 Not Found", "text/plain", "metrics are at /metrics\n"),
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Method and path (without a query string) of an HTTP request head.
fn request_line(head: &str) -> Option<(&str, &str)> {
    let mut words = head.lines().next()?.split_whitespace();
    let method = words.next()?;
    let target = words.next()?;
    Some((method, target.split('?').next().unwrap_or(target)))
}

fn reply(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A response's head only (HEAD: the headers GET would send, Content-Length included).
fn without_body(response: &str) -> String {
    match response.find("\r\n\r\n") {
        Some(end) => response[..end + 4].to_string(),
        None => response.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_exported_once() {
        let mut seen = std::collections::HashSet::new();
        for &counter in Counter::ALL {
            let place = exported(counter);
            assert!(
                seen.insert(place),
                "{} exported twice as {place:?}",
                counter.name()
            );
        }
    }

    #[test]
    fn request_lines_and_head_responses() {
        assert_eq!(
            request_line("GET /metrics HTTP/1.1\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_line("HEAD /metrics?x=1 HTTP/1.1\r\n"),
            Some(("HEAD", "/metrics"))
        );
        assert_eq!(request_line(""), None);
        let full = reply("200 OK", "text/plain", "body\n");
        let head = without_body(&full);
        assert!(head.ends_with("\r\n\r\n") && head.contains("Content-Length: 5"));
        assert!(!head.contains("body"));
    }
}
