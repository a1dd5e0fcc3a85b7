//! NAT type classification by third-party STUN clients against coturn in the wan namespace
//! (RFC 5780 `turnutils_natdiscovery`, RFC 3489 Vovida `stun`). Root only.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vm_tests::classify::{vovida, Verdict};
use vm_tests::lab::{LAN_IP, WAN_IP, WAN_IP2};
use vm_tests::tools::{natdiscovery_verdict, Turnserver};
use vm_tests::{Lab, NatProcess};

const EIM: &str = "NAT with Endpoint Independent Mapping!";
const APDM: &str = "NAT with Address and Port Dependent Mapping!";
const EIF: &str = "NAT with Endpoint Independent Filtering!";
const ADF: &str = "NAT with Address Dependent Filtering!";
const APDF: &str = "NAT with Address and Port Dependent Filtering!";

/// Runs `turnutils_natdiscovery -m -f` from lan; returns (mapping verdict, filtering verdict).
fn natdiscovery(lab: &Lab) -> Result<(String, String, String)> {
    let out = lab.lan.run(
        "turnutils_natdiscovery",
        &["-m", "-f", "-L", &LAN_IP.to_string(), &WAN_IP.to_string()],
        Duration::from_secs(120),
    )?;
    let text = format!("{}{}", out.stdout, out.stderr);
    let mapping = natdiscovery_verdict(&out.stdout, "Mapping").unwrap_or_default();
    let filtering = natdiscovery_verdict(&out.stdout, "Filtering").unwrap_or_default();
    Ok((mapping, filtering, text))
}

#[test]
fn stun_clients_classify_the_default_mode_as_port_restricted_cone() -> Result<()> {
    let lab = Lab::new("stun")?;
    let _turn = Turnserver::start(&lab.wan, WAN_IP, WAN_IP2, lab.names.ns("turn").as_str())?;
    let nat = NatProcess::attach(&lab, &[])?;

    let (mapping, filtering, text) = natdiscovery(&lab)?;
    ensure!(
        mapping == EIM,
        "natdiscovery mapping verdict {mapping:?}, expected {EIM:?}; output:\n{text}"
    );
    ensure!(
        filtering == APDF,
        "natdiscovery filtering verdict {filtering:?}, expected {APDF:?}; output:\n{text}"
    );

    let Verdict { result, output: text } = vovida(&lab.lan, WAN_IP, 20000)?;
    ensure!(
        result.contains("Independent Mapping, Port Dependent Filter"),
        "Vovida stun says {result:?}; output:\n{text}"
    );
    nat.stop()
}

#[test]
fn stun_clients_classify_every_mode() -> Result<()> {
    let lab = Lab::new("stmod")?;
    let _turn = Turnserver::start(&lab.wan, WAN_IP, WAN_IP2, lab.names.ns("turn").as_str())?;
    // (mode, natdiscovery mapping, natdiscovery filtering, Vovida result prefix)
    let cases = [
        ("full-cone", EIM, EIF, "Independent Mapping, Independent Filter"),
        (
            "restricted-cone",
            EIM,
            ADF,
            "Independent Mapping, Address Dependent Filter",
        ),
        (
            "port-restricted",
            EIM,
            APDF,
            "Independent Mapping, Port Dependent Filter",
        ),
        ("symmetric", APDM, APDF, "Dependent Mapping"),
    ];
    let mut failures = Vec::new();
    for (i, (mode, want_map, want_filt, want_vovida)) in cases.iter().enumerate() {
        let nat =
            NatProcess::attach(&lab, &["--mode", mode]).with_context(|| format!("attach --mode {mode}"))?;
        let (mapping, filtering, text) = natdiscovery(&lab)?;
        if mapping != *want_map || filtering != *want_filt {
            failures.push(format!(
                "{mode}: natdiscovery says {mapping:?} / {filtering:?}, expected {want_map:?} / {want_filt:?}\n{text}"
            ));
        }
        // Fresh source ports for every mode (the client uses port and port + 1).
        let Verdict { result, output: text } = vovida(&lab.lan, WAN_IP, 20000 + 10 * i as u16)?;
        if !result.starts_with(want_vovida) {
            failures.push(format!(
                "{mode}: Vovida stun says {result:?}, expected {want_vovida:?}...\n{text}"
            ));
        }
        nat.stop()?;
    }
    ensure!(
        failures.is_empty(),
        "STUN classification does not match the modes:\n{}",
        failures.join("\n")
    );
    Ok(())
}
