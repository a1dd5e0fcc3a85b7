//! The WANIPConnection:1 actions (UPnP IGD 1.0, WANIPConnection:1 §2.4), served on the same
//! mapping table and with the same rules as PCP and NAT-PMP (RFC 6887 §18 applied to UPnP): a
//! host maps only its own address unless the operator allows third-party mapping, limits per
//! host and in total, the lease capped (a lease of 0, "infinite" in IGD 1.0, gets the cap),
//! never a port a forward or a live binding owns.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use nat_common::proto;

use super::soap::Action;
use crate::port_mapping::{
    mappings::{Dataplane, Granted, MapRequest, Mapping, Mappings, Refusal, Via, MAX_LIFETIME_SECS},
    server::Server,
};

/// Longest NewPortMappingDescription kept, bytes (longer ones are cut at a char boundary).
pub const MAX_DESCRIPTION: usize = 256;

/// A UPnPError (UPnP Device Architecture 1.0 §3.2.2; WANIPConnection:1 §2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpnpError {
    /// 401: no such action in this service.
    InvalidAction,
    /// 402: an argument missing or not of its type.
    InvalidArgs,
    /// 501: the action could not be carried out (no external address, no room left).
    ActionFailed,
    /// 606: the entry is another host's.
    NotAuthorized,
    /// 713: GetGenericPortMappingEntry's index is past the end.
    SpecifiedArrayIndexInvalid,
    /// 714: no such mapping.
    NoSuchEntryInArray,
    /// 716: the external port may not be 0 (a wildcard) in IGD 1.0.
    WildCardNotPermittedInExtPort,
    /// 718: the external port is someone else's (another mapping, a forward, a live binding),
    /// or the client asked for another host without third-party mapping allowed.
    ConflictInMappingEntry,
    /// 726: only an empty (wildcard) NewRemoteHost is supported: a mapping admits every remote.
    RemoteHostOnlySupportsWildcard,
}

impl UpnpError {
    /// The error code.
    pub const fn code(self) -> u16 {
        match self {
            UpnpError::InvalidAction => 401,
            UpnpError::InvalidArgs => 402,
            UpnpError::ActionFailed => 501,
            UpnpError::NotAuthorized => 606,
            UpnpError::SpecifiedArrayIndexInvalid => 713,
            UpnpError::NoSuchEntryInArray => 714,
            UpnpError::WildCardNotPermittedInExtPort => 716,
            UpnpError::ConflictInMappingEntry => 718,
            UpnpError::RemoteHostOnlySupportsWildcard => 726,
        }
    }

    /// The error description the specifications give.
    pub const fn description(self) -> &'static str {
        match self {
            UpnpError::InvalidAction => "Invalid Action",
            UpnpError::InvalidArgs => "Invalid Args",
            UpnpError::ActionFailed => "Action Failed",
            UpnpError::NotAuthorized => "Action not authorized",
            UpnpError::SpecifiedArrayIndexInvalid => "SpecifiedArrayIndexInvalid",
            UpnpError::NoSuchEntryInArray => "NoSuchEntryInArray",
            UpnpError::WildCardNotPermittedInExtPort => "WildCardNotPermittedInExtPort",
            UpnpError::ConflictInMappingEntry => "ConflictInMappingEntry",
            UpnpError::RemoteHostOnlySupportsWildcard => "RemoteHostOnlySupportsWildcard",
        }
    }
}

/// An action's output arguments, in the order the SCPD lists them.
pub type Output = Vec<(&'static str, String)>;

fn arg<'a>(action: &'a Action, name: &str) -> Result<&'a str, UpnpError> {
    action.arg(name).map(str::trim).ok_or(UpnpError::InvalidArgs)
}

fn port(action: &Action, name: &str) -> Result<u16, UpnpError> {
    arg(action, name)?.parse().map_err(|_| UpnpError::InvalidArgs)
}

fn protocol(action: &Action) -> Result<u8, UpnpError> {
    match arg(action, "NewProtocol")? {
        p if p.eq_ignore_ascii_case("UDP") => Ok(proto::UDP),
        p if p.eq_ignore_ascii_case("TCP") => Ok(proto::TCP),
        _ => Err(UpnpError::InvalidArgs),
    }
}

/// NewRemoteHost must be present and empty: a mapping admits every remote.
fn wildcard_remote(action: &Action) -> Result<(), UpnpError> {
    if arg(action, "NewRemoteHost")?.is_empty() {
        Ok(())
    } else {
        Err(UpnpError::RemoteHostOnlySupportsWildcard)
    }
}

fn protocol_name(p: u8) -> String {
    if p == proto::TCP { "TCP" } else { "UDP" }.to_string()
}

/// The UPnP mapping on external port `port`.
fn by_external(mappings: &Mappings, p: u8, port: u16) -> Option<Mapping> {
    mappings
        .list()
        .iter()
        .find(|m| m.via == Via::Upnp && m.proto == p && m.external_port == port)
        .cloned()
}

/// Serves `action` from the host `from` at `now_ns`; `Err` only for a data-path failure.
pub fn handle(
    server: &mut Server,
    dp: &mut dyn Dataplane,
    action: &Action,
    from: Ipv4Addr,
    now_ns: u64,
) -> Result<Result<Output, UpnpError>> {
    Ok(match action.name.as_str() {
        "AddPortMapping" => add(server, dp, action, from, now_ns)?,
        "DeletePortMapping" => delete(server, dp, action, from, now_ns)?,
        "GetExternalIPAddress" => match dp.external_addr() {
            Some(addr) => Ok(vec![("NewExternalIPAddress", addr.to_string())]),
            None => Err(UpnpError::ActionFailed),
        },
        "GetSpecificPortMappingEntry" => specific(server, action, now_ns),
        "GetGenericPortMappingEntry" => generic(server, action, now_ns),
        "GetStatusInfo" => {
            let connected = dp.external_addr().is_some();
            Ok(vec![
                (
                    "NewConnectionStatus",
                    if connected { "Connected" } else { "Disconnected" }.to_string(),
                ),
                ("NewLastConnectionError", "ERROR_NONE".to_string()),
                ("NewUptime", server.epoch(now_ns).to_string()),
            ])
        }
        "GetConnectionTypeInfo" => Ok(vec![
            ("NewConnectionType", "IP_Routed".to_string()),
            ("NewPossibleConnectionTypes", "IP_Routed".to_string()),
        ]),
        _ => Err(UpnpError::InvalidAction),
    })
}

fn add(
    server: &mut Server,
    dp: &mut dyn Dataplane,
    action: &Action,
    from: Ipv4Addr,
    now_ns: u64,
) -> Result<Result<Output, UpnpError>> {
    let parsed = (|| -> Result<_, UpnpError> {
        wildcard_remote(action)?;
        let external_port = port(action, "NewExternalPort")?;
        let p = protocol(action)?;
        let internal_port = port(action, "NewInternalPort")?;
        let client: Ipv4Addr = arg(action, "NewInternalClient")?
            .parse()
            .map_err(|_| UpnpError::InvalidArgs)?;
        let lease: u32 = arg(action, "NewLeaseDuration")?
            .parse()
            .map_err(|_| UpnpError::InvalidArgs)?;
        let enabled = arg(action, "NewEnabled")?;
        let description = action.arg("NewPortMappingDescription").unwrap_or("");
        if internal_port == 0 || client.is_unspecified() {
            return Err(UpnpError::InvalidArgs);
        }
        if external_port == 0 {
            return Err(UpnpError::WildCardNotPermittedInExtPort);
        }
        match enabled {
            "1" | "true" => {}
            // A disabled entry would be a mapping that forwards nothing: not kept here.
            "0" | "false" => return Err(UpnpError::ActionFailed),
            _ => return Err(UpnpError::InvalidArgs),
        }
        // RFC 6887 §18.1 applied to UPnP: a host maps only its own address (miniupnpd's
        // secure mode answers the same 718).
        if client != from && !server.allow_third_party {
            return Err(UpnpError::ConflictInMappingEntry);
        }
        Ok((
            p,
            external_port,
            SocketAddrV4::new(client, internal_port),
            lease,
            description,
        ))
    })();
    let (p, external_port, internal, lease, description) = match parsed {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(m) = by_external(&server.mappings, p, external_port) {
        // The same port to another endpoint is a conflict (IGD 1.0: 718); to the same one a
        // renewal.
        if m.internal != internal {
            return Ok(Err(UpnpError::ConflictInMappingEntry));
        }
    }
    let req = MapRequest {
        proto: p,
        internal,
        suggested_port: external_port,
        // IGD 1.0: 0 is "infinite"; here it is the cap, as any longer lease.
        lifetime: if lease == 0 { MAX_LIFETIME_SECS } else { lease },
        nonce: None,
        // UPnP maps exactly the external port asked for, or fails.
        prefer_failure: true,
        via: Via::Upnp,
    };
    let answer = match server.mappings.request(dp, &req, now_ns)? {
        Ok(Granted::Mapped { .. }) => {
            let cut = cut(description, MAX_DESCRIPTION);
            server.mappings.describe(p, internal, cut);
            Ok(Vec::new())
        }
        Ok(Granted::Deleted) => Err(UpnpError::ActionFailed),
        // The endpoint is a forward's or another protocol's mapping, or the port is taken.
        Err(Refusal::NotAuthorized | Refusal::CannotProvideExternal) => {
            Err(UpnpError::ConflictInMappingEntry)
        }
        Err(Refusal::NoResources | Refusal::HostQuota | Refusal::NoExternalAddress) => {
            Err(UpnpError::ActionFailed)
        }
    };
    Ok(answer)
}

/// `text` cut to at most `max` bytes at a char boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn delete(
    server: &mut Server,
    dp: &mut dyn Dataplane,
    action: &Action,
    from: Ipv4Addr,
    now_ns: u64,
) -> Result<Result<Output, UpnpError>> {
    let key = (|| -> Result<_, UpnpError> {
        wildcard_remote(action)?;
        Ok((protocol(action)?, port(action, "NewExternalPort")?))
    })();
    let (p, external_port) = match key {
        Ok(k) => k,
        Err(e) => return Ok(Err(e)),
    };
    let Some(m) = by_external(&server.mappings, p, external_port) else {
        return Ok(Err(UpnpError::NoSuchEntryInArray));
    };
    if *m.internal.ip() != from && !server.allow_third_party {
        return Ok(Err(UpnpError::NotAuthorized));
    }
    let req = MapRequest {
        proto: p,
        internal: m.internal,
        suggested_port: 0,
        lifetime: 0,
        nonce: None,
        prefer_failure: false,
        via: Via::Upnp,
    };
    Ok(match server.mappings.request(dp, &req, now_ns)? {
        Ok(_) => Ok(Vec::new()),
        Err(_) => Err(UpnpError::ActionFailed),
    })
}

/// The output arguments describing `m` (from NewInternalPort on; `with_key` adds the
/// external port and protocol first, as GetGenericPortMappingEntry has them).
fn entry(m: &Mapping, now_ns: u64, with_key: bool) -> Output {
    let mut out = Vec::new();
    if with_key {
        out.push(("NewRemoteHost", String::new()));
        out.push(("NewExternalPort", m.external_port.to_string()));
        out.push(("NewProtocol", protocol_name(m.proto)));
    }
    out.extend([
        ("NewInternalPort", m.internal.port().to_string()),
        ("NewInternalClient", m.internal.ip().to_string()),
        ("NewEnabled", "1".to_string()),
        ("NewPortMappingDescription", m.description.clone()),
        (
            "NewLeaseDuration",
            Mappings::remaining_secs(m, now_ns).to_string(),
        ),
    ]);
    out
}

fn specific(server: &Server, action: &Action, now_ns: u64) -> Result<Output, UpnpError> {
    wildcard_remote(action)?;
    let p = protocol(action)?;
    let external_port = port(action, "NewExternalPort")?;
    let m = by_external(&server.mappings, p, external_port).ok_or(UpnpError::NoSuchEntryInArray)?;
    Ok(entry(&m, now_ns, false))
}

fn generic(server: &Server, action: &Action, now_ns: u64) -> Result<Output, UpnpError> {
    let index: usize = arg(action, "NewPortMappingIndex")?
        .parse()
        .map_err(|_| UpnpError::InvalidArgs)?;
    let m = server
        .mappings
        .list()
        .iter()
        .filter(|m| m.via == Via::Upnp)
        .nth(index)
        .ok_or(UpnpError::SpecifiedArrayIndexInvalid)?;
    Ok(entry(m, now_ns, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port_mapping::{mappings::Holder, Protocols};

    const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const SECOND: u64 = 1_000_000_000;

    /// Port 30000 is held (a forward or a live binding); the rest is free.
    #[derive(Default)]
    struct Fake {
        taken: Vec<(u8, u16)>,
    }

    impl Dataplane for Fake {
        fn external_addr(&mut self) -> Option<Ipv4Addr> {
            Some(EXT)
        }
        fn port_range(&mut self) -> (u16, u16) {
            (1024, 65_535)
        }
        fn holder(&mut self, _: u8, _: SocketAddrV4) -> Holder {
            Holder::Free
        }
        fn install(&mut self, p: u8, port: u16, _: SocketAddrV4, _: Via) -> Result<bool> {
            if port == 30_000 || self.taken.contains(&(p, port)) {
                return Ok(false);
            }
            self.taken.push((p, port));
            Ok(true)
        }
        fn adopt(&mut self, _: u8, _: SocketAddrV4, _: Via) -> Result<()> {
            Ok(())
        }
        fn remove(&mut self, m: &Mapping) -> Result<()> {
            self.taken.retain(|t| *t != (m.proto, m.external_port));
            Ok(())
        }
        fn flow_port(&mut self, _: u8, _: SocketAddrV4, _: SocketAddrV4) -> Option<u16> {
            None
        }
    }

    fn server() -> Server {
        Server {
            protocols: Protocols {
                upnp: true,
                ..Default::default()
            },
            epoch_start_ns: 0,
            mappings: Mappings::default(),
            allow_third_party: false,
        }
    }

    fn call(name: &str, args: &[(&str, &str)]) -> Action {
        Action {
            name: name.into(),
            args: args.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        }
    }

    fn add_call(ext: &str, client: &str, lease: &str) -> Action {
        call(
            "AddPortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", ext),
                ("NewProtocol", "UDP"),
                ("NewInternalPort", "4000"),
                ("NewInternalClient", client),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", "game"),
                ("NewLeaseDuration", lease),
            ],
        )
    }

    fn run(s: &mut Server, dp: &mut Fake, a: &Action, from: Ipv4Addr) -> Result<Output, UpnpError> {
        handle(s, dp, a, from, 10 * SECOND).unwrap()
    }

    #[test]
    fn add_get_list_delete() {
        let (mut s, mut dp) = (server(), Fake::default());
        assert_eq!(
            run(&mut s, &mut dp, &add_call("20000", "10.0.0.2", "0"), HOST),
            Ok(vec![])
        );
        let m = &s.mappings.list()[0];
        // Lease 0 gets the cap.
        assert_eq!(
            (m.external_port, m.via, m.description.as_str()),
            (20_000, Via::Upnp, "game")
        );
        assert_eq!(m.expires_ns, 10 * SECOND + u64::from(MAX_LIFETIME_SECS) * SECOND);
        // The same request again renews.
        assert_eq!(
            run(&mut s, &mut dp, &add_call("20000", "10.0.0.2", "60"), HOST),
            Ok(vec![])
        );
        assert_eq!(s.mappings.list().len(), 1);
        let key = [
            ("NewRemoteHost", ""),
            ("NewExternalPort", "20000"),
            ("NewProtocol", "UDP"),
        ];
        let out = run(&mut s, &mut dp, &call("GetSpecificPortMappingEntry", &key), HOST).unwrap();
        assert_eq!(out[0], ("NewInternalPort", "4000".to_string()));
        assert_eq!(out[1], ("NewInternalClient", "10.0.0.2".to_string()));
        assert_eq!(out[4], ("NewLeaseDuration", "60".to_string()));
        let list = |i: &str| call("GetGenericPortMappingEntry", &[("NewPortMappingIndex", i)]);
        let out = run(&mut s, &mut dp, &list("0"), HOST).unwrap();
        assert_eq!(out[1], ("NewExternalPort", "20000".to_string()));
        assert_eq!(
            run(&mut s, &mut dp, &list("1"), HOST),
            Err(UpnpError::SpecifiedArrayIndexInvalid)
        );
        // Another host cannot delete it.
        assert_eq!(
            run(&mut s, &mut dp, &call("DeletePortMapping", &key), OTHER),
            Err(UpnpError::NotAuthorized)
        );
        assert_eq!(
            run(&mut s, &mut dp, &call("DeletePortMapping", &key), HOST),
            Ok(vec![])
        );
        assert!(s.mappings.list().is_empty() && dp.taken.is_empty());
        assert_eq!(
            run(&mut s, &mut dp, &call("DeletePortMapping", &key), HOST),
            Err(UpnpError::NoSuchEntryInArray)
        );
        assert_eq!(
            run(&mut s, &mut dp, &call("GetSpecificPortMappingEntry", &key), HOST),
            Err(UpnpError::NoSuchEntryInArray)
        );
        let out = run(&mut s, &mut dp, &call("GetExternalIPAddress", &[]), HOST).unwrap();
        assert_eq!(out, vec![("NewExternalIPAddress", EXT.to_string())]);
        let out = run(&mut s, &mut dp, &call("GetStatusInfo", &[]), HOST).unwrap();
        assert_eq!(out[0].1, "Connected");
    }

    #[test]
    fn refusals() {
        let (mut s, mut dp) = (server(), Fake::default());
        // Another host's address: refused (miniupnpd's secure mode says 718 too).
        assert_eq!(
            run(&mut s, &mut dp, &add_call("20000", "10.0.0.3", "60"), HOST),
            Err(UpnpError::ConflictInMappingEntry)
        );
        // A held port.
        assert_eq!(
            run(&mut s, &mut dp, &add_call("30000", "10.0.0.2", "60"), HOST),
            Err(UpnpError::ConflictInMappingEntry)
        );
        // A port another host mapped.
        run(&mut s, &mut dp, &add_call("20001", "10.0.0.3", "60"), OTHER).unwrap();
        assert_eq!(
            run(&mut s, &mut dp, &add_call("20001", "10.0.0.2", "60"), HOST),
            Err(UpnpError::ConflictInMappingEntry)
        );
        assert_eq!(
            run(&mut s, &mut dp, &add_call("0", "10.0.0.2", "60"), HOST),
            Err(UpnpError::WildCardNotPermittedInExtPort)
        );
        for bad in [
            add_call("x", "10.0.0.2", "60"),
            add_call("1", "host", "60"),
            add_call("1", "10.0.0.2", "-1"),
        ] {
            assert_eq!(run(&mut s, &mut dp, &bad, HOST), Err(UpnpError::InvalidArgs));
        }
        let mut remote = add_call("20002", "10.0.0.2", "60");
        remote.args[0].1 = "192.0.2.1".into();
        assert_eq!(
            run(&mut s, &mut dp, &remote, HOST),
            Err(UpnpError::RemoteHostOnlySupportsWildcard)
        );
        let mut missing = add_call("20002", "10.0.0.2", "60");
        missing.args.remove(2);
        assert_eq!(run(&mut s, &mut dp, &missing, HOST), Err(UpnpError::InvalidArgs));
        assert_eq!(
            run(&mut s, &mut dp, &call("ForceTermination", &[]), HOST),
            Err(UpnpError::InvalidAction)
        );
        assert_eq!(s.mappings.list().len(), 1);
        // Allowed by the operator: the mapping is for the named host.
        s.allow_third_party = true;
        assert_eq!(
            run(&mut s, &mut dp, &add_call("20003", "10.0.0.9", "60"), HOST),
            Ok(vec![])
        );
    }

    #[test]
    fn descriptions_are_cut_at_a_char_boundary() {
        let long = "é".repeat(200);
        assert_eq!(cut(&long, MAX_DESCRIPTION).len(), MAX_DESCRIPTION);
        assert_eq!(cut("ab", 1), "a");
        assert_eq!(cut("é", 1), "");
    }
}
