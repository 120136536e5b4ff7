//! Usage sent to Oneloop's `record-usage` in the background, summed per (key, usage name).

use super::{UsageOf, UsageSink};
use crate::key::ApiKey;
use crate::verify::oneloop::OneloopVerifier;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// How the batcher flushes.
///
/// ```
/// use keygate::usage::BatchConfig;
/// use std::time::Duration;
/// let config = BatchConfig::default().interval(Duration::from_millis(500)).max_buffered(50_000);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct BatchConfig {
    interval: Duration,
    batch_size: usize,
    max_buffered: usize,
    max_backoff: Duration,
    concurrency: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            batch_size: 1_000,
            max_buffered: 100_000,
            max_backoff: Duration::from_secs(30),
            concurrency: 16,
        }
    }
}

impl BatchConfig {
    /// How often the buffer is flushed (default 1 s).
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d.clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self
    }

    /// Flush early once this many (key, usage name) pairs are buffered (default 1 000).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The most (key, usage name) pairs held (default 100 000). Usage for a new pair beyond it is
    /// dropped, counted in [`UsageBatcher::overflowed`] and logged.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n.max(1);
        self
    }

    /// The longest wait between retries while Oneloop fails (default 30 s; it doubles from the
    /// interval).
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Calls to `record-usage` in flight at once (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
}

type Pair = (ApiKey, Option<Arc<str>>);

/// A [`UsageSink`] that sums usage per (key, usage name) and sends it to Oneloop's
/// `record-usage` in the background: every interval, or sooner when a batch is full; failed sends
/// are retried with backoff; nothing blocks a request. It holds the raw keys of buffered usage
/// (Oneloop identifies keys by value) until they are sent.
///
/// Call [`shutdown`](Self::shutdown) after the server stops so buffered usage is sent.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use keygate::usage::{BatchConfig, UsageBatcher};
/// use keygate::verify::oneloop::OneloopVerifier;
/// use keygate::ApiKeyLayer;
/// use std::time::Duration;
///
/// let oneloop = OneloopVerifier::builder("ws_token").build()?;
/// let batcher = UsageBatcher::new(oneloop.clone(), BatchConfig::default());
/// let layer = ApiKeyLayer::builder(oneloop).usage_sink(batcher.clone()).build()?;
/// // … serve with `layer` until shutdown, then:
/// let unsent = batcher.shutdown(Duration::from_secs(5)).await;
/// assert_eq!(unsent, 0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct UsageBatcher {
    shared: Arc<Shared>,
}

struct Shared {
    oneloop: OneloopVerifier,
    config: BatchConfig,
    buffer: Mutex<HashMap<Pair, u64>>,
    overflowed: AtomicU64,
    sent: AtomicU64,
    wake: Notify,
    started: OnceLock<()>,
    closed: AtomicBool,
    /// Held for a whole flush, so `shutdown` can tell "empty" from "taken out and being sent".
    flushing: tokio::sync::Mutex<()>,
}

impl UsageBatcher {
    /// A batcher sending through `oneloop`. Its task starts with the first usage recorded.
    pub fn new(oneloop: OneloopVerifier, config: BatchConfig) -> Self {
        let shared = Shared {
            oneloop,
            config,
            buffer: Mutex::default(),
            overflowed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            wake: Notify::new(),
            started: OnceLock::new(),
            closed: AtomicBool::new(false),
            flushing: tokio::sync::Mutex::new(()),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Usage waiting to be sent, in (key, usage name) pairs.
    pub fn pending(&self) -> usize {
        self.shared.lock().len()
    }

    /// Usage dropped because the buffer was full (an amount, not a count of pairs).
    pub fn overflowed(&self) -> u64 {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// Usage sent and acknowledged by Oneloop (an amount).
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Sends what is buffered, retrying until it is all sent or `deadline` passes; returns the
    /// pairs left unsent. Usage recorded afterwards is still buffered and sent.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let flush = async {
            loop {
                // Waits out a flush in progress: its batch is no longer in the buffer.
                drop(self.shared.flushing.lock().await);
                if self.pending() == 0 {
                    break;
                }
                if self.shared.flush().await {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let _ = tokio::time::timeout(deadline, flush).await;
        let left = self.pending();
        if left > 0 {
            tracing::error!(pairs = left, "keygate: usage not sent to Oneloop before the shutdown deadline");
        }
        left
    }

    fn start(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        self.shared.started.get_or_init(|| {
            runtime.spawn(self.shared.clone().run());
        });
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Pair, u64>> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds to the buffer; `false` if it was full and the usage dropped.
    fn add(&self, pair: Pair, amount: u64) -> bool {
        let mut buffer = self.lock();
        if let Some(sum) = buffer.get_mut(&pair) {
            *sum = sum.saturating_add(amount);
            return true;
        }
        if buffer.len() >= self.config.max_buffered {
            drop(buffer);
            if self.overflowed.fetch_add(amount, Ordering::Relaxed) == 0 {
                tracing::error!(max = self.config.max_buffered, "keygate: usage buffer full; usage is being dropped");
            }
            return false;
        }
        buffer.insert(pair, amount);
        if buffer.len() >= self.config.batch_size {
            self.wake.notify_one();
        }
        true
    }

    async fn run(self: Arc<Self>) {
        let mut wait = self.config.interval;
        loop {
            // Wakes at the interval, or sooner when a batch fills.
            let _ = tokio::time::timeout(wait, self.wake.notified()).await;
            let failed = self.flush().await;
            wait = if failed { wait.saturating_mul(2).min(self.config.max_backoff) } else { self.config.interval };
        }
    }

    /// Sends everything buffered now; failed sends go back into the buffer. `true` if any failed.
    async fn flush(self: &Arc<Self>) -> bool {
        let _flushing = self.flushing.lock().await;
        let batch: Vec<(Pair, u64)> = std::mem::take(&mut *self.lock()).into_iter().collect();
        let mut failed = false;
        let mut sends = JoinSet::new();
        for ((key, name), amount) in batch {
            if sends.len() >= self.config.concurrency {
                failed |= self.settle(sends.join_next().await);
            }
            let shared = self.clone();
            sends.spawn(async move {
                let result = shared.oneloop.record_usage(&key, amount, name.as_deref()).await;
                (result, (key, name), amount)
            });
        }
        while let Some(done) = sends.join_next().await {
            failed |= self.settle(Some(done));
        }
        failed
    }

    fn settle(&self, done: Option<Result<SendOutcome, tokio::task::JoinError>>) -> bool {
        match done {
            Some(Ok((Ok(()), _, amount))) => {
                self.sent.fetch_add(amount, Ordering::Relaxed);
                false
            }
            Some(Ok((Err(error), pair, amount))) => {
                tracing::warn!(%error, "keygate: record-usage failed; will retry");
                self.add(pair, amount);
                true
            }
            Some(Err(_)) | None => true,
        }
    }
}

type SendOutcome = (Result<(), crate::verify::VerifyError>, Pair, u64);

impl UsageSink for UsageBatcher {
    fn record(&self, of: UsageOf<'_>, name: Option<&str>, amount: u64) {
        let Some(key) = of.key else { return };
        self.shared.add((key.clone(), name.map(Arc::from)), amount);
        self.start();
    }

    fn needs_key(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for UsageBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageBatcher").field("config", &self.shared.config).field("pending", &self.pending()).finish()
    }
}
