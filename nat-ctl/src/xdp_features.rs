//! Can a device take frames redirected to it by XDP? Asked of the kernel through the `netdev`
//! generic netlink family (Linux 6.3+), whose `xdp-features` bit `NDO_XMIT` says so. The fast
//! path must know: a device without it drops redirected frames silently. A veth, for one, has
//! it only while its peer runs an XDP program or has GRO on.

use std::{
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

use crate::netlink::{self, Message, NLMSG_ERROR, NLMSG_HDRLEN};

/// `enum netdev_xdp_act`: the device accepts frames redirected to it (`ndo_xdp_xmit`).
pub const NETDEV_XDP_ACT_NDO_XMIT: u64 = 1 << 2;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
/// `sizeof(struct genlmsghdr)`: command u8, version u8, reserved u16.
const GENL_HDRLEN: usize = 4;
/// Largest reply we read; a device reply is a few dozen bytes.
const REPLY_BYTES: usize = 8192;

/// A generic netlink request: header, genl header, then attributes.
fn request(family: u16, cmd: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut msg = vec![0u8; NLMSG_HDRLEN + GENL_HDRLEN];
    for (kind, data) in attrs {
        netlink::push_attribute(&mut msg, *kind, data);
    }
    netlink::finish_header(&mut msg, family, NLM_F_REQUEST, 0);
    msg[NLMSG_HDRLEN] = cmd;
    msg[NLMSG_HDRLEN + 1] = 1; // genl version
    msg
}

/// The attributes of a generic netlink reply, or the kernel's error number.
fn reply_attrs(reply: &[u8]) -> std::result::Result<Vec<(u16, &[u8])>, i32> {
    match netlink::messages(reply).next() {
        Some(Ok(Message {
            kind: NLMSG_ERROR,
            body,
        })) => Err(netlink::error_code(body)),
        Some(Ok(Message { body, .. })) => Ok(netlink::attributes(body, GENL_HDRLEN).unwrap_or_default()),
        _ => Err(libc::EINVAL),
    }
}

/// A generic netlink socket bound to the `netdev` family.
pub struct NetdevFamily {
    socket: OwnedFd,
    family: u16,
}

impl NetdevFamily {
    fn exchange(socket: &OwnedFd, msg: &[u8]) -> Result<Vec<u8>> {
        // SAFETY: valid socket and buffer.
        if unsafe { libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            bail!("netlink send failed: {}", std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; REPLY_BYTES];
        // SAFETY: valid socket and buffer of the stated size.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            bail!("netlink receive failed: {}", std::io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Opens the family; `None` when the kernel has none (before Linux 6.3).
    pub fn open() -> Result<Option<Self>> {
        // SAFETY: plain socket call; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            bail!(
                "cannot open a generic netlink socket: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let msg = request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            &[(CTRL_ATTR_FAMILY_NAME, b"netdev\0")],
        );
        let reply = Self::exchange(&socket, &msg)?;
        let Ok(attrs) = reply_attrs(&reply) else {
            return Ok(None);
        };
        let family = attrs
            .iter()
            .find(|(kind, data)| *kind == CTRL_ATTR_FAMILY_ID && data.len() >= 2)
            .map(|(_, data)| u16::from_ne_bytes([data[0], data[1]]));
        Ok(family.map(|family| NetdevFamily { socket, family }))
    }

    /// The `xdp-features` bits of interface `ifindex`.
    pub fn xdp_features(&self, ifindex: u32) -> Result<u64> {
        let msg = request(
            self.family,
            NETDEV_CMD_DEV_GET,
            &[(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes())],
        );
        let reply = Self::exchange(&self.socket, &msg)?;
        let attrs =
            reply_attrs(&reply).map_err(|e| anyhow::anyhow!("netdev dev-get {ifindex}: errno {e}"))?;
        attrs
            .iter()
            .find(|(kind, data)| *kind == NETDEV_A_DEV_XDP_FEATURES && data.len() >= size_of::<u64>())
            .map(|(_, data)| u64::from_ne_bytes(data[..8].try_into().unwrap()))
            .ok_or_else(|| anyhow::anyhow!("netdev dev-get {ifindex}: no xdp-features in the reply"))
    }

    /// True if interface `ifindex` accepts XDP-redirected frames now.
    pub fn accepts_redirects(&self, ifindex: u32) -> bool {
        self.xdp_features(ifindex)
            .map(|f| f & NETDEV_XDP_ACT_NDO_XMIT != 0)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let msg = request(
            0x1d,
            NETDEV_CMD_DEV_GET,
            &[(NETDEV_A_DEV_IFINDEX, &7u32.to_ne_bytes())],
        );
        assert_eq!(msg.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x1d);
        assert_eq!(msg[16], NETDEV_CMD_DEV_GET);
        assert_eq!(u16::from_ne_bytes([msg[20], msg[21]]), 8, "attribute length");
        assert_eq!(u32::from_ne_bytes(msg[24..28].try_into().unwrap()), 7);
    }

    #[test]
    fn reply_parsing() {
        let mut reply = request(
            0x1d,
            NETDEV_CMD_DEV_GET,
            &[(NETDEV_A_DEV_IFINDEX, &7u32.to_ne_bytes())],
        );
        // Append an xdp-features attribute and fix the length.
        reply.extend_from_slice(&12u16.to_ne_bytes());
        reply.extend_from_slice(&NETDEV_A_DEV_XDP_FEATURES.to_ne_bytes());
        reply.extend_from_slice(&(NETDEV_XDP_ACT_NDO_XMIT | 1).to_ne_bytes());
        let len = reply.len() as u32;
        reply[0..4].copy_from_slice(&len.to_ne_bytes());
        let attrs = reply_attrs(&reply).unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[1].0, NETDEV_A_DEV_XDP_FEATURES);
        let mut error = vec![0u8; 20];
        netlink::finish_header(&mut error, NLMSG_ERROR, 0, 0);
        error[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(reply_attrs(&error).unwrap_err(), libc::ENODEV);
    }

    #[test]
    fn loopback_is_asked_and_answered() {
        // Needs no privilege: reading device features is allowed to anyone.
        let Ok(Some(netdev)) = NetdevFamily::open() else {
            return;
        };
        let lo = crate::iface::index("lo").unwrap();
        assert!(netdev.xdp_features(lo).is_ok(), "the kernel answers for lo");
    }
}
