//! The embedded in-memory key store.

use super::{KeyStore, StoreError, StoredKey};
use crate::key::{Fingerprint, KeyDigest, PresentedKey, UniformState};
use crate::verify::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// Keys in process memory: the default store. Cloning shares the same keys.
///
/// Reads take a read lock for two hash lookups and an `Arc` clone; writes are rare (key
/// management). Presented keys are found by [`Fingerprint`] once seen, so a warm lookup computes no
/// SHA-256: a fingerprint→digest index is filled on a key's first successful lookup. It never goes
/// stale: a fingerprint always names the same key, and so the same digest; a digest that is gone
/// (rotated away) is simply not found.
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
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys are stored.
    pub fn len(&self) -> usize {
        self.read(|m| m.by_digest.len())
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read<T>(&self, f: impl FnOnce(&Maps) -> T) -> T {
        // A panic while holding the lock cannot leave the maps half-updated (each write is one or
        // two inserts), so a poisoned lock is still safe to read.
        f(&self.maps.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        f(&mut self.maps.write().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn insert_now(&self, digest: KeyDigest, key: StoredKey) -> Result<(), StoreError> {
        self.write(|m| {
            if m.by_id.contains_key(&key.facts.id) || m.by_digest.contains_key(&digest) {
                return Err(StoreError::Exists(key.facts.id.clone()));
            }
            m.by_id.insert(key.facts.id.clone(), digest);
            m.by_digest.insert(digest, key);
            Ok(())
        })
    }

    fn put_now(&self, digest: KeyDigest, key: StoredKey) {
        self.write(|m| {
            if let Some(old) = m.by_id.insert(key.facts.id.clone(), digest) {
                if old != digest {
                    m.by_digest.remove(&old);
                }
            }
            m.by_digest.insert(digest, key);
        })
    }
}

impl KeyStore for MemoryStore {
    fn get_now(&self, key: &PresentedKey<'_>) -> Option<Option<StoredKey>> {
        let fingerprint = key.fingerprint();
        let seen = self.read(|m| m.by_fingerprint.get(&fingerprint).map(|d| m.by_digest.get(d).cloned()));
        if let Some(found) = seen {
            return Some(found);
        }
        let digest = *key.digest();
        let found = self.read(|m| m.by_digest.get(&digest).cloned());
        if found.is_some() {
            // Only known keys are indexed, so unknown keys cannot grow the index.
            self.write(|m| m.by_fingerprint.insert(fingerprint, digest));
        }
        Some(found)
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

    fn put(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        self.put_now(digest, key);
        Box::pin(async move { Ok(()) })
    }
}
