//! Port mapping served by the NAT: PCP (RFC 6887) and NAT-PMP (RFC 6886) on UDP port 5351 of
//! the internal interfaces only, off unless enabled (`--port-mapping pcp,nat-pmp`, config key
//! `port_mapping`). A mapping is a binding flagged static (so the data path forwards inbound
//! traffic to the host in every mode, as for `nat-ctl forward`) and marked with its protocol;
//! this task removes it when its lifetime ends and records the mappings in a state file so a
//! `--persist` restart keeps them with the lifetime they had left.

pub mod kernel;
pub mod mappings;
pub mod natpmp;
pub mod pcp;
pub mod server;
pub mod socket;
pub mod upnp;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Result};
use tokio::{net::UdpSocket, sync::mpsc};

use self::{
    kernel::Kernel,
    mappings::{Mapping, Mappings, Via},
    server::Server,
};
use crate::{clock::monotonic_ns, instance::Instance, pinned::PinnedMaps};

/// Which port-mapping protocols are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protocols {
    /// PCP (RFC 6887).
    pub pcp: bool,
    /// NAT-PMP (RFC 6886).
    pub nat_pmp: bool,
    /// UPnP IGD (SSDP discovery and WANIPConnection:1 over HTTP/SOAP).
    pub upnp: bool,
    /// Mapping for another host allowed (`third-party`): PCP's THIRD_PARTY option (RFC 6887
    /// §13.1) and a UPnP NewInternalClient other than the requester; off, a host maps only its
    /// own address.
    pub third_party: bool,
}

impl Protocols {
    /// Any protocol on.
    pub fn any(self) -> bool {
        self.pcp || self.nat_pmp || self.upnp
    }

    /// Either protocol of UDP port 5351 on.
    pub fn udp_5351(self) -> bool {
        self.pcp || self.nat_pmp
    }

    /// Parses a comma-separated list of `pcp`, `nat-pmp`, `upnp`, or `off`, with `third-party`
    /// to allow mapping for another host (also as a list of words).
    pub fn parse(text: &str) -> Result<Self> {
        Self::from_words(text.split(',').map(str::trim))
    }

    /// Parses a list of protocol names (the config file's array).
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut p = Protocols::default();
        for word in words {
            match word {
                "pcp" => p.pcp = true,
                "nat-pmp" | "natpmp" => p.nat_pmp = true,
                "upnp" => p.upnp = true,
                "third-party" => p.third_party = true,
                "off" | "none" | "" => {}
                other => bail!(
                    "{other:?} is not a port-mapping protocol (expected pcp, nat-pmp, upnp, third-party or off)"
                ),
            }
        }
        if p.third_party && !p.pcp && !p.upnp {
            bail!("third-party is an option of pcp and upnp: name one of them too (pcp,third-party)");
        }
        Ok(p)
    }

    /// The protocols on, comma-separated (`pcp,nat-pmp,upnp`), or `off`.
    pub fn name(self) -> String {
        let on: Vec<&str> = [(self.pcp, "pcp"), (self.nat_pmp, "nat-pmp"), (self.upnp, "upnp")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        if on.is_empty() {
            "off".to_string()
        } else {
            on.join(",")
        }
    }
}

/// How often the server looks at the external address (for NAT-PMP's announcement, RFC 6886
/// §3.2.1) when no mapping expires sooner.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// The all-hosts group and client port announcements go to (RFC 6886 §3.2.1, RFC 6887 §14.1.3).
const ANNOUNCE_TO: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 1), pcp::CLIENT_PORT);
/// Largest datagram read: PCP's limit (RFC 6887 §7) plus one, so a longer one is seen as such.
const RECV_BUFFER: usize = pcp::MAX_MESSAGE_LEN + 4;
/// Requests queued between the sockets and the server.
const QUEUE: usize = 256;
/// UPnP SOAP calls queued between the HTTP connections and the server (at most one per
/// connection).
const UPNP_QUEUE: usize = upnp::MAX_CONNECTIONS;

/// Name of the state file (`Instance::state_file`) holding the mappings.
pub const STATE_KIND: &str = "port-mappings";

/// The mappings recorded for `instance` (for `nat-ctl mappings`).
pub fn load_state(instance: &Instance) -> Vec<Mapping> {
    std::fs::read_to_string(instance.state_file(STATE_KIND))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// How many port mappings the maps hold: (made with PCP, with NAT-PMP, with UPnP), for `status`.
pub fn count(maps: &PinnedMaps) -> (usize, usize, usize) {
    let marked = kernel::marked(maps);
    let with = |via: Via| marked.iter().filter(|m| Via::of_flags(m.3) == via).count();
    (with(Via::Pcp), with(Via::NatPmp), with(Via::Upnp))
}

/// Fills in the remaining lifetime of the port-mapping rows of `nat-ctl mappings`.
pub fn annotate(instance: &Instance, rows: &mut [crate::table::Row], now_ns: u64) {
    let recorded = load_state(instance);
    for row in rows.iter_mut().filter(|r| r.remote.is_none()) {
        let found = recorded.iter().find(|m| {
            m.via.name() == row.state
                && nat_common::proto::name(m.proto) == row.proto
                && m.internal.to_string() == row.internal
        });
        if let Some(m) = found {
            row.expires_in = Some(u64::from(Mappings::remaining_secs(m, now_ns)));
        }
    }
}

/// Writes the record whole or not at all (a new file renamed over the old one), so `nat-ctl
/// mappings` reading it meanwhile never sees it half written.
fn save_state(path: &PathBuf, list: &[Mapping]) {
    let text = serde_json::to_string(list).unwrap_or_default();
    let fresh = PathBuf::from(format!("{}.new", path.display()));
    if let Err(e) = std::fs::write(&fresh, text).and_then(|()| std::fs::rename(&fresh, path)) {
        tracing::warn!(
            "port mapping: cannot record the mappings in {}: {e}",
            path.display()
        );
    }
}

/// The PCP/NAT-PMP socket on `addr`:5351 of `iface`, reachable only through it.
fn open_socket(iface: &str, addr: Ipv4Addr) -> Result<std::net::UdpSocket> {
    let owned = socket::bound_socket(libc::SOCK_DGRAM, iface, addr, pcp::SERVER_PORT)?;
    Ok(std::net::UdpSocket::from(owned))
}

/// Refuses port mapping without internal interfaces (before anything is attached): the
/// server listens only there.
pub fn check(protocols: Protocols, internal_ifaces: &[String]) -> Result<()> {
    if protocols.any() && internal_ifaces.is_empty() {
        bail!("--port-mapping {} needs internal interfaces (the server listens only there): name them with --internal-iface", protocols.name());
    }
    Ok(())
}

/// Opens the server's sockets on the internal interfaces and spawns it on the current tokio
/// runtime. Nothing is spawned when `protocols` is off.
pub fn spawn(protocols: Protocols, internal_ifaces: &[String], instance: &Instance) -> Result<()> {
    if !protocols.any() {
        return Ok(());
    }
    check(protocols, internal_ifaces)?;
    let mut ifaces = Vec::new();
    for iface in internal_ifaces {
        ifaces.push((iface.clone(), crate::iface::ipv4_addrs(iface)?));
    }
    let mut sockets = Vec::new();
    for (iface, addrs) in &ifaces {
        for addr in addrs.iter().filter(|_| protocols.udp_5351()) {
            let socket = open_socket(iface, *addr)?;
            sockets.push(Arc::new(UdpSocket::from_std(socket)?));
        }
    }
    if ifaces.iter().all(|(_, addrs)| addrs.is_empty()) {
        bail!(
            "--port-mapping: the internal interfaces ({}) have no IPv4 address to listen on",
            internal_ifaces.join(", ")
        );
    }
    let mut maps = PinnedMaps::open(&instance.pin_dir())?;
    let state_path = instance.state_file(STATE_KIND);
    let list = restore(&mut maps, load_state(instance), monotonic_ns());
    save_state(&state_path, &list);
    let server = Server {
        protocols,
        epoch_start_ns: monotonic_ns(),
        mappings: Mappings::with(list, std::process::id().wrapping_mul(2_654_435_761)),
        allow_third_party: protocols.third_party,
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    for (i, socket) in sockets.iter().enumerate() {
        let socket = socket.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; RECV_BUFFER];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if let SocketAddr::V4(from) = from {
                    if tx.send((i, buf[..n].to_vec(), from)).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    let (upnp_tx, upnp_rx) = mpsc::channel(UPNP_QUEUE);
    if protocols.upnp {
        upnp::spawn(&ifaces, upnp_tx)?;
    }
    tokio::spawn(serve(server, maps, sockets, rx, upnp_rx, state_path));
    Ok(())
}

/// Keeps the recorded mappings whose binding is still there and whose lifetime is not over;
/// removes marked bindings nobody recorded or that expired while no daemon ran.
fn restore(maps: &mut PinnedMaps, recorded: Vec<Mapping>, now_ns: u64) -> Vec<Mapping> {
    let marked = kernel::marked(maps);
    let mut kept = Vec::new();
    let mut dp = Kernel { maps };
    for (proto, internal, external_port, flags) in marked {
        let record = recorded
            .iter()
            .find(|m| m.proto == proto && m.internal == internal);
        match record {
            Some(m) if m.expires_ns > now_ns => kept.push(Mapping {
                external_port,
                ..m.clone()
            }),
            _ => {
                let stale = Mapping {
                    proto,
                    internal,
                    external_port,
                    expires_ns: 0,
                    nonce: None,
                    via: Via::of_flags(flags),
                    adopted: record.is_some_and(|m| m.adopted),
                    description: String::new(),
                };
                let _ = mappings::Dataplane::remove(&mut dp, &stale);
            }
        }
    }
    kept
}

/// How many times an announcement is sent (RFC 6886 §3.2.1: ten times, the gap doubling from
/// 250 ms, since a multicast datagram may be lost).
const ANNOUNCE_REPEATS: u32 = 10;
/// The first gap between two copies of an announcement.
const ANNOUNCE_FIRST_GAP: Duration = Duration::from_millis(250);

/// Starts announcing the start of the epoch (RFC 6887 §14.1.3: unsolicited ANNOUNCE) and the
/// external address (RFC 6886 §3.2.1: the public address response) to the all-hosts group on
/// every internal interface, in the background; each copy carries the epoch of its sending.
fn announce(server: &Server, dp: &mut Kernel<'_>, sockets: &[Arc<UdpSocket>]) -> tokio::task::JoinHandle<()> {
    let protocols = server.protocols;
    let start_ns = server.epoch_start_ns;
    let addr = mappings::Dataplane::external_addr(dp);
    let sockets = sockets.to_vec();
    tokio::spawn(async move {
        let mut gap = ANNOUNCE_FIRST_GAP;
        for _ in 0..ANNOUNCE_REPEATS {
            let epoch = (monotonic_ns().saturating_sub(start_ns) / 1_000_000_000) as u32;
            let mut messages = Vec::new();
            if protocols.pcp {
                messages.push(pcp::announce_response(epoch));
            }
            if let (true, Some(addr)) = (protocols.nat_pmp, addr) {
                messages.push(natpmp::public_address_response(
                    natpmp::ResultCode::Success,
                    epoch,
                    addr,
                ));
            }
            for socket in &sockets {
                for message in &messages {
                    let _ = socket.send_to(message, ANNOUNCE_TO).await;
                }
            }
            tokio::time::sleep(gap).await;
            gap *= 2;
        }
    })
}

async fn serve(
    mut server: Server,
    mut maps: PinnedMaps,
    sockets: Vec<Arc<UdpSocket>>,
    mut rx: mpsc::Receiver<(usize, Vec<u8>, SocketAddrV4)>,
    mut upnp_rx: mpsc::Receiver<upnp::http::Call>,
    state_path: PathBuf,
) {
    let mut dp = Kernel { maps: &mut maps };
    let mut announcer = announce(&server, &mut dp, &sockets);
    let mut address = mappings::Dataplane::external_addr(&mut dp);
    loop {
        let wait = server.mappings.next_expiry().map_or(IDLE_TICK, |at| {
            Duration::from_nanos(at.saturating_sub(monotonic_ns())).min(IDLE_TICK)
        });
        tokio::select! {
            // A closed queue (no PCP/NAT-PMP sockets, or no UPnP) only disables its branch.
            Some((i, datagram, from)) = rx.recv() => {
                let before = server.mappings.list().to_vec();
                let answer = server.handle(&mut dp, &datagram, from, monotonic_ns());
                // Recorded before the client hears of it: a daemon stopped right after its
                // answer (--persist) must not leave a mapping the next one cannot account for.
                if server.mappings.list() != before.as_slice() {
                    save_state(&state_path, server.mappings.list());
                }
                match answer {
                    Ok(Some(answer)) => {
                        let _ = sockets[i].send_to(&answer, from).await;
                    }
                    Ok(None) => {}
                    // A client's mistake, answered with an error code: worth a line, not a warning.
                    Err(e) => tracing::info!("port mapping: request from {from}: {e:#}"),
                }
            }
            Some((action, from, reply)) = upnp_rx.recv() => {
                let before = server.mappings.list().to_vec();
                let answer = upnp::actions::handle(&mut server, &mut dp, &action, from, monotonic_ns());
                if server.mappings.list() != before.as_slice() {
                    save_state(&state_path, server.mappings.list());
                }
                let answer = answer.unwrap_or_else(|e| {
                    tracing::warn!("port mapping: UPnP {} from {from}: {e:#}", action.name);
                    Err(upnp::actions::UpnpError::ActionFailed)
                });
                let _ = reply.send(answer);
            }
            _ = tokio::time::sleep(wait) => {
                if !server.mappings.expire(&mut dp, monotonic_ns()).is_empty() {
                    save_state(&state_path, server.mappings.list());
                }
                let now = mappings::Dataplane::external_addr(&mut dp);
                if now != address {
                    // RFC 6886 §3.2.1: hosts are told when the external address changes.
                    address = now;
                    // The old address must not be announced after the new one.
                    announcer.abort();
                    announcer = announce(&server, &mut dp, &sockets);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_parse() {
        assert_eq!(
            Protocols::parse("pcp,nat-pmp").unwrap(),
            Protocols {
                pcp: true,
                nat_pmp: true,
                upnp: false,
                third_party: false,
            }
        );
        assert_eq!(Protocols::parse("nat-pmp").unwrap().name(), "nat-pmp");
        assert!(!Protocols::parse("off").unwrap().any());
        assert!(Protocols::parse("upnpp").is_err());
        assert_eq!(Protocols::parse("upnp,pcp").unwrap().name(), "pcp,upnp");
        assert!(Protocols::parse("upnp,third-party").unwrap().third_party);
        assert!(Protocols::parse("pcp,third-party").unwrap().third_party);
        assert!(Protocols::parse("nat-pmp,third-party").is_err());
    }
}
