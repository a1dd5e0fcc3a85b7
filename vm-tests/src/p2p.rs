//! Peer-to-peer lab: two private sites behind two NAT instances on one shared external
//! segment with a rendezvous server, and the peers' side of UDP hole punching and TCP
//! simultaneous open.
//!
//! ```text
//!  ha 10.0.0.2 ── eth0 ═ la<id> 10.0.0.1 [na] a<id> 198.51.100.10 ═┐
//!                                                                 sw: br0 ─── rv 198.51.100.1
//!  hb 10.0.0.2 ── eth0 ═ lb<id> 10.0.0.1 [nb] b<id> 198.51.100.20 ═┘     (rendezvous: UDP 7000, TCP 7001)
//! ```
//! Both sites use the same private subnet, as two home networks would. Each NAT namespace runs
//! its own `nat-ctl attach` (see [`TwoSites::attach`]). The rendezvous server tells each peer of
//! a session the other's address as the server observed it (its external endpoint).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::make_switch_bridge;
use crate::nat::NatProcess;
use crate::netns::{self, Names, Netns, SETUP_TIMEOUT};
use crate::proc::{self, Proc};
use crate::tools::{self, udp_recv};

/// The private address of the host at each site.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Each site's gateway on its private link.
pub const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// NAT A's external address.
pub const NAT_A_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// NAT B's external address.
pub const NAT_B_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// The rendezvous server.
pub const RV_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The rendezvous server's UDP port.
pub const RV_UDP_PORT: u16 = 7000;
/// The rendezvous server's TCP port.
pub const RV_TCP_PORT: u16 = 7001;

/// One private site: a host behind a NAT router.
pub struct Site {
    /// The private host.
    pub host: Netns,
    /// The NAT router.
    pub nat: Netns,
    /// The NAT's external interface (in `nat`).
    pub wan_if: String,
    /// The NAT's private interface (in `nat`).
    pub lan_if: String,
    /// The NAT's external address.
    pub ext: Ipv4Addr,
}

/// Two sites, the shared segment and the rendezvous host. Dropping it deletes every namespace.
pub struct TwoSites {
    /// Names used (unique to this lab).
    pub names: Names,
    /// Site A.
    pub a: Site,
    /// Site B.
    pub b: Site,
    /// The switch namespace with the shared segment's bridge.
    pub sw: Netns,
    /// The rendezvous host.
    pub rv: Netns,
}

impl TwoSites {
    /// Builds both sites, the shared segment and the rendezvous host, and waits until every
    /// link carries pings (no NAT attached yet).
    pub fn new(tag: &str) -> Result<TwoSites> {
        crate::require_root()?;
        netns::remove_stale();
        let names = Names::new(tag);
        let sw = Netns::create(&names.ns("sw"))?;
        let rv = Netns::create(&names.ns("rv"))?;
        let make_site = |role: char, ext: Ipv4Addr| -> Result<Site> {
            Ok(Site {
                host: Netns::create(&names.ns(&format!("h{role}")))?,
                nat: Netns::create(&names.ns(&format!("n{role}")))?,
                wan_if: names.iface(&role.to_string()),
                lan_if: names.iface(&format!("l{role}")),
                ext,
            })
        };
        let a = make_site('a', NAT_A_EXT)?;
        let b = make_site('b', NAT_B_EXT)?;

        make_switch_bridge(&sw)?;
        let mut port = 0;
        let mut attach_port = |ns: &Netns, dev: &str| -> Result<()> {
            let p = format!("p{port}");
            port += 1;
            ns.add_veth(dev, &sw, &p, None)?;
            sw.tx_csum_off(&p)?;
            sw.ip(&["link", "set", &p, "master", "br0"])?;
            sw.ip(&["link", "set", &p, "up"])?;
            Ok(())
        };
        for site in [&a, &b] {
            site.nat.sysctl("net.ipv4.ip_forward", "1")?;
            site.host.add_veth("eth0", &site.nat, &site.lan_if, None)?;
            site.host.if_up("eth0", &["10.0.0.2/24"])?;
            site.host
                .ip(&["route", "add", "default", "via", &GW_IP.to_string()])?;
            site.nat.if_up(&site.lan_if, &["10.0.0.1/24"])?;
            attach_port(&site.nat, &site.wan_if)?;
            site.nat.if_up(&site.wan_if, &[&format!("{}/24", site.ext)])?;
        }
        attach_port(&rv, "eth0")?;
        rv.if_up("eth0", &[&format!("{RV_IP}/24")])?;

        let lab = TwoSites { names, a, b, sw, rv };
        let checks = [
            (&lab.a.host, GW_IP),
            (&lab.b.host, GW_IP),
            (&lab.a.nat, RV_IP),
            (&lab.b.nat, RV_IP),
            (&lab.a.nat, NAT_B_EXT),
        ];
        for (ns, dst) in checks {
            let ok = proc::poll(Duration::from_secs(10), Duration::from_millis(100), || {
                let o = ns.run(
                    "ping",
                    &["-n", "-q", "-c", "1", "-W", "1", &dst.to_string()],
                    SETUP_TIMEOUT,
                );
                matches!(o, Ok(o) if o.status.success()).then_some(())
            });
            if ok.is_none() {
                bail!("two-site lab: {} cannot reach {dst}", ns.name());
            }
        }
        Ok(lab)
    }

    /// Attaches a NAT to both sites: `nat-ctl attach` in each NAT namespace with its own mode.
    pub fn attach(&self, mode_a: &str, mode_b: &str) -> Result<(NatProcess, NatProcess)> {
        let a = NatProcess::attach_in(&self.a.nat, &self.a.wan_if, &["--mode", mode_a])
            .with_context(|| format!("attach NAT A in {mode_a} mode"))?;
        let b = NatProcess::attach_in(&self.b.nat, &self.b.wan_if, &["--mode", mode_b])
            .with_context(|| format!("attach NAT B in {mode_b} mode"))?;
        Ok((a, b))
    }
}

/// The rendezvous server (Python, in the rendezvous namespace). UDP: a datagram
/// `REG <session> <peer>` (peer `a` or `b`) is answered with `PEER ip:port` (the other peer's
/// source address as seen here) once both registered, else `WAIT`. TCP: a connection sends the
/// line `REG <session> <peer>`; the server answers `PEER ip:port` once the other peer's
/// connection of that session registered too (within 20 s), then closes first.
const RENDEZVOUS_PY: &str = r#"
import socket, sys, threading
ip, uport, tport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = {}
cond = threading.Condition()
def other(p):
    return 'b' if p == 'a' else 'a'
def udp(s):
    while True:
        data, addr = s.recvfrom(2048)
        parts = data.decode(errors='replace').split()
        if len(parts) != 3 or parts[0] != 'REG':
            continue
        _, sess, peer = parts
        with cond:
            seen[('udp', sess, peer)] = '%s:%d' % addr
            o = seen.get(('udp', sess, other(peer)))
        s.sendto(('PEER ' + o if o else 'WAIT').encode(), addr)
def tcp_client(c, addr):
    with c:
        c.settimeout(25)
        try:
            words = c.makefile('r').readline().split()
            if len(words) != 3 or words[0] != 'REG':
                return
            _, sess, peer = words
            with cond:
                seen[('tcp', sess, peer)] = '%s:%d' % addr
                cond.notify_all()
                cond.wait_for(lambda: ('tcp', sess, other(peer)) in seen, timeout=20)
                o = seen.get(('tcp', sess, other(peer)))
            c.sendall((('PEER ' + o) if o else 'TIMEOUT').encode() + b'\n')
        except OSError:
            pass
us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
us.bind((ip, uport))
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, tport))
ls.listen(64)
threading.Thread(target=udp, args=(us,), daemon=True).start()
print('ready', flush=True)
while True:
    c, addr = ls.accept()
    threading.Thread(target=tcp_client, args=(c, addr), daemon=True).start()
"#;

/// The running rendezvous server; ended by pid on drop.
pub struct Rendezvous {
    /// The Python process.
    pub proc: Proc,
}

impl Rendezvous {
    /// Starts the server on [`RV_IP`] (UDP [`RV_UDP_PORT`], TCP [`RV_TCP_PORT`]) in `ns`.
    pub fn start(ns: &Netns) -> Result<Rendezvous> {
        let proc = Proc::spawn(
            "rendezvous server",
            ns.cmd(
                "/usr/bin/python3",
                &[
                    "-c",
                    RENDEZVOUS_PY,
                    &RV_IP.to_string(),
                    &RV_UDP_PORT.to_string(),
                    &RV_TCP_PORT.to_string(),
                ],
            ),
        )?;
        let rv = Rendezvous { proc };
        tools::wait_listening(ns, "tcp", RV_TCP_PORT)?;
        tools::wait_listening(ns, "udp", RV_UDP_PORT)?;
        Ok(rv)
    }
}

/// Registers `peer` ("a" or "b") of `session` with the rendezvous server over `sock`, repeating
/// every 200 ms for at most `timeout`, and returns the other peer's observed endpoint.
pub fn udp_rendezvous(
    sock: &UdpSocket,
    session: &str,
    peer: &str,
    timeout: Duration,
) -> Result<SocketAddrV4> {
    let server = SocketAddr::V4(SocketAddrV4::new(RV_IP, RV_UDP_PORT));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        sock.send_to(format!("REG {session} {peer}").as_bytes(), server)?;
        let until = Instant::now() + Duration::from_millis(200);
        while let Some((data, from)) = udp_recv(sock, until.saturating_duration_since(Instant::now()))? {
            if from != server {
                continue;
            }
            let text = String::from_utf8_lossy(&data);
            if let Some(addr) = text.trim().strip_prefix("PEER ") {
                return addr
                    .parse()
                    .with_context(|| format!("rendezvous answered {text:?}"));
            }
        }
    }
    bail!("peer {peer} of session {session}: no PEER answer from the rendezvous server within {timeout:?}")
}

/// What one side of a hole-punching attempt saw.
#[derive(Clone, Debug, Default)]
pub struct Punch {
    /// Datagrams this side sent to the peer.
    pub sent: u32,
    /// Datagrams received from the peer's endpoint (as the rendezvous reported it).
    pub received: u32,
    /// The peer said it received ours (so the path is open both ways).
    pub peer_heard_us: bool,
    /// Datagrams from any other source (should be none).
    pub strays: Vec<String>,
}

impl Punch {
    /// Both directions worked.
    pub fn success(&self) -> bool {
        self.received > 0 && self.peer_heard_us
    }
}

/// UDP hole punching from `sock` towards `peer`: sends `PUNCH <me> <seq> <heard>` every
/// 100 ms, where heard says whether anything from the peer arrived yet, and listens. Stops
/// once both directions are shown to work (then sends a few more so the peer learns it too),
/// or after `window`.
pub fn udp_punch(sock: &UdpSocket, me: &str, peer: SocketAddrV4, window: Duration) -> Result<Punch> {
    let mut p = Punch::default();
    let deadline = Instant::now() + window;
    let mut extra = None;
    loop {
        let heard = u8::from(p.received > 0);
        sock.send_to(format!("PUNCH {me} {} {heard}", p.sent).as_bytes(), peer)?;
        p.sent += 1;
        if let Some(n) = extra.as_mut() {
            if *n == 0 {
                break;
            }
            *n -= 1;
        }
        let tick = Instant::now() + Duration::from_millis(100);
        while let Some((data, from)) = udp_recv(sock, tick.saturating_duration_since(Instant::now()))? {
            let text = String::from_utf8_lossy(&data).to_string();
            if from != SocketAddr::V4(peer) {
                p.strays.push(format!("{text:?} from {from}"));
                continue;
            }
            let words: Vec<&str> = text.split_whitespace().collect();
            if words.len() == 4 && words[0] == "PUNCH" && words[1] != me {
                p.received += 1;
                if words[3] == "1" {
                    p.peer_heard_us = true;
                }
            }
        }
        if p.success() && extra.is_none() {
            extra = Some(3);
        }
        if Instant::now() >= deadline && extra.is_none() {
            break;
        }
    }
    Ok(p)
}

/// The C socket address for `a`.
fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: setsockopt(2) with a pointer to a live value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP connection from the fixed local endpoint `local` (bound with SO_REUSEADDR, so the
/// same port can be used for the rendezvous and then for the peer) to `remote`; `connect`
/// gives up after `timeout`. Call it on a thread inside the right namespace
/// ([`Netns::enter`]).
pub fn tcp_connect_from(local: SocketAddrV4, remote: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(anyhow!(std::io::Error::last_os_error())).context("socket(AF_INET, SOCK_STREAM)");
    }
    // SAFETY: raw is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one).context("SO_REUSEADDR")?;
    let l = sockaddr(local);
    // SAFETY: bind(2) with a sockaddr_in of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &l as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(anyhow!(std::io::Error::last_os_error())).context(format!("bind {local}"));
    }
    // A blocking connect(2) gives up after SO_SNDTIMEO (with EINPROGRESS).
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv).context("SO_SNDTIMEO")?;
    let r = sockaddr(remote);
    // SAFETY: connect(2) with a sockaddr_in of the right size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &r as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            bail!("connect {local} -> {remote}: no connection within {timeout:?}");
        }
        return Err(anyhow!(e)).context(format!("connect {local} -> {remote}"));
    }
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Registers `peer` of `session` with the rendezvous server over TCP from `local`, and returns
/// the other peer's observed endpoint. The server closes the connection first, so `local` is
/// not left in TIME_WAIT. Call it on a thread inside the peer's namespace.
pub fn tcp_rendezvous(local: SocketAddrV4, session: &str, peer: &str) -> Result<SocketAddrV4> {
    let server = SocketAddrV4::new(RV_IP, RV_TCP_PORT);
    let mut s = tcp_connect_from(local, server, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(25)))?;
    s.write_all(format!("REG {session} {peer}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the rendezvous answer")?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    line.trim()
        .strip_prefix("PEER ")
        .with_context(|| format!("rendezvous answered {line:?}"))?
        .parse()
        .with_context(|| format!("rendezvous answered {line:?}"))
}
