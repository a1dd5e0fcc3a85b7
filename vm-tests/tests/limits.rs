//! Binding limits (RFC 6888 REQ-4): `--max-bindings N` refuses new flows once
//! N dynamic bindings exist (dropped, counted as table_full), `--max-bindings-per-host N` does
//! the same per internal host (host_limit) without touching other hosts; existing bindings are
//! never evicted, static forwards always fit, and bindings freed by expiry free quota.
//! Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN2_IP, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::netns::Netns;
use vm_tests::ops::{self, sa};
use vm_tests::proc::poll;
use vm_tests::tools::{self, udp_bind, udp_expect, udp_recv, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

/// Opens `n` UDP sockets on `ip` from `first_port` in `ns` and maps each through the NAT (a
/// whoami round trip). Returns the sockets and their external endpoints.
fn map_flows(ns: &Netns, ip: Ipv4Addr, first_port: u16, n: u16) -> Result<Vec<(UdpSocket, SocketAddrV4)>> {
    (0..n)
        .map(|i| {
            let s = udp_bind(ns, sa(ip, first_port + i))?;
            let ext = whoami(&s, sa(WAN_IP, 9999))
                .with_context(|| format!("flow {i} from {ip}:{} under the limit", first_port + i))?;
            Ok((s, ext))
        })
        .collect()
}

/// Requires that a new flow from `ip:port` never reaches wan (a plain socket on wan port 9998
/// listens): the NAT drops it.
fn new_flow_is_refused(ns: &Netns, ip: Ipv4Addr, port: u16, wan_sink: &UdpSocket) -> Result<()> {
    let s = udp_bind(ns, sa(ip, port))?;
    for i in 0..3 {
        s.send_to(format!("over the limit {i}").as_bytes(), sa(WAN_IP, 9998))?;
    }
    if let Some((data, from)) = udp_recv(wan_sink, Duration::from_secs(1))? {
        anyhow::bail!(
            "a new flow from {ip}:{port} over the limit reached wan from {from}: {:?}",
            String::from_utf8_lossy(&data)
        );
    }
    Ok(())
}

/// The flows still map to the same external endpoints and get answers.
fn flows_still_work(flows: &[(UdpSocket, SocketAddrV4)]) -> Result<()> {
    for (s, ext) in flows {
        let now =
            whoami(s, sa(WAN_IP, 9999)).with_context(|| format!("existing flow {ext} stopped working"))?;
        ensure!(now == *ext, "existing binding {ext} changed to {now}");
    }
    Ok(())
}

#[test]
fn max_bindings_refuses_new_flows_keeps_old_ones_and_forwards_still_fit() -> Result<()> {
    let lab = Lab::new("maxbind")?;
    let nat = NatProcess::attach(&lab, &["--max-bindings", "3"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sink = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let flows = map_flows(&lab.lan, LAN_IP, 40000, 3)?;
    let before = nat.stats()?;

    new_flow_is_refused(&lab.lan, LAN_IP, 40100, &sink)?;
    let ping = tools::ping(&lab.lan, WAN_IP, 1, &[])?;
    ensure!(
        tools::ping_received(&ping) == 0,
        "a ping (a new ICMP binding) got through a full table:\n{}",
        ping.stdout
    );
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "table_full")? >= 1,
        "table_full did not count the refused flows: {}",
        after.changes(&before)
    );
    let st = ops::status(&nat)?;
    ensure!(
        st["dynamic_bindings"] == 3 && st["max_bindings"] == 3,
        "status with a full table: dynamic {} / max {}",
        st["dynamic_bindings"],
        st["max_bindings"]
    );

    // Existing bindings are never evicted, and keep working, even towards a new remote (a new
    // session of an existing binding, not a new binding).
    flows_still_work(&flows)?;
    let to_wan2 = udp_bind(&lab.wan2, sa(WAN2_IP, 9997))?;
    flows[0]
        .0
        .send_to(b"existing binding, new remote", sa(WAN2_IP, 9997))?;
    let got = udp_expect(&to_wan2, b"existing binding, new remote", Duration::from_secs(3))?
        .context("an existing binding could not reach a new remote with the table full")?;
    ensure!(
        got == SocketAddr::V4(flows[0].1),
        "arrived from {got}, binding is {}",
        flows[0].1
    );

    // Static forwards always fit, and deliver, with the table full.
    let _srv1 = udp_whoami(&lab.lan, LAN_IP, 5353)?;
    let _srv2 = tools::tcp_whoami(&lab.lan, LAN_IP, 80)?;
    for (proto, ext, int) in [
        ("udp", "5353", "10.0.0.2:5353"),
        ("tcp", "8080", "10.0.0.2:80"),
        ("udp", "5354", "10.0.0.2:5354"),
    ] {
        ops::forward_ok(&lab.nat, &lab.wan_if, "add", &[proto, ext, int])
            .with_context(|| format!("forward {proto} {ext} refused with the table full"))?;
    }
    let client = udp_bind(&lab.wan2, sa(WAN2_IP, 7000))?;
    let seen =
        whoami(&client, sa(NAT_EXT, 5353)).context("the UDP forward does not deliver with the table full")?;
    ensure!(seen == sa(WAN2_IP, 7000), "server behind the forward saw {seen}");
    let (seen, local) = tools::tcp_whoami_query(&lab.wan2, sa(NAT_EXT, 8080))
        .context("the TCP forward does not deliver with the table full")?;
    ensure!(
        SocketAddr::V4(seen) == local,
        "server saw {seen}, client is {local}"
    );
    // The forwards took no quota: still exactly the three dynamic bindings, still full.
    new_flow_is_refused(&lab.lan, LAN_IP, 40101, &sink)?;
    flows_still_work(&flows)?;
    nat.stop()
}

#[test]
fn bindings_freed_by_expiry_free_quota() -> Result<()> {
    let lab = Lab::new("maxfree")?;
    let nat = NatProcess::attach(
        &lab,
        &[
            "--max-bindings",
            "2",
            "--udp-timeout",
            "2",
            "--sweep-interval-ms",
            "100",
        ],
    )?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sink = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let flows = map_flows(&lab.lan, LAN_IP, 40000, 2)?;
    new_flow_is_refused(&lab.lan, LAN_IP, 40100, &sink)?;
    drop(flows);
    // Once the two idle bindings expire (2 s), the quota is free again.
    poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let st = ops::status(&nat).ok()?;
        (st["dynamic_bindings"] == 0).then_some(())
    })
    .context("the idle bindings never expired (--udp-timeout 2)")?;
    let again = map_flows(&lab.lan, LAN_IP, 40200, 2).context("new flows after the old ones expired")?;
    ensure!(again.len() == 2, "mapped {} flows", again.len());
    nat.stop()
}

#[test]
fn per_host_limit_refuses_that_host_only() -> Result<()> {
    let lab = Lab::with(
        "perhost",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let nat = NatProcess::attach(&lab, &["--max-bindings-per-host", "2"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sink = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let lan_flows = map_flows(&lab.lan, LAN_IP, 40000, 2)?;
    let before = nat.stats()?;
    new_flow_is_refused(&lab.lan, LAN_IP, 40100, &sink)?;
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "host_limit")? >= 1,
        "host_limit did not count lan's third flow: {}",
        after.changes(&before)
    );
    ensure!(
        after.delta(&before, "table_full")? == 0,
        "the per-host limit was counted as table_full: {}",
        after.changes(&before)
    );
    // Another host is unaffected: it gets its own two.
    let lan2_flows =
        map_flows(lab.lan2(), LAN2_IP, 40000, 2).context("lan2 was refused because lan is at its limit")?;
    new_flow_is_refused(lab.lan2(), LAN2_IP, 40100, &sink)?;
    flows_still_work(&lan_flows)?;
    flows_still_work(&lan2_flows)?;
    let rows = ops::rows(&nat, &["--internal", &LAN_IP.to_string()])?;
    ensure!(
        rows.iter().filter(|r| r.proto == "udp").count() == 2,
        "lan holds {} udp bindings with --max-bindings-per-host 2: {rows:#?}",
        rows.len()
    );
    nat.stop()
}
