//! The NAT's maps, opened from their pins, and filling them with bindings from userspace.
//!
//! A binding as the data path would create it is four entries: the outbound entry, the inbound
//! entry, and the two sessions of its one remote (address and port for APDF, address only for
//! ADF). Filling from userspace lets the scale runs start with up to a million live bindings
//! without first sending a million new flows.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use nat_common::{
    maps::{
        names, SESSION_FLAG_INTERNAL_ENDPOINT, SESSION_FLAG_OFFLOAD_IN, SESSION_FLAG_OFFLOAD_OUT,
        SESSION_KIND_ADDRESS, SESSION_KIND_ENDPOINT,
    },
    proto, BindingKey, BindingValue, Counter, ExternalKey, ExternalValue, NatConfig, SessionKey,
    SessionValue,
};
use nat_ctl::{clock::monotonic_ns, pinned::BPF_NOEXIST};

/// The maps the benchmark reads and writes.
pub struct NatMaps {
    /// Single-entry config.
    pub config: Array<MapData, NatConfig>,
    /// Outbound bindings.
    pub bindings_out: HashMap<MapData, BindingKey, BindingValue>,
    /// Inbound bindings.
    pub bindings_in: HashMap<MapData, ExternalKey, ExternalValue>,
    /// Sessions.
    pub sessions: HashMap<MapData, SessionKey, SessionValue>,
    /// Per-CPU counters.
    pub counters: PerCpuArray<MapData, u64>,
}

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("cannot open pinned map {}", path.display()))
}

/// IPv4 address in network byte order as the maps store it.
pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Port in network byte order as the maps store it.
pub fn be16(port: u16) -> u16 {
    port.to_be()
}

/// The map entries of one binding.
struct Entries {
    out_key: BindingKey,
    out_value: BindingValue,
    in_key: ExternalKey,
    in_value: ExternalValue,
    /// Address-and-port and address-only sessions with the remote.
    session_keys: [SessionKey; 2],
    session: SessionValue,
}

impl Entries {
    /// `offload`: the session's fast-path bits are set (see `SESSION_FLAG_OFFLOAD_OUT`), as the
    /// data path sets them only in an instance whose fast path is on.
    fn of(b: &Binding, now_ns: u64, offload: bool) -> Entries {
        let out_key = BindingKey::of_endpoint(proto::UDP, b.internal);
        let out_value = BindingValue {
            last_seen_ns: now_ns,
            external_addr: be(*b.external.ip()),
            external_port: be16(b.external.port()),
            flags: 0,
            _pad: 0,
        };
        let in_key = ExternalKey::of_endpoint(proto::UDP, b.external);
        let in_value = ExternalValue {
            internal_addr: out_key.internal_addr,
            remote_addr: 0,
            internal_port: out_key.internal_port,
            remote_port: 0,
            flags: 0,
            _pad: [0; 3],
        };
        let session_key = |kind, remote_port| {
            SessionKey::new(
                proto::UDP,
                kind,
                in_key.external_addr,
                in_key.external_port,
                be(*b.remote.ip()),
                remote_port,
            )
        };
        Entries {
            out_key,
            out_value,
            in_key,
            in_value,
            session_keys: [
                session_key(SESSION_KIND_ENDPOINT, be16(b.remote.port())),
                session_key(SESSION_KIND_ADDRESS, 0),
            ],
            session: SessionValue {
                last_seen_ns: now_ns,
                tcp_state: 0,
                // With `offload`, as if each flow's first packets had passed the kernel's
                // forwarding path both ways: a prefilled flow is an established one. It holds
                // its internal endpoint, as the data path writes it.
                flags: if offload {
                    SESSION_FLAG_OFFLOAD_OUT | SESSION_FLAG_OFFLOAD_IN | SESSION_FLAG_INTERNAL_ENDPOINT
                } else {
                    SESSION_FLAG_INTERNAL_ENDPOINT
                },
                internal_addr: out_key.internal_addr,
                internal_port: out_key.internal_port,
                ..SessionValue::default()
            },
        }
    }
}

/// One UDP binding with one remote.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    /// Internal endpoint.
    pub internal: SocketAddrV4,
    /// External endpoint.
    pub external: SocketAddrV4,
    /// The remote it has sent to.
    pub remote: SocketAddrV4,
}

impl NatMaps {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<NatMaps> {
        Ok(NatMaps {
            config: Array::try_from(Map::Array(open(dir, names::CONFIG)?))?,
            bindings_out: HashMap::try_from(Map::HashMap(open(dir, names::BINDINGS_OUT)?))?,
            bindings_in: HashMap::try_from(Map::HashMap(open(dir, names::BINDINGS_IN)?))?,
            sessions: HashMap::try_from(Map::HashMap(open(dir, names::SESSIONS)?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(dir, names::COUNTERS)?))?,
        })
    }

    /// A counter summed over CPUs.
    pub fn counter(&self, c: Counter) -> Result<u64> {
        Ok(self.counters.get(&(c as u32), 0)?.iter().sum())
    }

    /// Inserts `b` as the data path would have created it (endpoint-independent mapping) in an
    /// instance without the fast path, such as the cost phase's test instance (no internal
    /// interface): its sessions never get the fast-path bits there.
    pub fn insert(&mut self, b: &Binding, now_ns: u64) -> Result<()> {
        let e = Entries::of(b, now_ns, false);
        self.bindings_in
            .insert(e.in_key, e.in_value, BPF_NOEXIST)
            .with_context(|| format!("cannot insert the inbound entry of {b:?}"))?;
        self.bindings_out
            .insert(e.out_key, e.out_value, BPF_NOEXIST)
            .with_context(|| format!("cannot insert the outbound entry of {b:?}"))?;
        for key in e.session_keys {
            self.sessions
                .insert(key, e.session, BPF_NOEXIST)
                .with_context(|| format!("cannot insert a session of {b:?}"))?;
        }
        Ok(())
    }

    /// Removes `b`'s four entries, as far as they exist; returns how many were missing.
    pub fn remove(&mut self, b: &Binding) -> u32 {
        let e = Entries::of(b, 0, false);
        let mut missing = u32::from(self.bindings_in.remove(&e.in_key).is_err());
        missing += u32::from(self.bindings_out.remove(&e.out_key).is_err());
        for key in &e.session_keys {
            missing += u32::from(self.sessions.remove(key).is_err());
        }
        missing
    }

    /// Removes bindings `0..n` of `layout` again; returns how many entries were missing.
    pub fn unfill(&mut self, layout: &ScaleLayout, n: u32) -> u32 {
        (0..n).map(|i| self.remove(&layout.binding(i))).sum()
    }

    /// Inserts bindings `0..n` of `layout`, used just now; returns how long it took.
    pub fn fill(&mut self, layout: &ScaleLayout, n: u32) -> Result<Duration> {
        let start = Instant::now();
        self.fill_range(layout, 0..n, monotonic_ns())?;
        Ok(start.elapsed())
    }

    /// Inserts bindings `range` of `layout` as last used at `last_seen_ns`, in batches
    /// (`BPF_MAP_UPDATE_BATCH`, thousands of entries per call: a million bindings are four
    /// million entries). Unlike `insert`, an entry already there is overwritten.
    pub fn fill_range(
        &mut self,
        layout: &ScaleLayout,
        range: std::ops::Range<u32>,
        last_seen_ns: u64,
    ) -> Result<()> {
        let indexes: Vec<u32> = range.collect();
        for chunk in indexes.chunks(nat_ctl::batch::CHUNK) {
            let entries: Vec<Entries> = chunk
                .iter()
                .map(|&i| Entries::of(&layout.binding(i), last_seen_ns, true))
                .collect();
            let inbound: Vec<_> = entries.iter().map(|e| (e.in_key, e.in_value)).collect();
            let outbound: Vec<_> = entries.iter().map(|e| (e.out_key, e.out_value)).collect();
            let sessions: Vec<_> = entries
                .iter()
                .flat_map(|e| e.session_keys.map(|k| (k, e.session)))
                .collect();
            nat_ctl::batch::update(&self.bindings_in, &inbound)
                .context("cannot fill the inbound bindings")?;
            nat_ctl::batch::update(&self.bindings_out, &outbound)
                .context("cannot fill the outbound bindings")?;
            nat_ctl::batch::update(&self.sessions, &sessions).context("cannot fill the sessions")?;
        }
        Ok(())
    }
}

/// How the scale runs number their bindings, so the generator can address any of them by a
/// flow index: binding `i` is internal `host_base + i / PORTS_PER_HOST : PORT_BASE + i %
/// PORTS_PER_HOST`, keeps its port, and talks to `remote`. The first `PORTS_PER_HOST` use the
/// NAT's external address; the rest, which one address could not hold (64 512 ports), use
/// addresses from `filler_external_base` on: the data path never checks a binding's external
/// address against the config, so they translate like any other binding.
#[derive(Clone, Copy, Debug)]
pub struct ScaleLayout {
    /// First internal host.
    pub host_base: Ipv4Addr,
    /// The NAT's external address.
    pub external: Ipv4Addr,
    /// First external address of bindings beyond the first `PORTS_PER_HOST`.
    pub filler_external_base: Ipv4Addr,
    /// The remote every binding talks to.
    pub remote: SocketAddrV4,
}

impl ScaleLayout {
    /// Ports per internal host (and per external address).
    pub const PORTS_PER_HOST: u32 = 50_000;
    /// First port of every host.
    pub const PORT_BASE: u16 = 10_000;

    /// Binding `i`.
    pub fn binding(&self, i: u32) -> Binding {
        let host = i / Self::PORTS_PER_HOST;
        let port = Self::PORT_BASE + (i % Self::PORTS_PER_HOST) as u16;
        let external = if host == 0 {
            self.external
        } else {
            Ipv4Addr::from(u32::from(self.filler_external_base) + host)
        };
        Binding {
            internal: SocketAddrV4::new(Ipv4Addr::from(u32::from(self.host_base) + host), port),
            external: SocketAddrV4::new(external, port),
            remote: self.remote,
        }
    }

    /// How many bindings inbound traffic can address (those on the NAT's external address).
    pub fn inbound_reachable(n: u32) -> u32 {
        n.min(Self::PORTS_PER_HOST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_spreads_hosts_and_keeps_ports() {
        let l = ScaleLayout {
            host_base: Ipv4Addr::new(10, 64, 0, 0),
            external: Ipv4Addr::new(198, 51, 100, 254),
            filler_external_base: Ipv4Addr::new(100, 64, 0, 0),
            remote: "198.51.100.1:4000".parse().unwrap(),
        };
        let b = l.binding(0);
        assert_eq!(b.internal, "10.64.0.0:10000".parse().unwrap());
        assert_eq!(b.external, "198.51.100.254:10000".parse().unwrap());
        let b = l.binding(ScaleLayout::PORTS_PER_HOST + 5);
        assert_eq!(b.internal, "10.64.0.1:10005".parse().unwrap());
        assert_eq!(b.external, "100.64.0.1:10005".parse().unwrap());
        assert_eq!(
            ScaleLayout::inbound_reachable(1_000_000),
            ScaleLayout::PORTS_PER_HOST
        );
    }
}
