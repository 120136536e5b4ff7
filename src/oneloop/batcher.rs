//! Usage sent to Oneloop's `record-usage` in the background, summed per (key, usage name).
//!
//! Every unit recorded into the batcher ends in exactly one class of [`UsageReport`]:
//! acknowledged, rejected, uncertain, dropped, or still unsent. Oneloop's record-usage has no
//! idempotency key, so a send that may have been recorded (a timeout or reset after the request was
//! written, a `5xx`) is not sent again unless [`DeliveryPolicy::AtLeastOnce`] asks for it.

use super::{Delivery, OneloopVerifier};
use crate::key::ApiKey;
use crate::observe;
use crate::usage::{UsageOf, UsageSink};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};

#[doc = include_str!("../../docs/batch_config.md")]
#[derive(Debug, Clone)]
pub struct BatchConfig {
    delivery: DeliveryPolicy,
    interval: Duration,
    batch_size: usize,
    max_buffered: usize,
    max_backoff: Duration,
    concurrency: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            delivery: DeliveryPolicy::AtMostOnce,
            interval: Duration::from_secs(1),
            batch_size: 1_000,
            max_buffered: 100_000,
            max_backoff: Duration::from_secs(30),
            concurrency: 16,
        }
    }
}

#[doc = include_str!("../../docs/delivery_policy.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeliveryPolicy {
    /// Never send it again; count it as [`uncertain`](UsageReport::uncertain) (the default).
    /// Oneloop may under-bill by that much; it never bills twice.
    #[default]
    AtMostOnce,
    /// Send it again until it is acknowledged or rejected; count it in
    /// [`resent`](UsageReport::resent). Oneloop may bill it twice; it never under-bills.
    AtLeastOnce,
}

impl BatchConfig {
    /// What happens to usage whose send may have been recorded (default
    /// [`DeliveryPolicy::AtMostOnce`]).
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = policy;
        self
    }

    /// How often the buffer is flushed (default 1 s).
    #[must_use]
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d.clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self
    }

    /// Flush early once this many (key, usage name) pairs are buffered (default 1 000).
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The most (key, usage name) pairs held (default 100 000). Usage for a new pair beyond it is
    /// dropped, counted in [`UsageBatcher::overflowed`] and logged.
    #[must_use]
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n.max(1);
        self
    }

    /// The longest wait between retries while Oneloop cannot be reached (default 30 s; it doubles
    /// from the interval, with jitter).
    #[must_use]
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Calls to `record-usage` in flight at once (default 16).
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
}

type Pair = (ApiKey, Option<Arc<str>>);

#[doc = include_str!("../../docs/usage_report.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct UsageReport {
    /// Given to the batcher.
    pub recorded: u64,
    /// Sent, and answered `2xx`.
    pub acknowledged: u64,
    /// Refused by Oneloop for good (`400`, `401`, `403`, `404`, `422`, a redirect): not sent again.
    pub rejected: u64,
    /// Sent, and maybe recorded (a timeout or reset after the request was written, a `5xx`, or a
    /// send cut off by [`shutdown`](UsageBatcher::shutdown)); not sent again.
    pub uncertain: u64,
    /// Dropped because the buffer was full.
    pub dropped: u64,
    /// Buffered or in flight: not yet in any other class.
    pub unsent: u64,
    /// With [`DeliveryPolicy::AtLeastOnce`], units sent again after an uncertain send (not a class
    /// of its own: they are counted where their last send ended). Oneloop may have billed them twice.
    pub resent: u64,
}

impl UsageReport {
    /// Whether every recorded unit is accounted for (always true; a test checks it).
    #[must_use]
    pub fn balances(&self) -> bool {
        let classes = [self.acknowledged, self.rejected, self.uncertain, self.dropped, self.unsent];
        classes.iter().fold(0u64, |sum, n| sum.saturating_add(*n)) == self.recorded
    }
}

#[doc = include_str!("../../docs/usage_batcher.md")]
#[derive(Clone)]
pub struct UsageBatcher {
    shared: Arc<Shared>,
}

struct Shared {
    oneloop: OneloopVerifier,
    config: BatchConfig,
    accounts: Mutex<Accounts>,
    wake: Notify,
    /// The background task, started with the first usage recorded.
    task: OnceLock<AbortHandle>,
    closed: AtomicBool,
    /// Held for a whole flush, so `shutdown` can tell "empty" from "taken out and being sent".
    flushing: tokio::sync::Mutex<()>,
}

/// The buffer, the sends in flight and the report, under one lock so every unit is in exactly one
/// place at any time.
#[derive(Default)]
struct Accounts {
    buffer: HashMap<Pair, u64>,
    /// Sends under way, by send number: whoever removes one (its send settling, or shutdown giving
    /// up on it) accounts for its units.
    in_flight: HashMap<u64, u64>,
    next_send: u64,
    report: UsageReport,
    /// Statuses already logged as rejections: each is logged once.
    rejected_logged: HashSet<u16>,
    /// Whether record-usage is failing, so the change is logged once, not per send.
    degraded: bool,
}

impl Accounts {
    fn unsent(&self) -> u64 {
        self.buffer.values().chain(self.in_flight.values()).fold(0u64, |sum, n| sum.saturating_add(*n))
    }

    /// Puts a pair's units back to be sent again (they were counted as recorded already).
    fn requeue(&mut self, pair: Pair, amount: u64) {
        let sum = self.buffer.entry(pair).or_default();
        *sum = sum.saturating_add(amount);
    }
}

impl UsageBatcher {
    /// A batcher sending through `oneloop`. Its task starts with the first usage recorded.
    #[must_use]
    pub fn new(oneloop: OneloopVerifier, config: BatchConfig) -> Self {
        let shared = Shared {
            oneloop,
            config,
            accounts: Mutex::default(),
            wake: Notify::new(),
            task: OnceLock::new(),
            closed: AtomicBool::new(false),
            flushing: tokio::sync::Mutex::new(()),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Usage waiting to be sent, in (key, usage name) pairs.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.shared.lock().buffer.len()
    }

    /// Usage dropped because the buffer was full (an amount, not a count of pairs).
    #[must_use]
    pub fn overflowed(&self) -> u64 {
        self.shared.lock().report.dropped
    }

    /// Usage sent and acknowledged by Oneloop (an amount).
    #[must_use]
    pub fn sent(&self) -> u64 {
        self.shared.lock().report.acknowledged
    }

    /// Where every unit recorded so far is now.
    #[must_use]
    pub fn report(&self) -> UsageReport {
        let books = self.shared.lock();
        UsageReport { unsent: books.unsent(), ..books.report }
    }

    /// Sends what is buffered, retrying what was not delivered until it is all sent or `deadline`
    /// passes, then stops the background task. Sends still in flight at the deadline are cut off and
    /// counted as uncertain; what was never sent stays unsent. Usage recorded afterwards is counted
    /// and buffered, and sent by a later `shutdown`.
    pub async fn shutdown(&self, deadline: Duration) -> UsageReport {
        self.shared.closed.store(true, Ordering::SeqCst);
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
        if let Some(task) = self.shared.task.get() {
            task.abort();
        }
        let report = {
            let mut books = self.shared.lock();
            // Sends cut off mid-flight may have reached Oneloop: uncertain, never re-sent.
            let cut: u64 = books.in_flight.drain().map(|(_, n)| n).fold(0u64, u64::saturating_add);
            books.report.uncertain = books.report.uncertain.saturating_add(cut);
            observe::usage("uncertain", cut);
            UsageReport { unsent: books.unsent(), ..books.report }
        };
        observe::unsent_at_shutdown(report.unsent);
        if report.unsent > 0 || report.uncertain > 0 {
            tracing::error!(
                unsent = report.unsent,
                uncertain = report.uncertain,
                "keygate: usage not confirmed by Oneloop at shutdown"
            );
        }
        report
    }

    fn start(&self) {
        if self.shared.closed.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        self.shared.task.get_or_init(|| runtime.spawn(self.shared.clone().run()).abort_handle());
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Accounts> {
        crate::lock::lock(&self.accounts)
    }

    /// Counts new usage and buffers it; usage that finds the buffer full is dropped and counted.
    fn add(&self, pair: Pair, amount: u64) {
        let mut books = self.lock();
        books.report.recorded = books.report.recorded.saturating_add(amount);
        observe::usage("recorded", amount);
        if let Some(sum) = books.buffer.get_mut(&pair) {
            *sum = sum.saturating_add(amount);
            return;
        }
        if books.buffer.len() >= self.config.max_buffered {
            let first = books.report.dropped == 0;
            books.report.dropped = books.report.dropped.saturating_add(amount);
            observe::usage("dropped", amount);
            drop(books);
            if first {
                tracing::error!(max = self.config.max_buffered, "keygate: usage buffer full; usage is being dropped");
            }
            return;
        }
        books.buffer.insert(pair, amount);
        if books.buffer.len() >= self.config.batch_size {
            self.wake.notify_one();
        }
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = self.config.interval;
        loop {
            // Wakes at the interval, or sooner when a batch fills; backs off while Oneloop is away.
            let _ = tokio::time::timeout(jittered(backoff), self.wake.notified()).await;
            let failed = self.flush().await;
            backoff =
                if failed { backoff.saturating_mul(2).min(self.config.max_backoff) } else { self.config.interval };
        }
    }

    /// Sends everything buffered now. `true` if a send was not delivered (so it is worth waiting).
    async fn flush(self: &Arc<Self>) -> bool {
        let _flushing = self.flushing.lock().await;
        let batch: Vec<(u64, Pair, u64)> = {
            let mut books = self.lock();
            let taken = std::mem::take(&mut books.buffer);
            taken
                .into_iter()
                .map(|(pair, amount)| {
                    let id = books.next_send;
                    books.next_send += 1;
                    books.in_flight.insert(id, amount);
                    (id, pair, amount)
                })
                .collect()
        };
        let mut failed = false;
        let mut sends = JoinSet::new();
        for (id, (key, name), amount) in batch {
            if sends.len() >= self.config.concurrency {
                failed |= self.settle(sends.join_next().await);
            }
            let shared = self.clone();
            sends.spawn(async move {
                let delivery = shared.oneloop.deliver_usage(&key, amount, name.as_deref()).await;
                (id, delivery, (key, name))
            });
        }
        while let Some(done) = sends.join_next().await {
            failed |= self.settle(Some(done));
        }
        failed
    }

    /// Accounts for one finished send. `true` if it was not delivered.
    fn settle(&self, done: Option<Result<(u64, Delivery, Pair), tokio::task::JoinError>>) -> bool {
        let Some(Ok((id, delivery, pair))) = done else { return false };
        let mut books = self.lock();
        // Gone: shutdown gave up on this send and counted it as uncertain already.
        let Some(amount) = books.in_flight.remove(&id) else { return false };
        let report = &mut books.report;
        match delivery {
            Delivery::Acknowledged => {
                report.acknowledged = report.acknowledged.saturating_add(amount);
                observe::usage("acknowledged", amount);
                if std::mem::take(&mut books.degraded) {
                    tracing::info!("keygate: Oneloop record-usage is answering again");
                }
                false
            }
            Delivery::NotDelivered(error) => {
                books.requeue(pair, amount);
                if !std::mem::replace(&mut books.degraded, true) {
                    tracing::warn!(%error, "keygate: record-usage not delivered; retrying with backoff");
                }
                true
            }
            Delivery::Rejected(status, error) => {
                report.rejected = report.rejected.saturating_add(amount);
                observe::usage("rejected", amount);
                if books.rejected_logged.insert(status) {
                    tracing::error!(%error, "keygate: Oneloop rejected usage; it is not sent again (logged once per status)");
                }
                false
            }
            Delivery::Uncertain(error) => {
                let first = report.uncertain == 0 && report.resent == 0;
                match self.config.delivery {
                    DeliveryPolicy::AtMostOnce => {
                        report.uncertain = report.uncertain.saturating_add(amount);
                        observe::usage("uncertain", amount);
                    }
                    DeliveryPolicy::AtLeastOnce => {
                        report.resent = report.resent.saturating_add(amount);
                        observe::usage("resent", amount);
                        books.requeue(pair, amount);
                    }
                }
                if first {
                    tracing::warn!(%error, policy = ?self.config.delivery, "keygate: record-usage answer lost; Oneloop may have recorded it");
                }
                self.config.delivery == DeliveryPolicy::AtLeastOnce
            }
        }
    }
}

/// Between half and all of `wait`, so instances that failed together do not retry together.
fn jittered(wait: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(u16::MAX, |()| u16::from_le_bytes(b));
    wait / 2 + wait.mul_f64(f64::from(r) / f64::from(u16::MAX) / 2.0)
}

impl UsageSink for UsageBatcher {
    fn record(&self, of: UsageOf<'_>, name: Option<&str>, amount: u64) {
        let Some(key) = of.key else { return };
        if amount == 0 {
            return;
        }
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
