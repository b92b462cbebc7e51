//! Global rules on the hot path. A bucket of a global rule spends tokens
//! leased from its global bucket in etcd ("held"); below a low-water mark it
//! asks the lease coordinator for more through a [`LeaseSink`] (non-blocking)
//! and never waits. While etcd is unreachable (or this host's clock is off)
//! the rule's `on_failure` policy decides, and what is admitted beyond the
//! held tokens is remembered as debt to charge to the global bucket later.
//! Under `local` that starts as soon as a call failed (SUSPECT), for buckets
//! whose held tokens ran out; a bucket's local fallback (its `tat`) is kept
//! drained while leased tokens decide, so it never opens with a burst.
//!
//! Credit is bounded: a fresh bucket may admit one request (at most one
//! batch, `b_max`) before its first grant, once, and only while the rule's
//! outstanding credit on this daemon is under its cap, so many fresh keys
//! cannot each take a batch; a bucket whose first lease failed or came back
//! empty never borrows again.
//!
//! No I/O and no `.await` here; the coordinator (`daemon::lease`) does the
//! etcd work and writes grants back through [`super::Limiter::credit`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use super::bucket::{self, BucketParams, Verdict};
use super::key::BucketKey;
use super::rules::Rule;
use crate::protocol::{Outcome, Priority};
use crate::rule::{OnFailure, RuleSpec};

/// Lease state of one bucket, packed into its `u64` `aux` word: held tokens
/// (24 bits), debt (22 bits), tokens asked for since the coordinator last
/// looked (16 bits), no longer fresh (1 bit), refill requested (1 bit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allotment {
    /// Leased tokens not yet spent.
    pub held: u32,
    /// Tokens admitted beyond the held ones (a fresh bucket's one credit,
    /// critical requests, requests while etcd was unreachable), to be charged
    /// to the global bucket.
    pub debt: u32,
    /// Tokens asked for (allowed or not), saturating: the bucket's demand.
    pub wanted: u16,
    /// The bucket is not fresh: it borrowed once, or a lease round for it
    /// ended (granted, empty or failed). It never borrows again.
    pub leased: bool,
    /// A refill was asked for and not yet answered.
    pub requested: bool,
}

/// Largest held count (24 bits); grants beyond it are not credited.
pub const HELD_MAX: u32 = (1 << 24) - 1;
const DEBT_MAX: u32 = (1 << 22) - 1;

impl Allotment {
    #[inline]
    pub fn unpack(word: u64) -> Allotment {
        Allotment {
            held: (word & u64::from(HELD_MAX)) as u32,
            debt: ((word >> 24) as u32) & DEBT_MAX,
            wanted: (word >> 46) as u16,
            leased: (word >> 62) & 1 == 1,
            requested: word >> 63 == 1,
        }
    }

    #[inline]
    pub fn pack(self) -> u64 {
        u64::from(self.held.min(HELD_MAX))
            | (u64::from(self.debt.min(DEBT_MAX)) << 24)
            | (u64::from(self.wanted) << 46)
            | (u64::from(self.leased) << 62)
            | (u64::from(self.requested) << 63)
    }

    /// Adds a grant to the held tokens (never past [`HELD_MAX`]); returns
    /// what did not fit.
    pub fn credit(&mut self, tokens: u64) -> u64 {
        let room = u64::from(HELD_MAX - self.held.min(HELD_MAX));
        let added = tokens.min(room);
        self.held += added as u32;
        self.leased = true;
        self.requested = false;
        tokens - added
    }

    fn add_debt(&mut self, cost: u64) {
        self.debt = (u64::from(self.debt) + cost).min(u64::from(DEBT_MAX)) as u32;
    }

    #[inline]
    fn want(&mut self, cost: u64) {
        self.wanted = (u64::from(self.wanted) + cost).min(u64::from(u16::MAX)) as u16;
    }
}

/// State of the etcd cluster as the hot path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum EtcdState {
    /// Calls succeed.
    Healthy = 0,
    /// Calls started failing: keep serving held tokens (and leasing); under
    /// `on_failure = "local"`, buckets that ran dry use their fallback.
    Suspect = 1,
    /// Unreachable: global rules follow their `on_failure` policy.
    Degraded = 2,
    /// Reachable again: rules re-listed, debts being posted.
    Recovering = 3,
}

impl EtcdState {
    /// Every state, in the order of their values.
    pub const ALL: [EtcdState; 4] = [
        EtcdState::Healthy,
        EtcdState::Suspect,
        EtcdState::Degraded,
        EtcdState::Recovering,
    ];

    fn from_u8(v: u8) -> EtcdState {
        match v {
            0 => EtcdState::Healthy,
            1 => EtcdState::Suspect,
            2 => EtcdState::Degraded,
            _ => EtcdState::Recovering,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EtcdState::Healthy => "healthy",
            EtcdState::Suspect => "suspect",
            EtcdState::Degraded => "degraded",
            EtcdState::Recovering => "recovering",
        }
    }
}

/// How the hot path (and eviction) reaches the lease coordinator: both
/// calls must return at once, never wait; `false` means the message was not
/// taken (a full queue) and the caller acts as if it was never sent.
pub trait LeaseSink: Send + Sync + std::fmt::Debug {
    /// A global rule is being installed: fill in its lease plan (batch,
    /// credit cap, fallback bucket) so its first request can use it.
    fn plan(&self, rule: &Rule);

    /// The bucket ran low (or is fresh and `borrowed` tokens on credit): lease
    /// more tokens.
    fn refill(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64, borrowed: u64) -> bool;

    /// The bucket is gone (evicted, rule changed): give its held tokens back
    /// and charge its debt.
    fn release(&self, rule: &Arc<Rule>, key: BucketKey, allotment: Allotment) -> bool;

    /// Charge `tokens` of debt to the bucket now (a per-request rule's
    /// Critical request over the limit: no refill would carry it). Changes
    /// nothing else about the bucket.
    fn debt(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64, tokens: u64) -> bool;
}

/// What the hot path shares with the coordinator.
#[derive(Debug)]
pub struct ClusterLink {
    state: AtomicU8,
    sink: Box<dyn LeaseSink>,
    /// `on_failure` of global rules that set none.
    pub default_on_failure: OnFailure,
    /// Events dropped because the coordinator's queue was full.
    pub dropped_events: AtomicU64,
    /// This daemon's wall clock is further from its peers' than
    /// `max_clock_skew`: it must not lease (set by the cluster's clock check).
    clock_skewed: AtomicBool,
}

impl ClusterLink {
    pub fn new(sink: impl LeaseSink + 'static, default_on_failure: OnFailure) -> ClusterLink {
        ClusterLink {
            state: AtomicU8::new(EtcdState::Suspect as u8),
            sink: Box::new(sink),
            default_on_failure,
            dropped_events: AtomicU64::new(0),
            clock_skewed: AtomicBool::new(false),
        }
    }

    /// Whether this daemon's clock is beyond `max_clock_skew` of its peers.
    #[inline]
    pub fn clock_skewed(&self) -> bool {
        self.clock_skewed.load(Ordering::Relaxed)
    }

    pub fn set_clock_skewed(&self, skewed: bool) {
        self.clock_skewed.store(skewed, Ordering::Relaxed);
    }

    /// Global rules follow their `on_failure` policy: etcd is unreachable, or
    /// this daemon's clock cannot be trusted for leasing.
    #[inline]
    pub fn failing(&self) -> bool {
        self.state() == EtcdState::Degraded || self.clock_skewed()
    }

    #[inline]
    pub fn state(&self) -> EtcdState {
        EtcdState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: EtcdState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Plans a global rule that is being installed.
    pub fn plan(&self, rule: &Rule) {
        self.sink.plan(rule);
    }

    /// Asks the coordinator for a refill without waiting; `false` (counted)
    /// if its queue is full.
    pub fn refill(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64, borrowed: u64) -> bool {
        self.counted(self.sink.refill(rule, key, hash, borrowed))
    }

    /// Hands a gone bucket's lease to the coordinator; `false` (counted) if
    /// its queue is full (the held tokens are then lost: under-admission).
    pub fn release(&self, rule: &Arc<Rule>, key: BucketKey, allotment: Allotment) -> bool {
        self.counted(self.sink.release(rule, key, allotment))
    }

    /// Hands a debt to charge now to the coordinator; `false` (counted) if
    /// its queue is full (the bucket's word keeps it then).
    pub fn debt(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64, tokens: u64) -> bool {
        self.counted(self.sink.debt(rule, key, hash, tokens))
    }

    /// Counts an event the coordinator's queue had no room for.
    fn counted(&self, sent: bool) -> bool {
        if !sent {
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// Per global rule, tuned by the coordinator and read by the hot path.
#[derive(Debug)]
pub struct GlobalRuleState {
    /// Ask for a refill when held tokens drop below this.
    pub low_water: AtomicU64,
    /// Current largest batch per lease (`b_max`, for stats).
    pub batch: AtomicU64,
    /// Live daemons using the rule at the last count (`N`).
    pub members: AtomicU64,
    /// The local fallback bucket used with `on_failure = "local"`.
    pub fallback_interval_ns: AtomicU64,
    pub fallback_tau_ns: AtomicU64,
    /// The accuracy cannot be met by batching: one lease per request.
    pub per_request: AtomicBool,
    /// Tokens admitted on credit by fresh buckets of this rule whose first
    /// lease has not committed yet, and the cap on them.
    pub credit_out: AtomicU64,
    pub credit_cap: AtomicU64,
    /// The rule has `max_buckets_per_rule` leased buckets on this daemon:
    /// fresh buckets do not borrow (their lease would be refused).
    pub at_cap: AtomicBool,
}

impl GlobalRuleState {
    pub fn new(spec: &RuleSpec) -> GlobalRuleState {
        let p = BucketParams::from_spec(spec);
        GlobalRuleState {
            low_water: AtomicU64::new(1),
            // 0 until the coordinator plans the rule.
            batch: AtomicU64::new(0),
            members: AtomicU64::new(1),
            fallback_interval_ns: AtomicU64::new(p.interval_ns),
            fallback_tau_ns: AtomicU64::new(p.tau_ns),
            per_request: AtomicBool::new(false),
            credit_out: AtomicU64::new(0),
            // 0 until the coordinator plans the rule: no credit before that.
            credit_cap: AtomicU64::new(0),
            at_cap: AtomicBool::new(false),
        }
    }

    /// Takes `cost` tokens of the rule's credit, if under the cap.
    fn try_borrow(&self, cost: u64) -> bool {
        if self.at_cap.load(Ordering::Relaxed) {
            return false;
        }
        let cap = self.credit_cap.load(Ordering::Relaxed);
        self.credit_out
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |out| {
                (out + cost <= cap).then_some(out + cost)
            })
            .is_ok()
    }

    /// Gives back credit taken with `try_borrow` (its lease committed, or the
    /// borrow was not sent).
    pub fn repay(&self, cost: u64) {
        let _ = self
            .credit_out
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |out| {
                Some(out.saturating_sub(cost))
            });
    }

    /// The TAT of a fallback bucket drained at `now` (its depth as in
    /// [`Self::fallback_params`], without that division: every decision on
    /// leased tokens drains).
    #[inline]
    pub fn drained_fallback(&self, now: u64) -> u64 {
        let interval_ns = self.fallback_interval_ns.load(Ordering::Relaxed).max(1);
        now.saturating_add(
            self.fallback_tau_ns
                .load(Ordering::Relaxed)
                .max(interval_ns),
        )
    }

    fn fallback_params(&self) -> BucketParams {
        let interval_ns = self.fallback_interval_ns.load(Ordering::Relaxed).max(1);
        let tau_ns = self
            .fallback_tau_ns
            .load(Ordering::Relaxed)
            .max(interval_ns);
        BucketParams::plain(interval_ns, tau_ns)
    }
}

/// How [`spend`] should treat the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendMode {
    /// As the cluster state says.
    Normal,
    /// A synchronous lease for this request just failed: apply `on_failure`.
    LeaseFailed,
    /// A synchronous lease for this request just granted the cost.
    Leased,
    /// A synchronous lease found too few tokens in the global bucket.
    NotGranted,
}

/// What [`spend`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    Decided(Verdict),
    /// The rule leases one request at a time: the caller must lease `cost`
    /// tokens synchronously (with a short deadline) and call again.
    NeedsLease,
}

/// Decides a request on a global rule's bucket. `aux` is the bucket's packed
/// [`Allotment`]; `tat` its local fallback bucket. May send one refill event.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn spend(
    aux: &mut u64,
    tat: &mut u64,
    rule: &Arc<Rule>,
    client: &str,
    resource: &str,
    hash: u64,
    cost: u64,
    priority: Priority,
    now: u64,
    link: &ClusterLink,
    mode: SpendMode,
) -> Spend {
    let g = rule
        .global
        .as_ref()
        .expect("global rules carry lease state");
    let mut a = Allotment::unpack(*aux);
    a.want(cost);
    let held = u64::from(a.held);
    let degraded = match mode {
        SpendMode::Normal => link.failing(),
        SpendMode::LeaseFailed => true,
        SpendMode::Leased | SpendMode::NotGranted => false,
    };
    let per_request = g.per_request.load(Ordering::Relaxed);
    if per_request && !degraded && mode == SpendMode::Normal && held < cost {
        return Spend::NeedsLease;
    }
    let policy = rule.spec.on_failure.unwrap_or(link.default_on_failure);
    let mut fallen_back = false;
    let interval = rule.params.interval_ns;
    let denied = |held: u64| Verdict {
        outcome: Outcome::Denied,
        remaining: held,
        retry_after_ns: cost.saturating_sub(held).saturating_mul(interval),
        reset_after_ns: 0,
    };
    let verdict = if mode == SpendMode::Leased {
        granted(a.held, Outcome::Allowed)
    } else if mode == SpendMode::NotGranted {
        if priority == Priority::Critical {
            // Over the limit: admitted, and its cost charged to the global
            // bucket now (no refill of a per-request rule would carry it;
            // the word keeps it if the queue is full).
            a.add_debt(cost);
            let owed = u64::from(a.debt);
            if link.debt(rule, BucketKey::new(client, resource), hash, owed) {
                a.debt = 0;
            }
            granted(a.held, Outcome::Bypassed)
        } else {
            denied(held)
        }
    } else if held >= cost {
        a.held -= cost as u32;
        granted(a.held, Outcome::Allowed)
    } else if !degraded {
        if !a.leased
            && !per_request
            && held == 0
            && cost <= g.batch.load(Ordering::Relaxed)
            && g.try_borrow(cost)
        {
            // A fresh bucket: admit now on credit, charged with its first
            // lease; denying every first request would be worse, and the
            // over-admission stays within one batch per daemon and bucket,
            // and within the rule's credit cap per daemon.
            if link.refill(rule, BucketKey::new(client, resource), hash, cost) {
                a.leased = true;
                a.requested = true;
                a.add_debt(cost);
                granted(0, Outcome::Allowed)
            } else {
                g.repay(cost);
                denied(held)
            }
        } else if priority == Priority::Critical {
            // Admitted, counted, and charged to the global bucket later.
            a.held = 0;
            a.add_debt(cost - held);
            granted(0, Outcome::Bypassed)
        } else if policy == OnFailure::Local && link.state() == EtcdState::Suspect {
            // A call to etcd just failed and this bucket ran dry: under
            // `local` the per-host share decides at once (and is charged
            // with the next lease) instead of denying everything until the
            // cluster is declared degraded: a leader election must not
            // leave the limit unused.
            fallen_back = true;
            local_fallback(&mut a, tat, g, now, cost, priority).unwrap_or_else(|| denied(held))
        } else {
            denied(held)
        }
    } else {
        fallen_back = true;
        match policy {
            OnFailure::Open => {
                a.held = 0;
                a.add_debt(cost - held);
                granted(0, Outcome::Allowed)
            }
            OnFailure::Closed if priority != Priority::Critical => denied(held),
            OnFailure::Closed => {
                a.held = 0;
                a.add_debt(cost - held);
                granted(0, Outcome::Bypassed)
            }
            OnFailure::Local => {
                local_fallback(&mut a, tat, g, now, cost, priority).unwrap_or_else(|| denied(held))
            }
        }
    };
    if !fallen_back {
        // Decided on leased tokens: the local fallback bucket is drained
        // as of now, so when held tokens run out during an outage it admits
        // only what its rate earned since (no burst on entry: a busy bucket
        // has just been using the global limit). Never lowered: a Critical
        // overdraft of the fallback stays owed to it.
        *tat = (*tat).max(g.drained_fallback(now));
    }
    let low = u64::from(a.held) < g.low_water.load(Ordering::Relaxed);
    if !degraded && !per_request && low && !a.requested {
        a.requested = link.refill(rule, BucketKey::new(client, resource), hash, 0);
    }
    *aux = a.pack();
    Spend::Decided(verdict)
}

/// `on_failure = "local"`: the tokens beyond the held ones come from the
/// bucket's local fallback bucket (the per-host share) and are owed. `None`
/// if they exceed that bucket's capacity (never allowed).
#[inline]
fn local_fallback(
    a: &mut Allotment,
    tat: &mut u64,
    g: &GlobalRuleState,
    now: u64,
    cost: u64,
    priority: Priority,
) -> Option<Verdict> {
    let fallback = g.fallback_params();
    let extra = cost - u64::from(a.held);
    if extra > fallback.capacity {
        return None;
    }
    let v = bucket::try_take(tat, &fallback, now, extra, priority);
    if v.outcome != Outcome::Denied {
        a.held = 0;
        a.add_debt(extra);
    }
    Some(v)
}

fn granted(remaining: u32, outcome: Outcome) -> Verdict {
    Verdict {
        outcome,
        remaining: u64::from(remaining),
        retry_after_ns: 0,
        reset_after_ns: 0,
    }
}

/// A sink that takes every message and does nothing (tests and benchmarks
/// of code that needs a [`ClusterLink`] but no coordinator: refills asked of
/// it never come).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct NullSink;

impl LeaseSink for NullSink {
    fn plan(&self, _: &Rule) {}
    fn refill(&self, _: &Arc<Rule>, _: BucketKey, _: u64, _: u64) -> bool {
        true
    }
    fn release(&self, _: &Arc<Rule>, _: BucketKey, _: Allotment) -> bool {
        true
    }
    fn debt(&self, _: &Arc<Rule>, _: BucketKey, _: u64, _: u64) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allotments_pack_losslessly() {
        for a in [
            Allotment::default(),
            Allotment {
                held: HELD_MAX,
                debt: DEBT_MAX,
                wanted: u16::MAX,
                leased: true,
                requested: true,
            },
            Allotment {
                held: 7,
                debt: 3,
                wanted: 9,
                leased: false,
                requested: false,
            },
        ] {
            assert_eq!(Allotment::unpack(a.pack()), a);
        }
        let mut a = Allotment::default();
        a.add_debt(u64::MAX);
        assert_eq!(a.debt, DEBT_MAX, "debt saturates");
        a.want(u64::MAX);
        assert_eq!(a.wanted, u16::MAX, "demand saturates");
    }

    #[test]
    fn grants_are_held_and_overflow_is_returned() {
        let mut a = Allotment {
            debt: 3,
            requested: true,
            ..Allotment::default()
        };
        assert_eq!(a.credit(10), 0);
        // Debt is not paid from grants: it is charged to etcd by the
        // coordinator, once, with the Txn that clears it.
        assert_eq!(
            (a.held, a.debt, a.leased, a.requested),
            (10, 3, true, false)
        );
        let mut b = Allotment {
            held: HELD_MAX - 4,
            ..Allotment::default()
        };
        assert_eq!(b.credit(10), 6);
        assert_eq!(b.held, HELD_MAX);
    }

    use crate::daemon::limiter::{DefaultAction, Limiter, LimiterConfig};
    use crate::protocol::RuleSource;
    use crate::rule::{RuleSpec, Scope};
    use proptest::prelude::*;

    /// A global rule (100/s, burst 20) with `policy`, its batch plan set by
    /// hand; unplanned, its fallback is the rule's own rate and burst.
    fn global_rule(policy: OnFailure, batch: u64, credit_cap: u64, per_request: bool) -> Arc<Rule> {
        let limiter = Limiter::new(LimiterConfig {
            shards: 1,
            max_buckets: 10,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        });
        let mut spec = RuleSpec::new("g", "*", "*", 100, std::time::Duration::from_secs(1));
        spec.scope = Scope::Global;
        spec.burst = Some(20);
        spec.on_failure = Some(policy);
        spec.fallback_limit = Some(10);
        limiter
            .set_rules(vec![(spec, RuleSource::Etcd)], 0)
            .unwrap();
        let rule = Arc::clone(limiter.rules().get("g").unwrap());
        let g = rule.global.as_ref().unwrap();
        g.batch.store(batch, Ordering::Relaxed);
        g.low_water.store((batch / 4).max(1), Ordering::Relaxed);
        g.credit_cap.store(credit_cap, Ordering::Relaxed);
        g.per_request.store(per_request, Ordering::Relaxed);
        rule
    }

    #[test]
    fn draining_keeps_a_critical_overdraft_of_the_fallback() {
        // Unplanned: the fallback is the rule's 100/s, burst 20 (tau 200 ms).
        let rule = global_rule(OnFailure::Local, 50, 0, false);
        let link = ClusterLink::new(NullSink, OnFailure::Local);
        link.set_state(EtcdState::Degraded);
        let (mut aux, mut tat, t0, tau) = (0u64, 0u64, 1_000_000_000u64, 200_000_000u64);
        let mut take = |aux: &mut u64, cost, priority, now| match spend(
            aux,
            &mut tat,
            &rule,
            "c",
            "r",
            0,
            cost,
            priority,
            now,
            &link,
            SpendMode::Normal,
        ) {
            Spend::Decided(v) => v.outcome,
            Spend::NeedsLease => unreachable!("not a per-request rule"),
        };
        // Critical empties the fallback, then overdraws it by a bucket.
        assert_eq!(take(&mut aux, 20, Priority::Critical, t0), Outcome::Allowed);
        assert_eq!(
            take(&mut aux, 20, Priority::Critical, t0),
            Outcome::Bypassed
        );
        // Leased tokens decide one request (a drain)...
        let mut a = Allotment::unpack(aux);
        a.credit(1);
        aux = a.pack();
        assert_eq!(take(&mut aux, 1, Priority::Normal, t0), Outcome::Allowed);
        // ...which must not forgive the overdraft: a bucket's time later the
        // fallback is still repaying it, and only then admits again.
        assert_eq!(
            take(&mut aux, 1, Priority::Normal, t0 + tau),
            Outcome::Denied
        );
        assert_eq!(
            take(&mut aux, 1, Priority::Normal, t0 + 2 * tau + 10_000_000),
            Outcome::Allowed
        );
    }

    /// A sink that records what the hot path hands to the coordinator.
    #[derive(Debug, Default, Clone)]
    struct Recording(Arc<parking_lot::Mutex<(u64, u64)>>);

    impl LeaseSink for Recording {
        fn plan(&self, _: &Rule) {}
        fn refill(&self, _: &Arc<Rule>, _: BucketKey, _: u64, _: u64) -> bool {
            true
        }
        fn release(&self, _: &Arc<Rule>, _: BucketKey, a: Allotment) -> bool {
            let mut r = self.0.lock();
            r.0 += u64::from(a.held);
            r.1 += u64::from(a.debt);
            true
        }
        fn debt(&self, _: &Arc<Rule>, _: BucketKey, _: u64, tokens: u64) -> bool {
            self.0.lock().1 += tokens;
            true
        }
    }

    proptest! {
        /// Every token admitted is accounted for in the lease word: taken
        /// from the held tokens or added to the debt (never both, never
        /// neither), whatever the sequence of grants, spends under every
        /// etcd state and policy, debt postings and give-backs; a denial
        /// changes nothing; held tokens always admit, and each policy
        /// decides as documented when etcd fails.
        #[test]
        fn every_admitted_token_is_held_or_owed(
            policy in prop_oneof![Just(OnFailure::Open), Just(OnFailure::Closed), Just(OnFailure::Local)],
            per_request in any::<bool>(),
            batch in 1u64..40,
            credit_cap in 0u64..30,
            steps in proptest::collection::vec(
                (0u8..8, 1u64..12, 0u8..4, 0u64..400_000_000), 1..200),
        ) {
            let rule = global_rule(policy, batch, credit_cap, per_request);
            let sink = Recording::default();
            let link = ClusterLink::new(sink.clone(), OnFailure::Local);
            let (mut aux, mut tat, mut now) = (0u64, 0u64, 0u64);
            // The ledger: credited = admitted-from-held + returned + held;
            // owed (debt) = admitted-beyond-held - charged.
            let (mut credited, mut returned, mut charged, mut admitted) = (0u64, 0u64, 0u64, 0u64);
            let mut charged_by_sink = 0u64;
            for (op, x, p, dt) in steps {
                now += dt;
                let priority = [Priority::Low, Priority::Normal, Priority::High, Priority::Critical][p as usize];
                let before = Allotment::unpack(aux);
                match op {
                    // Spends: healthy, etcd degraded, a per-request lease
                    // that failed, granted, or found the bucket empty, etcd
                    // suspect.
                    0..=4 | 7 => {
                        let mode = match op {
                            2 => SpendMode::LeaseFailed,
                            3 => SpendMode::Leased,
                            4 => SpendMode::NotGranted,
                            _ => SpendMode::Normal,
                        };
                        link.set_state(match op {
                            1 => EtcdState::Degraded,
                            7 => EtcdState::Suspect,
                            _ => EtcdState::Healthy,
                        });
                        let cost = x;
                        let word = aux;
                        let Spend::Decided(v) = spend(
                            &mut aux, &mut tat, &rule, "c", "r", 0, cost, priority, now, &link, mode,
                        ) else {
                            // Only a per-request rule, not degraded, short
                            // of tokens.
                            prop_assert!(per_request && (op == 0 || op == 7));
                            prop_assert!(u64::from(before.held) < cost);
                            prop_assert_eq!(aux, word, "nothing changes before the lease");
                            continue;
                        };
                        let after = Allotment::unpack(aux);
                        let degraded = op == 1 || op == 2;
                        if v.outcome == Outcome::Denied {
                            prop_assert_eq!((after.held, after.debt), (before.held, before.debt));
                        } else if mode == SpendMode::Leased {
                            // The lease granted exactly this request's cost.
                            prop_assert_eq!((after.held, after.debt), (before.held, before.debt));
                            credited += cost;
                            admitted += cost;
                        } else if mode == SpendMode::NotGranted {
                            // Only Critical passes: owed, posted at once with
                            // whatever debt the word had.
                            prop_assert_eq!(after.held, before.held);
                            prop_assert_eq!(after.debt, 0);
                            let posted = sink.0.lock().1 - charged_by_sink;
                            prop_assert_eq!(posted, u64::from(before.debt) + cost);
                            admitted += cost;
                        } else {
                            let from_held = u64::from(before.held - after.held);
                            // Owed: in the word, or posted to the coordinator
                            // at once (per-request rules).
                            let posted = sink.0.lock().1 - charged_by_sink;
                            let owed = u64::from(after.debt) + posted - u64::from(before.debt);
                            prop_assert_eq!(from_held + owed, cost, "{:?} -> {:?}", before, after);
                            admitted += cost;
                        }
                        match mode {
                            SpendMode::Leased => prop_assert_eq!(v.outcome, Outcome::Allowed),
                            SpendMode::NotGranted if priority == Priority::Critical => {
                                prop_assert_eq!(v.outcome, Outcome::Bypassed)
                            }
                            SpendMode::NotGranted => prop_assert_eq!(v.outcome, Outcome::Denied),
                            _ if u64::from(before.held) >= cost => {
                                prop_assert_eq!(v.outcome, Outcome::Allowed, "held tokens admit");
                                prop_assert_eq!(u64::from(after.held), u64::from(before.held) - cost);
                            }
                            _ if degraded => match policy {
                                OnFailure::Open => prop_assert_eq!(v.outcome, Outcome::Allowed),
                                OnFailure::Closed if priority == Priority::Critical => {
                                    prop_assert_eq!(v.outcome, Outcome::Bypassed)
                                }
                                OnFailure::Closed => prop_assert_eq!(v.outcome, Outcome::Denied),
                                // The fallback bucket decides.
                                OnFailure::Local => {}
                            },
                            // Suspect, too few held: under `local` a fresh
                            // bucket still borrows first, Critical bypasses,
                            // and the fallback bucket decides the rest;
                            // the other policies wait for DEGRADED.
                            _ if op == 7
                                && policy == OnFailure::Local
                                && priority != Priority::Critical => {}
                            // Healthy, too few held: a fresh bucket borrows
                            // once within the credit cap, Critical bypasses
                            // (owed), the rest is denied.
                            _ if priority == Priority::Critical => {
                                prop_assert_ne!(v.outcome, Outcome::Denied)
                            }
                            _ if before.leased || before.held > 0 || cost > batch => {
                                prop_assert_eq!(v.outcome, Outcome::Denied)
                            }
                            _ => {}
                        }
                    }
                    // A refill grants x tokens.
                    5 => {
                        let mut a = before;
                        let overflow = a.credit(x);
                        prop_assert_eq!(overflow, 0);
                        aux = a.pack();
                        credited += x;
                    }
                    // The coordinator charges the debt, then gives the held
                    // tokens back (as on eviction or shutdown).
                    _ => {
                        let mut a = before;
                        charged += u64::from(a.debt);
                        a.debt = 0;
                        if x % 2 == 0 {
                            returned += u64::from(a.held);
                            a.held = 0;
                        }
                        aux = a.pack();
                    }
                }
                // What the hot path posted to the coordinator is charged.
                let posted = sink.0.lock().1;
                charged += posted - charged_by_sink;
                charged_by_sink = posted;
                let a = Allotment::unpack(aux);
                // Conservation: what was admitted came from grants (spent
                // ones) or is owed (charged already, or still in the word).
                let spent_from_grants = credited - returned - u64::from(a.held);
                prop_assert_eq!(admitted, spent_from_grants + charged + u64::from(a.debt));
            }
        }

        /// Under `local`, the fallback bucket admits only what its rate
        /// earned since the bucket was last decided on leased tokens (no
        /// burst when an outage begins), and admits whatever that is
        /// (a suspect cluster included: a leader election does not deny
        /// everything); before any such decision it starts full.
        #[test]
        fn the_fallback_admits_what_its_rate_earned_since_leased_tokens_were_used(
            steps in proptest::collection::vec((0u8..4, 1u64..8, 0u8..3, 0u64..300_000_000), 1..200),
        ) {
            // No credit: a fresh bucket never borrows here.
            let rule = global_rule(OnFailure::Local, 50, 0, false);
            let fallback = rule.global.as_ref().unwrap().fallback_params();
            let (t, cap) = (fallback.interval_ns, fallback.capacity);
            let link = ClusterLink::new(NullSink, OnFailure::Local);
            let (mut aux, mut tat, mut now) = (0u64, 0u64, 1u64);
            // When leased tokens last decided, and what the fallback admitted
            // since (or since the start, before any).
            let mut last_leased: Option<u64> = None;
            let mut since = 0u64;
            for (op, x, p, dt) in steps {
                now += dt;
                let priority = [Priority::Low, Priority::Normal, Priority::High][p as usize];
                if op == 0 {
                    let mut a = Allotment::unpack(aux);
                    a.credit(x);
                    aux = a.pack();
                    continue;
                }
                let state = [EtcdState::Healthy, EtcdState::Suspect, EtcdState::Degraded][op as usize - 1];
                link.set_state(state);
                let before = Allotment::unpack(aux);
                let cost = x;
                let Spend::Decided(v) = spend(
                    &mut aux, &mut tat, &rule, "c", "r", 0, cost, priority, now, &link, SpendMode::Normal,
                ) else {
                    unreachable!("not a per-request rule");
                };
                if u64::from(before.held) >= cost || state == EtcdState::Healthy {
                    last_leased = Some(now);
                    since = 0;
                    continue;
                }
                // The fallback decided: the held tokens (if any) and `extra`.
                let extra = cost - u64::from(before.held);
                let earned = match last_leased {
                    Some(at) => (now - at) / t,
                    None => cap + now / t,
                };
                let fresh = last_leased.is_none_or(|at| now - at > fallback.tau_ns);
                if v.outcome == Outcome::Allowed {
                    since += extra;
                    prop_assert!(since <= earned, "{since} admitted, {earned} earned");
                } else if !fresh && (since + extra) * t <= now - last_leased.unwrap() {
                    // Earned and not yet spent: must be admitted (the
                    // fallback has no reserves).
                    prop_assert!(false, "denied {extra} with {} earned, {since} spent", earned);
                }
            }
        }
    }
}
