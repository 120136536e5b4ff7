//! Why a request was refused ([`Rejection`]) and how that becomes a response ([`Responder`]).
//!
//! The default response is `application/problem+json` (RFC 9457) with one stable `type` per
//! cause, the RFC 6750 `WWW-Authenticate` challenge on `400`/`401`/`403`, and `Retry-After` on
//! `429`/`503`. Unknown, expired, disabled and deleted keys share one body, so a client cannot
//! tell a revoked key from one that never existed.

use crate::facts::KeyStatus;
use crate::limit::{retry_after_secs, RateLimit};
use crate::scope::RequiredScope;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

#[doc = include_str!("../docs/rejections.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// No key in any configured source. `401`.
    MissingKey,
    /// More than one key: two headers, two sources, or a folded header value. `400`.
    AmbiguousKey,
    /// Empty, too long, or not visible ASCII. `401 invalid_token`.
    MalformedKey,
    /// A path no server reads the same way (dot segments, encoded slashes, bad escapes). `400`.
    InvalidPath,
    /// Unknown, expired, disabled or deleted; the status is for logs, never for the client. `401`.
    InvalidKey(KeyStatus),
    /// The key lacks the route's scope. `403 insufficient_scope`.
    InsufficientScope(RequiredScope),
    /// The route or method has no scope and the table is strict. `403`.
    UnmappedRoute,
    /// A rate limit is spent. `429` with `Retry-After`.
    RateLimited {
        /// When the next request can pass.
        retry_after: Duration,
        /// The limit that refused, when known (the verifier's own limits have no name here).
        limit: Option<RateLimit>,
    },
    /// The key's usage (credit) allowance would be exceeded. `429`, or `402` when the layer is
    /// configured so.
    UsageLimited {
        /// Answer `402 Payment Required` instead of `429`.
        payment_required: bool,
    },
    /// No decision could be made (verifier unreachable, no safe cached answer). `503`.
    Unavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// A handler or `require(...)` asked for the verified key on a route no
    /// [`ApiKeyLayer`](crate::ApiKeyLayer) covers: a wiring error, logged. `500`, as axum answers a
    /// missing extension.
    NotGated,
}

/// The fixed parts of each cause's response.
struct Cause {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: &'static str,
    /// The RFC 6750 challenge; `None` where it does not apply.
    challenge: Option<&'static str>,
}

impl Rejection {
    fn cause(&self) -> Cause {
        use StatusCode as S;
        let c = |status, slug, title, detail, challenge| Cause { status, slug, title, detail, challenge };
        match self {
            Self::MissingKey => c(
                S::UNAUTHORIZED,
                "missing-key",
                "API key required",
                "Send an API key in the Authorization header as a Bearer token or in X-API-Key.",
                Some("Bearer"),
            ),
            Self::AmbiguousKey => c(
                S::BAD_REQUEST,
                "ambiguous-key",
                "More than one API key",
                "Send exactly one API key, in one header.",
                Some("Bearer error=\"invalid_request\""),
            ),
            Self::MalformedKey => c(
                S::UNAUTHORIZED,
                "malformed-key",
                "Malformed API key",
                "An API key is a single token of visible ASCII characters, within the accepted length.",
                Some("Bearer error=\"invalid_token\""),
            ),
            Self::InvalidPath => c(
                S::BAD_REQUEST,
                "invalid-path",
                "Ambiguous request path",
                "The path has dot segments, encoded separators or invalid escapes.",
                None,
            ),
            Self::InvalidKey(_) => c(
                S::UNAUTHORIZED,
                "invalid-key",
                "Invalid API key",
                "The API key is not valid.",
                Some("Bearer error=\"invalid_token\""),
            ),
            Self::InsufficientScope(_) => c(
                S::FORBIDDEN,
                "insufficient-scope",
                "Insufficient scope",
                "The API key does not grant the scope this request needs.",
                None,
            ),
            Self::UnmappedRoute => c(
                S::FORBIDDEN,
                "unmapped-route",
                "Route not open to API keys",
                "No scope is defined for this route and method.",
                Some("Bearer error=\"insufficient_scope\""),
            ),
            Self::RateLimited { .. } => c(
                S::TOO_MANY_REQUESTS,
                "rate-limited",
                "Rate limit exceeded",
                "Too many requests for this API key; retry after the time in Retry-After.",
                None,
            ),
            Self::UsageLimited { payment_required } => c(
                if *payment_required { S::PAYMENT_REQUIRED } else { S::TOO_MANY_REQUESTS },
                "usage-limited",
                "Usage limit exceeded",
                "This API key has used all of its usage allowance.",
                None,
            ),
            Self::NotGated => c(
                S::INTERNAL_SERVER_ERROR,
                "not-gated",
                "Server misconfigured",
                "This route is not behind the API key layer.",
                None,
            ),
            Self::Unavailable { .. } => c(
                S::SERVICE_UNAVAILABLE,
                "unavailable",
                "Key verification unavailable",
                "The API key could not be verified right now; retry after the time in Retry-After.",
                None,
            ),
        }
    }

    /// How many causes there are: [`ordinal`](Self::ordinal) is below it.
    pub(crate) const CAUSES: usize = 11;

    /// The cause's place in the list of causes, for tables indexed by cause.
    pub(crate) fn ordinal(&self) -> usize {
        match self {
            Self::MissingKey => 0,
            Self::AmbiguousKey => 1,
            Self::MalformedKey => 2,
            Self::InvalidPath => 3,
            Self::InvalidKey(_) => 4,
            Self::InsufficientScope(_) => 5,
            Self::UnmappedRoute => 6,
            Self::RateLimited { .. } => 7,
            Self::UsageLimited { .. } => 8,
            Self::Unavailable { .. } => 9,
            Self::NotGated => 10,
        }
    }

    /// The short name of the cause, as in its problem type (`missing-key`, `rate-limited`, …).
    pub(crate) fn slug(&self) -> &'static str {
        self.cause().slug
    }

    /// The HTTP status of the default response.
    pub fn status(&self) -> StatusCode {
        self.cause().status
    }

    /// The stable problem type URI of this cause, such as `urn:keygate:problem:missing-key`.
    pub fn problem_type(&self) -> String {
        format!("urn:keygate:problem:{}", self.cause().slug)
    }

    /// The default response: problem+json with the standard headers.
    ///
    /// ```
    /// use keygate::Rejection;
    /// let res = Rejection::MissingKey.to_response();
    /// assert_eq!(res.status(), 401);
    /// assert_eq!(res.headers()["www-authenticate"], "Bearer");
    /// assert_eq!(res.headers()["content-type"], "application/problem+json");
    /// ```
    pub fn to_response(&self) -> Response<Bytes> {
        let cause = self.cause();
        let render = || {
            serde_json::json!({
                "type": self.problem_type(),
                "title": cause.title,
                "status": cause.status.as_u16(),
                "detail": cause.detail,
            })
        };
        let mut res = Response::new(Bytes::new());
        *res.status_mut() = cause.status;
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(challenge) = cause.challenge {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        // Bodies of fixed causes are rendered once: refusing a bad key must stay cheap.
        // Eight short strings, leaked once, so each response shares them without a count.
        static FIXED: [OnceLock<&'static str>; 9] = [const { OnceLock::new() }; 9];
        let fixed = |i: usize| Bytes::from_static(FIXED[i].get_or_init(|| render().to_string().leak()).as_bytes());
        let body = match self {
            Self::MissingKey => fixed(0),
            Self::AmbiguousKey => fixed(1),
            Self::MalformedKey => fixed(2),
            Self::InvalidPath => fixed(3),
            Self::InvalidKey(_) => fixed(4),
            Self::UnmappedRoute => fixed(5),
            Self::UsageLimited { payment_required: false } => fixed(6),
            Self::UsageLimited { payment_required: true } => fixed(7),
            Self::NotGated => fixed(8),
            _ => Bytes::new(),
        };
        if !body.is_empty() {
            *res.body_mut() = body;
            return res;
        }
        let mut body = render();
        match self {
            Self::InsufficientScope(required) => {
                body["required_scope"] = required.to_string().into();
                // RFC 6750 §3: the scope attribute names what would have been enough.
                let challenge =
                    format!("Bearer error=\"insufficient_scope\", scope=\"{}\"", quoted(&required.to_string()));
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    headers.insert(WWW_AUTHENTICATE, v);
                }
            }
            Self::RateLimited { retry_after, .. } | Self::Unavailable { retry_after } => {
                let secs = retry_after_secs(*retry_after);
                body["retry_after"] = secs.into();
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        *res.body_mut() = Bytes::from(body.to_string());
        res
    }
}

fn quoted(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cause = self.cause();
        write!(f, "{} ({})", cause.title, cause.status.as_u16())?;
        match self {
            Self::InsufficientScope(required) => write!(f, ": needs {required}"),
            Self::InvalidKey(status) => write!(f, ": {status:?}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Rejection {}

#[doc = include_str!("../docs/responder.md")]
pub trait Responder: Send + Sync + 'static {
    /// The response for `rejection`.
    fn respond(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> Responder for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
{
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

#[doc = include_str!("../docs/problem_json.md")]
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

impl Responder for ProblemJson {
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        rejection.to_response()
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Rejection {
    fn into_response(self) -> axum::response::Response {
        self.to_response().map(axum::body::Body::from)
    }
}
