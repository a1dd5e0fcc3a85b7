//! Network interface facts: index and IPv4 addresses.

use std::{ffi::CString, net::Ipv4Addr};

use anyhow::{bail, Result};

use crate::netlink::{
    self, attr_string, u16_at, u32_at, Message, IFADDRMSG_LEN, IFINFOMSG_LEN, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_HDRLEN, RECV_BUF_BYTES,
};

/// The interface index of `name` in the current network namespace.
pub fn index(name: &str) -> Result<u32> {
    let c_name =
        CString::new(name).map_err(|_| anyhow::anyhow!("interface name {name:?} contains a NUL byte"))?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("interface {name} does not exist");
    }
    Ok(index)
}

/// True if `name` is a loopback device (`IFF_LOOPBACK`): a NAT there would translate the
/// gateway's own local traffic and break it, so attach refuses it.
pub fn is_loopback(name: &str) -> Result<bool> {
    // SAFETY: plain socket call; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("cannot open a socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills `ifr_flags` of a valid ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    let error = std::io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("cannot read the flags of {name}: {error}");
    }
    // SAFETY: SIOCGIFFLAGS wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(i32::from(flags) & libc::IFF_LOOPBACK != 0)
}

/// The name of interface `index`, or the index itself when it has none here.
pub fn name(index: u32) -> String {
    name_of(index).unwrap_or_else(|| format!("#{index}"))
}

/// The current name of interface `index`; `None` when no such interface exists here (any
/// more).
pub fn name_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as the call requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    Some(
        unsafe { std::ffi::CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The IPv4 addresses assigned to `name`, primary first (kernel order).
pub fn ipv4_addrs(name: &str) -> Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: valid out-pointer; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!(
            "cannot list interface addresses: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut addrs = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: a node of the list returned by getifaddrs.
        let entry = unsafe { &*cursor };
        // SAFETY: ifa_name is a valid C string for every entry.
        let entry_name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        if entry_name.to_bytes() == name.as_bytes() && !entry.ifa_addr.is_null() {
            // SAFETY: non-null sockaddr; its family says whether it is a sockaddr_in.
            let family = unsafe { (*entry.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                addrs.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// `IFLA_LINKINFO` and, nested in it, `IFLA_INFO_KIND` (include/uapi/linux/if_link.h): the
/// device kind (`bridge`, `bond`, `veth`, ...) of a virtual device.
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// `IFLA_XDP` and, nested in it, `IFLA_XDP_ATTACHED`: which kind of XDP program the device
/// runs (`XDP_ATTACHED_NONE` = 0).
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
/// Datagrams read from one dump before giving up: a dump of a few thousand interfaces takes a
/// few dozen; this only bounds the loop against a kernel that never says done.
const MAX_DUMP_DATAGRAMS: usize = 100_000;

/// One network device as rtnetlink lists it (`RTM_NEWLINK`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name (`IFLA_IFNAME`).
    pub name: String,
    /// Hardware type (`ARPHRD_*`, `ifi_type`): `ARPHRD_ETHER` for Ethernet-framed devices.
    pub hw_type: u16,
    /// Device flags (`IFF_*`, `ifi_flags`).
    pub flags: u32,
    /// The device it is enslaved to (`IFLA_MASTER`): a bridge, bond or VRF.
    pub master: Option<u32>,
    /// Device kind of a virtual device (`IFLA_INFO_KIND`), e.g. `bridge`, `bond`, `veth`.
    pub kind: Option<String>,
    /// An XDP program is attached to it (`IFLA_XDP_ATTACHED` not none).
    pub has_xdp: bool,
}

/// Decodes the `RTM_NEWLINK` messages of one dump datagram (a pure function of the bytes, so
/// it is unit-tested); other messages are skipped, a malformed one ends the datagram.
pub fn parse_links(buf: &[u8]) -> Vec<Link> {
    let mut links = Vec::new();
    for Message { kind, body } in netlink::messages(buf).map_while(Result::ok) {
        if kind != libc::RTM_NEWLINK || body.len() < IFINFOMSG_LEN {
            continue;
        }
        let (Some(hw_type), Some(index), Some(flags), Some(attrs)) = (
            u16_at(body, 2),
            u32_at(body, 4),
            u32_at(body, 8),
            netlink::attributes(body, IFINFOMSG_LEN),
        ) else {
            continue;
        };
        let mut link = Link {
            index,
            name: String::new(),
            hw_type,
            flags,
            master: None,
            kind: None,
            has_xdp: false,
        };
        for (kind, data) in attrs {
            match kind {
                libc::IFLA_IFNAME => link.name = attr_string(data),
                libc::IFLA_MASTER => link.master = u32_at(data, 0).filter(|&m| m != 0),
                IFLA_XDP => {
                    link.has_xdp = netlink::attributes(data, 0).is_some_and(|nested| {
                        nested
                            .iter()
                            .any(|(k, d)| *k == IFLA_XDP_ATTACHED && d.first().is_some_and(|&m| m != 0))
                    })
                }
                IFLA_LINKINFO => {
                    link.kind = netlink::attributes(data, 0).and_then(|nested| {
                        nested
                            .iter()
                            .find(|(k, _)| *k == IFLA_INFO_KIND)
                            .map(|(_, d)| attr_string(d))
                    })
                }
                _ => {}
            }
        }
        links.push(link);
    }
    links
}

/// True when `buf` holds the message that ends a dump (`NLMSG_DONE`, or an error), or cannot
/// be read any further.
fn dump_ended(buf: &[u8]) -> bool {
    netlink::messages(buf).any(|message| {
        message.map_or(true, |Message { kind, .. }| {
            kind == NLMSG_DONE || kind == NLMSG_ERROR
        })
    })
}

/// Asks rtnetlink for a dump (`RTM_GETLINK`, `RTM_GETADDR`) of `family` and returns its
/// datagrams, for `parse_links` or `addr_watch::parse`. `header_len` is the request's fixed
/// header (ifinfomsg or ifaddrmsg), sent zeroed but for its family.
fn rtnetlink_dump(request: u16, family: u8, header_len: usize) -> Result<Vec<Vec<u8>>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2) call; the descriptor is owned right below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        bail!(
            "cannot open a netlink socket: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut msg = vec![0u8; NLMSG_HDRLEN + header_len];
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    netlink::finish_header(&mut msg, request, flags, 1);
    msg[NLMSG_HDRLEN] = family;
    // SAFETY: all-zero is a valid sockaddr_nl: the kernel (port id 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid descriptor, buffer and address of the sizes given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        bail!(
            "cannot ask rtnetlink for a dump: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut datagrams = Vec::new();
    let mut buf = vec![0u8; RECV_BUF_BYTES];
    for _ in 0..MAX_DUMP_DATAGRAMS {
        // SAFETY: valid descriptor and buffer of the size given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("cannot read an rtnetlink dump: {error}");
        }
        let datagram = buf[..n as usize].to_vec();
        let ended = n == 0 || dump_ended(&datagram);
        datagrams.push(datagram);
        if ended {
            return Ok(datagrams);
        }
    }
    bail!("an rtnetlink dump did not end after {MAX_DUMP_DATAGRAMS} datagrams")
}

/// Every network device of this network namespace.
pub fn links() -> Result<Vec<Link>> {
    let dump = rtnetlink_dump(libc::RTM_GETLINK, libc::AF_UNSPEC as u8, IFINFOMSG_LEN)?;
    Ok(dump.iter().flat_map(|d| parse_links(d)).collect())
}

/// Every IPv4 address of this network namespace, as (interface index, address), in kernel
/// order (primary addresses first). Decoded by `addr_watch::parse`, which reads the same
/// `RTM_NEWADDR` messages as notifications.
pub fn all_ipv4_addrs() -> Result<Vec<(u32, Ipv4Addr)>> {
    let dump = rtnetlink_dump(libc::RTM_GETADDR, libc::AF_INET as u8, IFADDRMSG_LEN)?;
    let mut addrs = Vec::new();
    for datagram in &dump {
        for event in crate::addr_watch::parse(datagram) {
            if let crate::addr_watch::RtEvent::Address {
                index,
                family,
                local: Some(local),
                ..
            } = event
            {
                if family == libc::AF_INET as u8 {
                    addrs.push((index, local));
                }
            }
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `RTM_NEWLINK` message: ifinfomsg (type, index, flags) and the given attributes.
    fn newlink(hw_type: u16, index: u32, flags: u32, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut msg = vec![0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        let body = NLMSG_HDRLEN;
        msg[body + 2..body + 4].copy_from_slice(&hw_type.to_ne_bytes());
        msg[body + 4..body + 8].copy_from_slice(&index.to_ne_bytes());
        msg[body + 8..body + 12].copy_from_slice(&flags.to_ne_bytes());
        for (kind, data) in attrs {
            netlink::push_attribute(&mut msg, *kind, data);
        }
        netlink::finish_header(&mut msg, libc::RTM_NEWLINK, 0, 0);
        msg
    }

    fn nested(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        netlink::push_attribute(&mut v, kind, data);
        v
    }

    #[test]
    fn links_with_name_master_and_kind() {
        let mut buf = newlink(1, 4, 0x1043, &[(libc::IFLA_IFNAME, b"lan0\0".to_vec())]);
        buf.extend(newlink(
            1,
            5,
            0x1003,
            &[
                (libc::IFLA_IFNAME, b"p1\0".to_vec()),
                (libc::IFLA_MASTER, 9u32.to_ne_bytes().to_vec()),
                (IFLA_LINKINFO | 0x8000, nested(IFLA_INFO_KIND, b"veth\0")),
                (IFLA_XDP | 0x8000, nested(IFLA_XDP_ATTACHED, &[1])),
            ],
        ));
        let links = parse_links(&buf);
        assert_eq!(links.len(), 2);
        assert_eq!(
            links[0],
            Link {
                index: 4,
                name: "lan0".into(),
                hw_type: 1,
                flags: 0x1043,
                master: None,
                kind: None,
                has_xdp: false
            }
        );
        assert_eq!(links[1].name, "p1");
        assert_eq!(links[1].master, Some(9));
        assert_eq!(links[1].kind.as_deref(), Some("veth"));
        assert!(links[1].has_xdp);
        assert!(!dump_ended(&buf));
    }

    #[test]
    fn truncated_input_is_not_a_link() {
        let buf = newlink(1, 4, 0, &[(libc::IFLA_IFNAME, b"lan0\0".to_vec())]);
        assert!(parse_links(&buf[..buf.len() - 3]).is_empty());
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(dump_ended(&done));
    }
}
