//! Which interfaces are internal: named (`--internal-iface NAME`, repeatable), turned off
//! (`--internal-iface none`), or, when nothing is said, found automatically.
//!
//! The internal-side XDP program is what hairpins (RFC 4787 REQ-9: a NAT MUST hairpin) and
//! what runs the fast path, so a NAT without internal interfaces does neither. A user who
//! types `nat-ctl attach eth0` should get the whole product, so the gateway's LAN side is
//! found by this rule ([`pick`]): an interface is internal when
//!
//! - it is not the external interface and not a loopback device;
//! - it is up (`IFF_UP`): a LAN interface that is down now may come up later, but one that
//!   was shut down on purpose must not get programs;
//! - it carries Ethernet frames (`ARPHRD_ETHER`): the internal program parses Ethernet
//!   headers and the fast path redirects Ethernet frames, so L3 devices (WireGuard, tun, PPP)
//!   are left to the kernel path;
//! - it is not enslaved to a bridge or bond (`IFLA_MASTER`): such a port carries no address
//!   of its own, its master does, and the master is the one that qualifies (a VRF member keeps
//!   its own addresses and counts as itself);
//! - it runs no XDP program yet: one there belongs to another NAT of this namespace or to
//!   another tool, and detection must never take an interface from them (or fail the attach
//!   over it); such interfaces are named as skipped;
//! - it holds an IPv4 address in the private ranges of RFC 1918 (10/8, 172.16/12,
//!   192.168/16) or the shared range of RFC 6598 (100.64/10, carrier-grade NAT's inside).
//!   Those ranges are by definition not routed on the Internet: the hosts behind such an
//!   interface need this NAT to reach the outside, which is what "internal" means here.
//!   An interface with only public addresses (a DMZ, a routed prefix) is never taken: it is
//!   routed, not translated, and the internal program's source check would get in its way.
//!
//! What the rule takes is printed by `attach` and shown by `status`; a choice it gets wrong
//! is corrected with `--internal-iface NAME` or `--internal-iface none`.

use std::{fs, net::Ipv4Addr};

use anyhow::{bail, Context, Result};

use crate::{iface, instance::Instance};

/// The `--internal-iface` value (and config list entry) that turns internal interfaces off.
pub const OFF_WORD: &str = "none";
/// The `--internal-iface` value that asks for automatic detection (overriding a config file).
pub const AUTO_WORD: &str = "auto";
/// `ARPHRD_ETHER` (include/uapi/linux/if_arp.h): veth, bridges, bonds, NICs, macvlan.
const ARPHRD_ETHER: u16 = 1;
/// Master device kinds whose ports carry no address of their own.
const PORT_MASTER_KINDS: [&str; 3] = ["bridge", "bond", "team"];

/// How the internal interfaces are chosen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum InternalIfaces {
    /// Found by the rule of this module when attaching.
    #[default]
    Auto,
    /// These (at least one), as named.
    Named(Vec<String>),
    /// None: no hairpinning, no fast path (`--internal-iface none`).
    Off,
}

impl InternalIfaces {
    /// From the values of the repeatable `--internal-iface` flag: nothing given is `None`
    /// (the config file or the default decides), `none` alone turns them off, `auto` alone
    /// asks for detection; either word beside interface names is refused.
    pub fn from_flags(values: &[String]) -> Result<Option<InternalIfaces>> {
        if values.is_empty() {
            return Ok(None);
        }
        Self::from_list(values, "--internal-iface").map(Some)
    }

    /// From the config file's `internal_ifaces` list: `[]` (or `["none"]`) turns them off,
    /// `["auto"]` is the same as leaving the key out.
    pub fn from_config(values: &[String]) -> Result<InternalIfaces> {
        if values.is_empty() {
            return Ok(InternalIfaces::Off);
        }
        Self::from_list(values, "internal_ifaces")
    }

    fn from_list(values: &[String], what: &str) -> Result<InternalIfaces> {
        let word = |w: &str| values.iter().any(|v| v == w);
        match values {
            [only] if only == OFF_WORD => return Ok(InternalIfaces::Off),
            [only] if only == AUTO_WORD => return Ok(InternalIfaces::Auto),
            _ => {}
        }
        for w in [OFF_WORD, AUTO_WORD] {
            if word(w) {
                bail!("{what} {w:?} cannot be combined with interface names");
            }
        }
        Ok(InternalIfaces::Named(values.to_vec()))
    }

    /// The named interfaces (empty for `Auto` and `Off`).
    pub fn named(&self) -> &[String] {
        match self {
            InternalIfaces::Named(names) => names,
            _ => &[],
        }
    }
}

/// How the internal interfaces of a running NAT were chosen, as `status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Found by the rule.
    Auto,
    /// Named with `--internal-iface` or `internal_ifaces`.
    Named,
    /// Turned off with `--internal-iface none`.
    Off,
}

impl Source {
    /// The word used in the record and in `status --json` (`internal_ifaces_chosen`).
    pub fn name(self) -> &'static str {
        match self {
            Source::Auto => "auto",
            Source::Named => "named",
            Source::Off => "off",
        }
    }

    fn parse(text: &str) -> Option<Source> {
        [Source::Auto, Source::Named, Source::Off]
            .into_iter()
            .find(|s| s.name() == text)
    }
}

/// One interface as the rule sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Name.
    pub name: String,
    /// Device flags (`IFF_*`).
    pub flags: u32,
    /// Hardware type (`ARPHRD_*`).
    pub hw_type: u16,
    /// Enslaved to a bridge or bond (its master holds the addresses).
    pub port: bool,
    /// Runs an XDP program already.
    pub has_xdp: bool,
    /// Its IPv4 addresses, primary first.
    pub addrs: Vec<Ipv4Addr>,
}

/// An interface the rule took, with the address that qualified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Interface name.
    pub name: String,
    /// Its first address in a private or shared range.
    pub addr: Ipv4Addr,
}

/// True for the private ranges of RFC 1918 (10/8, 172.16/12, 192.168/16) and the shared
/// address space of RFC 6598 (100.64/10).
pub fn is_internal_range(addr: Ipv4Addr) -> bool {
    let [a, b, ..] = addr.octets();
    addr.is_private() || (a == 100 && (64..128).contains(&b))
}

/// What the rule made of an interface list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Picked {
    /// The internal interfaces, in the order given.
    pub found: Vec<Found>,
    /// Interfaces that qualify but run an XDP program already (left alone).
    pub busy: Vec<String>,
}

/// The rule (see the module comment): the internal interfaces among `candidates` for the NAT
/// on `external`.
pub fn pick(external: &str, candidates: &[Candidate]) -> Picked {
    let mut picked = Picked::default();
    let qualifying = candidates
        .iter()
        .filter(|c| c.name != external)
        .filter(|c| c.flags & libc::IFF_LOOPBACK as u32 == 0)
        .filter(|c| c.flags & libc::IFF_UP as u32 != 0)
        .filter(|c| c.hw_type == ARPHRD_ETHER)
        .filter(|c| !c.port && c.flags & libc::IFF_SLAVE as u32 == 0);
    for c in qualifying {
        let Some(addr) = c.addrs.iter().copied().find(|a| is_internal_range(*a)) else {
            continue;
        };
        if c.has_xdp {
            picked.busy.push(c.name.clone());
        } else {
            picked.found.push(Found {
                name: c.name.clone(),
                addr,
            });
        }
    }
    picked
}

/// The interfaces of this network namespace, as the rule sees them (rtnetlink dumps of the
/// links and the IPv4 addresses, in index order).
pub fn candidates() -> Result<Vec<Candidate>> {
    let links = iface::links().context("cannot list the interfaces")?;
    let addrs = iface::all_ipv4_addrs().context("cannot list the interfaces' addresses")?;
    let kind_of = |index: u32| {
        links
            .iter()
            .find(|l| l.index == index)
            .and_then(|l| l.kind.as_deref())
    };
    Ok(links
        .iter()
        .map(|link| Candidate {
            name: link.name.clone(),
            flags: link.flags,
            hw_type: link.hw_type,
            port: link
                .master
                .is_some_and(|m| kind_of(m).is_some_and(|k| PORT_MASTER_KINDS.contains(&k))),
            has_xdp: link.has_xdp,
            addrs: addrs
                .iter()
                .filter(|(index, _)| *index == link.index)
                .map(|(_, a)| *a)
                .collect(),
        })
        .collect())
}

/// What `attach` decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The interfaces that get the internal programs.
    pub names: Vec<String>,
    /// How they were chosen.
    pub source: Source,
    /// The rule's picks with their addresses (`Auto` only).
    pub found: Vec<Found>,
    /// Interfaces the rule would have taken but another XDP program holds (`Auto` only).
    pub busy: Vec<String>,
}

/// Resolves `choice` for the NAT on `external`: the named ones, none, or the rule's picks.
pub fn resolve(external: &str, choice: &InternalIfaces) -> Result<Resolution> {
    Ok(match choice {
        InternalIfaces::Named(names) => Resolution {
            names: names.clone(),
            source: Source::Named,
            found: Vec::new(),
            busy: Vec::new(),
        },
        InternalIfaces::Off => Resolution {
            names: Vec::new(),
            source: Source::Off,
            found: Vec::new(),
            busy: Vec::new(),
        },
        InternalIfaces::Auto => {
            let Picked { found, busy } = pick(external, &candidates()?);
            Resolution {
                names: found.iter().map(|f| f.name.clone()).collect(),
                source: Source::Auto,
                found,
                busy,
            }
        }
    })
}

/// The one line `attach` prints about an automatic choice (`None` for a named or turned-off
/// one: the user said what they want).
pub fn notice(external: &str, resolution: &Resolution) -> Option<String> {
    if resolution.source != Source::Auto {
        return None;
    }
    let skipped = match resolution.busy.as_slice() {
        [] => String::new(),
        busy => format!("; skipped {} (another XDP program runs there)", busy.join(", ")),
    };
    if resolution.found.is_empty() {
        return Some(format!(
            "nat-ctl: no internal interface found (no interface but {external} is up, Ethernet and \
             holds an IPv4 address in 10/8, 172.16/12, 192.168/16 or 100.64/10){skipped}: no \
             hairpinning and no XDP fast path; name them with --internal-iface"
        ));
    }
    let list: Vec<String> = resolution
        .found
        .iter()
        .map(|f| format!("{} ({})", f.name, f.addr))
        .collect();
    Some(format!(
        "nat-ctl: internal interfaces (found automatically): {}{skipped}; --internal-iface NAME \
         chooses others, --internal-iface none turns them off",
        list.join(", ")
    ))
}

/// What a running instance records for `status`: how its internal interfaces were chosen,
/// then one name per line.
fn record_path(instance: &Instance) -> std::path::PathBuf {
    instance.state_file("internal")
}

/// Records `names` and `source` for `status`.
pub fn save(instance: &Instance, source: Source, names: &[String]) -> Result<()> {
    let mut text = format!("{}\n", source.name());
    for name in names {
        text += &format!("{name}\n");
    }
    let path = record_path(instance);
    fs::write(&path, text)
        .with_context(|| format!("cannot record the internal interfaces in {}", path.display()))
}

/// The recorded choice of an instance, if any.
pub fn load(instance: &Instance) -> Option<(Source, Vec<String>)> {
    let text = fs::read_to_string(record_path(instance)).ok()?;
    let mut lines = text.lines();
    let source = Source::parse(lines.next()?)?;
    Some((
        source,
        lines.filter(|l| !l.is_empty()).map(str::to_string).collect(),
    ))
}

/// Removes the record (the instance is gone).
pub fn forget(instance: &Instance) {
    let _ = fs::remove_file(record_path(instance));
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: u32 = libc::IFF_UP as u32;

    fn c(name: &str, flags: u32, addrs: &[[u8; 4]]) -> Candidate {
        Candidate {
            name: name.into(),
            flags,
            hw_type: ARPHRD_ETHER,
            port: false,
            has_xdp: false,
            addrs: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
        }
    }

    fn names(found: &[Found]) -> Vec<&str> {
        found.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn private_and_shared_ranges() {
        for inside in [
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
        ] {
            assert!(is_internal_range(inside.parse().unwrap()), "{inside}");
        }
        for outside in [
            "198.51.100.1",
            "172.32.0.1",
            "172.15.255.255",
            "100.63.255.255",
            "100.128.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "8.8.8.8",
        ] {
            assert!(!is_internal_range(outside.parse().unwrap()), "{outside}");
        }
    }

    #[test]
    fn a_typical_router() {
        let ifaces = [
            c("lo", UP | libc::IFF_LOOPBACK as u32, &[[127, 0, 0, 1]]),
            c("eth0", UP, &[[192, 168, 0, 2]]),
            c("lan0", UP, &[[198, 51, 100, 9], [10, 0, 0, 1]]),
            c("docker0", UP, &[[172, 17, 0, 1]]),
            c("dmz0", UP, &[[203, 0, 113, 1]]),
            c("lan1", 0, &[[10, 0, 1, 1]]),
            c("cgn0", UP, &[[100, 64, 0, 1]]),
        ];
        let found = pick("eth0", &ifaces).found;
        assert_eq!(
            names(&found),
            ["lan0", "docker0", "cgn0"],
            "not the external one (even with a private address), loopback, a public-only one, or one that is down"
        );
        assert_eq!(
            found[0].addr,
            Ipv4Addr::new(10, 0, 0, 1),
            "the qualifying address is named"
        );
    }

    #[test]
    fn bridge_ports_no_but_the_bridge_yes() {
        let mut port = c("veth1", UP, &[]);
        port.port = true;
        let mut port_with_addr = c("veth2", UP, &[[10, 0, 0, 9]]);
        port_with_addr.port = true;
        let bond_slave = c("eth2", UP | libc::IFF_SLAVE as u32, &[[10, 0, 2, 1]]);
        let bridge = c("br-lan", UP, &[[192, 168, 1, 1]]);
        let found = pick("wan", &[port, port_with_addr, bond_slave, bridge]).found;
        assert_eq!(names(&found), ["br-lan"]);
    }

    #[test]
    fn layer_3_devices_are_left_alone() {
        let mut wg = c("wg0", UP, &[[10, 8, 0, 1]]);
        wg.hw_type = 65534; // ARPHRD_NONE
        assert!(pick("eth0", &[wg]).found.is_empty());
    }

    #[test]
    fn an_interface_with_an_xdp_program_is_skipped_and_named() {
        let mut taken = c("lan0", UP, &[[10, 0, 0, 1]]);
        taken.has_xdp = true;
        let free = c("lan1", UP, &[[10, 0, 1, 1]]);
        let picked = pick("eth0", &[taken, free]);
        assert_eq!(names(&picked.found), ["lan1"]);
        assert_eq!(picked.busy, ["lan0"]);
    }

    #[test]
    fn flag_values() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(InternalIfaces::from_flags(&[]).unwrap(), None);
        assert_eq!(
            InternalIfaces::from_flags(&s(&["none"])).unwrap(),
            Some(InternalIfaces::Off)
        );
        assert_eq!(
            InternalIfaces::from_flags(&s(&["auto"])).unwrap(),
            Some(InternalIfaces::Auto)
        );
        assert_eq!(
            InternalIfaces::from_flags(&s(&["lan0", "lan1"])).unwrap(),
            Some(InternalIfaces::Named(s(&["lan0", "lan1"])))
        );
        assert!(InternalIfaces::from_flags(&s(&["lan0", "none"])).is_err());
        assert_eq!(InternalIfaces::from_config(&[]).unwrap(), InternalIfaces::Off);
        assert_eq!(
            InternalIfaces::from_config(&s(&["none"])).unwrap(),
            InternalIfaces::Off
        );
    }

    #[test]
    fn the_line_attach_prints() {
        let none = Resolution {
            names: vec![],
            source: Source::Auto,
            found: vec![],
            busy: vec!["lan9".into()],
        };
        let line = notice("eth0", &none).unwrap();
        assert!(
            line.contains("no hairpinning") && line.contains("skipped lan9"),
            "{line}"
        );
        let some = Resolution {
            names: vec!["lan0".into()],
            source: Source::Auto,
            found: vec![Found {
                name: "lan0".into(),
                addr: Ipv4Addr::new(10, 0, 0, 1),
            }],
            busy: vec![],
        };
        assert!(notice("eth0", &some).unwrap().contains("lan0 (10.0.0.1)"));
        let named = Resolution {
            source: Source::Named,
            ..some
        };
        assert_eq!(notice("eth0", &named), None);
    }
}
