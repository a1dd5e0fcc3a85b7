//! Debian 12's stock 6.1 kernel, unpacked under `target/vm/VERSION/` for the VM.
//!
//! The newest `linux-image-6.1.0-NN-amd64` that apt knows is downloaded once (`apt-get
//! download`), unpacked with `dpkg-deb -x` and indexed with `depmod -b` (the .deb ships no
//! modules.dep). Its bzImage is also unpacked to a plain ELF `vmlinux`: qemu boots that through
//! the kernel's PVH entry point, which saves the XZ decompression that takes about 4 s under TCG.
//! A tree is used only once a `.complete` marker says all of this finished; an existing tree is
//! used as it is, without asking apt again.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cmd::{is_root, target_dir, Cmd};
use crate::setup::{apt_update_once, log_file};

/// The kernel series Debian 12 (bookworm) ships.
const SERIES: &str = "6.1.0";
/// The flavour: plain amd64 (not `-cloud`, not `-rt`).
const FLAVOUR: &str = "amd64";
/// Marker file written last into a finished tree.
const COMPLETE_MARKER: &str = ".complete";
/// XZ stream magic: Debian's bzImage carries the kernel as one XZ stream (CONFIG_KERNEL_XZ).
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
/// ELF magic, to check the unpacked vmlinux.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    pub version: String,
    /// `target/vm/VERSION`: the package's files (`boot/`, `lib/modules/`) and `vmlinux`.
    pub root: PathBuf,
}

impl Kernel {
    /// `lib/modules/VERSION` in the unpacked tree (indexed by depmod).
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }

    /// The image qemu boots: the unpacked ELF vmlinux when there is one, else the bzImage.
    pub fn boot_image(&self) -> PathBuf {
        let vmlinux = self.root.join("vmlinux");
        if vmlinux.is_file() {
            vmlinux
        } else {
            self.bz_image()
        }
    }

    fn bz_image(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.version))
    }
}

/// Where unpacked kernels live.
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

/// The ABI number NN of a kernel version `6.1.0-NN-amd64`, or of a package name
/// `linux-image-6.1.0-NN-amd64`; `None` for anything else (other series, flavours, -dbg,
/// -unsigned).
fn abi_number(version: &str) -> Option<u32> {
    let rest = version.strip_prefix(SERIES)?.strip_prefix('-')?;
    let (number, flavour) = rest.split_once('-')?;
    if flavour != FLAVOUR || number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

/// The newest plain image package (`linux-image-6.1.0-NN-amd64`, highest NN) in the output of
/// `apt-cache search`, whose lines read `NAME - DESCRIPTION`.
pub fn newest_image_package(apt_cache_search: &str) -> Option<String> {
    apt_cache_search
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            let number = abi_number(name.strip_prefix("linux-image-")?)?;
            Some((number, name.to_string()))
        })
        .max()
        .map(|(_, name)| name)
}

/// The newest finished tree under `target/vm`, if any.
pub fn cached() -> Option<Kernel> {
    let entries = fs::read_dir(vm_dir()).ok()?;
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.to_string();
            let number = abi_number(&version)?;
            entry
                .path()
                .join(COMPLETE_MARKER)
                .is_file()
                .then(|| (number, version, entry.path()))
        })
        .max()
        .map(|(_, version, root)| Kernel { version, root })
}

/// The unpacked kernel: the cached one, or the newest package downloaded and unpacked now.
pub fn ensure() -> Result<Kernel> {
    if let Some(kernel) = cached() {
        let vmlinux = kernel.root.join("vmlinux");
        if !vmlinux.is_file() {
            // A tree unpacked before vmlinux was made, or whose unpacking failed: try again.
            if let Err(err) = unpack_vmlinux(&kernel.bz_image(), &vmlinux) {
                println!("setup: booting the bzImage instead of a plain vmlinux ({err:#})");
            }
        }
        return Ok(kernel);
    }
    if !is_root() {
        bail!("setup needs root to fetch Debian's 6.1 kernel package (apt-get update); run it as root");
    }
    apt_update_once("find Debian's 6.1 kernel package")?;
    let pattern = format!("^linux-image-{}-[0-9]+-{FLAVOUR}$", SERIES.replace('.', "\\."));
    let (_, search) = Cmd::new("apt-cache")
        .args(["search", "--names-only", &pattern])
        .stdout_quietly()
        .context("could not run apt-cache")?;
    let Some(package) = newest_image_package(&search) else {
        bail!("could not find Debian's 6.1 kernel: `apt-cache search {pattern}` lists no linux-image-{SERIES}-NN-{FLAVOUR}");
    };
    let version = package["linux-image-".len()..].to_string();
    println!("setup: fetching {package} and unpacking it into target/vm/{version}…");

    let downloads = vm_dir().join("downloads");
    fs::create_dir_all(&downloads).with_context(|| format!("could not create {}", downloads.display()))?;
    let log = log_file("vm-kernel-download.log");
    // apt-get download writes into the current directory.
    let downloaded = Cmd::new("apt-get")
        .args(["-q", "download", &package])
        .current_dir(&downloads)
        .run_logged(&log)?;
    let Some(deb) = find_deb(&downloads, &package).filter(|_| downloaded) else {
        bail!(
            "could not download {package}: apt-get download failed (see {})",
            log.display()
        );
    };

    // Unpack next to the final place and rename at the end, so a half-done tree is never used.
    let partial = vm_dir().join(format!("{version}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    let log = log_file("vm-kernel-unpack.log");
    if !Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&partial)
        .run_logged(&log)?
    {
        bail!(
            "could not unpack {}: dpkg-deb failed (see {})",
            deb.display(),
            log.display()
        );
    }
    let log = log_file("vm-kernel-depmod.log");
    if !Cmd::new("depmod")
        .arg("-b")
        .arg(&partial)
        .arg(&version)
        .run_logged(&log)?
    {
        bail!(
            "could not index the modules of {version}: depmod failed (see {})",
            log.display()
        );
    }
    let kernel = Kernel {
        version: version.clone(),
        root: partial.clone(),
    };
    if let Err(err) = unpack_vmlinux(&kernel.bz_image(), &partial.join("vmlinux")) {
        // Only slower: qemu boots the bzImage too.
        println!("setup: booting the bzImage instead of a plain vmlinux ({err:#})");
    }
    File::create(partial.join(COMPLETE_MARKER))?;
    let root = vm_dir().join(&version);
    if root.join(COMPLETE_MARKER).is_file() {
        // Another run finished first.
        let _ = fs::remove_dir_all(&partial);
    } else {
        let _ = fs::remove_dir_all(&root);
        fs::rename(&partial, &root)
            .with_context(|| format!("could not rename {} to {}", partial.display(), root.display()))?;
    }
    // The .deb (about 70 MB) is no longer needed.
    let _ = fs::remove_file(&deb);
    Ok(Kernel { version, root })
}

/// The `.deb` that `apt-get download PACKAGE` left in `dir` (`PACKAGE_VERSION_ARCH.deb`).
pub(crate) fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// Unpacks the XZ stream in a bzImage into a plain ELF file.
fn unpack_vmlinux(bz_image: &Path, out: &Path) -> Result<()> {
    let image = fs::read(bz_image).with_context(|| format!("could not read {}", bz_image.display()))?;
    let Some(start) = image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC) else {
        bail!("{} holds no XZ stream", bz_image.display());
    };
    let tmp = out.with_extension("tmp");
    let mut child = Command::new("xz")
        // The stream is followed by the bzImage's trailer: stop after the first stream.
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(File::create(&tmp)?)
        .stderr(Stdio::null())
        .spawn()
        .context("could not start xz")?;
    // xz stops reading after the stream, so the write may end in a broken pipe: only xz's
    // status and its output count.
    let _ = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(&image[start..]);
    let status = child.wait()?;
    if !status.success() {
        let _ = fs::remove_file(&tmp);
        bail!("xz could not unpack the kernel in {}", bz_image.display());
    }
    let head = fs::read(&tmp).map(|b| b.starts_with(ELF_MAGIC)).unwrap_or(false);
    if !head {
        let _ = fs::remove_file(&tmp);
        bail!(
            "the kernel unpacked from {} is not an ELF file",
            bz_image.display()
        );
    }
    fs::rename(&tmp, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{abi_number, newest_image_package};

    #[test]
    fn picks_the_highest_plain_amd64_image() {
        let search = "\
linux-image-6.1.0-47-amd64-dbg - Debug symbols for linux-image-6.1.0-47-amd64
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-57-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-58-rt-amd64 - Linux 6.1 for 64-bit PCs, PREEMPT_RT (signed)
linux-image-6.1.0-57-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.12.0-1-amd64 - Linux 6.12 for 64-bit PCs (signed)
";
        assert_eq!(
            newest_image_package(search).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
    }

    #[test]
    fn no_plain_image_is_none() {
        assert_eq!(newest_image_package(""), None);
        assert_eq!(
            newest_image_package("linux-image-6.1.0-57-amd64-dbg - symbols\n"),
            None
        );
    }

    #[test]
    fn abi_numbers_compare_as_numbers() {
        assert_eq!(abi_number("6.1.0-9-amd64"), Some(9));
        assert_eq!(abi_number("6.1.0-57-amd64"), Some(57));
        assert_eq!(abi_number("6.1.0-57-amd64.partial-12"), None);
        assert_eq!(abi_number("6.1.0--amd64"), None);
        assert_eq!(abi_number("6.1.0-x7-amd64"), None);
    }
}
