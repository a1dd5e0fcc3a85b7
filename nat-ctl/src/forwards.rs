//! Static forwards (port forwarding to a server behind the NAT): an external port mapped to a
//! fixed internal endpoint. They are ordinary bindings with `BINDING_FLAG_STATIC`, so the data
//! path needs nothing special: they admit every remote in every mode, the server's replies leave
//! from the forwarded port, and the sweep never expires them.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Result};
use nat_common::{
    maps::{BINDING_FLAGS_PORT_MAPPING, BINDING_FLAG_STATIC},
    proto, BindingKey, ExternalKey, NatConfig, SessionKey,
};
use serde::Serialize;

use crate::pinned::{ClaimRefused, PinnedMaps, BPF_NOEXIST};

/// One static forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// External endpoint.
    pub external: SocketAddrV4,
    /// Internal server endpoint.
    pub internal: SocketAddrV4,
}

/// How `forward list --json` shows a forward.
#[derive(Serialize)]
pub struct ForwardRow {
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// "ip:port".
    pub external: String,
    /// "ip:port".
    pub internal: String,
}

impl From<&Forward> for ForwardRow {
    fn from(f: &Forward) -> Self {
        ForwardRow {
            proto: proto::name(f.proto),
            external: f.external.to_string(),
            internal: f.internal.to_string(),
        }
    }
}

/// Parses "tcp" or "udp".
pub fn parse_proto(text: &str) -> Result<u8> {
    match text {
        "tcp" => Ok(proto::TCP),
        "udp" => Ok(proto::UDP),
        _ => bail!("protocol {text:?} cannot be forwarded (expected tcp or udp)"),
    }
}

/// Parses an external port (1-65535).
pub fn parse_port(text: &str) -> Result<u16> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => bail!("external port {text:?} is not a port number from 1 to 65535"),
        Ok(port) => Ok(port),
    }
}

/// Parses the internal endpoint `IP:PORT` (IPv4, port 1-65535).
pub fn parse_internal(text: &str) -> Result<SocketAddrV4> {
    let Some((ip, port)) = text.rsplit_once(':') else {
        bail!("internal endpoint {text:?} is not of the form IP:PORT")
    };
    let ip: Ipv4Addr = crate::settings::parse_ipv4(ip)?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bail!("internal endpoint {text:?}: {port:?} is not a port number from 1 to 65535"),
        Ok(port) => Ok(SocketAddrV4::new(ip, port)),
    }
}

/// The external address a forward uses: the given one, which must belong to the NAT, or the
/// NAT's first external address.
pub fn external_addr_for(config: &NatConfig, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
    let addrs: Vec<Ipv4Addr> = config.external_ipv4_addrs().collect();
    match requested {
        Some(addr) if addrs.contains(&addr) => Ok(addr),
        Some(addr) => bail!("{addr} is not an external address of this NAT"),
        None => addrs
            .first()
            .copied()
            .ok_or_else(|| anyhow::anyhow!("the NAT has no external address")),
    }
}

fn endpoint(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be))
}

/// Installs a forward, refusing it when the external port or the internal endpoint is already
/// bound (by a live dynamic binding or another forward).
pub fn add(maps: &mut PinnedMaps, f: &Forward) -> Result<()> {
    let name = proto::name(f.proto);
    let external_key = ExternalKey::of_endpoint(f.proto, f.external);
    let internal_key = BindingKey::of_endpoint(f.proto, f.internal);
    if let Ok(existing) = maps.bindings_in.get(&external_key, 0) {
        let holder = endpoint(existing.internal_addr, existing.internal_port);
        if existing.flags & BINDING_FLAG_STATIC != 0 {
            bail!("{name} {} is already forwarded to {holder}", f.external);
        }
        bail!("{name} {} is in use by a dynamic binding of {holder}; choose another port or wait for it to expire", f.external);
    }
    if let Ok(existing) = maps.bindings_out.get(&internal_key, 0) {
        let bound = endpoint(existing.external_addr, existing.external_port);
        let what = if existing.flags & BINDING_FLAG_STATIC != 0 {
            "a forward"
        } else {
            "a dynamic binding"
        };
        bail!("{name} {} already has {what} on {bound}", f.internal);
    }
    match maps.claim_static_binding(f.proto, f.external, f.internal, BINDING_FLAG_STATIC) {
        Ok(()) => Ok(()),
        Err(ClaimRefused::ExternalTaken) => bail!(
            "{name} {} was just taken by a new flow; try again or choose another port",
            f.external
        ),
        Err(ClaimRefused::InternalTaken) => {
            bail!(
                "{name} {} was just bound by a new flow; nothing changed",
                f.internal
            )
        }
    }
}

/// Removes the forward on `proto` `external`, returning it.
pub fn remove(maps: &mut PinnedMaps, proto: u8, external: SocketAddrV4) -> Result<Forward> {
    let key = ExternalKey::of_endpoint(proto, external);
    let name = proto::name(proto);
    match maps.bindings_in.get(&key, 0) {
        Ok(value) if value.flags & BINDING_FLAGS_PORT_MAPPING != 0 => {
            let host = endpoint(value.internal_addr, value.internal_port);
            bail!("{name} {external} is a port mapping of {host}, not a forward: it ends with its lifetime or when the host deletes it")
        }
        Ok(value) if value.flags & BINDING_FLAG_STATIC != 0 => {
            let forward = Forward {
                proto,
                external,
                internal: endpoint(value.internal_addr, value.internal_port),
            };
            let _ = maps.bindings_out.remove(&value.binding_key(proto));
            maps.bindings_in.remove(&key)?;
            // Its sessions go with it: the data path translates an established inbound packet
            // from its session alone (`SESSION_FLAG_INTERNAL_ENDPOINT`), so left behind they
            // would still lead the remotes they hold to the old internal server.
            let snapshot = maps.sessions()?;
            let doomed: Vec<SessionKey> = snapshot
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| {
                    k.proto == proto
                        && k.external_addr == key.external_addr
                        && k.external_port == key.external_port
                })
                .collect();
            crate::session_usage::remove_sessions(maps, &doomed, &snapshot)?;
            crate::session_usage::forget_binding(maps, proto, key.external_addr, key.external_port);
            Ok(forward)
        }
        _ => bail!("there is no forward on {name} {external}"),
    }
}

/// Moves forward `f` to the same port on address `to`, keeping its internal server: a forward
/// made for the interface's address follows that address when it changes. The new external
/// port is claimed first (`BPF_NOEXIST`, as the data path claims ports), then the outbound
/// entry is rewritten in place, so the server's packets never find the forward missing (they
/// would get a dynamic binding that blocks it); the old external entry goes last.
pub fn move_to(maps: &mut PinnedMaps, f: &Forward, to: Ipv4Addr) -> Result<Forward> {
    let name = proto::name(f.proto);
    let moved = Forward {
        external: SocketAddrV4::new(to, f.external.port()),
        ..f.clone()
    };
    let old_key = ExternalKey::of_endpoint(f.proto, f.external);
    let new_key = ExternalKey::of_endpoint(f.proto, moved.external);
    let inbound = match maps.bindings_in.get(&old_key, 0) {
        Ok(value) if value.flags & BINDING_FLAG_STATIC != 0 => value,
        _ => bail!("there is no forward on {name} {}", f.external),
    };
    let out_key = inbound.binding_key(f.proto);
    let Ok(mut outbound) = maps.bindings_out.get(&out_key, 0) else {
        bail!("the forward on {name} {} has no outbound entry", f.external);
    };
    if maps.bindings_in.insert(new_key, inbound, BPF_NOEXIST).is_err() {
        bail!("{name} {} is already in use", moved.external);
    }
    outbound.external_addr = new_key.external_addr;
    if let Err(e) = maps.bindings_out.insert(out_key, outbound, 0) {
        let _ = maps.bindings_in.remove(&new_key);
        bail!(
            "the forward on {name} {} could not be rewritten ({e})",
            f.external
        );
    }
    let _ = maps.bindings_in.remove(&old_key);
    Ok(moved)
}

/// The forwards an operator made (`forward list`): every static binding but the hosts' port
/// mappings.
pub fn list_operator(maps: &PinnedMaps) -> Vec<Forward> {
    let mappings: Vec<(u8, SocketAddrV4)> = crate::port_mapping::kernel::marked(maps)
        .into_iter()
        .map(|(proto, internal, _, _)| (proto, internal))
        .collect();
    list(maps)
        .into_iter()
        .filter(|f| !mappings.contains(&(f.proto, f.internal)))
        .collect()
}

/// Every static binding, forwards and port mappings alike (both follow the external address
/// when it changes), sorted by protocol and external port.
pub fn list(maps: &PinnedMaps) -> Vec<Forward> {
    // Read in batches: the table may hold a million dynamic bindings beside the forwards.
    let mut forwards: Vec<Forward> = crate::pinned::read_all(&maps.bindings_in)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| v.flags & BINDING_FLAG_STATIC != 0)
        .map(|(k, v)| Forward {
            proto: k.proto,
            external: endpoint(k.external_addr, k.external_port),
            internal: endpoint(v.internal_addr, v.internal_port),
        })
        .collect();
    forwards.sort_by_key(|f| (f.proto, f.external.port(), *f.external.ip()));
    forwards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_proto("tcp").unwrap(), proto::TCP);
        assert!(parse_proto("icmp").is_err());
        assert_eq!(parse_port("8080").unwrap(), 8080);
        for bad in ["0", "65536", "-1", "http"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_internal("10.0.0.2:80").unwrap(),
            "10.0.0.2:80".parse().unwrap()
        );
        assert!(parse_internal("10.0.0.2").is_err());
        assert!(parse_internal("[2001:db8::1]:80").is_err());
        assert!(parse_internal("10.0.0.2:0").is_err());
    }

    #[test]
    fn external_address_must_belong_to_the_nat() {
        let mut config = NatConfig::empty();
        config.external_addrs[0] = u32::from(Ipv4Addr::new(198, 51, 100, 254)).to_be();
        config.external_addr_count = 1;
        assert_eq!(
            external_addr_for(&config, None).unwrap(),
            Ipv4Addr::new(198, 51, 100, 254)
        );
        assert!(external_addr_for(&config, Some(Ipv4Addr::new(198, 51, 100, 9))).is_err());
    }
}
