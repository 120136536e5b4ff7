#![cfg_attr(feature = "metrics", doc = include_str!("../docs/observe.md"))]
#![cfg_attr(
    not(feature = "metrics"),
    doc = "What keygate counts through the `metrics` facade with the `metrics` feature: the names below."
)]

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

/// Histogram, seconds: the Redis limiter's decisions, by `outcome` (`ok`, `error`, `timeout`: Redis
/// did not answer within the limiter's timeout, and the fallback decided).
pub const REDIS_DURATION: &str = "keygate_redis_limiter_duration_seconds";
/// Counter: requests the Redis limiter's fallback decided, by `fallback` (`fail_closed`: a `503`;
/// `local`: its share of the limits in memory).
pub const LIMITER_FALLBACKS: &str = "keygate_limiter_fallbacks_total";

/// Histogram, seconds: the Redis key store's lookups on the request path, by `outcome` (`ok`,
/// `error`, `timeout`).
pub const STORE_DURATION: &str = "keygate_redis_store_duration_seconds";
/// Histogram, seconds: the PostgreSQL key store's lookups on the request path, by `outcome` (`ok`,
/// `error`: including no answer within the store's timeout).
pub const POSTGRES_STORE_DURATION: &str = "keygate_postgres_store_duration_seconds";
/// Counter: revocations received from other instances (each drops a key from this one's cache).
pub const REVOCATIONS: &str = "keygate_revocations_received_total";
/// Histogram, seconds: how long after the store (Redis, PostgreSQL) recorded a revocation this
/// instance applied it (by the store's clock against this host's: exact on one host, skewed by
/// their difference otherwise).
pub const REVOCATION_LAG: &str = "keygate_revocation_lag_seconds";

/// Every metric name, for tests and documentation.
pub const ALL: [&str; 13] = [
    DECISIONS,
    CACHE_LOOKUPS,
    SINGLE_FLIGHT_JOINS,
    UPSTREAM_DURATION,
    BREAKER_TRANSITIONS,
    USAGE_UNITS,
    USAGE_UNSENT_AT_SHUTDOWN,
    REDIS_DURATION,
    LIMITER_FALLBACKS,
    STORE_DURATION,
    POSTGRES_STORE_DURATION,
    REVOCATIONS,
    REVOCATION_LAG,
];

/// What a synchronous cache lookup found.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lookup {
    /// A fresh `VALID` answer.
    Hit = 0,
    /// A fresh refusal.
    NegativeHit = 1,
    Miss = 2,
}

/// How many kinds of decision a route counts: passes with a key and without, fail-open, and one
/// per refusal cause (with room to spare).
pub(crate) const DECISION_KINDS: usize = 16;

// Oneloop's calls, breaker and batcher, and the Redis limiter, are recorded only where their features
// build them.
#[cfg(feature = "metrics")]
#[cfg_attr(not(all(feature = "oneloop", feature = "redis")), allow(dead_code))]
mod on {
    use super::*;
    use std::sync::Arc;

    /// The route label of a request that matched no template.
    const OTHER_ROUTE: &str = "other";

    /// One route's decision counters, by kind. Each is registered with the recorder on its first
    /// use (install the recorder before serving), so the warm path is an atomic add: no labels
    /// built, no allocation, no lookup in the recorder's registry.
    #[derive(Default)]
    pub(crate) struct RouteDecisions {
        counters: [std::sync::OnceLock<metrics::Counter>; DECISION_KINDS],
    }

    impl RouteDecisions {
        /// Counts a decision of kind `kind` (an index below [`DECISION_KINDS`]), labelled `outcome`
        /// and `cause`, on `route` (`None`: a request no template matched).
        #[inline]
        pub(crate) fn count(&self, kind: usize, outcome: &'static str, cause: &'static str, route: Option<&Arc<str>>) {
            let register = || {
                let route = route.map_or(metrics::SharedString::const_str(OTHER_ROUTE), |r| {
                    metrics::SharedString::from_shared(Arc::clone(r))
                });
                metrics::counter!(DECISIONS, "outcome" => outcome, "cause" => cause, "route" => route)
            };
            // A kind past the table (a refusal cause added without room) goes uncounted, never panics.
            if let Some(counter) = self.counters.get(kind) {
                counter.get_or_init(register).increment(1);
            }
        }
    }

    // Counters are not part of what a route is: a copy counts afresh, and any two compare equal.
    impl Clone for RouteDecisions {
        fn clone(&self) -> Self {
            Self::default()
        }
    }

    impl PartialEq for RouteDecisions {
        fn eq(&self, _: &Self) -> bool {
            true
        }
    }

    impl Eq for RouteDecisions {}

    impl std::fmt::Debug for RouteDecisions {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RouteDecisions").finish_non_exhaustive()
        }
    }

    /// The cache's lookup counters, registered on first use like a route's decisions.
    #[derive(Default)]
    pub(crate) struct CacheLookups {
        by_result: [std::sync::OnceLock<metrics::Counter>; 3],
    }

    impl CacheLookups {
        #[inline]
        pub(crate) fn count(&self, result: Lookup) {
            let name = match result {
                Lookup::Hit => "hit",
                Lookup::NegativeHit => "negative_hit",
                Lookup::Miss => "miss",
            };
            let register = || metrics::counter!(CACHE_LOOKUPS, "result" => name);
            self.by_result[result as usize].get_or_init(register).increment(1);
        }
    }

    /// A stale answer served: rare (the verifier is failing), so registered each time.
    pub(crate) fn stale_served() {
        metrics::counter!(CACHE_LOOKUPS, "result" => "stale").increment(1);
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

    /// The Redis limiter's decision timings by outcome, registered on first use like a route's
    /// decisions (a histogram with a label, looked up per decision, cost an allocation each).
    #[derive(Default)]
    pub(crate) struct RedisLimiterTimings {
        by_outcome: [std::sync::OnceLock<metrics::Histogram>; 3],
    }

    impl RedisLimiterTimings {
        /// Records a decision that ended in `outcome` (`ok`, `timeout`, `error`).
        pub(crate) fn record(&self, outcome: &'static str, took: Duration) {
            let register = || metrics::histogram!(REDIS_DURATION, "outcome" => outcome);
            let histogram = match outcome {
                "ok" => self.by_outcome[0].get_or_init(register),
                "timeout" => self.by_outcome[1].get_or_init(register),
                "error" => self.by_outcome[2].get_or_init(register),
                _ => return register().record(took.as_secs_f64()),
            };
            histogram.record(took.as_secs_f64());
        }
    }

    pub(crate) fn limiter_fallback(fallback: &'static str) {
        metrics::counter!(LIMITER_FALLBACKS, "fallback" => fallback).increment(1);
    }

    pub(crate) fn redis_store(outcome: &'static str, took: Duration) {
        metrics::histogram!(STORE_DURATION, "outcome" => outcome).record(took.as_secs_f64());
    }

    pub(crate) fn postgres_store(outcome: &'static str, took: Duration) {
        metrics::histogram!(POSTGRES_STORE_DURATION, "outcome" => outcome).record(took.as_secs_f64());
    }

    pub(crate) fn revocation_received(lag: Duration) {
        metrics::counter!(REVOCATIONS).increment(1);
        metrics::histogram!(REVOCATION_LAG).record(lag.as_secs_f64());
    }
}

// The same calls without the feature: methods keep their `self` so call sites read the same.
#[cfg(not(feature = "metrics"))]
#[cfg_attr(not(all(feature = "oneloop", feature = "redis")), allow(dead_code))]
#[allow(clippy::unused_self)]
mod on {
    use super::*;
    use std::sync::Arc;

    /// Without the feature: nothing to keep, nothing to count.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub(crate) struct RouteDecisions;

    impl RouteDecisions {
        #[inline(always)]
        pub(crate) fn count(&self, _: usize, _: &'static str, _: &'static str, _: Option<&Arc<str>>) {}
    }
    #[derive(Default)]
    pub(crate) struct CacheLookups;

    impl CacheLookups {
        #[inline(always)]
        pub(crate) fn count(&self, _: Lookup) {}
    }

    #[inline(always)]
    pub(crate) fn stale_served() {}
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
    #[derive(Default)]
    pub(crate) struct RedisLimiterTimings;

    impl RedisLimiterTimings {
        #[inline(always)]
        pub(crate) fn record(&self, _: &'static str, _: Duration) {}
    }
    #[inline(always)]
    pub(crate) fn limiter_fallback(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn redis_store(_: &'static str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn revocation_received(_: Duration) {}
    #[inline(always)]
    pub(crate) fn postgres_store(_: &'static str, _: Duration) {}
}

pub(crate) use on::*;
