//! Reload without detaching: `nat-ctl reload` (and SIGHUP) re-read the config file and apply
//! mode, timeouts and forwards in place while flows keep their external ports; a broken file,
//! or one that changes what cannot change in place, changes nothing, is named, and leaves the
//! daemon running. Root only.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::ops::{self, sa, TempDir};
use vm_tests::proc::{poll, Proc};
use vm_tests::tools::{self, udp_bind, udp_recv};
use vm_tests::Lab;

/// How long a test waits for a datagram that must not arrive.
const QUIET: Duration = Duration::from_millis(1500);
/// The forwarded UDP port the tests add and remove.
const FORWARD_PORT: u16 = 5353;

/// A config file for the lab's NAT (the interface comes from the command line).
fn config(mode: &str, udp_timeout: u32, forward: bool) -> String {
    let mut text = format!("mode = \"{mode}\"\n\n[timeouts]\nudp = {udp_timeout}\n");
    if forward {
        text += &format!(
            "\n[[forwards]]\nproto = \"udp\"\nexternal_port = {FORWARD_PORT}\ninternal = \"{LAN_IP}:{FORWARD_PORT}\"\n"
        );
    }
    text
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// `nat-ctl status -i IFACE --json`.
fn status(lab: &Lab) -> Result<serde_json::Value> {
    let out = ops::ctl_ok(&lab.nat, &["status", "-i", &lab.wan_if, "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))
}

/// Sends one datagram from `lan` to `remote`; returns the source the remote saw.
fn mapped(lan: &UdpSocket, remote: &UdpSocket) -> Result<SocketAddrV4> {
    let to = remote.local_addr()?;
    lan.send_to(b"open", to)?;
    match udp_recv(remote, Duration::from_secs(5))? {
        Some((_, SocketAddr::V4(from))) => Ok(from),
        other => bail!("{to} got {other:?} from {}", lan.local_addr()?),
    }
}

/// Which of `senders` get a datagram through `ext` to `lan` (collected over a quiet period).
fn admitted(lan: &UdpSocket, ext: SocketAddrV4, senders: &[&UdpSocket], tag: &str) -> Result<Vec<bool>> {
    for (i, s) in senders.iter().enumerate() {
        s.send_to(format!("{tag}-{i}").as_bytes(), ext)?;
    }
    let mut got = vec![false; senders.len()];
    let deadline = Instant::now() + QUIET;
    while let Some((data, _)) = udp_recv(lan, deadline.saturating_duration_since(Instant::now()))? {
        let text = String::from_utf8_lossy(&data).to_string();
        for (i, g) in got.iter_mut().enumerate() {
            *g |= text == format!("{tag}-{i}");
        }
    }
    Ok(got)
}

/// Whether the forward on `FORWARD_PORT` reaches the whoami server behind the NAT from `wan`.
fn forward_answers(wan: &UdpSocket) -> bool {
    tools::whoami(wan, sa(NAT_EXT, FORWARD_PORT)).is_ok()
}

/// Waits (bounded) for the daemon's stderr to hold `count` lines containing `needle`.
fn wait_log(daemon: &Proc, needle: &str, count: usize) -> Result<String> {
    poll(Duration::from_secs(30), Duration::from_millis(20), || {
        let text = daemon.stderr();
        (text.lines().filter(|l| l.contains(needle)).count() >= count).then_some(text)
    })
    .with_context(|| format!("the daemon never logged {needle:?}; stderr: {}", daemon.stderr()))
}

#[test]
fn reload_switches_mode_and_forwards_in_place_and_flows_keep_their_ports() -> Result<()> {
    let lab = Lab::new("rldmode")?;
    let dir = TempDir::new("rldmode")?;
    let cfg = dir.write("nat.toml", &config("port-restricted", 300, false))?;
    let (mut daemon, _) = ops::attach_raw(&lab.nat, &["attach", &lab.wan_if, "--config", path_str(&cfg)?])?;
    let _server = tools::udp_whoami(&lab.lan, LAN_IP, FORWARD_PORT)?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let other_port = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let other_host = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    let client = udp_bind(&lab.wan, sa(WAN_IP, 7000))?;
    let senders = [&remote, &other_port, &other_host];
    let ext = mapped(&lan, &remote)?;
    ensure!(*ext.ip() == NAT_EXT, "remote saw {ext}");
    let got = admitted(&lan, ext, &senders, "before")?;
    ensure!(
        got == [true, false, false],
        "port-restricted admitted {got:?} from [remote, other port, other host]"
    );
    ensure!(
        !forward_answers(&client),
        "a forward answers before the file has one"
    );

    // 1. `nat-ctl reload`: full cone, a shorter UDP timeout, a forward.
    std::fs::write(&cfg, config("full-cone", 77, true))?;
    let out = ops::ctl_ok(&lab.nat, &["reload", "-i", &lab.wan_if])?;
    for word in [
        "mode port-restricted -> full-cone",
        "timeouts.udp 300 -> 77",
        "forward added: udp",
    ] {
        ensure!(
            out.contains(word),
            "`nat-ctl reload` printed {out:?}, without {word:?}"
        );
    }
    wait_log(&daemon, "reloaded", 1)?;
    let got = admitted(&lan, ext, &senders, "cone")?;
    ensure!(
        got == [true, true, true],
        "after reloading full-cone: admitted {got:?}"
    );
    let again = mapped(&lan, &remote)?;
    ensure!(
        again == ext,
        "the flow moved from {ext} to {again} across the reload"
    );
    let s = status(&lab)?;
    ensure!(
        s["mode"] == "full-cone" && s["timeouts"]["udp"] == 77,
        "status after the reload: {s:#}"
    );
    ensure!(
        forward_answers(&client),
        "the forward the reload added does not answer"
    );

    // 2. SIGHUP: symmetric, and the forward gone.
    std::fs::write(&cfg, config("symmetric", 77, false))?;
    daemon.signal(libc::SIGHUP)?;
    let log = wait_log(&daemon, "reloaded", 2)?;
    let line = log
        .lines()
        .filter(|l| l.contains("reloaded"))
        .nth(1)
        .unwrap_or_default();
    ensure!(
        line.contains("mode full-cone -> symmetric") && line.contains("forward removed: udp"),
        "the daemon's log line for the SIGHUP reload: {line:?}"
    );
    ensure!(
        daemon.try_wait()?.is_none(),
        "SIGHUP ended the daemon: {}",
        daemon.stderr()
    );
    let got = admitted(&lan, ext, &senders, "symm")?;
    ensure!(
        got == [true, false, false],
        "after reloading symmetric: admitted {got:?}"
    );
    let again = mapped(&lan, &remote)?;
    ensure!(
        again == ext,
        "the established flow moved from {ext} to {again} after the switch to symmetric"
    );
    let to_other = mapped(&lan, &other_host)?;
    ensure!(
        to_other.port() != ext.port(),
        "symmetric after the reload: a new remote got the existing binding {ext}"
    );
    ensure!(
        !forward_answers(&client),
        "the forward the reload removed still answers"
    );
    ensure!(
        status(&lab)?["mode"] == "symmetric",
        "status does not say symmetric"
    );

    daemon.terminate(Duration::from_secs(20))?;
    Ok(())
}

#[test]
fn a_broken_file_or_a_fixed_setting_changes_nothing_and_says_why() -> Result<()> {
    let lab = Lab::new("rldbad")?;
    let dir = TempDir::new("rldbad")?;
    let good = config("restricted-cone", 300, true);
    let cfg = dir.write("nat.toml", &good)?;
    let cfg_s = path_str(&cfg)?.to_string();
    // The flag agrees with the file for now; the mended file below changes the key it sets.
    let (mut daemon, _) = ops::attach_raw(
        &lab.nat,
        &["attach", &lab.wan_if, "--config", &cfg_s, "--udp-timeout", "300"],
    )?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let ext = mapped(&lan, &remote)?;
    let bindings_before = ops::ctl_ok(&lab.nat, &["mappings", "-i", &lab.wan_if, "--json"])?;
    let forwards_before = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        forwards_before.len() == 1,
        "forwards from the file: {forwards_before:?}"
    );

    // (what, file text, words the refusal must hold)
    let cases: [(&str, String, &[&str]); 3] = [
        (
            "an unknown mode",
            good.replace("restricted-cone", "cone"),
            &["nat.toml:1: mode", "unknown mode", "nothing changed"],
        ),
        (
            "a file that is not TOML",
            format!("{good}\n[[forwards]\n"),
            &["nat.toml:", "nothing changed"],
        ),
        (
            "a table size and a mode",
            format!(
                "max_bindings = 3000\n{}",
                good.replace("restricted-cone", "full-cone")
            ),
            &[
                "max_bindings",
                "cannot change while the NAT runs",
                "restart",
                "nothing changed",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, words) in &cases {
        std::fs::write(&cfg, text)?;
        let out = ops::ctl(&lab.nat, &["reload", "-i", &lab.wan_if])?;
        let line = match ops::refused(&format!("reload with {what}"), &out) {
            Ok(line) => line,
            Err(e) => {
                failures.push(format!("{e:#}"));
                continue;
            }
        };
        for w in words.iter() {
            if !line.contains(w) {
                failures.push(format!("{what}: the refusal does not say {w:?}: {line}"));
            }
        }
        let s = status(&lab)?;
        if s["mode"] != "restricted-cone" || s["timeouts"]["udp"] != 300 {
            failures.push(format!(
                "{what}: status changed: mode {} udp {}",
                s["mode"], s["timeouts"]["udp"]
            ));
        }
        if ops::forwards_in(&lab.nat, &lab.wan_if)? != forwards_before {
            failures.push(format!("{what}: the forwards changed"));
        }
    }
    wait_log(&daemon, "reload refused", cases.len())?;
    ensure!(
        daemon.try_wait()?.is_none(),
        "the daemon ended: {}",
        daemon.stderr()
    );
    ensure!(failures.is_empty(), "bad reloads:\n{}", failures.join("\n"));
    let bindings_after = ops::ctl_ok(&lab.nat, &["mappings", "-i", &lab.wan_if, "--json"])?;
    let rows = |json: &str| -> Result<Vec<String>> {
        Ok(vm_tests::nat::parse_mappings(json)?
            .iter()
            .map(|m| format!("{} {} {}", m.proto, m.internal, m.external))
            .collect())
    };
    ensure!(
        rows(&bindings_after)? == rows(&bindings_before)?,
        "the bindings changed: {bindings_before} -> {bindings_after}"
    );
    ensure!(mapped(&lan, &remote)? == ext, "the flow moved");

    // Mended, the file loads; the UDP timeout it changes is the command line's, which wins.
    std::fs::write(
        &cfg,
        good.replace("restricted-cone", "full-cone")
            .replace("udp = 300", "udp = 60"),
    )?;
    let out = ops::ctl_ok(&lab.nat, &["reload", "-i", &lab.wan_if])?;
    ensure!(
        out.contains("mode restricted-cone -> full-cone")
            && out.contains("command line overrides the file's timeouts.udp"),
        "reload of the mended file: {out}"
    );
    let s = status(&lab)?;
    ensure!(
        s["mode"] == "full-cone" && s["timeouts"]["udp"] == 300,
        "after the mended file: mode {} udp {}",
        s["mode"],
        s["timeouts"]["udp"]
    );
    daemon.terminate(Duration::from_secs(20))?;
    Ok(())
}

#[test]
fn reload_without_a_daemon_or_a_config_file_is_refused() -> Result<()> {
    let lab = Lab::new("rldnone")?;
    let out = ops::ctl(&lab.nat, &["reload", "-i", &lab.wan_if])?;
    ops::refused("reload with no NAT", &out)?;
    // Started from flags alone: there is nothing to re-read, and the daemon says so.
    let (mut daemon, _) = ops::attach_raw(&lab.nat, &["attach", &lab.wan_if, "--mode", "full-cone"])?;
    let out = ops::ctl(&lab.nat, &["reload", "-i", &lab.wan_if])?;
    let line = ops::refused("reload of a daemon without --config", &out)?;
    ensure!(line.contains("without --config"), "refusal: {line}");
    let pid = daemon.pid().to_string();
    let out = ops::ctl(&lab.nat, &["reload", "--pid", &pid])?;
    let line = ops::refused("reload --pid of a daemon without --config", &out)?;
    ensure!(line.contains("without --config"), "refusal by pid: {line}");
    ensure!(
        daemon.try_wait()?.is_none(),
        "the daemon ended: {}",
        daemon.stderr()
    );
    daemon.terminate(Duration::from_secs(20))?;
    Ok(())
}
