//! Limits on NAT state: bindings in all and per internal host (RFC 6888 REQ-4), sessions per
//! internal host and per binding (RFC 6888 REQ-5). A limit refuses new flows; it never evicts
//! existing state (RFC 6888 REQ-11d).
//!
//! Each count is two numbers: what the data path created (atomic adds, here) and what the
//! controller removed (written only by it, when its sweep removes a binding or a session), so
//! `created - released` is exact without any read-modify-write race between the two.

use aya_ebpf::{bindings::BPF_NOEXIST, maps::HashMap};
use nat_common::{
    maps::{SessionUsageKey, USAGE_ALL_HOSTS},
    Counter, NatConfig,
};

use crate::{
    maps::{NAT_SESS_USE_CREATED, NAT_SESS_USE_RELEASED, NAT_USAGE_CREATED, NAT_USAGE_RELEASED},
    stats::count,
};

#[inline(always)]
fn current<K>(created: &HashMap<K, u64>, released: &HashMap<K, u64>, key: K) -> u64 {
    // SAFETY: plain data copied out at once.
    let made = unsafe { created.get(&key) }.copied().unwrap_or(0);
    // SAFETY: as above.
    let gone = unsafe { released.get(&key) }.copied().unwrap_or(0);
    made.saturating_sub(gone)
}

/// May `internal_addr` get one more dynamic binding? Counts the refusal when not.
#[inline(always)]
pub fn may_create(cfg: &NatConfig, internal_addr: u32) -> bool {
    if current(&NAT_USAGE_CREATED, &NAT_USAGE_RELEASED, USAGE_ALL_HOSTS) >= cfg.max_bindings as u64 {
        count(Counter::TableFull);
        return false;
    }
    if cfg.max_bindings_per_host != 0
        && current(&NAT_USAGE_CREATED, &NAT_USAGE_RELEASED, internal_addr) >= cfg.max_bindings_per_host as u64
    {
        count(Counter::HostLimit);
        return false;
    }
    true
}

#[inline(always)]
fn add_one<K>(created: &HashMap<K, u64>, key: K) {
    for _ in 0..2 {
        if let Some(slot) = created.get_ptr_mut(&key) {
            // SAFETY: map value pointer; other CPUs update it concurrently, hence the atomic add.
            unsafe { atomic_add(slot, 1) };
            return;
        }
        // First one of this key: create the slot; if another CPU just did, add to theirs.
        if created.insert(&key, 1u64, BPF_NOEXIST as u64).is_ok() {
            return;
        }
    }
}

/// Records a new dynamic binding of `internal_addr`.
#[inline(always)]
pub fn record_created(internal_addr: u32) {
    add_one(&NAT_USAGE_CREATED, USAGE_ALL_HOSTS);
    add_one(&NAT_USAGE_CREATED, internal_addr);
}

/// May `internal_addr` hold one more session? Counts the refusal when not.
#[inline(always)]
pub fn host_has_session_room(cfg: &NatConfig, internal_addr: u32) -> bool {
    let limit = cfg.max_sessions_per_host;
    if limit != 0
        && current(
            &NAT_SESS_USE_CREATED,
            &NAT_SESS_USE_RELEASED,
            SessionUsageKey::host(internal_addr),
        ) >= limit as u64
    {
        count(Counter::SessionLimit);
        return false;
    }
    true
}

/// May `internal_addr` open one more session on the binding `external_addr:external_port`
/// (`proto`)? Counts the refusal when not.
#[inline(always)]
pub fn may_create_session(
    cfg: &NatConfig,
    internal_addr: u32,
    proto: u8,
    external_addr: u32,
    external_port: u16,
) -> bool {
    if !host_has_session_room(cfg, internal_addr) {
        return false;
    }
    let limit = cfg.max_sessions_per_binding;
    if limit != 0
        && current(
            &NAT_SESS_USE_CREATED,
            &NAT_SESS_USE_RELEASED,
            SessionUsageKey::binding(proto, external_addr, external_port),
        ) >= limit as u64
    {
        count(Counter::SessionLimit);
        return false;
    }
    true
}

/// Records a new session of `internal_addr` on the binding `external_addr:external_port`.
#[inline(always)]
pub fn record_session_created(internal_addr: u32, proto: u8, external_addr: u32, external_port: u16) {
    add_one(&NAT_SESS_USE_CREATED, SessionUsageKey::all());
    add_one(&NAT_SESS_USE_CREATED, SessionUsageKey::host(internal_addr));
    add_one(
        &NAT_SESS_USE_CREATED,
        SessionUsageKey::binding(proto, external_addr, external_port),
    );
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
