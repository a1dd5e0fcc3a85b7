//! Debian 12's stock 6.1 kernel in qemu (TCG), over the host's userspace.
//!
//! The guest mounts the host's root read-only over virtio-9p with a tmpfs overlay on top, so it
//! has every host tool and every built binary at the same path; a second, writable 9p share is
//! the run directory (`target/vm/runs/TIME-PID`), mounted at its own host path, which holds the
//! scripts the guest runs and receives what it writes. `cargo xtask vm-run -- CMD` runs one
//! shell command there; the `--vm` phase of `cargo xtask test` runs end-to-end tests there.

mod initramfs;
pub mod kernel;
mod qemu;
pub mod suite;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::build::nat_ctl_path;
use crate::cmd::{child_path, flush, shell_quote, workspace_root};
use crate::setup;
use kernel::Kernel;
pub use qemu::Show;

/// PID 1 in the guest's root: runs cmd.sh, reports its status, powers off.
const GUEST_SH: &str = include_str!("../../vm/guest.sh");
/// Run directories kept for looking at afterwards (console log, test logs); older ones whose
/// xtask has exited are removed.
const KEPT_RUNS: usize = 8;
/// Host environment variables handed to the guest command when set.
const PASSED_ENV: &[&str] = &[
    "NAT_CTL",
    "VM_TESTS_PYPI",
    "BENCH_EBPF_DIR",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_LOG",
];
/// Directories the guest's PATH has even when the host's lacks them.
const STANDARD_PATH: &[&str] = &[
    "/root/.cargo/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// Directories the guest mounts fresh (or are not the host's): a run directory there would be
/// hidden from the guest.
const GUEST_OWN_DIRS: &[&str] = &["/proc", "/sys", "/dev", "/run", "/tmp"];

/// A run directory: shared writable with the guest at the same path.
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates a fresh run directory holding guest.sh, after removing old ones.
    pub fn create() -> Result<Self> {
        let runs = kernel::vm_dir().join("runs");
        fs::create_dir_all(&runs).with_context(|| format!("could not create {}", runs.display()))?;
        prune_runs(&runs);
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = runs.join(format!("{secs}-{}", std::process::id()));
        check_guest_path(&path)?;
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("could not create {}", path.display()))?;
        fs::write(path.join("guest.sh"), GUEST_SH)?;
        Ok(Self { path })
    }

    /// Writes cmd.sh: exports `env`, changes to `cwd`, runs `body` (shell text).
    pub fn write_command(&self, env: &[(String, String)], cwd: &Path, body: &str) -> Result<()> {
        fs::write(self.path.join("cmd.sh"), command_script(env, cwd, body))
            .with_context(|| format!("could not write {}/cmd.sh", self.path.display()))
    }

    pub fn console_log(&self) -> PathBuf {
        qemu::console_log_path(&self.path)
    }
}

/// Removes run directories beyond the newest `KEPT_RUNS`, except those of a live xtask.
fn prune_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    // TIME-PID names: seconds since the epoch have ten digits until 2286, so they sort as text.
    names.sort();
    let old = names.len().saturating_sub(KEPT_RUNS);
    for name in &names[..old] {
        let alive = name
            .rsplit_once('-')
            .is_some_and(|(_, pid)| Path::new("/proc").join(pid).exists());
        if !alive {
            let _ = fs::remove_dir_all(runs.join(name));
        }
    }
}

/// A run directory's path goes on the kernel command line and in qemu's -virtfs option: no
/// spaces, commas or quotes; and it must not be under a directory the guest mounts over.
fn check_guest_path(path: &Path) -> Result<()> {
    let text = path.to_string_lossy();
    if text.is_empty()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-_.+@".contains(c))
    {
        bail!(
            "the VM cannot use {text}: the repository's path must hold only letters, digits and /-_.+@ \
             (it goes on the kernel command line)"
        );
    }
    if let Some(dir) = GUEST_OWN_DIRS.iter().find(|d| path.starts_with(d)) {
        bail!("the VM cannot use {text}: the guest mounts its own {dir}, which would hide it; move the repository");
    }
    Ok(())
}

/// cmd.sh: exports, `cd`, then the body. Values are single-quoted.
fn command_script(env: &[(String, String)], cwd: &Path, body: &str) -> String {
    let mut script = String::from("# Written by cargo xtask for one VM run.\n");
    for (key, value) in env {
        script.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    script.push_str(&format!(
        "cd {} || exit 126\n",
        shell_quote(&cwd.to_string_lossy())
    ));
    script.push_str(body);
    if !body.ends_with('\n') {
        script.push('\n');
    }
    script
}

/// The guest's PATH: the host's (with cargo's bin directory) plus the standard directories.
fn guest_path() -> String {
    let mut dirs: Vec<String> = child_path()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    for dir in STANDARD_PATH {
        if !dirs.iter().any(|d| d == dir) {
            dirs.push(dir.to_string());
        }
    }
    dirs.join(":")
}

/// Environment for the guest command: PATH, HOME, NAT_CTL (the built one unless set), and the
/// `PASSED_ENV` variables that are set here.
pub fn guest_env() -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), guest_path()),
        (
            "HOME".to_string(),
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        ),
    ];
    for key in PASSED_ENV {
        if let Ok(value) = std::env::var(key) {
            env.push((key.to_string(), value));
        }
    }
    if !env.iter().any(|(k, _)| k == "NAT_CTL") {
        env.push((
            "NAT_CTL".to_string(),
            nat_ctl_path().to_string_lossy().into_owned(),
        ));
    }
    env
}

/// The shell text for `vm-run -- ARGS`: a single argument is shell text as it is (`vm-run --
/// 'modprobe veth && ip link'`); several are quoted words (`vm-run -- sh -c 'a && b'`).
pub fn shell_text(args: &[String]) -> String {
    match args {
        [one] => one.clone(),
        _ => args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
    }
}

/// How a finished boot went, with what is needed to report it.
pub struct Finished {
    pub outcome: qemu::Outcome,
    pub console_log: PathBuf,
    /// Where guest.sh copies the `*.log` files the command left in the guest's /tmp.
    pub guest_tmp: PathBuf,
}

/// Boots `kernel` once with `run`'s cmd.sh (already written), killing qemu after `timeout`.
pub fn boot(kernel: &Kernel, run: &RunDir, timeout: Duration, show: Show) -> Result<Finished> {
    let initramfs = run.path.join("initramfs.cpio");
    initramfs::build(kernel, &initramfs)?;
    let console_log = run.console_log();
    eprintln!(
        "vm: booting Debian's {} under qemu (TCG, timeout {} s); console: {}",
        kernel.version,
        timeout.as_secs(),
        console_log.display()
    );
    flush();
    let outcome = qemu::run(&qemu::Boot {
        kernel,
        initramfs: &initramfs,
        run_dir: &run.path,
        timeout,
        show,
        console_log: &console_log,
    })?;
    Ok(Finished {
        outcome,
        console_log,
        guest_tmp: run.path.join("guest-tmp"),
    })
}

impl Finished {
    /// The command's exit status, or an error saying why there is none (timeout, boot failure),
    /// with the end of the console.
    pub fn status(&self) -> Result<i32> {
        let outcome = &self.outcome;
        let tail = || qemu::console_tail(&self.console_log, 15);
        match outcome.status {
            _ if outcome.timed_out => bail!(
                "the VM did not finish within {} s and qemu was killed; console ({}) ends:\n{}",
                outcome.total_time.as_secs(),
                self.console_log.display(),
                tail()
            ),
            Some(qemu::BOOT_FAILURE_STATUS) if outcome.boot_time.is_none() => bail!(
                "the VM could not prepare its root filesystem; console ({}) ends:\n{}",
                self.console_log.display(),
                tail()
            ),
            Some(status) => Ok(status),
            None => bail!(
                "the VM stopped without reporting the command's exit status; console ({}) ends:\n{}",
                self.console_log.display(),
                tail()
            ),
        }
    }

    /// Says where the logs from the guest's /tmp were kept, when there are any (e.g. nat-ctl's
    /// verifier log, which its error message places in /tmp).
    pub fn report_kept_logs(&self) {
        let Ok(entries) = fs::read_dir(&self.guest_tmp) else {
            return;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        if !names.is_empty() {
            eprintln!(
                "vm: the guest's /tmp logs are kept in {}: {}",
                self.guest_tmp.display(),
                names.join(" ")
            );
        }
    }

    /// One line: boot time and total time.
    pub fn timing(&self) -> String {
        let boot = self
            .outcome
            .boot_time
            .map(|d| format!("{:.1} s to boot", d.as_secs_f64()))
            .unwrap_or_else(|| "did not boot".into());
        format!("{boot}, {:.1} s in all", self.outcome.total_time.as_secs_f64())
    }
}

/// `cargo xtask vm-run`: runs `command` in the guest, in the repository, and returns its exit
/// status. Our own lines go to stderr, so stdout carries the command's output alone (stdout and
/// stderr of the command both arrive on stdout: they share the serial console).
pub fn run_command(timeout: Duration, show: Show, command: &[String]) -> Result<i32> {
    if command.is_empty() {
        bail!("nothing to run: give the command after `--`, e.g. `cargo xtask vm-run -- uname -r`");
    }
    setup::ensure(setup::VM)?;
    let kernel = kernel::ensure()?;
    let run = RunDir::create()?;
    run.write_command(&guest_env(), &workspace_root(), &shell_text(command))?;
    let finished = boot(&kernel, &run, timeout, show)?;
    finished.report_kept_logs();
    let status = finished.status()?;
    eprintln!("vm: exit status {status} ({})", finished.timing());
    Ok(status)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{check_guest_path, command_script, shell_text};

    #[test]
    fn one_argument_is_shell_text_several_are_words() {
        assert_eq!(shell_text(&["uname -r".into()]), "uname -r");
        assert_eq!(
            shell_text(&["sh".into(), "-c".into(), "modprobe veth && ip link".into()]),
            "sh -c 'modprobe veth && ip link'"
        );
    }

    #[test]
    fn command_script_exports_quoted_values_and_changes_directory() {
        let script = command_script(
            &[
                ("NAT_CTL".into(), "/w/target/release/nat-ctl".into()),
                ("X".into(), "a b".into()),
            ],
            Path::new("/w"),
            "uname -r",
        );
        assert_eq!(
            script,
            "# Written by cargo xtask for one VM run.\nexport NAT_CTL=/w/target/release/nat-ctl\nexport X='a b'\ncd /w || exit 126\nuname -r\n"
        );
    }

    #[test]
    fn guest_paths_must_be_plain_and_visible() {
        assert!(check_guest_path(Path::new("/work/main/target/vm/runs/1-2")).is_ok());
        assert!(check_guest_path(Path::new("/work/my repo/target")).is_err());
        assert!(check_guest_path(Path::new("/tmp/repo/target")).is_err());
        assert!(check_guest_path(Path::new("/work/a,b")).is_err());
    }
}
