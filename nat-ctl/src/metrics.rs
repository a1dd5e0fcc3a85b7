//! Prometheus text exposition (format 0.0.4) of the counters and table fill levels, served at
//! `/metrics` by `nat-ctl attach --metrics ADDR:PORT`.

use std::{fmt::Write as _, net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use nat_common::maps::{binding_map_capacity, session_map_capacity, SessionUsageKey, USAGE_ALL_HOSTS};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{pinned::PinnedMaps, session_usage};

/// Largest request head read before answering; a scrape's is a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8192;

/// Renders every metric from the maps.
pub fn render(maps: &PinnedMaps) -> Result<String> {
    let mut out = String::new();
    for (counter, value) in maps.counters()? {
        let help = counter.help().split_whitespace().collect::<Vec<_>>().join(" ");
        write_metric(
            &mut out,
            &format!("nat_{}_total", counter.name()),
            &help,
            "counter",
            value,
        )?;
    }
    let config = maps.read_config()?;
    let gauges = [
        (
            "nat_bindings",
            "Dynamic bindings in the NAT table.",
            maps.usage(USAGE_ALL_HOSTS),
        ),
        (
            "nat_bindings_limit",
            "Most dynamic bindings allowed (--max-bindings).",
            config.max_bindings as u64,
        ),
        (
            "nat_binding_entries",
            "Entries in the outbound binding map, forwards included.",
            maps.bindings_out.keys().count() as u64,
        ),
        (
            "nat_binding_capacity",
            "Capacity of each binding map.",
            binding_map_capacity(config.max_bindings) as u64,
        ),
        (
            "nat_sessions",
            "Entries in the session map.",
            maps.sessions.keys().count() as u64,
        ),
        (
            "nat_session_capacity",
            "Capacity of the session map.",
            session_map_capacity(config.max_bindings) as u64,
        ),
        (
            "nat_sessions_in_use",
            "Sessions (remote endpoints of bindings) in use.",
            session_usage::in_use(maps, SessionUsageKey::all()),
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
        write_metric(&mut out, name, help, "gauge", value)?;
    }
    Ok(out)
}

/// One metric with its HELP and TYPE lines.
fn write_metric(out: &mut String, name: &str, help: &str, kind: &str, value: u64) -> std::fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")?;
    writeln!(out, "{name} {value}")
}

/// Binds the listener (so a bad address fails before anything is attached).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics"))
}

/// Serves scrapes until the task is dropped. Each connection gets one response.
pub async fn serve(listener: TcpListener, pin_dir: PathBuf) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let pin_dir = pin_dir.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_REQUEST_BYTES];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let response = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                match PinnedMaps::open(&pin_dir).and_then(|maps| render(&maps)) {
                    Ok(body) => reply("200 OK", "text/plain; version=0.0.4", &body),
                    Err(e) => reply("500 Internal Server Error", "text/plain", &format!("{e:#}\n")),
                }
            } else {
                reply("404 Not Found", "text/plain", "metrics are at /metrics\n")
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn reply(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
