//! Exact decisions, batched: requests that arrive while earlier ones are on their way to Redis
//! queue, and go together in one `DECIDE` call. Redis then runs one script per batch instead of
//! one per request (a script call costs Redis more than the few commands a decision makes), and
//! records what the batch took in one hash instead of one key per request.
//!
//! Each request still decides alone and exactly, in the order it queued: the script takes
//! the entries one after the other, each all or nothing. A request that gives up (its timeout)
//! before its batch is sent is left out of it; one that gives up after is cancelled by its entry
//! in the batch's record, exactly as before batching.

use super::msgpack::{self, Numbers};
use super::scripts::{script, Script};
use super::{Counter, NoAnswer, Owner, Shared};
use crate::connection::{evalsha, ScriptCall};
use crate::limit::{Denied, LimitState, LimitVerdict, RateLimit, Refusal, UsageCharge};
use crate::lock::lock;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The most requests one script call decides.
const MAX_BATCH: usize = 128;
/// How many script calls may be on their way at once. While they are, new requests queue and go
/// together in the next: the busier Redis is, the larger the batches.
const IN_FLIGHT: usize = 2;

/// One request's decision: its key and identity, their distinct limits with their costs, its usage.
pub(super) struct Decision {
    pub(super) key_id: Box<str>,
    pub(super) identity: Option<Box<str>>,
    pub(super) limits: Vec<(RateLimit, u64)>,
    /// The identity's counters.
    pub(super) shared: Vec<(RateLimit, u64)>,
    /// The usage hashes it charges (the key's, then the identity's), with the refill period now.
    pub(super) usage: Vec<(String, UsageCharge, u64)>,
    /// The usage asked of the key and of its identity, for the fallback.
    pub(super) request_usage: [Option<UsageCharge>; 2],
    /// Where it is on its way to Redis (here, not in an allocation of its own: the decision is
    /// shared with the batch anyway).
    ticket: Mutex<Ticket>,
}

impl Decision {
    pub(super) fn new(
        key_id: &str,
        identity: Option<&str>,
        limits: Vec<(RateLimit, u64)>,
        shared: Vec<(RateLimit, u64)>,
        usage: Vec<(String, UsageCharge, u64)>,
        request_usage: [Option<UsageCharge>; 2],
    ) -> Self {
        let (key_id, identity, ticket) = (key_id.into(), identity.map(Into::into), Mutex::new(Ticket::Queued));
        Self { key_id, identity, limits, shared, usage, request_usage, ticket }
    }

    pub(super) fn owner(&self) -> Owner<'_> {
        Owner { key_id: &self.key_id, identity: self.identity.as_deref() }
    }

    /// The hash tag all of its keys share.
    pub(super) fn tag(&self) -> &str {
        self.identity.as_deref().unwrap_or(&self.key_id)
    }

    /// Its counters, in the order of its limits: the key's, then the identity's.
    pub(super) fn counters<'d>(&'d self, shared: &'d Shared) -> impl Iterator<Item = Counter<'d>> + 'd {
        let prefix = shared.prefix.as_str();
        let mine = self.limits.iter().map(move |(limit, _)| Counter::Key { prefix, owner: self.owner(), limit });
        let theirs =
            self.shared.iter().map(move |(limit, _)| Counter::Identity { prefix, identity: self.tag(), limit });
        mine.chain(theirs)
    }

    /// How many keys its part of a `DECIDE` call names (a command states its keys before them).
    fn keys(&self) -> usize {
        self.limits.len() + self.shared.len() + self.usage.len()
    }

    /// Its limits, the key's then the identity's.
    pub(super) fn all_limits(&self) -> impl Iterator<Item = &(RateLimit, u64)> {
        self.limits.iter().chain(&self.shared)
    }
}

/// Where a queued decision is: what its requester needs to know to take it back.
enum Ticket {
    Queued,
    /// In the batch whose record is `record`, as entry `entry` (from 1).
    Sent {
        record: Arc<str>,
        entry: u32,
    },
    /// Its requester gave up before it was sent: it never will be.
    Abandoned,
}

/// A decision waiting for its batch.
pub(super) struct Pending {
    decision: Arc<Decision>,
    reply: oneshot::Sender<Answer>,
}

/// Redis's verdict, or why there is none.
type Answer = Result<LimitVerdict, NoAnswer>;

/// The queue into the batcher task (started with the first decision, and again if the runtime
/// it ran on is gone).
pub(super) type Queue = Mutex<Option<mpsc::UnboundedSender<Pending>>>;

impl Shared {
    /// Redis's exact decision, or why there is none (then the fallback decides). Whatever Redis
    /// may have counted for a decision given up on is taken back.
    pub(super) async fn decide_exact(self: &Arc<Self>, decision: Arc<Decision>) -> Result<LimitVerdict, NoAnswer> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Pending { decision: decision.clone(), reply });
        let no_answer = match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(Ok(verdict))) => return Ok(verdict),
            Ok(Ok(Err(no_answer))) => no_answer,
            Ok(Err(_)) | Err(_) => NoAnswer::Timeout(self.timeout),
        };
        // The script may run late, or may have run and lost its answer: take it back.
        let ticket = std::mem::replace(&mut *lock(&decision.ticket), Ticket::Abandoned);
        if let Ticket::Sent { record, entry } = ticket {
            tokio::spawn(self.clone().cancel(decision, record, entry));
        }
        Err(no_answer)
    }

    fn enqueue(self: &Arc<Self>, pending: Pending) {
        let mut queue = lock(&self.queue);
        let pending = match queue.as_ref() {
            Some(q) => match q.send(pending) {
                Ok(()) => return,
                Err(unsent) => unsent.0,
            },
            None => pending,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(batcher(Arc::downgrade(self), receiver));
        let _ = sender.send(pending);
        *queue = Some(sender);
    }

    /// Sends one batch (on a Cluster, one per hash tag: a script's keys must live on one node) and
    /// answers each of its requests.
    async fn send(self: Arc<Self>, batch: Vec<Pending>) {
        if self.conn.topology() != "cluster" {
            return self.run(batch).await;
        }
        let mut groups: Vec<Vec<Pending>> = Vec::new();
        for p in batch {
            match groups.iter_mut().find(|g| g[0].decision.tag() == p.decision.tag()) {
                Some(group) => group.push(p),
                None => groups.push(vec![p]),
            }
        }
        let runs: Vec<_> = groups.into_iter().map(|g| tokio::spawn(self.clone().run(g))).collect();
        for run in runs {
            let _ = run.await;
        }
    }

    async fn run(self: Arc<Self>, batch: Vec<Pending>) {
        let id = self.batches.fetch_add(1, Ordering::Relaxed);
        let record: Arc<str> =
            format!("{}:{{{}}}:op:{:x}.{id:x}", self.prefix, batch[0].decision.tag(), self.instance).into();
        let mut sent = Vec::with_capacity(batch.len());
        for p in batch {
            let mut ticket = lock(&p.decision.ticket);
            if matches!(*ticket, Ticket::Queued) {
                *ticket = Ticket::Sent { record: record.clone(), entry: sent.len() as u32 + 1 };
                drop(ticket);
                sent.push(p);
            }
        }
        if sent.is_empty() {
            return;
        }
        // What a fallback admitted is added to the shared counters before Redis decides again.
        let decided = async {
            self.pay_debts().await?;
            self.decide_batch(&record, &sent).await
        };
        match tokio::time::timeout(self.timeout, decided).await {
            Ok(Ok(answers)) => {
                for (p, answer) in sent.into_iter().zip(answers) {
                    let _ = p.reply.send(answer);
                }
            }
            Ok(Err(error)) => {
                for p in sent {
                    let _ = p.reply.send(Err(NoAnswer::failed(&error)));
                }
            }
            // Each request's own timeout (no later than this one) answers it.
            Err(_) => {}
        }
    }

    async fn decide_batch(&self, record: &str, batch: &[Pending]) -> redis::RedisResult<Vec<Answer>> {
        // One command buffer for the whole batch: counter names are written into it, not built.
        let decide = script(Script::Decide);
        let mut cmd = evalsha(decide, 1 + batch.iter().map(|p| p.decision.keys()).sum::<usize>());
        cmd.arg(record);
        // A request with one limit and no usage: 5 numbers.
        let mut args = Numbers::with_capacity(5 * batch.len());
        for Pending { decision: d, .. } in batch {
            for counter in d.counters(self) {
                redis::RedisWrite::write_arg_fmt(&mut cmd, counter);
            }
            for (key, _, _) in &d.usage {
                cmd.arg(key);
            }
            args.push((d.limits.len() + d.shared.len()) as u64);
            args.push(d.usage.len() as u64);
            for (limit, cost) in d.all_limits() {
                args.push(limit.limit());
                args.push(window_ms(limit));
                args.push(*cost);
            }
            for (_, u, period) in &d.usage {
                args.push(lua_number(u.allowed));
                args.push(lua_number(u.reported));
                args.push(u.amount);
                args.push(*period);
            }
        }
        cmd.arg(self.ttl_ms()).arg(args.finish());
        let reply: Vec<u8> = self.conn.write(ScriptCall::Eval(decide, &cmd)).await?;
        let numbers = msgpack::integers(&reply).ok_or_else(|| unexpected(&reply))?;
        let mut rest = &numbers[..];
        let mut answers = Vec::with_capacity(batch.len());
        for p in batch {
            let d = &p.decision;
            // An admitted entry: 1, m, m amounts spent, then two numbers per limit; else four.
            let len = match rest {
                [1, ..] => 2 + d.usage.len() + 2 * (d.limits.len() + d.shared.len()),
                _ => 4,
            };
            let (entry, next) = rest.split_at_checked(len).ok_or_else(|| unexpected(&numbers))?;
            answers.push(self.verdict(d, entry)?);
            rest = next;
        }
        if !rest.is_empty() {
            return Err(unexpected(&numbers));
        }
        Ok(answers)
    }

    /// One entry's verdict from its part of the script's reply.
    fn verdict(&self, d: &Decision, reply: &[i64]) -> redis::RedisResult<Answer> {
        let n = d.limits.len() + d.shared.len();
        Ok(Ok(match reply {
            [1, m, rest @ ..] if *m as usize == d.usage.len() && rest.len() == d.usage.len() + 2 * n => {
                let (spent, windows) = rest.split_at(d.usage.len());
                let states: Vec<LimitState> = d
                    .all_limits()
                    .zip(windows.chunks_exact(2))
                    .map(|((limit, _), r)| LimitState {
                        limit: limit.clone(),
                        remaining: r[0].max(0) as u64,
                        reset: ms(r[1]),
                    })
                    .collect();
                self.remember(d, &states, spent);
                Ok(states)
            }
            [0, 1, i, wait] if (1..=n as i64).contains(i) => {
                let limit =
                    d.all_limits().nth(*i as usize - 1).map(|(l, _)| l.clone()).ok_or_else(|| unexpected(reply))?;
                Err(Refusal::Rate(Denied { limit, retry_after: ms(*wait) }))
            }
            [0, 2, ..] => Err(Refusal::Usage),
            // Cancelled before it ran: its requester has already given up on it.
            [0, 3, ..] => return Ok(Err(NoAnswer::Failed("cancelled".into()))),
            other => return Err(unexpected(other)),
        }))
    }

    /// Takes back whatever entry `entry` of the batch `record` took, or stops it from taking
    /// anything. Retried until Redis answers or the reconcile window has passed (the record is
    /// gone by then).
    async fn cancel(self: Arc<Self>, d: Arc<Decision>, record: Arc<str>, entry: u32) {
        let mut invocation = script(Script::Cancel).prepare_invoke();
        for counter in d.counters(&self) {
            invocation.key(counter.to_string());
        }
        for (key, _, _) in &d.usage {
            invocation.key(key);
        }
        invocation.key(&*record).arg(entry).arg(self.ttl_ms());
        let give_up = tokio::time::Instant::now() + self.reconcile_window;
        let mut wait = Duration::from_millis(20);
        loop {
            let done: redis::RedisResult<i64> = invocation.invoke_async(&mut self.conn.clone()).await;
            match done {
                Ok(_) => return,
                Err(error) if tokio::time::Instant::now() + wait >= give_up => {
                    let key_id = &*d.key_id;
                    tracing::error!(%error, key_id, "keygate: could not cancel a decision Redis may have counted");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Takes the queue's requests in batches, with at most [`IN_FLIGHT`] batches on their way.
async fn batcher(shared: Weak<Shared>, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(shared) = shared.upgrade() else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            shared.send(batch).await;
            drop(slot);
        });
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

pub(super) fn window_ms(limit: &RateLimit) -> u64 {
    limit.window().as_millis().max(1) as u64
}

/// Lua numbers are doubles: amounts above 2^53 are clamped, not wrapped.
pub(super) fn lua_number(n: u128) -> u64 {
    n.min(1 << 53) as u64
}

fn unexpected(reply: &(impl std::fmt::Debug + ?Sized)) -> redis::RedisError {
    (redis::ErrorKind::UnexpectedReturnType, "unexpected limiter reply", format!("{reply:?}")).into()
}
