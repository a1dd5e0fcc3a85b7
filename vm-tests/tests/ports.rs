//! External port allocation as configured with `--ports`: range, parity, privileged ports,
//! and what happens when the range is used up (RFC 4787 REQ-3a/REQ-4, RFC 6888 REQ-11). Root only.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Result};
use vm_tests::lab::{HOST_IF, LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::packet::{describe, Sniffer};
use vm_tests::tools::{udp_bind, udp_recv, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn external_ports_stay_in_the_configured_range_and_keep_parity() -> Result<()> {
    let lab = Lab::new("range")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20009"])?;
    ensure!(
        nat.attached_line().contains("ports=20000-20009"),
        "attached line: {}",
        nat.attached_line()
    );
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;

    let mut seen = BTreeSet::new();
    for port in [40000u16, 40001, 40002, 40003] {
        let s = udp_bind(&lab.lan, sa(LAN_IP, port))?;
        let ext = whoami(&s, sa(WAN_IP, 9999))?;
        ensure!(*ext.ip() == NAT_EXT, "{port}: source {ext}");
        ensure!(
            (20000..=20009).contains(&ext.port()),
            "internal port {port} mapped to {ext}, outside 20000-20009"
        );
        ensure!(
            ext.port() % 2 == port % 2,
            "internal port {port} mapped to {ext}: parity not kept (RFC 4787 REQ-4)"
        );
        ensure!(
            seen.insert(ext.port()),
            "external port {} handed out twice",
            ext.port()
        );
    }

    // A privileged source port maps to a privileged external port (RFC 4787 REQ-3a).
    let s = udp_bind(&lab.lan, sa(LAN_IP, 123))?;
    let ext = whoami(&s, sa(WAN_IP, 9999))?;
    ensure!(
        (1..=1023).contains(&ext.port()),
        "internal port 123 mapped to {ext}, outside 1-1023"
    );
    nat.stop()
}

#[test]
fn exhausted_range_drops_new_flows_and_keeps_existing_ones() -> Result<()> {
    let lab = Lab::new("exhaust")?;
    let nat = NatProcess::attach(&lab, &["--ports", "20000-20003"])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;

    // Four flows fill the four ports.
    let mut flows = Vec::new();
    for port in 40000u16..40004 {
        let s = udp_bind(&lab.lan, sa(LAN_IP, port))?;
        let ext = whoami(&s, sa(WAN_IP, 9999))?;
        ensure!((20000..=20003).contains(&ext.port()), "{port} mapped to {ext}");
        flows.push((s, ext));
    }

    // A fifth flow gets no port: dropped (never sent untranslated) and counted.
    let before = nat.stats()?;
    let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    let fifth = udp_bind(&lab.lan, sa(LAN_IP, 40004))?;
    fifth.send_to(b"whoami\n", sa(WAN_IP, 9999))?;
    let reply = udp_recv(&fifth, Duration::from_secs(2))?;
    ensure!(
        reply.is_none(),
        "a fifth flow got a reply with only 4 external ports: {reply:?}"
    );
    let leaked: Vec<_> = sniff
        .capture_for(Duration::from_millis(200))
        .iter()
        .filter(|f| f.ipv4().is_some_and(|ip| ip.src() == LAN_IP))
        .map(describe)
        .collect();
    ensure!(leaked.is_empty(), "packets left the NAT untranslated: {leaked:?}");
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "port_exhausted")? >= 1,
        "port_exhausted did not grow ({})",
        after.changes(&before)
    );

    // The existing flows keep their mappings (RFC 6888 REQ-11d: never evict).
    for (s, ext) in &flows {
        let again = whoami(s, sa(WAN_IP, 9999))?;
        ensure!(
            again == *ext,
            "flow from {} moved from {ext} to {again}",
            s.local_addr()?
        );
    }
    nat.stop()
}
