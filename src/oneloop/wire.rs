//! Oneloop's request and response bodies, field by field as `shared/oneloop/*.openapi.yaml` has them.
//!
//! Refuses what is dangerous, accepts what is merely unusual. Required fields must be present
//! (nullable ones may be `null`), enums known, numbers must fit, credits are digit strings (the spec's
//! `^d+$` is a typo for `^\d+$`), and a `VALID` answer must name its key (`apiKeyId`: limits and logs
//! key on it). Accepted as they are: unknown extra fields, a negative `remaining` (as 0), a past or
//! negative `resetAt` (as now), an empty `apiKeyId` on a refusal.

use crate::scope::Scope;
use crate::verify::{BillingMeter, KeyFacts, KeyStatus, ReportedLimit, Verification};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `VerifyApiKeyRequest`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VerifyBody<'a> {
    pub(crate) key: &'a str,
    pub(crate) requested_scopes: Vec<Scope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) billing: Option<BillingBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit_config: Option<RateLimitBody<'a>>,
}

/// The `billing` of a verify request, and the body of record-usage (`RecordUsageApiKeyRequest`
/// adds `key`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BillingBody<'a> {
    /// A decimal string (`^\d+$`).
    pub(crate) usage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage_name: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct RateLimitBody<'a> {
    pub(crate) id: &'a str,
    pub(crate) limit: u64,
}

/// `RecordUsageApiKeyRequest`.
#[derive(Debug, Serialize)]
pub(crate) struct RecordUsageBody<'a> {
    pub(crate) key: &'a str,
    #[serde(flatten)]
    pub(crate) billing: BillingBody<'a>,
}

/// `VerifyApiKeyResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VerifyResponse {
    api_key_id: String,
    #[serde(deserialize_with = "nullable")]
    expires_at: Option<Timestamp>,
    #[allow(dead_code)] // required by the spec, so checked; the gate decides scopes itself
    requested_scopes: Vec<Scope>,
    status: KeyStatus,
    #[serde(default)]
    rate_limit: Option<WireRateLimit>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    billing: Option<WireMeter>,
    #[serde(deserialize_with = "nullable")]
    external_meter_id: Option<String>,
    #[serde(deserialize_with = "nullable")]
    customer_id: Option<String>,
    scopes: Vec<Scope>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireRateLimit {
    remaining: i64,
    /// Any integer: the spec sets no minimum, and a reset in the past means "now".
    reset_at: i64,
}

/// `CustomerBillingMeter`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeter {
    id: String,
    total_credits: Credits,
    used_credits: Credits,
    allow_overages: bool,
    #[serde(deserialize_with = "nullable")]
    spend_cap: Option<Credits>,
    #[allow(dead_code)]
    created_at: String,
    #[allow(dead_code)]
    updated_at: String,
}

/// `ErrorResponse`.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ErrorDetail {
    pub(crate) code: f64,
    pub(crate) message: String,
}

/// A required field that may be `null`: unlike a plain `Option`, a missing one is an error.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// An instant given as a positive integer of Unix seconds or, from 10^11 up, milliseconds: the
/// spec does not say which, and 10^11 seconds is in the year 5138.
#[derive(Debug, Clone, Copy)]
struct Timestamp(SystemTime);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 {
            return Err(de::Error::custom("a timestamp must be positive"));
        }
        Ok(Timestamp(instant(n)))
    }
}

/// Unix seconds, or milliseconds from 10^11 up; saturating at the far future.
fn instant(n: u64) -> SystemTime {
    let since_epoch = if n >= 100_000_000_000 { Duration::from_millis(n) } else { Duration::from_secs(n) };
    UNIX_EPOCH.checked_add(since_epoch).unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 64))
}

/// A credit amount: a decimal string of digits, parsed exactly; too large is an error, never a wrap.
#[derive(Debug, Clone, Copy)]
struct Credits(u128);

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(de::Error::custom("a credit amount is a string of digits"));
        }
        s.parse().map(Credits).map_err(|_| de::Error::custom("credit amount too large"))
    }
}

impl VerifyResponse {
    /// The answer, or why it cannot be trusted.
    pub(crate) fn into_verification(self) -> Result<Verification, String> {
        if self.status == KeyStatus::Invalid {
            return Ok(Verification::invalid());
        }
        if self.api_key_id.is_empty() {
            // A refusal needs no facts; a pass does (its limits are counted by key id).
            if self.status == KeyStatus::Valid {
                return Err("a VALID answer came back without an apiKeyId".into());
            }
            let mut refused = Verification::invalid();
            refused.status = self.status;
            return Ok(refused);
        }
        let facts = KeyFacts {
            id: self.api_key_id,
            name: None,
            scopes: self.scopes,
            expires_at: self.expires_at.map(|t| t.0),
            metadata: self.metadata.into_iter().collect(),
            customer_id: self.customer_id,
            billing: self.billing.map(|m| {
                Box::new(BillingMeter {
                    id: m.id,
                    total_credits: m.total_credits.0,
                    used_credits: m.used_credits.0,
                    allow_overages: m.allow_overages,
                    spend_cap: m.spend_cap.map(|c| c.0),
                })
            }),
            external_meter_id: self.external_meter_id,
            ..KeyFacts::default()
        };
        let mut verification = Verification::new(self.status, Arc::new(facts));
        verification.rate_limit = self.rate_limit.map(|r| ReportedLimit {
            remaining: r.remaining.max(0) as u64,
            // A reset in the past (or before 1970) is now.
            reset_at: u64::try_from(r.reset_at).ok().filter(|n| *n > 0).map_or(UNIX_EPOCH, instant),
        });
        Ok(verification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full() -> serde_json::Value {
        json!({
            "apiKeyId": "key_1", "expiresAt": null, "requestedScopes": [], "status": "VALID",
            "billing": null, "externalMeterId": null, "customerId": null,
            "scopes": [{"representation": "items", "create": false, "read": true, "update": false, "del": false}],
        })
    }

    fn parse(v: serde_json::Value) -> Result<Verification, String> {
        serde_json::from_value::<VerifyResponse>(v).map_err(|e| e.to_string())?.into_verification()
    }

    #[test]
    fn nullable_fields_must_be_present() {
        assert!(parse(full()).is_ok());
        for field in ["expiresAt", "billing", "externalMeterId", "customerId", "scopes", "requestedScopes", "status"] {
            let mut v = full();
            v.as_object_mut().unwrap().remove(field);
            assert!(parse(v).is_err(), "{field} missing must be refused");
        }
    }

    #[test]
    fn seconds_and_milliseconds() {
        for (raw, secs) in [(1_800_000_000u64, 1_800_000_000u64), (1_800_000_000_000, 1_800_000_000)] {
            let mut v = full();
            v["expiresAt"] = raw.into();
            v["rateLimit"] = json!({"remaining": 3, "resetAt": raw});
            let verification = parse(v).unwrap();
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(verification.facts.unwrap().expires_at, Some(at));
            assert_eq!(verification.rate_limit.unwrap().reset_at, at);
            let mut v = full();
            v["rateLimit"] = json!({"remaining": -3, "resetAt": -(raw as i64)});
            let past = parse(v).unwrap().rate_limit.unwrap();
            assert_eq!((past.remaining, past.reset_at), (0, UNIX_EPOCH), "negative: a past reset, now");
        }
        for bad in [json!(0), json!(-5), json!(1.5), json!("1800000000"), json!(1e30)] {
            let mut v = full();
            v["expiresAt"] = bad.clone();
            assert!(parse(v).is_err(), "{bad}");
        }
    }

    #[test]
    fn credits_are_exact_or_refused() {
        let mut v = full();
        let meter = |total: &str| {
            json!({"id": "m", "totalCredits": total, "usedCredits": "7", "allowOverages": false,
                   "spendCap": null, "createdAt": "x", "updatedAt": "y"})
        };
        v["billing"] = meter("340282366920938463463374607431768211455");
        assert_eq!(parse(v.clone()).unwrap().facts.unwrap().billing.as_ref().unwrap().total_credits, u128::MAX);
        for bad in ["340282366920938463463374607431768211456", "-1", "1.5", "", "1e3", " 1"] {
            v["billing"] = meter(bad);
            assert!(parse(v.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostile_shapes_are_errors() {
        let mut v = full();
        v["status"] = "SUPER_VALID".into();
        assert!(parse(v).is_err());
        let mut v = full();
        v["scopes"] = json!([{"representation": "items", "read": true}]);
        assert!(parse(v).is_err());
        let mut v = full();
        v["metadata"] = json!({"plan": 5});
        assert!(parse(v).is_err());
        let mut v = full();
        v["apiKeyId"] = "".into();
        assert!(parse(v).is_err());
        let mut v = full();
        v["surprise"] = json!({"nested": [1, 2, 3]});
        assert!(parse(v).is_ok(), "unknown fields are accepted");
    }
}
