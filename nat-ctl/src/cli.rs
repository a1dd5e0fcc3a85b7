//! Command-line interface definitions.

use std::net::Ipv4Addr;

use clap::{Args, Parser, Subcommand};
use nat_common::{alloc::PortRange, Mode};

use crate::{
    settings::{parse_ipv4, parse_mode, parse_port_range, parse_unsolicited_syn, RefusalIcmp},
    table_filter::{EndpointFilter, RowFilter},
    xdp_mode::XdpModeChoice,
};

/// What `--version` prints: the package version and the source revision it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NAT_CTL_REVISION"), ")");

/// eBPF/XDP IPv4 NAT gateway controller.
#[derive(Debug, Parser)]
#[command(name = "nat-ctl", version = VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the NAT to an external interface and run until SIGINT/SIGTERM, then detach.
    Attach(AttachArgs),
    /// Print the NAT table.
    Mappings(MappingsArgs),
    /// Print the data-path counters.
    Stats(QueryArgs),
    /// Print interface, mode, addresses, attached programs and table fill.
    Status(QueryArgs),
    /// Switch a running NAT to another mode, keeping its bindings.
    Mode(ModeArgs),
    /// Make the daemon re-read its config file and apply what can change in place (SIGHUP).
    Reload(ReloadArgs),
    /// Static port forwards to servers behind the NAT.
    #[command(subcommand)]
    Forward(ForwardCommand),
    /// Validate a config file without attaching anything.
    Check(CheckArgs),
    /// Remove a NAT left running by `attach --persist` (programs, pins, everything).
    Detach(DetachArgs),
    /// Delete the bindings (with their sessions) that match the filters, as `conntrack -D`.
    Delete(DeleteArgs),
    /// Delete every dynamic binding, as `conntrack -F`; forwards and port mappings stay.
    Flush(FlushArgs),
    /// Write the manual pages and shell completions into a directory (for packagers).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

/// `nat-ctl generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Directory to write into (created if missing): `man8/` and `completions/`.
    pub dir: std::path::PathBuf,
}

/// `nat-ctl forward ...`.
#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Forward EXTERNAL_PORT (tcp or udp) to INTERNAL_IP:PORT.
    Add(ForwardAddArgs),
    /// Remove the forward on EXTERNAL_PORT.
    Del(ForwardDelArgs),
    /// List the forwards.
    List(QueryArgs),
}

/// `nat-ctl forward add`.
#[derive(Debug, Args)]
pub struct ForwardAddArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// tcp or udp.
    #[arg(value_parser = ["tcp", "udp"])]
    pub proto: String,
    /// External port.
    pub external_port: String,
    /// Internal server, IP:PORT.
    pub internal: String,
    /// External address (default: the NAT's first).
    #[arg(long = "external-addr", value_name = "ADDR", value_parser = |s: &str| parse_ipv4(s).map_err(|e| e.to_string()))]
    pub external_addr: Option<Ipv4Addr>,
}

/// `nat-ctl forward del`.
#[derive(Debug, Args)]
pub struct ForwardDelArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// tcp or udp.
    #[arg(value_parser = ["tcp", "udp"])]
    pub proto: String,
    /// External port.
    pub external_port: String,
    /// External address (default: the NAT's first).
    #[arg(long = "external-addr", value_name = "ADDR", value_parser = |s: &str| parse_ipv4(s).map_err(|e| e.to_string()))]
    pub external_addr: Option<Ipv4Addr>,
}

/// `nat-ctl mode`.
#[derive(Debug, Args)]
pub struct ModeArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// The new mode: full-cone, restricted-cone, port-restricted or symmetric.
    #[arg(value_parser = mode_parser())]
    pub mode: Mode,
}

/// `nat-ctl reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface", conflicts_with = "pid")]
    pub iface: Option<String>,
    /// The NAT whose daemon has this pid (what a service manager knows, `$MAINPID`).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
}

/// Shortest accepted expiry sweep interval.
pub const SWEEP_INTERVAL_MS_MIN: u64 = 10;
/// Longest accepted expiry sweep interval.
pub const SWEEP_INTERVAL_MS_MAX: u64 = 60_000;
/// Default expiry sweep interval: timers are honoured to within about a second.
pub const SWEEP_INTERVAL_MS_DEFAULT: u64 = 1_000;

/// `nat-ctl attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// External interface (the one facing the remotes); may come from the config file.
    pub iface: Option<String>,
    /// TOML config file; flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// NAT type: full-cone, restricted-cone, port-restricted (default) or symmetric.
    #[arg(long, value_parser = mode_parser())]
    pub mode: Option<Mode>,
    /// External address (repeatable for a pool; stays fixed); default: the interface's primary
    /// IPv4 address, followed when it changes.
    #[arg(long = "external-addr", value_name = "ADDR", value_parser = |s: &str| parse_ipv4(s).map_err(|e| e.to_string()))]
    pub external_addrs: Vec<Ipv4Addr>,
    /// External port range for internal ports >= 1024 (ports < 1024 map below 1024).
    #[arg(long, value_name = "MIN-MAX", value_parser = |s: &str| parse_port_range(s).map_err(|e| e.to_string()))]
    pub ports: Option<PortRange>,
    /// UDP idle timeout in seconds (default 300, RFC 4787 REQ-5c).
    #[arg(long, value_name = "SECS")]
    pub udp_timeout: Option<u32>,
    /// TCP established idle timeout in seconds (default 7440, RFC 5382 REQ-5).
    #[arg(long, value_name = "SECS")]
    pub tcp_established_timeout: Option<u32>,
    /// TCP transitory (opening, closing, reset) idle timeout in seconds (default 240).
    #[arg(long, value_name = "SECS")]
    pub tcp_transitory_timeout: Option<u32>,
    /// ICMP query idle timeout in seconds (default 60, RFC 5508 REQ-2).
    #[arg(long, value_name = "SECS")]
    pub icmp_timeout: Option<u32>,
    /// Internal interface (repeatable): gets the internal-side program (hairpinning, so
    /// internal hosts reach each other through their external endpoints, and the XDP fast
    /// path). Default: found automatically (every other interface that is up and holds an
    /// IPv4 address in 10/8, 172.16/12, 192.168/16 or 100.64/10); `none` turns them off.
    #[arg(long = "internal-iface", value_name = "IFACE")]
    pub internal_ifaces: Vec<String>,
    /// Most dynamic bindings at once; new flows beyond it are dropped (table_full). Default: as
    /// conntrack's nf_conntrack_max, RAM / 128 KiB (at least 1 024), at most 57 344, so an idle
    /// attach holds at most 16 MiB of maps. Memory follows the live flows (about 0.5 KiB per
    /// binding with one remote); a larger N costs 16 bytes per map slot up front (262 144: 67 MiB)
    #[arg(long, value_name = "N")]
    pub max_bindings: Option<u32>,
    /// Most dynamic bindings per internal host (RFC 6888 REQ-4); 0 = no limit.
    #[arg(long, value_name = "N")]
    pub max_bindings_per_host: Option<u32>,
    /// Most sessions (remote endpoints) per internal host (RFC 6888 REQ-5); 0 = no limit;
    /// default: a quarter of the session table.
    #[arg(long, value_name = "N")]
    pub max_sessions_per_host: Option<u32>,
    /// Most sessions per binding (RFC 6888 REQ-5); 0 = no limit; default: a quarter of the
    /// per-host default.
    #[arg(long, value_name = "N")]
    pub max_sessions_per_binding: Option<u32>,
    /// How often the expiry sweep runs, in milliseconds (default 1000).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(SWEEP_INTERVAL_MS_MIN..=SWEEP_INTERVAL_MS_MAX))]
    pub sweep_interval_ms: Option<u64>,
    /// Serve the counters and table fill in the Prometheus text format at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Keep the data path translating when the daemon exits; a later attach adopts it with all
    /// bindings, sessions and forwards. `nat-ctl detach IFACE` removes it.
    #[arg(long)]
    pub persist: bool,
    /// Unsolicited inbound SYNs: `drop` silently (default) or answer with ICMP port unreachable
    /// after 6 s unless the inside opened the connection meanwhile (RFC 5382 REQ-4).
    #[arg(long, value_name = "drop|icmp", value_parser = |s: &str| parse_unsolicited_syn(s).map_err(|e| e.to_string()))]
    pub unsolicited_syn: Option<bool>,
    /// Tell a host whose new flow is refused (limits, no free port): `off` (default),
    /// `admin-prohibited` (ICMP 3/13, RFC 5508 REQ-8) or `host-unreachable` (3/1, RFC 6888).
    #[arg(long, value_name = "KIND", value_parser = |s: &str| RefusalIcmp::parse(s).map_err(|e| e.to_string()))]
    pub refusal_icmp: Option<RefusalIcmp>,
    /// How the XDP programs attach: `auto` (default: native, else generic with a notice),
    /// `native` (in the driver; fails where the driver has none) or `generic` (any device).
    #[arg(long, value_name = "auto|native|generic", value_parser = |s: &str| XdpModeChoice::parse(s).map_err(|e| e.to_string()))]
    pub xdp_mode: Option<XdpModeChoice>,
    /// Print the data path's debug lines (filtered packets, unsolicited SYNs) through aya-log;
    /// off by default, and then they cost one flag test.
    #[arg(long)]
    pub datapath_log: bool,
    /// Log binding creation and removal (protocol, internal, external, time; RFC 6888 §4).
    #[arg(long)]
    pub debug: bool,
    /// Least serious log lines shown: error, warn, info (default) or debug, trace; without it
    /// RUST_LOG (tracing-subscriber's directives, e.g. `warn,nat_ctl::binding=info`) decides.
    #[arg(long, value_name = "LEVEL", value_parser = crate::logging::LEVELS)]
    pub log_level: Option<String>,
    /// Serve port-mapping requests on the internal interfaces: `pcp` (RFC 6887) and `nat-pmp`
    /// (RFC 6886) on UDP 5351, `upnp` (UPnP IGD: SSDP on UDP 1900, HTTP on TCP 2869), any
    /// comma-separated set (`pcp,nat-pmp,upnp`) or `off` (default); add `third-party` to let a
    /// host map for another (PCP's THIRD_PARTY option, UPnP's NewInternalClient).
    #[arg(long, value_name = "PROTOCOLS", value_parser = |s: &str| crate::port_mapping::Protocols::parse(s).map_err(|e| e.to_string()))]
    pub port_mapping: Option<crate::port_mapping::Protocols>,
}

/// `nat-ctl check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The TOML config file to validate.
    #[arg(long, value_name = "FILE")]
    pub config: std::path::PathBuf,
}

/// `nat-ctl detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// External interface of the NAT to remove.
    pub iface: String,
}

/// Selects a running NAT.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `nat-ctl mappings`.
#[derive(Debug, Args)]
pub struct MappingsArgs {
    /// Which NAT, and the output format.
    #[command(flatten)]
    pub query: QueryArgs,
    /// Which entries.
    #[command(flatten)]
    pub filter: TableFilterArgs,
    /// Print only how many entries match.
    #[arg(long)]
    pub count: bool,
}

/// Selects entries of the NAT table; every given filter must match.
#[derive(Debug, Args)]
pub struct TableFilterArgs {
    /// Only this protocol (udp, tcp, icmp).
    #[arg(long, value_parser = ["udp", "tcp", "icmp"])]
    pub proto: Option<String>,
    /// Internal endpoint: ADDR, ADDR:PORT or :PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_endpoint_filter)]
    pub internal: Option<EndpointFilter>,
    /// External endpoint: ADDR, ADDR:PORT or :PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_endpoint_filter)]
    pub external: Option<EndpointFilter>,
    /// Remote endpoint: ADDR, ADDR:PORT or :PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_endpoint_filter)]
    pub remote: Option<EndpointFilter>,
}

impl TableFilterArgs {
    /// The filters as the table applies them.
    pub fn to_filter(&self) -> RowFilter {
        RowFilter {
            proto: self.proto.clone(),
            internal: self.internal,
            external: self.external,
            remote: self.remote,
        }
    }
}

/// The modes by name, so clap lists them and suggests the nearest for a typo.
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Mode::ALL.map(Mode::name))
        .map(|name| parse_mode(&name).expect("clap accepted only a mode's name"))
}

fn parse_endpoint_filter(text: &str) -> Result<EndpointFilter, String> {
    EndpointFilter::parse(text).map_err(|e| format!("{e:#}"))
}

/// `nat-ctl delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// Which bindings: those with an entry that matches (at least one filter is required).
    #[command(flatten)]
    pub filter: TableFilterArgs,
    /// Also delete the static forwards that match (port mappings of PCP and NAT-PMP stay).
    #[arg(long)]
    pub forwards: bool,
}

/// `nat-ctl flush`.
#[derive(Debug, Args)]
pub struct FlushArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// Also delete every static forward (port mappings of PCP and NAT-PMP stay).
    #[arg(long)]
    pub forwards: bool,
}
