//! Where the local verifier keeps keys: the [`KeyStore`] trait, the in-memory [`MemoryStore`] and
//! the TOML key file.
//!
//! Stores hold key digests, never keys.

mod file;
mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use file::{KeyFile, LoadError};
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisKeyStore;

use crate::key::{KeyDigest, PresentedKey};
use crate::verify::{BoxFuture, KeyFacts, KeyStatus};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

/// A key as a store keeps it: its facts and its lifecycle flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// What the key is.
    pub facts: Arc<KeyFacts>,
    /// `false` once disabled; a disabled key can be enabled again.
    pub enabled: bool,
    /// `true` once deleted, for good.
    pub deleted: bool,
}

impl StoredKey {
    /// An enabled key with these facts.
    pub fn new(facts: KeyFacts) -> Self {
        Self { facts: Arc::new(facts), enabled: true, deleted: false }
    }

    /// The key's status now; reads the clock only if the key expires.
    pub fn status(&self) -> KeyStatus {
        match self.facts.expires_at {
            Some(_) => self.status_at(SystemTime::now()),
            None => self.status_at(SystemTime::UNIX_EPOCH),
        }
    }

    /// The key's status at `now`, before any per-request check: `DELETED`, `DISABLED`, `EXPIRED`,
    /// or `VALID`, in that order.
    pub fn status_at(&self, now: SystemTime) -> KeyStatus {
        if self.deleted {
            KeyStatus::Deleted
        } else if !self.enabled {
            KeyStatus::Disabled
        } else if self.facts.is_expired_at(now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Valid
        }
    }
}

/// A store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// Another key already has this id, or this digest is already stored.
    Exists(String),
    /// No key has this id.
    NotFound(String),
    /// The backend failed (connection, encoding).
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists(id) => write!(f, "a key with id {id:?} (or the same secret) already exists"),
            Self::NotFound(id) => write!(f, "no key with id {id:?}"),
            Self::Backend(msg) => write!(f, "key store failed: {msg}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Keeps keys by digest, with an index by id.
///
/// Like [`Verifier`](crate::Verifier), it has a synchronous fast path ([`KeyStore::get_now`]) for
/// stores that need no I/O, and asynchronous operations for the rest.
pub trait KeyStore: Send + Sync + 'static {
    /// The presented key's record, if the store can answer without I/O: `Some(None)` means "not
    /// here".
    fn get_now(&self, key: &PresentedKey<'_>) -> Option<Option<StoredKey>> {
        let _ = key;
        None
    }

    /// The key with this digest.
    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>>;

    /// The key with this id, and its digest.
    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>>;

    /// Adds a key; fails with [`StoreError::Exists`] if its id or digest is taken.
    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Stores `key` under `digest`, replacing whatever had its id: under another digest, that
    /// digest is removed in the same step (this is how rotation works).
    fn put(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>>;
}
