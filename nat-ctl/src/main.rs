//! `nat-ctl`: thin binary over the `nat_ctl` library.

use std::process::ExitCode;

use clap::{error::ErrorKind, Parser};
use nat_ctl::{
    cli::{Cli, Command},
    commands, daemon, mountns,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // One line: bad input gets a clear error, not a usage screen.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("nat-ctl: error: {first}");
            return ExitCode::from(2);
        }
    };
    if !matches!(cli.command, Command::Attach(_)) {
        // A closed pipe (`nat-ctl mappings | head -1`) ends a query quietly, by SIGPIPE, as it
        // ends `ip` and `conntrack`: a shell sees status 141. Rust ignores SIGPIPE and println!
        // would panic on EPIPE instead. The daemon (`attach`) keeps ignoring it: a closed
        // stdout must not stop a NAT.
        // SAFETY: restores the default disposition; no handler runs, no threads exist yet.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if !matches!(cli.command, Command::Check(_) | Command::Generate(_)) {
        // Before anything else, while the process has one thread (tokio starts later).
        if let Err(e) = mountns::use_host_bpffs() {
            eprintln!("nat-ctl: error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match &cli.command {
        Command::Attach(args) => daemon::attach(args),
        Command::Mappings(args) => commands::mappings(args),
        Command::Stats(args) => commands::stats(args),
        Command::Status(args) => commands::status(args),
        Command::Mode(args) => commands::mode(args),
        Command::Forward(command) => commands::forward(command),
        Command::Check(args) => commands::check(args),
        Command::Detach(args) => commands::detach(args),
        Command::Generate(args) => nat_ctl::generate::write_all(&args.dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The daemon has said why it stopped (`interface ... was removed; detaching`); not a
        // signal, so not a success either.
        Err(e) if nat_ctl::addr_watch::is_interface_removed(&e) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nat-ctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
