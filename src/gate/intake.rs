//! Intake: which requests are gated at all (CORS preflights may pass), and the one key a request
//! presents, extracted and checked against the key format before anything is looked up.

use crate::extract::{Extractor, Found};
use crate::facts::KeyStatus;
use crate::key::{KeyFormat, Redacted};
use crate::reject::Rejection;
use http::{Method, Request};

/// How keys are taken from requests.
pub(crate) struct Intake {
    pub(crate) extractor: Extractor,
    pub(crate) format: KeyFormat,
    /// Remove the key from the request the inner service sees.
    pub(crate) hide_credentials: bool,
    /// A request without a key passes, without a `VerifiedKey`.
    pub(crate) optional: bool,
    /// CORS preflights pass without a key.
    pub(crate) allow_preflight: bool,
}

impl Intake {
    /// Whether `req` passes ungated as a CORS preflight.
    #[inline]
    pub(crate) fn lets_through<B>(&self, req: &Request<B>) -> bool {
        self.allow_preflight && is_preflight(req)
    }

    /// The key `req` presents; `Ok(None)` when it presents none and keys are optional. A key the
    /// format refuses is refused here, before any lookup. Refusals are logged here.
    #[inline]
    pub(crate) fn take<'a, B>(&self, req: &'a Request<B>) -> Result<Option<Found<'a>>, Rejection> {
        let rejection = match self.extractor.extract(req) {
            Ok(None) if self.optional => return Ok(None),
            Ok(None) => Rejection::MissingKey,
            Ok(Some(found)) if !self.format.accepts(&found.key) => {
                let rejection = Rejection::InvalidKey(KeyStatus::Invalid);
                tracing::debug!(%rejection, key = %Redacted::of(&found.key), "keygate: refused");
                return Err(rejection);
            }
            Ok(Some(found)) => return Ok(Some(found)),
            Err(rejection) => rejection,
        };
        tracing::debug!(%rejection, "keygate: refused");
        Err(rejection)
    }

    /// Removes the key from the request, if so configured.
    #[inline]
    pub(crate) fn hide<B>(&self, source: usize, req: &mut Request<B>) {
        if self.hide_credentials {
            self.extractor.hide(source, req);
        }
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method` (browsers send
/// both; without an `Origin` it is a plain `OPTIONS` that needs a key).
fn is_preflight<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    req.method() == Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::KeySource;

    fn intake(optional: bool) -> Intake {
        let extractor = Extractor { sources: vec![KeySource::Bearer].into(), max_key_len: 64 };
        let format = KeyFormat::checksummed("kg_").unwrap();
        Intake { extractor, format, hide_credentials: true, optional, allow_preflight: true }
    }

    fn get(auth: Option<&str>) -> Request<()> {
        let mut b = Request::get("/x");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn missing_optional_formatted_and_hidden() {
        assert!(matches!(intake(false).take(&get(None)), Err(Rejection::MissingKey)));
        assert!(matches!(intake(true).take(&get(None)), Ok(None)));
        let wrong_format = get(Some("Bearer other_123"));
        assert!(matches!(intake(false).take(&wrong_format), Err(Rejection::InvalidKey(KeyStatus::Invalid))));
        let key = KeyFormat::checksummed("kg_").unwrap().generate().unwrap();
        let mut req = get(Some(&format!("Bearer {}", key.expose_secret())));
        let source = intake(false).take(&req).unwrap().unwrap().source;
        intake(false).hide(source, &mut req);
        assert!(req.headers().get("authorization").is_none());
    }

    #[test]
    fn only_a_real_preflight_passes() {
        let preflight = Request::options("/x")
            .header("origin", "https://a.example")
            .header("access-control-request-method", "POST")
            .body(())
            .unwrap();
        assert!(intake(false).lets_through(&preflight));
        let plain_options = Request::options("/x").body(()).unwrap();
        assert!(!intake(false).lets_through(&plain_options));
    }
}
