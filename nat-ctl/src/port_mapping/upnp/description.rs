//! The device and service descriptions the HTTP server serves (UPnP Device Architecture 1.0
//! §2): an InternetGatewayDevice:1 whose WANDevice holds a WANConnectionDevice with the
//! WANIPConnection:1 service, and that service's SCPD listing the actions served. URLs are
//! relative, so clients resolve them against the description's own URL (UDA 1.0 §2.1).

use super::soap::{CIF_SERVICE_TYPE, SERVICE_TYPE};

/// Path of the root device description (the SSDP LOCATION).
pub const ROOT_PATH: &str = "/rootDesc.xml";
/// Path of the WANIPConnection:1 service description.
pub const SCPD_PATH: &str = "/WANIPCn.xml";
/// Path of the WANIPConnection:1 control URL (SOAP POSTs).
pub const CONTROL_PATH: &str = "/ctl/IPConn";
/// Path of the event URL; eventing is not served (GENA SUBSCRIBE is refused).
pub const EVENT_PATH: &str = "/evt/IPConn";
/// Path of the WANCommonInterfaceConfig:1 service description.
pub const CIF_SCPD_PATH: &str = "/WANCfg.xml";
/// Path of the WANCommonInterfaceConfig:1 control URL.
pub const CIF_CONTROL_PATH: &str = "/ctl/CmnIfCfg";
/// Path of its (unserved) event URL.
pub const CIF_EVENT_PATH: &str = "/evt/CmnIfCfg";

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
    let service = |kind: &str, id: &str, scpd: &str, control: &str, event: &str| {
        format!(
            "<serviceList><service><serviceType>{kind}</serviceType>\
             <serviceId>urn:upnp-org:serviceId:{id}</serviceId><SCPDURL>{scpd}</SCPDURL>\
             <controlURL>{control}</controlURL><eventSubURL>{event}</eventSubURL></service></serviceList>"
        )
    };
    let ip_connection = service(SERVICE_TYPE, "WANIPConn1", SCPD_PATH, CONTROL_PATH, EVENT_PATH);
    let common = service(
        CIF_SERVICE_TYPE,
        "WANCommonIFC1",
        CIF_SCPD_PATH,
        CIF_CONTROL_PATH,
        CIF_EVENT_PATH,
    );
    let connection = device(
        WAN_CONNECTION_DEVICE_TYPE,
        "WANConnectionDevice",
        &uuids.connection,
        &ip_connection,
    );
    let wan = device(
        WAN_DEVICE_TYPE,
        "WANDevice",
        &uuids.wan,
        &format!("{common}<deviceList>{connection}</deviceList>"),
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

/// The WANCommonInterfaceConfig:1 action served.
const CIF_ACTIONS: &[(&str, &[Argument])] = &[(
    "GetCommonLinkProperties",
    &[
        ("NewWANAccessType", "out", "WANAccessType"),
        ("NewLayer1UpstreamMaxBitRate", "out", "Layer1UpstreamMaxBitRate"),
        (
            "NewLayer1DownstreamMaxBitRate",
            "out",
            "Layer1DownstreamMaxBitRate",
        ),
        ("NewPhysicalLinkStatus", "out", "PhysicalLinkStatus"),
    ],
)];

/// Its state variables.
const CIF_STATE_VARIABLES: &[(&str, &str)] = &[
    ("WANAccessType", "string"),
    ("Layer1UpstreamMaxBitRate", "ui4"),
    ("Layer1DownstreamMaxBitRate", "ui4"),
    ("PhysicalLinkStatus", "string"),
];

/// The WANIPConnection:1 service description (SCPD), listing the actions served.
pub fn scpd() -> String {
    service_description(ACTIONS, STATE_VARIABLES)
}

/// The WANCommonInterfaceConfig:1 service description.
pub fn cif_scpd() -> String {
    service_description(CIF_ACTIONS, CIF_STATE_VARIABLES)
}

fn service_description(actions: &[(&str, &[Argument])], variables: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\"?>\r\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\">\
         <specVersion><major>1</major><minor>0</minor></specVersion><actionList>",
    );
    for (name, args) in actions {
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
    for (name, kind) in variables {
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
        for doc in [root(&uuids), scpd(), cif_scpd()] {
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
        for (actions, variables) in [(ACTIONS, STATE_VARIABLES), (CIF_ACTIONS, CIF_STATE_VARIABLES)] {
            for (_, args) in actions {
                for (_, _, v) in *args {
                    assert!(variables.iter().any(|(n, _)| n == v), "{v}");
                }
            }
        }
    }
}
