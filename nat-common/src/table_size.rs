//! How big the NAT's tables are by default, and what they cost before the first packet.
//!
//! The binding, session and usage hash maps are created with `BPF_F_NO_PREALLOC`: an entry's
//! memory is allocated when the data path inserts it and freed when the sweep removes it, so
//! memory follows the live flows. What an idle table still holds is the kernel's bucket array:
//! one `struct bucket` per slot, `roundup_pow_of_two(max_entries)` slots per hash map
//! (`htab_map_alloc`, kernel/bpf/hashtab.c). So the default limit is chosen as conntrack
//! chooses `nf_conntrack_max` (from the machine's RAM), capped so that an idle default attach
//! holds at most `IDLE_MAP_BUDGET_BYTES` of map memory.

use crate::maps::{
    binding_map_capacity, session_map_capacity, session_usage_capacity, FragmentKey, FragmentValue,
    MAX_FAST_PATH_IFACES, MAX_FRAGMENTS, MAX_USAGE_HOSTS, NOTICE_RING_BYTES, PARKED_RING_BYTES,
};

/// Fewest bindings a RAM-derived default gives (conntrack's floor of 1 024 entries).
pub const MIN_DEFAULT_MAX_BINDINGS: u32 = 1_024;
/// Most bindings a RAM-derived default gives: the largest round limit whose idle maps stay
/// within `IDLE_MAP_BUDGET_BYTES` (binding maps of 61 440 slots round up to 65 536, the
/// session map's 245 760 to 262 144, the session usage maps' 126 977 to 131 072).
pub const MAX_DEFAULT_MAX_BINDINGS: u32 = 57_344;
/// Map memory an attach with the default limit may hold before any traffic (16 MiB: a router
/// with 256 MiB of RAM can spare it).
pub const IDLE_MAP_BUDGET_BYTES: u64 = 16 * 1024 * 1024;
/// `sizeof(struct bucket)` on 64-bit kernels (a list head and a spinlock, padded).
pub const HTAB_BUCKET_BYTES: u64 = 16;
/// `sizeof(struct htab_elem)` on 64-bit kernels (list node, hash, key offset), before key and
/// value.
pub const HTAB_ELEM_BYTES: u64 = 48;
/// Bytes of RAM per conntrack bucket in the kernel's default sizing (below the fixed steps):
/// 1/16384 of RAM for buckets of 8-byte list heads.
const CONNTRACK_RAM_PER_ENTRY: u64 = 16_384 * 8;
const GIB: u64 = 1024 * 1024 * 1024;

/// The `nf_conntrack_max` the kernel picks for a 64-bit machine with `ram_bytes` of RAM when
/// no `hashsize` is given (`nf_conntrack_init_start`, net/netfilter/nf_conntrack_core.c, since
/// Linux 5.15, "netfilter: conntrack: sanitize table size default settings"): RAM / 16384 /
/// sizeof(struct hlist_head) buckets, 65 536 above 1 GiB, 262 144 above 4 GiB, at least 1 024,
/// and a limit equal to the bucket count (`max_factor = 1`).
pub const fn conntrack_default_max(ram_bytes: u64) -> u32 {
    let n = if ram_bytes > 4 * GIB {
        262_144
    } else if ram_bytes > GIB {
        65_536
    } else {
        ram_bytes / CONNTRACK_RAM_PER_ENTRY
    };
    if n < 1_024 {
        1_024
    } else {
        n as u32
    }
}

/// The default `--max-bindings` for a machine with `ram_bytes` of RAM: conntrack's default
/// (one binding plays the part of one tracked connection), capped at
/// `MAX_DEFAULT_MAX_BINDINGS` so an idle attach stays within its memory budget.
pub const fn default_max_bindings(ram_bytes: u64) -> u32 {
    let n = conntrack_default_max(ram_bytes);
    if n < MIN_DEFAULT_MAX_BINDINGS {
        MIN_DEFAULT_MAX_BINDINGS
    } else if n > MAX_DEFAULT_MAX_BINDINGS {
        MAX_DEFAULT_MAX_BINDINGS
    } else {
        n
    }
}

const fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

const fn buckets(max_entries: u32) -> u64 {
    (max_entries as u64).next_power_of_two() * HTAB_BUCKET_BYTES
}

/// Map memory an attach with `max_bindings` holds with no traffic, as the kernel's own
/// accounting (`htab_map_mem_usage`, Linux 6.4+) sums it, to within its few fixed headers: the
/// bucket arrays of the non-preallocated hash maps, the preallocated fragment LRU and both
/// ring buffers.
pub const fn idle_map_bytes(max_bindings: u32) -> u64 {
    let bindings = binding_map_capacity(max_bindings);
    let hash = 2 * buckets(bindings)
        + buckets(session_map_capacity(max_bindings))
        + 2 * buckets(session_usage_capacity(max_bindings))
        + 2 * buckets(MAX_USAGE_HOSTS)
        + buckets(MAX_FAST_PATH_IFACES);
    let fragment_elem = HTAB_ELEM_BYTES
        + round8(core::mem::size_of::<FragmentKey>() as u64)
        + round8(core::mem::size_of::<FragmentValue>() as u64);
    let fragments = MAX_FRAGMENTS as u64 * fragment_elem + buckets(MAX_FRAGMENTS);
    hash + fragments + PARKED_RING_BYTES as u64 + NOTICE_RING_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn follows_conntrack_below_the_cap() {
        // A 256 MiB home router: conntrack allows 2 048 connections, so does the NAT.
        assert_eq!(conntrack_default_max(256 * MIB), 2_048);
        assert_eq!(default_max_bindings(256 * MIB), 2_048);
        assert_eq!(default_max_bindings(512 * MIB), 4_096);
        assert_eq!(default_max_bindings(GIB), 8_192);
        // Tiny machines keep conntrack's floor.
        assert_eq!(default_max_bindings(16 * MIB), MIN_DEFAULT_MAX_BINDINGS);
        // conntrack's fixed steps above 1 and 4 GiB are capped by the memory budget.
        assert_eq!(conntrack_default_max(2 * GIB), 65_536);
        assert_eq!(conntrack_default_max(24 * GIB), 262_144);
        assert_eq!(default_max_bindings(2 * GIB), MAX_DEFAULT_MAX_BINDINGS);
        assert_eq!(default_max_bindings(24 * GIB), MAX_DEFAULT_MAX_BINDINGS);
    }

    #[test]
    fn an_idle_default_attach_fits_the_budget() {
        let idle = idle_map_bytes(MAX_DEFAULT_MAX_BINDINGS);
        assert!(idle <= IDLE_MAP_BUDGET_BYTES, "{idle}");
        // From 61 440 bindings on, the session usage arrays double and the budget is gone.
        assert!(idle_map_bytes(61_439) <= IDLE_MAP_BUDGET_BYTES);
        assert!(idle_map_bytes(61_440) > IDLE_MAP_BUDGET_BYTES);
        // The limit conntrack would pick on a big machine would not fit.
        assert!(idle_map_bytes(262_144) > 4 * IDLE_MAP_BUDGET_BYTES);
    }
}
