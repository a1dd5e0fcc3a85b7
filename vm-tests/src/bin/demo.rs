//! Demo: builds a lab (lan, nat, wan), attaches the NAT in port-restricted mode, sends some
//! traffic through it, shows the NAT table and counters, then stops the NAT and removes the
//! lab. Exits non-zero if any step fails. Root only.
//!
//! `NAT_CTL` selects the nat-ctl binary (default: `<workspace>/target/release/nat-ctl`).

use std::net::SocketAddrV4;
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use vm_tests::lab::{LAN_IP, NAT_EXT, WAN_IP};
use vm_tests::nat::nat_ctl_path;
use vm_tests::tools::{self, udp_bind, udp_whoami, whoami};
use vm_tests::{Lab, NatProcess};

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn run() -> Result<()> {
    section("lab");
    println!("nat-ctl: {}", nat_ctl_path().display());
    let lab = Lab::new("demo")?;
    println!(
        "namespaces: lan {} (10.0.0.2), nat {} (10.0.0.1 | {} 198.51.100.254), wan {} (198.51.100.1)",
        lab.lan.name(),
        lab.nat.name(),
        lab.wan_if,
        lab.wan.name()
    );

    section("attach");
    let nat = NatProcess::attach(&lab, &["--mode", "port-restricted"])?;
    println!("{}", nat.attached_line());

    section("ping lan -> wan (3 packets)");
    let out = tools::ping(&lab.lan, WAN_IP, 3, &[])?;
    print!("{}", out.stdout);
    ensure!(
        tools::ping_received(&out) == 3,
        "ping got {} of 3 replies",
        tools::ping_received(&out)
    );

    section("UDP whoami");
    let _who = udp_whoami(&lab.wan, WAN_IP, 9999)?;
    let internal = SocketAddrV4::new(LAN_IP, 40000);
    let sock = udp_bind(&lab.lan, internal)?;
    let seen = whoami(&sock, SocketAddrV4::new(WAN_IP, 9999))?;
    println!("lan {internal} -> wan {WAN_IP}:9999; wan saw the sender as {seen}");
    ensure!(*seen.ip() == NAT_EXT, "wan saw {seen}, not the NAT's address");

    section("TCP transfer (1 MiB echoed by socat)");
    let _echo = tools::tcp_echo(&lab.wan, WAN_IP, 5001)?;
    let data = tools::pattern(1 << 20, 42);
    let stream = tools::tcp_connect(&lab.lan, SocketAddrV4::new(WAN_IP, 5001))?;
    let local = stream.local_addr()?;
    let back = tools::tcp_roundtrip(stream, &data)?;
    println!(
        "lan {local} -> wan {WAN_IP}:5001: sent {} bytes, received {} bytes back",
        data.len(),
        back.len()
    );
    ensure!(back == data, "the echoed data differs from what was sent");

    section("nat-ctl mappings");
    print!("{}", nat.ctl_ok("mappings", &[])?);

    section("nat-ctl stats");
    print!("{}", nat.ctl_ok("stats", &[])?);

    section("stop");
    nat.stop().context("stopping the NAT")?;
    println!("detached from {}", lab.wan_if);

    section("teardown");
    drop(lab);
    println!("lab removed");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("\ndemo: all steps passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
