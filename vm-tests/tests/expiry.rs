//! Idle UDP mappings expire after the configured timeout, and not clearly before. Root only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::proc::poll;
use vm_tests::tools::{udp_bind, udp_expect, udp_recv};
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn idle_udp_mapping_expires_after_the_udp_timeout() -> Result<()> {
    let lab = Lab::new("expiry")?;
    let nat = NatProcess::attach(&lab, &["--udp-timeout", "4"])?;
    let internal = sa(LAN_IP, 40000);
    let lan = udp_bind(&lab.lan, internal)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;

    lan.send_to(b"one", sa(WAN_IP, 9999))?;
    let sent_at = Instant::now();
    let (_, ext) = udp_recv(&remote, Duration::from_secs(3))?.context("remote got nothing")?;
    let SocketAddr::V4(ext) = ext else {
        anyhow::bail!("IPv6 source {ext}")
    };
    ensure!(*ext.ip() == NAT_EXT, "remote saw {ext}");

    // Clearly before the timeout (about 1 s after the outbound datagram): the reply arrives
    // and the mapping is listed.
    thread::sleep(Duration::from_secs(1).saturating_sub(sent_at.elapsed()));
    remote.send_to(b"early reply", ext)?;
    ensure!(
        udp_expect(&lan, b"early reply", Duration::from_secs(1))?.is_some(),
        "a reply {:?} after the outbound datagram did not reach lan (--udp-timeout 4)",
        sent_at.elapsed()
    );
    let listed = nat.mappings()?;
    ensure!(
        listed
            .iter()
            .any(|m| m.proto == "udp" && m.internal == internal && m.external == ext),
        "mapping {internal} -> {ext} not listed {:?} after the outbound datagram: {listed:#?}",
        sent_at.elapsed()
    );

    // After silence, the mapping goes away (generous bound: 15 s of polling).
    let gone = poll(Duration::from_secs(15), Duration::from_millis(500), || {
        let maps = nat.mappings().ok()?;
        (!maps.iter().any(|m| m.proto == "udp" && m.internal == internal)).then_some(())
    });
    ensure!(
        gone.is_some(),
        "mapping of {internal} still listed {:?} after the last packet (--udp-timeout 4): {:#?}",
        sent_at.elapsed(),
        nat.mappings()?
    );

    // And the remote can no longer reach lan through it.
    remote.send_to(b"too late", ext)?;
    ensure!(
        udp_expect(&lan, b"too late", Duration::from_secs(2))?.is_none(),
        "a datagram to the expired mapping {ext} still reached lan"
    );
    nat.stop()
}

#[test]
fn outbound_traffic_keeps_a_udp_mapping_alive() -> Result<()> {
    let lab = Lab::new("refresh")?;
    let nat = NatProcess::attach(&lab, &["--udp-timeout", "4"])?;
    let internal = sa(LAN_IP, 40000);
    let lan = udp_bind(&lab.lan, internal)?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;

    // One outbound datagram a second for 10 s: more than twice the timeout, but never more
    // than a quarter of it idle (RFC 4787 REQ-6: outbound packets refresh the mapping).
    let mut ext = None;
    for i in 0..10 {
        let tick = Instant::now();
        lan.send_to(format!("keepalive {i}").as_bytes(), sa(WAN_IP, 9999))?;
        let (_, from) =
            udp_recv(&remote, Duration::from_secs(2))?.with_context(|| format!("keepalive {i} lost"))?;
        let SocketAddr::V4(from) = from else {
            anyhow::bail!("IPv6 source {from}")
        };
        if let Some(e) = ext {
            ensure!(from == e, "mapping changed from {e} to {from} at keepalive {i}");
        }
        ext = Some(from);
        thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    let ext = ext.unwrap();
    remote.send_to(b"still there?", ext)?;
    ensure!(
        udp_expect(&lan, b"still there?", Duration::from_secs(2))?.is_some(),
        "after 10 s of outbound keepalives (timeout 4 s), the remote can no longer reach lan"
    );
    ensure!(
        nat.mappings()?
            .iter()
            .any(|m| m.proto == "udp" && m.internal == internal && m.external == ext),
        "the refreshed mapping is not listed"
    );
    nat.stop()
}
