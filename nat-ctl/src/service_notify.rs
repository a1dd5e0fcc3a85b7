//! Readiness and status for a service manager: systemd's `sd_notify` protocol (`Type=notify`).
//!
//! The protocol is one datagram of `KEY=value` lines sent to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`), see
//! sd_notify(3). It is small enough to speak directly, so no libsystemd binding is linked. When
//! the variable is unset (not started by systemd) every call does nothing.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

/// The environment variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The lines that tell systemd the service is up, with a human-readable status.
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", one_line(status))
}

/// The lines that tell systemd the service is reloading its configuration; `READY=1` (with
/// the outcome as status) ends the reload. systemd 252 (Debian 12) has no `Type=notify-reload`,
/// but understands these around its `ExecReload=` (sd_notify(3)).
pub fn reloading_message(status: &str) -> String {
    format!("RELOADING=1\nSTATUS={}\n", one_line(status))
}

/// The lines that tell systemd the service is stopping, with why.
pub fn stopping_message(status: &str) -> String {
    format!("STOPPING=1\nSTATUS={}\n", one_line(status))
}

/// A status value must be one line: the protocol separates assignments by newlines.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

/// Where `$NOTIFY_SOCKET` points: an abstract name (`@name`) or a filesystem path.
fn socket_addr(spec: &str) -> io::Result<SocketAddr> {
    match spec.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(spec),
    }
}

/// Sends `message` to the service manager, if there is one. A failure is reported, not fatal:
/// the NAT runs whether or not its manager hears about it.
pub fn send(message: &str) {
    let Some(spec) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return;
    };
    let spec = spec.to_string_lossy();
    let sent = socket_addr(&spec).and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(message.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify the service manager at {spec}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_newline_separated_assignments_with_a_one_line_status() {
        assert_eq!(ready_message("attached eth0"), "READY=1\nSTATUS=attached eth0\n");
        assert_eq!(stopping_message("a\nb"), "STOPPING=1\nSTATUS=a b\n");
        assert_eq!(reloading_message("r"), "RELOADING=1\nSTATUS=r\n");
    }

    #[test]
    fn a_notification_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("nat-ctl-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let addr = socket_addr(path.to_str().unwrap()).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(ready_message("up").as_bytes(), &addr)
            .unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_abstract_name_is_written_with_an_at_sign() {
        let addr = socket_addr("@nat-ctl-test").unwrap();
        assert_eq!(addr.as_abstract_name(), Some(&b"nat-ctl-test"[..]));
        assert!(addr.as_pathname().is_none());
    }
}
