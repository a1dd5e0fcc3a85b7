//! The Debian package (`cargo xtask package`) and the systemd unit it ships: it installs into
//! this machine with dpkg, holds what an operator expects, its unit passes systemd's checks
//! with a sandbox rating of at most `MAX_EXPOSURE`, it purges without a trace, and nat-ctl
//! works with exactly the capabilities the unit grants. Root only.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_tests::lab::{NAT_EXT, WAN_IP};
use vm_tests::ops::{repo_file, TempDir};
use vm_tests::proc;
use vm_tests::tools;
use vm_tests::{Lab, NatProcess};

/// The package's name.
const PACKAGE: &str = "nat-ctl";
/// Where `cargo xtask package` leaves the `.deb` (xtask/src/package.rs `OUTPUT_DIR`).
const DEB_DIR: &str = "target/debian";
/// Highest `systemd-analyze security` exposure accepted (0 = locked down, 10 = unprotected).
const MAX_EXPOSURE: f64 = 4.0;
/// The unit as the package installs it.
const INSTALLED_UNIT: &str = "/lib/systemd/system/nat-ctl.service";
/// Files the package must install.
const INSTALLED_FILES: &[&str] = &[
    "/usr/sbin/nat-ctl",
    INSTALLED_UNIT,
    "/etc/nat-ctl/nat.toml",
    "/usr/share/man/man8/nat-ctl.8.gz",
    "/usr/share/man/man8/nat-ctl-attach.8.gz",
    "/usr/share/bash-completion/completions/nat-ctl",
    "/usr/share/zsh/vendor-completions/_nat-ctl",
    "/usr/share/fish/vendor_completions.d/nat-ctl.fish",
    "/usr/share/doc/nat-ctl/copyright",
];
/// Port of the TCP reflector on the remote.
const WHOAMI_PORT: u16 = 9998;
/// Time limit of each dpkg and systemd-analyze run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The newest `.deb` that `cargo xtask package` built.
fn built_deb() -> Result<PathBuf> {
    let dir = repo_file(DEB_DIR);
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("no {} (run `cargo xtask package` first)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nat-ctl_"))
        })
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop().with_context(|| {
        format!(
            "no nat-ctl_*.deb in {} (run `cargo xtask package`)",
            dir.display()
        )
    })
}

/// Whether dpkg lists the package as installed.
fn installed() -> Result<bool> {
    let out = proc::run(
        "dpkg-query",
        proc::command("dpkg-query", &["-W", "-f=${Status}", PACKAGE]),
        TOOL_TIMEOUT,
    )?;
    Ok(out.status.success() && out.stdout.contains("install ok installed"))
}

/// Purges the package on drop, so a failing test leaves the machine as it found it.
struct Installed;

impl Installed {
    fn install(deb: &Path) -> Result<Installed> {
        if installed()? {
            bail!("the {PACKAGE} package is already installed on this machine; this test installs and purges it, so remove it first (dpkg --purge {PACKAGE})");
        }
        let guard = Installed;
        proc::run_ok(
            "dpkg -i",
            proc::command("dpkg", &["-i", &deb.to_string_lossy()]),
            TOOL_TIMEOUT,
        )?;
        Ok(guard)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = proc::run(
            "dpkg --purge",
            proc::command("dpkg", &["--purge", PACKAGE]),
            TOOL_TIMEOUT,
        );
    }
}

/// The overall exposure `systemd-analyze security --offline=true UNIT` prints.
fn exposure(unit: &str) -> Result<f64> {
    let out = proc::run_ok(
        "systemd-analyze security",
        proc::command("systemd-analyze", &["security", "--offline=true", unit]),
        TOOL_TIMEOUT,
    )?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .with_context(|| format!("no exposure level in:\n{}", out.stdout))?;
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read the exposure in {line:?}"))
}

/// `systemd-analyze verify UNIT`: its complaints (empty when the unit is valid).
fn verify(unit: &str) -> Result<String> {
    let out = proc::run(
        "systemd-analyze verify",
        proc::command("systemd-analyze", &["verify", unit]),
        TOOL_TIMEOUT,
    )?;
    Ok(format!("{}{}", out.stdout.trim(), out.stderr.trim()))
}

#[test]
fn the_package_installs_passes_systemds_checks_and_purges_cleanly() -> Result<()> {
    let deb = built_deb()?;
    {
        let _installed = Installed::install(&deb)?;
        for file in INSTALLED_FILES {
            ensure!(Path::new(file).is_file(), "{file} is not installed");
        }
        let version = proc::run_ok(
            "nat-ctl --version",
            proc::command("/usr/sbin/nat-ctl", &["--version"]),
            TOOL_TIMEOUT,
        )?;
        let expected = format!("nat-ctl {} (", env!("CARGO_PKG_VERSION"));
        ensure!(
            version.stdout.starts_with(&expected) && version.stdout.trim_end().ends_with(')'),
            "--version says {:?}: expected the version and the source revision",
            version.stdout
        );
        let complaints = verify(INSTALLED_UNIT)?;
        ensure!(
            complaints.is_empty(),
            "systemd-analyze verify {INSTALLED_UNIT}:\n{complaints}"
        );
        let level = exposure(INSTALLED_UNIT)?;
        ensure!(
            level <= MAX_EXPOSURE,
            "systemd-analyze security rates the unit {level}, above {MAX_EXPOSURE}"
        );
        // verify does notice a broken unit, so its silence above means something.
        let scratch = TempDir::new("unit")?;
        let broken = scratch.path().join("nat-ctl.service");
        let unit = std::fs::read_to_string(INSTALLED_UNIT)?;
        std::fs::write(&broken, unit.replace("Restart=on-failure", "Restart=sometimes"))?;
        ensure!(
            !verify(&broken.to_string_lossy())?.is_empty(),
            "systemd-analyze verify is silent on Restart=sometimes: the check proves nothing"
        );
    }
    ensure!(!installed()?, "{PACKAGE} is still installed after purge");
    for file in INSTALLED_FILES {
        ensure!(!Path::new(file).exists(), "{file} is left after purge");
    }
    ensure!(
        !Path::new("/etc/nat-ctl").exists(),
        "/etc/nat-ctl is left after purge"
    );
    Ok(())
}

/// The capabilities the unit keeps (`CapabilityBoundingSet=`), as setpriv names them.
fn unit_capabilities() -> Result<Vec<String>> {
    let unit = std::fs::read_to_string(repo_file("packaging/nat-ctl.service"))?;
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .context("the unit sets no CapabilityBoundingSet")?;
    Ok(line
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect())
}

#[test]
fn nat_ctl_attaches_translates_and_detaches_with_only_the_units_capabilities() -> Result<()> {
    let caps = unit_capabilities()?;
    ensure!(!caps.is_empty(), "no capability in the unit's bounding set");
    // For uid 0, the bounding set caps what exec grants: this is what systemd does.
    let bounding = format!(
        "--bounding-set=-all,{}",
        caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",")
    );
    let lab = Lab::new("caps")?;
    let dir = TempDir::new("caps")?;
    let config = dir.write("nat.toml", "mode = \"port-restricted\"\n")?;
    let config_s = config.to_str().context("non-UTF-8 path")?;
    let nat = NatProcess::attach_wrapped(
        &lab.nat,
        &lab.wan_if,
        &["setpriv", &bounding, "--"],
        &["--config", config_s],
    )?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", nat.pid()))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in the daemon's /proc status")?;
    // The daemon really runs with that many capabilities, not all of root's.
    ensure!(
        effective.count_ones() as usize == caps.len(),
        "nat-ctl runs with CapEff {effective:#x}, not the {} capabilities {caps:?}",
        caps.len()
    );
    let out = tools::ping(&lab.lan, WAN_IP, 2, &[])?;
    ensure!(
        tools::ping_received(&out) == 2,
        "ping through a nat-ctl with only {caps:?} (CapEff {effective}): {}{}",
        out.stdout,
        out.stderr
    );
    let _who = tools::tcp_whoami(&lab.wan, WAN_IP, WHOAMI_PORT)?;
    let (seen, _) = tools::tcp_whoami_query(&lab.lan, SocketAddrV4::new(WAN_IP, WHOAMI_PORT))?;
    ensure!(
        seen.ip() == &NAT_EXT,
        "the remote saw {seen}, not the external address"
    );
    // The unit's ExecReload (`nat-ctl reload --pid $MAINPID`), with the same capabilities.
    std::fs::write(&config, "mode = \"full-cone\"\n")?;
    let bin = vm_tests::nat::nat_ctl_path();
    let pid = nat.pid().to_string();
    let reload = proc::run_ok(
        "setpriv nat-ctl reload --pid",
        lab.nat.nsenter(
            "setpriv",
            &[&bounding, "--", &bin.to_string_lossy(), "reload", "--pid", &pid],
        ),
        Duration::from_secs(40),
    )?;
    ensure!(
        reload.stdout.contains("mode port-restricted -> full-cone"),
        "reload with the unit's capabilities printed {:?}",
        reload.stdout
    );
    nat.stop()?;
    Ok(())
}
