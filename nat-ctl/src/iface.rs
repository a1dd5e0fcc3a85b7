//! Network interface facts: index and IPv4 addresses.

use std::{ffi::CString, net::Ipv4Addr};

use anyhow::{bail, Result};

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
