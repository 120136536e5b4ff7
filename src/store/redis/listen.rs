//! The revocation listener: reads the revocation stream from the last entry it saw, so that a
//! lost connection loses nothing.
//!
//! Why a stream and not pub/sub: a message published while a subscriber reconnects is gone, and a
//! subscriber whose connection died silently never hears it was dropped. A blocking `XREAD` from
//! the last id seen returns as soon as an entry is added (the healthy path), times out every
//! [`BLOCK`] (the health check: no answer by [`BLOCK`] + [`GRACE`] means the connection is dead,
//! and it is replaced), and after any break it resumes from the last id, catching up on what was
//! added meanwhile.

use super::RedisKeyStore;
use crate::connection::RedisConnection;
use crate::key::KeyDigest;
use crate::outage::Outage;
use crate::store::Revoked;
use redis::streams::StreamReadReply;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// How long one `XREAD` blocks waiting for a revocation.
const BLOCK: Duration = Duration::from_millis(400);
/// How much longer than [`BLOCK`] an answer may take before the connection is taken for dead.
const GRACE: Duration = Duration::from_millis(300);
/// The most entries read at once.
const BATCH: usize = 1000;

/// A stream entry id, `<ms>-<seq>`, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

impl RedisKeyStore {
    /// Reads revocations, from a background task on a connection of its own, and calls
    /// `on_revoke` for each: [`Revoked::Key`] with the digest of every key whose record changed
    /// on any instance, within milliseconds; [`Revoked::All`] when some may have been missed.
    /// Hand them to the cache in front of the verifier with
    /// [`CachedVerifier::revoke`](crate::cache::CachedVerifier::revoke).
    ///
    /// After the connection breaks or goes silent, the listener reconnects and reads what was
    /// added meanwhile, so a revocation is never lost while Redis keeps it (the stream holds about
    /// [`STREAM_LEN`](super::STREAM_LEN) entries). While an instance cannot reach Redis at all it
    /// cannot learn of revocations: a key revoked then keeps working there for at most the cache's
    /// `positive_ttl` + `max_stale` from the moment the instance was cut off.
    pub fn listen(&self, on_revoke: impl Fn(Revoked<'_>) + Send + Sync + 'static) {
        let (conn, stream) = (self.conn.dedicated(), self.stream());
        tokio::spawn(run(conn, stream, on_revoke));
    }
}

async fn run(conn: RedisConnection, stream: String, on_revoke: impl Fn(Revoked<'_>)) {
    let outage = Outage::new("Redis (revocations)", "cached keys stay until their TTL");
    let mut last: Option<EntryId> = None;
    let mut resume = true;
    loop {
        if resume {
            match tokio::time::timeout(BLOCK + GRACE, position(&conn, &stream, last)).await {
                Ok(Ok((at, missed))) => {
                    if missed {
                        tracing::warn!("keygate: revocations may have been missed while cut off; dropping the cache");
                        on_revoke(Revoked::All);
                    }
                    last = Some(at);
                    resume = false;
                    outage.recovered();
                }
                Ok(Err(error)) => {
                    outage.failed(&error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => {
                    outage.failed(&"no answer");
                    conn.reset();
                }
            }
            continue;
        }
        let from = last.unwrap_or_default();
        match tokio::time::timeout(BLOCK + GRACE, read(&conn, &stream, from)).await {
            Ok(Ok(entries)) => {
                for (id, digest) in entries {
                    last = Some(id);
                    match digest {
                        Some(digest) => {
                            crate::observe::revocation_received(lag(id));
                            on_revoke(Revoked::Key(&digest));
                        }
                        None => tracing::warn!("keygate: unreadable revocation entry ignored"),
                    }
                }
            }
            Ok(Err(error)) => {
                outage.failed(&error);
                resume = true;
            }
            Err(_) => {
                // Silent: replace the connection, then check nothing was trimmed meanwhile.
                outage.failed(&"no answer to a blocking read");
                conn.reset();
                resume = true;
            }
        }
    }
}

/// How long ago Redis added the entry (its id's time is Redis's clock; on one host, exact).
fn lag(id: EntryId) -> Duration {
    let added = SystemTime::UNIX_EPOCH + Duration::from_millis(id.0);
    SystemTime::now().duration_since(added).unwrap_or_default()
}

/// Where to read from, and whether entries after `last` were lost: the stream's end the first
/// time; afterwards `last`, and "missed" when the stream dropped an entry after it or is gone.
async fn position(conn: &RedisConnection, stream: &str, last: Option<EntryId>) -> redis::RedisResult<(EntryId, bool)> {
    let mut conn = conn.clone();
    let info: redis::RedisResult<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("STREAM").arg(stream).query_async(&mut conn).await;
    let info = match info {
        Ok(info) => info,
        // No stream yet (no key ever changed), or it was lost (flushed, evicted).
        Err(e) if e.code() == Some("ERR") && e.to_string().contains("no such key") => {
            return Ok((EntryId::default(), last.is_some_and(|l| l > EntryId::default())));
        }
        Err(e) => return Err(e),
    };
    let id = |field: &str| match info.get(field) {
        Some(redis::Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(EntryId::parse),
        Some(redis::Value::SimpleString(s)) => EntryId::parse(s),
        _ => None,
    };
    let end = id("last-generated-id").unwrap_or_default();
    Ok(match last {
        None => (end, false),
        // A stream that restarted below what was seen was lost and made again.
        Some(last) => (last.min(end), id("max-deleted-entry-id").unwrap_or_default() > last || end < last),
    })
}

/// The entries after `from`, waiting up to [`BLOCK`] for one.
async fn read(
    conn: &RedisConnection,
    stream: &str,
    from: EntryId,
) -> redis::RedisResult<Vec<(EntryId, Option<KeyDigest>)>> {
    let mut conn = conn.clone();
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(from.to_string())
        .query_async(&mut conn)
        .await?;
    let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
    Ok(entries
        .filter_map(|e| {
            let id = EntryId::parse(&e.id)?;
            let digest = match e.map.get("d") {
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
                _ => None,
            };
            Some((id, digest))
        })
        .collect())
}
