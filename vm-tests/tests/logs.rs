//! Binding logs (RFC 6888 section 4): with `--debug`, nat-ctl writes one line
//! per binding created and removed, with time, protocol, internal address and external
//! address:port, and never a remote address (REQ-12); without it, nothing. Root only.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::ops::sa;
use vm_tests::proc::poll;
use vm_tests::tools::{self, udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

/// One parsed event line: `<RFC 3339 time> nat-ctl: binding created|removed proto=<proto>
/// internal=<ip:port> external=<ip:port>`.
#[derive(Debug)]
struct Event {
    time_unix: i64,
    what: String,
    proto: String,
    internal: SocketAddrV4,
    external: SocketAddrV4,
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm), to check the time field.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|+00:00)` into Unix seconds.
fn parse_rfc3339(s: &str) -> Result<i64> {
    let bad = || anyhow::anyhow!("{s:?} is not an RFC 3339 UTC time");
    let (date, rest) = s.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let rest = rest
        .strip_suffix('Z')
        .or_else(|| rest.strip_suffix("+00:00"))
        .ok_or_else(bad)?;
    let hms = rest.split('.').next().ok_or_else(bad)?;
    let t: Vec<i64> = hms
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if d.len() != 3 || t.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        return Err(bad());
    }
    Ok(days_from_civil(d[0], d[1], d[2]) * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
}

fn parse_event(line: &str) -> Option<Result<Event>> {
    let w: Vec<&str> = line.split_whitespace().collect();
    if w.get(1) != Some(&"nat-ctl:") || w.get(2) != Some(&"binding") {
        return None;
    }
    Some((|| {
        let field = |i: usize, key: &str| -> Result<&str> {
            w.get(i)
                .and_then(|f| f.strip_prefix(key))
                .and_then(|f| f.strip_prefix('='))
                .with_context(|| format!("no field {key}= at word {i} of {line:?}"))
        };
        ensure!(w.len() == 7, "event line with unexpected fields: {line:?}");
        Ok(Event {
            time_unix: parse_rfc3339(w[0])?,
            what: w[3].to_string(),
            proto: field(4, "proto")?.to_string(),
            internal: field(5, "internal")?
                .parse()
                .with_context(|| format!("internal in {line:?}"))?,
            external: field(6, "external")?
                .parse()
                .with_context(|| format!("external in {line:?}"))?,
        })
    })())
}

fn events(stderr: &str) -> Result<Vec<Event>> {
    stderr.lines().filter_map(parse_event).collect()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[test]
fn debug_logs_bindings_created_and_removed_without_remote_addresses() -> Result<()> {
    let lab = Lab::new("logdbg")?;
    let start = now_unix();
    let nat = NatProcess::attach(
        &lab,
        &[
            "--debug",
            "--udp-timeout",
            "2",
            "--icmp-timeout",
            "2",
            "--tcp-transitory-timeout",
            "2",
            "--sweep-interval-ms",
            "100",
        ],
    )?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let udp_ext = whoami(&sock, sa(WAN_IP, 9999))?;
    let _tcp = tools::tcp_whoami(&lab.wan, WAN_IP, 9998)?;
    let (_, tcp_local) = tools::tcp_whoami_query(&lab.lan, sa(WAN_IP, 9998))?;
    let std::net::SocketAddr::V4(tcp_local) = tcp_local else {
        bail!("IPv6 local address {tcp_local}")
    };
    let ping = tools::ping(&lab.lan, WAN_IP, 1, &[])?;
    ensure!(tools::ping_received(&ping) == 1, "ping: {}", ping.stdout);

    // Created lines for all three protocols (observed at the next sweep), then removed lines
    // once they expire (2 s idle; the TCP connection is closed, so transitory).
    let wanted = |evs: &[Event], what: &str| -> bool {
        evs.iter()
            .any(|e| e.what == what && e.proto == "udp" && e.internal == sa(LAN_IP, 40000))
            && evs
                .iter()
                .any(|e| e.what == what && e.proto == "tcp" && e.internal == tcp_local)
            && evs
                .iter()
                .any(|e| e.what == what && e.proto == "icmp" && *e.internal.ip() == LAN_IP)
    };
    let all = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        let evs = events(&nat.stderr()).ok()?;
        (wanted(&evs, "created") && wanted(&evs, "removed")).then_some(evs)
    });
    let stderr = nat.stderr();
    let all =
        all.with_context(|| format!("no created+removed lines for udp, tcp and icmp; stderr:\n{stderr}"))?;

    let end = now_unix();
    for e in &all {
        ensure!(
            e.what == "created" || e.what == "removed",
            "event {:?} is neither created nor removed",
            e.what
        );
        ensure!(
            e.time_unix >= start - 5 && e.time_unix <= end + 5,
            "event time {} is not the time it happened (between {start} and {end}): {e:?}",
            e.time_unix
        );
        ensure!(*e.external.ip() == NAT_EXT, "external address of {e:?}");
    }
    let udp_created = all
        .iter()
        .find(|e| e.what == "created" && e.proto == "udp")
        .context("no udp created line")?;
    ensure!(
        udp_created.external == udp_ext,
        "udp created line names {} but the remote saw {udp_ext}",
        udp_created.external
    );
    // Each binding is created once and removed once.
    for proto in ["udp", "tcp", "icmp"] {
        for what in ["created", "removed"] {
            let n = all.iter().filter(|e| e.proto == proto && e.what == what).count();
            ensure!(n == 1, "{n} {proto} {what} lines:\n{stderr}");
        }
    }
    // Never a remote address (RFC 6888 REQ-12).
    for remote in [WAN_IP, Ipv4Addr::new(198, 51, 100, 2)] {
        let needle = format!("{remote}:");
        ensure!(
            !stderr
                .lines()
                .filter(|l| l.contains(" binding "))
                .any(|l| l.contains(&needle)),
            "a binding line names the remote {remote}:\n{stderr}"
        );
    }
    nat.stop()
}

#[test]
fn without_debug_there_are_no_binding_lines() -> Result<()> {
    let lab = Lab::new("lognodbg")?;
    let nat = NatProcess::attach(&lab, &["--udp-timeout", "2", "--sweep-interval-ms", "100"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    whoami(&sock, sa(WAN_IP, 9999))?;
    // Wait until the binding expired, so both events would have been logged.
    poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let rows = nat.mappings().ok()?;
        rows.is_empty().then_some(())
    })
    .context("the binding never expired")?;
    let stderr = nat.stderr();
    ensure!(
        !stderr.contains(" binding "),
        "binding lines without --debug:\n{stderr}"
    );
    // Data-path log lines (aya-log) are off by default: the daemon said nothing while traffic
    // flowed and bindings came and went (beyond the attach-time line naming the internal
    // interfaces it found).
    let stderr: String = vm_tests::nat::log_lines(&stderr)
        .into_iter()
        .filter(|l| !l.starts_with("nat-ctl: internal interfaces (found automatically)"))
        .collect();
    ensure!(
        stderr.trim().is_empty(),
        "nat-ctl attach wrote to stderr during normal operation:\n{stderr}"
    );
    nat.stop()
}

#[test]
fn rfc3339_parser_matches_known_dates() -> Result<()> {
    ensure!(parse_rfc3339("1970-01-01T00:00:00Z")? == 0);
    ensure!(parse_rfc3339("2000-02-29T00:00:00Z")? == 951_782_400);
    ensure!(parse_rfc3339("2026-11-18T11:06:40Z")? == 1_795_000_000);
    ensure!(parse_rfc3339("2026-11-18 11:06:40").is_err());
    Ok(())
}

#[test]
fn datapath_log_reports_filtered_packets_when_asked() -> Result<()> {
    let lab = Lab::new("logdp")?;
    let nat = NatProcess::attach(&lab, &["--datapath-log"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let external = whoami(&sock, sa(WAN_IP, 9999))?;
    // Port-restricted: the same remote from another port is filtered, and the data path says so.
    let stranger = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let expected = format!("data path: filtered proto 17 from {WAN_IP}:9998 to {external}");
    poll(Duration::from_secs(10), Duration::from_millis(200), || {
        stranger.send_to(b"knock", external).ok()?;
        nat.stderr().contains(&expected).then_some(())
    })
    .with_context(|| format!("no line {expected:?} in stderr:\n{}", nat.stderr()))?;
    nat.stop()
}

#[test]
fn log_level_warn_drops_notices_and_a_bad_level_attaches_nothing() -> Result<()> {
    let lab = Lab::new("loglvl")?;
    // A bad level, by flag or by RUST_LOG, is refused before anything is attached.
    let out =
        vm_tests::ops::attach_expecting_failure(&lab.nat, &["attach", &lab.wan_if, "--log-level", "loud"])?;
    let line = vm_tests::ops::refused("--log-level loud", &out)?;
    ensure!(line.contains("--log-level"), "refusal: {}", out.stderr);
    ensure!(
        out.stderr.contains("warn"),
        "the refusal lists no levels: {}",
        out.stderr
    );
    let mut bad_env = vm_tests::nat::nat_ctl(&lab.nat, &["attach", &lab.wan_if]);
    bad_env.env("RUST_LOG", "nat_ctl=loudest");
    let out = vm_tests::proc::run(
        "nat-ctl attach with a bad RUST_LOG",
        bad_env,
        Duration::from_secs(60),
    )?;
    let line = vm_tests::ops::refused("RUST_LOG=nat_ctl=loudest", &out)?;
    ensure!(line.contains("RUST_LOG"), "refusal: {line}");
    let left = vm_tests::nat::Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "a refused log level left {left:?}");

    // At warn: the warning, and none of the notices info level would give (ip_forward, the
    // internal interfaces found, the fast path).
    lab.nat.sysctl("net.ipv4.ip_forward", "0")?;
    let routed = Ipv4Addr::new(198, 18, 0, 9);
    let nat = NatProcess::attach(
        &lab,
        &["--log-level", "warn", "--external-addr", &routed.to_string()],
    )?;
    let warning = format!(
        "nat-ctl: warning: {routed} is not an address of {}: the gateway will not answer ARP for it unless it is routed here",
        lab.wan_if
    );
    let stderr = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        let s = nat.stderr();
        s.contains("warning").then_some(s)
    })
    .with_context(|| format!("no warning on stderr:\n{}", nat.stderr()))?;
    let lines = vm_tests::nat::log_lines(&stderr);
    ensure!(
        lines.contains(&warning.as_str()),
        "no line {warning:?} in:\n{stderr}"
    );
    ensure!(
        lines.iter().all(|l| l.starts_with("nat-ctl: warning: ")),
        "lines below warn at --log-level warn:\n{stderr}"
    );
    ensure!(
        vm_tests::ops::sysctl_get(&lab.nat, "net.ipv4.ip_forward")?.trim() == "1",
        "ip_forward was not turned on (only its notice should be gone)"
    );
    nat.stop()
}

#[test]
fn on_the_journal_stream_lines_carry_a_priority_and_no_time() -> Result<()> {
    // What systemd does: stderr is a stream to journald, named by $JOURNAL_STREAM
    // (DEVICE:INODE). Here the stream is the test's pipe, named the same way.
    let lab = Lab::new("logjrn")?;
    let routed = Ipv4Addr::new(198, 18, 0, 9);
    let script = format!(
        "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec {} attach {} --external-addr {routed}",
        vm_tests::nat::nat_ctl_path().display(),
        lab.wan_if
    );
    vm_tests::nat::ensure_bpffs()?;
    let mut daemon = vm_tests::proc::Proc::spawn(
        "nat-ctl attach on a journal stream",
        lab.nat.nsenter("sh", &["-c", &script]),
    )?;
    let stderr = poll(Duration::from_secs(120), Duration::from_millis(20), || {
        let s = daemon.stderr();
        (daemon.stdout().contains("attached ") && s.contains("warning")).then_some(s)
    })
    .with_context(|| format!("no attach and warning; stderr:\n{}", daemon.stderr()))?;
    let warning = format!(
        "<4>nat-ctl: warning: {routed} is not an address of {}: the gateway will not answer ARP for it unless it is routed here",
        lab.wan_if
    );
    ensure!(
        stderr.lines().any(|l| l == warning),
        "no line {warning:?} in:\n{stderr}"
    );
    ensure!(
        stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.starts_with("<6>nat-ctl: ") || l.starts_with("<4>nat-ctl: warning: ")),
        "lines without a priority, or with a time, on the journal stream:\n{stderr}"
    );
    let status = daemon.terminate(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "exit {status} after SIGTERM: {}",
        daemon.stderr()
    );
    Ok(())
}
