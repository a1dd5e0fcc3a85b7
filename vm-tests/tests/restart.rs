//! Restart without dropping flows: a daemon attached with `--persist` is
//! stopped while a TCP connection carries data the whole time; the data path keeps translating
//! with no daemon at all; a new `nat-ctl attach` adopts it with bindings, sessions and forwards
//! intact; `nat-ctl detach` then leaves nothing behind (no XDP/TCX program, no pins, sysctls
//! restored). Prints the packets lost during the restart (measured, not asserted). Root only.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP};
use vm_tests::nat::Leftovers;
use vm_tests::netns::Netns;
use vm_tests::ops::{self, forward_entry, sa, PersistGuard};
use vm_tests::packet::Sniffer;
use vm_tests::tools::{self, udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess, Stats};

/// Interval of the TCP counter stream (one line per tick).
const TCP_TICK: Duration = Duration::from_millis(10);
/// Interval of the UDP ping-pong.
const UDP_TICK: Duration = Duration::from_millis(5);

/// What the receiving end of the counter stream saw.
#[derive(Debug, Default)]
struct StreamReport {
    /// Lines received in sequence (0, 1, 2, ...).
    received: u64,
    /// The first problem (a gap, a reset, a stall), if any.
    error: Option<String>,
    /// Longest time between two consecutive lines.
    max_gap: Duration,
    /// Whether the sender's END line arrived.
    ended: bool,
}

/// A TCP connection from lan to wan that carries `<counter>\n` every 10 ms until stopped; the
/// receiver checks that every number arrives, in order, exactly once.
struct CounterStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<u64>>>,
    receiver: Option<JoinHandle<StreamReport>>,
}

impl CounterStream {
    fn start(lan: &Netns, wan: &Netns, to: SocketAddrV4) -> Result<CounterStream> {
        let listener = wan.enter(move || TcpListener::bind(to).with_context(|| format!("listen on {to}")))?;
        let receiver = thread::spawn(move || {
            let mut report = StreamReport::default();
            let (conn, _) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    report.error = Some(format!("accept: {e}"));
                    return report;
                }
            };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut lines = BufReader::new(conn);
            let mut last = Instant::now();
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) => {
                        report.error.get_or_insert("connection closed before END".into());
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        report
                            .error
                            .get_or_insert(format!("read after {} lines: {e}", report.received));
                        break;
                    }
                }
                let now = Instant::now();
                report.max_gap = report.max_gap.max(now - last);
                last = now;
                let l = line.trim();
                if l == "END" {
                    report.ended = true;
                    break;
                }
                match l.parse::<u64>() {
                    Ok(n) if n == report.received => report.received += 1,
                    _ => {
                        report
                            .error
                            .get_or_insert(format!("expected {}, got {l:?}", report.received));
                        break;
                    }
                }
            }
            report
        });
        let mut stream = tools::tcp_connect(lan, to)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let sender = thread::spawn(move || -> Result<u64> {
            let mut i = 0u64;
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                stream
                    .write_all(format!("{i}\n").as_bytes())
                    .with_context(|| format!("write of line {i}"))?;
                i += 1;
                sent2.store(i, Ordering::Relaxed);
                next += TCP_TICK;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            stream.write_all(b"END\n").context("write END")?;
            stream.shutdown(std::net::Shutdown::Write).context("shutdown")?;
            Ok(i)
        });
        Ok(CounterStream {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Stops sending and returns (lines sent, what the receiver saw).
    fn finish(mut self) -> Result<(u64, StreamReport)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .expect("sender")
            .join()
            .map_err(|_| anyhow!("sender panicked"))?;
        let report = self
            .receiver
            .take()
            .expect("receiver")
            .join()
            .map_err(|_| anyhow!("receiver panicked"))?;
        Ok((sent?, report))
    }
}

impl Drop for CounterStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        // The receiver ends on END, EOF or its 10 s read timeout.
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
    }
}

/// UDP ping-pong: lan sends a sequence number every 5 ms to an echo socket on wan; which
/// numbers came back tells how many packets a restart cost.
struct PingPong {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    got: Arc<Mutex<BTreeSet<u64>>>,
    threads: Vec<JoinHandle<()>>,
}

impl PingPong {
    fn start(lan: &Netns, wan: &Netns, lan_port: u16, wan_port: u16) -> Result<PingPong> {
        let echo = udp_bind(wan, sa(WAN_IP, wan_port))?;
        let sock = udp_bind(lan, sa(LAN_IP, lan_port))?;
        echo.set_read_timeout(Some(Duration::from_millis(100)))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let got = Arc::new(Mutex::new(BTreeSet::new()));
        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        }));
        let rx: UdpSocket = sock.try_clone()?;
        let (s, g) = (stop.clone(), got.clone());
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Keeps listening a little after the stop, for the last replies in flight.
            let mut stopped_at: Option<Instant> = None;
            loop {
                if s.load(Ordering::Relaxed) {
                    let t = *stopped_at.get_or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_millis(500) {
                        break;
                    }
                }
                if let Ok((8, _)) = rx.recv_from(&mut buf) {
                    let n = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    g.lock().unwrap_or_else(|e| e.into_inner()).insert(n);
                }
            }
        }));
        let (s, n) = (stop.clone(), sent.clone());
        threads.push(thread::spawn(move || {
            let mut i = 0u64;
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let _ = sock.send_to(&i.to_be_bytes(), sa(WAN_IP, wan_port));
                i += 1;
                n.store(i, Ordering::Relaxed);
                next += UDP_TICK;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }));
        Ok(PingPong {
            stop,
            sent,
            got,
            threads,
        })
    }

    /// Stops, and returns (sent, the set of numbers that came back).
    fn finish(mut self) -> (u64, BTreeSet<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let got = self.got.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (self.sent.load(Ordering::Relaxed), got)
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Writes `msg` on an open echo connection and reads it back.
fn echo_once(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).context("write")?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).context("read back")?;
    ensure!(back == msg, "echoed {:?}, sent {:?}", back, msg);
    Ok(())
}

fn udp_forward_works(wan: &Netns, src_port: u16) -> Result<()> {
    let sock = udp_bind(wan, sa(WAN_IP, src_port))?;
    let seen = whoami(&sock, sa(NAT_EXT, 5353)).context("the udp 5353 forward does not answer")?;
    ensure!(
        seen == sa(WAN_IP, src_port),
        "the server behind the forward saw {seen}"
    );
    Ok(())
}

fn tcp_forward_works(wan2: &Netns) -> Result<()> {
    let (seen, local) =
        tools::tcp_whoami_query(wan2, sa(NAT_EXT, 8080)).context("the tcp 8080 forward does not answer")?;
    ensure!(
        SocketAddr::V4(seen) == local,
        "the server behind the forward saw {seen}, client {local}"
    );
    Ok(())
}

fn counters_did_not_go_back(before: &Stats, after: &Stats) -> Result<()> {
    for (name, v) in &before.0 {
        let now = after.get(name)?;
        ensure!(
            now >= *v,
            "counter {name} went from {v} to {now} across the restart"
        );
    }
    Ok(())
}

#[test]
fn restart_with_persist_keeps_connections_bindings_and_forwards_then_detach_leaves_nothing() -> Result<()> {
    let lab = Lab::new("restart")?;
    let guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let wan_if = lab.wan_if.clone();
    let args = ["--persist", "--sweep-interval-ms", "200"];
    let mut first = NatProcess::attach(&lab, &args)?;
    ensure!(
        !first.attached_line().contains("adopted"),
        "a fresh attach claims to adopt: {}",
        first.attached_line()
    );

    // Forwards, UDP bindings, idle TCP connections, and the two live streams.
    let _udp_srv = udp_whoami(&lab.lan, LAN_IP, 5353)?;
    let _tcp_srv = tools::tcp_whoami(&lab.lan, LAN_IP, 80)?;
    ops::forward_ok(&lab.nat, &wan_if, "add", &["udp", "5353", "10.0.0.2:5353"])?;
    ops::forward_ok(&lab.nat, &wan_if, "add", &["tcp", "8080", "10.0.0.2:80"])?;
    let forwards_before = ops::forwards_in(&lab.nat, &wan_if)?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let udp_flows: Vec<(UdpSocket, SocketAddrV4)> = (0..5)
        .map(|i| {
            let s = udp_bind(&lab.lan, sa(LAN_IP, 42000 + i))?;
            let ext = ops::whoami_via(&lab, &first, &s, sa(WAN_IP, 9999))?;
            Ok((s, ext))
        })
        .collect::<Result<_>>()?;
    let _echo_servers: Vec<_> = (0..3)
        .map(|i| tools::tcp_echo(&lab.wan, WAN_IP, 5101 + i))
        .collect::<Result<_>>()?;
    let mut idle_tcp: Vec<TcpStream> = (0..3)
        .map(|i| tools::tcp_connect(&lab.lan, sa(WAN_IP, 5101 + i)))
        .collect::<Result<_>>()?;
    for (i, s) in idle_tcp.iter_mut().enumerate() {
        echo_once(s, format!("before {i}\n").as_bytes())?;
    }
    let stream = CounterStream::start(&lab.lan, &lab.wan, sa(WAN_IP, 7000))?;
    let pingpong = PingPong::start(&lab.lan, &lab.wan, 41000, 7001)?;
    thread::sleep(Duration::from_secs(1));

    let rows_before = ops::rows(&first, &["--proto", "udp"])?;
    let stats_before = first.stats()?;

    // Stop the daemon. The data path must keep translating with no daemon at all.
    let seq_stop = pingpong.sent.load(Ordering::Relaxed);
    let tcp_stop = stream.sent.load(Ordering::Relaxed);
    let t_stop = Instant::now();
    let st = first.terminate()?;
    let t_stopped = Instant::now();
    ensure!(
        st.success(),
        "the --persist daemon exited {st}: {}",
        first.stderr()
    );
    ensure!(
        first.stderr().contains("keeps running"),
        "no notice that the NAT keeps running: {}",
        first.stderr()
    );
    let gap_left = Leftovers::inspect(&lab.nat, &wan_if)?;
    ensure!(
        gap_left.xdp_in_ip_link.is_some() && !gap_left.pin_dirs.is_empty(),
        "after the --persist daemon exited, the programs or pins are gone: {gap_left:#?}"
    );
    let gap_status: serde_json::Value =
        serde_json::from_str(&ops::ctl_ok(&lab.nat, &["status", "-i", &wan_if, "--json"])?)?;
    ensure!(
        gap_status["programs"]
            .as_str()
            .unwrap_or_default()
            .contains("no daemon"),
        "status with no daemon running: {gap_status:#}"
    );
    // A new flow while no daemon runs: allocated by the data path alone.
    let gap_sock = udp_bind(&lab.lan, sa(LAN_IP, 43000))?;
    let gap_ext = ops::whoami_via(&lab, &first, &gap_sock, sa(WAN_IP, 9999))
        .context("a new flow while no daemon runs")?;
    ensure!(*gap_ext.ip() == NAT_EXT, "the gap flow left as {gap_ext}");
    udp_forward_works(&lab.wan, 7100).context("forward while no daemon runs")?;
    thread::sleep(Duration::from_millis(500));

    // A new daemon adopts everything.
    let t_attach = Instant::now();
    let second = NatProcess::attach(&lab, &args)?;
    let t_adopted = Instant::now();
    let seq_adopted = pingpong.sent.load(Ordering::Relaxed);
    let tcp_adopted = stream.sent.load(Ordering::Relaxed);
    ensure!(
        second.attached_line().contains("(adopted running state)"),
        "the second attach did not adopt: {}",
        second.attached_line()
    );
    thread::sleep(Duration::from_secs(1));
    let (tcp_sent, report) = stream.finish()?;
    let (udp_sent, udp_got) = pingpong.finish();

    // Measurements (printed, not asserted: they depend on the machine).
    let lost_total = udp_sent - udp_got.len() as u64;
    let lost_window = (seq_stop..seq_adopted).filter(|n| !udp_got.contains(n)).count();
    println!(
        "restart: SIGTERM to exit {:?}; no daemon for {:?}; adopting attach took {:?}",
        t_stopped - t_stop,
        t_attach - t_stopped,
        t_adopted - t_attach
    );
    println!(
        "restart: UDP ping-pong every {UDP_TICK:?}: {udp_sent} sent, {} answered, {lost_total} lost in all, \
         {lost_window} of {} lost between SIGTERM and the adopting attach",
        udp_got.len(),
        seq_adopted - seq_stop
    );
    println!(
        "restart: TCP counter stream every {TCP_TICK:?}: {tcp_sent} lines sent, {} received in order, \
         {} sent while no daemon or during adoption; longest pause between lines {:?}",
        report.received,
        tcp_adopted - tcp_stop,
        report.max_gap
    );

    // The TCP connection carried every line, in order, across the restart.
    ensure!(
        report.error.is_none() && report.ended && report.received == tcp_sent,
        "the TCP stream across the restart: sent {tcp_sent}, receiver {report:?}"
    );
    // Every idle connection is alive.
    let mut alive = 0;
    for (i, s) in idle_tcp.iter_mut().enumerate() {
        if echo_once(s, format!("after {i}\n").as_bytes()).is_ok() {
            alive += 1;
        }
    }
    println!("restart: live TCP connections after the restart: {}/4", alive + 1);
    ensure!(
        alive == idle_tcp.len(),
        "only {alive} of {} idle TCP connections survived",
        idle_tcp.len()
    );

    // UDP bindings: the same external ports, listed and in use.
    let rows_after = ops::rows(&second, &["--proto", "udp"])?;
    let mut kept = 0;
    for (s, ext) in &udp_flows {
        let internal = s.local_addr()?;
        let listed = rows_after
            .iter()
            .any(|r| SocketAddr::V4(r.internal) == internal && r.external == *ext);
        ensure!(
            listed,
            "binding {internal} -> {ext} is not in mappings after the restart:\nbefore {rows_before:#?}\nafter {rows_after:#?}"
        );
        let now = ops::whoami_via(&lab, &second, s, sa(WAN_IP, 9999))?;
        ensure!(
            now == *ext,
            "binding {internal} was {ext}, is {now} after the restart"
        );
        kept += 1;
    }
    println!("restart: UDP bindings kept: {kept}/{}", udp_flows.len());
    ensure!(
        rows_after
            .iter()
            .any(|r| r.internal == sa(LAN_IP, 43000) && r.external == gap_ext),
        "the binding made while no daemon ran is not listed after adoption: {rows_after:#?}"
    );
    // Forwards intact and working.
    let forwards_after = ops::forwards_in(&lab.nat, &wan_if)?;
    ensure!(
        forwards_after == forwards_before,
        "forwards before {forwards_before:?}, after {forwards_after:?}"
    );
    ensure!(
        forwards_after.contains(&forward_entry("tcp", sa(NAT_EXT, 8080), sa(LAN_IP, 80))),
        "forward list {forwards_after:?}"
    );
    udp_forward_works(&lab.wan, 7101)?;
    tcp_forward_works(&lab.wan2)?;
    counters_did_not_go_back(&stats_before, &second.stats()?)?;
    let s = ops::status(&second)?;
    ensure!(
        s["pid"].to_string().trim_matches('"') == second.pid().to_string(),
        "status pid {} is not the adopting daemon's {}",
        s["pid"],
        second.pid()
    );

    // detach is refused while a daemon runs the NAT, and changes nothing.
    let out = ops::ctl(&lab.nat, &["detach", &wan_if])?;
    ops::refused("detach while the daemon runs", &out)?;
    ensure!(
        ops::whoami_via(&lab, &second, &udp_flows[0].0, sa(WAN_IP, 9999))? == udp_flows[0].1,
        "refused detach broke a flow"
    );

    // Stop the second daemon (it persists too), then detach: nothing may remain.
    second.stop()?;
    ensure!(
        !Leftovers::inspect(&lab.nat, &wan_if)?.is_clean(),
        "the second --persist daemon removed the NAT on exit"
    );
    let out = ops::ctl_ok(&lab.nat, &["detach", &wan_if])?;
    ensure!(out.contains("detached"), "detach printed {out:?}");
    expect_nothing_left(&lab, &wan_if, &[])?;
    drop(guard);
    Ok(())
}

/// After `detach`: no program on the external interface (nor on `internal`), no pin directory,
/// no lock or saved-sysctl file, `status` refused, and traffic is no longer translated.
/// Ends the daemon with SIGKILL, as a crash or the OOM killer would: no cleanup at all.
fn kill_daemon(nat: &mut NatProcess) -> Result<()> {
    let pid = nat.pid() as libc::pid_t;
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
    ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0, "kill -KILL {pid}");
    let _ = nat.terminate();
    Ok(())
}

/// Attaches with `args`, which must adopt the running NAT (`after` says after what), and checks
/// that `flow` still leaves as `ext`.
fn attach_adopting(
    lab: &Lab,
    args: &[&str],
    flow: &UdpSocket,
    ext: SocketAddrV4,
    after: &str,
) -> Result<NatProcess> {
    let nat = NatProcess::attach(lab, args)?;
    ensure!(
        nat.attached_line().contains("adopted"),
        "no adoption after {after}: {}",
        nat.attached_line()
    );
    ensure!(
        ops::whoami_via(lab, &nat, flow, sa(WAN_IP, 9999))? == ext,
        "the binding of {ext} was lost across {after}"
    );
    Ok(nat)
}

fn expect_nothing_left(lab: &Lab, wan_if: &str, internal: &[&str]) -> Result<()> {
    let left = Leftovers::inspect(&lab.nat, wan_if)?;
    ensure!(left.is_clean(), "left behind on {wan_if}: {left:#?}");
    for lan_if in internal {
        let l = Leftovers::inspect(&lab.nat, lan_if)?;
        ensure!(
            l.xdp_in_ip_link.is_none() && l.bpftool.is_none(),
            "left behind on {lan_if}: {l:#?}"
        );
    }
    let pins = ops::pin_dirs_of(wan_if);
    ensure!(pins.is_empty(), "pin directories left: {pins:?}");
    let files = ops::run_files_of(wan_if);
    ensure!(files.is_empty(), "files left in {}: {files:?}", ops::RUN_DIR);
    ops::refused(
        "status after detach",
        &ops::ctl(&lab.nat, &["status", "-i", wan_if])?,
    )?;
    // Untranslated: wan sees lan's private address.
    let sink = udp_bind(&lab.wan2, sa(WAN2_IP, 9996))?;
    let s = udp_bind(&lab.lan, sa(LAN_IP, 44000))?;
    s.send_to(b"after detach", sa(WAN2_IP, 9996))?;
    match tools::udp_recv(&sink, Duration::from_secs(3))? {
        Some((_, from)) if from == SocketAddr::V4(sa(LAN_IP, 44000)) => Ok(()),
        Some((_, from)) => bail!("after detach, wan2 saw lan's datagram from {from}: still translated"),
        None => bail!("after detach, lan's datagram did not reach wan2 at all"),
    }
}

#[test]
fn a_persisted_internal_iface_is_adopted_and_detach_restores_its_sysctl() -> Result<()> {
    let lab = Lab::new("rstlan")?;
    // The fast path redirects to these veths; see ops::enable_fast_path_delivery.
    ops::enable_fast_path_delivery(&lab)?;
    let guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let key = format!("net.ipv4.conf.{}.accept_local", lab.lan_if);
    let original = ops::sysctl_get(&lab.nat, &key)?;
    let wan_if = lab.wan_if.clone();
    let lan_if = lab.lan_if.clone();

    let mut first = NatProcess::attach(&lab, &["--persist", "--internal-iface", &lan_if])?;
    ensure!(
        ops::sysctl_get(&lab.nat, &key)? == "1",
        "{key} not set while attached"
    );
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let flow = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))?;
    let pingpong = PingPong::start(&lab.lan, &lab.wan, 41000, 7001)?;
    thread::sleep(Duration::from_millis(500));
    let stats0 = first.stats()?;
    let seq_stop = pingpong.sent.load(Ordering::Relaxed);
    let st = first.terminate()?;
    ensure!(
        st.success(),
        "the --persist daemon exited {st}: {}",
        first.stderr()
    );

    // No daemon: the internal side's program and its sysctl stay.
    let lan_left = Leftovers::inspect(&lab.nat, &lan_if)?;
    ensure!(
        lan_left.xdp_in_ip_link.is_some(),
        "the internal XDP program went with the daemon"
    );
    ensure!(
        ops::sysctl_get(&lab.nat, &key)? == "1",
        "{key} restored while the NAT still runs"
    );
    ensure!(
        ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))? == ext,
        "flow changed with no daemon"
    );

    // Adopt without repeating --internal-iface: the persisted internal side is kept.
    let second = NatProcess::attach(&lab, &["--persist"])?;
    let seq_adopted = pingpong.sent.load(Ordering::Relaxed);
    ensure!(
        second.attached_line().contains("adopted"),
        "no adoption: {}",
        second.attached_line()
    );
    thread::sleep(Duration::from_millis(500));
    let (sent, got) = pingpong.finish();
    let lost_window = (seq_stop..seq_adopted).filter(|n| !got.contains(n)).count();
    println!(
        "restart with --internal-iface: UDP ping-pong {sent} sent, {} lost in all, {lost_window} of {} lost \
         between SIGTERM and the adopting attach",
        sent - got.len() as u64,
        seq_adopted - seq_stop
    );
    let programs = ops::status(&second)?["programs"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        programs.contains(&lan_if),
        "status programs after adoption: {programs}"
    );
    ensure!(
        ops::whoami_via(&lab, &second, &flow, sa(WAN_IP, 9999))? == ext,
        "flow changed after adoption"
    );
    let stats1 = second.stats()?;
    match ops::fast_path_unavailable(&second)? {
        // Kernels before 6.3: the adopted program still hairpins and translates, through the
        // kernel's forwarding path.
        Some(reason) => println!("no fast path on this kernel: {reason}"),
        None => ensure!(
            stats1.delta(&stats0, "fast_path_redirected")? > 0,
            "the adopted fast path carries nothing: {}",
            stats1.changes(&stats0)
        ),
    }
    second.stop()?;

    ops::ctl_ok(&lab.nat, &["detach", &wan_if])?;
    expect_nothing_left(&lab, &wan_if, &[&lan_if])?;
    let now = ops::sysctl_get(&lab.nat, &key)?;
    ensure!(
        now == original,
        "{key} is {now} after detach, was {original} before attach"
    );
    drop(guard);
    Ok(())
}

#[test]
fn adopting_without_persist_takes_over_and_removes_everything_on_stop() -> Result<()> {
    let lab = Lab::new("rstonce")?;
    ops::enable_fast_path_delivery(&lab)?;
    let guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let key = format!("net.ipv4.conf.{}.accept_local", lab.lan_if);
    let original = ops::sysctl_get(&lab.nat, &key)?;
    let mut first = NatProcess::attach(&lab, &["--persist", "--internal-iface", &lab.lan_if])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let flow = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["udp", "5353", "10.0.0.2:5353"])?;

    // A crash (SIGKILL: no cleanup at all) is what Restart=on-failure restarts from.
    kill_daemon(&mut first)?;
    ensure!(
        ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))? == ext,
        "after the daemon was killed, the flow no longer maps to {ext}"
    );

    // An attach without --persist adopts it; its stop then removes everything.
    let second = attach_adopting(&lab, &[], &flow, ext, "a crash")?;
    ensure!(
        ops::forwards_in(&lab.nat, &lab.wan_if)?
            == vec![forward_entry("udp", sa(NAT_EXT, 5353), sa(LAN_IP, 5353))],
        "forward lost across the crash"
    );
    second.stop()?;
    expect_nothing_left(&lab, &lab.wan_if, &[&lab.lan_if])?;
    let now = ops::sysctl_get(&lab.nat, &key)?;
    ensure!(now == original, "{key} is {now} after the stop, was {original}");
    drop(guard);
    Ok(())
}

#[test]
fn detach_without_a_nat_is_refused_with_one_line() -> Result<()> {
    let lab = Lab::new("rstnone")?;
    let nosuch = lab.names.iface("zz");
    for iface in [lab.wan_if.as_str(), nosuch.as_str()] {
        let out = ops::ctl(&lab.nat, &["detach", iface])?;
        ops::refused(&format!("detach {iface} with no NAT"), &out)?;
    }
    // A NAT that does not persist is stopped with SIGTERM; detach refuses while it runs.
    let nat = NatProcess::attach(&lab, &[])?;
    ops::refused(
        "detach of a running daemon",
        &ops::ctl(&lab.nat, &["detach", &lab.wan_if])?,
    )?;
    let out = tools::ping(&lab.lan, WAN_IP, 1, &[])?;
    ensure!(
        tools::ping_received(&out) == 1,
        "the NAT stopped working after a refused detach"
    );
    nat.stop()
}

#[test]
fn the_packaged_config_starts_keeps_translating_after_exit_and_is_adopted() -> Result<()> {
    // packaging/nat.toml as the systemd unit runs it (persist = true, metrics on loopback),
    // with the lab's interface on the command line in place of the file's eth0: it must start
    // on every supported kernel (clsact egress before 6.6, TCX after).
    let lab = Lab::new("rstpkg")?;
    let guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nat.toml");
    let config = config.to_str().context("non-UTF-8 path")?;
    let mut first = NatProcess::attach(&lab, &["--config", config])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let flow = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))?;
    ensure!(*ext.ip() == NAT_EXT, "wan saw {ext}");
    let status = first.terminate()?;
    ensure!(
        status.success(),
        "the packaged daemon exited with {status} on SIGTERM"
    );
    ensure!(
        ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))? == ext,
        "the packaged config stopped translating when the daemon exited"
    );
    let second = attach_adopting(&lab, &["--config", config], &flow, ext, "a restart")?;
    second.stop()?;
    ops::ctl_ok(&lab.nat, &["detach", &lab.wan_if])?;
    expect_nothing_left(&lab, &lab.wan_if, &[])?;
    drop(guard);
    Ok(())
}

#[test]
fn a_killed_daemon_leaves_the_nat_translating_and_the_next_attach_adopts_it() -> Result<()> {
    // No --persist: only a clean stop takes the NAT down. SIGKILL (as the OOM killer sends)
    // under traffic must neither stop translation nor let an internal address out.
    let lab = Lab::new("rstkill")?;
    let guard = PersistGuard::new(&lab.nat, &lab.wan_if);
    let mut first = NatProcess::attach(&lab, &[])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let flow = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext = ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))?;
    let pingpong = PingPong::start(&lab.lan, &lab.wan, 41000, 9998)?;
    thread::sleep(Duration::from_millis(300));

    kill_daemon(&mut first)?;
    thread::sleep(Duration::from_millis(500));
    let (sent, got) = pingpong.finish();
    let lost = sent - got.len() as u64;
    println!("SIGKILL under traffic: UDP ping-pong {sent} sent, {lost} lost");
    ensure!(
        lost * 10 < sent,
        "{lost} of {sent} datagrams lost around the SIGKILL"
    );

    // Old and new flows are translated; nothing leaves with lan's own address.
    let wan_cap = Sniffer::open(&lab.wan, HOST_IF)?;
    ensure!(
        ops::whoami_via(&lab, &first, &flow, sa(WAN_IP, 9999))? == ext,
        "after SIGKILL the flow no longer maps to {ext}"
    );
    let fresh = udp_bind(&lab.lan, sa(LAN_IP, 40001))?;
    let fresh_ext = ops::whoami_via(&lab, &first, &fresh, sa(WAN_IP, 9999))?;
    ensure!(
        *fresh_ext.ip() == NAT_EXT,
        "a new flow after SIGKILL left as {fresh_ext}"
    );
    let leaked: Vec<_> = wan_cap
        .capture_for(Duration::from_millis(300))
        .iter()
        .filter_map(|f| f.ipv4().map(|ip| ip.src()))
        .filter(|src| *src == LAN_IP)
        .collect();
    ensure!(
        leaked.is_empty(),
        "{} packets left with lan's address",
        leaked.len()
    );

    // status tells a dead daemon from a running one.
    let status = ops::ctl_ok(&lab.nat, &["status", "-i", &lab.wan_if, "--json"])?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(
        status["daemon"] == "gone",
        "status after SIGKILL: daemon = {}",
        status["daemon"]
    );

    // The next attach adopts it with every binding; its clean stop removes everything.
    let second = attach_adopting(&lab, &[], &flow, ext, "SIGKILL")?;
    ensure!(
        ops::status(&second)?["daemon"] == "running",
        "status of the new daemon"
    );
    second.stop()?;
    expect_nothing_left(&lab, &lab.wan_if, &[])?;
    drop(guard);
    Ok(())
}
