//! Metering under ambiguous failures: the batcher never re-sends usage that Oneloop may have
//! recorded (unless asked to), retries what certainly was not delivered, and accounts for every
//! unit: `recorded == acknowledged + rejected + uncertain + dropped + unsent`.
#![cfg(feature = "oneloop")]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use common::usage_server::{self, Fault, UsageServer};
use http::{Request, StatusCode};
use keygate::oneloop::OneloopVerifier;
use keygate::oneloop::{BatchConfig, DeliveryPolicy, UsageBatcher, UsageReport};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RoutePolicy, RouteTable};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const TOKEN: &str = "ws_usage_token";
/// Units of usage each test sends: 4 tasks × 75 requests, 1 unit each.
const USED: u64 = 300;

struct Setup {
    app: Router,
    batcher: UsageBatcher,
    key: String,
}

async fn setup(addr: SocketAddr, policy: DeliveryPolicy, usage_timeout: Duration) -> Setup {
    let oneloop = OneloopVerifier::builder(TOKEN)
        .base_url(format!("http://{addr}"))
        .usage_timeout(usage_timeout)
        .build()
        .unwrap();
    let config = BatchConfig::default()
        .interval(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(100))
        .delivery(policy);
    let batcher = UsageBatcher::new(oneloop, config);
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k").with_scopes(["items:*".parse().unwrap()])).await.unwrap().key;
    let routes = RouteTable::new().route_with("/gen", "items", RoutePolicy::new().usage(1, Some("requests")));
    let layer = ApiKeyLayer::builder(verifier).routes(routes).usage_sink(batcher.clone()).build().unwrap();
    let app = Router::new().route("/gen", get(|| async { "ok" })).layer(layer);
    Setup { app, batcher, key: key.expose_secret().to_owned() }
}

/// Sends `USED` requests from 4 concurrent tasks; all must pass.
async fn use_it(s: &Setup) {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (app, key) = (s.app.clone(), s.key.clone());
            tokio::spawn(async move {
                for _ in 0..USED / 4 {
                    let req = Request::get("/gen").header("x-api-key", &key).body(Body::empty()).unwrap();
                    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
                    // Spread over several flush intervals, so sends and requests interleave.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Prints the identity and checks it: every unit in exactly one class.
fn identity(mode: &str, report: &UsageReport, server: &UsageServer) {
    let line = format!(
        "{mode}: used {USED} = recorded {} = acknowledged {} + rejected {} + uncertain {} + dropped {} + unsent {}; \
         Oneloop recorded {} in {} calls; resent {}\n",
        report.recorded,
        report.acknowledged,
        report.rejected,
        report.uncertain,
        report.dropped,
        report.unsent,
        server.total(),
        server.calls(),
        report.resent,
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    assert_eq!(report.recorded, USED, "{line}");
    assert!(report.balances(), "{line}");
    server.assert_no_violations();
}

/// Oneloop records each send, then answers after the client gave up: nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_uncertain_and_never_resent() {
    let server = usage_server::start(TOKEN).await;
    server.set(Fault::RecordThenLate(Duration::from_millis(400)));
    let s = setup(server.addr, DeliveryPolicy::AtMostOnce, Duration::from_millis(100)).await;
    use_it(&s).await;
    let report = s.batcher.shutdown(Duration::from_secs(5)).await;
    identity("record then answer late", &report, &server);
    assert_eq!(server.total(), u128::from(USED), "each unit recorded exactly once, never re-sent");
    assert_eq!((report.uncertain, report.unsent, report.acknowledged), (USED, 0, 0));
    // A send that finally answers late must not be sent again either.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(server.total(), u128::from(USED));
}

/// Oneloop records each send, then resets the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_recording_is_uncertain_and_never_resent() {
    let server = usage_server::start(TOKEN).await;
    server.set(Fault::RecordThenReset);
    let s = setup(server.addr, DeliveryPolicy::AtMostOnce, Duration::from_secs(2)).await;
    use_it(&s).await;
    let report = s.batcher.shutdown(Duration::from_secs(5)).await;
    identity("record then reset", &report, &server);
    assert_eq!(server.total(), u128::from(USED));
    assert_eq!((report.uncertain, report.unsent), (USED, 0));
}

/// `500`, `502` and `504` may come after the usage was recorded: uncertain, not re-sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_uncertain() {
    for status in [500, 502, 504] {
        let server = usage_server::start(TOKEN).await;
        server.set(Fault::Status(status));
        let s = setup(server.addr, DeliveryPolicy::AtMostOnce, Duration::from_secs(2)).await;
        use_it(&s).await;
        let report = s.batcher.shutdown(Duration::from_secs(5)).await;
        identity(&format!("answer {status}"), &report, &server);
        assert_eq!((report.uncertain, report.acknowledged), (USED, 0));
        assert!(server.calls() <= 20, "{status}: {} calls: nothing is re-sent", server.calls());
    }
}

/// A rejection is final: counted, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_is_counted_and_not_retried() {
    for status in [400, 401, 403, 404, 422] {
        let server = usage_server::start(TOKEN).await;
        server.set(Fault::Status(status));
        let s = setup(server.addr, DeliveryPolicy::AtMostOnce, Duration::from_secs(2)).await;
        use_it(&s).await;
        tokio::time::sleep(Duration::from_millis(200)).await; // several intervals: no retries
        let calls = server.calls();
        let report = s.batcher.shutdown(Duration::from_secs(5)).await;
        identity(&format!("answer {status}"), &report, &server);
        assert_eq!((report.rejected, report.unsent, server.total()), (USED, 0, 0));
        assert_eq!(server.calls(), calls, "{status}: shutdown re-sent nothing");
    }
}

/// Nothing reached Oneloop (connection refused, or `503`/`429`): retried until delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_not_delivered_is_retried_until_acknowledged_exactly_once() {
    // Connection refused: the port is free until the server starts on it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let s = setup(addr, DeliveryPolicy::AtMostOnce, Duration::from_secs(2)).await;
    use_it(&s).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // several refused flushes
    assert_eq!(s.batcher.report().unsent, USED, "{:?}", s.batcher.report());
    let server = usage_server::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), TOKEN);
    server.set_for(Fault::Status(503), 2);
    let report = s.batcher.shutdown(Duration::from_secs(10)).await;
    identity("connection refused, then 503 twice, then normal", &report, &server);
    assert_eq!((report.acknowledged, server.total()), (USED, u128::from(USED)));

    let server = usage_server::start(TOKEN).await;
    server.set_for(Fault::Status(429), 3);
    let s = setup(server.addr, DeliveryPolicy::AtMostOnce, Duration::from_secs(2)).await;
    use_it(&s).await;
    let report = s.batcher.shutdown(Duration::from_secs(10)).await;
    identity("429 three times, then normal", &report, &server);
    assert_eq!((report.acknowledged, server.total()), (USED, u128::from(USED)));
}

/// The opt-in at-least-once policy re-sends what may have been lost: Oneloop may count it twice,
/// never less, and the report says how much was re-sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_resends_and_says_so() {
    let server = usage_server::start(TOKEN).await;
    server.set_for(Fault::RecordThenReset, 3);
    let s = setup(server.addr, DeliveryPolicy::AtLeastOnce, Duration::from_secs(2)).await;
    use_it(&s).await;
    let report = s.batcher.shutdown(Duration::from_secs(10)).await;
    identity("at least once, reset three times", &report, &server);
    assert_eq!(report.acknowledged, USED);
    assert!(report.resent > 0);
    assert_eq!(server.total(), u128::from(USED + report.resent), "over-billed by exactly what was re-sent");
}

/// A shutdown whose deadline cuts off a send in flight reports it, never "0 unsent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_accounts_for_a_send_it_cut_off() {
    let server = usage_server::start(TOKEN).await;
    server.set(Fault::Hang);
    let s = setup(server.addr, DeliveryPolicy::AtMostOnce, Duration::from_secs(30)).await;
    use_it(&s).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the sends are out and hanging
    let started = std::time::Instant::now();
    let report = s.batcher.shutdown(Duration::from_millis(300)).await;
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown kept its deadline: {:?}", started.elapsed());
    identity("hang, shutdown cuts the sends off", &report, &server);
    assert_eq!(report.acknowledged, 0);
    assert_eq!(report.uncertain + report.unsent, USED);
    assert!(report.uncertain > 0, "the sends in flight are uncertain: {report:?}");
    // A late record after the shutdown changes nothing: the report is final for what it counted.
    let again = s.batcher.report();
    assert!(again.balances(), "{again:?}");
    let _ = Arc::clone(&server);
}
