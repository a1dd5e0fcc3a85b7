//! NAT-PMP (RFC 6886) wire format: requests parsed into `Request`, responses encoded. Pure, no
//! I/O. All fields are in network byte order (RFC 6886 §3).

use std::net::Ipv4Addr;

/// The only NAT-PMP version (RFC 6886 §3).
pub const VERSION: u8 = 0;
/// Opcode of the public address request (RFC 6886 §3.2).
pub const OP_PUBLIC_ADDRESS: u8 = 0;
/// Opcode of a UDP mapping request (RFC 6886 §3.3).
pub const OP_MAP_UDP: u8 = 1;
/// Opcode of a TCP mapping request (RFC 6886 §3.3).
pub const OP_MAP_TCP: u8 = 2;
/// A response's opcode is the request's plus this (RFC 6886 §3.2, §3.3).
pub const RESPONSE_BIT: u8 = 128;
/// Length of a mapping request (RFC 6886 §3.3).
pub const MAP_REQUEST_LEN: usize = 12;
/// Length of a public address request (RFC 6886 §3.2).
pub const PUBLIC_ADDRESS_REQUEST_LEN: usize = 2;
/// Lifetime RFC 6886 §3.3 recommends clients request, for the tests and the docs.
pub const RECOMMENDED_LIFETIME: u32 = 7200;

/// Result codes (RFC 6886 §3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ResultCode {
    /// 0.
    Success = 0,
    /// 1: the request's version is not 0.
    UnsupportedVersion = 1,
    /// 2: not authorized or refused (the feature is off, or policy).
    NotAuthorized = 2,
    /// 3: the gateway has no external address.
    NetworkFailure = 3,
    /// 4: no more mappings at this time.
    OutOfResources = 4,
    /// 5: an opcode below 128 this server does not know.
    UnsupportedOpcode = 5,
}

/// A valid NAT-PMP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// "What is my external address?" (RFC 6886 §3.2).
    PublicAddress,
    /// Create, renew or (lifetime 0) delete a mapping (RFC 6886 §3.3, §3.4).
    Map {
        /// `OP_MAP_UDP` or `OP_MAP_TCP`.
        opcode: u8,
        /// The client's port; 0 with lifetime 0 deletes all its mappings of this protocol.
        internal_port: u16,
        /// The external port the client would like (0: no preference).
        suggested_port: u16,
        /// Requested lifetime in seconds; 0 deletes.
        lifetime: u32,
    },
}

/// What a received datagram calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A request to serve.
    Request(Request),
    /// Answer with this result code and nothing else to do (an error response is built by
    /// `error_response`).
    Error(ResultCode),
    /// Drop silently: a response (opcode 128 or more, RFC 6886 §3.5), or a datagram too short
    /// to carry an opcode or the fields its opcode needs.
    Ignore,
}

/// Parses a datagram whose first byte is 0 (the caller dispatches on the version byte: RFC 6887
/// Appendix A lets NAT-PMP and PCP share port 5351).
pub fn parse(datagram: &[u8]) -> Parsed {
    let [version, opcode, ..] = *datagram else {
        return Parsed::Ignore;
    };
    if version != VERSION {
        // RFC 6886 §3.5: any other version gets "Unsupported Version".
        return Parsed::Error(ResultCode::UnsupportedVersion);
    }
    if opcode >= RESPONSE_BIT {
        // RFC 6886 §3.5: "this is not a request; it's a response ... MUST silently ignore it".
        return Parsed::Ignore;
    }
    match opcode {
        OP_PUBLIC_ADDRESS => Parsed::Request(Request::PublicAddress),
        OP_MAP_UDP | OP_MAP_TCP => {
            if datagram.len() < MAP_REQUEST_LEN {
                // RFC 6886 gives no result code for a truncated request; nothing in it can be
                // echoed meaningfully, so it is dropped (the client retransmits, §3.1).
                return Parsed::Ignore;
            }
            // Bytes 2-3 are reserved (RFC 6886 §3.3: "MUST be set to zero on transmission");
            // receivers do not check them.
            Parsed::Request(Request::Map {
                opcode,
                internal_port: u16::from_be_bytes([datagram[4], datagram[5]]),
                suggested_port: u16::from_be_bytes([datagram[6], datagram[7]]),
                lifetime: u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]),
            })
        }
        _ => Parsed::Error(ResultCode::UnsupportedOpcode),
    }
}

/// The response to a public address request (RFC 6886 §3.2): 12 bytes.
pub fn public_address_response(result: ResultCode, epoch: u32, addr: Ipv4Addr) -> Vec<u8> {
    let mut out = header(OP_PUBLIC_ADDRESS + RESPONSE_BIT, result, epoch);
    out.extend_from_slice(&addr.octets());
    out
}

/// The response to a mapping request (RFC 6886 §3.3): 16 bytes. A deletion answers with
/// external port 0 and lifetime 0 (§3.4).
pub fn map_response(
    opcode: u8,
    result: ResultCode,
    epoch: u32,
    internal_port: u16,
    external_port: u16,
    lifetime: u32,
) -> Vec<u8> {
    let mut out = header(opcode + RESPONSE_BIT, result, epoch);
    out.extend_from_slice(&internal_port.to_be_bytes());
    out.extend_from_slice(&external_port.to_be_bytes());
    out.extend_from_slice(&lifetime.to_be_bytes());
    out
}

/// The response to a request refused by `parse` (RFC 6886 §3.5): "Unsupported Version" is the
/// 8-byte header with opcode 0; "Unsupported opcode" returns "the entire request" with the
/// response bit set and the result code filled in (nothing else of it is rewritten).
pub fn error_response(datagram: &[u8], result: ResultCode, epoch: u32) -> Vec<u8> {
    match result {
        ResultCode::UnsupportedOpcode if datagram.len() >= 2 => {
            let mut out = datagram.to_vec();
            out[0] = VERSION;
            out[1] |= RESPONSE_BIT;
            // The result code takes the reserved bytes 2-3 (RFC 6886 §3.5); a request shorter
            // than the header is answered with the header.
            out.resize(out.len().max(4), 0);
            out[2..4].copy_from_slice(&(result as u16).to_be_bytes());
            out
        }
        _ => header(OP_PUBLIC_ADDRESS, result, epoch),
    }
}

/// Version, opcode, result code, seconds since start of epoch (RFC 6886 §3.2).
fn header(opcode: u8, result: ResultCode, epoch: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.push(VERSION);
    out.push(opcode);
    out.extend_from_slice(&(result as u16).to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_address_request_and_response() {
        assert_eq!(parse(&[0, 0]), Parsed::Request(Request::PublicAddress));
        let out = public_address_response(ResultCode::Success, 77, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(out, [0, 128, 0, 0, 0, 0, 0, 77, 198, 51, 100, 1]);
    }

    #[test]
    fn mapping_request_and_response() {
        let request = [0, 1, 0, 0, 0x1f, 0x90, 0x23, 0x28, 0, 0, 0x1c, 0x20];
        assert_eq!(
            parse(&request),
            Parsed::Request(Request::Map {
                opcode: OP_MAP_UDP,
                internal_port: 8080,
                suggested_port: 9000,
                lifetime: 7200
            })
        );
        let out = map_response(OP_MAP_TCP, ResultCode::Success, 5, 8080, 9000, 3600);
        assert_eq!(
            out,
            [0, 130, 0, 0, 0, 0, 0, 5, 0x1f, 0x90, 0x23, 0x28, 0, 0, 0x0e, 0x10]
        );
    }

    #[test]
    fn refusals_follow_section_3_5() {
        // Another version: "Unsupported Version", opcode 0, 8 bytes.
        assert_eq!(parse(&[1, 0]), Parsed::Error(ResultCode::UnsupportedVersion));
        assert_eq!(
            error_response(&[1, 0], ResultCode::UnsupportedVersion, 9),
            [0, 0, 0, 1, 0, 0, 0, 9]
        );
        // A response is ignored; so is a datagram too short for its opcode.
        assert_eq!(parse(&[0, 128, 0, 0]), Parsed::Ignore);
        assert_eq!(parse(&[0, 1, 0, 0, 0, 1]), Parsed::Ignore);
        assert_eq!(parse(&[0]), Parsed::Ignore);
        // An unknown opcode: the request back with the top bit and result code 5.
        let request = [0, 3, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(parse(&request), Parsed::Error(ResultCode::UnsupportedOpcode));
        assert_eq!(
            error_response(&request, ResultCode::UnsupportedOpcode, 2),
            [0, 131, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }
}
