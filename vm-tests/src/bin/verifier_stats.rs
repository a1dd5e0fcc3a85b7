//! Loads the NAT's eBPF programs into the running kernel, attaches nothing, and prints how many
//! instructions the verifier processed for each (its limit is one million): how close each
//! program is to being refused, on this kernel or, run in the VM, on 6.1. Root only.
//!
//! `verifier-stats [OBJECT]` (default: target/bpfel-unknown-none/release/nat). The maps are
//! created under a private bpffs directory that is removed again.

use anyhow::{Context, Result};
use aya::{
    programs::{Program, ProgramError},
    EbpfLoader,
};

fn main() -> Result<()> {
    let object = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/bpfel-unknown-none/release/nat".to_string());
    let data = std::fs::read(&object).with_context(|| format!("cannot read {object}"))?;
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/nat-verifier-stats-{}", std::process::id()));
    std::fs::create_dir_all(&pins).with_context(|| format!("cannot create {}", pins.display()))?;
    let result = load_all(&data, &pins);
    let _ = std::fs::remove_dir_all(&pins);
    result
}

fn load_all(data: &[u8], pins: &std::path::Path) -> Result<()> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins)
        .load(data)
        .context("cannot load the object")?;
    let mut failed = false;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in names {
        let program = ebpf.program_mut(&name).context("program vanished")?;
        let started = std::time::Instant::now();
        let loaded: Result<(), ProgramError> = match program {
            Program::Xdp(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => continue,
        };
        let took = started.elapsed();
        match loaded {
            Ok(()) => {
                let info = match program {
                    Program::Xdp(p) => p.info()?,
                    Program::SchedClassifier(p) => p.info()?,
                    _ => unreachable!(),
                };
                let count = info
                    .verified_instruction_count()
                    .map_or("?".to_string(), |n| n.to_string());
                println!("{name:<16} {count:>8} instructions verified in {took:.1?}");
            }
            Err(e) => {
                failed = true;
                let text = format!("{e:#}");
                let last = text.lines().rev().take(4).collect::<Vec<_>>();
                println!("{name:<16} REJECTED after {took:.1?}: {}", last.join(" | "));
            }
        }
    }
    anyhow::ensure!(!failed, "some programs were rejected");
    Ok(())
}
