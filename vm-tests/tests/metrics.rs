//! Prometheus metrics (issue 4, item 4): `attach --metrics ADDR:PORT` serves every counter
//! and the table fill levels in the text format at `/metrics`, inside the NAT's network
//! namespace, agreeing with `nat-ctl stats` and `status`. Scraped with curl. Root only.

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN_IP, WAN_IP};
use vm_tests::nat::Leftovers;
use vm_tests::ops::{self, sa};
use vm_tests::tools::{udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

/// Table gauges the controller documents.
const GAUGES: [&str; 6] = [
    "nat_bindings",
    "nat_bindings_limit",
    "nat_binding_entries",
    "nat_binding_capacity",
    "nat_sessions",
    "nat_session_capacity",
];

fn scrape(lab: &Lab, url: &str) -> Result<std::collections::BTreeMap<String, ops::Metric>> {
    let r = ops::http_get(&lab.nat, url)?;
    ensure!(r.code == 200, "GET {url}: HTTP {} {}", r.code, r.body);
    let ct = r.header("content-type").unwrap_or_default();
    ensure!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "Content-Type {ct:?}, expected text/plain; version=0.0.4"
    );
    ops::parse_prometheus(&r.body).with_context(|| format!("body of {url}:\n{}", r.body))
}

fn value(m: &std::collections::BTreeMap<String, ops::Metric>, name: &str) -> Result<f64> {
    Ok(m.get(name)
        .with_context(|| format!("no metric {name}; have {:?}", m.keys().collect::<Vec<_>>()))?
        .value)
}

#[test]
fn metrics_serve_every_counter_and_table_fill_in_prometheus_format() -> Result<()> {
    let lab = Lab::new("metrics")?;
    let nat = NatProcess::attach(&lab, &["--metrics", "127.0.0.1:9183", "--max-bindings", "777"])?;
    let url = "http://127.0.0.1:9183/metrics";

    let m0 = scrape(&lab, url)?;
    let stats = nat.stats()?;
    for (name, v) in &stats.0 {
        let metric = format!("nat_{name}_total");
        let got = m0
            .get(&metric)
            .with_context(|| format!("counter {name} is not exported as {metric}"))?;
        ensure!(got.kind == "counter", "{metric} has TYPE {}", got.kind);
        ensure!(!got.help.trim().is_empty(), "{metric} has no HELP text");
        ensure!(
            got.value == *v as f64,
            "{metric} = {}, nat-ctl stats says {v}",
            got.value
        );
    }
    for g in GAUGES {
        let got = m0.get(g).with_context(|| format!("gauge {g} is missing"))?;
        ensure!(got.kind == "gauge", "{g} has TYPE {}", got.kind);
    }
    ensure!(
        value(&m0, "nat_bindings_limit")? == 777.0,
        "nat_bindings_limit with --max-bindings 777"
    );
    ensure!(
        value(&m0, "nat_bindings")? == 0.0,
        "nat_bindings before any traffic"
    );

    // Two flows and a forward.
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let a = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let b = udp_bind(&lab.lan, sa(LAN_IP, 40001))?;
    whoami(&a, sa(WAN_IP, 9999))?;
    whoami(&b, sa(WAN_IP, 9999))?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["udp", "5353", "10.0.0.2:5353"])?;

    let m1 = scrape(&lab, url)?;
    let stats = nat.stats()?;
    let status = ops::status(&nat)?;
    ensure!(value(&m1, "nat_bindings")? == 2.0, "nat_bindings after two flows");
    ensure!(
        value(&m1, "nat_bindings")? == status["dynamic_bindings"].as_f64().unwrap_or(-1.0),
        "nat_bindings {} vs status dynamic_bindings {}",
        value(&m1, "nat_bindings")?,
        status["dynamic_bindings"]
    );
    ensure!(
        value(&m1, "nat_binding_entries")? >= 3.0,
        "nat_binding_entries {} with two flows and a forward",
        value(&m1, "nat_binding_entries")?
    );
    ensure!(
        value(&m1, "nat_sessions")? == status["sessions"].as_f64().unwrap_or(-1.0),
        "nat_sessions {} vs status sessions {}",
        value(&m1, "nat_sessions")?,
        status["sessions"]
    );
    if let Some(cap) = status["bindings_capacity"].as_f64() {
        ensure!(
            value(&m1, "nat_binding_capacity")? == cap,
            "nat_binding_capacity vs status"
        );
    }
    ensure!(
        value(&m1, "nat_binding_capacity")? >= 777.0,
        "binding capacity below --max-bindings"
    );
    ensure!(
        value(&m1, "nat_new_binding_total")? == stats.get("new_binding")? as f64
            && stats.get("new_binding")? == 2,
        "nat_new_binding_total {} / stats new_binding {}",
        value(&m1, "nat_new_binding_total")?,
        stats.get("new_binding")?
    );
    ensure!(
        value(&m1, "nat_translated_out_total")? > value(&m0, "nat_translated_out_total")?,
        "nat_translated_out_total did not grow with traffic"
    );

    // Only /metrics is served.
    let other = ops::http_get(&lab.nat, "http://127.0.0.1:9183/")?;
    ensure!(other.code == 404, "GET / answered {}", other.code);

    // The listener lives in the NAT's namespace only: lan cannot reach it on the NAT's
    // address, and it is gone once the daemon stops.
    ensure!(
        ops::http_get(&lab.lan, "http://10.0.0.1:9183/metrics").is_err(),
        "metrics bound to 127.0.0.1 answered lan on 10.0.0.1"
    );
    nat.stop()?;
    ensure!(
        ops::http_get(&lab.nat, url).is_err(),
        "metrics still answer after the daemon stopped"
    );
    Ok(())
}

#[test]
fn a_metrics_address_in_use_fails_before_attaching() -> Result<()> {
    let lab = Lab::new("metbusy")?;
    // Something else already listens on the port in the NAT's namespace.
    let taken = lab
        .nat
        .enter(|| std::net::TcpListener::bind("127.0.0.1:9184").context("bind 127.0.0.1:9184"))?;
    let out =
        ops::attach_expecting_failure(&lab.nat, &["attach", &lab.wan_if, "--metrics", "127.0.0.1:9184"])?;
    let msg = ops::refused("attach --metrics on a taken port", &out)?;
    ensure!(
        msg.contains("9184"),
        "the message does not name the address: {msg}"
    );
    ensure!(
        !out.stdout.contains("attached "),
        "attached anyway: {}",
        out.stdout
    );
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind: {left:#?}");
    drop(taken);
    // With the port free again, the same command attaches and serves.
    let nat = NatProcess::attach(&lab, &["--metrics", "127.0.0.1:9184"])?;
    let r = ops::http_get(&lab.nat, "http://127.0.0.1:9184/metrics")?;
    ensure!(r.code == 200, "HTTP {}", r.code);
    nat.stop()
}
