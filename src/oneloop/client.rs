//! The HTTP calls to Oneloop: bounded, timed, and classified by what a failure says about Oneloop.

use super::wire::{ErrorBody, RecordUsageBody, VerifyBody, VerifyResponse};
use crate::key::Redacted;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The largest response body read; a larger one is a broken or hostile upstream.
const MAX_BODY: usize = 256 * 1024;

/// What became of a `record-usage` call. Oneloop's record-usage has no idempotency key, so a call
/// that may have been recorded must not be sent again by default: the classes say which may.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// `2xx`: recorded.
    Acknowledged,
    /// Certainly not recorded: no connection, or Oneloop said it did not take it (`408`, `429`,
    /// `503`). Safe to send again.
    NotDelivered(String),
    /// Refused for good (other `4xx`, or a redirect): sending it again gets the same answer.
    Rejected(u16, String),
    /// Sent, and maybe recorded: a timeout or reset after the request was written, or `5xx`.
    Uncertain(String),
}

/// A failed call.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Oneloop is down, slow, broken or refusing our token: counts against the circuit breaker.
    Down(String),
    /// This call failed, and says nothing about Oneloop's health: a `400`, or a `200` whose body
    /// breaks the contract (one odd answer must not open the circuit for every key).
    OneCall(String),
}

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    /// Without a trailing slash.
    pub(crate) base_url: String,
    /// The workspace token. Never logged or printed.
    pub(crate) token: String,
    pub(crate) timeout: Duration,
    /// The time allowed for one `record-usage` call: off the request path, so longer.
    pub(crate) usage_timeout: Duration,
    /// Whether the bad-token error was logged already: it is logged once, loudly.
    pub(crate) warned_token: AtomicBool,
}

impl Client {
    pub(crate) async fn verify(&self, body: &VerifyBody<'_>) -> Result<VerifyResponse, CallError> {
        let started = Instant::now();
        let answer = self.post("/api/v1/api-key/verify", body, body.key).await.and_then(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|e| CallError::OneCall(format!("Oneloop verify answered an invalid body: {e}")))
        });
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(CallError::Down(_)) => "down",
            Err(CallError::OneCall(_)) => "error",
        };
        crate::observe::upstream("verify", outcome, started.elapsed());
        answer
    }

    pub(crate) async fn record_usage(&self, body: &RecordUsageBody<'_>) -> Delivery {
        let started = Instant::now();
        let delivery = self.send_usage(body).await;
        let outcome = match &delivery {
            Delivery::Acknowledged => "acknowledged",
            Delivery::NotDelivered(_) => "not_delivered",
            Delivery::Rejected(..) => "rejected",
            Delivery::Uncertain(_) => "uncertain",
        };
        crate::observe::upstream("record_usage", outcome, started.elapsed());
        delivery
    }

    async fn send_usage(&self, body: &RecordUsageBody<'_>) -> Delivery {
        const PATH: &str = "/api/v1/api-key/record-usage";
        let url = format!("{}{PATH}", self.base_url);
        let sent = self.http.post(&url).bearer_auth(&self.token).json(body).timeout(self.usage_timeout).send().await;
        let res = match sent {
            Ok(res) => res,
            // A connection that never opened carried nothing.
            Err(e) if e.is_connect() => return Delivery::NotDelivered(format!("Oneloop {PATH}: {}", transport(&e))),
            Err(e) => return Delivery::Uncertain(format!("Oneloop {PATH}: {} after sending", transport(&e))),
        };
        let status = res.status();
        // The status line is Oneloop's answer; the body (`{}`) adds nothing, so it is not awaited.
        match status.as_u16() {
            200..=299 => Delivery::Acknowledged,
            408 | 429 | 503 => Delivery::NotDelivered(format!("Oneloop {PATH}: {status}")),
            300..=499 => {
                let bytes = read_capped(res).await.unwrap_or_default();
                Delivery::Rejected(
                    status.as_u16(),
                    format!("Oneloop {PATH}: {status}: {}", error_detail(&bytes, body.key)),
                )
            }
            _ => Delivery::Uncertain(format!("Oneloop {PATH}: {status}")),
        }
    }

    async fn post<T: Serialize>(&self, path: &str, body: &T, key: &str) -> Result<Vec<u8>, CallError> {
        let url = format!("{}{path}", self.base_url);
        let sent = self.http.post(&url).bearer_auth(&self.token).json(body).timeout(self.timeout).send().await;
        let res = sent.map_err(|e| CallError::Down(format!("Oneloop {path}: {}", transport(&e))))?;
        let status = res.status();
        let bytes = read_capped(res).await.map_err(|m| CallError::Down(format!("Oneloop {path}: {m}")))?;
        if status.is_success() {
            return Ok(bytes);
        }
        let detail = error_detail(&bytes, key);
        match status.as_u16() {
            401 | 403 => {
                if !self.warned_token.swap(true, Ordering::Relaxed) {
                    tracing::error!(%status, %detail, "keygate: Oneloop refused the workspace token; check ONELOOP_API_KEY. Requests get 503 until it is fixed");
                }
                Err(CallError::Down(format!("Oneloop {path}: workspace token refused ({status})")))
            }
            400 => Err(CallError::OneCall(format!("Oneloop {path}: bad request: {detail}"))),
            _ => Err(CallError::Down(format!("Oneloop {path}: {status}: {detail}"))),
        }
    }
}

/// The body, up to [`MAX_BODY`] bytes.
async fn read_capped(mut res: reqwest::Response) -> Result<Vec<u8>, String> {
    if res.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(format!("body over {MAX_BODY} bytes"));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| transport(&e).to_owned())? {
        if bytes.len() + chunk.len() > MAX_BODY {
            return Err(format!("body over {MAX_BODY} bytes"));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The error body's code and message, with the key scrubbed in case the upstream echoes it.
fn error_detail(bytes: &[u8], key: &str) -> String {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(ErrorBody { error }) => {
            let message: String = error.message.chars().take(200).collect();
            format!("code {}: {}", error.code, message.replace(key, &Redacted::of(key).to_string()))
        }
        Err(_) => "no error body".into(),
    }
}

fn transport(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken body"
    } else {
        "request failed"
    }
}
