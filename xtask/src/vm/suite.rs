//! The VM phase of `cargo xtask test`: chosen end-to-end tests run inside the 6.1 guest.
//!
//! One boot runs them all. The guest runs the test executables that cargo built on the host
//! (the same path in the guest; cargo itself would run about 9x slower there), one test per
//! invocation so each gets its own time and log. Logs go to the run directory's `results/`
//! (the writable share), and the host counts them into the suite's tally.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{boot, guest_env, kernel, RunDir, Show};
use crate::cmd::{shell_quote, workspace_root, Cmd};
use crate::test::Tally;

/// One end-to-end test: the test target (file in vm-tests/tests without `.rs`) and the test's
/// name in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmTest {
    pub target: &'static str,
    pub name: &'static str,
}

const fn t(target: &'static str, name: &'static str) -> VmTest {
    VmTest { target, name }
}

/// The tests the VM phase runs on Debian's 6.1 kernel. Userspace there runs about 9x slower
/// than on the host, so this is a chosen set, not the whole suite: add a test here when it
/// covers something the 6.1 kernel may do differently.
pub const VM_TESTS: &[VmTest] = &[
    // Attach, translate, inspect: ping, UDP, TCP.
    t("basic", "ping_gets_replies_and_wan_sees_the_external_address"),
    t("basic", "udp_mapping_is_endpoint_independent_and_listed"),
    t("basic", "tcp_transfers_data_both_ways"),
    // Every mode: STUN classification and filtering.
    t("stun", "stun_clients_classify_every_mode"),
    t("filtering", "filtering_follows_the_mode"),
    t(
        "filtering",
        "port_restricted_drops_a_strangers_tcp_syn_to_a_live_connection",
    ),
    // The systemd unit's capability set is enough on 6.1's verifier too.
    t(
        "package",
        "nat_ctl_attaches_translates_and_detaches_with_only_the_units_capabilities",
    ),
    // Hole punching between two NATs.
    t("p2p", "udp_hole_punching_succeeds_for_every_pair_of_cone_modes"),
    t("p2p", "udp_hole_punching_fails_between_two_symmetric_nats"),
    // Static forwards.
    t(
        "forwards",
        "forwards_deliver_in_every_mode_from_any_remote_and_replies_leave_from_the_forwarded_port",
    ),
    // ICMP errors (RFC 5508) and fragments (parked out-of-order ones included).
    t(
        "icmp",
        "port_unreachable_reaches_lan_with_the_inner_header_restored",
    ),
    t(
        "rfc_icmp",
        "rfc5508_req4_inbound_errors_translated_for_tcp_and_udp",
    ),
    t("fragments", "fragmented_udp_crosses_the_nat_both_ways"),
    t("fragments", "inbound_fragments_arriving_last_first_are_delivered"),
    // --persist on clsact (no TCX before 6.6): restart, adoption, crash, detach.
    t(
        "restart",
        "restart_with_persist_keeps_connections_bindings_and_forwards_then_detach_leaves_nothing",
    ),
    t(
        "restart",
        "a_persisted_internal_iface_is_adopted_and_detach_restores_its_sysctl",
    ),
    t(
        "restart",
        "adopting_without_persist_takes_over_and_removes_everything_on_stop",
    ),
    t(
        "restart",
        "the_packaged_config_starts_keeps_translating_after_exit_and_is_adopted",
    ),
    t(
        "restart",
        "a_killed_daemon_leaves_the_nat_translating_and_the_next_attach_adopts_it",
    ),
    // Batched map reads and deletes (BPF_MAP_*_BATCH) in the expiry sweep, on 6.1's hash maps.
    t(
        "expiry_scale",
        "expiry_sweep_of_a_large_table_removes_every_expired_binding_and_keeps_live_ones",
    ),
    // Hostile traffic: blind RST/FIN/SYN, one host flooding the session table.
    t("tcp_hostile", "blind_rst_fin_syn_change_nothing_port_restricted"),
    t(
        "session_limits",
        "a_host_flooding_new_remotes_is_stopped_at_its_limits_and_others_are_still_served",
    ),
    t(
        "session_limits",
        "by_default_one_host_is_held_to_a_quarter_of_the_session_table",
    ),
    // Maps not preallocated, the default table size from the RAM (6.1 reports no live memory).
    t(
        "memory",
        "an_idle_default_attach_fits_16_mib_and_memory_follows_the_live_bindings",
    ),
    // The internal-side program: hairpinning and --internal-iface traffic.
    t(
        "hairpin",
        "internal_hosts_reach_each_other_through_their_external_endpoints",
    ),
    t(
        "hairpin",
        "traffic_to_and_from_the_internet_still_flows_with_internal_iface",
    ),
    // The one-line attach finds the internal interfaces and hairpins in every cone mode (no
    // fast path before 6.3: the test then checks the hairpin only); `none` turns them off.
    t(
        "hairpin",
        "the_one_line_attach_hairpins_and_takes_the_fast_path_in_every_cone_mode",
    ),
    t("hairpin", "internal_iface_none_attaches_no_internal_program"),
    // Its source check (no LAN host sends as the gateway), and the host's forward rules with it
    // as with masquerade (40 s each in the guest).
    t("fastpath_policy", "a_lan_host_cannot_send_as_the_gateway"),
    t(
        "fastpath_policy",
        "forward_chain_rules_hold_with_and_without_the_fast_path_as_with_masquerade",
    ),
    // Port mapping: NAT-PMP mappings (static-flagged bindings) reached in port-restricted and
    // symmetric mode; a PCP mapping across a --persist restart on clsact.
    t(
        "port_mapping",
        "port_mapping_natpmpc_maps_udp_and_tcp_ports_that_remotes_reach_in_port_restricted_and_symmetric_mode",
    ),
    t(
        "port_mapping",
        "port_mapping_survives_a_persist_restart_with_the_lifetime_it_had_left",
    ),
    // UPnP IGD with upnpc, and the same client steps against miniupnpd with nftables.
    t(
        "port_mapping",
        "port_mapping_upnpc_and_natpmpc_get_the_same_outcomes_from_nat_ctl_as_from_miniupnpd",
    ),
    // Reload in place: the mode switched (the data path's filter) and forwards added and
    // removed, while flows keep their ports.
    t(
        "reload",
        "reload_switches_mode_and_forwards_in_place_and_flows_keep_their_ports",
    ),
    // Detach leaves nothing; CLI behaviour that depends on the kernel.
    t("cli", "stop_removes_programs_qdisc_and_pins"),
    t("cli", "bad_input_fails_with_one_line_and_attaches_nothing"),
    t("cli", "ip_netns_exec_sees_the_running_nat"),
    // XDP attach modes and the external address following the interface.
    t(
        "xdp_mode",
        "auto_is_native_on_veth_and_generic_is_forced_on_request",
    ),
    t(
        "xdp_mode",
        "auto_falls_back_to_generic_on_a_device_without_native_xdp",
    ),
    t(
        "wan_address",
        "a_new_wan_address_is_followed_and_bindings_on_the_old_one_go",
    ),
    t(
        "wan_address",
        "deleting_the_interface_stops_the_daemon_and_leaves_nothing",
    ),
];

/// Time allowed for booting and mounting, on top of the tests' own limits.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(180);
/// One test's limit inside the guest (`timeout`), generous for the ~9x slowdown under TCG.
const TEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Grace after SIGTERM before `timeout` sends SIGKILL, and per-test slack in the host's limit.
const TEST_KILL_GRACE: Duration = Duration::from_secs(15);

impl VmTest {
    /// `target::name`, as reported.
    pub fn id(&self) -> String {
        format!("{}::{}", self.target, self.name)
    }

    /// File-name stem of this test's log in `results/`.
    fn stem(&self) -> String {
        format!("{}--{}", self.target, self.name)
    }
}

/// The tests of `VM_TESTS` selected by libtest-style `filters` (substrings of the test name; a
/// filter starting with `-` is a libtest flag and selects nothing). No filter selects all.
pub fn select<'a>(tests: &'a [VmTest], filters: &[String]) -> Vec<&'a VmTest> {
    let words: Vec<&String> = filters.iter().filter(|f| !f.starts_with('-')).collect();
    tests
        .iter()
        .filter(|test| words.is_empty() || words.iter().any(|w| test.name.contains(w.as_str())))
        .collect()
}

/// Test executables by target name, from `cargo test --no-run --message-format=json` output.
pub fn test_executables(cargo_json: &str) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    for line in cargo_json.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(executable)) =
            (message["target"]["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        found.insert(name.to_string(), PathBuf::from(executable));
    }
    found
}

/// cmd.sh's body: each test in turn, output to the console and to `results/STEM.log`, its exit
/// status to `.status` and its time to `.ms`; the script's status is 1 when any test failed.
fn guest_script(tests: &[(&VmTest, PathBuf)], results: &Path) -> String {
    let mut script = format!(
        "results={}\nmkdir -p \"$results\"\nfailed=0\n",
        shell_quote(&results.to_string_lossy())
    );
    script.push_str(&format!(
        r#"run_test() {{
    echo "VM-TEST-BEGIN $1"
    start=$(date +%s%N)
    {{ timeout -k {grace} {limit} "$2" --exact "$3" --test-threads=1; echo $? >"$results/$1.status"; }} 2>&1 \
        | tee "$results/$1.log"
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "$ms" >"$results/$1.ms"
    status=$(cat "$results/$1.status")
    echo "VM-TEST-END $1 status=$status ms=$ms"
    [ "$status" = 0 ] || failed=$((failed + 1))
}}
"#,
        grace = TEST_KILL_GRACE.as_secs(),
        limit = TEST_TIMEOUT.as_secs()
    ));
    for (test, executable) in tests {
        let _ = writeln!(
            script,
            "run_test {} {} {}",
            shell_quote(&test.stem()),
            shell_quote(&executable.to_string_lossy()),
            shell_quote(test.name)
        );
    }
    script.push_str("[ \"$failed\" = 0 ]\n");
    script
}

/// How one test went in the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Ignored,
    /// Failed; why, when libtest did not report the failure itself (empty when it did).
    Failed(String),
}

/// The verdict from one test's libtest log (one test per invocation, `--exact`).
pub fn verdict(log: &str) -> Verdict {
    let mut tally = Tally::default();
    let mut result_lines = 0;
    for line in log.lines() {
        if line.trim().starts_with("test result: ") {
            result_lines += 1;
        }
        tally.add_line(line);
    }
    match (result_lines, tally.passed, tally.failed) {
        (0, _, _) => Verdict::Failed("no libtest result (crashed, timed out, or the VM stopped)".into()),
        (_, _, failed) if failed > 0 => Verdict::Failed(String::new()),
        (_, passed, _) if passed > 0 => Verdict::Passed,
        _ if log.contains(" 1 ignored;") => Verdict::Ignored,
        _ => Verdict::Failed("matched no test: fix the name in xtask/src/vm/suite.rs".into()),
    }
}

/// Builds the test executables, boots once, runs the selected tests in the guest and adds their
/// results to `tally`. A failure is recorded in `failed_phases`, not returned, like the other
/// phases.
pub fn run_phase(filters: &[String], tally: &mut Tally, failed_phases: &mut Vec<String>) -> Result<()> {
    let selected = select(VM_TESTS, filters);
    if selected.is_empty() {
        println!("vm: no VM test matches the filters; VM phase skipped");
        return Ok(());
    }
    let started = Instant::now();
    let (ok, json) = Cmd::cargo()
        .args([
            "test",
            "--release",
            "-p",
            "vm-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stdout_captured()?;
    if !ok {
        failed_phases.push("the VM tests did not build (cargo test --no-run failed)".into());
        return Ok(());
    }
    let executables = test_executables(&json);
    let mut runs: Vec<(&VmTest, PathBuf)> = Vec::new();
    for test in &selected {
        let Some(executable) = executables.get(test.target) else {
            bail!(
                "vm-tests has no test target `{}` (named in xtask/src/vm/suite.rs VM_TESTS)",
                test.target
            );
        };
        runs.push((test, executable.clone()));
    }

    let kernel = kernel::ensure()?;
    let run = RunDir::create()?;
    let results = run.path.join("results");
    run.write_command(
        &guest_env(),
        &workspace_root().join("vm-tests"),
        &guest_script(&runs, &results),
    )?;
    let per_test = TEST_TIMEOUT + TEST_KILL_GRACE * 2;
    let timeout = BOOT_ALLOWANCE + per_test * runs.len() as u32;
    println!(
        "vm: running {} end-to-end tests on Debian's {} (one boot)",
        runs.len(),
        kernel.version
    );
    let finished = boot(&kernel, &run, timeout, Show::Command)?;
    // Whatever happened to the VM, count what the logs say.
    let vm_error = finished.status().err();
    finished.report_kept_logs();

    let mut failed = 0;
    println!("vm: results (logs in {}):", results.display());
    for (test, _) in &runs {
        let log = fs::read_to_string(results.join(format!("{}.log", test.stem()))).unwrap_or_default();
        let ms = fs::read_to_string(results.join(format!("{}.ms", test.stem())))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let time = ms
            .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let verdict = verdict(&log);
        match &verdict {
            Verdict::Passed => tally.passed += 1,
            Verdict::Ignored => {}
            Verdict::Failed(_) => {
                tally.failed += 1;
                failed += 1;
            }
        }
        let word = match &verdict {
            Verdict::Passed => "ok".to_string(),
            Verdict::Ignored => "ignored".to_string(),
            Verdict::Failed(why) if why.is_empty() => "FAILED".to_string(),
            Verdict::Failed(why) => format!("FAILED ({why})"),
        };
        println!("vm:   {:<9} {} ... {word}", time, test.id());
    }
    println!(
        "vm: VM phase took {:.1} s ({}, building included)",
        started.elapsed().as_secs_f64(),
        finished.timing()
    );
    if let Some(err) = vm_error {
        failed_phases.push(format!("the VM phase did not complete: {err:#}"));
    } else if failed > 0 {
        failed_phases.push(format!("{failed} VM tests failed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{select, test_executables, verdict, Verdict, VmTest, VM_TESTS};

    const TESTS: &[VmTest] = &[
        VmTest {
            target: "basic",
            name: "ping_gets_replies",
        },
        VmTest {
            target: "stun",
            name: "stun_clients_classify",
        },
    ];

    #[test]
    fn filters_select_by_substring_and_flags_select_nothing() {
        assert_eq!(select(TESTS, &[]).len(), 2);
        assert_eq!(select(TESTS, &["stun".into()]), vec![&TESTS[1]]);
        assert_eq!(select(TESTS, &["--nocapture".into()]).len(), 2);
        assert!(select(TESTS, &["nothing".into()]).is_empty());
    }

    #[test]
    fn the_list_names_each_test_once() {
        for (i, a) in VM_TESTS.iter().enumerate() {
            assert!(!VM_TESTS[i + 1..].contains(a), "{} listed twice", a.id());
        }
    }

    #[test]
    fn executables_come_from_test_artifacts_only() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"vm_tests","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"basic","kind":["test"]},"profile":{"test":true},"executable":"/w/target/release/deps/basic-0123"}
{"reason":"compiler-artifact","target":{"name":"demo","kind":["bin"]},"profile":{"test":false},"executable":"/w/target/release/demo"}
{"reason":"build-finished","success":true}
not json"#;
        let found = test_executables(json);
        assert_eq!(found.len(), 1);
        assert_eq!(found["basic"], PathBuf::from("/w/target/release/deps/basic-0123"));
    }

    #[test]
    fn verdicts_from_libtest_logs() {
        let ok = "running 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 7 filtered out; finished in 9.10s\n";
        assert_eq!(verdict(ok), Verdict::Passed);
        let failed = "test x ... FAILED\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 7 filtered out; finished in 1.00s\n";
        assert!(matches!(verdict(failed), Verdict::Failed(_)));
        let ignored =
            "test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 7 filtered out; finished in 0.00s\n";
        assert_eq!(verdict(ignored), Verdict::Ignored);
        let none =
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 8 filtered out; finished in 0.00s\n";
        assert!(matches!(verdict(none), Verdict::Failed(why) if why.contains("matched no test")));
        assert!(matches!(verdict("running 1 test\n"), Verdict::Failed(_)));
        assert!(matches!(verdict(""), Verdict::Failed(_)));
    }
}
