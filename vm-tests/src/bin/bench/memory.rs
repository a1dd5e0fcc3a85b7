//! Memory per binding: what one live binding occupies in the kernel's hash maps, and what an
//! idle table holds.
//!
//! A binding is one entry in each binding map plus two session entries (address-and-port and
//! address-only). The maps are not preallocated (`BPF_F_NO_PREALLOC`): each entry is allocated
//! when it is inserted, from a per-CPU cache of fixed-size objects (`bpf_mem_alloc`: element +
//! an 8-byte list node, rounded up by kmalloc to its size class), so memory follows the live
//! bindings; an idle map holds only its bucket array (one `struct bucket` per power-of-two
//! slot). Two figures per live binding:
//! - computed: element sizes from the key and value sizes and the running kernel's
//!   `struct htab_elem` (read from its BTF), rounded to the allocator's size classes;
//! - measured: the growth of the kernel's own accounting of the maps (bpftool `bytes_memlock`,
//!   which since Linux 6.4 is `htab_map_mem_usage`: buckets + live entries × (element + list
//!   node)) between an empty instance and the filled one, divided by the live bindings. Before
//!   6.4 `bytes_memlock` is `max_entries` × (key + value) whatever is live, so no growth shows
//!   and the measured figure is left out.

use std::mem::size_of;
use std::time::Duration;

use anyhow::{Context, Result};
use nat_common::{
    maps::names, table_size, BindingKey, BindingValue, ExternalKey, ExternalValue, SessionKey, SessionValue,
};
use vm_tests::proc;

use crate::test_instance::TestInstance;

/// Session entries one binding with one remote holds (endpoint and address-only).
pub const SESSIONS_PER_LIVE_BINDING: u64 = 2;
/// `sizeof(struct htab_elem)` and `sizeof(struct bucket)` on 64-bit kernels of this era, used
/// when the running kernel's BTF cannot be read.
const FALLBACK_HTAB_ELEM: u64 = 48;
const FALLBACK_BUCKET: u64 = 16;
/// The list node `bpf_mem_alloc` puts before each object (`LLIST_NODE_SZ`).
const LLIST_NODE: u64 = 8;
/// kmalloc's size classes up to a page (`kmalloc_info`, 64-bit, no 8-byte class needed here).
const KMALLOC_CLASSES: [u64; 10] = [16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048];
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
    /// Bytes the allocator hands out per element: `elem` + list node, rounded to a kmalloc
    /// size class.
    pub allocated: u64,
    /// Capacity of the measured instance.
    pub max_entries: u64,
    /// `bytes_memlock` of the filled instance, if bpftool told us.
    pub memlock: Option<u64>,
    /// `bytes_memlock` of an empty instance of the same capacity.
    pub memlock_empty: Option<u64>,
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
    /// Bindings live in the measured instance.
    pub live_bindings: u64,
    /// An idle default attach on this machine.
    pub idle: IdleAttach,
}

impl Memory {
    /// Bytes the allocator hands out for one live binding: both binding entries and its two
    /// sessions.
    pub fn per_live_binding(&self) -> u64 {
        self.maps[0].allocated + self.maps[1].allocated + SESSIONS_PER_LIVE_BINDING * self.maps[2].allocated
    }

    /// The kernel's accounting of the same: growth of `bytes_memlock` of the three maps from
    /// empty to filled, per live binding; `None` where the kernel does not account live
    /// entries (before 6.4) or bpftool gave no figure.
    pub fn memlock_per_live_binding(&self) -> Option<f64> {
        let filled: u64 = self.maps.iter().map(|m| m.memlock).sum::<Option<u64>>()?;
        let empty: u64 = self.maps.iter().map(|m| m.memlock_empty).sum::<Option<u64>>()?;
        (filled > empty && self.live_bindings > 0)
            .then(|| (filled - empty) as f64 / self.live_bindings as f64)
    }

    /// Bytes an idle table holds per configured binding: the bucket arrays of both binding
    /// maps and of the session map, divided by `--max-bindings`.
    pub fn idle_per_configured_binding(&self) -> f64 {
        let total: u64 = self
            .maps
            .iter()
            .map(|m| self.bucket * m.max_entries.next_power_of_two())
            .sum();
        total as f64 / self.max_bindings as f64
    }
}

fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// The kmalloc size class `n` bytes come from.
fn kmalloc_class(n: u64) -> u64 {
    KMALLOC_CLASSES
        .iter()
        .copied()
        .find(|&c| c >= n)
        .unwrap_or_else(|| n.next_power_of_two())
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

/// Computes the figures for `inst`'s map sizes and measures its maps against an empty
/// instance of the same capacity, and an idle default attach for `ram_bytes` of RAM.
pub fn measure(inst: &TestInstance, ram_bytes: u64) -> Result<Memory> {
    let idle = idle_default_attach(ram_bytes)?;
    let (htab_elem, bucket, source) = kernel_sizes();
    let empty = TestInstance::load(inst.max_bindings)?;
    let live_bindings = inst.maps.bindings_in.keys().filter(|k| k.is_ok()).count() as u64;
    let map = |name: &'static str, key: usize, value: usize, default_entries: u64| {
        let (filled, entries) = match memlock(inst, name) {
            Ok((m, e)) => (Some(m), e),
            Err(_) => (None, default_entries),
        };
        let elem = htab_elem + round8(key as u64) + round8(value as u64);
        MapMemory {
            name,
            key: key as u64,
            value: value as u64,
            elem,
            allocated: kmalloc_class(elem + LLIST_NODE),
            max_entries: entries,
            memlock: filled,
            memlock_empty: memlock(&empty, name).ok().map(|(m, _)| m),
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
                nat_common::maps::session_map_capacity(inst.max_bindings) as u64,
            ),
        ],
        max_bindings: inst.max_bindings,
        live_bindings,
        idle,
    })
}

/// An idle NAT with the default `--max-bindings` for this machine's RAM: every map it holds.
#[derive(Clone, Debug)]
pub struct IdleAttach {
    /// The default `--max-bindings` for this machine (`table_size::default_max_bindings`).
    pub max_bindings: u32,
    /// `bytes_memlock` summed over every map of the NAT, as the kernel accounts it.
    pub memlock: u64,
    /// The same computed (`table_size::idle_map_bytes`), for kernels before 6.4 whose
    /// `bytes_memlock` does not follow the live entries.
    pub computed: u64,
}

/// Loads the NAT's object with the default table size for `ram_bytes` of RAM, as `nat-ctl
/// attach` would size it, and sums what its maps hold before any traffic.
pub fn idle_default_attach(ram_bytes: u64) -> Result<IdleAttach> {
    let max_bindings = table_size::default_max_bindings(ram_bytes);
    let inst = TestInstance::load(max_bindings)?;
    let memlock = names::ALL
        .iter()
        .map(|name| memlock(&inst, name).map(|(m, _)| m))
        .sum::<Result<u64>>()?;
    Ok(IdleAttach {
        max_bindings,
        memlock,
        computed: table_size::idle_map_bytes(max_bindings),
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
        assert_eq!(kmalloc_class(48 + 16 + 16 + LLIST_NODE), 96);
        assert_eq!(kmalloc_class(97), 128);
        assert_eq!(kmalloc_class(3000), 4096);
    }
}
