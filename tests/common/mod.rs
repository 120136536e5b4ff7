//! Test harness: servers on loopback, a raw HTTP/1.1 client, and a verifier that counts calls.
#![allow(dead_code)]

#[cfg(feature = "oneloop")]
pub(crate) mod oneloop;
#[cfg(feature = "redis")]
pub(crate) mod own_redis;
#[cfg(feature = "postgres")]
pub(crate) mod pg;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod proxy;
#[cfg(feature = "redis")]
pub(crate) mod topology;
#[cfg(feature = "oneloop")]
pub(crate) mod usage_server;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate::verify::BoxFuture;
use keygate::{PresentedKey, Verification, Verifier, VerifyError, VerifyRequest};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Serves an axum router on 127.0.0.1 and returns its address.
pub(crate) async fn serve_axum(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Serves any tower service over plain hyper (no axum) and returns its address.
pub(crate) async fn serve_hyper<S, B>(service: S) -> SocketAddr
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}

/// A response as the client saw it.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends one request over a fresh connection, exactly as built: the path is not normalised, and
/// duplicate or non-ASCII headers go out as they are.
pub(crate) async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = req;
    req.headers_mut().insert(http::header::HOST, "localhost".parse().unwrap());
    let res = sender.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// `GET path` with these headers.
pub(crate) async fn fetch(addr: SocketAddr, path: &str, headers: &[(&str, &[u8])]) -> Reply {
    request(addr, "GET", path, headers).await
}

/// `method path` with these headers and an empty body.
pub(crate) async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, http::HeaderValue::from_bytes(value).unwrap());
    }
    send(addr, req.body(Full::new(Bytes::new())).unwrap()).await
}

/// `Authorization: Bearer <key>`.
pub(crate) fn bearer(key: &str) -> (&'static str, Vec<u8>) {
    ("authorization", format!("Bearer {key}").into_bytes())
}

/// Wraps a verifier and counts how often each half is asked.
#[derive(Clone)]
pub(crate) struct Counting<V> {
    pub inner: V,
    pub now_calls: Arc<AtomicUsize>,
    pub async_calls: Arc<AtomicUsize>,
    /// When set, `verify_now` declines, so every request takes the asynchronous path.
    pub async_only: bool,
}

impl<V> Counting<V> {
    pub(crate) fn new(inner: V) -> Self {
        Self { inner, now_calls: Arc::default(), async_calls: Arc::default(), async_only: false }
    }

    pub(crate) fn async_only(inner: V) -> Self {
        Self { async_only: true, ..Self::new(inner) }
    }

    pub(crate) fn calls(&self) -> usize {
        self.now_calls.load(Ordering::SeqCst) + self.async_calls.load(Ordering::SeqCst)
    }
}

impl<V: Verifier> Verifier for Counting<V> {
    fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
        if self.async_only {
            return None;
        }
        self.now_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.verify_now(key)
    }

    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        self.async_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.verify(request)
    }
}

/// A verifier that always fails, as an unreachable remote would.
pub(crate) struct Unreachable;

impl Verifier for Unreachable {
    fn verify(&self, _: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        Box::pin(async { Err(VerifyError::new("connection refused")) })
    }
}

/// A verifier that answers every key with a fixed verification.
pub(crate) struct Fixed(pub Verification);

impl Verifier for Fixed {
    fn verify_now(&self, _: &PresentedKey<'_>) -> Option<Verification> {
        Some(self.0.clone())
    }

    fn verify(&self, _: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        let v = self.0.clone();
        Box::pin(async move { Ok(v) })
    }
}

/// Log lines captured from a `tracing` subscriber set for the current thread.
#[derive(Clone, Default)]
pub(crate) struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures everything at `level` and above on this thread until the guard drops (use a
    /// current-thread runtime so the server's tasks log here too).
    pub(crate) fn start(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything logged so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines that contain `needle` (such as `" WARN "`).
    pub(crate) fn lines(&self, needle: &str) -> Vec<String> {
        self.text().lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }
}
