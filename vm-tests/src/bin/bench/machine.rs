//! The machine a run happened on, for the report.

use std::time::Duration;

use vm_tests::proc;

/// Facts about the machine.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// First `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// UTC date and time of the run.
    pub date: String,
    /// The source measured: git commit of the workspace, and whether the tree had changes.
    pub revision: String,
}

const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

fn cmd(prog: &str, args: &[&str]) -> String {
    proc::run(prog, proc::command(prog, args), TOOL_TIMEOUT)
        .map(|o| o.stdout.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

impl Machine {
    /// Reads the facts now.
    pub fn now() -> Machine {
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            kernel: cmd("uname", &["-r"]),
            cpu_model: proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
            memory_mib: proc_field("/proc/meminfo", "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib / 1024)
                .unwrap_or(0),
            date: cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            revision: revision(),
        }
    }
}

/// `<commit>` or `<commit> plus uncommitted changes` of the workspace this binary was built from.
fn revision() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = cmd("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
    let dirty = proc::run(
        "git status",
        proc::command(
            "git",
            &["-C", root, "status", "--porcelain", "--untracked-files=no"],
        ),
        TOOL_TIMEOUT,
    )
    .map(|o| !o.stdout.trim().is_empty())
    .unwrap_or(false);
    if dirty {
        format!("{commit} plus uncommitted changes")
    } else {
        commit
    }
}
