//! The NAT under test: `nat-ctl attach` as a child process, and its inspection commands.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Once;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::Lab;
use crate::netns::Netns;
use crate::proc::{self, Output, Proc};

/// How long `nat-ctl attach` may take to print its `attached` line: a bound, not a figure. The
/// verifier's work dominates, and in the 6.1 VM tests (TCG emulation, about 9x slower) an attach
/// with internal interfaces took over 30 s on a busy host.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `nat-ctl attach` may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Time limit of one inspection command (`mappings`, `stats`, `status`).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(20);
/// Where nat-ctl pins its maps (one directory per attached interface below it).
pub const PIN_ROOT: &str = "/sys/fs/bpf/nat-gw";

/// Path of the nat-ctl binary: `$NAT_CTL`, else `<workspace>/target/release/nat-ctl`.
pub fn nat_ctl_path() -> PathBuf {
    match std::env::var_os("NAT_CTL") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/nat-ctl"),
    }
}

/// Mounts bpffs at /sys/fs/bpf unless it is mounted already (nat-ctl pins its maps there).
pub fn ensure_bpffs() -> Result<()> {
    static ONCE: Once = Once::new();
    let mounted = || {
        std::fs::read_to_string("/proc/mounts")
            .map(|m| {
                m.lines()
                    .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
            })
            .unwrap_or(false)
    };
    ONCE.call_once(|| {
        if !mounted() {
            let _ = proc::run(
                "mount bpffs",
                proc::command("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]),
                Duration::from_secs(10),
            );
        }
    });
    if !mounted() {
        bail!("bpffs is not mounted at /sys/fs/bpf and mounting it failed");
    }
    Ok(())
}

/// A `nat-ctl` command run inside `ns` with `nsenter --net` (so it sees the host's bpffs).
pub fn nat_ctl(ns: &Netns, args: &[&str]) -> Command {
    ns.nsenter(&nat_ctl_path().to_string_lossy(), args)
}

/// Runs a `nat-ctl` command inside `ns` to completion (any exit status) with a time limit.
pub fn run_nat_ctl(ns: &Netns, args: &[&str]) -> Result<Output> {
    proc::run(
        &format!("nat-ctl {}", args.join(" ")),
        nat_ctl(ns, args),
        CTL_TIMEOUT,
    )
}

/// The messages of the daemon's log lines (`TIME nat-ctl: ...`): each non-empty line of
/// `stderr` without the RFC 3339 time it starts with (lines under systemd have none).
pub fn log_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.split_once(' ') {
            Some((time, rest)) if time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T' => {
                rest
            }
            _ => l,
        })
        .collect()
}

/// One row of `nat-ctl mappings --json`, static forwards included (their `expires_in` is null).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// "udp", "tcp" or "icmp".
    pub proto: String,
    /// Internal endpoint.
    pub internal: SocketAddrV4,
    /// External endpoint.
    pub external: SocketAddrV4,
    /// Remote endpoint, where the mode tracks it.
    pub remote: Option<SocketAddrV4>,
    /// State (protocol specific; "static" for a forward).
    pub state: String,
    /// Seconds until expiry; `None` for what never expires.
    pub expires_in: Option<i64>,
}

/// The keys every row of `mappings --json` must have.
pub const MAPPING_KEYS: [&str; 6] = ["proto", "internal", "external", "remote", "state", "expires_in"];

pub(crate) fn endpoint(v: &serde_json::Value, key: &str) -> Result<SocketAddrV4> {
    let s = v[key]
        .as_str()
        .with_context(|| format!("mapping field {key} is not a string: {v}"))?;
    s.parse()
        .with_context(|| format!("mapping field {key} = {s:?} is not ip:port"))
}

/// Parses the JSON of `nat-ctl mappings --json`, requiring every key of [`MAPPING_KEYS`] in
/// every row.
pub fn parse_mappings(json: &str) -> Result<Vec<Mapping>> {
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("mappings JSON: {json}"))?;
    let rows = v
        .as_array()
        .with_context(|| format!("mappings JSON is not an array: {json}"))?;
    rows.iter()
        .map(|r| {
            let obj = r
                .as_object()
                .with_context(|| format!("row {r} is not an object"))?;
            if let Some(missing) = MAPPING_KEYS.iter().find(|k| !obj.contains_key(**k)) {
                anyhow::bail!("row {r} has no key {missing:?}");
            }
            Ok(Mapping {
                proto: r["proto"]
                    .as_str()
                    .with_context(|| format!("no proto in {r}"))?
                    .to_string(),
                internal: endpoint(r, "internal")?,
                external: endpoint(r, "external")?,
                remote: if r["remote"].is_null() {
                    None
                } else {
                    Some(endpoint(r, "remote")?)
                },
                state: r["state"]
                    .as_str()
                    .with_context(|| format!("no state in {r}"))?
                    .to_string(),
                expires_in: if r["expires_in"].is_null() {
                    None
                } else {
                    Some(
                        r["expires_in"]
                            .as_i64()
                            .with_context(|| format!("expires_in is not an integer in {r}"))?,
                    )
                },
            })
        })
        .collect()
}

/// Counters of `nat-ctl stats --json`.
#[derive(Clone, Debug, Default)]
pub struct Stats(pub BTreeMap<String, u64>);

impl Stats {
    /// Parses the JSON of `nat-ctl stats --json`.
    pub fn parse(json: &str) -> Result<Stats> {
        let v: serde_json::Value =
            serde_json::from_str(json).with_context(|| format!("stats JSON: {json}"))?;
        let obj = v
            .as_object()
            .with_context(|| format!("stats JSON is not an object: {json}"))?;
        let mut m = BTreeMap::new();
        for (k, v) in obj {
            m.insert(
                k.clone(),
                v.as_u64()
                    .with_context(|| format!("counter {k} = {v} is not an integer"))?,
            );
        }
        Ok(Stats(m))
    }

    /// A counter's value; an error if nat-ctl does not report it.
    pub fn get(&self, name: &str) -> Result<u64> {
        self.0
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("counter {name} missing from stats: {:?}", self.0))
    }

    /// Every counter that changed since `before`, as `name +delta` (for failure messages).
    pub fn changes(&self, before: &Stats) -> String {
        let v: Vec<String> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let b = before.0.get(k).copied().unwrap_or(0);
                (*v != b).then(|| format!("{k} +{}", v.wrapping_sub(b)))
            })
            .collect();
        if v.is_empty() {
            "no counter changed".into()
        } else {
            v.join(", ")
        }
    }

    /// How much counter `name` grew since `before`.
    pub fn delta(&self, before: &Stats, name: &str) -> Result<u64> {
        Ok(self.get(name)?.saturating_sub(before.get(name)?))
    }
}

/// A running `nat-ctl attach`. Dropping it sends SIGTERM (SIGKILL if it hangs).
pub struct NatProcess {
    proc: Proc,
    ns_path: PathBuf,
    ns_name: String,
    iface: String,
    attached: String,
}

impl NatProcess {
    /// `nat-ctl attach <lab.wan_if> args...` in the lab's NAT namespace; waits for `attached `.
    pub fn attach(lab: &Lab, args: &[&str]) -> Result<NatProcess> {
        NatProcess::attach_in(&lab.nat, &lab.wan_if, args)
    }

    /// `nat-ctl attach IFACE args...` inside `ns`; waits (bounded) for the `attached ` line.
    pub fn attach_in(ns: &Netns, iface: &str, args: &[&str]) -> Result<NatProcess> {
        NatProcess::attach_wrapped(ns, iface, &[], args)
    }

    /// As `attach_in`, with nat-ctl started by a wrapper command (`wrapper` then nat-ctl's path
    /// and arguments), e.g. `setpriv` to run it with fewer capabilities.
    pub fn attach_wrapped(ns: &Netns, iface: &str, wrapper: &[&str], args: &[&str]) -> Result<NatProcess> {
        ensure_bpffs()?;
        let bin = nat_ctl_path();
        if !bin.exists() {
            bail!(
                "nat-ctl binary {} does not exist (set NAT_CTL or build it)",
                bin.display()
            );
        }
        let mut full = vec!["attach", iface];
        full.extend_from_slice(args);
        let command = match wrapper.split_first() {
            None => nat_ctl(ns, &full),
            Some((program, wrapper_args)) => {
                let bin = bin.to_string_lossy();
                let mut wrapped: Vec<&str> = wrapper_args.to_vec();
                wrapped.push(&bin);
                wrapped.extend_from_slice(&full);
                ns.nsenter(program, &wrapped)
            }
        };
        let proc = Proc::spawn(&format!("nat-ctl {}", full.join(" ")), command)?;
        let mut nat = NatProcess {
            proc,
            ns_path: ns.path(),
            ns_name: ns.name().to_string(),
            iface: iface.to_string(),
            attached: String::new(),
        };
        let line = proc::poll(ATTACH_TIMEOUT, Duration::from_millis(20), || {
            if let Some(l) = nat.proc.stdout().lines().find(|l| l.starts_with("attached ")) {
                return Some(Ok(l.to_string()));
            }
            match nat.proc.try_wait() {
                Ok(Some(st)) => Some(Err(st)),
                _ => None,
            }
        });
        match line {
            Some(Ok(l)) => {
                nat.attached = l;
                Ok(nat)
            }
            Some(Err(st)) => {
                let _ = nat.proc.wait_timeout(Duration::from_secs(1));
                bail!(
                    "{} exited ({st}) before attaching; stderr: {}",
                    nat.proc.name(),
                    nat.proc.stderr().trim()
                )
            }
            None => bail!(
                "{} printed no `attached ` line within {ATTACH_TIMEOUT:?}; stdout: {} stderr: {}",
                nat.proc.name(),
                nat.proc.stdout().trim(),
                nat.proc.stderr().trim()
            ),
        }
    }

    /// The `attached ...` line it printed.
    pub fn attached_line(&self) -> &str {
        &self.attached
    }

    /// The interface it is attached to.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.proc.try_wait(), Ok(None))
    }

    fn ctl(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg(nat_ctl_path())
            .args(args);
        proc::run(
            &format!("nat-ctl {} (in {})", args.join(" "), self.ns_name),
            c,
            CTL_TIMEOUT,
        )
    }

    /// Runs `nat-ctl <sub> -i IFACE extra...`; it must exit 0. Returns stdout.
    pub fn ctl_ok(&self, sub: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec![sub, "-i", &self.iface];
        args.extend_from_slice(extra);
        Ok(self
            .ctl(&args)?
            .check(&format!("nat-ctl {}", args.join(" ")))?
            .stdout)
    }

    /// `nat-ctl mappings -i IFACE --json`, parsed.
    pub fn mappings(&self) -> Result<Vec<Mapping>> {
        parse_mappings(&self.ctl_ok("mappings", &["--json"])?)
    }

    /// `nat-ctl stats -i IFACE --json`, parsed.
    pub fn stats(&self) -> Result<Stats> {
        Stats::parse(&self.ctl_ok("stats", &["--json"])?)
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.proc.terminate(STOP_TIMEOUT)
    }

    /// SIGTERM, wait, and require exit status 0.
    pub fn stop(mut self) -> Result<()> {
        let st = self.terminate()?;
        if !st.success() {
            bail!(
                "nat-ctl attach exited with {st} after SIGTERM; stderr: {}",
                self.proc.stderr().trim()
            );
        }
        Ok(())
    }
}

/// What the NAT left on an interface: XDP/TC programs (per `ip link` and `bpftool net`), a
/// clsact qdisc, and pin directories named after the interface.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// `ip link show` mentions xdp.
    pub xdp_in_ip_link: Option<String>,
    /// `bpftool net show dev IFACE` lists a program on the interface.
    pub bpftool: Option<String>,
    /// `tc qdisc show dev IFACE` lists clsact.
    pub clsact: Option<String>,
    /// Entries of /sys/fs/bpf/nat-gw whose name contains the interface name.
    pub pin_dirs: Vec<String>,
}

impl Leftovers {
    /// Inspects `iface` in `ns`.
    pub fn inspect(ns: &Netns, iface: &str) -> Result<Leftovers> {
        let mut l = Leftovers::default();
        let link = ns.ip_out(&["link", "show", "dev", iface])?;
        if link.contains("xdp") {
            l.xdp_in_ip_link = Some(link);
        }
        let out = proc::run_ok(
            "bpftool net show",
            ns.nsenter("bpftool", &["net", "show", "dev", iface]),
            CTL_TIMEOUT,
        )?;
        if out.stdout.contains(&format!("{iface}(")) {
            l.bpftool = Some(out.stdout);
        }
        let tc = ns.run_ok("tc", &["qdisc", "show", "dev", iface], CTL_TIMEOUT)?;
        if tc.stdout.contains("clsact") {
            l.clsact = Some(tc.stdout);
        }
        l.pin_dirs = Leftovers::inspect_pins(iface);
        Ok(l)
    }

    /// Entries of /sys/fs/bpf/nat-gw whose name contains `iface`.
    pub fn inspect_pins(iface: &str) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(rd) = std::fs::read_dir(PIN_ROOT) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.contains(iface) {
                    found.push(n);
                }
            }
        }
        found
    }

    /// True if nothing is left.
    pub fn is_clean(&self) -> bool {
        self.xdp_in_ip_link.is_none()
            && self.bpftool.is_none()
            && self.clsact.is_none()
            && self.pin_dirs.is_empty()
    }
}
