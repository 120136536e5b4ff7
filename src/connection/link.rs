//! The connection state machine: one live connection or none, a dead one dropped at the first
//! sign, and reconnection attempts spaced by a capped, jittered backoff.
//!
//! It logs at DEBUG only: what uses the connection (the limiter, the key store, the revocation
//! listener) says at WARN what a Redis outage means for requests, once.

use crate::lock::lock;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a link connects and when it gives up on a connection.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) connect_timeout: Duration,
    pub(super) max_backoff: Duration,
    pub(super) dead_after: Duration,
    /// Replicas that must have a write before it counts, and how long to wait for them.
    pub(super) replicas: u32,
    pub(super) replica_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            max_backoff: Duration::from_millis(500),
            dead_after: Duration::from_secs(1),
            replicas: 0,
            replica_timeout: Duration::from_millis(50),
        }
    }
}

/// The first wait between attempts; it doubles up to [`Settings::max_backoff`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);

/// What opens a connection, per topology (made once per connection: its size does not matter).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub(super) enum Opener {
    Node(redis::Client),
    #[cfg(feature = "redis-cluster")]
    Cluster(Box<redis::cluster::ClusterClient>),
    #[cfg(feature = "redis-sentinel")]
    Sentinel(std::sync::Arc<super::sentinel::Follower>),
}

impl Opener {
    pub(super) fn topology(&self) -> &'static str {
        match self {
            Self::Node(_) => "node",
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(_) => "cluster",
            #[cfg(feature = "redis-sentinel")]
            Self::Sentinel(_) => "sentinel",
        }
    }

    /// A new connection, and how many replicas a write on it must reach.
    async fn open(&self, settings: &Settings) -> RedisResult<(Conn, u32)> {
        #[cfg(feature = "redis-tls")]
        super::ensure_crypto_provider();
        let config = AsyncConnectionConfig::new().set_connection_timeout(Some(settings.connect_timeout));
        match self {
            Self::Node(client) => {
                let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
                Ok((Conn::Node(conn), settings.replicas))
            }
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(client) => client.get_async_connection().await.map(|c| (Conn::Cluster(c), 0)),
            #[cfg(feature = "redis-sentinel")]
            Self::Sentinel(follower) => {
                let (conn, required) = follower.open(&config, settings.replicas).await?;
                Ok((Conn::Node(conn), required))
            }
        }
    }

    /// A count that changes when the connection this opener gave may point at the wrong server
    /// (Sentinel named a new primary); 0 for the topologies where that cannot happen.
    fn epoch(&self) -> u64 {
        match self {
            #[cfg(feature = "redis-sentinel")]
            Self::Sentinel(follower) => follower.epoch(),
            _ => 0,
        }
    }
}

/// One open connection of any topology.
#[derive(Clone)]
pub(super) enum Conn {
    Node(MultiplexedConnection),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(c) => c.get_db(),
        }
    }
}

struct State {
    /// The live connection, its generation and the opener's epoch when it was opened.
    live: Option<(Conn, u64, u64)>,
    generation: u64,
    /// Failed attempts in a row, and when the next may start.
    failures: u32,
    next_attempt: Instant,
}

pub(super) struct Link {
    opener: Opener,
    settings: Settings,
    state: Mutex<State>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    origin: Instant,
    /// When (ms after `origin`, plus one; 0 for never) the oldest command still unanswered was
    /// sent, counting only commands with no answer of any kind since.
    unanswered_since: AtomicU64,
    /// How many replicas a write on the live connection must reach.
    required: AtomicU32,
    /// When (ms after `origin`) the replicas were last counted while fewer than wanted.
    #[cfg(feature = "redis-sentinel")]
    counted_at: AtomicU64,
}

impl Link {
    pub(super) fn new(opener: Opener, settings: Settings) -> Self {
        let now = Instant::now();
        Self {
            opener,
            settings,
            state: Mutex::new(State { live: None, generation: 0, failures: 0, next_attempt: now }),
            connecting: tokio::sync::Mutex::new(()),
            origin: now,
            unanswered_since: AtomicU64::new(0),
            required: AtomicU32::new(0),
            #[cfg(feature = "redis-sentinel")]
            counted_at: AtomicU64::new(0),
        }
    }

    pub(super) fn opener(&self) -> &Opener {
        &self.opener
    }

    pub(super) fn settings(&self) -> &Settings {
        &self.settings
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// Runs one exchange on the live connection (opening one if needed), and learns from how it
    /// went whether the connection is still alive.
    pub(super) async fn run<T, F, Fut>(&self, exchange: F) -> RedisResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (conn, generation) = self.connection().await?;
        let mut watch = Watch { link: self, sent: self.now_ms(), answered: false };
        let result = exchange(conn).await;
        watch.answered = true;
        match &result {
            Err(e) if e.is_timeout() => self.unanswered(watch.sent),
            Err(e) if is_fatal(e) => self.drop_connection(generation, e),
            // Any answer, even an error, shows the connection alive.
            _ => self.unanswered_since.store(0, Ordering::Relaxed),
        }
        result
    }

    /// A command sent at `sent` got no answer (its caller gave up, or it timed out).
    fn unanswered(&self, sent: u64) {
        let _ = self.unanswered_since.compare_exchange(0, sent, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The live connection, or a new one; fails at once while the backoff says not yet.
    async fn connection(&self) -> RedisResult<(Conn, u64)> {
        if let Some(found) = self.live_or_wait()? {
            return Ok(found);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(found) = self.live_or_wait()? {
            return Ok(found);
        }
        let opened = tokio::time::timeout(self.settings.connect_timeout, self.opener.open(&self.settings)).await;
        let opened = opened.unwrap_or_else(|_| Err(connect_timed_out(self.settings.connect_timeout)));
        let mut state = lock(&self.state);
        match opened {
            Ok((conn, required)) => {
                self.required.store(required, Ordering::Relaxed);
                state.failures = 0;
                state.generation += 1;
                state.live = Some((conn.clone(), state.generation, self.opener.epoch()));
                self.unanswered_since.store(0, Ordering::Relaxed);
                tracing::debug!(topology = self.opener.topology(), "keygate: Redis connection opened");
                Ok((conn, state.generation))
            }
            Err(e) => {
                state.failures = state.failures.saturating_add(1);
                state.next_attempt = Instant::now() + backoff(state.failures, self.settings.max_backoff);
                tracing::debug!(error = %e, failures = state.failures, "keygate: Redis connection attempt failed");
                Err(e)
            }
        }
    }

    /// The live connection if it still looks alive; `None` when an attempt may start now; an
    /// error while the backoff runs.
    fn live_or_wait(&self) -> RedisResult<Option<(Conn, u64)>> {
        let mut state = lock(&self.state);
        if let Some((conn, generation, epoch)) = &state.live {
            let since = self.unanswered_since.load(Ordering::Relaxed);
            let silent =
                since != 0 && self.now_ms().saturating_sub(since) >= self.settings.dead_after.as_millis() as u64;
            let moved = *epoch != self.opener.epoch();
            if !silent && !moved {
                return Ok(Some((conn.clone(), *generation)));
            }
            let why = if moved { "Sentinel named a new primary" } else { "no answer within dead_after" };
            tracing::debug!(why, "keygate: Redis connection dropped");
            state.live = None;
            self.unanswered_since.store(0, Ordering::Relaxed);
            return Ok(None);
        }
        let now = Instant::now();
        if now < state.next_attempt {
            let wait = state.next_attempt - now;
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "Redis unreachable; next connection attempt pending",
                format!("in {wait:?}"),
            )));
        }
        Ok(None)
    }

    /// Drops the connection of `generation` (if still the live one) after `error` showed it dead.
    fn drop_connection(&self, generation: u64, error: &RedisError) {
        let mut state = lock(&self.state);
        if state.live.as_ref().is_some_and(|(_, g, _)| *g == generation) {
            state.live = None;
            tracing::debug!(%error, "keygate: Redis connection dropped");
        }
    }

    /// How many replicas a write must reach now.
    pub(super) fn required_replicas(&self) -> u32 {
        self.required.load(Ordering::Relaxed)
    }

    #[cfg(feature = "redis-sentinel")]
    /// Whether to count the primary's replicas again (fewer are required than wanted, and the
    /// last count is 500 ms old): a replica that came back raises the requirement.
    pub(super) fn recount_due(&self) -> bool {
        if self.required.load(Ordering::Relaxed) >= self.settings.replicas {
            return false;
        }
        let (now, last) = (self.now_ms(), self.counted_at.load(Ordering::Relaxed));
        now.saturating_sub(last) >= 500
            && self.counted_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    #[cfg(feature = "redis-sentinel")]
    /// The primary has `replicas` replicas: require as many (up to what is wanted), here and on
    /// every later connection to it.
    pub(super) fn seen_replicas(&self, replicas: u32) {
        if let Opener::Sentinel(follower) = &self.opener {
            follower.seen_replicas(replicas);
        }
        self.required.fetch_max(replicas.min(self.settings.replicas), Ordering::Relaxed);
    }

    /// Drops whatever connection is live.
    pub(super) fn reset(&self) {
        lock(&self.state).live = None;
    }
}

/// Marks a command unanswered if its caller drops it before the answer (the caller's timeout).
struct Watch<'a> {
    link: &'a Link,
    sent: u64,
    answered: bool,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.link.unanswered(self.sent);
        }
    }
}

/// Errors after which the connection is of no more use: it broke, or the server it reaches is no
/// longer a primary (after a failover, every write there would be lost).
fn is_fatal(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

fn connect_timed_out(after: Duration) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "Redis connection attempt timed out", format!("after {after:?}")))
}

/// The wait after `failures` failed attempts in a row: doubling from [`FIRST_BACKOFF`], capped at
/// `max`, then scaled by a random factor in [0.5, 1] so that instances spread out.
fn backoff(failures: u32, max: Duration) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let capped = doubled.min(max);
    let mut byte = [0u8; 1];
    let jitter = getrandom::fill(&mut byte).map_or(255, |()| byte[0]);
    capped / 2 + capped / 2 * u32::from(jitter) / 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered_within_bounds() {
        let max = Duration::from_millis(500);
        for failures in 1..40 {
            let ideal = FIRST_BACKOFF.saturating_mul(1 << (failures - 1).min(16)).min(max);
            for _ in 0..50 {
                let b = backoff(failures, max);
                assert!(b >= ideal / 2 && b <= ideal, "{failures}: {b:?} outside [{:?}, {ideal:?}]", ideal / 2);
            }
        }
        assert!(backoff(u32::MAX, Duration::from_millis(1)) <= Duration::from_millis(1));
    }
}
