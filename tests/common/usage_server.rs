//! A loopback Oneloop `record-usage` over raw sockets, so it can fail the ways a real network does:
//! record and then answer late, record and then reset the connection, answer an error, or hang.
//! It checks each request against `shared/oneloop/record-usage.openapi.yaml`.

use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server treats a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Records it and answers `200 {}`.
    Normal,
    /// Records it, then answers only after this long.
    RecordThenLate(Duration),
    /// Records it, then resets the connection without answering.
    RecordThenReset,
    /// Answers this status without recording.
    Status(u16),
    /// Reads the request and never answers; records nothing.
    Hang,
}

pub(crate) struct UsageServer {
    pub addr: SocketAddr,
    /// Units recorded, by (key, usage name).
    pub recorded: Mutex<HashMap<(String, Option<String>), u128>>,
    pub calls: AtomicUsize,
    /// The fault for the next calls; after `fault_calls` calls it goes back to `Normal`.
    fault: Mutex<(Fault, usize)>,
    pub violations: Mutex<Vec<String>>,
}

impl UsageServer {
    /// Every call from now on meets `fault`.
    pub(crate) fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = (fault, usize::MAX);
    }

    /// The next `calls` calls meet `fault`, then the server is normal again.
    pub(crate) fn set_for(&self, fault: Fault, calls: usize) {
        *self.fault.lock().unwrap() = (fault, calls);
    }

    pub(crate) fn total(&self) -> u128 {
        self.recorded.lock().unwrap().values().sum()
    }

    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn next_fault(&self) -> Fault {
        let mut f = self.fault.lock().unwrap();
        if f.1 == 0 {
            return Fault::Normal;
        }
        f.1 = f.1.saturating_sub(1);
        f.0
    }

    pub(crate) fn assert_no_violations(&self) {
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "spec violations: {v:?}");
    }
}

/// Starts the server on a free loopback port.
pub(crate) async fn start(token: &'static str) -> Arc<UsageServer> {
    start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), token)
}

/// Starts the server on `listener`.
pub(crate) fn start_on(listener: TcpListener, token: &'static str) -> Arc<UsageServer> {
    let server = Arc::new(UsageServer {
        addr: listener.local_addr().unwrap(),
        recorded: Mutex::default(),
        calls: AtomicUsize::new(0),
        fault: Mutex::new((Fault::Normal, 0)),
        violations: Mutex::default(),
    });
    let s = server.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(connection(s.clone(), stream, token));
        }
    });
    server
}

/// One request: the head (lower-cased header names) and the body.
pub(crate) async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, HashMap<String, String>, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let request_line = lines.next()?.to_owned();
            let headers: HashMap<String, String> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((request_line, headers, body));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub(crate) async fn answer(stream: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await
}

async fn connection(server: Arc<UsageServer>, mut stream: TcpStream, token: &'static str) {
    let mut buf = Vec::new();
    while let Some((line, headers, body)) = read_request(&mut stream, &mut buf).await {
        server.calls.fetch_add(1, Ordering::SeqCst);
        let fault = server.next_fault();
        if line != "POST /api/v1/api-key/record-usage HTTP/1.1" {
            server.violations.lock().unwrap().push(format!("unexpected request line {line:?}"));
        }
        if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {token}")) {
            let _ = answer(&mut stream, 401, r#"{"error":{"code":401,"message":"invalid workspace token"}}"#).await;
            continue;
        }
        let parsed = match parse(&body) {
            Ok(parsed) => parsed,
            Err(what) => {
                server.violations.lock().unwrap().push(what.clone());
                let _ = answer(&mut stream, 400, &format!(r#"{{"error":{{"code":400,"message":{what:?}}}}}"#)).await;
                continue;
            }
        };
        let record =
            || *server.recorded.lock().unwrap().entry((parsed.0.clone(), parsed.2.clone())).or_default() += parsed.1;
        match fault {
            Fault::Normal => record(),
            Fault::RecordThenLate(delay) => {
                record();
                tokio::time::sleep(delay).await;
            }
            Fault::RecordThenReset => {
                record();
                let _ = stream.set_zero_linger();
                return; // dropped with linger 0: a reset, no answer
            }
            Fault::Status(status) => {
                let body = format!(r#"{{"error":{{"code":{status},"message":"refused"}}}}"#);
                if answer(&mut stream, status, &body).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        }
        if answer(&mut stream, 200, "{}").await.is_err() {
            return;
        }
    }
}

/// `RecordUsageApiKeyRequest`: `key` required string, `usage` `^\d+$` (default "0"), `usageName` string.
fn parse(body: &[u8]) -> Result<(String, u128, Option<String>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let key = v.get("key").and_then(Value::as_str).ok_or("key must be a string")?.to_owned();
    let usage = match v.get("usage") {
        None => 0,
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map_err(|_| "usage out of range")?
        }
        Some(other) => return Err(format!("usage must match ^\\d+$: {other}")),
    };
    let name = match v.get("usageName") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("usageName must be a string: {other}")),
    };
    Ok((key, usage, name))
}
