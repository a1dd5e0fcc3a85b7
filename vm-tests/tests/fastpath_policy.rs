//! The fast path obeys the host's policy. With nftables forward-chain rules in
//! the NAT's namespace, our NAT with and without `--internal-iface` must do what nftables
//! masquerade does: nothing reaches a destination the forward chain drops, no answer comes back
//! from a source it drops (also through a static forward), and the rules' counters count every
//! packet; flows the rules allow still take the fast path after their first packets. And no
//! internal host may send as the gateway: datagrams from the inside with the NAT's external
//! address (and another host's external port), the gateway's own address, or an Internet
//! address as their source never leave on the external side, and `spoofed_source` counts them
//! where the internal-side program runs. Root only.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{HOST_IF, LAN2_IP, LAN_GW, LAN_IP, NAT_EXT, WAN2_IP, WAN_IP, WAN_IP2};
use vm_tests::netns::Netns;
use vm_tests::ops::{self, sa};
use vm_tests::packet::Sniffer;
use vm_tests::tools::{self, udp_bind, udp_expect, udp_recv, udp_whoami, whoami};
use vm_tests::{Lab, LabOptions, NatProcess};

/// Datagrams per checked case.
const N: usize = 20;
/// How long after the last datagram anything still on its way may take to arrive.
const SETTLE: Duration = Duration::from_millis(1500);
/// The whoami server on wan that lan2 talks to, and lan forges datagrams to.
const WHOAMI_PORT: u16 = 9999;
/// nftables table holding the forward-chain policy.
const POLICY_TABLE: &str = "fppolicy";
/// nftables table holding the masquerade reference's NAT rules.
const MASQ_TABLE: &str = "fpmasq";
/// The static forward every gateway gets: external UDP port -> lan's port.
const FORWARD_EXT_PORT: u16 = 8053;
const FORWARD_INT_PORT: u16 = 5353;
/// Rule texts as `nft list` prints them, for their counters.
const DROP_DST_MATCH: &str = "ip daddr 198.51.100.3";
const DROP_SRC_MATCH: &str = "ip saddr 198.51.100.2";

/// The gateway under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gateway {
    /// nftables masquerade (and a dnat rule for the forward): the reference.
    Masquerade,
    /// Our NAT with `--internal-iface none` (every packet through the kernel's forwarding).
    Nat,
    /// Our NAT with `--internal-iface` (the XDP fast path where the kernel allows it).
    NatFastPath,
}

impl Gateway {
    fn label(self) -> &'static str {
        match self {
            Gateway::Masquerade => "nftables masquerade",
            Gateway::Nat => "our NAT with --internal-iface none",
            Gateway::NatFastPath => "our NAT with --internal-iface",
        }
    }
}

/// Runs `nft CMDS` (one string of `;`-separated commands) in `ns`.
fn nft(ns: &Netns, cmds: &str) -> Result<()> {
    ns.run_ok("nft", &[cmds], Duration::from_secs(10))?;
    Ok(())
}

/// Starts `gw` on the lab's NAT namespace, with its static forward; `None` for masquerade.
fn start(lab: &Lab, gw: Gateway) -> Result<Option<NatProcess>> {
    let forward_to = sa(LAN_IP, FORWARD_INT_PORT).to_string();
    match gw {
        Gateway::Masquerade => {
            nft(
                &lab.nat,
                &format!(
                    "add table ip {MASQ_TABLE}; \
                     add chain ip {MASQ_TABLE} pre {{ type nat hook prerouting priority dstnat; policy accept; }}; \
                     add chain ip {MASQ_TABLE} post {{ type nat hook postrouting priority srcnat; policy accept; }}; \
                     add rule ip {MASQ_TABLE} pre iifname \"{w}\" udp dport {FORWARD_EXT_PORT} dnat to {forward_to}; \
                     add rule ip {MASQ_TABLE} post oifname \"{w}\" masquerade",
                    w = lab.wan_if
                ),
            )?;
            Ok(None)
        }
        Gateway::Nat | Gateway::NatFastPath => {
            let mut args = vec!["--mode", "port-restricted"];
            if gw == Gateway::NatFastPath {
                args.extend(["--internal-iface", lab.lan_if.as_str()]);
                if let Some(l2) = &lab.lan2_if {
                    args.extend(["--internal-iface", l2.as_str()]);
                }
            } else {
                // Every packet through the kernel: no internal interface (the default would
                // find the lab's LAN side).
                args.extend(["--internal-iface", "none"]);
            }
            let nat = NatProcess::attach(lab, &args)?;
            ops::forward_ok(
                &lab.nat,
                &lab.wan_if,
                "add",
                &["udp", &FORWARD_EXT_PORT.to_string(), &forward_to],
            )?;
            Ok(Some(nat))
        }
    }
}

/// Stops `gw` (removes the masquerade table).
fn stop(lab: &Lab, nat: Option<NatProcess>) -> Result<()> {
    match nat {
        Some(nat) => nat.stop(),
        None => nft(&lab.nat, &format!("delete table ip {MASQ_TABLE}")),
    }
}

/// The packet counter of the policy rule whose text contains `rule`.
fn rule_packets(ns: &Netns, rule: &str) -> Result<u64> {
    let out = ns
        .run_ok(
            "nft",
            &["list", "chain", "ip", POLICY_TABLE, "policy_fwd"],
            Duration::from_secs(10),
        )?
        .stdout;
    let line = out
        .lines()
        .find(|l| l.contains(rule))
        .with_context(|| format!("no rule {rule:?} in:\n{out}"))?;
    let mut words = line.split_whitespace();
    words
        .find(|w| *w == "packets")
        .and_then(|_| words.next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet counter in {line:?}"))
}

/// Datagrams that arrive at `sock` until nothing more comes for `SETTLE`.
fn drain(sock: &UdpSocket) -> Result<Vec<(Vec<u8>, SocketAddr)>> {
    let mut got = Vec::new();
    // Bounded: the senders send at most 3 N datagrams per case.
    for _ in 0..(4 * N) {
        match udp_recv(sock, SETTLE)? {
            Some(datagram) => got.push(datagram),
            None => break,
        }
    }
    Ok(got)
}

/// One gateway's run against the policy. `run` makes the ports unique per run.
fn policy_run(lab: &Lab, gw: Gateway, run: u16) -> Result<()> {
    let what = gw.label();
    let port = |n: u16| 41000 + run * 10 + n;
    let nat = start(lab, gw)?;
    let fast_path = match (&nat, gw) {
        (Some(nat), Gateway::NatFastPath) => match ops::fast_path_unavailable(nat)? {
            Some(reason) => {
                println!("{what}: no fast path on this kernel ({reason}); checking the policy only");
                false
            }
            None => true,
        },
        _ => false,
    };
    nft(
        &lab.nat,
        &format!(
            "add table ip {POLICY_TABLE}; \
             add chain ip {POLICY_TABLE} policy_fwd {{ type filter hook forward priority filter; policy accept; }}; \
             add rule ip {POLICY_TABLE} policy_fwd ip daddr {WAN2_IP} counter drop; \
             add rule ip {POLICY_TABLE} policy_fwd ip saddr {WAN_IP2} counter drop"
        ),
    )?;

    // An allowed flow, both ways: its first packets go through the kernel, which lets them
    // pass; then the fast path takes it.
    let lan = udp_bind(&lab.lan, sa(LAN_IP, port(0)))?;
    let remote = udp_bind(&lab.wan, sa(WAN_IP, port(0)))?;
    lan.send_to(b"hello", sa(WAN_IP, port(0)))?;
    let (_, ext) = udp_recv(&remote, Duration::from_secs(3))?
        .with_context(|| format!("{what}: an allowed datagram lan -> wan was lost"))?;
    remote.send_to(b"hello back", ext)?;
    udp_expect(&lan, b"hello back", Duration::from_secs(3))?
        .with_context(|| format!("{what}: an allowed answer wan -> lan was lost"))?;
    let s0 = match &nat {
        Some(nat) => Some(nat.stats()?),
        None => None,
    };
    for i in 0..N {
        lan.send_to(format!("out {i}").as_bytes(), sa(WAN_IP, port(0)))?;
        udp_expect(&remote, format!("out {i}").as_bytes(), Duration::from_secs(3))?
            .with_context(|| format!("{what}: allowed datagram {i} lan -> wan lost"))?;
    }
    let s1 = match &nat {
        Some(nat) => Some(nat.stats()?),
        None => None,
    };
    for i in 0..N {
        remote.send_to(format!("in {i}").as_bytes(), ext)?;
        udp_expect(&lan, format!("in {i}").as_bytes(), Duration::from_secs(3))?
            .with_context(|| format!("{what}: allowed answer {i} wan -> lan lost"))?;
    }
    if let (Some(nat), Some(s0), Some(s1)) = (&nat, &s0, &s1) {
        let s2 = nat.stats()?;
        let (out_fp, in_fp) = (
            s1.delta(s0, "fast_path_redirected")?,
            s2.delta(s1, "fast_path_redirected")?,
        );
        println!("{what}: allowed flow: fast_path_redirected +{out_fp} out, +{in_fp} in (of {N} each)");
        if fast_path {
            ensure!(
                out_fp >= N as u64 && in_fp >= N as u64,
                "{what}: an allowed, established flow did not take the fast path: +{out_fp} out, +{in_fp} in of {N}"
            );
        } else {
            ensure!(
                out_fp == 0 && in_fp == 0,
                "{what}: fast_path_redirected grew (+{out_fp}/+{in_fp}) without a fast path"
            );
        }
    }

    // Everything below is checked to the end, so one run shows every figure.
    let mut problems = Vec::new();

    // A destination the forward chain drops: nothing may reach it, every datagram is counted,
    // and (ours) no NAT state is made for it.
    let dropped_dst = udp_bind(&lab.wan2, sa(WAN2_IP, port(1)))?;
    let to_dropped = udp_bind(&lab.lan, sa(LAN_IP, port(1)))?;
    let c0 = rule_packets(&lab.nat, DROP_DST_MATCH)?;
    for i in 0..N {
        to_dropped.send_to(format!("dropped dst {i}").as_bytes(), sa(WAN2_IP, port(1)))?;
    }
    let arrived = drain(&dropped_dst)?;
    let counted = rule_packets(&lab.nat, DROP_DST_MATCH)? - c0;
    println!(
        "{what}: to the dropped destination: {} of {N} arrived, rule counted {counted}",
        arrived.len()
    );
    if !arrived.is_empty() || counted < N as u64 {
        problems.push(format!(
            "{} of {N} datagrams reached {WAN2_IP}, which the forward chain drops; its rule counted {counted}",
            arrived.len()
        ));
    }
    if let Some(nat) = &nat {
        let rows = nat.mappings()?;
        if rows.iter().any(|m| m.internal == sa(LAN_IP, port(1))) {
            problems.push(format!(
                "a flow the forward chain dropped got NAT state: {rows:?}"
            ));
        }
    }

    // Answers from a source the forward chain drops: the flow goes out (allowed), nothing of
    // what comes back may reach lan, and every answer is counted.
    let dropped_src = udp_bind(&lab.wan, sa(WAN_IP2, port(2)))?;
    let from_dropped = udp_bind(&lab.lan, sa(LAN_IP, port(2)))?;
    from_dropped.send_to(b"ask", sa(WAN_IP2, port(2)))?;
    let (_, ext2) = udp_recv(&dropped_src, Duration::from_secs(3))?
        .with_context(|| format!("{what}: lan's datagram to {WAN_IP2} (allowed) was lost"))?;
    let c0 = rule_packets(&lab.nat, DROP_SRC_MATCH)?;
    for i in 0..N {
        // lan keeps its side of the flow busy, as an application would.
        from_dropped.send_to(format!("ask {i}").as_bytes(), sa(WAN_IP2, port(2)))?;
        dropped_src.send_to(format!("answer {i}").as_bytes(), ext2)?;
    }
    let answers = drain(&from_dropped)?;
    let counted = rule_packets(&lab.nat, DROP_SRC_MATCH)? - c0;
    println!(
        "{what}: answers from the dropped source: {} of {N} arrived, rule counted {counted}",
        answers.len()
    );
    if !answers.is_empty() || counted < N as u64 {
        problems.push(format!(
            "{} of {N} answers from {WAN_IP2}, whose packets the forward chain drops, reached lan; its \
             rule counted {counted}",
            answers.len()
        ));
    }

    // A new inbound flow through the static forward: goes through the kernel first, so the
    // dropped source gets nothing in, an allowed one does.
    let server = udp_bind(&lab.lan, sa(LAN_IP, FORWARD_INT_PORT))?;
    let allowed = udp_bind(&lab.wan, sa(WAN_IP, port(3)))?;
    let blocked = udp_bind(&lab.wan, sa(WAN_IP2, port(3)))?;
    let c0 = rule_packets(&lab.nat, DROP_SRC_MATCH)?;
    for i in 0..N {
        blocked.send_to(format!("blocked {i}").as_bytes(), sa(NAT_EXT, FORWARD_EXT_PORT))?;
        allowed.send_to(format!("allowed {i}").as_bytes(), sa(NAT_EXT, FORWARD_EXT_PORT))?;
    }
    let got = drain(&server)?;
    let counted = rule_packets(&lab.nat, DROP_SRC_MATCH)? - c0;
    let from_blocked = got.iter().filter(|(d, _)| d.starts_with(b"blocked")).count();
    let from_allowed = got.iter().filter(|(d, _)| d.starts_with(b"allowed")).count();
    println!(
        "{what}: through the forward: {from_blocked} of {N} from the dropped source, {from_allowed} of {N} \
         from an allowed one; rule counted {counted}"
    );
    if from_blocked != 0 || counted < N as u64 {
        problems.push(format!(
            "{from_blocked} of {N} datagrams from {WAN_IP2} came in through the forward (rule counted {counted})"
        ));
    }
    if from_allowed != N {
        problems.push(format!(
            "{from_allowed} of {N} datagrams from an allowed remote came in through the forward"
        ));
    }

    nft(&lab.nat, &format!("delete table ip {POLICY_TABLE}"))?;
    stop(lab, nat)?;
    ensure!(problems.is_empty(), "{what}: {}", problems.join("; "));
    Ok(())
}

#[test]
fn forward_chain_rules_hold_with_and_without_the_fast_path_as_with_masquerade() -> Result<()> {
    let lab = Lab::new("fppol")?;
    // GRO where the fast path sends (see ops::enable_fast_path_delivery).
    ops::enable_fast_path_delivery(&lab)?;
    // Masquerade last: the conntrack entries it leaves would translate later runs' flows.
    for (run, gw) in [Gateway::Nat, Gateway::NatFastPath, Gateway::Masquerade]
        .into_iter()
        .enumerate()
    {
        policy_run(&lab, gw, run as u16).with_context(|| gw.label())?;
    }
    Ok(())
}

/// One kind of spoofed source and whether the kernel alone (no internal-side program) stops it.
struct Spoof {
    what: &'static str,
    src: Ipv4Addr,
    /// The kernel drops it as a martian when `accept_local` is off (the gateway's own
    /// addresses); an Internet address passes the kernel's defaults (rp_filter off in a new
    /// namespace) and masquerade translates it.
    kernel_drops: bool,
}

#[test]
fn a_lan_host_cannot_send_as_the_gateway() -> Result<()> {
    let lab = Lab::with(
        "fpspoof",
        LabOptions {
            lan2: true,
            ..Default::default()
        },
    )?;
    ops::enable_fast_path_delivery(&lab)?;
    let gw_mac = Lab::mac(&lab.nat, &lab.lan_if)?;
    let _who = udp_whoami(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    for (run, gw) in [Gateway::NatFastPath, Gateway::Nat].into_iter().enumerate() {
        let what = gw.label();
        let nat = start(&lab, gw)?.context("our NAT")?;
        // lan2 holds a binding; lan forges datagrams from that binding's external endpoint.
        let s2 = udp_bind(lab.lan2(), sa(LAN2_IP, 40000 + run as u16))?;
        let x2 = whoami(&s2, sa(WAN_IP, WHOAMI_PORT))?;
        let spoofs = [
            Spoof {
                what: "the NAT's external address and lan2's external port",
                src: NAT_EXT,
                kernel_drops: true,
            },
            Spoof {
                what: "the gateway's own internal address",
                src: LAN_GW,
                kernel_drops: true,
            },
            Spoof {
                what: "an Internet address",
                src: WAN2_IP,
                kernel_drops: false,
            },
        ];
        let before = nat.stats()?;
        let sniff = Sniffer::open(&lab.wan, HOST_IF)?;
        let mut script = String::new();
        for (i, spoof) in spoofs.iter().enumerate() {
            script += &format!(
                "sendp(Ether(dst='{gw_mac}')/IP(src='{}', dst='{WAN_IP}')/UDP(sport={}, dport={WHOAMI_PORT})/Raw(b'SPOOF-{run}-{i}'), count={N}, iface='eth0')\n",
                spoof.src,
                x2.port()
            );
        }
        tools::scapy(&lab.lan, &script)?;
        let frames = sniff.capture_for(SETTLE);
        let after = nat.stats()?;
        let mut must_drop = 0;
        let mut leaked = Vec::new();
        for (i, spoof) in spoofs.iter().enumerate() {
            let mark = format!("SPOOF-{run}-{i}");
            let left: Vec<_> = frames
                .iter()
                .filter(|f| !f.outgoing && f.contains(mark.as_bytes()))
                .filter_map(|f| f.ipv4().map(|ip| ip.src()))
                .collect();
            println!(
                "{what}: source {} ({}): {} of {N} left on the WAN{}",
                spoof.src,
                spoof.what,
                left.len(),
                left.first().map(|s| format!(" (as {s})")).unwrap_or_default()
            );
            if gw == Gateway::NatFastPath || spoof.kernel_drops {
                must_drop += N as u64;
                if !left.is_empty() {
                    leaked.push(format!(
                        "{} of {N} with source {} ({})",
                        left.len(),
                        spoof.src,
                        spoof.what
                    ));
                }
            }
        }
        // The server lan2 talks to answers every datagram that reaches it, so a forged one that
        // left would bring its answer to lan2 (a forged source used to reflect traffic at another internal host).
        let to_lan2 = drain(&s2)?;
        println!("{what}: lan2 got {} answers to what lan forged", to_lan2.len());
        ensure!(
            leaked.is_empty() && to_lan2.is_empty(),
            "{what}: datagrams from lan left on the WAN: {}; lan2 got {} answers to what lan forged",
            leaked.join("; "),
            to_lan2.len()
        );
        let counted = after.delta(&before, "spoofed_source")?;
        println!("{what}: spoofed_source +{counted}");
        if gw == Gateway::NatFastPath {
            ensure!(
                counted >= must_drop,
                "{what}: spoofed_source counted {counted} of the {must_drop} forged datagrams: {}",
                after.changes(&before)
            );
        } else {
            ensure!(
                counted == 0,
                "{what}: spoofed_source grew by {counted} with no internal-side program"
            );
        }
        // lan2's binding and lan's own traffic still work.
        ensure!(
            whoami(&s2, sa(WAN_IP, WHOAMI_PORT))? == x2,
            "{what}: lan2's mapping changed"
        );
        let s1 = udp_bind(&lab.lan, sa(LAN_IP, 40000 + run as u16))?;
        let x1 = whoami(&s1, sa(WAN_IP, WHOAMI_PORT))?;
        ensure!(*x1.ip() == NAT_EXT, "{what}: lan's own traffic left as {x1}");
        nat.stop()?;
    }
    Ok(())
}
