//! Answers to the data path's notices (see `nat_common::maps::Notice`):
//!
//! - an unsolicited inbound SYN (with `--unsolicited-syn icmp`) is held for 6 seconds; if by
//!   then the internal side has sent its own SYN for that connection (simultaneous open: a
//!   session now exists) it stays unanswered, otherwise the sender gets ICMP port unreachable
//!   (RFC 5382 REQ-4: nothing within 6 s, then 3/3);
//! - a refused new flow (with `--refusal-icmp`) gets ICMP destination unreachable with the chosen
//!   code at once (RFC 5508 REQ-8: 3/13; RFC 6888 REQ-11: 3/1).
//!
//! Both are rate-limited, so a flood cannot turn the gateway into an ICMP amplifier.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use nat_common::{
    maps::{names, Notice, NOTICE_REFUSED, NOTICE_UNSOLICITED_SYN, SESSION_KIND_ENDPOINT},
    packet::{icmp_type, unreach_code, Ipv4Header, L4_DST_PORT_OFF, L4_SRC_PORT_OFF},
    proto, SessionKey,
};

use crate::{
    pinned::PinnedMaps,
    raw::{self, RawSocket},
};

/// RFC 5382 REQ-4: no answer to an unsolicited SYN for at least 6 seconds.
pub const SYN_HOLD: Duration = Duration::from_secs(6);
/// Most SYNs held at once; beyond it new ones are dropped silently.
pub const MAX_HELD_SYNS: usize = 256;
/// Most ICMP errors sent per second.
pub const MAX_ICMP_PER_SECOND: u32 = 100;

/// What to send for a refused flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalIcmp {
    /// Nothing: drop silently.
    Off,
    /// ICMP 3/13 (RFC 5508 REQ-8).
    AdminProhibited,
    /// ICMP 3/1 (RFC 6888 REQ-11, carrier-grade NATs).
    HostUnreachable,
}

impl RefusalIcmp {
    /// Parses the CLI/config name.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "off" => Ok(RefusalIcmp::Off),
            "admin-prohibited" => Ok(RefusalIcmp::AdminProhibited),
            "host-unreachable" => Ok(RefusalIcmp::HostUnreachable),
            _ => anyhow::bail!("refusal ICMP {text:?} is not one of off, admin-prohibited, host-unreachable"),
        }
    }

    fn code(self) -> Option<u8> {
        match self {
            RefusalIcmp::Off => None,
            RefusalIcmp::AdminProhibited => Some(unreach_code::ADMIN_PROHIBITED),
            RefusalIcmp::HostUnreachable => Some(unreach_code::HOST_UNREACHABLE),
        }
    }
}

/// The session key an outbound SYN of the same connection would have created.
pub fn session_of_syn(packet: &[u8]) -> Option<SessionKey> {
    let ip = Ipv4Header::read(packet)?;
    let l4 = ip.header_len();
    let port = |off: usize| {
        packet
            .get(l4 + off..l4 + off + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    Some(SessionKey::new(
        proto::TCP,
        SESSION_KIND_ENDPOINT,
        ip.daddr,
        port(L4_DST_PORT_OFF)?,
        ip.saddr,
        port(L4_SRC_PORT_OFF)?,
    ))
}

/// Reads notices and sends the ICMP errors they call for.
pub struct Notifier {
    ring: RingBuf<MapData>,
    socket: RawSocket,
    refusal: RefusalIcmp,
    held: VecDeque<(Instant, Vec<u8>)>,
    second: Instant,
    sent_this_second: u32,
}

impl Notifier {
    /// Opens the notice ring of the instance pinned in `dir`.
    pub fn open(dir: &std::path::Path, refusal: RefusalIcmp) -> Result<Self> {
        let data = MapData::from_pin(dir.join(names::NOTICES)).context("cannot open the notice ring")?;
        Ok(Notifier {
            ring: RingBuf::try_from(Map::RingBuf(data))?,
            socket: RawSocket::open()?,
            refusal,
            held: VecDeque::new(),
            second: Instant::now(),
            sent_this_second: 0,
        })
    }

    /// Changes what a refused host is told (a reload of the config file).
    pub fn set_refusal(&mut self, refusal: RefusalIcmp) {
        self.refusal = refusal;
    }

    fn send(&mut self, now: Instant, src: u32, dst: u32, code: u8, quoted: &[u8]) {
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.sent_this_second = 0;
        }
        if self.sent_this_second >= MAX_ICMP_PER_SECOND {
            return;
        }
        self.sent_this_second += 1;
        let packet = raw::icmp_error(src, dst, icmp_type::DEST_UNREACH, code, quoted);
        self.socket.send(&packet, dst);
    }

    /// Takes new notices and answers the due ones.
    pub fn poll(&mut self, now: Instant, maps: &PinnedMaps) {
        let mut refused = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<Notice>() {
                continue;
            }
            // SAFETY: the ring entry holds one Notice (checked size, plain data).
            let notice = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Notice) };
            let packet = notice.packet[..(notice.len as usize).min(notice.packet.len())].to_vec();
            match notice.kind {
                NOTICE_UNSOLICITED_SYN if self.held.len() < MAX_HELD_SYNS => {
                    self.held.push_back((now, packet))
                }
                NOTICE_REFUSED => refused.push(packet),
                _ => {}
            }
        }
        if let Some(code) = self.refusal.code() {
            for packet in refused {
                // To the internal host that sent it, from whichever address routes back to it.
                if let Some(src) = packet.get(12..16) {
                    let host = u32::from_ne_bytes(src.try_into().expect("4 bytes"));
                    self.send(now, 0, host, code, &packet);
                }
            }
        }
        while self
            .held
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= SYN_HOLD)
        {
            let (_, packet) = self.held.pop_front().expect("checked");
            let Some(key) = session_of_syn(&packet) else {
                continue;
            };
            if maps.sessions.get(&key, 0).is_ok() {
                // The inside sent its SYN meanwhile: a simultaneous open, not an intruder.
                continue;
            }
            self.send(
                now,
                key.external_addr,
                key.remote_addr,
                unreach_code::PORT_UNREACHABLE,
                &packet,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_maps_to_the_session_an_outbound_syn_would_make() {
        let syn = [
            0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0, 198, 51, 100, 1, 198, 51, 100, 254, 0x1f, 0x90, 0x9c,
            0x40, 0, 0, 0, 1,
        ];
        let key = session_of_syn(&syn).unwrap();
        assert_eq!(key.external_addr.to_ne_bytes(), [198, 51, 100, 254]);
        assert_eq!(key.remote_addr.to_ne_bytes(), [198, 51, 100, 1]);
        assert_eq!(u16::from_be(key.external_port), 40000);
        assert_eq!(u16::from_be(key.remote_port), 8080);
        assert!(session_of_syn(&syn[..22]).is_none());
    }

    #[test]
    fn refusal_names() {
        assert_eq!(RefusalIcmp::parse("admin-prohibited").unwrap().code(), Some(13));
        assert_eq!(RefusalIcmp::parse("host-unreachable").unwrap().code(), Some(1));
        assert_eq!(RefusalIcmp::parse("off").unwrap().code(), None);
        assert!(RefusalIcmp::parse("loud").is_err());
    }
}
