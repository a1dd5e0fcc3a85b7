//! `Dataplane` on the pinned maps: a mapping is a binding with `BINDING_FLAG_STATIC` (so the
//! data path admits every remote in every mode, as for a forward) plus `BINDING_FLAG_PCP` or
//! `BINDING_FLAG_NATPMP` (so the controller and `nat-ctl mappings` know it is one).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use nat_common::{
    maps::{BINDING_FLAGS_PORT_MAPPING, BINDING_FLAG_STATIC},
    BindingKey, ExternalKey, SessionKey,
};

use super::mappings::{Dataplane, Holder, Mapping, Via};
use crate::pinned::{PinnedMaps, BPF_EXIST};

/// The pinned maps as a `Dataplane`.
pub struct Kernel<'a> {
    /// The NAT's maps.
    pub maps: &'a mut PinnedMaps,
}

impl Dataplane for Kernel<'_> {
    fn external_addr(&mut self) -> Option<Ipv4Addr> {
        self.maps.read_config().ok()?.external_ipv4_addrs().next()
    }

    fn port_range(&mut self) -> (u16, u16) {
        match self.maps.read_config() {
            Ok(c) => (c.port_min, c.port_max),
            Err(_) => (0, 0),
        }
    }

    fn holder(&mut self, proto: u8, internal: SocketAddrV4) -> Holder {
        match self
            .maps
            .bindings_out
            .get(&BindingKey::of_endpoint(proto, internal), 0)
        {
            Ok(v) if v.flags & BINDING_FLAG_STATIC != 0 => Holder::Static,
            Ok(v) => Holder::Dynamic(u16::from_be(v.external_port)),
            Err(_) => Holder::Free,
        }
    }

    fn install(&mut self, proto: u8, external_port: u16, internal: SocketAddrV4, via: Via) -> Result<bool> {
        let Some(addr) = self.external_addr() else {
            return Ok(false);
        };
        let external = SocketAddrV4::new(addr, external_port);
        let flags = BINDING_FLAG_STATIC | via.flag();
        // Refused when the port is held or the host opened a flow from this endpoint meanwhile.
        Ok(self
            .maps
            .claim_static_binding(proto, external, internal, flags)
            .is_ok())
    }

    fn flow_port(&mut self, proto: u8, internal: SocketAddrV4, remote: SocketAddrV4) -> Option<u16> {
        let mut key = BindingKey::of_endpoint(proto, internal);
        key.remote_addr = u32::from(*remote.ip()).to_be();
        key.remote_port = remote.port().to_be();
        let value = self.maps.bindings_out.get(&key, 0).or_else(|_| {
            self.maps
                .bindings_out
                .get(&BindingKey::of_endpoint(proto, internal), 0)
        });
        value.ok().map(|v| u16::from_be(v.external_port))
    }

    fn adopt(&mut self, proto: u8, internal: SocketAddrV4, via: Via) -> Result<()> {
        set_flags(
            self.maps,
            proto,
            internal,
            |f| f | BINDING_FLAG_STATIC | via.flag(),
            false,
        )
    }

    fn remove(&mut self, m: &Mapping) -> Result<()> {
        if m.adopted {
            // Back to an ordinary dynamic binding, idle from now: the sweep expires it.
            return set_flags(
                self.maps,
                m.proto,
                m.internal,
                |f| f & !(BINDING_FLAG_STATIC | BINDING_FLAGS_PORT_MAPPING),
                true,
            );
        }
        let key_out = BindingKey::of_endpoint(m.proto, m.internal);
        let Ok(value) = self.maps.bindings_out.get(&key_out, 0) else {
            return Ok(());
        };
        if value.flags & BINDING_FLAGS_PORT_MAPPING == 0 {
            // Not a mapping any more (an operator's forward now): leave it.
            return Ok(());
        }
        let key_in = ExternalKey::of_network_order(m.proto, value.external_addr, value.external_port);
        let _ = self.maps.bindings_in.remove(&key_in);
        let _ = self.maps.bindings_out.remove(&key_out);
        // Its sessions go with it: left behind, they would admit their remotes (ADF/APDF) to
        // whichever binding takes this external port next.
        let snapshot = self.maps.sessions()?;
        let doomed: Vec<SessionKey> = snapshot
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| {
                k.proto == m.proto
                    && k.external_addr == value.external_addr
                    && k.external_port == value.external_port
            })
            .collect();
        crate::session_usage::remove_sessions(self.maps, &doomed, &snapshot)?;
        crate::session_usage::forget_binding(self.maps, m.proto, value.external_addr, value.external_port);
        Ok(())
    }
}

/// Rewrites the flags of the endpoint-independent binding of `internal` in both maps.
fn set_flags(
    maps: &mut PinnedMaps,
    proto: u8,
    internal: SocketAddrV4,
    f: impl Fn(u8) -> u8,
    touch: bool,
) -> Result<()> {
    let key_out = BindingKey::of_endpoint(proto, internal);
    let Ok(mut value) = maps.bindings_out.get(&key_out, 0) else {
        return Ok(());
    };
    let key_in = ExternalKey::of_network_order(proto, value.external_addr, value.external_port);
    if let Ok(mut inbound) = maps.bindings_in.get(&key_in, 0) {
        inbound.flags = f(inbound.flags);
        maps.bindings_in.insert(key_in, inbound, BPF_EXIST)?;
    }
    value.flags = f(value.flags);
    if touch {
        value.last_seen_ns = crate::clock::monotonic_ns();
    }
    maps.bindings_out.insert(key_out, value, BPF_EXIST)?;
    Ok(())
}

/// Every binding marked as a mapping: (proto, internal endpoint, external port, flags).
pub fn marked(maps: &PinnedMaps) -> Vec<(u8, SocketAddrV4, u16, u8)> {
    maps.bindings()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| v.flags & BINDING_FLAGS_PORT_MAPPING != 0 && k.remote_addr == 0)
        .map(|(k, v)| {
            (
                k.proto,
                SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(k.internal_addr)),
                    u16::from_be(k.internal_port),
                ),
                u16::from_be(v.external_port),
                v.flags,
            )
        })
        .collect()
}
