//! Data-path log lines through aya-log, for notable per-flow events only. Off by default: each
//! call site costs one flag test unless `attach --datapath-log` set `CONFIG_FLAG_DATAPATH_LOG`.
//! The logging itself is a separate, non-inlined function taking plain integers: inlined into
//! the packet handlers, aya-log's code confused the verifier's register tracking.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use nat_common::{config::CONFIG_FLAG_DATAPATH_LOG, NatConfig};

/// What happened, for the log line.
#[repr(u32)]
#[derive(Clone, Copy)]
pub enum Event {
    /// An inbound packet the mode's filter rejected.
    Filtered = 1,
    /// An unsolicited inbound SYN dropped (RFC 5382 REQ-4).
    UnsolicitedSyn = 2,
}

/// Logs `event` for a packet from `remote` to `external` (network order) when enabled.
#[inline(always)]
pub fn inbound(
    ctx: &XdpContext,
    cfg: &NatConfig,
    event: Event,
    proto: u8,
    remote: (u32, u16),
    external: (u32, u16),
) {
    if cfg.flags & CONFIG_FLAG_DATAPATH_LOG != 0 {
        // A BPF call takes five arguments at most: the small values are packed.
        let what = (event as u32) << 8 | proto as u32;
        let ports = (u16::from_be(remote.1) as u32) << 16 | u16::from_be(external.1) as u32;
        log_inbound(ctx, what, remote.0, external.0, ports);
    }
}

#[inline(never)]
fn log_inbound(ctx: &XdpContext, what: u32, remote_addr: u32, external_addr: u32, ports: u32) {
    let event = if what >> 8 == Event::Filtered as u32 {
        "filtered"
    } else {
        "unsolicited SYN"
    };
    debug!(
        ctx,
        "{} proto {} from {:i}:{} to {:i}:{}",
        event,
        what & 0xff,
        u32::from_be(remote_addr),
        ports >> 16,
        u32::from_be(external_addr),
        ports & 0xffff
    );
}
