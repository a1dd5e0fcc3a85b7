//! The benchmark generator's interface, shared by its eBPF side (nat-ebpf/src/bench.rs) and
//! the harness that drives it (vm-tests/src/bin/bench/generator.rs): the frame size, the
//! parameters map value, the clock map value and the batch the clock is stamped at.

/// Length of every generated frame: Ethernet + IPv4 (no options) + UDP + 22 bytes of payload.
/// The harness passes a `data_in` of exactly this length.
pub const FRAME_LEN: usize = 64;

/// The generator timestamps one frame in this many, and the harness runs live-frames batches of
/// this size (the kernel's NAPI budget, so each batch is one poll downstream): one clock read per
/// batch costs almost nothing.
pub const STAMP_EVERY: u32 = 64;

/// `GenParams::vary`: the source endpoint varies per flow (outbound traffic).
pub const VARY_SOURCE: u32 = 0;
/// `GenParams::vary`: the destination endpoint varies per flow (inbound traffic); any value
/// other than `VARY_SOURCE` means this.
pub const VARY_DESTINATION: u32 = 1;

/// How the generator spreads packets over flows. Flow `f = seq % flow_count` (seq counts
/// packets per CPU) uses address `template + f / ports_per_addr` and port
/// `template + f % ports_per_addr` on the varied side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenParams {
    /// Distinct flows cycled through (0 is treated as 1).
    pub flow_count: u32,
    /// Ports used per address before moving to the next address (0 is treated as 1).
    pub ports_per_addr: u32,
    /// `VARY_SOURCE` or `VARY_DESTINATION`.
    pub vary: u32,
    /// Explicit padding (always zero).
    pub _pad: u32,
}

/// When the generator ran, per CPU: the harness zeroes it before a test-run call and derives the
/// call's active time from it, which leaves out the call's fixed set-up cost (tens of ms: the
/// kernel swaps the XDP dispatcher image, with an RCU grace period, around every call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenClock {
    /// `bpf_ktime_get_ns` of the first stamped frame (0: none yet).
    pub first_ns: u64,
    /// `bpf_ktime_get_ns` of the last stamped frame.
    pub last_ns: u64,
    /// Frames generated from the first stamped frame on, up to and excluding the last stamped.
    pub frames_between: u64,
}
