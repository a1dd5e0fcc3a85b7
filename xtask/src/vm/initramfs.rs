//! The VM's initramfs: a static busybox, the modules the boot needs, and `xtask/vm/init`
//! (which mounts the host's root over virtio-9p and switches to it). Built fresh for every boot
//! (under a second), so a changed init script or kernel takes effect at once.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::kernel::Kernel;
use crate::cmd::Cmd;
use crate::setup::log_file;

/// The static busybox of Debian's busybox-static package.
const BUSYBOX: &str = "/bin/busybox";

/// Modules /init loads before it can mount the host root: the virtio PCI transport, 9p over
/// virtio, and overlayfs for the writable layer. Their dependencies are added from modules.dep.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// PID 1 of the initramfs.
const INIT: &str = include_str!("../../vm/init");

/// The module files in load order from `modprobe --show-depends` output (lines `insmod PATH
/// [OPTIONS]`, dependencies first), each once. `builtin NAME` lines need nothing.
pub fn insmod_paths(show_depends: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in show_depends.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("insmod") {
            continue;
        }
        if let Some(path) = words.next().map(PathBuf::from) {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    paths
}

/// The boot modules of `kernel` with their dependencies, in load order.
fn boot_modules(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    let mut output = String::new();
    for module in BOOT_MODULES {
        let (ok, out) = Cmd::new("modprobe")
            .arg("-d")
            .arg(&kernel.root)
            .args(["-S", &kernel.version, "--show-depends", module])
            .stdout_quietly()
            .context("could not run modprobe (Debian package kmod)")?;
        if !ok {
            bail!(
                "`modprobe -d {} -S {} --show-depends {module}` failed: the unpacked kernel lacks {module}",
                kernel.root.display(),
                kernel.version
            );
        }
        output.push_str(&out);
    }
    Ok(insmod_paths(&output))
}

/// Writes the initramfs (an uncompressed newc cpio archive) to `out`, staging its files in
/// `out` with `.d` appended.
pub fn build(kernel: &Kernel, out: &Path) -> Result<()> {
    let stage = out.with_extension("d");
    let _ = fs::remove_dir_all(&stage);
    for dir in ["bin", "dev", "modules"] {
        fs::create_dir_all(stage.join(dir))
            .with_context(|| format!("could not create {}", stage.display()))?;
    }
    fs::copy(BUSYBOX, stage.join("bin/busybox"))
        .with_context(|| format!("could not copy {BUSYBOX} (Debian package busybox-static)"))?;
    let init = stage.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    // The kernel opens /dev/console for init's stdin/stdout/stderr before /init runs.
    let log = log_file("vm-initramfs.log");
    if !Cmd::new("mknod")
        .args(["-m", "600"])
        .arg(stage.join("dev/console"))
        .args(["c", "5", "1"])
        .run_logged(&log)?
    {
        bail!(
            "could not create the initramfs's /dev/console: mknod failed (needs root; see {})",
            log.display()
        );
    }
    // Numbered so that /init's glob loads them in dependency order.
    for (index, module) in boot_modules(kernel)?.iter().enumerate() {
        let name = module.file_name().and_then(|n| n.to_str()).unwrap_or("module.ko");
        let to = stage.join("modules").join(format!("{:02}-{name}", index + 1));
        fs::copy(module, &to).with_context(|| format!("could not copy {}", module.display()))?;
    }
    let ok = Cmd::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet -O \"$1\"", "sh"])
        .arg(out)
        .current_dir(&stage)
        .run_logged(&log)?;
    let _ = fs::remove_dir_all(&stage);
    if !ok {
        bail!(
            "could not build the initramfs: cpio failed (see {})",
            log.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::insmod_paths;

    #[test]
    fn load_order_with_each_module_once() {
        let out = "\
insmod /t/kernel/drivers/virtio/virtio_ring.ko 
insmod /t/kernel/drivers/virtio/virtio.ko 
insmod /t/kernel/drivers/virtio/virtio_pci.ko 
insmod /t/kernel/drivers/virtio/virtio_ring.ko 
builtin crc32c
insmod /t/kernel/fs/9p/9p.ko opt=1
";
        let paths: Vec<PathBuf> = [
            "/t/kernel/drivers/virtio/virtio_ring.ko",
            "/t/kernel/drivers/virtio/virtio.ko",
            "/t/kernel/drivers/virtio/virtio_pci.ko",
            "/t/kernel/fs/9p/9p.ko",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(insmod_paths(out), paths);
    }
}
