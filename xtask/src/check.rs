//! `cargo xtask check`: formatting and clippy, for the workspace and for the eBPF crate.

use anyhow::{bail, Result};

use crate::cmd::{workspace_root, Cmd};
use crate::{ebpf, setup};

pub fn run() -> Result<()> {
    let ebpf_manifest = workspace_root().join("nat-ebpf").join("Cargo.toml");
    // Every step runs; the failed ones are listed at the end.
    let mut failed: Vec<&str> = Vec::new();
    // nat-ctl's build script embeds the eBPF object, so clippy needs it to exist.
    if !ebpf::object_path(false).is_file() {
        if let Err(err) = setup::ensure(setup::EBPF_BUILD).and_then(|()| ebpf::build(false)) {
            eprintln!("xtask: {err:#}");
            failed.push("build-ebpf");
        }
    }
    let mut record = |name, cmd: Cmd| {
        if let Err(err) = cmd.run() {
            eprintln!("xtask: {err:#}");
            failed.push(name);
        }
    };

    record("fmt", Cmd::cargo().args(["fmt", "--all", "--", "--check"]));
    record(
        "fmt nat-ebpf",
        Cmd::cargo()
            .arg("fmt")
            .arg("--manifest-path")
            .arg(&ebpf_manifest)
            .args(["--", "--check"]),
    );
    record(
        "clippy",
        Cmd::cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    );

    // Best effort: the eBPF crate needs nightly and rust-src; say so if they are not there.
    match setup::ensure(&[setup::Piece::RustSrc]) {
        Err(err) => eprintln!("xtask: skipped clippy for nat-ebpf: {err:#}"),
        Ok(()) => {
            let cmd = ebpf::nightly_cargo()
                .arg("clippy")
                .arg("--manifest-path")
                .arg(&ebpf_manifest)
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"]);
            let shown = cmd.shown().to_string();
            match cmd.status() {
                Err(err) => eprintln!("xtask: could not run clippy for nat-ebpf: {err:#}"),
                Ok(status) if !status.success() => {
                    eprintln!("xtask: `{shown}` failed ({status})");
                    failed.push("clippy nat-ebpf");
                }
                Ok(_) => {}
            }
        }
    }

    if !failed.is_empty() {
        bail!("check failed: {} (see the output above)", failed.join(", "));
    }
    println!("xtask: check ok");
    Ok(())
}
