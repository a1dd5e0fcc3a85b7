//! ICMP errors about translated flows reach the internal host with the embedded header
//! restored (RFC 5508 REQ-4, RFC 4787 REQ-12a/12b). Root only.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{FAR_IP, HOST_IF, LAN_IP, RTR_IP, WAN_IP};
use vm_tests::packet::{self, Sniffer, PROTO_ICMP};
use vm_tests::tools::{self, udp_bind, udp_expect, udp_recv};
use vm_tests::{Lab, LabOptions, NatProcess};

/// External port range that excludes every internal port and ping identifier used here.
const PORTS: &str = "20000-20099";

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn traceroute_and_ping_see_time_exceeded_from_a_router_beyond_the_nat() -> Result<()> {
    let lab = Lab::with(
        "trace",
        LabOptions {
            rtr: true,
            ..Default::default()
        },
    )?;
    // A port range the internal ports and ping identifiers are not in, so the NAT must
    // restore them in the embedded headers (not merely keep them).
    let nat = NatProcess::attach(&lab, &["--ports", PORTS])?;

    // UDP traceroute: hop 2 is the router beyond the NAT, hop 3 the far host (port unreachable).
    let out = lab.lan.run(
        "traceroute",
        &["-n", "-U", "-q", "1", "-w", "3", "-m", "5", &FAR_IP.to_string()],
        Duration::from_secs(60),
    )?;
    let hops: Vec<(u32, String)> = out
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_string()))
        })
        .collect();
    ensure!(
        hops.iter().any(|(n, a)| *n == 2 && *a == RTR_IP.to_string()),
        "traceroute -U does not list the router {RTR_IP} as hop 2:\n{}{}",
        out.stdout,
        out.stderr
    );
    ensure!(
        hops.iter().any(|(_, a)| *a == FAR_IP.to_string()),
        "traceroute -U never reached {FAR_IP} (its port unreachable did not come back):\n{}",
        out.stdout
    );

    // ICMP echo with a TTL that expires at the router: the time exceeded carries the echo
    // request, whose identifier the NAT must restore for ping to match it.
    let out = tools::ping(&lab.lan, FAR_IP, 1, &["-t", "2"])?;
    let want = format!("From {RTR_IP} icmp_seq=1 Time to live exceeded");
    ensure!(
        out.stdout.contains(&want),
        "ping -t 2 did not print {want:?}:\n{}{}",
        out.stdout,
        out.stderr
    );

    // And with enough TTL the far host answers.
    let out = tools::ping(&lab.lan, FAR_IP, 2, &[])?;
    ensure!(
        tools::ping_received(&out) == 2,
        "ping to the far host:\n{}",
        out.stdout
    );
    nat.stop()
}

#[test]
fn port_unreachable_reaches_lan_with_the_inner_header_restored() -> Result<()> {
    let lab = Lab::new("unreach")?;
    let nat = NatProcess::attach(&lab, &["--ports", PORTS])?;
    let before = nat.stats()?;

    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    // Nothing listens on wan:7, so wan answers with ICMP port unreachable.
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 41000))?;
    sock.connect(sa(WAN_IP, 7))?;
    sock.send(b"anyone there?")?;
    match udp_recv(&sock, Duration::from_secs(5)) {
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(|e| e.kind()) == Some(ErrorKind::ConnectionRefused) => {
        }
        Err(e) => bail!("expected ECONNREFUSED on the connected socket, got error {e:#}"),
        Ok(r) => bail!("expected ECONNREFUSED on the connected socket, got {r:?}"),
    }

    let frames = sniff.capture(Duration::from_secs(2), |f| {
        f.ipv4()
            .and_then(|ip| ip.icmp().map(|i| i.kind() == 3))
            .unwrap_or(false)
    });
    let errors: Vec<_> = frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| ip.proto() == PROTO_ICMP && ip.icmp().is_some_and(|i| i.is_error()))
        .collect();
    let ip = errors.first().context("lan captured no ICMP error")?;
    let icmp = ip.icmp().unwrap();
    ensure!(
        (icmp.kind(), icmp.code()) == (3, 3),
        "ICMP {}/{} instead of 3/3",
        icmp.kind(),
        icmp.code()
    );
    ensure!(
        ip.src() == WAN_IP,
        "ICMP error from {}, expected {WAN_IP}",
        ip.src()
    );
    packet::check_icmp_error(ip, LAN_IP, LAN_IP, WAN_IP, Some((41000, 7)))
        .context("ICMP port unreachable as received by lan")?;

    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "icmp_error_in")? >= 1,
        "icmp_error_in did not grow"
    );

    // The error did not tear the mapping down (RFC 4787 REQ-12): once wan listens on 7, its
    // datagram to the mapping still reaches lan.
    let ext = nat
        .mappings()?
        .into_iter()
        .find(|m| m.proto == "udp" && m.internal == sa(LAN_IP, 41000))
        .context("the mapping of 10.0.0.2:41000 is gone after an ICMP error")?
        .external;
    let server = udp_bind(&lab.wan, sa(WAN_IP, 7))?;
    server.send_to(b"late answer", ext)?;
    let from = udp_expect(&sock, b"late answer", Duration::from_secs(5))?
        .context("after the ICMP error, a datagram from wan:7 no longer reaches lan")?;
    ensure!(from == SocketAddr::V4(sa(WAN_IP, 7)), "arrived from {from}");
    nat.stop()
}
