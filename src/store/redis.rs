//! Keys in Redis, shared by every instance, with revocations published to all of them (feature
//! `redis`).

use super::{KeyStore, StoreError, StoredKey};
use crate::boxed::BoxFuture;
use crate::key::KeyDigest;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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
    conn: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
}

/// Inserts a record and its id, unless either is taken.
const INSERT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"#;

/// Stores a record under its digest and points its id at it; removes the record its id pointed at
/// before (rotation); publishes the digest that changed meaning.
/// KEYS: record, id; ARGV: json, digest, key prefix, channel.
const PUT: &str = r#"
local old = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
if old and old ~= ARGV[2] then
  redis.call('DEL', ARGV[3] .. old)
  redis.call('PUBLISH', ARGV[4], old)
end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"#;

fn script(which: &'static str) -> &'static redis::Script {
    static INSERT_: OnceLock<redis::Script> = OnceLock::new();
    static PUT_: OnceLock<redis::Script> = OnceLock::new();
    let cell = if which == INSERT { &INSERT_ } else { &PUT_ };
    cell.get_or_init(|| redis::Script::new(which))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisKeyStore {
    /// A store on `conn` with its keys under `prefix`.
    #[must_use]
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self { conn, prefix: prefix.into(), timeout: Duration::from_millis(200) }
    }

    /// How long one operation may wait for Redis (default 200 ms); past it, the operation fails and
    /// the gate answers `503` (or a stale cached answer).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The revocation channel.
    #[must_use]
    pub fn channel(&self) -> String {
        format!("{}:revoked", self.prefix)
    }

    fn record_key(&self, digest: &KeyDigest) -> String {
        format!("{}:key:{digest}", self.prefix)
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}:id:{id}", self.prefix)
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

    async fn load(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError> {
        let record = self.record_key(digest);
        let get = || {
            let mut conn = self.conn.clone();
            let record = record.clone();
            async move { redis::cmd("GET").arg(record).query_async::<Option<String>>(&mut conn).await }
        };
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            match get().await {
                // A dead connection (Redis restarted) fails the first command on it, and the
                // manager reconnects: a read is safe to send once more, on the new connection.
                Err(e) if e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal() => get().await,
                other => other,
            }
        })
        .await;
        let outcome = match &answer {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        crate::observe::redis_store(outcome, started.elapsed());
        let json = answer.map_err(|_| self.timed_out())?.map_err(backend)?;
        json.map(|j| serde_json::from_str(&j).map_err(backend)).transpose()
    }

    /// Subscribes to revocations, calling `on_revoke` with each revoked digest, from a background
    /// task that resubscribes by itself after a disconnection (revocations published meanwhile are
    /// missed: the cache's positive TTL bounds how long such a key keeps working).
    pub fn listen(&self, client: redis::Client, on_revoke: impl Fn(&KeyDigest) + Send + Sync + 'static) {
        let channel = self.channel();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            backoff = Duration::from_millis(50);
                            let mut messages = pubsub.on_message();
                            while let Some(message) = messages.next().await {
                                match message.get_payload::<String>().map(|p| p.parse::<KeyDigest>()) {
                                    Ok(Ok(digest)) => {
                                        crate::observe::revocation_received();
                                        on_revoke(&digest);
                                    }
                                    _ => tracing::warn!("keygate: unreadable revocation message ignored"),
                                }
                            }
                            tracing::warn!("keygate: revocation subscription lost; resubscribing");
                        }
                        Err(error) => tracing::warn!(%error, "keygate: could not subscribe to revocations"),
                    },
                    Err(error) => tracing::warn!(%error, "keygate: could not connect for revocations"),
                }
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(Duration::from_secs(5));
            }
        });
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
            let mut conn = this.conn.clone();
            let digest: Option<String> = this.timed(redis::cmd("GET").arg(id_key).query_async(&mut conn)).await?;
            let Some(digest) = digest.map(|d| d.parse::<KeyDigest>().map_err(backend)).transpose()? else {
                return Ok(None);
            };
            Ok(this.load(&digest).await?.map(|k| (digest, k)))
        })
    }

    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let json = serde_json::to_string(&key).map_err(backend)?;
            let mut invocation = script(INSERT).prepare_invoke();
            invocation.key(this.record_key(&digest)).key(this.id_key(&key.facts.id)).arg(json).arg(digest.to_string());
            let mut conn = this.conn.clone();
            let inserted: i64 = this.timed(invocation.invoke_async(&mut conn)).await?;
            if inserted == 1 {
                Ok(())
            } else {
                Err(StoreError::Exists(key.facts.id.clone()))
            }
        })
    }

    fn put(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let json = serde_json::to_string(&key).map_err(backend)?;
            let mut invocation = script(PUT).prepare_invoke();
            invocation
                .key(this.record_key(&digest))
                .key(this.id_key(&key.facts.id))
                .arg(json)
                .arg(digest.to_string())
                .arg(format!("{}:key:", this.prefix))
                .arg(this.channel());
            let mut conn = this.conn.clone();
            let _: i64 = this.timed(invocation.invoke_async(&mut conn)).await?;
            Ok(())
        })
    }
}

impl std::fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeyStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}
