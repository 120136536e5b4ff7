//! Rate-limit response headers.
//!
//! IETF form (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "name";q=500;w=60` and
//! `RateLimit: "name";r=499;t=1` for the most restrictive limit. Legacy form, on request:
//! `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds).

use super::LimitState;
use crate::reject::retry_after_secs;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Which rate-limit headers gated responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderStyle {
    /// `RateLimit` and `RateLimit-Policy` (the default).
    #[default]
    Ietf,
    /// Those and `X-RateLimit-Limit/Remaining/Reset`.
    IetfAndLegacy,
    /// None.
    Off,
}

/// The limit closest to refusing: fewest requests left, then the longest reset.
pub(crate) fn most_restrictive(states: &[LimitState]) -> Option<&LimitState> {
    states.iter().min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset.cmp(&a.reset)))
}

pub(crate) fn apply(headers: &mut HeaderMap, style: HeaderStyle, states: &[LimitState]) {
    if style == HeaderStyle::Off {
        return;
    }
    let Some(top) = most_restrictive(states) else { return };
    let reset = retry_after_secs(top.reset).min(top.limit.window().as_secs().max(1));
    let name = top.limit.name();
    let policies: Vec<String> = states
        .iter()
        .map(|s| format!("\"{}\";q={};w={}", s.limit.name(), s.limit.limit(), retry_after_secs(s.limit.window())))
        .collect();
    // Names are checked to be token characters, so these values are always valid.
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    put("ratelimit-policy", policies.join(", "));
    put("ratelimit", format!("\"{name}\";r={};t={reset}", top.remaining));
    if style == HeaderStyle::IetfAndLegacy {
        put("x-ratelimit-limit", top.limit.limit().to_string());
        put("x-ratelimit-remaining", top.remaining.to_string());
        put("x-ratelimit-reset", reset.to_string());
    }
}
