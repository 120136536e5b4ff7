//! Identities and refills, over loopback HTTP: all of a customer's keys share one limit and one
//! allowance (decided together with each key's own, all or nothing), in memory and across
//! instances through Redis; allowances refill on a schedule read from a clock the test moves.
#![cfg(feature = "axum")]

mod common;

use axum::routing::get;
use axum::Router;
use common::{bearer, fetch, serve_axum};
use http::StatusCode;
use keygate::limit::{MemoryLimiter, RateLimit, Refill, WallClock};
use keygate::{
    ApiKeyLayer, ApiKeyLayerBuilder, IdentityQuota, KeyFacts, LocalVerifier, RoutePolicy, RouteTable, VerifiedKey,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `/x` costs nothing; `/spend` spends 1 of an allowance; `/work` has its handler add 4.
fn routes() -> RouteTable {
    RouteTable::new().route("/x", "x").route_with("/spend", "x", RoutePolicy::new().usage(1, None)).route("/work", "x")
}

async fn serve(layer: ApiKeyLayerBuilder) -> SocketAddr {
    let layer = layer.routes(routes()).build().unwrap();
    let work = |key: VerifiedKey| async move {
        key.usage().add("", 4);
        "done"
    };
    let app = Router::new()
        .route("/x", get(|| async { "ok" }))
        .route("/spend", get(|| async { "ok" }))
        .route("/work", get(work))
        .layer(layer);
    serve_axum(app).await
}

fn facts(id: &str, customer: Option<&str>) -> KeyFacts {
    let facts = KeyFacts::new(id).with_scopes(["x:*".parse().unwrap()]);
    match customer {
        Some(c) => facts.with_customer(c),
        None => facts,
    }
}

async fn status(addr: SocketAddr, path: &str, key: &str) -> StatusCode {
    let (name, value) = bearer(key);
    fetch(addr, path, &[(name, &value)]).await.status
}

/// Sends `n` requests at once to `path` at each `(address, key)`, in turn; counts each status.
async fn storm(targets: &[(SocketAddr, String)], path: &'static str, n: usize) -> BTreeMap<u16, usize> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (addr, key) = targets[i % targets.len()].clone();
        tasks.push(tokio::spawn(async move { status(addr, path, &key).await }));
    }
    let mut statuses = BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().as_u16()).or_insert(0) += 1;
    }
    statuses
}

fn customer_limit(n: u64) -> RateLimit {
    RateLimit::per_minute("customer", n).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_of_one_identity_admit_exactly_ten_together() {
    let verifier = LocalVerifier::in_memory();
    let addr = serve(ApiKeyLayer::builder(verifier.clone()).identity_rate_limit(customer_limit(10))).await;
    let mut keys = Vec::new();
    for (id, customer) in [("a1", Some("acme")), ("a2", Some("acme")), ("g1", Some("globex")), ("solo", None)] {
        keys.push(verifier.create(facts(id, customer)).await.unwrap().key.expose_secret().to_owned());
    }
    let acme = [(addr, keys[0].clone()), (addr, keys[1].clone())];
    let seen = storm(&acme, "/x", 40).await;
    assert_eq!(seen, BTreeMap::from([(200, 10), (429, 30)]), "acme's two keys together");
    // Another customer, and a key without one (an identity of its own), have their own 10.
    assert_eq!(storm(&[(addr, keys[2].clone())], "/x", 12).await, BTreeMap::from([(200, 10), (429, 2)]));
    assert_eq!(storm(&[(addr, keys[3].clone())], "/x", 12).await, BTreeMap::from([(200, 10), (429, 2)]));
}

#[tokio::test]
async fn a_request_refused_by_its_key_s_limit_takes_nothing_from_its_identity() {
    let verifier = LocalVerifier::in_memory();
    let addr = serve(ApiKeyLayer::builder(verifier.clone()).identity_rate_limit(customer_limit(10))).await;
    let small = facts("a1", Some("acme")).with_rate_limit(RateLimit::per_minute("key", 3).unwrap());
    let a1 = verifier.create(small).await.unwrap().key.expose_secret().to_owned();
    let a2 = verifier.create(facts("a2", Some("acme"))).await.unwrap().key.expose_secret().to_owned();
    let mut passed = 0;
    for _ in 0..10 {
        passed += usize::from(status(addr, "/x", &a1).await == StatusCode::OK);
    }
    assert_eq!(passed, 3, "a1's own limit");
    // The 7 that a1's limit refused took nothing from acme's 10.
    assert_eq!(storm(&[(addr, a2.clone())], "/x", 10).await, BTreeMap::from([(200, 7), (429, 3)]));
}

#[tokio::test]
async fn keys_that_declare_one_identity_limit_with_different_sizes_share_one_counter() {
    let verifier = LocalVerifier::in_memory();
    let addr = serve(ApiKeyLayer::builder(verifier.clone())).await;
    let quota = |n| IdentityQuota::new().rate_limit(customer_limit(n));
    let five = verifier.create(facts("a1", Some("acme")).with_identity_quota(quota(5))).await.unwrap();
    let eight = verifier.create(facts("a2", Some("acme")).with_identity_quota(quota(8))).await.unwrap();
    let (five, eight) = (five.key.expose_secret().to_owned(), eight.key.expose_secret().to_owned());
    let count = |key: String| async move {
        let mut passed = 0;
        for _ in 0..10 {
            passed += usize::from(status(addr, "/x", &key).await == StatusCode::OK);
        }
        passed
    };
    assert_eq!(count(five.clone()).await, 5);
    // One counter for acme: the key declared with 8 gets what is left of its 8, never 8 more.
    assert_eq!(count(eight).await, 3);
    assert_eq!(count(five).await, 0);
}

#[tokio::test]
async fn an_identity_allowance_refills_on_its_schedule_and_counts_what_handlers_add() {
    let clock = WallClock::manual(UNIX_EPOCH + Duration::from_secs(1_000_000_060));
    let verifier = LocalVerifier::in_memory();
    let limiter = MemoryLimiter::new().clock(clock.clone());
    let addr = serve(ApiKeyLayer::builder(verifier.clone()).limiter(limiter)).await;
    let every_minute = Refill::every(Duration::from_secs(60)).unwrap();
    let quota = IdentityQuota::new().usage_limit(5).usage_refill(every_minute);
    let mut keys = Vec::new();
    for id in ["a1", "a2"] {
        let created = verifier.create(facts(id, Some("acme")).with_identity_quota(quota.clone())).await.unwrap();
        keys.push((addr, created.key.expose_secret().to_owned()));
    }
    assert_eq!(storm(&keys, "/spend", 12).await, BTreeMap::from([(200, 5), (429, 7)]));
    // The clock starts 40 s into a minute: 19 s later the period has not ended, 20 s later it has.
    clock.advance(Duration::from_secs(19));
    assert_eq!(storm(&keys, "/spend", 3).await, BTreeMap::from([(429, 3)]));
    clock.advance(Duration::from_secs(1));
    assert_eq!(storm(&keys, "/spend", 12).await, BTreeMap::from([(200, 5), (429, 7)]));
    // A handler's added usage counts against the identity: 4 of the next period's 5, then 1 left.
    clock.advance(Duration::from_secs(60));
    assert_eq!(status(addr, "/work", &keys[0].1).await, StatusCode::OK);
    assert_eq!(storm(&keys, "/spend", 4).await, BTreeMap::from([(200, 1), (429, 3)]));
}

#[tokio::test]
async fn a_monthly_refill_on_the_31st_comes_on_the_last_day_of_a_short_month() {
    let day = |y: i32, m: u32, d: u32| -> SystemTime {
        // Days since the epoch by counting: independent of the crate's calendar arithmetic.
        let mut days = 0u64;
        for year in 1970..y {
            days += if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 { 366 } else { 365 };
        }
        let lengths = [
            31,
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        days += lengths[..(m - 1) as usize].iter().sum::<u64>() + u64::from(d - 1);
        UNIX_EPOCH + Duration::from_secs(days * 86_400)
    };
    let clock = WallClock::manual(day(2025, 1, 31) + Duration::from_secs(3600));
    let verifier = LocalVerifier::in_memory();
    let addr = serve(ApiKeyLayer::builder(verifier.clone()).limiter(MemoryLimiter::new().clock(clock.clone()))).await;
    let monthly = facts("k", None).with_usage_limit(2).with_usage_refill(Refill::monthly(31).unwrap());
    let key = verifier.create(monthly).await.unwrap().key.expose_secret().to_owned();
    let spend = || async { status(addr, "/spend", &key).await };
    assert_eq!(
        (spend().await, spend().await, spend().await),
        (StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS)
    );
    clock.set(day(2025, 2, 28) - Duration::from_millis(1));
    assert_eq!(spend().await, StatusCode::TOO_MANY_REQUESTS, "the last millisecond of 27 February");
    clock.set(day(2025, 2, 28));
    assert_eq!(
        (spend().await, spend().await, spend().await),
        (StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS)
    );
    clock.set(day(2025, 3, 30));
    assert_eq!(spend().await, StatusCode::TOO_MANY_REQUESTS, "March has a 31st");
    clock.set(day(2025, 3, 31));
    assert_eq!(spend().await, StatusCode::OK);
}

/// Across instances through Redis. Needs `REDIS_URL` (CI sets it); reported ignored without it.
#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use keygate::limit::RedisLimiter;
    use keygate::store::RedisKeyStore;
    use keygate::RedisConnection;

    fn prefix(test: &str) -> String {
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).unwrap();
        format!("kgtest:{test}:{}", u64::from_le_bytes(n))
    }

    /// An instance: its own Redis connection, limiter (on `clock`) and verifier over the shared store.
    async fn instance(
        prefix: &str,
        clock: WallClock,
        layer: impl FnOnce(ApiKeyLayerBuilder) -> ApiKeyLayerBuilder,
    ) -> (SocketAddr, LocalVerifier) {
        let url = std::env::var("REDIS_URL").expect("REDIS_URL is set (this test is ignored otherwise)");
        let conn = RedisConnection::open(url.as_str()).unwrap();
        let verifier = LocalVerifier::new(RedisKeyStore::new(conn.clone(), prefix));
        let limiter = RedisLimiter::new(conn, prefix).timeout(Duration::from_secs(5)).clock(clock);
        (serve(layer(ApiKeyLayer::builder(verifier.clone()).limiter(limiter))).await, verifier)
    }

    #[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_keys_of_one_identity_admit_exactly_ten_together_across_two_instances() {
        let prefix = prefix("identity");
        let limit = |b: ApiKeyLayerBuilder| b.identity_rate_limit(customer_limit(10));
        let (one, verifier) = instance(&prefix, WallClock::system(), limit).await;
        let (two, _) = instance(&prefix, WallClock::system(), limit).await;
        let a1 = verifier.create(facts("a1", Some("acme"))).await.unwrap().key.expose_secret().to_owned();
        let a2 = verifier.create(facts("a2", Some("acme"))).await.unwrap().key.expose_secret().to_owned();
        let targets = [(one, a1.clone()), (two, a2.clone()), (one, a2), (two, a1)];
        assert_eq!(storm(&targets, "/x", 60).await, BTreeMap::from([(200, 10), (429, 50)]));
    }

    #[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_identity_allowance_refills_once_per_period_across_instances_with_skewed_clocks() {
        let prefix = prefix("refill");
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000_060);
        // Instance two's clock runs 2 s behind instance one's.
        let (fast, slow) = (WallClock::manual(start), WallClock::manual(start - Duration::from_secs(2)));
        let (one, verifier) = instance(&prefix, fast.clone(), |b| b).await;
        let (two, _) = instance(&prefix, slow.clone(), |b| b).await;
        let quota = IdentityQuota::new().usage_limit(5).usage_refill(Refill::every(Duration::from_secs(60)).unwrap());
        let mut keys = Vec::new();
        for id in ["a1", "a2"] {
            let created = verifier.create(facts(id, Some("acme")).with_identity_quota(quota.clone())).await.unwrap();
            keys.push(created.key.expose_secret().to_owned());
        }
        let targets = [(one, keys[0].clone()), (two, keys[1].clone()), (one, keys[1].clone()), (two, keys[0].clone())];
        assert_eq!(storm(&targets, "/spend", 20).await, BTreeMap::from([(200, 5), (429, 15)]));
        // Instance one passes the minute's end (second 1 000 000 080) first: the period refills there,
        // once; instance two, still in the old minute by its clock, counts in the new period.
        fast.advance(Duration::from_secs(21));
        slow.advance(Duration::from_secs(21));
        assert_eq!(storm(&targets, "/spend", 20).await, BTreeMap::from([(200, 5), (429, 15)]));
        // When instance two's clock passes the boundary too, nothing refills again.
        slow.advance(Duration::from_secs(3));
        assert_eq!(storm(&[(two, keys[0].clone())], "/spend", 4).await, BTreeMap::from([(429, 4)]));
    }
}
