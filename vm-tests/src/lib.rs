//! End-to-end test lab for the NAT gateway: network namespaces, the `nat-ctl` process, traffic
//! tools and packet checks.
//!
//! Everything here is real: namespaces, veth pairs, a bridge, the kernel's forwarding, the
//! NAT's eBPF programs loaded by `nat-ctl`, and third-party tools on the other side. Each lab
//! uses unique names and removes itself on drop, and every process it starts is ended by pid.
//! Root only.

pub mod classify;
pub mod flows;
pub mod icmpcheck;
pub mod lab;
pub mod nat;
pub mod netns;
pub mod ops;
pub mod p2p;
pub mod packet;
pub mod port_mapping;
pub mod proc;
pub mod tools;

pub use lab::{Lab, LabOptions};
pub use nat::{Mapping, NatProcess, Stats};

/// Fails unless running as root (the lab needs CAP_NET_ADMIN and CAP_SYS_ADMIN).
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("vm-tests need root (network namespaces, XDP)");
    }
    Ok(())
}
