//! Rate-limit response headers.
//!
//! IETF form (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "name";q=500;w=60` and
//! `RateLimit: "name";r=499;t=1` for the most restrictive limit. Legacy form, on request:
//! `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds).

use super::retry_after_secs;
use super::LimitState;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use std::io::Write;

#[doc = include_str!("../../docs/header_style.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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

/// The header values of one response, made on the request path and set on the response.
pub(crate) struct RateLimitHeaders {
    policy: HeaderValue,
    current: HeaderValue,
    legacy: Option<[HeaderValue; 3]>,
}

impl RateLimitHeaders {
    pub(crate) fn new(style: HeaderStyle, states: &[LimitState]) -> Option<Self> {
        let top = most_restrictive(states).filter(|_| style != HeaderStyle::Off)?;
        let reset = retry_after_secs(top.reset).min(top.limit.window().as_secs().max(1));
        // One limit (the usual case) reuses its policy value, rendered when the limit was made.
        let policy = match states {
            [one] => one.limit.policy().clone(),
            many => {
                let joined: Vec<&[u8]> = many.iter().map(|s| s.limit.policy().as_bytes()).collect();
                HeaderValue::from_bytes(&joined.join(&b", "[..])).ok()?
            }
        };
        // Names are token characters and numbers are digits: at most 64 + 45 bytes, on the stack.
        let mut buf = [0u8; 128];
        let mut w = &mut buf[..];
        write!(w, "\"{}\";r={};t={reset}", top.limit.name(), top.remaining).ok()?;
        let len = 128 - w.len();
        let current = HeaderValue::from_bytes(&buf[..len]).ok()?;
        let legacy = (style == HeaderStyle::IetfAndLegacy)
            .then(|| [top.limit.limit().into(), top.remaining.into(), HeaderValue::from(reset)]);
        Some(Self { policy, current, legacy })
    }

    #[inline]
    pub(crate) fn insert_into(self, headers: &mut HeaderMap) {
        headers.insert(HeaderName::from_static("ratelimit-policy"), self.policy);
        headers.insert(HeaderName::from_static("ratelimit"), self.current);
        if let Some([limit, remaining, reset]) = self.legacy {
            headers.insert(HeaderName::from_static("x-ratelimit-limit"), limit);
            headers.insert(HeaderName::from_static("x-ratelimit-remaining"), remaining);
            headers.insert(HeaderName::from_static("x-ratelimit-reset"), reset);
        }
    }
}
