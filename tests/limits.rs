//! Rate limits: the fixed window's guarantees under a controlled clock, exactness under concurrency, headers,
//! state that only verified keys create, and usage allowances.
#![cfg(feature = "axum")]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use keygate::limit::{HeaderStyle, LimitRequest, LimitVerdict, Limiter, MemoryLimiter, RateLimit, Refusal};

use keygate::{ApiKeyLayer, KeyFacts, KeyFormat, LocalVerifier, RoutePolicy, RouteTable, VerifiedKey};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

/// One check of `limits` for key `key`, with no usage.
fn check(limiter: &MemoryLimiter, key: &str, limits: &[(RateLimit, u64)]) -> LimitVerdict {
    limiter.check_now(key, &LimitRequest { limits, usage: None, identity: None }).unwrap()
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// From a standing start exactly `limit` requests pass; the refusal's Retry-After is exact:
    /// a microsecond earlier is still refused, at it the request passes.
    #[test]
    fn exactly_limit_from_a_standing_start_and_an_honest_retry_after(
        extra in 0u64..500,
        window_ms in 1u64..120_000,
        cost in 1u64..4,
    ) {
        let limit = cost + extra;
        paused_runtime().block_on(async {
            let limiter = MemoryLimiter::new();
            let rl = RateLimit::new("p", limit, Duration::from_millis(window_ms)).unwrap();
            let check = || check(&limiter, "k", &[(rl.clone(), cost)]);
            let mut passed = 0;
            let denied = loop {
                match check() {
                    Ok(states) => {
                        passed += cost;
                        prop_assert_eq!(states[0].remaining, limit - passed, "remaining is in cost units");
                    }
                    Err(Refusal::Rate(denied)) => break denied,
                    Err(other) => unreachable!("{other:?}"),
                }
                prop_assert!(passed <= limit);
            };
            prop_assert_eq!(passed, limit / cost * cost);
            let wait = denied.retry_after;
            prop_assert!(wait <= Duration::from_millis(window_ms));
            if wait > Duration::from_micros(1) {
                tokio::time::advance(wait - Duration::from_micros(1)).await;
                prop_assert!(check().is_err(), "passed before its Retry-After");
                tokio::time::advance(Duration::from_micros(1)).await;
            } else {
                tokio::time::advance(wait).await;
            }
            prop_assert!(check().is_ok(), "refused at its Retry-After");
            Ok(())
        })?;
    }

    /// At any pace: at most `limit` pass in any window of the key's, and so at most `2 × limit` in
    /// any span of one window's length; and a request is refused only when its window is full.
    #[test]
    fn never_more_than_the_limit_per_window(limit in 1u64..50, gaps in proptest::collection::vec(0u64..700, 1..400)) {
        paused_runtime().block_on(async {
            let limiter = MemoryLimiter::new();
            let window = Duration::from_secs(1);
            let rl = RateLimit::new("p", limit, window).unwrap();
            let (mut passes, mut now) = (Vec::new(), Duration::ZERO);
            for gap in gaps {
                tokio::time::advance(Duration::from_millis(gap)).await;
                now += Duration::from_millis(gap);
                match check(&limiter, "k", &[(rl.clone(), 1)]) {
                    Ok(_) => passes.push(now),
                    Err(Refusal::Rate(denied)) => prop_assert!(denied.retry_after <= window && denied.retry_after > Duration::ZERO),
                    Err(other) => unreachable!("{other:?}"),
                }
                let recent = passes.iter().filter(|t| now.saturating_sub(**t) < window).count() as u64;
                prop_assert!(recent <= 2 * limit, "{recent} in one window's span");
            }
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn a_cost_above_the_limit_never_passes_and_says_so() {
    let limiter = MemoryLimiter::new();
    let rl = RateLimit::new("p", 2, Duration::from_secs(10)).unwrap();
    for _ in 0..3 {
        match check(&limiter, "k", &[(rl.clone(), 3)]) {
            Err(Refusal::Rate(denied)) => assert_eq!(denied.retry_after, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_secs(10)).await;
    }
    assert_eq!(limiter.key_count(), 0, "a refusal leaves no state");
}

#[tokio::test(start_paused = true)]
async fn a_request_refused_by_one_limit_consumes_nothing_from_the_others() {
    let limiter = MemoryLimiter::new();
    let wide = RateLimit::per_minute("wide", 10).unwrap();
    let narrow = RateLimit::per_minute("narrow", 2).unwrap();
    let both = [(wide.clone(), 1), (narrow.clone(), 1)];
    assert!(check(&limiter, "k", &both).is_ok());
    assert!(check(&limiter, "k", &both).is_ok());
    for _ in 0..5 {
        assert_eq!(
            check(&limiter, "k", &both),
            Err(Refusal::Rate(keygate::limit::Denied { limit: narrow.clone(), retry_after: Duration::from_secs(60) }))
        );
    }
    // `wide` saw 2 requests, not 7.
    assert_eq!(check(&limiter, "k", &[(wide, 1)]).unwrap()[0].remaining, 7);
}

async fn verifier_with_key(facts: KeyFacts) -> (LocalVerifier, String) {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(facts).await.unwrap().key.expose_secret().to_owned();
    (verifier, key)
}

async fn whoami(key: VerifiedKey) -> String {
    key.rate_limit().map_or("none".into(), |s| format!("{} left of {}", s.remaining, s.limit.name()))
}

async fn call(app: &Router, method: &str, path: &str, key: &str) -> http::Response<Body> {
    let req = Request::builder().method(method).uri(path).header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_times_a_thousand_requests_let_exactly_the_limit_through() {
    let (verifier, key) = verifier_with_key(KeyFacts::new("k")).await;
    let layer =
        ApiKeyLayer::builder(verifier).rate_limit(RateLimit::per_minute("default", 500).unwrap()).build().unwrap();
    let app = Router::new().route("/x", get(|| async { "ok" })).layer(layer);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (app, key) = (app.clone(), key.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..1000 {
                    ok += u32::from(call(&app, "GET", "/x", &key).await.status() == StatusCode::OK);
                }
                ok
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 500);
}

#[tokio::test]
async fn headers_and_the_429() {
    let (verifier, key) = verifier_with_key(KeyFacts::new("k")).await;
    let limit = RateLimit::new("burst", 2, Duration::from_secs(10)).unwrap();
    for style in [HeaderStyle::Ietf, HeaderStyle::IetfAndLegacy, HeaderStyle::Off] {
        let layer =
            ApiKeyLayer::builder(verifier.clone()).rate_limit(limit.clone()).rate_limit_headers(style).build().unwrap();
        let app = Router::new().route("/x", get(whoami)).layer(layer);
        let res = call(&app, "GET", "/x", &key).await;
        let h = res.headers().clone();
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(body, "1 left of burst", "the context has the remaining count");
        match style {
            HeaderStyle::Off => assert!(h.get("ratelimit").is_none()),
            _ => {
                assert_eq!(h["ratelimit-policy"], "\"burst\";q=2;w=10");
                assert_eq!(h["ratelimit"], "\"burst\";r=1;t=10");
                assert_eq!(h.get("x-ratelimit-remaining").is_some(), style == HeaderStyle::IetfAndLegacy);
            }
        }
        call(&app, "GET", "/x", &key).await;
        let refused = call(&app, "GET", "/x", &key).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert_eq!(retry, 10, "the window ends 10 s after it opened (less a sliver, rounded up)");
        if style != HeaderStyle::Off {
            assert_eq!(refused.headers()["ratelimit"], "\"burst\";r=0;t=10");
        }
        // The next style gets a fresh layer, so fresh counters.
    }
}

#[tokio::test]
async fn limits_from_the_route_the_key_and_its_metadata_with_costs() {
    let facts =
        KeyFacts::new("k").with_rate_limit(RateLimit::per_minute("key", 10).unwrap()).with_metadata("rl", "4/min");
    let (verifier, key) = verifier_with_key(facts).await;
    let routes = RouteTable::new()
        .route("/cheap", "x")
        .route_with("/dear", "x", RoutePolicy::new().cost(3))
        .route_with("/own", "x", RoutePolicy::new().rate_limit(RateLimit::per_minute("own", 1).unwrap()));
    let facts = KeyFacts::new("k2").with_scopes(["x:*".parse().unwrap()]);
    let key2 = verifier.create(facts).await.unwrap().key.expose_secret().to_owned();
    let layer = ApiKeyLayer::builder(verifier).routes(routes).rate_limit_from_metadata("rl").build().unwrap();
    let app =
        Router::new().route("/cheap", get(whoami)).route("/dear", get(whoami)).route("/own", get(whoami)).layer(layer);
    // Key `k` has no scopes: a scoped route refuses it before any limit is touched.
    assert_eq!(call(&app, "GET", "/cheap", &key).await.status(), StatusCode::FORBIDDEN);
    // Key `k2`: the route's own limit of 1.
    assert_eq!(call(&app, "GET", "/own", &key2).await.status(), StatusCode::OK);
    assert_eq!(call(&app, "GET", "/own", &key2).await.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(call(&app, "GET", "/cheap", &key2).await.status(), StatusCode::OK, "other routes unaffected");

    // The metadata limit (4/min) is the tightest for `k3`; `/dear` costs 3 of it.
    let (verifier, key3) =
        verifier_with_key(KeyFacts::new("k3").with_scopes(["x:*".parse().unwrap()]).with_metadata("rl", "4/min")).await;
    let routes = RouteTable::new().route("/cheap", "x").route_with("/dear", "x", RoutePolicy::new().cost(3));
    let layer = ApiKeyLayer::builder(verifier).routes(routes).rate_limit_from_metadata("rl").build().unwrap();
    let app = Router::new().route("/cheap", get(whoami)).route("/dear", get(whoami)).layer(layer);
    assert_eq!(call(&app, "GET", "/dear", &key3).await.status(), StatusCode::OK);
    assert_eq!(call(&app, "GET", "/dear", &key3).await.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(call(&app, "GET", "/cheap", &key3).await.status(), StatusCode::OK);
    assert_eq!(call(&app, "GET", "/cheap", &key3).await.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn random_invalid_keys_leave_no_limiter_state() {
    let (verifier, _) = verifier_with_key(KeyFacts::new("k")).await;
    let limiter = Arc::new(MemoryLimiter::new());
    let layer = ApiKeyLayer::builder(verifier)
        .rate_limit(RateLimit::per_minute("default", 5).unwrap())
        .limiter(limiter.clone())
        .build()
        .unwrap();
    let app = Router::new().route("/x", get(|| async { "ok" })).layer(layer);
    let format = KeyFormat::checksummed("kg_").unwrap();
    for i in 0..100_000 {
        // Well-formed keys that no store knows, and plain garbage.
        let key = if i % 2 == 0 { format.generate().unwrap().expose_secret().to_owned() } else { format!("junk-{i}") };
        assert_eq!(call(&app, "GET", "/x", &key).await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(limiter.key_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_forgotten() {
    let limiter = MemoryLimiter::new();
    let rl = RateLimit::new("p", 5, Duration::from_secs(1)).unwrap();
    for i in 0..1000 {
        assert!(check(&limiter, &format!("key-{i}"), &[(rl.clone(), 1)]).is_ok());
    }
    assert_eq!(limiter.key_count(), 1000);
    tokio::time::advance(Duration::from_secs(2)).await;
    limiter.sweep();
    assert_eq!(limiter.key_count(), 0);
    // And without an explicit sweep, new keys push the old ones out as they arrive.
    for i in 0..1000 {
        assert!(check(&limiter, &format!("key-{i}"), &[(rl.clone(), 1)]).is_ok());
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    for i in 1000..3000 {
        assert!(check(&limiter, &format!("key-{i}"), &[(rl.clone(), 1)]).is_ok());
    }
    assert!(limiter.key_count() < 3000, "{}", limiter.key_count());
}

#[tokio::test]
async fn usage_allowances_charge_only_admitted_requests() {
    let facts = KeyFacts::new("k").with_scopes(["gen:read".parse().unwrap()]).with_usage_limit(10);
    let (verifier, key) = verifier_with_key(facts).await;
    let routes = RouteTable::new().route_with("/gen", "gen", RoutePolicy::new().usage(3, Some("tokens")));
    for payment_required in [false, true] {
        let layer = ApiKeyLayer::builder(verifier.clone())
            .routes(routes.clone())
            .usage_limit_payment_required(payment_required)
            .build()
            .unwrap();
        let app = Router::new().route("/gen", get(|| async { "ok" }).post(|| async { "ok" })).layer(layer);
        // A refused request (no `create` scope) is charged nothing.
        for _ in 0..5 {
            assert_eq!(call(&app, "POST", "/gen", &key).await.status(), StatusCode::FORBIDDEN);
        }
        for _ in 0..3 {
            assert_eq!(call(&app, "GET", "/gen", &key).await.status(), StatusCode::OK);
        }
        let spent = call(&app, "GET", "/gen", &key).await;
        let expected = if payment_required { StatusCode::PAYMENT_REQUIRED } else { StatusCode::TOO_MANY_REQUESTS };
        assert_eq!(spent.status(), expected);
        let body = axum::body::to_bytes(spent.into_body(), 4096).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("usage-limited"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_request_is_not_charged_usage() {
    let facts = KeyFacts::new("k").with_scopes(["gen:read".parse().unwrap()]).with_usage_limit(2);
    let (verifier, key) = verifier_with_key(facts).await;
    let routes = RouteTable::new().route_with(
        "/gen",
        "gen",
        RoutePolicy::new().usage(1, None).rate_limit(RateLimit::per_minute("gen", 1).unwrap()),
    );
    let layer = ApiKeyLayer::builder(verifier).routes(routes).build().unwrap();
    let app = Router::new().route("/gen", get(|| async { "ok" })).layer(layer);
    assert_eq!(call(&app, "GET", "/gen", &key).await.status(), StatusCode::OK);
    for _ in 0..5 {
        assert_eq!(call(&app, "GET", "/gen", &key).await.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    // The refusals took none of the allowance: one unit is left for the next window, then none.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(call(&app, "GET", "/gen", &key).await.status(), StatusCode::OK);
    tokio::time::advance(Duration::from_secs(60)).await;
    let spent = call(&app, "GET", "/gen", &key).await;
    let body = axum::body::to_bytes(spent.into_body(), 4096).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("usage-limited"));
}

/// The layer's limit is combined with each route's when the layer is built: it holds on mapped
/// and unmapped routes alike, at each route's cost, counts once where a route repeats it, and two
/// layers built from one table keep their own limits.
#[tokio::test]
async fn a_layer_limit_holds_on_every_route_at_its_cost_once_and_per_layer() {
    let (verifier, key) = verifier_with_key(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()])).await;
    let limit = RateLimit::per_minute("layer", 4).unwrap();
    let routes = RouteTable::new().route_with("/dear", "x", RoutePolicy::new().cost(2)).route_with(
        "/same",
        "x",
        RoutePolicy::new().rate_limit(limit.clone()),
    );
    let app = |limit: RateLimit| {
        let layer = ApiKeyLayer::builder(verifier.clone()).routes(routes.clone()).rate_limit(limit).build().unwrap();
        ["/dear", "/same", "/unmapped"].iter().fold(Router::new(), |r, p| r.route(p, get(whoami))).layer(layer)
    };
    let (four, one) = (app(limit), app(RateLimit::per_minute("layer", 1).unwrap()));
    // 2 + 1 + 1 = 4: `/same` lists the layer's limit again and is still charged 1.
    assert_eq!(call(&four, "GET", "/dear", &key).await.status(), StatusCode::OK);
    assert_eq!(call(&four, "GET", "/same", &key).await.status(), StatusCode::OK);
    assert_eq!(call(&four, "GET", "/unmapped", &key).await.status(), StatusCode::OK);
    for path in ["/unmapped", "/same", "/dear"] {
        assert_eq!(call(&four, "GET", path, &key).await.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
    }
    // The other layer, from the same table, holds its own limit of 1.
    assert_eq!(call(&one, "GET", "/unmapped", &key).await.status(), StatusCode::OK);
    assert_eq!(call(&one, "GET", "/dear", &key).await.status(), StatusCode::TOO_MANY_REQUESTS);
}
