//! The [`Coordinator`]: the task that owns the token [`Source`] and every
//! lease transaction. It keeps one transaction in flight per bucket, sizes
//! batches from the bucket's demand within the rule's plan, backs off while
//! the global bucket is empty, credits grants to the limiter, returns tokens
//! on shutdown, rule change and eviction, and charges debts on recovery.
//! The hot path only ever sends it events.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{BucketRef, LeaseStats, Source, plan};
use crate::daemon::cluster::Cluster;
use crate::daemon::cluster::health::Health;
use crate::daemon::limiter::Limiter;
use crate::daemon::limiter::global::{ClusterLink, EtcdState, LeaseEvent};
use crate::daemon::limiter::key::BucketKey;

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

/// Concurrent give-backs at shutdown.
const RETURNS_IN_FLIGHT: usize = 32;

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
        // Many buckets may hold tokens: return them RETURNS_IN_FLIGHT at a time.
        let permits = Arc::new(tokio::sync::Semaphore::new(RETURNS_IN_FLIGHT));
        let mut returns = JoinSet::new();
        for (rule, key, held, debt) in leases {
            let (source, permits) = (self.source.clone(), Arc::clone(&permits));
            returns.spawn(async move {
                let _permit = permits.acquire_owned().await;
                source.give_back(&BucketRef { rule, key }, held, debt).await
            });
        }
        let returning = async {
            let mut failed = 0;
            while let Some(done) = returns.join_next().await {
                failed += usize::from(!matches!(done, Ok(Ok(()))));
            }
            failed
        };
        match tokio::time::timeout(drain_timeout, returning).await {
            Ok(0) => {}
            Ok(failed) => tracing::warn!(
                buckets = failed,
                "some leased tokens could not be returned; they are lost"
            ),
            Err(_) => tracing::warn!(
                buckets = count,
                "returning leased tokens timed out; the rest are lost"
            ),
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
mod tests {
    //! The coordinator against a scripted token source.

    use super::*;
    use crate::daemon::config::EtcdConfig;
    use crate::daemon::lease::{Grant, LeaseError};
    use crate::daemon::limiter::{DefaultAction, LimiterConfig};
    use crate::protocol::{Outcome, Priority, RuleSource};
    use crate::rule::RuleSpec;
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
