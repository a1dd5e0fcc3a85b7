//! The NAT's eBPF programs: XDP ingress (inbound translation) and TC egress (outbound
//! translation) on the external interface; XDP (hairpinning, the fast path, source checks) and
//! TC egress (fast-path confirmation) on the internal interfaces. Each entry point is a thin
//! wrapper; the modules own one concern each.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod access;
mod bindings;
mod clock;
mod egress;
mod fastpath;
mod flow;
mod fragments;
mod icmp;
mod ingress;
mod internal;
mod lan_egress;
mod local;
mod maps;
mod notices;
mod rewrite;
mod sessions;
mod source_check;
mod stats;
mod tcp;
mod trace;
mod usage;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Inbound translation on the external interface.
#[xdp]
pub fn nat_ingress(ctx: XdpContext) -> u32 {
    ingress::handle(&ctx)
}

/// Hairpinning, the outbound fast path and source checks on the internal interface(s).
#[xdp]
pub fn nat_internal(ctx: XdpContext) -> u32 {
    internal::handle(&ctx)
}

/// Outbound translation on the external interface.
#[classifier]
pub fn nat_egress(ctx: TcContext) -> i32 {
    egress::handle(&ctx)
}

/// Fast-path confirmation of inbound flows on the internal interface(s).
#[classifier]
pub fn nat_lan_egress(ctx: TcContext) -> i32 {
    lan_egress::handle(&ctx)
}

/// GPL-compatible, for the GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
