//! The four classic NAT types, expressed as RFC 4787 mapping and filtering behaviours.

/// How the NAT maps internal endpoints and filters inbound traffic.
///
/// | mode            | mapping (RFC 4787 §4.1) | filtering (RFC 4787 §5) |
/// |-----------------|-------------------------|-------------------------|
/// | full cone       | endpoint-independent    | endpoint-independent    |
/// | restricted cone | endpoint-independent    | address-dependent       |
/// | port-restricted | endpoint-independent    | address+port-dependent  |
/// | symmetric       | address+port-dependent  | address+port-dependent  |
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// EIM + EIF.
    FullCone = 0,
    /// EIM + ADF.
    RestrictedCone = 1,
    /// EIM + APDF.
    PortRestricted = 2,
    /// APDM + APDF.
    Symmetric = 3,
}

/// What an inbound packet must match, besides a binding, to be let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtering {
    /// Any remote may use the binding (EIF).
    EndpointIndependent,
    /// The internal endpoint must have sent to the remote's address (ADF).
    AddressDependent,
    /// The internal endpoint must have sent to the remote's address and port (APDF).
    AddressAndPortDependent,
}

impl Mode {
    /// All modes, in the order the CLI lists them.
    pub const ALL: [Mode; 4] = [
        Mode::FullCone,
        Mode::RestrictedCone,
        Mode::PortRestricted,
        Mode::Symmetric,
    ];

    /// Decodes the value stored in the config map; unknown values read as the strictest mode.
    pub const fn from_u8(value: u8) -> Mode {
        match value {
            0 => Mode::FullCone,
            1 => Mode::RestrictedCone,
            2 => Mode::PortRestricted,
            _ => Mode::Symmetric,
        }
    }

    /// The CLI name (`--mode NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            Mode::FullCone => "full-cone",
            Mode::RestrictedCone => "restricted-cone",
            Mode::PortRestricted => "port-restricted",
            Mode::Symmetric => "symmetric",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// True when the binding key includes the remote endpoint (address-and-port-dependent
    /// mapping): each new remote ip:port gets its own external port.
    pub const fn mapping_is_remote_dependent(self) -> bool {
        matches!(self, Mode::Symmetric)
    }

    /// The inbound filtering behaviour of this mode.
    pub const fn filtering(self) -> Filtering {
        match self {
            Mode::FullCone => Filtering::EndpointIndependent,
            Mode::RestrictedCone => Filtering::AddressDependent,
            Mode::PortRestricted | Mode::Symmetric => Filtering::AddressAndPortDependent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for mode in Mode::ALL {
            assert_eq!(Mode::from_name(mode.name()), Some(mode));
            assert_eq!(Mode::from_u8(mode as u8), mode);
        }
        assert_eq!(Mode::from_name("cone"), None);
    }

    #[test]
    fn only_symmetric_maps_per_remote() {
        assert!(Mode::Symmetric.mapping_is_remote_dependent());
        assert!(!Mode::PortRestricted.mapping_is_remote_dependent());
        assert!(!Mode::FullCone.mapping_is_remote_dependent());
    }

    #[test]
    fn filtering_per_mode() {
        assert_eq!(Mode::FullCone.filtering(), Filtering::EndpointIndependent);
        assert_eq!(Mode::RestrictedCone.filtering(), Filtering::AddressDependent);
        assert_eq!(
            Mode::PortRestricted.filtering(),
            Filtering::AddressAndPortDependent
        );
        assert_eq!(Mode::Symmetric.filtering(), Filtering::AddressAndPortDependent);
    }
}
