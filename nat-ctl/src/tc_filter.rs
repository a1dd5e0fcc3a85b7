//! The egress program on kernels without TCX (before Linux 6.6): a `cls_bpf` filter on a clsact
//! qdisc, made over netlink. Such a filter is not a bpf link and cannot be pinned, but it stays
//! attached after the process that made it exits, which is what `--persist` needs. Its priority
//! and handle are recorded in the run directory (bpffs holds no plain files), so the next attach can replace its program
//! atomically (a filter change with the same priority and handle swaps the program under RCU)
//! and `nat-ctl detach` can remove it.

use std::{
    fs,
    process::{Command, Stdio},
};

use crate::instance::Instance;
use anyhow::{Context, Result};
use aya::programs::{
    links::Link as _,
    tc::{SchedClassifierLink, TcHandle},
    TcAttachType,
};

/// Kind of the run-directory file that records a persisting egress filter.
const FILTER_RECORD: &str = "tc-egress";

/// A netlink egress filter left running by `--persist`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterRecord {
    /// The filter's priority (`tc filter ... pref`).
    pub priority: u16,
    /// The filter's handle, `major << 16 | minor`.
    pub handle: u32,
    /// True when nat-ctl added the clsact qdisc (and so removes it at detach).
    pub added_clsact: bool,
}

impl FilterRecord {
    /// The record's text: `priority handle added_clsact`, one line.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {}\n",
            self.priority,
            self.handle,
            u8::from(self.added_clsact)
        )
    }

    /// Parses what `to_line` wrote.
    pub fn parse(text: &str) -> Option<FilterRecord> {
        let mut fields = text.split_whitespace();
        let priority = fields.next()?.parse().ok()?;
        let handle = fields.next()?.parse().ok()?;
        let added_clsact = match fields.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        fields.next().is_none().then_some(FilterRecord {
            priority,
            handle,
            added_clsact,
        })
    }

    /// The filter as a link aya can replace the program of, or detach.
    pub fn link(&self, iface: &str) -> Result<SchedClassifierLink> {
        SchedClassifierLink::attached(
            iface,
            TcAttachType::Egress,
            self.priority,
            TcHandle::from(self.handle),
            None,
        )
        .with_context(|| format!("no interface {iface}"))
    }
}

/// Records a persisting filter of `instance`.
pub fn save(instance: &Instance, record: &FilterRecord) -> Result<()> {
    let path = instance.state_file(FILTER_RECORD);
    fs::write(&path, record.to_line()).with_context(|| format!("cannot write {}", path.display()))
}

/// The persisting filter recorded for `instance`, if any.
pub fn load(instance: &Instance) -> Option<FilterRecord> {
    FilterRecord::parse(&fs::read_to_string(instance.state_file(FILTER_RECORD)).ok()?)
}

/// Forgets the record (the filter now belongs to a running daemon, or is gone).
pub fn forget(instance: &Instance) {
    let _ = fs::remove_file(instance.state_file(FILTER_RECORD));
}

/// Removes a persisting filter and the qdisc nat-ctl added for it, then its record. An
/// interface that is gone took both with it.
pub fn remove(instance: &Instance) -> Result<()> {
    let Some(record) = load(instance) else {
        return Ok(());
    };
    let iface = instance.iface.as_str();
    if let Ok(link) = record.link(iface) {
        link.detach()
            .with_context(|| format!("cannot remove the egress filter from {iface}"))?;
        if record.added_clsact {
            remove_clsact(iface);
        }
    }
    forget(instance);
    Ok(())
}

/// Deletes the clsact qdisc of `iface` (and with it any filter left on it).
pub fn remove_clsact(iface: &str) {
    let _ = Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let record = FilterRecord {
            priority: 49152,
            handle: 0x0001_0002,
            added_clsact: true,
        };
        assert_eq!(FilterRecord::parse(&record.to_line()), Some(record));
    }

    #[test]
    fn bad_records_are_refused() {
        for text in ["", "1", "1 2", "1 2 3", "1 2 1 4", "x 2 1", "70000 2 1"] {
            assert_eq!(FilterRecord::parse(text), None, "{text:?}");
        }
    }
}
