//! Typed access to an instance's pinned maps, used by the daemon and by every CLI subcommand.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use nat_common::{
    maps::names, BindingKey, BindingValue, Counter, ExternalKey, ExternalValue, NatConfig, SessionKey,
    SessionValue,
};

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

    /// Every outbound binding entry.
    pub fn bindings(&self) -> Result<Vec<(BindingKey, BindingValue)>> {
        Ok(self.bindings_out.iter().filter_map(|r| r.ok()).collect())
    }

    /// Every session entry.
    pub fn sessions(&self) -> Result<Vec<(SessionKey, SessionValue)>> {
        Ok(self.sessions.iter().filter_map(|r| r.ok()).collect())
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
