//! Does a socket on the gateway itself want this packet?

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release},
    programs::XdpContext,
    EbpfContext,
};
use nat_common::packet::Ipv4Header;

/// True if a TCP socket of the gateway (a listener, or an established connection) matches
/// the inbound segment `ip` with ports `src_port`/`dst_port` (network order).
#[inline(always)]
pub fn tcp_socket_exists(ctx: &XdpContext, ip: &Ipv4Header, src_port: u16, dst_port: u16) -> bool {
    // SAFETY: an all-zero tuple is valid; the ipv4 arm is filled in below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = ip.saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = ip.daddr;
    tuple.__bindgen_anon_1.ipv4.sport = src_port;
    tuple.__bindgen_anon_1.ipv4.dport = dst_port;
    // The IPv4 arm of the union is what the helper reads for this size.
    let size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32;
    // SAFETY: valid context and tuple; the returned reference is released at once.
    unsafe {
        let sock = bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0);
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock.cast());
    }
    true
}
