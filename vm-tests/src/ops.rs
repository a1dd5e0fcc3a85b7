//! What an operator does with a running NAT, as the control-plane tests (config file, forwards,
//! inspection, metrics, restart, limits, logs) and the fast-path tests need it: the JSON of
//! `status`, `mappings` (forwards included) and `forward list`, refused commands, config files,
//! a metrics scrape, a guard that removes a `--persist` instance, and the veth settings the
//! XDP fast path needs.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::lab::{Lab, HOST_IF};
use crate::nat::{nat_ctl, nat_ctl_path, NatProcess, ATTACH_TIMEOUT, CTL_TIMEOUT, PIN_ROOT};
use crate::netns::{Netns, SETUP_TIMEOUT};
use crate::proc::{self, Output, Proc};

/// Where nat-ctl keeps its lock files and the sysctl values a persisted instance restores.
pub const RUN_DIR: &str = "/run/nat-ctl";

/// `ip:port`.
pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The non-empty lines of a command's stderr.
pub fn stderr_lines(o: &Output) -> Vec<&str> {
    o.stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Requires a refusal: non-zero exit and one error line on stderr (`nat-ctl: error: ...`),
/// followed at most by what clap adds to a command-line mistake (indented possible values and
/// tips, a `Usage:` line). Returns the error line.
pub fn refused(what: &str, o: &Output) -> Result<String> {
    if o.status.success() {
        bail!(
            "{what}: exited 0, expected a refusal; stdout: {} stderr: {}",
            o.stdout.trim(),
            o.stderr.trim()
        );
    }
    let lines = stderr_lines(o);
    let clap_detail = |l: &&str| l.starts_with(' ') || l.starts_with("Usage:");
    match lines.split_first() {
        Some((first, rest)) if first.starts_with("nat-ctl: ") && rest.iter().all(clap_detail) => {
            Ok(first.to_string())
        }
        _ => bail!(
            "{what}: expected one `nat-ctl: ` error line (then only clap's tips and usage):\n{}",
            o.stderr
        ),
    }
}

/// Runs `nat-ctl args...` inside `ns` (any exit status).
pub fn ctl(ns: &Netns, args: &[&str]) -> Result<Output> {
    crate::nat::run_nat_ctl(ns, args)
}

/// Runs `nat-ctl args...` inside `ns`; it must exit 0. Returns stdout.
pub fn ctl_ok(ns: &Netns, args: &[&str]) -> Result<String> {
    Ok(ctl(ns, args)?
        .check(&format!("nat-ctl {}", args.join(" ")))?
        .stdout)
}

/// One row of `nat-ctl mappings --json` (the one parser lives in `nat`).
pub type Row = crate::nat::Mapping;
use crate::nat::endpoint;
pub use crate::nat::{parse_mappings as parse_rows, MAPPING_KEYS};

/// `nat-ctl mappings -i IFACE --json extra...`, parsed (forwards included).
pub fn rows(nat: &NatProcess, extra: &[&str]) -> Result<Vec<Row>> {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    parse_rows(&nat.ctl_ok("mappings", &args)?)
}

/// `nat-ctl status -i IFACE --json`.
pub fn status(nat: &NatProcess) -> Result<serde_json::Value> {
    let out = nat.ctl_ok("status", &["--json"])?;
    serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))
}

/// Why this kernel has no XDP fast path at all (`status --json` `fast_path_unavailable`:
/// before Linux 6.3 nothing reports which devices accept redirected frames), or `None`.
pub fn fast_path_unavailable(nat: &NatProcess) -> Result<Option<String>> {
    let status = status(nat)?;
    let towards = status["fast_path_towards"].as_array().map_or(0, Vec::len);
    match status["fast_path_unavailable"].as_str() {
        Some(reason) => {
            ensure!(
                towards == 0,
                "status names a fast path although it says: {reason}"
            );
            Ok(Some(reason.to_string()))
        }
        None => Ok(None),
    }
}

/// One line of `nat-ctl forward list --json`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ForwardEntry {
    /// "tcp" or "udp".
    pub proto: String,
    /// External endpoint.
    pub external: SocketAddrV4,
    /// Internal server.
    pub internal: SocketAddrV4,
}

/// Parses `forward list --json`.
pub fn parse_forwards(json: &str) -> Result<Vec<ForwardEntry>> {
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("forward list JSON: {json}"))?;
    let rows = v
        .as_array()
        .with_context(|| format!("forward list JSON is not an array: {json}"))?;
    let mut out: Vec<ForwardEntry> = rows
        .iter()
        .map(|r| {
            Ok(ForwardEntry {
                proto: r["proto"]
                    .as_str()
                    .with_context(|| format!("no proto in {r}"))?
                    .to_string(),
                external: endpoint(r, "external")?,
                internal: endpoint(r, "internal")?,
            })
        })
        .collect::<Result<_>>()?;
    out.sort();
    Ok(out)
}

/// `nat-ctl forward list -i IFACE --json` inside `ns`, sorted.
pub fn forwards_in(ns: &Netns, iface: &str) -> Result<Vec<ForwardEntry>> {
    parse_forwards(&ctl_ok(ns, &["forward", "list", "-i", iface, "--json"])?)
}

/// `nat-ctl forward ACTION -i IFACE rest...` inside `ns`; it must exit 0. Returns stdout.
pub fn forward_ok(ns: &Netns, iface: &str, action: &str, rest: &[&str]) -> Result<String> {
    let mut args = vec!["forward", action, "-i", iface];
    args.extend_from_slice(rest);
    ctl_ok(ns, &args)
}

/// A forward entry from its parts.
pub fn forward_entry(proto: &str, external: SocketAddrV4, internal: SocketAddrV4) -> ForwardEntry {
    ForwardEntry {
        proto: proto.to_string(),
        external,
        internal,
    }
}

/// `tools::whoami` from the lab's internal host `lan` through `nat`; when no answer comes,
/// the error carries what the NAT's counters did meanwhile, its table, and the frames lan's
/// and wan's interfaces saw, so a lost flow can be told apart from a slow tool.
pub fn whoami_via(
    lab: &Lab,
    nat: &NatProcess,
    sock: &std::net::UdpSocket,
    to: SocketAddrV4,
) -> Result<SocketAddrV4> {
    let before = nat.stats().ok();
    let lan_cap = crate::packet::Sniffer::open(&lab.lan, HOST_IF).ok();
    let wan_cap = crate::packet::Sniffer::open(&lab.wan, HOST_IF).ok();
    match crate::tools::whoami(sock, to) {
        Ok(seen) => Ok(seen),
        Err(e) => {
            let changes = match (before, nat.stats()) {
                (Some(b), Ok(a)) => a.changes(&b),
                _ => "counters unavailable".into(),
            };
            let table = nat.ctl_ok("mappings", &[]).unwrap_or_default();
            let frames = |cap: Option<crate::packet::Sniffer>| -> Vec<String> {
                cap.map(|c| {
                    c.capture_for(Duration::from_millis(100))
                        .iter()
                        .map(|f| {
                            format!(
                                "{}{}",
                                if f.outgoing { "out " } else { "in " },
                                crate::packet::describe(f)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
            };
            Err(e.context(format!(
                "from {:?} to {to}; NAT counters meanwhile: {changes}; table:\n{table}\nlan saw {:?}\nwan saw {:?}",
                sock.local_addr(),
                frames(lan_cap),
                frames(wan_cap)
            )))
        }
    }
}

/// A file of this repository, by its path from the repository's root.
pub fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// A scratch directory under /tmp for config files, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/vt-ops-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from(format!(
            "/tmp/vt-ops-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` inside it and returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A `nat-ctl attach` started with exactly `args` (no interface added), for when the interface
/// comes from a config file. Waits (bounded) for its `attached ` line and returns the process
/// and that line; fails with its stderr if it exits first.
pub fn attach_raw(ns: &Netns, args: &[&str]) -> Result<(Proc, String)> {
    crate::nat::ensure_bpffs()?;
    if !nat_ctl_path().exists() {
        bail!("nat-ctl binary {} does not exist", nat_ctl_path().display());
    }
    let mut p = Proc::spawn(&format!("nat-ctl {}", args.join(" ")), nat_ctl(ns, args))?;
    let line = proc::poll(ATTACH_TIMEOUT, Duration::from_millis(20), || {
        if let Some(l) = p.stdout().lines().find(|l| l.starts_with("attached ")) {
            return Some(Ok(l.to_string()));
        }
        match p.try_wait() {
            Ok(Some(st)) => Some(Err(st)),
            _ => None,
        }
    });
    match line {
        Some(Ok(l)) => Ok((p, l)),
        Some(Err(st)) => {
            let _ = p.wait_timeout(Duration::from_secs(1));
            bail!(
                "{} exited ({st}) before attaching; stderr: {}",
                p.name(),
                p.stderr().trim()
            )
        }
        None => bail!(
            "{} printed no `attached ` line within {ATTACH_TIMEOUT:?}; stderr: {}",
            p.name(),
            p.stderr().trim()
        ),
    }
}

/// Runs an `attach` that must fail (bounded). If it attaches instead, it is stopped and the
/// returned output carries its `attached ` line in stdout.
pub fn attach_expecting_failure(ns: &Netns, args: &[&str]) -> Result<Output> {
    let mut p = Proc::spawn(&format!("nat-ctl {}", args.join(" ")), nat_ctl(ns, args))?;
    let done = proc::poll(ATTACH_TIMEOUT, Duration::from_millis(20), || {
        if p.stdout().contains("attached ") {
            return Some(false);
        }
        matches!(p.try_wait(), Ok(Some(_))).then_some(true)
    });
    if done != Some(true) {
        let _ = p.terminate(Duration::from_secs(20));
    }
    p.finish(Duration::from_secs(20))
}

/// Removes what a `--persist` instance leaves when a test ends early: `nat-ctl detach IFACE`,
/// then (if that failed) its pin directory and saved sysctls by hand. Declare it after the
/// `Lab` and before the `NatProcess`, so it runs after the daemon stopped and before the
/// namespaces go.
pub struct PersistGuard {
    ns_path: PathBuf,
    iface: String,
}

impl PersistGuard {
    /// Guards the NAT on `iface` in `ns`.
    pub fn new(ns: &Netns, iface: &str) -> PersistGuard {
        PersistGuard {
            ns_path: ns.path(),
            iface: iface.to_string(),
        }
    }

    /// Pin directories of this interface (named `<netns inode>-<iface>`).
    pub fn pin_dirs(&self) -> Vec<PathBuf> {
        pin_dirs_of(&self.iface)
    }
}

/// Pin directories under /sys/fs/bpf/nat-gw that belong to interface `iface`.
pub fn pin_dirs_of(iface: &str) -> Vec<PathBuf> {
    let suffix = format!("-{iface}");
    std::fs::read_dir(PIN_ROOT)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Files under /run/nat-ctl that name interface `iface` (lock, saved sysctls).
pub fn run_files_of(iface: &str) -> Vec<PathBuf> {
    std::fs::read_dir(RUN_DIR)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(iface))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for PersistGuard {
    fn drop(&mut self) {
        if self.pin_dirs().is_empty() {
            return;
        }
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg(nat_ctl_path())
            .args(["detach", &self.iface]);
        let _ = proc::run("nat-ctl detach (cleanup)", c, CTL_TIMEOUT);
        for dir in self.pin_dirs() {
            eprintln!("cleanup: removing leftover pin directory {}", dir.display());
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        for f in run_files_of(&self.iface) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Reads a sysctl inside `ns` (e.g. `net.ipv4.conf.l1x2.accept_local`).
pub fn sysctl_get(ns: &Netns, key: &str) -> Result<String> {
    Ok(ns
        .run_ok("sysctl", &["-n", key], SETUP_TIMEOUT)?
        .stdout
        .trim()
        .to_string())
}

/// `Ip: ForwDatagrams` of `ns` (/proc/net/snmp): packets the kernel's forwarding path carried.
pub fn forwarded_datagrams(ns: &Netns) -> Result<u64> {
    let snmp = ns.run_ok("cat", &["/proc/net/snmp"], SETUP_TIMEOUT)?.stdout;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next(), ip.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Ip: lines in /proc/net/snmp:\n{snmp}");
    };
    let idx = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .context("no ForwDatagrams in /proc/net/snmp")?;
    values
        .split_whitespace()
        .nth(idx)
        .context("short Ip: values line")?
        .parse()
        .context("ForwDatagrams is not a number")
}

/// The name, in `peer_ns`, of the other end of veth `dev` in `ns`.
pub fn veth_peer(ns: &Netns, dev: &str, peer_ns: &Netns) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&ns.ip_out(&["-j", "link", "show", "dev", dev])?)?;
    let peer_index = v[0]["link_index"]
        .as_u64()
        .with_context(|| format!("{dev} has no link_index (not a veth?): {v}"))?;
    let all: serde_json::Value = serde_json::from_str(&peer_ns.ip_out(&["-j", "link", "show"])?)?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifindex"].as_u64() == Some(peer_index))
        .and_then(|l| l["ifname"].as_str().map(str::to_string))
        .with_context(|| format!("no interface with index {peer_index} in {}", peer_ns.name()))
}

/// `ethtool -K dev gro on` inside `ns`.
pub fn gro_on(ns: &Netns, dev: &str) -> Result<()> {
    ns.run_ok("ethtool", &["-K", dev, "gro", "on"], SETUP_TIMEOUT)?;
    Ok(())
}

/// Makes the lab's veths accept the frames the NAT's XDP fast path redirects to them.
///
/// Kernel behaviour, not the NAT's: a veth takes an XDP-redirected frame (`ndo_xdp_xmit`) only
/// when the *receiving* peer has GRO on or an XDP program of its own; otherwise the kernel drops
/// the frame silently. A physical NIC has no such rule. So: GRO on the switch port facing the
/// NAT's external interface (outbound redirects) and on each internal host's eth0 (inbound).
pub fn enable_fast_path_delivery(lab: &Lab) -> Result<()> {
    let sw_port = veth_peer(&lab.nat, &lab.wan_if, &lab.sw)?;
    gro_on(&lab.sw, &sw_port)?;
    gro_on(&lab.lan, HOST_IF)?;
    if let Some(lan2) = &lab.lan2 {
        gro_on(lan2, HOST_IF)?;
    }
    Ok(())
}

/// An HTTP response as curl saw it.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub code: u16,
    /// Header lines (lowercase names), without the status line.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// A header's value (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `curl -s -i URL` inside `ns` (a third-party HTTP client). Fails if curl cannot connect.
pub fn http_get(ns: &Netns, url: &str) -> Result<HttpResponse> {
    let o = ns.run(
        "curl",
        &["-s", "-S", "-i", "--max-time", "5", url],
        Duration::from_secs(15),
    )?;
    if !o.status.success() {
        bail!(
            "curl {url} in {} failed ({}): {}",
            ns.name(),
            o.status,
            o.stderr.trim()
        );
    }
    let (head, body) = o
        .stdout
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header/body separator in {:?}", o.stdout))?;
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP status line {status:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        code,
        headers,
        body: body.to_string(),
    })
}

/// One sample of a Prometheus text exposition, with its family's HELP and TYPE.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// `counter`, `gauge`, ...
    pub kind: String,
    /// The `# HELP` text.
    pub help: String,
    /// The sample's value.
    pub value: f64,
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the Prometheus text format (0.0.4), keyed by sample (`name` or `name{labels}`): every
/// sample has a valid name and a float value and its family's `# HELP` and `# TYPE` come
/// first; no sample appears twice. Anything else is an error naming the line. (promtool checks
/// the format fully in the metrics test; this is what the test reads values with.)
pub fn parse_prometheus(text: &str) -> Result<BTreeMap<String, Metric>> {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut kind: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            if !valid_metric_name(name) {
                bail!("line {n}: bad metric name in {line:?}");
            }
            help.insert(name.to_string(), h.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest
                .split_once(' ')
                .with_context(|| format!("line {n}: TYPE without a type: {line:?}"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                bail!("line {n}: unknown type {t:?}");
            }
            kind.insert(name.to_string(), t.to_string());
        } else if line.starts_with('#') {
            continue;
        } else {
            // `name value` or `name{label="value",...} value`; label values here hold no spaces.
            let Some((sample, value)) = line.rsplit_once(' ') else {
                bail!("line {n}: not `name value`: {line:?}");
            };
            let name = sample.split('{').next().unwrap_or(sample);
            if !valid_metric_name(name) || (sample != name && !sample.ends_with('}')) {
                bail!("line {n}: bad sample {sample:?}");
            }
            let value: f64 = value
                .parse()
                .map_err(|_| anyhow!("line {n}: value {value:?} is not a number"))?;
            let k = kind
                .get(name)
                .with_context(|| format!("line {n}: sample {name} without a preceding # TYPE"))?;
            let h = help
                .get(name)
                .with_context(|| format!("line {n}: sample {name} without a preceding # HELP"))?;
            let m = Metric {
                kind: k.clone(),
                help: h.clone(),
                value,
            };
            if out.insert(sample.to_string(), m).is_some() {
                bail!("line {n}: sample {sample} appears twice");
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_parser_accepts_the_format_and_rejects_junk() {
        let ok = "# HELP nat_x_total Things.\n# TYPE nat_x_total counter\nnat_x_total 3\n";
        let m = parse_prometheus(ok).unwrap();
        assert_eq!(m["nat_x_total"].value, 3.0);
        assert_eq!(m["nat_x_total"].kind, "counter");
        assert!(parse_prometheus("nat_x_total 3\n").is_err(), "no TYPE");
        assert!(parse_prometheus("# HELP a b\n# TYPE a gauge\na three\n").is_err());
        assert!(parse_prometheus("# HELP 1a b\n# TYPE 1a gauge\n1a 1\n").is_err());
        assert!(
            parse_prometheus(&format!("{ok}nat_x_total 4\n")).is_err(),
            "twice"
        );
        let labelled = "# HELP nat_d_total D.\n# TYPE nat_d_total counter\nnat_d_total{reason=\"a\"} 1\nnat_d_total{reason=\"b\"} 2\n";
        let m = parse_prometheus(labelled).unwrap();
        assert_eq!(m["nat_d_total{reason=\"b\"}"].value, 2.0);
    }

    #[test]
    fn rows_need_every_key_and_allow_static_forwards() {
        let j = r#"[{"proto":"udp","internal":"10.0.0.2:53","external":"198.51.100.254:53","remote":null,"state":"static","expires_in":null}]"#;
        let r = parse_rows(j).unwrap();
        assert_eq!(r[0].expires_in, None);
        assert_eq!(r[0].state, "static");
        assert!(parse_rows(
            r#"[{"proto":"udp","internal":"10.0.0.2:53","external":"1.2.3.4:5","remote":null,"state":"x"}]"#
        )
        .is_err());
    }
}
