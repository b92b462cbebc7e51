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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::audit::{AuditLog, Record as AuditRecord};
use super::share::{self, Claim, Entry, Record, SCALE, Share};
use super::store::{Fed, RecordWrite, Store, Written};
use super::view::{Change, View};
use super::{LeaseSettings, LeaseStats};
use crate::daemon::cluster::{Health, Registration};
use crate::daemon::limiter::global::{ClusterLink, LeaseSink};
use crate::daemon::limiter::key::BucketKey;
use crate::daemon::limiter::{Limiter, MonotonicClock, Rule, RuleSet};

/// How often demand is sampled and decisions are made.
const TICK: Duration = Duration::from_millis(50);
/// The shortest span a demand sample covers (a first one: the shortest
/// that has seen a few tokens).
const SAMPLE: Duration = Duration::from_millis(100);
const FIRST_SAMPLE: Duration = Duration::from_millis(30);
/// A watched bucket that wanted no more than its share for this long is
/// no longer watched.
const QUIET: Duration = Duration::from_secs(5);
/// An unanswered write is sent again after this long if the view shows its
/// record unchanged (its compare lets at most one attempt commit).
const RESEND: Duration = Duration::from_secs(1);
/// After a compare failed, a record is decided again once the view is this
/// far along (or this long after).
const MOVED_WAIT: Duration = Duration::from_millis(200);
/// How long a decision waits for the view to catch up with a write.
const VIEW_PATIENCE: Duration = Duration::from_secs(2);
/// How often records nobody holds are looked for (to delete them).
const ADOPT_EVERY: Duration = Duration::from_secs(10);
/// Transactions in flight at once.
const IN_FLIGHT: usize = 2;
/// A share changes only when its target moved by more than this fraction
/// (so measurement noise does not rewrite records).
const HYSTERESIS: f64 = 0.1;

/// A message from the hot path.
#[derive(Debug)]
pub enum LeaseEvent {
    /// A bucket wants more than its share.
    Unmet {
        rule: Arc<Rule>,
        key: BucketKey,
        hash: u64,
    },
    /// A bucket with a recorded share is gone.
    Released { rule: Arc<Rule>, key: BucketKey },
}

/// Sets each global rule's implicit share and fallback for the current
/// operating count and membership: when a rule is installed (so its first
/// request has them) and whenever the count changes.
#[derive(Debug)]
pub struct Planner {
    pub settings: LeaseSettings,
    /// This daemon's operating count (0: not operating).
    pub count: AtomicU32,
    /// Live daemons (for the fallback's share).
    pub members: Arc<AtomicU64>,
    clock: MonotonicClock,
}

impl Planner {
    pub fn new(settings: LeaseSettings, members: Arc<AtomicU64>, clock: MonotonicClock) -> Planner {
        Planner {
            settings,
            count: AtomicU32::new(0),
            members,
            clock,
        }
    }

    pub fn plan(&self, rule: &Rule) {
        let Some(g) = &rule.global else { return };
        let n = self.members.load(Ordering::Relaxed).max(1);
        g.members.store(n, Ordering::Relaxed);
        g.set_count(
            self.count.load(Ordering::Acquire),
            &rule.params,
            self.clock.now_ns(),
        );
        // The lenient local limit while shares are out of force:
        // `fallback_limit` per window (by default this daemon's share of the
        // rate plus the slack), and a burst of `fallback_limit` as well,
        // never beyond the rule's (by default this daemon's share of it).
        let spec = &rule.spec;
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
        g.fallback_depth.store(burst, Ordering::Relaxed);
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

    fn unmet(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64) -> bool {
        self.events
            .try_send(LeaseEvent::Unmet {
                rule: Arc::clone(rule),
                key,
                hash,
            })
            .is_ok()
    }

    fn released(&self, rule: &Arc<Rule>, key: BucketKey) -> bool {
        self.events
            .try_send(LeaseEvent::Released {
                rule: Arc::clone(rule),
                key,
            })
            .is_ok()
    }
}

/// What the coordinator shares with the rest of the daemon.
#[derive(Debug, Clone)]
pub struct Wiring {
    pub link: Arc<ClusterLink>,
    pub health: Arc<Health>,
    pub registration: Arc<Registration>,
    pub stats: Arc<LeaseStats>,
    pub clock: MonotonicClock,
}

/// Demand of one bucket on this daemon.
#[derive(Debug, Clone, Copy)]
struct Demand {
    /// Tokens per second (smoothed); meaningful once `known`.
    rate: f64,
    known: bool,
    /// Tokens seen over `span` since the last sample.
    acc: u64,
    span: Duration,
    /// When the coordinator last read the bucket (`None`: never: the
    /// bucket's own count says over what span it counted).
    read_at: Option<Instant>,
}

/// Tokens a demand sample should see before it is believed (fewer make a
/// noisy estimate: a low-rate bucket's demand would swing and rewrite its
/// record for nothing).
const SAMPLE_TOKENS: u64 = 16;

impl Demand {
    fn new() -> Demand {
        Demand {
            rate: 0.0,
            known: false,
            acc: 0,
            span: Duration::ZERO,
            read_at: None,
        }
    }

    /// Adds a reading of the bucket at `now`: `wanted` tokens since the
    /// last one (the first reading: over `first_span`, as the bucket
    /// counted), the bucket idle for `idle`. A sample is taken once it saw
    /// [`SAMPLE_TOKENS`] tokens over at least [`FIRST_SAMPLE`] (a first one
    /// at once if it spans that long), or once it spans as long as the
    /// current estimate needs to show that many (at least [`SAMPLE`]). A
    /// bucket idle for as long as that is at zero at once: demand that moved
    /// elsewhere frees its share fast. A sample below half the estimate is
    /// believed at once; others are smoothed.
    fn add(&mut self, wanted: u64, first_span: Duration, idle: Duration, now: Instant) {
        let span = match self.read_at {
            Some(at) => now.duration_since(at),
            None => first_span,
        };
        self.read_at = Some(now);
        self.acc += wanted;
        self.span += span;
        let patience = if self.known && self.rate > 0.0 {
            Duration::from_secs_f64((SAMPLE_TOKENS as f64 / self.rate).min(60.0)).max(SAMPLE)
        } else {
            SAMPLE
        };
        if self.known && self.rate > 0.0 && idle >= patience {
            self.rate = 0.0;
            self.acc = 0;
            self.span = Duration::ZERO;
            return;
        }
        let enough = self.acc >= SAMPLE_TOKENS && self.span >= FIRST_SAMPLE;
        if !(enough || self.span >= patience) {
            return;
        }
        let sample = self.acc as f64 / self.span.as_secs_f64().max(1e-3);
        self.rate = if !self.known || sample < self.rate / 2.0 {
            sample
        } else {
            0.5 * self.rate + 0.5 * sample
        };
        self.known = true;
        self.acc = 0;
        self.span = Duration::ZERO;
    }

    /// An estimate before the first sample, for a bucket whose share cannot
    /// hold anything (no depth): any demand there is unmet.
    fn provisional(&self) -> Option<f64> {
        (self.acc > 0).then(|| self.acc as f64 / self.span.max(SAMPLE).as_secs_f64())
    }

    /// No bucket: no demand, known at once.
    fn none(&mut self, now: Instant) {
        *self = Demand {
            rate: 0.0,
            known: true,
            acc: 0,
            span: Duration::ZERO,
            read_at: Some(now),
        };
    }
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
        let mut audit_tick = tokio::time::interval(super::audit::ADMITTED_EVERY);
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

    // ----- the view -----

    fn feed(&mut self, fed: Fed) {
        let mut changed: Vec<String> = Vec::new();
        let mut members = false;
        match fed {
            Fed::Snapshot { kvs, revision } => {
                let before: Vec<String> = self.view.records.keys().cloned().collect();
                let names = self.names_of(&before);
                self.view.clear();
                for kv in &kvs {
                    self.view
                        .put(kv.key(), kv.value(), kv.mod_revision(), kv.lease());
                }
                self.view.revision = self.view.revision.max(revision);
                members = true;
                changed.extend(self.view.records.keys().cloned());
                for key in before {
                    if !self.view.records.contains_key(&key) {
                        self.record_gone(&key, names.get(&key));
                    }
                }
            }
            Fed::Events(events) => {
                for e in events {
                    let Some(kv) = e.kv() else { continue };
                    let change = match e.event_type() {
                        etcd_client::EventType::Put => {
                            self.view
                                .put(kv.key(), kv.value(), kv.mod_revision(), kv.lease())
                        }
                        etcd_client::EventType::Delete => {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let names = self.names_of(std::slice::from_ref(&key));
                            let change = self.view.delete(kv.key(), kv.mod_revision());
                            if let Change::Record(k) = &change {
                                self.record_gone(k, names.get(k));
                            }
                            change
                        }
                    };
                    match change {
                        Change::Member(_) => members = true,
                        Change::Record(k) => changed.push(k),
                        Change::None => {}
                    }
                }
            }
            Fed::Progress(revision) => {
                self.view.revision = self.view.revision.max(revision);
            }
        }
        if members {
            let n = self.view.members.len().max(1) as u64;
            if self.planner.members.swap(n, Ordering::Relaxed) != n {
                for rule in self.limiter.rules().iter() {
                    self.planner.plan(rule);
                }
            }
            self.count_seen();
        }
        for key in changed {
            self.reconcile(&key);
        }
    }

    /// (rule, client, resource) of records about to leave the view.
    fn names_of(&self, keys: &[String]) -> HashMap<String, (Box<str>, BucketKey)> {
        keys.iter()
            .filter_map(|k| {
                let known = self.view.records.get(k)?;
                Some((
                    k.clone(),
                    (
                        known.rule.clone(),
                        BucketKey::new(&known.record.client, &known.record.resource),
                    ),
                ))
            })
            .collect()
    }

    /// A record was deleted: this daemon's bucket returns to the implicit
    /// share (every entry was at most implicit when it was deleted).
    fn record_gone(&mut self, key: &str, names: Option<&(Box<str>, BucketKey)>) {
        self.applied.remove(key);
        // A write of ours is settled: a deletion is done, anything else has
        // nothing left to write to (if its answer is still to come, that
        // answer settles it).
        if let Some(w) = self.watched.get_mut(key)
            && let Some(p) = &w.pending
            && !p.in_flight
        {
            w.pending = None;
        }
        if let Some((rule, bucket)) = names {
            let hash = self.limiter.table().hash_key(bucket);
            self.limiter
                .set_share(rule, bucket, hash, None, 0, 0, self.clock.now_ns());
        }
    }

    /// Brings this daemon's applied share of `key` in line with the view,
    /// and resolves a write of it the view shows ended.
    fn reconcile(&mut self, key: &str) {
        let Some(known) = self.view.records.get(key) else {
            return;
        };
        let rule_id = known.rule.clone();
        let record = known.record.clone();
        let mod_revision = known.mod_revision;
        let mine = record
            .entries
            .get(self.me())
            .filter(|e| e.lease == self.lease && self.lease != 0);
        // Resolve a write of ours.
        let mut committed_raise = None;
        let mut fill = 0;
        let mut latest_is_mine = false;
        if let Some(w) = self.watched.get_mut(key) {
            if let Some(e) = mine
                && e.op == w.last_op
            {
                latest_is_mine = true;
            }
            // The owed tokens a write of ours carried are in the pool once
            // the view shows that write (once only).
            if let (Some(e), Some((op, pooled))) = (mine, w.carrying)
                && e.op == op
            {
                w.owed = w.owed.saturating_sub(pooled);
                w.carrying = None;
            }
            if let Some(p) = &w.pending {
                let ours = mine.is_some_and(|e| e.op == p.op);
                if ours {
                    committed_raise = p.raise_to;
                    fill = p.fill;
                    if p.uncertain {
                        self.stats.resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    w.pending = None;
                } else if mod_revision != p.write.expect && !p.in_flight {
                    // The record moved on without it: it did not commit.
                    w.pending = None;
                }
            }
        }
        let rule = self.limiter.rules().get(&rule_id).cloned();
        let prev = self
            .applied
            .get(key)
            .copied()
            .unwrap_or_else(|| implicit_share(rule.as_deref(), self.count, record.burst));
        let listed = mine.map_or(Share::ZERO, Share::held);
        let next = if latest_is_mine || committed_raise.is_some() {
            // Our own latest write: the record says what we hold.
            listed
        } else {
            Share {
                rate: prev.rate.min(listed.rate),
                depth: prev.depth.min(listed.depth),
            }
        };
        if self.applied.get(key) != Some(&next) {
            self.applied.insert(key.to_owned(), next);
            let discarded = self.apply(&rule_id, &record, rule.as_deref(), next, fill);
            self.owe(key, discarded);
        }
        // A record listing us at an unreported demand (a creation), or one
        // that changed while we hold a share of it: decide.
        let respond =
            mine.is_some_and(|e| e.demand.is_none() || e.rate > 0 || e.n > 0 || e.depth > 0);
        if respond && !self.watched.contains_key(key) {
            let bucket = BucketKey::new(&record.client, &record.resource);
            self.watch(key, rule_id.as_ref(), bucket, None);
        }
        self.dirty.push(key.to_owned());
    }

    /// Tokens given up by lowering `key`'s share go to its record's pool
    /// with this daemon's next write of it.
    fn owe(&mut self, key: &str, tokens: u64) {
        if tokens > 0
            && let Some(w) = self.watched.get_mut(key)
        {
            w.owed = w.owed.saturating_add(tokens);
        }
    }

    /// Applies `share` of a record to the limiter, with `fill` tokens from
    /// the pool in the room a raise adds; returns the tokens given up.
    fn apply(
        &mut self,
        rule_id: &str,
        record: &Record,
        rule: Option<&Rule>,
        share: Share,
        fill: u64,
    ) -> u64 {
        let bucket = BucketKey::new(&record.client, &record.resource);
        let hash = self.limiter.table().hash_key(&bucket);
        let implicit_depth = implicit_share(rule, self.count, record.burst).depth;
        let discarded = self.limiter.set_share(
            rule_id,
            &bucket,
            hash,
            Some(share.recorded(record.burst)),
            implicit_depth,
            fill,
            self.clock.now_ns(),
        );
        if self.audit.enabled() {
            self.audit.write(&AuditRecord::Applied {
                node: self.me().to_owned(),
                key: self.view.paths.record(rule_id, &bucket),
                rate: share.rate,
                depth: share.depth,
                wall_ns: super::audit::wall_ns(),
            });
        }
        discarded
    }

    // ----- the operating count -----

    /// The view changed members: a count write of ours may have landed.
    fn count_seen(&mut self) {
        let Some(w) = self.count_write else { return };
        let Some(m) = self.view.members.get(self.me()) else {
            return;
        };
        if m.lease != self.lease || m.n != w.n {
            return;
        }
        if w.raise {
            // Everything recorded before the raise is in the view now.
            if w.committed.is_none_or(|rev| self.view.revision >= rev) {
                self.set_count(w.n);
                self.count_write = None;
            }
        } else {
            self.count_write = None;
        }
    }

    fn set_count(&mut self, n: u32) {
        if n == self.count {
            return;
        }
        let first = self.count == 0;
        self.count = n;
        self.stats.count_changes.fetch_add(1, Ordering::Relaxed);
        // Ordered against rule installs by the rules lock (see `Planner`).
        self.planner.count.store(n, Ordering::Release);
        for rule in self.limiter.rules().iter() {
            self.planner.plan(rule);
        }
        if first && n > 0 {
            self.registration.set_ready(self.lease);
            self.registration.publish(&self.link);
            tracing::info!(count = n, "shares in force");
        }
    }

    /// Moves the operating count toward the number of live members.
    async fn step_count(&mut self) {
        if self.lease == 0 {
            return;
        }
        if let Some(w) = self.count_write {
            if w.committed.is_some() || w.sent.elapsed() < RESEND {
                return;
            }
            // No word of it: decide again from the view.
            self.count_write = None;
        }
        let Some(mine) = self.view.members.get(self.me()) else {
            return;
        };
        if mine.lease != self.lease {
            return;
        }
        let written = mine.n;
        let members = self.view.members.len() as u32;
        let others = self.view.other_counts(self.me());
        let (n, raise) = if self.count > 0 && members > self.count {
            // More daemons: lower now, record after.
            self.set_count(members);
            (members, false)
        } else if (self.count == 0 || members < self.count)
            && share::may_raise_count(members, &others)
        {
            (members, true)
        } else if written != self.count && self.count > 0 {
            (self.count, false)
        } else {
            return;
        };
        let members_at = raise.then_some(self.view.revision);
        self.count_write = Some(CountWrite {
            n,
            raise,
            sent: Instant::now(),
            committed: None,
        });
        let result = self.store.write_count(self.lease, n, members_at).await;
        let (outcome, revision) = match &result {
            Ok(Some(rev)) => ("committed", *rev),
            Ok(None) => ("moved", 0),
            Err(_) => ("unknown", 0),
        };
        if self.audit.enabled() {
            self.audit.write(&AuditRecord::Count {
                node: self.me().to_owned(),
                lease: self.lease,
                n,
                outcome: outcome.into(),
                revision,
                wall_ns: super::audit::wall_ns(),
            });
        }
        match result {
            Ok(Some(rev)) => {
                if let Some(w) = &mut self.count_write {
                    w.committed = Some(rev);
                }
                self.count_seen();
            }
            // A member moved since the view: decide again when it shows.
            Ok(None) => self.count_write = None,
            // Unknown: the view tells (or a resend after RESEND).
            Err(_) => {}
        }
    }

    // ----- demand and decisions -----

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
        let hash = hash.unwrap_or_else(|| self.limiter.table().hash_key(&key));
        let rule: Arc<str> = rule.into();
        *self.per_rule.entry(Arc::clone(&rule)).or_default() += 1;
        let now = Instant::now();
        self.watch_inserted(record_key, rule, key, hash, now);
        // The bucket's own count gives a first reading at once.
        self.sample(record_key, now, self.clock.now_ns());
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
        let now_ns = self.clock.now_ns();
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty {
            if self.watched.contains_key(&key) {
                self.sample(&key, now, now_ns);
                self.decide(&key, now, &rules);
            }
        }
    }

    async fn tick(&mut self) {
        self.registration.publish(&self.link);
        let now = Instant::now();
        let now_ns = self.clock.now_ns();
        let keys: Vec<String> = self.watched.keys().cloned().collect();
        let rules = self.limiter.rules();
        for key in keys {
            self.sample(&key, now, now_ns);
            self.decide(&key, now, &rules);
        }
        self.forget_quiet(now);
        self.adopt_idle_records(now);
        self.compact().await;
    }

    fn sample(&mut self, key: &str, now: Instant, now_ns: u64) {
        let Some(w) = self.watched.get_mut(key) else {
            return;
        };
        // A committed write the view still does not show after a while: the
        // view lags; decide again from it (a raise is applied when it shows).
        if w.pending.as_ref().is_some_and(|p| {
            p.committed
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
    }

    /// Decides what `key`'s record should say about this daemon, and queues
    /// the write.
    fn decide(&mut self, key: &str, now: Instant, rules: &RuleSet) {
        let action = self.plan(key, now, rules);
        if !matches!(
            action,
            Action::None | Action::Quiet | Action::Busy | Action::StillIdle
        ) {
            tracing::debug!(key, ?action, demand = ?self.watched.get(key).map(|w| w.demand.rate), "share decision");
        }
        if !matches!(action, Action::Idle | Action::StillIdle | Action::None)
            && let Some(w) = self.watched.get_mut(key)
        {
            w.idle_since = None;
        }
        match action {
            Action::StillIdle => {}
            Action::None => {}
            Action::Quiet => {
                if let Some(w) = self.watched.get_mut(key) {
                    w.quiet_since.get_or_insert(now);
                }
            }
            Action::Busy => {
                if let Some(w) = self.watched.get_mut(key) {
                    w.quiet_since = None;
                }
            }
            Action::Create { demand } => {
                let rule = self
                    .watched
                    .get(key)
                    .and_then(|w| rules.get(&w.rule).cloned());
                if let Some(rule) = rule {
                    self.create(key, &rule, demand);
                }
            }
            Action::Write {
                next,
                demand,
                applied,
            } => {
                let Some(known) = self.view.records.get(key) else {
                    return;
                };
                let (record, expect) = (known.record.clone(), known.mod_revision);
                self.write_entry(key, &record, expect, next, demand, applied);
            }
            Action::Delete { expect } => self.delete(key, expect),
            Action::Idle => {
                if let Some(w) = self.watched.get_mut(key) {
                    w.idle_since.get_or_insert(now);
                }
            }
        }
    }

    /// What [`Coordinator::decide`] should do for `key`.
    fn plan(&self, key: &str, now: Instant, rules: &RuleSet) -> Action {
        if self.lease == 0 || self.count == 0 {
            return Action::None;
        }
        let Some(w) = self.watched.get(key) else {
            return Action::None;
        };
        // Wait for the view to show what a write of ours changed, but not
        // for ever: a view that lags (a watch made anew) must not freeze the
        // bucket's share; compare-and-swap keeps a decision from a stale
        // view safe anyway.
        let lagging =
            self.view.revision < w.view_at && now.duration_since(w.not_before) < VIEW_PATIENCE;
        if w.pending.is_some() || now < w.not_before || lagging {
            return Action::None;
        }
        let rule = rules.get(&w.rule).filter(|r| r.global.is_some());
        let me = self.me();
        let lease = self.lease;
        let demand = if w.demand.known {
            w.demand.rate
        } else {
            // Before a first sample, only a share with no depth acts (on
            // the demand seen so far): it can admit nothing at all.
            let applied_depth = match self.view.records.get(key) {
                Some(_) => self.applied.get(key).map_or(0, |s| s.depth),
                None => rule.map_or(0, |r| share::implicit(self.count, r.params.capacity).1),
            };
            match w.demand.provisional() {
                Some(d) if applied_depth == 0 => d,
                _ => return Action::None,
            }
        };
        let Some(known) = self.view.records.get(key) else {
            // No record: the implicit share decides. Record the bucket
            // when its demand outgrows that share.
            let Some(rule) = rule else {
                return Action::Quiet;
            };
            let rate = rule_rate(rule);
            let (_, depth) = share::implicit(self.count, rule.params.capacity);
            let unmet =
                demand > rate / f64::from(self.count) * 1.05 || (depth == 0 && demand > 0.0);
            return if unmet {
                Action::Create { demand }
            } else {
                Action::Quiet
            };
        };
        let record = &known.record;
        let view = &self.view;
        let live = |node: &str, lease: i64| view.live(node, lease);
        let mine = record.entries.get(me).filter(|e| e.lease == lease);
        let applied = self.applied.get(key).copied().unwrap_or(Share::ZERO);
        let Some(rule) = rule else {
            // The rule is gone here: nothing to hold, nothing wanted; once
            // every daemon says so, its record goes.
            let idle = |e: &Entry| Share::of(e) == Share::ZERO && e.demand == Some(0.0);
            return if mine.is_some_and(|e| !idle(e)) {
                Action::Write {
                    next: Share::ZERO,
                    demand: 0.0,
                    applied,
                }
            } else if record
                .entries
                .iter()
                .filter(|(n, e)| live(n, e.lease))
                .all(|(_, e)| idle(e))
            {
                Action::Delete {
                    expect: known.mod_revision,
                }
            } else {
                Action::Quiet
            };
        };
        let rate = rule_rate(rule);
        let others = || {
            record
                .entries
                .iter()
                .filter(move |(n, e)| n.as_str() != me && live(n, e.lease))
        };
        // Everyone else at zero and quiet, and this daemon quiet too: once
        // that lasted as long as the rule takes to refill its burst, the
        // record can go (every daemon returns to its implicit share, a new
        // bucket full: the rate earned that while the record was idle).
        if demand == 0.0
            && others().all(|(_, e)| Share::of(e) == Share::ZERO && e.demand == Some(0.0))
            && mine.is_none_or(|e| e.demand == Some(0.0) || Share::of(e) == Share::ZERO)
        {
            let refill =
                Duration::from_secs_f64((record.burst as f64 / rate.max(1e-9)).min(1e9)).max(QUIET);
            return match w.idle_since {
                Some(since) if now.duration_since(since) >= refill => Action::Delete {
                    expect: known.mod_revision,
                },
                Some(_) => Action::StillIdle,
                None => Action::Idle,
            };
        }
        // Every daemon takes part in node order (so all compute the same
        // split of whole tokens), this one with its measured demand.
        let mut parts: Vec<(&str, Claim)> = others()
            .map(|(n, e)| {
                let claim = match e.demand {
                    Some(d) => Claim {
                        demand: d,
                        measured: true,
                    },
                    // Not reported: keeps what it holds.
                    None => Claim {
                        demand: share::rate_of(Share::of(e).rate, rate),
                        measured: false,
                    },
                };
                (n.as_str(), claim)
            })
            .collect();
        parts.push((
            me,
            Claim {
                demand,
                measured: true,
            },
        ));
        parts.sort_by(|a, b| a.0.cmp(b.0));
        let claims: Vec<Claim> = parts.iter().map(|p| p.1).collect();
        let at = parts
            .iter()
            .position(|p| p.0 == me)
            .expect("this daemon takes part");
        let targets = share::targets(rate, &claims);
        // Depth is split in whole tokens from the demands as recorded (this
        // daemon's too, once reported): every daemon computes the same split,
        // so they do not take turns at a token.
        let recorded_claims: Vec<Claim> = parts
            .iter()
            .map(|&(n, c)| match mine.and_then(|e| e.demand) {
                Some(d) if n == me => Claim { demand: d, ..c },
                _ => c,
            })
            .collect();
        let depths = share::depths(record.burst, &share::targets(rate, &recorded_claims));
        let target = Share {
            rate: share::parts_of(targets[at], rate),
            depth: depths[at],
        };
        let recorded = mine.map_or(Share::ZERO, Share::held);
        let room = share::free_for(record, me, live);
        let next = step_toward(applied, target, room);
        let report = demand_report_due(
            mine.and_then(|e| e.demand),
            demand,
            share::rate_of(applied.rate, rate),
        );
        if next != recorded || report {
            Action::Write {
                next,
                demand,
                applied,
            }
        } else if demand <= share::rate_of(applied.rate, rate) {
            Action::Quiet
        } else {
            Action::Busy
        }
    }

    /// Queues the creation of `key`'s record: every operating daemon listed
    /// at its implicit share as its member key says (so no share changes),
    /// this one with its demand.
    fn create(&mut self, key: &str, rule: &Rule, demand: f64) {
        let burst = rule.params.capacity;
        let me = self.me().to_owned();
        let mut entries = std::collections::BTreeMap::new();
        for (node, m) in &self.view.members {
            if m.n == 0 {
                continue;
            }
            let (n, depth) = share::implicit(m.n, burst);
            entries.insert(
                node.clone(),
                Entry {
                    lease: m.lease,
                    rate: 0,
                    n,
                    depth,
                    demand: None,
                    op: 0,
                },
            );
        }
        let op = self.next_op();
        let Some(w) = self.watched.get(key) else {
            return;
        };
        let (client, resource) = w.key.names();
        let mut entry = entries.get(&me).cloned().unwrap_or(Entry {
            lease: self.lease,
            rate: 0,
            n: 0,
            depth: 0,
            demand: None,
            op: 0,
        });
        entry.demand = Some(demand);
        entry.op = op;
        entries.insert(me.clone(), entry.clone());
        let expect = self.view.broken.get(key).copied().unwrap_or(0);
        // The depth no implicit share holds (the burst's remainder over
        // the counts) was never anyone's: it starts full in the pool, so a
        // burst smaller than the number of daemons is admitted somewhere.
        // (A record deleted lately left nothing behind to reuse: it is
        // deleted only once idle for as long as the burst takes to refill.)
        // Over an unreadable value, whose state is unknown, nothing is.
        let held: u64 = entries.values().map(|e| e.depth).sum();
        let pool = if expect == 0 {
            burst.saturating_sub(held)
        } else {
            0
        };
        let record = Record {
            client: client.to_owned(),
            resource: resource.to_owned(),
            burst,
            entries,
            pool,
        };
        let write = RecordWrite {
            key: key.to_owned(),
            expect,
            members_at: Some(self.view.revision),
            value: Some(serde_json::to_string(&record).expect("records serialize")),
        };
        let w = self.watched.get_mut(key).expect("watched");
        w.last_op = op;
        w.quiet_since = None;
        w.pending = Some(Pending {
            op,
            kind: Kind::Create,
            write,
            entry: Some(entry),
            raise_to: None,
            fill: 0,
            sent: None,
            in_flight: false,
            uncertain: false,
            committed: false,
        });
    }

    /// Queues a write of this daemon's entry: lowered parts apply now
    /// (the tokens they held above the new depth owed to the pool), raised
    /// ones once committed (taking what the pool has into the new room).
    fn write_entry(
        &mut self,
        key: &str,
        record: &Record,
        expect: i64,
        next: Share,
        demand: f64,
        applied: Share,
    ) {
        let lowered = Share {
            rate: applied.rate.min(next.rate),
            depth: applied.depth.min(next.depth),
        };
        if lowered != applied {
            // Lower locally before recording the lower value.
            self.stats.lowers.fetch_add(1, Ordering::Relaxed);
            self.applied.insert(key.to_owned(), lowered);
            let rule = self
                .view
                .records
                .get(key)
                .map(|k| k.rule.clone())
                .unwrap_or_default();
            let r = self.limiter.rules().get(&rule).cloned();
            let discarded = self.apply(&rule, record, r.as_deref(), lowered, 0);
            self.owe(key, discarded);
        }
        let op = self.next_op();
        let entry = Entry {
            lease: self.lease,
            rate: next.rate,
            n: 0,
            depth: next.depth,
            demand: Some(demand),
            op,
        };
        let me = self.me().to_owned();
        let recorded_depth = record
            .entries
            .get(&me)
            .filter(|e| e.lease == self.lease)
            .map_or(0, |e| e.depth);
        let mut value = record.clone();
        value.entries.insert(me, entry.clone());
        // Entries of daemons that are gone are dropped while we write anyway.
        let view = &self.view;
        value
            .entries
            .retain(|node, e| view.live(node, e.lease) || e.lease == entry.lease);
        let owed = self.watched.get(key).map_or(0, |w| w.owed);
        let held: u64 = value.entries.values().map(|e| e.depth).sum();
        let (fill, pool) = share::take_from_pool(
            record.pool,
            recorded_depth,
            next.depth,
            owed,
            value.burst.saturating_sub(held),
        );
        value.pool = pool;
        let write = RecordWrite {
            key: key.to_owned(),
            expect,
            members_at: None,
            value: Some(serde_json::to_string(&value).expect("records serialize")),
        };
        let raise = next != lowered;
        let Some(w) = self.watched.get_mut(key) else {
            return;
        };
        w.last_op = op;
        w.carrying = Some((op, owed));
        w.quiet_since = None;
        w.pending = Some(Pending {
            op,
            kind: Kind::Entry,
            write,
            entry: Some(entry),
            raise_to: raise.then_some(next),
            // Tokens of the pool come into the room this raise adds here
            // (the part of it this daemon had not applied yet).
            fill: fill.min(next.depth.saturating_sub(lowered.depth)),
            sent: None,
            in_flight: false,
            uncertain: false,
            committed: false,
        });
    }

    fn delete(&mut self, key: &str, expect: i64) {
        let op = self.next_op();
        let Some(w) = self.watched.get_mut(key) else {
            return;
        };
        w.pending = Some(Pending {
            op,
            kind: Kind::Delete,
            write: RecordWrite {
                key: key.to_owned(),
                expect,
                members_at: None,
                value: None,
            },
            entry: None,
            raise_to: None,
            fill: 0,
            sent: None,
            in_flight: false,
            uncertain: false,
            committed: false,
        });
    }

    /// Every [`ADOPT_EVERY`], watches the records no daemon holds anything
    /// of any more (every daemon quiet), so that someone deletes them: the
    /// daemon that wrote last may have stopped.
    fn adopt_idle_records(&mut self, now: Instant) {
        if self
            .adopted_at
            .is_some_and(|t| now.duration_since(t) < ADOPT_EVERY)
        {
            return;
        }
        self.adopted_at = Some(now);
        let view = &self.view;
        let idle: Vec<(String, Box<str>, BucketKey)> = view
            .records
            .iter()
            .filter(|(key, k)| {
                !self.watched.contains_key(*key)
                    && k.record
                        .entries
                        .iter()
                        .filter(|(n, e)| view.live(n, e.lease))
                        .all(|(_, e)| Share::of(e) == Share::ZERO && e.demand == Some(0.0))
            })
            .map(|(key, k)| {
                (
                    key.clone(),
                    k.rule.clone(),
                    BucketKey::new(&k.record.client, &k.record.resource),
                )
            })
            .collect();
        for (key, rule, bucket) in idle {
            self.watch(&key, &rule, bucket, None);
        }
    }

    /// Stops watching buckets that have been quiet (no demand beyond their
    /// share, nothing in flight) for [`QUIET`].
    fn forget_quiet(&mut self, now: Instant) {
        let mut forgotten = Vec::new();
        self.watched.retain(|key, w| {
            let quiet = w.pending.is_none()
                && w.quiet_since
                    .is_some_and(|t| now.duration_since(t) >= QUIET);
            if quiet {
                forgotten.push((key.clone(), Arc::clone(&w.rule), w.key.clone(), w.hash));
            }
            !quiet
        });
        for (_, rule, key, hash) in forgotten {
            if let Some(n) = self.per_rule.get_mut(&rule) {
                *n = n.saturating_sub(1);
            }
            self.limiter.clear_signal(&rule, &key, hash);
        }
        self.per_rule.retain(|_, n| *n > 0);
    }

    // ----- writes -----

    /// Sends the writes that are ready, at most [`IN_FLIGHT`] transactions.
    fn flush(&mut self) {
        if self.lease == 0 {
            return;
        }
        let now = Instant::now();
        while self.batches.len() < IN_FLIGHT {
            let mut keys = Vec::new();
            let mut writes = Vec::new();
            for (key, w) in &mut self.watched {
                let Some(p) = &mut w.pending else { continue };
                if p.in_flight || p.committed {
                    continue;
                }
                if p.uncertain && p.sent.is_some_and(|t| now.duration_since(t) < RESEND) {
                    continue;
                }
                p.in_flight = true;
                p.sent = Some(now);
                keys.push((key.clone(), p.clone()));
                writes.push(p.write.clone());
                if writes.len() >= super::store::MAX_RECORDS_PER_TXN {
                    break;
                }
            }
            if writes.is_empty() {
                return;
            }
            let store = self.store.clone();
            self.batches.spawn(async move {
                let results = store.apply(&writes).await;
                (keys, results)
            });
        }
    }

    fn finished(&mut self, (sent, results): Batch) {
        let now = Instant::now();
        for ((key, p), result) in sent.into_iter().zip(results) {
            let (outcome, revision) = match &result {
                Written::Committed(rev) => ("committed", *rev),
                Written::Moved(rev) => ("moved", *rev),
                Written::Unknown(_) => ("unknown", 0),
                Written::Failed(_) => ("failed", 0),
            };
            match &result {
                Written::Committed(_) => {
                    match p.kind {
                        Kind::Create => self.stats.records_created.fetch_add(1, Ordering::Relaxed),
                        Kind::Delete => self.stats.records_deleted.fetch_add(1, Ordering::Relaxed),
                        Kind::Entry => 0,
                    };
                    if p.raise_to.is_some() {
                        self.stats.raises.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Written::Unknown(_) => {
                    self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            if self.audit.enabled() {
                let entry = p.entry.as_ref();
                self.audit.write(&AuditRecord::Share {
                    node: self.store.node.clone(),
                    key: key.clone(),
                    op: p.op,
                    kind: p.kind.name().into(),
                    lease: self.lease,
                    rate: entry.map_or(0, |e| Share::held(e).rate),
                    depth: entry.map_or(0, |e| e.depth),
                    outcome: outcome.into(),
                    revision,
                    wall_ns: super::audit::wall_ns(),
                });
            }
            // The write may have been settled by the watch already (it can
            // be faster than the answer): only this very write is updated.
            let Some(w) = self.watched.get_mut(&key) else {
                continue;
            };
            if w.pending.as_ref().is_none_or(|q| q.op != p.op) {
                continue;
            }
            let pending = w.pending.as_mut().expect("checked");
            pending.in_flight = false;
            match result {
                Written::Committed(rev) => {
                    // Applied when the watch shows it (in etcd's order); a
                    // deletion is done.
                    w.view_at = rev;
                    pending.committed = true;
                    if p.kind == Kind::Delete {
                        w.pending = None;
                    }
                }
                Written::Moved(rev) => {
                    w.pending = None;
                    w.view_at = rev;
                    w.not_before = now + MOVED_WAIT.min(TICK);
                }
                Written::Unknown(_) => pending.uncertain = true,
                Written::Failed(_) => {
                    w.pending = None;
                    w.not_before = now + Duration::from_millis(100);
                }
            }
            if outcome == "committed" && p.kind != Kind::Delete {
                self.reconcile(&key);
            }
        }
    }

    // ----- etcd's history -----

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

    // ----- audit -----

    /// One audit line per global rule with the requests admitted since the last.
    fn audit_admissions(&mut self) {
        if !self.audit.enabled() {
            return;
        }
        let node = self.store.node.clone();
        let now = super::audit::wall_ns();
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

/// What to do about one watched bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    None,
    /// The record is idle everywhere: since now...
    Idle,
    /// ...and still, not yet for long enough to delete it.
    StillIdle,
    /// Demand within the share: forget the bucket if this lasts.
    Quiet,
    /// Demand beyond the share, nothing to write.
    Busy,
    Create {
        demand: f64,
    },
    Write {
        next: Share,
        demand: f64,
        applied: Share,
    },
    Delete {
        expect: i64,
    },
}

/// The share to record next, from `applied` toward `target`: lowered parts
/// as far as the target, raised ones as far as `room` (what this daemon may
/// hold in all) allows. A part moves only when its target moved by more
/// than [`HYSTERESIS`] (depth also when it goes to or from zero).
fn step_toward(applied: Share, target: Share, room: Share) -> Share {
    let moved = |from: u64, to: u64| {
        (to as f64 - from as f64).abs() > HYSTERESIS * (from.max(to) as f64).max(1.0)
    };
    let step = |from: u64, to: u64, room: u64, force: bool| {
        if !(force || moved(from, to)) || to == from {
            from
        } else if to < from {
            to
        } else {
            to.min(room).max(from)
        }
    };
    Share {
        rate: step(applied.rate, target.rate, room.rate, false),
        depth: step(
            applied.depth,
            target.depth,
            room.depth,
            applied.depth == 0 || target.depth == 0,
        ),
    }
}

/// Tokens per second of a rule.
fn rule_rate(rule: &Rule) -> f64 {
    1e9 / rule.params.interval_ns.max(1) as f64
}

/// The implicit share of a rule at count `n`, as a record of `burst`
/// counts it (rounded down: what this daemon holds at most).
fn implicit_share(rule: Option<&Rule>, n: u32, burst: u64) -> Share {
    let Some(rule) = rule.filter(|r| r.global.is_some()) else {
        return Share::ZERO;
    };
    if n == 0 {
        return Share::ZERO;
    }
    let depth = rule.params.capacity / u64::from(n);
    let depth = crate::daemon::limiter::book::Recorded {
        rate: 0,
        depth,
        counted_in: rule.params.capacity,
    }
    .bucket(1, burst)
    .1;
    Share {
        rate: SCALE / u64::from(n),
        depth,
    }
}

/// Whether this daemon's demand should be written for the others: not
/// reported yet, or it crossed its share (wanting more, or no longer), or
/// changed by half while over it, or went to zero.
fn demand_report_due(recorded: Option<f64>, demand: f64, share_rate: f64) -> bool {
    let Some(recorded) = recorded else {
        return true;
    };
    let unmet = |d: f64| d > share_rate * 1.05;
    unmet(recorded) != unmet(demand)
        || (unmet(demand) && (demand > recorded * 1.5 || demand < recorded / 1.5))
        || (demand == 0.0 && recorded > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_step_down_at_once_and_up_into_room() {
        let s = |rate, depth| Share { rate, depth };
        let all = s(SCALE, 100);
        // Lower: at once.
        assert_eq!(step_toward(s(1000, 10), s(500, 5), all), s(500, 5));
        // Noise within the hysteresis: nothing moves.
        assert_eq!(step_toward(s(1000, 10), s(1050, 10), all), s(1000, 10));
        // Raise as far as the room goes, never below what is held.
        assert_eq!(
            step_toward(s(1000, 10), s(3000, 30), s(2000, 20)),
            s(2000, 20)
        );
        assert_eq!(
            step_toward(s(1000, 10), s(3000, 30), s(500, 5)),
            s(1000, 10)
        );
        // A first token of depth moves whatever the hysteresis says.
        assert_eq!(step_toward(s(1000, 0), s(1000, 1), all), s(1000, 1));
    }

    #[test]
    fn demand_reports_follow_crossings_not_noise() {
        assert!(demand_report_due(None, 0.0, 10.0));
        assert!(
            !demand_report_due(Some(5.0), 6.0, 10.0),
            "under the share either way"
        );
        assert!(demand_report_due(Some(5.0), 20.0, 10.0), "now wants more");
        assert!(
            !demand_report_due(Some(20.0), 24.0, 10.0),
            "noise over the share"
        );
        assert!(demand_report_due(Some(20.0), 40.0, 10.0));
        assert!(
            demand_report_due(Some(3.0), 0.0, 10.0),
            "idle: the record may go"
        );
    }

    #[test]
    fn demand_samples_wait_for_enough_tokens_and_drops_are_believed() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        // A first reading over the bucket's own count: 20 tokens in 45 ms.
        let mut d = Demand::new();
        d.add(20, ms(45), ms(0), t0);
        assert!(d.known);
        assert!((d.rate - 20.0 / 0.045).abs() < 1.0);
        // Too few tokens too soon: no sample yet.
        let mut e = Demand::new();
        e.add(5, ms(20), ms(0), t0);
        assert!(!e.known);
        // A busy bucket gone quiet: idle for as long as 16 tokens take at
        // its rate (at least 100 ms), its demand is zero at once.
        d.add(0, ms(0), ms(50), t0 + ms(95));
        assert!(d.rate > 400.0);
        d.add(0, ms(0), ms(100), t0 + ms(145));
        assert_eq!(d.rate, 0.0);
        // A slow bucket (13/s) is not judged on a tenth of a second: its
        // estimate needs 16 tokens or the time they take.
        let mut slow = Demand::new();
        slow.add(16, ms(1200), ms(0), t0);
        assert!((slow.rate - 13.3).abs() < 0.1);
        slow.add(1, ms(0), ms(10), t0 + ms(100));
        slow.add(0, ms(0), ms(200), t0 + ms(300));
        assert!(
            (slow.rate - 13.3).abs() < 0.1,
            "not yet judged: {}",
            slow.rate
        );
    }
}
