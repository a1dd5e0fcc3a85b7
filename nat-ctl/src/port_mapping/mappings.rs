//! The mappings hosts asked for, and the policy both protocols share: create, renew, delete,
//! expire; limits per host and in total; lifetimes capped; a mapping never takes a port or an
//! internal endpoint that a static forward, another mapping or a live binding holds (RFC 6887
//! §11.3, §18; RFC 6886 §3.3). The kernel maps are behind `Dataplane`, so the policy is
//! unit-tested without them.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Longest lifetime granted, seconds: a day (a client renews at half its lifetime, RFC 6887
/// §11.2.1, so a crashed client's mapping lasts at most this long).
pub const MAX_LIFETIME_SECS: u32 = 86_400;
/// Most mappings one internal host holds at once (RFC 6887 §18.1: a host cannot take all).
pub const MAX_MAPPINGS_PER_HOST: usize = 64;
/// Most mappings at once; well inside the binding maps' room for static entries
/// (`nat_common::maps::STATIC_FORWARD_RESERVE`), so operators' forwards always fit.
pub const MAX_MAPPINGS_TOTAL: usize = 1_024;
/// External ports tried when the suggested one is taken or none was suggested.
pub const MAX_PORT_PROBES: u32 = 128;

/// Which protocol made a mapping (shown as its state in `nat-ctl mappings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Via {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT-PMP (RFC 6886).
    NatPmp,
    /// UPnP IGD (WANIPConnection:1 AddPortMapping).
    Upnp,
}

impl Via {
    /// The binding flag that marks this protocol's mappings in the kernel maps.
    pub const fn flag(self) -> u8 {
        match self {
            Via::Pcp => nat_common::maps::BINDING_FLAG_PCP,
            Via::NatPmp => nat_common::maps::BINDING_FLAG_NATPMP,
            Via::Upnp => nat_common::maps::BINDING_FLAG_UPNP,
        }
    }

    /// `pcp`, `nat-pmp` or `upnp`.
    pub const fn name(self) -> &'static str {
        match self {
            Via::Pcp => "pcp",
            Via::NatPmp => "nat-pmp",
            Via::Upnp => "upnp",
        }
    }

    /// The protocol whose flag is set in a marked binding's `flags`.
    pub const fn of_flags(flags: u8) -> Via {
        if flags & nat_common::maps::BINDING_FLAG_PCP != 0 {
            Via::Pcp
        } else if flags & nat_common::maps::BINDING_FLAG_UPNP != 0 {
            Via::Upnp
        } else {
            Via::NatPmp
        }
    }
}

/// One mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// `proto::UDP` or `proto::TCP`.
    pub proto: u8,
    /// The host's endpoint.
    pub internal: SocketAddrV4,
    /// The external port (the address is the NAT's, and follows it).
    pub external_port: u16,
    /// When it ends, CLOCK_MONOTONIC ns (survives a daemon restart, not a reboot, as the pinned
    /// maps do).
    pub expires_ns: u64,
    /// PCP's nonce; a renewal or deletion must repeat it (RFC 6887 §11.3).
    pub nonce: Option<[u8; 12]>,
    /// Which protocol made it.
    pub via: Via,
    /// It turned the host's existing dynamic binding into a mapping; at its end the binding
    /// goes back to the sweep instead of being deleted.
    pub adopted: bool,
    /// UPnP's NewPortMappingDescription (empty for the other protocols).
    #[serde(default)]
    pub description: String,
}

/// What holds an internal endpoint in the binding maps (endpoint-independent key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nothing.
    Free,
    /// A dynamic binding on this external port.
    Dynamic(u16),
    /// A static forward (or a mapping unknown to this table).
    Static,
}

/// The kernel side of mappings.
pub trait Dataplane {
    /// The external address mappings use now, if the NAT has one.
    fn external_addr(&mut self) -> Option<Ipv4Addr>;
    /// The external ports mappings may take: the NAT's dynamic range, whose ports are the
    /// NAT's to hand out (never a port of the gateway's own services).
    fn port_range(&mut self) -> (u16, u16);
    /// What holds `internal` now.
    fn holder(&mut self, proto: u8, internal: SocketAddrV4) -> Holder;
    /// Installs a mapping on `external_port` if that port is free, atomically (false: taken).
    fn install(&mut self, proto: u8, external_port: u16, internal: SocketAddrV4, via: Via) -> Result<bool>;
    /// Marks the host's dynamic binding of `internal` as a mapping.
    fn adopt(&mut self, proto: u8, internal: SocketAddrV4, via: Via) -> Result<()>;
    /// Ends a mapping: deletes its entries, or gives an adopted binding back to the sweep.
    fn remove(&mut self, mapping: &Mapping) -> Result<()>;
    /// The external port of the binding the flow from `internal` to `remote` uses, if any
    /// (per-remote in symmetric mode, else the endpoint's).
    fn flow_port(&mut self, proto: u8, internal: SocketAddrV4, remote: SocketAddrV4) -> Option<u16>;
}

/// A request to create, renew or delete (lifetime 0) a mapping, from either protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// `proto::UDP` or `proto::TCP`.
    pub proto: u8,
    /// The host's endpoint (its address is the request's source; RFC 6887 §18.1).
    pub internal: SocketAddrV4,
    /// The external port asked for, 0 for none.
    pub suggested_port: u16,
    /// Seconds; 0 deletes.
    pub lifetime: u32,
    /// PCP's nonce (NAT-PMP has none).
    pub nonce: Option<[u8; 12]>,
    /// PCP PREFER_FAILURE: the suggested port or nothing (RFC 6887 §13.2).
    pub prefer_failure: bool,
    /// Which protocol asks.
    pub via: Via,
}

/// Why a request was refused; each protocol has its result code for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The endpoint is a static forward's, or another client's mapping (wrong nonce).
    NotAuthorized,
    /// No free external port, or the total limit is reached.
    NoResources,
    /// The host holds `MAX_MAPPINGS_PER_HOST`.
    HostQuota,
    /// PREFER_FAILURE and the suggested port cannot be given.
    CannotProvideExternal,
    /// The NAT has no external address.
    NoExternalAddress,
}

/// A granted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granted {
    /// Created or renewed.
    Mapped {
        /// External endpoint.
        external: SocketAddrV4,
        /// Seconds granted.
        lifetime: u32,
    },
    /// Deleted, or there was nothing to delete (both succeed, RFC 6887 §15, RFC 6886 §3.4).
    Deleted,
}

/// Every mapping, and the policy.
#[derive(Debug, Default)]
pub struct Mappings {
    list: Vec<Mapping>,
    /// Next port to probe from when none is suggested; moved on by each probe, so successive
    /// mappings spread over the range.
    cursor: u32,
}

const NS_PER_SEC: u64 = 1_000_000_000;

impl Mappings {
    /// A table holding `list` (restored after a restart).
    pub fn with(list: Vec<Mapping>, seed: u32) -> Self {
        Mappings { list, cursor: seed }
    }

    /// Every mapping.
    pub fn list(&self) -> &[Mapping] {
        &self.list
    }

    /// The earliest expiry, for the timer.
    pub fn next_expiry(&self) -> Option<u64> {
        self.list.iter().map(|m| m.expires_ns).min()
    }

    /// Serves a request at `now_ns`.
    pub fn request(
        &mut self,
        dp: &mut dyn Dataplane,
        req: &MapRequest,
        now_ns: u64,
    ) -> Result<Result<Granted, Refusal>> {
        let existing = self
            .list
            .iter()
            .position(|m| m.proto == req.proto && m.internal == req.internal);
        if let Some(i) = existing {
            // RFC 6887 §11.3: only the client that made a mapping (same nonce) renews or
            // deletes it. A NAT-PMP request finds a NAT-PMP mapping by endpoint (RFC 6886
            // has no nonce); the two protocols do not manage each other's mappings.
            let m = &self.list[i];
            if m.via != req.via || m.nonce != req.nonce {
                return Ok(Err(Refusal::NotAuthorized));
            }
        }
        if req.lifetime == 0 {
            if let Some(i) = existing {
                let m = self.list.remove(i);
                dp.remove(&m)?;
            }
            return Ok(Ok(Granted::Deleted));
        }
        let Some(addr) = dp.external_addr() else {
            return Ok(Err(Refusal::NoExternalAddress));
        };
        let lifetime = req.lifetime.min(MAX_LIFETIME_SECS);
        let expires_ns = now_ns + u64::from(lifetime) * NS_PER_SEC;
        if let Some(i) = existing {
            let m = &mut self.list[i];
            if req.prefer_failure && req.suggested_port != 0 && req.suggested_port != m.external_port {
                return Ok(Err(Refusal::CannotProvideExternal));
            }
            m.expires_ns = expires_ns;
            return Ok(Ok(Granted::Mapped {
                external: SocketAddrV4::new(addr, m.external_port),
                lifetime,
            }));
        }
        if self
            .list
            .iter()
            .filter(|m| m.internal.ip() == req.internal.ip())
            .count()
            >= MAX_MAPPINGS_PER_HOST
        {
            return Ok(Err(Refusal::HostQuota));
        }
        if self.list.len() >= MAX_MAPPINGS_TOTAL {
            return Ok(Err(Refusal::NoResources));
        }
        let (external_port, adopted) = match dp.holder(req.proto, req.internal) {
            Holder::Static => return Ok(Err(Refusal::NotAuthorized)),
            // RFC 6887 §11.3: an endpoint-independent NAT that already maps the endpoint
            // answers with that mapping, so the host keeps the port its peers know.
            Holder::Dynamic(port) => {
                if req.prefer_failure && req.suggested_port != port {
                    return Ok(Err(Refusal::CannotProvideExternal));
                }
                dp.adopt(req.proto, req.internal, req.via)?;
                (port, true)
            }
            Holder::Free => match self.claim(dp, req)? {
                Ok(port) => (port, false),
                Err(refusal) => return Ok(Err(refusal)),
            },
        };
        self.list.push(Mapping {
            proto: req.proto,
            internal: req.internal,
            external_port,
            expires_ns,
            nonce: req.nonce,
            via: req.via,
            adopted,
            description: String::new(),
        });
        Ok(Ok(Granted::Mapped {
            external: SocketAddrV4::new(addr, external_port),
            lifetime,
        }))
    }

    /// Claims an external port: the suggested one when it is in range and free, else (unless
    /// PREFER_FAILURE) the first free one probing from the cursor.
    fn claim(&mut self, dp: &mut dyn Dataplane, req: &MapRequest) -> Result<Result<u16, Refusal>> {
        let (min, max) = dp.port_range();
        let in_range = (min..=max).contains(&req.suggested_port);
        if req.suggested_port != 0
            && in_range
            && dp.install(req.proto, req.suggested_port, req.internal, req.via)?
        {
            return Ok(Ok(req.suggested_port));
        }
        if req.prefer_failure {
            return Ok(Err(Refusal::CannotProvideExternal));
        }
        let span = u32::from(max - min) + 1;
        for _ in 0..MAX_PORT_PROBES.min(span) {
            let port = min + (self.cursor % span) as u16;
            self.cursor = self.cursor.wrapping_add(1);
            if dp.install(req.proto, port, req.internal, req.via)? {
                return Ok(Ok(port));
            }
        }
        Ok(Err(Refusal::NoResources))
    }

    /// Ends every mapping whose lifetime is over at `now_ns` (none outlives its expiry by more
    /// than the timer's delay), returning them.
    pub fn expire(&mut self, dp: &mut dyn Dataplane, now_ns: u64) -> Vec<Mapping> {
        let (gone, kept): (Vec<Mapping>, Vec<Mapping>) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|m| m.expires_ns <= now_ns);
        self.list = kept;
        for m in &gone {
            if let Err(e) = dp.remove(m) {
                tracing::warn!(
                    "port mapping: cannot remove {} {}: {e:#}",
                    nat_common::proto::name(m.proto),
                    m.internal
                );
            }
        }
        gone
    }

    /// Sets the description of the mapping of `internal` (UPnP's NewPortMappingDescription).
    pub fn describe(&mut self, proto: u8, internal: SocketAddrV4, description: &str) {
        if let Some(m) = self
            .list
            .iter_mut()
            .find(|m| m.proto == proto && m.internal == internal)
        {
            m.description = description.to_string();
        }
    }

    /// Seconds `m` has left at `now_ns`.
    pub fn remaining_secs(m: &Mapping, now_ns: u64) -> u32 {
        (m.expires_ns.saturating_sub(now_ns) / NS_PER_SEC) as u32
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use nat_common::proto;

    use super::*;

    const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    /// External ports taken (port -> internal) and endpoints held.
    #[derive(Default)]
    struct Fake {
        ports: HashMap<(u8, u16), SocketAddrV4>,
        dynamic: HashMap<(u8, SocketAddrV4), u16>,
        statics: Vec<(u8, SocketAddrV4)>,
        adopted: Vec<SocketAddrV4>,
        no_addr: bool,
    }

    impl Dataplane for Fake {
        fn external_addr(&mut self) -> Option<Ipv4Addr> {
            (!self.no_addr).then_some(EXT)
        }
        fn port_range(&mut self) -> (u16, u16) {
            (20_000, 20_009)
        }
        fn holder(&mut self, proto: u8, internal: SocketAddrV4) -> Holder {
            if self.statics.contains(&(proto, internal)) {
                Holder::Static
            } else if let Some(port) = self.dynamic.get(&(proto, internal)) {
                Holder::Dynamic(*port)
            } else {
                Holder::Free
            }
        }
        fn install(&mut self, proto: u8, port: u16, internal: SocketAddrV4, _: Via) -> Result<bool> {
            if self.ports.contains_key(&(proto, port)) {
                return Ok(false);
            }
            self.ports.insert((proto, port), internal);
            Ok(true)
        }
        fn adopt(&mut self, _: u8, internal: SocketAddrV4, _: Via) -> Result<()> {
            self.adopted.push(internal);
            Ok(())
        }
        fn flow_port(&mut self, proto: u8, internal: SocketAddrV4, _: SocketAddrV4) -> Option<u16> {
            self.dynamic.get(&(proto, internal)).copied()
        }
        fn remove(&mut self, m: &Mapping) -> Result<()> {
            if m.adopted {
                self.adopted.retain(|a| *a != m.internal);
            } else {
                self.ports.remove(&(m.proto, m.external_port));
            }
            Ok(())
        }
    }

    fn req(port: u16, suggested: u16, lifetime: u32) -> MapRequest {
        MapRequest {
            proto: proto::UDP,
            internal: SocketAddrV4::new(HOST, port),
            suggested_port: suggested,
            lifetime,
            nonce: Some([1; 12]),
            prefer_failure: false,
            via: Via::Pcp,
        }
    }

    fn mapped(g: Result<Result<Granted, Refusal>>) -> (u16, u32) {
        match g.unwrap() {
            Ok(Granted::Mapped { external, lifetime }) => (external.port(), lifetime),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_renew_delete_expire() {
        let mut dp = Fake::default();
        let mut t = Mappings::default();
        // Suggested port honoured when free; lifetime capped.
        assert_eq!(
            mapped(t.request(&mut dp, &req(4000, 20_005, 999_999), 0)),
            (20_005, MAX_LIFETIME_SECS)
        );
        // Renewal keeps the port and moves the expiry.
        assert_eq!(
            mapped(t.request(&mut dp, &req(4000, 0, 60), 10 * NS_PER_SEC)),
            (20_005, 60)
        );
        assert_eq!(t.next_expiry(), Some(70 * NS_PER_SEC));
        // Another client (nonce) cannot renew or delete it.
        let mut other = req(4000, 0, 0);
        other.nonce = Some([2; 12]);
        assert_eq!(
            t.request(&mut dp, &other, 10 * NS_PER_SEC).unwrap(),
            Err(Refusal::NotAuthorized)
        );
        // Taken suggestion: another port, unless PREFER_FAILURE.
        let (port, _) = mapped(t.request(&mut dp, &req(4001, 20_005, 60), 10 * NS_PER_SEC));
        assert_ne!(port, 20_005);
        let mut strict = req(4002, 20_005, 60);
        strict.prefer_failure = true;
        assert_eq!(
            t.request(&mut dp, &strict, 10 * NS_PER_SEC).unwrap(),
            Err(Refusal::CannotProvideExternal)
        );
        // Outside the NAT's range: not honoured.
        let (port, _) = mapped(t.request(&mut dp, &req(4003, 22, 60), 10 * NS_PER_SEC));
        assert!((20_000..=20_009).contains(&port));
        // Lifetime 0 deletes; deleting nothing succeeds.
        assert_eq!(
            t.request(&mut dp, &req(4000, 0, 0), 20 * NS_PER_SEC).unwrap(),
            Ok(Granted::Deleted)
        );
        assert!(!dp.ports.contains_key(&(proto::UDP, 20_005)));
        assert_eq!(
            t.request(&mut dp, &req(4000, 0, 0), 20 * NS_PER_SEC).unwrap(),
            Ok(Granted::Deleted)
        );
        // Expiry at the lifetime's end, not before.
        assert!(t.expire(&mut dp, 69 * NS_PER_SEC).is_empty());
        assert_eq!(t.expire(&mut dp, 70 * NS_PER_SEC).len(), 2);
        assert!(t.list().is_empty());
        assert!(dp.ports.is_empty());
    }

    #[test]
    fn holders_and_limits() {
        let mut dp = Fake::default();
        let mut t = Mappings::default();
        let forward = SocketAddrV4::new(HOST, 80);
        dp.statics.push((proto::UDP, forward));
        assert_eq!(
            t.request(&mut dp, &req(80, 0, 60), 0).unwrap(),
            Err(Refusal::NotAuthorized)
        );
        // A live dynamic binding becomes the mapping, with its port.
        dp.dynamic
            .insert((proto::UDP, SocketAddrV4::new(HOST, 5000)), 20_003);
        assert_eq!(
            mapped(t.request(&mut dp, &req(5000, 20_007, 60), 0)),
            (20_003, 60)
        );
        assert_eq!(dp.adopted, [SocketAddrV4::new(HOST, 5000)]);
        t.expire(&mut dp, u64::MAX);
        assert!(dp.adopted.is_empty());
        // The range has 10 ports: the 11th mapping finds none.
        for port in 0..10 {
            mapped(t.request(&mut dp, &req(6000 + port, 0, 60), 0));
        }
        assert_eq!(
            t.request(&mut dp, &req(7000, 0, 60), 0).unwrap(),
            Err(Refusal::NoResources)
        );
        dp.no_addr = true;
        assert_eq!(
            t.request(&mut dp, &req(7001, 0, 60), 0).unwrap(),
            Err(Refusal::NoExternalAddress)
        );
    }

    #[test]
    fn per_host_quota() {
        #[derive(Default)]
        struct Roomy(Fake);
        impl Dataplane for Roomy {
            fn external_addr(&mut self) -> Option<Ipv4Addr> {
                Some(EXT)
            }
            fn port_range(&mut self) -> (u16, u16) {
                (1024, 65_535)
            }
            fn holder(&mut self, p: u8, i: SocketAddrV4) -> Holder {
                self.0.holder(p, i)
            }
            fn install(&mut self, p: u8, port: u16, i: SocketAddrV4, v: Via) -> Result<bool> {
                self.0.install(p, port, i, v)
            }
            fn adopt(&mut self, p: u8, i: SocketAddrV4, v: Via) -> Result<()> {
                self.0.adopt(p, i, v)
            }
            fn remove(&mut self, m: &Mapping) -> Result<()> {
                self.0.remove(m)
            }
            fn flow_port(&mut self, p: u8, i: SocketAddrV4, r: SocketAddrV4) -> Option<u16> {
                self.0.flow_port(p, i, r)
            }
        }
        let mut dp = Roomy::default();
        let mut t = Mappings::default();
        for port in 0..MAX_MAPPINGS_PER_HOST as u16 {
            mapped(t.request(&mut dp, &req(1000 + port, 0, 60), 0));
        }
        assert_eq!(
            t.request(&mut dp, &req(9999, 0, 60), 0).unwrap(),
            Err(Refusal::HostQuota)
        );
        let mut other = req(9999, 0, 60);
        other.internal = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 3), 9999);
        mapped(t.request(&mut dp, &other, 0));
    }
}
