//! Which cache entries may hold a key, by the key's digest: revocations arrive as digests, and the
//! cache is keyed by fingerprint.
//!
//! Indexed by the digest's first 8 bytes, not all 32: a slot of a prefix and a fingerprint is 24
//! bytes where a whole digest's was 48 (about 50 bytes per cached key, measured at a million).
//! Two keys sharing a prefix (odds of 1 in 2^64 per pair) are both kept, the second in
//! `collided`; a revocation then drops both entries, which is safe: a cache entry dropped too
//! many is a miss, one left in place would be a revoked key still served.

use crate::key::{Fingerprint, UniformState};
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct DigestIndex {
    by_prefix: HashMap<u64, Fingerprint, UniformState>,
    /// Entries whose prefix another entry holds in `by_prefix`; almost always empty.
    collided: Vec<(u64, Fingerprint)>,
}

impl DigestIndex {
    /// Records that the entry under `fingerprint` holds a key whose digest starts with `prefix`.
    pub(super) fn insert(&mut self, prefix: u64, fingerprint: Fingerprint) {
        let held = *self.by_prefix.entry(prefix).or_insert(fingerprint);
        if held != fingerprint && !self.collided.contains(&(prefix, fingerprint)) {
            self.collided.push((prefix, fingerprint));
        }
    }

    /// Forgets the entry under `fingerprint`, gone from the cache.
    pub(super) fn remove(&mut self, prefix: u64, fingerprint: &Fingerprint) {
        if self.by_prefix.get(&prefix) == Some(fingerprint) {
            self.by_prefix.remove(&prefix);
            // A collided entry of this prefix, if any, moves up.
            if let Some(i) = self.collided.iter().position(|(p, _)| *p == prefix) {
                let (_, up) = self.collided.swap_remove(i);
                self.by_prefix.insert(prefix, up);
            }
        } else {
            self.collided.retain(|held| *held != (prefix, *fingerprint));
        }
    }

    /// How many entries are indexed.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_prefix.len() + self.collided.len()
    }

    /// Every entry that may hold a key whose digest starts with `prefix`.
    pub(super) fn holders(&self, prefix: u64) -> impl Iterator<Item = Fingerprint> + '_ {
        let first = self.by_prefix.get(&prefix).copied();
        first.into_iter().chain(self.collided.iter().filter(move |(p, _)| *p == prefix).map(|(_, f)| *f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u64, u8),
        Remove(u64, u8),
    }

    fn fingerprint(n: u8) -> Fingerprint {
        Fingerprint::of(&format!("key-{n}"))
    }

    proptest! {
        /// Against a plain model (a set of fingerprints per prefix), over prefixes from a small
        /// range so that collisions, the case real digests almost never show, are the common one.
        #[test]
        fn holders_are_exactly_the_entries_recorded_and_not_removed(
            steps in prop::collection::vec(
                prop_oneof![
                    (0..4_u64, 0..6_u8).prop_map(|(p, f)| Step::Insert(p, f)),
                    (0..4_u64, 0..6_u8).prop_map(|(p, f)| Step::Remove(p, f)),
                ],
                0..80,
            )
        ) {
            let mut index = DigestIndex::default();
            let mut model: BTreeMap<u64, BTreeSet<Fingerprint>> = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Insert(p, f) => {
                        index.insert(p, fingerprint(f));
                        model.entry(p).or_default().insert(fingerprint(f));
                    }
                    Step::Remove(p, f) => {
                        index.remove(p, &fingerprint(f));
                        model.entry(p).or_default().remove(&fingerprint(f));
                    }
                }
                for p in 0..4 {
                    let held: Vec<Fingerprint> = index.holders(p).collect();
                    let unique: BTreeSet<Fingerprint> = held.iter().copied().collect();
                    prop_assert_eq!(held.len(), unique.len(), "an entry listed twice");
                    prop_assert_eq!(&unique, &model.get(&p).cloned().unwrap_or_default());
                }
            }
            prop_assert!(index.collided.len() <= 6 * 4);
        }
    }
}
