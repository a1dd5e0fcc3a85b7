//! The four NAT types and switching between them at run time: each mode
//! as three independent STUN clients classify it after `nat-ctl mode`, a busy TCP connection
//! across every switch while filtering changes at once, bad switches refused, and symmetric
//! mode's per-remote ports. Root only.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vm_tests::classify::{natdiscovery, pystun3, vovida};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN2_IP, WAN_IP, WAN_IP2};
use vm_tests::nat::run_nat_ctl;
use vm_tests::proc::poll;
use vm_tests::tools::{self, udp_bind, udp_recv, Turnserver};
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// How long a test waits for a datagram that must not arrive.
const QUIET: Duration = Duration::from_millis(1500);

/// The mode `nat-ctl status --json` reports.
fn status_mode(nat: &NatProcess) -> Result<String> {
    let out = nat.ctl_ok("status", &["--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))?;
    v["mode"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no mode in status: {out}"))
}

/// Sends one datagram from `lan` to `remote` and returns the source the remote saw.
fn open_mapping(lan: &UdpSocket, remote: &UdpSocket) -> Result<SocketAddrV4> {
    let to = remote.local_addr()?;
    lan.send_to(b"open", to)?;
    let (_, from) = udp_recv(remote, Duration::from_secs(5))?
        .with_context(|| format!("{to} got nothing from {}", lan.local_addr().unwrap()))?;
    match from {
        SocketAddr::V4(a) => Ok(a),
        a => bail!("IPv6 source {a}"),
    }
}

/// Sends `tag`-marked datagrams from each of `senders` to `ext` and returns, per sender,
/// whether it reached `lan` (collected over a quiet period). A datagram that arrives must
/// carry its sender's address as source.
fn probe(lan: &UdpSocket, ext: SocketAddrV4, senders: &[&UdpSocket], tag: &str) -> Result<Vec<bool>> {
    for (i, s) in senders.iter().enumerate() {
        s.send_to(format!("{tag}-{i}").as_bytes(), ext)?;
    }
    let mut got = vec![false; senders.len()];
    let deadline = Instant::now() + QUIET;
    while let Some((data, from)) = udp_recv(lan, deadline.saturating_duration_since(Instant::now()))? {
        let text = String::from_utf8_lossy(&data).to_string();
        for (i, s) in senders.iter().enumerate() {
            if text == format!("{tag}-{i}") {
                ensure!(
                    from == s.local_addr()?,
                    "{text} arrived from {from}, sent from {}",
                    s.local_addr()?
                );
                got[i] = true;
            }
        }
    }
    Ok(got)
}

#[test]
fn three_stun_clients_classify_each_mode_after_a_switch_at_run_time() -> Result<()> {
    // RFC 4787 REQ-8a: switch the behaviour and re-run the classifiers; the output must follow.
    // One NAT, switched with `nat-ctl mode`; every client run uses fresh source ports.
    let lab = Lab::new("stun3")?;
    let _turn = Turnserver::start(&lab.wan, WAN_IP, WAN_IP2, lab.names.ns("turn").as_str())?;
    let nat = NatProcess::attach(&lab, &[])?;
    // (mode, natdiscovery mapping, natdiscovery filtering, Vovida prefix, pystun3)
    let cases = [
        (
            "full-cone",
            "NAT with Endpoint Independent Mapping!",
            "NAT with Endpoint Independent Filtering!",
            "Independent Mapping, Independent Filter",
            "Full Cone",
        ),
        (
            "restricted-cone",
            "NAT with Endpoint Independent Mapping!",
            "NAT with Address Dependent Filtering!",
            "Independent Mapping, Address Dependent Filter",
            "Restric NAT",
        ),
        (
            "symmetric",
            "NAT with Address and Port Dependent Mapping!",
            "NAT with Address and Port Dependent Filtering!",
            "Dependent Mapping",
            "Symmetric NAT",
        ),
        (
            "port-restricted",
            "NAT with Endpoint Independent Mapping!",
            "NAT with Address and Port Dependent Filtering!",
            "Independent Mapping, Port Dependent Filter",
            "Restric Port NAT",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (mode, want_map, want_filt, want_vovida, want_pystun)) in cases.iter().enumerate() {
        nat.ctl_ok("mode", &[mode])?;
        ensure!(status_mode(&nat)? == *mode, "status does not report {mode}");
        // The three clients run at once, each from its own fresh ports (natdiscovery: a
        // kernel-chosen port; Vovida: p and p + 1; pystun3: q).
        let vovida_port = 21000 + 10 * i as u16;
        let pystun_port = 22000 + 10 * i as u16;
        let (nd, vo, py) = thread::scope(|s| {
            let nd = s.spawn(|| natdiscovery(&lab.lan, LAN_IP, WAN_IP));
            let vo = s.spawn(|| vovida(&lab.lan, WAN_IP, vovida_port));
            let py = s.spawn(|| pystun3(&lab.lan, WAN_IP, LAN_IP, pystun_port));
            (
                nd.join().expect("natdiscovery thread"),
                vo.join().expect("vovida thread"),
                py.join().expect("pystun3 thread"),
            )
        });
        let (map, filt) = nd?;
        if map.result != *want_map || filt.result != *want_filt {
            failures.push(format!(
                "{mode}: turnutils_natdiscovery says {:?} / {:?}, expected {want_map:?} / {want_filt:?}\n{}",
                map.result, filt.result, map.output
            ));
        }
        let vo = vo?;
        if !vo.result.starts_with(want_vovida) {
            failures.push(format!(
                "{mode}: Vovida stun says {:?}, expected {want_vovida:?}...\n{}",
                vo.result, vo.output
            ));
        }
        let py = py?;
        if py.result != *want_pystun {
            failures.push(format!(
                "{mode}: pystun3 says {:?}, expected {want_pystun:?}\n{}",
                py.result, py.output
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "STUN classification after `nat-ctl mode` does not match:\n{}",
        failures.join("\n")
    );
    nat.stop()
}

/// A TCP connection that echoes a continuous stream while the test does other things: a
/// writer thread sends a known byte stream in small chunks, a reader thread checks every byte
/// that comes back.
struct BusyConnection<'scope> {
    stop: &'scope AtomicBool,
    echoed: &'scope AtomicUsize,
    writer: thread::ScopedJoinHandle<'scope, Result<usize>>,
    reader: thread::ScopedJoinHandle<'scope, Result<usize>>,
}

impl<'scope> BusyConnection<'scope> {
    fn start<'env>(
        s: &'scope thread::Scope<'scope, 'env>,
        stream: std::net::TcpStream,
        stop: &'scope AtomicBool,
        echoed: &'scope AtomicUsize,
    ) -> Result<BusyConnection<'scope>> {
        const LEN: usize = 1 << 20;
        const CHUNK: usize = 4096;
        // Bounded: the writer gives up after this long even if never told to stop.
        const MAX_RUN: Duration = Duration::from_secs(120);
        let data = tools::pattern(LEN, 0xb05e);
        let expected = data.clone();
        let mut w = stream.try_clone()?;
        let mut r = stream;
        let writer = s.spawn(move || -> Result<usize> {
            let started = Instant::now();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                let at = sent % LEN;
                w.write_all(&data[at..at + CHUNK]).context("TCP write")?;
                sent += CHUNK;
                thread::sleep(Duration::from_millis(5));
            }
            w.shutdown(Shutdown::Write)?;
            Ok(sent)
        });
        let reader = s.spawn(move || -> Result<usize> {
            let mut got = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = r.read(&mut buf).context("TCP read")?;
                if n == 0 {
                    return Ok(got);
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    ensure!(
                        *b == expected[(got + k) % LEN],
                        "echoed byte {} differs from what was sent",
                        got + k
                    );
                }
                got += n;
                echoed.store(got, Ordering::Relaxed);
            }
        });
        Ok(BusyConnection {
            stop,
            echoed,
            writer,
            reader,
        })
    }

    /// Waits (bounded) until more bytes came back than `since`.
    fn wait_progress(&self, what: &str) -> Result<()> {
        let since = self.echoed.load(Ordering::Relaxed);
        poll(Duration::from_secs(10), Duration::from_millis(20), || {
            (self.echoed.load(Ordering::Relaxed) > since + 16384).then_some(())
        })
        .with_context(|| format!("the TCP connection stopped carrying data {what} (stuck at {since} bytes)"))
    }

    /// Stops writing, and returns (sent, echoed) once the echo ended.
    fn finish(self) -> Result<(usize, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.writer.join().expect("writer panicked")?;
        let got = self.reader.join().expect("reader panicked")?;
        Ok((sent, got))
    }
}

#[test]
fn mode_switches_keep_a_busy_tcp_connection_and_change_filtering_at_once() -> Result<()> {
    let lab = Lab::new("swbusy")?;
    let nat = NatProcess::attach(&lab, &["--mode", "port-restricted"])?;
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let stream = tools::tcp_connect(&lab.lan, sa(WAN_IP, 5001))?;
    let SocketAddr::V4(tcp_local) = stream.local_addr()? else {
        bail!("IPv6 socket")
    };

    // A UDP binding towards wan 198.51.100.1:9999, and the probe senders: the remote itself,
    // the same address from another port, and another host.
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let other_port = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let other_host = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    let ext = open_mapping(&lan, &remote)?;
    ensure!(*ext.ip() == NAT_EXT, "remote saw {ext}");
    let senders = [&remote, &other_port, &other_host];

    // (mode, [remote, same address other port, other host] admitted)
    let steps: [(&str, [bool; 3]); 5] = [
        ("full-cone", [true, true, true]),
        ("restricted-cone", [true, true, false]),
        ("symmetric", [true, false, false]),
        ("port-restricted", [true, false, false]),
        ("full-cone", [true, true, true]),
    ];
    let stop = AtomicBool::new(false);
    let echoed = AtomicUsize::new(0);
    let mut failures = Vec::new();
    let (sent, got) = thread::scope(|s| -> Result<(usize, usize)> {
        let busy = BusyConnection::start(s, stream, &stop, &echoed)?;
        busy.wait_progress("before any switch")?;
        let initial = probe(&lan, ext, &senders, "initial")?;
        if initial != [true, false, false] {
            failures.push(format!("port-restricted before any switch: admitted {initial:?}"));
        }
        for (i, (mode, want)) in steps.iter().enumerate() {
            let out = nat.ctl_ok("mode", &[mode])?;
            ensure!(out.contains(mode), "`nat-ctl mode {mode}` printed {out:?}");
            // Filtering follows at once: the very next datagrams are judged by the new mode.
            let got = probe(&lan, ext, &senders, &format!("step{i}"))?;
            if got != *want {
                failures.push(format!(
                    "after switching to {mode}: [remote, other port, other host] admitted {got:?}, expected {want:?}"
                ));
            }
            let mode_now = status_mode(&nat)?;
            if mode_now != *mode {
                failures.push(format!("after switching to {mode}, status says {mode_now}"));
            }
            busy.wait_progress(&format!("after switching to {mode}"))?;
        }
        busy.finish()
    })?;
    ensure!(
        sent > 0 && got == sent,
        "the TCP connection echoed {got} of {sent} bytes across the switches"
    );
    // The TCP binding was never replaced.
    let maps = nat.mappings()?;
    ensure!(
        maps.iter().any(|m| m.proto == "tcp" && m.internal == tcp_local),
        "the TCP binding of {tcp_local} is gone: {maps:#?}"
    );
    ensure!(
        failures.is_empty(),
        "filtering after `nat-ctl mode`:\n{}",
        failures.join("\n")
    );
    nat.stop()
}

/// (proto, internal, external) of every row: what a switch must not change.
fn binding_set(nat: &NatProcess) -> Result<BTreeSet<String>> {
    Ok(nat
        .mappings()?
        .iter()
        .map(|m| format!("{} {} {}", m.proto, m.internal, m.external))
        .collect())
}

#[test]
fn switching_to_the_current_or_an_unknown_mode_fails_and_changes_nothing() -> Result<()> {
    let lab = Lab::new("swbad")?;
    let nat = NatProcess::attach(&lab, &["--mode", "restricted-cone"])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let other_port = udp_bind(&lab.wan, sa(WAN_IP, 9998))?;
    let other_host = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    let ext = open_mapping(&lan, &remote)?;
    let senders = [&remote, &other_port, &other_host];
    let bindings = binding_set(&nat)?;
    ensure!(!bindings.is_empty(), "no binding listed");

    let iface = nat.iface().to_string();
    let cases: [(&str, &[&str], &[&str]); 4] = [
        (
            "the mode already set",
            &["restricted-cone"],
            &["already", "restricted-cone"],
        ),
        // clap lists the modes, and suggests the nearest one for a typo.
        ("an unknown mode", &["cone"], &["invalid value", "full-cone"]),
        (
            "a misspelt mode",
            &["port_restricted"],
            &["invalid value", "similar value exists: 'port-restricted'"],
        ),
        ("an empty mode", &[""], &["a value is required", "symmetric"]),
    ];
    let mut failures = Vec::new();
    for (i, (what, args, words)) in cases.iter().enumerate() {
        let mut full = vec!["mode", "-i", &iface];
        full.extend_from_slice(args);
        let out = run_nat_ctl(&lab.nat, &full)?;
        if let Err(e) = vm_tests::ops::refused(&format!("{what}: `nat-ctl {}`", full.join(" ")), &out) {
            failures.push(format!("{e:#}"));
        }
        for w in words.iter() {
            if !out.stderr.contains(w) {
                failures.push(format!(
                    "{what}: the message does not mention {w:?}: {}",
                    out.stderr.trim()
                ));
            }
        }
        // Nothing changed: the mode, the bindings, the filtering.
        let mode = status_mode(&nat)?;
        if mode != "restricted-cone" {
            failures.push(format!("{what}: the mode is now {mode}"));
        }
        let now = binding_set(&nat)?;
        if now != bindings {
            failures.push(format!("{what}: bindings changed from {bindings:?} to {now:?}"));
        }
        let admitted = probe(&lan, ext, &senders, &format!("case{i}"))?;
        if admitted != [true, true, false] {
            failures.push(format!(
                "{what}: restricted-cone filtering changed: [remote, other port, other host] admitted {admitted:?}"
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "bad `nat-ctl mode` calls:\n{}",
        failures.join("\n")
    );
    nat.stop()
}

#[test]
fn symmetric_gives_each_remote_its_own_port_and_admits_only_that_remote() -> Result<()> {
    let lab = Lab::new("symm")?;
    let nat = NatProcess::attach(&lab, &["--mode", "symmetric"])?;
    let internal = sa(LAN_IP, 40000);
    let lan = udp_bind(&lab.lan, internal)?;
    // Three remotes: two ports of one address, and another host.
    let remotes = [
        udp_bind(&lab.wan, sa(WAN_IP, 9999))?,
        udp_bind(&lab.wan, sa(WAN_IP, 9998))?,
        udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?,
    ];
    let mut exts = Vec::new();
    for r in &remotes {
        let ext = open_mapping(&lan, r)?;
        ensure!(*ext.ip() == NAT_EXT, "{} saw {ext}", r.local_addr()?);
        exts.push(ext);
    }
    let ports: BTreeSet<u16> = exts.iter().map(|e| e.port()).collect();
    ensure!(
        ports.len() == 3,
        "symmetric NAT: one internal endpoint towards three remotes got external endpoints {exts:?}, expected three different ports"
    );
    // Stable: the same remote again gets the same port.
    for (r, ext) in remotes.iter().zip(&exts) {
        let again = open_mapping(&lan, r)?;
        ensure!(
            again == *ext,
            "towards {} the mapping moved from {ext} to {again}",
            r.local_addr()?
        );
    }
    // Listed: one row per remote, with that remote.
    let maps = nat.mappings()?;
    for (r, ext) in remotes.iter().zip(&exts) {
        let SocketAddr::V4(raddr) = r.local_addr()? else {
            bail!("IPv6 remote")
        };
        ensure!(
            maps.iter().any(|m| m.proto == "udp"
                && m.internal == internal
                && m.external == *ext
                && m.remote == Some(raddr)),
            "no row {internal} -> {ext} with remote {raddr}: {maps:#?}"
        );
    }

    // Each external port admits exactly the remote it was made for.
    let before = nat.stats()?;
    let senders: Vec<&UdpSocket> = remotes.iter().collect();
    let mut failures = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let got = probe(&lan, *ext, &senders, &format!("to{i}"))?;
        let want: Vec<bool> = (0..3).map(|j| j == i).collect();
        if got != want {
            failures.push(format!(
                "external {ext} (made for {}): admitted {got:?} from [wan:9999, wan:9998, wan2:9999], expected {want:?}",
                remotes[i].local_addr()?
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "symmetric filtering:\n{}",
        failures.join("\n")
    );
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "filtered_in")? >= 6,
        "filtered_in grew by less than the 6 rejected probes ({})",
        after.changes(&before)
    );
    nat.stop()
}

#[test]
fn bindings_survive_switches_between_cone_and_symmetric_as_documented() -> Result<()> {
    // README: cone -> symmetric keeps an endpoint-independent binding for the remotes it
    // already talked to, new remotes get new ports; symmetric -> cone keeps each per-remote
    // binding serving its flow.
    let lab = Lab::new("swkeep")?;
    let nat = NatProcess::attach(&lab, &["--mode", "port-restricted"])?;
    let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let r1 = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
    let r2 = udp_bind(&lab.wan2, sa(WAN2_IP, 9999))?;
    let stranger = udp_bind(&lab.wan, sa(WAN_IP2, 9999))?;
    let x = open_mapping(&lan, &r1)?;

    nat.ctl_ok("mode", &["symmetric"])?;
    let again = open_mapping(&lan, &r1)?;
    ensure!(
        again == x,
        "after the switch to symmetric, the flow to r1 moved from {x} to {again}"
    );
    let y = open_mapping(&lan, &r2)?;
    ensure!(
        y.port() != x.port(),
        "symmetric: a new remote got the existing endpoint-independent binding {x}"
    );
    let got = probe(&lan, x, &[&r1, &r2, &stranger], "sym-x")?;
    ensure!(
        got == [true, false, false],
        "symmetric: {x} admitted {got:?} from [r1, r2, stranger]"
    );
    let got = probe(&lan, y, &[&r1, &r2, &stranger], "sym-y")?;
    ensure!(
        got == [false, true, false],
        "symmetric: {y} admitted {got:?} from [r1, r2, stranger]"
    );

    nat.ctl_ok("mode", &["full-cone"])?;
    let to_r1 = open_mapping(&lan, &r1)?;
    let to_r2 = open_mapping(&lan, &r2)?;
    ensure!(
        to_r1 == x && to_r2 == y,
        "after the switch to full-cone, the flows moved: r1 {x} -> {to_r1}, r2 {y} -> {to_r2}"
    );
    // Full-cone filtering applies to the endpoint-independent binding at once.
    let got = probe(&lan, x, &[&r1, &r2, &stranger], "cone-x")?;
    ensure!(
        got == [true, true, true],
        "full-cone: {x} admitted {got:?} from [r1, r2, stranger]"
    );
    nat.stop()
}
