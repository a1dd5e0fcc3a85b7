//! The `nat-ctl attach` life cycle as a user sees it: a clean stop leaves nothing behind, and
//! bad input fails with one line on stderr and attaches nothing, a typo keeps clap's
//! suggestion, and missing privileges are named. Root only.

use std::time::Duration;

use anyhow::{ensure, Result};
use vm_tests::lab::WAN_IP;
use vm_tests::nat::{nat_ctl, Leftovers};
use vm_tests::proc::{poll, Output, Proc};
use vm_tests::tools;
use vm_tests::{Lab, NatProcess};

fn stderr_lines(o: &Output) -> Vec<&str> {
    o.stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Runs an `attach` that must fail. If it attaches instead (prints `attached `), it is stopped
/// at once and the returned output has that line in stdout.
fn attach_expecting_failure(ns: &vm_tests::netns::Netns, args: &[&str]) -> Result<Output> {
    let mut p = Proc::spawn(&format!("nat-ctl {}", args.join(" ")), nat_ctl(ns, args))?;
    let done = poll(Duration::from_secs(30), Duration::from_millis(20), || {
        if p.stdout().contains("attached ") {
            return Some(false);
        }
        matches!(p.try_wait(), Ok(Some(_))).then_some(true)
    });
    match done {
        Some(true) => p.finish(Duration::from_secs(5)),
        _ => {
            let _ = p.terminate(Duration::from_secs(20));
            let status = p.terminate(Duration::from_secs(1))?;
            Ok(Output {
                status,
                stdout: p.stdout(),
                stderr: p.stderr(),
            })
        }
    }
}

fn ping_ok(lab: &Lab) -> Result<()> {
    let out = tools::ping(&lab.lan, WAN_IP, 2, &[])?;
    ensure!(
        tools::ping_received(&out) == 2,
        "ping lan -> wan through the NAT:\n{}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

#[test]
fn stop_removes_programs_qdisc_and_pins() -> Result<()> {
    let lab = Lab::new("stop")?;
    let clean = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(clean.is_clean(), "fresh interface not clean: {clean:?}");

    let mut nat = NatProcess::attach(&lab, &[])?;
    let attached = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(
        attached.xdp_in_ip_link.is_some(),
        "no XDP program on {} while attached",
        lab.wan_if
    );
    ensure!(
        attached.bpftool.is_some(),
        "bpftool lists no program on {} while attached",
        lab.wan_if
    );
    ping_ok(&lab)?;
    // Status works while attached.
    nat.ctl_ok("status", &[])?;

    let st = nat.terminate()?;
    ensure!(
        st.success(),
        "nat-ctl attach exited with {st} after SIGTERM; stderr:\n{}",
        nat.stderr()
    );
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind after SIGTERM: {left:#?}");
    Ok(())
}

#[test]
fn sigint_also_detaches_cleanly() -> Result<()> {
    let lab = Lab::new("sigint")?;
    let mut nat = NatProcess::attach(&lab, &[])?;
    ping_ok(&lab)?;
    let pid = nat.pid() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    ensure!(unsafe { libc::kill(pid, libc::SIGINT) } == 0, "kill -INT failed");
    let exited = vm_tests::proc::poll(Duration::from_secs(20), Duration::from_millis(50), || {
        (!nat.is_running()).then_some(())
    });
    ensure!(exited.is_some(), "nat-ctl attach still runs 20 s after SIGINT");
    let st = nat.terminate()?;
    ensure!(
        st.success(),
        "exit status {st} after SIGINT; stderr:\n{}",
        nat.stderr()
    );
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind after SIGINT: {left:#?}");
    Ok(())
}

#[test]
fn bad_input_fails_with_one_line_and_attaches_nothing() -> Result<()> {
    let lab = Lab::new("badin")?;
    let missing = lab.names.iface("zz");
    let bare = lab.names.iface("bare");
    let bare_peer = lab.names.iface("barp");
    lab.nat.ip(&[
        "link", "add", "name", &bare, "type", "veth", "peer", "name", &bare_peer,
    ])?;
    lab.nat.ip(&["link", "set", &bare, "up"])?;
    let wan = lab.wan_if.as_str();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("nonexistent interface", vec!["attach", &missing]),
        (
            "IPv6 external address",
            vec!["attach", wan, "--external-addr", "2001:db8::1"],
        ),
        (
            "non-address external address",
            vec!["attach", wan, "--external-addr", "foo"],
        ),
        ("inverted port range", vec!["attach", wan, "--ports", "5000-4000"]),
        // A NAT on loopback would break the gateway's local traffic.
        ("loopback interface", vec!["attach", "lo"]),
        ("interface without an IPv4 address", vec!["attach", &bare]),
    ];
    let mut failures = Vec::new();
    for (what, args) in &cases {
        let out = attach_expecting_failure(&lab.nat, args)?;
        let lines = stderr_lines(&out);
        if out.status.success() {
            failures.push(format!("{what}: exited 0"));
        }
        if lines.len() != 1 {
            failures.push(format!(
                "{what}: {} non-empty stderr lines, expected 1:\n{}",
                lines.len(),
                out.stderr
            ));
        }
        if out.stdout.contains("attached ") {
            failures.push(format!("{what}: printed an attached line: {}", out.stdout));
        }
        let left = Leftovers::inspect(&lab.nat, wan)?;
        if !left.is_clean() {
            failures.push(format!("{what}: left behind {left:?}"));
        }
        let missing_pins = Leftovers::inspect_pins(&missing);
        if !missing_pins.is_empty() {
            failures.push(format!("{what}: left pin directories {missing_pins:?}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "bad input handling:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn second_attach_fails_and_the_first_keeps_working() -> Result<()> {
    let lab = Lab::new("twice")?;
    let mut nat = NatProcess::attach(&lab, &[])?;
    ping_ok(&lab)?;
    let out = attach_expecting_failure(&lab.nat, &["attach", &lab.wan_if])?;
    let lines = stderr_lines(&out);
    ensure!(
        !out.status.success(),
        "second attach exited 0; stdout: {} stderr: {}",
        out.stdout,
        out.stderr
    );
    ensure!(
        lines.len() == 1,
        "second attach wrote {} non-empty stderr lines:\n{}",
        lines.len(),
        out.stderr
    );
    ensure!(
        !out.stdout.contains("attached "),
        "second attach printed {}",
        out.stdout
    );

    let still = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(
        still.xdp_in_ip_link.is_some(),
        "the failed second attach removed the first one's XDP program"
    );
    ensure!(
        !still.pin_dirs.is_empty(),
        "the failed second attach removed the first one's pins"
    );
    ensure!(nat.is_running(), "the first attach exited: {}", nat.stderr());
    ping_ok(&lab)?;
    nat.mappings()?;
    nat.stop()?;
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind after stop: {left:#?}");
    Ok(())
}

/// Runs `nat-ctl args...` in `ns` with stdout on a pipe whose reader is already gone, so its
/// first write fails with EPIPE. Bounded: killed (by pid) if it runs past the time limit.
fn run_into_closed_pipe(ns: &vm_tests::netns::Netns, args: &[&str]) -> Result<Output> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let mut cmd = nat_ctl(ns, args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let status = poll(CLOSED_PIPE_TIMEOUT, Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!(
            "nat-ctl {} still ran {CLOSED_PIPE_TIMEOUT:?} after its stdout closed",
            args.join(" ")
        );
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    Ok(Output {
        status,
        stdout: String::new(),
        stderr,
    })
}

/// Time limit of one query whose stdout is a closed pipe.
const CLOSED_PIPE_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn closed_pipe_ends_queries_quietly_like_ip() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;

    let lab = Lab::new("pipe")?;
    let nat = NatProcess::attach(&lab, &[])?;
    ping_ok(&lab)?;
    let iface = lab.wan_if.as_str();
    let mut failures = Vec::new();
    for args in [
        vec!["mappings", "-i", iface],
        vec!["mappings", "-i", iface, "--json"],
        vec!["stats", "-i", iface],
        vec!["stats", "-i", iface, "--json"],
        vec!["status", "-i", iface],
        vec!["forward", "list", "-i", iface],
    ] {
        let out = run_into_closed_pipe(&lab.nat, &args)?;
        // `ip link | head -1` dies of SIGPIPE (a shell reports 141): the same here.
        if out.status.signal() != Some(libc::SIGPIPE) {
            failures.push(format!("{}: exit {}, not SIGPIPE", args.join(" "), out.status));
        }
        if !out.stderr.trim().is_empty() {
            failures.push(format!("{}: wrote to stderr:\n{}", args.join(" "), out.stderr));
        }
    }
    // The everyday form: a pipeline into head, in a shell with pipefail.
    let pipeline = format!(
        "set -o pipefail; nsenter --net={} -- {} stats -i {iface} | head -1",
        lab.nat.path().display(),
        vm_tests::nat::nat_ctl_path().display()
    );
    let out = vm_tests::proc::run(
        "stats | head -1",
        vm_tests::proc::command("bash", &["-c", &pipeline]),
        CLOSED_PIPE_TIMEOUT,
    )?;
    let code = out.status.code();
    if !matches!(code, Some(0) | Some(141)) || out.stdout.lines().count() != 1 {
        failures.push(format!(
            "stats | head -1: status {}, stdout {:?}",
            out.status, out.stdout
        ));
    }
    if out.stderr.contains("panicked") || !out.stderr.trim().is_empty() {
        failures.push(format!("stats | head -1 wrote to stderr:\n{}", out.stderr));
    }
    ensure!(failures.is_empty(), "closed pipes:\n{}", failures.join("\n"));
    ensure!(
        nat.mappings()?.iter().any(|m| m.proto == "icmp"),
        "the daemon lost its table"
    );
    nat.stop()
}

#[test]
fn ip_netns_exec_sees_the_running_nat() -> Result<()> {
    let lab = Lab::new("netnsx")?;
    let nat = NatProcess::attach(&lab, &[])?;
    ping_ok(&lab)?;
    let bin = vm_tests::nat::nat_ctl_path();
    let bin = bin.to_string_lossy();
    // `ip netns exec` gives the command a private mount namespace with a fresh /sys.
    let mappings = lab
        .nat
        .run_ok(&bin, &["mappings", "--json"], vm_tests::nat::CTL_TIMEOUT)?;
    let rows = vm_tests::nat::parse_mappings(&mappings.stdout)?;
    ensure!(
        rows.iter()
            .any(|m| m.proto == "icmp" && *m.internal.ip() == vm_tests::lab::LAN_IP),
        "ip netns exec ... mappings does not list the ping's binding: {rows:?}"
    );
    let status = lab
        .nat
        .run_ok(&bin, &["status", "--json"], vm_tests::nat::CTL_TIMEOUT)?;
    let v: serde_json::Value = serde_json::from_str(&status.stdout)?;
    ensure!(
        v["iface"] == lab.wan_if.as_str() && v["pid"].as_str() == Some(&nat.pid().to_string()),
        "ip netns exec ... status: {}",
        status.stdout
    );
    nat.stop()?;

    // attach itself under ip netns exec pins where every other shell sees it.
    let mut p = Proc::spawn(
        "ip netns exec attach",
        lab.nat.cmd(&bin, &["attach", &lab.wan_if]),
    )?;
    let attached = poll(Duration::from_secs(30), Duration::from_millis(20), || {
        if p.stdout().contains("attached ") {
            return Some(true);
        }
        matches!(p.try_wait(), Ok(Some(_))).then_some(false)
    });
    ensure!(
        attached == Some(true),
        "attach under ip netns exec did not attach; stderr: {}",
        p.stderr()
    );
    ensure!(
        !Leftovers::inspect_pins(&lab.wan_if).is_empty(),
        "attach under ip netns exec left no pins in the host's bpffs"
    );
    ping_ok(&lab)?;
    let out = vm_tests::nat::run_nat_ctl(&lab.nat, &["mappings", "--json"])?.check("nsenter mappings")?;
    ensure!(
        !vm_tests::nat::parse_mappings(&out.stdout)?.is_empty(),
        "mappings through nsenter lists nothing for the NAT attached under ip netns exec"
    );
    let st = p.terminate(Duration::from_secs(20))?;
    ensure!(st.success(), "exit {st} after SIGTERM; stderr: {}", p.stderr());
    let left = Leftovers::inspect(&lab.nat, &lab.wan_if)?;
    ensure!(left.is_clean(), "left behind: {left:#?}");
    Ok(())
}

/// `net.ipv4.ip_forward` in `ns`.
fn ip_forward(ns: &vm_tests::netns::Netns) -> Result<String> {
    let out = ns.run_ok(
        "sysctl",
        &["-n", "net.ipv4.ip_forward"],
        vm_tests::netns::SETUP_TIMEOUT,
    )?;
    Ok(out.stdout.trim().to_string())
}

/// Waits (bounded) until the daemon's stderr has a line containing `text`; returns all of it.
fn stderr_with(nat: &NatProcess, text: &str) -> Result<String> {
    let found = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        nat.stderr().contains(text).then_some(())
    });
    ensure!(
        found.is_some(),
        "no {text:?} on the daemon's stderr:\n{}",
        nat.stderr()
    );
    Ok(nat.stderr())
}

const FORWARD_NOTICE: &str = "nat-ctl: enabled net.ipv4.ip_forward (was 0); it is restored on detach";

#[test]
fn ip_forward_off_is_turned_on_with_a_notice_and_restored_on_detach() -> Result<()> {
    let lab = Lab::new("ipfwd")?;
    lab.nat.sysctl("net.ipv4.ip_forward", "0")?;
    let nat = NatProcess::attach(&lab, &[])?;
    let stderr = stderr_with(&nat, "ip_forward")?;
    ensure!(
        vm_tests::nat::log_lines(&stderr)
            .iter()
            .filter(|l| **l == FORWARD_NOTICE)
            .count()
            == 1,
        "expected the line {FORWARD_NOTICE:?} once on stderr:\n{stderr}"
    );
    ensure!(
        ip_forward(&lab.nat)? == "1",
        "ip_forward still off while attached"
    );
    ping_ok(&lab)?;
    nat.stop()?;
    ensure!(
        ip_forward(&lab.nat)? == "0",
        "ip_forward not restored to 0 after detach"
    );

    // A persisting instance keeps forwarding on after its daemon exits; `detach` restores it.
    let nat = NatProcess::attach(&lab, &["--persist"])?;
    stderr_with(&nat, FORWARD_NOTICE)?;
    nat.stop()?;
    ensure!(
        ip_forward(&lab.nat)? == "1",
        "ip_forward turned off while the persisted NAT still translates"
    );
    ping_ok(&lab)?;
    vm_tests::nat::run_nat_ctl(&lab.nat, &["detach", &lab.wan_if])?.check("nat-ctl detach")?;
    ensure!(
        ip_forward(&lab.nat)? == "0",
        "ip_forward not restored to 0 by detach"
    );

    // Already on: nothing said, nothing changed at detach.
    lab.nat.sysctl("net.ipv4.ip_forward", "1")?;
    let nat = NatProcess::attach(&lab, &[])?;
    ping_ok(&lab)?;
    ensure!(
        !nat.stderr().contains("ip_forward"),
        "a notice although forwarding was on:\n{}",
        nat.stderr()
    );
    nat.stop()?;
    ensure!(
        ip_forward(&lab.nat)? == "1",
        "ip_forward changed by a NAT that found it on"
    );
    Ok(())
}

#[test]
fn external_addr_not_on_the_interface_gets_a_warning_and_a_routed_one_works() -> Result<()> {
    let lab = Lab::new("foreign")?;
    let routed = std::net::Ipv4Addr::new(198, 18, 0, 9);
    let nat = NatProcess::attach(&lab, &["--external-addr", &routed.to_string()])?;
    let expected = format!(
        "nat-ctl: warning: {routed} is not an address of {}: the gateway will not answer ARP for it unless it is routed here",
        lab.wan_if
    );
    let stderr = stderr_with(&nat, "warning")?;
    ensure!(
        vm_tests::nat::log_lines(&stderr)
            .iter()
            .filter(|l| **l == expected)
            .count()
            == 1,
        "expected the line {expected:?} once on stderr:\n{stderr}"
    );
    // A pool routed to the gateway is legitimate: with the route in place, traffic flows.
    lab.wan.ip(&[
        "route",
        "add",
        &format!("{routed}/32"),
        "via",
        &vm_tests::lab::NAT_EXT.to_string(),
    ])?;
    ping_ok(&lab)?;
    ensure!(
        nat.mappings()?
            .iter()
            .any(|m| m.proto == "icmp" && *m.external.ip() == routed),
        "no binding on the routed address"
    );
    nat.stop()?;

    // An address of the interface: no warning.
    let nat = NatProcess::attach(&lab, &["--external-addr", &vm_tests::lab::NAT_EXT.to_string()])?;
    ping_ok(&lab)?;
    ensure!(
        !nat.stderr().contains("warning"),
        "a warning for an address of the interface:\n{}",
        nat.stderr()
    );
    nat.stop()
}

/// Runs nat-ctl directly (no namespace needed: nothing is attached), optionally under a
/// `setpriv` wrapper.
fn run_plain(wrapper: &[&str], args: &[&str]) -> Result<Output> {
    let bin = vm_tests::nat::nat_ctl_path();
    let bin = bin.to_string_lossy();
    let command = match wrapper.split_first() {
        None => vm_tests::proc::command(&bin, args),
        Some((program, rest)) => {
            let mut full: Vec<&str> = rest.to_vec();
            full.push(&bin);
            full.extend_from_slice(args);
            vm_tests::proc::command(program, &full)
        }
    };
    vm_tests::proc::run(
        &format!("nat-ctl {}", args.join(" ")),
        command,
        Duration::from_secs(30),
    )
}

#[test]
fn mistakes_keep_clap_s_suggestions_and_missing_privileges_are_named() -> Result<()> {
    // (arguments, what stderr must contain)
    let typos: [(&[&str], &str); 3] = [
        (
            &["attach", "x", "--mdoe", "symmetric"],
            "a similar argument exists: '--mode'",
        ),
        (&["stat"], "'stats'"),
        (&["detach"], "<IFACE>"),
    ];
    for (args, expected) in typos {
        let out = run_plain(&[], args)?;
        ensure!(
            out.status.code() == Some(2) && out.stderr.contains(expected),
            "nat-ctl {}: status {}, stderr lacks {expected:?}:\n{}",
            args.join(" "),
            out.status,
            out.stderr
        );
        ensure!(
            !out.stderr.contains("For more information"),
            "the generic footer is printed:\n{}",
            out.stderr
        );
    }

    // An unprivileged user: one line saying what is needed, for a query and for attach.
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    for args in [&["status"][..], &["attach", "lo"][..]] {
        let out = run_plain(&nobody, args)?;
        let lines = stderr_lines(&out);
        ensure!(
            !out.status.success()
                && lines.len() == 1
                && lines[0].contains("needs root")
                && lines[0].contains("CAP_BPF"),
            "nat-ctl {} as nobody: status {}, stderr:\n{}",
            args.join(" "),
            out.status,
            out.stderr
        );
    }
    // Root without the raw-socket and perfmon capabilities: attach names exactly those.
    let partial = ["setpriv", "--bounding-set=-all,+bpf,+net_admin", "--"];
    let out = run_plain(&partial, &["attach", "lo"])?;
    let lines = stderr_lines(&out);
    ensure!(
        !out.status.success() && lines.len() == 1 && lines[0].ends_with("lacks: CAP_NET_RAW, CAP_PERFMON"),
        "attach with CAP_BPF and CAP_NET_ADMIN only: status {}, stderr:\n{}",
        out.status,
        out.stderr
    );
    Ok(())
}
