//! Port mapping served by the NAT (issue 13): NAT-PMP with Debian's `natpmpc` (public address,
//! UDP and TCP mappings that a remote then reaches, in port-restricted and symmetric mode,
//! deletion, nothing answered from the WAN side), PCP with a client written here and every
//! request and response checked by `tshark`'s PCP dissector (MAP create/renew/delete/expiry,
//! PEER, ANNOUNCE, the result codes of refused requests), and the P2P case: two peers behind
//! symmetric NATs fail to hole-punch until one maps its port with PCP. Root only.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN_GW, LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::p2p::{Rendezvous, TwoSites, GW_IP, HOST_IP, NAT_A_EXT};
use vm_tests::port_mapping::{
    self as pm, attach_symmetric_with_pcp, dissector_warnings, mapped, natpmpc, natpmpc_mapped,
    natpmpc_public_address, pcp, Capture, Request,
};
use vm_tests::proc::poll;
use vm_tests::tools::{self, tcp_whoami_query, udp_bind, udp_recv, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

const UDP: u8 = 17;
const TCP: u8 = 6;
/// PCP result codes (RFC 6887 §7.4).
const SUCCESS: u8 = 0;
const UNSUPP_VERSION: u8 = 1;
const NOT_AUTHORIZED: u8 = 2;
const MALFORMED_REQUEST: u8 = 3;
const UNSUPP_OPCODE: u8 = 4;
const UNSUPP_OPTION: u8 = 5;
const MALFORMED_OPTION: u8 = 6;
const UNSUPP_PROTOCOL: u8 = 9;
const CANNOT_PROVIDE_EXTERNAL: u8 = 11;
const ADDRESS_MISMATCH: u8 = 12;
/// Bound on waiting for a mapping to disappear after its lifetime (a bound, not a figure).
const EXPIRY_BOUND: Duration = Duration::from_secs(20);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn attach(lab: &Lab, mode: &str, protocols: &str) -> Result<NatProcess> {
    NatProcess::attach(
        lab,
        &[
            "--mode",
            mode,
            "--port-mapping",
            protocols,
            "--internal-iface",
            &lab.lan_if,
        ],
    )
}

/// The row of `nat-ctl mappings` for `internal` that has no remote (a mapping's own row).
fn mapping_row(nat: &NatProcess, proto: &str, internal: SocketAddrV4) -> Result<Option<vm_tests::Mapping>> {
    Ok(nat
        .mappings()?
        .into_iter()
        .find(|m| m.proto == proto && m.internal == internal && m.remote.is_none()))
}

#[test]
fn port_mapping_natpmpc_maps_udp_and_tcp_ports_that_remotes_reach_in_port_restricted_and_symmetric_mode(
) -> Result<()> {
    let lab = Lab::new("pmnatpmp")?;
    let _udp_srv = udp_whoami(&lab.lan, LAN_IP, 4000)?;
    let _tcp_srv = tools::tcp_whoami(&lab.lan, LAN_IP, 8000)?;
    let dir = std::env::temp_dir().join(format!("pm-natpmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let capture = Capture::start(&lab.nat, &lab.lan_if, &dir.join("natpmp.pcap"))?;
    for (i, mode) in ["port-restricted", "symmetric"].iter().enumerate() {
        let nat = attach(&lab, mode, "pcp,nat-pmp")?;
        let out = natpmpc(&lab.lan, LAN_GW, &[])?;
        ensure!(
            natpmpc_public_address(&out) == Some(NAT_EXT),
            "{mode}: natpmpc's public address: {out}"
        );
        let suggested = 20_000 + i as u16 * 10;
        let out = natpmpc(
            &lab.lan,
            LAN_GW,
            &["-a", &suggested.to_string(), "4000", "udp", "60"],
        )?;
        let (udp_port, local, lifetime) =
            natpmpc_mapped(&out).with_context(|| format!("{mode}: natpmpc -a udp printed {out}"))?;
        ensure!(
            (udp_port, local, lifetime) == (suggested, 4000, 60),
            "{mode}: UDP mapping {udp_port} -> {local} for {lifetime} s, asked {suggested} -> 4000 for 60 s"
        );
        let out = natpmpc(
            &lab.lan,
            LAN_GW,
            &["-a", &(suggested + 1).to_string(), "8000", "tcp", "60"],
        )?;
        let (tcp_port, _, _) =
            natpmpc_mapped(&out).with_context(|| format!("{mode}: natpmpc -a tcp printed {out}"))?;
        ensure!(
            tcp_port == suggested + 1,
            "{mode}: TCP mapping on {tcp_port}, asked {}",
            suggested + 1
        );

        // The table shows them with their protocol as state and their remaining lifetime.
        let row = mapping_row(&nat, "udp", sa(LAN_IP, 4000))?
            .with_context(|| format!("{mode}: no udp mapping row"))?;
        ensure!(
            row.state == "nat-pmp"
                && row.external == sa(NAT_EXT, udp_port)
                && matches!(row.expires_in, Some(1..=60)),
            "{mode}: mapping row {row:?}"
        );

        // Counted in status.
        let status: serde_json::Value = serde_json::from_str(&nat.ctl_ok("status", &["--json"])?)?;
        ensure!(
            status["port_mappings"] == serde_json::json!({"pcp": 0, "nat_pmp": 2, "upnp": 0}),
            "{mode}: status port_mappings {}",
            status["port_mappings"]
        );

        // A remote that lan never talked to reaches the host through each mapped port.
        let sock = udp_bind(&lab.wan, sa(WAN_IP, 7100 + i as u16))?;
        let seen = whoami(&sock, sa(NAT_EXT, udp_port))
            .with_context(|| format!("{mode}: UDP through the mapping"))?;
        ensure!(seen == sa(WAN_IP, 7100 + i as u16), "{mode}: the host saw {seen}");
        let (seen, local) = tcp_whoami_query(&lab.wan, sa(NAT_EXT, tcp_port))
            .with_context(|| format!("{mode}: TCP through the mapping"))?;
        ensure!(
            std::net::SocketAddr::V4(seen) == local,
            "{mode}: the TCP server saw {seen}, the client is {local}"
        );

        // Deletion (lifetime 0): gone from the table and from the data path.
        natpmpc(
            &lab.lan,
            LAN_GW,
            &["-a", &udp_port.to_string(), "4000", "udp", "0"],
        )?;
        ensure!(
            mapping_row(&nat, "udp", sa(LAN_IP, 4000))?.is_none(),
            "{mode}: the deleted mapping is still listed"
        );
        let sock = udp_bind(&lab.wan, sa(WAN_IP, 7200 + i as u16))?;
        ensure!(
            whoami(&sock, sa(NAT_EXT, udp_port)).is_err(),
            "{mode}: a remote still reaches the host through the deleted mapping"
        );
        nat.stop()?;
    }
    // Every natpmpc request and every answer decodes as NAT-PMP without a flaw.
    let file = capture.finish()?;
    let dump = pm::tshark_natpmp(&file, "udp.port == 5351")?;
    let count = dump.matches("NAT Port Mapping Protocol").count();
    ensure!(count >= 16, "tshark decoded {count} NAT-PMP messages:\n{dump}");
    let warnings = dissector_warnings(&dump);
    ensure!(
        warnings.is_empty(),
        "tshark flags NAT-PMP messages: {warnings:?}\n{dump}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn port_mapping_requests_from_the_wan_side_are_not_answered() -> Result<()> {
    let lab = Lab::new("pmwan")?;
    let nat = attach(&lab, "port-restricted", "pcp,nat-pmp")?;
    // The remote routes the internal subnet through the NAT, so it can address the server's
    // internal address too (the weak host model would accept it on the external interface).
    lab.wan
        .ip(&["route", "add", "10.0.0.0/24", "via", &NAT_EXT.to_string()])?;
    let sock = udp_bind(&lab.wan, sa(WAN_IP, 7300))?;
    for server in [sa(NAT_EXT, pm::SERVER_PORT), sa(LAN_GW, pm::SERVER_PORT)] {
        let natpmp = pm::exchange(&sock, server, &[0, 0])?;
        ensure!(
            natpmp.is_none(),
            "a NAT-PMP request from the WAN to {server} was answered: {natpmp:02x?}"
        );
        let map = Request::map(WAN_IP, 1, UDP, 7300, 0, 60);
        let answer = pm::exchange(&sock, server, &map.bytes())?;
        ensure!(
            answer.is_none(),
            "a PCP MAP from the WAN to {server} was answered: {answer:02x?}"
        );
    }
    // The same requests from the LAN are answered (the server runs).
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 7300))?;
    ensure!(
        pm::exchange(&lan, sa(LAN_GW, pm::SERVER_PORT), &[0, 0])?.is_some(),
        "no answer on the LAN side"
    );
    ensure!(
        nat.mappings()?
            .iter()
            .all(|m| m.state != "pcp" && m.state != "nat-pmp"),
        "a mapping appeared"
    );
    nat.stop()
}

#[test]
fn port_mapping_pcp_map_peer_announce_and_refusals_are_well_formed_for_tsharks_dissector() -> Result<()> {
    let lab = Lab::new("pmpcp")?;
    let nat = attach(&lab, "port-restricted", "pcp")?;
    let _srv = udp_whoami(&lab.lan, LAN_IP, 5000)?;
    let dir = std::env::temp_dir().join(format!("pm-pcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let capture = Capture::start(&lab.nat, &lab.lan_if, &dir.join("pcp.pcap"))?;
    let server = sa(LAN_GW, pm::SERVER_PORT);
    // Well-formed requests from one port, deliberately bad ones from another, so the dissector
    // check can hold every well-formed message to "no warning".
    let good = udp_bind(&lab.lan, sa(LAN_IP, 6001))?;
    let bad = udp_bind(&lab.lan, sa(LAN_IP, 6002))?;
    let mut failures = Vec::new();
    let mut expect = |what: &str, r: &pm::Response, result: u8| {
        if r.result != result {
            failures.push(format!("{what}: result {} (expected {result}): {r:?}", r.result));
        }
    };

    let announce = pcp(&good, server, &Request::announce(LAN_IP))?;
    expect("ANNOUNCE", &announce, SUCCESS);

    // MAP: the suggested port when free; the remote reaches the host through it.
    let create = pcp(&good, server, &Request::map(LAN_IP, 1, UDP, 5000, 30_000, 60))?;
    expect("MAP create", &create, SUCCESS);
    ensure!(
        create.external == Some(sa(NAT_EXT, 30_000))
            && create.lifetime == 60
            && create.nonce == Some([1; 12]),
        "MAP create: {create:?}"
    );
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 7400))?;
    ensure!(
        whoami(&remote, sa(NAT_EXT, 30_000))? == sa(WAN_IP, 7400),
        "the host saw another remote"
    );
    let row = mapping_row(&nat, "udp", sa(LAN_IP, 5000))?.context("no pcp row")?;
    ensure!(
        row.state == "pcp" && matches!(row.expires_in, Some(1..=60)),
        "row {row:?}"
    );

    // It is not an operator's forward: not listed as one, and `forward del` leaves it alone.
    let forwards = vm_tests::ops::forwards_in(&lab.nat, &lab.wan_if)?;
    ensure!(
        forwards.is_empty(),
        "forward list shows the mapping: {forwards:?}"
    );
    let del = vm_tests::ops::ctl(&lab.nat, &["forward", "del", "-i", &lab.wan_if, "udp", "30000"])?;
    ensure!(
        !del.status.success(),
        "forward del removed a port mapping: {}",
        del.stdout
    );
    ensure!(
        mapping_row(&nat, "udp", sa(LAN_IP, 5000))?.is_some(),
        "forward del removed a port mapping"
    );

    // Renewal (same nonce) keeps the port and grants the new lifetime; another nonce is refused.
    let renew = pcp(&good, server, &Request::map(LAN_IP, 1, UDP, 5000, 0, 120))?;
    expect("MAP renew", &renew, SUCCESS);
    ensure!(
        renew.external == create.external && renew.lifetime == 120,
        "renewal: {renew:?}"
    );
    expect(
        "MAP, other nonce",
        &pcp(&good, server, &Request::map(LAN_IP, 2, UDP, 5000, 0, 60))?,
        NOT_AUTHORIZED,
    );
    // PREFER_FAILURE on a taken port; THIRD_PARTY; unsupported protocol.
    let prefer = Request::map(LAN_IP, 3, UDP, 5001, 30_000, 60).with_option(2, &[]);
    expect(
        "MAP PREFER_FAILURE on a taken port",
        &pcp(&good, server, &prefer)?,
        CANNOT_PROVIDE_EXTERNAL,
    );
    let third = Request::map(LAN_IP, 4, UDP, 5001, 0, 60).with_option(1, &mapped(Ipv4Addr::new(10, 0, 0, 9)));
    expect("MAP THIRD_PARTY", &pcp(&good, server, &third)?, NOT_AUTHORIZED);
    expect(
        "MAP ICMP",
        &pcp(&good, server, &Request::map(LAN_IP, 5, 1, 5001, 0, 60))?,
        UNSUPP_PROTOCOL,
    );
    // A FILTER that admits everything is accepted (TCP, so nothing clashes with the above).
    let mut filter = vec![0, 0, 0, 0];
    filter.extend_from_slice(&[0; 16]);
    let open = Request::map(LAN_IP, 6, TCP, 5002, 0, 60).with_option(3, &filter);
    expect("MAP FILTER prefix 0", &pcp(&good, server, &open)?, SUCCESS);

    // PEER for a flow the host opened: the binding the remote saw.
    let flow = udp_bind(&lab.lan, sa(LAN_IP, 5003))?;
    let _reflector = udp_whoami(&lab.wan, WAN_IP, 7401)?;
    let seen = whoami(&flow, sa(WAN_IP, 7401))?;
    let peer = pcp(
        &good,
        server,
        &Request::peer(LAN_IP, 7, UDP, 5003, sa(WAN_IP, 7401), 60),
    )?;
    expect("PEER", &peer, SUCCESS);
    ensure!(
        peer.external == Some(seen),
        "PEER says {:?}, the remote saw {seen}",
        peer.external
    );

    // Refusals, from the other port (RFC 6887 §8.3, §7.3).
    let mut v3 = Request::map(LAN_IP, 8, UDP, 5004, 0, 60);
    v3.version = 3;
    expect("version 3", &pcp(&bad, server, &v3)?, UNSUPP_VERSION);
    let mut opcode = Request::map(LAN_IP, 8, UDP, 5004, 0, 60);
    opcode.opcode = 5;
    expect("opcode 5", &pcp(&bad, server, &opcode)?, UNSUPP_OPCODE);
    let short = Request::map(LAN_IP, 8, UDP, 5004, 0, 60).bytes();
    let answer = pm::exchange(&bad, server, &short[..40])?.context("no answer to a truncated MAP")?;
    expect(
        "truncated MAP",
        &pm::parse_response(&answer).context("not a PCP answer")?,
        MALFORMED_REQUEST,
    );
    let unknown = Request::map(LAN_IP, 8, UDP, 5004, 0, 60).with_option(99, &[]);
    expect(
        "unknown mandatory option",
        &pcp(&bad, server, &unknown)?,
        UNSUPP_OPTION,
    );
    let mut narrow = vec![0, 64, 0, 0];
    narrow.extend_from_slice(&mapped(Ipv4Addr::new(192, 0, 2, 0)));
    let malformed = Request::map(LAN_IP, 8, UDP, 5004, 0, 60).with_option(3, &narrow);
    expect(
        "FILTER prefix 64 on an IPv4 address",
        &pcp(&bad, server, &malformed)?,
        MALFORMED_OPTION,
    );
    expect(
        "client address not the source",
        &pcp(
            &bad,
            server,
            &Request::map(Ipv4Addr::new(10, 0, 0, 99), 8, UDP, 5004, 0, 60),
        )?,
        ADDRESS_MISMATCH,
    );
    // None of the refused requests made a mapping.
    ensure!(
        mapping_row(&nat, "udp", sa(LAN_IP, 5004))?.is_none(),
        "a refused request made a mapping"
    );

    // Delete (lifetime 0): SUCCESS, lifetime 0, gone, and the sessions the remote's exchange
    // made on it go too (left behind they would admit that remote to the port's next binding).
    let sessions = |nat: &NatProcess| -> Result<u64> {
        let status: serde_json::Value = serde_json::from_str(&nat.ctl_ok("status", &["--json"])?)?;
        status["sessions"].as_u64().context("no sessions in status")
    };
    let before = sessions(&nat)?;
    let delete = pcp(&good, server, &Request::map(LAN_IP, 1, UDP, 5000, 0, 0))?;
    let after = sessions(&nat)?;
    ensure!(
        after + 2 <= before,
        "session entries {before} before the deletion, {after} after"
    );
    expect("MAP delete", &delete, SUCCESS);
    ensure!(delete.lifetime == 0, "delete: {delete:?}");
    ensure!(
        mapping_row(&nat, "udp", sa(LAN_IP, 5000))?.is_none(),
        "deleted mapping still listed"
    );

    // Expiry: a 2-second mapping goes by itself.
    let short_lived = pcp(&good, server, &Request::map(LAN_IP, 9, UDP, 5005, 0, 2))?;
    expect("MAP 2 s", &short_lived, SUCCESS);
    let gone = poll(EXPIRY_BOUND, Duration::from_millis(200), || {
        matches!(mapping_row(&nat, "udp", sa(LAN_IP, 5005)), Ok(None)).then_some(())
    });
    ensure!(
        gone.is_some(),
        "a 2 s mapping was still there after {EXPIRY_BOUND:?}"
    );
    ensure!(failures.is_empty(), "PCP results:\n{}", failures.join("\n"));

    let file = capture.finish()?;
    // Every response, and every well-formed request, decodes as PCP without a warning.
    let responses = pm::tshark_pcp(&file, "udp.srcport == 5351")?;
    let requests = pm::tshark_pcp(&file, "udp.srcport == 6001")?;
    let count = |dump: &str| dump.matches("Port Control Protocol").count();
    ensure!(
        count(&responses) >= 17,
        "tshark decoded {} PCP responses:\n{responses}",
        count(&responses)
    );
    ensure!(
        count(&requests) >= 11,
        "tshark decoded {} PCP requests:\n{requests}",
        count(&requests)
    );
    for (what, dump) in [("responses", &responses), ("requests", &requests)] {
        let warnings = dissector_warnings(dump);
        ensure!(
            warnings.is_empty(),
            "tshark flags the {what}: {warnings:?}\n{dump}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    nat.stop()
}

#[test]
fn port_mapping_peers_behind_two_symmetric_nats_connect_once_one_maps_its_port_with_pcp() -> Result<()> {
    let lab = TwoSites::new("pmp2p")?;
    let _rv = Rendezvous::start(&lab.rv)?;
    let nat_a = attach_symmetric_with_pcp(&lab.a)?;
    let nat_b = attach_symmetric_with_pcp(&lab.b)?;
    let session = |tag: &str| format!("{}-{tag}", std::process::id());

    // Without a mapping: hole punching fails (as in p2p.rs).
    let sa_ = udp_bind(&lab.a.host, sa(HOST_IP, 43000))?;
    let sb_ = udp_bind(&lab.b.host, sa(HOST_IP, 43005))?;
    let (pa, pb) = pm::punch_pair(&sa_, &sb_, &session("plain"))?;
    ensure!(
        pa.sent >= 10 && pb.sent >= 10 && pa.received == 0 && pb.received == 0,
        "without a mapping: A {pa:?} B {pb:?} (expected punches and nothing across)"
    );

    // A maps its port with PCP first; the rendezvous then sees the mapped endpoint, and B's
    // datagrams to it reach A, which answers whoever wrote (B's NAT maps B per remote).
    let a_sock = udp_bind(&lab.a.host, sa(HOST_IP, 43100))?;
    let mapping = pcp(
        &a_sock,
        sa(GW_IP, pm::SERVER_PORT),
        &Request::map(HOST_IP, 1, UDP, 43100, 0, 120),
    )?;
    ensure!(mapping.result == SUCCESS, "A's MAP: {mapping:?}");
    let a_external = mapping.external.context("MAP without an external endpoint")?;
    ensure!(*a_external.ip() == NAT_A_EXT, "A mapped {a_external}");
    let b_sock = udp_bind(&lab.b.host, sa(HOST_IP, 43105))?;
    let (pa, pb, a_seen_by_b) = pm::connect_via_mapping(&a_sock, &b_sock, &session("mapped"))?;
    ensure!(
        a_seen_by_b == a_external,
        "the rendezvous saw A at {a_seen_by_b}, its mapping is {a_external}"
    );
    ensure!(
        pa.success() && pb.success() && pb.strays.is_empty(),
        "with A's PCP mapping the peers did not connect: A {pa:?} B {pb:?}"
    );
    nat_a.stop()?;
    nat_b.stop()
}

#[test]
fn port_mapping_survives_a_persist_restart_with_the_lifetime_it_had_left() -> Result<()> {
    let lab = Lab::new("pmpersist")?;
    let _guard = vm_tests::ops::PersistGuard::new(&lab.nat, &lab.wan_if);
    let _srv = udp_whoami(&lab.lan, LAN_IP, 5100)?;
    let lan_if = lab.lan_if.clone();
    let args = [
        "--persist",
        "--port-mapping",
        "pcp",
        "--internal-iface",
        lan_if.as_str(),
    ];
    let mut first = NatProcess::attach(&lab, &args)?;
    let client = udp_bind(&lab.lan, sa(LAN_IP, 6100))?;
    let server = sa(LAN_GW, pm::SERVER_PORT);
    let made = pcp(&client, server, &Request::map(LAN_IP, 1, UDP, 5100, 31_000, 60))?;
    ensure!(
        made.result == SUCCESS && made.external == Some(sa(NAT_EXT, 31_000)),
        "MAP: {made:?}"
    );
    let st = first.terminate()?;
    ensure!(
        st.success(),
        "the --persist daemon exited {st}: {}",
        first.stderr()
    );

    // No daemon: the data path still forwards the mapped port.
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 7500))?;
    ensure!(
        whoami(&remote, sa(NAT_EXT, 31_000))? == sa(WAN_IP, 7500),
        "no forwarding while no daemon ran"
    );

    // The next daemon adopts the NAT and the mapping, with the lifetime it had left.
    let second = NatProcess::attach(&lab, &args)?;
    ensure!(
        second.attached_line().contains("adopted"),
        "no adoption: {}",
        second.attached_line()
    );
    let row =
        mapping_row(&second, "udp", sa(LAN_IP, 5100))?.context("the mapping is gone after the restart")?;
    ensure!(
        row.state == "pcp" && row.external == sa(NAT_EXT, 31_000) && matches!(row.expires_in, Some(1..=60)),
        "after the restart: {row:?}"
    );
    // The epoch started again (RFC 6887 §8.5), and the client renews with its nonce.
    let announce = pcp(&client, server, &Request::announce(LAN_IP))?;
    ensure!(announce.epoch < 60, "epoch {} after a restart", announce.epoch);
    let renew = pcp(&client, server, &Request::map(LAN_IP, 1, UDP, 5100, 0, 60))?;
    ensure!(
        renew.result == SUCCESS && renew.external == Some(sa(NAT_EXT, 31_000)),
        "renewal after the restart: {renew:?}"
    );
    ensure!(
        whoami(&remote, sa(NAT_EXT, 31_000))? == sa(WAN_IP, 7500),
        "no forwarding after the restart"
    );
    second.stop()?;
    let out = vm_tests::ops::ctl(&lab.nat, &["detach", &lab.wan_if])?;
    ensure!(out.status.success(), "detach: {}", out.stderr);
    Ok(())
}

/// Waits (bounded) on `sock` for an announcement to the all-hosts group that `accept` takes.
fn announcement(
    sock: &std::net::UdpSocket,
    within: Duration,
    accept: impl Fn(&[u8]) -> bool,
) -> Result<bool> {
    let deadline = std::time::Instant::now() + within;
    while let Some((data, _)) = udp_recv(
        sock,
        deadline.saturating_duration_since(std::time::Instant::now()),
    )? {
        if accept(&data) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn port_mapping_announces_the_epoch_and_a_new_external_address_and_mappings_follow_it() -> Result<()> {
    const NEW_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 253);
    let lab = Lab::new("pmannounce")?;
    // Every host is in 224.0.0.1: a socket on port 5350 hears the announcements.
    let listener = udp_bind(&lab.lan, sa(Ipv4Addr::UNSPECIFIED, pm::CLIENT_PORT))?;
    let nat = attach(&lab, "port-restricted", "pcp,nat-pmp")?;
    let pcp_announce = |d: &[u8]| d.len() >= 24 && d[..4] == [2, 0x80, 0, 0];
    let natpmp_address = |addr: Ipv4Addr| {
        move |d: &[u8]| d.len() == 12 && d[..4] == [0, 128, 0, 0] && d[8..12] == addr.octets()
    };
    ensure!(
        announcement(&listener, Duration::from_secs(5), pcp_announce)?,
        "no unsolicited PCP ANNOUNCE at start (RFC 6887 §14.1.3)"
    );
    let _srv = udp_whoami(&lab.lan, LAN_IP, 5200)?;
    let out = natpmpc(&lab.lan, LAN_GW, &["-a", "32000", "5200", "udp", "120"])?;
    ensure!(
        natpmpc_mapped(&out).map(|m| m.0) == Some(32_000),
        "natpmpc: {out}"
    );

    // Renumber the external interface as a DHCP client would.
    lab.nat
        .sysctl(&format!("net.ipv4.conf.{}.promote_secondaries", lab.wan_if), "1")?;
    lab.nat
        .ip(&["addr", "add", &format!("{NEW_EXT}/24"), "dev", &lab.wan_if])?;
    lab.nat
        .ip(&["addr", "del", &format!("{NAT_EXT}/24"), "dev", &lab.wan_if])?;
    ensure!(
        announcement(&listener, Duration::from_secs(10), natpmp_address(NEW_EXT))?,
        "no NAT-PMP announcement of the new address {NEW_EXT} (RFC 6886 §3.2.1)"
    );
    // The mapping moved with the address.
    let out = natpmpc(&lab.lan, LAN_GW, &[])?;
    ensure!(
        natpmpc_public_address(&out) == Some(NEW_EXT),
        "public address after renumbering: {out}"
    );
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 7600))?;
    ensure!(
        whoami(&remote, sa(NEW_EXT, 32_000))? == sa(WAN_IP, 7600),
        "the mapping does not answer on the new address"
    );
    let row = mapping_row(&nat, "udp", sa(LAN_IP, 5200))?.context("mapping gone after renumbering")?;
    ensure!(
        row.external == sa(NEW_EXT, 32_000) && row.state == "nat-pmp",
        "{row:?}"
    );
    nat.stop()
}

#[test]
fn port_mapping_without_internal_interfaces_is_refused_in_one_line_before_attaching() -> Result<()> {
    let lab = Lab::new("pmnoint")?;
    let out = vm_tests::ops::ctl(
        &lab.nat,
        &[
            "attach",
            &lab.wan_if,
            "--internal-iface",
            "none",
            "--port-mapping",
            "pcp,nat-pmp",
        ],
    )?;
    let line = vm_tests::ops::refused("--port-mapping with --internal-iface none", &out)?;
    ensure!(
        line.contains("--port-mapping") && line.contains("internal"),
        "refusal: {line}"
    );
    ensure!(
        !out.stdout.contains("attached "),
        "it attached first: {}",
        out.stdout
    );
    let left = vm_tests::nat::Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind: {left:?}");
    Ok(())
}

/// An external address no client or gateway counts as reserved: miniupnpd refuses to forward on
/// a documentation address such as the lab's 198.51.100.254 ("Reserved / private IP address ...:
/// Port forwarding is impossible"), and miniupnpc calls such an IGD "not connected". Used only
/// inside the lab's namespaces.
const PUBLIC_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 101, 254);
/// The external host's address on that subnet.
const PUBLIC_WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 101, 1);
/// The HTTP port both gateways serve UPnP on (nat-ctl's fixed one; miniupnpd is told it).
const UPNP_HTTP_PORT: u16 = 2869;
/// UPnP's ConflictInMappingEntry.
const CONFLICT_IN_MAPPING_ENTRY: u16 = 718;

/// Moves the lab's external link to `PUBLIC_EXT` / `PUBLIC_WAN` (same segment).
fn renumber_public(lab: &Lab) -> Result<()> {
    lab.nat
        .ip(&["addr", "add", &format!("{PUBLIC_EXT}/24"), "dev", &lab.wan_if])?;
    lab.nat
        .ip(&["addr", "del", &format!("{NAT_EXT}/24"), "dev", &lab.wan_if])?;
    lab.wan.ip(&[
        "addr",
        "add",
        &format!("{PUBLIC_WAN}/24"),
        "dev",
        vm_tests::lab::HOST_IF,
    ])?;
    Ok(())
}

/// The NAT-PMP (natpmpc) and UPnP (upnpc) steps a host behind a gateway takes, with the
/// outcomes it relies on; the same for nat-ctl and for the reference, miniupnpd. `who` names
/// the gateway in failures. Returns the findings (empty when all held).
fn client_steps(lab: &Lab, who: &str) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(format!("{who}: {what}"));
        }
    };
    let _udp = udp_whoami(&lab.lan, LAN_IP, 4000)?;
    let _udp2 = udp_whoami(&lab.lan, LAN_IP, 4100)?;
    let _tcp = tools::tcp_whoami(&lab.lan, LAN_IP, 8000)?;
    let remote_reaches = |port: u16, local: u16| -> bool {
        udp_bind(&lab.wan, sa(PUBLIC_WAN, local))
            .and_then(|s| whoami(&s, sa(PUBLIC_EXT, port)))
            .is_ok_and(|seen| seen == sa(PUBLIC_WAN, local))
    };

    // NAT-PMP: public address, a UDP mapping a remote reaches, its deletion.
    let out = natpmpc(&lab.lan, LAN_GW, &[])?;
    check(
        natpmpc_public_address(&out) == Some(PUBLIC_EXT),
        format!("natpmpc public address: {out}"),
    );
    let out = natpmpc(&lab.lan, LAN_GW, &["-a", "20100", "4100", "udp", "60"])?;
    check(
        natpmpc_mapped(&out) == Some((20_100, 4100, 60)),
        format!("natpmpc -a 20100 4100 udp 60: {out}"),
    );
    check(
        remote_reaches(20_100, 7700),
        "no remote reaches the NAT-PMP mapping".into(),
    );
    natpmpc(&lab.lan, LAN_GW, &["-a", "20100", "4100", "udp", "0"])?;
    check(
        !remote_reaches(20_100, 7701),
        "the deleted NAT-PMP mapping still forwards".into(),
    );

    // UPnP: discovery and the external address.
    let out = pm::upnpc(&lab.lan, &["-s"])?;
    check(
        out.contains("Found valid IGD"),
        format!("upnpc -s found no connected IGD: {out}"),
    );
    check(
        pm::upnpc_external_ip(&out) == Some(PUBLIC_EXT),
        format!("upnpc -s external address: {out}"),
    );
    // AddPortMapping for itself (-a) and with its own address filled in (-r).
    let out = pm::upnpc(
        &lab.lan,
        &["-e", "nat-test", "-a", "10.0.0.2", "4000", "20000", "UDP", "60"],
    )?;
    check(
        pm::upnpc_redirected(&out) == [("UDP".to_string(), sa(PUBLIC_EXT, 20_000), sa(LAN_IP, 4000))],
        format!("upnpc -a 10.0.0.2 4000 20000 UDP: {out}"),
    );
    let out = pm::upnpc(&lab.lan, &["-r", "8000", "TCP"])?;
    check(
        pm::upnpc_redirected(&out) == [("TCP".to_string(), sa(PUBLIC_EXT, 8000), sa(LAN_IP, 8000))],
        format!("upnpc -r 8000 TCP: {out}"),
    );
    // A remote that the host never talked to reaches it through both.
    check(
        remote_reaches(20_000, 7702),
        "no remote reaches the UPnP UDP mapping".into(),
    );
    let tcp = tcp_whoami_query(&lab.wan, sa(PUBLIC_EXT, 8000));
    check(
        tcp.as_ref()
            .is_ok_and(|(seen, local)| std::net::SocketAddr::V4(*seen) == *local),
        format!("TCP through the UPnP mapping: {tcp:?}"),
    );
    // Listed.
    let out = pm::upnpc(&lab.lan, &["-l"])?;
    let listed = pm::upnpc_list(&out);
    for entry in [("UDP", 20_000, sa(LAN_IP, 4000)), ("TCP", 8000, sa(LAN_IP, 8000))] {
        check(
            listed.iter().any(|(p, e, i)| (p.as_str(), *e, *i) == entry),
            format!("upnpc -l does not list {entry:?}: {out}"),
        );
    }
    // Another host's address is refused, and nothing is mapped for it.
    let out = pm::upnpc(&lab.lan, &["-a", "10.0.0.9", "4001", "20001", "UDP", "60"])?;
    check(
        pm::upnpc_error_code(&out) == Some(CONFLICT_IN_MAPPING_ENTRY),
        format!("upnpc -a for 10.0.0.9: {out}"),
    );
    let out = pm::upnpc(&lab.lan, &["-l"])?;
    check(
        !pm::upnpc_list(&out).iter().any(|(_, e, _)| *e == 20_001),
        format!("a mapping for another host is listed: {out}"),
    );
    // DeletePortMapping: gone from the list and from the data path.
    pm::upnpc(&lab.lan, &["-d", "20000", "UDP"])?;
    pm::upnpc(&lab.lan, &["-d", "8000", "TCP"])?;
    let out = pm::upnpc(&lab.lan, &["-l"])?;
    check(
        pm::upnpc_list(&out).is_empty(),
        format!("listed after deletion: {out}"),
    );
    check(
        !remote_reaches(20_000, 7703),
        "the deleted UPnP mapping still forwards".into(),
    );

    // From the external side nothing answers: neither discovery on the WAN segment nor the
    // description URL of the internal address routed through the gateway.
    let out = pm::upnpc(&lab.wan, &["-s"])?;
    check(
        pm::upnpc_external_ip(&out).is_none() && !out.contains("Found valid IGD"),
        format!("upnpc -s on the WAN side found a gateway: {out}"),
    );
    let url = format!("http://{LAN_GW}:{UPNP_HTTP_PORT}/rootDesc.xml");
    let out = pm::upnpc(&lab.wan, &["-u", &url, "-s"])?;
    check(
        pm::upnpc_external_ip(&out).is_none(),
        format!("upnpc -u {url} from the WAN side was answered: {out}"),
    );
    let wan = udp_bind(&lab.wan, sa(PUBLIC_WAN, 7704))?;
    let search = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: ssdp:all\r\n\r\n";
    for to in [sa(LAN_GW, 1900), sa(PUBLIC_EXT, 1900)] {
        check(
            pm::exchange(&wan, to, search.as_bytes())?.is_none(),
            format!("an M-SEARCH from the WAN side to {to} was answered"),
        );
    }
    Ok(failures)
}

#[test]
fn port_mapping_upnpc_and_natpmpc_get_the_same_outcomes_from_nat_ctl_as_from_miniupnpd() -> Result<()> {
    let lab = Lab::new("pmupnp")?;
    renumber_public(&lab)?;
    // The WAN host reaches the internal subnet's gateway address only through the NAT.
    lab.wan
        .ip(&["route", "add", "10.0.0.0/24", "via", &PUBLIC_EXT.to_string()])?;
    let mut failures = Vec::new();

    // nat-ctl.
    let listener = ssdp_listener(&lab)?;
    let nat = attach(&lab, "port-restricted", "nat-pmp,upnp")?;
    failures.extend(heard_alive(&listener, "nat-ctl")?);
    failures.extend(client_steps(&lab, "nat-ctl")?);
    // nat-ctl's own view of a UPnP mapping: state upnp, its lifetime, counted in status.
    let out = pm::upnpc(&lab.lan, &["-a", "10.0.0.2", "4200", "20200", "UDP", "60"])?;
    let row = mapping_row(&nat, "udp", sa(LAN_IP, 4200))?;
    if !row.as_ref().is_some_and(|row| {
        row.state == "upnp"
            && row.external == sa(PUBLIC_EXT, 20_200)
            && matches!(row.expires_in, Some(1..=60))
    }) {
        failures.push(format!("nat-ctl: mapping row {row:?} after upnpc -a: {out}"));
    }
    let status: serde_json::Value = serde_json::from_str(&nat.ctl_ok("status", &["--json"])?)?;
    if status["port_mappings"]["upnp"] != 1 {
        failures.push(format!(
            "nat-ctl: status port_mappings {}",
            status["port_mappings"]
        ));
    }
    failures.extend(hostile_http(&lab)?);
    let nat_log = nat.stderr();
    nat.stop()?;

    // The reference: miniupnpd with nftables on the same lab.
    drop(listener);
    let listener = ssdp_listener(&lab)?;
    let reference = pm::Miniupnpd::start(&lab.nat, &lab.wan_if, &lab.lan_if, UPNP_HTTP_PORT)?;
    failures.extend(heard_alive(&listener, "miniupnpd")?);
    let found = client_steps(&lab, "miniupnpd");
    let log = reference.log();
    reference.stop()?;
    failures.extend(found?);
    ensure!(
        failures.is_empty(),
        "outcomes that did not hold:\n{}\nnat-ctl's log:\n{nat_log}\nminiupnpd's log:\n{log}",
        failures.join("\n")
    );
    Ok(())
}

/// `curl` of `url` from `ns` with `extra` arguments: (HTTP status, 0 when no answer; body).
fn curl(ns: &vm_tests::netns::Netns, url: &str, extra: &[&str]) -> Result<(u16, String)> {
    let mut args = vec!["-s", "-m", "5", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = ns.run("curl", &args, Duration::from_secs(10))?;
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", out.stdout.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// nat-ctl's UPnP HTTP server against hostile or greedy clients: a SOAP body with a DTD gets
/// Invalid Args (402) and expands nothing, an oversized body 413, and once every connection
/// slot is held by an idle client the next connection is closed unanswered, until the idle
/// ones time out. Returns the findings.
fn hostile_http(lab: &Lab) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let control = format!("http://{LAN_GW}:{UPNP_HTTP_PORT}/ctl/IPConn");
    let root = format!("http://{LAN_GW}:{UPNP_HTTP_PORT}/rootDesc.xml");
    let action = "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#GetExternalIPAddress\"";
    let doctype = "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"b\">]><s:Envelope \
                   xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><u:GetExternalIPAddress \
                   xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\"/></s:Body></s:Envelope>";
    let (code, body) = curl(&lab.lan, &control, &["-H", action, "--data", doctype])?;
    if code != 500 || !body.contains("<errorCode>402</errorCode>") {
        failures.push(format!("nat-ctl: a SOAP body with a DTD got {code}: {body}"));
    }
    let big = "a".repeat(20_000);
    let (code, _) = curl(&lab.lan, &control, &["-H", action, "--data", &big])?;
    if code != 413 {
        failures.push(format!("nat-ctl: a 20 000-byte body got {code}, not 413"));
    }
    // Hold every connection slot with clients that send nothing.
    let idle: Vec<_> = (0..16)
        .map(|_| tools::tcp_connect(&lab.lan, sa(LAN_GW, UPNP_HTTP_PORT)))
        .collect::<Result<_>>()?;
    // Give the server the moment it needs to accept them (bounded: until one more is refused).
    let refused = poll(Duration::from_secs(4), Duration::from_millis(100), || {
        matches!(curl(&lab.lan, &root, &[]), Ok((0, _))).then_some(())
    });
    if refused.is_none() {
        failures.push("nat-ctl: with 16 idle connections open, another was still served".into());
    }
    // The idle ones time out and the server answers again.
    let served = poll(Duration::from_secs(20), Duration::from_millis(250), || {
        matches!(curl(&lab.lan, &root, &[]), Ok((200, _))).then_some(())
    });
    if served.is_none() {
        failures.push("nat-ctl: the server did not answer again after the idle connections".into());
    }
    drop(idle);
    Ok(failures)
}

/// A socket on the internal host in the SSDP group (239.255.255.250:1900), to hear a gateway's
/// NOTIFY ssdp:alive when it starts.
fn ssdp_listener(lab: &Lab) -> Result<std::net::UdpSocket> {
    let sock = udp_bind(&lab.lan, sa(Ipv4Addr::UNSPECIFIED, 1900))?;
    sock.join_multicast_v4(&Ipv4Addr::new(239, 255, 255, 250), &LAN_IP)?;
    Ok(sock)
}

/// Whether `sock` hears (bounded) the gateway announce its root device with NOTIFY ssdp:alive
/// (UDA 1.0 §1.1.2) and a LOCATION on its internal address (the root device, since the device
/// types' versions differ: miniupnpd announces InternetGatewayDevice:2, nat-ctl :1). Returns
/// the finding if not.
fn heard_alive(sock: &std::net::UdpSocket, who: &str) -> Result<Vec<String>> {
    let root = "NT: upnp:rootdevice\r\n";
    let location = format!("LOCATION: http://{LAN_GW}:{UPNP_HTTP_PORT}/");
    let heard = announcement(sock, Duration::from_secs(10), |d| {
        let text = String::from_utf8_lossy(d);
        text.starts_with("NOTIFY * HTTP/1.1\r\n")
            && text.contains("NTS: ssdp:alive")
            && text.contains(root)
            && text.contains(&location)
    })?;
    Ok(if heard {
        Vec::new()
    } else {
        vec![format!(
            "{who}: no NOTIFY ssdp:alive for the root device with {location}"
        )]
    })
}
