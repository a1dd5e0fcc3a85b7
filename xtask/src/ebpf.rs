//! `cargo xtask build-ebpf`: builds the eBPF object from `nat-ebpf/` with the nightly toolchain.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::cmd::{target_dir, workspace_root, Cmd};

const TARGET: &str = "bpfel-unknown-none";
/// Name of the `[[bin]]` in nat-ebpf/Cargo.toml.
const OBJECT: &str = "nat";
/// BTF, so the loader can relocate and the kernel can check the programs' map types.
const RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";

/// Where the eBPF object of a profile lands.
pub fn object_path(debug: bool) -> PathBuf {
    target_dir()
        .join(TARGET)
        .join(if debug { "debug" } else { "release" })
        .join(OBJECT)
}

/// Builds the object and returns its path. Expects `setup::EBPF_BUILD` to be in place.
pub fn build(debug: bool) -> Result<PathBuf> {
    let mut cmd = nightly_cargo().args(["build", "-Z", "build-std=core", "--target", TARGET]);
    if !debug {
        cmd = cmd.arg("--release");
    }
    cmd.current_dir(workspace_root().join("nat-ebpf")).run()?;
    let object = object_path(debug);
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but left no object at {}",
            object.display()
        );
    }
    println!("xtask: eBPF object: {}", object.display());
    Ok(object)
}

/// `cargo +nightly` for the eBPF crate, with our rustflags and nothing inherited that would
/// force another toolchain or target.
pub fn nightly_cargo() -> Cmd {
    Cmd::cargo()
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", RUSTFLAGS)
        .arg("+nightly")
}
