//! Inspection: `nat-ctl mappings` lists the table (JSON keys proto, internal,
//! external, remote, state, expires_in; filters by protocol and internal address), `stats`
//! prints every counter and they count, `status` shows interface, mode, addresses, programs
//! and table fill, and `-i` is optional with one NAT in the namespace and required with two.
//! Root only.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{LAN2_IP, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::ops::{self, sa};
use vm_tests::tools::{self, udp_bind, udp_expect, udp_recv, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

fn local_v4(s: &std::net::TcpStream) -> Result<SocketAddrV4> {
    match s.local_addr()? {
        SocketAddr::V4(a) => Ok(a),
        a => bail!("unexpected local address {a}"),
    }
}

#[test]
fn mappings_list_udp_tcp_and_icmp_with_every_key_and_filter() -> Result<()> {
    let lab = Lab::with(
        "mapjson",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let nat = NatProcess::attach(&lab, &["--udp-timeout", "100", "--icmp-timeout", "70"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let udp = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let udp_ext = whoami(&udp, sa(WAN_IP, 9999))?;
    let udp2 = udp_bind(lab.lan2(), sa(LAN2_IP, 40001))?;
    let udp2_ext = whoami(&udp2, sa(WAN_IP, 9999))?;
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let tcp = tools::tcp_connect(&lab.lan, sa(WAN_IP, 5001))?;
    let tcp_local = local_v4(&tcp)?;
    let ping = tools::ping(&lab.lan, WAN_IP, 1, &[])?;
    ensure!(tools::ping_received(&ping) == 1, "ping: {}", ping.stdout);

    // `parse_rows` requires all six keys in every row.
    let rows = ops::rows(&nat, &[])?;
    let udp_row = rows
        .iter()
        .find(|r| r.proto == "udp" && r.internal == sa(LAN_IP, 40000))
        .with_context(|| format!("no udp row for 10.0.0.2:40000: {rows:#?}"))?;
    ensure!(
        udp_row.external == udp_ext && udp_row.remote == Some(sa(WAN_IP, 9999)),
        "udp row {udp_row:?}: the remote saw {udp_ext}, lan talked to {WAN_IP}:9999"
    );
    ensure!(
        matches!(udp_row.expires_in, Some(s) if s > 0 && s <= 100),
        "udp expires_in {:?} with --udp-timeout 100",
        udp_row.expires_in
    );
    ensure!(!udp_row.state.is_empty(), "udp row without a state: {udp_row:?}");

    let tcp_row = rows
        .iter()
        .find(|r| r.proto == "tcp" && r.internal == tcp_local)
        .with_context(|| format!("no tcp row for {tcp_local}: {rows:#?}"))?;
    ensure!(
        *tcp_row.external.ip() == NAT_EXT && tcp_row.remote == Some(sa(WAN_IP, 5001)),
        "tcp row {tcp_row:?}"
    );
    ensure!(
        tcp_row.state == "established",
        "open TCP connection in state {:?}",
        tcp_row.state
    );
    ensure!(
        matches!(tcp_row.expires_in, Some(s) if s > 240 && s <= 7440),
        "established tcp expires_in {:?} (default established timeout 7440 s)",
        tcp_row.expires_in
    );

    let icmp_row = rows
        .iter()
        .find(|r| r.proto == "icmp" && *r.internal.ip() == LAN_IP)
        .with_context(|| format!("no icmp row for the ping from {LAN_IP}: {rows:#?}"))?;
    ensure!(*icmp_row.external.ip() == NAT_EXT, "icmp row {icmp_row:?}");
    ensure!(
        icmp_row.remote.is_none_or(|r| *r.ip() == WAN_IP),
        "icmp row remote {:?}, lan pinged {WAN_IP}",
        icmp_row.remote
    );
    ensure!(
        matches!(icmp_row.expires_in, Some(s) if s > 0 && s <= 70),
        "icmp expires_in {:?} with --icmp-timeout 70",
        icmp_row.expires_in
    );

    // Filters.
    for proto in ["udp", "tcp", "icmp"] {
        let only = ops::rows(&nat, &["--proto", proto])?;
        ensure!(
            !only.is_empty() && only.iter().all(|r| r.proto == proto),
            "--proto {proto} gave {only:#?}"
        );
    }
    let lan2_only = ops::rows(&nat, &["--internal", &LAN2_IP.to_string()])?;
    ensure!(
        lan2_only.len() == 1
            && lan2_only[0].internal == sa(LAN2_IP, 40001)
            && lan2_only[0].external == udp2_ext,
        "--internal {LAN2_IP} gave {lan2_only:#?}"
    );
    let lan_only = ops::rows(&nat, &["--internal", &LAN_IP.to_string(), "--proto", "udp"])?;
    ensure!(
        lan_only.len() == 1 && lan_only[0].internal == sa(LAN_IP, 40000),
        "--internal {LAN_IP} --proto udp gave {lan_only:#?}"
    );

    // The human table names the same entries.
    let text = nat.ctl_ok("mappings", &[])?;
    let header = text.lines().next().unwrap_or_default();
    for col in ["PROTO", "INTERNAL", "EXTERNAL", "REMOTE", "STATE", "EXPIRES"] {
        ensure!(header.contains(col), "table header {header:?} lacks {col}");
    }
    ensure!(
        text.lines().any(|l| l.contains("10.0.0.2:40000")
            && l.contains(&udp_ext.to_string())
            && l.starts_with("udp")),
        "the table does not show udp 10.0.0.2:40000 -> {udp_ext}:\n{text}"
    );

    // Bad filters: one line, non-zero.
    for (what, args) in [
        (
            "unknown protocol",
            vec!["mappings", "-i", &lab.wan_if, "--proto", "sctp"],
        ),
        (
            "IPv6 internal",
            vec!["mappings", "-i", &lab.wan_if, "--internal", "fe80::1"],
        ),
    ] {
        ops::refused(what, &ops::ctl(&lab.nat, &args)?)?;
    }
    drop(tcp);
    nat.stop()
}

/// Counters the issue names: translated per direction, new bindings, filtered, port
/// exhaustion, table full, malformed, passed to the kernel.
const REQUIRED_COUNTERS: [&str; 10] = [
    "translated_out",
    "translated_in",
    "new_binding",
    "filtered_in",
    "port_exhausted",
    "table_full",
    "host_limit",
    "malformed",
    "passed_not_nat",
    "fast_path_redirected",
];

#[test]
fn stats_print_every_counter_and_they_count() -> Result<()> {
    let lab = Lab::new("stats")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let before = nat.stats()?;
    for c in REQUIRED_COUNTERS {
        before.get(c)?;
    }
    ensure!(
        before.0.values().all(|v| *v == 0),
        "a fresh NAT has non-zero counters: {:?}",
        before.0
    );

    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let stranger = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    let mut ext = None;
    for i in 0..5 {
        lan.send_to(format!("out {i}").as_bytes(), sa(WAN_IP, 9999))?;
        let (_, from) = udp_recv(&remote, Duration::from_secs(3))?.context("outbound datagram lost")?;
        ext = Some(from);
    }
    let ext = ext.unwrap();
    for i in 0..5 {
        let msg = format!("in {i}");
        remote.send_to(msg.as_bytes(), ext)?;
        udp_expect(&lan, msg.as_bytes(), Duration::from_secs(3))?.context("inbound datagram lost")?;
    }
    stranger.send_to(b"filtered", ext)?;
    ensure!(
        udp_expect(&lan, b"filtered", Duration::from_secs(1))?.is_none(),
        "port-restricted let a stranger through"
    );
    let after = nat.stats()?;
    let d = |c: &str| after.delta(&before, c);
    ensure!(
        d("translated_out")? >= 5,
        "translated_out: {}",
        after.changes(&before)
    );
    ensure!(
        d("translated_in")? >= 5,
        "translated_in: {}",
        after.changes(&before)
    );
    ensure!(
        d("new_binding")? == 1,
        "new_binding for one flow: {}",
        after.changes(&before)
    );
    ensure!(d("filtered_in")? >= 1, "filtered_in: {}", after.changes(&before));
    for c in ["port_exhausted", "table_full", "host_limit", "malformed"] {
        ensure!(d(c)? == 0, "{c} grew without cause: {}", after.changes(&before));
    }

    // Human output: every counter with its value, one per line.
    let text = nat.ctl_ok("stats", &[])?;
    for (name, value) in &after.0 {
        ensure!(
            text.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(name.as_str()) && w.next().and_then(|v| v.parse::<u64>().ok()).is_some()
            }),
            "`nat-ctl stats` has no line for {name} ({value}):\n{text}"
        );
    }
    nat.stop()
}

#[test]
fn status_shows_interface_mode_addresses_programs_and_fill() -> Result<()> {
    let lab = Lab::new("status")?;
    ops::enable_fast_path_delivery(&lab)?;
    let nat = NatProcess::attach(
        &lab,
        &[
            "--mode",
            "restricted-cone",
            "--max-bindings",
            "1000",
            "--max-bindings-per-host",
            "50",
            "--internal-iface",
            &lab.lan_if,
        ],
    )?;
    let s0 = ops::status(&nat)?;
    for key in [
        "iface",
        "pid",
        "mode",
        "external_addrs",
        "ports",
        "timeouts",
        "programs",
        "bindings",
        "dynamic_bindings",
        "max_bindings",
        "max_bindings_per_host",
        "sessions",
    ] {
        ensure!(s0.get(key).is_some(), "status JSON has no {key:?}: {s0:#}");
    }
    ensure!(s0["iface"] == lab.wan_if.as_str(), "iface {}", s0["iface"]);
    let pid = s0["pid"].to_string().trim_matches('"').to_string();
    ensure!(
        pid == nat.pid().to_string(),
        "status pid {pid}, the daemon's pid is {}",
        nat.pid()
    );
    ensure!(s0["mode"] == "restricted-cone", "mode {}", s0["mode"]);
    ensure!(
        s0["external_addrs"] == serde_json::json!([NAT_EXT.to_string()]),
        "external_addrs {}",
        s0["external_addrs"]
    );
    let programs = s0["programs"].as_str().unwrap_or_default();
    ensure!(
        programs.contains("xdp") && programs.contains(&lab.wan_if) && programs.contains(&lab.lan_if),
        "programs {programs:?} should name the XDP programs on {} and {}",
        lab.wan_if,
        lab.lan_if
    );
    ensure!(
        s0["max_bindings"] == 1000 && s0["max_bindings_per_host"] == 50,
        "limits {} / {}",
        s0["max_bindings"],
        s0["max_bindings_per_host"]
    );
    ensure!(
        s0["dynamic_bindings"] == 0,
        "dynamic_bindings {} before any traffic",
        s0["dynamic_bindings"]
    );

    // Three flows fill three bindings.
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let socks: Vec<_> = (0..3)
        .map(|i| udp_bind(&lab.lan, sa(LAN_IP, 40000 + i)))
        .collect::<Result<_>>()?;
    for s in &socks {
        whoami(s, sa(WAN_IP, 9999))?;
    }
    let s1 = ops::status(&nat)?;
    ensure!(
        s1["dynamic_bindings"] == 3,
        "dynamic_bindings {} after three flows",
        s1["dynamic_bindings"]
    );
    ensure!(
        s1["sessions"].as_u64().unwrap_or(0) >= 3,
        "sessions {} after three flows",
        s1["sessions"]
    );

    let text = nat.ctl_ok("status", &[])?;
    for want in [
        lab.wan_if.as_str(),
        "restricted-cone",
        &NAT_EXT.to_string(),
        &lab.lan_if,
        "3 dynamic / 1000",
    ] {
        ensure!(
            text.contains(want),
            "`nat-ctl status` does not show {want:?}:\n{text}"
        );
    }
    nat.stop()
}

#[test]
fn dash_i_is_optional_with_one_nat_and_required_with_two() -> Result<()> {
    let lab = Lab::new("dashi")?;
    let nat = NatProcess::attach(&lab, &[])?;
    // One NAT in the namespace: no -i needed.
    for args in [
        vec!["status", "--json"],
        vec!["stats", "--json"],
        vec!["mappings", "--json"],
        vec!["forward", "list", "--json"],
    ] {
        ops::ctl_ok(&lab.nat, &args)?;
    }
    let s: serde_json::Value = serde_json::from_str(&ops::ctl_ok(&lab.nat, &["status", "--json"])?)?;
    ensure!(
        s["iface"] == lab.wan_if.as_str(),
        "status without -i shows {}",
        s["iface"]
    );

    // -i naming an interface without a NAT (existing or not): one line, non-zero.
    let nosuch = lab.names.iface("zz");
    let mut failures = Vec::new();
    for iface in [nosuch.as_str(), lab.lan_if.as_str()] {
        for args in [
            vec!["status", "-i", iface],
            vec!["stats", "-i", iface],
            vec!["mappings", "-i", iface],
            vec!["mode", "-i", iface, "full-cone"],
            vec!["forward", "list", "-i", iface],
        ] {
            if let Err(e) = ops::refused(&args.join(" "), &ops::ctl(&lab.nat, &args)?) {
                failures.push(format!("{e:#}"));
            }
        }
    }
    // No NAT in this namespace at all (the NAT runs in another one).
    if let Err(e) = ops::refused("status in lan's namespace", &ops::ctl(&lab.lan, &["status"])?) {
        failures.push(format!("{e:#}"));
    }
    ensure!(failures.is_empty(), "-i errors:\n{}", failures.join("\n"));

    // A second NAT in the same namespace (on a spare veth, both ends in the NAT's namespace;
    // this kernel has no dummy driver): now -i is required.
    let dummy = lab.names.iface("d");
    let dummy_peer = lab.names.iface("e");
    lab.nat
        .ip(&["link", "add", &dummy, "type", "veth", "peer", "name", &dummy_peer])?;
    lab.nat.ip(&["link", "set", &dummy_peer, "up"])?;
    lab.nat.ip(&["addr", "add", "192.0.2.1/24", "dev", &dummy])?;
    lab.nat.ip(&["link", "set", &dummy, "up"])?;
    let second = NatProcess::attach_in(&lab.nat, &dummy, &[])?;
    let msg = ops::refused("status without -i, two NATs", &ops::ctl(&lab.nat, &["status"])?)?;
    ensure!(
        msg.contains("-i") || (msg.contains(&lab.wan_if) && msg.contains(&dummy)),
        "the refusal does not say to choose with -i: {msg}"
    );
    ops::refused(
        "mappings without -i, two NATs",
        &ops::ctl(&lab.nat, &["mappings"])?,
    )?;
    for (iface, want_addr) in [
        (lab.wan_if.as_str(), NAT_EXT.to_string()),
        (dummy.as_str(), "192.0.2.1".into()),
    ] {
        let s: serde_json::Value =
            serde_json::from_str(&ops::ctl_ok(&lab.nat, &["status", "-i", iface, "--json"])?)?;
        ensure!(
            s["iface"] == iface && s["external_addrs"] == serde_json::json!([want_addr]),
            "status -i {iface}: {s:#}"
        );
    }
    second.stop()?;
    // Back to one: -i optional again.
    ops::ctl_ok(&lab.nat, &["status"])?;
    nat.stop()
}

/// The external endpoint of the one mapping whose internal endpoint is `internal`.
fn external_of(nat: &NatProcess, internal: SocketAddrV4) -> Result<SocketAddrV4> {
    let rows = nat.mappings()?;
    let row = rows
        .iter()
        .find(|m| m.internal == internal)
        .with_context(|| format!("no mapping of {internal}: {rows:?}"))?;
    Ok(row.external)
}

/// Whether a datagram from `from` (a socket on a remote) to `to` reaches `sock` inside.
fn delivered(from: &std::net::UdpSocket, to: SocketAddrV4, sock: &std::net::UdpSocket) -> Result<bool> {
    from.send_to(b"knock", to)?;
    Ok(tools::udp_recv(sock, Duration::from_millis(700))?.is_some())
}

#[test]
fn delete_and_flush_remove_flows_with_their_state_and_keep_forwards() -> Result<()> {
    let lab = Lab::new("delete")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let (a_addr, b_addr) = (sa(LAN_IP, 40000), sa(LAN_IP, 40001));
    let who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let who2 = udp_whoami(&lab.wan2, WAN2_IP, 9999)?;
    let a = udp_bind(&lab.lan, a_addr)?;
    let b = udp_bind(&lab.lan, b_addr)?;
    whoami(&a, sa(WAN_IP, 9999))?;
    whoami(&b, sa(WAN2_IP, 9999))?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["udp", "5353", "10.0.0.2:5353"])?;

    // Filters and --count: two flows and a forward; one flow per remote.
    let count = nat.ctl_ok("mappings", &["--count"])?;
    ensure!(count.trim() == "3", "mappings --count says {count:?}, expected 3");
    let to_wan2 = nat.ctl_ok("mappings", &["--remote", &WAN2_IP.to_string(), "--count"])?;
    ensure!(
        to_wan2.trim() == "1",
        "mappings --remote {WAN2_IP} --count says {to_wan2:?}"
    );
    let by_port = nat.ctl_ok("mappings", &["--internal", ":40001", "--count"])?;
    ensure!(
        by_port.trim() == "1",
        "mappings --internal :40001 --count says {by_port:?}"
    );

    let a_external = external_of(&nat, a_addr)?;
    let b_external = external_of(&nat, b_addr)?;
    drop(who);
    drop(who2);
    let wan = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let wan2 = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    ensure!(
        delivered(&wan, a_external, &a)?,
        "the remote's reply did not reach a before delete"
    );

    let before = nat.stats()?;
    let out = nat.ctl_ok("delete", &["--remote", &WAN_IP.to_string()])?;
    ensure!(
        out.starts_with("deleted 1 binding(s) with "),
        "delete --remote {WAN_IP} said {out:?}"
    );
    let rows = nat.mappings()?;
    ensure!(
        !rows.iter().any(|m| m.internal == a_addr),
        "a's flow is still listed: {rows:?}"
    );
    ensure!(
        rows.iter().any(|m| m.internal == b_addr) && rows.iter().any(|m| m.state == "static"),
        "delete took more than the matching flow: {rows:?}"
    );
    // The hole is closed: the same remote endpoint is now unsolicited; b's is still open.
    ensure!(
        !delivered(&wan, a_external, &a)?,
        "the deleted flow's remote still gets in"
    );
    ensure!(
        delivered(&wan2, b_external, &b)?,
        "the flow that was not deleted lost its hole"
    );
    // The deleted flow's next packet is a new flow.
    a.send_to(b"again", sa(WAN_IP, 9999))?;
    ensure!(
        tools::udp_recv(&wan, Duration::from_secs(2))?.is_some(),
        "a's new packet did not go out"
    );
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "new_binding")? == 1,
        "a's next packet made {} new bindings, expected 1",
        after.delta(&before, "new_binding")?
    );

    // delete without a filter is refused; flush keeps the forward, and counts stay consistent.
    let refused = vm_tests::nat::run_nat_ctl(&lab.nat, &["delete", "-i", &lab.wan_if])?;
    ensure!(
        !refused.status.success() && refused.stderr.contains("flush"),
        "delete without a filter: {} {}",
        refused.status,
        refused.stderr
    );
    let out = nat.ctl_ok("flush", &[])?;
    ensure!(out.starts_with("deleted 2 binding(s)"), "flush said {out:?}");
    let rows = nat.mappings()?;
    ensure!(
        rows.len() == 1 && rows[0].state == "static",
        "after flush only the forward should be left: {rows:?}"
    );
    let status = ops::status(&nat)?;
    ensure!(
        status["dynamic_bindings"].as_u64() == Some(0),
        "status dynamic_bindings after flush: {}",
        status["dynamic_bindings"]
    );
    let out = nat.ctl_ok("flush", &["--forwards"])?;
    ensure!(
        out.trim().ends_with("and 1 forward(s)"),
        "flush --forwards said {out:?}"
    );
    ensure!(
        nat.mappings()?.is_empty(),
        "the table is not empty after flush --forwards"
    );
    nat.stop()?;
    Ok(())
}
