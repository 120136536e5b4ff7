//! Rate-limit response headers.
//!
//! IETF form (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "name";q=500;w=60` and
//! `RateLimit: "name";r=499;t=1` for the most restrictive limit. Legacy form, on request:
//! `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds).

use super::retry_after_secs;
use super::LimitState;
use http::header::{HeaderMap, HeaderName, HeaderValue};

// Constants, so the names are checked at compile time rather than on every response.
const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const CURRENT: HeaderName = HeaderName::from_static("ratelimit");
const LEGACY_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const LEGACY_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const LEGACY_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

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

/// The header values of one response, made on the request path and set on the response. Small
/// (the legacy trio, asked for rarely, is boxed): it travels inside every verdict.
pub(crate) struct RateLimitHeaders {
    policy: HeaderValue,
    current: HeaderValue,
    legacy: Option<Box<[HeaderValue; 3]>>,
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
        // `"name";r=remaining;t=reset` on the stack (names are at most 64 token characters, numbers
        // at most 20 digits each), built by hand: `write!` costs several times more.
        let mut buf = Stack::default();
        buf.push(b"\"");
        buf.push(top.limit.name().as_bytes());
        buf.push(b"\";r=");
        buf.push_decimal(top.remaining);
        buf.push(b";t=");
        buf.push_decimal(reset);
        let current = HeaderValue::from_bytes(buf.bytes()?).ok()?;
        let legacy = (style == HeaderStyle::IetfAndLegacy)
            .then(|| Box::new([top.limit.limit().into(), top.remaining.into(), HeaderValue::from(reset)]));
        Some(Self { policy, current, legacy })
    }

    #[inline]
    pub(crate) fn insert_into(self, headers: &mut HeaderMap) {
        headers.insert(POLICY, self.policy);
        headers.insert(CURRENT, self.current);
        if let Some(legacy) = self.legacy {
            let [limit, remaining, reset] = *legacy;
            headers.insert(LEGACY_LIMIT, limit);
            headers.insert(LEGACY_REMAINING, remaining);
            headers.insert(LEGACY_RESET, reset);
        }
    }
}

/// A header value being built on the stack; `None` from [`bytes`](Self::bytes) if it overflowed.
struct Stack {
    buf: [u8; 128],
    len: usize,
    overflowed: bool,
}

impl Default for Stack {
    fn default() -> Self {
        Self { buf: [0; 128], len: 0, overflowed: false }
    }
}

impl Stack {
    fn push(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflowed = true,
        }
    }

    fn push_decimal(&mut self, mut n: u64) {
        // Two digits per division, from a table: half the divisions of one digit at a time.
        const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
            2021222324252627282930313233343536373839\
            4041424344454647484950515253545556575859\
            6061626364656667686970717273747576777879\
            8081828384858687888990919293949596979899";
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[n as usize * 2..n as usize * 2 + 2]);
        } else {
            i -= 1;
            digits[i] = b'0' + n as u8;
        }
        self.push(&digits[i..]);
    }

    fn bytes(&self) -> Option<&[u8]> {
        (!self.overflowed).then(|| &self.buf[..self.len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::RateLimit;
    use std::time::Duration;

    fn current(name: &str, remaining: u64, reset: Duration, window: Duration) -> Option<String> {
        let limit = RateLimit::new(name, RateLimit::MAX_LIMIT, window).unwrap();
        let headers = RateLimitHeaders::new(HeaderStyle::Ietf, &[LimitState { limit, remaining, reset }])?;
        Some(headers.current.to_str().unwrap().to_owned())
    }

    #[test]
    fn the_current_value_at_zero_the_maximum_and_the_longest_name() {
        let hour = Duration::from_secs(3600);
        assert_eq!(current("a", 0, Duration::ZERO, hour).as_deref(), Some("\"a\";r=0;t=1"));
        let max = RateLimit::MAX_LIMIT;
        let long = "n".repeat(64);
        let expected = format!("\"{long}\";r={max};t=3600");
        assert_eq!(current(&long, max, hour, hour), Some(expected));
        // The widest numbers fit too: an upstream's `remaining` of u64::MAX, the longest window.
        let (year, secs) = (RateLimit::MAX_WINDOW, RateLimit::MAX_WINDOW.as_secs());
        let expected = format!("\"{long}\";r={};t={secs}", u64::MAX);
        assert_eq!(current(&long, u64::MAX, year, year), Some(expected));
    }

    #[test]
    fn decimals_match_std_formatting() {
        let powers = (0..20).map(|e| 10_u64.pow(e)).flat_map(|p| [p - 1, p, p + 1]);
        // And 100 000 numbers of every width (a multiplicative sequence, shifted to each width).
        let spread = (1..100_000_u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 64));
        for n in (0..=1_000).chain(powers).chain([u64::MAX, u64::MAX - 1]).chain(spread) {
            let mut stack = Stack::default();
            stack.push_decimal(n);
            assert_eq!(stack.bytes(), Some(n.to_string().as_bytes()), "{n}");
        }
    }
}
