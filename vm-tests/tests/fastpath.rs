//! The XDP fast path: with `--internal-iface LAN`, outbound packets are
//! translated on the internal interface and redirected straight out of the external one, and
//! inbound translated packets straight to the internal one. Users must see the same results
//! as without it (ping, UDP mapping semantics, TCP data, TTL handling, traceroute, PMTU and
//! fragmentation, hairpinning), while established flows bypass the kernel's forwarding path
//! in both directions (`fast_path_redirected` grows, `Ip: ForwDatagrams` does not). What the
//! fast path cannot take (TTL 1, over the MTU) must fall back to the kernel. Root only.
//!
//! Kernel behaviour these tests depend on, not the NAT's: a veth accepts an XDP-redirected frame
//! only when the receiving peer has GRO on or an XDP program; otherwise the kernel drops it
//! silently. So every fast-path lab turns GRO on where the fast path sends
//! ([`ops::enable_fast_path_delivery`]). Lab hosts keep TX checksum offload off (the library
//! does that), as a wire would.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{FAR_IP, HOST_IF, LAN2_IP, LAN_GW, LAN_IP, NAT_EXT, RTR_IP, WAN2_IP, WAN_IP};
use vm_tests::netns::Netns;
use vm_tests::ops::{self, sa};
use vm_tests::packet::{Sniffer, PROTO_ICMP, PROTO_UDP};
use vm_tests::tools::{self, udp_bind, udp_expect, udp_recv, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

/// A lab whose veths accept the fast path's redirected frames (GRO on the receiving peers).
fn fast_lab(tag: &str, opts: LabOptions) -> Result<Lab> {
    let lab = Lab::with(tag, opts)?;
    ops::enable_fast_path_delivery(&lab)?;
    Ok(lab)
}

/// Attaches with the fast path on every internal interface of the lab, or without any
/// internal interface (`--internal-iface none`: the default would find the lab's LAN side).
fn attach(lab: &Lab, fast: bool, extra: &[&str]) -> Result<NatProcess> {
    let mut args: Vec<&str> = extra.to_vec();
    if fast {
        args.extend(["--internal-iface", lab.lan_if.as_str()]);
        if let Some(l2) = &lab.lan2_if {
            args.extend(["--internal-iface", l2.as_str()]);
        }
    } else {
        args.extend(["--internal-iface", "none"]);
    }
    NatProcess::attach(lab, &args)
}

fn label(fast: bool) -> &'static str {
    if fast {
        "with --internal-iface"
    } else {
        "with --internal-iface none"
    }
}

/// 64-bit FNV-1a, to compare transfers by a printed hash.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a user observes through the NAT; must be identical with and without the fast path.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    ping_replies: u32,
    /// TTL of the echo requests as wan receives them (64 minus the NAT's hop).
    request_ttl_at_wan: Vec<u8>,
    /// TTL of the echo replies as ping prints them.
    reply_ttl_at_lan: Vec<u8>,
    /// UDP from 10.0.0.2:40000 as wan and wan2 see it.
    udp_to_wan: SocketAddrV4,
    udp_to_wan2: SocketAddrV4,
    /// Source of a TCP connection from 10.0.0.2:<port> as wan sees it: address, and whether the
    /// port was kept.
    tcp_source_ip: Ipv4Addr,
    tcp_port_kept: bool,
    /// FNV-1a of the 4 MiB sent and of what came back.
    tcp_sent_hash: u64,
    tcp_back_hash: u64,
}

fn observe(lab: &Lab, run: u16) -> Result<Observed> {
    let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    let ping = tools::ping(&lab.lan, WAN_IP, 3, &[])?;
    let reply_ttl_at_lan: Vec<u8> = ping
        .stdout
        .lines()
        .filter_map(|l| l.split("ttl=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let request_ttl_at_wan: Vec<u8> = sniff
        .capture_for(Duration::from_millis(300))
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| ip.proto() == PROTO_ICMP && ip.icmp().is_some_and(|i| i.kind() == 8))
        .map(|ip| ip.ttl())
        .collect();

    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let udp_to_wan = whoami(&sock, sa(WAN_IP, 9999))?;
    let udp_to_wan2 = whoami(&sock, sa(WAN2_IP, 9999))?;

    let port = 5001 + run;
    let _who = tools::tcp_whoami(&lab.wan, WAN_IP, 6001 + run)?;
    let (seen, local) = tools::tcp_whoami_query(&lab.lan, sa(WAN_IP, 6001 + run))?;
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, port)?;
    let data = tools::pattern(4 << 20, 0xfa57 + u64::from(run));
    let back = tools::tcp_roundtrip(tools::tcp_connect(&lab.lan, sa(WAN_IP, port))?, &data)?;
    Ok(Observed {
        ping_replies: tools::ping_received(&ping),
        request_ttl_at_wan,
        reply_ttl_at_lan,
        udp_to_wan,
        udp_to_wan2,
        tcp_source_ip: *seen.ip(),
        tcp_port_kept: SocketAddr::V4(seen).port() == local.port(),
        tcp_sent_hash: fnv1a(&data),
        tcp_back_hash: fnv1a(&back),
    })
}

#[test]
fn ping_udp_and_tcp_give_the_same_results_with_and_without_the_fast_path() -> Result<()> {
    let lab = fast_lab("fpsame", LabOptions::default())?;
    let _w1 = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let _w2 = udp_whoami(&lab.wan2, WAN2_IP, 9999)?;
    let mut seen = Vec::new();
    for (run, fast) in [false, true].into_iter().enumerate() {
        let nat = attach(&lab, fast, &[])?;
        let before = nat.stats()?;
        let o = observe(&lab, run as u16).with_context(|| label(fast))?;
        let after = nat.stats()?;
        let fp = after.delta(&before, "fast_path_redirected")?;
        println!("{}: {o:?}; fast_path_redirected +{fp}", label(fast));
        ensure!(
            o.ping_replies == 3,
            "{}: {} of 3 pings answered",
            label(fast),
            o.ping_replies
        );
        ensure!(
            o.request_ttl_at_wan.len() >= 3 && o.request_ttl_at_wan.iter().all(|t| *t == 63),
            "{}: echo requests reached wan with TTL {:?}, expected 63 (64 less the NAT's hop)",
            label(fast),
            o.request_ttl_at_wan
        );
        ensure!(
            *o.udp_to_wan.ip() == NAT_EXT && o.udp_to_wan == o.udp_to_wan2,
            "{}: UDP mapping {} / {} is not one endpoint-independent external endpoint",
            label(fast),
            o.udp_to_wan,
            o.udp_to_wan2
        );
        ensure!(
            o.tcp_sent_hash == o.tcp_back_hash,
            "{}: the 4 MiB TCP echo came back different ({:016x} sent, {:016x} back)",
            label(fast),
            o.tcp_sent_hash,
            o.tcp_back_hash
        );
        if fast {
            ensure!(
                fp > 0,
                "with --internal-iface, fast_path_redirected did not grow: {}",
                after.changes(&before)
            );
        } else {
            ensure!(
                fp == 0,
                "with --internal-iface none, fast_path_redirected grew by {fp}"
            );
        }
        nat.stop()?;
        seen.push(o);
    }
    // Same observations (the TCP payload differs per run by design: compare its integrity).
    let (a, b) = (&seen[0], &seen[1]);
    ensure!(
        a.ping_replies == b.ping_replies
            && a.request_ttl_at_wan == b.request_ttl_at_wan
            && a.reply_ttl_at_lan == b.reply_ttl_at_lan
            && a.udp_to_wan == b.udp_to_wan
            && a.udp_to_wan2 == b.udp_to_wan2
            && a.tcp_source_ip == b.tcp_source_ip
            && a.tcp_port_kept == b.tcp_port_kept,
        "results differ:\nwithout the fast path {a:#?}\nwith it {b:#?}"
    );
    Ok(())
}

#[test]
fn established_flows_bypass_kernel_forwarding_in_both_directions() -> Result<()> {
    const N: u64 = 50;
    let lab = fast_lab("fpboth", LabOptions::default())?;
    for fast in [false, true] {
        let nat = attach(&lab, fast, &[])?;
        let lan = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
        let remote = udp_bind(&lab.wan, sa(WAN_IP, 9999))?;
        // First exchange: binding, and neighbour entries on both sides.
        lan.send_to(b"hello", sa(WAN_IP, 9999))?;
        let (_, ext) = udp_recv(&remote, Duration::from_secs(3))?.context("first datagram lost")?;
        remote.send_to(b"hello back", ext)?;
        udp_expect(&lan, b"hello back", Duration::from_secs(3))?.context("first reply lost")?;

        let s0 = nat.stats()?;
        let f0 = ops::forwarded_datagrams(&lab.nat)?;
        for i in 0..N {
            lan.send_to(format!("out {i}").as_bytes(), sa(WAN_IP, 9999))?;
            udp_expect(&remote, format!("out {i}").as_bytes(), Duration::from_secs(3))?
                .with_context(|| format!("{}: outbound datagram {i} lost", label(fast)))?;
        }
        let s1 = nat.stats()?;
        let f1 = ops::forwarded_datagrams(&lab.nat)?;
        for i in 0..N {
            remote.send_to(format!("in {i}").as_bytes(), ext)?;
            udp_expect(&lan, format!("in {i}").as_bytes(), Duration::from_secs(3))?
                .with_context(|| format!("{}: inbound datagram {i} lost", label(fast)))?;
        }
        let s2 = nat.stats()?;
        let f2 = ops::forwarded_datagrams(&lab.nat)?;
        let (out_fp, in_fp) = (
            s1.delta(&s0, "fast_path_redirected")?,
            s2.delta(&s1, "fast_path_redirected")?,
        );
        let (out_fwd, in_fwd) = (f1 - f0, f2 - f1);
        println!(
            "{}: {N} out: fast_path_redirected +{out_fp}, kernel ForwDatagrams +{out_fwd}; \
             {N} in: fast_path_redirected +{in_fp}, ForwDatagrams +{in_fwd}",
            label(fast)
        );
        ensure!(
            s1.delta(&s0, "translated_out")? >= N && s2.delta(&s1, "translated_in")? >= N,
            "{}: translation counters {} / {}",
            label(fast),
            s1.changes(&s0),
            s2.changes(&s1)
        );
        if fast {
            ensure!(
                out_fp >= N && in_fp >= N,
                "with the fast path, established packets were not redirected: out +{out_fp}, in +{in_fp} of {N}"
            );
            ensure!(
                out_fwd < N / 10 && in_fwd < N / 10,
                "with the fast path, the kernel still forwarded the established flow: out +{out_fwd}, in +{in_fwd} of {N}"
            );
        } else {
            ensure!(
                out_fp == 0 && in_fp == 0,
                "with --internal-iface none, fast_path_redirected grew: +{out_fp}/+{in_fp}"
            );
            // The control: the same traffic through the kernel shows in ForwDatagrams.
            ensure!(
                out_fwd >= N && in_fwd >= N,
                "kernel path: ForwDatagrams grew by only {out_fwd}/{in_fwd} for {N} packets each way"
            );
        }
        nat.stop()?;
    }
    Ok(())
}

/// Hops of `traceroute -n -q 1` output: (hop number, address).
fn hops(out: &str) -> Vec<(u32, String)> {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_string()))
        })
        .collect()
}

fn set_ttl(sock: &UdpSocket, ttl: u32) -> Result<()> {
    sock.set_ttl(ttl).context("IP_TTL")
}

/// TTL handling as users see it, per mode.
#[derive(Debug, PartialEq, Eq)]
struct TtlObserved {
    traceroute_udp: Vec<(u32, String)>,
    traceroute_icmp: Vec<(u32, String)>,
    ping_ttl1: String,
    ping_ttl2: String,
    /// TTL-1 UDP datagram: (ICMP type/code, from, embedded source endpoint) seen by lan.
    udp_ttl1_error: Option<(u8, u8, Ipv4Addr, SocketAddrV4)>,
    udp_ttl1_reached_far: bool,
    /// TTL of a normal datagram at the far host (two hops: NAT and router).
    ttl_at_far: Option<u8>,
}

fn observe_ttl(lab: &Lab, run: u16) -> Result<TtlObserved> {
    let far = lab.far.as_ref().context("lab without far")?;
    let tr = |extra: &[&str]| -> Result<Vec<(u32, String)>> {
        let mut args = vec!["-n", "-q", "1", "-w", "3", "-m", "5"];
        args.extend_from_slice(extra);
        let far_s = FAR_IP.to_string();
        args.push(&far_s);
        let o = lab.lan.run("traceroute", &args, Duration::from_secs(60))?;
        Ok(hops(&o.stdout))
    };
    let traceroute_udp = tr(&["-U"])?;
    let traceroute_icmp = tr(&["-I"])?;
    let ping_line = |ttl: &str, dst: Ipv4Addr| -> Result<String> {
        let o = tools::ping(&lab.lan, dst, 1, &["-t", ttl])?;
        Ok(o.stdout
            .lines()
            .find(|l| l.starts_with("From "))
            .unwrap_or_default()
            .to_string())
    };
    let ping_ttl1 = ping_line("1", WAN_IP)?;
    let ping_ttl2 = ping_line("2", FAR_IP)?;

    let lan_port = 40100 + run;
    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    let far_sock = udp_bind(far, sa(FAR_IP, 9999))?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, lan_port))?;
    set_ttl(&sock, 1)?;
    sock.send_to(b"ttl one", sa(FAR_IP, 9999))?;
    let frames = sniff.capture(Duration::from_secs(2), |f| {
        f.ipv4().and_then(|ip| ip.icmp()).is_some_and(|i| i.is_error())
    });
    let udp_ttl1_error = frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .find_map(|ip| {
            let icmp = ip.icmp()?;
            let inner = icmp.inner()?;
            let (sp, _) = inner.ports()?;
            Some((icmp.kind(), icmp.code(), ip.src(), sa(inner.src(), sp)))
        });
    let udp_ttl1_reached_far = udp_expect(&far_sock, b"ttl one", Duration::from_millis(500))?.is_some();

    let far_sniff = Sniffer::open(far, HOST_IF)?;
    set_ttl(&sock, 64)?;
    sock.send_to(b"normal ttl", sa(FAR_IP, 9999))?;
    udp_expect(&far_sock, b"normal ttl", Duration::from_secs(3))?
        .context("a normal datagram did not reach far")?;
    let ttl_at_far = far_sniff
        .capture_for(Duration::from_millis(200))
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .find(|ip| ip.proto() == PROTO_UDP && ip.udp_data() == Some(b"normal ttl".as_slice()))
        .map(|ip| ip.ttl());
    Ok(TtlObserved {
        traceroute_udp,
        traceroute_icmp,
        ping_ttl1,
        ping_ttl2,
        udp_ttl1_error,
        udp_ttl1_reached_far,
        ttl_at_far,
    })
}

#[test]
fn ttl_is_decremented_and_expiring_packets_get_time_exceeded_as_without_the_fast_path() -> Result<()> {
    let lab = fast_lab(
        "fpttl",
        LabOptions {
            rtr: true,
            ..Default::default()
        },
    )?;
    // The kernel rate-limits the ICMP errors it sends to one host (1/s, burst 6); this test
    // provokes more than that from the NAT within seconds. Lift the limit in the NAT's
    // namespace so a missing error can only be the NAT's doing.
    lab.nat.sysctl("net.ipv4.icmp_ratelimit", "0")?;
    let mut seen = Vec::new();
    for (run, fast) in [false, true].into_iter().enumerate() {
        let nat = attach(&lab, fast, &[])?;
        let before = nat.stats()?;
        let o = observe_ttl(&lab, run as u16).with_context(|| label(fast))?;
        let after = nat.stats()?;
        println!(
            "{}: {o:?}; fast_path_redirected +{}",
            label(fast),
            after.delta(&before, "fast_path_redirected")?
        );
        let want_hops = |h: &[(u32, String)]| {
            h.iter().any(|(n, a)| *n == 1 && *a == LAN_GW.to_string())
                && h.iter().any(|(n, a)| *n == 2 && *a == RTR_IP.to_string())
                && h.iter().any(|(n, a)| *n == 3 && *a == FAR_IP.to_string())
        };
        ensure!(
            want_hops(&o.traceroute_udp) && want_hops(&o.traceroute_icmp),
            "{}: traceroute should list the NAT {LAN_GW}, the router {RTR_IP}, then {FAR_IP}: {o:#?}",
            label(fast)
        );
        ensure!(
            o.ping_ttl1.starts_with(&format!("From {LAN_GW} "))
                && o.ping_ttl1.contains("Time to live exceeded"),
            "{}: ping -t 1: {:?}",
            label(fast),
            o.ping_ttl1
        );
        ensure!(
            o.ping_ttl2.starts_with(&format!("From {RTR_IP} "))
                && o.ping_ttl2.contains("Time to live exceeded"),
            "{}: ping -t 2: {:?}",
            label(fast),
            o.ping_ttl2
        );
        ensure!(
            o.udp_ttl1_error == Some((11, 0, LAN_GW, sa(LAN_IP, 40100 + run as u16))),
            "{}: a TTL-1 datagram should get time exceeded from the NAT {LAN_GW} quoting \
             10.0.0.2:{}; got {:?}",
            label(fast),
            40100 + run,
            o.udp_ttl1_error
        );
        ensure!(
            !o.udp_ttl1_reached_far,
            "{}: a TTL-1 datagram crossed the NAT",
            label(fast)
        );
        ensure!(
            o.ttl_at_far == Some(62),
            "{}: TTL at far {:?}, expected 62",
            label(fast),
            o.ttl_at_far
        );
        if fast {
            ensure!(
                after.delta(&before, "fast_path_redirected")? > 0,
                "the fast path carried none of it: {}",
                after.changes(&before)
            );
        }
        nat.stop()?;
        seen.push(o);
    }
    ensure!(
        seen[0].traceroute_udp == seen[1].traceroute_udp
            && seen[0].traceroute_icmp == seen[1].traceroute_icmp
            && seen[0].ping_ttl1 == seen[1].ping_ttl1
            && seen[0].ping_ttl2 == seen[1].ping_ttl2
            && seen[0].ttl_at_far == seen[1].ttl_at_far,
        "TTL handling differs:\nwithout the fast path {:#?}\nwith it {:#?}",
        seen[0],
        seen[1]
    );
    Ok(())
}

/// `IP_MTU_DISCOVER` on a UDP socket: `IP_PMTUDISC_DONT` (DF=0) or `IP_PMTUDISC_DO` (DF=1).
fn set_pmtudisc(sock: &UdpSocket, value: libc::c_int) -> Result<()> {
    // SAFETY: setsockopt with an int option on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
struct MtuObserved {
    /// DF=0, 1400 bytes: arrived whole at wan, from the same external endpoint as a small one.
    df0_arrived_whole: bool,
    df0_same_endpoint: bool,
    /// Fragments of it that wan received.
    df0_fragments_at_wan: usize,
    /// wan's small answer reached lan.
    answer_reached_lan: bool,
    /// DF=1, 1400 bytes: the ICMP error lan got (type, code, from, next-hop MTU).
    df1_error: Option<(u8, u8, Ipv4Addr, u16)>,
    df1_reached_wan: bool,
}

fn observe_mtu(lab: &Lab, run: u16) -> Result<MtuObserved> {
    // Start from a clean route cache: no path MTU learned by an earlier run.
    lab.lan.ip(&["route", "flush", "cache"])?;
    let big = tools::pattern(1400, 0x1400 + u64::from(run));
    let remote = udp_bind(&lab.wan, sa(WAN_IP, 9990 + run))?;
    let df0 = udp_bind(&lab.lan, sa(LAN_IP, 40200 + run))?;
    set_pmtudisc(&df0, libc::IP_PMTUDISC_DONT)?;
    df0.send_to(b"small", sa(WAN_IP, 9990 + run))?;
    let (_, small_from) = udp_recv(&remote, Duration::from_secs(3))?.context("small datagram lost")?;
    let wan_sniff = Sniffer::open(&lab.wan, HOST_IF)?;
    df0.send_to(&big, sa(WAN_IP, 9990 + run))?;
    let got = udp_recv(&remote, Duration::from_secs(3))?;
    let df0_fragments_at_wan = wan_sniff
        .capture_for(Duration::from_millis(200))
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .filter(|ip| ip.src() == NAT_EXT && (ip.more_fragments() || ip.frag_offset() > 0))
        .count();
    let (df0_arrived_whole, df0_same_endpoint) = match &got {
        Some((data, from)) => (*data == big, *from == small_from),
        None => (false, false),
    };
    remote.send_to(b"answer", small_from)?;
    let answer_reached_lan = udp_expect(&df0, b"answer", Duration::from_secs(3))?.is_some();

    let df1 = udp_bind(&lab.lan, sa(LAN_IP, 40300 + run))?;
    set_pmtudisc(&df1, libc::IP_PMTUDISC_DO)?;
    let sniff = Sniffer::open(&lab.lan, HOST_IF)?;
    df1.send_to(&big, sa(WAN_IP, 9990 + run))?;
    let frames = sniff.capture(Duration::from_secs(2), |f| {
        f.ipv4().and_then(|ip| ip.icmp()).is_some_and(|i| i.is_error())
    });
    let df1_error = frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| f.ipv4())
        .find_map(|ip| {
            let icmp = ip.icmp()?;
            icmp.is_error().then_some(())?;
            let p = ip.payload();
            Some((
                icmp.kind(),
                icmp.code(),
                ip.src(),
                u16::from_be_bytes([p[6], p[7]]),
            ))
        });
    let df1_reached_wan = udp_recv(&remote, Duration::from_millis(500))?.is_some();
    Ok(MtuObserved {
        df0_arrived_whole,
        df0_same_endpoint,
        df0_fragments_at_wan,
        answer_reached_lan,
        df1_error,
        df1_reached_wan,
    })
}

#[test]
fn packets_over_the_external_mtu_fall_back_to_the_kernel_as_without_the_fast_path() -> Result<()> {
    let lab = fast_lab("fpmtu", LabOptions::default())?;
    // The NAT's external link gets a smaller MTU than the internal one.
    lab.nat.ip(&["link", "set", "dev", &lab.wan_if, "mtu", "1280"])?;
    let mut seen = Vec::new();
    for (run, fast) in [false, true].into_iter().enumerate() {
        let nat = attach(&lab, fast, &[])?;
        let o = observe_mtu(&lab, run as u16).with_context(|| label(fast))?;
        println!("{}: {o:?}", label(fast));
        ensure!(
            o.df0_arrived_whole && o.df0_same_endpoint && o.df0_fragments_at_wan >= 2,
            "{}: a 1400-byte DF=0 datagram over the 1280 MTU should be fragmented by the NAT and \
             arrive whole from the flow's external endpoint: {o:?}",
            label(fast)
        );
        ensure!(
            o.answer_reached_lan,
            "{}: wan's answer did not reach lan",
            label(fast)
        );
        ensure!(
            o.df1_error == Some((3, 4, LAN_GW, 1280)),
            "{}: a 1400-byte DF=1 datagram should get fragmentation needed (3/4, MTU 1280) from \
             {LAN_GW}; got {:?}",
            label(fast),
            o.df1_error
        );
        ensure!(
            !o.df1_reached_wan,
            "{}: the DF=1 datagram crossed a 1280 MTU",
            label(fast)
        );
        nat.stop()?;
        seen.push(o);
    }
    ensure!(
        seen[0] == seen[1],
        "MTU handling differs:\nwithout the fast path {:#?}\nwith it {:#?}",
        seen[0],
        seen[1]
    );
    Ok(())
}

#[test]
fn hairpinning_works_with_the_fast_path() -> Result<()> {
    let lab = fast_lab(
        "fphair",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    let nat = attach(&lab, true, &["--mode", "full-cone"])?;
    let lan2: &Netns = lab.lan2();
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let s1 = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let s2 = udp_bind(lan2, sa(LAN2_IP, 40000))?;
    let x1 = whoami(&s1, sa(WAN_IP, 9999))?;
    let x2 = whoami(&s2, sa(WAN_IP, 9999))?;
    let before = nat.stats()?;

    // UDP, both ways, each arriving from the sender's external endpoint (REQ-9a).
    for (from_sock, to_sock, from_ext, to_ext, what) in [
        (&s1, &s2, x1, x2, "lan -> lan2"),
        (&s2, &s1, x2, x1, "lan2 -> lan"),
    ] {
        let msg = format!("hairpin {what}");
        from_sock.send_to(msg.as_bytes(), to_ext)?;
        let from = udp_expect(to_sock, msg.as_bytes(), Duration::from_secs(3))?
            .with_context(|| format!("{what} to {to_ext} was not hairpinned"))?;
        ensure!(
            from == SocketAddr::V4(from_ext),
            "{what} arrived from {from}, expected {from_ext}"
        );
    }

    // TCP to a server behind the NAT through its public address (a forward), with data.
    let _whoami_srv = tools::tcp_whoami(lan2, LAN2_IP, 80)?;
    let _echo_srv = tools::tcp_echo(lan2, LAN2_IP, 5001)?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["tcp", "8080", "10.0.1.2:80"])?;
    ops::forward_ok(&lab.nat, &lab.wan_if, "add", &["tcp", "8081", "10.0.1.2:5001"])?;
    let (seen, local) = tools::tcp_whoami_query(&lab.lan, sa(NAT_EXT, 8080))
        .context("lan -> the NAT's public 8080 (forwarded to lan2) was not hairpinned")?;
    ensure!(
        *seen.ip() == NAT_EXT,
        "the server on lan2 saw the hairpinned connection from {seen} (lan is {local}); it must \
         come from lan's external address"
    );
    let data = tools::pattern(1 << 20, 0x4a1f);
    let stream = tools::tcp_connect(&lab.lan, sa(NAT_EXT, 8081))?;
    let back = tools::tcp_roundtrip(stream, &data)?;
    ensure!(
        fnv1a(&back) == fnv1a(&data) && back.len() == data.len(),
        "1 MiB echoed over a hairpinned connection came back different ({} bytes)",
        back.len()
    );
    let after = nat.stats()?;
    ensure!(
        after.delta(&before, "hairpinned")? > 0,
        "hairpinned did not count: {}",
        after.changes(&before)
    );
    // And traffic to the Internet keeps using the fast path alongside.
    let b = nat.stats()?;
    ensure!(whoami(&s1, sa(WAN_IP, 9999))? == x1, "lan's mapping changed");
    let a = nat.stats()?;
    ensure!(
        a.delta(&b, "fast_path_redirected")? >= 2,
        "lan <-> wan did not take the fast path next to hairpinning: {}",
        a.changes(&b)
    );
    nat.stop()
}

#[test]
fn without_gro_on_the_veths_the_kernel_path_still_carries_the_traffic() -> Result<()> {
    // Without GRO on the receiving veths the kernel would drop redirected frames silently; the
    // NAT must then keep using the kernel path, so traffic still flows: it falls back, never fails.
    let lab = Lab::new("fpnogro")?;
    let nat = attach(&lab, true, &[])?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
    let ext =
        whoami(&sock, sa(WAN_IP, 9999)).context("with --internal-iface and no GRO on the lab's veths")?;
    ensure!(*ext.ip() == NAT_EXT, "source {ext}");
    let ping = tools::ping(&lab.lan, WAN_IP, 3, &[])?;
    ensure!(
        tools::ping_received(&ping) == 3,
        "ping without GRO on the veths: {}",
        ping.stdout
    );
    nat.stop()
}

#[test]
fn checksums_left_to_offload_take_the_kernel_path_with_the_same_results() -> Result<()> {
    // lan offloads its transmit checksums (as a container behind a veth often does): its
    // packets reach the NAT carrying only a pseudo-header seed, which the kernel path must
    // complete. Everything must still arrive with valid checksums, with or without the fast
    // path.
    let lab = fast_lab("fpcsum", LabOptions::default())?;
    lab.lan
        .run_ok("ethtool", &["-K", HOST_IF, "tx", "on"], Duration::from_secs(20))?;
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let mut seen = Vec::new();
    for (run, fast) in [false, true].into_iter().enumerate() {
        let nat = attach(&lab, fast, &[])?;
        let before = nat.stats()?;
        let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
        let sock = udp_bind(&lab.lan, sa(LAN_IP, 40000))?;
        let ext = whoami(&sock, sa(WAN_IP, 9999)).with_context(|| format!("{}: UDP", label(fast)))?;
        let port = 5001 + run as u16;
        let _echo = tools::tcp_echo(&lab.wan, WAN_IP, port)?;
        let data = tools::pattern(1 << 20, 0xc5 + run as u64);
        let back = tools::tcp_roundtrip(tools::tcp_connect(&lab.lan, sa(WAN_IP, port))?, &data)
            .with_context(|| format!("{}: TCP", label(fast)))?;
        ensure!(
            back == data,
            "{}: the 1 MiB echo came back different",
            label(fast)
        );
        let (mut good, mut bad) = (0, 0);
        for ip in sniff
            .capture_for(Duration::from_millis(300))
            .iter()
            .filter(|f| !f.outgoing)
            .filter_map(|f| f.ipv4())
            .filter(|ip| ip.src() == NAT_EXT && ip.frag_offset() == 0 && !ip.more_fragments())
        {
            if ip.l4_checksum_ok() {
                good += 1;
            } else {
                bad += 1;
            }
        }
        let after = nat.stats()?;
        println!(
            "{}: external {ext}; at wan {good} packets with valid checksums, {bad} invalid; {}",
            label(fast),
            after.changes(&before)
        );
        ensure!(
            bad == 0 && good > 0,
            "{}: wan received {bad} translated packets with a wrong UDP/TCP checksum ({good} valid)",
            label(fast)
        );
        nat.stop()?;
        seen.push(ext);
    }
    ensure!(
        seen[0] == seen[1],
        "external endpoint {} without, {} with the fast path",
        seen[0],
        seen[1]
    );
    Ok(())
}

/// Outcome of one outbound UDP packet with IP options: never leaked untranslated.
#[derive(Debug, PartialEq, Eq)]
enum OptionsOutcome {
    /// Arrived at wan from the NAT's address with valid checksums.
    Translated,
    /// Did not arrive (the NAT dropped and counted it).
    DroppedAndCounted,
}

#[test]
fn fragments_and_ip_options_get_the_same_results_with_the_fast_path() -> Result<()> {
    let lab = fast_lab("fpfrag", LabOptions::default())?;
    let gw_mac = Lab::mac(&lab.nat, &lab.lan_if)?;
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mut seen = Vec::new();
    for (run, fast) in [false, true].into_iter().enumerate() {
        let run = run as u16;
        let nat = attach(&lab, fast, &[])?;
        let before = nat.stats()?;
        // A 3000-byte datagram each way: lan's and wan's kernels fragment it.
        let remote = udp_bind(&lab.wan, sa(WAN_IP, 9980 + run))?;
        let lan = udp_bind(&lab.lan, sa(LAN_IP, 40400 + run))?;
        lan.send_to(&big, sa(WAN_IP, 9980 + run))?;
        let (got, ext) = udp_recv(&remote, Duration::from_secs(3))?
            .with_context(|| format!("{}: fragmented datagram lan -> wan lost", label(fast)))?;
        ensure!(
            got == big,
            "{}: wan reassembled {} different bytes",
            label(fast),
            got.len()
        );
        ensure!(
            matches!(ext, SocketAddr::V4(a) if *a.ip() == NAT_EXT),
            "{}: wan saw the fragmented datagram from {ext}",
            label(fast)
        );
        remote.send_to(&big, ext)?;
        let (got, from) = udp_recv(&lan, Duration::from_secs(3))?
            .with_context(|| format!("{}: fragmented datagram wan -> lan lost", label(fast)))?;
        ensure!(
            got == big && from == SocketAddr::V4(sa(WAN_IP, 9980 + run)),
            "{}: lan got {} bytes from {from}",
            label(fast),
            got.len()
        );

        // IP options (four NOPs): translated or dropped as without the fast path, never leaked.
        let mark = format!("OPTIONS-MARK-{run}");
        let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
        tools::scapy(
            &lab.lan,
            &format!(
                "sendp(Ether(dst='{gw_mac}')/IP(src='{LAN_IP}', dst='{WAN_IP}', options=[IPOption_NOP()]*4)/UDP(sport={}, dport=9999)/Raw(b'{mark}'), iface='eth0')",
                40500 + run
            ),
        )?;
        let frames = sniff.capture(Duration::from_secs(2), |f| f.contains(mark.as_bytes()));
        let arrived: Vec<_> = frames
            .iter()
            .filter(|f| !f.outgoing && f.contains(mark.as_bytes()))
            .filter_map(|f| f.ipv4())
            .collect();
        for ip in &arrived {
            ensure!(
                ip.src() == NAT_EXT && ip.header_checksum_ok() && ip.l4_checksum_ok(),
                "{}: a packet with IP options left as {} (checksums ok: {} {})",
                label(fast),
                ip.src(),
                ip.header_checksum_ok(),
                ip.l4_checksum_ok()
            );
        }
        let after = nat.stats()?;
        let outcome = if arrived.is_empty() {
            ensure!(
                after.delta(&before, "malformed")? + after.delta(&before, "unsupported_protocol")? > 0,
                "{}: the packet with IP options vanished uncounted: {}",
                label(fast),
                after.changes(&before)
            );
            OptionsOutcome::DroppedAndCounted
        } else {
            OptionsOutcome::Translated
        };
        println!(
            "{}: fragments both ways ok; IP options: {outcome:?}; {}",
            label(fast),
            after.changes(&before)
        );
        nat.stop()?;
        seen.push(outcome);
    }
    ensure!(
        seen[0] == seen[1],
        "IP options: {:?} without, {:?} with the fast path",
        seen[0],
        seen[1]
    );
    Ok(())
}
