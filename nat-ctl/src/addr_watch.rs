//! The external address follows the interface, as nftables masquerade does.
//!
//! Without `--external-addr` the NAT translates to the external interface's primary IPv4
//! address. A DHCP renew or a PPPoE reconnect can change that address; this module notices it
//! from rtnetlink notifications (`RTMGRP_IPV4_IFADDR`, `RTMGRP_LINK` on a `NETLINK_ROUTE`
//! socket, see rtnetlink(7)), with no polling, and brings the running NAT in line:
//!
//! - the new address goes into the config map, so the next new flow uses it;
//! - every dynamic binding on an address the NAT no longer uses is removed, both directions,
//!   per-remote ones too, with its sessions (masquerade drops its conntrack entries when their
//!   address leaves the interface, `nf_nat_masquerade_inet`); replies to such an address would
//!   reach the router itself, never the internal host;
//! - static forwards on the old address move to the same port on the new one.
//!
//! While the interface has no IPv4 address at all (a lease expired, a link being renumbered)
//! the config keeps the last one: new flows are still translated (an internal address never
//! leaks) and bindings stay, so flows carry on when the same address comes back. The kernel
//! routes nothing out of an interface without an address anyway (its routes go with the last
//! address).
//!
//! Addresses given with `--external-addr` (or `external_addrs` in the config file) stay fixed.
//! In every case the interface being deleted (or moved to another namespace) stops the daemon
//! with one line and the ordinary detach ([`InterfaceRemoved`]).
//!
//! The netlink decoding is a pure function of the received bytes ([`parse`], [`classify`]);
//! on every relevant notification the interface's address list is read again
//! (`iface::ipv4_addrs`) instead of trusting the deltas, so a lost notification cannot leave
//! the NAT on a wrong address.

use std::{
    collections::HashSet,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use nat_common::{
    config::MAX_EXTERNAL_ADDRS, maps::BINDING_FLAG_STATIC, proto, BindingKey, BindingValue, ExternalKey,
    ExternalValue, SessionKey, SessionValue,
};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    expiry::{self, SweepPlan},
    forwards, iface,
    netlink::{self, u32_at, Message, IFADDRMSG_LEN, IFINFOMSG_LEN, RECV_BUF_BYTES},
    pinned::PinnedMaps,
};

/// `AF_UNSPEC`: the family of a real link deletion. The bridge also sends `RTM_DELLINK`, with
/// family `AF_BRIDGE`, when a port merely leaves it (`br_ifinfo_notify`).
const LINK_FAMILY_UNSPEC: u8 = libc::AF_UNSPEC as u8;
/// Socket receive buffer asked for, so a burst of link and address changes (many interfaces
/// coming up at boot) does not overrun it. An overrun is still handled (`ENOBUFS`: re-read).
const SOCKET_RCVBUF_BYTES: libc::c_int = 1 << 20;
/// Datagrams read per wake-up before yielding to the daemon's other work; the rest are read
/// on the next turn (the descriptor stays readable).
const MAX_READS_PER_WAKE: usize = 256;

/// One rtnetlink notification, as far as the NAT cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtEvent {
    /// `RTM_NEWADDR` / `RTM_DELADDR`.
    Address {
        /// Interface index.
        index: u32,
        /// Address family (`AF_INET` for IPv4).
        family: u8,
        /// True for `RTM_NEWADDR`.
        added: bool,
        /// The local address: `IFA_LOCAL`, else `IFA_ADDRESS` (on a point-to-point link such as
        /// PPP, `IFA_ADDRESS` is the peer's address and `IFA_LOCAL` ours).
        local: Option<Ipv4Addr>,
    },
    /// `RTM_NEWLINK` / `RTM_DELLINK`.
    Link {
        /// Interface index.
        index: u32,
        /// `ifi_family`: `AF_UNSPEC` for the device itself, `AF_BRIDGE` for bridge-port news.
        family: u8,
        /// True for `RTM_DELLINK`.
        deleted: bool,
    },
    /// A message that could not be decoded: assume anything may have changed.
    Garbled,
}

/// Decodes the address or link messages in one netlink datagram; other message types (done,
/// noop, anything else) are skipped. Decoding stops at the first malformed message, which is
/// reported as [`RtEvent::Garbled`].
pub fn parse(buf: &[u8]) -> Vec<RtEvent> {
    netlink::messages(buf)
        .filter_map(|message| {
            let Ok(Message { kind, body }) = message else {
                return Some(RtEvent::Garbled);
            };
            let event = match kind {
                libc::RTM_NEWADDR | libc::RTM_DELADDR => address(body, kind == libc::RTM_NEWADDR),
                libc::RTM_NEWLINK | libc::RTM_DELLINK => link(body, kind == libc::RTM_DELLINK),
                _ => return None,
            };
            Some(event.unwrap_or(RtEvent::Garbled))
        })
        .collect()
}

/// An `ifaddrmsg` and its attributes.
fn address(body: &[u8], added: bool) -> Option<RtEvent> {
    let family = *body.first()?;
    let index = u32_at(body, 4)?;
    let (mut local, mut address) = (None, None);
    for (kind, data) in netlink::attributes(body, IFADDRMSG_LEN)? {
        if family == libc::AF_INET as u8 && data.len() == 4 {
            // Addresses are in network byte order.
            let addr = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
            match kind {
                libc::IFA_LOCAL => local = Some(addr),
                libc::IFA_ADDRESS => address = Some(addr),
                _ => {}
            }
        }
    }
    Some(RtEvent::Address {
        index,
        family,
        added,
        local: local.or(address),
    })
}

/// An `ifinfomsg`; its attributes are not needed.
fn link(body: &[u8], deleted: bool) -> Option<RtEvent> {
    if body.len() < IFINFOMSG_LEN {
        return None;
    }
    Some(RtEvent::Link {
        index: u32_at(body, 4)?,
        family: body[0],
        deleted,
    })
}

/// What a batch of notifications means for the interface `ifindex`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Its IPv4 addresses may have changed: read them again.
    pub addresses: bool,
    /// It was deleted (or moved to another network namespace, which looks the same here).
    pub removed: bool,
    /// Notifications were lost or unreadable: whether it still exists must be checked.
    pub resync: bool,
}

impl Change {
    fn merge(&mut self, other: Change) {
        self.addresses |= other.addresses;
        self.removed |= other.removed;
        self.resync |= other.resync;
    }
}

/// Picks out what concerns interface `ifindex`. Link news other than its deletion (up, down,
/// MTU, bridge ports) needs nothing: the XDP and TC attachments stay through a link flap, and
/// IPv4 addresses stay on a link that goes down.
pub fn classify(events: &[RtEvent], ifindex: u32) -> Change {
    let mut change = Change::default();
    for event in events {
        match *event {
            RtEvent::Address { index, family, .. } if index == ifindex && family == libc::AF_INET as u8 => {
                change.addresses = true;
            }
            RtEvent::Link {
                index,
                family,
                deleted: true,
            } if index == ifindex && family == LINK_FAMILY_UNSPEC => change.removed = true,
            RtEvent::Garbled => change.resync = true,
            _ => {}
        }
    }
    change
}

/// What the watcher reports to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The interface's IPv4 addresses may have changed.
    AddressesChanged,
    /// The interface is gone.
    InterfaceRemoved,
}

/// A `NETLINK_ROUTE` socket subscribed to IPv4 address and link notifications, polled by
/// tokio (no timer: the daemon wakes only when the kernel sends something).
pub struct AddrWatch {
    fd: AsyncFd<OwnedFd>,
    ifindex: u32,
    buf: Vec<u8>,
}

impl AddrWatch {
    /// Subscribes to the notifications about interface `ifindex` (must be called inside the
    /// tokio runtime).
    pub fn open(ifindex: u32) -> Result<AddrWatch> {
        // SAFETY: plain socket(2) call; the descriptor is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("cannot open a netlink socket");
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Best effort: the default buffer only makes an overrun (handled) more likely.
        // SAFETY: valid descriptor, option value of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&SOCKET_RCVBUF_BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: all-zero is a valid sockaddr_nl (port id 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32;
        // SAFETY: valid descriptor and address of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error()).context("cannot subscribe to interface notifications");
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the netlink socket: {e}"))?;
        Ok(AddrWatch {
            fd,
            ifindex,
            buf: vec![0; RECV_BUF_BYTES],
        })
    }

    /// Waits for the next notification that concerns the interface.
    pub async fn next(&mut self) -> Result<Event> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .context("cannot wait for interface notifications")?;
            let mut change = Change::default();
            let mut drained = false;
            for _ in 0..MAX_READS_PER_WAKE {
                match recv_from_kernel(guard.get_inner(), &mut self.buf) {
                    Ok(Some(datagram)) => change.merge(classify(&parse(datagram), self.ifindex)),
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    // The socket overran: notifications were lost (netlink(7)).
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => change.resync = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("cannot read interface notifications"),
                }
            }
            if drained {
                guard.clear_ready();
            }
            if change.removed || (change.resync && iface::name_of(self.ifindex).is_none()) {
                return Ok(Event::InterfaceRemoved);
            }
            if change.addresses || change.resync {
                return Ok(Event::AddressesChanged);
            }
        }
    }
}

/// Reads one datagram. `Ok(None)` for one not sent by the kernel (port id 0), which is ignored,
/// or one that did not fit (reported as unreadable instead).
fn recv_from_kernel<'a>(fd: &OwnedFd, buf: &'a mut [u8]) -> io::Result<Option<&'a [u8]>> {
    // SAFETY: all-zero is a valid sockaddr_nl.
    let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: valid descriptor, buffer and address of the sizes given. MSG_TRUNC makes the
    // call return the datagram's real length, so truncation is detectable.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            (&mut from as *mut libc::sockaddr_nl).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if from.nl_pid != 0 {
        return Ok(None);
    }
    let n = n as usize;
    if n > buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
    }
    Ok(Some(&buf[..n]))
}

/// The daemon stops because its interface is gone (`nat-ctl: interface w1 was removed;
/// detaching`); the exit status is 1, as for any stop other than by a signal.
#[derive(Debug)]
pub struct InterfaceRemoved {
    /// The interface's name at attach.
    pub iface: String,
}

impl std::fmt::Display for InterfaceRemoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interface {} was removed", self.iface)
    }
}

impl std::error::Error for InterfaceRemoved {}

/// True if `error` is the daemon stopping because its interface was removed.
pub fn is_interface_removed(error: &anyhow::Error) -> bool {
    error.is::<InterfaceRemoved>()
}

/// What to do with the NAT's address, given the address it uses and the interface's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The address in use is still on the interface: nothing changes (a flow keeps its
    /// binding as long as its address exists, as with masquerade).
    Keep,
    /// The address in use left the interface: switch to its primary address.
    Switch(Ipv4Addr),
    /// The interface has no IPv4 address: keep the last one until one appears.
    NoAddress,
}

/// Decides from the address in use (`current`, empty only before one was ever set) and the
/// interface's IPv4 addresses, primary first (`on_iface`).
pub fn decide(current: &[Ipv4Addr], on_iface: &[Ipv4Addr]) -> Decision {
    match (current.first(), on_iface.first()) {
        (Some(addr), _) if on_iface.contains(addr) => Decision::Keep,
        (_, Some(primary)) => Decision::Switch(*primary),
        (_, None) => Decision::NoAddress,
    }
}

/// The dynamic bindings (outbound and per-remote entries alike) and the sessions whose
/// external address is not in `keep` (network byte order). Static forwards are left out: they
/// move instead ([`forwards::move_to`]).
pub fn stale_plan(
    bindings: &[(BindingKey, BindingValue)],
    sessions: &[(SessionKey, SessionValue)],
    keep: &[u32],
) -> SweepPlan {
    let keep: HashSet<u32> = keep.iter().copied().collect();
    SweepPlan {
        sessions: sessions
            .iter()
            .filter(|(k, _)| !keep.contains(&k.external_addr))
            .map(|(k, _)| *k)
            .collect(),
        bindings: bindings
            .iter()
            .filter(|(_, v)| v.flags & BINDING_FLAG_STATIC == 0 && !keep.contains(&v.external_addr))
            .map(|(k, v)| (*k, expiry::external_key(k, v)))
            .collect(),
    }
}

/// Inbound entries of dynamic bindings on an address not in `keep` that are still there once
/// the bindings are gone (a port claim whose outbound entry was never written). Nothing else
/// would ever free them: the sweep walks outbound entries.
pub fn stale_inbound(inbound: &[(ExternalKey, ExternalValue)], keep: &[u32]) -> Vec<ExternalKey> {
    inbound
        .iter()
        .filter(|(k, v)| v.flags & BINDING_FLAG_STATIC == 0 && !keep.contains(&k.external_addr))
        .map(|(k, _)| *k)
        .collect()
}

/// How many entries a clean-up removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Dynamic bindings.
    pub bindings: usize,
    /// Forwards moved to the new address.
    pub forwards_moved: usize,
}

/// Keeps the running NAT's external address on the interface's address (when it follows it)
/// and notices the interface's removal.
pub struct Follower {
    iface: String,
    ifindex: u32,
    follows: bool,
    without_address: bool,
    leftovers_checked: bool,
}

impl Follower {
    /// For interface `iface` (index `ifindex`); `follows` is false when the external addresses
    /// were given explicitly, which then stay fixed.
    pub fn new(iface: &str, ifindex: u32, follows: bool) -> Follower {
        Follower {
            iface: iface.to_string(),
            ifindex,
            follows,
            without_address: false,
            leftovers_checked: false,
        }
    }

    /// The followed interface's index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Acts on an event: follows the address (errors are printed, the NAT keeps running), or
    /// returns [`InterfaceRemoved`] as the error that stops the daemon.
    pub fn handle(&mut self, event: Event, maps: &mut PinnedMaps) -> Result<()> {
        match event {
            Event::InterfaceRemoved => Err(InterfaceRemoved {
                iface: self.iface.clone(),
            }
            .into()),
            Event::AddressesChanged => {
                if let Err(e) = self.reconcile(maps) {
                    tracing::warn!("cannot follow the address of {}: {e:#}", self.iface);
                }
                Ok(())
            }
        }
    }

    /// Brings the running NAT in line with the interface's current addresses. The first call
    /// also clears what a persisted instance left on addresses that are gone (adoption).
    pub fn reconcile(&mut self, maps: &mut PinnedMaps) -> Result<()> {
        if !self.follows {
            return Ok(());
        }
        let mut config = maps.read_config()?;
        let name = iface::name_of(self.ifindex).unwrap_or_else(|| self.iface.clone());
        let on_iface = iface::ipv4_addrs(&name)?;
        let current: Vec<Ipv4Addr> = config.external_ipv4_addrs().collect();
        match decide(&current, &on_iface) {
            Decision::Keep => {
                if self.without_address {
                    tracing::info!(
                        "{} has its address {} again; bindings kept",
                        self.iface,
                        current[0]
                    );
                    self.without_address = false;
                }
                if !self.leftovers_checked {
                    // An adopted instance may hold state on an address that left meanwhile.
                    let removed = Removed {
                        forwards_moved: move_forwards(maps, current[0], &current)?,
                        bindings: remove_stale(maps, &current)?,
                    };
                    if removed != Removed::default() {
                        tracing::info!(
                            "the running state had entries on addresses no longer on {}: {}",
                            self.iface,
                            summary(removed)
                        );
                    }
                }
            }
            Decision::NoAddress => {
                if !self.without_address {
                    let last = current.first().map(|a| a.to_string()).unwrap_or_default();
                    tracing::info!(
                        "{} has no IPv4 address; new flows keep using {last} until one appears",
                        self.iface
                    );
                    self.without_address = true;
                }
            }
            Decision::Switch(new) => {
                // Forwards first: once the config names the new address, a new flow could
                // take a forwarded port on it.
                let moved = move_forwards(maps, new, &[new])?;
                config.external_addrs = [0; MAX_EXTERNAL_ADDRS];
                config.external_addrs[0] = u32::from(new).to_be();
                config.external_addr_count = 1;
                maps.write_config(&config)?;
                let removed = Removed {
                    bindings: remove_stale(maps, &[new])?,
                    forwards_moved: moved,
                };
                let old = current
                    .first()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "none".into());
                tracing::info!(
                    "external address of {} changed {old} -> {new}; {}",
                    self.iface,
                    summary(removed)
                );
                self.without_address = false;
            }
        }
        self.leftovers_checked = true;
        Ok(())
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn summary(removed: Removed) -> String {
    let mut text = format!(
        "removed {} on the old address",
        plural(removed.bindings, "binding")
    );
    if removed.forwards_moved > 0 {
        text += &format!("; moved {}", plural(removed.forwards_moved, "forward"));
    }
    text
}

/// Moves every forward not on an address in `keep` to `to`. A forward that cannot move (its
/// port taken on the new address) is reported and stays where it was.
fn move_forwards(maps: &mut PinnedMaps, to: Ipv4Addr, keep: &[Ipv4Addr]) -> Result<usize> {
    let mut moved = 0;
    for forward in forwards::list(maps) {
        if keep.contains(forward.external.ip()) {
            continue;
        }
        match forwards::move_to(maps, &forward, to) {
            Ok(_) => moved += 1,
            Err(e) => tracing::warn!(
                "forward {} {} -> {} cannot follow the address to {to}: {e:#}",
                proto::name(forward.proto),
                forward.external,
                forward.internal
            ),
        }
    }
    Ok(moved)
}

/// Removes every dynamic binding and session on an address not in `keep`; returns how many
/// bindings went.
fn remove_stale(maps: &mut PinnedMaps, keep: &[Ipv4Addr]) -> Result<usize> {
    let mut removed = 0;
    let keep_be: Vec<u32> = keep.iter().map(|a| u32::from(*a).to_be()).collect();
    let sessions = maps.sessions()?;
    let plan = stale_plan(&maps.bindings()?, &sessions, &keep_be);
    // Sessions first, as the sweep does, so each binding's session count is settled when it goes.
    crate::session_usage::remove_sessions(maps, &plan.sessions, &sessions)?;
    for (out_key, in_key) in &plan.bindings {
        if expiry::remove_binding(maps, out_key, in_key)? {
            removed += 1;
        }
    }
    let inbound: Vec<(ExternalKey, ExternalValue)> = crate::pinned::read_all(&maps.bindings_in)?;
    for key in stale_inbound(&inbound, &keep_be) {
        let _ = maps.bindings_in.remove(&key);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use nat_common::maps::SESSION_KIND_ENDPOINT;

    use super::*;
    use crate::netlink::NLMSG_HDRLEN;

    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `ip addr add 198.51.100.254/24 dev cap0` (index 3) as received on this machine
    /// (x86_64, little-endian headers): IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS,
    /// IFA_CACHEINFO.
    const NEWADDR: &str = "50000000 1400 0000 f85e116b 7f3e0000
        02 18 80 00 03000000
        0800 0100 c63364fe  0800 0200 c63364fe  0900 0300 6361703000000000
        0800 0800 80000000  1400 0600 ffffffffffffffff605b0f00605b0f00";

    /// `ip link del cap0` (index 3): the header and ifinfomsg as received, attributes cut after
    /// IFLA_IFNAME (length patched to 44).
    const DELLINK: &str = "2c000000 1100 0000 00000000 00000000
        00 00 0100 03000000 02100000 ffffffff
        0900 0300 6361703000000000";

    const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
    const NEW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);

    #[test]
    fn new_address_from_the_kernel() {
        assert_eq!(
            parse(&hex(NEWADDR)),
            vec![RtEvent::Address {
                index: 3,
                family: libc::AF_INET as u8,
                added: true,
                local: Some(EXT)
            }]
        );
        let mut del = hex(NEWADDR);
        del[4] = libc::RTM_DELADDR as u8;
        assert!(matches!(parse(&del)[0], RtEvent::Address { added: false, .. }));
    }

    #[test]
    fn point_to_point_takes_the_local_address() {
        // PPP: IFA_ADDRESS is the peer, IFA_LOCAL ours; here IFA_LOCAL comes second.
        let mut msg = hex(NEWADDR);
        msg[28..32].copy_from_slice(&[203, 0, 113, 1]); // IFA_ADDRESS data
        let [RtEvent::Address { local, .. }] = parse(&msg)[..] else {
            panic!("one address event expected");
        };
        assert_eq!(local, Some(EXT));
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut buf = hex(DELLINK);
        buf.extend(hex(NEWADDR));
        let events = parse(&buf);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            RtEvent::Link {
                index: 3,
                family: 0,
                deleted: true
            }
        );
        assert!(matches!(events[1], RtEvent::Address { index: 3, .. }));
    }

    #[test]
    fn truncated_or_garbled_input_asks_for_a_resync() {
        let msg = hex(NEWADDR);
        assert_eq!(parse(&msg[..40]), vec![RtEvent::Garbled], "cut short");
        let mut bad = msg.clone();
        bad[NLMSG_HDRLEN + IFADDRMSG_LEN] = 200; // attribute longer than the message
        assert_eq!(parse(&bad), vec![RtEvent::Garbled]);
        assert!(parse(&[]).is_empty());
        assert!(classify(&parse(&bad), 3).resync);
    }

    #[test]
    fn other_messages_are_skipped() {
        let mut done = hex(DELLINK);
        done[4] = 3; // NLMSG_DONE
        assert!(parse(&done).is_empty());
    }

    #[test]
    fn only_our_interface_counts() {
        let events = parse(&hex(NEWADDR));
        assert!(classify(&events, 3).addresses);
        assert_eq!(classify(&events, 4), Change::default(), "another interface");
        assert!(classify(&parse(&hex(DELLINK)), 3).removed);
        assert!(!classify(&parse(&hex(DELLINK)), 4).removed);
    }

    #[test]
    fn link_flaps_and_bridge_port_news_are_not_a_removal() {
        let mut newlink = hex(DELLINK);
        newlink[4] = libc::RTM_NEWLINK as u8;
        assert_eq!(classify(&parse(&newlink), 3), Change::default(), "up/down");
        let mut bridge = hex(DELLINK);
        bridge[NLMSG_HDRLEN] = libc::AF_BRIDGE as u8;
        assert_eq!(
            classify(&parse(&bridge), 3),
            Change::default(),
            "a port leaving its bridge"
        );
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(&[EXT], &[EXT, NEW]), Decision::Keep);
        assert_eq!(
            decide(&[EXT], &[NEW, EXT]),
            Decision::Keep,
            "still there: flows keep their address"
        );
        assert_eq!(decide(&[EXT], &[NEW]), Decision::Switch(NEW));
        assert_eq!(decide(&[EXT], &[]), Decision::NoAddress);
        assert_eq!(decide(&[], &[NEW]), Decision::Switch(NEW));
    }

    fn be(a: Ipv4Addr) -> u32 {
        u32::from(a).to_be()
    }

    fn binding(addr: Ipv4Addr, port: u16, remote: u32, flags: u8) -> (BindingKey, BindingValue) {
        (
            BindingKey {
                internal_addr: 1,
                remote_addr: remote,
                internal_port: port,
                remote_port: if remote == 0 { 0 } else { 80 },
                proto: proto::UDP,
                _pad: [0; 3],
            },
            BindingValue {
                external_addr: be(addr),
                external_port: port,
                flags,
                ..Default::default()
            },
        )
    }

    fn session(addr: Ipv4Addr, port: u16) -> (SessionKey, SessionValue) {
        (
            SessionKey {
                external_addr: be(addr),
                remote_addr: 7,
                external_port: port,
                remote_port: 80,
                proto: proto::UDP,
                kind: SESSION_KIND_ENDPOINT,
                _pad: [0; 2],
            },
            SessionValue::default(),
        )
    }

    #[test]
    fn bindings_on_the_old_address_go_with_their_sessions() {
        let bindings = [
            binding(EXT, 4000, 0, 0),
            binding(EXT, 4001, 9, 0), // per-remote (symmetric)
            binding(NEW, 4002, 0, 0),
            binding(EXT, 8080, 0, BINDING_FLAG_STATIC),
        ];
        let sessions = [session(EXT, 4000), session(NEW, 4002)];
        let plan = stale_plan(&bindings, &sessions, &[be(NEW)]);
        let ports: Vec<u16> = plan.bindings.iter().map(|(k, _)| k.internal_port).collect();
        assert_eq!(
            ports,
            [4000, 4001],
            "dynamic ones on the old address, per-remote too"
        );
        for (out_key, in_key) in &plan.bindings {
            assert_eq!(in_key.external_addr, be(EXT), "both directions");
            assert_eq!(in_key.external_port, out_key.internal_port);
        }
        assert_eq!(plan.sessions, [sessions[0].0]);
        assert_eq!(
            stale_plan(&bindings, &sessions, &[be(EXT), be(NEW)]),
            SweepPlan::default(),
            "nothing when every address stays"
        );
    }

    #[test]
    fn orphaned_inbound_entries_go_too() {
        let entry = |addr: Ipv4Addr, flags: u8| {
            (
                ExternalKey {
                    external_addr: be(addr),
                    external_port: 5,
                    proto: proto::UDP,
                    _pad: 0,
                },
                ExternalValue {
                    flags,
                    ..Default::default()
                },
            )
        };
        let inbound = [entry(EXT, 0), entry(NEW, 0), entry(EXT, BINDING_FLAG_STATIC)];
        assert_eq!(stale_inbound(&inbound, &[be(NEW)]), [inbound[0].0]);
    }

    #[test]
    fn change_lines() {
        assert_eq!(
            summary(Removed {
                bindings: 1,
                forwards_moved: 0
            }),
            "removed 1 binding on the old address"
        );
        assert_eq!(
            summary(Removed {
                bindings: 3,
                forwards_moved: 2
            }),
            "removed 3 bindings on the old address; moved 2 forwards"
        );
    }
}
