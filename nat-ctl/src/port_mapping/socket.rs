//! The port-mapping servers' sockets: each bound to one internal interface, so requests that
//! arrive on any other interface never reach them (SO_BINDTODEVICE: with the weak host model a
//! packet to an internal address arriving on the external interface would otherwise be
//! accepted; RFC 6887 §18.1: requests from outside are never answered).

use std::{
    net::Ipv4Addr,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

/// A socket of `kind` on `addr:port`, only reachable through `iface` (SO_BINDTODEVICE).
pub fn bound_socket(kind: libc::c_int, iface: &str, addr: Ipv4Addr, port: u16) -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = iface.as_bytes();
    // SAFETY: the option value is the interface name's bytes, with its length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_BINDTODEVICE {iface}: {}", std::io::Error::last_os_error());
    }
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a sockaddr_in with its length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "binding {addr}:{port} on {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(owned)
}

/// Sets an integer socket option; a failure only loses the option.
pub fn set_int(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: an int option.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
