//! Where the local verifier keeps keys: the [`KeyStore`] trait, the in-memory [`MemoryStore`] and
//! the TOML key file.
//!
//! Stores hold key digests, never keys.

mod file;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod revoked;

pub use file::{KeyFile, LoadError};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresKeyStore;
#[cfg(feature = "redis")]
pub use redis::{EvictionPolicy, RedisKeyStore, STREAM_LEN};
#[cfg(any(feature = "redis", feature = "postgres"))]
pub use revoked::Revoked;

use crate::boxed::BoxFuture;
use crate::facts::{KeyFacts, KeyStatus};
use crate::key::{KeyDigest, PresentedKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

#[doc = include_str!("../../docs/stored_key.md")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "StoredRecord", from = "StoredRecord")]
pub struct StoredKey {
    /// What the key is.
    pub facts: Arc<KeyFacts>,
    /// `false` once disabled; a disabled key can be enabled again.
    pub enabled: bool,
    /// `true` once deleted, for good.
    pub deleted: bool,
    /// How many times the store has replaced this record: it sets this, and
    /// [`KeyStore::replace`] compares it, so that of two admins changing one key at once neither
    /// change is lost. 0 for a new key.
    pub revision: u64,
    /// The key's earlier secrets still in their grace window after a rotation, each working (with
    /// this record's facts and status) until its end. Empty on a record found by an old secret:
    /// that record's [`KeyFacts::grace_ends`] says when it stops.
    pub previous: Vec<Previous>,
}

#[doc = include_str!("../../docs/previous.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    /// Its digest.
    #[serde(with = "digest_text")]
    pub digest: KeyDigest,
    /// When it stops working (stored to the millisecond).
    #[serde(rename = "until_ms", with = "unix_ms")]
    pub until: SystemTime,
}

/// A digest as its text, `sha256:…`.
mod digest_text {
    use crate::key::KeyDigest;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &KeyDigest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyDigest, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// A time as whole milliseconds since the Unix epoch: exact in JSON, Lua and SQL alike.
pub(crate) mod unix_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub(crate) fn to_ms(t: SystemTime) -> u64 {
        u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn from_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_ms(*t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_ms)
    }
}

/// [`StoredKey`]'s serialised form.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    /// The record format: 1 since versioning; absent (0) before, with the same fields.
    #[serde(default)]
    v: u32,
    #[serde(default)]
    facts: Arc<KeyFacts>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    rev: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    prev: Vec<Previous>,
}

/// The version this code writes.
const RECORD_VERSION: u32 = 1;

fn enabled_by_default() -> bool {
    true
}

impl From<StoredRecord> for StoredKey {
    fn from(r: StoredRecord) -> Self {
        Self { facts: r.facts, enabled: r.enabled, deleted: r.deleted, revision: r.rev, previous: r.prev }
    }
}

impl From<StoredKey> for StoredRecord {
    fn from(k: StoredKey) -> Self {
        Self {
            v: RECORD_VERSION,
            facts: k.facts,
            enabled: k.enabled,
            deleted: k.deleted,
            rev: k.revision,
            prev: k.previous,
        }
    }
}

impl StoredKey {
    /// An enabled key with these facts.
    #[must_use]
    pub fn new(facts: KeyFacts) -> Self {
        Self { facts: Arc::new(facts), enabled: true, deleted: false, revision: 0, previous: Vec::new() }
    }

    /// This record without its [`previous`](Self::previous) secrets: what verification needs,
    /// copied without allocating.
    #[must_use]
    pub fn for_verification(&self) -> Self {
        Self { facts: Arc::clone(&self.facts), previous: Vec::new(), ..*self }
    }

    /// What a store answers for one of [`previous`](Self::previous): this record, with facts
    /// that end at `until`, and no previous secrets of its own.
    #[must_use]
    pub fn grace_copy(&self, until: SystemTime) -> Self {
        let facts = KeyFacts { grace_ends: Some(until), ..KeyFacts::clone(&self.facts) };
        Self { facts: Arc::new(facts), previous: Vec::new(), ..self.clone() }
    }

    /// The key's status now; reads the clock only if the key expires.
    #[must_use]
    pub fn status(&self) -> KeyStatus {
        match self.facts.ends_at() {
            Some(_) => self.status_at(SystemTime::now()),
            None => self.status_at(SystemTime::UNIX_EPOCH),
        }
    }

    /// The key's status at `now`, before any per-request check: `DELETED`, `DISABLED`, `EXPIRED`,
    /// or `VALID`, in that order.
    #[must_use]
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

#[doc = include_str!("../../docs/lookup.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The key's record.
    Found(StoredKey),
    /// No key with this digest.
    Absent,
    /// The store cannot tell without I/O: ask [`KeyStore::get`].
    NeedsIo,
}

impl From<Option<StoredKey>> for Lookup {
    fn from(found: Option<StoredKey>) -> Self {
        found.map_or(Self::Absent, Self::Found)
    }
}

#[doc = include_str!("../../docs/store_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// Another key already has this id, or this digest is already stored.
    Exists(String),
    /// No key has this id.
    NotFound(String),
    /// The backend failed (connection, encoding), or did not answer in time.
    Backend(String),
    /// The store cannot be used as configured (a schema name it refuses, a database at a newer
    /// version of the store than this code).
    Invalid(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists(id) => write!(f, "a key with id {id:?} (or the same secret) already exists"),
            Self::NotFound(id) => write!(f, "no key with id {id:?}"),
            Self::Backend(msg) => write!(f, "key store failed: {msg}"),
            Self::Invalid(msg) => write!(f, "key store misconfigured: {msg}"),
        }
    }
}

impl std::error::Error for StoreError {}

#[doc = include_str!("../../docs/key_store.md")]
pub trait KeyStore: Send + Sync + 'static {
    /// The presented key's record, if the store can answer without I/O; [`Lookup::NeedsIo`] (the
    /// default) sends the caller to [`get`](Self::get). Verification reads the facts and status
    /// only, so a store may leave [`StoredKey::previous`] empty here (the memory store does: on the
    /// warm path a key in a grace window would otherwise copy its list on every request).
    fn get_now(&self, key: &PresentedKey<'_>) -> Lookup {
        let _ = key;
        Lookup::NeedsIo
    }

    /// The key with this digest.
    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>>;

    /// The key with this id, and its digest.
    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>>;

    /// Adds a key; fails with [`StoreError::Exists`] if its id or digest is taken.
    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Compare-and-set: replaces the key that [`find`](Self::find) returned as `(current, was)`,
    /// if the store still holds it unchanged (`current` is still its digest, `was.revision` still
    /// its revision), with `next` stored under `digest` at revision `was.revision + 1`. A new
    /// `digest` is a rotation: `current` is removed in the same step. `next` keeps `was`'s id.
    ///
    /// `Ok(false)`, changing nothing, when the key changed since it was read (or `digest` is
    /// another key's): read it again and retry, as [`LocalVerifier`](crate::LocalVerifier)'s admin
    /// methods do.
    fn replace(
        &self,
        current: KeyDigest,
        was: &StoredKey,
        digest: KeyDigest,
        next: StoredKey,
    ) -> BoxFuture<'static, Result<bool, StoreError>>;

    /// Every key's current record and digest, ordered by id; only `customer`'s keys when given.
    /// Deleted keys are listed (as deleted).
    fn list(&self, customer: Option<&str>) -> BoxFuture<'static, Result<Vec<(KeyDigest, StoredKey)>, StoreError>>;
}

/// A shared store is a store: one [`MemoryStore`] (or any) behind several verifiers, or the
/// `Arc<dyn KeyStore>` of [`LocalVerifier::store`](crate::LocalVerifier::store).
impl<S: KeyStore + ?Sized> KeyStore for Arc<S> {
    fn get_now(&self, key: &PresentedKey<'_>) -> Lookup {
        (**self).get_now(key)
    }

    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>> {
        (**self).get(digest)
    }

    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>> {
        (**self).find(id)
    }

    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).insert(digest, key)
    }

    fn replace(
        &self,
        current: KeyDigest,
        was: &StoredKey,
        digest: KeyDigest,
        next: StoredKey,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        (**self).replace(current, was, digest, next)
    }

    fn list(&self, customer: Option<&str>) -> BoxFuture<'static, Result<Vec<(KeyDigest, StoredKey)>, StoreError>> {
        (**self).list(customer)
    }
}

/// The earlier secrets `next` may keep in their grace window: those of `was`, and `current` when
/// it is rotated away. Stores drop any other (a record cannot claim another key's secret).
pub(crate) fn kept_previous(current: KeyDigest, was: &StoredKey, digest: KeyDigest, next: &StoredKey) -> Vec<Previous> {
    let own = |d: &KeyDigest| *d != digest && (*d == current || was.previous.iter().any(|p| p.digest == *d));
    next.previous.iter().filter(|p| own(&p.digest)).copied().collect()
}
