//! The benchmark topology: three fresh network namespaces in a line, removed on drop.
//!
//! ```text
//!  src  eth0 10.0.0.2 ═══ i<id> 10.0.0.1  [rtr]  x<id> 198.51.100.254 ═══ eth0 198.51.100.1  dst
//!  (internal side)         (forwards; the NAT attaches to x<id>)          (external side)
//! ```
//! Both end veths carry a sink (counting XDP program), and either end can host the generator:
//! `src` for outbound traffic, `dst` for inbound replies. The router's veths have GRO on so they
//! accept frames the generator transmits with `XDP_TX` even without an XDP program of their own
//! (a veth queues such frames only when its receive side runs NAPI). Neighbours are static and
//! every internal address (10.0.0.0/8) is routed via `src`, so no ARP is ever needed: the sinks
//! drop everything, and the generator's many source addresses need no neighbour entries.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use vm_tests::netns::{Names, Netns, SETUP_TIMEOUT};
use vm_tests::Lab;

use crate::frame::{parse_mac, Mac};
use crate::sink::Sink;

/// The internal host's address (the established flows' source).
pub const SRC_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The router's address on the internal link.
pub const RTR_INT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The router's external address: also the NAT's (and masquerade's) external address.
pub const RTR_EXT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// The remote host.
pub const DST_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Every internal address the generator uses lies in this prefix, routed via `SRC_IP`.
pub const INTERNAL_PREFIX: &str = "10.0.0.0/8";
/// Prefix length of both links.
const LINK_PREFIX_LEN: u8 = 24;
/// Interface name of the end hosts.
pub const HOST_IF: &str = "eth0";
/// Tag in the namespace names.
const TAG: &str = "bench";

/// Context of every error building the topology: such an error stops the benchmark (rather than
/// counting against one contender). Find it with `is_build_failure`.
#[derive(Debug)]
pub struct BuildFailed;

impl std::fmt::Display for BuildFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot build the benchmark topology")
    }
}

/// True if `e` came from building the topology.
pub fn is_build_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<BuildFailed>().is_some()
}

/// A built topology. Dropping it detaches the sinks and deletes the namespaces.
pub struct Topology {
    /// Sink on `src`'s veth (counts inbound traffic).
    pub src_sink: Sink,
    /// Sink on `dst`'s veth (counts outbound traffic).
    pub dst_sink: Sink,
    /// Internal host.
    pub src: Netns,
    /// Router (forwards; the contender runs here).
    pub rtr: Netns,
    /// Remote host.
    pub dst: Netns,
    /// Router interface towards `src` (the NAT's internal interface).
    pub int_if: String,
    /// Router interface towards `dst` (the NAT's external interface).
    pub ext_if: String,
    /// MAC of `src`'s veth.
    pub src_mac: Mac,
    /// MAC of the router's internal interface.
    pub int_mac: Mac,
    /// MAC of the router's external interface.
    pub ext_mac: Mac,
    /// MAC of `dst`'s veth.
    pub dst_mac: Mac,
}

fn up(ns: &Netns, dev: &str, addr: Ipv4Addr) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{addr}/{LINK_PREFIX_LEN}"), "dev", dev])?;
    ns.ip(&["link", "set", dev, "up"])?;
    Ok(())
}

/// Sets a sysctl of `ns` by writing /proc/sys from a thread in it (net.* sysctls belong to the
/// writer's namespace): no `ip netns exec` process, which costs a good part of a second in the
/// VM.
fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.enter(|| std::fs::write(&path, value).with_context(|| format!("cannot set {key} in {}", ns.name())))
}

fn mac(ns: &Netns, dev: &str) -> Result<Mac> {
    parse_mac(&Lab::mac(ns, dev)?)
}

impl Topology {
    /// Builds the topology; on error everything made so far is removed.
    pub fn build() -> Result<Topology> {
        Topology::try_build(1).context(BuildFailed)
    }

    /// The same with `queues` queues per veth: a veth hands a frame sent from CPU `c` to its
    /// peer's receive queue `c % queues`, whose NAPI then runs on `c`, so with one queue per
    /// CPU generators on several CPUs drive separate paths (as RSS does on a NIC).
    pub fn build_multiqueue(queues: u32) -> Result<Topology> {
        Topology::try_build(queues).context(BuildFailed)
    }

    fn try_build(queues: u32) -> Result<Topology> {
        let names = Names::new(TAG);
        let src = Netns::create(&names.ns("src"))?;
        let rtr = Netns::create(&names.ns("rtr"))?;
        let dst = Netns::create(&names.ns("dst"))?;
        let int_if = names.iface("i");
        let ext_if = names.iface("x");

        sysctl(&rtr, "net.ipv4.ip_forward", "1")?;
        // Reverse-path filtering would drop the generator's many source addresses.
        sysctl(&rtr, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&rtr, "net.ipv4.conf.default.rp_filter", "0")?;
        src.add_veth(HOST_IF, &rtr, &int_if, Some(queues))?;
        rtr.add_veth(&ext_if, &dst, HOST_IF, Some(queues))?;
        up(&src, HOST_IF, SRC_IP)?;
        up(&rtr, &int_if, RTR_INT_IP)?;
        up(&rtr, &ext_if, RTR_EXT_IP)?;
        up(&dst, HOST_IF, DST_IP)?;
        for dev in [&int_if, &ext_if] {
            sysctl(&rtr, &format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            rtr.run_ok("ethtool", &["-K", dev, "gro", "on"], SETUP_TIMEOUT)
                .with_context(|| format!("cannot turn GRO on for {dev}"))?;
        }
        let src_mac = mac(&src, HOST_IF)?;
        let int_mac = mac(&rtr, &int_if)?;
        let ext_mac = mac(&rtr, &ext_if)?;
        let dst_mac = mac(&dst, HOST_IF)?;
        let fmt = |m: Mac| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        rtr.ip(&[
            "neigh",
            "replace",
            &SRC_IP.to_string(),
            "lladdr",
            &fmt(src_mac),
            "dev",
            &int_if,
            "nud",
            "permanent",
        ])?;
        rtr.ip(&[
            "neigh",
            "replace",
            &DST_IP.to_string(),
            "lladdr",
            &fmt(dst_mac),
            "dev",
            &ext_if,
            "nud",
            "permanent",
        ])?;
        rtr.ip(&[
            "route",
            "add",
            INTERNAL_PREFIX,
            "via",
            &SRC_IP.to_string(),
            "dev",
            &int_if,
        ])?;
        let src_sink = Sink::attach(&src, HOST_IF)?;
        let dst_sink = Sink::attach(&dst, HOST_IF)?;
        Ok(Topology {
            src_sink,
            dst_sink,
            src,
            rtr,
            dst,
            int_if,
            ext_if,
            src_mac,
            int_mac,
            ext_mac,
            dst_mac,
        })
    }

    /// Packets the router's kernel forwarded so far (`Ip: ForwDatagrams` of /proc/net/snmp):
    /// tells whether traffic took the kernel path or an XDP fast path.
    pub fn forwarded(&self) -> Result<u64> {
        // Read from a thread in the namespace (/proc/thread-self/net is that thread's view):
        // no process to start, which matters in the VM, where starting one takes a while.
        let snmp = self.rtr.enter(|| {
            std::fs::read_to_string("/proc/thread-self/net/snmp").context("cannot read /proc/net/snmp")
        })?;
        parse_forw_datagrams(&snmp).context("no Ip: ForwDatagrams in /proc/net/snmp")
    }
}

/// `ForwDatagrams` from the two `Ip:` lines (header, values) of /proc/net/snmp.
fn parse_forw_datagrams(snmp: &str) -> Option<u64> {
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let header = ip.next()?;
    let values = ip.next()?;
    let col = header.split_whitespace().position(|f| f == "ForwDatagrams")?;
    values.split_whitespace().nth(col)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_forw_datagrams() {
        let snmp = "Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams\n\
                    Ip: 1 64 100 0 0 42\nIcmp: InMsgs\nIcmp: 0\n";
        assert_eq!(super::parse_forw_datagrams(snmp), Some(42));
    }
}
