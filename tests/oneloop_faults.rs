//! Oneloop's verify endpoint failing the ambiguous ways, over raw loopback sockets: the request is
//! read and the connection reset with no answer, or the answer comes after the gate gave up. Each
//! is a `503` with problem+json, never a pass; nothing of it is cached, and keys pass again as soon
//! as Oneloop answers, without a restart. The server checks every request against the spec.
#![cfg(all(feature = "oneloop", feature = "axum"))]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use common::oneloop::{answer, check_verify_request, check_verify_response, TOKEN};
use common::usage_server::{answer as send, read_request};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::breaker::BreakerConfig;
use keygate::oneloop::OneloopVerifier;
use keygate::{ApiKeyLayer, RouteTable, VerifiedKey};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// How the server treats the verify calls it reads.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Answers each key with a valid answer (id `id-<key>`, scope `items:*`).
    Normal,
    /// Reads the request, then resets the connection: sent, never answered.
    Reset,
    /// Reads the request and answers it after this long.
    Late(Duration),
}

struct VerifyServer {
    addr: SocketAddr,
    fault: Mutex<Fault>,
    calls: AtomicUsize,
    violations: Mutex<Vec<String>>,
}

impl VerifyServer {
    async fn start() -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            fault: Mutex::new(Fault::Normal),
            calls: AtomicUsize::new(0),
            violations: Mutex::default(),
        });
        let serving = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serving.clone().connection(stream));
            }
        });
        server
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) {
        let mut buf = Vec::new();
        while let Some((line, headers, body)) = read_request(&mut stream, &mut buf).await {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if line != "POST /api/v1/api-key/verify HTTP/1.1" {
                self.violation(format!("unexpected request line {line:?}"));
            }
            if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
                self.violation("no workspace token".into());
            }
            let req: Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Err(what) = check_verify_request(&req) {
                self.violation(format!("verify request: {what}: {req}"));
            }
            let fault = *self.fault.lock().unwrap();
            match fault {
                Fault::Normal => {}
                Fault::Reset => {
                    let _ = stream.set_zero_linger();
                    return; // dropped with linger 0: a reset after the request was read
                }
                Fault::Late(after) => tokio::time::sleep(after).await,
            }
            let mut res = answer(&format!("id-{}", req["key"].as_str().unwrap_or("")), &["items:*"]);
            res["requestedScopes"] = req["requestedScopes"].clone();
            if let Err(what) = check_verify_response(&res) {
                self.violation(format!("the server's own response: {what}"));
            }
            if send(&mut stream, 200, &res.to_string()).await.is_err() {
                return; // the gate gave up and closed the connection
            }
        }
    }
}

async fn who(key: VerifiedKey) -> String {
    key.id().to_owned()
}

async fn call(app: &Router, key: &str) -> (StatusCode, String) {
    let req = Request::get("/v1/items").header("x-api-key", key).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A reset after the request was read and an answer later than the timeout are both `503`s that
/// leave nothing behind: the same keys pass once Oneloop answers again, on the same layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_or_a_late_answer_is_a_503_and_the_next_answer_passes() {
    let server = VerifyServer::start().await;
    let timeout = Duration::from_millis(200);
    let verifier = OneloopVerifier::builder(TOKEN)
        .base_url(format!("http://{}", server.addr))
        .timeout(timeout)
        .breaker(BreakerConfig::default().failure_threshold(0)) // every call reaches the server
        .build()
        .unwrap();
    let layer = ApiKeyLayer::builder(verifier).routes(RouteTable::new().route("/v1/items", "items")).build().unwrap();
    let app = Router::new().route("/v1/items", get(who)).layer(layer);
    assert_eq!(call(&app, "key-a").await, (StatusCode::OK, "id-key-a".into()));

    server.set(Fault::Reset);
    let before = server.calls();
    let (status, body) = call(&app, "key-b").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("urn:keygate:problem:unavailable"), "{body}");
    assert!(server.calls() > before, "the request was sent and read before the reset");

    let late = Duration::from_millis(600);
    server.set(Fault::Late(late));
    let (before, started) = (server.calls(), Instant::now());
    let (status, body) = call(&app, "key-c").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() < late, "gave up at its timeout, {:?}", started.elapsed());
    assert!(server.calls() > before, "the request was sent and read");

    // Oneloop answers again: both keys pass on the same layer, whatever the late answer did.
    server.set(Fault::Normal);
    tokio::time::sleep(late).await; // the late answer has been sent by now
    assert_eq!(call(&app, "key-b").await, (StatusCode::OK, "id-key-b".into()));
    assert_eq!(call(&app, "key-c").await, (StatusCode::OK, "id-key-c".into()));
    assert_eq!(call(&app, "key-a").await, (StatusCode::OK, "id-key-a".into()));
    assert!(server.violations.lock().unwrap().is_empty(), "{:?}", server.violations.lock().unwrap());
}
