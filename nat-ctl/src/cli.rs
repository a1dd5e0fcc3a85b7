//! Command-line interface definitions.

use std::net::Ipv4Addr;

use clap::{Args, Parser, Subcommand};
use nat_common::{alloc::PortRange, Mode};

use crate::settings::{parse_ipv4, parse_mode, parse_port_range};

/// eBPF/XDP IPv4 NAT gateway controller.
#[derive(Debug, Parser)]
#[command(name = "nat-ctl", version, about)]
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
}

/// `nat-ctl mode`.
#[derive(Debug, Args)]
pub struct ModeArgs {
    /// External interface of the NAT (optional when exactly one runs in this namespace).
    #[arg(short = 'i', long = "iface")]
    pub iface: Option<String>,
    /// The new mode: full-cone, restricted-cone, port-restricted or symmetric.
    #[arg(value_parser = |s: &str| parse_mode(s).map_err(|e| e.to_string()))]
    pub mode: Mode,
}

/// `nat-ctl attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// External interface (the one facing the remotes).
    pub iface: String,
    /// NAT type: full-cone, restricted-cone, port-restricted or symmetric.
    #[arg(long, value_parser = |s: &str| parse_mode(s).map_err(|e| e.to_string()), default_value = "port-restricted")]
    pub mode: Mode,
    /// External address (repeatable for a pool); default: the interface's primary IPv4 address.
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
    /// Internal interface (repeatable): gets the hairpinning program, so internal hosts can
    /// reach each other through their external endpoints.
    #[arg(long = "internal-iface", value_name = "IFACE")]
    pub internal_ifaces: Vec<String>,
    /// Most dynamic bindings at once; new flows beyond it are dropped (table_full).
    #[arg(long, value_name = "N")]
    pub max_bindings: Option<u32>,
    /// Most dynamic bindings per internal host (RFC 6888 REQ-4); 0 = no limit.
    #[arg(long, value_name = "N")]
    pub max_bindings_per_host: Option<u32>,
    /// How often the expiry sweep runs, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub sweep_interval_ms: u64,
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
    /// Only this protocol (udp, tcp, icmp).
    #[arg(long, value_parser = ["udp", "tcp", "icmp"])]
    pub proto: Option<String>,
    /// Only this internal address.
    #[arg(long, value_parser = |s: &str| parse_ipv4(s).map_err(|e| e.to_string()))]
    pub internal: Option<Ipv4Addr>,
}
