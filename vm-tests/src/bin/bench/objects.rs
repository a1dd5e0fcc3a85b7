//! Where the eBPF objects are, and loading them.
//!
//! Both objects are built by `cargo xtask build-ebpf`: `nat` (the NAT's programs, for the
//! per-packet test runs) and `bench` (generator, sink and empty programs). `BENCH_EBPF_DIR`
//! overrides the directory (default `<workspace>/target/bpfel-unknown-none/release`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use aya::programs::{Program, SchedClassifier, Xdp};
use aya::Ebpf;

/// File name of the benchmark helper object.
pub const BENCH_OBJECT: &str = "bench";
/// File name of the NAT's object.
pub const NAT_OBJECT: &str = "nat";

/// Directory holding the eBPF objects.
pub fn ebpf_dir() -> PathBuf {
    match std::env::var_os("BENCH_EBPF_DIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpfel-unknown-none/release"),
    }
}

/// Path of object `name`, which must exist.
pub fn object(name: &str) -> Result<PathBuf> {
    let path = ebpf_dir().join(name);
    if !path.is_file() {
        bail!(
            "eBPF object {} is missing: run `cargo xtask build-ebpf`",
            path.display()
        );
    }
    Ok(path)
}

/// Loads a fresh copy of the bench object: its maps are private to this copy, never pinned.
pub fn load_bench() -> Result<Ebpf> {
    let path = object(BENCH_OBJECT)?;
    Ebpf::load_file(&path).with_context(|| format!("cannot load {}", path.display()))
}

/// Loads (verifies) XDP program `name` of `ebpf` and returns it.
pub fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = program(ebpf, name)?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel rejected {name}"))?;
    }
    Ok(prog)
}

/// Loads (verifies) TC program `name` of `ebpf` and returns it.
pub fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = program(ebpf, name)?
        .try_into()
        .with_context(|| format!("{name} is not a TC program"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel rejected {name}"))?;
    }
    Ok(prog)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))
}
