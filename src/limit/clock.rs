//! The wall clock refills are decided by: the system's, or one a test sets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[doc = include_str!("../../docs/wall_clock.md")]
#[derive(Clone, Default)]
pub struct WallClock(Option<Arc<AtomicU64>>);

impl WallClock {
    /// The system's clock (the default).
    #[must_use]
    pub fn system() -> Self {
        Self(None)
    }

    /// A clock that stands at `at` until [`set`](Self::set) or [`advance`](Self::advance) moves
    /// it; its clones move with it. For tests.
    #[must_use]
    pub fn manual(at: SystemTime) -> Self {
        Self(Some(Arc::new(AtomicU64::new(millis(at)))))
    }

    /// The time now, to the millisecond.
    #[must_use]
    pub fn now(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            Some(ms) => UNIX_EPOCH + Duration::from_millis(ms.load(Ordering::Acquire)),
        }
    }

    /// Sets a manual clock to `at` (the system clock is not set).
    pub fn set(&self, at: SystemTime) {
        if let Some(ms) = &self.0 {
            ms.store(millis(at), Ordering::Release);
        }
    }

    /// Moves a manual clock forward by `by` (the system clock is not moved).
    pub fn advance(&self, by: Duration) {
        if let Some(ms) = &self.0 {
            ms.fetch_add(by.as_millis().min(u128::from(u64::MAX)) as u64, Ordering::AcqRel);
        }
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("WallClock::system()"),
            Some(_) => f.debug_tuple("WallClock::manual").field(&self.now()).finish(),
        }
    }
}
