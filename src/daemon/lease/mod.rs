//! Leasing tokens of global rules: the batch-size arithmetic ([`plan`]), the
//! [`Source`] of tokens (implemented on etcd by [`etcd::EtcdSource`]) and the
//! [`Coordinator`] task that owns it.
//!
//! The hot path never waits for any of this: it spends held tokens and, below
//! a low-water mark, sends a refill event (`limiter::global`). The coordinator
//! runs at most one lease transaction per bucket at a time, sizes each batch
//! from the bucket's own demand, caps it by the rule's accuracy knob, backs off
//! while the global bucket is empty, and writes grants back with
//! `Limiter::credit`. Tokens come back to the global bucket on shutdown, rule
//! change and eviction.

pub mod etcd;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::cluster::Cluster;
use super::cluster::health::Health;
use super::limiter::global::{ClusterLink, EtcdState, LeaseEvent};
use super::limiter::key::BucketKey;
use super::limiter::{Limiter, Rule};
use super::metrics::LatencyHistogram;
use crate::rule::{Accuracy, RuleSpec};

/// The global bucket of one (rule, client, resource).
#[derive(Debug, Clone)]
pub struct BucketRef {
    pub rule: Arc<Rule>,
    pub key: BucketKey,
}

/// The answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken (0 when the global bucket is empty).
    pub tokens: u64,
    /// When empty: how long until the wanted tokens are there.
    pub retry_after: Duration,
}

/// Why a lease call failed. The outcome of a failed call is unknown, so it
/// counts as no tokens (possible under-admission, never over-admission).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd call timed out after {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("global bucket {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("gave up after {0} conflicting updates")]
    Contended(u32),
}

/// Where tokens come from. Implemented on etcd; unit tests script a fake.
pub trait Source: Clone + Send + Sync + 'static {
    /// Takes up to `want` tokens from the global bucket, or none if fewer
    /// than `min` are there.
    fn take(
        &self,
        bucket: &BucketRef,
        want: u64,
        min: u64,
    ) -> impl Future<Output = Result<Grant, LeaseError>> + Send;

    /// Returns `held` unspent tokens and charges `debt` tokens admitted while
    /// the bucket could not be reached.
    fn give_back(
        &self,
        bucket: &BucketRef,
        held: u64,
        debt: u64,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
}

/// Lease counters (for `rlctl stats` and metrics).
#[derive(Debug, Default)]
pub struct LeaseStats {
    pub txns: AtomicU64,
    pub conflicts: AtomicU64,
    pub failures: AtomicU64,
    pub tokens_leased: AtomicU64,
    pub tokens_returned: AtomicU64,
    pub debt_charged: AtomicU64,
    pub latency: LatencyHistogram,
}

/// The batch plan of a global rule with `members` live daemons.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Largest batch per lease: `min((eps*rate*H - rate*skew)/N, burst/N)`.
    pub b_max: f64,
    /// Promised bound on over-admission in any interval, tokens:
    /// `N * b_max + rate * skew`.
    pub bound: f64,
    /// Batching cannot meet the accuracy (`b_max < 1`): lease one token per
    /// request.
    pub per_request: bool,
}

/// Computes the batch plan of a global rule.
///
/// ```
/// # use std::time::Duration;
/// use rld::daemon::lease::plan;
/// use rld::rule::{RuleSpec, Scope};
/// let mut rule = RuleSpec::new("r", "*", "*", 1000, Duration::from_secs(1));
/// rule.burst = Some(100);
/// rule.scope = Scope::Global;
/// // 2% of 1000/s over 10 s is 200 tokens; minus 10 ms of skew (10 tokens);
/// // shared by 3 daemons: 63, but a third of the burst (33) is smaller.
/// let p = plan(&rule, 3, Duration::from_millis(10));
/// assert!((p.b_max - 33.33).abs() < 0.01);
/// assert!((p.bound - 110.0).abs() < 0.01);
/// ```
pub fn plan(spec: &RuleSpec, members: u64, skew: Duration) -> Plan {
    let n = members.max(1) as f64;
    let rate = spec.limit as f64 / spec.window.as_secs_f64();
    let accuracy = spec.accuracy.unwrap_or_default();
    let eps = f64::from(accuracy.error_bp) / 10_000.0;
    let budget = eps * rate * accuracy.horizon.as_secs_f64() - rate * skew.as_secs_f64();
    let b_max = (budget / n).min(spec.capacity() as f64 / n).max(0.0);
    Plan {
        b_max,
        bound: n * b_max.max(1.0) + rate * skew.as_secs_f64(),
        per_request: b_max < 1.0,
    }
}

/// The allowed over-admission of a rule, in tokens over its horizon.
pub fn allowed_error(spec: &RuleSpec) -> f64 {
    let Accuracy { error_bp, horizon } = spec.accuracy.unwrap_or_default();
    let rate = spec.limit as f64 / spec.window.as_secs_f64();
    f64::from(error_bp) / 10_000.0 * rate * horizon.as_secs_f64()
}

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
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            max_clock_skew: Duration::from_millis(10),
            prefetch: Duration::from_millis(500),
            max_backoff: Duration::from_secs(1),
            fallback_slack: 0.1,
        }
    }
}

type KeyId = (Box<str>, BucketKey);

/// Demand and lease state of one global bucket.
#[derive(Debug)]
struct KeyState {
    in_flight: bool,
    /// Smoothed tokens per second this daemon spends from the bucket.
    demand: f64,
    last_grant: Option<(Instant, u64)>,
    last_seen: Instant,
}

/// How one lease task ended.
enum Done {
    Refill {
        id: KeyId,
        bucket: BucketRef,
        hash: u64,
        tokens: u64,
    },
    Released,
}

/// Owns the [`Source`] and every lease transaction.
pub struct Coordinator<S: Source> {
    source: S,
    limiter: Arc<Limiter>,
    link: Arc<ClusterLink>,
    events: mpsc::Receiver<LeaseEvent>,
    settings: LeaseSettings,
    stats: Arc<LeaseStats>,
    /// Live daemons, kept current by the cluster's membership task.
    members: Arc<AtomicU64>,
    health: Arc<Health>,
    keys: HashMap<KeyId, KeyState>,
    tasks: JoinSet<Done>,
}

impl<S: Source> Coordinator<S> {
    /// A coordinator leasing from `source` for `limiter`, reporting through
    /// the cluster's link, health, statistics and member count.
    pub fn new(
        source: S,
        limiter: Arc<Limiter>,
        cluster: &Cluster,
        events: mpsc::Receiver<LeaseEvent>,
        settings: LeaseSettings,
    ) -> Self {
        Coordinator {
            source,
            limiter,
            link: Arc::clone(&cluster.link),
            events,
            settings,
            stats: Arc::clone(&cluster.stats),
            members: Arc::clone(&cluster.members),
            health: Arc::clone(&cluster.health),
            keys: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Runs until `cancel`, then gives every held token back (bounded by
    /// `drain_timeout`).
    pub async fn run(mut self, cancel: CancellationToken, drain_timeout: Duration) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(event) = self.events.recv() => self.handle(event),
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok(done) = done {
                        self.finish(done);
                    }
                }
                _ = tick.tick() => {
                    self.retune();
                    if self.link.state() == EtcdState::Recovering {
                        self.post_debts().await;
                    }
                    self.forget_idle_keys();
                }
            }
        }
        self.tasks.abort_all();
        let leases = self.limiter.take_leases(true);
        let count = leases.len();
        let returning = async {
            for (rule, key, held, debt) in leases {
                let bucket = BucketRef { rule, key };
                if let Err(e) = self.source.give_back(&bucket, held, debt).await {
                    tracing::warn!("could not return leased tokens at shutdown: {e}");
                    return;
                }
            }
        };
        if tokio::time::timeout(drain_timeout, returning)
            .await
            .is_err()
        {
            tracing::warn!(
                buckets = count,
                "returning leased tokens timed out; they are lost"
            );
        }
    }

    fn handle(&mut self, event: LeaseEvent) {
        match event {
            LeaseEvent::Refill { rule, key, hash } => {
                if rule
                    .global
                    .as_ref()
                    .is_some_and(|g| g.batch.load(Ordering::Relaxed) == 0)
                {
                    // A rule installed since the last tick: plan it now.
                    self.retune();
                }
                let id: KeyId = (rule.id().into(), key.clone());
                let now = Instant::now();
                let state = self.keys.entry(id.clone()).or_insert(KeyState {
                    in_flight: false,
                    demand: 0.0,
                    last_grant: None,
                    last_seen: now,
                });
                state.last_seen = now;
                if state.in_flight {
                    return;
                }
                // The bucket spent its last grant since then: that is its demand.
                if let Some((at, tokens)) = state.last_grant {
                    let secs = now.duration_since(at).as_secs_f64().max(0.001);
                    let rate = tokens as f64 / secs;
                    state.demand = if state.demand == 0.0 {
                        rate
                    } else {
                        0.5 * state.demand + 0.5 * rate
                    };
                }
                let g = rule
                    .global
                    .as_ref()
                    .expect("refills come from global rules");
                let b_max = g.batch.load(Ordering::Relaxed).max(1);
                let want = if state.demand == 0.0 {
                    (b_max / 4).max(1)
                } else {
                    ((state.demand * self.settings.prefetch.as_secs_f64()).ceil() as u64)
                        .clamp(1, b_max)
                };
                state.in_flight = true;
                let bucket = BucketRef { rule, key };
                let source = self.source.clone();
                let max_backoff = self.settings.max_backoff;
                self.tasks.spawn(async move {
                    let tokens = lease(&source, &bucket, want, max_backoff).await;
                    Done::Refill {
                        id,
                        bucket,
                        hash,
                        tokens,
                    }
                });
            }
            LeaseEvent::Release {
                rule,
                key,
                allotment,
            } => {
                self.keys.remove(&(rule.id().into(), key.clone()));
                let source = self.source.clone();
                self.tasks.spawn(async move {
                    let bucket = BucketRef { rule, key };
                    let (held, debt) = (u64::from(allotment.held), u64::from(allotment.debt));
                    if let Err(e) = source.give_back(&bucket, held, debt).await {
                        tracing::debug!("could not return {held} tokens: {e}");
                    }
                    Done::Released
                });
            }
        }
    }

    fn finish(&mut self, done: Done) {
        let Done::Refill {
            id,
            bucket,
            hash,
            tokens,
        } = done
        else {
            return;
        };
        if let Some(state) = self.keys.get_mut(&id) {
            state.in_flight = false;
            if tokens > 0 {
                state.last_grant = Some((Instant::now(), tokens));
            }
        }
        if tokens == 0 {
            self.limiter.clear_request(&bucket.rule, &bucket.key, hash);
            return;
        }
        if !self.limiter.credit(&bucket.rule, &bucket.key, hash, tokens) {
            // The bucket went away meanwhile: the tokens go straight back.
            let source = self.source.clone();
            self.tasks.spawn(async move {
                let _ = source.give_back(&bucket, tokens, 0).await;
                Done::Released
            });
        }
    }

    /// Recomputes every global rule's batch plan for the current membership.
    fn retune(&self) {
        let n = self.members.load(Ordering::Relaxed).max(1);
        for rule in self.limiter.rules().iter() {
            let Some(g) = &rule.global else { continue };
            let p = plan(&rule.spec, n, self.settings.max_clock_skew);
            let b_max = p.b_max.floor().max(1.0) as u64;
            g.batch.store(b_max, Ordering::Relaxed);
            g.low_water.store((b_max / 4).max(1), Ordering::Relaxed);
            g.members.store(n, Ordering::Relaxed);
            g.per_request.store(p.per_request, Ordering::Relaxed);
            // The lenient local limit while etcd is unreachable.
            let per_window = rule.spec.fallback_limit.unwrap_or_else(|| {
                ((rule.spec.limit as f64 * (1.0 + self.settings.fallback_slack) / n as f64).ceil()
                    as u64)
                    .max(1)
            });
            let window_ns = rule.spec.window.as_nanos() as u64;
            let interval = window_ns.div_ceil(per_window).max(1);
            let burst = rule.spec.capacity().div_ceil(n).max(1);
            g.fallback_interval_ns.store(interval, Ordering::Relaxed);
            g.fallback_tau_ns
                .store(interval.saturating_mul(burst), Ordering::Relaxed);
        }
    }

    /// Charges what was admitted while etcd was unreachable, then declares the
    /// cluster healthy again. Batches ramp up from the demand estimate.
    async fn post_debts(&mut self) {
        let debts = self.limiter.take_leases(false);
        let mut total = 0;
        for (rule, key, _, debt) in &debts {
            let bucket = BucketRef {
                rule: Arc::clone(rule),
                key: key.clone(),
            };
            match self.source.give_back(&bucket, 0, *debt).await {
                Ok(()) => total += debt,
                Err(e) => {
                    tracing::warn!("could not post {debt} tokens of debt: {e}");
                    return;
                }
            }
        }
        self.stats.debt_charged.fetch_add(total, Ordering::Relaxed);
        // Forget demand estimates from before the outage: start small.
        for state in self.keys.values_mut() {
            state.demand = 0.0;
            state.last_grant = None;
        }
        tracing::info!(
            buckets = debts.len(),
            tokens = total,
            "charged consumption made while etcd was unreachable"
        );
        self.health.recovered();
    }

    fn forget_idle_keys(&mut self) {
        let horizon = Duration::from_secs(600);
        let now = Instant::now();
        self.keys
            .retain(|_, s| s.in_flight || now.duration_since(s.last_seen) < horizon);
    }
}

/// Takes tokens for one bucket, retrying with back-off while the global
/// bucket is empty (one transaction in flight for the bucket throughout).
/// Returns 0 when etcd fails or the bucket stays empty for `max_backoff`s.
async fn lease<S: Source>(source: &S, bucket: &BucketRef, want: u64, max_backoff: Duration) -> u64 {
    let give_up = Instant::now() + max_backoff * 4;
    loop {
        match source.take(bucket, want, 1).await {
            Ok(grant) if grant.tokens > 0 => return grant.tokens,
            Ok(grant) => {
                let now = Instant::now();
                if now >= give_up {
                    return 0;
                }
                // Jitter keeps daemons that wait for the same bucket apart.
                let jitter = 0.8 + 0.4 * rand::random::<f64>();
                let wait = grant.retry_after.min(max_backoff).mul_f64(jitter);
                tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
            }
            Err(e) => {
                tracing::debug!("lease failed: {e}");
                return 0;
            }
        }
    }
}

#[cfg(test)]
mod coordinator_tests {
    //! The coordinator against a scripted token source.

    use super::*;
    use crate::daemon::config::EtcdConfig;
    use crate::daemon::limiter::{DefaultAction, LimiterConfig};
    use crate::protocol::{Outcome, Priority, RuleSource};
    use crate::rule::{OnFailure, Scope};
    use parking_lot::Mutex;

    /// A global bucket in memory, with a switch to make every call fail.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeBucket>>);

    #[derive(Default)]
    struct FakeBucket {
        available: u64,
        taken: u64,
        returned: u64,
        debt: u64,
        failing: bool,
    }

    impl Source for Fake {
        async fn take(&self, _: &BucketRef, want: u64, min: u64) -> Result<Grant, LeaseError> {
            let mut b = self.0.lock();
            if b.failing {
                return Err(LeaseError::Timeout(Duration::from_millis(1)));
            }
            let tokens = want.min(b.available);
            if tokens == 0 || tokens < min {
                return Ok(Grant {
                    tokens: 0,
                    retry_after: Duration::from_millis(5),
                });
            }
            b.available -= tokens;
            b.taken += tokens;
            Ok(Grant {
                tokens,
                retry_after: Duration::ZERO,
            })
        }

        async fn give_back(&self, _: &BucketRef, held: u64, debt: u64) -> Result<(), LeaseError> {
            let mut b = self.0.lock();
            if b.failing {
                return Err(LeaseError::Timeout(Duration::from_millis(1)));
            }
            b.returned += held;
            b.debt += debt;
            Ok(())
        }
    }

    struct Setup {
        limiter: Arc<Limiter>,
        cluster: Cluster,
        fake: Fake,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn setup(available: u64, on_failure: OnFailure) -> Setup {
        let limiter = Arc::new(Limiter::new(LimiterConfig {
            shards: 4,
            max_buckets: 100,
            default_action: DefaultAction::Allow,
        }));
        let (tx, rx) = mpsc::channel(64);
        let link = Arc::new(ClusterLink::new(tx, on_failure));
        limiter.attach(Arc::clone(&link));
        // Connecting is lazy: nothing listens here and nothing needs to.
        let config = EtcdConfig::defaults(vec!["http://127.0.0.1:1".into()]);
        let cluster = Cluster::connect(config, Arc::clone(&link)).await.unwrap();
        cluster.health.success();
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
            &cluster,
            rx,
            LeaseSettings::default(),
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(coordinator.run(cancel.clone(), Duration::from_secs(1)));
        Setup {
            limiter,
            cluster,
            fake,
            cancel,
            task,
        }
    }

    fn ask(l: &Limiter, client: &str) -> Outcome {
        l.acquire(client, "r", 1, Priority::Normal, 0)
            .unwrap()
            .outcome
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_fresh_bucket_is_admitted_then_served_from_leased_tokens() {
        let s = setup(20, OnFailure::Closed).await;
        // The first request is admitted against debt and asks for a lease.
        assert_eq!(ask(&s.limiter, "a"), Outcome::Allowed);
        settle().await;
        let taken = s.fake.0.lock().taken;
        assert!(taken > 1, "a batch was leased: {taken}");
        // The grant paid the first request's debt; the rest is spent, then
        // the global bucket (20) is exhausted and requests are denied.
        let mut allowed = 1;
        for _ in 0..100 {
            if ask(&s.limiter, "a") == Outcome::Allowed {
                allowed += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(allowed, 20, "exactly what the global bucket had");
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_gives_held_tokens_back() {
        let s = setup(1000, OnFailure::Closed).await;
        ask(&s.limiter, "a");
        settle().await;
        let held: u64 = s.limiter.held_tokens().values().sum();
        assert!(held > 0);
        s.cancel.cancel();
        s.task.await.unwrap();
        assert_eq!(s.fake.0.lock().returned, held);
        assert_eq!(s.limiter.held_tokens().values().sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn deleting_the_rule_releases_its_leases() {
        let s = setup(1000, OnFailure::Closed).await;
        ask(&s.limiter, "a");
        settle().await;
        let held: u64 = s.limiter.held_tokens().values().sum();
        s.limiter.set_rules(vec![], 0).unwrap();
        settle().await;
        assert_eq!(s.fake.0.lock().returned, held);
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test]
    async fn debts_made_while_degraded_are_charged_on_recovery() {
        let s = setup(0, OnFailure::Open).await;
        s.fake.0.lock().failing = true;
        for _ in 0..3 {
            s.cluster.health.failure("down", std::time::Instant::now());
        }
        assert_eq!(s.link_state(), EtcdState::Degraded);
        for _ in 0..7 {
            assert_eq!(ask(&s.limiter, "a"), Outcome::Allowed, "open admits");
        }
        s.fake.0.lock().failing = false;
        s.cluster.health.success();
        assert_eq!(s.link_state(), EtcdState::Recovering);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(s.fake.0.lock().debt, 7);
        assert_eq!(s.link_state(), EtcdState::Healthy);
        s.cancel.cancel();
        s.task.await.unwrap();
    }

    impl Setup {
        fn link_state(&self) -> EtcdState {
            self.cluster.link.state()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Scope;

    fn global(limit: u64, burst: u64) -> RuleSpec {
        let mut r = RuleSpec::new("g", "*", "*", limit, Duration::from_secs(1));
        r.burst = Some(burst);
        r.scope = Scope::Global;
        r
    }

    #[test]
    fn batches_shrink_with_more_daemons_and_low_rates_go_per_request() {
        let skew = Duration::from_millis(10);
        let one = plan(&global(1000, 1000), 1, skew);
        assert!((one.b_max - 190.0).abs() < 1e-6, "{one:?}");
        let ten = plan(&global(1000, 1000), 10, skew);
        assert!((ten.b_max - 19.0).abs() < 1e-6, "{ten:?}");
        assert!(!ten.per_request);
        // 1 per second: 2% over 10 s is 0.2 tokens, less than one.
        let slow = plan(&global(1, 1), 3, skew);
        assert!(slow.per_request);
    }

    #[test]
    fn the_bound_is_members_times_batch_plus_skew() {
        let p = plan(&global(1000, 100), 3, Duration::from_millis(10));
        assert!((p.bound - (3.0 * p.b_max + 10.0)).abs() < 1e-6);
        assert!(p.bound <= allowed_error(&global(1000, 100)) + 10.0);
    }
}
