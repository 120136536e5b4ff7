//! The revocation listener: `LISTEN` on the store's channel, on a connection of its own, with a
//! health check, and everything forgotten after any break.
//!
//! A notification sent while the listener is not connected is gone, so the listener cannot catch
//! up entry by entry as it does on a Redis stream. It does the safe thing instead: once it is
//! listening again, it tells the cache to forget everything ([`Revoked::All`]); every key is then
//! read again from the database, which has every change. Breaks are rare; a reload per key is
//! their cost.
//!
//! A connection can also die silently (a host gone, a stalled server): `LISTEN` alone would wait
//! forever. So the listener also listens on a channel of its own and, every [`PING_EVERY`], sends
//! itself a notification through the pool; one not heard back within [`DEAD_AFTER`] means the
//! connection is dead, and it is replaced.

use super::PostgresKeyStore;
use crate::outage::Outage;
use crate::store::Revoked;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPool, PgPoolOptions};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// How often the listener checks its connection.
const PING_EVERY: Duration = Duration::from_millis(500);
/// How long a ping may go unanswered before the connection is taken for dead.
const DEAD_AFTER: Duration = Duration::from_millis(1000);
/// The wait before connecting again after a failure (doubled up to [`MAX_BACKOFF`]).
const BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(1000);

impl PostgresKeyStore {
    /// Listens for revocations, from a background task on a connection of its own, and calls
    /// `on_revoke` for each: [`Revoked::Key`] with the digest of every key whose record changed
    /// (through keygate on any instance, or in SQL), within milliseconds of the commit; and
    /// [`Revoked::All`] each time the listener starts listening, first or after a break, since
    /// what was announced meanwhile is lost. Hand them to the cache in front of the verifier with
    /// [`CachedVerifier::revoke`](crate::cache::CachedVerifier::revoke).
    ///
    /// A connection that breaks is noticed at once; one that dies silently within 2 s (the next
    /// ping, at most 0.5 s away, unanswered for 1 s, seen at the tick after). While an instance cannot reach PostgreSQL at all,
    /// it cannot learn of revocations: a key revoked then keeps working there for at most the
    /// cache's `positive_ttl` + `max_stale` from the moment it was cut off.
    pub fn listen(&self, on_revoke: impl Fn(Revoked<'_>) + Send + Sync + 'static) {
        tokio::spawn(run(self.pool.clone(), self.channel(), on_revoke));
    }
}

/// What the reading task hands the supervisor.
enum Heard {
    Note(PgNotification),
    /// The connection broke (or the read failed): listen again.
    Lost(String),
}

async fn run(pool: PgPool, channel: String, on_revoke: impl Fn(Revoked<'_>)) {
    let outage = Outage::new("PostgreSQL (revocations)", "cached keys stay until their TTL");
    let mut backoff = BACKOFF;
    loop {
        let ping = format!("keygate-ping:{:016x}", rand_u64());
        let listener = match tokio::time::timeout(DEAD_AFTER, connect(&pool, &channel, &ping)).await {
            Ok(Ok(listener)) => listener,
            Ok(Err(error)) => {
                outage.failed(&error);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(_) => {
                outage.failed(&"no answer to LISTEN");
                continue;
            }
        };
        backoff = BACKOFF;
        outage.recovered();
        // Listening from here on: whatever was announced before is in the database.
        on_revoke(Revoked::All);
        let (tx, mut heard) = mpsc::unbounded_channel();
        // The read runs in a task of its own so that it is never cancelled half-way through a
        // message; the supervisor drops the whole connection instead.
        let reader = tokio::spawn(read(listener, tx));
        let mut tick = tokio::time::interval(PING_EVERY);
        let mut waiting_since: Option<Instant> = None;
        let why = loop {
            tokio::select! {
                message = heard.recv() => match message {
                    Some(Heard::Note(note)) if note.channel() == ping => waiting_since = None,
                    Some(Heard::Note(note)) => revoked(note.payload(), &on_revoke),
                    Some(Heard::Lost(why)) => break why,
                    None => break "the reader stopped".to_owned(),
                },
                _ = tick.tick() => {
                    if waiting_since.is_some_and(|at| at.elapsed() >= DEAD_AFTER) {
                        break "no answer to a ping".to_owned();
                    }
                    if waiting_since.is_none() {
                        waiting_since = Some(Instant::now());
                        // Through the pool, so a stalled server cannot stall the loop.
                        let (pool, ping) = (pool.clone(), ping.clone());
                        tokio::spawn(async move {
                            let sent = async {
                                let mut conn = super::Held::acquire(&pool).await?;
                                sqlx::query("SELECT pg_notify($1, '')").bind(ping).execute(conn.as_mut()).await?;
                                conn.done();
                                Ok::<_, sqlx::Error>(())
                            };
                            let _ = tokio::time::timeout(DEAD_AFTER, sent).await;
                        });
                    }
                }
            }
        };
        reader.abort();
        outage.failed(&why);
    }
}

async fn connect(pool: &PgPool, channel: &str, ping: &str) -> Result<PgListener, sqlx::Error> {
    // A pool of its own, one per connection: a listener given up for dead is dropped with a
    // clean-up (`UNLISTEN`) that waits on its silent peer, holding its pool slot until TCP gives up.
    // Taken from the store's pool, such slots would starve the lookups, one per silent death.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(DEAD_AFTER)
        .connect_lazy_with(PgConnectOptions::clone(&pool.connect_options()));
    let mut listener = PgListener::connect_with(&own).await?;
    // The supervisor notices a lost connection and starts over (with a cache flush); the
    // listener must not reconnect behind its back.
    listener.eager_reconnect(false);
    listener.listen_all([channel, ping]).await?;
    Ok(listener)
}

async fn read(mut listener: PgListener, tx: mpsc::UnboundedSender<Heard>) {
    loop {
        let heard = match listener.try_recv().await {
            Ok(Some(note)) => Heard::Note(note),
            Ok(None) => Heard::Lost("the connection closed".into()),
            Err(error) => Heard::Lost(error.to_string()),
        };
        let lost = matches!(heard, Heard::Lost(_));
        if tx.send(heard).is_err() || lost {
            return;
        }
    }
}

/// Applies one announcement: `sha256:<hex> <ms>`.
fn revoked(payload: &str, on_revoke: &impl Fn(Revoked<'_>)) {
    let (digest, at) = payload.split_once(' ').unwrap_or((payload, ""));
    match digest.parse() {
        Ok(digest) => {
            let at = at.parse::<u64>().map(crate::store::unix_ms::from_ms).unwrap_or_else(|_| SystemTime::now());
            crate::observe::revocation_received(SystemTime::now().duration_since(at).unwrap_or_default());
            on_revoke(Revoked::Key(&digest));
        }
        Err(_) => {
            // Not ours to read: forget everything rather than miss a revocation.
            tracing::warn!("keygate: unreadable revocation notification; dropping the cache");
            on_revoke(Revoked::All);
        }
    }
}

/// A value unlikely to repeat across instances, for the ping channel's name.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        return u64::from(std::process::id()) << 32 ^ nanos.as_nanos() as u64;
    }
    u64::from_le_bytes(bytes)
}
