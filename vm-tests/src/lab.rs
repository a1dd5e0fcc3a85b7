//! The test topology, built from fresh network namespaces and removed on drop.
//!
//! ```text
//!  lan  10.0.0.2 ── eth0 ═ l<id> 10.0.0.1 ┐
//!  lan2 10.0.1.2 ── eth0 ═ m<id> 10.0.1.1 ┤ [nat]  w<id> 198.51.100.254 ═ sw: bridge br0 ─┬─ wan  198.51.100.1 + .2
//!  (optional)                             ┘        (NAT attaches here)                    ├─ wan2 198.51.100.3
//!                                                                                         └─ rtr  198.51.100.250 ─ 203.0.113.254 ═ far 203.0.113.1
//!                                                                                            (optional)
//! ```
//! Every host turns transmit checksum offload off on its veth, so packets carry full checksums
//! (veth would otherwise hand a partial checksum to the NAT's XDP program). The NAT namespace
//! forwards (ip_forward=1) and has no nftables/iptables rules: only the NAT under test
//! translates. IPv6 is off everywhere so captures stay quiet.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::{self, Names, Netns, SETUP_TIMEOUT};
use crate::proc;

/// The internal host.
pub const LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The NAT's address on the internal host's link (its default gateway).
pub const LAN_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The second internal host (own subnet, own link to the NAT).
pub const LAN2_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The NAT's address on the second internal host's link.
pub const LAN2_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The NAT's external address (primary address of its external interface).
pub const NAT_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// First external host, first address (STUN A1, whoami, echo servers).
pub const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// First external host, second address (STUN A2).
pub const WAN_IP2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Second external host.
pub const WAN2_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// Router between the NAT's external link and the far network.
pub const RTR_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);
/// The router's address on the far network.
pub const RTR_FAR_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// A host behind the router, two hops beyond the NAT.
pub const FAR_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// Which optional parts to build.
#[derive(Clone, Copy, Debug, Default)]
pub struct LabOptions {
    /// A second internal host `lan2` (10.0.1.2) on its own link to the NAT.
    pub lan2: bool,
    /// A router `rtr` on the external segment and a far host `far` (203.0.113.1) behind it.
    pub rtr: bool,
}

/// A built topology. Dropping it deletes every namespace (and with them every interface).
pub struct Lab {
    /// The names used (namespace and interface names are unique to this lab).
    pub names: Names,
    /// Internal host.
    pub lan: Netns,
    /// Optional second internal host.
    pub lan2: Option<Netns>,
    /// The NAT router.
    pub nat: Netns,
    /// Switch namespace holding the external segment's bridge.
    pub sw: Netns,
    /// External host with two addresses.
    pub wan: Netns,
    /// Second external host.
    pub wan2: Netns,
    /// Optional router on the external segment.
    pub rtr: Option<Netns>,
    /// Optional host behind `rtr`.
    pub far: Option<Netns>,
    /// The NAT's external interface (in `nat`); the one `nat-ctl attach` takes.
    pub wan_if: String,
    /// The NAT's interface towards `lan` (in `nat`).
    pub lan_if: String,
    /// The NAT's interface towards `lan2` (in `nat`), if built.
    pub lan2_if: Option<String>,
}

/// Host-side interface name in every host namespace.
pub const HOST_IF: &str = "eth0";

impl Lab {
    /// Builds the base topology (lan, nat, sw, wan, wan2).
    pub fn new(tag: &str) -> Result<Lab> {
        Lab::with(tag, LabOptions::default())
    }

    /// Builds the topology with the optional parts in `opts`, and waits until every link
    /// carries traffic.
    pub fn with(tag: &str, opts: LabOptions) -> Result<Lab> {
        crate::require_root()?;
        netns::remove_stale();
        let names = Names::new(tag);
        let lan = Netns::create(&names.ns("lan"))?;
        let nat = Netns::create(&names.ns("nat"))?;
        let sw = Netns::create(&names.ns("sw"))?;
        let wan = Netns::create(&names.ns("wan"))?;
        let wan2 = Netns::create(&names.ns("wan2"))?;
        let lan2 = if opts.lan2 {
            Some(Netns::create(&names.ns("lan2"))?)
        } else {
            None
        };
        let (rtr, far) = if opts.rtr {
            (
                Some(Netns::create(&names.ns("rtr"))?),
                Some(Netns::create(&names.ns("far"))?),
            )
        } else {
            (None, None)
        };
        let wan_if = names.iface("w");
        let lan_if = names.iface("l");
        let lan2_if = opts.lan2.then(|| names.iface("m"));

        // The NAT router: forwarding on, no NAT rules of its own.
        nat.sysctl("net.ipv4.ip_forward", "1")?;
        lan.add_veth(HOST_IF, &nat, &lan_if, None)?;
        lan.if_up(HOST_IF, &["10.0.0.2/24"])?;
        lan.ip(&["route", "add", "default", "via", &LAN_GW.to_string()])?;
        nat.if_up(&lan_if, &["10.0.0.1/24"])?;
        if let (Some(lan2), Some(lan2_if)) = (&lan2, &lan2_if) {
            lan2.add_veth(HOST_IF, &nat, lan2_if, None)?;
            lan2.if_up(HOST_IF, &["10.0.1.2/24"])?;
            lan2.ip(&["route", "add", "default", "via", &LAN2_GW.to_string()])?;
            nat.if_up(lan2_if, &["10.0.1.1/24"])?;
        }

        // The external segment: one bridge in the switch namespace.
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
        attach_port(&nat, &wan_if)?;
        attach_port(&wan, HOST_IF)?;
        attach_port(&wan2, HOST_IF)?;
        if let Some(rtr) = &rtr {
            attach_port(rtr, HOST_IF)?;
        }
        nat.if_up(&wan_if, &["198.51.100.254/24"])?;
        wan.if_up(HOST_IF, &["198.51.100.1/24", "198.51.100.2/24"])?;
        wan2.if_up(HOST_IF, &["198.51.100.3/24"])?;

        if let (Some(rtr), Some(far)) = (&rtr, &far) {
            rtr.if_up(HOST_IF, &["198.51.100.250/24"])?;
            rtr.sysctl("net.ipv4.ip_forward", "1")?;
            rtr.add_veth("eth1", far, HOST_IF, None)?;
            rtr.if_up("eth1", &["203.0.113.254/24"])?;
            far.if_up(HOST_IF, &["203.0.113.1/24"])?;
            far.ip(&["route", "add", "default", "via", &RTR_FAR_IP.to_string()])?;
            nat.ip(&["route", "add", "203.0.113.0/24", "via", &RTR_IP.to_string()])?;
        }

        let lab = Lab {
            names,
            lan,
            lan2,
            nat,
            sw,
            wan,
            wan2,
            rtr,
            far,
            wan_if,
            lan_if,
            lan2_if,
        };
        lab.wait_links().context("lab links did not come up")?;
        Ok(lab)
    }

    /// Waits until every link carries pings (before any NAT is attached).
    fn wait_links(&self) -> Result<()> {
        let mut checks: Vec<(&Netns, Ipv4Addr)> = vec![
            (&self.lan, LAN_GW),
            (&self.nat, WAN_IP),
            (&self.nat, WAN_IP2),
            (&self.nat, WAN2_IP),
        ];
        if let Some(lan2) = &self.lan2 {
            checks.push((lan2, LAN2_GW));
        }
        if let Some(far) = &self.far {
            checks.push((&self.nat, RTR_IP));
            checks.push((far, RTR_FAR_IP));
        }
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
                bail!("{} cannot reach {dst}", ns.name());
            }
        }
        Ok(())
    }

    /// The MAC address of `dev` in `ns`.
    pub fn mac(ns: &Netns, dev: &str) -> Result<String> {
        let out = ns.ip_out(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link output")?;
        v[0]["address"]
            .as_str()
            .map(str::to_string)
            .context("no address in ip -j link output")
    }

    /// The second internal host (panics if the lab was built without it).
    pub fn lan2(&self) -> &Netns {
        self.lan2.as_ref().expect("lab built without lan2")
    }

    /// The router (panics if the lab was built without it).
    pub fn rtr(&self) -> &Netns {
        self.rtr.as_ref().expect("lab built without rtr")
    }
}

/// Creates the bridge `br0` of a switch namespace, with bridge netfilter (built into this
/// kernel, on by default) out of the way: it validates IPv4 headers and would drop crafted
/// malformed packets before they reach the NAT.
pub(crate) fn make_switch_bridge(sw: &Netns) -> Result<()> {
    for key in [
        "bridge-nf-call-iptables",
        "bridge-nf-call-ip6tables",
        "bridge-nf-call-arptables",
    ] {
        if std::path::Path::new("/proc/sys/net/bridge").join(key).exists() {
            sw.sysctl(&format!("net.bridge.{key}"), "0")?;
        }
    }
    sw.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "forward_delay",
        "0",
        "stp_state",
        "0",
    ])?;
    sw.ip(&["link", "set", "br0", "up"])?;
    Ok(())
}
