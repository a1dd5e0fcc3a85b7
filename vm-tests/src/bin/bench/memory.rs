//! Memory per binding: what one binding occupies in the kernel's hash maps, computed from the
//! key and value sizes and the running kernel's per-element overhead (read from its BTF), and
//! cross-checked against the memory the kernel charges for the maps (`bpftool map show`).
//!
//! A binding is one entry in each binding map plus two session entries (address-and-port and
//! address-only). The maps are preallocated: their memory is set by `--max-bindings` when the
//! NAT attaches, not by how many bindings are live, so both figures are reported.

use std::mem::size_of;
use std::time::Duration;

use anyhow::{Context, Result};
use nat_common::{
    maps::{names, SESSIONS_PER_BINDING},
    BindingKey, BindingValue, ExternalKey, ExternalValue, SessionKey, SessionValue,
};
use vm_tests::proc;

use crate::test_instance::TestInstance;

/// Session entries one binding with one remote holds (endpoint and address-only).
pub const SESSIONS_PER_LIVE_BINDING: u64 = 2;
/// `sizeof(struct htab_elem)` and `sizeof(struct bucket)` on 64-bit kernels of this era, used
/// when the running kernel's BTF cannot be read.
const FALLBACK_HTAB_ELEM: u64 = 48;
const FALLBACK_BUCKET: u64 = 16;
/// Where the running kernel's BTF is.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Time limit of one bpftool call (dumping vmlinux BTF takes a moment).
const BPFTOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// One hash map's sizes.
#[derive(Clone, Debug)]
pub struct MapMemory {
    /// Map name.
    pub name: &'static str,
    /// Key bytes.
    pub key: u64,
    /// Value bytes.
    pub value: u64,
    /// Bytes per element: `htab_elem` + key and value each rounded up to 8.
    pub elem: u64,
    /// Capacity of the measured instance.
    pub max_entries: u64,
    /// Bytes the kernel charges for the whole map (`bytes_memlock`), if bpftool told us.
    pub memlock: Option<u64>,
}

/// The memory figures.
#[derive(Clone, Debug)]
pub struct Memory {
    /// `sizeof(struct htab_elem)` of the running kernel.
    pub htab_elem: u64,
    /// `sizeof(struct bucket)` of the running kernel.
    pub bucket: u64,
    /// Where those two came from.
    pub source: String,
    /// Outbound bindings, inbound bindings, sessions.
    pub maps: [MapMemory; 3],
    /// The `--max-bindings` of the measured instance.
    pub max_bindings: u32,
}

impl Memory {
    /// Element bytes of one live binding: both binding entries and its two sessions.
    pub fn per_live_binding(&self) -> u64 {
        self.maps[0].elem + self.maps[1].elem + SESSIONS_PER_LIVE_BINDING * self.maps[2].elem
    }

    /// Computed bytes per configured binding: every map's preallocated elements and buckets
    /// divided by `--max-bindings`.
    pub fn per_configured_binding(&self) -> f64 {
        let total: f64 = self
            .maps
            .iter()
            .map(|m| (m.elem * m.max_entries + self.bucket * m.max_entries.next_power_of_two()) as f64)
            .sum();
        total / self.max_bindings as f64
    }

    /// The same from the kernel's own accounting, if bpftool reported all three maps.
    pub fn memlock_per_configured_binding(&self) -> Option<f64> {
        let total: u64 = self.maps.iter().map(|m| m.memlock).sum::<Option<u64>>()?;
        Some(total as f64 / self.max_bindings as f64)
    }
}

fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// `size=` of `STRUCT 'name'` in a raw BTF dump.
fn btf_struct_size(dump: &str, name: &str) -> Option<u64> {
    let needle = format!("STRUCT '{name}' size=");
    let line = dump.lines().find(|l| l.contains(&needle))?;
    let rest = &line[line.find(&needle)? + needle.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// `(htab_elem, bucket, source)` for the running kernel.
fn kernel_sizes() -> (u64, u64, String) {
    let out = proc::run(
        "bpftool btf dump",
        proc::command("bpftool", &["btf", "dump", "file", VMLINUX_BTF, "format", "raw"]),
        BPFTOOL_TIMEOUT,
    );
    if let Ok(out) = out {
        if let (Some(e), Some(b)) = (
            btf_struct_size(&out.stdout, "htab_elem"),
            btf_struct_size(&out.stdout, "bucket"),
        ) {
            return (e, b, format!("BTF of the running kernel ({VMLINUX_BTF})"));
        }
    }
    (
        FALLBACK_HTAB_ELEM,
        FALLBACK_BUCKET,
        "built-in values (the kernel's BTF could not be read)".to_string(),
    )
}

/// `bytes_memlock` and `max_entries` of a pinned map.
fn memlock(inst: &TestInstance, name: &str) -> Result<(u64, u64)> {
    let path = inst.dir().join(name);
    let out = proc::run_ok(
        "bpftool map show",
        proc::command(
            "bpftool",
            &["map", "show", "pinned", &path.to_string_lossy(), "--json"],
        ),
        BPFTOOL_TIMEOUT,
    )?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("bpftool JSON")?;
    let memlock = v["bytes_memlock"]
        .as_u64()
        .or_else(|| v["bytes_memlock"].as_str().and_then(|s| s.parse().ok()))
        .context("no bytes_memlock")?;
    let entries = v["max_entries"].as_u64().context("no max_entries")?;
    Ok((memlock, entries))
}

/// Computes the figures for `inst`'s map sizes.
pub fn measure(inst: &TestInstance) -> Result<Memory> {
    let (htab_elem, bucket, source) = kernel_sizes();
    let map = |name: &'static str, key: usize, value: usize, default_entries: u64| {
        let (memlock, entries) = match memlock(inst, name) {
            Ok((m, e)) => (Some(m), e),
            Err(_) => (None, default_entries),
        };
        MapMemory {
            name,
            key: key as u64,
            value: value as u64,
            elem: htab_elem + round8(key as u64) + round8(value as u64),
            max_entries: entries,
            memlock,
        }
    };
    let cap = nat_common::maps::binding_map_capacity(inst.max_bindings) as u64;
    Ok(Memory {
        htab_elem,
        bucket,
        source,
        maps: [
            map(
                names::BINDINGS_OUT,
                size_of::<BindingKey>(),
                size_of::<BindingValue>(),
                cap,
            ),
            map(
                names::BINDINGS_IN,
                size_of::<ExternalKey>(),
                size_of::<ExternalValue>(),
                cap,
            ),
            map(
                names::SESSIONS,
                size_of::<SessionKey>(),
                size_of::<SessionValue>(),
                cap * SESSIONS_PER_BINDING as u64,
            ),
        ],
        max_bindings: inst.max_bindings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_struct_sizes_from_a_raw_btf_dump() {
        let dump = "[14262] STRUCT 'bucket' size=16 vlen=2\n\t'head' type_id=1\n\
                    [14267] STRUCT 'htab_elem' size=48 vlen=4\n";
        assert_eq!(btf_struct_size(dump, "htab_elem"), Some(48));
        assert_eq!(btf_struct_size(dump, "bucket"), Some(16));
        assert_eq!(btf_struct_size(dump, "nothing"), None);
        assert_eq!(round8(12), 16);
    }
}
