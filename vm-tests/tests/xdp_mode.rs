//! `--xdp-mode`: native where the driver has it, generic where it has not (`auto` falls back
//! with one line naming the interface and driver), `native` refused with nothing left behind
//! where there is none, and `status` showing the mode each program got. The interface without
//! native XDP is a macvlan on the NAT's external veth (macvlan has no `ndo_bpf`), carrying the
//! external address. Root only.

use std::time::Duration;

use anyhow::{ensure, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::nat::Leftovers;
use vm_tests::netns::SETUP_TIMEOUT;
use vm_tests::ops::{self, attach_expecting_failure, refused, sa, PersistGuard};
use vm_tests::proc::poll;
use vm_tests::tools::{self, udp_bind, udp_whoami};
use vm_tests::{Lab, NatProcess};

// Lab tags avoid the letters "xdp": namespace names carry the tag, and `ip link` prints the
// peer's namespace, which `Leftovers` would take for an XDP program.

/// The NAT's external address with its prefix, as the lab configures it.
const NAT_EXT_CIDR: &str = "198.51.100.254/24";

/// Moves the NAT's external address from its veth to a new macvlan on top of it and returns
/// the macvlan's name; waits (bounded) until the NAT reaches wan through it.
fn macvlan_external(lab: &Lab) -> Result<String> {
    let mv = lab.names.iface("v");
    let nat = &lab.nat;
    nat.ip(&[
        "link",
        "add",
        &mv,
        "link",
        &lab.wan_if,
        "type",
        "macvlan",
        "mode",
        "bridge",
    ])?;
    nat.tx_csum_off(&mv)?;
    nat.ip(&["addr", "del", NAT_EXT_CIDR, "dev", &lab.wan_if])?;
    nat.ip(&["addr", "add", NAT_EXT_CIDR, "dev", &mv])?;
    nat.ip(&["link", "set", &mv, "up"])?;
    // The remotes learnt the veth's MAC for the address; the macvlan has its own.
    for host in [&lab.wan, &lab.wan2] {
        host.ip(&["neigh", "flush", "all"])?;
    }
    let reached = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let o = nat.run(
            "ping",
            &["-n", "-q", "-c", "1", "-W", "1", &WAN_IP.to_string()],
            SETUP_TIMEOUT,
        );
        matches!(o, Ok(o) if o.status.success()).then_some(())
    });
    ensure!(reached.is_some(), "the NAT cannot reach {WAN_IP} through {mv}");
    Ok(mv)
}

/// lan pings wan and a UDP whoami on wan sees the NAT's external address: both directions are
/// translated.
fn translated(lab: &Lab, nat: &NatProcess, port: u16) -> Result<()> {
    let out = tools::ping(&lab.lan, WAN_IP, 2, &[])?;
    ensure!(
        tools::ping_received(&out) == 2,
        "ping lan -> wan through the NAT:\n{}{}",
        out.stdout,
        out.stderr
    );
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, port))?;
    let seen = ops::whoami_via(lab, nat, &sock, sa(WAN_IP, 9999))?;
    ensure!(*seen.ip() == NAT_EXT, "wan saw {seen}, expected {NAT_EXT}:<port>");
    Ok(())
}

/// `status --json`'s `xdp_modes`, and the human `xdp mode:` line.
fn modes(nat: &NatProcess) -> Result<(serde_json::Value, String)> {
    let json = ops::status(nat)?["xdp_modes"].clone();
    let human = nat.ctl_ok("status", &[])?;
    let line = human
        .lines()
        .find(|l| l.starts_with("xdp mode:"))
        .unwrap_or_default()
        .to_string();
    Ok((json, line))
}

/// `ip link show DEV` in the NAT's namespace.
fn link(lab: &Lab, dev: &str) -> Result<String> {
    lab.nat.ip_out(&["link", "show", "dev", dev])
}

#[test]
fn auto_is_native_on_veth_and_generic_is_forced_on_request() -> Result<()> {
    let lab = Lab::new("xmgen")?;
    let nat = NatProcess::attach(&lab, &["--internal-iface", &lab.lan_if])?;
    ensure!(
        nat.attached_line().contains("xdp=native"),
        "attached line: {}",
        nat.attached_line()
    );
    let (json, line) = modes(&nat)?;
    ensure!(
        json == serde_json::json!({lab.wan_if.clone(): "native", lab.lan_if.clone(): "native"}),
        "xdp_modes {json}"
    );
    ensure!(
        line == format!("xdp mode:   {} native, {} native", lab.wan_if, lab.lan_if),
        "status line {line:?}"
    );
    ensure!(
        !nat.stderr().contains("generic"),
        "a fallback on veth:\n{}",
        nat.stderr()
    );
    nat.stop()?;

    let nat = NatProcess::attach(&lab, &["--xdp-mode", "generic", "--internal-iface", &lab.lan_if])?;
    ensure!(
        nat.attached_line().contains("xdp=generic"),
        "attached line: {}",
        nat.attached_line()
    );
    translated(&lab, &nat, 40000)?;
    let (json, line) = modes(&nat)?;
    ensure!(
        json == serde_json::json!({lab.wan_if.clone(): "generic", lab.lan_if.clone(): "generic"}),
        "xdp_modes {json}"
    );
    ensure!(
        line == format!("xdp mode:   {} generic, {} generic", lab.wan_if, lab.lan_if),
        "status line {line:?}"
    );
    let programs = ops::status(&nat)?["programs"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        programs.contains("xdp ingress (generic)"),
        "programs {programs:?}"
    );
    for dev in [&lab.wan_if, &lab.lan_if] {
        let l = link(&lab, dev)?;
        ensure!(l.contains("xdpgeneric"), "{dev} has no generic XDP program: {l}");
    }
    // A forced mode is no fallback: no notice about native XDP (other lines, such as the 6.1
    // kernel's note that the fast path stays off, may be there).
    ensure!(
        !nat.stderr().contains("native XDP"),
        "forced generic said something about native XDP:\n{}",
        nat.stderr()
    );
    nat.stop()?;
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind: {left:#?}");
    ensure!(
        ops::run_files_of(&lab.wan_if).is_empty(),
        "files left in /run/nat-ctl: {:?}",
        ops::run_files_of(&lab.wan_if)
    );
    Ok(())
}

#[test]
fn auto_falls_back_to_generic_on_a_device_without_native_xdp() -> Result<()> {
    let lab = Lab::new("xmauto")?;
    let mv = macvlan_external(&lab)?;
    // The subject is the external interface: no internal one, so the fallback line is the
    // only line and the only program is the macvlan's.
    let nat = NatProcess::attach_in(&lab.nat, &mv, &["--internal-iface", "none"])?;
    ensure!(
        nat.attached_line().contains("xdp=generic"),
        "attached line: {}",
        nat.attached_line()
    );
    let expected = format!("nat-ctl: {mv} (driver macvlan) has no native XDP; using generic XDP on it");
    let found = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        nat.stderr().contains(&expected).then_some(())
    });
    ensure!(
        found.is_some(),
        "no line {expected:?} on stderr:\n{}",
        nat.stderr()
    );
    let lines: Vec<String> = vm_tests::nat::log_lines(&nat.stderr())
        .into_iter()
        .map(str::to_string)
        .collect();
    ensure!(
        lines == [expected.clone()],
        "stderr should be that one line: {lines:?}"
    );
    translated(&lab, &nat, 40001)?;
    let (json, line) = modes(&nat)?;
    ensure!(
        json == serde_json::json!({mv.clone(): "generic"}),
        "xdp_modes {json}"
    );
    ensure!(
        line == format!("xdp mode:   {mv} generic"),
        "status line {line:?}"
    );
    let l = link(&lab, &mv)?;
    ensure!(l.contains("xdpgeneric"), "{mv} has no generic XDP program: {l}");
    nat.stop()?;
    let left = Leftovers::inspect(&lab.nat, &mv)?;
    ensure!(left.is_clean(), "left behind: {left:#?}");
    Ok(())
}

#[test]
fn native_is_refused_where_the_driver_has_none_and_nothing_is_left() -> Result<()> {
    let lab = Lab::new("xmnative")?;
    let mv = macvlan_external(&lab)?;
    let out = attach_expecting_failure(&lab.nat, &["attach", &mv, "--xdp-mode", "native"])?;
    let line = refused("--xdp-mode native on a macvlan", &out)?;
    ensure!(
        line == format!(
            "nat-ctl: error: {mv} has no native XDP (driver macvlan); use --xdp-mode generic or auto"
        ),
        "refusal line {line:?}"
    );
    ensure!(!out.stdout.contains("attached "), "it attached: {}", out.stdout);
    let left = Leftovers::inspect(&lab.nat, &mv)?;
    ensure!(left.is_clean(), "left behind: {left:#?}");
    ensure!(
        ops::run_files_of(&mv).is_empty(),
        "files left in /run/nat-ctl: {:?}",
        ops::run_files_of(&mv)
    );
    // Nothing in the way of the next attach either.
    let nat = NatProcess::attach_in(&lab.nat, &mv, &["--xdp-mode", "generic"])?;
    translated(&lab, &nat, 40002)?;
    nat.stop()
}

#[test]
fn adoption_keeps_the_mode_of_the_running_programs() -> Result<()> {
    let lab = Lab::new("xmadopt")?;
    let _guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    // Only the external interface's program, whose mode the adoption must keep.
    let first = NatProcess::attach(
        &lab,
        &["--persist", "--xdp-mode", "generic", "--internal-iface", "none"],
    )?;
    translated(&lab, &first, 40003)?;
    first.stop()?;
    // No daemon: status still knows the mode.
    let out = ops::ctl_ok(&lab.nat, &["status", "--json", "-i", &lab.wan_if])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        v["xdp_modes"] == serde_json::json!({lab.wan_if.clone(): "generic"}),
        "status without a daemon: {out}"
    );

    // The next attach (auto) adopts the links, which keep generic mode.
    let second = NatProcess::attach(&lab, &[])?;
    ensure!(
        second.attached_line().contains("adopted") && second.attached_line().contains("xdp=generic"),
        "attached line: {}",
        second.attached_line()
    );
    let (json, _) = modes(&second)?;
    ensure!(
        json == serde_json::json!({lab.wan_if.clone(): "generic"}),
        "xdp_modes {json}"
    );
    let l = link(&lab, &lab.wan_if)?;
    ensure!(l.contains("xdpgeneric"), "not generic after adoption: {l}");
    translated(&lab, &second, 40004)?;
    second.stop()?;
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind: {left:#?}");
    ensure!(
        ops::run_files_of(&lab.wan_if).is_empty(),
        "files left in /run/nat-ctl: {:?}",
        ops::run_files_of(&lab.wan_if)
    );
    Ok(())
}
