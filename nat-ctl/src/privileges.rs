//! The privileges nat-ctl needs, checked before anything else so that a user without them gets
//! one line naming them instead of a permission error on some file or syscall deep inside.
//!
//! Loading programs and creating or opening pinned maps needs CAP_BPF (Linux 5.8+; the
//! `bpf()` syscall is closed to unprivileged users by default, `unprivileged_bpf_disabled`);
//! attaching to interfaces, tc and netlink changes need CAP_NET_ADMIN. The daemon also opens
//! raw sockets (CAP_NET_RAW) and its programs are verified as a privileged loader's only with
//! CAP_PERFMON. These are the capabilities of the systemd unit (packaging/nat-ctl.service).

/// Capability numbers (linux/capability.h).
pub mod cap {
    /// CAP_NET_ADMIN.
    pub const NET_ADMIN: u32 = 12;
    /// CAP_NET_RAW.
    pub const NET_RAW: u32 = 13;
    /// CAP_PERFMON.
    pub const PERFMON: u32 = 38;
    /// CAP_BPF.
    pub const BPF: u32 = 39;
}

/// What a query or a change of a running NAT needs: its pinned maps and links.
pub const QUERY: &[(u32, &str)] = &[(cap::BPF, "CAP_BPF"), (cap::NET_ADMIN, "CAP_NET_ADMIN")];
/// What `attach` needs.
pub const ATTACH: &[(u32, &str)] = &[
    (cap::BPF, "CAP_BPF"),
    (cap::NET_ADMIN, "CAP_NET_ADMIN"),
    (cap::NET_RAW, "CAP_NET_RAW"),
    (cap::PERFMON, "CAP_PERFMON"),
];

/// The names of the capabilities of `needed` missing from the effective set `effective`.
pub fn missing(effective: u64, needed: &[(u32, &'static str)]) -> Vec<&'static str> {
    needed
        .iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|&(_, name)| name)
        .collect()
}

/// The effective capability set of this process (`CapEff` in /proc/self/status), if readable.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Fails with one line when this process lacks capabilities of `needed` for `what`.
pub fn require(what: &str, needed: &[(u32, &'static str)]) -> anyhow::Result<()> {
    let Some(effective) = effective() else {
        // Not knowing is no reason to refuse: the kernel will say.
        return Ok(());
    };
    let lacking = missing(effective, needed);
    if lacking.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{what} needs root, or these capabilities, which this process lacks: {}",
        lacking.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_lacks_nothing_and_a_user_lacks_everything() {
        assert!(missing(u64::MAX, ATTACH).is_empty());
        assert_eq!(missing(0, QUERY), ["CAP_BPF", "CAP_NET_ADMIN"]);
    }

    #[test]
    fn the_units_set_is_enough_to_attach() {
        let unit = (1 << cap::BPF) | (1 << cap::NET_ADMIN) | (1 << cap::NET_RAW) | (1 << cap::PERFMON);
        assert!(missing(unit, ATTACH).is_empty());
        assert_eq!(missing(unit & !(1 << cap::PERFMON), ATTACH), ["CAP_PERFMON"]);
    }
}
