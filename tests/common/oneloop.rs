//! A loopback Oneloop that follows `shared/oneloop/*.openapi.yaml`: it checks every request it
//! gets and every response it sends against the spec, counts calls, and misbehaves on demand.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) const TOKEN: &str = "ws_test_token";

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    Normal,
    Status500,
    /// `503`: the service says it did not take the request.
    Status503,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with JSON of the wrong types.
    WrongTypes,
    /// 200 with a 10 MB body.
    Huge,
    /// Answers `401`, as for a wrong workspace token.
    Unauthorized,
    /// Never answers.
    Hang,
}

#[derive(Default)]
pub(crate) struct Fake {
    /// Answers by raw key: the fields of a `VerifyApiKeyResponse` other than `requestedScopes`.
    pub keys: Mutex<HashMap<String, Value>>,
    pub verify_calls: AtomicUsize,
    pub usage_calls: AtomicUsize,
    /// Usage recorded, by (key, usage name).
    pub usage: Mutex<HashMap<(String, Option<String>), u128>>,
    pub behaviour: Mutex<Option<Behaviour>>,
    pub delay: Mutex<Duration>,
    pub violations: Mutex<Vec<String>>,
    pub last_verify: Mutex<Option<Value>>,
    /// Per-request metering as Oneloop does it: `rateLimitConfig` counted per (key, id) in the
    /// current window (until `end_rate_windows`), `billing.usage` added to `usage` on a VALID answer.
    pub rate_counts: Mutex<HashMap<(String, String), u64>>,
    /// Raw 200 bodies by key, sent as they are (no spec check): one odd key among good ones.
    pub raw: Mutex<HashMap<String, String>>,
    /// Where verify answers with a redirect (`307`) instead, if set.
    pub redirect_to: Mutex<Option<String>>,
}

impl Fake {
    pub(crate) fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = Some(behaviour);
    }

    pub(crate) fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    pub(crate) fn calls(&self) -> usize {
        self.verify_calls.load(Ordering::SeqCst)
    }

    /// Registers `key` with this answer (see [`answer`]).
    pub(crate) fn add(&self, key: &str, answer: Value) {
        self.keys.lock().unwrap().insert(key.to_owned(), answer);
    }

    /// Changes one field of `key`'s answer.
    pub(crate) fn patch(&self, key: &str, field: &str, value: Value) {
        self.keys.lock().unwrap().get_mut(key).unwrap()[field] = value;
    }

    /// Oneloop's rate-limit windows end: every `rateLimitConfig` counter starts again.
    pub(crate) fn end_rate_windows(&self) {
        self.rate_counts.lock().unwrap().clear();
    }

    pub(crate) fn assert_no_violations(&self) {
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "spec violations: {v:?}");
    }
}

/// A `VALID` answer for key `id` with these scopes (`"items:read"` form), every nullable field null.
pub(crate) fn answer(id: &str, scopes: &[&str]) -> Value {
    let scopes: Vec<Value> = scopes
        .iter()
        .map(|s| {
            let scope: keygate::Scope = s.parse().unwrap();
            serde_json::to_value(scope).unwrap()
        })
        .collect();
    json!({
        "apiKeyId": id, "expiresAt": null, "status": "VALID", "billing": null,
        "externalMeterId": null, "customerId": null, "scopes": scopes,
    })
}

pub(crate) async fn start() -> (SocketAddr, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/api/v1/api-key/verify", post(verify))
        .route("/api/v1/api-key/record-usage", post(record_usage))
        .with_state(fake.clone());
    (super::serve_axum(app).await, fake)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": { "code": status.as_u16(), "message": message } }))).into_response()
}

/// Auth and JSON checks shared by both endpoints; `Err` is the response to send.
fn admit(fake: &Fake, headers: &HeaderMap, body: &[u8]) -> Result<Value, Box<Response>> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return Err(Box::new(error(StatusCode::UNAUTHORIZED, "invalid workspace token")));
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        fake.violations.lock().unwrap().push("content-type is not application/json".into());
    }
    serde_json::from_slice(body).map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, "body is not JSON")))
}

fn violation(fake: &Fake, what: String) -> Response {
    let response = error(StatusCode::BAD_REQUEST, &what);
    fake.violations.lock().unwrap().push(what);
    response
}

async fn misbehave(fake: &Fake) -> Option<Response> {
    let delay = *fake.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let behaviour = fake.behaviour.lock().unwrap().unwrap_or(Behaviour::Normal);
    Some(match behaviour {
        Behaviour::Normal => return None,
        Behaviour::Status500 => error(StatusCode::INTERNAL_SERVER_ERROR, "boom"),
        Behaviour::Status503 => error(StatusCode::SERVICE_UNAVAILABLE, "down for maintenance"),
        Behaviour::Garbage => (StatusCode::OK, "<html>definitely not json").into_response(),
        Behaviour::WrongTypes => Json(json!({"apiKeyId": 5, "status": ["VALID"], "scopes": "all"})).into_response(),
        Behaviour::Huge => (StatusCode::OK, vec![b' '; 10 * 1024 * 1024]).into_response(),
        Behaviour::Unauthorized => error(StatusCode::UNAUTHORIZED, "invalid workspace token"),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!()
        }
    })
}

async fn verify(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    fake.verify_calls.fetch_add(1, Ordering::SeqCst);
    let req = match admit(&fake, &headers, &body) {
        Ok(req) => req,
        Err(res) => return *res,
    };
    if let Err(what) = check_verify_request(&req) {
        return violation(&fake, format!("verify request: {what}: {req}"));
    }
    *fake.last_verify.lock().unwrap() = Some(req.clone());
    if let Some(res) = misbehave(&fake).await {
        return res;
    }
    let key = req["key"].as_str().unwrap();
    if let Some(location) = fake.redirect_to.lock().unwrap().clone() {
        return (StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, location)]).into_response();
    }
    if let Some(raw) = fake.raw.lock().unwrap().get(key).cloned() {
        return (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], raw).into_response();
    }
    let mut res = fake.keys.lock().unwrap().get(key).cloned().unwrap_or_else(|| {
        json!({"apiKeyId": "", "expiresAt": null, "status": "INVALID", "billing": null,
               "externalMeterId": null, "customerId": null, "scopes": []})
    });
    res["requestedScopes"] = req["requestedScopes"].clone();
    if res["status"] == "VALID" {
        if let Some(rl) = req.get("rateLimitConfig") {
            let (id, limit) = (rl["id"].as_str().unwrap().to_owned(), rl["limit"].as_u64().unwrap());
            let mut counts = fake.rate_counts.lock().unwrap();
            let used = counts.entry((key.to_owned(), id)).or_default();
            let reset_at = millis_from_now(Duration::from_secs(60));
            if *used >= limit {
                res["status"] = "RATE_LIMITED".into();
                res["rateLimit"] = json!({"remaining": 0, "resetAt": reset_at});
            } else {
                *used += 1;
                res["rateLimit"] = json!({"remaining": limit - *used, "resetAt": reset_at});
            }
        }
    }
    if res["status"] == "VALID" {
        if let Some(billing) = req.get("billing") {
            let usage: u128 = billing.get("usage").and_then(Value::as_str).map_or(0, |u| u.parse().unwrap());
            let name = billing.get("usageName").and_then(Value::as_str).map(str::to_owned);
            *fake.usage.lock().unwrap().entry((key.to_owned(), name)).or_default() += usage;
        }
    }
    if let Err(what) = check_verify_response(&res) {
        return violation(&fake, format!("the fake's own response: {what}: {res}"));
    }
    Json(res).into_response()
}

async fn record_usage(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    fake.usage_calls.fetch_add(1, Ordering::SeqCst);
    let req = match admit(&fake, &headers, &body) {
        Ok(req) => req,
        Err(res) => return *res,
    };
    let Some(key) = req.get("key").and_then(Value::as_str) else {
        return violation(&fake, format!("record-usage request without a string key: {req}"));
    };
    let usage = match req.get("usage") {
        None => 0,
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().unwrap(),
        Some(other) => return violation(&fake, format!("usage must match ^\\d+$: {other}")),
    };
    let name = match req.get("usageName") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return violation(&fake, format!("usageName must be a string: {other}")),
    };
    if let Some(res) = misbehave(&fake).await {
        return res;
    }
    *fake.usage.lock().unwrap().entry((key.to_owned(), name)).or_default() += usage;
    Json(json!({})).into_response()
}

fn is_scope(v: &Value) -> bool {
    let bools = ["create", "read", "update", "del"].iter().all(|f| v.get(*f).is_some_and(Value::is_boolean));
    let id_ok = v.get("id").is_none_or(Value::is_string);
    bools && id_ok && v.get("representation").is_some_and(Value::is_string)
}

/// `VerifyApiKeyRequest`.
pub(crate) fn check_verify_request(req: &Value) -> Result<(), String> {
    req.get("key").filter(|k| k.is_string()).ok_or("key must be a string")?;
    let scopes = req.get("requestedScopes").and_then(Value::as_array).ok_or("requestedScopes must be an array")?;
    if !scopes.iter().all(is_scope) {
        return Err("requestedScopes items must be ApiKeyScope".into());
    }
    if req.get("route").is_some_and(|r| !r.is_string()) {
        return Err("route must be a string".into());
    }
    if let Some(billing) = req.get("billing") {
        let usage_ok = billing
            .get("usage")
            .is_none_or(|u| u.as_str().is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())));
        if !billing.is_object() || !usage_ok || billing.get("usageName").is_some_and(|n| !n.is_string()) {
            return Err("billing must be {usage: ^\\d+$, usageName: string}".into());
        }
    }
    if let Some(rl) = req.get("rateLimitConfig") {
        let limit_ok = rl.get("limit").and_then(Value::as_u64).is_some_and(|l| l > 0);
        if !rl.get("id").is_some_and(Value::is_string) || !limit_ok {
            return Err("rateLimitConfig must be {id: string, limit: integer > 0}".into());
        }
    }
    Ok(())
}

/// `VerifyApiKeyResponse`, nullable fields included.
pub(crate) fn check_verify_response(res: &Value) -> Result<(), String> {
    let has = |f: &str| res.get(f).is_some();
    for field in
        ["apiKeyId", "expiresAt", "requestedScopes", "status", "billing", "externalMeterId", "customerId", "scopes"]
    {
        if !has(field) {
            return Err(format!("required field {field} is missing"));
        }
    }
    let statuses =
        ["VALID", "EXPIRED", "DISABLED", "DELETED", "RATE_LIMITED", "USAGE_LIMITED", "INVALID_SCOPES", "INVALID"];
    let ok = res["apiKeyId"].is_string()
        && (res["expiresAt"].is_null() || res["expiresAt"].as_u64().is_some_and(|n| n > 0))
        && res["requestedScopes"].as_array().is_some_and(|a| a.iter().all(is_scope))
        && res["scopes"].as_array().is_some_and(|a| a.iter().all(is_scope))
        && res["status"].as_str().is_some_and(|s| statuses.contains(&s))
        && (res["externalMeterId"].is_null() || res["externalMeterId"].is_string())
        && (res["customerId"].is_null() || res["customerId"].is_string())
        && res.get("metadata").is_none_or(|m| m.as_object().is_some_and(|o| o.values().all(Value::is_string)))
        && res.get("rateLimit").is_none_or(|r| r["remaining"].is_i64() && r["resetAt"].is_i64());
    let billing = &res["billing"];
    let digits = |v: &Value| v.as_str().is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()));
    let billing_ok = billing.is_null()
        || (billing["id"].is_string()
            && digits(&billing["totalCredits"])
            && digits(&billing["usedCredits"])
            && billing["allowOverages"].is_boolean()
            && (billing["spendCap"].is_null() || digits(&billing["spendCap"]))
            && billing["createdAt"].is_string()
            && billing["updatedAt"].is_string());
    if ok && billing_ok {
        Ok(())
    } else {
        Err("a field has the wrong type".into())
    }
}

/// Milliseconds since the epoch, `d` from now, as Oneloop writes timestamps.
pub(crate) fn millis_from_now(d: Duration) -> u64 {
    (std::time::SystemTime::now() + d).duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
