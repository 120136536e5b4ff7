//! What a store's revocation feed tells the caches in front of it.

use crate::key::KeyDigest;

/// What a revocation listener is told (see `RedisKeyStore::listen` and
/// `PostgresKeyStore::listen`): hand it to
/// [`CachedVerifier::revoke`](crate::cache::CachedVerifier::revoke).
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(all(feature = "redis", keygate_redis_url), doc = "```rust")]
#[cfg_attr(not(all(feature = "redis", keygate_redis_url)), doc = "```rust,ignore")]
#[doc = include_str!("../../docs/revoked.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Revoked<'a> {
    /// This key's record changed (disabled, enabled, deleted, rotated away): forget what is
    /// cached for it.
    Key(&'a KeyDigest),
    /// Revocations may have been missed (the feed lost entries, or its connection broke, while
    /// this instance was cut off): forget everything.
    All,
}
