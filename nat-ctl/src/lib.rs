//! Controller of the eBPF/XDP NAT gateway: loads and attaches the data path, owns the policy
//! (mode, addresses, port range, timeouts), expires idle state, and reads the NAT table and
//! counters from the pinned maps.

pub mod addr_watch;
pub mod batch;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config_file;
pub mod daemon;
pub mod events;
pub mod expiry;
pub mod fastpath;
pub mod forwards;
pub mod generate;
pub mod iface;
pub mod instance;
pub mod internal_ifaces;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod mountns;
pub mod netlink;
pub mod notices;
pub mod pinned;
pub mod port_mapping;
pub mod privileges;
pub mod raw;
pub mod reinject;
pub mod reload;
pub mod service_notify;
pub mod session_usage;
pub mod settings;
pub mod stop;
pub mod sysctl;
pub mod table;
pub mod table_delete;
pub mod table_fill;
pub mod table_filter;
pub mod tc_filter;
pub mod usage_error;
pub mod xdp_features;
pub mod xdp_mode;
