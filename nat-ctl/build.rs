//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and the source revision that
//! `nat-ctl --version` prints.
//!
//! When it has not been built (plain `cargo test` without the nightly toolchain), an empty
//! object is embedded and `nat-ctl attach` says how to build it, so unit tests still run.

use std::{env, fs, path::PathBuf, process::Command};

/// What `--version` says when the source is not a git checkout (a tarball, a vendored copy).
const UNKNOWN_REVISION: &str = "unknown";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = manifest.join("../target/bpfel-unknown-none/release/nat");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("nat.bpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => fs::write(&out, []).unwrap(),
    }
    println!("cargo:rustc-env=NAT_CTL_REVISION={}", revision(&manifest));
}

/// The commit the source was built from (`git describe`-like: short hash, `-dirty` when the
/// tree had uncommitted changes), so a report names the exact code that ran.
fn revision(manifest: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(manifest)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(hash) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return UNKNOWN_REVISION.to_string();
    };
    // Rebuild when HEAD moves (a commit, a checkout).
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", manifest.join(head).display());
    }
    if let Some(index) = git(&["rev-parse", "--git-path", "index"]) {
        println!("cargo:rerun-if-changed={}", manifest.join(index).display());
    }
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{hash}-dirty"),
        _ => hash,
    }
}
