//! The data path's clock and how often it writes a timestamp back: shared by bindings and
//! sessions, which both stamp their last outbound packet (RFC 4787 REQ-6: outbound refresh).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

/// Timestamps are written back only when they are at least this stale, so established flows
/// do not bounce a cache line between CPUs on every packet. Far below any timeout.
pub const REFRESH_GRANULARITY_NS: u64 = 100_000_000;

/// The clock shared by data path and controller (CLOCK_MONOTONIC, coarse).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper with no arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Writes `now` into `stamp` when the stamp is staler than `REFRESH_GRANULARITY_NS`. A racing
/// write from another CPU is benign: both write a current time.
#[inline(always)]
pub fn refresh(stamp: &mut u64, now: u64) {
    if now.wrapping_sub(*stamp) > REFRESH_GRANULARITY_NS {
        *stamp = now;
    }
}
