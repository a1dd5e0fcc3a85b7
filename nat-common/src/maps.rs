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
    /// Ring buffer of `ParkedFragment`s for the controller.
    pub const PARKED_FRAGMENTS: &str = "NAT_PARKED_FRAGMENTS";
    /// Ring buffer of `Notice`s for the controller.
    pub const NOTICES: &str = "NAT_NOTICES";
    /// Every map, for pin clean-up.
    pub const ALL: [&str; 11] = [
        CONFIG,
        BINDINGS_OUT,
        BINDINGS_IN,
        SESSIONS,
        FRAGMENTS,
        COUNTERS,
        USAGE_CREATED,
        USAGE_RELEASED,
        FAST_PATH_IFACES,
        PARKED_FRAGMENTS,
        NOTICES,
    ];
}

/// Default limit on dynamic bindings (`--max-bindings`).
pub const DEFAULT_MAX_BINDINGS: u32 = 262_144;
/// Room kept in the binding maps beyond the dynamic limit, so static forwards always fit.
pub const STATIC_FORWARD_RESERVE: u32 = 4_096;
/// Session map entries per allowed binding (each remote a binding talks to takes two: one
/// keyed by address and port, one by address only).
pub const SESSIONS_PER_BINDING: u32 = 4;
/// Capacity of the per-host usage maps: how many internal hosts can hold bindings at once.
pub const MAX_USAGE_HOSTS: u32 = 65_536;
/// Key of `FAST_PATH_IFACES` present while any device is registered (no interface has index 0):
/// one cheap lookup tells the data path whether a route lookup can be worth it.
pub const FAST_PATH_ANY: u32 = 0;
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
/// Capacity of the fragment-tracking map; LRU, so a flood of stray fragments only evicts other
/// fragment state, never bindings (RFC 4787 REQ-14a).
pub const MAX_FRAGMENTS: u32 = 8_192;

/// `BindingValue::flags` / `ExternalValue::flags`: a static forward; never expires.
pub const BINDING_FLAG_STATIC: u8 = 1 << 0;

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

/// State of one session.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionValue {
    /// Last outbound packet of this session (CLOCK_MONOTONIC ns).
    pub last_seen_ns: u64,
    /// `tcp_state::TcpState` as `u8` (TCP sessions only).
    pub tcp_state: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 7],
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
