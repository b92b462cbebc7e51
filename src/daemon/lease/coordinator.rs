//! The [`Coordinator`]: the task that owns the token [`Source`] and every
//! lease operation. The hot path only sends it events (refill, release, a
//! per-request lease); it turns them into one operation per bucket at a
//! time and sends many buckets' operations in one batch, at most
//! [`LeaseSettings::batches_in_flight`] batches at once.
//!
//! An operation carries an identity (`boot nonce << 32 | sequence`) that the
//! bucket value records. Its tokens in transit (held tokens given back,
//! debt charged) stay with the operation until it commits: a failed
//! operation is retried, and one whose outcome is unknown is retried under
//! the same identity, so it is applied at most once and nothing is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::audit::{AuditLog, Record};
use super::etcd::wall_ns;
use super::value::Ask;
use super::{BucketRef, Done, LeaseStats, Op, Outcome, Source, plan};
use crate::daemon::health::Health;
use crate::daemon::limiter::global::{Allotment, ClusterLink, EtcdState, LeaseSink};
use crate::daemon::limiter::key::BucketKey;
use crate::daemon::limiter::{LeaseNeeded, Limiter, Rule, SpendMode};

/// Shortest span a demand sample is measured over.
const DEMAND_SAMPLE: Duration = Duration::from_millis(100);

/// Tuning of the coordinator.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// Largest clock difference between hosts planned for.
    pub max_clock_skew: Duration,
    /// A batch should last about this long at the bucket's demand.
    pub prefetch: Duration,
    /// Longest wait between retries while a global bucket is empty.
    pub max_backoff: Duration,
    /// Fallback limit of `on_failure = "local"`: `limit * (1 + slack) / N`.
    pub fallback_slack: f64,
    /// Tokens a rule's fresh buckets may admit on credit at once on this
    /// daemon (before their first lease commits).
    pub max_credit: u64,
    /// Global buckets per rule this daemon leases for; requests on new
    /// buckets beyond it are denied until idle ones are forgotten.
    pub max_buckets_per_rule: usize,
    /// Lease batches (etcd transactions) in flight at once.
    pub batches_in_flight: usize,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            max_clock_skew: Duration::from_millis(10),
            prefetch: Duration::from_millis(500),
            max_backoff: Duration::from_secs(1),
            fallback_slack: 0.1,
            max_credit: 64,
            max_buckets_per_rule: 100_000,
            batches_in_flight: 2,
        }
    }
}

/// A message to the coordinator.
#[derive(Debug)]
pub enum LeaseEvent {
    Refill {
        rule: Arc<Rule>,
        key: BucketKey,
        hash: u64,
        borrowed: u64,
    },
    Release {
        rule: Arc<Rule>,
        key: BucketKey,
        allotment: Allotment,
    },
    /// Charge `tokens` of debt to the bucket (nothing else changes).
    Debt {
        rule: Arc<Rule>,
        key: BucketKey,
        hash: u64,
        tokens: u64,
    },
    /// A per-request rule: lease exactly `cost` tokens; `true` if granted.
    Now {
        rule: Arc<Rule>,
        key: BucketKey,
        hash: u64,
        cost: u64,
        reply: oneshot::Sender<bool>,
    },
}

/// Plans global rules (batch size, low-water mark, credit cap, fallback
/// bucket) for the current membership: when a rule is installed, so its
/// first request already has a plan, and again on every coordinator tick.
#[derive(Debug)]
pub struct Planner {
    pub settings: LeaseSettings,
    /// Live daemons, kept current by the cluster's membership task.
    pub members: Arc<AtomicU64>,
    /// The largest count of the last [`MEMBERS_HOLD`], and since when.
    peak: parking_lot::Mutex<(u64, Instant)>,
}

/// How long a drop in the member count is not believed: a daemon that
/// vanished from etcd (partitioned, its member key expired) may still hold
/// a batch and spend it, so batches of the others grow only once its
/// tokens are surely spent or stale. Joins count at once.
pub const MEMBERS_HOLD: Duration = super::value::HOLDER_TTL;

impl Planner {
    pub fn new(settings: LeaseSettings, members: Arc<AtomicU64>) -> Planner {
        Planner {
            settings,
            members,
            peak: parking_lot::Mutex::new((1, Instant::now())),
        }
    }

    /// `N` for planning: the live members, or more if more were live in the
    /// last [`MEMBERS_HOLD`].
    pub fn members(&self) -> u64 {
        let now = self.members.load(Ordering::Relaxed).max(1);
        let mut peak = self.peak.lock();
        if now >= peak.0 || peak.1.elapsed() >= MEMBERS_HOLD {
            *peak = (now, Instant::now());
        }
        peak.0.max(now)
    }

    pub fn plan(&self, rule: &Rule) {
        let Some(g) = &rule.global else { return };
        let n = self.members();
        let spec = &rule.spec;
        let p = plan(spec, n, self.settings.max_clock_skew);
        let b_max = p.b_max.floor().max(1.0) as u64;
        g.batch.store(b_max, Ordering::Relaxed);
        g.low_water.store((b_max / 4).max(1), Ordering::Relaxed);
        g.members.store(n, Ordering::Relaxed);
        g.per_request.store(p.per_request, Ordering::Relaxed);
        g.credit_cap
            .store(self.settings.max_credit.max(b_max), Ordering::Relaxed);
        // The lenient local limit while etcd is unreachable (or suspect, for
        // buckets that ran dry): `fallback_limit` per window (by default this
        // daemon's share of the rate plus the slack), and a burst of
        // `fallback_limit` as well, never beyond the rule's (by default this
        // daemon's share of it).
        let per_window = spec.fallback_limit.unwrap_or_else(|| {
            ((spec.limit as f64 * (1.0 + self.settings.fallback_slack) / n as f64).ceil() as u64)
                .max(1)
        });
        let window_ns = u64::try_from(spec.window.as_nanos()).unwrap_or(u64::MAX);
        let interval = window_ns.div_ceil(per_window).max(1);
        let burst = match spec.fallback_limit {
            Some(limit) => limit.min(spec.capacity()),
            None => spec.capacity().div_ceil(n),
        }
        .max(1);
        g.fallback_interval_ns.store(interval, Ordering::Relaxed);
        g.fallback_tau_ns
            .store(interval.saturating_mul(burst), Ordering::Relaxed);
    }
}

/// The hot path's [`LeaseSink`]: a bounded queue to the coordinator.
#[derive(Debug, Clone)]
pub struct QueueSink {
    pub events: mpsc::Sender<LeaseEvent>,
    pub planner: Arc<Planner>,
}

impl LeaseSink for QueueSink {
    fn plan(&self, rule: &Rule) {
        self.planner.plan(rule);
    }

    fn refill(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64, borrowed: u64) -> bool {
        self.events
            .try_send(LeaseEvent::Refill {
                rule: Arc::clone(rule),
                key,
                hash,
                borrowed,
            })
            .is_ok()
    }

    fn release(&self, rule: &Arc<Rule>, key: BucketKey, allotment: Allotment) -> bool {
        self.events
            .try_send(LeaseEvent::Release {
                rule: Arc::clone(rule),
                key,
                allotment,
            })
            .is_ok()
    }

    fn debt(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64, tokens: u64) -> bool {
        self.events
            .try_send(LeaseEvent::Debt {
                rule: Arc::clone(rule),
                key,
                hash,
                tokens,
            })
            .is_ok()
    }
}

/// What a connection needs to lease for a per-request rule.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    pub events: mpsc::Sender<LeaseEvent>,
    pub stats: Arc<LeaseStats>,
}

impl LeaseHandle {
    /// One lease of exactly `cost` tokens for one request of a per-request
    /// rule, through the coordinator (batched with other operations),
    /// waiting at most `max(50 ms, 3 x p99)` of recent transactions (100 ms
    /// at most); then the rule's `on_failure` decides.
    pub async fn lease_now(&self, need: LeaseNeeded, cost: u64) -> SpendMode {
        let deadline = self
            .stats
            .txn_deadline(Duration::from_millis(100))
            .unwrap_or(super::MIN_TXN_DEADLINE);
        let (reply, answer) = oneshot::channel();
        let event = LeaseEvent::Now {
            rule: need.rule,
            key: need.key,
            hash: need.hash,
            cost,
            reply,
        };
        let answered = if self.events.try_send(event).is_err() {
            None
        } else {
            tokio::time::timeout(deadline, answer)
                .await
                .ok()
                .and_then(Result::ok)
        };
        match answered {
            Some(true) => SpendMode::Leased,
            Some(false) => SpendMode::NotGranted,
            None => {
                self.stats
                    .per_request_fallbacks
                    .fetch_add(1, Ordering::Relaxed);
                SpendMode::LeaseFailed
            }
        }
    }
}

type KeyId = (Box<str>, BucketKey);

/// Demand and lease state of one global bucket.
#[derive(Debug)]
struct KeyState {
    bucket: BucketRef,
    hash: u64,
    /// The hot path asked for tokens.
    refill: bool,
    /// A per-request lease waiting for an answer.
    now: Option<(u64, oneshot::Sender<bool>)>,
    /// Tokens in transit: to give back and to charge, not yet in an operation.
    give: u64,
    debt: u64,
    /// Credit taken by the bucket's fresh request, repaid when its lease commits.
    borrowed: u64,
    /// The operation sent or to be retried under the same identity, and
    /// when it was first sent.
    op: Option<Op>,
    op_sent: Option<Instant>,
    in_flight: bool,
    /// The bucket is gone: forget it once nothing is in transit.
    released: bool,
    known: Option<super::Known>,
    not_before: Instant,
    /// Smoothed tokens per second the bucket is asked for on this daemon.
    demand: f64,
    /// Tokens asked for since `last_collect` (a sample spans at least
    /// [`DEMAND_SAMPLE`], so frequent leases do not under-read demand).
    wanted: u64,
    last_collect: Instant,
    last_event: Instant,
    /// When the current wait for tokens began (for giving up).
    waiting_since: Option<Instant>,
}

impl KeyState {
    fn has_work(&self) -> bool {
        self.op.is_some() || self.refill || self.now.is_some() || self.give > 0 || self.debt > 0
    }
}

/// What the coordinator shares with the rest of the daemon.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// The hot path's view of the cluster (state, clock flag, sink).
    pub link: Arc<ClusterLink>,
    /// etcd's health, which lease calls report to and recovery ends.
    pub health: Arc<Health>,
    pub stats: Arc<LeaseStats>,
}

/// Owns the [`Source`] and every lease operation.
pub struct Coordinator<S: Source> {
    source: S,
    limiter: Arc<Limiter>,
    link: Arc<ClusterLink>,
    events: mpsc::Receiver<LeaseEvent>,
    settings: LeaseSettings,
    planner: Arc<Planner>,
    stats: Arc<LeaseStats>,
    health: Arc<Health>,
    keys: HashMap<KeyId, KeyState>,
    /// Buckets per rule id (for the per-rule cap).
    per_rule: HashMap<Box<str>, usize>,
    batches: JoinSet<Vec<(Op, Done)>>,
    /// The buckets of each batch in flight, so a batch whose task panicked
    /// is retried (same identities) instead of stalling its buckets.
    batch_keys: HashMap<tokio::task::Id, Vec<KeyId>>,
    /// Operation identities: a random boot nonce and a sequence.
    nonce: u64,
    seq: u32,
    audit: AuditLog,
    /// Per rule: admitted counts at the last audit line.
    audited: HashMap<Box<str>, (u64, u64)>,
    recovering: bool,
}

impl<S: Source> Coordinator<S> {
    /// A coordinator leasing from `source` for `limiter`, reporting through
    /// `wiring` (the hot path's link, etcd health, statistics).
    pub fn new(
        source: S,
        limiter: Arc<Limiter>,
        wiring: Wiring,
        events: mpsc::Receiver<LeaseEvent>,
        planner: Arc<Planner>,
        audit: AuditLog,
    ) -> Self {
        Coordinator {
            source,
            limiter,
            link: wiring.link,
            events,
            settings: planner.settings,
            planner,
            stats: wiring.stats,
            health: wiring.health,
            keys: HashMap::new(),
            per_rule: HashMap::new(),
            batches: JoinSet::new(),
            batch_keys: HashMap::new(),
            nonce: u64::from(rand::random::<u32>()) << 32,
            seq: 0,
            audit,
            audited: HashMap::new(),
            recovering: false,
        }
    }

    /// Runs until `cancel`, then gives every held token back and settles
    /// every operation in transit (bounded by `drain_timeout`).
    pub async fn run(mut self, cancel: CancellationToken, drain_timeout: Duration) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut audit_tick = tokio::time::interval(super::audit::ADMITTED_EVERY);
        // Wakes the loop when a backed-off key becomes ready.
        let mut retry = tokio::time::interval(Duration::from_millis(20));
        loop {
            self.flush();
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(event) = self.events.recv() => {
                    self.handle(event);
                    // Take whatever else is queued before sending a batch.
                    while let Ok(event) = self.events.try_recv() {
                        self.handle(event);
                    }
                }
                Some(done) = self.batches.join_next_with_id(), if !self.batches.is_empty() => {
                    self.joined(done);
                }
                _ = retry.tick() => {}
                _ = tick.tick() => {
                    self.retune();
                    self.recover();
                    self.forget_idle_keys();
                }
                _ = audit_tick.tick() => self.audit_admissions(),
            }
        }
        self.shutdown(drain_timeout).await;
    }

    /// Gives back every held token and settles what is in transit.
    async fn shutdown(&mut self, drain_timeout: Duration) {
        let deadline = tokio::time::Instant::now() + drain_timeout;
        // Events still queued (releases of evicted buckets) are not lost.
        while let Ok(event) = self.events.try_recv() {
            self.handle(event);
        }
        self.reclaim();
        for state in self.keys.values_mut() {
            state.refill = false;
            state.not_before = Instant::now();
            if let Some((_, reply)) = state.now.take() {
                let _ = reply.send(false);
            }
        }
        loop {
            self.flush();
            if self.batches.is_empty() {
                // A failed operation waits a little before its retry: wait
                // for it (within the drain time) unless etcd is unreachable.
                let next = self
                    .keys
                    .values()
                    .filter(|s| s.has_work())
                    .map(|s| s.not_before)
                    .min();
                match next {
                    Some(at) if !self.link.failing() => {
                        let at = tokio::time::Instant::from_std(at).min(deadline);
                        if at >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(
                            at.max(tokio::time::Instant::now() + Duration::from_millis(1)),
                        )
                        .await;
                        continue;
                    }
                    _ => break,
                }
            }
            match tokio::time::timeout_at(deadline, self.batches.join_next_with_id()).await {
                Ok(Some(done)) => {
                    self.joined(done);
                    // A lease that was in flight has just credited its
                    // bucket: that goes back too.
                    self.reclaim();
                }
                Ok(None) | Err(_) => break,
            }
        }
        let (left, owed) = self.keys.values().fold((0, 0), |(g, d), s| {
            let op = s.op.as_ref().map_or((0, 0), |o| (o.ask.give, o.ask.debt));
            (g + s.give + op.0, d + s.debt + op.1)
        });
        if left > 0 || owed > 0 {
            tracing::warn!(
                tokens = left,
                debt = owed,
                "some leased tokens could not be returned (under-admission) and some debt not charged before the drain timeout"
            );
        }
        self.audit_admissions();
        self.audit.flush();
    }

    /// At shutdown: takes every bucket's held tokens and debt to give back
    /// and charge, and stops asking for more.
    fn reclaim(&mut self) {
        for (rule, key, held, debt) in self.limiter.take_leases(true) {
            let hash = self.limiter.table().hash_key(&key);
            let state = self.key_state(&rule, key, hash);
            state.give += held;
            state.debt += debt;
            state.refill = false;
            state.released = true;
        }
    }

    fn key_state(&mut self, rule: &Arc<Rule>, key: BucketKey, hash: u64) -> &mut KeyState {
        let id: KeyId = (rule.id().into(), key.clone());
        let now = Instant::now();
        let per_rule = &mut self.per_rule;
        let cap = self.settings.max_buckets_per_rule;
        let state = self.keys.entry(id).or_insert_with(|| {
            let n = per_rule.entry(rule.id().into()).or_default();
            *n += 1;
            if *n >= cap
                && let Some(g) = &rule.global
            {
                g.at_cap.store(true, Ordering::Relaxed);
            }
            KeyState {
                bucket: BucketRef {
                    rule: Arc::clone(rule),
                    key,
                },
                hash,
                refill: false,
                now: None,
                give: 0,
                debt: 0,
                borrowed: 0,
                op: None,
                op_sent: None,
                in_flight: false,
                released: false,
                known: None,
                not_before: now,
                demand: 0.0,
                wanted: 0,
                last_collect: now,
                last_event: now,
                waiting_since: None,
            }
        });
        if !Arc::ptr_eq(&state.bucket.rule, rule) {
            // The rule was edited: new parameters, same global bucket. An
            // operation in flight keeps its own copy; its grant goes to the
            // bucket under the rule it has now.
            state.bucket.rule = Arc::clone(rule);
            state.hash = hash;
        }
        state.last_event = now;
        state
    }

    fn at_cap(&self, rule: &Rule, key: &BucketKey) -> bool {
        let id: KeyId = (rule.id().into(), key.clone());
        !self.keys.contains_key(&id)
            && self.per_rule.get(rule.id()).copied().unwrap_or(0)
                >= self.settings.max_buckets_per_rule
    }

    fn handle(&mut self, event: LeaseEvent) {
        match event {
            LeaseEvent::Refill {
                rule,
                key,
                hash,
                borrowed,
            } => {
                if self.at_cap(&rule, &key) {
                    self.stats
                        .bucket_cap_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    // Fresh buckets stop borrowing while the rule is at its
                    // cap (set with the count), so the credit of a borrow
                    // made before that is repaid: it cannot recur.
                    if let Some(g) = &rule.global {
                        g.at_cap.store(true, Ordering::Relaxed);
                        g.repay(borrowed);
                    }
                    self.limiter.clear_request(&rule, &key, hash);
                    return;
                }
                let state = self.key_state(&rule, key, hash);
                // A bucket released (its rule edited, or evicted) and asked
                // for again lives on: it must be served, not forgotten.
                state.released = false;
                state.refill = true;
                state.borrowed += borrowed;
                state.waiting_since.get_or_insert_with(Instant::now);
            }
            LeaseEvent::Release {
                rule,
                key,
                allotment,
            } => {
                let hash = self.limiter.table().hash_key(&key);
                let state = self.key_state(&rule, key, hash);
                state.give += u64::from(allotment.held);
                state.debt += u64::from(allotment.debt);
                state.refill = false;
                state.released = true;
            }
            LeaseEvent::Debt {
                rule,
                key,
                hash,
                tokens,
            } => {
                // Only the debt: a lease waiting for this key, its refill
                // and its demand are left as they are.
                self.key_state(&rule, key, hash).debt += tokens;
            }
            LeaseEvent::Now {
                rule,
                key,
                hash,
                cost,
                reply,
            } => {
                if self.at_cap(&rule, &key) {
                    self.stats
                        .bucket_cap_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(false);
                    return;
                }
                let state = self.key_state(&rule, key, hash);
                state.released = false;
                if let Some((_, old)) = state.now.replace((cost, reply)) {
                    // One per-request lease per bucket at a time.
                    let _ = old.send(false);
                }
                state.not_before = Instant::now();
            }
        }
    }

    /// Sends the operations that are ready, in batches.
    fn flush(&mut self) {
        if self.batches.len() >= self.settings.batches_in_flight {
            return;
        }
        let failing = self.link.failing();
        let now = Instant::now();
        let mut ready: Vec<KeyId> = Vec::new();
        for (id, s) in &self.keys {
            if s.in_flight || now < s.not_before || !s.has_work() {
                continue;
            }
            // While etcd is unreachable or our clock is off, nothing is sent
            // but the probing of the health machine; returns wait too.
            if failing {
                continue;
            }
            ready.push(id.clone());
        }
        if ready.is_empty() {
            return;
        }
        let mut ops = Vec::with_capacity(ready.len());
        for id in ready {
            if let Some(op) = self.build(&id) {
                ops.push(op);
            }
        }
        if ops.is_empty() {
            return;
        }
        let per_batch = ops
            .len()
            .div_ceil(self.settings.batches_in_flight - self.batches.len());
        while !ops.is_empty() {
            let batch: Vec<Op> = ops.drain(..per_batch.min(ops.len())).collect();
            self.stats
                .ops
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let keys = batch
                .iter()
                .map(|op| (op.bucket.rule.id().into(), op.bucket.key.clone()))
                .collect();
            let source = self.source.clone();
            let task = self.batches.spawn(async move { source.apply(batch).await });
            self.batch_keys.insert(task.id(), keys);
        }
    }

    /// A batch task ended: its results, or (it panicked, a bug) its
    /// operations marked uncertain and retried under the same identities.
    fn joined(&mut self, done: Result<(tokio::task::Id, Vec<(Op, Done)>), tokio::task::JoinError>) {
        match done {
            Ok((id, results)) => {
                self.batch_keys.remove(&id);
                self.finish(results);
            }
            Err(e) => {
                let keys = self.batch_keys.remove(&e.id()).unwrap_or_default();
                tracing::error!(
                    buckets = keys.len(),
                    "a lease batch failed ({e}); its operations are retried under the same identities"
                );
                for id in keys {
                    if let Some(state) = self.keys.get_mut(&id) {
                        state.in_flight = false;
                        if let Some(op) = &mut state.op {
                            op.uncertain = true;
                            op.known = None;
                        }
                        state.not_before = Instant::now() + self.settings.max_backoff;
                    }
                }
            }
        }
    }

    /// The next operation of a bucket, or `None` if it has nothing to do.
    fn build(&mut self, id: &KeyId) -> Option<Op> {
        let prefetch = self.settings.prefetch.as_secs_f64();
        let state = self.keys.get_mut(id)?;
        if let Some(op) = &state.op {
            let stale = op.uncertain
                && state
                    .op_sent
                    .is_some_and(|t| t.elapsed() > super::value::HOLDER_TTL / 2);
            if !stale {
                // Retried as it was, under the same identity.
                state.in_flight = true;
                return Some(op.clone());
            }
            // Its record may be pruned from the value by now, so a retry
            // could no longer tell that it committed: assume it did (its
            // returns and debts applied, its grant lost: under-admission,
            // never a second application).
            tracing::warn!(
                rule = %op.bucket.rule.id(),
                "a lease operation of unknown outcome is too old to check; assuming it committed"
            );
            state.op = None;
        }
        let rule = Arc::clone(&state.bucket.rule);
        let g = rule.global.as_ref()?;
        let b_max = g.batch.load(Ordering::Relaxed).max(1);
        let mut take = 0;
        let mut min = 1;
        if !state.released && (state.refill || state.now.is_some()) {
            match self.limiter.collect(&rule, &state.bucket.key, state.hash) {
                Some(c) => {
                    let now = Instant::now();
                    let secs = now.duration_since(state.last_collect).as_secs_f64();
                    state.wanted += c.wanted;
                    let sample = DEMAND_SAMPLE.as_secs_f64();
                    if secs >= sample || state.demand == 0.0 {
                        let rate = state.wanted as f64 / secs.max(sample);
                        state.demand = if state.demand == 0.0 {
                            rate
                        } else {
                            0.7 * state.demand + 0.3 * rate
                        };
                        state.wanted = 0;
                        state.last_collect = now;
                    }
                    state.debt += c.debt;
                    if let Some((cost, _)) = &state.now {
                        take = *cost;
                        min = *cost;
                    } else {
                        // Held plus the new batch stays within b_max.
                        let wanted = ((state.demand * prefetch).ceil() as u64).clamp(1, b_max);
                        take = wanted.saturating_sub(c.held);
                    }
                }
                None => {
                    // The bucket is gone; its release event brings the rest.
                    state.refill = false;
                    if let Some((_, reply)) = state.now.take() {
                        let _ = reply.send(false);
                    }
                }
            }
        }
        if take == 0 && state.give == 0 && state.debt == 0 {
            if state.refill {
                // Enough held already: answer the request.
                state.refill = false;
                self.limiter.credit(&rule, &state.bucket.key, state.hash, 0);
            }
            return None;
        }
        self.seq = self.seq.wrapping_add(1);
        let op = Op {
            bucket: state.bucket.clone(),
            ask: Ask {
                op: self.nonce | u64::from(self.seq),
                take,
                min,
                give: std::mem::take(&mut state.give),
                debt: std::mem::take(&mut state.debt),
                // A released bucket asks for nothing any more: its demand
                // stops counting against the other daemons' shares.
                demand: if state.released { 0.0 } else { state.demand },
            },
            known: state.known.take(),
            uncertain: false,
        };
        state.op = Some(op.clone());
        state.op_sent = Some(Instant::now());
        state.in_flight = true;
        Some(op)
    }

    fn finish(&mut self, results: Vec<(Op, Done)>) {
        let node = self.source.node().to_owned();
        for (op, done) in results {
            let id: KeyId = (op.bucket.rule.id().into(), op.bucket.key.clone());
            self.audit_op(&node, &op, &done);
            let Some(state) = self.keys.get_mut(&id) else {
                continue;
            };
            state.in_flight = false;
            state.known = done.known;
            let now = Instant::now();
            match done.outcome {
                Outcome::Committed {
                    granted,
                    retry_after,
                    ..
                } => {
                    if done.resolved {
                        self.stats.resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    state.op = None;
                    self.stats
                        .tokens_leased
                        .fetch_add(granted, Ordering::Relaxed);
                    self.stats
                        .tokens_returned
                        .fetch_add(op.ask.give, Ordering::Relaxed);
                    self.stats
                        .debt_charged
                        .fetch_add(op.ask.debt, Ordering::Relaxed);
                    if op.ask.debt > 0 && state.borrowed > 0 {
                        // The fresh request's credit is charged now.
                        if let Some(g) = &op.bucket.rule.global {
                            g.repay(state.borrowed);
                        }
                        state.borrowed = 0;
                    }
                    // The rule as the bucket has it now (it may have been
                    // edited while the operation was in flight).
                    let rule = &Arc::clone(&state.bucket.rule);
                    if let Some((cost, reply)) = state.now.take() {
                        let ok = granted >= cost;
                        // The request may have been answered already (its
                        // wait timed out): then its tokens go back too.
                        let delivered = reply.send(ok).is_ok();
                        let used = if ok && delivered { cost } else { 0 };
                        state.give += granted - used;
                        state.not_before = now;
                    } else if op.ask.take > 0 && granted == 0 {
                        // The global bucket is empty: back off, with jitter
                        // so daemons waiting for the same bucket spread out.
                        let waited = state.waiting_since.map_or(Duration::ZERO, |w| now - w);
                        if waited >= self.settings.max_backoff * 4 || state.released {
                            state.refill = false;
                            state.waiting_since = None;
                            self.limiter.clear_request(rule, &op.bucket.key, state.hash);
                        } else {
                            let jitter = 0.8 + 0.4 * rand::random::<f64>();
                            let wait = retry_after
                                .min(self.settings.max_backoff)
                                .mul_f64(jitter)
                                .max(Duration::from_millis(1));
                            state.not_before = now + wait;
                        }
                    } else if op.ask.take > 0 {
                        state.refill = false;
                        state.waiting_since = None;
                        let left = if state.released {
                            granted
                        } else {
                            self.limiter
                                .credit(rule, &op.bucket.key, state.hash, granted)
                        };
                        // Tokens that found no bucket go straight back.
                        state.give += left;
                    }
                }
                Outcome::Unknown(e) => {
                    self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("lease outcome unknown, retrying under the same identity: {e}");
                    let mut op = op;
                    op.uncertain = true;
                    op.known = None;
                    state.op = Some(op);
                    if let Some((_, reply)) = state.now.take() {
                        let _ = reply.send(false);
                    }
                    state.not_before = now + Duration::from_millis(50);
                }
                Outcome::Failed(e) => {
                    tracing::debug!("lease operation not applied: {e}");
                    // Nothing was applied: its tokens in transit go back to
                    // the bucket's account and are sent again.
                    state.op = None;
                    state.give += op.ask.give;
                    state.debt += op.ask.debt;
                    if let Some((_, reply)) = state.now.take() {
                        let _ = reply.send(false);
                    }
                    if op.ask.take > 0 && !state.released {
                        // The request is answered by on_failure meanwhile;
                        // the next request asks again. Never fresh again.
                        state.refill = false;
                        state.waiting_since = None;
                        let rule = Arc::clone(&state.bucket.rule);
                        self.limiter
                            .clear_request(&rule, &op.bucket.key, state.hash);
                    }
                    state.not_before = now + Duration::from_millis(100);
                }
            }
        }
    }

    fn audit_op(&mut self, node: &str, op: &Op, done: &Done) {
        if !self.audit.enabled() {
            return;
        }
        let (outcome, granted, revision) = match &done.outcome {
            Outcome::Committed {
                granted, revision, ..
            } if done.resolved => ("resolved", *granted, *revision),
            Outcome::Committed {
                granted, revision, ..
            } => ("committed", *granted, *revision),
            Outcome::Unknown(_) => ("unknown", 0, 0),
            Outcome::Failed(_) => ("failed", 0, 0),
        };
        let key = super::etcd::bucket_key("", &op.bucket);
        self.audit.write(&Record::Op {
            node: node.to_owned(),
            op: op.ask.op,
            rule: op.bucket.rule.id().to_owned(),
            key,
            take: op.ask.take,
            give: op.ask.give,
            debt: op.ask.debt,
            granted,
            outcome: outcome.to_owned(),
            revision,
            wall_ns: wall_ns(),
        });
    }

    /// One audit line per global rule with the requests admitted since the last.
    fn audit_admissions(&mut self) {
        if !self.audit.enabled() {
            return;
        }
        let node = self.source.node().to_owned();
        let now = wall_ns();
        for rule in self.limiter.rules().iter() {
            if rule.global.is_none() {
                continue;
            }
            let (allowed, _, bypassed) = rule.activity.totals();
            // Counters start at zero with the daemon (and stay with the
            // rule id across edits): everything since start is logged.
            let last = self.audited.entry(rule.id().into()).or_insert((0, 0));
            let (da, db) = (
                allowed - last.0.min(allowed),
                bypassed - last.1.min(bypassed),
            );
            *last = (allowed, bypassed);
            if da == 0 && db == 0 {
                continue;
            }
            self.audit.write(&Record::Admitted {
                node: node.clone(),
                rule: rule.id().to_owned(),
                wall_ns: now,
                allowed: da,
                bypassed: db,
            });
        }
        self.audit.flush();
    }

    /// Recomputes every global rule's batch plan for the current membership.
    fn retune(&self) {
        for rule in self.limiter.rules().iter() {
            self.planner.plan(rule);
        }
    }

    /// After an outage: collect every bucket's debt into operations; once
    /// nothing is in transit any more, declare the cluster healthy.
    fn recover(&mut self) {
        if self.link.state() != EtcdState::Recovering {
            self.recovering = false;
            return;
        }
        if !self.recovering {
            self.recovering = true;
            for (rule, key, _, debt) in self.limiter.take_leases(false) {
                let hash = self.limiter.table().hash_key(&key);
                self.key_state(&rule, key, hash).debt += debt;
            }
            // Debts of failed lease operations came back to their keys; those
            // of operations in doubt (and of any retried during the outage)
            // may have been charged already: at most this much is owed.
            let total: u64 = self
                .keys
                .values()
                .map(|s| s.debt + s.op.as_ref().map_or(0, |o| o.ask.debt))
                .sum();
            // Forget demand estimates from before the outage: start small.
            for state in self.keys.values_mut() {
                state.demand = 0.0;
                state.not_before = Instant::now();
            }
            tracing::info!(
                tokens = total,
                "charging what may still be owed for consumption while etcd was unreachable"
            );
        }
        let owed = self
            .keys
            .values()
            .any(|s| s.debt > 0 || s.op.as_ref().is_some_and(|o| o.ask.debt > 0));
        if !owed {
            self.recovering = false;
            self.health.recovered();
        }
    }

    fn forget_idle_keys(&mut self) {
        let horizon = Duration::from_secs(60);
        let now = Instant::now();
        let per_rule = &mut self.per_rule;
        self.keys.retain(|(rule, _), s| {
            let keep = s.has_work()
                || s.in_flight
                || (!s.released && now.duration_since(s.last_event) < horizon);
            if !keep && let Some(n) = per_rule.get_mut(rule) {
                *n = n.saturating_sub(1);
            }
            keep
        });
        self.per_rule.retain(|_, n| *n > 0);
        // Below the cap again: fresh buckets may borrow.
        for rule in self.limiter.rules().iter() {
            if let Some(g) = &rule.global {
                let n = self.per_rule.get(rule.id()).copied().unwrap_or(0);
                g.at_cap
                    .store(n >= self.settings.max_buckets_per_rule, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The coordinator against a scripted token source.

    use super::*;
    use crate::daemon::lease::value::{self, BucketValue, Params};
    use crate::daemon::lease::{Known, LeaseError};
    use crate::daemon::limiter::{DefaultAction, LimiterConfig};
    use crate::protocol::{Outcome as Decided, Priority, RuleSource};
    use crate::rule::RuleSpec;
    use crate::rule::{OnFailure, Scope};
    use parking_lot::Mutex;

    /// One global bucket in memory applying the real ledger rules, with
    /// switches to fail calls or lose their answers after committing.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeBucket>>);

    #[derive(Default)]
    struct FakeBucket {
        value: Option<BucketValue>,
        revision: i64,
        taken: u64,
        returned: u64,
        debt: u64,
        commits: u64,
        /// Operations answered as failed while `failing`.
        failed: u64,
        failing: bool,
        /// Commit, then report the outcome as unknown.
        lose_answers: bool,
        /// Tokens the bucket has; `None`: as the rule says.
        available: Option<u64>,
        /// How long each call takes.
        delay: Duration,
        /// Calls begun.
        started: u64,
    }

    impl Source for Fake {
        fn node(&self) -> &str {
            "me"
        }

        async fn apply(&self, ops: Vec<Op>) -> Vec<(Op, Done)> {
            let delay = {
                let mut b = self.0.lock();
                b.started += 1;
                b.delay
            };
            tokio::time::sleep(delay).await;
            let mut b = self.0.lock();
            ops.into_iter()
                .map(|mut op| {
                    let params = Params {
                        interval_ns: op.bucket.rule.params.interval_ns,
                        tau_ns: op.bucket.rule.params.tau_ns,
                    };
                    if b.failing {
                        b.failed += 1;
                        let e = LeaseError::Timeout(Duration::from_millis(1));
                        let outcome = if op.uncertain {
                            Outcome::Unknown(e)
                        } else {
                            Outcome::Failed(e)
                        };
                        let done = Done {
                            outcome,
                            known: None,
                            resolved: false,
                            repaired: false,
                            clamped: false,
                        };
                        return (op, done);
                    }
                    let mut v = b.value.clone().unwrap_or_else(|| value::fresh(params));
                    if op.uncertain && v.holders.get("me").is_some_and(|h| h.op == op.ask.op) {
                        let granted = v.holders["me"].granted;
                        op.known = None;
                        let done = Done {
                            outcome: Outcome::Committed {
                                granted,
                                retry_after: Duration::ZERO,
                                revision: b.revision,
                            },
                            known: None,
                            resolved: true,
                            repaired: false,
                            clamped: false,
                        };
                        return (op, done);
                    }
                    let now = wall_ns();
                    value::normalize(&mut v, params, now);
                    let mut ask = op.ask;
                    if let Some(avail) = b.available {
                        ask.take = ask.take.min(avail);
                    }
                    let applied = value::apply(&mut v, "me", &ask, params, now);
                    if let Some(avail) = &mut b.available {
                        *avail -= applied.granted;
                        *avail += ask.give;
                    }
                    b.taken += applied.granted;
                    b.returned += ask.give;
                    b.debt += ask.debt;
                    b.commits += 1;
                    b.revision += 1;
                    b.value = Some(v.clone());
                    let outcome = if b.lose_answers {
                        Outcome::Unknown(LeaseError::Timeout(Duration::from_millis(1)))
                    } else {
                        Outcome::Committed {
                            granted: applied.granted,
                            retry_after: Duration::from_millis(5),
                            revision: b.revision,
                        }
                    };
                    let known = (!b.lose_answers).then(|| Known {
                        value: v,
                        revision: b.revision,
                    });
                    let done = Done {
                        outcome,
                        known,
                        resolved: false,
                        repaired: false,
                        clamped: false,
                    };
                    (op, done)
                })
                .collect()
        }
    }

    struct Setup {
        /// The coordinator's event queue, as the hot path sends on it.
        events: mpsc::Sender<LeaseEvent>,
        limiter: Arc<Limiter>,
        link: Arc<ClusterLink>,
        health: Arc<Health>,
        fake: Fake,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn setup(
        available: Option<u64>,
        on_failure: OnFailure,
        settings: LeaseSettings,
    ) -> Setup {
        let limiter = Arc::new(Limiter::new(LimiterConfig {
            shards: 4,
            max_buckets: 1000,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        }));
        let (tx, rx) = mpsc::channel(4096);
        let planner = Arc::new(Planner::new(settings, Arc::new(AtomicU64::new(1))));
        let sink = QueueSink {
            events: tx.clone(),
            planner: Arc::clone(&planner),
        };
        let link = Arc::new(ClusterLink::new(sink, on_failure));
        limiter.attach(Arc::clone(&link));
        let health = Arc::new(Health::new(Arc::clone(&link), Duration::from_millis(400)));
        health.success();
        let mut spec = RuleSpec::new("g", "*", "*", 1000, Duration::from_secs(1));
        spec.scope = Scope::Global;
        spec.burst = Some(100);
        spec.on_failure = Some(on_failure);
        limiter
            .set_rules(vec![(spec, RuleSource::Etcd)], 0)
            .unwrap();
        let fake = Fake::default();
        fake.0.lock().available = available;
        let coordinator = Coordinator::new(
            fake.clone(),
            Arc::clone(&limiter),
            Wiring {
                link: Arc::clone(&link),
                health: Arc::clone(&health),
                stats: Arc::new(LeaseStats::default()),
            },
            rx,
            planner,
            AuditLog::disabled(),
        );
        coordinator.retune();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(coordinator.run(cancel.clone(), Duration::from_secs(1)));
        Setup {
            events: tx,
            limiter,
            link,
            health,
            fake,
            cancel,
            task,
        }
    }

    fn ask(l: &Limiter, client: &str) -> Decided {
        l.acquire(client, "r", 1, Priority::Normal, 0)
            .unwrap()
            .outcome
    }

    /// Waits until `cond` holds (the coordinator works in the background),
    /// failing after 10 s.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_fresh_bucket_borrows_once_then_is_served_from_leased_tokens() {
        let s = setup(Some(20), OnFailure::Closed, LeaseSettings::default()).await;
        // The first request is admitted on credit and asks for a lease.
        assert_eq!(ask(&s.limiter, "a"), Decided::Allowed);
        until("the first lease committed and was credited", || {
            s.fake.0.lock().commits >= 1 && s.limiter.held_tokens().values().sum::<u64>() > 0
        })
        .await;
        let (taken, debt) = {
            let b = s.fake.0.lock();
            (b.taken, b.debt)
        };
        assert!(taken > 1, "a batch was leased: {taken}");
        assert_eq!(debt, 1, "the credit was charged with the first lease");
        // The global bucket had 20: the credit was charged on top, so 19 of
        // the leased tokens plus the first request make 20 admissions... and
        // never more than what was granted plus the one credit.
        let mut allowed = 1;
        for _ in 0..100 {
            if ask(&s.limiter, "a") == Decided::Allowed {
                allowed += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let taken = s.fake.0.lock().taken;
        assert_eq!(allowed, taken + 1, "grants plus one credit");
        assert!(allowed <= 21);
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_bucket_whose_first_lease_fails_never_borrows_again() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        s.fake.0.lock().failing = true;
        assert_eq!(ask(&s.limiter, "a"), Decided::Allowed, "one credit");
        until("the first lease failed", || s.fake.0.lock().failed >= 1).await;
        for _ in 0..20 {
            assert_eq!(ask(&s.limiter, "a"), Decided::Denied);
        }
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn credit_is_capped_per_rule() {
        let settings = LeaseSettings {
            max_credit: 5,
            ..LeaseSettings::default()
        };
        let s = setup(None, OnFailure::Closed, settings).await;
        // The batch size (b_max) may raise the cap; make calls fail so no
        // credit is repaid meanwhile.
        s.fake.0.lock().failing = true;
        let cap = s
            .limiter
            .rules()
            .get("g")
            .unwrap()
            .global
            .as_ref()
            .unwrap()
            .credit_cap
            .load(Ordering::Relaxed);
        let allowed = (0..1000)
            .filter(|i| ask(&s.limiter, &format!("client-{i}")) == Decided::Allowed)
            .count() as u64;
        assert!(cap > 0 && cap < 1000, "cap {cap}");
        assert_eq!(allowed, cap, "1000 fresh keys, credit for {cap}");
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[test]
    fn a_drop_in_members_is_not_believed_at_once() {
        let members = Arc::new(AtomicU64::new(3));
        let p = Planner::new(LeaseSettings::default(), Arc::clone(&members));
        assert_eq!(p.members(), 3);
        // A daemon vanished (its member key expired): it may still hold a
        // batch, so the others keep planning for 3.
        members.store(2, Ordering::Relaxed);
        assert_eq!(p.members(), 3);
        // Joins count at once.
        members.store(5, Ordering::Relaxed);
        assert_eq!(p.members(), 5);
    }

    #[tokio::test]
    async fn at_the_bucket_cap_fresh_buckets_neither_borrow_nor_leak_credit() {
        let settings = LeaseSettings {
            max_buckets_per_rule: 3,
            ..LeaseSettings::default()
        };
        let s = setup(None, OnFailure::Closed, settings).await;
        for i in 0..3 {
            assert_eq!(ask(&s.limiter, &format!("c{i}")), Decided::Allowed);
        }
        let rules = s.limiter.rules();
        let g = rules.get("g").unwrap().global.as_ref().unwrap();
        until("the rule is at its bucket cap", || {
            g.at_cap.load(Ordering::Relaxed)
        })
        .await;
        let allowed = (3..50)
            .filter(|i| ask(&s.limiter, &format!("c{i}")) == Decided::Allowed)
            .count();
        assert_eq!(allowed, 0, "no credit at the cap");
        until("the three leases repaid their credit", || {
            s.fake.0.lock().commits >= 3
        })
        .await;
        until("no credit is out", || {
            g.credit_out.load(Ordering::Relaxed) == 0
        })
        .await;
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn held_tokens_never_exceed_the_batch() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        let b_max = s
            .limiter
            .rules()
            .get("g")
            .unwrap()
            .global
            .as_ref()
            .unwrap()
            .batch
            .load(Ordering::Relaxed);
        for _ in 0..50 {
            ask(&s.limiter, "a");
            tokio::time::sleep(Duration::from_millis(10)).await;
            let held: u64 = s.limiter.held_tokens().values().sum();
            assert!(held <= b_max, "held {held} > b_max {b_max}");
        }
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn an_unknown_outcome_is_applied_once() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        s.fake.0.lock().lose_answers = true;
        ask(&s.limiter, "a");
        until("the first attempt committed, its answer lost", || {
            s.fake.0.lock().commits == 1
        })
        .await;
        s.fake.0.lock().lose_answers = false;
        until("the retry found it and credited the grant", || {
            let taken = s.fake.0.lock().taken;
            taken > 0 && s.limiter.held_tokens().values().sum::<u64>() == taken
        })
        .await;
        let (commits, debt, taken) = {
            let b = s.fake.0.lock();
            (b.commits, b.debt, b.taken)
        };
        assert_eq!(commits, 1, "the retry found its predecessor committed");
        assert_eq!(debt, 1, "the credit was charged once");
        let held: u64 = s.limiter.held_tokens().values().sum();
        assert_eq!(held, taken, "the recorded grant was credited");
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_gives_held_tokens_back() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        ask(&s.limiter, "a");
        until("tokens are held", || {
            s.limiter.held_tokens().values().sum::<u64>() > 0
        })
        .await;
        let held: u64 = s.limiter.held_tokens().values().sum();
        s.cancel.cancel();
        s.task.await.unwrap();
        assert_eq!(s.fake.0.lock().returned, held);
        assert_eq!(s.limiter.held_tokens().values().sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn shutdown_waits_for_a_batch_in_flight_then_gives_everything_back() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        ask(&s.limiter, "a");
        until("tokens are held", || {
            s.limiter.held_tokens().values().sum::<u64>() > 0
        })
        .await;
        // etcd slows down; a second bucket's first lease is in flight when
        // the coordinator is told to stop.
        let (commits, started) = {
            let mut b = s.fake.0.lock();
            b.delay = Duration::from_millis(300);
            (b.commits, b.started)
        };
        ask(&s.limiter, "b");
        until("b's lease is in flight", || {
            s.fake.0.lock().started > started
        })
        .await;
        s.cancel.cancel();
        s.task.await.unwrap();
        let b = s.fake.0.lock();
        // b's lease committed during the drain; everything granted went
        // back, and both fresh buckets' credit was charged.
        assert!(b.commits > commits, "the batch in flight was awaited");
        assert_eq!(b.returned, b.taken, "every granted token was given back");
        assert_eq!(b.debt, 2, "both credits charged");
        assert_eq!(s.limiter.held_tokens().values().sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn a_debt_posted_while_a_lease_waits_does_not_cancel_it() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        let rule = Arc::clone(s.limiter.rules().get("g").unwrap());
        // The bucket exists (a request made it) and its first lease is done.
        ask(&s.limiter, "c");
        until("the first lease committed", || s.fake.0.lock().commits >= 1).await;
        let (taken, debt) = {
            let b = s.fake.0.lock();
            (b.taken, b.debt)
        };
        let key = BucketKey::new("c", "r");
        let hash = s.limiter.table().hash_key(&key);
        // A Normal request's lease and a Critical request's debt on the same
        // bucket, queued together (the coordinator takes both before it
        // sends anything).
        let (reply, answer) = oneshot::channel();
        s.events
            .send(LeaseEvent::Now {
                rule: Arc::clone(&rule),
                key: key.clone(),
                hash,
                cost: 2,
                reply,
            })
            .await
            .unwrap();
        s.events
            .send(LeaseEvent::Debt {
                rule,
                key,
                hash,
                tokens: 3,
            })
            .await
            .unwrap();
        assert!(answer.await.unwrap(), "the lease was granted");
        until("the debt is charged", || s.fake.0.lock().debt == debt + 3).await;
        assert_eq!(s.fake.0.lock().taken, taken + 2);
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_per_request_lease_that_misses_its_deadline_is_counted_and_fails() {
        let stats = Arc::new(LeaseStats::default());
        // No coordinator answers: the request waits its deadline, no more.
        let (events, _rx) = mpsc::channel(4);
        let handle = LeaseHandle {
            events,
            stats: Arc::clone(&stats),
        };
        let limiter = Limiter::new(LimiterConfig {
            shards: 1,
            max_buckets: 10,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        });
        let mut spec = RuleSpec::new("g", "*", "*", 10, Duration::from_secs(60));
        spec.scope = Scope::Global;
        limiter
            .set_rules(vec![(spec, RuleSource::Etcd)], 0)
            .unwrap();
        let need = LeaseNeeded {
            rule: Arc::clone(limiter.rules().get("g").unwrap()),
            key: BucketKey::new("c", "r"),
            hash: 0,
        };
        let started = tokio::time::Instant::now();
        assert_eq!(handle.lease_now(need, 1).await, SpendMode::LeaseFailed);
        let waited = started.elapsed();
        // Before any transaction was timed the deadline is the minimum.
        assert!(waited >= super::super::MIN_TXN_DEADLINE, "{waited:?}");
        assert_eq!(stats.per_request_fallbacks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn lease_deadlines_are_three_p99_between_50_and_the_cap() {
        let cap = Duration::from_millis(100);
        let s = LeaseStats::default();
        assert_eq!(s.txn_deadline(cap), None, "nothing timed yet");
        for _ in 0..100 {
            s.latency.record_one(5_000_000); // 5 ms
        }
        assert_eq!(
            s.txn_deadline(cap),
            Some(Duration::from_millis(50)),
            "floor"
        );
        let s = LeaseStats::default();
        for _ in 0..100 {
            s.latency.record_one(25_000_000); // 25 ms: 3 x p99 ~ 75 ms
        }
        let d = s.txn_deadline(cap).unwrap();
        assert!(
            d > Duration::from_millis(70) && d < Duration::from_millis(82),
            "{d:?}"
        );
        // Timeouts count as samples of their deadline, so deadlines grow
        // toward the cap when etcd slows down, never past it.
        for _ in 0..100 {
            s.timed_out(Duration::from_secs(1));
        }
        assert_eq!(s.txn_deadline(cap), Some(cap));
    }

    #[tokio::test]
    async fn deleting_the_rule_releases_its_leases() {
        let s = setup(None, OnFailure::Closed, LeaseSettings::default()).await;
        ask(&s.limiter, "a");
        until("tokens are held", || {
            s.limiter.held_tokens().values().sum::<u64>() > 0
        })
        .await;
        let held: u64 = s.limiter.held_tokens().values().sum();
        s.limiter.set_rules(vec![], 0).unwrap();
        until("the held tokens went back", || {
            s.fake.0.lock().returned >= held
        })
        .await;
        assert_eq!(s.fake.0.lock().returned, held);
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn debts_made_while_degraded_are_charged_on_recovery_and_kept_until_then() {
        let s = setup(None, OnFailure::Open, LeaseSettings::default()).await;
        s.fake.0.lock().failing = true;
        for _ in 0..3 {
            s.health.failure("down", std::time::Instant::now());
        }
        assert_eq!(s.link_state(), EtcdState::Degraded);
        for _ in 0..7 {
            assert_eq!(ask(&s.limiter, "a"), Decided::Allowed, "open admits");
        }
        // Recovery starts (two successes), but the first postings fail:
        // nothing is dropped.
        s.health.success();
        s.health.success();
        assert_eq!(s.link_state(), EtcdState::Recovering);
        until("a debt posting was tried and failed", || {
            s.fake.0.lock().failed >= 1
        })
        .await;
        assert_eq!(s.fake.0.lock().debt, 0);
        s.fake.0.lock().failing = false;
        until("the debt is charged and etcd healthy", || {
            s.fake.0.lock().debt == 7 && s.link_state() == EtcdState::Healthy
        })
        .await;
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    impl Setup {
        fn link_state(&self) -> EtcdState {
            self.link.state()
        }
    }
}
