//! Model-based: random limit configurations (duplicates, several windows, costs, usage allowances)
//! and random request sequences, decided by the in-memory and the Redis limiter and by a plain
//! reference model. Admitted counts, `remaining` and refusals must agree exactly, and a refusal
//! must leave every counter as it was.

use keygate::limit::{LimitRequest, Limiter, MemoryLimiter, RateLimit, UsageCharge};
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

/// The reference: fixed windows opened by a key's first request, limits identified by their whole
/// definition, the same limit twice counted once (at the higher cost), usage against an allowance,
/// all or nothing.
#[derive(Default)]
struct Model {
    windows: HashMap<(usize, RateLimit), (u64, u64)>,
    spent: HashMap<usize, u64>,
}

/// A request: its limits with costs, and its usage `(allowed, amount)`.
#[derive(Debug, Clone)]
struct Ask {
    limits: Vec<(RateLimit, u64)>,
    usage: Option<(u64, u64)>,
}

impl Model {
    /// `Some(remaining per entry asked)` if admitted.
    fn decide(&mut self, now: u64, key: usize, ask: &Ask) -> Option<Vec<u64>> {
        let mut once: Vec<(RateLimit, u64)> = Vec::new();
        for (l, c) in &ask.limits {
            match once.iter_mut().find(|(m, _)| m == l) {
                Some((_, cost)) => *cost = (*cost).max(*c),
                None => once.push((l.clone(), *c)),
            }
        }
        let used = |m: &Model, l: &RateLimit| match m.windows.get(&(key, l.clone())) {
            Some((start, used)) if now < start + l.window().as_millis() as u64 => *used,
            _ => 0,
        };
        for (l, c) in &once {
            if used(self, l) + c > l.limit() {
                return None;
            }
        }
        if let Some((allowed, amount)) = ask.usage {
            if self.spent.get(&key).copied().unwrap_or(0) + amount > allowed {
                return None;
            }
            *self.spent.entry(key).or_default() += amount;
        }
        for (l, c) in &once {
            let open =
                self.windows.get(&(key, l.clone())).is_some_and(|(s, _)| now < s + l.window().as_millis() as u64);
            let w = self.windows.entry((key, l.clone())).or_insert((now, 0));
            if !open {
                *w = (now, 0);
            }
            w.1 += c;
        }
        Some(ask.limits.iter().map(|(l, _)| l.limit() - used(self, l)).collect())
    }
}

fn limit_strategy() -> impl Strategy<Value = RateLimit> {
    // A small pool, so the same limit turns up twice in one request and across requests.
    (prop::sample::select(vec!["a", "b"]), 1u64..8, prop::sample::select(vec![1_000u64, 2_000, 60_000]))
        .prop_map(|(name, limit, window)| RateLimit::new(name, limit, Duration::from_millis(window)).unwrap())
}

fn ask_strategy() -> impl Strategy<Value = Ask> {
    (prop::collection::vec((limit_strategy(), 1u64..4), 0..4), prop::option::of((0u64..20, 0u64..4)))
        .prop_map(|(limits, usage)| Ask { limits, usage })
}

/// Steps: (ms to advance, key, request).
fn steps(max_advance: u64) -> impl Strategy<Value = Vec<(u64, usize, Ask)>> {
    prop::collection::vec((0..=max_advance, 0usize..2, ask_strategy()), 1..40)
}

fn request(ask: &Ask) -> (Vec<(RateLimit, u64)>, Option<UsageCharge>) {
    let usage = ask.usage.map(|(allowed, amount)| UsageCharge { allowed: u128::from(allowed), reported: 0, amount });
    (ask.limits.clone(), usage)
}

/// Fixes each key's allowance to the first one drawn for it, as a key has one allowance.
fn one_allowance_per_key(steps: &mut [(u64, usize, Ask)]) {
    let mut allowance: HashMap<usize, u64> = HashMap::new();
    for (_, key, ask) in steps.iter_mut() {
        if let Some((allowed, _)) = &mut ask.usage {
            *allowed = *allowance.entry(*key).or_insert(*allowed);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_memory_limiter_agrees_with_the_model(mut steps in steps(1_500)) {
        one_allowance_per_key(&mut steps);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let limiter = MemoryLimiter::new();
            let mut model = Model::default();
            let mut now = 0;
            for (i, (advance, key, ask)) in steps.iter().enumerate() {
                tokio::time::advance(Duration::from_millis(*advance)).await;
                now += advance;
                let (limits, usage) = request(ask);
                let got = limiter.check_now(&format!("k{key}"), &LimitRequest { limits: &limits, usage }).unwrap();
                let want = model.decide(now, *key, ask);
                let got = got.ok().map(|states| states.iter().map(|s| s.remaining).collect::<Vec<_>>());
                prop_assert_eq!(got, want, "step {} at {} ms: {:?}", i, now, ask);
            }
            Ok(())
        })?;
    }
}

/// The shared Redis; the test that uses it is ignored (not passed) without `REDIS_URL`.
#[cfg(feature = "redis")]
fn redis_url() -> String {
    std::env::var("REDIS_URL").expect("REDIS_URL is set (this test is ignored otherwise)")
}

#[cfg(feature = "redis")]
proptest! {
    // Each case is a fresh prefix on the shared Redis; Redis's clock is not ours, so time stands
    // still within a case (every step well inside the shortest window of 1 s, or the same window).
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    #[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
    fn the_redis_limiter_agrees_with_the_model(mut steps in steps(0)) {
        let url = redis_url();
        one_allowance_per_key(&mut steps);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let conn = keygate::RedisConnection::open(url.as_str()).unwrap();
            let mut n = [0u8; 8];
            getrandom::fill(&mut n).unwrap();
            let limiter = keygate::limit::RedisLimiter::new(conn, &format!("kgmodel:{}", u64::from_le_bytes(n)))
                .timeout(Duration::from_secs(5));
            let mut model = Model::default();
            let started = std::time::Instant::now();
            for (i, (_, key, ask)) in steps.iter().enumerate() {
                let (limits, usage) = request(ask);
                let got = limiter.check(&format!("k{key}"), &LimitRequest { limits: &limits, usage }).await.unwrap();
                let want = model.decide(0, *key, ask);
                let got = got.ok().map(|states| states.iter().map(|s| s.remaining).collect::<Vec<_>>());
                prop_assert_eq!(got, want, "step {}: {:?}", i, ask);
            }
            // The model's clock stood still: the case must have run inside the shortest window.
            prop_assert!(started.elapsed() < Duration::from_millis(900), "case too slow for the model: {:?}", started.elapsed());
            Ok(())
        })?;
    }
}
