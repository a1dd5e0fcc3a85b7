//! Running child commands: one short line saying what runs, then the output streamed to the
//! terminal, teed through a line callback, or captured in a log file.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

/// Environment variables that would make a nested `cargo` pick another toolchain, compiler or
/// target than the one we ask for (`cargo run` sets `RUSTUP_TOOLCHAIN` for xtask itself).
const TOOLCHAIN_OVERRIDES: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
];

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The directory all cargo builds of this repository write to.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

/// Where verbose output of setup steps goes, instead of the terminal.
pub fn log_dir() -> PathBuf {
    target_dir().join("xtask-logs")
}

/// Whether this process runs with effective uid 0 (read from `/proc/self/status`).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            // Fields: real, effective, saved, filesystem.
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// `PATH` for children, with cargo's bin directory (where rustup, cargo and bpf-linker live)
/// added when it is missing.
pub fn child_path() -> String {
    let current = std::env::var("PATH").unwrap_or_default();
    let mut dirs: Vec<String> = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin").to_string_lossy().into_owned());
    }
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&cargo_home).join("bin").to_string_lossy().into_owned());
    }
    let mut path = current;
    for dir in dirs {
        if !path.split(':').any(|d| d == dir) {
            path = if path.is_empty() {
                dir
            } else {
                format!("{dir}:{path}")
            };
        }
    }
    path
}

/// A child command, with the short line that describes it.
pub struct Cmd {
    inner: Command,
    shown: String,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref();
        let mut inner = Command::new(program);
        inner.env("PATH", child_path());
        Self {
            inner,
            shown: program.to_string_lossy().into_owned(),
        }
    }

    /// A `cargo` child that writes to this repository's target directory and uses the toolchain
    /// rustup picks by default (or the one named by a `+toolchain` first argument).
    pub fn cargo() -> Self {
        let mut cmd = Self::new("cargo");
        cmd.inner.env("CARGO_TARGET_DIR", target_dir());
        for var in TOOLCHAIN_OVERRIDES {
            cmd.inner.env_remove(var);
        }
        cmd
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref();
        self.shown.push(' ');
        self.shown.push_str(&shell_quote(&arg.to_string_lossy()));
        self.inner.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    /// Sets an environment variable and shows it in the command line.
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref();
        self.shown = format!("{key}={} {}", shell_quote(&value.to_string_lossy()), self.shown);
        self.inner.env(key, value);
        self
    }

    /// Sets an environment variable without showing it.
    pub fn env_quiet(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.inner.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.inner.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        let shown_dir = dir.strip_prefix(workspace_root()).unwrap_or(dir);
        self.shown = format!("(cd {} && {})", shown_dir.display(), self.shown);
        self.inner.current_dir(dir);
        self
    }

    /// The command as shown to the user.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Prints the command, runs it with output streamed to the terminal, and fails when it
    /// fails.
    pub fn run(self) -> Result<()> {
        let shown = self.shown.clone();
        let status = self.status()?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    /// Prints the command and runs it with output streamed to the terminal. `Err` only when it
    /// could not be started.
    pub fn status(mut self) -> Result<ExitStatus> {
        println!("$ {}", self.shown);
        flush();
        self.inner
            .status()
            .with_context(|| format!("could not start `{}`", self.shown))
    }

    /// Runs the command quietly and returns its output (stderr still goes to the terminal).
    /// `Err` only when it could not be started.
    pub fn output(mut self) -> Result<std::process::Output> {
        self.inner
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start `{}`", self.shown))
    }

    /// Prints the command and runs it with stdout teed: each line goes to the terminal and to
    /// `on_line`. Stderr goes straight to the terminal. `Err` only when it could not be started.
    pub fn run_tee(mut self, mut on_line: impl FnMut(&str)) -> Result<ExitStatus> {
        println!("$ {}", self.shown);
        flush();
        let mut child = self
            .inner
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{}`", self.shown))?;
        let mut reader = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut stdout = std::io::stdout();
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let _ = stdout.write_all(&line);
                    let _ = stdout.flush();
                    on_line(String::from_utf8_lossy(&line).trim_end());
                }
                Err(err) => {
                    eprintln!("xtask: lost output of `{}`: {err}", self.shown);
                    break;
                }
            }
        }
        child
            .wait()
            .with_context(|| format!("could not wait for `{}`", self.shown))
    }

    /// Runs the command with stdin empty and all output captured in `log` (which starts with
    /// the command line). Returns whether it succeeded; `Err` only when it could not be started
    /// or the log could not be written.
    pub fn run_logged(mut self, log: &Path) -> Result<bool> {
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
        }
        let mut file = File::create(log).with_context(|| format!("could not create {}", log.display()))?;
        writeln!(file, "$ {}", self.shown)?;
        let stderr = file.try_clone()?;
        let status = self
            .inner
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .status()
            .with_context(|| format!("could not start `{}`", self.shown))?;
        Ok(status.success())
    }

    /// Prints the command and runs it with stdout captured and stderr on the terminal (e.g.
    /// cargo's JSON messages, with its progress shown); returns whether it succeeded and its
    /// stdout. `Err` only when it could not be started.
    pub fn stdout_captured(mut self) -> Result<(bool, String)> {
        println!("$ {}", self.shown);
        flush();
        let out = self
            .inner
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start `{}`", self.shown))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Runs the command silently; true when it started and succeeded.
    pub fn succeeds_quietly(mut self) -> bool {
        self.inner
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs the command silently and returns its stdout, whatever its exit status; `None` when
    /// it could not be started.
    pub fn stdout_quietly(mut self) -> Option<(bool, String)> {
        let out = self
            .inner
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        Some((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }
}

/// `word` as a shell would need it typed: single-quoted when it holds anything but plain
/// characters, so a printed command line can be pasted back.
pub fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Flushes stdout so our lines appear before the child's output.
pub fn flush() {
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("--test-threads=1"), "--test-threads=1");
        assert_eq!(shell_quote("-C debuginfo=2"), "'-C debuginfo=2'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
