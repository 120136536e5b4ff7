//! Keys in Redis, shared by every instance, with revocations on a Redis stream that every
//! instance reads (feature `redis`).
//!
//! Layout, all in one hash slot (`{prefix}`) so that every script runs on one Cluster node:
//! `{prefix}:key:<digest>` a key's record (JSON), `{prefix}:id:<id>` its digest, `{prefix}:ids`
//! the set of ids (for listing), `{prefix}:revoked` the stream of digests whose meaning changed
//! (capped near [`STREAM_LEN`]). A secret in its grace window after a rotation has a record of its
//! own, a copy of the key's that Redis expires a day after the window ends, rewritten at every change.

use super::{KeyStore, StoreError, StoredKey};
use crate::boxed::BoxFuture;
use crate::connection::RedisConnection;
use crate::key::KeyDigest;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

mod listen;
mod policy;

pub use policy::EvictionPolicy;

/// How long the record of a secret rotated away outlives its grace window.
const KEEP_EXPIRED: Duration = Duration::from_secs(24 * 3600);

/// About how many revocations the stream keeps: an instance cut off for longer than it takes to
/// make this many changes cannot tell which it missed, and drops its whole cache instead.
pub const STREAM_LEN: u64 = 10_000;

/// A [`KeyStore`] in Redis, shared by every instance: a key created, disabled or rotated on one is
/// seen by all.
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(keygate_redis_url, doc = "```rust")]
#[cfg_attr(not(keygate_redis_url), doc = "```rust,ignore")]
#[doc = include_str!("../../docs/redis_key_store.md")]
#[derive(Clone)]
pub struct RedisKeyStore {
    conn: RedisConnection,
    /// `{prefix}`: the hash tag every key of this store starts with.
    tag: Arc<str>,
    timeout: Duration,
}

/// Inserts a record and its id, unless either is taken.
/// KEYS: record, id, ids. ARGV: json, digest, id.
const INSERT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"#;

/// Compare-and-set: replaces the record the id points at if it is still the one read (same
/// digest, same revision), under a new digest for a rotation (removing the old one), and appends
/// the digests whose meaning changed to the revocation stream.
/// Then rewrites the records of the secrets in their grace window (a copy, expiring at the window's
/// end, or none), each also on the stream.
/// KEYS: current record, id, new record, stream, grace records…. ARGV: current digest, revision
/// read, new json, new digest, stream length, then for each grace record: its digest, its json
/// ('' to delete), its time to live in ms.
/// Returns 1 if replaced, 0 if the key changed since it was read, -1 if the new digest is taken.
const REPLACE: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local rev = cjson.decode(current)['rev'] or 0
if tostring(rev) ~= ARGV[2] then return 0 end
if KEYS[3] ~= KEYS[1] then
  if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[4])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[1])
end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[4])
for i = 5, #KEYS do
  local a = 6 + (i - 5) * 3
  if ARGV[a + 1] == '' then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a + 2])
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[a])
end
return 1
"#;

fn script(which: usize) -> &'static redis::Script {
    static SCRIPTS: [OnceLock<redis::Script>; 2] = [const { OnceLock::new() }; 2];
    SCRIPTS[which].get_or_init(|| redis::Script::new([INSERT, REPLACE][which]))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Whether an error means the command may not have reached a live connection, so that a read
/// can be sent once more.
fn connection_broke(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal()
}

impl RedisKeyStore {
    /// A store on `conn` with its keys under `{prefix}`.
    #[must_use]
    pub fn new(conn: RedisConnection, prefix: &str) -> Self {
        Self { conn, tag: format!("{{{prefix}}}").into(), timeout: Duration::from_millis(200) }
    }

    /// How long one operation may wait for Redis (default 200 ms); past it, the operation fails and
    /// the gate answers `503` (or a stale cached answer).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The revocation stream's key.
    #[must_use]
    pub fn stream(&self) -> String {
        format!("{}:revoked", self.tag)
    }

    fn record_key(&self, digest: &KeyDigest) -> String {
        format!("{}:key:{digest}", self.tag)
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}:id:{id}", self.tag)
    }

    fn ids_key(&self) -> String {
        format!("{}:ids", self.tag)
    }

    async fn timed<T>(&self, op: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result.map_err(backend),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Backend(format!("Redis did not answer in {:?}", self.timeout))
    }

    /// A GET, sent once more if the connection broke under the first (a read is safe to repeat).
    async fn read(&self, key: &str) -> redis::RedisResult<Option<String>> {
        let get = || {
            let mut conn = self.conn.clone();
            async move { redis::cmd("GET").arg(key).query_async::<Option<String>>(&mut conn).await }
        };
        match get().await {
            Err(e) if connection_broke(&e) => get().await,
            other => other,
        }
    }

    async fn load(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError> {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.read(&self.record_key(digest))).await;
        let outcome = match &answer {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        crate::observe::redis_store(outcome, started.elapsed());
        let json = answer.map_err(|_| self.timed_out())?.map_err(backend)?;
        json.map(|j| serde_json::from_str(&j).map_err(backend)).transpose()
    }
}

impl KeyStore for RedisKeyStore {
    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>> {
        let (this, digest) = (self.clone(), *digest);
        Box::pin(async move { this.load(&digest).await })
    }

    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>> {
        let (this, id_key) = (self.clone(), self.id_key(id));
        Box::pin(async move {
            // Two reads, not one script: a script may only touch keys it declares, and the record's
            // key is known only after the first read. A rotation between the reads removes the
            // record the id pointed at; the id then points elsewhere, so read again.
            let mut pointed = None;
            for _ in 0..8 {
                let digest = this.timed(this.read(&id_key)).await?;
                let Some(digest) = digest.map(|d| d.parse::<KeyDigest>().map_err(backend)).transpose()? else {
                    return Ok(None);
                };
                if let Some(found) = this.load(&digest).await? {
                    return Ok(Some((digest, found)));
                }
                if pointed == Some(digest) {
                    return Ok(None); // the id points at a missing record, twice
                }
                pointed = Some(digest);
            }
            Err(StoreError::Backend("the key kept changing while it was read".into()))
        })
    }

    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let json = serde_json::to_string(&StoredKey { revision: 0, ..key.clone() }).map_err(backend)?;
            let mut invocation = script(0).prepare_invoke();
            let id = &key.facts.id;
            invocation.key(this.record_key(&digest)).key(this.id_key(id)).key(this.ids_key());
            invocation.arg(json).arg(digest.to_string()).arg(id);
            let inserted: i64 = this.timed(this.conn.write(&invocation)).await?;
            if inserted == 1 {
                Ok(())
            } else {
                Err(StoreError::Exists(key.facts.id.clone()))
            }
        })
    }

    fn replace(
        &self,
        current: KeyDigest,
        was: &StoredKey,
        digest: KeyDigest,
        next: StoredKey,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (this, id, revision) = (self.clone(), was.facts.id.clone(), was.revision);
        let previous = super::kept_previous(current, was, digest, &next);
        let next = StoredKey { revision: revision + 1, previous, ..next };
        // Every earlier secret's record is rewritten: kept ones as copies of `next`, others deleted.
        let mut earlier: Vec<KeyDigest> = was.previous.iter().map(|p| p.digest).collect();
        if digest != current {
            earlier.push(current);
        }
        let now = std::time::SystemTime::now();
        let grace: Result<Vec<(KeyDigest, Option<String>, u128)>, StoreError> = earlier
            .into_iter()
            .map(|d| {
                let kept = next.previous.iter().find(|p| p.digest == d);
                // Kept a day past its window, so that it is refused as expired (not unknown) then.
                let ttl =
                    kept.and_then(|p| p.until.duration_since(now).ok()).map_or(0, |t| (t + KEEP_EXPIRED).as_millis());
                let json = kept.filter(|_| ttl > 0).map(|p| serde_json::to_string(&next.grace_copy(p.until)));
                Ok((d, json.transpose()?, ttl))
            })
            .collect::<Result<_, serde_json::Error>>()
            .map_err(backend);
        Box::pin(async move {
            let grace = grace?;
            let json = serde_json::to_string(&next).map_err(backend)?;
            let mut invocation = script(1).prepare_invoke();
            invocation
                .key(this.record_key(&current))
                .key(this.id_key(&id))
                .key(this.record_key(&digest))
                .key(this.stream())
                .arg(current.to_string())
                .arg(revision)
                .arg(json)
                .arg(digest.to_string())
                .arg(STREAM_LEN);
            for (d, json, ttl) in &grace {
                invocation
                    .key(this.record_key(d))
                    .arg(d.to_string())
                    .arg(json.as_deref().unwrap_or(""))
                    .arg(*ttl as u64);
            }
            let replaced: i64 = this.timed(this.conn.write(&invocation)).await?;
            Ok(replaced == 1)
        })
    }

    fn list(&self, customer: Option<&str>) -> BoxFuture<'static, Result<Vec<(KeyDigest, StoredKey)>, StoreError>> {
        let (this, customer) = (self.clone(), customer.map(str::to_owned));
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let ids: Vec<String> =
                this.timed(redis::cmd("SMEMBERS").arg(this.ids_key()).query_async(&mut conn)).await?;
            let mut keys = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some((digest, key)) = this.find(&id).await? {
                    if customer.is_none() || key.facts.customer_id == customer {
                        keys.push((digest, key));
                    }
                }
            }
            keys.sort_by(|a, b| a.1.facts.id.cmp(&b.1.facts.id));
            Ok(keys)
        })
    }
}

impl std::fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeyStore").field("tag", &self.tag).finish_non_exhaustive()
    }
}
