//! Global rules on the hot path. A bucket of a global rule is a local GCRA
//! bucket at this daemon's **share** of the rule (a fraction of its rate and
//! some tokens of its burst), leased through etcd by the lease coordinator
//! (`daemon::lease`): the implicit share `1/n` of its rule when the bucket
//! has no record in etcd, or what the record gives this daemon (kept in the
//! shard's [`ShareBook`]). Deciding is the same arithmetic as a local rule's.
//!
//! The shares of all daemons sum to at most the rule (see
//! `lease::share`), so a global rule needs no etcd work per request and
//! none per token: only when a bucket's demand outgrows its share does the
//! bucket ask the coordinator, through a [`LeaseSink`], without waiting.
//!
//! Shares are in force only until `valid_until` (this daemon's monotonic
//! deadline, set before its etcd lease can expire): past it, the rule's
//! `on_failure` decides. Changing a bucket's parameters keeps its tokens
//! (capped at the new depth): lowering a share takes effect at the next
//! decision, room added by raising it starts empty, and neither an outage
//! nor its end hands out a burst.
//!
//! No I/O and no `.await` here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use super::book::ShareBook;
use super::bucket::{self, BucketParams, Verdict};
use super::key::BucketKey;
use super::rules::Rule;
use crate::protocol::{Outcome, Priority};
use crate::rule::{OnFailure, RuleSpec};

/// The lease state of one global bucket, packed into its `aux` word: depth
/// of its current parameters (41 bits), tokens asked for since `start`
/// (14 bits, saturating), `start` (6 bits of a coarse clock) and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShareAux {
    /// Tokens of depth of the bucket's current parameters (its `share` word
    /// holds their ns per token).
    pub depth: u64,
    /// Tokens asked for (allowed or not) since `start`: the bucket's demand.
    pub wanted: u32,
    /// When `wanted` started counting, in ticks of [`table::tick`] modulo
    /// 64 (16.8 ms each). The count restarts when it is older than
    /// [`WINDOW_TICKS`], so its span is always known: the coordinator can
    /// read a bucket's demand the moment it looks, without watching first.
    pub start: u8,
    /// The parameters are a recorded share (the shard's book), not the
    /// rule's implicit one.
    pub recorded: bool,
    /// The parameters are the `on_failure = "local"` fallback's.
    pub fallback: bool,
    /// The coordinator was told this bucket wants more, and is watching it.
    pub signaled: bool,
}

const DEPTH_BITS: u32 = 41;
const DEPTH_MAX: u64 = (1 << DEPTH_BITS) - 1;
const WANTED_BITS: u32 = 14;
const WANTED_MAX: u32 = (1 << WANTED_BITS) - 1;
const START_MASK: u32 = 63;
/// A demand count older than this many ticks (0.8 s) starts over.
pub const WINDOW_TICKS: u32 = 48;

impl ShareAux {
    #[inline]
    pub fn unpack(word: u64) -> ShareAux {
        ShareAux {
            depth: word & DEPTH_MAX,
            wanted: ((word >> DEPTH_BITS) as u32) & WANTED_MAX,
            start: ((word >> (DEPTH_BITS + WANTED_BITS)) as u32 & START_MASK) as u8,
            recorded: (word >> 61) & 1 == 1,
            fallback: (word >> 62) & 1 == 1,
            signaled: (word >> 63) & 1 == 1,
        }
    }

    #[inline]
    pub fn pack(self) -> u64 {
        self.depth.min(DEPTH_MAX)
            | (u64::from(self.wanted.min(WANTED_MAX)) << DEPTH_BITS)
            | (u64::from(u32::from(self.start) & START_MASK) << (DEPTH_BITS + WANTED_BITS))
            | (u64::from(self.recorded) << 61)
            | (u64::from(self.fallback) << 62)
            | (u64::from(self.signaled) << 63)
    }

    /// Ticks since `start` at `now` (ns).
    #[inline]
    pub fn age(self, now: u64) -> u32 {
        super::table::tick(now).wrapping_sub(u32::from(self.start)) & START_MASK
    }

    /// Restarts the demand count at `now`.
    #[inline]
    pub fn restart(&mut self, now: u64) {
        self.wanted = 0;
        self.start = (super::table::tick(now) & START_MASK) as u8;
    }

    #[inline]
    fn want(&mut self, cost: u64, now: u64) {
        if self.age(now) >= WINDOW_TICKS {
            self.restart(now);
        }
        self.wanted = (u64::from(self.wanted) + cost).min(u64::from(WANTED_MAX)) as u32;
    }
}

/// State of the etcd cluster, for reports (the hot path only reads
/// [`ClusterLink::shares_valid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum EtcdState {
    /// Calls succeed and shares are in force.
    Healthy = 0,
    /// Calls fail, but shares are still in force (until their deadline).
    Suspect = 1,
    /// Shares lapsed: global rules follow their `on_failure` policy.
    Degraded = 2,
    /// Reachable again: registering, shares not in force yet.
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

/// How the hot path (and eviction) reaches the lease coordinator: calls
/// return at once, never wait; `false` means the message was not taken (a
/// full queue) and the caller acts as if it was never sent.
pub trait LeaseSink: Send + Sync + std::fmt::Debug {
    /// A global rule is being installed: set its implicit share and fallback
    /// for the current membership, so its first request can use them.
    fn plan(&self, rule: &Rule);

    /// The bucket of (rule, key) wants more than its share: it denied a
    /// request, or it runs low.
    fn unmet(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64) -> bool;

    /// A bucket with a recorded share is gone (evicted, or its rule
    /// changed): its demand is zero now.
    fn released(&self, rule: &Arc<Rule>, key: BucketKey) -> bool;
}

/// What the hot path shares with the lease coordinator.
#[derive(Debug)]
pub struct ClusterLink {
    state: AtomicU8,
    sink: Box<dyn LeaseSink>,
    /// `on_failure` of global rules that set none.
    pub default_on_failure: OnFailure,
    /// Events dropped because the coordinator's queue was full.
    pub dropped_events: AtomicU64,
    /// Until when (ns of the daemon's `MonotonicClock`) this daemon's shares
    /// are in force: before its etcd lease can expire. 0: not in force.
    valid_until: AtomicU64,
}

impl ClusterLink {
    pub fn new(sink: impl LeaseSink + 'static, default_on_failure: OnFailure) -> ClusterLink {
        ClusterLink {
            state: AtomicU8::new(EtcdState::Suspect as u8),
            sink: Box::new(sink),
            default_on_failure,
            dropped_events: AtomicU64::new(0),
            valid_until: AtomicU64::new(0),
        }
    }

    /// Whether shares are in force at `now`.
    #[inline]
    pub fn shares_valid(&self, now: u64) -> bool {
        now < self.valid_until.load(Ordering::Acquire)
    }

    /// Until when shares are in force (ns of the monotonic clock).
    pub fn valid_until(&self) -> u64 {
        self.valid_until.load(Ordering::Acquire)
    }

    /// Puts shares in force until `until`, or (0) out of force at once.
    pub fn set_valid_until(&self, until: u64) {
        self.valid_until.store(until, Ordering::Release);
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

    /// Tells the coordinator a bucket wants more; `false` (counted) if its
    /// queue is full (the bucket asks again at its next shortfall).
    pub fn unmet(&self, rule: &Arc<Rule>, key: BucketKey, hash: u64) -> bool {
        self.counted(self.sink.unmet(rule, key, hash))
    }

    /// Tells the coordinator a bucket with a recorded share is gone.
    pub fn released(&self, rule: &Arc<Rule>, key: BucketKey) -> bool {
        self.counted(self.sink.released(rule, key))
    }

    fn counted(&self, sent: bool) -> bool {
        if !sent {
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// Per global rule, set by the coordinator and read by the hot path.
#[derive(Debug)]
pub struct GlobalRuleState {
    /// The implicit share: this daemon's operating count `n` (16 bits; 0:
    /// none) and `floor(burst / n)` (the rest), in one word so a reader never
    /// sees one without the other.
    implicit: AtomicU64,
    /// The TAT a new bucket on the implicit share starts from: 0 (full),
    /// or after a raise, empty of the new room as of the raise.
    fresh_tat: AtomicU64,
    /// The count was set once: a rule new on this daemon starts full (no
    /// bucket of it ever admitted here), a later raise does not.
    planned: AtomicBool,
    /// Live daemons (`N`), for reports and the fallback.
    pub members: AtomicU64,
    /// The local fallback bucket used with `on_failure = "local"`.
    pub fallback_interval_ns: AtomicU64,
    pub fallback_depth: AtomicU64,
}

impl GlobalRuleState {
    pub fn new(spec: &RuleSpec) -> GlobalRuleState {
        let p = BucketParams::from_spec(spec);
        GlobalRuleState {
            // No share until the coordinator plans the rule.
            implicit: AtomicU64::new(0),
            fresh_tat: AtomicU64::new(0),
            planned: AtomicBool::new(false),
            members: AtomicU64::new(1),
            fallback_interval_ns: AtomicU64::new(p.interval_ns),
            fallback_depth: AtomicU64::new(p.capacity),
        }
    }

    /// This daemon's operating count for the rule (0: no implicit share).
    pub fn count(&self) -> u32 {
        (self.implicit.load(Ordering::Acquire) & 0xffff) as u32
    }

    /// The implicit share's bucket: (ns per token, depth).
    #[inline]
    pub fn implicit_bucket(&self, rule: &BucketParams) -> (u64, u64) {
        let word = self.implicit.load(Ordering::Acquire);
        let n = word & 0xffff;
        if n == 0 {
            return (u64::MAX, 0);
        }
        (rule.interval_ns.saturating_mul(n), word >> 16)
    }

    /// Sets the implicit share to `1/n` at `now`. A raise (a deeper bucket)
    /// makes new buckets start empty of the new room, except for a rule new
    /// here (installed while this daemon operates: none of its buckets
    /// admitted anything here yet).
    pub fn set_count(&self, n: u32, rule: &BucketParams, now: u64) {
        let n = n.min(0xffff);
        let old = self.implicit_bucket(rule);
        let (interval, depth) = implicit_bucket(n, rule.interval_ns, rule.capacity);
        let first = !self.planned.swap(true, Ordering::Relaxed);
        if (interval, depth) == old {
            return;
        }
        let fresh = self.fresh_tat.load(Ordering::Relaxed);
        let fresh = if first {
            0
        } else if depth > old.1 {
            // As if every absent bucket were full at the old depth now.
            let full_old = if fresh > now {
                fresh
            } else {
                now.saturating_sub(1)
            };
            bucket::retune(full_old, old, (interval, depth), now)
        } else if fresh > now {
            bucket::retune(fresh, old, (interval, depth), now)
        } else {
            0
        };
        self.fresh_tat.store(fresh, Ordering::Relaxed);
        self.implicit.store(
            u64::from(n) | (depth.min(u64::MAX >> 16) << 16),
            Ordering::Release,
        );
    }

    /// The TAT a new bucket on the implicit share starts from.
    pub(super) fn fresh_tat(&self, now: u64) -> u64 {
        let t = self.fresh_tat.load(Ordering::Relaxed);
        if t > now { t } else { 0 }
    }

    fn fallback_bucket(&self) -> (u64, u64) {
        (
            self.fallback_interval_ns.load(Ordering::Relaxed).max(1),
            self.fallback_depth.load(Ordering::Relaxed).max(1),
        )
    }
}

/// The local bucket of the implicit share `1/n` of a rule with
/// `interval_ns` per token and burst `burst`: (ns per token, depth).
///
/// ```
/// use rld::daemon::limiter::global::implicit_bucket;
/// assert_eq!(implicit_bucket(3, 7, 10), (21, 3));
/// assert_eq!(implicit_bucket(0, 7, 10), (u64::MAX, 0));
/// ```
pub fn implicit_bucket(n: u32, interval_ns: u64, burst: u64) -> (u64, u64) {
    if n == 0 {
        return (u64::MAX, 0);
    }
    (
        interval_ns.max(1).saturating_mul(u64::from(n)),
        burst / u64::from(n),
    )
}

/// A global bucket's words in the table.
pub struct Slot<'a> {
    /// GCRA TAT of the bucket's current parameters.
    pub tat: &'a mut u64,
    /// Ns per token of the current parameters (0: not set yet).
    pub share: &'a mut u64,
    /// The packed [`ShareAux`].
    pub aux: &'a mut u64,
}

/// The parameters a global bucket of `rule` has while shares are in force:
/// its recorded share if the book has one, else the implicit share.
/// (ns per token, depth, recorded, TAT a new bucket starts from).
pub fn share_of(
    rule: &Rule,
    book: &ShareBook,
    hash: u64,
    client: &str,
    resource: &str,
    now: u64,
) -> (u64, u64, bool, u64) {
    let g = rule
        .global
        .as_ref()
        .expect("global rules carry share state");
    match book.get(hash, rule.id(), client, resource) {
        Some(e) => {
            let (interval, depth) = e
                .share
                .bucket(rule.params.interval_ns, rule.params.capacity);
            (
                interval,
                depth,
                true,
                start_tat(e.start, interval, depth, now),
            )
        }
        None => {
            let (interval, depth) = g.implicit_bucket(&rule.params);
            (interval, depth, false, g.fresh_tat(now))
        }
    }
}

/// The TAT of a new bucket of (`interval`, `depth`) that held `tokens` at
/// `at` (and filled since): 0 if it is full by `now`.
pub fn start_tat(start: Option<(u64, u64)>, interval: u64, depth: u64, now: u64) -> u64 {
    let Some((at, tokens)) = start else { return 0 };
    if interval == u64::MAX || depth == 0 {
        return 0;
    }
    let empty_room = u128::from(depth.saturating_sub(tokens)) * u128::from(interval);
    let tat = u64::try_from(u128::from(at) + empty_room).unwrap_or(u64::MAX / 2);
    if tat > now { tat } else { 0 }
}

/// Sets a new global bucket's parameters (called once, when it is created).
pub fn init(
    slot: Slot<'_>,
    rule: &Rule,
    book: &ShareBook,
    hash: u64,
    names: (&str, &str),
    now: u64,
) {
    let (interval, depth, recorded, fresh) = share_of(rule, book, hash, names.0, names.1, now);
    *slot.tat = fresh;
    *slot.share = interval;
    let mut a = ShareAux {
        depth,
        recorded,
        ..ShareAux::default()
    };
    a.restart(now);
    *slot.aux = a.pack();
}

/// Moves a bucket to new parameters, keeping its tokens.
#[inline]
fn move_to(slot: &mut Slot<'_>, a: &mut ShareAux, interval: u64, depth: u64, now: u64) {
    if (*slot.share, a.depth) != (interval, depth) {
        *slot.tat = bucket::retune(*slot.tat, (*slot.share, a.depth), (interval, depth), now);
        *slot.share = interval;
        a.depth = depth;
    }
}

/// Moves a bucket on its rule's implicit share to that share as it is now
/// (after the operating count changed: the tokens it holds stay, up to the
/// new depth, and it refills at the new rate from `now`). A request moves
/// its bucket too; the coordinator moves every bucket this way before it
/// records a higher count, so that a bucket no request touches does not go
/// on refilling at the old rate once another daemon may use the difference.
pub fn follow_implicit(mut slot: Slot<'_>, rule: &Rule, now: u64) {
    let Some(g) = &rule.global else { return };
    let mut a = ShareAux::unpack(*slot.aux);
    if a.recorded || a.fallback {
        return;
    }
    let (interval, depth) = g.implicit_bucket(&rule.params);
    move_to(&mut slot, &mut a, interval, depth, now);
    *slot.aux = a.pack();
}

/// Decides a request on a global rule's bucket: the verdict, and the
/// bucket's TAT just before the take (after any move to new parameters:
/// restoring it undoes the take alone). May send one event to the
/// coordinator (the first shortfall of a bucket it is not watching yet).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn spend(
    mut slot: Slot<'_>,
    rule: &Arc<Rule>,
    book: &ShareBook,
    hash: u64,
    names: (&str, &str),
    cost: u64,
    priority: Priority,
    now: u64,
    link: &ClusterLink,
) -> (Verdict, u64) {
    let g = rule
        .global
        .as_ref()
        .expect("global rules carry share state");
    let mut a = ShareAux::unpack(*slot.aux);
    a.want(cost, now);
    let mut before = *slot.tat;
    let verdict = if link.shares_valid(now) {
        if a.fallback {
            // Shares are back: the bucket's own share, with the tokens it has.
            let (interval, depth, recorded, _) = share_of(rule, book, hash, names.0, names.1, now);
            move_to(&mut slot, &mut a, interval, depth, now);
            a.recorded = recorded;
            a.fallback = false;
        } else if !a.recorded {
            let (interval, depth) = g.implicit_bucket(&rule.params);
            move_to(&mut slot, &mut a, interval, depth, now);
        }
        before = *slot.tat;
        let v = take(&mut slot, &a, rule, cost, priority, now);
        let (interval, depth) = (*slot.share, a.depth);
        // Ask before running dry: denied, or below half the depth.
        let low = v.outcome == Outcome::Denied
            || v.remaining.saturating_mul(2) < depth
            || interval == u64::MAX;
        if low && !a.signaled {
            a.signaled = link.unmet(rule, BucketKey::new(names.0, names.1), hash);
        }
        v
    } else {
        match rule.spec.on_failure.unwrap_or(link.default_on_failure) {
            OnFailure::Open => {
                // Admitted, and drawn from the bucket as far as it goes, so
                // that the end of the outage brings no burst.
                let v = take(&mut slot, &a, rule, cost, Priority::Critical, now);
                Verdict {
                    outcome: Outcome::Allowed,
                    ..v
                }
            }
            OnFailure::Closed if priority == Priority::Critical => {
                take(&mut slot, &a, rule, cost, priority, now)
            }
            OnFailure::Closed => denied(rule, cost),
            OnFailure::Local => {
                let (interval, depth) = g.fallback_bucket();
                move_to(&mut slot, &mut a, interval, depth, now);
                a.fallback = true;
                before = *slot.tat;
                take(&mut slot, &a, rule, cost, priority, now)
            }
        }
    };
    *slot.aux = a.pack();
    (verdict, before)
}

/// Takes `cost` from the bucket's current parameters.
#[inline]
fn take(
    slot: &mut Slot<'_>,
    a: &ShareAux,
    rule: &Rule,
    cost: u64,
    priority: Priority,
    now: u64,
) -> Verdict {
    match rule.params.share(*slot.share, a.depth) {
        Some(p) if cost <= p.capacity => bucket::try_take(slot.tat, &p, now, cost, priority),
        Some(p) if priority == Priority::Critical => {
            // More than the share's depth: admitted, the share emptied.
            *slot.tat = now.saturating_add(p.tau_ns.saturating_mul(2));
            Verdict {
                outcome: Outcome::Bypassed,
                remaining: 0,
                retry_after_ns: 0,
                reset_after_ns: p.tau_ns.saturating_mul(2),
            }
        }
        None if priority == Priority::Critical => Verdict {
            outcome: Outcome::Bypassed,
            remaining: 0,
            retry_after_ns: 0,
            reset_after_ns: 0,
        },
        // The share cannot hold this cost (yet): the coordinator is asked
        // for more; the rule's own rate says when to try again.
        _ => denied(rule, cost),
    }
}

fn denied(rule: &Rule, cost: u64) -> Verdict {
    Verdict {
        outcome: Outcome::Denied,
        remaining: 0,
        retry_after_ns: cost.saturating_mul(rule.params.interval_ns),
        reset_after_ns: 0,
    }
}

/// A sink that takes every message and does nothing (tests and benchmarks
/// of code that needs a [`ClusterLink`] but no coordinator).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct NullSink;

impl LeaseSink for NullSink {
    fn plan(&self, _: &Rule) {}
    fn unmet(&self, _: &Arc<Rule>, _: BucketKey, _: u64) -> bool {
        true
    }
    fn released(&self, _: &Arc<Rule>, _: BucketKey) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::limiter::book::{BookEntry, Recorded};
    use crate::protocol::RuleSource;
    use crate::rule::Scope;
    use proptest::prelude::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    #[test]
    fn aux_words_pack_losslessly() {
        for a in [
            ShareAux::default(),
            ShareAux {
                depth: DEPTH_MAX,
                wanted: WANTED_MAX,
                start: 63,
                recorded: true,
                fallback: true,
                signaled: true,
            },
            ShareAux {
                depth: 7,
                wanted: 3,
                start: 5,
                recorded: false,
                fallback: true,
                signaled: false,
            },
        ] {
            assert_eq!(ShareAux::unpack(a.pack()), a);
        }
    }

    fn global_rule(policy: OnFailure, limit: u64, burst: u64) -> Arc<Rule> {
        let mut spec = RuleSpec::new("g", "*", "*", limit, Duration::from_secs(1));
        spec.scope = Scope::Global;
        spec.burst = Some(burst);
        spec.on_failure = Some(policy);
        let set = crate::daemon::limiter::RuleSet::build(
            vec![(spec, RuleSource::Etcd)],
            &Default::default(),
            0,
        )
        .unwrap();
        Arc::clone(set.get("g").unwrap())
    }

    struct Bucket {
        tat: u64,
        share: u64,
        aux: u64,
    }

    impl Bucket {
        fn new(rule: &Rule, book: &ShareBook, now: u64) -> Bucket {
            let mut b = Bucket {
                tat: 0,
                share: 0,
                aux: 0,
            };
            init(
                Slot {
                    tat: &mut b.tat,
                    share: &mut b.share,
                    aux: &mut b.aux,
                },
                rule,
                book,
                0,
                ("c", "r"),
                now,
            );
            b
        }

        fn spend(
            &mut self,
            rule: &Arc<Rule>,
            book: &ShareBook,
            link: &ClusterLink,
            cost: u64,
            priority: Priority,
            now: u64,
        ) -> Outcome {
            spend(
                Slot {
                    tat: &mut self.tat,
                    share: &mut self.share,
                    aux: &mut self.aux,
                },
                rule,
                book,
                0,
                ("c", "r"),
                cost,
                priority,
                now,
                link,
            )
            .0
            .outcome
        }

        fn follow(&mut self, rule: &Rule, now: u64) {
            follow_implicit(
                Slot {
                    tat: &mut self.tat,
                    share: &mut self.share,
                    aux: &mut self.aux,
                },
                rule,
                now,
            );
        }
    }

    fn link_valid() -> ClusterLink {
        let link = ClusterLink::new(NullSink, OnFailure::Local);
        link.set_valid_until(u64::MAX);
        link
    }

    #[test]
    fn the_implicit_share_decides_and_follows_the_count() {
        // 300/s, burst 30, three daemons: 100/s and 10 tokens here.
        let rule = global_rule(OnFailure::Closed, 300, 30);
        let g = rule.global.as_ref().unwrap();
        let book = ShareBook::default();
        let link = link_valid();
        let t0 = 1000 * MS;
        g.set_count(3, &rule.params, 0);
        let mut b = Bucket::new(&rule, &book, t0);
        for _ in 0..10 {
            assert_eq!(
                b.spend(&rule, &book, &link, 1, Priority::Normal, t0),
                Outcome::Allowed
            );
        }
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Normal, t0),
            Outcome::Denied
        );
        // 10 ms (and the rounding up of 1/300 s) is one token at 100/s.
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Normal, t0 + 11 * MS),
            Outcome::Allowed
        );
        // A fourth daemon: 75/s, 7 tokens; the bucket keeps what it holds
        // (almost a token), and refills at 75/s (one per 13.3 ms).
        g.set_count(4, &rule.params, t0 + 20 * MS);
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Normal, t0 + 20 * MS),
            Outcome::Denied
        );
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Normal, t0 + 21 * MS),
            Outcome::Allowed
        );
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Normal, t0 + 33 * MS),
            Outcome::Denied
        );
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Normal, t0 + 35 * MS),
            Outcome::Allowed
        );
    }

    #[test]
    fn a_raised_implicit_share_starts_new_buckets_empty_of_the_new_room() {
        let rule = global_rule(OnFailure::Closed, 300, 30);
        let g = rule.global.as_ref().unwrap();
        let book = ShareBook::default();
        let link = link_valid();
        let t0 = 1000 * MS;
        g.set_count(3, &rule.params, 0);
        // One daemon left: 150/s and 15 tokens, but a bucket created now has
        // the 10 it could have held, and the other 5 come at 150/s.
        g.set_count(2, &rule.params, t0);
        let mut b = Bucket::new(&rule, &book, t0);
        let mut allowed = 0;
        while b.spend(&rule, &book, &link, 1, Priority::Normal, t0) == Outcome::Allowed {
            allowed += 1;
        }
        assert_eq!(allowed, 10);
        // Much later a new bucket is full.
        let mut c = Bucket::new(&rule, &book, t0 + 1000 * MS);
        let mut allowed = 0;
        while c.spend(&rule, &book, &link, 1, Priority::Normal, t0 + 1000 * MS) == Outcome::Allowed
        {
            allowed += 1;
        }
        assert_eq!(allowed, 15);
    }

    #[test]
    fn a_recorded_share_comes_from_the_book() {
        let rule = global_rule(OnFailure::Closed, 300, 30);
        rule.global.as_ref().unwrap().set_count(3, &rule.params, 0);
        let mut book = ShareBook::default();
        // All of the rate and 25 tokens recorded for this daemon.
        book.put(
            0,
            BookEntry {
                rule: "g".into(),
                key: BucketKey::new("c", "r"),
                share: Recorded {
                    rate: crate::daemon::limiter::book::SCALE,
                    depth: 25,
                    counted_in: 30,
                },
                start: None,
            },
        );
        let link = link_valid();
        let mut b = Bucket::new(&rule, &book, MS);
        let mut allowed = 0;
        while b.spend(&rule, &book, &link, 1, Priority::Normal, MS) == Outcome::Allowed {
            allowed += 1;
        }
        assert_eq!(allowed, 25);
    }

    #[test]
    fn lapsed_shares_follow_the_policy_and_the_end_of_an_outage_brings_no_burst() {
        let book = ShareBook::default();
        let t0 = 1000 * MS;
        for policy in [OnFailure::Open, OnFailure::Closed, OnFailure::Local] {
            let rule = global_rule(policy, 300, 30);
            rule.global.as_ref().unwrap().set_count(3, &rule.params, 0);
            let link = link_valid();
            let mut b = Bucket::new(&rule, &book, t0);
            link.set_valid_until(t0);
            let first = b.spend(&rule, &book, &link, 1, Priority::Normal, t0);
            match policy {
                OnFailure::Open => assert_eq!(first, Outcome::Allowed),
                OnFailure::Closed => assert_eq!(first, Outcome::Denied),
                OnFailure::Local => assert_eq!(first, Outcome::Allowed),
            }
            // Drain whatever the policy allows, then shares come back: the
            // bucket has no tokens saved up (open drew them, closed kept them).
            for _ in 0..100 {
                b.spend(&rule, &book, &link, 1, Priority::Normal, t0);
            }
            link.set_valid_until(u64::MAX);
            let back = b.spend(&rule, &book, &link, 1, Priority::Normal, t0);
            let expected = if policy == OnFailure::Closed {
                Outcome::Allowed
            } else {
                Outcome::Denied
            };
            assert_eq!(back, expected, "{policy:?}");
        }
    }

    #[test]
    fn a_share_too_small_for_the_cost_denies_and_asks() {
        #[derive(Debug, Default)]
        struct Count(std::sync::atomic::AtomicU64);
        impl LeaseSink for Arc<Count> {
            fn plan(&self, _: &Rule) {}
            fn unmet(&self, _: &Arc<Rule>, _: BucketKey, _: u64) -> bool {
                self.0.fetch_add(1, Ordering::Relaxed);
                true
            }
            fn released(&self, _: &Arc<Rule>, _: BucketKey) -> bool {
                true
            }
        }
        // Burst 2 over five daemons: no implicit depth at all.
        let rule = global_rule(OnFailure::Closed, 10, 2);
        rule.global.as_ref().unwrap().set_count(5, &rule.params, 0);
        let count = Arc::new(Count::default());
        let link = ClusterLink::new(Arc::clone(&count), OnFailure::Closed);
        link.set_valid_until(u64::MAX);
        let book = ShareBook::default();
        let mut b = Bucket::new(&rule, &book, MS);
        for _ in 0..5 {
            assert_eq!(
                b.spend(&rule, &book, &link, 1, Priority::Normal, MS),
                Outcome::Denied
            );
        }
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "asked once, then watched"
        );
        assert_eq!(
            b.spend(&rule, &book, &link, 1, Priority::Critical, MS),
            Outcome::Bypassed
        );
    }

    proptest! {
        /// Whatever the shares do (the count changes, the share is in force
        /// or lapses), a bucket admits at most what it held plus what its
        /// shares earned: in any run, admitted (not bypassed) tokens are at
        /// most the largest depth it ever had plus the time integral of its
        /// rate, plus the fallback's when it was used. A count change moves
        /// the bucket at once, as the coordinator does for every bucket.
        #[test]
        fn a_bucket_admits_at_most_its_depth_plus_its_rate(
            steps in proptest::collection::vec((0u8..4, 1u64..4, 0u64..40 * MS), 1..200),
        ) {
            let rule = global_rule(OnFailure::Closed, 300, 30);
            let g = rule.global.as_ref().unwrap();
            g.set_count(3, &rule.params, 0);
            let book = ShareBook::default();
            let link = link_valid();
            let mut now = 1000 * MS;
            let mut b = Bucket::new(&rule, &book, now);
            let (mut admitted, mut earned, mut deepest) = (0u64, 0f64, 10u64);
            let mut n = 3u32;
            for (op, x, dt) in steps {
                let rate = 300.0 / f64::from(n);
                earned += rate * dt as f64 / 1e9;
                now += dt;
                match op {
                    0 => {
                        n = (x as u32) + 1;
                        g.set_count(n, &rule.params, now);
                        b.follow(&rule, now);
                        deepest = deepest.max(30 / u64::from(n));
                    }
                    _ => {
                        if b.spend(&rule, &book, &link, x, Priority::Normal, now) == Outcome::Allowed {
                            admitted += x;
                        }
                    }
                }
                prop_assert!(admitted as f64 <= deepest as f64 + earned + 1e-6,
                    "{admitted} admitted, {earned} earned, depth {deepest}");
            }
        }
    }
}
