//! Typed access to an instance's pinned maps, used by the daemon and by every CLI subcommand.

use std::{net::SocketAddrV4, path::Path};

use crate::batch;
use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    Pod,
};
use nat_common::{
    maps::{names, SessionUsageKey},
    BindingKey, BindingValue, Counter, ExternalKey, ExternalValue, NatConfig, SessionKey, SessionValue,
};

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): insert only if the key is free, the way the data
/// path claims a port; fails with `EEXIST` otherwise.
pub const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: update only if the key is there, so an entry the sweep removed is never revived.
pub const BPF_EXIST: u64 = 2;

/// The maps of one running NAT.
pub struct PinnedMaps {
    /// `NatConfig`, one entry.
    pub config: Array<MapData, NatConfig>,
    /// Outbound binding lookups.
    pub bindings_out: HashMap<MapData, BindingKey, BindingValue>,
    /// Inbound binding lookups.
    pub bindings_in: HashMap<MapData, ExternalKey, ExternalValue>,
    /// Filter sessions.
    pub sessions: HashMap<MapData, SessionKey, SessionValue>,
    /// Per-CPU counters.
    pub counters: PerCpuArray<MapData, u64>,
    /// Bindings created per internal host (written by the data path).
    pub usage_created: HashMap<MapData, u32, u64>,
    /// Bindings removed per internal host (written only by the controller's sweep).
    pub usage_released: HashMap<MapData, u32, u64>,
    /// Interfaces the XDP fast path may redirect to.
    pub fast_path_ifaces: HashMap<MapData, u32, u32>,
    /// Nonzero while `fast_path_ifaces` holds any interface.
    pub fast_path_on: Array<MapData, u32>,
    /// Sessions created per host, per binding and in all (written by the data path).
    pub session_usage_created: HashMap<MapData, SessionUsageKey, u64>,
    /// Sessions removed per host, per binding and in all (written only by the controller).
    pub session_usage_released: HashMap<MapData, SessionUsageKey, u64>,
}

/// Every entry of a hash map: in batches, or one entry per call where the kernel has no batch
/// operations (older than 5.6).
pub fn read_all<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    match batch::read_all(map) {
        Ok(all) => Ok(all),
        Err(e) if batch::unsupported(&e) => Ok(map.iter().filter_map(|r| r.ok()).collect()),
        Err(e) => Err(e).context("cannot read a map in batches"),
    }
}

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("cannot open pinned map {}", path.display()))
}

impl PinnedMaps {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(PinnedMaps {
            config: Array::try_from(Map::Array(open(dir, names::CONFIG)?))?,
            bindings_out: HashMap::try_from(Map::HashMap(open(dir, names::BINDINGS_OUT)?))?,
            bindings_in: HashMap::try_from(Map::HashMap(open(dir, names::BINDINGS_IN)?))?,
            sessions: HashMap::try_from(Map::HashMap(open(dir, names::SESSIONS)?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(dir, names::COUNTERS)?))?,
            usage_created: HashMap::try_from(Map::HashMap(open(dir, names::USAGE_CREATED)?))?,
            usage_released: HashMap::try_from(Map::HashMap(open(dir, names::USAGE_RELEASED)?))?,
            fast_path_ifaces: HashMap::try_from(Map::HashMap(open(dir, names::FAST_PATH_IFACES)?))?,
            fast_path_on: Array::try_from(Map::Array(open(dir, names::FAST_PATH_ON)?))?,
            session_usage_created: HashMap::try_from(Map::HashMap(open(dir, names::SESSION_USAGE_CREATED)?))?,
            session_usage_released: HashMap::try_from(Map::HashMap(open(
                dir,
                names::SESSION_USAGE_RELEASED,
            )?))?,
        })
    }

    /// The running configuration.
    pub fn read_config(&self) -> Result<NatConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Replaces the running configuration.
    pub fn write_config(&mut self, config: &NatConfig) -> Result<()> {
        Ok(self.config.set(0, config, 0)?)
    }

    /// Every outbound binding entry, read in batches (see `batch`).
    pub fn bindings(&self) -> Result<Vec<(BindingKey, BindingValue)>> {
        read_all(&self.bindings_out)
    }

    /// Every session entry, read in batches.
    pub fn sessions(&self) -> Result<Vec<(SessionKey, SessionValue)>> {
        read_all(&self.sessions)
    }

    /// Every counter, summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = self.counters.get(&(c as u32), 0)?;
                Ok((c, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Why a static binding could not be installed; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimRefused {
    /// The external port is held (by a live binding, a forward or a port mapping), or was
    /// just taken by a new flow.
    ExternalTaken,
    /// The internal endpoint has a binding already (one opened meanwhile included).
    InternalTaken,
}

impl PinnedMaps {
    /// Installs a static binding `external` <-> `internal` with `flags` (a forward, or a port
    /// mapping with its `BINDING_FLAG_*`): the external port first, atomically
    /// (`BPF_NOEXIST`), exactly as the data path claims one, so a port a live binding or a
    /// forward owns is never taken (RFC 6887 §18); then the internal endpoint, giving the port
    /// back when that fails.
    pub fn claim_static_binding(
        &mut self,
        proto: u8,
        external: SocketAddrV4,
        internal: SocketAddrV4,
        flags: u8,
    ) -> std::result::Result<(), ClaimRefused> {
        let key_out = BindingKey::of_endpoint(proto, internal);
        let key_in = ExternalKey::of_endpoint(proto, external);
        let inbound = ExternalValue {
            internal_addr: key_out.internal_addr,
            internal_port: key_out.internal_port,
            flags,
            ..Default::default()
        };
        if self.bindings_in.insert(key_in, inbound, BPF_NOEXIST).is_err() {
            return Err(ClaimRefused::ExternalTaken);
        }
        let outbound = BindingValue {
            last_seen_ns: crate::clock::monotonic_ns(),
            external_addr: key_in.external_addr,
            external_port: key_in.external_port,
            flags,
            _pad: 0,
        };
        if self.bindings_out.insert(key_out, outbound, BPF_NOEXIST).is_err() {
            let _ = self.bindings_in.remove(&key_in);
            return Err(ClaimRefused::InternalTaken);
        }
        Ok(())
    }

    /// Dynamic bindings `internal_addr` holds now (`USAGE_ALL_HOSTS` for the total).
    pub fn usage(&self, internal_addr: u32) -> u64 {
        let created = self.usage_created.get(&internal_addr, 0).unwrap_or(0);
        created.saturating_sub(self.usage_released.get(&internal_addr, 0).unwrap_or(0))
    }

    /// Records that the controller removed one dynamic binding of `internal_addr`.
    pub fn record_released(&mut self, internal_addr: u32) -> Result<()> {
        for key in [nat_common::maps::USAGE_ALL_HOSTS, internal_addr] {
            let released = self.usage_released.get(&key, 0).unwrap_or(0);
            self.usage_released.insert(key, released + 1, 0)?;
        }
        Ok(())
    }
}
