//! Answers PCP and NAT-PMP requests: one datagram in, at most one out. The version byte tells
//! the protocols apart on their shared port (RFC 6887 Appendix A, RFC 6886 §3.5).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use nat_common::proto;

use super::{
    mappings::{Dataplane, Granted, MapRequest, Mappings, Refusal, Via},
    natpmp, pcp, Protocols,
};

/// The protocol state of one server: which protocols are on, the epoch, the mappings.
pub struct Server {
    /// Enabled protocols.
    pub protocols: Protocols,
    /// CLOCK_MONOTONIC ns at which the epoch started (RFC 6887 §8.5, RFC 6886 §3.6): clients
    /// that see it go back know the mappings may be lost and re-create them.
    pub epoch_start_ns: u64,
    /// The mappings.
    pub mappings: Mappings,
    /// Whether PCP's THIRD_PARTY option may map for another host (RFC 6887 §13.1, §18.1);
    /// off: a host maps only its own address.
    pub allow_third_party: bool,
}

impl Server {
    /// Seconds since the start of the epoch at `now_ns`.
    pub fn epoch(&self, now_ns: u64) -> u32 {
        (now_ns.saturating_sub(self.epoch_start_ns) / 1_000_000_000) as u32
    }

    /// The answer to `datagram` from `source`, if any; `changed` tells whether the mappings
    /// changed (to be saved).
    pub fn handle(
        &mut self,
        dp: &mut dyn Dataplane,
        datagram: &[u8],
        source: SocketAddrV4,
        now_ns: u64,
    ) -> Result<Option<Vec<u8>>> {
        let epoch = self.epoch(now_ns);
        let Some(&version) = datagram.first() else {
            return Ok(None);
        };
        if version == natpmp::VERSION {
            if !self.protocols.nat_pmp {
                // A PCP-only server tells a NAT-PMP client so in NAT-PMP's own terms (RFC 6887
                // Appendix A; RFC 6886 §3.5's "Unsupported Version").
                return Ok(matches!(natpmp::parse(datagram), natpmp::Parsed::Request(_))
                    .then(|| natpmp::error_response(&[1], natpmp::ResultCode::UnsupportedVersion, epoch)));
            }
            return self.natpmp(dp, datagram, source, now_ns, epoch);
        }
        if !self.protocols.pcp {
            // A NAT-PMP-only server answers every other version with "Unsupported Version"
            // (RFC 6886 §3.5), which a PCP client takes as "no PCP here" (RFC 6887 §9).
            return Ok(Some(natpmp::error_response(
                datagram,
                natpmp::ResultCode::UnsupportedVersion,
                epoch,
            )));
        }
        self.pcp(dp, datagram, source, now_ns, epoch)
    }

    fn natpmp(
        &mut self,
        dp: &mut dyn Dataplane,
        datagram: &[u8],
        source: SocketAddrV4,
        now_ns: u64,
        epoch: u32,
    ) -> Result<Option<Vec<u8>>> {
        use natpmp::ResultCode as R;
        let request = match natpmp::parse(datagram) {
            natpmp::Parsed::Ignore => return Ok(None),
            natpmp::Parsed::Error(code) => return Ok(Some(natpmp::error_response(datagram, code, epoch))),
            natpmp::Parsed::Request(r) => r,
        };
        match request {
            natpmp::Request::PublicAddress => Ok(Some(match dp.external_addr() {
                Some(addr) => natpmp::public_address_response(R::Success, epoch, addr),
                // RFC 6886 §3.5: "Network Failure (e.g., NAT box itself has not obtained a DHCP lease)".
                None => natpmp::public_address_response(R::NetworkFailure, epoch, Ipv4Addr::UNSPECIFIED),
            })),
            natpmp::Request::Map {
                opcode,
                internal_port,
                suggested_port,
                lifetime,
            } => {
                let proto = if opcode == natpmp::OP_MAP_UDP {
                    proto::UDP
                } else {
                    proto::TCP
                };
                if internal_port == 0 {
                    // RFC 6886 §3.4: internal port 0, lifetime 0 deletes all of the client's
                    // mappings of this protocol (that it made with NAT-PMP).
                    if lifetime != 0 {
                        return Ok(Some(natpmp::map_response(
                            opcode,
                            R::NotAuthorized,
                            epoch,
                            0,
                            0,
                            0,
                        )));
                    }
                    let mine: Vec<u16> = self
                        .mappings
                        .list()
                        .iter()
                        .filter(|m| {
                            m.proto == proto && *m.internal.ip() == *source.ip() && m.via == Via::NatPmp
                        })
                        .map(|m| m.internal.port())
                        .collect();
                    for port in mine {
                        let req = nat_pmp_request(proto, SocketAddrV4::new(*source.ip(), port), 0, 0);
                        let _ = self.mappings.request(dp, &req, now_ns)?;
                    }
                    return Ok(Some(natpmp::map_response(opcode, R::Success, epoch, 0, 0, 0)));
                }
                let req = nat_pmp_request(
                    proto,
                    SocketAddrV4::new(*source.ip(), internal_port),
                    suggested_port,
                    lifetime,
                );
                let (code, external_port, granted) = match self.mappings.request(dp, &req, now_ns)? {
                    Ok(Granted::Mapped { external, lifetime }) => (R::Success, external.port(), lifetime),
                    Ok(Granted::Deleted) => (R::Success, 0, 0),
                    Err(Refusal::NotAuthorized) => (R::NotAuthorized, 0, 0),
                    Err(Refusal::NoExternalAddress) => (R::NetworkFailure, 0, 0),
                    Err(Refusal::NoResources | Refusal::HostQuota | Refusal::CannotProvideExternal) => {
                        (R::OutOfResources, 0, 0)
                    }
                };
                Ok(Some(natpmp::map_response(
                    opcode,
                    code,
                    epoch,
                    internal_port,
                    external_port,
                    granted,
                )))
            }
        }
    }

    fn pcp(
        &mut self,
        dp: &mut dyn Dataplane,
        datagram: &[u8],
        source: SocketAddrV4,
        now_ns: u64,
        epoch: u32,
    ) -> Result<Option<Vec<u8>>> {
        use pcp::ResultCode as R;
        let request = match pcp::parse(datagram) {
            pcp::Parsed::Ignore => return Ok(None),
            pcp::Parsed::Error(code) => return Ok(Some(pcp::error_response(datagram, code, epoch))),
            pcp::Parsed::Request(r) => r,
        };
        let refuse = |code: R| Ok(Some(pcp::error_response(datagram, code, epoch)));
        // RFC 6887 §8.3: the client address field must be the packet's source (no NAT between
        // client and server; §18.1: a host maps only its own address).
        if pcp::ipv4_of(&request.client_addr) != Some(*source.ip()) {
            return refuse(R::AddressMismatch);
        }
        // The host the request is for: the sender, or with THIRD_PARTY (if the operator allows
        // it) the address the option names.
        let host = match request.options.third_party {
            None => *source.ip(),
            // RFC 6887 §13.1: a server that does not permit THIRD_PARTY for this client
            // answers NOT_AUTHORIZED.
            Some(_) if !self.allow_third_party => return refuse(R::NotAuthorized),
            Some(field) => match pcp::ipv4_of(&field) {
                Some(addr) if !addr.is_unspecified() => addr,
                _ => return refuse(R::MalformedOption),
            },
        };
        let data = match &request.body {
            pcp::Body::Announce => return Ok(Some(pcp::announce_response(epoch))),
            pcp::Body::Map(data) => data,
            pcp::Body::Peer(..) => return Ok(Some(self.peer(dp, &request, host, datagram, epoch))),
        };
        if data.protocol != proto::UDP && data.protocol != proto::TCP {
            // §11.1: protocol 0 means all protocols; only UDP and TCP are mapped here.
            return refuse(R::UnsuppProtocol);
        }
        if data.internal_port == 0 {
            // §11.1: internal port 0 ("all ports") is not mapped here.
            return refuse(if request.lifetime == 0 {
                R::MalformedRequest
            } else {
                R::UnsuppProtocol
            });
        }
        if request.options.prefer_failure && data.suggested_port == 0 {
            // §13.2: PREFER_FAILURE asks for exactly the suggested port; without one it means
            // nothing (miniupnpd answers the same).
            return refuse(R::MalformedOption);
        }
        let ours = dp.external_addr();
        if !pcp::is_unspecified(&data.suggested_addr)
            && pcp::ipv4_of(&data.suggested_addr) != ours
            && request.options.prefer_failure
        {
            // §11.3: a suggested external address the NAT does not have cannot be given.
            return refuse(R::CannotProvideExternal);
        }
        if request.options.filters.iter().any(|f| !f.admits_all()) {
            // §13.3: narrowing FILTERs are not supported here (every mapping admits all
            // remotes); a FILTER that admits all is honoured trivially.
            return refuse(R::UnsuppOption);
        }
        let req = MapRequest {
            proto: data.protocol,
            internal: SocketAddrV4::new(host, data.internal_port),
            suggested_port: data.suggested_port,
            lifetime: request.lifetime,
            nonce: Some(data.nonce),
            prefer_failure: request.options.prefer_failure,
            via: Via::Pcp,
        };
        let assigned = match self.mappings.request(dp, &req, now_ns)? {
            Ok(Granted::Mapped { external, lifetime }) => pcp::Assigned {
                lifetime,
                external_port: external.port(),
                external_addr: *external.ip(),
            },
            // §15: a deletion answers SUCCESS with lifetime 0 (and no mapping was also fine).
            Ok(Granted::Deleted) => pcp::Assigned {
                lifetime: 0,
                external_port: 0,
                external_addr: ours.unwrap_or(Ipv4Addr::UNSPECIFIED),
            },
            Err(Refusal::NotAuthorized) => return refuse(R::NotAuthorized),
            Err(Refusal::NoResources) => return refuse(R::NoResources),
            Err(Refusal::HostQuota) => return refuse(R::UserExQuota),
            Err(Refusal::CannotProvideExternal) => return refuse(R::CannotProvideExternal),
            Err(Refusal::NoExternalAddress) => return refuse(R::NetworkFailure),
        };
        Ok(Some(pcp::success_response(&request, assigned, epoch)))
    }

    /// PEER (RFC 6887 §12): the binding of an outgoing flow. The data path creates bindings on
    /// a flow's first packet, so a PEER for a flow that has not sent yet gets NO_RESOURCES (a
    /// short-lifetime error: the client retries); an existing flow's binding is reported with
    /// at most `PEER_REPORTED_LIFETIME` (traffic keeps it alive; PEER does not extend it).
    fn peer(
        &mut self,
        dp: &mut dyn Dataplane,
        request: &pcp::Request,
        host: Ipv4Addr,
        datagram: &[u8],
        epoch: u32,
    ) -> Vec<u8> {
        use pcp::ResultCode as R;
        let pcp::Body::Peer(data, peer) = &request.body else {
            return pcp::error_response(datagram, R::MalformedRequest, epoch);
        };
        if data.protocol != proto::UDP && data.protocol != proto::TCP {
            return pcp::error_response(datagram, R::UnsuppProtocol, epoch);
        }
        let Some(remote) = pcp::ipv4_of(&peer.remote_addr) else {
            return pcp::error_response(datagram, R::MalformedRequest, epoch);
        };
        let Some(addr) = dp.external_addr() else {
            return pcp::error_response(datagram, R::NetworkFailure, epoch);
        };
        let internal = SocketAddrV4::new(host, data.internal_port);
        let Some(external_port) = dp.flow_port(
            data.protocol,
            internal,
            SocketAddrV4::new(remote, peer.remote_port),
        ) else {
            return pcp::error_response(datagram, R::NoResources, epoch);
        };
        let assigned = pcp::Assigned {
            lifetime: request.lifetime.min(PEER_REPORTED_LIFETIME),
            external_port,
            external_addr: addr,
        };
        pcp::success_response(request, assigned, epoch)
    }
}

/// Lifetime reported for a PEER binding: the shortest idle timeout of the RFC defaults (ICMP
/// aside: UDP's 300 s would be longer than TCP transitory's 240 s), so a client refreshing at
/// this pace never loses the binding.
pub const PEER_REPORTED_LIFETIME: u32 = 240;

fn nat_pmp_request(proto: u8, internal: SocketAddrV4, suggested_port: u16, lifetime: u32) -> MapRequest {
    MapRequest {
        proto,
        internal,
        suggested_port,
        lifetime,
        nonce: None,
        prefer_failure: false,
        via: Via::NatPmp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port_mapping::mappings::{Holder, Mapping};

    const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    /// Every port free, nothing bound.
    struct Empty;

    impl Dataplane for Empty {
        fn external_addr(&mut self) -> Option<Ipv4Addr> {
            Some(EXT)
        }
        fn port_range(&mut self) -> (u16, u16) {
            (1024, 65_535)
        }
        fn holder(&mut self, _: u8, _: SocketAddrV4) -> Holder {
            Holder::Free
        }
        fn install(&mut self, _: u8, _: u16, _: SocketAddrV4, _: Via) -> Result<bool> {
            Ok(true)
        }
        fn adopt(&mut self, _: u8, _: SocketAddrV4, _: Via) -> Result<()> {
            Ok(())
        }
        fn remove(&mut self, _: &Mapping) -> Result<()> {
            Ok(())
        }
        fn flow_port(&mut self, _: u8, _: SocketAddrV4, _: SocketAddrV4) -> Option<u16> {
            None
        }
    }

    fn server(pcp: bool, nat_pmp: bool) -> Server {
        Server {
            protocols: Protocols {
                pcp,
                nat_pmp,
                upnp: false,
                third_party: false,
            },
            epoch_start_ns: 0,
            mappings: Mappings::default(),
            allow_third_party: false,
        }
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn natpmp_answers_with_the_epoch_and_maps() {
        let mut s = server(true, true);
        let src = SocketAddrV4::new(HOST, 5350);
        let out = s.handle(&mut Empty, &[0, 0], src, 7 * SECOND).unwrap().unwrap();
        assert_eq!(out, [0, 128, 0, 0, 0, 0, 0, 7, 198, 51, 100, 1]);
        let map = [0, 2, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0, 60];
        let out = s.handle(&mut Empty, &map, src, 7 * SECOND).unwrap().unwrap();
        assert_eq!(
            out,
            [0, 130, 0, 0, 0, 0, 0, 7, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0, 60]
        );
        assert_eq!(s.mappings.list()[0].internal, SocketAddrV4::new(HOST, 8080));
    }

    #[test]
    fn each_protocol_off_says_unsupported_version() {
        let src = SocketAddrV4::new(HOST, 5350);
        let out = server(true, false)
            .handle(&mut Empty, &[0, 0], src, 0)
            .unwrap()
            .unwrap();
        assert_eq!(&out[..4], &[0, 0, 0, 1]);
        let request = pcp::announce_request(HOST);
        let out = server(false, true)
            .handle(&mut Empty, &request, src, 0)
            .unwrap()
            .unwrap();
        assert_eq!(&out[..4], &[0, 0, 0, 1]);
    }

    #[test]
    fn pcp_security_checks() {
        let mut s = server(true, false);
        let src = SocketAddrV4::new(HOST, 5350);
        let data = pcp::MapData {
            nonce: [1; 12],
            protocol: proto::UDP,
            internal_port: 4000,
            suggested_port: 0,
            suggested_addr: [0; 16],
        };
        // Another host's address in the client field.
        let other = pcp::map_request(Ipv4Addr::new(10, 0, 0, 3), 60, &data, &pcp::Options::default());
        let out = s.handle(&mut Empty, &other, src, 0).unwrap().unwrap();
        assert_eq!(out[3], pcp::ResultCode::AddressMismatch as u8);
        // THIRD_PARTY refused unless allowed.
        let third = pcp::Options {
            third_party: Some(pcp::mapped(Ipv4Addr::new(10, 0, 0, 3))),
            ..Default::default()
        };
        let out = s
            .handle(&mut Empty, &pcp::map_request(HOST, 60, &data, &third), src, 0)
            .unwrap()
            .unwrap();
        assert_eq!(out[3], pcp::ResultCode::NotAuthorized as u8);
        assert!(s.mappings.list().is_empty());
        // Allowed by the operator (`pcp,third-party`): the mapping is for the named host.
        let mut allowing = server(true, false);
        allowing.allow_third_party = true;
        let out = allowing
            .handle(&mut Empty, &pcp::map_request(HOST, 60, &data, &third), src, 0)
            .unwrap()
            .unwrap();
        assert_eq!(out[3], pcp::ResultCode::Success as u8);
        assert_eq!(
            *allowing.mappings.list()[0].internal.ip(),
            Ipv4Addr::new(10, 0, 0, 3)
        );
        // A PEER for a flow that has not sent yet.
        let peer = pcp::Peer {
            remote_port: 1,
            remote_addr: pcp::mapped(EXT),
        };
        let out = s
            .handle(&mut Empty, &pcp::peer_request(HOST, 60, &data, &peer), src, 0)
            .unwrap()
            .unwrap();
        assert_eq!(out[3], pcp::ResultCode::NoResources as u8);
        // A good MAP.
        let out = s
            .handle(
                &mut Empty,
                &pcp::map_request(HOST, 60, &data, &pcp::Options::default()),
                src,
                0,
            )
            .unwrap()
            .unwrap();
        let response = pcp::parse_response(&out).unwrap();
        assert_eq!(
            (response.result, response.lifetime, response.nonce),
            (0, 60, Some([1; 12]))
        );
    }
}
