//! Keys and values of the NAT's kernel maps, and the names the maps are pinned under.
//!
//! A *binding* (RFC 4787 "mapping") ties an internal endpoint to an external endpoint; it is
//! stored twice, once per lookup direction (`BINDINGS_OUT`, `BINDINGS_IN`). A *session* records
//! that the internal endpoint has sent to a remote; inbound filtering (ADF/APDF) looks for one.

/// Map names, as declared in nat-ebpf and pinned under the instance's bpffs directory.
pub mod names {
    /// `NatConfig`, one entry.
    pub const CONFIG: &str = "NAT_CONFIG";
    /// `BindingKey -> BindingValue`.
    pub const BINDINGS_OUT: &str = "NAT_BINDINGS_OUT";
    /// `ExternalKey -> ExternalValue`.
    pub const BINDINGS_IN: &str = "NAT_BINDINGS_IN";
    /// `SessionKey -> SessionValue`.
    pub const SESSIONS: &str = "NAT_SESSIONS";
    /// `FragmentKey -> FragmentValue`.
    pub const FRAGMENTS: &str = "NAT_FRAGMENTS";
    /// Per-CPU `u64` counters indexed by `Counter`.
    pub const COUNTERS: &str = "NAT_COUNTERS";
    /// `u32` internal address (0 = all hosts) -> bindings created by the data path.
    pub const USAGE_CREATED: &str = "NAT_USAGE_CREATED";
    /// `u32` internal address (0 = all hosts) -> bindings removed by the controller.
    pub const USAGE_RELEASED: &str = "NAT_USAGE_RELEASED";
    /// `u32` ifindex -> `u32` (unused): interfaces the fast path may redirect to.
    pub const FAST_PATH_IFACES: &str = "NAT_FAST_PATH_IFACES";
    /// One `u32`, nonzero while any interface is in `FAST_PATH_IFACES`.
    pub const FAST_PATH_ON: &str = "NAT_FAST_PATH_ON";
    /// Ring buffer of `ParkedFragment`s for the controller.
    pub const PARKED_FRAGMENTS: &str = "NAT_PARKED_FRAGMENTS";
    /// Ring buffer of `Notice`s for the controller.
    pub const NOTICES: &str = "NAT_NOTICES";
    /// `SessionUsageKey` -> sessions created by the data path.
    pub const SESSION_USAGE_CREATED: &str = "NAT_SESS_USE_CREATED";
    /// `SessionUsageKey` -> sessions removed by the controller.
    pub const SESSION_USAGE_RELEASED: &str = "NAT_SESS_USE_RELEASED";
    /// Every map, for pin clean-up.
    pub const ALL: [&str; 14] = [
        CONFIG,
        BINDINGS_OUT,
        BINDINGS_IN,
        SESSIONS,
        FRAGMENTS,
        COUNTERS,
        USAGE_CREATED,
        USAGE_RELEASED,
        FAST_PATH_IFACES,
        FAST_PATH_ON,
        PARKED_FRAGMENTS,
        NOTICES,
        SESSION_USAGE_CREATED,
        SESSION_USAGE_RELEASED,
    ];
}

/// Default limit on dynamic bindings where the machine's RAM is not known, and the capacity
/// the eBPF object is built with (the controller sizes the maps at load): the most a
/// RAM-derived default gives (`table_size::default_max_bindings`).
pub const DEFAULT_MAX_BINDINGS: u32 = crate::table_size::MAX_DEFAULT_MAX_BINDINGS;
/// Room kept in the binding maps beyond the dynamic limit, so static forwards always fit.
pub const STATIC_FORWARD_RESERVE: u32 = 4_096;
/// Session map entries per allowed binding (each remote a binding talks to takes two: one
/// keyed by address and port, one by address only).
pub const SESSIONS_PER_BINDING: u32 = 4;
/// Capacity of the per-host usage maps: how many internal hosts can hold bindings at once.
pub const MAX_USAGE_HOSTS: u32 = 65_536;
/// Most interfaces the fast path redirects between (the external one and the internal ones).
pub const MAX_FAST_PATH_IFACES: u32 = 64;
/// Key of the all-hosts total in the usage maps (0.0.0.0 is never an internal host).
pub const USAGE_ALL_HOSTS: u32 = 0;

/// Capacity of each binding map for a dynamic-binding limit.
pub const fn binding_map_capacity(max_bindings: u32) -> u32 {
    max_bindings.saturating_add(STATIC_FORWARD_RESERVE)
}

/// Capacity of the session map for a dynamic-binding limit.
pub const fn session_map_capacity(max_bindings: u32) -> u32 {
    binding_map_capacity(max_bindings).saturating_mul(SESSIONS_PER_BINDING)
}

/// Sessions (remote endpoints, the rows of the NAT table) the session map surely holds: each
/// takes at most two entries, its own and its remote address's.
pub const fn session_capacity(max_bindings: u32) -> u32 {
    session_map_capacity(max_bindings) / 2
}

/// The default per-host session limit is the session capacity divided by this: one host can
/// take a quarter of the table, so it takes at least four flooding hosts to fill it, and a host
/// at its limit still holds far more sessions than any legitimate client uses (30 720 with
/// the largest default table; a busy peer-to-peer client uses a few thousand).
pub const DEFAULT_HOST_SESSION_SHARE: u32 = 4;
/// The default per-binding session limit is the per-host default divided by this: one socket
/// (a port flooding many remotes) cannot take all of its host's share, so the host's other
/// applications still open connections.
pub const DEFAULT_BINDING_SESSION_SHARE: u32 = 4;

/// Default `--max-sessions-per-host` for a dynamic-binding limit (at least 1).
pub const fn default_max_sessions_per_host(max_bindings: u32) -> u32 {
    let n = session_capacity(max_bindings) / DEFAULT_HOST_SESSION_SHARE;
    if n == 0 {
        1
    } else {
        n
    }
}

/// Default `--max-sessions-per-binding` for a dynamic-binding limit (at least 1).
pub const fn default_max_sessions_per_binding(max_bindings: u32) -> u32 {
    let n = default_max_sessions_per_host(max_bindings) / DEFAULT_BINDING_SESSION_SHARE;
    if n == 0 {
        1
    } else {
        n
    }
}

/// Capacity of the session usage maps: the all-hosts total, every internal host, every binding.
pub const fn session_usage_capacity(max_bindings: u32) -> u32 {
    binding_map_capacity(max_bindings)
        .saturating_add(MAX_USAGE_HOSTS)
        .saturating_add(1)
}

/// `SessionUsageKey::kind`: the total over all hosts (every other field zero).
pub const SESSION_USAGE_ALL: u8 = 0;
/// `SessionUsageKey::kind`: one internal host (`addr`).
pub const SESSION_USAGE_HOST: u8 = 1;
/// `SessionUsageKey::kind`: one binding (`proto`, external `addr` and `port`).
pub const SESSION_USAGE_BINDING: u8 = 2;

/// What a session count is kept for (RFC 6888 REQ-5: state per subscriber and per mapping).
/// Sessions are counted like bindings (`USAGE_*`): the data path adds to `*_CREATED` maps,
/// only the controller writes `*_RELEASED`, and the difference is the number in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionUsageKey {
    /// Internal address (host) or external address (binding), network order; 0 for the total.
    pub addr: u32,
    /// External port of a binding (network order), else 0.
    pub port: u16,
    /// IP protocol of a binding, else 0.
    pub proto: u8,
    /// `SESSION_USAGE_*`.
    pub kind: u8,
}

impl SessionUsageKey {
    /// The total over all hosts.
    pub const fn all() -> Self {
        SessionUsageKey {
            addr: 0,
            port: 0,
            proto: 0,
            kind: SESSION_USAGE_ALL,
        }
    }

    /// Internal host `addr` (network order).
    pub const fn host(addr: u32) -> Self {
        SessionUsageKey {
            addr,
            port: 0,
            proto: 0,
            kind: SESSION_USAGE_HOST,
        }
    }

    /// The binding with external endpoint `addr:port` (network order) for `proto`.
    pub const fn binding(proto: u8, addr: u32, port: u16) -> Self {
        SessionUsageKey {
            addr,
            port,
            proto,
            kind: SESSION_USAGE_BINDING,
        }
    }
}
/// Capacity of the fragment-tracking map; LRU, so a flood of stray fragments only evicts other
/// fragment state, never bindings (RFC 4787 REQ-14a).
pub const MAX_FRAGMENTS: u32 = 8_192;

/// `BindingValue::flags` / `ExternalValue::flags`: a static forward; never expires.
pub const BINDING_FLAG_STATIC: u8 = 1 << 0;
/// `BindingValue::flags` / `ExternalValue::flags`, always with `BINDING_FLAG_STATIC`: a port
/// mapping a host asked for with PCP (RFC 6887). The data path treats it as a static forward
/// (it tests only `BINDING_FLAG_STATIC`); the controller's port-mapping server removes it when
/// its lifetime ends.
pub const BINDING_FLAG_PCP: u8 = 1 << 1;
/// As `BINDING_FLAG_PCP`, for a mapping asked for with NAT-PMP (RFC 6886).
pub const BINDING_FLAG_NATPMP: u8 = 1 << 2;
/// As `BINDING_FLAG_PCP`, for a mapping asked for with UPnP IGD's AddPortMapping.
pub const BINDING_FLAG_UPNP: u8 = 1 << 3;
/// Any port-mapping flag.
pub const BINDING_FLAGS_PORT_MAPPING: u8 = BINDING_FLAG_PCP | BINDING_FLAG_NATPMP | BINDING_FLAG_UPNP;

/// Lookup key for outbound packets: the internal endpoint, plus the remote endpoint when the
/// mode maps per remote (symmetric). Remote fields are zero otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BindingKey {
    /// Internal address (network order).
    pub internal_addr: u32,
    /// Remote address, or 0 for an endpoint-independent binding (network order).
    pub remote_addr: u32,
    /// Internal port or ICMP echo identifier (network order).
    pub internal_port: u16,
    /// Remote port, or 0 for an endpoint-independent binding (network order).
    pub remote_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 3],
}

impl BindingKey {
    /// The endpoint-independent key of `internal` (remote fields zero): a cone-mode binding,
    /// a forward or a port mapping.
    pub const fn of_endpoint(proto: u8, internal: core::net::SocketAddrV4) -> Self {
        BindingKey {
            internal_addr: u32::from_ne_bytes(internal.ip().octets()),
            remote_addr: 0,
            internal_port: internal.port().to_be(),
            remote_port: 0,
            proto,
            _pad: [0; 3],
        }
    }
}

/// What an outbound packet is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BindingValue {
    /// Last outbound packet, `bpf_ktime_get_coarse_ns` clock (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
    /// External address (network order).
    pub external_addr: u32,
    /// External port or ICMP identifier (network order).
    pub external_port: u16,
    /// `BINDING_FLAG_*`.
    pub flags: u8,
    /// Explicit padding (always zero).
    pub _pad: u8,
}

/// Lookup key for inbound packets: the external endpoint the packet is addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ExternalKey {
    /// External address (network order).
    pub external_addr: u32,
    /// External port or ICMP identifier (network order).
    pub external_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding (always zero).
    pub _pad: u8,
}

impl ExternalKey {
    /// The key of `external`.
    pub const fn of_endpoint(proto: u8, external: core::net::SocketAddrV4) -> Self {
        ExternalKey {
            external_addr: u32::from_ne_bytes(external.ip().octets()),
            external_port: external.port().to_be(),
            proto,
            _pad: 0,
        }
    }

    /// The key of an external address and port already in network order, as map values
    /// hold them.
    pub const fn of_network_order(proto: u8, external_addr: u32, external_port: u16) -> Self {
        ExternalKey {
            external_addr,
            external_port,
            proto,
            _pad: 0,
        }
    }
}

/// The internal endpoint behind an external endpoint, and enough to rebuild the
/// `BindingKey` of the same binding (for deletion).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExternalValue {
    /// Internal address (network order).
    pub internal_addr: u32,
    /// The `BindingKey::remote_addr` of this binding.
    pub remote_addr: u32,
    /// Internal port or ICMP identifier (network order).
    pub internal_port: u16,
    /// The `BindingKey::remote_port` of this binding.
    pub remote_port: u16,
    /// `BINDING_FLAG_*`.
    pub flags: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 3],
}

impl ExternalValue {
    /// The outbound key of the binding this entry belongs to.
    pub const fn binding_key(&self, proto: u8) -> BindingKey {
        BindingKey {
            internal_addr: self.internal_addr,
            remote_addr: self.remote_addr,
            internal_port: self.internal_port,
            remote_port: self.remote_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// `SessionKey::kind`: the remote's address and port (for APDF).
pub const SESSION_KIND_ENDPOINT: u8 = 0;
/// `SessionKey::kind`: the remote's address only, port zero (for ADF).
pub const SESSION_KIND_ADDRESS: u8 = 1;

/// "The internal endpoint behind this external endpoint has sent to this remote."
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionKey {
    /// External address of the binding (network order).
    pub external_addr: u32,
    /// Remote address (network order).
    pub remote_addr: u32,
    /// External port of the binding (network order).
    pub external_port: u16,
    /// Remote port (network order); 0 for `SESSION_KIND_ADDRESS` and for ICMP.
    pub remote_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `SESSION_KIND_*`.
    pub kind: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
}

impl SessionKey {
    /// The session of kind `kind` between the binding's external endpoint and a remote, fields
    /// in network order as packets carry them. An address-only session has no remote port.
    #[inline(always)]
    pub const fn new(
        proto: u8,
        kind: u8,
        external_addr: u32,
        external_port: u16,
        remote_addr: u32,
        remote_port: u16,
    ) -> Self {
        SessionKey {
            external_addr,
            remote_addr,
            external_port,
            remote_port: if kind == SESSION_KIND_ADDRESS {
                0
            } else {
                remote_port
            },
            proto,
            kind,
            _pad: [0; 2],
        }
    }
}

/// `SessionValue::flags`: an outbound packet of this session has passed the kernel's forwarding
/// path (forward chain, rp_filter, routing) and left through the external interface, where TC
/// egress saw it. Only then may the XDP fast path take the session's outbound packets.
pub const SESSION_FLAG_OFFLOAD_OUT: u8 = 1 << 0;
/// `SessionValue::flags`: an inbound packet of this session has passed the kernel's forwarding
/// path and left through an internal interface, where the internal-side TC egress program saw
/// it. Only then may the XDP fast path take the session's inbound packets.
pub const SESSION_FLAG_OFFLOAD_IN: u8 = 1 << 1;
/// `SessionValue::flags`: `internal_addr` and `internal_port` are the internal endpoint of the
/// session's binding, written by the data path when it creates (or next refreshes) the
/// session. An established inbound packet is then translated from its session alone, one hash
/// lookup: the endpoint session both says that the mode's filter admits the remote (it has
/// been sent to, which every filtering behaviour allows, RFC 4787 §5) and holds the rewrite.
/// Without the bit (a session written by other code) the inbound packet looks up the binding.
pub const SESSION_FLAG_INTERNAL_ENDPOINT: u8 = 1 << 2;

/// State of one session.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionValue {
    /// Last outbound packet of this session (CLOCK_MONOTONIC ns).
    pub last_seen_ns: u64,
    /// `tcp_state::TcpState` as `u8` (TCP sessions only).
    pub tcp_state: u8,
    /// `SESSION_FLAG_*` bits, set by the data path (endpoint sessions only).
    pub flags: u8,
    /// `tcp_track::TRACK_*` bits (TCP endpoint sessions only).
    pub tcp_track: u8,
    /// Window scale each side offered in its SYN: the outbound side's in the low nibble, the
    /// inbound side's in the high one (`tcp_track::WSCALE_ABSENT` for none).
    pub tcp_wscale: u8,
    /// The internal host the session belongs to (network order), for the per-host session
    /// count that the controller decrements when the session goes.
    pub internal_addr: u32,
    /// Each side's sequence space, indexed outbound (internal host) then inbound (remote);
    /// see `tcp_track`.
    pub tcp_seq: [crate::tcp_track::SeqSpace; 2],
    /// The internal port or echo identifier of the session's binding (network order), valid
    /// with `SESSION_FLAG_INTERNAL_ENDPOINT`.
    pub internal_port: u16,
    /// Explicit padding (always zero).
    pub _pad: [u8; 6],
}

/// Identifies the fragments of one datagram (RFC 791: source, destination, protocol, ID).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    /// Source address as received (network order).
    pub src_addr: u32,
    /// Destination address as received (network order).
    pub dst_addr: u32,
    /// IP identification (network order).
    pub id: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding (always zero).
    pub _pad: u8,
}

impl FragmentKey {
    /// The key of the datagram `ip` belongs to.
    pub const fn of(ip: &crate::packet::Ipv4Header) -> Self {
        FragmentKey {
            src_addr: ip.saddr,
            dst_addr: ip.daddr,
            id: ip.id,
            proto: ip.proto,
            _pad: 0,
        }
    }
}

/// How to translate the non-first fragments of a datagram, learnt from its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentValue {
    /// The address the first fragment was translated to: the new destination of an inbound
    /// datagram, the new source of an outbound one (network order).
    pub translated_addr: u32,
    /// Explicit padding (always zero).
    pub _pad: u32,
}

/// Largest inbound fragment (IP header included) the data path parks; an Ethernet MTU's worth.
pub const MAX_PARKED_FRAGMENT_BYTES: usize = 1536;
/// Room for a parked fragment: the power of two at or above `MAX_PARKED_FRAGMENT_BYTES`, so the
/// data path can bound the copy's length with a mask, the one bound every verifier (6.1's too)
/// tracks through to the helper call.
pub const PARKED_FRAGMENT_ROOM: usize = MAX_PARKED_FRAGMENT_BYTES.next_power_of_two();
/// Size of the parked-fragment ring buffer (a power of two pages): about 120 fragments, so a
/// flood of stray fragments costs bounded memory (RFC 4787 REQ-14a).
pub const PARKED_RING_BYTES: u32 = 256 * 1024;

/// An inbound non-first fragment that arrived before its datagram's first fragment
/// (RFC 4787 REQ-14). The data path cannot hold packets, so it hands the fragment to the
/// controller, which sends it on once the first fragment has been translated.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ParkedFragment {
    /// Bytes of `packet` in use.
    pub len: u32,
    /// Explicit padding (always zero).
    pub _pad: u32,
    /// The IP packet as received (from the IPv4 header on).
    pub packet: [u8; PARKED_FRAGMENT_ROOM],
}

/// Bytes of a packet a notice carries: the IPv4 header with options and 8 transport bytes,
/// which is what an ICMP error quotes (RFC 792).
pub const NOTICE_MAX_BYTES: usize = 68;
/// Size of the notice ring buffer (a power of two pages).
pub const NOTICE_RING_BYTES: u32 = 64 * 1024;
/// `Notice::kind`: an inbound TCP SYN nothing wanted (see `CONFIG_FLAG_SYN_ICMP`).
pub const NOTICE_UNSOLICITED_SYN: u32 = 1;
/// `Notice::kind`: an outbound packet whose new flow was refused (see `CONFIG_FLAG_REFUSAL_ICMP`).
pub const NOTICE_REFUSED: u32 = 2;

/// A packet the data path wants the controller to answer with an ICMP error.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Notice {
    /// `NOTICE_*`.
    pub kind: u32,
    /// Bytes of `packet` in use.
    pub len: u32,
    /// The start of the IP packet as received.
    pub packet: [u8; NOTICE_MAX_BYTES],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keys_hold_network_order() {
        let endpoint = core::net::SocketAddrV4::new(core::net::Ipv4Addr::new(10, 0, 0, 2), 40_000);
        let key = BindingKey::of_endpoint(crate::proto::UDP, endpoint);
        assert_eq!(key.internal_addr.to_ne_bytes(), [10, 0, 0, 2]);
        assert_eq!(key.internal_port.to_ne_bytes(), 40_000u16.to_be_bytes());
        assert_eq!((key.remote_addr, key.remote_port), (0, 0));
        let external = ExternalKey::of_endpoint(crate::proto::UDP, endpoint);
        assert_eq!(
            external,
            ExternalKey::of_network_order(crate::proto::UDP, key.internal_addr, key.internal_port)
        );
    }

    #[test]
    fn default_session_limits_keep_one_host_from_filling_the_table() {
        let capacity = session_capacity(DEFAULT_MAX_BINDINGS);
        assert_eq!(session_map_capacity(DEFAULT_MAX_BINDINGS), 245_760);
        assert_eq!(capacity, 122_880);
        let host = default_max_sessions_per_host(DEFAULT_MAX_BINDINGS);
        assert_eq!(host, 30_720);
        assert_eq!(default_max_sessions_per_binding(DEFAULT_MAX_BINDINGS), 7_680);
        // One host at its limit, to distinct remote addresses (two entries each), leaves three
        // quarters of the map to the others.
        assert!(2 * host <= session_map_capacity(DEFAULT_MAX_BINDINGS) / 4);
        // The smallest table still gets limits of at least one.
        assert!(default_max_sessions_per_binding(1) >= 1);
        assert!(default_max_sessions_per_host(1) >= default_max_sessions_per_binding(1));
    }

    #[test]
    fn session_value_layout_is_packed() {
        // 40 bytes: with the 16-byte key and the kernel's 48-byte element header an element
        // still fits the same 128-byte allocation as with the former 32-byte value.
        assert_eq!(core::mem::size_of::<SessionValue>(), 40);
        assert_eq!(core::mem::size_of::<SessionUsageKey>(), 8);
    }
}
