//! Usage counted against allowances: per key id, and per identity for allowances its keys share.

use super::UsageCharge;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

/// Whose allowance a count is against (the index of its book).
#[cfg(any(test, feature = "redis"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whose {
    Key,
    Identity,
}

/// Per key id and per identity: what this process charged that its verifier has not reported back
/// yet, in the period the allowance is in.
///
/// When a fresh answer reports more `used` than the last one, that much of the local count is
/// taken as now included upstream, so instances converge on the verifier's figure; until then each
/// instance also counts its own charges, so none overspends by more than what others charged since
/// the last refresh.
#[derive(Default)]
pub(crate) struct Ledger {
    /// By key id, then by identity.
    books: Mutex<[HashMap<Box<str>, Entry>; 2]>,
}

/// Charges to a key's allowance (first) and to its identity's (second), by id.
pub(crate) type Charges<'a> = [Option<(&'a str, &'a UsageCharge)>; 2];

/// The time, read only where a charge refills (the clock is a call the usual charge need not make).
fn now_if_refilling(charges: &Charges<'_>, now: impl Fn() -> SystemTime) -> SystemTime {
    let refills = charges.iter().flatten().any(|(_, c)| c.refill.is_some());
    if refills {
        now()
    } else {
        SystemTime::UNIX_EPOCH
    }
}

#[derive(Default)]
struct Entry {
    reported: u128,
    local: u128,
    /// The start of the refill period `local` counts for (ms since the epoch; 0 if it never refills).
    period: u64,
}

impl Entry {
    /// Brings the entry up to `charge`'s report and to the period `now` is in.
    fn refresh(&mut self, charge: &UsageCharge, now: SystemTime) {
        if let Some(refill) = charge.refill {
            let period = refill.period_start(now);
            if period > self.period {
                self.period = period;
                self.local = 0;
            }
        }
        if charge.reported > self.reported {
            self.local = self.local.saturating_sub(charge.reported - self.reported);
            self.reported = charge.reported;
        }
    }

    fn fits(&self, charge: &UsageCharge) -> bool {
        self.reported.saturating_add(self.local).saturating_add(u128::from(charge.amount)) <= charge.allowed
    }
}

impl Ledger {
    /// Takes each charge if every one fits (`reported + local + amount <= allowed` in its period):
    /// all or nothing. `now` is read only if a charge refills.
    pub(crate) fn reserve(&self, charges: Charges<'_>, now: impl Fn() -> SystemTime) -> bool {
        let mut books = crate::lock::lock(&self.books);
        let now = now_if_refilling(&charges, now);
        let both = charges.iter().all(Option::is_some);
        for (book, charge) in books.iter_mut().zip(charges) {
            let Some((id, charge)) = charge else { continue };
            let e = match book.get_mut(id) {
                Some(e) => e,
                None => book.entry(id.into()).or_default(),
            };
            e.refresh(charge, now);
            if !e.fits(charge) {
                return false;
            }
            // One charge (the usual case): checked and taken in one lookup.
            if !both {
                e.local += u128::from(charge.amount);
                return true;
            }
        }
        // Both fit: take both (a second lookup each, only for keys with an identity allowance).
        for (book, charge) in books.iter_mut().zip(charges) {
            if let Some(e) = charge.and_then(|(id, _)| book.get_mut(id)) {
                e.local += u128::from(charge.map_or(0, |(_, c)| c.amount));
            }
        }
        true
    }

    /// Counts usage that happened already (no allowance check).
    pub(crate) fn charge(&self, charges: Charges<'_>, now: impl Fn() -> SystemTime) {
        let mut books = crate::lock::lock(&self.books);
        let now = now_if_refilling(&charges, now);
        for (book, charge) in books.iter_mut().zip(charges) {
            let Some((id, charge)) = charge else { continue };
            let e = match book.get_mut(id) {
                Some(e) => e,
                None => book.entry(id.into()).or_default(),
            };
            e.refresh(charge, now);
            e.local = e.local.saturating_add(u128::from(charge.amount));
        }
    }

    /// Drops a count.
    #[cfg(feature = "redis")]
    pub(crate) fn forget(&self, whose: Whose, id: &str) {
        crate::lock::lock(&self.books)[whose as usize].remove(id);
    }

    /// Usage counted locally.
    #[cfg(test)]
    pub(crate) fn local(&self, whose: Whose, id: &str) -> u128 {
        crate::lock::lock(&self.books)[whose as usize].get(id).map_or(0, |e| e.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Refill;
    use std::time::{Duration, UNIX_EPOCH};

    fn charge(allowed: u128, reported: u128, amount: u64) -> UsageCharge {
        UsageCharge { allowed, reported, amount, refill: None }
    }

    #[test]
    fn reserve_refund_and_converge() {
        let (l, now) = (Ledger::default(), SystemTime::now());
        assert!(l.reserve([Some(("k", &charge(10, 0, 6))), None], || now));
        assert!(!l.reserve([Some(("k", &charge(10, 0, 5))), None], || now), "6 + 5 > 10");
        assert_eq!(l.local(Whose::Key, "k"), 6);
        // The verifier now reports the 6 as used: they are not counted twice.
        assert!(l.reserve([Some(("k", &charge(10, 6, 4))), None], || now));
        assert_eq!(l.local(Whose::Key, "k"), 4);
        assert!(!l.reserve([Some(("k", &charge(10, 6, 1))), None], || now));
    }

    #[test]
    fn a_key_and_its_identity_are_taken_together_or_not_at_all() {
        let (l, now) = (Ledger::default(), SystemTime::now());
        let run = |key: u64, identity: u64| {
            let (k, i) = (charge(10, 0, key), charge(5, 0, identity));
            l.reserve([Some(("k", &k)), Some(("c", &i))], || now)
        };
        assert!(run(3, 3));
        assert!(!run(3, 3), "the identity has 2 left");
        assert_eq!((l.local(Whose::Key, "k"), l.local(Whose::Identity, "c")), (3, 3), "nothing taken");
        // A key id and an identity of the same name are two counts.
        assert_eq!(l.local(Whose::Identity, "k"), 0);
    }

    #[test]
    fn a_refill_counts_from_zero_once_per_period() {
        let l = Ledger::default();
        let day = UsageCharge { refill: Some(Refill::daily()), ..charge(5, 0, 5) };
        let t0 = UNIX_EPOCH + Duration::from_secs(10 * 86_400 + 3600);
        assert!(l.reserve([Some(("k", &day)), None], || t0));
        assert!(!l.reserve([Some(("k", &day)), None], || t0 + Duration::from_secs(3600)));
        let t1 = t0 + Duration::from_secs(86_400);
        assert!(l.reserve([Some(("k", &day)), None], || t1), "a new day, a new 5");
        // A clock a little behind (another instance's, a moment before midnight) does not refill again.
        assert!(!l.reserve([Some(("k", &day)), None], || t1 - Duration::from_secs(7200)));
    }
}
