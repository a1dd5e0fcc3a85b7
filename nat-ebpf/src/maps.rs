//! The NAT's kernel maps. All are pinned by name under the instance's bpffs directory, so the
//! controller's CLI can read them while the daemon runs.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use nat_common::{
    counters::COUNTER_COUNT,
    maps::{
        binding_map_capacity, session_map_capacity, session_usage_capacity, SessionUsageKey,
        DEFAULT_MAX_BINDINGS, MAX_FAST_PATH_IFACES, MAX_FRAGMENTS, MAX_USAGE_HOSTS, NOTICE_RING_BYTES,
        PARKED_RING_BYTES,
    },
    BindingKey, BindingValue, ExternalKey, ExternalValue, FragmentKey, FragmentValue, NatConfig, SessionKey,
    SessionValue,
};

/// `BPF_F_NO_PREALLOC`: elements are allocated on insert and freed after an RCU grace period,
/// so a value pointer a program holds never lands on a recycled element, and a map's memory
/// follows its live entries: an idle map holds only its bucket array (16 bytes per
/// power-of-two slot), not `max_entries` elements. `max_entries` is still enforced (an insert
/// into a full map fails with `-E2BIG`, as with preallocation), and since 6.1 the elements of
/// programs' inserts come from per-CPU caches (`bpf_mem_alloc`), which XDP and TC may use.
const NO_PREALLOC: u32 = 1;

/// `NatConfig`, written by the controller.
#[map]
pub static NAT_CONFIG: Array<NatConfig> = Array::pinned(1, 0);

/// Outbound lookups: internal endpoint (and remote, in symmetric mode) -> external endpoint.
#[map]
pub static NAT_BINDINGS_OUT: HashMap<BindingKey, BindingValue> =
    HashMap::pinned(binding_map_capacity(DEFAULT_MAX_BINDINGS), NO_PREALLOC);

/// Inbound lookups: external endpoint -> internal endpoint. Inserted first, with `BPF_NOEXIST`,
/// to claim an external port atomically.
#[map]
pub static NAT_BINDINGS_IN: HashMap<ExternalKey, ExternalValue> =
    HashMap::pinned(binding_map_capacity(DEFAULT_MAX_BINDINGS), NO_PREALLOC);

/// Remotes each binding has sent to (filter state), with TCP state and last use.
#[map]
pub static NAT_SESSIONS: HashMap<SessionKey, SessionValue> =
    HashMap::pinned(session_map_capacity(DEFAULT_MAX_BINDINGS), NO_PREALLOC);

/// Inbound fragmented datagrams whose first fragment was translated. LRU: a flood of stray
/// fragments can only evict other fragment state (RFC 4787 REQ-14a). LRU maps are always
/// preallocated: 8 192 entries hold about 0.7 MiB.
#[map]
pub static NAT_FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::pinned(MAX_FRAGMENTS, 0);

/// Bindings created per internal host (key 0: all hosts). Only the data path writes it, with
/// atomic adds. (Capacities here are defaults; the controller sizes the maps at load time.)
#[map]
pub static NAT_USAGE_CREATED: HashMap<u32, u64> = HashMap::pinned(MAX_USAGE_HOSTS, NO_PREALLOC);

/// Bindings removed per internal host (key 0: all hosts). Only the controller writes it, so
/// `created - released` is exact without any read-modify-write race.
#[map]
pub static NAT_USAGE_RELEASED: HashMap<u32, u64> = HashMap::pinned(MAX_USAGE_HOSTS, NO_PREALLOC);

/// Sessions created per internal host, per binding and in all (see `SessionUsageKey`). Only
/// the data path writes it, with atomic adds. Not preallocated: the controller deletes a
/// binding's entries when the binding goes, and a CPU adding to one at that moment must not
/// add to another key's recycled element.
#[map]
pub static NAT_SESS_USE_CREATED: HashMap<SessionUsageKey, u64> =
    HashMap::pinned(session_usage_capacity(DEFAULT_MAX_BINDINGS), NO_PREALLOC);

/// Sessions removed per internal host, per binding and in all. Only the controller writes it.
#[map]
pub static NAT_SESS_USE_RELEASED: HashMap<SessionUsageKey, u64> =
    HashMap::pinned(session_usage_capacity(DEFAULT_MAX_BINDINGS), NO_PREALLOC);

/// Interfaces the XDP fast path may redirect to (the external one and the internal ones);
/// empty unless internal interfaces are attached.
#[map]
pub static NAT_FAST_PATH_IFACES: HashMap<u32, u32> = HashMap::pinned(MAX_FAST_PATH_IFACES, 0);

/// Nonzero while any interface is registered for the fast path. An array rather than a key of
/// `NAT_FAST_PATH_IFACES`: the verifier inlines the lookup of an array element
/// (`array_map_gen_lookup`), so asking costs a load, not a hash lookup, on every packet.
#[map]
pub static NAT_FAST_PATH_ON: Array<u32> = Array::pinned(1, 0);

/// Out-of-order inbound fragments handed to the controller (see `ParkedFragment`).
#[map]
pub static NAT_PARKED_FRAGMENTS: RingBuf = RingBuf::pinned(PARKED_RING_BYTES, 0);

/// Packets for the controller to answer with an ICMP error (see `Notice`).
#[map]
pub static NAT_NOTICES: RingBuf = RingBuf::pinned(NOTICE_RING_BYTES, 0);

/// Per-CPU event counters, indexed by `nat_common::Counter`.
#[map]
pub static NAT_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);
