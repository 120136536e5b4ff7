//! The fixed-window algorithm, pure: a limit's window and a request's cost in, the decision out.
//! The clock is the caller's (`now`, in any unit the window uses), so the algorithm holds no state
//! and reads no time; governor's `gcra.rs` is the model.
//!
//! A key's window for a limit opens at its first request and lasts the limit's window; up to
//! `limit` cost units pass in it, then requests are refused until it ends, with `retry_after` the
//! time left in it (the next free slot, exactly). A cost above the whole limit never passes and
//! says so with a full window.
//!
//! The in-memory limiter runs this under its shard lock. The Redis limiter's `DECIDE` script is
//! the same algorithm in Lua (Redis's key expiry is its clock); a test on a real Redis checks
//! the two agree step by step.

/// A window that opened: what it holds and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) used: u64,
    pub(crate) end: u128,
}

/// What a request may take from one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// It fits: what is left after it, and the time until the window ends.
    Fits { remaining: u64, reset: u128 },
    /// It does not: the time until it would.
    Exceeds { retry_after: u128 },
}

/// The window in force at `now`: `last` if it has not ended.
pub(crate) fn current(last: Option<Window>, now: u128) -> Option<Window> {
    last.filter(|w| w.end > now)
}

/// Whether `cost` fits in `limit` per `length`, given the window in force (see [`current`]).
pub(crate) fn check(open: Option<Window>, limit: u64, length: u128, cost: u64, now: u128) -> Check {
    let (used, end) = open.map_or((0, now + length), |w| (w.used, w.end));
    let left = limit.saturating_sub(used);
    if cost > left {
        let retry_after = if cost > limit { length } else { end - now };
        return Check::Exceeds { retry_after };
    }
    Check::Fits { remaining: left - cost, reset: end - now }
}

/// The window after a request that fits took `cost`: the open one, or one opening now.
pub(crate) fn take(open: Option<Window>, length: u128, cost: u64, now: u128) -> Window {
    match open {
        Some(w) => Window { used: w.used + cost, end: w.end },
        None => Window { used: cost, end: now + length },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_fills_refuses_then_reopens() {
        let (limit, length) = (3, 1_000);
        let mut last = None;
        for (now, remaining) in [(0, 2), (10, 1), (20, 0)] {
            let open = current(last, now);
            assert_eq!(check(open, limit, length, 1, now), Check::Fits { remaining, reset: 1_000 - now });
            last = Some(take(open, length, 1, now));
        }
        assert_eq!(check(current(last, 999), limit, length, 1, 999), Check::Exceeds { retry_after: 1 });
        // At its end the window is over: a new one opens, full.
        assert_eq!(current(last, 1_000), None);
        assert_eq!(check(None, limit, length, 1, 1_000), Check::Fits { remaining: 2, reset: 1_000 });
    }

    #[test]
    fn a_cost_above_the_limit_waits_a_whole_window() {
        assert_eq!(check(None, 3, 1_000, 4, 0), Check::Exceeds { retry_after: 1_000 });
        let open = Some(Window { used: 2, end: 500 });
        assert_eq!(check(open, 3, 1_000, 2, 0), Check::Exceeds { retry_after: 500 });
        assert_eq!(check(open, 3, 1_000, 4, 0), Check::Exceeds { retry_after: 1_000 });
    }
}
