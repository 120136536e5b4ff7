//! What the Redis limiter does without Redis: [`Fallback::Local`] decides each instance's share
//! in memory, mirrored from Redis's last answers, and what it admits is owed to the shared
//! counters until Redis takes it.

use super::scripts::{script, Script};
use super::{Fallback, Shared};
use crate::limit::{LimitError, LimitRequest, LimitState, LimitVerdict, Limiter, RateLimit};
use crate::lock::lock;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What the fallback admitted for one key id, to add to Redis's counters.
#[derive(Default)]
pub(super) struct Debt {
    limits: Vec<(RateLimit, u64)>,
    usage: u64,
}

impl Shared {
    /// With a local fallback, mirrors Redis's answer into this instance's share of each limit and
    /// balance, so the fallback starts from what Redis said was left.
    pub(super) fn remember(&self, key_id: &str, states: &[LimitState], spent: Option<u128>) {
        let Fallback::Local { instances } = self.fallback else { return };
        let n = u64::from(instances.max(1));
        let shares: Vec<(RateLimit, u64, Duration)> = states
            .iter()
            .map(|s| {
                let share = share(&s.limit, n);
                let left = (s.remaining / n).min(share.limit());
                (share.clone(), share.limit() - left, s.reset)
            })
            .collect();
        self.local.mirror(key_id, &shares);
        if let Some(spent) = spent {
            let mut known = lock(&self.spent);
            match known.get_mut(key_id) {
                Some(known) => *known = spent,
                None => drop(known.insert(key_id.into(), spent)),
            }
        }
    }

    /// The fallback's decision, counted; what it admits is owed to the shared counters, and a
    /// task pays that as soon as Redis answers again.
    pub(super) fn fall_back(
        self: &Arc<Self>,
        key_id: &str,
        request: &LimitRequest<'_>,
        why: String,
    ) -> Result<LimitVerdict, LimitError> {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let Fallback::Local { instances } = self.fallback else {
            crate::observe::limiter_fallback("fail_closed");
            return Err(LimitError::new(why));
        };
        crate::observe::limiter_fallback("local");
        // Failing closed, the gate says so (its 503s); falling back, this is the only word of it.
        self.outage.failed(&why);
        tracing::debug!(%why, "keygate: Redis unavailable; deciding with local limits");
        let n = u64::from(instances.max(1));
        let limits: Vec<(RateLimit, u64)> = request.limits.iter().map(|(l, cost)| (share(l, n), *cost)).collect();
        let usage = request.usage.map(|mut u| {
            let spent = lock(&self.spent).get(key_id).copied();
            let spent = spent.unwrap_or(0).max(u.reported);
            // This instance's share of what was left, counted from zero by the local ledger.
            u.allowed = u.allowed.saturating_sub(spent) / u128::from(n);
            u.reported = 0;
            u
        });
        let verdict =
            self.local.check_now(key_id, &LimitRequest { limits: &limits, usage }).expect("memory decides now");
        if verdict.is_ok() {
            let mut debts = lock(&self.debts);
            let debt = debts.entry(key_id.into()).or_default();
            for (limit, cost) in request.limits {
                match debt.limits.iter_mut().find(|(l, _)| l == limit) {
                    Some((_, owed)) => *owed = owed.saturating_add(*cost),
                    None => debt.limits.push((limit.clone(), *cost)),
                }
            }
            debt.usage = debt.usage.saturating_add(request.usage.map_or(0, |u| u.amount));
            self.owes.store(true, Ordering::Release);
        }
        if self.owes.load(Ordering::Acquire) && !self.payer.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().pay_when_back());
        }
        Ok(verdict)
    }

    /// Pays the debts as soon as Redis answers again, whether or not this instance gets requests:
    /// other instances' decisions must see what this one admitted.
    async fn pay_when_back(self: Arc<Self>) {
        let mut wait = Duration::from_millis(50);
        loop {
            while self.owes.load(Ordering::Acquire) {
                tokio::time::sleep(wait).await;
                let paid = tokio::time::timeout(self.timeout.max(Duration::from_millis(200)), self.pay_debts()).await;
                if !matches!(paid, Ok(Ok(()))) {
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
            self.payer.store(false, Ordering::Release);
            // A debt added just as this task stopped started no payer of its own: look once more.
            if !self.owes.load(Ordering::Acquire) || self.payer.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }

    /// Adds what the fallback admitted to Redis's counters. A debt leaves the books only once Redis
    /// has taken it, so a payment cut off by the timeout is paid again later (it may then count
    /// twice: the safe side for a limit). One payer at a time; the others do not wait for it.
    pub(super) async fn pay_debts(&self) -> redis::RedisResult<()> {
        if !self.owes.load(Ordering::Acquire) {
            return Ok(());
        }
        let Ok(_paying) = self.paying.try_lock() else { return Ok(()) };
        let owed: Vec<(Box<str>, Debt)> = {
            let debts = lock(&self.debts);
            debts.iter().map(|(id, d)| (id.clone(), Debt { limits: d.limits.clone(), usage: d.usage })).collect()
        };
        for (key_id, Debt { limits, usage }) in owed {
            let mut invocation = script(Script::Reconcile).prepare_invoke();
            for (limit, _) in &limits {
                invocation.key(self.counter(&key_id, limit));
            }
            invocation.key(self.usage_key(&key_id));
            invocation.arg(limits.len());
            for (_, cost) in &limits {
                invocation.arg(*cost);
            }
            invocation.arg(usage);
            self.conn.write::<i64>(&invocation).await?;
            // Paid: off the books, less anything the fallback admitted meanwhile.
            let mut debts = lock(&self.debts);
            if let Some(debt) = debts.get_mut(&key_id) {
                for (limit, paid) in &limits {
                    if let Some((_, c)) = debt.limits.iter_mut().find(|(l, _)| l == limit) {
                        *c = c.saturating_sub(*paid);
                    }
                }
                debt.limits.retain(|(_, c)| *c > 0);
                debt.usage = debt.usage.saturating_sub(usage);
                if debt.limits.is_empty() && debt.usage == 0 {
                    debts.remove(&key_id);
                }
            }
            // Redis counts the fallback's usage now: the local share starts again from its word.
            self.local.forget_usage(&key_id);
        }
        let mut debts = lock(&self.debts);
        if debts.is_empty() {
            self.owes.store(false, Ordering::Release);
        }
        debts.shrink_to_fit();
        Ok(())
    }
}

/// One instance's share of a limit.
fn share(limit: &RateLimit, instances: u64) -> RateLimit {
    if instances <= 1 {
        return limit.clone();
    }
    RateLimit::new(limit.name(), (limit.limit() / instances).max(1), limit.window()).unwrap_or_else(|_| limit.clone())
}
