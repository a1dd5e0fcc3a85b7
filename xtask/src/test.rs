//! `cargo xtask test`: the whole suite. Unit tests (no root), then the end-to-end tests in
//! vm-tests (root), then chosen end-to-end tests on Debian 12's 6.1 kernel in a VM (see
//! `vm::suite`), with one summary line counting the results of every test binary.

use anyhow::{bail, Result};

use crate::build::{build_all, nat_ctl_path};
use crate::cmd::{is_root, Cmd};
use crate::setup;
use crate::vm;

/// Which parts of the suite to run, and libtest filters for them.
pub struct Selection {
    pub unit: bool,
    pub e2e: bool,
    pub vm: bool,
    pub filters: Vec<String>,
}

pub fn run(selection: Selection) -> Result<()> {
    // No flag means all parts.
    let (unit, e2e, vm) = match (selection.unit, selection.e2e, selection.vm) {
        (false, false, false) => (true, true, true),
        flags => flags,
    };
    if (e2e || vm) && !is_root() {
        bail!(
            "the end-to-end tests need root (they create network namespaces and attach eBPF programs); \
             run `cargo xtask test` as root, or `cargo xtask test --unit` for the unit tests alone"
        );
    }
    setup::ensure(if e2e || vm { setup::ALL } else { setup::EBPF_BUILD })?;
    build_all()?;

    let mut tally = Tally::default();
    let mut failed_phases: Vec<String> = Vec::new();
    if unit {
        // --no-fail-fast: a failing test binary must not hide the results of the ones after it.
        let mut cmd = Cmd::cargo().args([
            "test",
            "--release",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "vm-tests",
        ]);
        if !selection.filters.is_empty() {
            cmd = cmd.arg("--").args(&selection.filters);
        }
        run_phase("unit tests", cmd, &mut tally, &mut failed_phases)?;
    }
    if e2e {
        // vm-tests/tests/package.rs installs it.
        crate::package::make_deb()?;
        let cmd = Cmd::cargo()
            .env("NAT_CTL", nat_ctl_path())
            .args([
                "test",
                "--release",
                "--no-fail-fast",
                "-p",
                "vm-tests",
                "--",
                "--test-threads=1",
            ])
            .args(&selection.filters);
        run_phase("end-to-end tests", cmd, &mut tally, &mut failed_phases)?;
    }
    if vm {
        vm::suite::run_phase(&selection.filters, &mut tally, &mut failed_phases)?;
    }

    println!("xtask: {} passed, {} failed", tally.passed, tally.failed);
    if !failed_phases.is_empty() {
        bail!("{}", failed_phases.join("; "));
    }
    Ok(())
}

/// Runs one `cargo test`, adding its results to `tally`; a failure is recorded, not returned, so
/// the next phase still runs.
fn run_phase(name: &str, cmd: Cmd, tally: &mut Tally, failed_phases: &mut Vec<String>) -> Result<()> {
    let before = tally.failed;
    let status = cmd.run_tee(|line| tally.add_line(line))?;
    if !status.success() {
        let failed = tally.failed - before;
        failed_phases.push(if failed > 0 {
            format!("{failed} {name} failed")
        } else {
            format!("the {name} did not build or run (cargo test: {status})")
        });
    }
    Ok(())
}

/// Sum of the `test result:` lines libtest prints once per test binary.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    /// Adds the counts of a line like
    /// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`;
    /// ignores any other line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        // Skip the verdict ("ok." or "FAILED.").
        let Some((_, counts)) = rest.split_once(". ") else {
            return;
        };
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(number), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn sums_result_lines_and_ignores_others() {
        let mut tally = Tally::default();
        for line in [
            "running 3 tests",
            "test foo ... ok",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "",
            "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 4 filtered out; finished in 1.20s",
            "   test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
            "test result: garbage",
        ] {
            tally.add_line(line);
        }
        assert_eq!(tally, Tally { passed: 8, failed: 2 });
    }
}
