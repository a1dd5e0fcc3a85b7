//! How full the NAT's tables are: one reading, shown by `nat-ctl status` and exported as
//! gauges by the metrics endpoint, so the two can never disagree.

use nat_common::{
    maps::{binding_map_capacity, session_map_capacity, SessionUsageKey, USAGE_ALL_HOSTS},
    NatConfig,
};

use crate::{pinned::PinnedMaps, session_usage};

/// The fill levels of the binding and session maps against their limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFill {
    /// Dynamic bindings (created by the data path, not yet expired).
    pub dynamic_bindings: u64,
    /// Most dynamic bindings allowed (`--max-bindings`).
    pub max_bindings: u32,
    /// Entries of the outbound binding map, static forwards and port mappings included.
    pub binding_entries: usize,
    /// Capacity of each binding map.
    pub binding_capacity: u32,
    /// Entries of the session map.
    pub session_entries: usize,
    /// Capacity of the session map.
    pub session_capacity: u32,
    /// Sessions (remote endpoints of bindings) in use, by the usage counters.
    pub sessions_in_use: u64,
}

impl TableFill {
    /// Reads the usage counters; the entry counts come from the caller, which has read (or
    /// counted) the maps in batches already.
    pub fn read(
        maps: &PinnedMaps,
        config: &NatConfig,
        binding_entries: usize,
        session_entries: usize,
    ) -> Self {
        TableFill {
            dynamic_bindings: maps.usage(USAGE_ALL_HOSTS),
            max_bindings: config.max_bindings,
            binding_entries,
            binding_capacity: binding_map_capacity(config.max_bindings),
            session_entries,
            session_capacity: session_map_capacity(config.max_bindings),
            sessions_in_use: session_usage::in_use(maps, SessionUsageKey::all()),
        }
    }
}
