//! Traffic helpers: sockets opened inside a namespace, and the third-party tools (socat, ping,
//! traceroute, coturn, the Vovida STUN client, scapy) run inside namespaces.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::proc::{self, Output, Proc};

/// Binds a UDP socket to `addr` inside `ns`.
pub fn udp_bind(ns: &Netns, addr: SocketAddrV4) -> Result<UdpSocket> {
    ns.enter(move || UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}")))
}

/// Waits up to `timeout` for one datagram. `Ok(None)` on timeout; socket errors (such as
/// ECONNREFUSED on a connected socket) are returned as errors.
pub fn udp_recv(sock: &UdpSocket, timeout: Duration) -> Result<Option<(Vec<u8>, SocketAddr)>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => return Ok(Some((buf[..n].to_vec(), from))),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits up to `timeout` for a datagram whose payload is `expected`, ignoring others.
pub fn udp_expect(sock: &UdpSocket, expected: &[u8], timeout: Duration) -> Result<Option<SocketAddr>> {
    let deadline = Instant::now() + timeout;
    while let Some((data, from)) = udp_recv(sock, deadline.saturating_duration_since(Instant::now()))? {
        if data == expected {
            return Ok(Some(from));
        }
    }
    Ok(None)
}

/// Sends `payload` to `to` and waits for a reply from `to`, retrying a few times (UDP may lose
/// the first datagram while a server starts). Returns the reply.
pub fn udp_request(sock: &UdpSocket, to: SocketAddrV4, payload: &[u8]) -> Result<Vec<u8>> {
    for _ in 0..5 {
        sock.send_to(payload, to)
            .with_context(|| format!("send to {to}"))?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some((data, from)) = udp_recv(sock, deadline.saturating_duration_since(Instant::now()))? {
            if from == SocketAddr::V4(to) {
                return Ok(data);
            }
        }
    }
    bail!("no reply from {to} to {} after 5 tries", sock.local_addr()?)
}

/// Asks a whoami reflector at `to` which source address it saw. Returns that ip:port.
pub fn whoami(sock: &UdpSocket, to: SocketAddrV4) -> Result<SocketAddrV4> {
    let reply = udp_request(sock, to, b"whoami\n")?;
    let s = String::from_utf8_lossy(&reply);
    s.trim()
        .parse()
        .with_context(|| format!("whoami reply {s:?} from {to} is not ip:port"))
}

/// Waits (bounded) until something in `ns` listens on `port` (`tcp` or `udp`).
pub fn wait_listening(ns: &Netns, proto: &str, port: u16) -> Result<()> {
    let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let found = proc::poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let o = ns.run("ss", &[flag], Duration::from_secs(5)).ok()?;
        o.stdout
            .lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
            .then_some(())
    });
    found.with_context(|| format!("nothing listens on {proto} port {port} in {}", ns.name()))
}

/// Starts a socat UDP "whoami" reflector on `ip:port` in `ns`: it answers every datagram with
/// the sender's `ip:port`.
pub fn udp_whoami(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<Proc> {
    let p = Proc::spawn(
        &format!("socat udp whoami {ip}:{port}"),
        ns.cmd(
            "socat",
            &[
                &format!("UDP4-RECVFROM:{port},bind={ip},fork"),
                "SYSTEM:echo \"$SOCAT_PEERADDR:$SOCAT_PEERPORT\"",
            ],
        ),
    )?;
    wait_listening(ns, "udp", port)?;
    Ok(p)
}

/// Starts a socat TCP "whoami" server on `ip:port` in `ns`.
pub fn tcp_whoami(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<Proc> {
    let p = Proc::spawn(
        &format!("socat tcp whoami {ip}:{port}"),
        ns.cmd(
            "socat",
            &[
                &format!("TCP4-LISTEN:{port},bind={ip},reuseaddr,fork"),
                "SYSTEM:echo \"$SOCAT_PEERADDR:$SOCAT_PEERPORT\"",
            ],
        ),
    )?;
    wait_listening(ns, "tcp", port)?;
    Ok(p)
}

/// Starts a socat TCP echo server (one connection) on `ip:port` in `ns`.
pub fn tcp_echo(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<Proc> {
    let p = Proc::spawn(
        &format!("socat tcp echo {ip}:{port}"),
        ns.cmd(
            "socat",
            &[&format!("TCP4-LISTEN:{port},bind={ip},reuseaddr"), "EXEC:cat"],
        ),
    )?;
    wait_listening(ns, "tcp", port)?;
    Ok(p)
}

/// Connects a TCP socket from inside `ns`.
pub fn tcp_connect(ns: &Netns, to: SocketAddrV4) -> Result<TcpStream> {
    let s = ns.enter(move || {
        TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(10))
            .with_context(|| format!("TCP connect to {to}"))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(15)))?;
    Ok(s)
}

/// Reads one line (up to EOF) from a TCP whoami server at `to`.
pub fn tcp_whoami_query(ns: &Netns, to: SocketAddrV4) -> Result<(SocketAddrV4, SocketAddr)> {
    let mut s = tcp_connect(ns, to)?;
    let local = s.local_addr()?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("reading TCP whoami reply")?;
    let seen = out
        .trim()
        .parse()
        .with_context(|| format!("TCP whoami reply {out:?} is not ip:port"))?;
    Ok((seen, local))
}

/// Deterministic pseudo-random bytes (xorshift), for transfers checked byte by byte.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` over `stream` (from a helper thread), half-closes, and reads everything the
/// peer sends back until EOF. Returns what was read.
pub fn tcp_roundtrip(stream: TcpStream, data: &[u8]) -> Result<Vec<u8>> {
    let mut reader = stream.try_clone()?;
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> Result<()> {
            let mut w = &stream;
            w.write_all(data).context("TCP write")?;
            stream.shutdown(Shutdown::Write).context("TCP shutdown(write)")?;
            Ok(())
        });
        let mut back = Vec::with_capacity(data.len());
        let r = reader.read_to_end(&mut back).context("TCP read");
        let w = writer.join().expect("writer thread panicked");
        w?;
        r?;
        Ok(back)
    })
}

/// `ping -n -c COUNT -i 0.2 -W 2 extra... dst` inside `ns` (any exit status).
pub fn ping(ns: &Netns, dst: Ipv4Addr, count: u32, extra: &[&str]) -> Result<Output> {
    let count = count.to_string();
    let dst = dst.to_string();
    let mut args = vec!["-n", "-c", &count, "-i", "0.2", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(&dst);
    ns.run("ping", &args, Duration::from_secs(30))
}

/// The number of replies a `ping` run reports ("N received").
pub fn ping_received(out: &Output) -> u32 {
    out.stdout
        .lines()
        .find_map(|l| {
            let idx = l.find(" received")?;
            l[..idx]
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Runs a scapy script with Debian's `/usr/bin/python3` inside `ns` (`from scapy.all import *`
/// is prepended). The script must exit 0.
pub fn scapy(ns: &Netns, script: &str) -> Result<Output> {
    let full = format!(
        "import logging\nlogging.getLogger('scapy.runtime').setLevel(logging.ERROR)\nfrom scapy.all import *\nconf.verb = 0\n{script}\n"
    );
    proc::run_ok(
        &format!("scapy in {}", ns.name()),
        ns.cmd("/usr/bin/python3", &["-c", &full]),
        Duration::from_secs(60),
    )
}

/// coturn `turnserver` as an RFC 5780 / RFC 3489 STUN server with two addresses in `ns`.
pub struct Turnserver {
    /// The process (ended by pid on drop).
    pub proc: Proc,
    pidfile: String,
}

impl Turnserver {
    /// Starts it on `a1` and `a2`, ports 3478 and 3479, and waits until all four sockets listen.
    pub fn start(ns: &Netns, a1: Ipv4Addr, a2: Ipv4Addr, unique: &str) -> Result<Turnserver> {
        let pidfile = format!("/tmp/{unique}-turnserver.pid");
        let proc = Proc::spawn(
            "turnserver",
            ns.cmd(
                "turnserver",
                &[
                    "-n",
                    "--stun-only",
                    "-L",
                    &a1.to_string(),
                    "-L",
                    &a2.to_string(),
                    "--listening-port",
                    "3478",
                    "--alt-listening-port",
                    "3479",
                    "--no-cli",
                    "--no-tls",
                    "--no-dtls",
                    "--log-file=stdout",
                    "--simple-log",
                    &format!("--pidfile={pidfile}"),
                ],
            ),
        )?;
        let ts = Turnserver { proc, pidfile };
        let want = [
            format!("{a1}:3478"),
            format!("{a1}:3479"),
            format!("{a2}:3478"),
            format!("{a2}:3479"),
        ];
        let ok = proc::poll(Duration::from_secs(15), Duration::from_millis(100), || {
            let o = ns.run("ss", &["-Hlun"], Duration::from_secs(5)).ok()?;
            want.iter().all(|w| o.stdout.contains(w.as_str())).then_some(())
        });
        if ok.is_none() {
            bail!(
                "turnserver did not open its four UDP sockets; output: {}",
                ts.proc.stdout()
            );
        }
        Ok(ts)
    }
}

impl Drop for Turnserver {
    fn drop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// The last RFC 5780 verdict line of `turnutils_natdiscovery` output that mentions `topic`
/// ("Mapping" or "Filtering").
pub fn natdiscovery_verdict(out: &str, topic: &str) -> Option<String> {
    out.lines()
        .rev()
        .map(str::trim)
        .find(|l| (l.starts_with("NAT with") || l.starts_with("No NAT")) && l.contains(topic))
        .map(str::to_string)
}

/// The `Primary: ...` result of the Vovida `stun` client.
pub fn vovida_result(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Primary:").map(|r| r.trim().to_string()))
}
