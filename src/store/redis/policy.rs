//! Whether the Redis behind a key store may evict key records.

use super::RedisKeyStore;
use crate::store::StoreError;

/// What [`RedisKeyStore::check`] does when Redis's `maxmemory-policy` lets it evict key records
/// (`allkeys-lru`, `allkeys-lfu`, `allkeys-random`): an evicted record makes a valid key a `401`.
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(keygate_redis_url, doc = "```rust")]
#[cfg_attr(not(keygate_redis_url), doc = "```rust,ignore")]
#[doc = include_str!("../../../docs/eviction_policy.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EvictionPolicy {
    /// Log a warning and go on (the default).
    #[default]
    Warn,
    /// Fail the check, so that the application refuses to start.
    Refuse,
}

/// What a `maxmemory-policy` means for keygate's keys.
fn verdict(policy: &str) -> Option<&'static str> {
    match policy {
        "noeviction" => None,
        p if p.starts_with("allkeys-") => Some("Redis may evict key records (valid keys would be refused with 401)"),
        // Records have no TTL, so they stay; rate-limit windows have one and may go early.
        p if p.starts_with("volatile-") => None,
        _ => Some("Redis has an unknown maxmemory-policy"),
    }
}

impl RedisKeyStore {
    /// Reads Redis's `maxmemory-policy` and, where it lets Redis evict key records, warns or
    /// refuses as `on_evictable` says. Call it at start-up. The settings keygate needs are
    /// `noeviction` (writes past `maxmemory` then fail with `OOM`, which the gate answers with
    /// `503` and logs) or a `volatile-*` policy (records never expire, so they are never evicted).
    /// A Redis that does not allow `CONFIG GET` (some managed services) is logged and passes.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when Redis cannot be reached, or with [`EvictionPolicy::Refuse`]
    /// when the policy lets it evict key records.
    pub async fn check(&self, on_evictable: EvictionPolicy) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory-policy");
        let asked = command.query_async::<Vec<String>>(&mut conn);
        let reply = match self.timed(asked).await {
            Ok(reply) => reply,
            Err(error) if error.to_string().contains("unknown command") || error.to_string().contains("NOPERM") => {
                tracing::warn!(%error, "keygate: cannot read Redis's maxmemory-policy; it must be noeviction or volatile-*");
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let policy = reply.get(1).map_or("", String::as_str);
        let Some(problem) = verdict(policy) else { return Ok(()) };
        match on_evictable {
            EvictionPolicy::Warn => {
                tracing::warn!(policy, "keygate: {problem}; set maxmemory-policy to noeviction or volatile-*");
                Ok(())
            }
            EvictionPolicy::Refuse => Err(StoreError::Backend(format!(
                "{problem}: maxmemory-policy is {policy:?}; set it to noeviction or volatile-*"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn only_policies_that_can_evict_records_are_refused() {
        for ok in ["noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"] {
            assert_eq!(verdict(ok), None, "{ok}");
        }
        for bad in ["allkeys-lru", "allkeys-lfu", "allkeys-random", "", "something-new"] {
            assert!(verdict(bad).is_some(), "{bad}");
        }
    }
}
