//! Port-mapping clients for the tests: a small PCP (RFC 6887) client written here, from the
//! RFC's layouts and independently of nat-ctl's codec, Debian's `natpmpc` for NAT-PMP
//! (RFC 6886), and the check of captured packets with `tshark`'s PCP dissector.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::p2p::{udp_punch, udp_rendezvous, Punch};
use crate::proc::{self, Proc};
use crate::tools::udp_recv;

/// PCP and NAT-PMP server port (RFC 6887 §19.1).
pub const SERVER_PORT: u16 = 5351;
/// Port clients hear the all-hosts announcements on (RFC 6887 §19.1, RFC 6886 §3.2.1).
pub const CLIENT_PORT: u16 = 5350;
/// PCP MAP opcode.
pub const OP_MAP: u8 = 1;
/// PCP PEER opcode.
pub const OP_PEER: u8 = 2;
/// PCP ANNOUNCE opcode.
pub const OP_ANNOUNCE: u8 = 0;
/// How long a request waits for its answer (one try: the lab loses nothing).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on every tool run here.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// An IPv4-mapped IPv6 address field (RFC 6887 §5).
pub fn mapped(addr: Ipv4Addr) -> [u8; 16] {
    let mut field = [0u8; 16];
    field[10] = 0xff;
    field[11] = 0xff;
    field[12..].copy_from_slice(&addr.octets());
    field
}

/// A PCP request built byte by byte (RFC 6887 §7.1, §11.1, §12.1, §7.3).
#[derive(Clone, Debug)]
pub struct Request {
    /// Version byte (2; anything else to test UNSUPP_VERSION).
    pub version: u8,
    /// Opcode.
    pub opcode: u8,
    /// Requested lifetime.
    pub lifetime: u32,
    /// The client address field.
    pub client: Ipv4Addr,
    /// MAP/PEER: nonce.
    pub nonce: [u8; 12],
    /// MAP/PEER: protocol.
    pub protocol: u8,
    /// MAP/PEER: internal port.
    pub internal_port: u16,
    /// MAP/PEER: suggested external port.
    pub suggested_port: u16,
    /// PEER: remote peer.
    pub peer: Option<SocketAddrV4>,
    /// Options, each (code, data); data is padded here.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Request {
    /// A MAP request.
    pub fn map(
        client: Ipv4Addr,
        nonce: u8,
        protocol: u8,
        internal_port: u16,
        suggested_port: u16,
        lifetime: u32,
    ) -> Self {
        Request {
            version: 2,
            opcode: OP_MAP,
            lifetime,
            client,
            nonce: [nonce; 12],
            protocol,
            internal_port,
            suggested_port,
            peer: None,
            options: Vec::new(),
        }
    }

    /// A PEER request for the flow `internal_port` -> `peer`.
    pub fn peer(
        client: Ipv4Addr,
        nonce: u8,
        protocol: u8,
        internal_port: u16,
        peer: SocketAddrV4,
        lifetime: u32,
    ) -> Self {
        Request {
            opcode: OP_PEER,
            peer: Some(peer),
            ..Request::map(client, nonce, protocol, internal_port, 0, lifetime)
        }
    }

    /// An ANNOUNCE request.
    pub fn announce(client: Ipv4Addr) -> Self {
        Request {
            opcode: OP_ANNOUNCE,
            ..Request::map(client, 0, 0, 0, 0, 0)
        }
    }

    /// With an option.
    pub fn with_option(mut self, code: u8, data: &[u8]) -> Self {
        self.options.push((code, data.to_vec()));
        self
    }

    /// The wire bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![self.version, self.opcode, 0, 0];
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        out.extend_from_slice(&mapped(self.client));
        if self.opcode == OP_MAP || self.opcode == OP_PEER {
            out.extend_from_slice(&self.nonce);
            out.extend_from_slice(&[self.protocol, 0, 0, 0]);
            out.extend_from_slice(&self.internal_port.to_be_bytes());
            out.extend_from_slice(&self.suggested_port.to_be_bytes());
            out.extend_from_slice(&[0; 16]);
        }
        if let Some(peer) = self.peer {
            out.extend_from_slice(&peer.port().to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&mapped(*peer.ip()));
        }
        for (code, data) in &self.options {
            out.extend_from_slice(&[*code, 0]);
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(4) * 4, 0);
        }
        out
    }
}

/// A PCP response, as the client reads it (RFC 6887 §7.2, §11.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Opcode without the R bit.
    pub opcode: u8,
    /// Result code.
    pub result: u8,
    /// Lifetime.
    pub lifetime: u32,
    /// Epoch time.
    pub epoch: u32,
    /// MAP/PEER: nonce.
    pub nonce: Option<[u8; 12]>,
    /// MAP/PEER: assigned external endpoint.
    pub external: Option<SocketAddrV4>,
    /// Length on the wire.
    pub len: usize,
}

/// Parses a PCP response; `None` unless it is a version-2 response.
pub fn parse_response(data: &[u8]) -> Option<Response> {
    if data.len() < 24 || data[0] != 2 || data[1] & 0x80 == 0 {
        return None;
    }
    let opcode = data[1] & 0x7f;
    let body = data.get(24..60).filter(|_| opcode == OP_MAP || opcode == OP_PEER);
    Some(Response {
        opcode,
        result: data[3],
        lifetime: u32::from_be_bytes(data[4..8].try_into().ok()?),
        epoch: u32::from_be_bytes(data[8..12].try_into().ok()?),
        nonce: body.map(|b| b[..12].try_into().unwrap_or_default()),
        external: body.and_then(|b| {
            (b[20..30] == [0; 10] && b[30..32] == [0xff, 0xff]).then(|| {
                SocketAddrV4::new(
                    Ipv4Addr::new(b[32], b[33], b[34], b[35]),
                    u16::from_be_bytes([b[18], b[19]]),
                )
            })
        }),
        len: data.len(),
    })
}

/// Sends `payload` from `sock` to `server` and returns the first datagram `server` sends
/// back within the timeout, if any.
pub fn exchange(sock: &UdpSocket, server: SocketAddrV4, payload: &[u8]) -> Result<Option<Vec<u8>>> {
    sock.send_to(payload, server)
        .with_context(|| format!("send to {server}"))?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while let Some((data, from)) = udp_recv(sock, deadline.saturating_duration_since(Instant::now()))? {
        if from == SocketAddr::V4(server) {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Sends a PCP request and parses its answer; fails if none or not a PCP response.
pub fn pcp(sock: &UdpSocket, server: SocketAddrV4, request: &Request) -> Result<Response> {
    let Some(data) = exchange(sock, server, &request.bytes())? else {
        bail!("no PCP answer from {server} to {request:?}")
    };
    parse_response(&data).with_context(|| format!("answer {data:02x?} to {request:?} is not a PCP response"))
}

/// Attaches a symmetric-mode NAT serving PCP at `site` of the two-site lab: the NAT a peer
/// behind it can ask for a mapping (the P2P case that needs one).
pub fn attach_symmetric_with_pcp(site: &crate::p2p::Site) -> Result<crate::NatProcess> {
    crate::NatProcess::attach_in(
        &site.nat,
        &site.wan_if,
        &[
            "--mode",
            "symmetric",
            "--port-mapping",
            "pcp",
            "--internal-iface",
            &site.lan_if,
        ],
    )
}

/// Runs `natpmpc -g GATEWAY args...` in `ns`; returns its stdout (it must exit 0).
pub fn natpmpc(ns: &Netns, gateway: Ipv4Addr, args: &[&str]) -> Result<String> {
    let gw = gateway.to_string();
    let mut full = vec!["-g", gw.as_str()];
    full.extend_from_slice(args);
    let out = ns.run("natpmpc", &full, TOOL_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "natpmpc {} failed ({}): {} {}",
            full.join(" "),
            out.status,
            out.stdout.trim(),
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// The public address `natpmpc` printed ("Public IP address : A").
pub fn natpmpc_public_address(stdout: &str) -> Option<Ipv4Addr> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Public IP address : "))
        .and_then(|a| a.trim().parse().ok())
}

/// The mapping `natpmpc -a` printed ("Mapped public port P protocol UDP to local port L
/// liftime T"): (public port, local port, lifetime).
pub fn natpmpc_mapped(stdout: &str) -> Option<(u16, u16, u32)> {
    let line = stdout.lines().find(|l| l.starts_with("Mapped public port "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // Mapped public port P protocol X to local port L liftime T
    Some((
        words.get(3)?.parse().ok()?,
        words.get(9)?.parse().ok()?,
        words.get(11)?.parse().ok()?,
    ))
}

/// A packet capture (tcpdump) on `dev` in `ns` of UDP port 5351, written to `file`.
pub struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    /// Starts it and waits (bounded) until tcpdump listens.
    pub fn start(ns: &Netns, dev: &str, file: &std::path::Path) -> Result<Capture> {
        let path = file.to_string_lossy().to_string();
        let args = ["-i", dev, "-U", "-n", "-w", path.as_str(), "udp", "port", "5351"];
        let proc = Proc::spawn("tcpdump", ns.cmd("tcpdump", &args))?;
        let listening = proc::poll(Duration::from_secs(10), Duration::from_millis(50), || {
            proc.stderr().contains("listening on").then_some(())
        });
        if listening.is_none() {
            bail!("tcpdump on {dev} did not start: {}", proc.stderr().trim());
        }
        Ok(Capture {
            proc,
            file: file.to_path_buf(),
        })
    }

    /// Stops the capture (packets are flushed per packet, -U) and returns the file.
    pub fn finish(mut self) -> Result<std::path::PathBuf> {
        // Let the last packets be written before tcpdump is told to stop.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.terminate(Duration::from_secs(5))?;
        Ok(self.file.clone())
    }
}

/// `tshark -V` of `file` with UDP 5351 decoded as PCP (`portcontrol`), limited to `filter` (display filter).
pub fn tshark_pcp(file: &std::path::Path, filter: &str) -> Result<String> {
    tshark_decode(file, "portcontrol", filter)
}

/// `tshark -V` of `file` with UDP 5351 decoded as NAT-PMP (`nat-pmp`), limited to `filter`.
pub fn tshark_natpmp(file: &std::path::Path, filter: &str) -> Result<String> {
    tshark_decode(file, "nat-pmp", filter)
}

fn tshark_decode(file: &std::path::Path, dissector: &str, filter: &str) -> Result<String> {
    let path = file.to_string_lossy().to_string();
    let decode = format!("udp.port==5351,{dissector}");
    let args = [
        "-n",
        "-r",
        path.as_str(),
        "-d",
        decode.as_str(),
        "-V",
        "-Y",
        filter,
    ];
    let out = proc::run("tshark", proc::command("tshark", &args), TOOL_TIMEOUT)?;
    if !out.status.success() {
        bail!("tshark -r {path} failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out.stdout)
}

/// The lines of a `tshark -V` dump that report a malformed or otherwise flawed packet: a
/// "[Malformed Packet" mark, or an expert error or warning. The one warning the tests expect is
/// the dissector's "Unknown opcode" on the answer to a request with an unknown opcode (RFC 6887
/// §8.3 has the server copy the opcode back); result code names such as "Malformed Request"
/// are not flaws.
pub fn dissector_warnings(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("[malformed packet")
                || l.contains("expert info (error")
                || (l.contains("expert info (warning") && !l.contains("unknown opcode"))
        })
        .map(|l| l.trim().to_string())
        .collect()
}

/// How long a peer punches.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(3);
/// Bound on the rendezvous (the other peer may take seconds to start under emulation).
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Plain UDP hole punching between host A (`a_sock`) and host B (`b_sock`) of the two-site lab:
/// both learn the other's endpoint from the rendezvous server, then punch at once.
pub fn punch_pair(a_sock: &UdpSocket, b_sock: &UdpSocket, session: &str) -> Result<(Punch, Punch)> {
    let side = |sock: &UdpSocket, me: &str| -> Result<Punch> {
        let peer = udp_rendezvous(sock, session, me, RENDEZVOUS_TIMEOUT)?;
        udp_punch(sock, me, peer, PUNCH_WINDOW)
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| side(a_sock, "a"));
        let b = s.spawn(|| side(b_sock, "b"));
        Ok((
            a.join().expect("peer a panicked")?,
            b.join().expect("peer b panicked")?,
        ))
    })
}

/// The connection once A's port is mapped (`a_sock` bound to the mapped internal port): B
/// learns A's endpoint from the rendezvous server (the mapped one) and punches to it; A answers
/// whoever wrote, since B's symmetric NAT gives B another port per remote. Returns what each
/// side saw and A's endpoint as B learnt it.
pub fn connect_via_mapping(
    a_sock: &UdpSocket,
    b_sock: &UdpSocket,
    session: &str,
) -> Result<(Punch, Punch, SocketAddrV4)> {
    std::thread::scope(|s| {
        let a = s.spawn(|| -> Result<Punch> {
            udp_rendezvous(a_sock, session, "a", RENDEZVOUS_TIMEOUT)?;
            let (_, from) = udp_recv(a_sock, RENDEZVOUS_TIMEOUT)?.context("A heard nothing from B")?;
            let SocketAddr::V4(from) = from else {
                bail!("IPv6 source {from}")
            };
            udp_punch(a_sock, "a", from, PUNCH_WINDOW)
        });
        let b = s.spawn(|| -> Result<(Punch, SocketAddrV4)> {
            let peer = udp_rendezvous(b_sock, session, "b", RENDEZVOUS_TIMEOUT)?;
            Ok((udp_punch(b_sock, "b", peer, PUNCH_WINDOW)?, peer))
        });
        let a = a.join().expect("peer a panicked")?;
        let (b, peer) = b.join().expect("peer b panicked")?;
        Ok((a, b, peer))
    })
}

/// Runs `upnpc args...` (miniupnpc) in `ns` and returns its stdout and stderr together: upnpc
/// reports a refused action in its output, not always in its exit status.
pub fn upnpc(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = ns.run("upnpc", args, TOOL_TIMEOUT)?;
    Ok(format!("{}{}", out.stdout, out.stderr))
}

/// The external address `upnpc -s` printed ("ExternalIPAddress = A").
pub fn upnpc_external_ip(out: &str) -> Option<Ipv4Addr> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("ExternalIPAddress = "))
        .and_then(|a| a.trim().parse().ok())
}

/// What `upnpc -a`/`-r` printed after a granted mapping ("external A:P UDP is redirected to
/// internal I:L (duration=D)"): (protocol, external, internal).
pub fn upnpc_redirected(out: &str) -> Vec<(String, SocketAddrV4, SocketAddrV4)> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["external", ext, proto, "is", "redirected", "to", "internal", int, ..] => {
                    Some((proto.to_string(), ext.parse().ok()?, int.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// The entries `upnpc -l` listed (" 0 UDP 20000->10.0.0.2:4000 'desc' '' 60"): (protocol,
/// external port, internal endpoint).
pub fn upnpc_list(out: &str) -> Vec<(String, u16, SocketAddrV4)> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let [index, proto, mapping, ..] = w.as_slice() else {
                return None;
            };
            index.parse::<u32>().ok()?;
            let (ext, int) = mapping.split_once("->")?;
            Some((proto.to_string(), ext.parse().ok()?, int.parse().ok()?))
        })
        .collect()
}

/// The UPnP error code of a refused action ("... failed with code 718 (ConflictInMappingEntry)").
pub fn upnpc_error_code(out: &str) -> Option<u16> {
    out.lines()
        .find_map(|l| l.split_once("failed with code ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// miniupnpd (Debian's miniupnpd-nftables) as the reference gateway in the NAT namespace `ns`:
/// UPnP IGD and NAT-PMP on `lan_if`, nftables masquerade and its redirections on `wan_if`,
/// secure mode (a host maps only its own address), HTTP on `http_port`. Stopped on drop.
pub struct Miniupnpd {
    proc: Proc,
    dir: std::path::PathBuf,
}

impl Miniupnpd {
    /// Writes the ruleset (table inet filter with the chains miniupnpd fills: its defaults)
    /// and the config, starts `miniupnpd -d` and waits (bounded) until it serves.
    pub fn start(ns: &Netns, wan_if: &str, lan_if: &str, http_port: u16) -> Result<Miniupnpd> {
        let dir = std::env::temp_dir().join(format!("miniupnpd-{}-{}", ns.name(), std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let rules = format!(
            "table inet filter {{\n\
             chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}\n\
             chain miniupnpd {{ }}\n\
             chain prerouting {{ type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }}\n\
             chain postrouting {{ type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; oifname \"{wan_if}\" masquerade; }}\n\
             chain prerouting_miniupnpd {{ }}\n\
             chain postrouting_miniupnpd {{ }}\n\
             }}\n"
        );
        let rules_path = dir.join("rules.nft");
        std::fs::write(&rules_path, rules)?;
        ns.run_ok("nft", &["-f", &rules_path.to_string_lossy()], TOOL_TIMEOUT)?;
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?;
        let conf = format!(
            "ext_ifname={wan_if}\nlistening_ip={lan_if}\nport={http_port}\nenable_natpmp=yes\n\
             enable_upnp=yes\nsecure_mode=yes\nsystem_uptime=no\nuuid={}\nlease_file={}\n\
             allow 1024-65535 10.0.0.0/8 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            uuid.trim(),
            dir.join("leases").display()
        );
        let conf_path = dir.join("miniupnpd.conf");
        std::fs::write(&conf_path, conf)?;
        let conf_arg = conf_path.to_string_lossy().to_string();
        let pid_arg = dir.join("pid").to_string_lossy().to_string();
        let proc = Proc::spawn(
            "miniupnpd",
            ns.cmd(
                "miniupnpd",
                &["-f", conf_arg.as_str(), "-d", "-P", pid_arg.as_str()],
            ),
        )?;
        let up = proc::poll(Duration::from_secs(10), Duration::from_millis(100), || {
            let log = proc.stderr();
            (log.contains("HTTP listening on port") && log.contains("NAT-PMP")).then_some(())
        });
        if up.is_none() {
            bail!("miniupnpd did not start: {}", proc.stderr().trim());
        }
        Ok(Miniupnpd { proc, dir })
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.proc.stderr()
    }

    /// Stops it (SIGTERM, bounded).
    pub fn stop(mut self) -> Result<()> {
        self.proc.terminate(Duration::from_secs(5))?;
        Ok(())
    }
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
