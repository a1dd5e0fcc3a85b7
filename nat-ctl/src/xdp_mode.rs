//! XDP attach modes. *Native* XDP runs in the driver, on its receive buffers, before the kernel
//! allocates a socket buffer; *generic* XDP runs the same program in the kernel's receive path
//! for any device, after that allocation (slower, same results). `--xdp-mode auto` tries native
//! and falls back to generic with one line naming the interface and its driver; `native`
//! refuses devices without it; `generic` forces it.
//!
//! A device without native XDP has no `ndo_bpf` (bridge, macvlan, vxlan, ...) and the kernel
//! refuses driver mode with EOPNOTSUPP. A driver that has it may still refuse its current
//! configuration: virtio_net with guest offloads on (EOPNOTSUPP), an MTU above what one page
//! holds (EINVAL), too few queues (ENOMEM).
//!
//! The mode each program got is recorded per instance next to its lock file (bpffs holds no
//! plain files), so `nat-ctl status` can show it from another process, and an adopting daemon
//! (whose programs keep the links, and so the modes, of the persisted instance) reports it.

use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
};

use anyhow::{anyhow, Context, Result};
use aya::programs::{
    xdp::{XdpError, XdpLinkId},
    ProgramError, Xdp, XdpMode,
};

use crate::instance::Instance;

/// What `--xdp-mode` (config key `xdp_mode`) asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native where the driver takes it, else generic (with one line saying so).
    #[default]
    Auto,
    /// Native or nothing.
    Native,
    /// Generic everywhere.
    Generic,
}

impl XdpModeChoice {
    /// Every choice, in the order the help lists them.
    pub const ALL: [XdpModeChoice; 3] = [XdpModeChoice::Auto, XdpModeChoice::Native, XdpModeChoice::Generic];

    /// The name used by the flag and the config file.
    pub fn name(self) -> &'static str {
        match self {
            XdpModeChoice::Auto => "auto",
            XdpModeChoice::Native => "native",
            XdpModeChoice::Generic => "generic",
        }
    }

    /// Parses `auto`, `native` or `generic`.
    pub fn parse(text: &str) -> Result<Self> {
        XdpModeChoice::ALL
            .into_iter()
            .find(|c| c.name() == text)
            .ok_or_else(|| anyhow!("XDP mode {text:?} is not one of auto, native, generic"))
    }
}

/// The mode an XDP program runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpRunMode {
    /// In the driver.
    Native,
    /// In the kernel's receive path (`XDP_FLAGS_SKB_MODE`).
    Generic,
}

impl XdpRunMode {
    /// `native` or `generic`.
    pub fn name(self) -> &'static str {
        match self {
            XdpRunMode::Native => "native",
            XdpRunMode::Generic => "generic",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "native" => Some(XdpRunMode::Native),
            "generic" => Some(XdpRunMode::Generic),
            _ => None,
        }
    }

    fn flags(self) -> XdpMode {
        match self {
            XdpRunMode::Native => XdpMode::Driver,
            XdpRunMode::Generic => XdpMode::Skb,
        }
    }
}

/// Errors of a native attach that mean "no native XDP on this device (as configured)", after
/// which `auto` tries generic. Others (EBUSY, EEXIST: another XDP program is there; EPERM)
/// would fail in generic mode just the same, so they are reported instead.
const NO_NATIVE_ERRNOS: [i32; 3] = [libc::EOPNOTSUPP, libc::EINVAL, libc::ENOMEM];

/// The errno behind a failed attach, through aya's link (`bpf_link_create`) and netlink paths.
fn errno(error: &ProgramError) -> Option<i32> {
    match error {
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        ProgramError::XdpError(XdpError::NetlinkError(e)) => e.raw_os_error(),
        _ => {
            let mut source = std::error::Error::source(error);
            while let Some(e) = source {
                if let Some(code) = e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) {
                    return Some(code);
                }
                source = e.source();
            }
            None
        }
    }
}

/// `Operation not supported (os error 95)` for errno 95.
fn describe_errno(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// The line `auto` prints when it falls back to generic.
fn fallback_notice(iface: &str, driver: &str, errno: i32) -> String {
    if errno == libc::EOPNOTSUPP {
        format!("nat-ctl: {iface} (driver {driver}) has no native XDP; using generic XDP on it")
    } else {
        format!(
            "nat-ctl: {iface} (driver {driver}) refused native XDP ({}); using generic XDP on it",
            describe_errno(errno)
        )
    }
}

/// The error of a native attach that failed, without fallback.
fn native_failure(iface: &str, driver: &str, errno: Option<i32>, error: &ProgramError) -> anyhow::Error {
    match errno {
        Some(libc::EOPNOTSUPP) => {
            anyhow!("{iface} has no native XDP (driver {driver}); use --xdp-mode generic or auto")
        }
        Some(code @ (libc::EBUSY | libc::EEXIST)) => anyhow!(
            "cannot attach XDP to {iface} in native mode: another XDP program is attached to it ({})",
            describe_errno(code)
        ),
        Some(code) => anyhow!(
            "cannot attach XDP to {iface} in native mode (driver {driver}): {}",
            describe_errno(code)
        ),
        None => anyhow!("cannot attach XDP to {iface} in native mode (driver {driver}): {error}"),
    }
}

/// Attaches `program` to `iface` as `choice` says; returns the link and the mode it got.
pub fn attach(program: &mut Xdp, iface: &str, choice: XdpModeChoice) -> Result<(XdpLinkId, XdpRunMode)> {
    if choice == XdpModeChoice::Generic {
        return attach_generic(program, iface).map(|id| (id, XdpRunMode::Generic));
    }
    let error = match program.attach(iface, XdpRunMode::Native.flags()) {
        Ok(id) => return Ok((id, XdpRunMode::Native)),
        Err(error) => error,
    };
    let code = errno(&error);
    let driver = driver_name(iface).unwrap_or_else(|| "unknown".to_string());
    match code {
        Some(code) if choice == XdpModeChoice::Auto && NO_NATIVE_ERRNOS.contains(&code) => {
            let id = attach_generic(program, iface)?;
            crate::logging::notice(&fallback_notice(iface, &driver, code));
            Ok((id, XdpRunMode::Generic))
        }
        _ => Err(native_failure(iface, &driver, code, &error)),
    }
}

fn attach_generic(program: &mut Xdp, iface: &str) -> Result<XdpLinkId> {
    program
        .attach(iface, XdpRunMode::Generic.flags())
        .map_err(|e| match errno(&e) {
            Some(code) => anyhow!(
                "cannot attach XDP to {iface} in generic mode: {}",
                describe_errno(code)
            ),
            None => anyhow!("cannot attach XDP to {iface} in generic mode: {e}"),
        })
}

/// `ETHTOOL_GDRVINFO`: the driver's name and more (`struct ethtool_drvinfo`).
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` of `<linux/ethtool.h>`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The driver of `iface` (`ethtool -i`), asked in the caller's network namespace: unlike
/// `/sys/class/net/IFACE/device/driver`, which shows the devices of whichever namespace
/// mounted that sysfs. Devices without a driver of their own report their link kind
/// ("macvlan", "bridge", "veth").
pub fn driver_name(iface: &str) -> Option<String> {
    let name = CString::new(iface).ok()?;
    if name.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain-data structs, valid when zeroed.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL with an ifreq naming the device and pointing at a drvinfo buffer
    // the kernel fills; both live across the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) } != 0 {
        return None;
    }
    let len = info
        .driver
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(info.driver.len());
    let driver = String::from_utf8_lossy(&info.driver[..len]).into_owned();
    (!driver.is_empty()).then_some(driver)
}

/// The mode of each interface's XDP program, external interface first.
pub type Modes = Vec<(String, XdpRunMode)>;

fn record_path(instance: &Instance) -> PathBuf {
    instance.state_file("xdp")
}

/// One `IFACE MODE` line per interface.
fn render(modes: &[(String, XdpRunMode)]) -> String {
    modes
        .iter()
        .map(|(iface, mode)| format!("{iface} {}\n", mode.name()))
        .collect()
}

fn parse_record(text: &str) -> Modes {
    text.lines()
        .filter_map(|l| {
            let (iface, mode) = l.split_once(' ')?;
            Some((iface.to_string(), XdpRunMode::parse(mode.trim())?))
        })
        .collect()
}

/// Records the modes of an instance's programs (for `status`, and for a later adoption).
pub fn save(instance: &Instance, modes: &[(String, XdpRunMode)]) -> Result<()> {
    let path = record_path(instance);
    fs::write(&path, render(modes))
        .with_context(|| format!("cannot record the XDP modes in {}", path.display()))
}

/// The recorded modes of an instance (empty when none were recorded).
pub fn load(instance: &Instance) -> Modes {
    fs::read_to_string(record_path(instance))
        .map(|t| parse_record(&t))
        .unwrap_or_default()
}

/// Removes the record (the instance is gone).
pub fn forget(instance: &Instance) {
    let _ = fs::remove_file(record_path(instance));
}

/// `native` / `generic` for `iface` in `modes`, `unknown` when not recorded.
pub fn mode_of(modes: &[(String, XdpRunMode)], iface: &str) -> &'static str {
    modes
        .iter()
        .find(|(i, _)| i == iface)
        .map_or("unknown", |(_, m)| m.name())
}

/// The line that says an explicit choice is not what the running (adopted) programs got: their
/// links keep their mode, as adoption keeps everything else of the running NAT.
pub fn adoption_notice(choice: XdpModeChoice, running: &[(String, XdpRunMode)]) -> Option<String> {
    let wanted = match choice {
        XdpModeChoice::Auto => return None,
        XdpModeChoice::Native => XdpRunMode::Native,
        XdpModeChoice::Generic => XdpRunMode::Generic,
    };
    let (iface, got) = running.iter().find(|(_, m)| *m != wanted)?;
    Some(format!(
        "nat-ctl: keeping the running XDP mode ({} on {iface}, not --xdp-mode {}); detach first to change it",
        got.name(),
        choice.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        for c in XdpModeChoice::ALL {
            assert_eq!(XdpModeChoice::parse(c.name()).unwrap(), c);
        }
        assert_eq!(XdpModeChoice::default(), XdpModeChoice::Auto);
        let e = XdpModeChoice::parse("drv").unwrap_err().to_string();
        assert!(e.contains("auto, native, generic"), "{e}");
    }

    #[test]
    fn record_round_trip() {
        let modes = vec![
            ("w1".to_string(), XdpRunMode::Native),
            ("l1".to_string(), XdpRunMode::Generic),
        ];
        assert_eq!(parse_record(&render(&modes)), modes);
        assert_eq!(
            parse_record("w1 bogus\n\nl1 generic\n"),
            vec![("l1".into(), XdpRunMode::Generic)]
        );
        assert_eq!(mode_of(&modes, "l1"), "generic");
        assert_eq!(mode_of(&modes, "x"), "unknown");
    }

    #[test]
    fn messages_name_interface_driver_and_way_out() {
        let n = fallback_notice("v1", "macvlan", libc::EOPNOTSUPP);
        assert_eq!(
            n,
            "nat-ctl: v1 (driver macvlan) has no native XDP; using generic XDP on it"
        );
        let n = fallback_notice("eth0", "virtio_net", libc::EINVAL);
        assert!(
            n.contains("refused native XDP") && n.contains("os error 22"),
            "{n}"
        );
        let error = ProgramError::UnknownInterface { name: "x".into() };
        let e = native_failure("v1", "macvlan", Some(libc::EOPNOTSUPP), &error).to_string();
        assert_eq!(
            e,
            "v1 has no native XDP (driver macvlan); use --xdp-mode generic or auto"
        );
        let e = native_failure("v1", "veth", Some(libc::EBUSY), &error).to_string();
        assert!(
            e.contains("another XDP program") && e.contains("os error 16"),
            "{e}"
        );
        let e = native_failure("v1", "veth", Some(libc::E2BIG), &error).to_string();
        assert!(
            e.contains("native mode (driver veth)") && e.contains("os error 7"),
            "{e}"
        );
    }

    #[test]
    fn no_driver_for_a_missing_interface() {
        assert_eq!(driver_name("nosuchif0xyz"), None);
        assert_eq!(driver_name("a-name-longer-than-ifnamsiz"), None);
    }

    #[test]
    fn fallback_only_for_no_native_errors() {
        assert!(NO_NATIVE_ERRNOS.contains(&libc::EOPNOTSUPP));
        assert!(!NO_NATIVE_ERRNOS.contains(&libc::EBUSY));
        assert!(!NO_NATIVE_ERRNOS.contains(&libc::EEXIST));
    }

    #[test]
    fn adoption_keeps_the_running_mode() {
        let running = vec![("w1".to_string(), XdpRunMode::Generic)];
        assert_eq!(adoption_notice(XdpModeChoice::Auto, &running), None);
        assert_eq!(adoption_notice(XdpModeChoice::Generic, &running), None);
        let n = adoption_notice(XdpModeChoice::Native, &running).unwrap();
        assert!(n.contains("generic on w1") && n.contains("detach first"), "{n}");
        assert_eq!(
            adoption_notice(XdpModeChoice::Native, &[]),
            None,
            "nothing recorded"
        );
    }
}
