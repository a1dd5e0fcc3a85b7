//! Booting the kernel under qemu (TCG) and following its serial console.
//!
//! KVM cannot run Debian's 6.1 kernel on these machines (qemu aborts on MSR 0x10a with
//! `-cpu host` and hangs with `-cpu kvm64`), so the VM runs under TCG. The guest's console is
//! the first serial port on qemu's stdout: everything goes to a console log, and the lines
//! between the guest's start and exit markers (the command's own output) go to our stdout.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::kernel::Kernel;

/// qemu's binary (Debian package qemu-system-x86).
const QEMU: &str = "qemu-system-x86_64";
/// Two vCPUs: the machine has two cores, and the data path runs per CPU.
const VCPUS: &str = "2";
/// Guest memory: the tests' namespaces, coturn and python need far less; the maps of a large
/// `--max-bindings` need some.
const MEMORY: &str = "4G";
/// Printed by guest.sh right before it starts the command.
pub const START_MARKER: &str = "VM-COMMAND-START";
/// Printed by guest.sh (and by /init on a boot failure) with the exit status after it.
pub const EXIT_MARKER: &str = "VM-EXIT-STATUS=";
/// The status /init reports when it could not prepare the root (see xtask/vm/init).
pub const BOOT_FAILURE_STATUS: i32 = 125;

/// What to show on our stdout.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Show {
    /// Only the command's output (between the markers).
    Command,
    /// The whole console, firmware and kernel messages included.
    Everything,
}

/// One boot.
pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    /// The initramfs built for this boot.
    pub initramfs: &'a Path,
    /// The run directory: shared writable with the guest, holds guest.sh and cmd.sh.
    pub run_dir: &'a Path,
    /// qemu is killed after this long.
    pub timeout: Duration,
    pub show: Show,
    /// Where the whole console goes.
    pub console_log: &'a Path,
}

/// How a boot ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit status guest.sh reported; `None` when it never did.
    pub status: Option<i32>,
    /// Whether qemu was killed at the timeout.
    pub timed_out: bool,
    /// From starting qemu to the start marker: boot and mounts.
    pub boot_time: Option<Duration>,
    /// From starting qemu until it exited.
    pub total_time: Duration,
}

/// Where a console line belongs.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    Booting,
    Running,
    Done(i32),
}

/// Follows the console line by line: which lines are the command's output, and its status.
#[derive(Debug)]
struct Console {
    phase: Phase,
}

impl Console {
    fn new() -> Self {
        Self {
            phase: Phase::Booting,
        }
    }

    /// The part of `line` that is the command's output, if any, and moves through the phases.
    fn feed<'l>(&mut self, line: &'l str) -> Option<&'l str> {
        let line = line.trim_end_matches(['\r', '\n']);
        match self.phase {
            Phase::Booting => {
                if let Some((_, status)) = parse_exit_marker(line) {
                    // /init failed before the command could start.
                    self.phase = Phase::Done(status);
                } else if line.ends_with(START_MARKER) {
                    // The firmware's last line may lack its newline: the marker can end a line.
                    self.phase = Phase::Running;
                }
                None
            }
            Phase::Running => match parse_exit_marker(line) {
                Some((before, status)) => {
                    self.phase = Phase::Done(status);
                    // Output that did not end with a newline shares the marker's line.
                    (!before.is_empty()).then_some(before)
                }
                None => Some(line),
            },
            Phase::Done(_) => None,
        }
    }
}

/// Splits a console line holding the exit marker into what came before it and the status:
/// `"VM-EXIT-STATUS=3"` → `("", 3)`, `"no newlineVM-EXIT-STATUS=0"` → `("no newline", 0)`.
pub fn parse_exit_marker(line: &str) -> Option<(&str, i32)> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.rfind(EXIT_MARKER)?;
    let digits = &line[at + EXIT_MARKER.len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((&line[..at], digits.parse().ok()?))
}

/// The kernel command line: the serial console, quiet (the kernel's warnings still show), a
/// panic ends qemu at once (panic=-1 reboots, -no-reboot turns that into an exit), and the
/// words /init reads.
fn kernel_command_line(run_dir: &Path, modules_dir: &Path) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 vmrun={} vmmodules={}",
        run_dir.display(),
        modules_dir.display()
    )
}

/// The qemu command line for `boot`.
fn qemu_command(boot: &Boot) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-smp",
        VCPUS,
        "-m",
        MEMORY,
    ])
    // No display, the serial console on stdio; no NIC: the guest must reach no network.
    .args(["-nographic", "-no-reboot", "-nic", "none"])
    .arg("-kernel")
    .arg(boot.kernel.boot_image())
    .arg("-initrd")
    .arg(boot.initramfs)
    .arg("-append")
    .arg(kernel_command_line(boot.run_dir, &boot.kernel.modules_dir()))
    // The host's root, read-only; remap keeps inode numbers of different host filesystems
    // apart.
    .arg("-virtfs")
    .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=results,security_model=none,multidevs=remap",
        boot.run_dir.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. A killed xtask
    // (SIGKILL, a CI timeout) then takes qemu with it instead of leaving the VM running.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// Boots, streams the console as `boot.show` says, and waits for qemu to exit or the timeout
/// (then kills qemu by its pid). `Err` only when qemu could not be started or waited for.
pub fn run(boot: &Boot) -> Result<Outcome> {
    let mut log = File::create(boot.console_log)
        .with_context(|| format!("could not create {}", boot.console_log.display()))?;
    let started = Instant::now();
    let mut child = qemu_command(boot)
        .spawn()
        .with_context(|| format!("could not start {QEMU} (Debian package qemu-system-x86)"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (lines_tx, lines) = mpsc::channel::<Vec<u8>>();
    let reader = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let deadline = started + boot.timeout;
    let mut console = Console::new();
    let mut boot_time = None;
    let mut timed_out = false;
    let mut out = std::io::stdout();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(remaining) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                // Child::kill sends SIGKILL to qemu's own pid.
                let _ = child.kill();
                break;
            }
        };
        let _ = log.write_all(&line);
        let text = String::from_utf8_lossy(&line);
        let was_booting = console.phase == Phase::Booting;
        let shown = console.feed(&text);
        if was_booting && console.phase == Phase::Running {
            boot_time = Some(started.elapsed());
        }
        match boot.show {
            Show::Everything => {
                let _ = out.write_all(text.trim_end_matches(['\r', '\n']).as_bytes());
                let _ = out.write_all(b"\n");
            }
            Show::Command => {
                if let Some(shown) = shown {
                    let _ = writeln!(out, "{shown}");
                }
            }
        }
        let _ = out.flush();
    }
    child
        .wait()
        .with_context(|| format!("could not wait for {QEMU}"))?;
    let _ = reader.join();
    let total_time = started.elapsed();

    // guest.sh writes the status to a file too, before the marker: trust it over the console.
    let from_file = std::fs::read_to_string(boot.run_dir.join("exit-status"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let from_console = match console.phase {
        Phase::Done(status) => Some(status),
        _ => None,
    };
    Ok(Outcome {
        status: from_file.or(from_console),
        timed_out,
        boot_time,
        total_time,
    })
}

/// The last `lines` lines of a console log, for error messages.
pub fn console_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<String> = text.lines().map(without_escapes).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `line` without terminal escape sequences (the firmware clears the screen) and other control
/// characters, for quoting in an error message.
fn without_escapes(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, ending with a byte in @..~; otherwise ESC and one character.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// The console log of a run directory.
pub fn console_log_path(run_dir: &Path) -> PathBuf {
    run_dir.join("console.log")
}

#[cfg(test)]
mod tests {
    use super::{parse_exit_marker, without_escapes, Console, Phase};

    #[test]
    fn escapes_are_removed_from_quoted_console_lines() {
        assert_eq!(
            without_escapes("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r"),
            "SeaBIOS (version 1.16.2)"
        );
        assert_eq!(without_escapes("plain\ttext"), "plain\ttext");
    }

    #[test]
    fn exit_marker_with_and_without_preceding_output() {
        assert_eq!(parse_exit_marker("VM-EXIT-STATUS=0\r\n"), Some(("", 0)));
        assert_eq!(parse_exit_marker("VM-EXIT-STATUS=125"), Some(("", 125)));
        assert_eq!(
            parse_exit_marker("partialVM-EXIT-STATUS=3\r"),
            Some(("partial", 3))
        );
        assert_eq!(parse_exit_marker("VM-EXIT-STATUS="), None);
        assert_eq!(parse_exit_marker("VM-EXIT-STATUS=1 trailing"), None);
        assert_eq!(parse_exit_marker("echo VM-EXIT-STATUS=$status"), None);
        assert_eq!(parse_exit_marker("[    5.7] reboot: Power down"), None);
    }

    #[test]
    fn shows_only_the_command_output() {
        let mut console = Console::new();
        let shown: Vec<Option<&str>> = [
            "SeaBIOS (version 1.16.2)\r\n",
            "Booting from ROM..VM-COMMAND-START\r\n",
            "6.1.0-57-amd64\r\n",
            "\r\n",
            "no newlineVM-EXIT-STATUS=7\r\n",
            "[    5.710610] reboot: Power down\r\n",
        ]
        .into_iter()
        .map(|line| console.feed(line))
        .collect();
        assert_eq!(
            shown,
            vec![
                None,
                None,
                Some("6.1.0-57-amd64"),
                Some(""),
                Some("no newline"),
                None
            ]
        );
        assert_eq!(console.phase, Phase::Done(7));
    }

    #[test]
    fn a_boot_failure_reports_its_status_without_output() {
        let mut console = Console::new();
        assert_eq!(console.feed("vm-init: could not mount the host root\r\n"), None);
        assert_eq!(console.feed("VM-EXIT-STATUS=125\r\n"), None);
        assert_eq!(console.phase, Phase::Done(125));
    }
}
