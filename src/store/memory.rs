//! The embedded in-memory key store.

use super::{KeyStore, Lookup, StoreError, StoredKey};
use crate::boxed::BoxFuture;
use crate::key::{Fingerprint, KeyDigest, PresentedKey, UniformState};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[doc = include_str!("../../docs/memory_store.md")]
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    maps: Arc<RwLock<Maps>>,
}

/// The records by digest, and two indexes into them.
///
/// The fingerprint index holds the record itself, shared with `by_digest`, so that the warm path
/// is one lookup. A record leaves `by_digest` when it is replaced; the index may still hold it,
/// and a record only the index holds is *retired*: never answered, and swept once retired records
/// could be half the index. These `Arc`s are never handed out (answers are copies), so "only the
/// index holds it" is exactly a strong count of one.
#[derive(Debug, Default)]
struct Maps {
    by_digest: HashMap<KeyDigest, Arc<StoredKey>, UniformState>,
    /// Boxed, not `String`: 8 bytes fewer in each of a million slots.
    by_id: HashMap<Box<str>, KeyDigest>,
    by_fingerprint: HashMap<Fingerprint, Arc<StoredKey>, UniformState>,
    /// Index entries that may have been retired since the last sweep.
    retired: usize,
}

impl Maps {
    /// Puts `key` under `digest`, retiring the record it replaces.
    fn put(&mut self, digest: KeyDigest, key: StoredKey) {
        let old = self.by_digest.insert(digest, Arc::new(key));
        self.retire(old);
    }

    /// Takes the record under `digest` out, retiring it.
    fn take(&mut self, digest: &KeyDigest) {
        let old = self.by_digest.remove(digest);
        self.retire(old);
    }

    fn retire(&mut self, old: Option<Arc<StoredKey>>) {
        // Shared means the fingerprint index holds it: that entry is retired now.
        if old.is_some_and(|old| Arc::strong_count(&old) > 1) {
            self.retired += 1;
        }
        // Sweeping costs the index's length, so it runs once per that many retirements at most.
        if self.retired > self.by_fingerprint.len() / 2 {
            self.by_fingerprint.retain(|_, key| Arc::strong_count(key) > 1);
            self.retired = 0;
        }
    }

    fn get(&self, digest: &KeyDigest) -> Option<&StoredKey> {
        self.by_digest.get(digest).map(|k| &**k)
    }
}

impl MemoryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys are stored.
    #[must_use]
    pub fn len(&self) -> usize {
        self.read(|m| m.by_digest.len())
    }

    /// Whether the store is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read<T>(&self, f: impl FnOnce(&Maps) -> T) -> T {
        // A panic while holding the lock cannot leave the maps half-updated (each write is one or
        // two inserts), so a poisoned lock is still safe to read.
        f(&crate::lock::read(&self.maps))
    }

    fn write<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        f(&mut crate::lock::write(&self.maps))
    }

    pub(crate) fn insert_now(&self, digest: KeyDigest, key: StoredKey) -> Result<(), StoreError> {
        self.write(|m| {
            if m.by_id.contains_key(key.facts.id.as_str()) || m.by_digest.contains_key(&digest) {
                return Err(StoreError::Exists(key.facts.id.clone()));
            }
            if key.previous.iter().any(|p| p.digest == digest || m.by_digest.contains_key(&p.digest)) {
                return Err(StoreError::Exists(key.facts.id.clone()));
            }
            m.by_id.insert(key.facts.id.as_str().into(), digest);
            for p in &key.previous {
                m.put(p.digest, key.grace_copy(p.until));
            }
            m.put(digest, key);
            Ok(())
        })
    }

    fn replace_now(&self, current: KeyDigest, was: &StoredKey, digest: KeyDigest, mut next: StoredKey) -> bool {
        self.write(|m| {
            let id = &was.facts.id;
            let unchanged = m.by_id.get(id.as_str()) == Some(&current)
                && m.get(&current).is_some_and(|k| k.revision == was.revision);
            if !unchanged || (digest != current && m.by_digest.contains_key(&digest)) {
                return false;
            }
            next.revision = was.revision + 1;
            next.previous = super::kept_previous(current, was, digest, &next);
            // The earlier secrets' copies go, and come back from `next`, so that they follow its
            // facts and status (a key disabled in its grace window is disabled by every secret).
            for p in &was.previous {
                m.take(&p.digest);
            }
            if digest != current {
                m.take(&current);
                m.by_id.insert(id.as_str().into(), digest);
            }
            for p in &next.previous {
                m.put(p.digest, next.grace_copy(p.until));
            }
            m.put(digest, next);
            true
        })
    }
}

impl KeyStore for MemoryStore {
    fn get_now(&self, key: &PresentedKey<'_>) -> Lookup {
        let fingerprint = key.fingerprint();
        // Never an `Arc` clone outside the lock: a reader would take the extra count for
        // `by_digest`'s and answer a retired record.
        let indexed = self.read(|m| {
            let key = m.by_fingerprint.get(&fingerprint)?;
            Some((Arc::strong_count(key) > 1).then(|| key.for_verification()))
        });
        let retired = match indexed {
            Some(Some(found)) => return Lookup::Found(found),
            Some(None) => true,
            None => false,
        };
        let digest = *key.digest();
        let found = self.read(|m| m.get(&digest).map(StoredKey::for_verification));
        // Only known keys are indexed, so unknown keys cannot grow the index (nor take the write
        // lock); a retired entry is replaced or removed now rather than at the next sweep.
        if found.is_some() || retired {
            self.write(|m| match m.by_digest.get(&digest) {
                Some(key) => drop(m.by_fingerprint.insert(fingerprint, Arc::clone(key))),
                None => drop(m.by_fingerprint.remove(&fingerprint)),
            });
        }
        found.into()
    }

    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>> {
        let found = self.read(|m| m.get(digest).cloned());
        Box::pin(async move { Ok(found) })
    }

    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>> {
        let found = self.read(|m| m.by_id.get(id).and_then(|d| Some((*d, m.get(d)?.clone()))));
        Box::pin(async move { Ok(found) })
    }

    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        let result = self.insert_now(digest, key);
        Box::pin(async move { result })
    }

    fn replace(
        &self,
        current: KeyDigest,
        was: &StoredKey,
        digest: KeyDigest,
        next: StoredKey,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let replaced = self.replace_now(current, was, digest, next);
        Box::pin(async move { Ok(replaced) })
    }

    fn list(&self, customer: Option<&str>) -> BoxFuture<'static, Result<Vec<(KeyDigest, StoredKey)>, StoreError>> {
        let mut keys: Vec<(KeyDigest, StoredKey)> = self.read(|m| {
            m.by_id
                .values()
                .filter_map(|d| Some((*d, m.get(d)?.clone())))
                .filter(|(_, k)| customer.is_none() || k.facts.customer_id.as_deref() == customer)
                .collect()
        });
        keys.sort_by(|a, b| a.1.facts.id.cmp(&b.1.facts.id));
        Box::pin(async move { Ok(keys) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::KeyFacts;

    /// Rotating a key that is in use again and again leaves retired records in the fingerprint
    /// index; the sweeps keep them to at most about as many as live ones.
    #[test]
    fn retired_records_are_swept_from_the_index() {
        let store = MemoryStore::new();
        let live: Vec<String> = (0..8).map(|i| format!("live-{i}")).collect();
        for (i, secret) in live.iter().enumerate() {
            store.insert_now(KeyDigest::of(secret), StoredKey::new(KeyFacts::new(format!("live{i}")))).unwrap();
            assert!(matches!(store.get_now(&PresentedKey::new(secret)), Lookup::Found(_)));
        }
        let mut secret = "rotated-0".to_owned();
        store.insert_now(KeyDigest::of(&secret), StoredKey::new(KeyFacts::new("rotated"))).unwrap();
        for i in 1..1000 {
            assert!(matches!(store.get_now(&PresentedKey::new(&secret)), Lookup::Found(_)));
            let (current, was) = store
                .read(|m| (*m.by_id.get("rotated").unwrap(), m.get(m.by_id.get("rotated").unwrap()).unwrap().clone()));
            let next = format!("rotated-{i}");
            assert!(store.replace_now(current, &was, KeyDigest::of(&next), was.clone()));
            secret = next;
            let (indexed, retired) = store.read(|m| {
                (m.by_fingerprint.len(), m.by_fingerprint.values().filter(|k| Arc::strong_count(k) == 1).count())
            });
            assert!(retired <= indexed / 2 + 1, "{retired} retired of {indexed} after {i} rotations");
        }
        // A retired secret is refused, and its entry goes when it is presented.
        let before = store.read(|m| m.by_fingerprint.len());
        assert!(matches!(store.get_now(&PresentedKey::new("rotated-998")), Lookup::Absent));
        assert!(store.read(|m| m.by_fingerprint.len()) <= before);
    }
}
