//! The TOML config file: `attach --config FILE` applies everything in it,
//! flags override it, `check --config FILE` validates without attaching and names the file,
//! line and field of a mistake, a bad file attaches nothing, and the systemd unit in the repo
//! is one systemd accepts. Root only.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::nat::{nat_ctl_path, Leftovers};
use vm_tests::ops::{self, repo_file, sa, TempDir};
use vm_tests::proc;
use vm_tests::tools::{self, udp_bind, udp_expect, whoami};
use vm_tests::{Lab, NatProcess};

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

#[test]
fn attach_from_a_config_file_applies_every_setting_in_it() -> Result<()> {
    let lab = Lab::new("cfgfile")?;
    let dir = TempDir::new("cfgfile")?;
    // Everything a flag can say, and the interface itself, from the file alone.
    let cfg = dir.write(
        "nat.toml",
        &format!(
            r#"# written by vm-tests
interface = "{wan}"
mode = "full-cone"
external_addrs = ["{NAT_EXT}"]
ports = "20000-20099"
max_bindings = 500
max_bindings_per_host = 40
sweep_interval_ms = 200
metrics = "127.0.0.1:9181"
persist = false
xdp_mode = "generic"
internal_ifaces = []

[timeouts]
udp = 111
tcp_established = 7777
tcp_transitory = 333
icmp = 66

[[forwards]]
proto = "udp"
external_port = 5353
internal = "{LAN_IP}:5353"

[[forwards]]
proto = "tcp"
external_port = 8080
internal = "{LAN_IP}:80"
"#,
            wan = lab.wan_if
        ),
    )?;
    let cfg_s = path_str(&cfg)?;
    let check = ops::ctl_ok(&lab.nat, &["check", "--config", cfg_s])?;
    ensure!(
        check.contains("ok") && check.contains("full-cone") && check.contains("2 forwards"),
        "nat-ctl check on a valid file printed: {check}"
    );
    ensure!(
        Leftovers::inspect(&lab.nat, &lab.wan_if)?.is_clean(),
        "`nat-ctl check` attached something"
    );

    let (mut daemon, line) = ops::attach_raw(&lab.nat, &["attach", "--config", cfg_s])?;
    ensure!(
        line.contains(&lab.wan_if) && line.contains("full-cone") && line.contains("20000-20099"),
        "attached line does not reflect the file: {line}"
    );
    let nat_args = |sub: &str| -> Vec<String> {
        vec![sub.to_string(), "-i".into(), lab.wan_if.clone(), "--json".into()]
    };
    let run = |args: Vec<String>| -> Result<String> {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ops::ctl_ok(&lab.nat, &a)
    };
    let status: serde_json::Value = serde_json::from_str(&run(nat_args("status"))?)?;
    let want = [
        ("mode", serde_json::json!("full-cone")),
        ("external_addrs", serde_json::json!([NAT_EXT.to_string()])),
        ("ports", serde_json::json!("20000-20099")),
        ("max_bindings", serde_json::json!(500)),
        ("max_bindings_per_host", serde_json::json!(40)),
        ("xdp_modes", serde_json::json!({lab.wan_if.clone(): "generic"})),
        ("internal_ifaces", serde_json::json!([])),
        ("internal_ifaces_chosen", serde_json::json!("off")),
        (
            "timeouts",
            serde_json::json!({"udp": 111, "tcp_established": 7777, "tcp_transitory": 333, "icmp": 66}),
        ),
    ];
    for (key, value) in &want {
        ensure!(
            status[key] == *value,
            "status {key} = {}, the config file says {value}; status: {status:#}",
            status[key]
        );
    }
    let fwd = ops::parse_forwards(&run(vec![
        "forward".into(),
        "list".into(),
        "-i".into(),
        lab.wan_if.clone(),
        "--json".into(),
    ])?)?;
    let mut want_fwd = vec![
        ops::forward_entry("tcp", sa(NAT_EXT, 8080), sa(LAN_IP, 80)),
        ops::forward_entry("udp", sa(NAT_EXT, 5353), sa(LAN_IP, 5353)),
    ];
    want_fwd.sort();
    ensure!(
        fwd == want_fwd,
        "forwards from the file: {fwd:?}, expected {want_fwd:?}"
    );

    // The file's metrics address serves.
    let m = ops::http_get(&lab.nat, "http://127.0.0.1:9181/metrics")?;
    ensure!(
        m.code == 200 && m.body.contains("nat_bindings_limit 500"),
        "metrics from the file's address: {} {}",
        m.code,
        m.body
    );

    // The behaviour follows the file: a port from 20000-20099, full-cone filtering (a host lan
    // never talked to gets through), and the UDP forward delivers.
    let _who = tools::udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = whoami(&sock, sa(WAN_IP, 9999))?;
    ensure!(
        *ext.ip() == NAT_EXT && (20000..=20099).contains(&ext.port()),
        "external endpoint {ext} is outside ports = \"20000-20099\""
    );
    let stranger = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    stranger.send_to(b"full cone?", ext)?;
    ensure!(
        udp_expect(&sock, b"full cone?", Duration::from_secs(3))?.is_some(),
        "mode = \"full-cone\" from the file, but a host lan never talked to was filtered"
    );
    let server = udp_bind(&lab.lan, sa(LAN_IP, 5353))?;
    let client = udp_bind(&lab.wan, sa(WAN_IP, 7000))?;
    client.send_to(b"forwarded?", sa(NAT_EXT, 5353))?;
    ensure!(
        udp_expect(&server, b"forwarded?", Duration::from_secs(3))?.is_some(),
        "the [[forwards]] udp 5353 -> {LAN_IP}:5353 from the file does not deliver"
    );

    let st = daemon.terminate(Duration::from_secs(20))?;
    ensure!(st.success(), "attach --config exited {st}: {}", daemon.stderr());
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind after SIGTERM: {left:#?}");
    Ok(())
}

#[test]
fn flags_override_the_config_file() -> Result<()> {
    let lab = Lab::new("cfgflag")?;
    let dir = TempDir::new("cfgflag")?;
    let cfg = dir.write(
        "nat.toml",
        r#"mode = "symmetric"
ports = "30000-30999"
max_bindings_per_host = 7
xdp_mode = "generic"
internal_ifaces = []

[timeouts]
udp = 100
tcp_established = 8000
"#,
    )?;
    let nat = NatProcess::attach(
        &lab,
        &[
            "--config",
            path_str(&cfg)?,
            "--mode",
            "restricted-cone",
            "--ports",
            "40000-40999",
            "--udp-timeout",
            "150",
            "--xdp-mode",
            "native",
            "--internal-iface",
            &lab.lan_if,
        ],
    )?;
    let s = ops::status(&nat)?;
    // Flags win...
    ensure!(
        s["mode"] == "restricted-cone",
        "mode {} (flag says restricted-cone)",
        s["mode"]
    );
    ensure!(
        s["ports"] == "40000-40999",
        "ports {} (flag says 40000-40999)",
        s["ports"]
    );
    ensure!(
        s["timeouts"]["udp"] == 150,
        "udp timeout {} (flag says 150)",
        s["timeouts"]["udp"]
    );
    ensure!(
        s["xdp_modes"][lab.wan_if.as_str()] == "native",
        "xdp_modes {} (flag says native)",
        s["xdp_modes"]
    );
    ensure!(
        s["internal_ifaces"] == serde_json::json!([lab.lan_if.clone()])
            && s["internal_ifaces_chosen"] == "named",
        "internal_ifaces {} ({}): the flag names {}, the file says none",
        s["internal_ifaces"],
        s["internal_ifaces_chosen"],
        lab.lan_if
    );
    // ...and what no flag names still comes from the file.
    ensure!(
        s["timeouts"]["tcp_established"] == 8000,
        "tcp_established {} (file says 8000, no flag)",
        s["timeouts"]["tcp_established"]
    );
    ensure!(
        s["max_bindings_per_host"] == 7,
        "max_bindings_per_host {} (file says 7, no flag)",
        s["max_bindings_per_host"]
    );
    // And the data path runs with the flag's range.
    let _who = tools::udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 12345))?;
    let ext = whoami(&sock, sa(WAN_IP, 9999))?;
    ensure!(
        (40000..=40999).contains(&ext.port()),
        "external port {} not in the --ports 40000-40999 that overrides the file",
        ext.port()
    );
    nat.stop()
}

/// (what, file text after the `interface` line, line of the mistake in that text, word the
/// message must contain: the field).
type BadCase = (&'static str, &'static str, usize, &'static str);

/// Each bad file must be refused by `check` and by `attach` with one line naming the file and
/// line (and the field), exit non-zero, and attach nothing.
fn expect_refused_files(tag: &str, cases: &[BadCase]) -> Result<()> {
    let lab = Lab::new(tag)?;
    let dir = TempDir::new(tag)?;
    let mut failures = Vec::new();
    for (i, (what, text, line, field)) in cases.iter().enumerate() {
        // Every file names the lab's interface: only the mistake can make it fail.
        let body = format!("interface = \"{}\"\n{text}", lab.wan_if);
        let line = line + 1;
        let path = dir.write(&format!("bad{i}.toml"), &body)?;
        let p = path_str(&path)?;
        let want_prefix = format!("{p}:{line}:");
        for sub in ["check", "attach"] {
            let out = if sub == "check" {
                ops::ctl(&lab.nat, &["check", "--config", p])?
            } else {
                ops::attach_expecting_failure(&lab.nat, &["attach", "--config", p])?
            };
            match ops::refused(&format!("{sub} ({what})"), &out) {
                Err(e) => failures.push(format!("{e:#}")),
                Ok(msg) => {
                    if !msg.contains(&want_prefix) || !msg.contains(field) {
                        failures.push(format!(
                            "{sub} ({what}): message does not name {want_prefix} and field {field:?}: {msg}"
                        ));
                    }
                }
            }
            if out.stdout.contains("attached ") {
                failures.push(format!("{sub} ({what}): attached anyway: {}", out.stdout));
            }
        }
        let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
        if !left.is_clean() {
            failures.push(format!("{what}: left behind {left:?}"));
        }
    }
    ensure!(failures.is_empty(), "bad config files:\n{}", failures.join("\n"));
    Ok(())
}

#[test]
fn bad_config_values_are_refused_with_file_line_and_field() -> Result<()> {
    expect_refused_files(
        "cfgbad",
        &[
            (
                "unknown key",
                "mode = \"full-cone\"\nmdoe = \"symmetric\"\n",
                2,
                "mdoe",
            ),
            (
                "unknown key in [timeouts]",
                "[timeouts]\nudp = 30\ntcp = 40\n",
                3,
                "tcp",
            ),
            ("unknown mode", "\nmode = \"cone\"\n", 2, "mode"),
            ("unknown XDP mode", "xdp_mode = \"drv\"\n", 1, "xdp_mode"),
            ("inverted port range", "ports = \"5000-4000\"\n", 1, "ports"),
            ("port range beyond 65535", "ports = \"1024-70000\"\n", 1, "ports"),
            (
                "forward port 0",
                "[[forwards]]\nproto = \"udp\"\nexternal_port = 0\ninternal = \"10.0.0.2:53\"\n",
                3,
                "external_port",
            ),
            (
                "IPv6 internal address",
                "[[forwards]]\nproto = \"tcp\"\nexternal_port = 80\ninternal = \"[2001:db8::1]:80\"\n",
                4,
                "internal",
            ),
            (
                "internal port out of range",
                "[[forwards]]\nproto = \"tcp\"\nexternal_port = 80\ninternal = \"10.0.0.2:99999\"\n",
                4,
                "internal",
            ),
            (
                "IPv6 external address",
                "mode = \"full-cone\"\nexternal_addrs = [\"2001:db8::1\"]\n",
                2,
                "external_addrs",
            ),
            ("zero timeout", "[timeouts]\nicmp = 0\n", 2, "icmp"),
            ("bad metrics address", "metrics = \"localhost\"\n", 1, "metrics"),
        ],
    )?;
    // A file that does not exist: one line.
    let lab_less = TempDir::new("cfgmissing")?;
    let missing = lab_less.path().join("missing.toml");
    let out = proc::run(
        "nat-ctl check (missing file)",
        proc::command(
            &nat_ctl_path().to_string_lossy(),
            &["check", "--config", path_str(&missing)?],
        ),
        Duration::from_secs(20),
    )?;
    let msg = ops::refused("check (missing file)", &out)?;
    ensure!(msg.contains("missing.toml"), "does not name the file: {msg}");
    Ok(())
}

/// Values of the wrong TOML type, or out of the field's range, are caught by the parser
/// itself; the message must still name the field, as the issue asks of every error.
#[test]
fn type_and_range_errors_in_the_config_name_the_field() -> Result<()> {
    expect_refused_files(
        "cfgtype",
        &[
            (
                "wrong type",
                "mode = \"full-cone\"\n\nmax_bindings = \"lots\"\n",
                3,
                "max_bindings",
            ),
            (
                "forward port beyond 65535",
                "[[forwards]]\nproto = \"udp\"\nexternal_port = 70000\ninternal = \"10.0.0.2:53\"\n",
                3,
                "external_port",
            ),
            ("boolean as string", "persist = \"yes\"\n", 1, "persist"),
        ],
    )
}

#[test]
fn the_example_and_packaged_configs_are_valid() -> Result<()> {
    for rel in ["examples/nat.toml", "packaging/nat.toml"] {
        let p = repo_file(rel);
        let out = proc::run_ok(
            &format!("nat-ctl check --config {rel}"),
            proc::command(
                &nat_ctl_path().to_string_lossy(),
                &["check", "--config", path_str(&p)?],
            ),
            Duration::from_secs(20),
        )?;
        ensure!(out.stdout.contains("ok"), "check {rel}: {}", out.stdout);
    }
    // The packaged config keeps flows across restarts (the unit relies on it).
    let text = std::fs::read_to_string(repo_file("packaging/nat.toml"))?;
    ensure!(
        text.lines().any(|l| l.trim().replace(' ', "") == "persist=true"),
        "packaging/nat.toml does not set persist = true"
    );
    Ok(())
}
