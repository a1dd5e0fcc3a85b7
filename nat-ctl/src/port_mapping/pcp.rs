//! Port Control Protocol (RFC 6887) wire format, version 2: requests parsed and validated into
//! `Request`, responses encoded. Pure, no I/O. Addresses are 16-byte fields; IPv4 ones are
//! IPv4-mapped IPv6 addresses (RFC 6887 §5).

use std::net::{Ipv4Addr, Ipv6Addr};

/// The PCP version this server speaks (RFC 6887 §7.1).
pub const VERSION: u8 = 2;
/// UDP port of PCP (and NAT-PMP) servers (RFC 6887 §19.1).
pub const SERVER_PORT: u16 = 5351;
/// Port clients listen on for unsolicited ANNOUNCE responses (RFC 6887 §19.1).
pub const CLIENT_PORT: u16 = 5350;
/// Longest PCP message (RFC 6887 §7).
pub const MAX_MESSAGE_LEN: usize = 1100;
/// Common request and response header length (RFC 6887 §7.1, §7.2).
pub const HEADER_LEN: usize = 24;
/// MAP opcode data length (RFC 6887 §11.1).
pub const MAP_DATA_LEN: usize = 36;
/// PEER opcode data length (RFC 6887 §12.1).
pub const PEER_DATA_LEN: usize = 56;
/// Option header length (RFC 6887 §7.3).
pub const OPTION_HEADER_LEN: usize = 4;
/// Set in the second byte of responses (RFC 6887 §7.1).
pub const RESPONSE_BIT: u8 = 0x80;

/// ANNOUNCE opcode (RFC 6887 §14.1).
pub const OP_ANNOUNCE: u8 = 0;
/// MAP opcode (RFC 6887 §11).
pub const OP_MAP: u8 = 1;
/// PEER opcode (RFC 6887 §12).
pub const OP_PEER: u8 = 2;

/// THIRD_PARTY option (RFC 6887 §13.1): 16 bytes, the internal address to map for.
pub const OPT_THIRD_PARTY: u8 = 1;
/// PREFER_FAILURE option (RFC 6887 §13.2): no data, MAP only.
pub const OPT_PREFER_FAILURE: u8 = 2;
/// FILTER option (RFC 6887 §13.3): 20 bytes, MAP only.
pub const OPT_FILTER: u8 = 3;
/// Option codes below this must be understood or the request fails (RFC 6887 §7.3).
pub const OPTIONAL_OPTION_MIN: u8 = 128;
/// FILTER's data length (RFC 6887 §13.3).
pub const FILTER_DATA_LEN: usize = 20;

/// Lifetime of "long lifetime" errors: the client should not retry sooner (RFC 6887 §7.2,
/// §15: 30 minutes is the value the RFC suggests).
pub const LONG_ERROR_LIFETIME: u32 = 1800;
/// Lifetime of "short lifetime" errors (RFC 6887 §7.2, §15: 30 seconds).
pub const SHORT_ERROR_LIFETIME: u32 = 30;

/// Result codes (RFC 6887 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResultCode {
    /// 0.
    Success = 0,
    /// 1: version not supported (§9).
    UnsuppVersion = 1,
    /// 2: disabled for this client or refused by policy.
    NotAuthorized = 2,
    /// 3: the request could not be parsed.
    MalformedRequest = 3,
    /// 4: opcode not supported.
    UnsuppOpcode = 4,
    /// 5: a mandatory option is not supported.
    UnsuppOption = 5,
    /// 6: an option is malformed, repeated or not valid for the opcode.
    MalformedOption = 6,
    /// 7: the server has no external address.
    NetworkFailure = 7,
    /// 8: no resources right now.
    NoResources = 8,
    /// 9: protocol not supported.
    UnsuppProtocol = 9,
    /// 10: the client is over its quota.
    UserExQuota = 10,
    /// 11: the suggested external address or port cannot be given (with PREFER_FAILURE).
    CannotProvideExternal = 11,
    /// 12: the client address field is not the packet's source address.
    AddressMismatch = 12,
    /// 13: too many FILTERs or peers.
    ExcessiveRemotePeers = 13,
}

impl ResultCode {
    /// The lifetime an error response carries: how long the condition lasts (RFC 6887 §7.2).
    pub const fn error_lifetime(self) -> u32 {
        match self {
            ResultCode::NetworkFailure
            | ResultCode::NoResources
            | ResultCode::UserExQuota
            | ResultCode::CannotProvideExternal
            | ResultCode::ExcessiveRemotePeers => SHORT_ERROR_LIFETIME,
            _ => LONG_ERROR_LIFETIME,
        }
    }
}

/// A FILTER option (RFC 6887 §13.3): the remotes that may send to the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Prefix length over the 128-bit address (IPv4: 96 + the IPv4 prefix length).
    pub prefix_len: u8,
    /// Remote port, 0 for all.
    pub remote_port: u16,
    /// Remote address.
    pub remote_addr: [u8; 16],
}

impl Filter {
    /// Whether this filter admits every remote (prefix length 0 removes filtering, §13.3).
    pub fn admits_all(&self) -> bool {
        self.prefix_len == 0 && self.remote_port == 0
    }
}

/// The options of a request, validated (RFC 6887 §7.3, §13).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// THIRD_PARTY's internal address, if present.
    pub third_party: Option<[u8; 16]>,
    /// PREFER_FAILURE present.
    pub prefer_failure: bool,
    /// FILTER options, in order.
    pub filters: Vec<Filter>,
}

/// MAP and PEER share their first 36 bytes (RFC 6887 §11.1, §12.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapData {
    /// Chosen by the client, echoed back; a renewal must carry the same (§11.3).
    pub nonce: [u8; 12],
    /// IANA protocol number; 0 means all protocols.
    pub protocol: u8,
    /// Internal port; 0 means all ports.
    pub internal_port: u16,
    /// Suggested external port, 0 for none.
    pub suggested_port: u16,
    /// Suggested external address, all zeros (or ::ffff:0.0.0.0) for none.
    pub suggested_addr: [u8; 16],
}

/// PEER's remote peer (RFC 6887 §12.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Remote peer port.
    pub remote_port: u16,
    /// Remote peer address.
    pub remote_addr: [u8; 16],
}

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// ANNOUNCE (§14.1).
    Announce,
    /// MAP (§11).
    Map(MapData),
    /// PEER (§12).
    Peer(MapData, Peer),
}

/// A request that passed the checks of RFC 6887 §8.3 and §7.3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Opcode (`OP_*`).
    pub opcode: u8,
    /// Requested lifetime in seconds.
    pub lifetime: u32,
    /// The PCP client's address as it wrote it (§7.1).
    pub client_addr: [u8; 16],
    /// Opcode data.
    pub body: Body,
    /// Options.
    pub options: Options,
}

/// What a received datagram calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A request to serve.
    Request(Request),
    /// Answer with `error_response` and this code; nothing changes.
    Error(ResultCode),
    /// Drop silently (§8.3: shorter than 2 bytes, or a response).
    Ignore,
}

/// The IPv4 address in an IPv4-mapped field (RFC 6887 §5: all of the first 96 bits are
/// checked), else `None`.
pub fn ipv4_of(field: &[u8; 16]) -> Option<Ipv4Addr> {
    Ipv6Addr::from(*field).to_ipv4_mapped()
}

/// The IPv4-mapped field of `addr`.
pub fn mapped(addr: Ipv4Addr) -> [u8; 16] {
    addr.to_ipv6_mapped().octets()
}

/// Whether an address field means "no address": `::` or `::ffff:0.0.0.0` (RFC 6887 §5).
pub fn is_unspecified(field: &[u8; 16]) -> bool {
    field == &[0; 16] || ipv4_of(field) == Some(Ipv4Addr::UNSPECIFIED)
}

/// Parses and validates a datagram whose version byte is not 0 (0 is NAT-PMP, RFC 6887
/// Appendix A), in the order of RFC 6887 §8.3.
pub fn parse(datagram: &[u8]) -> Parsed {
    let [version, second, ..] = *datagram else {
        // §8.3: "less than 2 octets long, it is silently dropped".
        return Parsed::Ignore;
    };
    if second & RESPONSE_BIT != 0 {
        // §8.3: a request with the R bit set is silently dropped.
        return Parsed::Ignore;
    }
    if version != VERSION {
        // §9: the server answers UNSUPP_VERSION with the version it supports.
        return Parsed::Error(ResultCode::UnsuppVersion);
    }
    // §7: a message is at least the header, at most 1100 octets and a multiple of 4.
    if datagram.len() < HEADER_LEN || datagram.len() > MAX_MESSAGE_LEN || !datagram.len().is_multiple_of(4) {
        return Parsed::Error(ResultCode::MalformedRequest);
    }
    let opcode = second & !RESPONSE_BIT;
    let data_len = match opcode {
        OP_ANNOUNCE => 0,
        OP_MAP => MAP_DATA_LEN,
        OP_PEER => PEER_DATA_LEN,
        // §8.3: an unsupported opcode gets UNSUPP_OPCODE.
        _ => return Parsed::Error(ResultCode::UnsuppOpcode),
    };
    let Some(data) = datagram.get(HEADER_LEN..HEADER_LEN + data_len) else {
        return Parsed::Error(ResultCode::MalformedRequest);
    };
    let lifetime = u32::from_be_bytes(datagram[4..8].try_into().unwrap_or_default());
    let client_addr: [u8; 16] = datagram[8..24].try_into().unwrap_or_default();
    let body = match opcode {
        OP_ANNOUNCE => Body::Announce,
        OP_MAP => Body::Map(map_data(data)),
        _ => Body::Peer(
            map_data(data),
            Peer {
                remote_port: u16::from_be_bytes([data[36], data[37]]),
                remote_addr: data[40..56].try_into().unwrap_or_default(),
            },
        ),
    };
    let options = match parse_options(opcode, &datagram[HEADER_LEN + data_len..]) {
        Ok(options) => options,
        Err(code) => return Parsed::Error(code),
    };
    Parsed::Request(Request {
        opcode,
        lifetime,
        client_addr,
        body,
        options,
    })
}

fn map_data(data: &[u8]) -> MapData {
    MapData {
        nonce: data[0..12].try_into().unwrap_or_default(),
        protocol: data[12],
        internal_port: u16::from_be_bytes([data[16], data[17]]),
        suggested_port: u16::from_be_bytes([data[18], data[19]]),
        suggested_addr: data[20..36].try_into().unwrap_or_default(),
    }
}

/// Options (RFC 6887 §7.3): each a code, a reserved byte, a data length, and data padded to
/// 4 bytes; the §13 options with their opcode and count rules.
fn parse_options(opcode: u8, mut rest: &[u8]) -> Result<Options, ResultCode> {
    let mut options = Options::default();
    while !rest.is_empty() {
        if rest.len() < OPTION_HEADER_LEN {
            return Err(ResultCode::MalformedOption);
        }
        let code = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = len.div_ceil(4) * 4;
        let Some(data) = rest.get(OPTION_HEADER_LEN..OPTION_HEADER_LEN + len) else {
            // The option claims more than the message holds.
            return Err(ResultCode::MalformedOption);
        };
        let valid_for_map_or_peer = opcode == OP_MAP || opcode == OP_PEER;
        match code {
            // §13.1: MAP and PEER, at most once, 16 bytes.
            OPT_THIRD_PARTY => {
                if !valid_for_map_or_peer || options.third_party.is_some() || len != 16 {
                    return Err(ResultCode::MalformedOption);
                }
                options.third_party = Some(data.try_into().unwrap_or_default());
            }
            // §13.2: MAP only, at most once, no data.
            OPT_PREFER_FAILURE => {
                if opcode != OP_MAP || options.prefer_failure || len != 0 {
                    return Err(ResultCode::MalformedOption);
                }
                options.prefer_failure = true;
            }
            // §13.3: MAP only, repeatable, 20 bytes; a prefix longer than the address, or an
            // IPv4-mapped one shorter than the mapping prefix, is malformed.
            OPT_FILTER => {
                if opcode != OP_MAP || len != FILTER_DATA_LEN {
                    return Err(ResultCode::MalformedOption);
                }
                let filter = Filter {
                    prefix_len: data[1],
                    remote_port: u16::from_be_bytes([data[2], data[3]]),
                    remote_addr: data[4..20].try_into().unwrap_or_default(),
                };
                let ipv4 = ipv4_of(&filter.remote_addr).is_some();
                if filter.prefix_len > 128 || (ipv4 && filter.prefix_len != 0 && filter.prefix_len < 96) {
                    return Err(ResultCode::MalformedOption);
                }
                options.filters.push(filter);
            }
            // §7.3: a mandatory option not understood fails the request; an optional one is
            // skipped.
            code if code < OPTIONAL_OPTION_MIN => return Err(ResultCode::UnsuppOption),
            _ => {}
        }
        rest = rest.get(OPTION_HEADER_LEN + padded..).unwrap_or_default();
    }
    Ok(options)
}

/// The response header (RFC 6887 §7.2).
fn header(opcode: u8, result: ResultCode, lifetime: u32, epoch: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + PEER_DATA_LEN);
    out.push(VERSION);
    out.push(opcode | RESPONSE_BIT);
    out.push(0);
    out.push(result as u8);
    out.extend_from_slice(&lifetime.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&[0; 12]);
    out
}

/// An error response to `datagram` (RFC 6887 §7.2, §8.3): error responses have the layout
/// of success responses, with the fields of the request copied back (so the client matches
/// them by nonce) and the server's own fields zero: the header with the error's lifetime, then
/// the request's opcode data and options (up to 1100 octets, whole 4-byte words), zero-filled
/// to the opcode's length when the request was cut short. UNSUPP_VERSION too: its header says
/// the version the server speaks (§9), and the rest keeps the response in that version's
/// layout for the opcode.
pub fn error_response(datagram: &[u8], result: ResultCode, epoch: u32) -> Vec<u8> {
    let opcode = datagram.get(1).copied().unwrap_or(0) & !RESPONSE_BIT;
    let mut out = header(opcode, result, result.error_lifetime(), epoch);
    let end = datagram.len().min(MAX_MESSAGE_LEN) / 4 * 4;
    if end > HEADER_LEN {
        out.extend_from_slice(&datagram[HEADER_LEN..end]);
    }
    let data_len = match opcode {
        OP_MAP => MAP_DATA_LEN,
        OP_PEER => PEER_DATA_LEN,
        _ => 0,
    };
    if out.len() < HEADER_LEN + data_len {
        out.resize(HEADER_LEN + data_len, 0);
    }
    out
}

/// What a successful MAP or PEER gave (RFC 6887 §11.1, §12.1 response fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// Lifetime granted, seconds (0 after a deletion).
    pub lifetime: u32,
    /// External port.
    pub external_port: u16,
    /// External address.
    pub external_addr: Ipv4Addr,
}

/// A MAP or PEER response: `request`'s opcode data with the assigned external endpoint, and
/// the options the server processed (RFC 6887 §7.3: THIRD_PARTY, PREFER_FAILURE and FILTER are
/// returned in the success response).
pub fn success_response(request: &Request, assigned: Assigned, epoch: u32) -> Vec<u8> {
    let mut out = header(request.opcode, ResultCode::Success, assigned.lifetime, epoch);
    let (data, peer) = match &request.body {
        Body::Announce => return out,
        Body::Map(data) => (data, None),
        Body::Peer(data, peer) => (data, Some(peer)),
    };
    out.extend_from_slice(&data.nonce);
    out.push(data.protocol);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&data.internal_port.to_be_bytes());
    out.extend_from_slice(&assigned.external_port.to_be_bytes());
    out.extend_from_slice(&mapped(assigned.external_addr));
    if let Some(peer) = peer {
        out.extend_from_slice(&peer.remote_port.to_be_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&peer.remote_addr);
    }
    encode_options(&request.options, &mut out);
    out
}

/// An ANNOUNCE response (RFC 6887 §14.1): the header, lifetime 0. Sent solicited to a client
/// and unsolicited to 224.0.0.1:5350 when the epoch restarts (§14.1.3).
pub fn announce_response(epoch: u32) -> Vec<u8> {
    header(OP_ANNOUNCE, ResultCode::Success, 0, epoch)
}

/// Appends `options` in the wire format (RFC 6887 §7.3).
pub fn encode_options(options: &Options, out: &mut Vec<u8>) {
    if let Some(addr) = &options.third_party {
        out.extend_from_slice(&[OPT_THIRD_PARTY, 0, 0, 16]);
        out.extend_from_slice(addr);
    }
    if options.prefer_failure {
        out.extend_from_slice(&[OPT_PREFER_FAILURE, 0, 0, 0]);
    }
    for filter in &options.filters {
        out.extend_from_slice(&[OPT_FILTER, 0, 0, FILTER_DATA_LEN as u8, 0, filter.prefix_len]);
        out.extend_from_slice(&filter.remote_port.to_be_bytes());
        out.extend_from_slice(&filter.remote_addr);
    }
}

/// A MAP request (for clients and tests): `suggested` external endpoint, `options`.
pub fn map_request(client: Ipv4Addr, lifetime: u32, data: &MapData, options: &Options) -> Vec<u8> {
    let mut out = request_header(OP_MAP, lifetime, client);
    encode_map_data(data, &mut out);
    encode_options(options, &mut out);
    out
}

/// A PEER request (for clients and tests).
pub fn peer_request(client: Ipv4Addr, lifetime: u32, data: &MapData, peer: &Peer) -> Vec<u8> {
    let mut out = request_header(OP_PEER, lifetime, client);
    encode_map_data(data, &mut out);
    out.extend_from_slice(&peer.remote_port.to_be_bytes());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&peer.remote_addr);
    out
}

/// An ANNOUNCE request (for clients and tests).
pub fn announce_request(client: Ipv4Addr) -> Vec<u8> {
    request_header(OP_ANNOUNCE, 0, client)
}

fn request_header(opcode: u8, lifetime: u32, client: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + PEER_DATA_LEN);
    out.extend_from_slice(&[VERSION, opcode, 0, 0]);
    out.extend_from_slice(&lifetime.to_be_bytes());
    out.extend_from_slice(&mapped(client));
    out
}

fn encode_map_data(data: &MapData, out: &mut Vec<u8>) {
    out.extend_from_slice(&data.nonce);
    out.push(data.protocol);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&data.internal_port.to_be_bytes());
    out.extend_from_slice(&data.suggested_port.to_be_bytes());
    out.extend_from_slice(&data.suggested_addr);
}

/// A parsed response (for clients and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Opcode without the R bit.
    pub opcode: u8,
    /// Result code byte.
    pub result: u8,
    /// Lifetime.
    pub lifetime: u32,
    /// Epoch time.
    pub epoch: u32,
    /// Nonce (MAP and PEER).
    pub nonce: Option<[u8; 12]>,
    /// Assigned external port (MAP and PEER).
    pub external_port: u16,
    /// Assigned external address (MAP and PEER, IPv4).
    pub external_addr: Option<Ipv4Addr>,
}

/// Parses a response (for clients and tests); `None` unless it is a PCP v2 response.
pub fn parse_response(datagram: &[u8]) -> Option<Response> {
    if datagram.len() < HEADER_LEN || datagram[0] != VERSION || datagram[1] & RESPONSE_BIT == 0 {
        return None;
    }
    let opcode = datagram[1] & !RESPONSE_BIT;
    let data = datagram.get(HEADER_LEN..HEADER_LEN + MAP_DATA_LEN);
    let map = data
        .filter(|_| opcode == OP_MAP || opcode == OP_PEER)
        .map(map_data);
    Some(Response {
        opcode,
        result: datagram[3],
        lifetime: u32::from_be_bytes(datagram[4..8].try_into().ok()?),
        epoch: u32::from_be_bytes(datagram[8..12].try_into().ok()?),
        nonce: map.map(|m| m.nonce),
        external_port: map.map_or(0, |m| m.suggested_port),
        external_addr: map.and_then(|m| ipv4_of(&m.suggested_addr)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn map(protocol: u8, internal_port: u16, suggested_port: u16) -> MapData {
        MapData {
            nonce: [7; 12],
            protocol,
            internal_port,
            suggested_port,
            suggested_addr: [0; 16],
        }
    }

    #[test]
    fn map_request_round_trip_and_response_layout() {
        let options = Options {
            third_party: None,
            prefer_failure: true,
            filters: vec![Filter {
                prefix_len: 128,
                remote_port: 53,
                remote_addr: mapped(Ipv4Addr::new(192, 0, 2, 1)),
            }],
        };
        let bytes = map_request(CLIENT, 3600, &map(17, 4000, 5000), &options);
        assert_eq!(bytes.len(), HEADER_LEN + MAP_DATA_LEN + 4 + 24);
        let Parsed::Request(request) = parse(&bytes) else {
            panic!("{:?}", parse(&bytes))
        };
        assert_eq!(request.opcode, OP_MAP);
        assert_eq!(request.lifetime, 3600);
        assert_eq!(ipv4_of(&request.client_addr), Some(CLIENT));
        assert_eq!(request.body, Body::Map(map(17, 4000, 5000)));
        assert_eq!(request.options, options);
        let assigned = Assigned {
            lifetime: 120,
            external_port: 5000,
            external_addr: Ipv4Addr::new(198, 51, 100, 1),
        };
        let out = success_response(&request, assigned, 42);
        assert_eq!(&out[..4], &[2, 0x81, 0, 0]);
        assert_eq!(&out[4..8], &120u32.to_be_bytes());
        assert_eq!(&out[8..12], &42u32.to_be_bytes());
        assert_eq!(out.len(), bytes.len());
        let parsed = parse_response(&out).unwrap();
        assert_eq!(parsed.nonce, Some([7; 12]));
        assert_eq!(parsed.external_port, 5000);
        assert_eq!(parsed.external_addr, Some(Ipv4Addr::new(198, 51, 100, 1)));
    }

    #[test]
    fn peer_and_announce() {
        let peer = Peer {
            remote_port: 3478,
            remote_addr: mapped(Ipv4Addr::new(203, 0, 113, 9)),
        };
        let bytes = peer_request(CLIENT, 60, &map(6, 4000, 0), &peer);
        assert_eq!(bytes.len(), HEADER_LEN + PEER_DATA_LEN);
        let Parsed::Request(request) = parse(&bytes) else {
            panic!()
        };
        assert_eq!(request.body, Body::Peer(map(6, 4000, 0), peer));
        let Parsed::Request(announce) = parse(&announce_request(CLIENT)) else {
            panic!()
        };
        assert_eq!(announce.body, Body::Announce);
        assert_eq!(
            announce_response(9),
            header(OP_ANNOUNCE, ResultCode::Success, 0, 9)
        );
    }

    #[test]
    fn section_8_3_order_of_refusals() {
        let good = map_request(CLIENT, 60, &map(17, 4000, 0), &Options::default());
        assert_eq!(parse(&[2]), Parsed::Ignore);
        let mut response = good.clone();
        response[1] |= RESPONSE_BIT;
        assert_eq!(parse(&response), Parsed::Ignore);
        let mut v3 = good.clone();
        v3[0] = 3;
        assert_eq!(parse(&v3), Parsed::Error(ResultCode::UnsuppVersion));
        assert_eq!(parse(&good[..20]), Parsed::Error(ResultCode::MalformedRequest));
        assert_eq!(
            parse(&good[..HEADER_LEN + 30]),
            Parsed::Error(ResultCode::MalformedRequest)
        );
        assert_eq!(
            parse(&good[..HEADER_LEN + 32]),
            Parsed::Error(ResultCode::MalformedRequest)
        );
        let mut long = good.clone();
        long.resize(1104, 0);
        assert_eq!(parse(&long), Parsed::Error(ResultCode::MalformedRequest));
        let mut opcode = good.clone();
        opcode[1] = 9;
        assert_eq!(parse(&opcode), Parsed::Error(ResultCode::UnsuppOpcode));
        // The error response copies the request back behind the header.
        let out = error_response(&opcode, ResultCode::UnsuppOpcode, 5);
        assert_eq!(out.len(), good.len());
        assert_eq!(&out[..4], &[2, 0x89, 0, 4]);
        assert_eq!(&out[4..8], &LONG_ERROR_LIFETIME.to_be_bytes());
        assert_eq!(&out[HEADER_LEN..], &good[HEADER_LEN..]);
        let out = error_response(&v3, ResultCode::UnsuppVersion, 5);
        assert_eq!((out[0], out[3], out.len()), (VERSION, 1, good.len()));
        // A truncated MAP is answered in MAP's layout: what arrived, zero-filled.
        let out = error_response(&good[..40], ResultCode::MalformedRequest, 5);
        assert_eq!(out.len(), HEADER_LEN + MAP_DATA_LEN);
        assert_eq!(&out[HEADER_LEN..40], &good[HEADER_LEN..40]);
        assert!(out[40..].iter().all(|&b| b == 0));
    }

    #[test]
    fn option_rules_of_section_7_3_and_13() {
        let base = map_request(CLIENT, 60, &map(17, 4000, 0), &Options::default());
        let with = |option: &[u8]| {
            let mut bytes = base.clone();
            bytes.extend_from_slice(option);
            parse(&bytes)
        };
        // Unknown mandatory option: UNSUPP_OPTION; unknown optional one: skipped.
        assert_eq!(with(&[99, 0, 0, 0]), Parsed::Error(ResultCode::UnsuppOption));
        assert!(matches!(with(&[200, 0, 0, 4, 1, 2, 3, 4]), Parsed::Request(_)));
        // Longer than the message, wrong lengths, repeats.
        assert_eq!(with(&[2, 0, 0, 8]), Parsed::Error(ResultCode::MalformedOption));
        assert_eq!(
            with(&[2, 0, 0, 4, 0, 0, 0, 0]),
            Parsed::Error(ResultCode::MalformedOption)
        );
        assert_eq!(
            with(&[2, 0, 0, 0, 2, 0, 0, 0]),
            Parsed::Error(ResultCode::MalformedOption)
        );
        let mut filter = vec![3, 0, 0, 20, 0, 64, 0, 0];
        filter.extend_from_slice(&mapped(Ipv4Addr::new(192, 0, 2, 0)));
        assert_eq!(with(&filter), Parsed::Error(ResultCode::MalformedOption));
        filter[5] = 120;
        assert!(matches!(with(&filter), Parsed::Request(_)));
        // PREFER_FAILURE and FILTER belong to MAP only.
        let peer = Peer {
            remote_port: 1,
            remote_addr: mapped(Ipv4Addr::new(203, 0, 113, 9)),
        };
        let mut bytes = peer_request(CLIENT, 60, &map(17, 4000, 0), &peer);
        bytes.extend_from_slice(&[2, 0, 0, 0]);
        assert_eq!(parse(&bytes), Parsed::Error(ResultCode::MalformedOption));
        // THIRD_PARTY parses (whether it is allowed is the server's policy).
        let mut third = vec![1, 0, 0, 16];
        third.extend_from_slice(&mapped(Ipv4Addr::new(10, 0, 0, 9)));
        let Parsed::Request(request) = with(&third) else {
            panic!()
        };
        assert_eq!(
            request.options.third_party.map(|a| ipv4_of(&a)),
            Some(Some(Ipv4Addr::new(10, 0, 0, 9)))
        );
    }

    #[test]
    fn addresses() {
        assert!(is_unspecified(&[0; 16]));
        assert!(is_unspecified(&mapped(Ipv4Addr::UNSPECIFIED)));
        assert!(!is_unspecified(&mapped(CLIENT)));
        // Not IPv4-mapped unless all of the first 96 bits match (§5).
        let mut field = mapped(CLIENT);
        field[0] = 1;
        assert_eq!(ipv4_of(&field), None);
    }
}
