//! Binding limits: a global one (the table size) and one per internal host (RFC 6888 REQ-4).
//! A full table refuses new flows; it never evicts existing bindings (RFC 6888 REQ-11d).

use aya_ebpf::bindings::BPF_NOEXIST;
use nat_common::{maps::USAGE_ALL_HOSTS, Counter, NatConfig};

use crate::{
    maps::{NAT_USAGE_CREATED, NAT_USAGE_RELEASED},
    stats::count,
};

#[inline(always)]
fn current(key: u32) -> u64 {
    // SAFETY: plain data copied out at once.
    let created = unsafe { NAT_USAGE_CREATED.get(key) }.copied().unwrap_or(0);
    // SAFETY: as above.
    let released = unsafe { NAT_USAGE_RELEASED.get(key) }.copied().unwrap_or(0);
    created.saturating_sub(released)
}

/// May `internal_addr` get one more dynamic binding? Counts the refusal when not.
#[inline(always)]
pub fn may_create(cfg: &NatConfig, internal_addr: u32) -> bool {
    if current(USAGE_ALL_HOSTS) >= cfg.max_bindings as u64 {
        count(Counter::TableFull);
        return false;
    }
    if cfg.max_bindings_per_host != 0 && current(internal_addr) >= cfg.max_bindings_per_host as u64 {
        count(Counter::HostLimit);
        return false;
    }
    true
}

#[inline(always)]
fn add_one(key: u32) {
    for _ in 0..2 {
        if let Some(slot) = NAT_USAGE_CREATED.get_ptr_mut(key) {
            // SAFETY: map value pointer; other CPUs update it concurrently, hence the atomic add.
            unsafe { atomic_add(slot, 1) };
            return;
        }
        // First binding of this host: create the slot; if another CPU just did, add to theirs.
        if NAT_USAGE_CREATED.insert(key, 1, BPF_NOEXIST as u64).is_ok() {
            return;
        }
    }
}

/// Records a new dynamic binding of `internal_addr`.
#[inline(always)]
pub fn record_created(internal_addr: u32) {
    add_one(USAGE_ALL_HOSTS);
    add_one(internal_addr);
}

/// `*slot += value` as one BPF atomic instruction (`BPF_ATOMIC | BPF_ADD`); core exposes no
/// 64-bit atomics on this target.
///
/// # Safety
/// `slot` must point at a writable, 8-byte aligned u64 (a map value).
#[inline(always)]
unsafe fn atomic_add(slot: *mut u64, value: u64) {
    unsafe { core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) slot, in(reg) value) };
}
