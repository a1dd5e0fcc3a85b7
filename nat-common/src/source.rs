//! The source check on internal interfaces: which sources no internal host may use.
//!
//! The data path asks the kernel's routing table (`bpf_fib_lookup`) for the route a reply to
//! a packet's source would take, as the kernel's own reverse-path check does, and judges the
//! answer here. A source is refused when no reply could go back to the inside: the route is
//! local, broadcast or multicast (the kernel's martian sources, RFC 1812 §5.3.7, which
//! `accept_local` would otherwise let in), there is no route, the route refuses (blackhole,
//! unreachable, prohibit), or it leads out of the external interface (a host on the inside
//! claiming an Internet address). Anything else the lookup may answer (forwarding disabled on
//! the interface, tunnels) is left to the kernel's own checks.

/// Return codes of `bpf_fib_lookup` (`BPF_FIB_LKUP_RET_*`, Linux UAPI `bpf.h`).
pub mod fib {
    /// A route and a neighbour entry.
    pub const SUCCESS: i64 = 0;
    /// A blackhole route.
    pub const BLACKHOLE: i64 = 1;
    /// An unreachable route.
    pub const UNREACHABLE: i64 = 2;
    /// A prohibit route.
    pub const PROHIBIT: i64 = 3;
    /// Not forwarded: local, broadcast, multicast, or no route at all.
    pub const NOT_FWDED: i64 = 4;
    /// Forwarding is off on the interface.
    pub const FWD_DISABLED: i64 = 5;
    /// A route with lightweight tunnel encapsulation.
    pub const UNSUPP_LWT: i64 = 6;
    /// A route, but no neighbour entry yet.
    pub const NO_NEIGH: i64 = 7;
    /// Over the route's MTU (not asked for here).
    pub const FRAG_NEEDED: i64 = 8;
}

/// True if a packet that arrived on an internal interface must be dropped, given what the
/// reverse lookup answered: its return code `rc` and, for a route, the interface `route_ifindex`
/// it leads out of. `external_ifindex` is the NAT's external interface.
pub const fn refused_by_reverse_route(rc: i64, route_ifindex: u32, external_ifindex: u32) -> bool {
    match rc {
        fib::SUCCESS | fib::NO_NEIGH => route_ifindex == external_ifindex,
        fib::NOT_FWDED | fib::BLACKHOLE | fib::UNREACHABLE | fib::PROHIBIT => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAN: u32 = 3;
    const WAN: u32 = 2;

    #[test]
    fn a_source_routed_back_inside_passes_with_or_without_a_neighbour_entry() {
        assert!(!refused_by_reverse_route(fib::SUCCESS, LAN, WAN));
        assert!(!refused_by_reverse_route(fib::NO_NEIGH, LAN, WAN));
        // Another internal interface (asymmetric routing inside) is fine too: loose RPF.
        assert!(!refused_by_reverse_route(fib::SUCCESS, 4, WAN));
    }

    #[test]
    fn a_source_routed_out_of_the_external_interface_is_refused() {
        assert!(refused_by_reverse_route(fib::SUCCESS, WAN, WAN));
        assert!(refused_by_reverse_route(fib::NO_NEIGH, WAN, WAN));
    }

    #[test]
    fn martian_unroutable_and_refusing_routes_are_refused() {
        for rc in [fib::NOT_FWDED, fib::BLACKHOLE, fib::UNREACHABLE, fib::PROHIBIT] {
            assert!(refused_by_reverse_route(rc, 0, WAN), "rc {rc}");
        }
    }

    #[test]
    fn answers_that_say_nothing_about_the_source_are_left_to_the_kernel() {
        for rc in [fib::FWD_DISABLED, fib::UNSUPP_LWT, fib::FRAG_NEEDED, -19] {
            assert!(!refused_by_reverse_route(rc, WAN, WAN), "rc {rc}");
        }
    }
}
