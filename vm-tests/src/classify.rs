//! NAT type classification by third-party STUN clients run inside a namespace: coturn's
//! `turnutils_natdiscovery` (RFC 5780), the Vovida `stun` client (RFC 3489, Debian
//! `stun-client`) and `pystun3` (RFC 3489, PyPI; `cargo xtask setup` installs it under
//! `target/pypi`). The server is [`crate::tools::Turnserver`] with two addresses.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::netns::Netns;
use crate::proc;
use crate::tools::{natdiscovery_verdict, vovida_result};

/// The pystun3 release the tests expect (its output strings are checked).
pub const PYSTUN3_VERSION: &str = "2.0.0";

/// Where PyPI test tools are installed (`pip install --target`): `$VM_TESTS_PYPI`, else
/// `<workspace>/target/pypi`.
pub fn pypi_dir() -> PathBuf {
    match std::env::var_os("VM_TESTS_PYPI") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pypi"),
    }
}

/// What one client said: the verdict(s) it printed and its whole output (for messages).
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// The verdict line(s), e.g. `NAT with Endpoint Independent Mapping!` or `Full Cone`.
    pub result: String,
    /// stdout and stderr.
    pub output: String,
}

/// `turnutils_natdiscovery -m -f -L <local> <server>` (from a kernel-chosen, fresh source
/// port). Returns the mapping and the filtering verdicts.
pub fn natdiscovery(ns: &Netns, local: Ipv4Addr, server: Ipv4Addr) -> Result<(Verdict, Verdict)> {
    let out = ns.run(
        "turnutils_natdiscovery",
        &["-m", "-f", "-L", &local.to_string(), &server.to_string()],
        Duration::from_secs(120),
    )?;
    let output = format!("{}{}", out.stdout, out.stderr);
    let verdict = |topic| Verdict {
        result: natdiscovery_verdict(&out.stdout, topic).unwrap_or_default(),
        output: output.clone(),
    };
    Ok((verdict("Mapping"), verdict("Filtering")))
}

/// The Vovida client, `stun <server> 0 -p <port>` (it uses `port` and `port + 1`). Its exit
/// status is a result code, not a failure. Returns the `Primary:` result.
pub fn vovida(ns: &Netns, server: Ipv4Addr, port: u16) -> Result<Verdict> {
    let out = ns.run(
        "stun",
        &[&server.to_string(), "0", "-p", &port.to_string()],
        Duration::from_secs(60),
    )?;
    Ok(Verdict {
        result: vovida_result(&out.stdout).unwrap_or_default(),
        output: format!("{}{}", out.stdout, out.stderr),
    })
}

/// `pystun3 -H <server> -P 3478 -i <local> -p <port>`, run as `python3 -m stun.cli` with the
/// package from [`pypi_dir`]. Returns the `NAT Type:` value (e.g. `Full Cone`, `Restric NAT`,
/// `Restric Port NAT`, `Symmetric NAT`).
pub fn pystun3(ns: &Netns, server: Ipv4Addr, local: Ipv4Addr, port: u16) -> Result<Verdict> {
    let dir = pypi_dir();
    if !dir.join("stun").join("cli.py").exists() {
        bail!(
            "pystun3 is not installed in {} (run `cargo xtask setup`, or `python3 -m pip install --target {} pystun3=={PYSTUN3_VERSION}`)",
            dir.display(),
            dir.display()
        );
    }
    let mut cmd = ns.cmd(
        "/usr/bin/python3",
        &[
            "-m",
            "stun.cli",
            "-H",
            &server.to_string(),
            "-P",
            "3478",
            "-i",
            &local.to_string(),
            "-p",
            &port.to_string(),
        ],
    );
    cmd.env("PYTHONPATH", &dir);
    let out = proc::run(
        &format!("pystun3 from {local}:{port}"),
        cmd,
        Duration::from_secs(90),
    )?;
    let output = format!("{}{}", out.stdout, out.stderr);
    if !out.status.success() {
        bail!("pystun3 exited with {}: {output}", out.status);
    }
    let result = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("NAT Type:").map(|r| r.trim().to_string()))
        .unwrap_or_default();
    Ok(Verdict { result, output })
}
