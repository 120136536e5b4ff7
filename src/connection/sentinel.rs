//! Following a Sentinel-managed primary (feature `redis-sentinel`).
//!
//! A connection is opened to the node the sentinels name, and used only once that node says
//! (`ROLE`) it is a primary. A watcher listens for Sentinel's `+switch-master` and, between
//! events (a subscription can die without a word), asks the sentinels every
//! [`POLL`]; either way a new primary bumps the epoch, and every link then drops the connection
//! it opened under the old one before its next command.

use futures_util::StreamExt;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, ConnectionAddr, RedisError, RedisResult, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How often the watcher asks the sentinels who the primary is, whatever it heard.
const POLL: Duration = Duration::from_millis(500);

pub(crate) struct Follower {
    client: tokio::sync::Mutex<SentinelClient>,
    service: String,
    /// Bumped whenever the primary changes (or may have).
    epoch: AtomicU64,
    /// The primary the last connection was opened to, and how many replicas it has been seen
    /// with: a write there needs that many (up to what the connection asks), for good.
    current: Mutex<Option<(ConnectionAddr, u32)>>,
    watching: AtomicBool,
}

impl Follower {
    pub(super) fn new(client: SentinelClient, service: &str) -> Arc<Self> {
        Arc::new(Self {
            client: tokio::sync::Mutex::new(client),
            service: service.to_owned(),
            epoch: AtomicU64::new(0),
            current: Mutex::new(None),
            watching: AtomicBool::new(false),
        })
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A connection to the primary, checked to be one, and how many replicas a write there must
    /// reach (at most `wanted`).
    ///
    /// Why not always `wanted`: right after a failover the new primary has one replica fewer
    /// (the demoted primary rejoins later), and demanding it would refuse every write until then.
    /// Why never fewer than before on the same primary: a primary being demoted has just lost
    /// the replica that was promoted, and a write it takes then is lost; demanding the replicas
    /// it had is what refuses that write.
    pub(super) async fn open(
        self: &Arc<Self>,
        config: &AsyncConnectionConfig,
        wanted: u32,
    ) -> RedisResult<(redis::aio::MultiplexedConnection, u32)> {
        self.start_watching();
        let client = self.client.lock().await.async_get_client().await?;
        let addr = client.get_connection_info().addr().clone();
        let mut conn = client.get_multiplexed_async_connection_with_config(config).await?;
        let Some(replicas) = replicas_of_primary(&mut conn).await? else {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the node Sentinel named is not a primary (yet)",
            )));
        };
        let mut current = crate::lock::lock(&self.current);
        let floor = match current.as_ref() {
            Some((was, floor)) if was.to_string() == addr.to_string() => (*floor).max(replicas),
            _ => replicas,
        };
        *current = Some((addr, floor));
        Ok((conn, floor.min(wanted)))
    }

    /// The current primary was seen with `replicas` replicas: writes there need as many from now.
    pub(super) fn seen_replicas(&self, replicas: u32) {
        if let Some((_, floor)) = crate::lock::lock(&self.current).as_mut() {
            *floor = (*floor).max(replicas);
        }
    }

    fn start_watching(self: &Arc<Self>) {
        if !self.watching.swap(true, Ordering::AcqRel) {
            tokio::spawn(watch(Arc::downgrade(self)));
        }
    }

    /// The primary may have changed: every connection opened before is dropped before its next use.
    fn moved(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Asks the sentinels who the primary is; a different answer than the current one is a move.
    async fn poll(&self) {
        let Ok(client) = self.client.lock().await.async_get_client().await else { return };
        let named = client.get_connection_info().addr().to_string();
        let current = crate::lock::lock(&self.current).as_ref().map(|(addr, _)| addr.to_string());
        if current.is_some_and(|c| c != named) {
            tracing::info!("keygate: Sentinel names a new Redis primary; switching");
            self.moved();
        }
    }

    async fn subscribe(&self) -> RedisResult<redis::aio::PubSubStream> {
        let sentinel = self.client.lock().await.async_get_sentinel_client().await?;
        let mut pubsub = sentinel.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        Ok(pubsub.into_on_message())
    }
}

/// Listens for `+switch-master` and polls between events, until the follower is dropped.
async fn watch(follower: Weak<Follower>) {
    let mut wait = Duration::from_millis(50);
    loop {
        let Some(me) = follower.upgrade() else { return };
        let subscribed = me.subscribe().await;
        drop(me);
        if let Ok(mut events) = subscribed {
            wait = Duration::from_millis(50);
            loop {
                let next = tokio::time::timeout(POLL, events.next()).await;
                let Some(me) = follower.upgrade() else { return };
                match next {
                    Ok(Some(event)) => {
                        let payload: String = event.get_payload().unwrap_or_default();
                        // "<service> <old ip> <old port> <new ip> <new port>"
                        if payload.split(' ').next() == Some(me.service.as_str()) {
                            tracing::info!("keygate: Sentinel switched the Redis primary; switching");
                            me.moved();
                        }
                    }
                    Ok(None) => break,
                    Err(_) => me.poll().await,
                }
            }
        }
        // Events may have been missed while not subscribed.
        let Some(me) = follower.upgrade() else { return };
        me.poll().await;
        drop(me);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(POLL);
    }
}

/// How many replicas a node has, by `ROLE`; `None` if it is not a primary.
pub(super) async fn replicas_of_primary(conn: &mut impl redis::aio::ConnectionLike) -> RedisResult<Option<u32>> {
    let role: Vec<Value> = redis::cmd("ROLE").query_async(conn).await?;
    Ok(match role.as_slice() {
        [Value::BulkString(b), _, Value::Array(replicas), ..] if b == b"master" => Some(replicas.len() as u32),
        [Value::BulkString(b), ..] if b == b"master" => Some(0),
        _ => None,
    })
}
