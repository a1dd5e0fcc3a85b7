//! The TOML config file (`nat-ctl attach --config FILE`, `nat-ctl check --config FILE`):
//! everything a flag can say, plus static forwards. Unknown keys, wrong types and bad values are
//! refused with the file, line and field, before anything is attached.

use std::{net::Ipv4Addr, ops::Range, path::Path};

use anyhow::{anyhow, Result};
use nat_common::config::Timeout;
use serde::Deserialize;
use toml::Spanned;

use crate::{
    forwards::{parse_internal, parse_proto},
    internal_ifaces::InternalIfaces,
    settings::{parse_ipv4, parse_mode, parse_port_range, Settings},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Option<String>,
    mode: Option<Spanned<String>>,
    external_addrs: Option<Vec<Spanned<String>>>,
    ports: Option<Spanned<String>>,
    internal_ifaces: Option<Spanned<Vec<String>>>,
    max_bindings: Option<Spanned<u32>>,
    max_bindings_per_host: Option<u32>,
    max_sessions_per_host: Option<u32>,
    max_sessions_per_binding: Option<u32>,
    sweep_interval_ms: Option<Spanned<u64>>,
    metrics: Option<Spanned<String>>,
    persist: Option<bool>,
    unsolicited_syn: Option<Spanned<String>>,
    refusal_icmp: Option<Spanned<String>>,
    debug: Option<bool>,
    datapath_log: Option<bool>,
    xdp_mode: Option<Spanned<String>>,
    timeouts: Option<RawTimeouts>,
    port_mapping: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    forwards: Vec<Spanned<RawForward>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    udp: Option<Spanned<u32>>,
    tcp_established: Option<Spanned<u32>>,
    tcp_transitory: Option<Spanned<u32>>,
    icmp: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    proto: Spanned<String>,
    external_port: Spanned<u16>,
    internal: Spanned<String>,
    external_addr: Option<Spanned<String>>,
}

/// A static forward as the config file states it (the external address is resolved against
/// the running NAT when it is installed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardSpec {
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// External port.
    pub external_port: u16,
    /// Internal server.
    pub internal: std::net::SocketAddrV4,
    /// External address, if not the NAT's first.
    pub external_addr: Option<Ipv4Addr>,
}

/// What a config file holds, validated; the flags of `attach` take the same form. `None`/empty
/// means "not set".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// External interface.
    pub interface: Option<String>,
    /// Settings overrides, applied to `Settings::new` by `apply`.
    pub mode: Option<nat_common::Mode>,
    /// External addresses.
    pub external_addrs: Option<Vec<Ipv4Addr>>,
    /// Dynamic port range.
    pub ports: Option<nat_common::alloc::PortRange>,
    /// Internal interfaces: `None` when the key is absent (found automatically), an empty
    /// list or `["none"]` for none.
    pub internal_ifaces: Option<InternalIfaces>,
    /// Binding limit.
    pub max_bindings: Option<u32>,
    /// Per-host binding limit.
    pub max_bindings_per_host: Option<u32>,
    /// Per-host session limit.
    pub max_sessions_per_host: Option<u32>,
    /// Per-binding session limit.
    pub max_sessions_per_binding: Option<u32>,
    /// Sweep interval.
    pub sweep_interval_ms: Option<u64>,
    /// Prometheus listen address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Keep the data path running when the daemon exits.
    pub persist: Option<bool>,
    /// Answer unsolicited SYNs with ICMP.
    pub unsolicited_syn_icmp: Option<bool>,
    /// ICMP for refused flows.
    pub refusal_icmp: Option<crate::notices::RefusalIcmp>,
    /// Log binding events.
    pub debug: Option<bool>,
    /// Emit the data path's aya-log lines.
    pub datapath_log: Option<bool>,
    /// How the XDP programs attach.
    pub xdp_mode: Option<crate::xdp_mode::XdpModeChoice>,
    /// Timeout overrides in seconds, by `Timeout` index.
    pub timeouts: [Option<u32>; nat_common::config::TIMEOUT_COUNT],
    /// Static forwards.
    pub forwards: Vec<ForwardSpec>,
    /// Port-mapping protocols served.
    pub port_mapping: Option<crate::port_mapping::Protocols>,
}

/// Line number (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The key set on the line holding byte `at` (`table.key` inside a table), for errors whose
/// message does not name it (a wrong type or an out-of-range number).
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_string(),
    })
}

/// Parses and validates config text; errors read `FILE:LINE: field: what`.
pub fn parse(name: &str, text: &str) -> Result<FileConfig> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim();
        let Some(span) = e.span() else {
            return anyhow!("{name}: {message}");
        };
        let line = line_of(text, span.start);
        match key_at(text, span.start) {
            Some(key) if !message.contains(key.rsplit('.').next().unwrap_or(&key)) => {
                anyhow!("{name}:{line}: {key}: {message}")
            }
            _ => anyhow!("{name}:{line}: {message}"),
        }
    })?;
    let at = |span: Range<usize>, field: &str, e: anyhow::Error| {
        anyhow!("{name}:{}: {field}: {e:#}", line_of(text, span.start))
    };
    let mut config = FileConfig {
        interface: raw.interface,
        persist: raw.persist,
        debug: raw.debug,
        datapath_log: raw.datapath_log,
        ..Default::default()
    };
    if let Some(mode) = raw.mode {
        config.mode = Some(parse_mode(mode.get_ref()).map_err(|e| at(mode.span(), "mode", e))?);
    }
    if let Some(addrs) = raw.external_addrs {
        let mut parsed = Vec::new();
        for addr in addrs {
            parsed.push(parse_ipv4(addr.get_ref()).map_err(|e| at(addr.span(), "external_addrs", e))?);
        }
        config.external_addrs = Some(parsed);
    }
    if let Some(list) = raw.internal_ifaces {
        config.internal_ifaces = Some(
            InternalIfaces::from_config(list.get_ref()).map_err(|e| at(list.span(), "internal_ifaces", e))?,
        );
    }
    if let Some(ports) = raw.ports {
        config.ports = Some(parse_port_range(ports.get_ref()).map_err(|e| at(ports.span(), "ports", e))?);
    }
    if let Some(n) = raw.max_bindings {
        config.max_bindings = Some(*n.get_ref());
    }
    config.max_bindings_per_host = raw.max_bindings_per_host;
    config.max_sessions_per_host = raw.max_sessions_per_host;
    config.max_sessions_per_binding = raw.max_sessions_per_binding;
    if let Some(ms) = raw.sweep_interval_ms {
        if !(crate::cli::SWEEP_INTERVAL_MS_MIN..=crate::cli::SWEEP_INTERVAL_MS_MAX).contains(ms.get_ref()) {
            let e = anyhow!(
                "must be from {} to {}",
                crate::cli::SWEEP_INTERVAL_MS_MIN,
                crate::cli::SWEEP_INTERVAL_MS_MAX
            );
            return Err(at(ms.span(), "sweep_interval_ms", e));
        }
        config.sweep_interval_ms = Some(*ms.get_ref());
    }
    if let Some(metrics) = raw.metrics {
        let addr = metrics
            .get_ref()
            .parse()
            .map_err(|_| anyhow!("{:?} is not an ADDRESS:PORT", metrics.get_ref()));
        config.metrics = Some(addr.map_err(|e| at(metrics.span(), "metrics", e))?);
    }
    if let Some(v) = raw.unsolicited_syn {
        let parsed = crate::settings::parse_unsolicited_syn(v.get_ref());
        config.unsolicited_syn_icmp = Some(parsed.map_err(|e| at(v.span(), "unsolicited_syn", e))?);
    }
    if let Some(v) = raw.refusal_icmp {
        let parsed = crate::notices::RefusalIcmp::parse(v.get_ref());
        config.refusal_icmp = Some(parsed.map_err(|e| at(v.span(), "refusal_icmp", e))?);
    }
    if let Some(v) = raw.xdp_mode {
        let parsed = crate::xdp_mode::XdpModeChoice::parse(v.get_ref());
        config.xdp_mode = Some(parsed.map_err(|e| at(v.span(), "xdp_mode", e))?);
    }
    if let Some(t) = raw.timeouts {
        for (kind, field, value) in [
            (Timeout::Udp, "timeouts.udp", t.udp),
            (
                Timeout::TcpEstablished,
                "timeouts.tcp_established",
                t.tcp_established,
            ),
            (
                Timeout::TcpTransitory,
                "timeouts.tcp_transitory",
                t.tcp_transitory,
            ),
            (Timeout::Icmp, "timeouts.icmp", t.icmp),
        ] {
            if let Some(v) = value {
                if *v.get_ref() == 0 {
                    return Err(at(v.span(), field, anyhow!("must be at least 1 second")));
                }
                config.timeouts[kind as usize] = Some(*v.get_ref());
            }
        }
    }
    if let Some(list) = raw.port_mapping {
        let parsed = crate::port_mapping::Protocols::from_words(list.get_ref().iter().map(String::as_str));
        config.port_mapping = Some(parsed.map_err(|e| at(list.span(), "port_mapping", e))?);
    }
    for forward in &raw.forwards {
        let f = forward.get_ref();
        let proto = parse_proto(f.proto.get_ref()).map_err(|e| at(f.proto.span(), "forwards.proto", e))?;
        if *f.external_port.get_ref() == 0 {
            return Err(at(
                f.external_port.span(),
                "forwards.external_port",
                anyhow!("port 0 cannot be forwarded"),
            ));
        }
        let internal = parse_internal(f.internal.get_ref())
            .map_err(|e| at(f.internal.span(), "forwards.internal", e))?;
        let external_addr = match &f.external_addr {
            Some(a) => Some(parse_ipv4(a.get_ref()).map_err(|e| at(a.span(), "forwards.external_addr", e))?),
            None => None,
        };
        let spec = ForwardSpec {
            proto,
            external_port: *f.external_port.get_ref(),
            internal,
            external_addr,
        };
        if let Some(dup) = config.forwards.iter().find(|o| {
            (o.proto == spec.proto
                && o.external_port == spec.external_port
                && o.external_addr == spec.external_addr)
                || (o.proto == spec.proto && o.internal == spec.internal)
        }) {
            let e = anyhow!(
                "conflicts with the forward of port {} to {}",
                dup.external_port,
                dup.internal
            );
            return Err(at(forward.span(), "forwards", e));
        }
        config.forwards.push(spec);
    }
    Ok(config)
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    parse(&path.display().to_string(), &text)
}

impl FileConfig {
    /// Applies the values that are set onto `settings` (the file's first, then the flags', so
    /// flags win).
    pub fn apply(&self, settings: &mut Settings) {
        if let Some(mode) = self.mode {
            settings.mode = mode;
        }
        if let Some(protocols) = self.port_mapping {
            settings.port_mapping = protocols;
        }
        if let Some(addrs) = &self.external_addrs {
            settings.external_addrs = addrs.clone();
        }
        if let Some(ports) = self.ports {
            settings.ports = ports;
        }
        if let Some(internal) = &self.internal_ifaces {
            settings.internal_ifaces = internal.clone();
        }
        if let Some(n) = self.max_bindings {
            settings.max_bindings = n;
        }
        if let Some(n) = self.max_bindings_per_host {
            settings.max_bindings_per_host = n;
        }
        if let Some(n) = self.max_sessions_per_host {
            settings.max_sessions_per_host = Some(n);
        }
        if let Some(n) = self.max_sessions_per_binding {
            settings.max_sessions_per_binding = Some(n);
        }
        if let Some(icmp) = self.unsolicited_syn_icmp {
            settings.unsolicited_syn_icmp = icmp;
        }
        if let Some(refusal) = self.refusal_icmp {
            settings.refusal_icmp = refusal;
        }
        if let Some(on) = self.datapath_log {
            settings.datapath_log = on;
        }
        if let Some(xdp_mode) = self.xdp_mode {
            settings.xdp_mode = xdp_mode;
        }
        for (i, value) in self.timeouts.iter().enumerate() {
            if let Some(v) = value {
                settings.timeouts.0[i] = *v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nat_common::{proto, Mode};

    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/nat.toml");

    #[test]
    fn example_config_is_valid() {
        let c = parse("nat.toml", EXAMPLE).unwrap();
        assert_eq!(c.mode, Some(Mode::PortRestricted));
        assert!(!c.forwards.is_empty());
        let mut s = Settings::new("eth0");
        c.apply(&mut s);
        s.validate().unwrap();
    }

    #[test]
    fn full_config() {
        let text = r#"
interface = "wan0"
mode = "symmetric"
external_addrs = ["198.51.100.254", "198.51.100.253"]
ports = "20000-29999"
max_bindings_per_host = 100
max_sessions_per_host = 5000
max_sessions_per_binding = 0
metrics = "127.0.0.1:9108"

[timeouts]
udp = 30

[[forwards]]
proto = "tcp"
external_port = 8080
internal = "10.0.0.2:80"
"#;
        let c = parse("f", text).unwrap();
        assert_eq!(c.interface.as_deref(), Some("wan0"));
        assert_eq!(c.mode, Some(Mode::Symmetric));
        assert_eq!(c.external_addrs.as_ref().unwrap().len(), 2);
        assert_eq!(c.timeouts[Timeout::Udp as usize], Some(30));
        assert_eq!(c.timeouts[Timeout::Icmp as usize], None);
        assert_eq!(c.forwards[0].proto, proto::TCP);
        assert_eq!(c.forwards[0].internal, "10.0.0.2:80".parse().unwrap());
        assert_eq!(c.xdp_mode, None);
        let mut s = Settings::new("eth0");
        c.apply(&mut s);
        assert_eq!(
            (s.max_sessions_per_host, s.max_sessions_per_binding),
            (Some(5000), Some(0))
        );
        let c = parse("f", "xdp_mode = \"generic\"\n").unwrap();
        let mut s = Settings::new("eth0");
        c.apply(&mut s);
        assert_eq!(s.xdp_mode, crate::xdp_mode::XdpModeChoice::Generic);
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse("f.toml", text).unwrap_err())
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = error("mode = \"port-restricted\"\nmdoe = \"x\"\n");
        assert!(e.starts_with("f.toml:2:") && e.contains("mdoe"), "{e}");
        let e = error("\n\nmode = \"cone\"\n");
        assert!(
            e.starts_with("f.toml:3: mode:") && e.contains("unknown mode"),
            "{e}"
        );
        let e = error("ports = \"5000-4000\"\n");
        assert!(e.starts_with("f.toml:1: ports:") && e.contains("inverted"), "{e}");
        let e = error("max_bindings = \"lots\"\n");
        assert!(e.starts_with("f.toml:1: max_bindings:"), "{e}");
        let e = error("[[forwards]]\nproto = \"tcp\"\nexternal_port = 70000\ninternal = \"10.0.0.2:80\"\n");
        assert!(e.starts_with("f.toml:3: forwards.external_port:"), "{e}");
        let e = error("interface = \"x\"\npersist = \"yes\"\n");
        assert!(e.starts_with("f.toml:2: persist:"), "{e}");
        let e = error("[[forwards]]\nproto = \"tcp\"\nexternal_port = 80\ninternal = \"2001:db8::1:80\"\n");
        assert!(e.starts_with("f.toml:4: forwards.internal:"), "{e}");
        let e = error("[timeouts]\nudp = 0\n");
        assert!(e.starts_with("f.toml:2: timeouts.udp:"), "{e}");
        let e = error("external_addrs = [\"198.51.100.1\", \"fe80::1\"]\n");
        assert!(e.contains("external_addrs") && e.contains("IPv6"), "{e}");
        let e = error("mode = \"symmetric\"\nxdp_mode = \"drv\"\n");
        assert!(
            e.starts_with("f.toml:2: xdp_mode:") && e.contains("auto, native, generic"),
            "{e}"
        );
    }

    #[test]
    fn internal_interfaces_absent_empty_or_named() {
        let internal = |text: &str| parse("f", text).unwrap().internal_ifaces;
        assert_eq!(
            internal("mode = \"full-cone\"\n"),
            None,
            "absent: found automatically"
        );
        assert_eq!(internal("internal_ifaces = []\n"), Some(InternalIfaces::Off));
        assert_eq!(
            internal("internal_ifaces = [\"none\"]\n"),
            Some(InternalIfaces::Off)
        );
        assert_eq!(
            internal("internal_ifaces = [\"lan0\"]\n"),
            Some(InternalIfaces::Named(vec!["lan0".into()]))
        );
        let e = error("\ninternal_ifaces = [\"lan0\", \"none\"]\n");
        assert!(e.starts_with("f.toml:2: internal_ifaces:"), "{e}");
    }

    #[test]
    fn conflicting_forwards_refused() {
        let text = "[[forwards]]\nproto = \"udp\"\nexternal_port = 53\ninternal = \"10.0.0.2:53\"\n\n[[forwards]]\nproto = \"udp\"\nexternal_port = 53\ninternal = \"10.0.0.3:53\"\n";
        assert!(error(text).contains("conflicts"));
    }
}
