//! The small HTTP/1.1 server UPnP control needs (UDA 1.0 §2, §3): GET of the descriptions and
//! POST of SOAP actions, one request per connection, answered with `Connection: close`.
//! Everything is bounded: the head and body sizes, the time a connection may take, and (in
//! `upnp::spawn`) the number of connections at once.

use std::{net::Ipv4Addr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use super::{
    actions::{Output, UpnpError},
    description::{self, Uuids},
    soap::{self, Action, BadBody, CIF_SERVICE_TYPE, SERVICE_TYPE},
};

/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body, bytes (an AddPortMapping is under 1 KiB).
pub const MAX_BODY: usize = 16 * 1024;
/// Longest a connection may take from accept to the end of the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
const SERVER: &str = concat!("Linux UPnP/1.0 nat-ctl/", env!("CARGO_PKG_VERSION"));

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target's path.
    pub path: String,
    /// Content-Length (0 when absent).
    pub content_length: usize,
    /// The SOAPACTION header, unquoted.
    pub soap_action: Option<String>,
}

/// An HTTP status line's code and reason.
pub type Status = (u16, &'static str);

const BAD_REQUEST: Status = (400, "Bad Request");
const NOT_FOUND: Status = (404, "Not Found");
const METHOD_NOT_ALLOWED: Status = (405, "Method Not Allowed");
const LENGTH_REQUIRED: Status = (411, "Length Required");
const TOO_LARGE: Status = (413, "Payload Too Large");
const UNAVAILABLE: Status = (503, "Service Unavailable");

/// Parses a request head (without the blank line ending it).
pub fn parse_head(head: &[u8]) -> Result<Head, Status> {
    let text = std::str::from_utf8(head).map_err(|_| BAD_REQUEST)?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next().ok_or(BAD_REQUEST)?.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (first.next(), first.next(), first.next(), first.next())
    else {
        return Err(BAD_REQUEST);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(BAD_REQUEST);
    }
    // An absolute URI target (RFC 9112 §3.2.2) is reduced to its path.
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let mut out = Head {
        method: method.to_string(),
        path: path.split('?').next().unwrap_or(path).to_string(),
        content_length: 0,
        soap_action: None,
    };
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(BAD_REQUEST)?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("Content-Length") {
            out.content_length = value.parse().map_err(|_| BAD_REQUEST)?;
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            // Clients of UPnP control send Content-Length; chunked bodies are not read.
            return Err(LENGTH_REQUIRED);
        } else if name.eq_ignore_ascii_case("SOAPAction") {
            out.soap_action = Some(value.trim_matches('"').to_string());
        }
    }
    Ok(out)
}

/// A SOAP call to the server's state task, with where to send the answer.
pub type Call = (Action, Ipv4Addr, oneshot::Sender<Result<Output, UpnpError>>);

/// Serves one connection from `peer`, bounded by `CONNECTION_TIMEOUT`.
pub async fn serve(mut stream: TcpStream, peer: Ipv4Addr, uuids: &Uuids, calls: &mpsc::Sender<Call>) {
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, async {
        let (status, body) = match read_request(&mut stream).await {
            Ok((head, body)) => route(&head, &body, peer, uuids, calls).await,
            Err(status) => (status, String::new()),
        };
        let _ = stream.write_all(&answer(status, &body).into_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Reads the head and the body, within the limits.
async fn read_request(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), Status> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(TOO_LARGE);
        }
        let n = stream.read(&mut chunk).await.map_err(|_| BAD_REQUEST)?;
        if n == 0 {
            return Err(BAD_REQUEST);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = parse_head(&buf[..end])?;
    if head.content_length > MAX_BODY {
        return Err(TOO_LARGE);
    }
    let mut body = buf.split_off(end + 4);
    if body.len() > head.content_length {
        body.truncate(head.content_length);
    }
    while body.len() < head.content_length {
        let n = stream.read(&mut chunk).await.map_err(|_| BAD_REQUEST)?;
        if n == 0 {
            return Err(BAD_REQUEST);
        }
        let want = head.content_length - body.len();
        body.extend_from_slice(&chunk[..n.min(want)]);
    }
    Ok((head, body))
}

async fn route(
    head: &Head,
    body: &[u8],
    peer: Ipv4Addr,
    uuids: &Uuids,
    calls: &mpsc::Sender<Call>,
) -> (Status, String) {
    match (head.method.as_str(), head.path.as_str()) {
        ("GET", description::ROOT_PATH) => ((200, "OK"), description::root(uuids)),
        ("GET", description::SCPD_PATH) => ((200, "OK"), description::scpd()),
        ("GET", description::CIF_SCPD_PATH) => ((200, "OK"), description::cif_scpd()),
        ("POST", description::CONTROL_PATH) => control(head, body, peer, calls).await,
        ("POST", description::CIF_CONTROL_PATH) => common_interface(head, body),
        (
            _,
            description::ROOT_PATH
            | description::SCPD_PATH
            | description::CONTROL_PATH
            | description::CIF_SCPD_PATH
            | description::CIF_CONTROL_PATH,
        ) => (METHOD_NOT_ALLOWED, String::new()),
        // Eventing (GENA SUBSCRIBE on the event URLs) is not served.
        _ => (NOT_FOUND, String::new()),
    }
}

fn fault(e: UpnpError) -> (Status, String) {
    (
        (500, "Internal Server Error"),
        soap::fault(e.code(), e.description()),
    )
}

/// The action of a SOAP request to `service`: the SOAPACTION header names the service and
/// action (UDA 1.0 §3.2.1), the body carries the same action and its arguments.
fn soap_action(head: &Head, body: &[u8], service: &str) -> Result<Action, UpnpError> {
    let named = head
        .soap_action
        .as_deref()
        .and_then(|a| a.split_once('#'))
        .filter(|(s, _)| *s == service)
        .map(|(_, action)| action)
        .ok_or(UpnpError::InvalidAction)?;
    match soap::parse(body) {
        Ok(a) if a.name == named => Ok(a),
        Ok(_) | Err(BadBody::NoAction) => Err(UpnpError::InvalidAction),
        Err(BadBody::Malformed(_)) => Err(UpnpError::InvalidArgs),
    }
}

/// WANCommonInterfaceConfig:1: GetCommonLinkProperties only. The link's rates are not known
/// here, so they are reported as 0 (unknown).
fn common_interface(head: &Head, body: &[u8]) -> (Status, String) {
    match soap_action(head, body, CIF_SERVICE_TYPE) {
        Ok(a) if a.name == "GetCommonLinkProperties" => {
            let out = [
                ("NewWANAccessType", "Ethernet".to_string()),
                ("NewLayer1UpstreamMaxBitRate", "0".to_string()),
                ("NewLayer1DownstreamMaxBitRate", "0".to_string()),
                ("NewPhysicalLinkStatus", "Up".to_string()),
            ];
            ((200, "OK"), soap::response(CIF_SERVICE_TYPE, &a.name, &out))
        }
        Ok(_) => fault(UpnpError::InvalidAction),
        Err(e) => fault(e),
    }
}

/// A WANIPConnection:1 action, carried out by the server's state task.
async fn control(head: &Head, body: &[u8], peer: Ipv4Addr, calls: &mpsc::Sender<Call>) -> (Status, String) {
    let action = match soap_action(head, body, SERVICE_TYPE) {
        Ok(a) => a,
        Err(e) => return fault(e),
    };
    let (tx, rx) = oneshot::channel();
    let name = action.name.clone();
    if calls.send((action, peer, tx)).await.is_err() {
        return (UNAVAILABLE, String::new());
    }
    match rx.await {
        Ok(Ok(out)) => ((200, "OK"), soap::response(SERVICE_TYPE, &name, &out)),
        Ok(Err(e)) => fault(e),
        Err(_) => (UNAVAILABLE, String::new()),
    }
}

fn answer((code, reason): Status, body: &str) -> String {
    let kind = if body.is_empty() {
        ""
    } else {
        "Content-Type: text/xml; charset=\"utf-8\"\r\n"
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\n{kind}Content-Length: {}\r\nConnection: close\r\nEXT:\r\nServer: {SERVER}\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let head = parse_head(
            b"POST /ctl/IPConn HTTP/1.1\r\nHost: 10.0.0.1:2869\r\nContent-Length: 12\r\n\
              SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#GetStatusInfo\"",
        )
        .unwrap();
        assert_eq!(
            head,
            Head {
                method: "POST".into(),
                path: "/ctl/IPConn".into(),
                content_length: 12,
                soap_action: Some("urn:schemas-upnp-org:service:WANIPConnection:1#GetStatusInfo".into()),
            }
        );
        assert_eq!(
            parse_head(b"GET http://10.0.0.1:2869/rootDesc.xml HTTP/1.0")
                .unwrap()
                .path,
            "/rootDesc.xml"
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: -1"),
            Err(BAD_REQUEST)
        );
        assert_eq!(parse_head(b"GET /"), Err(BAD_REQUEST));
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked"),
            Err(LENGTH_REQUIRED)
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nno colon"), Err(BAD_REQUEST));
        let a = answer((200, "OK"), "<x/>");
        assert!(a.contains("Content-Length: 4\r\n") && a.ends_with("\r\n\r\n<x/>"));
    }
}
