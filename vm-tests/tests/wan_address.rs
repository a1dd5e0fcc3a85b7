//! The external address follows the interface, as nftables masquerade does:
//! a new WAN address (a DHCP renew, a PPPoE reconnect) is used by new flows at once, bindings
//! on the old one are removed, forwards move with it; `--external-addr` stays fixed; a link
//! flap changes nothing; the interface deleted stops the daemon with one line and leaves
//! nothing behind. Root only.

use std::net::Ipv4Addr;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::ops::{self, forward_entry, sa, PersistGuard};
use vm_tests::proc::poll;
use vm_tests::tools::{udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

/// The NAT's new address after the "renumbering".
const NEW_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
/// How long the daemon may take to act on an address or link event (it takes milliseconds;
/// the bound only keeps a broken build from hanging the suite).
const EVENT_WAIT: Duration = Duration::from_secs(10);
/// How long a link that was set down and up again may take to carry traffic.
const LINK_WAIT: Duration = Duration::from_secs(10);
/// Time the daemon is given to (wrongly) react before a "nothing changed" check: a followed
/// change is made within milliseconds of the event.
const NO_REACTION_GRACE: Duration = Duration::from_secs(1);

/// Renumbers the NAT's external interface from `NAT_EXT` to `NEW_EXT` the way a DHCP client
/// that got a new lease does: the new address first, then the old one removed. With
/// `promote_secondaries` the new address (a secondary in the same /24) becomes the primary;
/// without it the kernel would delete it together with the old primary.
fn renumber(lab: &Lab) -> Result<()> {
    lab.nat
        .sysctl(&format!("net.ipv4.conf.{}.promote_secondaries", lab.wan_if), "1")?;
    lab.nat
        .ip(&["addr", "add", &format!("{NEW_EXT}/24"), "dev", &lab.wan_if])?;
    lab.nat
        .ip(&["addr", "del", &format!("{NAT_EXT}/24"), "dev", &lab.wan_if])?;
    Ok(())
}

/// Waits (bounded) for a line containing `needle` on the daemon's stderr.
fn wait_stderr(nat: &NatProcess, needle: &str) -> Result<String> {
    poll(EVENT_WAIT, Duration::from_millis(20), || {
        nat.stderr()
            .lines()
            .find(|l| l.contains(needle))
            .map(str::to_string)
    })
    .with_context(|| {
        format!(
            "no line containing {needle:?} on nat-ctl's stderr within {EVENT_WAIT:?}; stderr: {}",
            nat.stderr().trim()
        )
    })
}

/// The external addresses and the follow flag from `status --json`.
fn status_addrs(nat: &NatProcess) -> Result<(Vec<String>, bool)> {
    let v = ops::status(nat)?;
    let addrs = v["external_addrs"]
        .as_array()
        .with_context(|| format!("no external_addrs in status: {v}"))?
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_string())
        .collect();
    let follows = v["external_follows_iface"]
        .as_bool()
        .with_context(|| format!("no external_follows_iface in status: {v}"))?;
    Ok((addrs, follows))
}

/// A new UDP flow from lan (fresh source port) to wan's whoami reflector: what wan saw.
fn new_flow_seen_as(lab: &Lab, nat: &NatProcess, port: u16) -> Result<std::net::SocketAddrV4> {
    let sock = udp_bind(&lab.lan, sa(LAN_IP, port))?;
    ops::whoami_via(lab, nat, &sock, sa(WAN_IP, 9999))
}

fn follows_a_new_address(tag: &str, mode: &str) -> Result<()> {
    let lab = Lab::new(tag)?;
    let nat = NatProcess::attach(&lab, &["--mode", mode])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let _server = udp_whoami(&lab.lan, LAN_IP, 7000)?;
    ops::forward_ok(
        &lab.nat,
        &lab.wan_if,
        "add",
        &["udp", "7000", &format!("{LAN_IP}:7000")],
    )?;

    let (addrs, follows) = status_addrs(&nat)?;
    ensure!(
        addrs == [NAT_EXT.to_string()] && follows,
        "status before: external {addrs:?}, follows {follows} (want [{NAT_EXT}], true)"
    );
    let human = nat.ctl_ok("status", &[])?;
    ensure!(
        human.contains(&format!("external:   {NAT_EXT} (follows {})", lab.wan_if)),
        "status does not say the address follows {}:\n{human}",
        lab.wan_if
    );
    let old_sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let before = ops::whoami_via(&lab, &nat, &old_sock, sa(WAN_IP, 9999))?;
    ensure!(*before.ip() == NAT_EXT, "wan saw {before} before the change");

    renumber(&lab)?;
    let line = wait_stderr(
        &nat,
        &format!(
            "nat-ctl: external address of {} changed {NAT_EXT} -> {NEW_EXT}; removed ",
            lab.wan_if
        ),
    )?;
    ensure!(
        line.contains("on the old address") && line.contains("moved 1 forward"),
        "change line: {line}"
    );

    // Nothing is left on the old address: the binding of 10.0.0.2:40000 (and in symmetric
    // mode its per-remote binding) went, the forward moved.
    let rows = ops::rows(&nat, &[])?;
    let stale: Vec<_> = rows.iter().filter(|r| *r.external.ip() == NAT_EXT).collect();
    ensure!(stale.is_empty(), "rows still on {NAT_EXT}: {stale:#?}");
    let forwards = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        forwards == vec![forward_entry("udp", sa(NEW_EXT, 7000), sa(LAN_IP, 7000))],
        "forwards after the change: {forwards:?}"
    );
    let (addrs, follows) = status_addrs(&nat)?;
    ensure!(
        addrs == [NEW_EXT.to_string()] && follows,
        "status after: external {addrs:?}, follows {follows}"
    );

    // A new flow leaves from the new address (bounded: a few fresh flows at most).
    let mut seen = Vec::new();
    let found = poll(EVENT_WAIT, Duration::from_millis(100), || {
        let port = 41000 + seen.len() as u16;
        match new_flow_seen_as(&lab, &nat, port) {
            Ok(s) if *s.ip() == NEW_EXT => Some(s),
            other => {
                seen.push(format!("{other:?}"));
                None
            }
        }
    });
    ensure!(found.is_some(), "no new flow was seen as {NEW_EXT}: {seen:?}");
    // The old flow carries on, on a binding on the new address.
    let again = ops::whoami_via(&lab, &nat, &old_sock, sa(WAN_IP, 9999))?;
    ensure!(
        *again.ip() == NEW_EXT,
        "the old flow is seen as {again} after the change"
    );
    // The forward delivers on the new address.
    let remote = udp_bind(&lab.wan2, sa(WAN2_IP, 7100))?;
    let via_forward =
        whoami(&remote, sa(NEW_EXT, 7000)).context("no reply through the forward on the new address")?;
    ensure!(
        via_forward == sa(WAN2_IP, 7100),
        "the server behind the moved forward saw {via_forward}"
    );
    nat.stop()
}

#[test]
fn a_new_wan_address_is_followed_and_bindings_on_the_old_one_go() -> Result<()> {
    follows_a_new_address("wanfollow", "port-restricted")
}

#[test]
fn per_remote_bindings_on_the_old_address_go_too() -> Result<()> {
    follows_a_new_address("wanfollowsym", "symmetric")
}

#[test]
fn an_address_given_with_external_addr_stays_fixed() -> Result<()> {
    let lab = Lab::new("wanfixed")?;
    let nat = NatProcess::attach(&lab, &["--external-addr", &NAT_EXT.to_string()])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let before = ops::whoami_via(&lab, &nat, &sock, sa(WAN_IP, 9999))?;
    ensure!(*before.ip() == NAT_EXT, "wan saw {before}");
    let (_, follows) = status_addrs(&nat)?;
    ensure!(!follows, "status says a given address follows the interface");

    renumber(&lab)?;
    std::thread::sleep(NO_REACTION_GRACE);
    let (addrs, _) = status_addrs(&nat)?;
    ensure!(
        addrs == [NAT_EXT.to_string()],
        "a given address changed with the interface: {addrs:?}"
    );
    ensure!(
        !nat.stderr().contains("external address of"),
        "nat-ctl reacted to the change: {}",
        nat.stderr().trim()
    );
    let rows = ops::rows(&nat, &[])?;
    ensure!(
        rows.iter()
            .any(|r| r.internal == sa(LAN_IP, 40000) && r.external == before),
        "the binding on the given address was removed: {rows:#?}"
    );
    // With the address back on the interface (or routed to it) the same flow goes on as before.
    lab.nat
        .ip(&["addr", "add", &format!("{NAT_EXT}/24"), "dev", &lab.wan_if])?;
    let again = ops::whoami_via(&lab, &nat, &sock, sa(WAN_IP, 9999))?;
    ensure!(again == before, "the flow moved from {before} to {again}");
    nat.stop()
}

#[test]
fn a_link_flap_keeps_translating() -> Result<()> {
    let lab = Lab::new("wanflap")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let before = ops::whoami_via(&lab, &nat, &sock, sa(WAN_IP, 9999))?;
    ensure!(*before.ip() == NAT_EXT, "wan saw {before}");

    lab.nat.ip(&["link", "set", &lab.wan_if, "down"])?;
    lab.nat.ip(&["link", "set", &lab.wan_if, "up"])?;
    poll(LINK_WAIT, Duration::from_millis(100), || {
        let o = lab
            .nat
            .run(
                "ping",
                &["-n", "-q", "-c", "1", "-W", "1", &WAN_IP.to_string()],
                Duration::from_secs(5),
            )
            .ok()?;
        o.status.success().then_some(())
    })
    .with_context(|| format!("{} carried no ping within {LINK_WAIT:?} of coming up", lab.wan_if))?;

    let link = lab.nat.ip_out(&["link", "show", "dev", &lab.wan_if])?;
    ensure!(
        link.contains("xdp"),
        "the XDP program is gone after the flap: {link}"
    );
    // The old flow keeps its binding; a new one is translated too.
    let again = ops::whoami_via(&lab, &nat, &sock, sa(WAN_IP, 9999))?;
    ensure!(again == before, "the flow moved from {before} to {again}");
    let fresh = new_flow_seen_as(&lab, &nat, 40001)?;
    ensure!(
        *fresh.ip() == NAT_EXT,
        "a new flow after the flap was seen as {fresh}"
    );
    let (addrs, follows) = status_addrs(&nat)?;
    ensure!(
        addrs == [NAT_EXT.to_string()] && follows,
        "status after the flap: {addrs:?}"
    );
    ensure!(
        !nat.stderr().contains("removed"),
        "nat-ctl reacted to the flap: {}",
        nat.stderr().trim()
    );
    nat.stop()
}

/// Deletes the NAT's external interface and requires: the daemon exits by itself with status
/// 1 and the line `nat-ctl: interface IFACE was removed; detaching`, and leaves no pin
/// directory, lock file or saved sysctls.
fn removal_leaves_nothing(lab: &Lab, mut nat: NatProcess) -> Result<()> {
    lab.nat.ip(&["link", "del", &lab.wan_if])?;
    let exited = poll(EVENT_WAIT, Duration::from_millis(50), || {
        (!nat.is_running()).then_some(())
    });
    if exited.is_none() {
        let st = nat.terminate();
        bail!(
            "nat-ctl still ran {EVENT_WAIT:?} after its interface was deleted (then SIGTERM: {st:?}); stderr: {}",
            nat.stderr().trim()
        );
    }
    let status: ExitStatus = nat.terminate()?;
    let stderr = nat.stderr();
    let line = format!("nat-ctl: interface {} was removed; detaching", lab.wan_if);
    ensure!(
        vm_tests::nat::log_lines(&stderr).iter().any(|l| *l == line),
        "no line {line:?}; stderr: {}",
        stderr.trim()
    );
    ensure!(
        !stderr.contains("error"),
        "errors while detaching: {}",
        stderr.trim()
    );
    ensure!(
        status.code() == Some(1),
        "exit status {status} (want 1: stopped for a reason other than a signal)"
    );
    let pins = ops::pin_dirs_of(&lab.wan_if);
    ensure!(pins.is_empty(), "pin directories left: {pins:?}");
    let run_files = ops::run_files_of(&lab.wan_if);
    ensure!(run_files.is_empty(), "lock or sysctl files left: {run_files:?}");
    Ok(())
}

#[test]
fn deleting_the_interface_stops_the_daemon_and_leaves_nothing() -> Result<()> {
    let lab = Lab::new("wandel")?;
    let nat = NatProcess::attach(&lab, &[])?;
    removal_leaves_nothing(&lab, nat)
}

#[test]
fn deleting_the_interface_of_a_persistent_nat_leaves_nothing_either() -> Result<()> {
    let lab = Lab::new("wandelp")?;
    let _guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let nat = NatProcess::attach(&lab, &["--persist"])?;
    removal_leaves_nothing(&lab, nat)
}

#[test]
fn an_adopted_nat_catches_up_with_an_address_changed_while_no_daemon_ran() -> Result<()> {
    let lab = Lab::new("wanadopt")?;
    let _guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let dir = ops::TempDir::new("wanadopt")?;
    let config = dir.write(
        "nat.toml",
        &format!("[[forwards]]\nproto = \"udp\"\nexternal_port = 7000\ninternal = \"{LAN_IP}:7000\"\n"),
    )?;
    let config = config.to_string_lossy().into_owned();
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let _server = udp_whoami(&lab.lan, LAN_IP, 7000)?;
    let first = NatProcess::attach(&lab, &["--config", &config, "--persist"])?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let before = ops::whoami_via(&lab, &first, &sock, sa(WAN_IP, 9999))?;
    ensure!(*before.ip() == NAT_EXT, "wan saw {before}");
    first.stop()?;

    // Renumbered while nothing follows the address; the next daemon adopts the running state.
    renumber(&lab)?;
    let second = NatProcess::attach(&lab, &["--config", &config])?;
    let attached = second.attached_line();
    ensure!(
        attached.contains(&format!("external={NEW_EXT} ")) && attached.contains("adopted"),
        "attached line: {attached}"
    );
    let line = wait_stderr(&second, "the running state had entries on addresses no longer on")?;
    ensure!(
        line.contains("removed 1 binding on the old address; moved 1 forward"),
        "catch-up line: {line}"
    );
    let rows = ops::rows(&second, &[])?;
    let stale: Vec<_> = rows.iter().filter(|r| *r.external.ip() == NAT_EXT).collect();
    ensure!(stale.is_empty(), "rows still on {NAT_EXT}: {stale:#?}");
    let forwards = ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        forwards == vec![forward_entry("udp", sa(NEW_EXT, 7000), sa(LAN_IP, 7000))],
        "forwards after adoption: {forwards:?}"
    );
    let again = ops::whoami_via(&lab, &second, &sock, sa(WAN_IP, 9999))?;
    ensure!(
        *again.ip() == NEW_EXT,
        "the flow is seen as {again} after adoption"
    );
    let remote = udp_bind(&lab.wan2, sa(WAN2_IP, 7100))?;
    let via_forward =
        whoami(&remote, sa(NEW_EXT, 7000)).context("no reply through the forward on the new address")?;
    ensure!(
        via_forward == sa(WAN2_IP, 7100),
        "the server behind the forward saw {via_forward}"
    );
    second.stop()
}
