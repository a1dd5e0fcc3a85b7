//! External endpoint allocation policy, run by the data path on a flow's first packet.
//!
//! Order of preference (RFC 4787 §4.2, RFC 7857 §9, RFC 6056):
//! 1. keep the internal port if it is inside the range (port preservation);
//! 2. otherwise independent pseudo-random probes inside the range among ports of the same parity
//!    (RFC 4787 REQ-4), then among the other parity. Each probe lands anywhere in the range, so a
//!    run of taken ports (many hosts using the same source ports take neighbouring external
//!    ports) costs one probe, not the whole budget as a sequential walk from a random start
//!    did; a class no larger than its probe budget is walked in full instead;
//! 3. ports below 1024 map below 1024 (RFC 4787 REQ-3a).
//!
//! The caller claims each candidate atomically (`BPF_NOEXIST` insert of the external key), so the
//! policy only has to propose candidates.

use crate::config::{PRIVILEGED_PORT_MAX, PRIVILEGED_PORT_MIN};

/// Candidates tried for one new binding (the preserved port, then random probes). Bounds the
/// data path's loop; when all are taken the flow is dropped and counted as port exhaustion.
/// With independent probes a flow is refused with probability `fill^probes`: 128 keeps the
/// refusals below 0.1% of the flows until a range is 95% full (see the tests), at a cost paid
/// only by new flows, and mostly only when the range is nearly full.
pub const MAX_PORT_PROBES: u32 = 128;
/// Probes (after the preservation attempt) that keep the internal port's parity before the
/// allocator gives up on parity (RFC 4787 REQ-4 "where possible").
pub const SAME_PARITY_PROBES: u32 = 96;

/// Inclusive port range, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port.
    pub min: u16,
    /// Highest port.
    pub max: u16,
}

impl PortRange {
    /// Number of ports in the range.
    pub const fn len(self) -> u32 {
        self.max as u32 - self.min as u32 + 1
    }

    /// Never empty: ranges are validated `min <= max` before use.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// True if `port` lies inside the range.
    pub const fn contains(self, port: u16) -> bool {
        port >= self.min && port <= self.max
    }
}

/// The range an internal port is mapped into: privileged ports stay privileged (REQ-3a), all
/// others use the configured dynamic range.
pub const fn range_for(internal_port: u16, dynamic: PortRange) -> PortRange {
    if internal_port <= PRIVILEGED_PORT_MAX {
        PortRange {
            min: PRIVILEGED_PORT_MIN,
            max: PRIVILEGED_PORT_MAX,
        }
    } else {
        dynamic
    }
}

/// Mixes `seed` and `attempt` into a well-spread 32-bit value (a murmur3-style finaliser), so
/// each probe of one allocation lands independently of the others.
const fn probe_hash(seed: u32, attempt: u32) -> u32 {
    let mut x = seed ^ attempt.wrapping_mul(0x9E37_79B9);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^ (x >> 16)
}

/// The `attempt`-th candidate external port (0-based) for `internal_port` in `range`; `random`
/// is drawn once per allocation.
///
/// Attempt 0 preserves the port when it is in range. Later attempts probe the ports of the
/// internal port's parity, then the others, each at a position hashed from `random` and the
/// attempt. When a parity class has no more ports than the probes spent on it, its ports are
/// walked in turn from an offset taken from `random`, so every one of them is tried.
pub const fn candidate_port(range: PortRange, internal_port: u16, random: u32, attempt: u32) -> u16 {
    if attempt == 0 && range.contains(internal_port) {
        return internal_port;
    }
    let probe = if attempt == 0 { 0 } else { attempt - 1 };
    let parity = (internal_port & 1) as u32;
    let (wanted_parity, step) = if probe < SAME_PARITY_PROBES {
        (parity, probe)
    } else {
        (parity ^ 1, probe - SAME_PARITY_PROBES)
    };
    let min = range.min as u32;
    let max = range.max as u32;
    let first = if min & 1 == wanted_parity { min } else { min + 1 };
    if first > max {
        // A one-port range has no port of the other parity: offer its only port.
        return range.min;
    }
    let count = (max - first) / 2 + 1;
    let budget = if wanted_parity == parity {
        SAME_PARITY_PROBES
    } else {
        MAX_PORT_PROBES - 1 - SAME_PARITY_PROBES
    };
    let index = if count <= budget {
        random.wrapping_add(step) % count
    } else {
        probe_hash(random, attempt) % count
    };
    (first + 2 * index) as u16
}

/// Index of the external address an internal host uses: a fixed function of the internal address,
/// so every flow of one host leaves from the same address ("paired" pooling, RFC 4787 REQ-2,
/// RFC 6888 REQ-2).
pub const fn external_addr_index(internal_addr: u32, addr_count: u32) -> u32 {
    if addr_count <= 1 {
        return 0;
    }
    // Fibonacci hashing spreads neighbouring addresses over the pool. Bit k of the product
    // depends only on bits 0..=k of the input, so the address is hashed in host order, where
    // its last octet (what differs between the hosts of a subnet) is in the low bits; read in
    // network order, a pool of two would see the first octets only and put a whole /24 on one
    // address.
    (u32::from_be(internal_addr).wrapping_mul(0x9E37_79B1) >> 16) % addr_count
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeSet;

    const DYNAMIC: PortRange = PortRange {
        min: 1024,
        max: 65535,
    };

    #[test]
    fn preserves_port_in_range() {
        assert_eq!(candidate_port(DYNAMIC, 40000, 12345, 0), 40000);
        assert_eq!(candidate_port(range_for(123, DYNAMIC), 123, 7, 0), 123);
    }

    #[test]
    fn privileged_ports_stay_privileged() {
        let range = range_for(80, DYNAMIC);
        for attempt in 0..MAX_PORT_PROBES {
            for random in [0, 1, 999, u32::MAX] {
                let p = candidate_port(range, 80, random, attempt);
                assert!((1..=1023).contains(&p), "attempt {attempt} gave {p}");
            }
        }
        assert_eq!(range_for(1024, DYNAMIC), DYNAMIC);
    }

    #[test]
    fn out_of_range_port_gets_a_port_in_range_with_parity() {
        let range = PortRange {
            min: 20000,
            max: 20999,
        };
        for random in [0, 17, 4096, u32::MAX] {
            for internal in [40000u16, 40001] {
                for attempt in 0..=SAME_PARITY_PROBES {
                    let p = candidate_port(range, internal, random, attempt);
                    assert!(range.contains(p));
                    assert_eq!(p & 1, internal & 1, "parity kept for the first probes");
                }
            }
        }
    }

    #[test]
    fn small_range_is_fully_covered() {
        // A 10-port range: the probes reach every port, same parity first.
        let range = PortRange { min: 5000, max: 5009 };
        let tried: BTreeSet<u16> = (0..MAX_PORT_PROBES)
            .map(|a| candidate_port(range, 40000, 3, a))
            .collect();
        assert_eq!(tried, (5000..=5009).collect());
        let first_five: BTreeSet<u16> = (1..=5).map(|a| candidate_port(range, 40000, 3, a)).collect();
        assert!(first_five.iter().all(|p| p % 2 == 0));
    }

    #[test]
    fn single_port_range() {
        let range = PortRange { min: 7000, max: 7000 };
        for attempt in 0..MAX_PORT_PROBES {
            assert_eq!(candidate_port(range, 40001, 99, attempt), 7000);
        }
    }

    #[test]
    fn random_start_spreads_choices() {
        let range = PortRange {
            min: 1024,
            max: 65535,
        };
        let starts: BTreeSet<u16> = (0..64u32)
            .map(|r| candidate_port(range, 80, r.wrapping_mul(2654435761), 1))
            .collect();
        assert!(starts.len() > 32, "different random values give different starts");
    }

    /// A small deterministic generator for the simulations (xorshift32).
    fn xorshift(state: &mut u32) -> u32 {
        *state ^= *state << 13;
        *state ^= *state >> 17;
        *state ^= *state << 5;
        *state
    }

    /// Allocates for hosts that all use the same source ports, as the data path does (claim the
    /// first free candidate), until `fill` of the range is taken; returns the refusals.
    fn simulate(range: PortRange, hosts: u32, source_ports: core::ops::Range<u16>, fill: f64) -> u32 {
        let mut taken = BTreeSet::new();
        let mut state = 0x1234_5678;
        let mut refused = 0;
        let target = (range.len() as f64 * fill) as usize;
        'fill: for port in source_ports.cycle() {
            for _ in 0..hosts {
                if taken.len() >= target {
                    break 'fill;
                }
                let random = xorshift(&mut state);
                let claimed = (0..MAX_PORT_PROBES)
                    .map(|a| candidate_port(range, port, random, a))
                    .find(|p| !taken.contains(p));
                match claimed {
                    Some(p) => {
                        taken.insert(p);
                    }
                    None => refused += 1,
                }
            }
        }
        refused
    }

    #[test]
    fn clustered_ports_are_found_until_the_range_is_nearly_full() {
        // Four hosts opening flows from the same source ports (the allocator that walked sequentially from
        // a random start refused 112-163 of 8000 flows with 88% of the range free).
        let refused = simulate(DYNAMIC, 4, 40000..42000, 0.12);
        assert_eq!(refused, 0);
        // Filling a whole range to 95%: fewer than 0.1% of the flows refused.
        let range = PortRange {
            min: 20000,
            max: 29999,
        };
        let refused = simulate(range, 4, 40000..40500, 0.95);
        assert!(refused * 1000 < 9500, "{refused} of 9500 flows refused");
    }

    #[test]
    fn paired_pooling_is_stable_and_uses_the_pool() {
        let mut used = BTreeSet::new();
        for host in 0..64u32 {
            let addr = u32::from_be_bytes([10, 0, 0, host as u8]).to_be();
            let i = external_addr_index(addr, 3);
            assert!(i < 3);
            assert_eq!(i, external_addr_index(addr, 3), "same host, same address");
            used.insert(i);
        }
        assert_eq!(used.len(), 3);
        assert_eq!(external_addr_index(12345, 1), 0);
    }

    #[test]
    fn hosts_of_one_subnet_use_every_pool_address() {
        // Addresses as the data path reads them (network order in a native u32); the last
        // octet is the only one that differs.
        for count in [2u32, 3, 4, 8] {
            let used: BTreeSet<u32> = (1..=32u8)
                .map(|host| external_addr_index(u32::from_ne_bytes([192, 168, 1, host]), count))
                .collect();
            assert_eq!(used.len(), count as usize, "pool of {count}: only {used:?} used");
        }
    }
}
