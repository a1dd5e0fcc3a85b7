//! `cargo xtask setup`: installs what building and testing need, when it is missing.
//!
//! Every piece is checked first and installed only when absent, so a second run is fast and
//! changes nothing. Verbose output of installs goes to `target/xtask-logs/`; on failure we print
//! one sentence naming what is missing and the log to read.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

use crate::cmd::{is_root, log_dir, target_dir, Cmd};
use crate::vm;

/// Debian packages bpf-linker links against (LLVM 22 from bookworm-security).
const TOOLCHAIN_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];

/// Debian packages the end-to-end tests, the demo and the benchmark use.
const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "socat",
    "iputils-ping",
    "tcpdump",
    "stun-client",
    "stun-server",
    "coturn",
    "python3-scapy",
    "bpftool",
    "ethtool",
    "iperf3",
    "hping3",
    "netsniff-ng",
    "traceroute",
    "procps",
    "psmisc",
    "kmod",
    // nsenter (nat-ctl must see the host's bpffs from inside a lab namespace).
    "util-linux",
    // Metrics scrapes.
    "curl",
    // `systemd-analyze verify` of the packaged unit (and `man`, which verify runs for the
    // unit's Documentation=man:nat-ctl(8)).
    "systemd",
    "man-db",
    // Port mapping: a real NAT-PMP client, and the PCP dissector that checks our packets
    // (DEBIAN_FRONTEND=noninteractive answers tshark's non-root capture question with no).
    "natpmpc",
    "tshark",
    // UPnP IGD: a real client (upnpc), and miniupnpd with its nftables backend as the reference
    // gateway (this package has no maintainer scripts: installing it starts no daemon).
    "miniupnpc",
    "miniupnpd-nftables",
];

/// Debian packages the VM tests use: qemu (TCG), a static busybox and cpio for the initramfs,
/// kmod for depmod/modprobe on the extracted kernel tree, xz to unpack its bzImage.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "kmod", "xz-utils"];

/// PyPI packages the end-to-end tests use: (name, version, a file the install must contain).
/// Installed with `pip install --target target/pypi`, where vm-tests looks for them.
const PYPI_PACKAGES: &[(&str, &str, &str)] = &[("pystun3", "2.0.0", "stun/cli.py")];

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURES: &str = "llvm-22";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// One thing setup can install.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Piece {
    /// LLVM development packages for building bpf-linker.
    ToolchainPackages,
    /// `rust-src` for the nightly toolchain (`-Z build-std=core`).
    RustSrc,
    /// `bpf-linker`, the linker rustc uses for `bpfel-unknown-none`.
    BpfLinker,
    /// Tools used by the end-to-end tests and the demo.
    LabPackages,
    /// Python tools from PyPI used by the end-to-end tests (a second RFC 3489 STUN client).
    PypiPackages,
    /// bpffs mounted at /sys/fs/bpf, where nat-ctl pins its maps.
    Bpffs,
    /// qemu, busybox and Debian 12's 6.1 kernel unpacked under target/vm (`cargo xtask vm-run`).
    VmKernel,
    /// `promtool` (checks the metrics format), unpacked from Debian's prometheus package under
    /// target/tools without installing it: installing would start a Prometheus server.
    Promtool,
}

/// Everything: what `cargo xtask setup`, `test` and `demo` need.
pub const ALL: &[Piece] = &[
    Piece::ToolchainPackages,
    Piece::RustSrc,
    Piece::BpfLinker,
    Piece::LabPackages,
    Piece::PypiPackages,
    Piece::Bpffs,
    Piece::VmKernel,
    Piece::Promtool,
];

/// What booting the 6.1 VM needs (`cargo xtask vm-run`).
pub const VM: &[Piece] = &[Piece::VmKernel];

/// What building the eBPF object needs.
pub const EBPF_BUILD: &[Piece] = &[Piece::ToolchainPackages, Piece::RustSrc, Piece::BpfLinker];

/// Installs the missing pieces among `pieces`, then prints `setup: ok`.
pub fn ensure(pieces: &[Piece]) -> Result<()> {
    let mut packages: Vec<&str> = Vec::new();
    if pieces.contains(&Piece::ToolchainPackages) {
        packages.extend(TOOLCHAIN_PACKAGES);
    }
    if pieces.contains(&Piece::LabPackages) {
        packages.extend(LAB_PACKAGES);
    }
    if pieces.contains(&Piece::VmKernel) {
        packages.extend(VM_PACKAGES);
    }
    ensure_debian_packages(&packages)?;
    if pieces.contains(&Piece::RustSrc) {
        ensure_rust_src()?;
    }
    if pieces.contains(&Piece::BpfLinker) {
        ensure_bpf_linker()?;
    }
    if pieces.contains(&Piece::PypiPackages) {
        ensure_pypi_packages()?;
    }
    if pieces.contains(&Piece::Bpffs) {
        ensure_bpffs()?;
    }
    if pieces.contains(&Piece::VmKernel) {
        vm::kernel::ensure()?;
    }
    if pieces.contains(&Piece::Promtool) {
        unpacked_package(PROMTOOL_PACKAGE)?;
    }
    println!("setup: ok");
    Ok(())
}

/// The Debian package that holds promtool.
const PROMTOOL_PACKAGE: &str = "prometheus";
/// Where packages used as tools but not installed are unpacked (`target/tools/PACKAGE`).
const TOOLS_DIR: &str = "tools";
/// Written into an unpacked package's directory once it is complete.
const UNPACKED_MARKER: &str = ".unpacked";

/// Downloads Debian's `package` and unpacks it under target/tools/PACKAGE (once), without
/// installing it: no maintainer script runs, no service starts.
fn unpacked_package(package: &str) -> Result<PathBuf> {
    let dir = target_dir().join(TOOLS_DIR).join(package);
    if dir.join(UNPACKED_MARKER).is_file() {
        return Ok(dir);
    }
    apt_update_once(&format!("download the Debian package {package}"))?;
    let downloads = target_dir().join(TOOLS_DIR).join("downloads");
    std::fs::create_dir_all(&downloads)?;
    let log = log_file(&format!("download-{package}.log"));
    let downloaded = Cmd::new("apt-get")
        .args(["-q", "download", package])
        .current_dir(&downloads)
        .run_logged(&log)?;
    let Some(deb) = vm::kernel::find_deb(&downloads, package).filter(|_| downloaded) else {
        bail!(
            "could not download {package}: apt-get download failed (see {})",
            log.display()
        );
    };
    let _ = std::fs::remove_dir_all(&dir);
    let log = log_file(&format!("unpack-{package}.log"));
    if !Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&dir)
        .run_logged(&log)?
    {
        bail!(
            "could not unpack {}: dpkg-deb failed (see {})",
            deb.display(),
            log.display()
        );
    }
    std::fs::File::create(dir.join(UNPACKED_MARKER))?;
    let _ = std::fs::remove_file(&deb);
    Ok(dir)
}

/// A log file in `target/xtask-logs/`.
pub(crate) fn log_file(name: &str) -> PathBuf {
    log_dir().join(name)
}

/// The packages among `packages` that dpkg does not report as installed.
fn missing_debian_packages(packages: &[&str]) -> Vec<String> {
    if packages.is_empty() {
        return Vec::new();
    }
    // dpkg-query exits non-zero when some package is unknown, but still prints the known ones.
    let installed: Vec<String> = Cmd::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(packages)
        .stdout_quietly()
        .map(|(_, out)| {
            out.lines()
                .filter(|line| line.contains("install ok installed"))
                .filter_map(|line| line.split_whitespace().next())
                .map(|name| name.split(':').next().unwrap_or(name).to_string())
                .collect()
        })
        .unwrap_or_default();
    packages
        .iter()
        .filter(|p| !installed.iter().any(|i| i == *p))
        .map(|p| p.to_string())
        .collect()
}

/// Runs `apt-get ARGS` non-interactively, all output in `log`; true when it succeeded.
pub(crate) fn apt_get(log: &Path, args: &[&str]) -> Result<bool> {
    Cmd::new("apt-get")
        .env_quiet("DEBIAN_FRONTEND", "noninteractive")
        // Wait for a concurrent apt or unattended-upgrades instead of failing on the lock.
        .args(["-o", "DPkg::Lock::Timeout=300", "-q"])
        .args(args)
        .run_logged(log)
}

fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing = missing_debian_packages(packages);
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!("setup needs root to install the missing Debian packages ({list}); run it as root");
    }
    println!("setup: installing Debian packages: {list}…");
    apt_update_once(&format!("install Debian packages {list}"))?;
    let log = log_file("apt-get-install.log");
    let mut install: Vec<&str> = vec!["install", "-y"];
    install.extend(missing.iter().map(String::as_str));
    if !apt_get(&log, &install)? {
        // Find out which package apt cannot install, to name it.
        let mut failed = Vec::new();
        for package in &missing {
            let log = log_file(&format!("apt-get-install-{package}.log"));
            if !apt_get(&log, &["install", "-y", package])? {
                failed.push((package.clone(), log));
            }
        }
        match failed.as_slice() {
            [] => {}
            [(package, log)] => {
                bail!(
                    "could not install Debian package {package}: apt-get failed (see {})",
                    log.display()
                )
            }
            [(_, log), ..] => {
                let names: Vec<&str> = failed.iter().map(|(p, _)| p.as_str()).collect();
                bail!(
                    "could not install Debian packages {}: apt-get failed (see {} and the other apt-get-install-*.log there)",
                    names.join(" "),
                    log.display()
                )
            }
        }
    }
    let still_missing = missing_debian_packages(packages);
    if !still_missing.is_empty() {
        bail!(
            "could not install Debian packages {}: apt-get succeeded but dpkg does not list them as installed (see {})",
            still_missing.join(" "),
            log.display()
        );
    }
    Ok(())
}

/// Whether this process has already run `apt-get update` successfully.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Runs `apt-get update` unless this process already did (installs and `apt-cache` look-ups
/// need fresh lists); `purpose` completes "could not …" in the error.
pub(crate) fn apt_update_once(purpose: &str) -> Result<()> {
    if APT_UPDATED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let log = log_file("apt-get-update.log");
    if !apt_get(&log, &["update"])? {
        bail!(
            "could not {purpose}: `apt-get update` failed (see {})",
            log.display()
        );
    }
    APT_UPDATED.store(true, Ordering::Relaxed);
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let (ok, installed) = Cmd::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stdout_quietly()
        .unwrap_or((false, String::new()));
    if !ok {
        bail!(
            "the nightly Rust toolchain is missing (`rustup component list --toolchain nightly` failed); \
             install it with `rustup toolchain install nightly --component rust-src`"
        );
    }
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"))
    {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain…");
    let log = log_file("rustup-rust-src.log");
    if !Cmd::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .run_logged(&log)?
    {
        bail!(
            "could not add rust-src to the nightly toolchain: rustup failed (see {})",
            log.display()
        );
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    Cmd::new("bpf-linker").arg("--version").succeeds_quietly()
}

fn install_bpf_linker(locked: bool, log: &Path) -> Result<bool> {
    let mut cmd = Cmd::cargo()
        .env_quiet("LLVM_PREFIX", LLVM_PREFIX)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", BPF_LINKER_FEATURES]);
    if locked {
        cmd = cmd.arg("--locked");
    }
    // cargo install builds in a temporary directory of its own, not in our target directory.
    cmd.env_remove("CARGO_TARGET_DIR").run_logged(log)
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    println!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about 70 s)…");
    let log = log_file("bpf-linker-install.log");
    if !install_bpf_linker(true, &log)? {
        println!("setup: `cargo install --locked` failed, retrying without --locked…");
        let log = log_file("bpf-linker-install-unlocked.log");
        if !install_bpf_linker(false, &log)? {
            bail!(
                "could not install bpf-linker {BPF_LINKER_VERSION}: cargo install failed (see {})",
                log.display()
            );
        }
    }
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH? (see {})",
            log.display()
        );
    }
    Ok(())
}

fn ensure_pypi_packages() -> Result<()> {
    let dir = target_dir().join("pypi");
    for (name, version, marker) in PYPI_PACKAGES {
        let dist_info = dir.join(format!("{name}-{version}.dist-info"));
        if dir.join(marker).exists() && dist_info.is_dir() {
            continue;
        }
        println!(
            "setup: installing {name} {version} from PyPI into {}…",
            dir.display()
        );
        let log = log_file(&format!("pip-install-{name}.log"));
        let spec = format!("{name}=={version}");
        if !Cmd::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
            ])
            .arg(&dir)
            .arg(&spec)
            .run_logged(&log)?
            || !dir.join(marker).exists()
        {
            bail!(
                "could not install {spec} from PyPI: pip failed (see {})",
                log.display()
            );
        }
    }
    Ok(())
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|mounts| mounts.lines().any(|l| l.contains(&format!(" {BPFFS} bpf "))))
        .unwrap_or(false)
}

fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    if !is_root() {
        bail!("setup needs root to mount bpffs at {BPFFS}; run it as root");
    }
    println!("setup: mounting bpffs at {BPFFS}…");
    let log = log_file("mount-bpffs.log");
    if !Cmd::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .run_logged(&log)?
        || !bpffs_mounted()
    {
        bail!(
            "could not mount bpffs at {BPFFS}: mount failed (see {})",
            log.display()
        );
    }
    Ok(())
}
