#![doc = include_str!("../../docs/limits.md")]

mod clock;
mod headers;
mod ledger;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod refill;
mod window;

pub use clock::WallClock;
pub use headers::HeaderStyle;
pub use memory::MemoryLimiter;
#[cfg(feature = "redis")]
pub use redis::{Fallback, RedisLimiter};
pub use refill::{InvalidRefill, Refill};

pub(crate) use headers::{most_restrictive, RateLimitHeaders};

use crate::boxed::BoxFuture;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[doc = include_str!("../../docs/rate_limit.md")]
#[derive(Debug, Clone, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "LimitRepr", into = "LimitRepr")]
pub struct RateLimit {
    name: Arc<str>,
    limit: u64,
    window: Duration,
    /// Its `RateLimit-Policy` item, rendered once.
    policy: http::HeaderValue,
}

#[doc = include_str!("../../docs/invalid_limit.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLimit(String);

impl fmt::Display for InvalidLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid rate limit {}: a limit has a name of 1 to 64 characters of [A-Za-z0-9-_.:], 1 to 2^53 \
             requests and a window of 1 ms to 366 days",
            self.0
        )
    }
}

impl std::error::Error for InvalidLimit {}

// By name, size and window: the policy value is made from those. Clones of one limit (the usual
// comparison, on every limited request) share their name, so are equal without reading it.
impl PartialEq for RateLimit {
    fn eq(&self, other: &Self) -> bool {
        self.limit == other.limit
            && self.window == other.window
            && (Arc::ptr_eq(&self.name, &other.name) || self.name == other.name)
    }
}

impl std::hash::Hash for RateLimit {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.name, self.limit, self.window).hash(state);
    }
}

impl RateLimit {
    /// The largest limit: 2^53, the largest count every backend (Redis's Lua numbers are doubles)
    /// holds exactly. A limit that large is, in practice, no limit.
    pub const MAX_LIMIT: u64 = 1 << 53;
    /// The longest window: 366 days. Spending over longer spans is a usage allowance, not a rate.
    pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

    /// `limit` per `window`, named `name` (Oneloop's `rateLimitConfig.id`).
    ///
    /// A limit is its name, size and window together: the same limit listed twice (on the layer and
    /// a route, or as a key's own limit and in its metadata) is one limit, counted once per request;
    /// two limits that share a name but differ in size or window are two limits, each counted once.
    ///
    /// # Errors
    /// [`InvalidLimit`] for a limit of 0 or above [`MAX_LIMIT`](Self::MAX_LIMIT), a window under
    /// 1 ms or above [`MAX_WINDOW`](Self::MAX_WINDOW), or a name that is not 1 to 64 characters of
    /// `[A-Za-z0-9-_.:]`.
    pub fn new(name: &str, limit: u64, window: Duration) -> Result<Self, InvalidLimit> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        let limit_ok = (1..=Self::MAX_LIMIT).contains(&limit);
        let window_ok = (Duration::from_millis(1)..=Self::MAX_WINDOW).contains(&window);
        if !name_ok || !limit_ok || !window_ok {
            return Err(InvalidLimit(format!("{name:?} {limit}/{window:?}")));
        }
        let policy = format!("\"{name}\";q={limit};w={}", retry_after_secs(window));
        let policy = http::HeaderValue::try_from(policy).map_err(|_| InvalidLimit(name.to_owned()))?;
        Ok(Self { name: name.into(), limit, window, policy })
    }

    /// `limit` per minute (the default window).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn per_minute(name: &str, limit: u64) -> Result<Self, InvalidLimit> {
        Self::new(name, limit, Duration::from_secs(60))
    }

    /// A limit written as `100/60s`, `100/s`, `100/min` or `100/h` (as in a key's metadata, see
    /// [`rate_limit_from_metadata`](crate::ApiKeyLayerBuilder::rate_limit_from_metadata)), named `name`.
    ///
    /// ```
    /// use keygate::limit::RateLimit;
    /// let l = RateLimit::parse("key", " 5 / min ").unwrap();
    /// assert_eq!((l.limit(), l.window().as_secs()), (5, 60));
    /// assert_eq!(RateLimit::parse("key", "100/60s").unwrap().window().as_secs(), 60);
    /// assert!(RateLimit::parse("key", "100/fortnight").is_err());
    /// ```
    ///
    /// # Errors
    /// [`InvalidLimit`] for text not in that form, or a limit [`new`](Self::new) refuses.
    pub fn parse(name: &str, text: &str) -> Result<Self, InvalidLimit> {
        let unreadable = || InvalidLimit(format!("{text:?}"));
        let (n, per) = text.trim().split_once('/').ok_or_else(unreadable)?;
        let window = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            // A window past MAX_WINDOW is refused by `new` below.
            secs => Duration::from_secs(secs.strip_suffix('s').and_then(|s| s.parse().ok()).ok_or_else(unreadable)?),
        };
        Self::new(name, n.trim().parse().map_err(|_| unreadable())?, window)
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests (cost units) per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub(crate) fn policy(&self) -> &http::HeaderValue {
        &self.policy
    }
}

/// The serialised form, checked on the way in: `{ name, limit, window_secs }`.
#[derive(serde::Serialize, serde::Deserialize)]
struct LimitRepr {
    #[serde(default = "default_name")]
    name: String,
    limit: u64,
    #[serde(default = "default_window")]
    window_secs: f64,
}

fn default_name() -> String {
    "key".into()
}

fn default_window() -> f64 {
    60.0
}

impl TryFrom<LimitRepr> for RateLimit {
    type Error = InvalidLimit;

    fn try_from(r: LimitRepr) -> Result<Self, InvalidLimit> {
        let window = Duration::try_from_secs_f64(r.window_secs)
            .map_err(|_| InvalidLimit(format!("window {}", r.window_secs)))?;
        Self::new(&r.name, r.limit, window)
    }
}

impl From<RateLimit> for LimitRepr {
    fn from(l: RateLimit) -> Self {
        Self { name: l.name.to_string(), limit: l.limit, window_secs: l.window.as_secs_f64() }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} per {}s", self.name, self.limit, self.window.as_secs_f64())
    }
}

#[doc = include_str!("../../docs/limit_state.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    /// The limit.
    pub limit: RateLimit,
    /// Requests (cost units) left now.
    pub remaining: u64,
    /// Until the limit is back to full.
    pub reset: Duration,
}

#[doc = include_str!("../../docs/denied.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The limit that refused.
    pub limit: RateLimit,
    /// When the request would pass: the next free slot, never earlier.
    pub retry_after: Duration,
}

#[doc = include_str!("../../docs/usage_charge.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageCharge {
    /// What the key may use in total.
    pub allowed: u128,
    /// What its verifier last reported as used (0 when the limiter keeps the whole count).
    pub reported: u128,
    /// What this request takes.
    pub amount: u64,
    /// When the allowance refills (counts from zero again), if it does; the limiter decides the
    /// period by its [`WallClock`].
    pub refill: Option<Refill>,
}

#[doc = include_str!("../../docs/limit_request.md")]
#[derive(Debug, Clone, Copy)]
pub struct LimitRequest<'a> {
    /// The limits and the request's cost against each.
    pub limits: &'a [(RateLimit, u64)],
    /// The usage to take, if the request has any and the key an allowance.
    pub usage: Option<UsageCharge>,
    /// The identity the key belongs to, with the limits and allowance all of its keys share; set
    /// for every request of a key that has identity limits, so its counters stay in one place.
    pub identity: Option<IdentityLimits<'a>>,
}

#[doc = include_str!("../../docs/identity_limits.md")]
#[derive(Debug, Clone, Copy)]
pub struct IdentityLimits<'a> {
    /// The identity (the key's customer; the key's own id, apart from key ids, if it has none).
    pub id: &'a str,
    /// Its rate limits and the request's cost against each. One counter per name and window: a
    /// limit that two keys declare with different sizes is one counter, each held to its own size.
    pub limits: &'a [(RateLimit, u64)],
    /// The usage to take from its allowance, if the request has usage and the identity an allowance.
    pub usage: Option<UsageCharge>,
}

impl LimitRequest<'_> {
    /// Whether the request asks for nothing: no limit, no usage, of the key or its identity.
    pub(crate) fn is_empty(&self) -> bool {
        self.limits.is_empty()
            && self.usage.is_none()
            && self.identity.is_none_or(|i| i.limits.is_empty() && i.usage.is_none())
    }
}

/// Whether two limits of an identity are one counter: the same name and window.
pub(crate) fn same_counter(a: &RateLimit, b: &RateLimit) -> bool {
    a.window == b.window && a.name == b.name
}

/// An identity's distinct counters: limits of one name and window are one counter, held to the
/// smallest size asked, at the highest cost. Borrowed when nothing repeats.
pub(crate) fn distinct_counters(limits: &[(RateLimit, u64)]) -> Cow<'_, [(RateLimit, u64)]> {
    let repeats = |i: usize| limits[..i].iter().any(|(l, _)| same_counter(l, &limits[i].0));
    if !(1..limits.len()).any(repeats) {
        return Cow::Borrowed(limits);
    }
    let mut once: Vec<(RateLimit, u64)> = Vec::with_capacity(limits.len());
    for (limit, cost) in limits {
        match once.iter_mut().find(|(l, _)| same_counter(l, limit)) {
            Some((l, c)) => {
                *c = (*c).max(*cost);
                if limit.limit < l.limit {
                    *l = limit.clone();
                }
            }
            None => once.push((limit.clone(), *cost)),
        }
    }
    Cow::Owned(once)
}

#[doc = include_str!("../../docs/refusal.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// A rate limit is spent.
    Rate(Denied),
    /// The usage would pass the key's allowance.
    Usage,
}

/// The limiter's verdict on one request: the state of each of the key's limits it was asked about
/// (in the order asked, one per entry even where an entry repeats another), then of each of the
/// identity's counters, or the refusal.
pub type LimitVerdict = Result<Vec<LimitState>, Refusal>;

/// The distinct limits of a request: a limit listed twice is one limit, taken at the higher cost.
/// Borrowed, so free, when nothing repeats (the usual case).
pub(crate) fn distinct(limits: &[(RateLimit, u64)]) -> Cow<'_, [(RateLimit, u64)]> {
    let repeats = |i: usize| limits[..i].iter().any(|(l, _)| *l == limits[i].0);
    if !(1..limits.len()).any(repeats) {
        return Cow::Borrowed(limits);
    }
    let mut once: Vec<(RateLimit, u64)> = Vec::with_capacity(limits.len());
    for (limit, cost) in limits {
        match once.iter_mut().find(|(l, _)| l == limit) {
            Some((_, c)) => *c = (*c).max(*cost),
            None => once.push((limit.clone(), *cost)),
        }
    }
    Cow::Owned(once)
}

/// Whole seconds, rounded up and at least 1, so a client that waits that long is never early.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)).max(1)
}

/// The states of the distinct limits, given back one per entry asked.
pub(crate) fn per_entry(
    asked: &[(RateLimit, u64)],
    distinct: &[(RateLimit, u64)],
    states: Vec<LimitState>,
) -> Vec<LimitState> {
    if asked.len() == distinct.len() {
        return states;
    }
    asked.iter().filter_map(|(l, _)| states.iter().find(|s| s.limit == *l).cloned()).collect()
}

#[doc = include_str!("../../docs/limit_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    reason: String,
}

impl LimitError {
    /// A failure, described for the log (never shown to clients).
    pub fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }

    /// What failed.
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limiter failed: {}", self.reason)
    }
}

impl std::error::Error for LimitError {}

#[doc = include_str!("../../docs/limiter.md")]
pub trait Limiter: Send + Sync + 'static {
    /// Decides without I/O if it can; `None` sends the request to [`Limiter::check`].
    fn check_now(&self, key_id: &str, request: &LimitRequest<'_>) -> Option<LimitVerdict> {
        let _ = (key_id, request);
        None
    }

    /// Decides, with whatever I/O it takes.
    fn check(&self, key_id: &str, request: &LimitRequest<'_>) -> BoxFuture<'static, Result<LimitVerdict, LimitError>>;

    /// Counts usage that already happened (added by a handler after the fact): the `amount` of
    /// `request.usage` against the key's allowance and of its identity's usage against the
    /// identity's; its limits are not read. Never refused, never waited for.
    fn charge(&self, key_id: &str, request: &LimitRequest<'_>);
}

impl<L: Limiter + ?Sized> Limiter for Arc<L> {
    fn check_now(&self, key_id: &str, request: &LimitRequest<'_>) -> Option<LimitVerdict> {
        (**self).check_now(key_id, request)
    }

    fn check(&self, key_id: &str, request: &LimitRequest<'_>) -> BoxFuture<'static, Result<LimitVerdict, LimitError>> {
        (**self).check(key_id, request)
    }

    fn charge(&self, key_id: &str, request: &LimitRequest<'_>) {
        (**self).charge(key_id, request)
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn parse_refuses_what_it_cannot_read() {
        for bad in ["", "100", "0/s", "x/s", "100/fortnight", "-1/s", "5/0s", "1/9999999999s"] {
            assert!(RateLimit::parse("key", bad).is_err(), "{bad}");
        }
        assert_eq!(RateLimit::parse("key", "7/h").unwrap().window().as_secs(), 3600);
    }
}
