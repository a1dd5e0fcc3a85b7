//! TCP session state tracking, after the RFC 6146 §3.5.2 state machine as RFC 7857 §2 asks.
//!
//! The state only chooses a session's idle timeout: established sessions get the long timer
//! (RFC 5382 REQ-5: at least 2 h 4 min), every other state the transitory one (at least 4 min).
//! A RST moves the session to `Reset`, which is kept for the transitory timeout rather than
//! deleted at once, so a spoofed RST cannot tear a connection down (RFC 7857 §2.2).

/// Where a TCP session is in its life.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Not TCP, or nothing seen yet.
    None = 0,
    /// Outbound SYN seen (RFC 6146 "V4 INIT" seen from inside).
    SynSent = 1,
    /// Inbound SYN seen first (static forward, or simultaneous open).
    SynReceived = 2,
    /// SYNs seen in both directions.
    Established = 3,
    /// FIN seen from inside only.
    FinOut = 4,
    /// FIN seen from outside only.
    FinIn = 5,
    /// FIN seen in both directions.
    Closing = 6,
    /// RST seen.
    Reset = 7,
}

/// Which way a packet crosses the NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Internal host to remote.
    Outbound,
    /// Remote to internal host.
    Inbound,
}

/// TCP header flag bits (RFC 9293 §3.1), as in the 14th header byte.
pub mod flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
}

impl TcpState {
    /// Decodes a stored state; unknown values read as `None`.
    pub const fn from_u8(value: u8) -> TcpState {
        match value {
            1 => TcpState::SynSent,
            2 => TcpState::SynReceived,
            3 => TcpState::Established,
            4 => TcpState::FinOut,
            5 => TcpState::FinIn,
            6 => TcpState::Closing,
            7 => TcpState::Reset,
            _ => TcpState::None,
        }
    }

    /// Lowercase name for the NAT table listing.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "-",
            TcpState::SynSent => "syn_sent",
            TcpState::SynReceived => "syn_received",
            TcpState::Established => "established",
            TcpState::FinOut => "fin_out",
            TcpState::FinIn => "fin_in",
            TcpState::Closing => "closing",
            TcpState::Reset => "reset",
        }
    }

    /// True for every state that uses the transitory timeout (RFC 5382 REQ-5).
    pub const fn is_transitory(self) -> bool {
        !matches!(self, TcpState::Established)
    }

    /// The state after a packet with TCP `flags` crosses in `direction`.
    pub const fn next(self, direction: Direction, tcp_flags: u8) -> TcpState {
        use TcpState::*;
        let syn = tcp_flags & flags::SYN != 0;
        let fin = tcp_flags & flags::FIN != 0;
        if tcp_flags & flags::RST != 0 {
            return Reset;
        }
        match (self, direction) {
            // A SYN on a closed or reset session starts it again (port reuse).
            (None | Closing | Reset, Direction::Outbound) if syn => SynSent,
            (None | Closing | Reset, Direction::Inbound) if syn => SynReceived,
            // SYNs from both sides (normal open, or simultaneous open): established.
            (SynSent, Direction::Inbound) | (SynReceived, Direction::Outbound) if syn => Established,
            (SynSent | SynReceived | Established, Direction::Outbound) if fin => FinOut,
            (SynSent | SynReceived | Established, Direction::Inbound) if fin => FinIn,
            (FinIn, Direction::Outbound) | (FinOut, Direction::Inbound) if fin => Closing,
            (state, _) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::Direction::*;
    use super::TcpState::*;
    use super::*;

    #[test]
    fn outbound_open_and_close() {
        let s = None.next(Outbound, SYN);
        assert_eq!(s, SynSent);
        assert!(s.is_transitory());
        let s = s.next(Inbound, SYN | ACK);
        assert_eq!(s, Established);
        assert!(!s.is_transitory());
        assert_eq!(s.next(Outbound, ACK), Established, "data keeps it established");
        let s = s.next(Outbound, FIN | ACK);
        assert_eq!(s, FinOut);
        assert_eq!(s.next(Outbound, FIN | ACK), FinOut, "FIN retransmit");
        let s = s.next(Inbound, FIN | ACK);
        assert_eq!(s, Closing);
        assert!(s.is_transitory());
    }

    #[test]
    fn inbound_open_for_forwards_and_simultaneous_open() {
        let s = None.next(Inbound, SYN);
        assert_eq!(s, SynReceived);
        assert_eq!(s.next(Outbound, SYN | ACK), Established);
        // Simultaneous open: both sides send a bare SYN.
        assert_eq!(None.next(Outbound, SYN).next(Inbound, SYN), Established);
    }

    #[test]
    fn rst_from_either_side_is_transitory_not_deleted() {
        for dir in [Outbound, Inbound] {
            let s = Established.next(dir, RST | ACK);
            assert_eq!(s, Reset);
            assert!(s.is_transitory());
        }
        assert_eq!(Reset.next(Outbound, SYN), SynSent, "reuse after reset");
    }

    #[test]
    fn states_round_trip() {
        for s in [
            None,
            SynSent,
            SynReceived,
            Established,
            FinOut,
            FinIn,
            Closing,
            Reset,
        ] {
            assert_eq!(TcpState::from_u8(s as u8), s);
        }
    }
}
