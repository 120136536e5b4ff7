//! Usage counted against allowances, per key id.

use std::collections::HashMap;
use std::sync::Mutex;

/// Per key id: what this process charged that its verifier has not reported back yet.
///
/// When a fresh answer reports more `used` than the last one, that much of the local count is
/// taken as now included upstream, so instances converge on the verifier's figure; until then each
/// instance also counts its own charges, so none overspends by more than what others charged since
/// the last refresh.
#[derive(Default)]
pub(crate) struct Ledger {
    keys: Mutex<HashMap<Box<str>, Entry>>,
}

#[derive(Default)]
struct Entry {
    reported: u128,
    local: u128,
}

impl Ledger {
    /// Takes `amount` if `reported + local + amount <= allowed`.
    pub(crate) fn reserve(&self, key_id: &str, (allowed, reported): (u128, u128), amount: u64) -> bool {
        let mut keys = crate::lock::lock(&self.keys);
        let entry = match keys.get_mut(key_id) {
            Some(e) => e,
            None => keys.entry(key_id.into()).or_default(),
        };
        if reported > entry.reported {
            entry.local = entry.local.saturating_sub(reported - entry.reported);
            entry.reported = reported;
        }
        let after = entry.reported.saturating_add(entry.local).saturating_add(amount as u128);
        if after > allowed {
            return false;
        }
        entry.local += amount as u128;
        true
    }

    /// Counts usage that happened already (no allowance check).
    pub(crate) fn charge(&self, key_id: &str, amount: u64) {
        let mut keys = crate::lock::lock(&self.keys);
        keys.entry(key_id.into()).or_default().local += amount as u128;
    }

    /// Drops `key_id`'s count.
    #[cfg(feature = "redis")]
    pub(crate) fn forget(&self, key_id: &str) {
        crate::lock::lock(&self.keys).remove(key_id);
    }

    /// Usage counted locally for `key_id`.
    #[cfg(test)]
    pub(crate) fn local(&self, key_id: &str) -> u128 {
        crate::lock::lock(&self.keys).get(key_id).map_or(0, |e| e.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_refund_and_converge() {
        let l = Ledger::default();
        assert!(l.reserve("k", (10, 0), 6));
        assert!(!l.reserve("k", (10, 0), 5), "6 + 5 > 10");
        assert_eq!(l.local("k"), 6);
        // The verifier now reports the 6 as used: they are not counted twice.
        assert!(l.reserve("k", (10, 6), 4));
        assert_eq!(l.local("k"), 4);
        assert!(!l.reserve("k", (10, 6), 1));
    }
}
