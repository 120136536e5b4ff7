//! What keygate counts, through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): the names below, labelled the Prometheus way. keygate installs no exporter; install
//! one (such as `metrics-exporter-prometheus`) before building the layer and the numbers appear.
//!
//! Labels are bounded: outcomes, causes and classes are fixed sets, routes are the route table's
//! templates (`other` for a path no template matched), never raw paths, key ids or keys.
//!
//! Without the feature every recording function here is empty and compiles to nothing.

use std::time::Duration;

/// Counter: one per gated request, by `outcome` (`pass`, `refused`, `fail_open`), `cause` (for
/// `pass`: `key` or `public`; for `refused`: the problem type, such as `invalid-key` or
/// `rate-limited`; for `fail_open`: `unavailable`) and `route` (the template).
pub const DECISIONS: &str = "keygate_decisions_total";
/// Counter: verification cache lookups by `result`: `hit` (a fresh `VALID` answer), `negative_hit`
/// (a fresh refusal), `miss`, `stale` (served past its TTL because the verifier failed).
pub const CACHE_LOOKUPS: &str = "keygate_cache_lookups_total";
/// Counter: misses that joined a verifier call already in flight for the same key.
pub const SINGLE_FLIGHT_JOINS: &str = "keygate_cache_single_flight_joins_total";
/// Histogram, seconds: calls to Oneloop by `call` (`verify`, `record_usage`) and `outcome` (`ok`,
/// `down`, `error` for verify; `acknowledged`, `not_delivered`, `rejected`, `uncertain` for
/// record-usage).
pub const UPSTREAM_DURATION: &str = "keygate_upstream_duration_seconds";
/// Counter: circuit breaker state changes, by `to` (`open`, `half_open`, `closed`).
pub const BREAKER_TRANSITIONS: &str = "keygate_breaker_transitions_total";
/// Counter: units of usage given to the Oneloop batcher and what became of them, by `class`
/// (`recorded`, `acknowledged`, `rejected`, `uncertain`, `dropped`, `resent`), the classes of
/// `UsageReport`.
pub const USAGE_UNITS: &str = "keygate_usage_units_total";
/// Gauge: units of usage the batcher still held when its shutdown returned (lost unless sent later).
pub const USAGE_UNSENT_AT_SHUTDOWN: &str = "keygate_usage_unsent_at_shutdown_units";

/// Every metric name, for tests and documentation.
pub const ALL: [&str; 7] = [
    DECISIONS,
    CACHE_LOOKUPS,
    SINGLE_FLIGHT_JOINS,
    UPSTREAM_DURATION,
    BREAKER_TRANSITIONS,
    USAGE_UNITS,
    USAGE_UNSENT_AT_SHUTDOWN,
];

// Oneloop's calls, breaker and batcher are recorded only where the `oneloop` feature builds them.
#[cfg(feature = "metrics")]
#[cfg_attr(not(feature = "oneloop"), allow(dead_code))]
mod on {
    use super::*;
    use std::sync::Arc;

    /// The route label of a request that matched no template.
    const OTHER_ROUTE: &str = "other";

    #[inline]
    pub(crate) fn decision(outcome: &'static str, cause: &'static str, route: Option<&Arc<str>>) {
        let route = route
            .map_or(metrics::SharedString::const_str(OTHER_ROUTE), |r| metrics::SharedString::from_shared(r.clone()));
        metrics::counter!(DECISIONS, "outcome" => outcome, "cause" => cause, "route" => route).increment(1);
    }

    #[inline]
    pub(crate) fn cache(result: &'static str) {
        metrics::counter!(CACHE_LOOKUPS, "result" => result).increment(1);
    }

    pub(crate) fn single_flight_join() {
        metrics::counter!(SINGLE_FLIGHT_JOINS).increment(1);
    }

    pub(crate) fn upstream(call: &'static str, outcome: &'static str, took: Duration) {
        metrics::histogram!(UPSTREAM_DURATION, "call" => call, "outcome" => outcome).record(took.as_secs_f64());
    }

    pub(crate) fn breaker(to: &'static str) {
        metrics::counter!(BREAKER_TRANSITIONS, "to" => to).increment(1);
    }

    pub(crate) fn usage(class: &'static str, units: u64) {
        metrics::counter!(USAGE_UNITS, "class" => class).increment(units);
    }

    pub(crate) fn unsent_at_shutdown(units: u64) {
        metrics::gauge!(USAGE_UNSENT_AT_SHUTDOWN).set(units as f64);
    }
}

#[cfg(not(feature = "metrics"))]
#[cfg_attr(not(feature = "oneloop"), allow(dead_code))]
mod on {
    use super::*;
    use std::sync::Arc;

    #[inline(always)]
    pub(crate) fn decision(_: &'static str, _: &'static str, _: Option<&Arc<str>>) {}
    #[inline(always)]
    pub(crate) fn cache(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn single_flight_join() {}
    #[inline(always)]
    pub(crate) fn upstream(_: &'static str, _: &'static str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn breaker(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn usage(_: &'static str, _: u64) {}
    #[inline(always)]
    pub(crate) fn unsent_at_shutdown(_: u64) {}
}

pub(crate) use on::*;
