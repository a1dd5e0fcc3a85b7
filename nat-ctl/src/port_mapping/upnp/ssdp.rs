//! SSDP (UPnP Device Architecture 1.0 §1): which M-SEARCH requests are answered and with what,
//! and the NOTIFY ssdp:alive announcements. Pure; the sockets are in `upnp::spawn`.

use std::net::Ipv4Addr;

use super::{
    description::{Uuids, IGD_TYPE, ROOT_PATH, WAN_CONNECTION_DEVICE_TYPE, WAN_DEVICE_TYPE},
    soap::{CIF_SERVICE_TYPE, SERVICE_TYPE},
    HTTP_PORT,
};

/// The SSDP multicast group (UDA 1.0 §1.1.2).
pub const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// The SSDP port.
pub const PORT: u16 = 1900;
/// How long clients may cache an advertisement, seconds (UDA 1.0 §1.1.2: at least 1800).
pub const MAX_AGE: u32 = 1800;
/// Longest M-SEARCH read; longer datagrams are dropped (a real one is a few hundred bytes).
pub const MAX_DATAGRAM: usize = 2048;
/// The SERVER header (UDA 1.0 §1.1.2: OS/version UPnP/1.0 product/version).
const SERVER: &str = concat!("Linux UPnP/1.0 nat-ctl/", env!("CARGO_PKG_VERSION"));

/// Every (notification type, unique service name) the gateway advertises (UDA 1.0 §1.1.2:
/// three for the root device, two per embedded device, one per service).
pub fn targets(uuids: &Uuids) -> Vec<(String, String)> {
    let (r, w, c) = (&uuids.root, &uuids.wan, &uuids.connection);
    vec![
        ("upnp:rootdevice".into(), format!("uuid:{r}::upnp:rootdevice")),
        (format!("uuid:{r}"), format!("uuid:{r}")),
        (IGD_TYPE.into(), format!("uuid:{r}::{IGD_TYPE}")),
        (format!("uuid:{w}"), format!("uuid:{w}")),
        (WAN_DEVICE_TYPE.into(), format!("uuid:{w}::{WAN_DEVICE_TYPE}")),
        (format!("uuid:{c}"), format!("uuid:{c}")),
        (
            WAN_CONNECTION_DEVICE_TYPE.into(),
            format!("uuid:{c}::{WAN_CONNECTION_DEVICE_TYPE}"),
        ),
        (CIF_SERVICE_TYPE.into(), format!("uuid:{w}::{CIF_SERVICE_TYPE}")),
        (SERVICE_TYPE.into(), format!("uuid:{c}::{SERVICE_TYPE}")),
    ]
}

/// The (ST, USN) pairs to answer `datagram` with: none unless it is an M-SEARCH with MAN
/// "ssdp:discover" (UDA 1.0 §1.2.2) for ssdp:all or one of `targets`.
pub fn answers(datagram: &[u8], uuids: &Uuids) -> Vec<(String, String)> {
    let Ok(text) = std::str::from_utf8(datagram) else {
        return Vec::new();
    };
    let mut lines = text.split("\r\n");
    if !lines
        .next()
        .is_some_and(|l| l.trim().eq_ignore_ascii_case("M-SEARCH * HTTP/1.1"))
    {
        return Vec::new();
    }
    let mut man = false;
    let mut st = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("MAN") {
            man = value == "\"ssdp:discover\"";
        } else if name.trim().eq_ignore_ascii_case("ST") {
            st = Some(value);
        }
    }
    let (true, Some(st)) = (man, st) else {
        return Vec::new();
    };
    let all = targets(uuids);
    if st == "ssdp:all" {
        return all;
    }
    all.into_iter().filter(|(nt, _)| nt == st).collect()
}

/// The URL of the root description on `addr`.
pub fn location(addr: Ipv4Addr) -> String {
    format!("http://{addr}:{HTTP_PORT}{ROOT_PATH}")
}

/// The unicast answer to an M-SEARCH (UDA 1.0 §1.2.3).
pub fn response(st: &str, usn: &str, addr: Ipv4Addr) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age={MAX_AGE}\r\nEXT:\r\nLOCATION: {}\r\n\
         SERVER: {SERVER}\r\nST: {st}\r\nUSN: {usn}\r\n\r\n",
        location(addr)
    )
}

/// A NOTIFY ssdp:alive (UDA 1.0 §1.1.2).
pub fn alive(nt: &str, usn: &str, addr: Ipv4Addr) -> String {
    format!(
        "NOTIFY * HTTP/1.1\r\nHOST: {GROUP}:{PORT}\r\nCACHE-CONTROL: max-age={MAX_AGE}\r\n\
         LOCATION: {}\r\nNT: {nt}\r\nNTS: ssdp:alive\r\nSERVER: {SERVER}\r\nUSN: {usn}\r\n\r\n",
        location(addr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuids() -> Uuids {
        Uuids {
            root: "r".into(),
            wan: "w".into(),
            connection: "c".into(),
        }
    }

    fn search(st: &str) -> Vec<u8> {
        format!("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\nST: {st}\r\n\r\n")
            .into_bytes()
    }

    #[test]
    fn answers_the_targets_it_has() {
        assert_eq!(answers(&search("ssdp:all"), &uuids()).len(), 9);
        let igd = answers(&search(IGD_TYPE), &uuids());
        assert_eq!(igd, vec![(IGD_TYPE.to_string(), format!("uuid:r::{IGD_TYPE}"))]);
        assert_eq!(answers(&search("upnp:rootdevice"), &uuids()).len(), 1);
        assert_eq!(
            answers(&search(SERVICE_TYPE), &uuids())[0].1,
            format!("uuid:c::{SERVICE_TYPE}")
        );
        assert!(answers(
            &search("urn:schemas-upnp-org:device:InternetGatewayDevice:2"),
            &uuids()
        )
        .is_empty());
        // Not a discovery: no MAN, a NOTIFY, garbage.
        assert!(answers(b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n", &uuids()).is_empty());
        assert!(answers(b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n", &uuids()).is_empty());
        assert!(answers(b"\xff\x00", &uuids()).is_empty());
        let r = response(IGD_TYPE, "uuid:r", Ipv4Addr::new(10, 0, 0, 1));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.contains("LOCATION: http://10.0.0.1:"));
        assert!(r.ends_with("\r\n\r\n"));
    }
}
