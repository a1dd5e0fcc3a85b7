//! Peer-to-peer through two NATs: two private sites behind two NAT instances,
//! a rendezvous server on the shared external segment. UDP hole punching works for every pair
//! of cone modes and fails between two symmetric NATs; TCP simultaneous open works through two
//! port-restricted NATs. Every case runs several times. Root only.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::p2p::{
    tcp_connect_from, tcp_rendezvous, udp_punch, udp_rendezvous, Punch, Rendezvous, TwoSites, HOST_IP,
    NAT_A_EXT, NAT_B_EXT,
};
use vm_tests::tools::udp_bind;

/// Every case runs this many times, with fresh ports: the outcome must not depend on timing.
const RUNS: u16 = 3;
/// The cone modes.
const CONE: [&str; 3] = ["full-cone", "restricted-cone", "port-restricted"];
/// How long a peer punches before giving up.
const PUNCH_WINDOW: Duration = Duration::from_secs(3);
/// How long a peer waits for the rendezvous server to know the other peer: a bound, not a
/// figure (the other peer may take seconds to start under emulation, in the 6.1 VM tests).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(30);

/// One UDP hole-punching attempt between host A (source port `port_a`) and host B
/// (`port_b`): both register with the rendezvous server at the same time, learn the other's
/// external endpoint, and punch. Returns what each side saw, and the endpoints learnt.
fn punch_once(
    lab: &TwoSites,
    session: &str,
    port_a: u16,
    port_b: u16,
) -> Result<((Punch, SocketAddrV4), (Punch, SocketAddrV4))> {
    let sa = udp_bind(&lab.a.host, SocketAddrV4::new(HOST_IP, port_a))?;
    let sb = udp_bind(&lab.b.host, SocketAddrV4::new(HOST_IP, port_b))?;
    let side = |sock: &std::net::UdpSocket, me: &str| -> Result<(Punch, SocketAddrV4)> {
        let peer = udp_rendezvous(sock, session, me, RENDEZVOUS_TIMEOUT)?;
        Ok((udp_punch(sock, me, peer, PUNCH_WINDOW)?, peer))
    };
    thread::scope(|s| {
        let a = s.spawn(|| side(&sa, "a"));
        let b = s.spawn(|| side(&sb, "b"));
        let a = a.join().expect("peer a panicked");
        let b = b.join().expect("peer b panicked");
        Ok((a?, b?))
    })
}

fn describe(p: &Punch) -> String {
    format!(
        "sent {}, received {}, peer heard us: {}, strays {:?}",
        p.sent, p.received, p.peer_heard_us, p.strays
    )
}

#[test]
fn udp_hole_punching_succeeds_for_every_pair_of_cone_modes() -> Result<()> {
    let lab = TwoSites::new("p2pcone")?;
    let _rv = Rendezvous::start(&lab.rv)?;
    let mut failures = Vec::new();
    let mut case = 0u16;
    for mode_a in CONE {
        for mode_b in CONE {
            let (nat_a, nat_b) = lab.attach(mode_a, mode_b)?;
            for run in 0..RUNS {
                // Fresh source ports for every attempt, so no earlier state helps.
                let port = 41000 + case * 10 + run;
                let session = format!("{}-{case}-{run}", std::process::id());
                let ((pa, peer_of_a), (pb, peer_of_b)) = punch_once(&lab, &session, port, port + 5)?;
                ensure!(
                    *peer_of_a.ip() == NAT_B_EXT && *peer_of_b.ip() == NAT_A_EXT,
                    "rendezvous told a {peer_of_a} and b {peer_of_b}: not the NATs' external addresses"
                );
                if !(pa.success() && pb.success() && pa.strays.is_empty() && pb.strays.is_empty()) {
                    failures.push(format!(
                        "A {mode_a} / B {mode_b}, run {run}: A ({describe_a}) B ({describe_b})",
                        describe_a = describe(&pa),
                        describe_b = describe(&pb)
                    ));
                }
            }
            nat_a.stop()?;
            nat_b.stop()?;
            case += 1;
        }
    }
    ensure!(
        failures.is_empty(),
        "UDP hole punching failed between cone NATs:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn udp_hole_punching_fails_between_two_symmetric_nats() -> Result<()> {
    let lab = TwoSites::new("p2psym")?;
    let _rv = Rendezvous::start(&lab.rv)?;
    let (nat_a, nat_b) = lab.attach("symmetric", "symmetric")?;
    for run in 0..RUNS {
        let before_a = nat_a.stats()?;
        let before_b = nat_b.stats()?;
        let session = format!("{}-sym-{run}", std::process::id());
        let port = 42000 + run * 10;
        let ((pa, _), (pb, _)) = punch_once(&lab, &session, port, port + 5)?;
        ensure!(
            pa.sent >= 10 && pb.sent >= 10,
            "run {run}: the peers hardly punched: A ({}) B ({})",
            describe(&pa),
            describe(&pb)
        );
        ensure!(
            pa.received == 0 && pb.received == 0 && pa.strays.is_empty() && pb.strays.is_empty(),
            "run {run}: a datagram crossed two symmetric NATs: A ({}) B ({})",
            describe(&pa),
            describe(&pb)
        );
        // The punches did reach the other NAT and were filtered there (not lost on the way).
        for (name, nat, before) in [("A", &nat_a, &before_a), ("B", &nat_b, &before_b)] {
            let after = nat.stats()?;
            ensure!(
                after.delta(before, "filtered_in")? >= 1,
                "run {run}: NAT {name} filtered nothing ({})",
                after.changes(before)
            );
        }
    }
    nat_a.stop()?;
    nat_b.stop()
}

/// One TCP simultaneous open: each host binds its port, learns the other's TCP mapping from
/// the rendezvous server, then both `connect()` to each other at the same moment (retried a
/// bounded number of times). Returns both streams and the endpoints each side connected to.
fn simultaneous_open(
    lab: &TwoSites,
    session: &str,
    port_a: u16,
    port_b: u16,
) -> Result<Vec<(std::net::TcpStream, SocketAddrV4)>> {
    const ATTEMPTS: usize = 3;
    let barrier = Barrier::new(2);
    let ok = Mutex::new([false; 2]);
    let side = |i: usize, me: &str, ns: &vm_tests::netns::Netns, port: u16| {
        let local = SocketAddrV4::new(HOST_IP, port);
        let barrier = &barrier;
        let ok = &ok;
        ns.enter(move || -> Result<(std::net::TcpStream, SocketAddrV4)> {
            let peer = tcp_rendezvous(local, session, me);
            let mut errors = Vec::new();
            for attempt in 0..ATTEMPTS {
                // Both sides start connecting together (the rendezvous answers both at once).
                barrier.wait();
                let r = match &peer {
                    Ok(peer) => tcp_connect_from(local, *peer, Duration::from_secs(6)),
                    Err(e) => Err(anyhow::anyhow!("rendezvous failed: {e:#}")),
                };
                ok.lock().unwrap()[i] = r.is_ok();
                barrier.wait();
                let both = *ok.lock().unwrap() == [true, true];
                match r {
                    Ok(s) if both => return Ok((s, *peer.as_ref().unwrap())),
                    Ok(_) => errors.push(format!(
                        "attempt {attempt}: connected, but the other side did not"
                    )),
                    Err(e) => errors.push(format!("attempt {attempt}: {e:#}")),
                }
                barrier.wait();
            }
            anyhow::bail!(
                "{me}: no connection in {ATTEMPTS} attempts: {}",
                errors.join("; ")
            )
        })
    };
    thread::scope(|s| {
        let a = s.spawn(|| side(0, "a", &lab.a.host, port_a));
        let b = s.spawn(|| side(1, "b", &lab.b.host, port_b));
        let a = a.join().expect("peer a panicked");
        let b = b.join().expect("peer b panicked");
        Ok(vec![a?, b?])
    })
}

#[test]
fn tcp_simultaneous_open_through_port_restricted_nats() -> Result<()> {
    let lab = TwoSites::new("p2ptcp")?;
    let _rv = Rendezvous::start(&lab.rv)?;
    let (nat_a, nat_b) = lab.attach("port-restricted", "port-restricted")?;
    for run in 0..RUNS {
        let session = format!("{}-tcp-{run}", std::process::id());
        let port_a = 43000 + run * 10;
        let port_b = port_a + 5;
        let streams = simultaneous_open(&lab, &session, port_a, port_b)
            .with_context(|| format!("run {run}: TCP simultaneous open through two port-restricted NATs"))?;
        let (sa, peer_of_a) = &streams[0];
        let (sb, peer_of_b) = &streams[1];
        ensure!(
            *peer_of_a.ip() == NAT_B_EXT && *peer_of_b.ip() == NAT_A_EXT,
            "run {run}: rendezvous told a {peer_of_a} and b {peer_of_b}"
        );
        // Each side sees the other's external endpoint as its peer.
        ensure!(
            sa.peer_addr()? == SocketAddr::V4(*peer_of_a) && sb.peer_addr()? == SocketAddr::V4(*peer_of_b),
            "run {run}: peers {} / {}",
            sa.peer_addr()?,
            sb.peer_addr()?
        );
        // Data flows both ways.
        for (from, to, text) in [(sa, sb, "hello from a"), (sb, sa, "hello from b")] {
            (&*from).write_all(format!("{text}\n").as_bytes())?;
            let mut line = String::new();
            BufReader::new(to)
                .read_line(&mut line)
                .with_context(|| format!("run {run}: reading {text:?}"))?;
            ensure!(line.trim() == text, "run {run}: got {line:?}, expected {text:?}");
        }
        // The NAT table shows the connection established, on the port the rendezvous saw
        // (TCP mapping is endpoint independent across connections, RFC 5382 REQ-1).
        for (name, nat, port, ext) in [("A", &nat_a, port_a, peer_of_b), ("B", &nat_b, port_b, peer_of_a)] {
            let maps = nat.mappings()?;
            ensure!(
                maps.iter().any(|m| m.proto == "tcp"
                    && m.internal == SocketAddrV4::new(HOST_IP, port)
                    && m.external == *ext
                    && m.state == "established"),
                "run {run}: NAT {name} does not list {HOST_IP}:{port} -> {ext} established: {maps:#?}"
            );
        }
    }
    nat_a.stop()?;
    nat_b.stop()
}
