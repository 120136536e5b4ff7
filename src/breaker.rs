//! A circuit breaker for a remote verifier: after repeated failures it stops calling for a
//! cool-down, then lets one probe through; the probe's outcome closes or re-opens it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[doc = include_str!("../docs/breaker_config.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    failure_threshold: u32,
    cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, cool_down: Duration::from_secs(5) }
    }
}

impl BreakerConfig {
    /// Consecutive failures that open the breaker (default 5; 0 never opens it).
    #[must_use]
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// How long it stays open before one probe is let through (default 5 s; at most an hour).
    #[must_use]
    pub fn cool_down(mut self, d: Duration) -> Self {
        self.cool_down = d.min(Duration::from_secs(3600));
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else waits for its outcome.
    Probing,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    config: BreakerConfig,
}

/// Leave to make one call. Dropping it unrecorded (a cancelled probe) lets the next call probe.
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self { state: Mutex::new(State::Closed { failures: 0 }), config }
    }

    /// A permit, or how long until one may be had.
    pub(crate) fn permit(&self) -> Result<Permit<'_>, Duration> {
        let mut state = self.lock();
        let now = Instant::now();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now < until => return Err(until - now),
            State::Open { .. } => {
                *state = State::Probing;
                crate::observe::breaker("half_open");
                tracing::info!("keygate: verifier cool-down over; circuit half-open, one request probes it");
                true
            }
            State::Probing => return Err(Duration::from_secs(1)),
        };
        Ok(Permit { breaker: self, probe, recorded: false })
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }
}

impl Permit<'_> {
    /// The call succeeded (or failed for reasons that say nothing of the upstream's health).
    pub(crate) fn success(mut self) {
        self.recorded = true;
        let was = std::mem::replace(&mut *self.breaker.lock(), State::Closed { failures: 0 });
        if !matches!(was, State::Closed { .. }) {
            crate::observe::breaker("closed");
        }
        if self.probe {
            tracing::info!("keygate: verifier answered the probe; circuit closed");
        }
    }

    /// The call failed the way a down upstream fails.
    pub(crate) fn failure(mut self) {
        self.recorded = true;
        let b = self.breaker;
        let mut state = b.lock();
        let open = State::Open { until: Instant::now() + b.config.cool_down };
        *state = match *state {
            _ if self.probe => {
                tracing::info!(cool_down = ?b.config.cool_down, "keygate: the probe failed; circuit open again");
                crate::observe::breaker("open");
                open
            }
            State::Closed { failures }
                if b.config.failure_threshold > 0 && failures + 1 >= b.config.failure_threshold =>
            {
                tracing::warn!(cool_down = ?b.config.cool_down, "keygate: verifier keeps failing; circuit open");
                crate::observe::breaker("open");
                open
            }
            State::Closed { failures } => State::Closed { failures: failures + 1 },
            other => other,
        };
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            *self.breaker.lock() = State::Open { until: Instant::now() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_probes_once() {
        let b = Breaker::new(BreakerConfig::default().failure_threshold(2).cool_down(Duration::from_millis(30)));
        b.permit().unwrap().failure();
        assert!(!b.is_open());
        b.permit().unwrap().failure();
        assert!(b.is_open());
        assert!(b.permit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.permit().unwrap();
        assert!(b.permit().is_err(), "one probe at a time");
        probe.failure();
        assert!(b.permit().is_err(), "a failed probe re-opens");
        std::thread::sleep(Duration::from_millis(40));
        drop(b.permit().unwrap()); // a cancelled probe
        b.permit().unwrap().success();
        assert!(!b.is_open());
    }
}
