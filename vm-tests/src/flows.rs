//! Many flows at once: a fast UDP "whoami" reflector, and client processes that open many UDP
//! flows in one burst (several processes started together, so new bindings are created
//! concurrently on every CPU), each flow learning the external endpoint it got.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::proc::Proc;
use crate::tools::wait_listening;

/// A UDP reflector that answers every datagram with the sender's `ip:port`, in one process
/// (no fork per datagram, so bursts of hundreds of flows are answered at once).
const REFLECTOR_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, addr = s.recvfrom(65536)
    s.sendto(('%s:%d' % addr).encode(), addr)
"#;

/// Starts the reflector on `ip:port` in `ns`; ended by pid when the returned `Proc` drops.
pub fn reflector(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<Proc> {
    let p = Proc::spawn(
        &format!("udp reflector {ip}:{port}"),
        ns.cmd(
            "/usr/bin/python3",
            &["-c", REFLECTOR_PY, &ip.to_string(), &port.to_string()],
        ),
    )?;
    wait_listening(ns, "udp", port)?;
    Ok(p)
}

/// Binds `count` UDP sockets on `local_ip` from `first_port` on, waits until the wall-clock
/// time `start_at`, sends one datagram from each to the reflector, and retries (5 rounds,
/// 1 s each) the ones without an answer. Prints a JSON object: local port -> `ip:port` seen.
const BURST_PY: &str = r#"
import json, select, socket, sys, time
lip, sip, sport = sys.argv[1], sys.argv[2], int(sys.argv[3])
first, count, start_at = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
socks = []
for p in range(first, first + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((lip, p))
    s.setblocking(False)
    socks.append(s)
while time.time() < start_at:
    time.sleep(0.001)
seen = {}
for _ in range(5):
    for s in socks:
        if s.getsockname()[1] not in seen:
            s.sendto(b'whoami', (sip, sport))
    deadline = time.time() + 1.0
    while time.time() < deadline and len(seen) < count:
        ready, _, _ = select.select(socks, [], [], 0.05)
        for s in ready:
            try:
                data, addr = s.recvfrom(2048)
            except BlockingIOError:
                continue
            if addr == (sip, sport):
                seen[s.getsockname()[1]] = data.decode().strip()
    if len(seen) == count:
        break
print(json.dumps(seen))
"#;

/// One burst: `count` flows from `local_ip:first_port..` in `ns`.
#[derive(Clone, Debug)]
pub struct Burst<'a> {
    /// Where the client runs.
    pub ns: &'a Netns,
    /// Its source address.
    pub local_ip: Ipv4Addr,
    /// First source port.
    pub first_port: u16,
    /// Number of flows (consecutive source ports).
    pub count: u16,
}

/// Runs every burst in its own process, all starting their sends at the same moment, against
/// the reflector at `server`. Returns, per internal endpoint, the external endpoint the
/// reflector saw; an endpoint missing from the result never got an answer.
pub fn concurrent_bursts(
    bursts: &[Burst<'_>],
    server: SocketAddrV4,
) -> Result<BTreeMap<SocketAddrV4, SocketAddrV4>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    // Time for every process to start and bind before the common start.
    let start_at = format!("{:.3}", now + 1.5);
    let mut procs = Vec::new();
    for b in bursts {
        let p = Proc::spawn(
            &format!("udp burst from {}:{}+{}", b.local_ip, b.first_port, b.count),
            b.ns.cmd(
                "/usr/bin/python3",
                &[
                    "-c",
                    BURST_PY,
                    &b.local_ip.to_string(),
                    &server.ip().to_string(),
                    &server.port().to_string(),
                    &b.first_port.to_string(),
                    &b.count.to_string(),
                    &start_at,
                ],
            ),
        )?;
        procs.push((b, p));
    }
    let mut seen = BTreeMap::new();
    for (b, p) in procs {
        let name = p.name().to_string();
        let out = p.finish(Duration::from_secs(30))?;
        if !out.status.success() {
            bail!("{name} failed ({}): {}", out.status, out.stderr.trim());
        }
        let v: BTreeMap<String, String> = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("{name} printed {:?}", out.stdout))?;
        for (port, ext) in v {
            let port: u16 = port.parse().with_context(|| format!("{name}: port {port:?}"))?;
            let ext: SocketAddrV4 = ext.parse().with_context(|| format!("{name}: endpoint {ext:?}"))?;
            seen.insert(SocketAddrV4::new(b.local_ip, port), ext);
        }
    }
    Ok(seen)
}

/// The internal endpoints of `bursts` that are missing from `seen` (got no answer).
pub fn unanswered(bursts: &[Burst<'_>], seen: &BTreeMap<SocketAddrV4, SocketAddrV4>) -> Vec<SocketAddrV4> {
    bursts
        .iter()
        .flat_map(|b| (0..b.count).map(move |i| SocketAddrV4::new(b.local_ip, b.first_port + i)))
        .filter(|e| !seen.contains_key(e))
        .collect()
}

/// Pairs of internal endpoints that share one external endpoint (port overloading).
pub fn shared_external(seen: &BTreeMap<SocketAddrV4, SocketAddrV4>) -> Vec<String> {
    let mut by_ext: BTreeMap<SocketAddrV4, Vec<SocketAddrV4>> = BTreeMap::new();
    for (int, ext) in seen {
        by_ext.entry(*ext).or_default().push(*int);
    }
    by_ext
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(ext, v)| format!("{ext} shared by {v:?}"))
        .collect()
}
