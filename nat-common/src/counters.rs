//! Event counters kept per CPU by the data path and summed by the controller.

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $variant:ident = $name:literal,)+) => {
        /// One counter per data-path event; the value is the index in the `COUNTERS` map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// Stable snake_case name used by `nat-ctl stats` and in JSON/metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)+
                }
            }

            /// What the counter counts (its documentation), for metrics help text.
            pub const fn help(self) -> &'static str {
                match self {
                    $(Counter::$variant => concat!($($doc),+),)+
                }
            }
        }
    };
}

counters! {
    /// Outbound packets translated (source rewritten).
    TranslatedOut = "translated_out",
    /// Inbound packets translated (destination rewritten) and delivered.
    TranslatedIn = "translated_in",
    /// Bindings created by the data path.
    NewBinding = "new_binding",
    /// Sessions (internal endpoint -> remote) created.
    NewSession = "new_session",
    /// Inbound packets dropped because the mode's filter rejected the remote.
    FilteredIn = "filtered_in",
    /// New flows dropped because no external port was free.
    PortExhausted = "port_exhausted",
    /// New flows dropped because the binding limit (`--max-bindings`) or a map was full.
    TableFull = "table_full",
    /// New flows dropped because their internal host holds its limit of bindings.
    HostLimit = "host_limit",
    /// Inbound packets for an external address with no binding: passed to the gateway's own stack.
    InboundNoBinding = "inbound_no_binding",
    /// Packets not for the NAT (not IPv4, not to/from a NATed address): passed untouched.
    PassedNotNat = "passed_not_nat",
    /// Outbound packets from the gateway's own external address: passed untouched.
    PassedLocal = "passed_local",
    /// Truncated or malformed IPv4 packets (short headers, bad IHL, bad length) to or from a
    /// NATed address: dropped, never translated.
    Malformed = "malformed",
    /// Outbound packets of a protocol the NAT cannot translate: dropped, never leaked.
    UnsupportedProtocol = "unsupported_protocol",
    /// ICMP errors translated outbound (internal host reporting about an inbound packet).
    IcmpErrorOut = "icmp_error_out",
    /// ICMP errors translated inbound (RFC 5508 REQ-4).
    IcmpErrorIn = "icmp_error_in",
    /// ICMP errors dropped: no matching binding or session, or a bad embedded packet.
    IcmpErrorDropped = "icmp_error_dropped",
    /// Non-first fragments translated (either direction).
    FragmentTranslated = "fragment_translated",
    /// Inbound non-first fragments dropped because their first fragment was not seen and they
    /// could not be parked (parking ring full, or too large).
    FragmentNoState = "fragment_no_state",
    /// Inbound non-first fragments that arrived before their first fragment, parked for the
    /// controller (RFC 4787 REQ-14).
    FragmentParked = "fragment_parked",
    /// Parked fragments sent on, translated, after their first fragment arrived (written by the
    /// controller).
    FragmentReinjected = "fragment_reinjected",
    /// Parked fragments whose first fragment never came: dropped (written by the controller).
    FragmentParkExpired = "fragment_park_expired",
    /// Inbound TCP SYNs with no binding and no listener on the gateway: dropped without any
    /// reply (RFC 5382 REQ-4, REQ-4a).
    UnsolicitedSyn = "unsolicited_syn",
    /// Packets sent straight to their egress interface by the XDP fast path (bpf_redirect),
    /// bypassing the kernel's forwarding path; counted in addition to translated_out/in.
    FastPathRedirected = "fast_path_redirected",
    /// Packets (and ICMP errors) from an internal host to another internal host's external
    /// endpoint, translated on both sides and sent back in (RFC 4787 REQ-9).
    Hairpinned = "hairpinned",
    /// Packets from an internal interface whose source the gateway does not route back there:
    /// one of its own addresses (the NAT's external ones included), a broadcast or multicast
    /// address, or one reached through the external interface. Dropped before the kernel sees
    /// them (`accept_local` is on for hairpinning), so no internal host can send as the gateway.
    SpoofedSource = "spoofed_source",
    /// TCP RST, FIN and SYN segments outside their connection's window (RFC 5961): they change
    /// no state; inbound RSTs among them are dropped, the others delivered.
    TcpOutOfWindow = "tcp_out_of_window",
    /// New sessions refused because their internal host or their binding holds its limit of
    /// sessions (`--max-sessions-per-host`, `--max-sessions-per-binding`): the packet is dropped.
    SessionLimit = "session_limit",
}

/// Number of counters (size of the `COUNTERS` per-CPU array).
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_order_and_names_are_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}
