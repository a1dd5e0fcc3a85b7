//! The daemon's log: `tracing` events, one line each on stderr, filtered by level
//! (`--log-level`, else `RUST_LOG` with `tracing-subscriber`'s directive syntax, else `info`).
//!
//! A line reads `TIME nat-ctl: [warning: |error: |debug: ]MESSAGE[ key=value ...]`, the time in
//! RFC 3339 UTC. Under systemd, stderr is a stream to the journal, which stamps every line
//! itself: there the time is left out, and the line starts with the event's syslog priority
//! (`<4>` for a warning) so that `journalctl -p` filters by it (journald reads such prefixes,
//! `SyslogLevelPrefix=` in systemd.exec(5)). systemd names the stream it connected in
//! `$JOURNAL_STREAM` as `DEVICE:INODE`; stderr is the journal only if it is still that file
//! (the documented check: a child whose stderr was redirected inherits the variable).

use std::{fmt, os::fd::AsRawFd};

use anyhow::{anyhow, Result};
use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
    EnvFilter,
};

/// The environment variable systemd sets to the journal stream's `DEVICE:INODE`.
const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";
/// The level logged when neither `--log-level` nor `RUST_LOG` says.
const DEFAULT_LEVEL: &str = "info";
/// What `--log-level` accepts.
pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Whether stderr is the journal stream systemd connected (`$JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os(JOURNAL_STREAM_ENV) else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    // SAFETY: fstat(2) on the process's stderr into a zeroed struct it fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// The filter: `level` if given, else `RUST_LOG`, else `info`. A `RUST_LOG` that does not
/// parse is refused (before anything is attached), not silently replaced.
fn filter(level: Option<&str>) -> Result<EnvFilter> {
    if let Some(level) = level {
        return EnvFilter::try_new(level).map_err(|e| anyhow!("--log-level {level:?}: {e}"));
    }
    match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::try_new(&directives).map_err(|e| anyhow!("RUST_LOG={directives:?}: {e}"))
        }
        _ => Ok(EnvFilter::new(DEFAULT_LEVEL)),
    }
}

/// Logs a notice that its module words as a whole line (`nat-ctl: ...`, shared with tests and
/// the README) at info level, without the prefix the log's format adds again.
pub fn notice(line: &str) {
    tracing::info!("{}", line.strip_prefix("nat-ctl: ").unwrap_or(line));
}

/// Installs the daemon's log (once, before anything is attached).
pub fn init(level: Option<&str>) -> Result<()> {
    let format = Line {
        journal: stderr_is_journal(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter(level)?)
        .with_writer(std::io::stderr)
        .event_format(format)
        .try_init()
        .map_err(|e| anyhow!("cannot set up the log: {e}"))
}

/// The line format described in the module's documentation.
struct Line {
    journal: bool,
}

/// The syslog priority journald reads from a `<N>` prefix (syslog(3): 3 err ... 7 debug).
fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The word after `nat-ctl: ` that says how serious a line is (info says nothing).
fn level_word(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        Level::INFO => "",
        Level::DEBUG => "debug: ",
        Level::TRACE => "trace: ",
    }
}

/// Collects an event's message and its other fields as ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.rest += &format!(" {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest += &format!(" {}={value:?}", field.name());
        }
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        if self.journal {
            write!(writer, "<{}>", syslog_priority(level))?;
        } else {
            write!(writer, "{} ", crate::events::now_rfc3339())?;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        // One event, one line, whatever a message holds.
        let text = format!("{}{}", fields.message, fields.rest).replace('\n', " ");
        writeln!(writer, "nat-ctl: {}{text}", level_word(level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives() {
        for level in LEVELS {
            assert!(filter(Some(level)).is_ok(), "{level}");
        }
        assert!(filter(Some("nat_ctl=debug,warn")).is_ok());
        assert!(filter(Some("nat_ctl=loudest")).is_err());
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(level_word(Level::WARN), "warning: ");
        assert_eq!(level_word(Level::INFO), "");
    }
}
