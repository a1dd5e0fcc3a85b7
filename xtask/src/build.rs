//! `cargo xtask build`: the eBPF object, then the userspace binaries that embed or use it.

use std::path::PathBuf;

use anyhow::Result;

use crate::cmd::{target_dir, Cmd};
use crate::ebpf;

/// The release nat-ctl binary that the tests and the demo drive.
pub fn nat_ctl_path() -> PathBuf {
    target_dir().join("release").join("nat-ctl")
}

/// Builds the eBPF object, then nat-ctl (whose build script embeds it) and vm-tests. Expects
/// `setup::EBPF_BUILD` to be in place.
pub fn build_all() -> Result<()> {
    ebpf::build(false)?;
    Cmd::cargo()
        .args(["build", "--release", "-p", "nat-ctl", "-p", "vm-tests"])
        .run()
}

/// Builds the eBPF object, then nat-ctl alone (what a package ships). Expects
/// `setup::EBPF_BUILD` to be in place.
pub fn build_nat_ctl() -> Result<()> {
    ebpf::build(false)?;
    Cmd::cargo().args(["build", "--release", "-p", "nat-ctl"]).run()
}
