//! Bindings: finding the external endpoint of an outbound flow, and creating one on a flow's
//! first packet with the allocation policy from `nat_common::alloc`.

use core::{ffi::c_void, ptr::NonNull};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, generated::bpf_loop},
};
use nat_common::{
    alloc::{candidate_port, external_addr_index, range_for, PortRange, MAX_PORT_PROBES},
    config::{CONFIG_FLAG_PER_REMOTE_BINDINGS, MAX_EXTERNAL_ADDRS},
    maps::{BINDING_FLAG_STATIC, SESSION_KIND_ENDPOINT},
    BindingKey, BindingValue, Counter, ExternalKey, ExternalValue, NatConfig,
};

use crate::{
    clock::{self, now_ns},
    flow::OutboundFlow,
    maps::{NAT_BINDINGS_IN, NAT_BINDINGS_OUT},
    sessions,
    stats::count,
    tcp::Tcp,
    usage,
};

/// `-EEXIST`, returned by a `BPF_NOEXIST` insert when the key is taken.
const EEXIST: i32 = 17;

/// The binding for `flow`, creating it when `create` is set; `None` when there is none and
/// none could be made (the reason is counted where it happens).
///
/// The key follows the mode: endpoint-independent (no remote) in the cone modes, per remote in
/// symmetric mode. A run-time mode switch keeps the flows that already exist: after a switch to
/// a cone mode a flow's own per-remote binding is found first (while
/// `CONFIG_FLAG_PER_REMOTE_BINDINGS` says some may exist); in symmetric mode an
/// endpoint-independent binding is reused only for a static forward or for a remote it has
/// already talked to.
#[inline(always)]
pub fn outbound_binding(cfg: &NatConfig, flow: &OutboundFlow, create: bool) -> Option<NonNull<BindingValue>> {
    let symmetric = cfg.mode().mapping_is_remote_dependent();
    if !symmetric && cfg.flags & CONFIG_FLAG_PER_REMOTE_BINDINGS != 0 {
        // A flow that got its own binding in symmetric mode keeps it after the switch.
        if let Some(binding) = NAT_BINDINGS_OUT.get_ptr_mut(flow.key(true)) {
            return NonNull::new(binding);
        }
    }
    let primary = flow.key(symmetric);
    if let Some(binding) = NAT_BINDINGS_OUT.get_ptr_mut(primary) {
        return NonNull::new(binding);
    }
    if symmetric {
        if let Some(binding) = NAT_BINDINGS_OUT.get_ptr_mut(flow.key(false)) {
            // SAFETY: map value pointer from a successful lookup.
            let value = unsafe { *binding };
            if value.flags & BINDING_FLAG_STATIC != 0
                || sessions::exists(
                    flow.proto,
                    value.external_addr,
                    value.external_port,
                    flow.remote_addr,
                    flow.remote_port,
                    SESSION_KIND_ENDPOINT,
                )
            {
                return NonNull::new(binding);
            }
        }
    }
    if !create {
        return None;
    }
    allocate(cfg, &primary)
}

/// The external address an internal host uses (paired pooling, RFC 4787 REQ-2).
#[inline(always)]
pub fn external_addr_for(cfg: &NatConfig, internal_addr: u32) -> u32 {
    let index = external_addr_index(internal_addr, cfg.external_addr_count) as usize;
    if index < MAX_EXTERNAL_ADDRS {
        cfg.external_addrs[index]
    } else {
        cfg.external_addrs[0]
    }
}

/// `PortProbe::outcome`: every candidate was taken.
const PROBE_NONE_FREE: u8 = 0;
/// `PortProbe::outcome`: `claimed_port` is ours.
const PROBE_CLAIMED: u8 = 1;
/// `PortProbe::outcome`: the inbound map refused an insert for another reason than a taken key.
const PROBE_TABLE_FULL: u8 = 2;

/// The port search of one new binding, shared with the `bpf_loop` callback that runs its
/// probes. The probes run in a `bpf_loop` (Linux 5.17+) rather than an open-coded loop: the
/// verifier then checks one probe, not every iteration along every path that reaches an
/// allocation, which with 128 probes exceeded its million-instruction budget.
#[repr(C)]
struct PortProbe {
    /// The inbound entry every probe tries to insert.
    inbound: ExternalValue,
    /// Drawn once per allocation (see `candidate_port`).
    random: u32,
    /// External address (network order).
    external_addr: u32,
    /// The range the internal port maps into (host order).
    range_min: u16,
    range_max: u16,
    /// Internal port, host order.
    internal_port: u16,
    /// The claimed external port (network order) when `outcome` is `PROBE_CLAIMED`.
    claimed_port: u16,
    /// IP protocol.
    proto: u8,
    /// One of the `PROBE_*` outcomes.
    outcome: u8,
    /// Explicit padding, so the verifier sees every byte initialised.
    _pad: [u8; 6],
}

/// One probe: tries the `attempt`-th candidate port. Returns 1 (stop) once a port is claimed or
/// the map fails, 0 to go on.
extern "C" fn probe_port(attempt: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `PortProbe` that `allocate` handed to `bpf_loop`.
    let probe = unsafe { &mut *ctx.cast::<PortProbe>() };
    let range = PortRange {
        min: probe.range_min,
        max: probe.range_max,
    };
    let port = candidate_port(range, probe.internal_port, probe.random, attempt as u32).to_be();
    let external_key = ExternalKey::of_network_order(probe.proto, probe.external_addr, port);
    match NAT_BINDINGS_IN.insert(external_key, probe.inbound, BPF_NOEXIST as u64) {
        Ok(()) => {
            probe.claimed_port = port;
            probe.outcome = PROBE_CLAIMED;
            1
        }
        Err(e) if e == -EEXIST => 0,
        Err(_) => {
            probe.outcome = PROBE_TABLE_FULL;
            1
        }
    }
}

/// Creates a binding for `key`: claims an external port by inserting its inbound entry with
/// `BPF_NOEXIST` (so no two CPUs can hand one external endpoint to two internal endpoints,
/// RFC 4787 REQ-3), then publishes the outbound entry.
///
/// A subprogram of its own (it is the cold path), so its result is one pointer, null on failure:
/// the 6.1 verifier loses track of a `Result` returned through the stack (its tag is spilled as
/// a narrow constant and read back as unknown) and then walks the impossible branch.
#[inline(never)]
fn allocate(cfg: &NatConfig, key: &BindingKey) -> Option<NonNull<BindingValue>> {
    // A host at its session limit would get a binding whose first session is refused.
    if !usage::may_create(cfg, key.internal_addr) || !usage::host_has_session_room(cfg, key.internal_addr) {
        return None;
    }
    let external_addr = external_addr_for(cfg, key.internal_addr);
    let internal_port = u16::from_be(key.internal_port);
    let range = range_for(
        internal_port,
        PortRange {
            min: cfg.port_min,
            max: cfg.port_max,
        },
    );
    let mut probe = PortProbe {
        inbound: ExternalValue {
            internal_addr: key.internal_addr,
            remote_addr: key.remote_addr,
            internal_port: key.internal_port,
            remote_port: key.remote_port,
            flags: 0,
            _pad: [0; 3],
        },
        // SAFETY: helper with no arguments.
        random: unsafe { bpf_get_prandom_u32() },
        external_addr,
        range_min: range.min,
        range_max: range.max,
        internal_port,
        claimed_port: 0,
        proto: key.proto,
        outcome: PROBE_NONE_FREE,
        _pad: [0; 6],
    };
    // SAFETY: the callback is a subprogram of this object taking `PortProbe`, which lives on
    // this stack frame for the whole call.
    unsafe {
        bpf_loop(
            MAX_PORT_PROBES,
            probe_port as *mut c_void,
            (&raw mut probe).cast(),
            0,
        );
    }
    let external_key = match probe.outcome {
        PROBE_CLAIMED => ExternalKey::of_network_order(key.proto, external_addr, probe.claimed_port),
        PROBE_TABLE_FULL => {
            count(Counter::TableFull);
            return None;
        }
        _ => {
            count(Counter::PortExhausted);
            return None;
        }
    };
    let outbound = BindingValue {
        last_seen_ns: now_ns(),
        external_addr,
        external_port: external_key.external_port,
        flags: 0,
        _pad: 0,
    };
    match NAT_BINDINGS_OUT.insert(key, outbound, BPF_NOEXIST as u64) {
        Ok(()) => {
            usage::record_created(key.internal_addr);
            count(Counter::NewBinding);
        }
        Err(e) => {
            // Lost a race with another CPU creating the same binding (use theirs), or the map
            // is full: either way give the claimed port back.
            let _ = NAT_BINDINGS_IN.remove(external_key);
            if e != -EEXIST {
                count(Counter::TableFull);
                return None;
            }
        }
    }
    NonNull::new(NAT_BINDINGS_OUT.get_ptr_mut(key)?)
}

/// Marks a binding as used now (outbound refresh, RFC 4787 REQ-6).
#[inline(always)]
pub fn refresh(binding: NonNull<BindingValue>, now: u64) {
    // SAFETY: map value pointer from a successful lookup; a racing write of a timestamp is benign.
    unsafe { clock::refresh(&mut (*binding.as_ptr()).last_seen_ns, now) }
}

/// Everything an outbound packet does to NAT state: finds or creates its binding, refreshes it,
/// and records the remote as a session (following the TCP segment `seg`; zeroed for other
/// protocols; `forwarded`: see `sessions::touch_outbound`). Returns the external endpoint, or
/// `None` when the flow must be dropped (already counted). An established flow costs two hash
/// lookups here, the binding and its session.
#[inline(always)]
pub fn bind(cfg: &NatConfig, flow: &OutboundFlow, seg: &Tcp, forwarded: bool) -> Option<(u32, u16)> {
    let binding = outbound_binding(cfg, flow, true)?;
    let now = now_ns();
    refresh(binding, now);
    // SAFETY: map value pointer from a successful lookup.
    let (external_addr, external_port) =
        unsafe { (binding.as_ref().external_addr, binding.as_ref().external_port) };
    sessions::touch_outbound(cfg, flow, (external_addr, external_port), seg, now, forwarded).ok()?;
    Some((external_addr, external_port))
}

/// Why an inbound packet found no way in.
#[derive(Clone, Copy)]
pub enum Refusal {
    /// No binding has this external endpoint.
    NoBinding,
    /// A binding exists but the mode's filter rejects this remote.
    Filtered,
}

/// The binding behind external endpoint `external_addr:external_port`, if the mode's filter
/// lets `remote_addr:remote_port` use it (RFC 4787 §5). Static forwards admit every remote.
#[inline(always)]
pub fn inbound_binding(
    cfg: &NatConfig,
    proto: u8,
    external_addr: u32,
    external_port: u16,
    remote_addr: u32,
    remote_port: u16,
) -> Result<ExternalValue, Refusal> {
    let key = ExternalKey::of_network_order(proto, external_addr, external_port);
    // SAFETY: plain data copied out at once.
    let binding = unsafe { NAT_BINDINGS_IN.get(key) }
        .copied()
        .ok_or(Refusal::NoBinding)?;
    if binding.flags & BINDING_FLAG_STATIC == 0
        && !sessions::filter_allows(cfg, proto, external_addr, external_port, remote_addr, remote_port)
    {
        return Err(Refusal::Filtered);
    }
    Ok(binding)
}
