//! The decision on a verifier's answer: the status-to-refusal table, then the checks made on every
//! request from the key's facts (expiry, scope), since cached facts can outlive the key.

use super::Refusals;
use crate::context::VerifiedKey;
use crate::facts::KeyStatus;
use crate::reject::{Rejection, Responder};
use crate::scope::RequiredScope;
use crate::verify::Verification;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the decision needs from the layer's configuration.
pub(crate) struct Decide {
    pub(crate) refusals: Refusals,
    /// Given to the key, for refusals made after the gate (its extractor, `require`).
    pub(crate) responder: Arc<dyn Responder>,
}

impl Decide {
    /// The verified key, or why the request is refused. The clock is read only when the answer
    /// needs it (a key that expires, a reported reset): most requests never read it.
    #[inline]
    pub(crate) fn decide(
        &self,
        verification: Verification,
        required: Option<&RequiredScope>,
        now: impl Fn() -> SystemTime,
    ) -> Result<VerifiedKey, Rejection> {
        let refused = match verification.status {
            KeyStatus::Valid => None,
            KeyStatus::InvalidScopes => {
                Some(required.cloned().map_or(Rejection::UnmappedRoute, Rejection::InsufficientScope))
            }
            KeyStatus::RateLimited => {
                Some(Rejection::RateLimited { retry_after: retry_after(&verification, now()), limit: None })
            }
            KeyStatus::UsageLimited => Some(self.refusals.usage_limited()),
            status => Some(Rejection::InvalidKey(status)),
        };
        let facts = match (refused, verification.facts) {
            (Some(rejection), facts) => return Err(logged(rejection, facts.as_deref().map(|f| &*f.id))),
            // VALID without facts is a verifier bug: no safe answer.
            (None, None) => return Err(self.refusals.unavailable()),
            (None, Some(facts)) => facts,
        };
        if facts.ends_at().is_some() && facts.is_expired_at(now()) {
            return Err(logged(Rejection::InvalidKey(KeyStatus::Expired), Some(&facts.id)));
        }
        if let Some(required) = required.filter(|r| !r.granted_by(&facts.scopes)) {
            return Err(logged(Rejection::InsufficientScope(required.clone()), Some(&facts.id)));
        }
        Ok(VerifiedKey::new(facts, verification.stale, &self.responder))
    }
}

/// Logs a refusal of a known key, by id (never the key).
pub(crate) fn logged(rejection: Rejection, key_id: Option<&str>) -> Rejection {
    tracing::debug!(%rejection, key_id, "keygate: refused");
    rejection
}

/// Until the verifier's reported reset, or a second when it reported none.
fn retry_after(verification: &Verification, now: SystemTime) -> Duration {
    let reset = verification.rate_limit.map(|r| r.reset_at.duration_since(now).unwrap_or_default());
    reset.unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::KeyFacts;
    use crate::scope::{Action, Scope};
    use crate::verify::ReportedLimit;

    use crate::reject::ProblemJson;

    static DECIDE: std::sync::LazyLock<Decide> = std::sync::LazyLock::new(|| Decide {
        refusals: Refusals { usage_payment_required: false, unavailable_retry_after: Duration::from_secs(7) },
        responder: Arc::new(ProblemJson),
    });
    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    fn read_orders() -> RequiredScope {
        RequiredScope { representation: "orders".into(), action: Action::Read }
    }

    fn answer(status: KeyStatus, facts: KeyFacts) -> Verification {
        Verification::new(status, Arc::new(facts))
    }

    #[test]
    fn the_status_table() {
        let facts = || KeyFacts::new("key_1");
        let cases = [
            (KeyStatus::Expired, Rejection::InvalidKey(KeyStatus::Expired)),
            (KeyStatus::Disabled, Rejection::InvalidKey(KeyStatus::Disabled)),
            (KeyStatus::Deleted, Rejection::InvalidKey(KeyStatus::Deleted)),
            (KeyStatus::Invalid, Rejection::InvalidKey(KeyStatus::Invalid)),
            (KeyStatus::InvalidScopes, Rejection::InsufficientScope(read_orders())),
            (KeyStatus::UsageLimited, Rejection::UsageLimited { payment_required: false }),
        ];
        for (status, expected) in cases {
            let got = DECIDE.decide(answer(status, facts()), Some(&read_orders()), || NOW).unwrap_err();
            assert_eq!(got, expected, "{status:?}");
        }
        // INVALID_SCOPES where the route asked for no scope: the route is not in the table.
        let unmapped = DECIDE.decide(answer(KeyStatus::InvalidScopes, facts()), None, || NOW).unwrap_err();
        assert_eq!(unmapped, Rejection::UnmappedRoute);
    }

    #[test]
    fn rate_limited_waits_for_the_reported_reset() {
        let mut v = answer(KeyStatus::RateLimited, KeyFacts::new("key_1"));
        v.rate_limit = Some(ReportedLimit { remaining: 0, reset_at: NOW + Duration::from_secs(30) });
        let refused = DECIDE.decide(v, None, || NOW).unwrap_err();
        assert_eq!(refused, Rejection::RateLimited { retry_after: Duration::from_secs(30), limit: None });
        let unreported = DECIDE.decide(answer(KeyStatus::RateLimited, KeyFacts::new("k")), None, || NOW).unwrap_err();
        assert_eq!(unreported, Rejection::RateLimited { retry_after: Duration::from_secs(1), limit: None });
    }

    #[test]
    fn valid_is_still_checked_for_expiry_and_scope() {
        let expiring = KeyFacts::new("key_1").with_expiry(NOW + Duration::from_secs(10));
        let v = || answer(KeyStatus::Valid, expiring.clone());
        assert!(DECIDE.decide(v(), None, || NOW).is_ok());
        let later = NOW + Duration::from_secs(10);
        assert_eq!(DECIDE.decide(v(), None, || later).unwrap_err(), Rejection::InvalidKey(KeyStatus::Expired));
        assert_eq!(
            DECIDE.decide(v(), Some(&read_orders()), || NOW).unwrap_err(),
            Rejection::InsufficientScope(read_orders())
        );
        let scoped = KeyFacts::new("key_2").with_scopes([Scope::new("orders").with(Action::Read)]);
        assert!(DECIDE.decide(answer(KeyStatus::Valid, scoped), Some(&read_orders()), || NOW).is_ok());
    }

    #[test]
    fn valid_without_facts_is_a_503_not_a_pass() {
        let mut v = Verification::invalid();
        v.status = KeyStatus::Valid;
        let refused = DECIDE.decide(v, None, || NOW).unwrap_err();
        assert_eq!(refused, Rejection::Unavailable { retry_after: Duration::from_secs(7) });
    }
}
