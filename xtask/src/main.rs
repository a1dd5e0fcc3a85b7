//! Developer tasks for the NAT gateway: `cargo xtask <command>`.
//!
//! Every command installs what it needs when it is missing (see `setup`), prints each command
//! it runs on one line, and fails with one sentence saying what went wrong.

mod bench;
mod build;
mod check;
mod cmd;
mod demo;
mod ebpf;
mod package;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, set up, test and demo the eBPF NAT gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker; mount bpffs.
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/nat) with the nightly toolchain.
    BuildEbpf {
        /// Build the dev profile instead (target/bpfel-unknown-none/debug/nat).
        #[arg(long)]
        debug: bool,
    },
    /// Build the eBPF object, then nat-ctl and vm-tests in release mode.
    Build,
    /// Run the whole suite: unit tests, the end-to-end tests (root), and end-to-end tests on
    /// Debian 12's 6.1 kernel in qemu (root). No flag means all three.
    Test {
        /// Run the unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Run the end-to-end tests in vm-tests (needs root).
        #[arg(long)]
        e2e: bool,
        /// Run the chosen end-to-end tests inside a VM with Debian 12's 6.1 kernel (needs root).
        #[arg(long)]
        vm: bool,
        /// libtest filters, passed to every test binary.
        #[arg(last = true)]
        filters: Vec<String>,
    },
    /// Build everything and run the demo: a lab of namespaces, the NAT, real traffic (root).
    Demo {
        /// Arguments passed to the demo binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting and run clippy, for the workspace and for nat-ebpf.
    Check,
    /// Build nat-ctl, then a Debian package of it (binary, systemd unit, example config,
    /// manual pages, shell completions) in target/debian.
    Package,
    /// Boot Debian 12's 6.1 kernel in qemu over this machine's userspace and run a shell command
    /// there, in the repository; exits with the command's status.
    VmRun {
        /// Kill the VM after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Show the whole console (firmware, kernel), not only the command's output.
        #[arg(long)]
        verbose: bool,
        /// The command: one argument is shell text as it is; several are quoted words.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Build everything and run the benchmark (root): writes BENCHMARKS.md and its SVG plots,
    /// then its VM phase (pktgen on Debian's 6.1 kernel in qemu) writes its own section.
    Bench {
        /// Arguments passed to the bench binary (e.g. `--smoke`, `--only forwarding`), and
        /// `--vm-only` / `--no-vm` to run only or skip the VM phase.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup => setup::ensure(setup::ALL),
        Command::BuildEbpf { debug } => {
            setup::ensure(setup::EBPF_BUILD)?;
            ebpf::build(debug).map(drop)
        }
        Command::Build => {
            setup::ensure(setup::EBPF_BUILD)?;
            build::build_all()
        }
        Command::Test {
            unit,
            e2e,
            vm,
            filters,
        } => test::run(test::Selection {
            unit,
            e2e,
            vm,
            filters,
        }),
        Command::Demo { args } => demo::run(&args),
        Command::Check => check::run(),
        Command::Package => package::run().map(drop),
        Command::Bench { args } => bench::run(&args),
        Command::VmRun {
            timeout,
            verbose,
            command,
        } => {
            let show = if verbose {
                vm::Show::Everything
            } else {
                vm::Show::Command
            };
            let status = vm::run_command(Duration::from_secs(timeout), show, &command)?;
            if status != 0 {
                cmd::flush();
                // The command's own status, as ssh or `docker run` would give it.
                std::process::exit(status);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            cmd::flush();
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
