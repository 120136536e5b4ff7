//! One connection type for every Redis topology keygate runs on (feature `redis`): a single node
//! (plain or TLS), a Cluster (feature `redis-cluster`) or a Sentinel-managed primary (feature
//! `redis-sentinel`), with the reconnection policy keygate's decisions need.
//!
//! Why keygate does not hand this to the redis crate's `ConnectionManager`: its backoff grows to
//! minutes, it never notices a connection that went silent (no error, no answer), and it keeps
//! writing to a primary that Sentinel demoted. [`RedisConnection`] instead drops a connection at
//! the first sign it is dead (an I/O error, `READONLY`, no answer for [`dead_after`]), reconnects
//! with a capped, jittered backoff, and fails fast in between, so a decision waits for its own
//! timeout at most and Redis is used again within about a second of coming back.
//!
//! [`dead_after`]: RedisConnection::dead_after

mod link;
#[cfg(feature = "redis-sentinel")]
mod sentinel;

use link::{Link, Opener, Settings};
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::Arc;
use std::time::Duration;

/// A connection to Redis that covers a single node, a Cluster and a Sentinel-managed primary,
/// and recovers by itself: every Redis-backed part of keygate ([`RedisLimiter`],
/// [`RedisKeyStore`]) takes one.
///
/// Cloning is cheap and clones share one connection. Constructors do no I/O (an application
/// starts while Redis is down); the first command connects, and [`check`](Self::check) does so
/// on demand.
///
/// | Topology | Constructor | Feature |
/// |---|---|---|
/// | one node, `redis://` or `rediss://` | [`open`](Self::open), [`node`](Self::node) | `redis` (`rediss://`: `redis-tls`) |
/// | Redis Cluster | [`cluster`](Self::cluster) | `redis-cluster` |
/// | Sentinel | [`sentinel`](Self::sentinel) | `redis-sentinel` |
///
/// [`RedisLimiter`]: crate::limit::RedisLimiter
/// [`RedisKeyStore`]: crate::store::RedisKeyStore
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(keygate_redis_url, doc = "```rust")]
#[cfg_attr(not(keygate_redis_url), doc = "```rust,ignore")]
#[doc = include_str!("../../docs/redis_connection.md")]
#[derive(Clone)]
pub struct RedisConnection {
    link: Arc<Link>,
}

impl RedisConnection {
    /// A connection to the single node at `url` (`redis://host:port/db`, or `rediss://` with the
    /// `redis-tls` feature).
    ///
    /// # Errors
    /// When `url` is not a Redis URL.
    pub fn open(url: &str) -> redis::RedisResult<Self> {
        Ok(Self::node(redis::Client::open(url)?))
    }

    /// A connection to the single node `client` points at: use this for TLS with your own root
    /// certificate (`redis::Client::build_with_tls`) or for credentials set in code.
    #[must_use]
    pub fn node(client: redis::Client) -> Self {
        Self::with(Opener::Node(client))
    }

    /// A connection to a Redis Cluster; keygate's keys are hash-tagged so each script runs on one
    /// node.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    #[must_use]
    pub fn cluster(client: redis::cluster::ClusterClient) -> Self {
        Self::with(Opener::Cluster(Box::new(client)))
    }

    /// A connection to the primary that the sentinels at `sentinels` name for `service`,
    /// following failovers: on Sentinel's `+switch-master`, on `READONLY` and on a lost
    /// connection it asks the sentinels again, and it uses a node only once that node says it is
    /// a primary.
    ///
    /// # Errors
    /// When a sentinel address is not a Redis URL.
    #[cfg(feature = "redis-sentinel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-sentinel")))]
    pub fn sentinel<T: redis::IntoConnectionInfo>(sentinels: Vec<T>, service: &str) -> redis::RedisResult<Self> {
        let client = redis::sentinel::SentinelClient::build(
            sentinels,
            // A `String` in one of the redis crate's two signatures, `impl AsRef<str>` in the other.
            String::from(service),
            None,
            redis::sentinel::SentinelServerType::Master,
        )?;
        Ok(Self::sentinel_client(client, service))
    }

    /// Like [`sentinel`](Self::sentinel), from a client built with credentials or TLS settings
    /// for the sentinels and the nodes; `service` is the name it was built with.
    #[cfg(feature = "redis-sentinel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-sentinel")))]
    #[must_use]
    pub fn sentinel_client(client: redis::sentinel::SentinelClient, service: &str) -> Self {
        Self::with(Opener::Sentinel(sentinel::Follower::new(client, service)))
    }

    fn with(opener: Opener) -> Self {
        Self { link: Arc::new(Link::new(opener, Settings::default())) }
    }

    /// How long one connection attempt may take (default 500 ms).
    #[must_use]
    pub fn connect_timeout(self, timeout: Duration) -> Self {
        self.configure(|s| s.connect_timeout = timeout.max(Duration::from_millis(1)))
    }

    /// The longest wait between two connection attempts (default 500 ms; the wait starts at
    /// 25 ms, doubles, and is jittered by up to a half so that instances do not reconnect in step).
    #[must_use]
    pub fn max_backoff(self, max: Duration) -> Self {
        self.configure(|s| s.max_backoff = max.max(Duration::from_millis(1)))
    }

    /// How long a connection may leave commands unanswered before it is taken for dead and
    /// replaced (default 1 s). This is what notices a connection that died silently (no reset),
    /// and a stalled server, which a new connection will wait for instead.
    #[must_use]
    pub fn dead_after(self, after: Duration) -> Self {
        self.configure(|s| s.dead_after = after.max(Duration::from_millis(1)))
    }

    /// A write counts only once `replicas` replicas have it (`WAIT`, in the same round trip as the
    /// write), waiting at most `timeout` for them. This is what makes a Sentinel failover exact:
    /// a write that reached only a primary being demoted (its replica already promoted) is not
    /// confirmed, so the limiter does not admit on it (it falls back and takes the write back),
    /// and the connection is replaced. Off (0) by default; with a replica on the same network a
    /// write costs a replication round trip more.
    ///
    /// With Sentinel, a primary is held to the replicas it has been seen with (up to `replicas`):
    /// a new primary just after a failover has one replica fewer until the demoted one rejoins,
    /// and writes there count meanwhile; the requirement rises again (counted every 500 ms) as
    /// replicas come back. A single node is always held to `replicas`; a Cluster connection
    /// ignores this (Redis Cluster's own failover can lose acknowledged writes the same way).
    #[must_use]
    pub fn wait_for_replicas(self, replicas: u32, timeout: Duration) -> Self {
        self.configure(|s| {
            s.replicas = replicas;
            s.replica_timeout = timeout.max(Duration::from_millis(1));
        })
    }

    /// Runs a script that writes, confirmed by replicas if [`wait_for_replicas`](Self::wait_for_replicas)
    /// asks for them; an unconfirmed write is an error (and the connection is replaced).
    pub(crate) async fn write<'a, T: redis::FromRedisValue>(
        &self,
        call: impl Into<ScriptCall<'a>>,
    ) -> redis::RedisResult<T> {
        let call = call.into();
        let mut conn = self.clone();
        if self.link.settings().replicas == 0 || self.topology() == "cluster" {
            return call.invoke(&mut conn).await;
        }
        #[cfg(feature = "redis-sentinel")]
        if self.link.recount_due() {
            if let Ok(Some(replicas)) = sentinel::replicas_of_primary(&mut conn).await {
                self.link.seen_replicas(replicas);
            }
        }
        let required = self.link.required_replicas();
        if required == 0 {
            return call.invoke(&mut conn).await;
        }
        let wait_ms = self.link.settings().replica_timeout.as_millis() as u64;
        let mut pipe = redis::pipe();
        call.add_to(&mut pipe);
        pipe.cmd("WAIT").arg(required).arg(wait_ms);
        let (value, confirmed): (T, u32) = match pipe.query_async(&mut conn).await {
            Err(e) if is_no_script(&e) => {
                call.load(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            other => other?,
        };
        if confirmed < required {
            self.reset();
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "write not confirmed by replicas",
                format!("{confirmed} of {required} within {wait_ms} ms"),
            )));
        }
        Ok(value)
    }

    fn configure(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.link.settings().clone();
        change(&mut settings);
        Self { link: Arc::new(Link::new(self.link.opener().clone(), settings)) }
    }

    /// Connects now if not connected (constructors do not) and sends a `PING`: call it at
    /// start-up to fail there rather than on the first request.
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses.
    pub async fn check(&self) -> redis::RedisResult<()> {
        let mut conn = self.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await
    }

    /// A second connection of the same kind and settings that shares nothing with this one: for a
    /// blocking read, which would hold up every command queued behind it on a shared connection.
    pub(crate) fn dedicated(&self) -> Self {
        Self { link: Arc::new(Link::new(self.link.opener().clone(), self.link.settings().clone())) }
    }

    /// Drops the current connection, so the next command opens a new one.
    pub(crate) fn reset(&self) {
        self.link.reset();
    }

    /// The topology's name (`node`, `cluster`, `sentinel`), for `Debug` and for what differs by
    /// topology (a Cluster connection sends no `WAIT`).
    pub(crate) fn topology(&self) -> &'static str {
        self.link.opener().topology()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.link.run(move |mut conn| async move { conn.req_packed_command(cmd).await }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.link.run(move |mut conn| async move { conn.req_packed_commands(pipeline, offset, count).await }))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A script to run: a [`redis::ScriptInvocation`], or an `EVALSHA` command built whole (its keys
/// and arguments written into one buffer, which a large batch needs) with the script it names.
/// Either way a Redis that does not have the script yet (`NOSCRIPT`) is sent it, and the call
/// is made again.
pub(crate) enum ScriptCall<'a> {
    Invocation(&'a redis::ScriptInvocation<'a>),
    Eval(&'a redis::Script, &'a Cmd),
}

impl<'a> From<&'a redis::ScriptInvocation<'a>> for ScriptCall<'a> {
    fn from(invocation: &'a redis::ScriptInvocation<'a>) -> Self {
        Self::Invocation(invocation)
    }
}

/// An `EVALSHA` of `script` with `keys` keys, to which the caller adds the keys, then the arguments.
pub(crate) fn evalsha(script: &redis::Script, keys: usize) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

fn is_no_script(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

impl ScriptCall<'_> {
    async fn invoke<T: redis::FromRedisValue>(&self, conn: &mut RedisConnection) -> redis::RedisResult<T> {
        match self {
            Self::Invocation(invocation) => invocation.invoke_async(conn).await,
            Self::Eval(script, cmd) => match cmd.query_async(conn).await {
                Err(e) if is_no_script(&e) => {
                    script.load_async(conn).await?;
                    cmd.query_async(conn).await
                }
                other => other,
            },
        }
    }

    fn add_to(&self, pipe: &mut Pipeline) {
        match self {
            Self::Invocation(invocation) => drop(pipe.invoke_script(invocation)),
            Self::Eval(_, cmd) => drop(pipe.add_command((*cmd).clone())),
        }
    }

    async fn load(&self, conn: &mut RedisConnection) -> redis::RedisResult<String> {
        match self {
            Self::Invocation(invocation) => invocation.load_async(conn).await,
            Self::Eval(script, _) => script.load_async(conn).await,
        }
    }
}

impl std::fmt::Debug for RedisConnection {
    /// The topology only: a URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection").field("topology", &self.topology()).finish_non_exhaustive()
    }
}

/// With both rustls back ends in one build (reqwest brings one), rustls cannot pick a default,
/// and the redis crate's TLS set-up would panic: install one unless the application did.
#[cfg(feature = "redis-tls")]
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
