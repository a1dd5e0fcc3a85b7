//! UPnP IGD 1.0 served on the internal interfaces (`--port-mapping upnp`): SSDP discovery on
//! UDP 1900, and an HTTP server on `HTTP_PORT` of each internal address serving the device
//! description and SOAP control of WANIPConnection:1. The actions reach the port-mapping
//! server's state task as `http::Call`s, so UPnP mappings share the table, limits and kernel
//! path of PCP and NAT-PMP. Every socket is bound to its internal interface
//! (SO_BINDTODEVICE): nothing arriving on the external interface is answered.

pub mod actions;
pub mod description;
pub mod http;
pub mod soap;
pub mod ssdp;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Result};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::{mpsc, Semaphore},
};

use self::description::Uuids;
use super::socket::bound_socket;

/// TCP port of the description and control server on each internal address (the port Windows'
/// Internet Connection Sharing serves its IGD on; SSDP's LOCATION tells clients anyway).
pub const HTTP_PORT: u16 = 2869;
/// Most HTTP connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;
/// Pending connections the kernel queues per listener.
const BACKLOG: i32 = 16;
/// Gap between two rounds of NOTIFY ssdp:alive: half the advertisement's max-age (UDA 1.0
/// §1.1.2 asks for re-advertising well before it runs out).
const NOTIFY_EVERY: Duration = Duration::from_secs(ssdp::MAX_AGE as u64 / 2);

/// A fresh random UUID from the kernel (each daemon is a new device instance).
fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            let n = crate::clock::monotonic_ns();
            format!(
                "{:08x}-0000-4000-8000-{:012x}",
                std::process::id(),
                n & 0xffff_ffff_ffff
            )
        })
}

/// The SSDP socket of `iface`: UDP 1900, in the SSDP group on that interface, sending its
/// multicast there.
fn ssdp_socket(iface: &str) -> Result<UdpSocket> {
    let owned = bound_socket(libc::SOCK_DGRAM, iface, Ipv4Addr::UNSPECIFIED, ssdp::PORT)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&owned);
    let index = crate::iface::index(iface)?;
    let mreq = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr {
            s_addr: u32::from(ssdp::GROUP).to_be(),
        },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: index as libc::c_int,
    };
    for option in [libc::IP_ADD_MEMBERSHIP, libc::IP_MULTICAST_IF] {
        // SAFETY: an ip_mreqn with its length.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                option,
                (&mreq as *const libc::ip_mreqn).cast(),
                std::mem::size_of::<libc::ip_mreqn>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("SSDP group on {iface}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(UdpSocket::from_std(std::net::UdpSocket::from(owned))?)
}

/// The address among `addrs` a reply to `peer` leaves from (the kernel's route choice),
/// so the LOCATION it carries is reachable from there.
fn local_for(peer: SocketAddrV4, addrs: &[Ipv4Addr]) -> Ipv4Addr {
    let chosen = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect(peer).and_then(|()| s.local_addr()))
        .ok()
        .and_then(|a| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(_) => None,
        });
    match chosen {
        Some(a) if addrs.contains(&a) => a,
        _ => addrs[0],
    }
}

/// Opens the SSDP and HTTP sockets on every internal interface (`ifaces`: name and IPv4
/// addresses) and spawns their tasks on the current runtime; SOAP calls go to `calls`.
pub fn spawn(ifaces: &[(String, Vec<Ipv4Addr>)], calls: mpsc::Sender<http::Call>) -> Result<()> {
    let uuids = Arc::new(Uuids {
        root: uuid(),
        wan: uuid(),
        connection: uuid(),
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    for (iface, addrs) in ifaces.iter().filter(|(_, a)| !a.is_empty()) {
        for addr in addrs {
            let owned = bound_socket(libc::SOCK_STREAM, iface, *addr, HTTP_PORT)?;
            // SAFETY: listen(2) on a bound stream socket.
            if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&owned), BACKLOG) } != 0 {
                bail!(
                    "listen on {addr}:{HTTP_PORT}: {}",
                    std::io::Error::last_os_error()
                );
            }
            let listener = TcpListener::from_std(std::net::TcpListener::from(owned))?;
            let (uuids, permits, calls) = (uuids.clone(), permits.clone(), calls.clone());
            tokio::spawn(async move {
                while let Ok((stream, peer)) = listener.accept().await {
                    let SocketAddr::V4(peer) = peer else { continue };
                    // Over the limit the connection is closed at once (dropped).
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        continue;
                    };
                    let (uuids, calls) = (uuids.clone(), calls.clone());
                    tokio::spawn(async move {
                        http::serve(stream, *peer.ip(), &uuids, &calls).await;
                        drop(permit);
                    });
                }
            });
        }
        let socket = ssdp_socket(iface)?;
        let (uuids, addrs) = (uuids.clone(), addrs.clone());
        tokio::spawn(async move {
            let group = SocketAddrV4::new(ssdp::GROUP, ssdp::PORT);
            let mut notify = tokio::time::interval(NOTIFY_EVERY);
            let mut buf = vec![0u8; ssdp::MAX_DATAGRAM];
            loop {
                tokio::select! {
                    _ = notify.tick() => {
                        for (nt, usn) in ssdp::targets(&uuids) {
                            let _ = socket.send_to(ssdp::alive(&nt, &usn, addrs[0]).as_bytes(), group).await;
                        }
                    }
                    received = socket.recv_from(&mut buf) => {
                        // A failing socket ends the task rather than spinning on it.
                        let Ok((n, from)) = received else { break };
                        let SocketAddr::V4(peer) = from else { continue };
                        if n >= buf.len() {
                            continue;
                        }
                        let answers = ssdp::answers(&buf[..n], &uuids);
                        if answers.is_empty() {
                            continue;
                        }
                        let addr = local_for(peer, &addrs);
                        for (st, usn) in answers {
                            let _ = socket.send_to(ssdp::response(&st, &usn, addr).as_bytes(), peer).await;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}
