//! Where a key comes from ([`KeySource`]) and the rules that accept or reject it.
//!
//! Rules, applied before any cache or verifier is asked:
//! - at most one key per request: two `Authorization` headers, two key headers, a key header whose
//!   value holds a comma (a folded duplicate), an `Authorization` folded with a `Bearer` in any of its
//!   parts, or keys in two sources at once are a `400`;
//! - a key is 1 to `max_key_len` bytes of visible ASCII (`!` to `~`); surrounding spaces are trimmed
//!   and never part of the key; anything else is a malformed key (`401 invalid_token`);
//! - `Authorization` counts only with the `Bearer` scheme (case-insensitive); another scheme, such as
//!   `Basic`, is not an API key and is left alone.

use crate::reject::Rejection;
use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use http::{Request, Uri};
use percent_encoding::percent_decode_str;
use std::borrow::Cow;

#[doc = include_str!("../docs/key_source.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// `Authorization: Bearer <key>` (RFC 6750 §2.1).
    Bearer,
    /// A header whose whole value is the key, such as `X-API-Key`.
    Header(HeaderName),
    /// A query parameter. Opt-in only: URLs end up in access logs, proxies and browser history,
    /// so a key sent this way should be treated as leaked sooner or later.
    Query(String),
}

impl KeySource {
    /// The `X-API-Key` header.
    #[must_use]
    pub fn x_api_key() -> Self {
        Self::Header(HeaderName::from_static("x-api-key"))
    }

    /// The defaults: `Authorization: Bearer` and `X-API-Key`.
    #[must_use]
    pub fn defaults() -> Vec<Self> {
        vec![Self::Bearer, Self::x_api_key()]
    }
}

/// The key found in a request, borrowed from it where possible.
pub(crate) struct Found<'a> {
    pub(crate) key: Cow<'a, str>,
    /// Index of the source it came from.
    pub(crate) source: usize,
}

/// The extraction rules, configured once on the layer.
#[derive(Debug, Clone)]
pub(crate) struct Extractor {
    pub(crate) sources: Box<[KeySource]>,
    pub(crate) max_key_len: usize,
}

impl Extractor {
    /// Finds the one key in the request; `Ok(None)` when there is none.
    #[inline]
    pub(crate) fn extract<'a, B>(&self, req: &'a Request<B>) -> Result<Option<Found<'a>>, Rejection> {
        let mut found: Option<Found<'a>> = None;
        for (source, i) in self.sources.iter().zip(0..) {
            let Some(raw) = find_in(source, req.headers(), req.uri())? else { continue };
            if found.is_some() {
                return Err(Rejection::AmbiguousKey);
            }
            found = Some(Found { key: raw, source: i });
        }
        match found {
            Some(f) if !self.well_formed(&f.key) => Err(Rejection::MalformedKey),
            other => Ok(other),
        }
    }

    fn well_formed(&self, key: &str) -> bool {
        // Not short-circuiting, so the check over `!`..=`~` vectorises.
        let graphic = key.bytes().fold(true, |ok, b| ok & (b.wrapping_sub(b'!') <= b'~' - b'!'));
        !key.is_empty() && key.len() <= self.max_key_len && graphic
    }

    /// Removes the key from the request the inner service will see.
    pub(crate) fn hide<B>(&self, source: usize, req: &mut Request<B>) {
        match &self.sources[source] {
            KeySource::Bearer => {
                req.headers_mut().remove(AUTHORIZATION);
            }
            KeySource::Header(name) => {
                req.headers_mut().remove(name);
            }
            KeySource::Query(name) => {
                if let Some(uri) = without_query_param(req.uri(), name) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}

/// The raw key in one source, trimmed but not yet checked; a present-but-unreadable value is
/// returned as the empty key so that it is rejected as malformed.
fn find_in<'a>(source: &KeySource, headers: &'a HeaderMap, uri: &'a Uri) -> Result<Option<Cow<'a, str>>, Rejection> {
    match source {
        KeySource::Bearer => {
            let Some(value) = single_header(headers, &AUTHORIZATION)? else { return Ok(None) };
            // No bearer token holds a comma (RFC 6750 b64token): a comma is a folded second value,
            // and one with a Bearer in it is a second key.
            if has_comma(value) && value.split(|b| *b == b',').any(|part| bearer_token(part).is_some()) {
                return Err(Rejection::AmbiguousKey);
            }
            Ok(bearer_token(value).map(|t| Cow::Borrowed(as_text(t))))
        }
        KeySource::Header(name) => {
            let Some(value) = single_header(headers, name)? else { return Ok(None) };
            if has_comma(value) {
                return Err(Rejection::AmbiguousKey);
            }
            Ok(Some(Cow::Borrowed(as_text(trim(value)))))
        }
        KeySource::Query(name) => query_param(uri, name),
    }
}

/// Whether a header value holds a comma; a fold that vectorises, since `memchr` costs more on
/// values this short.
fn has_comma(value: &[u8]) -> bool {
    value.iter().fold(false, |found, &b| found | (b == b','))
}

fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a [u8]>, Rejection> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Rejection::AmbiguousKey);
    }
    Ok(first.map(|v| v.as_bytes()))
}

/// The token of a `Bearer` credential, or `None` for another scheme.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let (scheme, rest) = value.split_first_chunk::<6>()?;
    // Case-insensitive as one comparison: setting bit 5 lowercases an ASCII letter, and only `B`
    // and `b` become `b` (and so on for each letter of "bearer"), so nothing else compares equal.
    let word = |b: [u8; 6]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0]);
    if word(*scheme) | word([0x20; 6]) != word(*b"bearer") {
        return None;
    }
    match rest.first() {
        None => Some(rest),                     // "Bearer" alone: an empty key.
        Some(b' ' | b'\t') => Some(trim(rest)), // "Bearer <key>"
        Some(_) => None,                        // "Bearerish ...": another scheme.
    }
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Header bytes as text; non-UTF-8 becomes the empty key, which is then rejected as malformed.
fn as_text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or("")
}

fn query_param<'a>(uri: &'a Uri, name: &str) -> Result<Option<Cow<'a, str>>, Rejection> {
    let Some(query) = uri.query() else { return Ok(None) };
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != name {
            continue;
        }
        if found.is_some() {
            return Err(Rejection::AmbiguousKey);
        }
        // A `+` would decode to a space: leave it, it fails the visible-ASCII rule either way.
        found = Some(percent_decode_str(v).decode_utf8().unwrap_or(Cow::Borrowed("")));
    }
    Ok(found)
}

fn without_query_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> =
        query.split('&').filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name).collect();
    let path_and_query =
        if kept.is_empty() { uri.path().to_owned() } else { format!("{}?{}", uri.path(), kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extractor() -> Extractor {
        Extractor {
            sources: vec![KeySource::Bearer, KeySource::x_api_key(), KeySource::Query("api_key".into())].into(),
            max_key_len: 16,
        }
    }

    fn run(build: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Result<Option<String>, Rejection> {
        let req = build(Request::builder()).body(()).unwrap();
        let ex = extractor();
        let r = ex.extract(&req).map(|f| f.map(|f| f.key.into_owned()));
        r
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_trimmed() {
        for v in ["Bearer k1", "bearer k1", "BEARER   k1  ", "\tBearer\tk1"] {
            assert_eq!(run(|b| b.header("authorization", v)).unwrap().as_deref(), Some("k1"), "{v:?}");
        }
    }

    #[test]
    fn the_scheme_matches_exactly_the_case_variants_of_bearer() {
        // Bytewise independent, so every byte at every position covers every input.
        for i in 0..6 {
            for b in 0..=255u8 {
                let mut value = *b"bearer k";
                value[i] = b;
                let expected = b.eq_ignore_ascii_case(&b"bearer"[i]);
                assert_eq!(bearer_token(&value).is_some(), expected, "byte {b:#x} at {i}");
            }
        }
    }

    #[test]
    fn other_schemes_are_not_keys() {
        assert_eq!(run(|b| b.header("authorization", "Basic dXNlcjpwdw==")).unwrap(), None);
        assert_eq!(run(|b| b.header("authorization", "Bearerk1")).unwrap(), None);
    }

    #[test]
    fn malformed_keys() {
        for v in ["Bearer", "Bearer  ", "Bearer a b", "Bearer 12345678901234567"] {
            assert!(matches!(run(|b| b.header("authorization", v)), Err(Rejection::MalformedKey)), "{v:?}");
        }
        let non_ascii = http::HeaderValue::from_bytes(b"k\xc3\xa9y").unwrap();
        assert!(matches!(run(|b| b.header("x-api-key", non_ascii)), Err(Rejection::MalformedKey)));
        assert!(matches!(run(|b| b.header("x-api-key", "")), Err(Rejection::MalformedKey)));
        assert!(matches!(run(|b| b.uri("/?api_key=a%20b")), Err(Rejection::MalformedKey)));
    }

    #[test]
    fn one_key_per_request() {
        let two_auth = run(|b| b.header("authorization", "Bearer a").header("authorization", "Bearer b"));
        assert!(matches!(two_auth, Err(Rejection::AmbiguousKey)));
        let two_sources = run(|b| b.header("authorization", "Bearer a").header("x-api-key", "a"));
        assert!(matches!(two_sources, Err(Rejection::AmbiguousKey)));
        assert!(matches!(run(|b| b.header("x-api-key", "a, b")), Err(Rejection::AmbiguousKey)));
        assert!(matches!(run(|b| b.uri("/?api_key=a&api_key=b")), Err(Rejection::AmbiguousKey)));
    }

    #[test]
    fn query_keys_are_decoded_and_hidden() {
        assert_eq!(run(|b| b.uri("/x?a=1&api_key=k%21")).unwrap().as_deref(), Some("k!"));
        let uri: Uri = "/x?a=1&api_key=k&b=2".parse().unwrap();
        assert_eq!(without_query_param(&uri, "api_key").unwrap(), "/x?a=1&b=2");
        let uri: Uri = "/x?api_key=k".parse().unwrap();
        assert_eq!(without_query_param(&uri, "api_key").unwrap(), "/x");
    }
}
