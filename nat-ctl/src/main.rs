//! `nat-ctl`: thin binary over the `nat_ctl` library.

use std::process::ExitCode;

use clap::{error::ErrorKind, Parser};
use nat_ctl::{
    cli::{Cli, Command},
    commands, daemon, mountns, privileges, usage_error,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // clap's text with its tips and usage line, not the whole help screen.
            eprintln!("{}", usage_error::report(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let needed = match &cli.command {
        Command::Check(_) | Command::Generate(_) => None,
        Command::Attach(_) => Some(("attach", privileges::ATTACH)),
        Command::Mappings(_) => Some(("mappings", privileges::QUERY)),
        Command::Stats(_) => Some(("stats", privileges::QUERY)),
        Command::Status(_) => Some(("status", privileges::QUERY)),
        Command::Mode(_) => Some(("mode", privileges::QUERY)),
        Command::Reload(_) => Some(("reload", privileges::QUERY)),
        Command::Forward(_) => Some(("forward", privileges::QUERY)),
        Command::Detach(_) => Some(("detach", privileges::QUERY)),
        Command::Delete(_) => Some(("delete", privileges::QUERY)),
        Command::Flush(_) => Some(("flush", privileges::QUERY)),
    };
    if let Some((what, needed)) = needed {
        if let Err(e) = privileges::require(what, needed) {
            eprintln!("nat-ctl: error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
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
    if let Command::Attach(args) = &cli.command {
        // The daemon's log; a RUST_LOG that does not parse is refused before anything runs.
        if let Err(e) = nat_ctl::logging::init(args.log_level.as_deref()) {
            eprintln!("nat-ctl: error: {e:#}");
            return ExitCode::from(2);
        }
    }
    let result = match &cli.command {
        Command::Attach(args) => daemon::attach(args),
        Command::Mappings(args) => commands::mappings(args),
        Command::Stats(args) => commands::stats(args),
        Command::Status(args) => commands::status(args),
        Command::Mode(args) => commands::mode(args),
        Command::Reload(args) => commands::reload(args),
        Command::Forward(command) => commands::forward(command),
        Command::Check(args) => commands::check(args),
        Command::Detach(args) => commands::detach(args),
        Command::Delete(args) => commands::delete(args),
        Command::Flush(args) => commands::flush(args),
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
