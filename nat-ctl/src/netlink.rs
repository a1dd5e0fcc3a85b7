//! The netlink wire format, once: message and attribute framing shared by the rtnetlink dumps
//! (`iface`), the address watcher (`addr_watch`) and the generic netlink query of a device's
//! XDP features (`xdp_features`). Everything here is a pure function of bytes, unit-tested.
//!
//! Netlink headers are in host byte order (include/uapi/linux/netlink.h).

/// `sizeof(struct nlmsghdr)`: length u32, type u16, flags u16, sequence u32, port id u32.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nlattr)` / `sizeof(struct rtattr)`: length u16, type u16.
pub const ATTR_HDRLEN: usize = 4;
/// Netlink messages and attributes are padded to 4 bytes (`NLMSG_ALIGNTO`, `NLA_ALIGNTO`).
const ALIGN_TO: usize = 4;
/// The top two bits of an attribute type flag nested / network-byte-order payloads
/// (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`); the type is below them (`NLA_TYPE_MASK`).
const ATTR_TYPE_MASK: u16 = 0x3fff;
/// `NLMSG_ERROR`: an error (or acknowledgement) message; its body starts with `-errno`.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `sizeof(struct ifaddrmsg)`: family u8, prefix length u8, flags u8, scope u8, index u32
/// (include/uapi/linux/if_addr.h).
pub const IFADDRMSG_LEN: usize = 8;
/// `sizeof(struct ifinfomsg)`: family u8, pad u8, type u16, index i32, flags u32, change u32
/// (include/uapi/linux/rtnetlink.h).
pub const IFINFOMSG_LEN: usize = 16;
/// Receive buffer for one datagram: the kernel builds notifications and dump parts of at most
/// a page or so (`NLMSG_GOODSIZE`), so this never truncates.
pub const RECV_BUF_BYTES: usize = 64 * 1024;

/// A host-order u16 at `off`, if the buffer holds it.
pub fn u16_at(buf: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(off..off + 2)?.try_into().ok()?))
}

/// A host-order u32 at `off`, if the buffer holds it.
pub fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

/// `len` rounded up to the netlink alignment.
pub const fn align(len: usize) -> usize {
    (len + ALIGN_TO - 1) & !(ALIGN_TO - 1)
}

/// One netlink message: its type and its body (after the `nlmsghdr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// The bytes after the header, up to the message's length.
    pub body: &'a [u8],
}

/// A message whose length does not fit its datagram: nothing after it can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Garbled;

/// The messages of one datagram, in order. A malformed message is yielded as `Err(Garbled)`
/// and ends the iteration; trailing bytes too short for a header are ignored.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Garbled>> {
    let mut off = 0;
    let mut stopped = false;
    std::iter::from_fn(move || {
        if stopped || off + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let (len, kind) = (u32_at(buf, off)? as usize, u16_at(buf, off + 4)?);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            stopped = true;
            return Some(Err(Garbled));
        }
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        off += align(len);
        Some(Ok(Message { kind, body }))
    })
}

/// The attributes of a message body after its fixed header of `fixed` bytes (or of a nested
/// attribute's payload, with `fixed` 0), as (type, payload) pairs; `None` when one does not fit.
pub fn attributes(body: &[u8], fixed: usize) -> Option<Vec<(u16, &[u8])>> {
    let mut attrs = Vec::new();
    let mut off = fixed;
    while off + ATTR_HDRLEN <= body.len() {
        let len = u16_at(body, off)? as usize;
        let kind = u16_at(body, off + 2)? & ATTR_TYPE_MASK;
        if len < ATTR_HDRLEN || off + len > body.len() {
            return None;
        }
        attrs.push((kind, &body[off + ATTR_HDRLEN..off + len]));
        off += align(len);
    }
    Some(attrs)
}

/// Appends one attribute (header, payload, padding) to a message being built.
pub fn push_attribute(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let start = msg.len();
    msg.extend_from_slice(&((ATTR_HDRLEN + data.len()) as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    msg.resize(start + align(ATTR_HDRLEN + data.len()), 0);
}

/// Fills in the `nlmsghdr` at the start of `msg` (whose first `NLMSG_HDRLEN` bytes are
/// reserved for it): its length, type, flags and sequence number.
pub fn finish_header(msg: &mut [u8], kind: u16, flags: u16, sequence: u32) {
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&kind.to_ne_bytes());
    msg[6..8].copy_from_slice(&flags.to_ne_bytes());
    msg[8..12].copy_from_slice(&sequence.to_ne_bytes());
}

/// The errno an `NLMSG_ERROR` body carries (positive; 0 is an acknowledgement).
pub fn error_code(body: &[u8]) -> i32 {
    body.get(0..4)
        .map(|b| -i32::from_ne_bytes(b.try_into().expect("four bytes")))
        .unwrap_or(libc::EINVAL)
}

/// A NUL-terminated string attribute.
pub fn attr_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut msg = vec![0u8; NLMSG_HDRLEN];
        msg.extend_from_slice(body);
        finish_header(&mut msg, kind, 0, 7);
        msg.resize(align(msg.len()), 0);
        msg
    }

    #[test]
    fn messages_are_split_and_padding_skipped() {
        let mut buf = message(20, &[1, 2, 3]);
        buf.extend(message(NLMSG_DONE, &[]));
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(
            got,
            vec![
                Ok(Message {
                    kind: 20,
                    body: &[1, 2, 3]
                }),
                Ok(Message {
                    kind: NLMSG_DONE,
                    body: &[]
                })
            ]
        );
    }

    #[test]
    fn a_message_longer_than_its_datagram_is_garbled_and_ends_it() {
        let mut buf = message(20, &[0; 8]);
        buf[0] = 200;
        buf.extend(message(21, &[]));
        assert_eq!(messages(&buf).collect::<Vec<_>>(), vec![Err(Garbled)]);
        assert_eq!(messages(&buf[..10]).count(), 0, "too short for a header");
    }

    #[test]
    fn attributes_round_trip_and_overlong_ones_are_refused() {
        let mut body = vec![9u8; IFINFOMSG_LEN];
        push_attribute(&mut body, 3, b"eth0\0");
        push_attribute(&mut body, 0x8000 | 18, &[1, 2]);
        let attrs = attributes(&body, IFINFOMSG_LEN).unwrap();
        assert_eq!(attrs, vec![(3, &b"eth0\0"[..]), (18, &[1u8, 2][..])]);
        assert_eq!(attr_string(attrs[0].1), "eth0");
        body[IFINFOMSG_LEN] = 250;
        assert_eq!(attributes(&body, IFINFOMSG_LEN), None);
    }

    #[test]
    fn error_bodies_carry_a_positive_errno() {
        assert_eq!(error_code(&(-libc::ENODEV).to_ne_bytes()), libc::ENODEV);
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        assert_eq!(error_code(&[]), libc::EINVAL);
    }
}
