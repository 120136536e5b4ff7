//! Model-based: random limit configurations (duplicates, several windows, costs, usage allowances,
//! identities whose keys share limits and an allowance, allowances that refill) and random request
//! sequences, decided by the in-memory and the Redis limiter and by a plain reference model.
//! Admitted counts, `remaining` and refusals must agree exactly, and a refusal must leave every
//! counter, of the key and of its identity, as it was.

use keygate::limit::{IdentityLimits, LimitRequest, Limiter, MemoryLimiter, RateLimit, Refill, UsageCharge, WallClock};
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

/// Keys 0 to 3; keys 0 and 1 belong to identity `c0`, keys 2 and 3 to `c1`.
fn identity(key: usize) -> String {
    format!("c{}", key / 2)
}

/// Key usage of odd keys, and every identity's usage, refill every 3 s of the wall clock.
fn refill(key: usize) -> Option<Refill> {
    (key % 2 == 1).then(|| Refill::every(Duration::from_secs(3)).unwrap())
}

fn shared_refill() -> Refill {
    Refill::every(Duration::from_secs(3)).unwrap()
}

/// The reference: fixed windows opened by the first request that counts in them; a key's limits
/// identified by their whole definition, an identity's by name and window (each request held to
/// the size it names); the same limit twice counted once (at the higher cost; an identity's at the
/// smaller size); usage against an allowance that refills at each period's start; all or nothing
/// across the key and its identity.
#[derive(Default)]
struct Model {
    windows: HashMap<(String, String), (u64, u64)>,
    spent: HashMap<String, (u64, u64)>,
}

/// A request: the key's limits with costs and usage `(allowed, amount)`, then the identity's.
#[derive(Debug, Clone)]
struct Ask {
    limits: Vec<(RateLimit, u64)>,
    usage: Option<(u64, u64)>,
    shared: Vec<(RateLimit, u64)>,
    shared_usage: Option<(u64, u64)>,
}

/// A limit's counter: the whole limit for a key, name and window for an identity.
fn counter(l: &RateLimit, shared: bool) -> String {
    if shared {
        format!("{}/{:?}", l.name(), l.window())
    } else {
        format!("{l:?}")
    }
}

fn once(limits: &[(RateLimit, u64)], shared: bool) -> Vec<(RateLimit, u64)> {
    let mut once: Vec<(RateLimit, u64)> = Vec::new();
    for (l, c) in limits {
        match once.iter_mut().find(|(m, _)| counter(m, shared) == counter(l, shared)) {
            Some((m, cost)) => {
                *cost = (*cost).max(*c);
                if l.limit() < m.limit() {
                    *m = l.clone();
                }
            }
            None => once.push((l.clone(), *c)),
        }
    }
    once
}

impl Model {
    /// `Some(remaining per key entry asked, then per identity counter)` if admitted. `now` is the
    /// windows' clock, `wall` the refills'.
    fn decide(&mut self, now: u64, wall: u64, key: usize, ask: &Ask) -> Option<Vec<u64>> {
        let (me, them) = (format!("k{key}"), identity(key));
        let mine = once(&ask.limits, false);
        let theirs = if ask.names_identity() { once(&ask.shared, true) } else { Vec::new() };
        let used = |m: &Model, who: &str, l: &RateLimit, shared: bool| match m
            .windows
            .get(&(who.to_owned(), counter(l, shared)))
        {
            Some((start, used)) if now < start + l.window().as_millis() as u64 => *used,
            _ => 0,
        };
        let all = mine.iter().map(|l| (&me, l, false)).chain(theirs.iter().map(|l| (&them, l, true)));
        for (who, (l, c), shared) in all.clone() {
            if used(self, who, l, shared) + c > l.limit() {
                return None;
            }
        }
        let period =
            |refill: Option<Refill>| refill.map_or(0, |r| r.period_start(UNIX_EPOCH + Duration::from_millis(wall)));
        let usages = [
            ask.usage.map(|u| (me.clone(), u, period(refill(key)))),
            ask.shared_usage.map(|u| (them.clone(), u, period(Some(shared_refill())))),
        ];
        let spent_now = |m: &Model, who: &str, p: u64| match m.spent.get(who) {
            Some((stored, spent)) if *stored >= p => *spent,
            _ => 0,
        };
        for (who, (allowed, amount), p) in usages.iter().flatten() {
            if spent_now(self, who, *p) + amount > *allowed {
                return None;
            }
        }
        for (who, (_, amount), p) in usages.iter().flatten() {
            let spent = spent_now(self, who, *p);
            let stored = self.spent.get(who).map_or(0, |(s, _)| *s).max(*p);
            self.spent.insert(who.clone(), (stored, spent + amount));
        }
        for (who, (l, c), shared) in all {
            let id = (who.clone(), counter(l, shared));
            let open = self.windows.get(&id).is_some_and(|(s, _)| now < s + l.window().as_millis() as u64);
            let w = self.windows.entry(id).or_insert((now, 0));
            if !open {
                *w = (now, 0);
            }
            w.1 += c;
        }
        let mut left: Vec<u64> = ask.limits.iter().map(|(l, _)| l.limit() - used(self, &me, l, false)).collect();
        left.extend(theirs.iter().map(|(l, _)| l.limit() - used(self, &them, l, true)));
        Some(left)
    }
}

impl Ask {
    /// Whether the request names the identity: in these tests, whenever it has limits or usage
    /// of the identity (the gate names it on every request of a key with identity limits).
    fn names_identity(&self) -> bool {
        !self.shared.is_empty() || self.shared_usage.is_some()
    }
}

fn limit_strategy() -> impl Strategy<Value = RateLimit> {
    // A small pool, so the same limit turns up twice in one request and across requests.
    (prop::sample::select(vec!["a", "b"]), 1u64..8, prop::sample::select(vec![1_000u64, 2_000, 60_000]))
        .prop_map(|(name, limit, window)| RateLimit::new(name, limit, Duration::from_millis(window)).unwrap())
}

fn ask_strategy() -> impl Strategy<Value = Ask> {
    let usage = || prop::option::of((0u64..20, 0u64..4));
    let limits = || prop::collection::vec((limit_strategy(), 1u64..4), 0..4);
    (limits(), usage(), prop::collection::vec((limit_strategy(), 1u64..4), 0..3), usage())
        .prop_map(|(limits, usage, shared, shared_usage)| Ask { limits, usage, shared, shared_usage })
}

/// Steps: (ms to advance, key, request).
fn steps(max_advance: u64) -> impl Strategy<Value = Vec<(u64, usize, Ask)>> {
    prop::collection::vec((0..=max_advance, 0usize..4, ask_strategy()), 1..40)
}

/// A key's requests, as the gate would send them: it names its identity on every request once
/// it has identity limits (here: always with the identity's limits or usage).
fn ask_of<'a>(
    id: &'a str,
    ask: &'a Ask,
    parts: &'a (Vec<(RateLimit, u64)>, Option<UsageCharge>, Option<UsageCharge>),
) -> LimitRequest<'a> {
    let identity = ask.names_identity().then(|| IdentityLimits { id, limits: &ask.shared, usage: parts.2 });
    LimitRequest { limits: &parts.0, usage: parts.1, identity }
}

fn request(key: usize, ask: &Ask) -> (Vec<(RateLimit, u64)>, Option<UsageCharge>, Option<UsageCharge>) {
    let charge = |(allowed, amount): (u64, u64), refill| UsageCharge {
        allowed: u128::from(allowed),
        reported: 0,
        amount,
        refill,
    };
    (
        ask.limits.clone(),
        ask.usage.map(|u| charge(u, refill(key))),
        ask.shared_usage.map(|u| charge(u, Some(shared_refill()))),
    )
}

/// Fixes each key's allowance (and each identity's) to the first one drawn for it, as a key has
/// one allowance.
fn one_allowance_per_key(steps: &mut [(u64, usize, Ask)]) {
    let mut allowance: HashMap<usize, u64> = HashMap::new();
    let mut shared: HashMap<String, u64> = HashMap::new();
    for (_, key, ask) in steps.iter_mut() {
        if let Some((allowed, _)) = &mut ask.usage {
            *allowed = *allowance.entry(*key).or_insert(*allowed);
        }
        if let Some((allowed, _)) = &mut ask.shared_usage {
            *allowed = *shared.entry(identity(*key)).or_insert(*allowed);
        }
    }
}

/// Keys whose requests name their identity once must always name it (the gate's rule): a key's
/// counters live with its identity's from then on. Here: every request of a key names it if any does.
fn identity_always_or_never(steps: &mut [(u64, usize, Ask)]) {
    let named: Vec<usize> = steps.iter().filter(|(_, _, a)| a.names_identity()).map(|(_, k, _)| *k).collect();
    for (_, key, ask) in steps.iter_mut() {
        if named.contains(key) && !ask.names_identity() {
            // Name the identity with a limit that never refuses.
            ask.shared.push((RateLimit::new("never", RateLimit::MAX_LIMIT, Duration::from_secs(60)).unwrap(), 1));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_memory_limiter_agrees_with_the_model(mut steps in steps(1_500)) {
        one_allowance_per_key(&mut steps);
        identity_always_or_never(&mut steps);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let wall = WallClock::manual(UNIX_EPOCH);
            let limiter = MemoryLimiter::new().clock(wall.clone());
            let mut model = Model::default();
            let mut now = 0;
            for (i, (advance, key, ask)) in steps.iter().enumerate() {
                tokio::time::advance(Duration::from_millis(*advance)).await;
                wall.advance(Duration::from_millis(*advance));
                now += advance;
                let (parts, id) = (request(*key, ask), identity(*key));
                let got = limiter.check_now(&format!("k{key}"), &ask_of(&id, ask, &parts)).unwrap();
                let want = model.decide(now, now, *key, ask);
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
    fn the_redis_limiter_agrees_with_the_model(mut steps in steps(1_500)) {
        let url = redis_url();
        one_allowance_per_key(&mut steps);
        identity_always_or_never(&mut steps);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let conn = keygate::RedisConnection::open(url.as_str()).unwrap();
            let mut n = [0u8; 8];
            getrandom::fill(&mut n).unwrap();
            let wall = WallClock::manual(UNIX_EPOCH);
            let limiter = keygate::limit::RedisLimiter::new(conn, &format!("kgmodel:{}", u64::from_le_bytes(n)))
                .timeout(Duration::from_secs(5))
                .clock(wall.clone());
            let mut model = Model::default();
            let started = std::time::Instant::now();
            let mut at = 0;
            for (i, (advance, key, ask)) in steps.iter().enumerate() {
                // Refills follow the manual wall clock; windows follow Redis's, which stands still here.
                wall.advance(Duration::from_millis(*advance));
                at += advance;
                let (parts, id) = (request(*key, ask), identity(*key));
                let got = limiter.check(&format!("k{key}"), &ask_of(&id, ask, &parts)).await.unwrap();
                let want = model.decide(0, at, *key, ask);
                let got = got.ok().map(|states| states.iter().map(|s| s.remaining).collect::<Vec<_>>());
                prop_assert_eq!(got, want, "step {}: {:?}", i, ask);
            }
            // The model's clock stood still: the case must have run inside the shortest window.
            prop_assert!(started.elapsed() < Duration::from_millis(900), "case too slow for the model: {:?}", started.elapsed());
            Ok(())
        })?;
    }
}
