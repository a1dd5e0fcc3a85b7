//! Sinks: `bench_sink` attached (native XDP) to the veth at each end of the path. It counts UDP
//! packets per CPU and drops them, so delivery costs almost nothing and nothing reaches a
//! socket. Its XDP program also makes the veth accept frames sent with `XDP_TX`/redirect.

use anyhow::{Context, Result};
use aya::maps::PerCpuArray;
use aya::programs::XdpMode;
use aya::Ebpf;
use vm_tests::netns::Netns;

use crate::objects;

/// Program name in the bench object.
const PROGRAM: &str = "bench_sink";

/// An attached sink. Dropping it detaches the program.
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    /// Attaches a private copy of the sink (its own counter) to `iface` in `ns`.
    pub fn attach(ns: &Netns, iface: &str) -> Result<Sink> {
        let mut ebpf = objects::load_bench()?;
        let prog = objects::xdp(&mut ebpf, PROGRAM)?;
        // The link is made from inside the namespace (the kernel resolves the interface
        // there); it belongs to our fd and lasts until the object is dropped.
        ns.enter(|| {
            prog.attach(iface, XdpMode::default())
                .with_context(|| format!("cannot attach the sink to {iface} in {}", ns.name()))
        })?;
        Ok(Sink { ebpf })
    }

    /// UDP packets received so far (all CPUs).
    pub fn count(&self) -> Result<u64> {
        Ok(self.count_per_cpu()?.iter().sum())
    }

    /// UDP packets received so far on each CPU (the CPU whose NAPI delivered them).
    pub fn count_per_cpu(&self) -> Result<Vec<u64>> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("BENCH_SINK").context("BENCH_SINK missing")?)?;
        Ok(map.get(&0, 0)?.to_vec())
    }
}
