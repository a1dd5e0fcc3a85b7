//! Validated settings of one NAT instance, and the parsers for their command-line forms.
//!
//! Everything is checked here, before anything is loaded or attached, so bad input never
//! leaves a half-installed NAT behind.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

pub use crate::notices::RefusalIcmp;
use crate::{internal_ifaces::InternalIfaces, xdp_mode::XdpModeChoice};
use nat_common::{
    alloc::PortRange,
    config::{
        Timeout, CONFIG_FLAG_DATAPATH_LOG, CONFIG_FLAG_FOLLOWS_IFACE, CONFIG_FLAG_READY,
        CONFIG_FLAG_REFUSAL_ICMP, CONFIG_FLAG_SYN_ICMP, DEFAULT_ICMP_TIMEOUT_SECS, DEFAULT_PORT_MAX,
        DEFAULT_PORT_MIN, DEFAULT_TCP_ESTABLISHED_TIMEOUT_SECS, DEFAULT_TCP_TRANSITORY_TIMEOUT_SECS,
        DEFAULT_UDP_TIMEOUT_SECS, MAX_EXTERNAL_ADDRS, TIMEOUT_COUNT,
    },
    maps::{default_max_sessions_per_binding, default_max_sessions_per_host, DEFAULT_MAX_BINDINGS},
    table_size, Mode, NatConfig,
};

/// Largest accepted `--max-bindings`: the session map gets four entries per binding, and the
/// kernel allocates every map's bucket array up front (16 bytes per power-of-two slot: about
/// 0.5 GiB at this limit, before any entry).
pub const MAX_BINDINGS_LIMIT: u32 = 4_000_000;

/// Where the kernel reports the machine's RAM (`MemTotal`: `totalram_pages()`, the figure
/// conntrack sizes its table from).
const MEMINFO: &str = "/proc/meminfo";

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

/// The default `--max-bindings` for this machine: conntrack's rule from its RAM, capped so an
/// idle attach holds at most 16 MiB of maps (`nat_common::table_size`); the cap if the RAM
/// cannot be read.
pub fn default_max_bindings() -> u32 {
    std::fs::read_to_string(MEMINFO)
        .ok()
        .and_then(|text| mem_total_bytes(&text))
        .map_or(DEFAULT_MAX_BINDINGS, table_size::default_max_bindings)
}

/// Idle timeouts in seconds, per `Timeout` kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts(pub [u32; TIMEOUT_COUNT]);

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts([
            DEFAULT_UDP_TIMEOUT_SECS,
            DEFAULT_TCP_ESTABLISHED_TIMEOUT_SECS,
            DEFAULT_TCP_TRANSITORY_TIMEOUT_SECS,
            DEFAULT_ICMP_TIMEOUT_SECS,
        ])
    }
}

impl Timeouts {
    /// The timeout of `kind` in seconds.
    pub fn get(&self, kind: Timeout) -> u32 {
        self.0[kind as usize]
    }

    /// Overrides `kind` when `value` is given.
    pub fn set(&mut self, kind: Timeout, value: Option<u32>) {
        if let Some(v) = value {
            self.0[kind as usize] = v;
        }
    }
}

/// Everything `nat-ctl attach` needs to know, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// External interface.
    pub iface: String,
    /// NAT type.
    pub mode: Mode,
    /// External addresses; empty means "the interface's primary IPv4 address".
    pub external_addrs: Vec<Ipv4Addr>,
    /// Dynamic port range for internal ports >= 1024.
    pub ports: PortRange,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Internal interfaces that get the hairpinning and fast-path program: named, none, or
    /// (the default) found at attach by the rule of `internal_ifaces`.
    pub internal_ifaces: InternalIfaces,
    /// Most dynamic bindings at once.
    pub max_bindings: u32,
    /// Most dynamic bindings per internal host; 0 means no limit.
    pub max_bindings_per_host: u32,
    /// Most sessions per internal host; 0 means no limit, `None` the default for the table
    /// size (`nat_common::maps::default_max_sessions_per_host`).
    pub max_sessions_per_host: Option<u32>,
    /// Most sessions per binding; 0 means no limit, `None` the default for the table size.
    pub max_sessions_per_binding: Option<u32>,
    /// Answer unsolicited SYNs with ICMP port unreachable after the RFC 5382 hold.
    pub unsolicited_syn_icmp: bool,
    /// What a host whose new flow is refused is told.
    pub refusal_icmp: RefusalIcmp,
    /// Emit the data path's aya-log debug lines.
    pub datapath_log: bool,
    /// How the XDP programs attach: native, generic, or native with a generic fallback.
    pub xdp_mode: XdpModeChoice,
    /// Port-mapping protocols served on the internal interfaces (off by default).
    pub port_mapping: crate::port_mapping::Protocols,
}

impl Settings {
    /// Settings with the defaults for everything but the interface.
    pub fn new(iface: &str) -> Self {
        Settings {
            iface: iface.to_string(),
            mode: Mode::PortRestricted,
            external_addrs: Vec::new(),
            ports: PortRange {
                min: DEFAULT_PORT_MIN,
                max: DEFAULT_PORT_MAX,
            },
            timeouts: Timeouts::default(),
            internal_ifaces: InternalIfaces::Auto,
            max_bindings: default_max_bindings(),
            max_bindings_per_host: 0,
            max_sessions_per_host: None,
            max_sessions_per_binding: None,
            unsolicited_syn_icmp: false,
            refusal_icmp: RefusalIcmp::Off,
            datapath_log: false,
            xdp_mode: XdpModeChoice::Auto,
            port_mapping: crate::port_mapping::Protocols::default(),
        }
    }

    /// Checks the settings that parsers cannot check one value at a time.
    pub fn validate(&self) -> Result<()> {
        validate_external_addrs(&self.external_addrs)?;
        if !(1..=MAX_BINDINGS_LIMIT).contains(&self.max_bindings) {
            bail!("--max-bindings must be between 1 and {MAX_BINDINGS_LIMIT}");
        }
        let named = self.internal_ifaces.named();
        for (i, internal) in named.iter().enumerate() {
            if *internal == self.iface {
                bail!("{internal} is the external interface; it cannot also be an internal one");
            }
            if named[..i].contains(internal) {
                bail!("internal interface {internal} is listed twice");
            }
        }
        for (kind, name) in [
            (Timeout::Udp, "--udp-timeout"),
            (Timeout::TcpEstablished, "--tcp-established-timeout"),
            (Timeout::TcpTransitory, "--tcp-transitory-timeout"),
            (Timeout::Icmp, "--icmp-timeout"),
        ] {
            if self.timeouts.get(kind) == 0 {
                bail!("{name} must be at least 1 second");
            }
        }
        Ok(())
    }

    /// The kernel config record for these settings with the resolved external addresses.
    pub fn to_config(&self, external_addrs: &[Ipv4Addr]) -> NatConfig {
        let mut config = NatConfig::empty();
        for (slot, addr) in config.external_addrs.iter_mut().zip(external_addrs) {
            *slot = u32::from(*addr).to_be();
        }
        config.external_addr_count = external_addrs.len().min(MAX_EXTERNAL_ADDRS) as u32;
        config.port_min = self.ports.min;
        config.port_max = self.ports.max;
        config.mode = self.mode as u8;
        config.timeouts_secs = self.timeouts.0;
        config.max_bindings = self.max_bindings;
        config.max_bindings_per_host = self.max_bindings_per_host;
        self.set_session_limits(&mut config);
        config.flags = CONFIG_FLAG_READY;
        if self.unsolicited_syn_icmp {
            config.flags |= CONFIG_FLAG_SYN_ICMP;
        }
        if self.refusal_icmp != RefusalIcmp::Off {
            config.flags |= CONFIG_FLAG_REFUSAL_ICMP;
        }
        if self.datapath_log {
            config.flags |= CONFIG_FLAG_DATAPATH_LOG;
        }
        if self.external_addrs.is_empty() {
            // No address given: the interface's primary one, followed by `addr_watch`.
            config.flags |= CONFIG_FLAG_FOLLOWS_IFACE;
        }
        config
    }
}

impl Settings {
    /// Writes the session limits into `config`: the given ones, else the defaults for the
    /// table size in `config` (which adoption may have changed to the running one).
    pub fn set_session_limits(&self, config: &mut NatConfig) {
        config.max_sessions_per_host = self
            .max_sessions_per_host
            .unwrap_or_else(|| default_max_sessions_per_host(config.max_bindings));
        config.max_sessions_per_binding = self
            .max_sessions_per_binding
            .unwrap_or_else(|| default_max_sessions_per_binding(config.max_bindings));
    }
}

/// Parses `MIN-MAX` (inclusive, 1..=65535, MIN <= MAX).
pub fn parse_port_range(text: &str) -> Result<PortRange> {
    let Some((min, max)) = text.split_once('-') else {
        bail!("port range {text:?} is not of the form MIN-MAX");
    };
    let parse = |s: &str| -> Result<u16> {
        match s.trim().parse::<u16>() {
            Ok(0) | Err(_) => bail!("port range {text:?}: {s:?} is not a port number from 1 to 65535"),
            Ok(p) => Ok(p),
        }
    };
    let (min, max) = (parse(min)?, parse(max)?);
    if min > max {
        bail!("port range {text:?} is inverted (MIN is above MAX)");
    }
    Ok(PortRange { min, max })
}

/// Parses an IPv4 address, with a message that says what was wrong.
pub fn parse_ipv4(text: &str) -> Result<Ipv4Addr> {
    match text.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(addr)) => Ok(addr),
        Ok(std::net::IpAddr::V6(_)) => bail!("{text} is an IPv6 address; this NAT translates IPv4 only"),
        Err(_) => bail!("{text:?} is not an IPv4 address"),
    }
}

/// Parses a mode name.
pub fn parse_mode(text: &str) -> Result<Mode> {
    Mode::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
        anyhow::anyhow!("unknown mode {text:?} (expected one of: {})", names.join(", "))
    })
}

/// An external address list must be usable unicast addresses, without repeats, and fit the
/// kernel's table.
pub fn validate_external_addrs(addrs: &[Ipv4Addr]) -> Result<()> {
    if addrs.len() > MAX_EXTERNAL_ADDRS {
        bail!(
            "at most {MAX_EXTERNAL_ADDRS} external addresses are supported, {} given",
            addrs.len()
        );
    }
    for (i, addr) in addrs.iter().enumerate() {
        if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback() {
            bail!("external address {addr} is not a unicast address");
        }
        if addrs[..i].contains(addr) {
            bail!("external address {addr} is listed twice");
        }
    }
    Ok(())
}

/// Parses `--unsolicited-syn`: `drop` (silently, the default) or `icmp`.
pub fn parse_unsolicited_syn(text: &str) -> Result<bool> {
    match text {
        "drop" => Ok(false),
        "icmp" => Ok(true),
        _ => bail!("unsolicited SYN handling {text:?} is not one of drop, icmp"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(
            parse_port_range("1024-65535").unwrap(),
            PortRange {
                min: 1024,
                max: 65535
            }
        );
        assert_eq!(
            parse_port_range("7000-7000").unwrap(),
            PortRange { min: 7000, max: 7000 }
        );
        for bad in ["5000-4000", "0-10", "10", "-", "a-b", "1-65536", ""] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_port_range("5000-4000")
            .unwrap_err()
            .to_string()
            .contains("inverted"));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_ipv4("198.51.100.1").unwrap(),
            Ipv4Addr::new(198, 51, 100, 1)
        );
        assert!(parse_ipv4("2001:db8::1")
            .unwrap_err()
            .to_string()
            .contains("IPv6"));
        assert!(parse_ipv4("foo").is_err());
        let a = Ipv4Addr::new(198, 51, 100, 1);
        assert!(validate_external_addrs(&[a, a]).is_err(), "duplicates refused");
        assert!(validate_external_addrs(&[Ipv4Addr::UNSPECIFIED]).is_err());
        assert!(validate_external_addrs(&[Ipv4Addr::new(224, 0, 0, 1)]).is_err());
        assert!(validate_external_addrs(&[a]).is_ok());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("symmetric").unwrap(), Mode::Symmetric);
        assert!(parse_mode("cone")
            .unwrap_err()
            .to_string()
            .contains("port-restricted"));
    }

    #[test]
    fn default_table_follows_the_ram() {
        let meminfo = "MemTotal:         262144 kB\nMemFree:  1000 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(256 * 1024 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: many\n"), None);
        let n = default_max_bindings();
        assert!(
            (table_size::MIN_DEFAULT_MAX_BINDINGS..=table_size::MAX_DEFAULT_MAX_BINDINGS).contains(&n),
            "{n}"
        );
    }

    #[test]
    fn config_record() {
        let mut s = Settings::new("eth0");
        s.timeouts.set(Timeout::Udp, Some(4));
        s.validate().unwrap();
        let addrs = [Ipv4Addr::new(198, 51, 100, 254), Ipv4Addr::new(198, 51, 100, 253)];
        let c = s.to_config(&addrs);
        assert_eq!(c.external_addr_count, 2);
        assert_eq!(
            c.external_addrs[0].to_ne_bytes(),
            [198, 51, 100, 254],
            "network byte order in memory"
        );
        assert!(c.is_ready());
        assert_eq!(c.mode(), Mode::PortRestricted);
        assert_eq!(c.timeouts_secs[Timeout::Udp as usize], 4);
        assert_eq!(c.timeouts_secs[Timeout::TcpEstablished as usize], 7440);
        assert_eq!(
            c.flags & CONFIG_FLAG_FOLLOWS_IFACE,
            CONFIG_FLAG_FOLLOWS_IFACE,
            "no address given: the interface's address is followed"
        );
        s.external_addrs = addrs.to_vec();
        assert_eq!(
            s.to_config(&addrs).flags & CONFIG_FLAG_FOLLOWS_IFACE,
            0,
            "given addresses stay fixed"
        );
    }

    #[test]
    fn session_limits_default_to_shares_of_the_table() {
        let mut s = Settings::new("eth0");
        s.max_bindings = 2000;
        let c = s.to_config(&[Ipv4Addr::new(198, 51, 100, 254)]);
        // (2000 + 4096) * 4 entries, two per session: 12 192 sessions; a quarter per host, a
        // quarter of that per binding.
        assert_eq!(c.max_sessions_per_host, 3048);
        assert_eq!(c.max_sessions_per_binding, 762);
        s.max_sessions_per_host = Some(0);
        s.max_sessions_per_binding = Some(50);
        let c = s.to_config(&[Ipv4Addr::new(198, 51, 100, 254)]);
        assert_eq!((c.max_sessions_per_host, c.max_sessions_per_binding), (0, 50));
    }

    #[test]
    fn internal_interfaces_checked() {
        let mut s = Settings::new("eth0");
        s.internal_ifaces = InternalIfaces::Named(vec!["eth0".into()]);
        assert!(s.validate().is_err(), "external cannot be internal");
        s.internal_ifaces = InternalIfaces::Named(vec!["lan0".into(), "lan0".into()]);
        assert!(s.validate().is_err(), "duplicates refused");
        s.internal_ifaces = InternalIfaces::Named(vec!["lan0".into(), "lan1".into()]);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn zero_timeout_refused() {
        let mut s = Settings::new("eth0");
        s.timeouts.set(Timeout::Icmp, Some(0));
        assert!(s.validate().is_err());
    }
}
