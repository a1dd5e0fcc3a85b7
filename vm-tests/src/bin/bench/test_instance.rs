//! A private, unattached instance of the NAT's programs for `BPF_PROG_TEST_RUN`.
//!
//! The NAT object is loaded with its maps pinned in a fresh directory of our own (never the
//! directory of a running NAT), sized for the wanted number of bindings, with a ready config
//! written into it. Dropping the instance unloads everything and removes the directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use nat_common::{
    config::CONFIG_FLAG_READY,
    maps::{binding_map_capacity, names, session_map_capacity, session_usage_capacity},
    NatConfig,
};

use crate::nat_maps::{be, NatMaps};
use crate::objects::{self, NAT_OBJECT};
use crate::topology::RTR_EXT_IP;

/// bpffs directories of test instances are `<PIN_PARENT>/<PIN_PREFIX><pid>-<n>`.
const PIN_PARENT: &str = "/sys/fs/bpf";
const PIN_PREFIX: &str = "nat-bench-";
/// XDP program name in the NAT object.
pub const INGRESS: &str = "nat_ingress";
/// TC program name in the NAT object.
pub const EGRESS: &str = "nat_egress";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A loaded, unattached NAT.
pub struct TestInstance {
    /// Its maps (declared before `ebpf` so they close first).
    pub maps: NatMaps,
    ebpf: Option<Ebpf>,
    dir: PathBuf,
    /// The binding limit it was configured with (map capacities follow from it).
    pub max_bindings: u32,
}

impl TestInstance {
    /// Loads the NAT object with room for `max_bindings` dynamic bindings and a ready,
    /// port-restricted config with external address `RTR_EXT_IP`.
    pub fn load(max_bindings: u32) -> Result<TestInstance> {
        vm_tests::nat::ensure_bpffs()?;
        let dir = PathBuf::from(PIN_PARENT).join(format!(
            "{PIN_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // From here on, Drop removes the directory whatever fails.
        let mut guard = PinDirGuard(Some(dir.clone()));
        let path = objects::object(NAT_OBJECT)?;
        let bindings = binding_map_capacity(max_bindings);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries(names::BINDINGS_OUT, bindings)
            .map_max_entries(names::BINDINGS_IN, bindings)
            .map_max_entries(names::SESSIONS, session_map_capacity(max_bindings))
            .map_max_entries(names::SESSION_USAGE_CREATED, session_usage_capacity(max_bindings))
            .map_max_entries(
                names::SESSION_USAGE_RELEASED,
                session_usage_capacity(max_bindings),
            )
            .load_file(&path)
            .with_context(|| format!("cannot load {}", path.display()))?;
        objects::xdp(&mut ebpf, INGRESS)?;
        objects::classifier(&mut ebpf, EGRESS)?;
        let mut maps = NatMaps::open(&dir)?;
        let mut cfg = NatConfig::empty();
        cfg.external_addrs[0] = be(RTR_EXT_IP);
        cfg.external_addr_count = 1;
        cfg.max_bindings = max_bindings;
        cfg.flags |= CONFIG_FLAG_READY;
        maps.config.set(0, cfg, 0)?;
        guard.0 = None;
        Ok(TestInstance {
            maps,
            ebpf: Some(ebpf),
            dir,
            max_bindings,
        })
    }

    /// The XDP ingress program.
    pub fn ingress(&self) -> Result<&Xdp> {
        Ok(self.ebpf()?.program(INGRESS).context("no ingress")?.try_into()?)
    }

    /// The TC egress program.
    pub fn egress(&self) -> Result<&SchedClassifier> {
        Ok(self.ebpf()?.program(EGRESS).context("no egress")?.try_into()?)
    }

    fn ebpf(&self) -> Result<&Ebpf> {
        self.ebpf.as_ref().context("instance already unloaded")
    }

    /// The pin directory (for `bpftool map show pinned`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        drop(self.ebpf.take());
        remove_pin_dir(&self.dir);
    }
}

/// Removes `dir` (pins only) on drop unless disarmed.
struct PinDirGuard(Option<PathBuf>);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_pin_dir(&dir);
        }
    }
}

/// Unpins every map in `dir` and removes it.
fn remove_pin_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warning: cannot remove {}: {e}", dir.display());
        }
    }
}

/// Removes pin directories of earlier benchmark processes that died before cleaning up.
pub fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(PIN_PARENT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PIN_PREFIX) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_pin_dir(&e.path());
        }
    }
}

/// Pin directories this process still has (for the leftover check).
pub fn own_pin_dirs() -> Vec<String> {
    let prefix = format!("{PIN_PREFIX}{}-", std::process::id());
    std::fs::read_dir(PIN_PARENT)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}
