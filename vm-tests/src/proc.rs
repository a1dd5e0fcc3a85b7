//! Child processes that are always ended, by pid, and commands run with a time limit.
//!
//! Every process a test starts is wrapped in a [`Proc`]. Dropping it sends SIGTERM to that pid
//! (and SIGKILL if it does not exit in time), so a failing or panicking test leaves nothing
//! running. Nothing here ever signals a process it did not start.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long a process gets to exit after SIGTERM before it gets SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// Poll interval while waiting for a process.
const POLL: Duration = Duration::from_millis(20);

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Output {
    /// Fails with the command's output unless it exited with status 0.
    pub fn check(self, what: &str) -> Result<Output> {
        if self.status.success() {
            Ok(self)
        } else {
            bail!(
                "{what} failed ({}): stdout: {} stderr: {}",
                self.status,
                self.stdout.trim(),
                self.stderr.trim()
            )
        }
    }
}

/// A running child process with its stdout and stderr collected in the background.
pub struct Proc {
    name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    eof: mpsc::Receiver<()>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>, eof: mpsc::Sender<()>) {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]),
            }
        }
        let _ = eof.send(());
    });
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr captured. `name` is used in messages.
    ///
    /// The child gets SIGTERM if the spawning thread dies (PR_SET_PDEATHSIG), so even a test
    /// binary killed with SIGKILL does not leave it running. Spawn from the thread that owns the
    /// `Proc` (the test's own thread), not from a short-lived helper thread.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, eof) = mpsc::channel();
        collect(
            child.stdout.take().expect("piped stdout"),
            stdout.clone(),
            tx.clone(),
        );
        collect(child.stderr.take().expect("piped stderr"), stderr.clone(), tx);
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            status: None,
            stdout,
            stderr,
            eof,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// stdout so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// stderr so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child
                    .try_wait()
                    .with_context(|| format!("waiting for {}", self.name))?;
            }
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                self.drain_output();
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Waits (bounded) until both output pipes reached EOF, so `stdout()`/`stderr()` are complete.
    fn drain_output(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.eof.recv_timeout(left).is_err() {
                break;
            }
        }
    }

    /// Sends `sig` to this process (only if it has not been reaped yet).
    pub fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.pid() as libc::pid_t;
        if pid <= 0 {
            bail!("{}: no pid", self.name);
        }
        // SAFETY: plain kill(2) on the pid of our own, not yet reaped, child.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            return Err(anyhow!(std::io::Error::last_os_error())).context(format!("kill {pid}"));
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout`; returns the exit status, or an error (after SIGKILL)
    /// if the process did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            self.drain_output();
            return Ok(st);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(st) = self.wait_timeout(timeout)? {
            return Ok(st);
        }
        self.kill();
        bail!(
            "{} (pid {}) did not exit within {timeout:?} of SIGTERM; killed",
            self.name,
            self.pid()
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Ok(None) = self.try_wait() {
            let _ = self.signal(libc::SIGKILL);
            if let Some(child) = self.child.as_mut() {
                if let Ok(st) = child.wait() {
                    self.status = Some(st);
                }
            }
        }
    }

    /// Waits for the process to finish within `timeout` and returns its output; kills it and
    /// fails if it runs longer.
    pub fn finish(mut self, timeout: Duration) -> Result<Output> {
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(Output {
                status,
                stdout: self.stdout(),
                stderr: self.stderr(),
            }),
            None => {
                self.kill();
                bail!(
                    "{} did not finish within {timeout:?}; stdout: {} stderr: {}",
                    self.name,
                    self.stdout().trim(),
                    self.stderr().trim()
                )
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.try_wait() {
            if self.signal(libc::SIGTERM).is_ok() {
                if let Ok(Some(_)) = self.wait_timeout(TERM_GRACE) {
                    return;
                }
            }
            self.kill();
        }
    }
}

/// Runs `cmd` to completion with a time limit (the process is killed if it overruns).
pub fn run(name: &str, cmd: Command, timeout: Duration) -> Result<Output> {
    Proc::spawn(name, cmd)?.finish(timeout)
}

/// Runs `cmd` with a time limit and fails unless it exits 0.
pub fn run_ok(name: &str, cmd: Command, timeout: Duration) -> Result<Output> {
    run(name, cmd, timeout)?.check(name)
}

/// Builds a [`Command`] from a program and arguments.
pub fn command<S: AsRef<std::ffi::OsStr>>(prog: &str, args: &[S]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

/// Polls `f` every `every` until it returns `Some`, for at most `timeout`.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}
