//! Quiet logs for a failing dependency: its state changes once (down, recovered), and while it is
//! down a summary at most every [`SUMMARY_EVERY`], never a line per request. Each failure is still
//! logged at DEBUG.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// How often a summary is logged while a dependency stays down.
pub(crate) const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One dependency's state, as the logs tell it.
pub(crate) struct Outage {
    /// What is down, as logs name it ("the verifier", "the rate limiter").
    what: &'static str,
    /// What requests get meanwhile ("refusing with 503").
    meanwhile: &'static str,
    down: AtomicBool,
    /// Failures since the outage began, and since the last summary.
    failures: AtomicU64,
    unsummarised: AtomicU64,
    /// When the last summary (or the outage) was logged, in ms since `origin`.
    last_said: AtomicU64,
    origin: Instant,
}

impl Outage {
    pub(crate) fn new(what: &'static str, meanwhile: &'static str) -> Self {
        Self {
            what,
            meanwhile,
            down: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            unsummarised: AtomicU64::new(0),
            last_said: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// One failure: WARN when it starts an outage, a summary now and then, DEBUG otherwise.
    pub(crate) fn failed(&self, error: &dyn Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let (what, meanwhile) = (self.what, self.meanwhile);
        if !self.down.swap(true, Ordering::AcqRel) {
            self.last_said.store(self.now_ms(), Ordering::Relaxed);
            tracing::warn!(%error, "keygate: {what} is failing; {meanwhile} (further failures at DEBUG, a summary every 10 s)");
            return;
        }
        let unsaid = self.unsummarised.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(%error, "keygate: {what} failed; {meanwhile}");
        let (now, last) = (self.now_ms(), self.last_said.load(Ordering::Relaxed));
        let due = now.saturating_sub(last) >= SUMMARY_EVERY.as_millis() as u64;
        if due && self.last_said.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.unsummarised.fetch_sub(unsaid, Ordering::Relaxed);
            let total = self.failures.load(Ordering::Relaxed);
            tracing::warn!(failures = unsaid, total, last_error = %error, "keygate: {what} still failing; {meanwhile}");
        }
    }

    /// A success: INFO once if it ends an outage.
    pub(crate) fn recovered(&self) {
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::AcqRel) {
            let failures = self.failures.swap(0, Ordering::Relaxed);
            self.unsummarised.store(0, Ordering::Relaxed);
            tracing::info!(failures, "keygate: {} recovered", self.what);
        }
    }
}

impl std::fmt::Debug for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outage").field("what", &self.what).field("down", &self.down).finish_non_exhaustive()
    }
}
