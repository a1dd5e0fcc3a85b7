//! SOAP 1.1 as UPnP control uses it (UPnP Device Architecture 1.0 §3.2): the action and its
//! arguments read from a request body, and the response or UPnPError fault envelope. Pure.
//!
//! The body comes from any host on the LAN, so it is read with quick-xml's pull parser: it
//! expands no DTD entity (a DOCTYPE is refused outright: SOAP 1.1 §3 forbids one), so there is
//! no external-entity read and no entity blow-up; the depth and the number of arguments are
//! bounded here, the size by the HTTP layer.

use quick_xml::{escape::escape, events::Event, Reader};

/// The service type the control URL serves.
pub const SERVICE_TYPE: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
/// The WANDevice's link service (clients such as miniupnpc take a device for an IGD only when
/// it has one).
pub const CIF_SERVICE_TYPE: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";
/// Deepest element nesting accepted (Envelope > Body > action > argument is 4).
const MAX_DEPTH: usize = 8;
/// Most arguments an action may carry (AddPortMapping has 8).
const MAX_ARGS: usize = 16;

/// An action call read from a SOAP body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    /// The action's name (the local name of Body's first child).
    pub name: String,
    /// Its arguments, in order: (local name, text).
    pub args: Vec<(String, String)>,
}

impl Action {
    /// The text of argument `name`, if present.
    pub fn arg(&self, name: &str) -> Option<&str> {
        self.args.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why a body could not be read as an action call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadBody {
    /// Not well-formed XML, a DOCTYPE, or too deep or too many arguments.
    Malformed(String),
    /// Well-formed, but no Envelope > Body > action element.
    NoAction,
}

/// Reads the action call in a SOAP request body.
pub fn parse(body: &[u8]) -> Result<Action, BadBody> {
    let mut reader = Reader::from_reader(body);
    reader.config_mut().trim_text(true);
    // Local names of the open elements.
    let mut path: Vec<String> = Vec::new();
    let mut action: Option<Action> = None;
    let mut text = String::new();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| BadBody::Malformed(e.to_string()))?;
        match event {
            Event::Start(e) => {
                if path.len() >= MAX_DEPTH {
                    return Err(BadBody::Malformed("elements nested too deep".into()));
                }
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                open(&mut path, &mut action, name)?;
                text.clear();
            }
            Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                open(&mut path, &mut action, name)?;
                text.clear();
                close(&mut path, &mut action, &mut text);
            }
            Event::Text(e) => {
                let t = e.unescape().map_err(|e| BadBody::Malformed(e.to_string()))?;
                text.push_str(&t);
            }
            Event::CData(e) => {
                let t = std::str::from_utf8(&e).map_err(|e| BadBody::Malformed(e.to_string()))?;
                text.push_str(t);
            }
            Event::End(_) => close(&mut path, &mut action, &mut text),
            Event::DocType(_) => return Err(BadBody::Malformed("a DOCTYPE in a SOAP message".into())),
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    action.ok_or(BadBody::NoAction)
}

/// An element opens: Body's first child is the action, its children the arguments.
fn open(path: &mut Vec<String>, action: &mut Option<Action>, name: String) -> Result<(), BadBody> {
    let in_body = path.len() == 2 && path[0] == "Envelope" && path[1] == "Body";
    if in_body && action.is_none() {
        *action = Some(Action {
            name: name.clone(),
            args: Vec::new(),
        });
    } else if path.len() == 3 && in_action(path, action) {
        let a = action.as_mut().expect("in_action");
        if a.args.len() >= MAX_ARGS {
            return Err(BadBody::Malformed("too many arguments".into()));
        }
    }
    path.push(name);
    Ok(())
}

/// An element closes: an argument's text is kept.
fn close(path: &mut Vec<String>, action: &mut Option<Action>, text: &mut String) {
    if path.len() == 4 && in_action(&path[..3], action) {
        if let (Some(a), Some(name)) = (action.as_mut(), path.last()) {
            a.args.push((name.clone(), std::mem::take(text)));
        }
    }
    path.pop();
    text.clear();
}

fn in_action(path: &[String], action: &Option<Action>) -> bool {
    path.len() >= 3
        && path[0] == "Envelope"
        && path[1] == "Body"
        && action.as_ref().is_some_and(|a| a.name == path[2])
}

const ENVELOPE_OPEN: &str = "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>";
const ENVELOPE_CLOSE: &str = "</s:Body></s:Envelope>\r\n";

/// The response envelope of `service`'s `action` with output arguments `out` (UDA 1.0 §3.2.2).
pub fn response(service: &str, action: &str, out: &[(&str, String)]) -> String {
    let mut body = format!("{ENVELOPE_OPEN}<u:{action}Response xmlns:u=\"{service}\">");
    for (name, value) in out {
        body.push_str(&format!("<{name}>{}</{name}>", escape(value.as_str())));
    }
    body.push_str(&format!("</u:{action}Response>{ENVELOPE_CLOSE}"));
    body
}

/// The fault envelope carrying UPnPError `code` (UDA 1.0 §3.2.2; sent with HTTP 500).
pub fn fault(code: u16, description: &str) -> String {
    format!(
        "{ENVELOPE_OPEN}<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>\
         <detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{code}</errorCode>\
         <errorDescription>{}</errorDescription></UPnPError></detail></s:Fault>{ENVELOPE_CLOSE}",
        escape(description)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: &str = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewRemoteHost></NewRemoteHost><NewExternalPort>20000</NewExternalPort><NewProtocol>UDP</NewProtocol><NewInternalPort>4000</NewInternalPort><NewInternalClient>10.0.0.2</NewInternalClient><NewEnabled>1</NewEnabled><NewPortMappingDescription>a &amp; b</NewPortMappingDescription><NewLeaseDuration>0</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>"#;

    #[test]
    fn reads_an_action_and_its_arguments() {
        let a = parse(ADD.as_bytes()).unwrap();
        assert_eq!(a.name, "AddPortMapping");
        assert_eq!(a.args.len(), 8);
        assert_eq!(a.arg("NewRemoteHost"), Some(""));
        assert_eq!(a.arg("NewExternalPort"), Some("20000"));
        assert_eq!(a.arg("NewPortMappingDescription"), Some("a & b"));
        let empty =
            r#"<s:Envelope xmlns:s="x"><s:Body><u:GetExternalIPAddress xmlns:u="y"/></s:Body></s:Envelope>"#;
        let a = parse(empty.as_bytes()).unwrap();
        assert_eq!((a.name.as_str(), a.args.len()), ("GetExternalIPAddress", 0));
    }

    #[test]
    fn refuses_hostile_or_broken_bodies() {
        let entity = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><s:Envelope xmlns:s="x"><s:Body><u:A xmlns:u="y"><B>&a;</B></u:A></s:Body></s:Envelope>"#;
        assert!(matches!(parse(entity.as_bytes()), Err(BadBody::Malformed(_))));
        let undefined =
            r#"<s:Envelope xmlns:s="x"><s:Body><u:A xmlns:u="y"><B>&a;</B></u:A></s:Body></s:Envelope>"#;
        assert!(matches!(parse(undefined.as_bytes()), Err(BadBody::Malformed(_))));
        let deep = format!(
            "<s:Envelope><s:Body><A>{}{}</A></s:Body></s:Envelope>",
            "<x>".repeat(20),
            "</x>".repeat(20)
        );
        assert!(matches!(parse(deep.as_bytes()), Err(BadBody::Malformed(_))));
        let many = format!(
            "<s:Envelope><s:Body><A>{}</A></s:Body></s:Envelope>",
            "<x>1</x>".repeat(40)
        );
        assert!(matches!(parse(many.as_bytes()), Err(BadBody::Malformed(_))));
        assert!(matches!(
            parse(b"<s:Envelope><s:Body><A></B></s:Body></s:Envelope>"),
            Err(BadBody::Malformed(_))
        ));
        assert_eq!(parse(b"<a/>"), Err(BadBody::NoAction));
        assert!(parse(b"\xff\xfe<").is_err());
    }

    #[test]
    fn escapes_what_it_writes() {
        let r = response(
            SERVICE_TYPE,
            "GetSpecificPortMappingEntry",
            &[("NewPortMappingDescription", "<x>&".into())],
        );
        assert!(r.contains("<NewPortMappingDescription>&lt;x&gt;&amp;</NewPortMappingDescription>"));
        assert!(r.contains("<u:GetSpecificPortMappingEntryResponse xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\">"));
        let f = fault(718, "ConflictInMappingEntry");
        assert!(f.contains("<errorCode>718</errorCode>"));
    }
}
