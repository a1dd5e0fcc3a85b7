//! Out-of-order inbound fragments (RFC 4787 REQ-14). The data path cannot hold a packet, so a
//! non-first fragment that arrives before its datagram's first fragment is parked in a ring
//! buffer. Here it waits, bounded in number and time (REQ-14a), until the first fragment has
//! been translated; then it is translated the same way and sent on through a raw socket.

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuValues, RingBuf};
use nat_common::{
    maps::{names, ParkedFragment},
    packet::Ipv4Header,
    Counter, FragmentKey, FragmentValue,
};

use crate::raw::RawSocket;

/// Most fragments held at once; the oldest goes first when more arrive.
pub const MAX_PARKED: usize = 1024;
/// How long a fragment waits for its first fragment: well under the 30 s a receiver keeps a
/// reassembly queue.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The fragment key (source, destination, IP ID, protocol) of an IPv4 packet.
pub fn fragment_key(packet: &[u8]) -> Option<FragmentKey> {
    Ipv4Header::read(packet).map(|ip| FragmentKey::of(&ip))
}

/// Rewrites the destination of `packet` to `new_dst` (raw, network order) and takes one off the
/// TTL, as forwarding would, fixing the header checksum incrementally. False if the packet is
/// too short or its TTL would expire.
pub fn translate(packet: &mut [u8], new_dst: u32) -> bool {
    let Some(mut ip) = Ipv4Header::read(packet) else {
        return false;
    };
    if !ip.decrement_ttl() {
        return false;
    }
    ip.set_daddr(new_dst);
    ip.write(packet);
    true
}

/// Parked fragments and what is needed to send them on.
pub struct Reinjector {
    ring: RingBuf<MapData>,
    fragments: HashMap<MapData, FragmentKey, FragmentValue>,
    parked: VecDeque<(Instant, Vec<u8>)>,
    socket: RawSocket,
    reinjected: u64,
    expired: u64,
}

impl Reinjector {
    /// Opens the ring buffer and fragment map of the instance pinned in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        let open =
            |name: &str| MapData::from_pin(dir.join(name)).with_context(|| format!("cannot open {name}"));
        let ring = RingBuf::try_from(Map::RingBuf(open(names::PARKED_FRAGMENTS)?))?;
        let fragments = HashMap::try_from(Map::LruHashMap(open(names::FRAGMENTS)?))?;
        let socket = RawSocket::open().context("out-of-order fragments")?;
        Ok(Reinjector {
            ring,
            fragments,
            parked: VecDeque::new(),
            socket,
            reinjected: 0,
            expired: 0,
        })
    }

    /// Takes new fragments from the ring, sends on those whose first fragment has been
    /// translated, drops those that waited too long. Returns the totals sent and expired.
    pub fn poll(&mut self, now: Instant) -> (u64, u64) {
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<ParkedFragment>() {
                continue;
            }
            // SAFETY: the ring entry holds one ParkedFragment (checked size, plain data).
            let parked = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ParkedFragment) };
            let len = (parked.len as usize).min(parked.packet.len());
            if self.parked.len() == MAX_PARKED {
                self.parked.pop_front();
                self.expired += 1;
            }
            self.parked.push_back((now, parked.packet[..len].to_vec()));
        }
        let mut waiting = VecDeque::with_capacity(self.parked.len());
        while let Some((arrived, mut packet)) = self.parked.pop_front() {
            let translated = fragment_key(&packet).and_then(|key| self.fragments.get(&key, 0).ok());
            match translated {
                Some(state) => {
                    if translate(&mut packet, state.translated_addr)
                        && self.send(&packet, state.translated_addr)
                    {
                        self.reinjected += 1;
                    } else {
                        self.expired += 1;
                    }
                }
                None if now.duration_since(arrived) > PARK_TIMEOUT => self.expired += 1,
                None => waiting.push_back((arrived, packet)),
            }
        }
        self.parked = waiting;
        (self.reinjected, self.expired)
    }

    fn send(&self, packet: &[u8], dst: u32) -> bool {
        self.socket.send(packet, dst)
    }
}

/// Publishes controller-side totals in the per-CPU counter map (CPU 0's slot; the data path
/// never writes these indices).
pub fn publish(
    counters: &mut aya::maps::PerCpuArray<MapData, u64>,
    counter: Counter,
    total: u64,
) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow::anyhow!("cannot count CPUs: {e}"))?;
    let mut values = vec![0u64; cpus];
    values[0] = total;
    counters.set(counter as u32, PerCpuValues::try_from(values)?, 0)?;
    Ok(())
}

/// An address for logs.
pub fn show(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr_be))
}

#[cfg(test)]
mod tests {
    use nat_common::checksum::checksum;

    use super::*;

    fn fragment() -> Vec<u8> {
        // A middle fragment 198.51.100.1 -> 198.51.100.254, ID 0x1234, UDP, offset 185*8.
        let mut p = vec![
            0x45, 0, 0, 28, 0x12, 0x34, 0x20, 185, 64, 17, 0, 0, 198, 51, 100, 1, 198, 51, 100, 254,
        ];
        p.extend_from_slice(&[0xab; 8]);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_ne_bytes());
        p
    }

    #[test]
    fn key_of_a_fragment() {
        let key = fragment_key(&fragment()).unwrap();
        assert_eq!(
            show(key.src_addr.to_be()),
            Ipv4Addr::new(1, 100, 51, 198),
            "raw order kept"
        );
        assert_eq!(key.src_addr.to_ne_bytes(), [198, 51, 100, 1]);
        assert_eq!(key.id.to_ne_bytes(), [0x12, 0x34]);
        assert_eq!(key.proto, 17);
        assert!(fragment_key(&[0x45; 10]).is_none());
    }

    #[test]
    fn translation_keeps_a_valid_header() {
        let mut p = fragment();
        let internal = u32::from_ne_bytes([10, 0, 0, 2]);
        assert!(translate(&mut p, internal));
        assert_eq!(&p[16..20], &[10, 0, 0, 2]);
        assert_eq!(p[8], 63, "TTL decremented like forwarding");
        assert_eq!(checksum(&p[..20]), 0, "header checksum still valid");
        assert_eq!(&p[20..], &[0xab; 8], "payload untouched");
        let mut dying = fragment();
        dying[8] = 1;
        assert!(!translate(&mut dying, internal));
    }
}
