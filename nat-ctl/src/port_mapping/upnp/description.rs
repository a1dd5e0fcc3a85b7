//! The device and service descriptions the HTTP server serves (UPnP Device Architecture 1.0
//! §2): an InternetGatewayDevice:1 whose WANDevice holds a WANConnectionDevice with the
//! WANIPConnection:1 service, and that service's SCPD listing the actions served. URLs are
//! relative, so clients resolve them against the description's own URL (UDA 1.0 §2.1).

use super::soap::SERVICE_TYPE;

/// Path of the root device description (the SSDP LOCATION).
pub const ROOT_PATH: &str = "/rootDesc.xml";
/// Path of the WANIPConnection:1 service description.
pub const SCPD_PATH: &str = "/WANIPCn.xml";
/// Path of the WANIPConnection:1 control URL (SOAP POSTs).
pub const CONTROL_PATH: &str = "/ctl/IPConn";
/// Path of the event URL; eventing is not served (GENA SUBSCRIBE is refused).
pub const EVENT_PATH: &str = "/evt/IPConn";

/// Device type of the root device.
pub const IGD_TYPE: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
/// Device type of the embedded WAN device.
pub const WAN_DEVICE_TYPE: &str = "urn:schemas-upnp-org:device:WANDevice:1";
/// Device type of the embedded WAN connection device.
pub const WAN_CONNECTION_DEVICE_TYPE: &str = "urn:schemas-upnp-org:device:WANConnectionDevice:1";

/// The unique device names (without `uuid:`) of the three devices.
#[derive(Clone, Debug)]
pub struct Uuids {
    /// The root InternetGatewayDevice.
    pub root: String,
    /// The WANDevice.
    pub wan: String,
    /// The WANConnectionDevice (the one whose service clients use).
    pub connection: String,
}

fn device(kind: &str, name: &str, uuid: &str, inner: &str) -> String {
    format!(
        "<device><deviceType>{kind}</deviceType><friendlyName>{name}</friendlyName>\
         <manufacturer>nat-ctl</manufacturer><modelName>nat-ctl</modelName>\
         <modelNumber>{}</modelNumber><UDN>uuid:{uuid}</UDN>{inner}</device>",
        env!("CARGO_PKG_VERSION")
    )
}

/// The root device description.
pub fn root(uuids: &Uuids) -> String {
    let service = format!(
        "<serviceList><service><serviceType>{SERVICE_TYPE}</serviceType>\
         <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SCPDURL>{SCPD_PATH}</SCPDURL>\
         <controlURL>{CONTROL_PATH}</controlURL><eventSubURL>{EVENT_PATH}</eventSubURL></service></serviceList>"
    );
    let connection = device(
        WAN_CONNECTION_DEVICE_TYPE,
        "WANConnectionDevice",
        &uuids.connection,
        &service,
    );
    let wan = device(
        WAN_DEVICE_TYPE,
        "WANDevice",
        &uuids.wan,
        &format!("<deviceList>{connection}</deviceList>"),
    );
    let igd = device(
        IGD_TYPE,
        "nat-ctl gateway",
        &uuids.root,
        &format!("<deviceList>{wan}</deviceList>"),
    );
    format!(
        "<?xml version=\"1.0\"?>\r\n<root xmlns=\"urn:schemas-upnp-org:device-1-0\">\
         <specVersion><major>1</major><minor>0</minor></specVersion>{igd}</root>\r\n"
    )
}

/// An action argument: (name, direction, related state variable).
type Argument = (&'static str, &'static str, &'static str);

/// (action, arguments) of every action served.
const ACTIONS: &[(&str, &[Argument])] = &[
    (
        "AddPortMapping",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
            ("NewInternalPort", "in", "InternalPort"),
            ("NewInternalClient", "in", "InternalClient"),
            ("NewEnabled", "in", "PortMappingEnabled"),
            ("NewPortMappingDescription", "in", "PortMappingDescription"),
            ("NewLeaseDuration", "in", "PortMappingLeaseDuration"),
        ],
    ),
    (
        "DeletePortMapping",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
        ],
    ),
    (
        "GetExternalIPAddress",
        &[("NewExternalIPAddress", "out", "ExternalIPAddress")],
    ),
    (
        "GetSpecificPortMappingEntry",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
            ("NewInternalPort", "out", "InternalPort"),
            ("NewInternalClient", "out", "InternalClient"),
            ("NewEnabled", "out", "PortMappingEnabled"),
            ("NewPortMappingDescription", "out", "PortMappingDescription"),
            ("NewLeaseDuration", "out", "PortMappingLeaseDuration"),
        ],
    ),
    (
        "GetGenericPortMappingEntry",
        &[
            ("NewPortMappingIndex", "in", "PortMappingNumberOfEntries"),
            ("NewRemoteHost", "out", "RemoteHost"),
            ("NewExternalPort", "out", "ExternalPort"),
            ("NewProtocol", "out", "PortMappingProtocol"),
            ("NewInternalPort", "out", "InternalPort"),
            ("NewInternalClient", "out", "InternalClient"),
            ("NewEnabled", "out", "PortMappingEnabled"),
            ("NewPortMappingDescription", "out", "PortMappingDescription"),
            ("NewLeaseDuration", "out", "PortMappingLeaseDuration"),
        ],
    ),
    (
        "GetStatusInfo",
        &[
            ("NewConnectionStatus", "out", "ConnectionStatus"),
            ("NewLastConnectionError", "out", "LastConnectionError"),
            ("NewUptime", "out", "Uptime"),
        ],
    ),
    (
        "GetConnectionTypeInfo",
        &[
            ("NewConnectionType", "out", "ConnectionType"),
            ("NewPossibleConnectionTypes", "out", "PossibleConnectionTypes"),
        ],
    ),
];

/// (state variable, data type) of every variable the actions refer to.
const STATE_VARIABLES: &[(&str, &str)] = &[
    ("ConnectionType", "string"),
    ("PossibleConnectionTypes", "string"),
    ("ConnectionStatus", "string"),
    ("Uptime", "ui4"),
    ("LastConnectionError", "string"),
    ("ExternalIPAddress", "string"),
    ("PortMappingNumberOfEntries", "ui2"),
    ("PortMappingEnabled", "boolean"),
    ("PortMappingLeaseDuration", "ui4"),
    ("RemoteHost", "string"),
    ("ExternalPort", "ui2"),
    ("InternalPort", "ui2"),
    ("PortMappingProtocol", "string"),
    ("InternalClient", "string"),
    ("PortMappingDescription", "string"),
];

/// The WANIPConnection:1 service description (SCPD), listing the actions served.
pub fn scpd() -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\"?>\r\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\">\
         <specVersion><major>1</major><minor>0</minor></specVersion><actionList>",
    );
    for (name, args) in ACTIONS {
        out.push_str(&format!("<action><name>{name}</name><argumentList>"));
        for (arg, direction, variable) in *args {
            out.push_str(&format!(
                "<argument><name>{arg}</name><direction>{direction}</direction>\
                 <relatedStateVariable>{variable}</relatedStateVariable></argument>"
            ));
        }
        out.push_str("</argumentList></action>");
    }
    out.push_str("</actionList><serviceStateTable>");
    for (name, kind) in STATE_VARIABLES {
        out.push_str(&format!(
            "<stateVariable sendEvents=\"no\"><name>{name}</name><dataType>{kind}</dataType></stateVariable>"
        ));
    }
    out.push_str("</serviceStateTable></scpd>\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_well_formed_and_name_the_service() {
        let uuids = Uuids {
            root: "a".into(),
            wan: "b".into(),
            connection: "c".into(),
        };
        for doc in [root(&uuids), scpd()] {
            let mut reader = quick_xml::Reader::from_str(&doc);
            loop {
                match reader.read_event() {
                    Ok(quick_xml::events::Event::Eof) => break,
                    Ok(_) => {}
                    Err(e) => panic!("{e}: {doc}"),
                }
            }
        }
        let doc = root(&uuids);
        assert!(doc.contains(SERVICE_TYPE) && doc.contains(CONTROL_PATH) && doc.contains("uuid:c"));
        // Every variable an argument names is declared.
        for (_, args) in ACTIONS {
            for (_, _, v) in *args {
                assert!(STATE_VARIABLES.iter().any(|(n, _)| n == v), "{v}");
            }
        }
    }
}
