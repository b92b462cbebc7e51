//! The limiter core: given (client, resource, cost, priority) and `now`, decide.
//!
//! [`Limiter::acquire`] is the hot path: hash the key once, lock one shard for
//! a few dozen nanoseconds, find or create the bucket, resolve its rule only on
//! a miss or after a rule change, do the GCRA arithmetic, count, unlock. It is a
//! plain synchronous function: no I/O, no `.await`, no global lock, and no
//! allocation unless a new bucket is created. Time is passed in, so tests drive
//! it with a fake clock.

pub mod book;
pub mod bucket;
mod explain;
pub mod global;
pub mod key;
pub mod rules;
mod shares;
mod stack;
pub mod table;
pub use stack::observe_shadows;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crossbeam::utils::CachePadded;
use parking_lot::Mutex;
use std::borrow::Cow;

pub use bucket::{BucketParams, Verdict, try_take};
use global::ClusterLink;
#[cfg(test)]
pub use global::NullSink;
pub use rules::{Rule, RuleActivity, RuleSet, RuleSetError};
pub use shares::Collected;
use shares::params_of;
pub use table::ShardedTable;

use crate::protocol::{Decision, Outcome, Priority, RuleCounters, RuleSource};
use crate::rule::{MAX_NAME_BYTES, RuleSpec};

/// A monotonic clock in nanoseconds since the daemon started.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    epoch: Instant,
}

impl MonotonicClock {
    pub fn new() -> MonotonicClock {
        MonotonicClock {
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the clock was created.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The instant a [`now_ns`](Self::now_ns) reading stands for.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + std::time::Duration::from_nanos(ns)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

/// What to answer when no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

/// Sizing of the limiter.
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Shards of the bucket table (rounded to a power of two).
    pub shards: usize,
    /// Hard cap on buckets.
    pub max_buckets: usize,
    /// Cap on the table's memory in bytes (entries, hash table slots and
    /// boxed keys), enforced by evicting least recently used buckets.
    pub max_table_bytes: usize,
    pub default_action: DefaultAction,
}

/// An acquire that cannot be decided (as opposed to a denial).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    #[error("{0} is empty; name the {0}")]
    Empty(&'static str),
    #[error("{field} is {len} bytes long; the maximum is {MAX_NAME_BYTES} bytes")]
    TooLong { field: &'static str, len: usize },
    #[error(
        "cost {cost} exceeds the {burst} tokens rule {rule:?} lets this priority take (its burst, less the priority's reserve), so it can never be allowed; lower the cost, raise the burst or use a higher priority"
    )]
    CostExceedsBurst {
        cost: u64,
        burst: u64,
        /// Boxed: errors are rare, and a small `Err` keeps `Result` small.
        rule: Box<str>,
    },
}

/// Decisions not made by any rule.
#[derive(Debug, Default)]
struct Unmatched {
    stripes: [CachePadded<AtomicU64>; rules::STRIPES],
}

/// Rule counts beyond one per request: a request that stacked rules decide
/// is counted by each enforcing rule that admitted it (or each that denied
/// it); the totals of requests subtract the extra ones. (Allowed, rejected,
/// bypassed.)
#[derive(Debug, Default)]
struct Overcount {
    stripes: [CachePadded<[AtomicU64; 3]>; rules::STRIPES],
}

/// The limiter: rules plus the bucket table.
#[derive(Debug)]
pub struct Limiter {
    table: ShardedTable,
    /// The current snapshot, for admin reads and rebuilds (never the hot path).
    rules: Mutex<Arc<RuleSet>>,
    default_action: DefaultAction,
    unmatched: Unmatched,
    overcount: Overcount,
    /// The lease coordinator's side, when limits are shared through etcd.
    link: OnceLock<Arc<ClusterLink>>,
}

impl Limiter {
    pub fn new(config: LimiterConfig) -> Limiter {
        Limiter {
            table: ShardedTable::new(config.shards, config.max_buckets, config.max_table_bytes),
            rules: Mutex::new(Arc::new(RuleSet::default())),
            default_action: config.default_action,
            unmatched: Unmatched::default(),
            overcount: Overcount::default(),
            link: OnceLock::new(),
        }
    }

    /// Connects global rules to a lease coordinator (once, before any global
    /// rule is installed).
    pub fn attach(&self, link: Arc<ClusterLink>) {
        let _ = self.link.set(link);
    }

    /// The coordinator link, if any.
    pub fn link(&self) -> Option<&Arc<ClusterLink>> {
        self.link.get()
    }

    /// Decides one request at time `now` (ns of [`MonotonicClock`]) and
    /// returns the decision with its own copy of the rule id (for tests and
    /// tools; the daemon uses [`Limiter::decide`]).
    ///
    /// # Errors
    /// As [`Limiter::decide`].
    pub fn acquire(
        &self,
        client: &str,
        resource: &str,
        cost: u64,
        priority: Priority,
        now: u64,
    ) -> Result<Decision<'static>, AcquireError> {
        self.decide(client, resource, cost, priority, now, |d| {
            d.clone().into_owned()
        })
    }

    /// Decides one request at time `now` and hands the decision to `answer`,
    /// which runs with the shard still locked so that the decision can borrow
    /// the rule id: nothing is copied or reference-counted. Keep `answer`
    /// short (encoding a response is fine); its result is returned.
    ///
    /// # Errors
    /// Empty or overlong names, or a cost above the matching rule's bucket
    /// size (`answer` is not called then).
    #[inline]
    pub fn decide<R>(
        &self,
        client: &str,
        resource: &str,
        cost: u64,
        priority: Priority,
        now: u64,
        answer: impl FnOnce(&Decision<'_>) -> R,
    ) -> Result<R, AcquireError> {
        check_name("client", client)?;
        check_name("resource", resource)?;
        let hash = self.table.hash(client, resource);
        let stripe = self.table.shard_of(hash);
        let mut guard = self.table.lock(stripe);
        if guard.stacked {
            // Some rule is keyed otherwise: every applicable rule decides.
            let rules = Arc::clone(&guard.rules);
            drop(guard);
            return stack::decide(
                self,
                &rules,
                (client, resource),
                cost,
                priority,
                now,
                answer,
            );
        }
        let table::Shard {
            buckets,
            rules,
            book,
            ..
        } = &mut *guard;
        let entry = match buckets.find(hash, client, resource) {
            Some(entry) if entry.generation == rules.generation as u32 => entry,
            Some(entry) => match rules.resolve(client, resource) {
                Some(rule) => {
                    self.adopt(entry, rule, book, hash, (client, resource), now);
                    entry.generation = rules.generation as u32;
                    entry
                }
                None => {
                    if let Some(gone) = buckets.remove(hash, client, resource) {
                        self.release(&gone);
                    }
                    drop(guard);
                    return Ok(answer(&self.unmatched(stripe)));
                }
            },
            None => match rules.resolve(client, resource) {
                Some(rule) => {
                    check_cost(rule, cost, priority)?;
                    let generation = rules.generation as u32;
                    self.create(
                        buckets,
                        book,
                        rule,
                        generation,
                        hash,
                        (client, resource),
                        now,
                    )
                }
                None => {
                    drop(guard);
                    return Ok(answer(&self.unmatched(stripe)));
                }
            },
        };
        let rule = &entry.rule;
        check_cost(rule, cost, priority)?;
        let link = if rule.global.is_some() {
            self.link.get()
        } else {
            None
        };
        // As `charge` does, without its TAT-before (which cost the one-rule
        // path 12% on a hot key).
        let verdict = match link {
            Some(link) => {
                global::spend(
                    global::Slot {
                        tat: &mut entry.tat,
                        share: &mut entry.share,
                        aux: &mut entry.aux,
                    },
                    rule,
                    book,
                    hash,
                    (client, resource),
                    cost,
                    priority,
                    now,
                    link,
                )
                .0
            }
            None => try_take(&mut entry.tat, &rule.params, now, cost, priority),
        };
        entry.last_used = table::tick(now);
        rule.activity.record(stripe, verdict.outcome, now);
        Ok(answer(&Decision {
            outcome: verdict.outcome,
            limit: rule.spec.limit,
            remaining: verdict.remaining,
            retry_after_ns: verdict.retry_after_ns,
            reset_after_ns: verdict.reset_after_ns,
            rule: Cow::Borrowed(rule.id()),
        }))
    }

    /// A bucket resolved to another rule, or to an edited version of its
    /// own, moves to `rule`: another rule's bucket starts as new (its share
    /// under the old one released), an edited local rule keeps what was
    /// spent, an edited global one keeps its tokens (capped at its depth).
    #[inline(never)]
    fn adopt(
        &self,
        entry: &mut table::Entry,
        rule: &Arc<Rule>,
        book: &book::ShareBook,
        hash: u64,
        (client, resource): (&str, &str),
        now: u64,
    ) {
        if Arc::ptr_eq(rule, &entry.rule) {
            return;
        }
        let same_rule = rule.id() == entry.rule.id();
        if !same_rule {
            // Another rule decides this bucket now: its
            // recorded share under the old one is not used.
            self.release(entry);
        }
        let old = params_of(entry);
        let (new, fresh) = if rule.global.is_some() {
            let (interval, depth, recorded, fresh) =
                global::share_of(rule, book, hash, client, resource, now);
            // The demand seen so far, and whether the
            // coordinator watches the bucket, carry over.
            let before = global::ShareAux::unpack(entry.aux);
            let same = entry.rule.global.is_some() && same_rule;
            let mut aux = global::ShareAux {
                depth,
                recorded,
                wanted: before.wanted,
                start: before.start,
                signaled: same && before.signaled,
                ..Default::default()
            };
            if !same {
                aux.restart(now);
            }
            entry.aux = aux.pack();
            entry.share = interval;
            ((interval, depth), fresh)
        } else {
            entry.aux = 0;
            entry.share = 0;
            ((rule.params.interval_ns, rule.params.capacity), 0)
        };
        entry.tat = if !same_rule {
            // Another rule: its own bucket, as new.
            fresh
        } else if rule.global.is_none() && entry.rule.global.is_none() {
            // An edited local rule keeps what was spent
            // (raising it gives the new room at once).
            bucket::rescale(entry.tat, &entry.rule.params, &rule.params, now)
        } else {
            // An edited global rule keeps the bucket's tokens
            // (capped at its new depth): new room starts
            // empty, as shares require.
            bucket::retune(entry.tat, old, new, now)
        };
        entry.rule = Arc::clone(rule);
    }

    /// A new bucket of `rule` named (client, resource) (full, or at its
    /// global share), evicting least recently used ones if the shard is at
    /// its cap.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn create<'b>(
        &self,
        buckets: &'b mut table::Buckets,
        book: &book::ShareBook,
        rule: &Arc<Rule>,
        generation: u32,
        hash: u64,
        (client, resource): (&str, &str),
        now: u64,
    ) -> &'b mut table::Entry {
        let (entry, evicted) = buckets.insert(
            hash,
            client,
            resource,
            Arc::clone(rule),
            generation,
            now,
            |gone| self.release(gone),
        );
        if evicted > 0 {
            self.table
                .evictions
                .lru
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
        if entry.rule.global.is_some() {
            global::init(
                global::Slot {
                    tat: &mut entry.tat,
                    share: &mut entry.share,
                    aux: &mut entry.aux,
                },
                &entry.rule,
                book,
                hash,
                (client, resource),
                now,
            );
        }
        entry
    }

    /// Takes `cost` from the bucket under its rule: the verdict, and the
    /// bucket's TAT just before the take (restoring it undoes the take).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn charge(
        &self,
        entry: &mut table::Entry,
        book: &book::ShareBook,
        hash: u64,
        names: (&str, &str),
        cost: u64,
        priority: Priority,
        now: u64,
    ) -> (Verdict, u64) {
        let rule = &entry.rule;
        let link = if rule.global.is_some() {
            self.link.get()
        } else {
            None
        };
        let out = match link {
            Some(link) => global::spend(
                global::Slot {
                    tat: &mut entry.tat,
                    share: &mut entry.share,
                    aux: &mut entry.aux,
                },
                rule,
                book,
                hash,
                names,
                cost,
                priority,
                now,
                link,
            ),
            None => {
                let before = entry.tat;
                (
                    try_take(&mut entry.tat, &rule.params, now, cost, priority),
                    before,
                )
            }
        };
        entry.last_used = table::tick(now);
        out
    }

    fn unmatched(&self, stripe: usize) -> Decision<'static> {
        self.unmatched.stripes[stripe % rules::STRIPES].fetch_add(1, Ordering::Relaxed);
        self.default_decision()
    }

    /// The default action's answer to a request no rule matched.
    fn default_decision(&self) -> Decision<'static> {
        Decision {
            outcome: match self.default_action {
                DefaultAction::Allow => Outcome::Allowed,
                DefaultAction::Deny => Outcome::Denied,
            },
            limit: 0,
            remaining: 0,
            retry_after_ns: 0,
            reset_after_ns: 0,
            rule: Cow::Borrowed(""),
        }
    }

    /// Idle eviction of one shard (the sweeper's step); leases of evicted
    /// global buckets go back to the coordinator.
    pub fn evict_idle(&self, shard: usize, now: u64) -> usize {
        self.table.evict_idle(shard, now, |gone| self.release(gone))
    }

    /// Replaces the rules with `specs` (all or nothing) and returns the new
    /// snapshot. Buckets of unchanged rules are untouched.
    ///
    /// # Errors
    /// Any invalid rule, duplicate id or ambiguous pair; the rules in force stay.
    pub fn set_rules(
        &self,
        specs: Vec<(RuleSpec, RuleSource)>,
        now: u64,
    ) -> Result<Arc<RuleSet>, RuleSetError> {
        let mut current = self.rules.lock();
        let next = Arc::new(RuleSet::build(specs, &current, now)?);
        if let Some(link) = self.link.get() {
            // New global rules get their implicit share and fallback before
            // any request sees them (kept rules keep theirs).
            for rule in next.iter() {
                if current.get(rule.id()).is_none_or(|r| !Arc::ptr_eq(r, rule)) {
                    link.plan(rule);
                }
            }
        }
        self.table.install_rules(&next);
        *current = Arc::clone(&next);
        Ok(next)
    }

    /// Checks `specs` as [`Limiter::set_rules`] would, without installing them.
    ///
    /// # Errors
    /// As [`Limiter::set_rules`].
    pub fn check_rules(
        &self,
        specs: Vec<(RuleSpec, RuleSource)>,
        now: u64,
    ) -> Result<(), RuleSetError> {
        RuleSet::build(specs, &self.rules.lock(), now).map(drop)
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        Arc::clone(&self.rules.lock())
    }

    /// The bucket table (for the sweeper and stats).
    pub fn table(&self) -> &ShardedTable {
        &self.table
    }

    /// Requests answered by the default action.
    pub fn unmatched_total(&self) -> u64 {
        self.unmatched
            .stripes
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests decided by rules in force: (allowed, rejected, bypassed).
    /// Shadow rules' counts are not decisions; a request stacked rules
    /// decided counts once. (A deleted rule's counts leave the totals, as
    /// its row leaves the per-rule ones.)
    pub fn decision_totals(&self) -> (u64, u64, u64) {
        let (mut a, mut r, mut b) = (0u64, 0u64, 0u64);
        for rule in self.rules().iter().filter(|r| !r.spec.shadow) {
            let (x, y, z) = rule.activity.totals();
            a += x;
            r += y;
            b += z;
        }
        let extra = |k: usize| -> u64 {
            self.overcount
                .stripes
                .iter()
                .map(|s| s[k].load(Ordering::Relaxed))
                .sum()
        };
        (
            a.saturating_sub(extra(0)),
            r.saturating_sub(extra(1)),
            b.saturating_sub(extra(2)),
        )
    }

    /// Counts `n` rule counts of `outcome` beyond one for a stacked request.
    fn overcounted(&self, stripe: usize, outcome: Outcome, n: u64) {
        if n == 0 {
            return;
        }
        let slot = match outcome {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::Bypassed => 2,
        };
        self.overcount.stripes[stripe % rules::STRIPES][slot].fetch_add(n, Ordering::Relaxed);
    }

    /// Per-rule counters of the rules in force.
    pub fn rule_counters(&self) -> Vec<RuleCounters> {
        self.rules()
            .iter()
            .map(|r| {
                let (allowed, rejected, bypassed) = r.activity.totals();
                RuleCounters {
                    id: r.id().to_owned(),
                    allowed,
                    rejected,
                    bypassed,
                }
            })
            .collect()
    }
}

fn check_name(field: &'static str, name: &str) -> Result<(), AcquireError> {
    if name.is_empty() {
        return Err(AcquireError::Empty(field));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(AcquireError::TooLong {
            field,
            len: name.len(),
        });
    }
    Ok(())
}

#[inline]
fn check_cost(rule: &Rule, cost: u64, priority: Priority) -> Result<(), AcquireError> {
    // What the priority may ever take: the bucket less its reserve. A cost
    // above it would be denied for good with a retry_after that lies.
    let usable = rule.params.usable(priority);
    if cost > usable {
        return Err(AcquireError::CostExceedsBurst {
            cost,
            burst: usable,
            rule: rule.id().into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    fn limiter(max_buckets: usize, default_action: DefaultAction) -> Limiter {
        Limiter::new(LimiterConfig {
            shards: 4,
            max_buckets,
            max_table_bytes: usize::MAX,
            default_action,
        })
    }

    fn rule(id: &str, client: &str, resource: &str, limit: u64) -> (RuleSpec, RuleSource) {
        (
            RuleSpec::new(id, client, resource, limit, Duration::from_secs(1)),
            RuleSource::Runtime,
        )
    }

    fn outcome(l: &Limiter, client: &str, now: u64) -> Outcome {
        l.acquire(client, "api", 1, Priority::Normal, now)
            .unwrap()
            .outcome
    }

    #[test]
    fn buckets_are_per_client_and_resource() {
        let l = limiter(1000, DefaultAction::Allow);
        l.set_rules(vec![rule("r", "*", "*", 2)], 0).unwrap();
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Denied);
        assert_eq!(outcome(&l, "b", SEC), Outcome::Allowed);
        let d = l.acquire("a", "other", 1, Priority::Normal, SEC).unwrap();
        assert_eq!(
            (d.outcome, d.rule.as_ref(), d.limit),
            (Outcome::Allowed, "r", 2)
        );
        assert_eq!(l.table().len(), 3);
    }

    #[test]
    fn default_action_applies_when_no_rule_matches() {
        let l = limiter(1000, DefaultAction::Deny);
        l.set_rules(vec![rule("r", "bob", "*", 2)], 0).unwrap();
        let d = l.acquire("alice", "api", 1, Priority::Normal, 0).unwrap();
        assert_eq!((d.outcome, d.rule.as_ref()), (Outcome::Denied, ""));
        assert_eq!(l.unmatched_total(), 1);
        assert_eq!(l.table().len(), 0, "unmatched requests create no bucket");
    }

    #[test]
    fn cost_above_what_the_priority_may_take_is_an_error() {
        // Burst 10, low priority keeps 50% in reserve: low may take 5 at most.
        let l = limiter(1000, DefaultAction::Allow);
        let (mut spec, source) = rule("r", "*", "*", 10);
        spec.reserve = crate::rule::Reserve {
            high: 0,
            normal: 0,
            low: 500,
        };
        l.set_rules(vec![(spec, source)], 0).unwrap();
        let e = l.acquire("a", "x", 6, Priority::Low, 0).unwrap_err();
        assert!(
            matches!(
                e,
                AcquireError::CostExceedsBurst {
                    cost: 6,
                    burst: 5,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            l.acquire("a", "x", 5, Priority::Low, 0)
                .unwrap()
                .is_allowed()
        );
        assert!(
            l.acquire("a", "x", 5, Priority::Normal, 0)
                .unwrap()
                .is_allowed()
        );
    }

    #[test]
    fn cost_above_burst_is_an_error_not_a_denial() {
        let l = limiter(1000, DefaultAction::Allow);
        l.set_rules(vec![rule("r", "*", "*", 5)], 0).unwrap();
        let e = l.acquire("a", "x", 6, Priority::Normal, 0).unwrap_err();
        assert!(matches!(
            e,
            AcquireError::CostExceedsBurst {
                cost: 6,
                burst: 5,
                ..
            }
        ));
        assert_eq!(l.table().len(), 0);
        assert!(matches!(
            l.acquire("", "x", 1, Priority::Normal, 0),
            Err(AcquireError::Empty("client"))
        ));
    }

    #[test]
    fn a_global_bucket_keeps_its_tokens_across_a_rule_change() {
        let l = limiter(1000, DefaultAction::Allow);
        let link = Arc::new(ClusterLink::new(NullSink, crate::rule::OnFailure::Closed));
        link.set_valid_until(u64::MAX);
        l.attach(Arc::clone(&link));
        let global = |limit| {
            let mut spec = RuleSpec::new("g", "*", "*", limit, Duration::from_secs(1));
            spec.scope = crate::rule::Scope::Global;
            (spec, RuleSource::Etcd)
        };
        let operate = |l: &Limiter| {
            let r = Arc::clone(l.rules().get("g").unwrap());
            r.global.as_ref().unwrap().set_count(1, &r.params, 0);
        };
        l.set_rules(vec![global(10)], 0).unwrap();
        operate(&l);
        for _ in 0..10 {
            assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        }
        assert_eq!(outcome(&l, "a", SEC), Outcome::Denied);
        // Raised to 20/s: the bucket is still empty (no burst from the
        // edit), and refills at the new rate.
        l.set_rules(vec![global(20)], SEC).unwrap();
        operate(&l);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Denied);
        assert_eq!(outcome(&l, "a", SEC + SEC / 20), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC + SEC / 20), Outcome::Denied);
    }

    /// A limiter with shares in force and global rule "g" (`limit` per
    /// `window`) operated by `n` daemons.
    fn global_limiter(limit: u64, window: Duration, n: u32) -> Limiter {
        let l = limiter(1000, DefaultAction::Allow);
        let link = Arc::new(ClusterLink::new(NullSink, crate::rule::OnFailure::Closed));
        link.set_valid_until(u64::MAX);
        l.attach(link);
        let mut spec = RuleSpec::new("g", "*", "*", limit, window);
        spec.scope = crate::rule::Scope::Global;
        l.set_rules(vec![(spec, RuleSource::Etcd)], 0).unwrap();
        let r = Arc::clone(l.rules().get("g").unwrap());
        r.global.as_ref().unwrap().set_count(n, &r.params, 0);
        l
    }

    #[test]
    fn a_request_newer_than_the_collection_is_not_idle_time() {
        use super::key::BucketKey;
        let l = global_limiter(100, Duration::from_secs(1), 1);
        let key = BucketKey::new("a", "api");
        let hash = l.table().hash_key("g", &key);
        // A request at 1 s + 50 ms, collected with a clock read at 1 s.
        assert_eq!(outcome(&l, "a", SEC + SEC / 20), Outcome::Allowed);
        let c = l.collect("g", &key, hash, SEC).unwrap();
        assert_eq!(c.idle_ns, 0);
        assert_eq!(c.wanted, 1);
        assert!(c.span_ns < SEC, "span {}", c.span_ns);
        // Collected later, it has been idle since the request.
        assert_eq!(outcome(&l, "a", 2 * SEC), Outcome::Allowed);
        let c = l.collect("g", &key, hash, 2 * SEC + SEC / 5).unwrap();
        // (in ticks of 16.8 ms)
        let tick = 1u64 << table::TICK_SHIFT;
        assert!(
            c.idle_ns + tick >= SEC / 5 && c.idle_ns <= SEC / 5 + tick,
            "idle {}",
            c.idle_ns
        );
    }

    #[test]
    fn a_lowered_share_gives_back_its_tokens_with_or_without_a_bucket() {
        use super::book::Recorded;
        use super::key::BucketKey;
        use crate::daemon::lease::share::SCALE;
        // 2 per hour, burst 2, five daemons: no implicit share holds a token.
        let l = global_limiter(2, Duration::from_secs(3600), 5);
        let held = Recorded {
            rate: SCALE / 5,
            depth: 1,
            counted_in: 2,
        };
        let (one, none) = (Some(held), Some(Recorded { depth: 0, ..held }));
        for (client, with_bucket) in [("seen", true), ("unseen", false)] {
            let key = BucketKey::new(client, "api");
            let hash = l.table().hash_key("g", &key);
            if with_bucket {
                assert_eq!(outcome(&l, client, SEC), Outcome::Denied);
            }
            // Raised to one token taken from the record's pool.
            assert_eq!(l.set_share("g", &key, hash, one, 0, 1, 2 * SEC), 0);
            // Lowered before it was used: the token goes back, it is not
            // lost to every daemon.
            assert_eq!(
                l.set_share("g", &key, hash, none, 0, 0, 3 * SEC),
                1,
                "{client}"
            );
        }
        // A token spent is not given back twice.
        let key = BucketKey::new("spent", "api");
        let hash = l.table().hash_key("g", &key);
        assert_eq!(l.set_share("g", &key, hash, one, 0, 1, 2 * SEC), 0);
        assert_eq!(outcome(&l, "spent", 2 * SEC), Outcome::Allowed);
        assert_eq!(l.set_share("g", &key, hash, none, 0, 0, 3 * SEC), 0);
    }

    #[test]
    fn rule_changes_apply_to_existing_buckets() {
        let l = limiter(1000, DefaultAction::Allow);
        l.set_rules(vec![rule("r", "*", "*", 1)], 0).unwrap();
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Denied);
        // Raising the limit keeps the consumption but gives the new headroom.
        l.set_rules(vec![rule("r", "*", "*", 3)], SEC).unwrap();
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Denied);
        // A more specific new rule takes over with a fresh bucket.
        l.set_rules(vec![rule("r", "*", "*", 3), rule("a", "a", "*", 1)], SEC)
            .unwrap();
        let d = l.acquire("a", "api", 1, Priority::Normal, SEC).unwrap();
        assert_eq!((d.outcome, d.rule.as_ref()), (Outcome::Allowed, "a"));
        // Deleting every rule falls back to the default and drops the bucket.
        l.set_rules(vec![], SEC).unwrap();
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(l.table().len(), 0);
    }

    #[test]
    fn invalid_rule_sets_leave_the_rules_in_force() {
        let l = limiter(1000, DefaultAction::Allow);
        l.set_rules(vec![rule("r", "*", "*", 1)], 0).unwrap();
        let bad = vec![rule("x", "a", "b", 1), rule("y", "a", "b", 2)];
        assert!(l.set_rules(bad, 0).is_err());
        assert_eq!(l.rules().len(), 1);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Allowed);
        assert_eq!(outcome(&l, "a", SEC), Outcome::Denied);
    }

    #[test]
    fn bucket_count_never_exceeds_the_cap() {
        let l = limiter(256, DefaultAction::Allow);
        l.set_rules(vec![rule("r", "*", "*", 1)], 0).unwrap();
        for i in 0..10_000u64 {
            let c = format!("client-{i}");
            l.acquire(&c, "x", 1, Priority::Normal, i).unwrap();
            assert!(l.table().len() <= 256);
        }
        assert!(l.table().evictions.lru.load(Ordering::Relaxed) >= 10_000 - 256);
    }

    #[test]
    fn counters_follow_decisions() {
        let l = limiter(1000, DefaultAction::Allow);
        l.set_rules(vec![rule("r", "*", "*", 1)], 0).unwrap();
        outcome(&l, "a", SEC);
        outcome(&l, "a", SEC);
        l.acquire("a", "api", 1, Priority::Critical, SEC).unwrap();
        let c = &l.rule_counters()[0];
        assert_eq!((c.allowed, c.rejected, c.bypassed), (1, 1, 1));
    }
}
