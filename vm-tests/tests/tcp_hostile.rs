//! TCP connections through the NAT against an off-path attacker (RFC 5961): blind RST, FIN and
//! SYN segments sent from the remote's address and port with sequence numbers 2^31 away from
//! the connection's must change nothing, in every mode; a real RST still closes the session
//! after the transitory timeout (RFC 7857 §2.2). Root only.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN_IP, WAN_IP};
use vm_tests::nat::Mapping;
use vm_tests::p2p::tcp_connect_from;
use vm_tests::packet::{Sniffer, PROTO_TCP};
use vm_tests::proc::poll;
use vm_tests::tools::scapy;
use vm_tests::{Lab, NatProcess};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The remote's listening port.
const SERVER_PORT: u16 = 5001;
/// A transitory timeout short enough to wait out: a session wrongly moved to a closing or reset
/// state would be swept within it.
const TRANSITORY_SECS: u64 = 3;
/// Half the sequence space: as far from the connection's window as a sequence number can be.
const FAR: u32 = 1 << 31;

/// One connection from lan:`port` to wan:SERVER_PORT, seen from both ends.
struct Conn {
    port: u16,
    client: TcpStream,
    server: TcpStream,
}

fn connect(lab: &Lab, listener: &TcpListener, port: u16) -> Result<Conn> {
    let client = lab
        .lan
        .enter(|| tcp_connect_from(sa(LAN_IP, port), sa(WAN_IP, SERVER_PORT), Duration::from_secs(10)))?;
    let (server, _) = listener.accept().context("accept on wan")?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    Ok(Conn { port, client, server })
}

impl Conn {
    /// One message each way; fails when either side cannot get through.
    fn exchange(&mut self, tag: &str) -> Result<()> {
        let what = format!("lan:{} {tag}", self.port);
        let mut buf = [0u8; 64];
        let up = format!("up {tag}");
        self.client
            .write_all(up.as_bytes())
            .with_context(|| format!("{what}: lan writes"))?;
        self.server
            .read_exact(&mut buf[..up.len()])
            .with_context(|| format!("{what}: wan reads"))?;
        ensure!(&buf[..up.len()] == up.as_bytes(), "{what}: wan read garbage");
        let down = format!("down {tag}");
        self.server
            .write_all(down.as_bytes())
            .with_context(|| format!("{what}: wan writes"))?;
        self.client
            .read_exact(&mut buf[..down.len()])
            .with_context(|| format!("{what}: lan reads"))?;
        ensure!(&buf[..down.len()] == down.as_bytes(), "{what}: lan read garbage");
        Ok(())
    }
}

/// The table's row for lan:`port` talking to the server, if any.
fn row(nat: &NatProcess, port: u16) -> Result<Option<Mapping>> {
    Ok(nat.mappings()?.into_iter().find(|m| {
        m.proto == "tcp" && m.internal == sa(LAN_IP, port) && m.remote == Some(sa(WAN_IP, SERVER_PORT))
    }))
}

/// Waits (bounded) until lan:`port`'s session shows `state`; returns its row.
fn wait_state(nat: &NatProcess, port: u16, state: &str) -> Result<Mapping> {
    let mut last = None;
    poll(Duration::from_secs(5), Duration::from_millis(50), || {
        last = row(nat, port).ok().flatten();
        last.clone().filter(|m| m.state == state)
    })
    .with_context(|| format!("lan:{port} never showed {state}; last row: {last:?}"))
}

/// The next sequence number the server will send on `conn` (its send next): one message each
/// way is exchanged while wan's interface is captured, and the server's last data segment to
/// the NAT's external endpoint `external` ends there.
fn server_next_seq(lab: &Lab, conn: &mut Conn, external: SocketAddrV4) -> Result<u32> {
    let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    conn.exchange("before the attack")?;
    let frames = sniff.capture_for(Duration::from_millis(300));
    frames
        .iter()
        .filter(|f| f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| {
            ip.proto() == PROTO_TCP
                && ip.src() == WAN_IP
                && ip.dst() == *external.ip()
                && ip.ports() == Some((SERVER_PORT, external.port()))
        })
        .filter_map(|ip| {
            let tcp = ip.payload();
            let header_len = usize::from(*tcp.get(12)? >> 4) * 4;
            let data = tcp.len().checked_sub(header_len)?;
            let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
            (data > 0).then(|| seq.wrapping_add(data as u32))
        })
        .next_back()
        .with_context(|| format!("wan sent no data segment to {external} that the capture saw"))
}

/// Blind RST, FIN and SYN into live connections of `mode`, then a real RST.
fn blind_segments_leave_connections_alive(mode: &str) -> Result<()> {
    let lab = Lab::new(&format!("tcpbl{}", &mode[..3]))?;
    let nat = NatProcess::attach(
        &lab,
        &[
            "--mode",
            mode,
            "--tcp-transitory-timeout",
            &TRANSITORY_SECS.to_string(),
            "--sweep-interval-ms",
            "200",
        ],
    )?;
    let listener = lab
        .wan
        .enter(|| TcpListener::bind(sa(WAN_IP, SERVER_PORT)).context("listen on wan"))?;
    let nat_mac = Lab::mac(&lab.nat, &lab.wan_if)?;

    // Three connections, one per kind of blind segment.
    let attacks = [("R", "rst"), ("FA", "fin"), ("S", "syn")];
    let mut conns = Vec::new();
    let mut packets = Vec::new();
    for (i, (flags, _)) in attacks.iter().enumerate() {
        let port = 40300 + i as u16;
        let mut conn = connect(&lab, &listener, port)?;
        conn.exchange("opening")?;
        let external = wait_state(&nat, port, "established")?.external;
        let next = server_next_seq(&lab, &mut conn, external)?;
        packets.push(format!(
            "Ether(dst='{nat_mac}')/IP(src='{WAN_IP}', dst='{}')/TCP(sport={SERVER_PORT}, dport={}, flags='{flags}', seq={}, ack=12345, window=502)",
            external.ip(),
            external.port(),
            next.wrapping_add(FAR)
        ));
        conns.push(conn);
    }
    let before = nat.stats()?;
    scapy(
        &lab.wan,
        &format!("sendp([{}], iface='{HOST_IF}')", packets.join(", ")),
    )?;
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "tcp_out_of_window")? >= attacks.len() as u64,
        "{mode}: tcp_out_of_window did not count the {} blind segments: {}",
        attacks.len(),
        after.changes(&before)
    );
    for (conn, (_, kind)) in conns.iter().zip(attacks) {
        let state = row(&nat, conn.port)?.map(|m| m.state);
        ensure!(
            state.as_deref() == Some("established"),
            "{mode}: a blind {kind} moved lan:{} to {state:?}",
            conn.port
        );
    }
    // Longer than the transitory timeout, with the sweep running: a session wrongly taken for
    // closed would be gone now, and the remote's next segment refused.
    std::thread::sleep(Duration::from_secs(TRANSITORY_SECS + 2));
    for (conn, (_, kind)) in conns.iter_mut().zip(attacks) {
        conn.exchange("after the attack")
            .with_context(|| format!("{mode}: the connection hit by a blind {kind} is dead"))?;
        let state = row(&nat, conn.port)?.map(|m| m.state);
        ensure!(
            state.as_deref() == Some("established"),
            "{mode}: after a blind {kind} and {}s, lan:{} shows {state:?}",
            TRANSITORY_SECS + 2,
            conn.port
        );
    }

    // A real RST (the server closes with SO_LINGER 0) still closes: translated to lan, the
    // session kept on the transitory timer, then swept (RFC 7857 §2.2).
    let port = 40310;
    let mut conn = connect(&lab, &listener, port)?;
    conn.exchange("opening")?;
    wait_state(&nat, port, "established")?;
    linger_zero(&conn.server)?;
    drop(conn.server);
    let mut buf = [0u8; 16];
    match conn.client.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => bail!("{mode}: lan did not see the server's RST: {other:?}"),
    }
    let reset = wait_state(&nat, port, "reset")?;
    ensure!(
        reset.expires_in.is_some_and(|s| s <= TRANSITORY_SECS as i64),
        "{mode}: a reset session should be on the transitory timer: {reset:?}"
    );
    poll(
        Duration::from_secs(TRANSITORY_SECS + 10),
        Duration::from_millis(200),
        || row(&nat, port).ok().filter(Option::is_none),
    )
    .with_context(|| format!("{mode}: the reset session of lan:{port} was never swept"))?;
    drop(conns);
    nat.stop()
}

/// Sets SO_LINGER to zero, so that closing the socket sends a RST.
fn linger_zero(s: &TcpStream) -> Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) with a linger struct of the right size on a live socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    Ok(())
}

#[test]
fn blind_rst_fin_syn_change_nothing_full_cone() -> Result<()> {
    blind_segments_leave_connections_alive("full-cone")
}

#[test]
fn blind_rst_fin_syn_change_nothing_restricted_cone() -> Result<()> {
    blind_segments_leave_connections_alive("restricted-cone")
}

#[test]
fn blind_rst_fin_syn_change_nothing_port_restricted() -> Result<()> {
    blind_segments_leave_connections_alive("port-restricted")
}

#[test]
fn blind_rst_fin_syn_change_nothing_symmetric() -> Result<()> {
    blind_segments_leave_connections_alive("symmetric")
}
