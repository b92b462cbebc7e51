//! The [`Coordinator`]: the task that owns this daemon's shares. It keeps
//! the [`View`] current from the watch, decides for each bucket the hot
//! path says wants more (and each record that lists this daemon) what its
//! share should be, and writes the changes, many records per transaction.
//!
//! Its rules, which keep the invariant of `share`:
//! - **Lower locally first**: a lower share is applied to the limiter
//!   before the write that records it is sent.
//! - **Raise only after the commit**: a higher share (or operating count)
//!   is applied once etcd committed it, as the watch shows (this daemon's
//!   own write comes back through the watch, which also resolves a write
//!   whose answer was lost: the record carries the write's identity).
//! - **Raise only into free capacity**, computed from the record the write
//!   replaces (compare-and-swap on its revision).
//! - A new count is applied once the view has caught up with the write
//!   that recorded it, so every record created before it is known here.
//!
//! Demand is measured per bucket (tokens asked for per second, allowed or
//! not) while a bucket is watched: from its first shortfall, or while a
//! record lists this daemon, until it has been quiet for a while.

mod count;
mod decide;
mod demand;
mod planner;
mod view_sync;
mod writes;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::LeaseStats;
use super::audit::{AuditLog, Record as AuditRecord};
use super::share::{Entry, Share};
use super::store::{RecordWrite, Store, Written};
use super::view::View;
use crate::daemon::cluster::{Health, Registration};
use crate::daemon::limiter::global::ClusterLink;
use crate::daemon::limiter::key::BucketKey;
use crate::daemon::limiter::{Limiter, MonotonicClock};
use demand::Demand;
pub use planner::{LeaseEvent, Planner, QueueSink};

/// How often demand is sampled and decisions are made.
const TICK: Duration = Duration::from_millis(50);
/// The shortest span a demand sample covers (a first one: the shortest
/// that has seen a few tokens).
const SAMPLE: Duration = Duration::from_millis(100);
const FIRST_SAMPLE: Duration = Duration::from_millis(30);
/// A watched bucket that wanted no more than its share for this long is
/// no longer watched.
const QUIET: Duration = Duration::from_secs(5);
/// A watched bucket's share is given up when its demand has been zero for
/// this long (at once when other daemons need it): a caller that stalls
/// for a moment keeps what it used. Shorter than [`QUIET`].
const RELEASE_AFTER: Duration = Duration::from_secs(2);
/// An unanswered write is sent again after this long if the view shows its
/// record unchanged (its compare lets at most one attempt commit).
const RESEND: Duration = Duration::from_secs(1);
/// How long a decision waits for the view to catch up with a write.
const VIEW_PATIENCE: Duration = Duration::from_secs(2);
/// How often records nobody holds are looked for (to delete them).
const ADOPT_EVERY: Duration = Duration::from_secs(10);
/// Transactions in flight at once.
const IN_FLIGHT: usize = 2;
/// A share changes only when its target moved by more than this fraction
/// (so measurement noise does not rewrite records).
const HYSTERESIS: f64 = 0.1;

/// What the coordinator shares with the rest of the daemon.
#[derive(Debug, Clone)]
pub struct Wiring {
    pub link: Arc<ClusterLink>,
    pub health: Arc<Health>,
    pub registration: Arc<Registration>,
    pub stats: Arc<LeaseStats>,
    pub clock: MonotonicClock,
}

/// What a write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create,
    Entry,
    Delete,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Entry => "write",
            Kind::Delete => "delete",
        }
    }
}

/// A write of a record not yet known to have ended.
#[derive(Debug, Clone)]
struct Pending {
    op: u64,
    kind: Kind,
    write: RecordWrite,
    /// The entry written (for creations and entry writes).
    entry: Option<Entry>,
    /// Applied once committed (a raise), with the tokens it takes from the
    /// record's pool into its new room.
    raise_to: Option<Share>,
    fill: u64,
    sent: Option<Instant>,
    in_flight: bool,
    /// Its answer was lost: the view decides.
    uncertain: bool,
    /// etcd committed it: waiting for the watch to show it (never sent
    /// again).
    committed: bool,
    /// Its answer was lost, and a resend found the record moved: the first
    /// attempt may have committed, the view tells (never sent again).
    moved: bool,
}

/// A bucket this daemon watches.
#[derive(Debug)]
struct Watched {
    rule: Arc<str>,
    key: BucketKey,
    hash: u64,
    demand: Demand,
    pending: Option<Pending>,
    /// Decide again no sooner (after a conflict: once the view caught up).
    not_before: Instant,
    /// The view must be at least this far before deciding again.
    view_at: i64,
    quiet_since: Option<Instant>,
    /// Since when the measured demand has been zero.
    zero_since: Option<Instant>,
    /// Since when the record has been idle everywhere (every entry at zero,
    /// no demand): it is deleted once that lasted as long as the rule takes
    /// to refill its burst, so that a bucket starting full afterwards hands
    /// out nothing the rule had not earned.
    idle_since: Option<Instant>,
    /// The latest write of this daemon's entry (its identity).
    last_op: u64,
    /// Tokens this daemon gave up by lowering its depth and owes to the
    /// record's pool (carried by its next write until one commits).
    owed: u64,
    /// The latest write (its identity) and the owed tokens it carried: they
    /// are settled when the view shows that write, whichever way.
    carrying: Option<(u64, u64)>,
}

/// A write of the operating count in flight or awaited in the view.
#[derive(Debug, Clone, Copy)]
struct CountWrite {
    n: u32,
    raise: bool,
    sent: Instant,
    /// Committed at this revision (a raise waits for the view to pass it).
    committed: Option<i64>,
}

/// The writes of one transaction (record key and what was sent) and how
/// each ended.
type Batch = (Vec<(String, Pending)>, Vec<Written>);

/// Owns this daemon's shares.
pub struct Coordinator {
    store: Store,
    limiter: Arc<Limiter>,
    link: Arc<ClusterLink>,
    health: Arc<Health>,
    registration: Arc<Registration>,
    stats: Arc<LeaseStats>,
    planner: Arc<Planner>,
    clock: MonotonicClock,
    events: mpsc::Receiver<LeaseEvent>,
    view: View,
    /// The etcd lease this state belongs to (0: none yet).
    lease: i64,
    /// The operating count applied (0: none).
    count: u32,
    count_write: Option<CountWrite>,
    /// This daemon's share of each record, as applied to the limiter.
    applied: HashMap<String, Share>,
    watched: HashMap<String, Watched>,
    per_rule: HashMap<Arc<str>, usize>,
    batches: JoinSet<Batch>,
    nonce: u64,
    seq: u32,
    audit: AuditLog,
    audited: HashMap<Box<str>, (u64, u64)>,
    compact_mark: Option<(i64, Instant)>,
    adopted_at: Option<Instant>,
    /// Watched buckets to decide for at once (their record changed, or the
    /// hot path said they want more), not at the next tick.
    dirty: Vec<String>,
}

impl Coordinator {
    pub fn new(
        store: Store,
        limiter: Arc<Limiter>,
        wiring: Wiring,
        events: mpsc::Receiver<LeaseEvent>,
        planner: Arc<Planner>,
        audit: AuditLog,
    ) -> Coordinator {
        let view = View::new(store.paths.root.trim_end_matches("/v2/"));
        Coordinator {
            store,
            limiter,
            link: wiring.link,
            health: wiring.health,
            registration: wiring.registration,
            stats: wiring.stats,
            planner,
            clock: wiring.clock,
            events,
            view,
            lease: 0,
            count: 0,
            count_write: None,
            applied: HashMap::new(),
            watched: HashMap::new(),
            per_rule: HashMap::new(),
            batches: JoinSet::new(),
            nonce: u64::from(rand::random::<u32>()) << 32,
            seq: 0,
            audit,
            audited: HashMap::new(),
            compact_mark: None,
            adopted_at: None,
            dirty: Vec::new(),
        }
    }

    fn me(&self) -> &str {
        &self.store.node
    }

    /// Runs until `cancel`; then takes shares out of force (the membership
    /// task revokes the lease, which gives them back to the others).
    pub async fn run(mut self, cancel: CancellationToken) {
        let (fed_tx, mut fed) = mpsc::channel(256);
        let relist = Arc::new(tokio::sync::Notify::new());
        let watch = tokio::spawn(self.store.clone().run_watch(
            fed_tx,
            Arc::clone(&relist),
            cancel.clone(),
        ));
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut audit_tick = tokio::time::interval(crate::daemon::lease::audit::ADMITTED_EVERY);
        let registration = Arc::clone(&self.registration);
        let health = Arc::clone(&self.health);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(f) = fed.recv() => {
                    self.feed(f);
                    while let Ok(f) = fed.try_recv() {
                        self.feed(f);
                    }
                }
                Some(e) = self.events.recv() => {
                    self.handle(e);
                    while let Ok(e) = self.events.try_recv() {
                        self.handle(e);
                    }
                }
                Some(done) = self.batches.join_next(), if !self.batches.is_empty() => {
                    match done {
                        Ok(batch) => self.finished(batch),
                        Err(e) => tracing::error!("a share write task failed: {e}"),
                    }
                }
                () = registration.changed.notified() => {}
                () = health.recovering.notified() => relist.notify_one(),
                _ = tick.tick() => self.tick().await,
                _ = audit_tick.tick() => self.audit_admissions(),
            }
            self.check_lease();
            self.step_count().await;
            self.decide_dirty();
            self.flush();
        }
        self.link.set_valid_until(0);
        watch.abort();
        self.audit_admissions();
        self.audit.flush();
    }

    /// A new (or lost) etcd lease: what the old one held may be others' by
    /// now, so every share goes (buckets emptied), the count starts over.
    fn check_lease(&mut self) {
        let lease = self.registration.lease();
        if lease == self.lease {
            return;
        }
        self.link.set_valid_until(0);
        self.lease = lease;
        self.count = 0;
        self.count_write = None;
        self.planner.count.store(0, Ordering::Release);
        self.stats.count.store(0, Ordering::Relaxed);
        for rule in self.limiter.rules().iter() {
            self.planner.plan(rule);
        }
        self.limiter.drop_all_shares();
        for share in self.applied.values_mut() {
            *share = Share::ZERO;
        }
        for w in self.watched.values_mut() {
            w.pending = None;
        }
    }

    fn next_op(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.nonce | u64::from(self.seq)
    }

    fn handle(&mut self, event: LeaseEvent) {
        match event {
            LeaseEvent::Unmet { rule, key, hash } => {
                let record_key = self.view.paths.record(rule.id(), &key);
                if !self.watched.contains_key(&record_key) {
                    let n = self.per_rule.get(rule.id()).copied().unwrap_or(0);
                    if n >= self.planner.settings.max_buckets_per_rule {
                        return;
                    }
                    self.watch(&record_key, rule.id(), key, Some(hash));
                    self.dirty.push(record_key);
                }
            }
            LeaseEvent::Released { rule, key } => {
                let record_key = self.view.paths.record(rule.id(), &key);
                if let Some(w) = self.watched.get_mut(&record_key) {
                    w.demand.none(Instant::now());
                    w.not_before = Instant::now();
                } else if self.view.records.contains_key(&record_key) {
                    self.watch(&record_key, rule.id(), key, None);
                }
            }
        }
    }

    fn watch(&mut self, record_key: &str, rule: &str, key: BucketKey, hash: Option<u64>) {
        let hash = hash.unwrap_or_else(|| self.limiter.table().hash_key(rule, &key));
        let rule: Arc<str> = rule.into();
        *self.per_rule.entry(Arc::clone(&rule)).or_default() += 1;
        let now = Instant::now();
        self.watch_inserted(record_key, rule, key, hash, now);
        // The bucket's own count gives a first reading at once.
        self.sample(record_key);
    }

    fn watch_inserted(
        &mut self,
        record_key: &str,
        rule: Arc<str>,
        key: BucketKey,
        hash: u64,
        now: Instant,
    ) {
        self.watched.insert(
            record_key.to_owned(),
            Watched {
                rule,
                key,
                hash,
                demand: Demand::new(),
                pending: None,
                not_before: now,
                view_at: 0,
                quiet_since: None,
                zero_since: None,
                idle_since: None,
                last_op: 0,
                owed: 0,
                carrying: None,
            },
        );
    }

    /// Decides at once for the buckets marked dirty.
    fn decide_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let rules = self.limiter.rules();
        let now = Instant::now();
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty {
            if self.watched.contains_key(&key) {
                self.sample(&key);
                self.decide(&key, now, &rules);
            }
        }
    }

    async fn tick(&mut self) {
        self.registration.publish(&self.link);
        let now = Instant::now();
        let keys: Vec<String> = self.watched.keys().cloned().collect();
        let rules = self.limiter.rules();
        for key in keys {
            self.sample(&key);
            self.decide(&key, now, &rules);
        }
        self.forget_quiet(now);
        self.adopt_idle_records(now);
        self.compact().await;
    }

    /// Reads `key`'s bucket. The clocks are read for each bucket: a tick
    /// over thousands of them takes a while, and the requests made meanwhile
    /// must not look newer than the reading.
    fn sample(&mut self, key: &str) {
        let Some(w) = self.watched.get_mut(key) else {
            return;
        };
        let (now, now_ns) = (Instant::now(), self.clock.now_ns());
        // A committed write the view still does not show after a while: the
        // view lags; decide again from it (a raise is applied when it shows).
        if w.pending.as_ref().is_some_and(|p| {
            (p.committed || p.moved)
                && p.sent
                    .is_some_and(|t| now.duration_since(t) > 2 * VIEW_PATIENCE)
        }) {
            tracing::debug!(
                key,
                "a committed share write is not in the view yet; deciding again"
            );
            w.pending = None;
        }
        match self.limiter.collect(&w.rule, &w.key, w.hash, now_ns) {
            Some(c) => w.demand.add(
                c.wanted,
                Duration::from_nanos(c.span_ns),
                Duration::from_nanos(c.idle_ns),
                now,
            ),
            None => w.demand.none(now),
        }
        if w.demand.known && w.demand.rate == 0.0 {
            w.zero_since.get_or_insert(now);
        } else {
            w.zero_since = None;
        }
    }

    /// Compacts etcd's history once per period, to the revision seen one
    /// period ago (anything a watcher can still need is newer), when this
    /// daemon holds the compactor role.
    async fn compact(&mut self) {
        let every = self.planner.settings.compact_every;
        if every.is_zero() || self.lease == 0 || self.view.revision == 0 {
            return;
        }
        let now = Instant::now();
        let Some((rev, at)) = self.compact_mark else {
            self.compact_mark = Some((self.view.revision, now));
            return;
        };
        if now.duration_since(at) < every {
            return;
        }
        self.compact_mark = Some((self.view.revision, now));
        match self.store.claim_compactor(self.lease).await {
            Ok(true) => match self.store.compact(rev).await {
                Ok(()) => tracing::debug!(revision = rev, "compacted etcd's history"),
                Err(e) => tracing::debug!(revision = rev, "compaction not done: {e}"),
            },
            Ok(false) => {}
            Err(e) => tracing::debug!("cannot claim the compactor role: {e}"),
        }
    }

    /// One audit line per global rule with the requests admitted since the last.
    fn audit_admissions(&mut self) {
        if !self.audit.enabled() {
            return;
        }
        let node = self.store.node.clone();
        let now = crate::daemon::lease::audit::wall_ns();
        for rule in self.limiter.rules().iter() {
            if rule.global.is_none() {
                continue;
            }
            let (allowed, _, bypassed) = rule.activity.totals();
            let last = self.audited.entry(rule.id().into()).or_insert((0, 0));
            let (da, db) = (
                allowed - last.0.min(allowed),
                bypassed - last.1.min(bypassed),
            );
            *last = (allowed, bypassed);
            if da == 0 && db == 0 {
                continue;
            }
            self.audit.write(&AuditRecord::Admitted {
                node: node.clone(),
                rule: rule.id().to_owned(),
                wall_ns: now,
                allowed: da,
                bypassed: db,
            });
        }
        self.audit.flush();
    }
}
