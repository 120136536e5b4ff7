//! Rate limits and usage shared by every instance, in Redis (feature `redis`).

use super::{Denied, LimitError, LimitRequest, LimitState, LimitVerdict, Limiter, MemoryLimiter, RateLimit, Refusal};
use crate::verify::BoxFuture;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What a [`RedisLimiter`] does when Redis does not answer within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Refuse with `503` and `Retry-After` (the default): no decision without the shared counters.
    FailClosed,
    /// Decide with in-memory counters, each limit (and usage allowance left) divided by the number
    /// of instances, so that together they stay near the shared limit.
    Local {
        /// How many instances share the limits.
        instances: u32,
    },
}

/// Fixed windows and usage allowances in Redis, so a limit of 500 per minute means 500 across all
/// instances, and a credit balance is spent once.
///
/// **One round trip, all or nothing.** A request's limits and its usage are decided by one Lua
/// script: it reads every counter, refuses without writing anything if one is spent, and otherwise
/// takes from all of them. Windows open with `SET … PX window` and their time left is `PTTL`, so the
/// clock is Redis's and instance clocks do not matter; idle counters expire with their window.
/// Usage counters (`…:usage`) do not expire: they are the key's spending.
///
/// **Keys.** `{prefix}:{key_id}:rl:{name}:{limit}:{window_ms}` and `{prefix}:{key_id}:usage`; the
/// key id is the Redis Cluster hash tag, so one script's keys live on one node.
///
/// **Redis down.** Each decision waits at most `timeout` (default 50 ms); then the [`Fallback`]
/// decides, and [`fallbacks`](Self::fallbacks) counts it. The connection manager reconnects by
/// itself.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use keygate::limit::{Fallback, RateLimit, RedisLimiter};
/// let redis = redis::Client::open("redis://127.0.0.1:6379")?.get_connection_manager().await?;
/// let limiter = RedisLimiter::new(redis, "myapi").fallback(Fallback::Local { instances: 4 });
/// let layer = keygate::ApiKeyLayer::builder(keygate::LocalVerifier::in_memory())
///     .limiter(limiter)
///     .rate_limit(RateLimit::per_minute("default", 500)?)
///     .build()?;
/// # let _ = layer; Ok(()) }
/// ```
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    fallback: Fallback,
    local: MemoryLimiter,
    fallbacks: AtomicU64,
}

/// Decides a request's limits, then its usage; writes only if everything passes.
/// ARGV: n, then (limit, window_ms, cost) per limit, then (allowed, reported, amount) if usage.
/// Returns {1, remaining, ttl, …} or {0, kind (1 rate, 2 usage), index, wait_ms}.
const SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local used, ttl = {}, {}
for i = 1, n do
  local limit, window, cost = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  local t = redis.call('PTTL', KEYS[i])
  if t < 0 then used[i] = 0; ttl[i] = window else used[i] = tonumber(redis.call('GET', KEYS[i])); ttl[i] = t end
  if used[i] + cost > limit then
    if cost > limit then return {0, 1, i, window} end
    return {0, 1, i, ttl[i]}
  end
end
if #KEYS > n then
  local u = KEYS[n + 1]
  local allowed, reported, amount = tonumber(ARGV[3*n+2]), tonumber(ARGV[3*n+3]), tonumber(ARGV[3*n+4])
  local seen = tonumber(redis.call('HGET', u, 'reported') or '0')
  local mine = tonumber(redis.call('HGET', u, 'local') or '0')
  if reported > seen then mine = math.max(0, mine - (reported - seen)); seen = reported end
  if seen + mine + amount > allowed then return {0, 2, 0, 0} end
  redis.call('HSET', u, 'reported', seen, 'local', mine + amount)
end
local out = {1}
for i = 1, n do
  local limit, window, cost = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  if used[i] == 0 then redis.call('SET', KEYS[i], cost, 'PX', window) else redis.call('INCRBY', KEYS[i], cost) end
  out[#out + 1] = limit - used[i] - cost
  out[#out + 1] = ttl[i]
end
return out
"#;

fn script() -> &'static redis::Script {
    static SCRIPT_: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT_.get_or_init(|| redis::Script::new(SCRIPT))
}

/// Lua numbers are doubles: amounts above 2^53 are clamped, not wrapped.
fn lua_number(n: u128) -> u64 {
    n.min(1 << 53) as u64
}

impl RedisLimiter {
    /// A limiter on `conn`, with its keys under `prefix`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        let shared = Shared {
            conn,
            prefix: prefix.to_owned(),
            timeout: Duration::from_millis(50),
            fallback: Fallback::FailClosed,
            local: MemoryLimiter::new(),
            fallbacks: AtomicU64::new(0),
        };
        Self { shared: Arc::new(shared) }
    }

    /// How long a decision may wait for Redis (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.shared_mut().timeout = timeout;
        self
    }

    /// What to do when Redis does not answer (default [`Fallback::FailClosed`]).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.shared_mut().fallback = fallback;
        self
    }

    /// How many decisions were made by the fallback.
    pub fn fallbacks(&self) -> u64 {
        self.shared.fallbacks.load(Ordering::Relaxed)
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("configured before it is shared")
    }
}

impl Shared {
    fn keys(&self, key_id: &str, request: &LimitRequest<'_>) -> Vec<String> {
        let mut keys: Vec<String> = request
            .limits
            .iter()
            .map(|(l, _)| {
                format!("{}:{{{key_id}}}:rl:{}:{}:{}", self.prefix, l.name(), l.limit(), l.window().as_millis())
            })
            .collect();
        if request.usage.is_some() {
            keys.push(format!("{}:{{{key_id}}}:usage", self.prefix));
        }
        keys
    }

    async fn decide(&self, key_id: &str, asked: &LimitRequest<'_>) -> redis::RedisResult<LimitVerdict> {
        // A limit listed twice is one limit (one key): the script would count it twice.
        let limits = super::distinct(asked.limits);
        let request = &LimitRequest { limits: &limits, usage: asked.usage };
        let mut invocation = script().prepare_invoke();
        for key in self.keys(key_id, request) {
            invocation.key(key);
        }
        invocation.arg(request.limits.len());
        for (limit, cost) in request.limits {
            invocation.arg(limit.limit()).arg(limit.window().as_millis().max(1) as u64).arg(*cost);
        }
        if let Some(u) = request.usage {
            invocation.arg(lua_number(u.allowed)).arg(lua_number(u.reported)).arg(u.amount);
        }
        let reply: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
        let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
        Ok(match reply.as_slice() {
            [1, rest @ ..] => {
                let states = request
                    .limits
                    .iter()
                    .zip(rest.chunks_exact(2))
                    .map(|((limit, _), r)| LimitState {
                        limit: limit.clone(),
                        remaining: r[0].max(0) as u64,
                        reset: ms(r[1]),
                    })
                    .collect();
                Ok(super::per_entry(asked.limits, &limits, states))
            }
            [0, 1, i, wait] => {
                let limit = request.limits[(*i as usize).saturating_sub(1)].0.clone();
                Err(Refusal::Rate(Denied { limit, retry_after: ms(*wait) }))
            }
            [0, 2, ..] => Err(Refusal::Usage),
            other => return Err((redis::ErrorKind::TypeError, "unexpected limiter reply", format!("{other:?}")).into()),
        })
    }

    /// The fallback's decision, counted.
    fn fall_back(&self, key_id: &str, request: &LimitRequest<'_>, why: String) -> Result<LimitVerdict, LimitError> {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        match self.fallback {
            Fallback::FailClosed => Err(LimitError(why)),
            Fallback::Local { instances } => {
                tracing::warn!(%why, "keygate: Redis unavailable; deciding with local limits");
                let n = u64::from(instances.max(1));
                let limits: Vec<(RateLimit, u64)> = request
                    .limits
                    .iter()
                    .map(|(l, cost)| {
                        (RateLimit::new(l.name(), (l.limit() / n).max(1), l.window()).unwrap_or(l.clone()), *cost)
                    })
                    .collect();
                let usage = request.usage.map(|mut u| {
                    u.allowed = u.reported + u.allowed.saturating_sub(u.reported) / u128::from(n);
                    u
                });
                Ok(self.local.check_now(key_id, &LimitRequest { limits: &limits, usage }).expect("memory decides now"))
            }
        }
    }
}

impl Limiter for RedisLimiter {
    fn check(&self, key_id: &str, request: &LimitRequest<'_>) -> BoxFuture<'static, Result<LimitVerdict, LimitError>> {
        let shared = self.shared.clone();
        let (key_id, limits, usage) = (key_id.to_owned(), request.limits.to_vec(), request.usage);
        Box::pin(async move {
            let request = LimitRequest { limits: &limits, usage };
            match tokio::time::timeout(shared.timeout, shared.decide(&key_id, &request)).await {
                Ok(Ok(verdict)) => Ok(verdict),
                Ok(Err(error)) => shared.fall_back(&key_id, &request, format!("Redis: {error}")),
                Err(_) => shared.fall_back(&key_id, &request, format!("Redis did not answer in {:?}", shared.timeout)),
            }
        })
    }

    fn charge(&self, key_id: &str, amount: u64) {
        let (shared, key) = (self.shared.clone(), format!("{}:{{{key_id}}}:usage", self.shared.prefix));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let mut conn = shared.conn.clone();
            let added: redis::RedisResult<i64> =
                redis::cmd("HINCRBY").arg(&key).arg("local").arg(amount).query_async(&mut conn).await;
            if let Err(error) = added {
                tracing::warn!(%error, "keygate: could not count usage in Redis");
            }
        });
    }
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.shared.prefix)
            .field("timeout", &self.shared.timeout)
            .field("fallback", &self.shared.fallback)
            .finish_non_exhaustive()
    }
}
