//! Types and pure logic shared by the eBPF data path (`nat-ebpf`) and the controller (`nat-ctl`).
//!
//! Everything here is `no_std` plain data or side-effect-free functions, so the same code runs in
//! the kernel and in unit tests. Map keys and values are `#[repr(C)]` with explicit padding: the
//! kernel hashes keys bytewise, so every byte of a key must be written.
//!
//! Byte order: addresses and ports inside map keys and values are kept in **network byte order**,
//! exactly as they appear on the wire, so the data path never converts them. The configuration's
//! port range is in host order because the allocator does arithmetic on it.
#![no_std]

pub mod alloc;
pub mod bench;
pub mod checksum;
pub mod config;
pub mod counters;
pub mod maps;
pub mod mode;
pub mod packet;
pub mod source;
pub mod table_size;
pub mod tcp_state;
pub mod tcp_track;

#[cfg(feature = "user")]
mod pod;

pub use config::NatConfig;
pub use counters::Counter;
pub use maps::{
    BindingKey, BindingValue, ExternalKey, ExternalValue, FragmentKey, FragmentValue, SessionKey,
    SessionValue,
};
pub use mode::Mode;

/// IP protocol numbers the data path translates.
pub mod proto {
    /// ICMP (echo identifier plays the port).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;

    /// Short lowercase name used in the CLI and JSON output.
    pub fn name(proto: u8) -> &'static str {
        match proto {
            ICMP => "icmp",
            TCP => "tcp",
            UDP => "udp",
            _ => "other",
        }
    }
}
