//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! When it has not been built (plain `cargo test` without the nightly toolchain), an empty
//! object is embedded and `nat-ctl attach` says how to build it, so unit tests still run.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = manifest.join("../target/bpfel-unknown-none/release/nat");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("nat.bpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => fs::write(&out, []).unwrap(),
    }
}
