//! What the Redis limiter does without Redis: [`Fallback::Local`] decides each instance's share
//! in memory, mirrored from Redis's last answers, and what it admits is owed to the shared
//! counters until Redis takes it.

use super::batch::Decision;
use super::scripts::{script, Script};
use super::{Fallback, Shared};
use crate::limit::ledger::Whose;
use crate::limit::{IdentityLimits, LimitError, LimitRequest, LimitState, LimitVerdict, Limiter, RateLimit};
use crate::lock::lock;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What the fallback admitted for the keys under one hash tag, to add to Redis's counters.
#[derive(Default, Clone)]
pub(super) struct Debt {
    /// Per counter, the cost admitted.
    counters: Vec<(String, u64)>,
    /// Per usage hash and refill period, the amount admitted.
    usage: Vec<(String, u64, u64)>,
    /// Whose local usage counts to forget once Redis has taken them.
    ledgers: Vec<(Whose, Box<str>)>,
}

impl Shared {
    /// With a local fallback, mirrors Redis's answer into this instance's share of each limit and
    /// balance, so the fallback starts from what Redis said was left.
    pub(super) fn remember(&self, d: &Decision, states: &[LimitState], spent: &[i64]) {
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
        let (mine, theirs) = shares.split_at(d.limits.len().min(shares.len()));
        self.local.mirror(&d.key_id, d.identity.as_deref(), mine, theirs);
        let mut known = lock(&self.spent);
        for ((key, _, _), spent) in d.usage.iter().zip(spent) {
            let spent = u128::try_from(*spent).unwrap_or(0);
            match known.get_mut(key.as_str()) {
                Some(known) => *known = spent,
                None => drop(known.insert(key.as_str().into(), spent)),
            }
        }
    }

    /// The fallback's decision, counted; what it admits is owed to the shared counters, and a
    /// task pays that as soon as Redis answers again.
    pub(super) fn fall_back(self: &Arc<Self>, d: &Decision, why: String) -> Result<LimitVerdict, LimitError> {
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
        let scaled = |limits: &[(RateLimit, u64)]| -> Vec<(RateLimit, u64)> {
            limits.iter().map(|(l, cost)| (share(l, n), *cost)).collect()
        };
        let (limits, shared) = (scaled(&d.limits), scaled(&d.shared));
        // Each usage hash in `d.usage` is, in order, the key's then the identity's.
        let mut hashes = d.usage.iter();
        let [mine, theirs] = d.request_usage.map(|u| {
            let mut u = u?;
            let (key, ..) = hashes.next()?;
            let spent = lock(&self.spent).get(key.as_str()).copied();
            let spent = spent.unwrap_or(0).max(u.reported);
            // This instance's share of what was left, counted from zero by the local ledger.
            u.allowed = u.allowed.saturating_sub(spent) / u128::from(n);
            u.reported = 0;
            Some(u)
        });
        let identity = d.identity.as_deref().map(|id| IdentityLimits { id, limits: &shared, usage: theirs });
        let request = LimitRequest { limits: &limits, usage: mine, identity };
        let verdict = self.local.check_now(&d.key_id, &request).expect("memory decides now");
        if verdict.is_ok() {
            let mut debts = lock(&self.debts);
            let debt = match debts.get_mut(d.tag()) {
                Some(debt) => debt,
                None => debts.entry(d.tag().into()).or_default(),
            };
            for (counter, (_, cost)) in d.counters(self).zip(d.all_limits()) {
                let counter = counter.to_string();
                match debt.counters.iter_mut().find(|(c, _)| *c == counter) {
                    Some((_, owed)) => *owed = owed.saturating_add(*cost),
                    None => debt.counters.push((counter, *cost)),
                }
            }
            for (key, u, period) in &d.usage {
                match debt.usage.iter_mut().find(|(k, p, _)| k == key && p == period) {
                    Some((_, _, owed)) => *owed = owed.saturating_add(u.amount),
                    None => debt.usage.push((key.clone(), *period, u.amount)),
                }
            }
            let whose = [(Whose::Key, Some(&*d.key_id)), (Whose::Identity, d.identity.as_deref())];
            for (whose, id) in whose {
                if let Some(id) = id.filter(|id| !debt.ledgers.iter().any(|(w, i)| *w == whose && **i == **id)) {
                    debt.ledgers.push((whose, id.into()));
                }
            }
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
        let owed: Vec<(Box<str>, Debt)> = lock(&self.debts).iter().map(|(t, d)| (t.clone(), d.clone())).collect();
        for (tag, paid) in owed {
            let mut invocation = script(Script::Reconcile).prepare_invoke();
            invocation.arg(paid.counters.len());
            for (counter, cost) in &paid.counters {
                invocation.key(counter).arg(*cost);
            }
            for (key, period, amount) in &paid.usage {
                invocation.key(key).arg(*amount).arg(*period);
            }
            self.conn.write::<i64>(&invocation).await?;
            // Paid: off the books, less anything the fallback admitted meanwhile.
            let mut debts = lock(&self.debts);
            if let Some(debt) = debts.get_mut(&tag) {
                for (counter, cost) in &paid.counters {
                    if let Some((_, c)) = debt.counters.iter_mut().find(|(k, _)| k == counter) {
                        *c = c.saturating_sub(*cost);
                    }
                }
                debt.counters.retain(|(_, c)| *c > 0);
                for (key, period, amount) in &paid.usage {
                    if let Some((.., a)) = debt.usage.iter_mut().find(|(k, p, _)| k == key && p == period) {
                        *a = a.saturating_sub(*amount);
                    }
                }
                debt.usage.retain(|(.., a)| *a > 0);
                if debt.counters.is_empty() && debt.usage.is_empty() {
                    debts.remove(&tag);
                }
            }
            drop(debts);
            // Redis counts the fallback's usage now: the local share starts again from its word.
            for (whose, id) in &paid.ledgers {
                self.local.forget_usage(*whose, id);
            }
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
