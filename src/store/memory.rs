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

#[derive(Debug, Default)]
struct Maps {
    by_digest: HashMap<KeyDigest, StoredKey, UniformState>,
    by_id: HashMap<String, KeyDigest>,
    by_fingerprint: HashMap<Fingerprint, KeyDigest, UniformState>,
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
            if m.by_id.contains_key(&key.facts.id) || m.by_digest.contains_key(&digest) {
                return Err(StoreError::Exists(key.facts.id.clone()));
            }
            if key.previous.iter().any(|p| p.digest == digest || m.by_digest.contains_key(&p.digest)) {
                return Err(StoreError::Exists(key.facts.id.clone()));
            }
            m.by_id.insert(key.facts.id.clone(), digest);
            for p in &key.previous {
                m.by_digest.insert(p.digest, key.grace_copy(p.until));
            }
            m.by_digest.insert(digest, key);
            Ok(())
        })
    }

    fn replace_now(&self, current: KeyDigest, was: &StoredKey, digest: KeyDigest, mut next: StoredKey) -> bool {
        self.write(|m| {
            let id = &was.facts.id;
            let unchanged = m.by_id.get(id.as_str()) == Some(&current)
                && m.by_digest.get(&current).is_some_and(|k| k.revision == was.revision);
            if !unchanged || (digest != current && m.by_digest.contains_key(&digest)) {
                return false;
            }
            next.revision = was.revision + 1;
            next.previous = super::kept_previous(current, was, digest, &next);
            // The earlier secrets' copies go, and come back from `next`, so that they follow its
            // facts and status (a key disabled in its grace window is disabled by every secret).
            for p in &was.previous {
                m.by_digest.remove(&p.digest);
            }
            if digest != current {
                m.by_digest.remove(&current);
                m.by_id.insert(id.clone(), digest);
            }
            for p in &next.previous {
                m.by_digest.insert(p.digest, next.grace_copy(p.until));
            }
            m.by_digest.insert(digest, next);
            true
        })
    }
}

impl KeyStore for MemoryStore {
    fn get_now(&self, key: &PresentedKey<'_>) -> Lookup {
        let fingerprint = key.fingerprint();
        let seen = self
            .read(|m| m.by_fingerprint.get(&fingerprint).map(|d| m.by_digest.get(d).map(StoredKey::for_verification)));
        if let Some(found) = seen {
            return found.into();
        }
        let digest = *key.digest();
        let found = self.read(|m| m.by_digest.get(&digest).map(StoredKey::for_verification));
        if found.is_some() {
            // Only known keys are indexed, so unknown keys cannot grow the index.
            self.write(|m| m.by_fingerprint.insert(fingerprint, digest));
        }
        found.into()
    }

    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>> {
        let found = self.read(|m| m.by_digest.get(digest).cloned());
        Box::pin(async move { Ok(found) })
    }

    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>> {
        let found = self.read(|m| m.by_id.get(id).and_then(|d| Some((*d, m.by_digest.get(d)?.clone()))));
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
                .filter_map(|d| Some((*d, m.by_digest.get(d)?.clone())))
                .filter(|(_, k)| customer.is_none() || k.facts.customer_id.as_deref() == customer)
                .collect()
        });
        keys.sort_by(|a, b| a.1.facts.id.cmp(&b.1.facts.id));
        Box::pin(async move { Ok(keys) })
    }
}
