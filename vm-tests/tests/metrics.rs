//! Prometheus metrics: `attach --metrics ADDR:PORT` serves every counter (drops, refusals and
//! the like as one family with a label), the table fill levels, the table's entries by
//! protocol and state, and the build, in the text format at `/metrics` (GET and HEAD), inside
//! the NAT's network namespace, agreeing with `nat-ctl stats`, `status` and `mappings`, and
//! accepted by `promtool check metrics`. Scraped with curl. Root only.

use anyhow::{ensure, Context, Result};
use nat_common::Counter;
use nat_ctl::metrics::{exported, Exported};
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

/// The sample a data-path counter is exported as (its own counter, or its family's label).
fn counter_sample(stats_name: &str) -> Result<String> {
    let counter = Counter::ALL
        .iter()
        .find(|c| c.name() == stats_name)
        .with_context(|| format!("no counter named {stats_name}"))?;
    Ok(match exported(*counter) {
        Exported::Own(name) => format!("{name}_total"),
        Exported::Labelled(family, label, value) => format!("{family}_total{{{label}=\"{value}\"}}"),
    })
}

/// `promtool check metrics` (Debian's, unpacked by setup under target/tools) finds no problem
/// in a scrape: the exposition is valid and follows Prometheus' naming conventions.
fn promtool_accepts(lab: &Lab, url: &str) -> Result<()> {
    let promtool = ops::repo_file("target/tools/prometheus/usr/bin/promtool");
    ensure!(
        promtool.is_file(),
        "{} is missing (cargo xtask setup unpacks it)",
        promtool.display()
    );
    let body = ops::http_get(&lab.nat, url)?.body;
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run promtool")?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("promtool stdin")?,
        body.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
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
        let metric = counter_sample(name)?;
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
    let build = m0
        .keys()
        .find(|k| k.starts_with("nat_build_info{"))
        .context("no nat_build_info")?;
    ensure!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("revision=\""),
        "nat_build_info without version and revision: {build}"
    );
    promtool_accepts(&lab, url)?;
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
    let created = counter_sample("new_binding")?;
    ensure!(
        value(&m1, &created)? == stats.get("new_binding")? as f64 && stats.get("new_binding")? == 2,
        "{created} {} / stats new_binding {}",
        value(&m1, &created)?,
        stats.get("new_binding")?
    );
    let out = counter_sample("translated_out")?;
    ensure!(
        value(&m1, &out)? > value(&m0, &out)?,
        "{out} did not grow with traffic"
    );
    // The table's entries by protocol and state agree with `nat-ctl mappings`.
    let mut rows: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for row in nat.mappings()? {
        let key = format!(
            "nat_table_entries{{proto=\"{}\",state=\"{}\"}}",
            row.proto, row.state
        );
        *rows.entry(key).or_default() += 1.0;
    }
    ensure!(!rows.is_empty(), "no mappings after two flows and a forward");
    for (key, count) in &rows {
        ensure!(
            value(&m1, key)? == *count,
            "{key} = {}, nat-ctl mappings has {count}",
            value(&m1, key)?
        );
    }
    promtool_accepts(&lab, url)?;

    // HEAD gets GET's headers and no body; only /metrics is served.
    let head = lab.nat.run(
        "curl",
        &["-s", "-S", "-I", "--max-time", "5", url],
        std::time::Duration::from_secs(15),
    )?;
    ensure!(
        head.stdout.starts_with("HTTP/1.1 200")
            && head.stdout.to_ascii_lowercase().contains("content-length:"),
        "HEAD {url}: {}{}",
        head.stdout,
        head.stderr
    );
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
