//! A stop flag that SIGINT and SIGTERM set the moment they arrive, for long synchronous work
//! (the expiry sweep over a million bindings) that must give way to a signal within a second.
//! The tokio signal streams of `daemon` see the same signals only when the event loop next
//! polls them, which is after such work returns; the flag lets the work return early.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use anyhow::{Context, Result};
use signal_hook_registry::SigId;

/// Set once SIGINT or SIGTERM has arrived; the handlers are removed on drop.
pub struct StopFlag {
    flag: Arc<AtomicBool>,
    ids: Vec<SigId>,
}

impl StopFlag {
    /// Registers the handlers (beside tokio's: signal-hook-registry chains every action
    /// registered for a signal).
    pub fn on_signals() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for signal in [libc::SIGINT, libc::SIGTERM] {
            let flag = Arc::clone(&flag);
            // SAFETY: the action only stores to an atomic, which is async-signal-safe.
            let id =
                unsafe { signal_hook_registry::register(signal, move || flag.store(true, Ordering::SeqCst)) }
                    .context("cannot install a signal handler")?;
            ids.push(id);
        }
        Ok(StopFlag { flag, ids })
    }

    /// The flag, for work that looks at it between steps.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Whether a stop signal has arrived.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Drop for StopFlag {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook_registry::unregister(id);
        }
    }
}
