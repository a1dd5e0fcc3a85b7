//! Benchmark programs: a packet generator, a counting sink, empty programs that measure the
//! floor of `BPF_PROG_TEST_RUN`, and a bare XDP forwarder (route lookup, MAC rewrite, redirect;
//! no NAT) that is the limit any XDP data path on the benchmark's path can reach.
//!
//! They live in their own object (`target/bpfel-unknown-none/release/bench`) so that loading
//! them never creates, reuses or touches the NAT's pinned maps; none of the maps here is pinned.
//! The benchmark harness in `vm-tests` (`src/bin/bench/`) loads this object with aya at run
//! time; the generator's map values and frame size are nat-common's (`nat_common::bench`).
//!
//! The generator is run with `BPF_PROG_TEST_RUN` in XDP live-frames mode: the kernel hands it
//! frames from a page pool and transmits whatever it returns `XDP_TX` for out of the interface
//! named by `ingress_ifindex`. The pool recycles pages *without* resetting them, and every hop
//! downstream (TTL decrement, NAT rewrite) writes into the same page, so the generator rewrites
//! the whole frame from the template on every run instead of patching a few fields.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup,
        xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    },
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nat_common::{
    bench::{GenClock, GenParams, FRAME_LEN, STAMP_EVERY, VARY_SOURCE},
    checksum::replace_u16,
    packet::{
        ETH_HLEN, ETH_P_IP_BE, ETH_TYPE_OFF, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_MIN_HLEN, IPV4_SRC_OFF,
        IPV4_TTL_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF, UDP_HLEN,
    },
    proto,
};

/// The frame is copied in 8-byte words (a bounded, unrollable loop).
const FRAME_WORDS: usize = FRAME_LEN / 8;
/// Offsets into the frame (Ethernet, then an IPv4 header without options, then UDP), from
/// nat-common's header layout.
const IP_OFF: usize = ETH_HLEN;
const IP_PROTO_OFF: usize = IP_OFF + IPV4_TTL_OFF + 1;
const IP_CHECK_OFF: usize = IP_OFF + IPV4_CHECK_OFF;
const IP_SRC_OFF: usize = IP_OFF + IPV4_SRC_OFF;
const IP_DST_OFF: usize = IP_OFF + IPV4_DST_OFF;
/// End of an IPv4 header without options.
const IP_END: usize = IP_OFF + IPV4_MIN_HLEN;
const UDP_SRC_OFF: usize = IP_END + L4_SRC_PORT_OFF;
const UDP_DST_OFF: usize = IP_END + L4_DST_PORT_OFF;
/// End of the UDP header: everything the sink looks at lies before it.
const UDP_END: usize = IP_END + UDP_HLEN;
/// 16-bit words in an IPv4 header without options (for its checksum).
const IP_HEADER_WORDS: usize = IPV4_MIN_HLEN / 2;
/// Further IPv4 header offsets (from the start of the frame) the forwarder reads.
const IP_VERSION_IHL_OFF: usize = IP_OFF;
const IP_TOS_OFF: usize = IP_OFF + 1;
const IP_TOT_LEN_OFF: usize = IP_OFF + 2;
/// The TTL and protocol bytes form one 16-bit word (TTL first on the wire).
const IP_TTL_OFF: usize = IP_OFF + IPV4_TTL_OFF;
/// Version 4, header length 5 words: the only header shape the forwarder handles.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// One TTL step in the host-order TTL/protocol word.
const TTL_ONE: u16 = 0x0100;
/// `AF_INET`, the address family of a `bpf_fib_lookup` request.
const AF_INET: u8 = 2;
/// Ethernet address length.
const ETH_ALEN: usize = 6;

/// The frame template, written by the harness.
#[map]
static BENCH_FRAME: Array<[u8; FRAME_LEN]> = Array::with_max_entries(1, 0);

/// How to vary the template per packet, written by the harness.
#[map]
static BENCH_PARAMS: Array<GenParams> = Array::with_max_entries(1, 0);

/// Packets generated so far, per CPU; the harness resets it to start a fresh sequence of flows.
#[map]
static BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Generator timing, per CPU (see `GenClock`).
#[map]
static BENCH_CLOCK: PerCpuArray<GenClock> = PerCpuArray::with_max_entries(1, 0);

/// UDP packets the sink received, per CPU.
#[map]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Generator: writes the next frame and transmits it (`XDP_TX`) out of `ingress_ifindex`.
#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    generate(&ctx).unwrap_or(XDP_ABORTED)
}

/// Sink: counts UDP over IPv4 and drops it; lets everything else (ARP) through.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + UDP_END > end {
        return XDP_PASS;
    }
    // SAFETY: both reads lie before `start + UDP_END`, checked above.
    let (eth_type, proto) = unsafe {
        (
            core::ptr::read_unaligned((start + ETH_TYPE_OFF) as *const u16),
            *((start + IP_PROTO_OFF) as *const u8),
        )
    };
    if eth_type != ETH_P_IP_BE || proto != proto::UDP {
        return XDP_PASS;
    }
    if let Some(count) = BENCH_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *count += 1 };
    }
    XDP_DROP
}

/// The floor of an XDP test run: does nothing.
#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The floor of a TC test run: does nothing.
#[classifier]
pub fn bench_empty_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Bare XDP forwarder, the limit of any XDP data path here: looks the destination up in the
/// kernel's routing and neighbour tables (`bpf_fib_lookup`), decrements the TTL as a router must
/// (RFC 791; checksum updated incrementally, RFC 1624), writes the next hop's Ethernet
/// addresses and redirects out of the egress interface. No NAT, no state, no counters. Whatever
/// the lookup cannot finish (ARP, no route, no neighbour entry yet, TTL about to expire, over the
/// MTU, IPv4 options) goes to the kernel.
#[xdp]
pub fn bench_xdp_forward(ctx: XdpContext) -> u32 {
    xdp_forward(&ctx).unwrap_or(XDP_PASS)
}

/// `bench_xdp_forward`'s work; `None` hands the packet to the kernel.
#[inline(always)]
fn xdp_forward(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IP_END > end {
        return None;
    }
    // SAFETY: every read lies before `start + IP_END`, checked above.
    let (eth_type, version_ihl, tos, tot_len, ttl_word, saddr, daddr) = unsafe {
        (
            core::ptr::read_unaligned((start + ETH_TYPE_OFF) as *const u16),
            *((start + IP_VERSION_IHL_OFF) as *const u8),
            *((start + IP_TOS_OFF) as *const u8),
            core::ptr::read_unaligned((start + IP_TOT_LEN_OFF) as *const u16),
            core::ptr::read_unaligned((start + IP_TTL_OFF) as *const u16),
            core::ptr::read_unaligned((start + IP_SRC_OFF) as *const u32),
            core::ptr::read_unaligned((start + IP_DST_OFF) as *const u32),
        )
    };
    let (ttl, proto) = (u16::from_be(ttl_word) >> 8, u16::from_be(ttl_word) as u8);
    if eth_type != ETH_P_IP_BE || version_ihl != IPV4_NO_OPTIONS || ttl <= 1 {
        return None;
    }
    // SAFETY: all-zero is a valid lookup request; the IPv4 fields are filled in below.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ctx.ingress_ifindex() as u32;
    // The MTU check compares the packet's length with the egress MTU.
    params.__bindgen_anon_1.tot_len = u16::from_be(tot_len);
    params.__bindgen_anon_2.tos = tos;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: a valid context and a request buffer of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut params, size, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    let new_ttl_word = (u16::from_be(ttl_word) - TTL_ONE).to_be();
    // SAFETY: the IPv4 header and both Ethernet addresses lie before `start + IP_END`.
    unsafe {
        let check = core::ptr::read_unaligned((start + IP_CHECK_OFF) as *const u16);
        core::ptr::write_unaligned((start + IP_TTL_OFF) as *mut u16, new_ttl_word);
        core::ptr::write_unaligned(
            (start + IP_CHECK_OFF) as *mut u16,
            replace_u16(check, ttl_word, new_ttl_word),
        );
        core::ptr::write_unaligned(start as *mut [u8; ETH_ALEN], params.dmac);
        core::ptr::write_unaligned((start + ETH_ALEN) as *mut [u8; ETH_ALEN], params.smac);
    }
    // SAFETY: plain helper call; without flags it returns XDP_REDIRECT (or XDP_ABORTED for a
    // bad interface, which the lookup just returned, so it exists).
    Some(unsafe { bpf_redirect(params.ifindex, 0) } as u32)
}

/// Copies the template into the frame, applies this packet's flow, fixes the IPv4 checksum.
#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + FRAME_LEN > end {
        return None;
    }
    let template = BENCH_FRAME.get(0)?;
    let params = BENCH_PARAMS.get(0)?;
    let base = template.as_ptr();
    let mut word = 0;
    while word < FRAME_WORDS {
        // SAFETY: word * 8 + 8 <= FRAME_LEN, inside both the packet (checked above) and the
        // template (a FRAME_LEN array).
        unsafe {
            let value = core::ptr::read_unaligned(base.add(word * 8) as *const u64);
            core::ptr::write_unaligned((start + word * 8) as *mut u64, value);
        }
        word += 1;
    }

    let seq = BENCH_SEQ.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; only this CPU touches it while the program runs.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    if n % STAMP_EVERY as u64 == 0 {
        stamp();
    }
    let flow_count = params.flow_count.max(1) as u64;
    let ports_per_addr = params.ports_per_addr.max(1) as u64;
    let flow = n % flow_count;
    let addr_step = (flow / ports_per_addr) as u32;
    let port_step = (flow % ports_per_addr) as u16;
    // Constant offsets in each branch: the verifier checks each access against the range
    // proven above without having to reason about a variable offset.
    if params.vary == VARY_SOURCE {
        vary_endpoint::<IP_SRC_OFF, UDP_SRC_OFF>(start, addr_step, port_step);
    } else {
        vary_endpoint::<IP_DST_OFF, UDP_DST_OFF>(start, addr_step, port_step);
    }
    fix_ip_checksum(start);
    Some(XDP_TX)
}

/// Records the time of a stamped frame in `BENCH_CLOCK`.
#[inline(always)]
fn stamp() {
    let Some(clock) = BENCH_CLOCK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: helper without arguments; per-CPU slot only this CPU writes.
    unsafe {
        let now = bpf_ktime_get_ns();
        if (*clock).first_ns == 0 {
            (*clock).first_ns = now;
        } else {
            (*clock).frames_between += STAMP_EVERY as u64;
        }
        (*clock).last_ns = now;
    }
}

/// Adds `addr_step` to the address at `ADDR` and `port_step` to the port at `PORT` (both big
/// endian in the frame). The caller has checked that `start + FRAME_LEN` lies in the packet.
#[inline(always)]
fn vary_endpoint<const ADDR: usize, const PORT: usize>(start: usize, addr_step: u32, port_step: u16) {
    // SAFETY: ADDR + 4 and PORT + 2 are below FRAME_LEN, which the caller checked.
    unsafe {
        let addr = (start + ADDR) as *mut u32;
        let value = u32::from_be(core::ptr::read_unaligned(addr)).wrapping_add(addr_step);
        core::ptr::write_unaligned(addr, value.to_be());
        let port = (start + PORT) as *mut u16;
        let value = u16::from_be(core::ptr::read_unaligned(port)).wrapping_add(port_step);
        core::ptr::write_unaligned(port, value.to_be());
    }
}

/// Recomputes the IPv4 header checksum (RFC 791) of the frame at `start`. The UDP checksum of
/// the template is zero ("none", legal for IPv4), so it needs no update.
#[inline(always)]
fn fix_ip_checksum(start: usize) {
    // SAFETY: the IPv4 header lies below FRAME_LEN, which the caller checked.
    unsafe {
        core::ptr::write_unaligned((start + IP_CHECK_OFF) as *mut u16, 0);
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < IP_HEADER_WORDS {
            sum += u16::from_be(core::ptr::read_unaligned((start + IP_OFF + i * 2) as *const u16)) as u32;
            i += 1;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        core::ptr::write_unaligned((start + IP_CHECK_OFF) as *mut u16, (!(sum as u16)).to_be());
    }
}

/// GPL-compatible, like the NAT's object.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
