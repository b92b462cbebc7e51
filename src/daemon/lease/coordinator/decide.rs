//! What a watched bucket's record should say about this daemon: record the
//! bucket when its demand outgrows the implicit share, follow max-min
//! fairness by demand once recorded (lower only when the others need it or
//! demand stayed at zero, never while etcd fails; raise into free
//! capacity), report demand the others need, and delete the record once it
//! has been idle everywhere for as long as the burst takes to refill. Also
//! which buckets are watched at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ADOPT_EVERY, Coordinator, HYSTERESIS, QUIET, RELEASE_AFTER, VIEW_PATIENCE};
use crate::daemon::lease::share::{self, Claim, Entry, SCALE, Share};
use crate::daemon::limiter::global::EtcdState;
use crate::daemon::limiter::key::BucketKey;
use crate::daemon::limiter::{Rule, RuleSet};

impl Coordinator {
    /// Decides what `key`'s record should say about this daemon, and queues
    /// the write.
    pub(super) fn decide(&mut self, key: &str, now: Instant, rules: &RuleSet) {
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
            // Before a first sample, a share with no depth acts on the
            // demand seen so far (it can admit nothing at all); so does a
            // recorded bucket on an early estimate (a record is there
            // because some daemon wants more: it should not wait for this
            // one's sample to know what it can give).
            let recorded = self.view.records.contains_key(key);
            let applied_depth = if recorded {
                self.applied.get(key).map_or(0, |s| s.depth)
            } else {
                rule.map_or(0, |r| share::implicit(self.count, r.params.capacity).1)
            };
            match (w.demand.provisional(), w.demand.early()) {
                (Some(d), _) if applied_depth == 0 => d,
                (_, Some(d)) if recorded => d,
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
        // The demand this daemon's entry will say: the measured one when a
        // report is due, else the one recorded (a write that only moves the
        // share keeps it, so it does not move the split below).
        let recorded = mine.map_or(Share::ZERO, Share::held);
        let as_recorded = match mine.and_then(|e| e.demand) {
            Some(d) => Claim {
                demand: d,
                measured: true,
            },
            None => Claim {
                demand: share::rate_of(recorded.rate, rate),
                measured: false,
            },
        };
        let report = demand_report_due(rate, &claims, at, as_recorded, mine.and_then(|e| e.demand));
        let said = match mine.and_then(|e| e.demand) {
            Some(d) if !report => d,
            _ => demand,
        };
        // Depth is split in whole tokens from the demands as recorded (this
        // daemon's as it will be): every daemon computes the same split, so
        // they do not take turns at a token.
        let recorded_claims: Vec<Claim> = parts
            .iter()
            .map(|&(n, c)| {
                if n == me {
                    Claim { demand: said, ..c }
                } else {
                    c
                }
            })
            .collect();
        let depths = share::depths(record.burst, &share::targets(rate, &recorded_claims));
        let mut target = Share {
            rate: share::parts_of(targets[at], rate),
            depth: depths[at],
        };
        let room = share::free_for(record, me, live);
        // Lower only for the others: what none of them needs beyond the free
        // capacity stays here, so a dip in this daemon's demand costs no
        // write. Demand gone to zero gives everything up (an idle record
        // can then be deleted), but only after RELEASE_AFTER, or at once
        // when the others need it: a stalled caller is not an idle one.
        // While etcd fails nothing is lowered: nothing could be raised
        // again until it is back.
        let (rate_fits, depth_fits) =
            others_fit(record, &parts, &targets, &depths, rate, me, recorded);
        let grace = demand == 0.0
            && w.zero_since
                .is_some_and(|t| now.duration_since(t) < RELEASE_AFTER);
        if grace && rate_fits && depth_fits {
            return Action::Busy;
        }
        let frozen = self.health.state() != EtcdState::Healthy;
        if frozen || ((demand > 0.0 || grace) && rate_fits) {
            target.rate = target.rate.max(applied.rate);
        }
        if frozen || ((demand > 0.0 || grace) && depth_fits) {
            target.depth = target.depth.max(applied.depth);
        }
        // Demand clearly beyond the share: a raise into free capacity is
        // made however small (hysteresis would leave it unused for good).
        let unmet = demand > share::rate_of(applied.rate, rate) * (1.0 + HYSTERESIS);
        let next = holdable(
            step_toward(applied, target, room, unmet, (!rate_fits, !depth_fits)),
            rule.params.interval_ns,
        );
        if next != recorded || report {
            Action::Write {
                next,
                demand: said,
                applied,
            }
        } else if demand <= share::rate_of(applied.rate, rate) {
            Action::Quiet
        } else {
            Action::Busy
        }
    }

    /// Every [`ADOPT_EVERY`], watches the records no daemon holds anything
    /// of any more (every daemon quiet), so that someone deletes them: the
    /// daemon that wrote last may have stopped. Also the records of deleted
    /// rules in which this daemon still holds a share, to give it back.
    pub(super) fn adopt_idle_records(&mut self, now: Instant) {
        if self
            .adopted_at
            .is_some_and(|t| now.duration_since(t) < ADOPT_EVERY)
        {
            return;
        }
        self.adopted_at = Some(now);
        let rules = self.limiter.rules();
        let (view, me, lease) = (&self.view, self.me(), self.lease);
        let idle_entry = |e: &Entry| Share::of(e) == Share::ZERO && e.demand == Some(0.0);
        let idle: Vec<(String, Box<str>, BucketKey)> = view
            .records
            .iter()
            .filter(|(key, k)| {
                if self.watched.contains_key(*key) {
                    return false;
                }
                // A deleted rule's record still holding a share of ours:
                // give it back, so that the record can go.
                let gone = rules.get(&k.rule).is_none_or(|r| r.global.is_none());
                let holding = k
                    .record
                    .entries
                    .get(me)
                    .is_some_and(|e| e.lease == lease && !idle_entry(e));
                (gone && holding)
                    || k.record
                        .entries
                        .iter()
                        .filter(|(n, e)| view.live(n, e.lease))
                        .all(|(_, e)| idle_entry(e))
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
    pub(super) fn forget_quiet(&mut self, now: Instant) {
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
}

/// Whether what the other daemons' targets (`targets` and `depths` by
/// `parts`, `rate` the rule's) need beyond what they hold fits in what
/// nobody holds, in rate and in depth, with this daemon holding `mine`.
fn others_fit(
    record: &share::Record,
    parts: &[(&str, Claim)],
    targets: &[f64],
    depths: &[u64],
    rate: f64,
    me: &str,
    mine: Share,
) -> (bool, bool) {
    let mut need = Share::ZERO;
    let mut held = mine;
    for (j, &(n, _)) in parts.iter().enumerate() {
        if n == me {
            continue;
        }
        let has = record.entries.get(n).map_or(Share::ZERO, Share::held);
        let wants = Share {
            rate: share::parts_of(targets[j], rate),
            depth: depths[j],
        };
        need.rate = need
            .rate
            .saturating_add(wants.rate.saturating_sub(has.rate));
        need.depth = need
            .depth
            .saturating_add(wants.depth.saturating_sub(has.depth));
        held.rate = held.rate.saturating_add(has.rate);
        held.depth = held.depth.saturating_add(has.depth);
    }
    (
        need.rate <= SCALE.saturating_sub(held.rate),
        need.depth <= record.burst.saturating_sub(held.depth),
    )
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
/// than [`HYSTERESIS`] (depth also when it goes to or from zero; both when
/// `unmet`, this daemon's demand clearly beyond its share, and the part
/// rises). A part the others are `short` of (rate, depth: what they need
/// does not fit in what nobody holds) is lowered once it is a fifth of that
/// above its target: capacity held beyond use under oversubscription is
/// capacity no daemon admits with.
fn step_toward(
    applied: Share,
    target: Share,
    room: Share,
    unmet: bool,
    short: (bool, bool),
) -> Share {
    let moved = |from: u64, to: u64, short: bool| {
        let h = if short && to < from {
            HYSTERESIS / 5.0
        } else {
            HYSTERESIS
        };
        (to as f64 - from as f64).abs() > h * (from.max(to) as f64).max(1.0)
    };
    let step = |from: u64, to: u64, room: u64, force: bool, short: bool| {
        if !(force || moved(from, to, short)) || to == from {
            from
        } else if to < from {
            to
        } else {
            to.min(room).max(from)
        }
    };
    Share {
        rate: step(
            applied.rate,
            target.rate,
            room.rate,
            unmet && target.rate > applied.rate,
            short.0,
        ),
        depth: step(
            applied.depth,
            target.depth,
            room.depth,
            applied.depth == 0 || target.depth == 0 || (unmet && target.depth > applied.depth),
            short.1,
        ),
    }
}

/// `share` as a bucket can hold it: a rate too small for a finite refill
/// interval (zero, or a sliver of a slow rule) makes a bucket that holds
/// no token (GCRA measures tokens in intervals), so such a share gets no
/// depth: tokens given to it would be lost to everyone. Lowering the rate
/// thus lowers the depth in the same write (its tokens go to the pool
/// first), and a raise of depth waits for a raise of rate.
fn holdable(share: Share, interval_ns: u64) -> Share {
    let recorded = crate::daemon::limiter::book::Recorded {
        rate: share.rate,
        depth: share.depth,
        counted_in: 0,
    };
    if recorded.bucket(interval_ns, share.depth).0 == u64::MAX {
        Share { depth: 0, ..share }
    } else {
        share
    }
}

/// Tokens per second of a rule.
fn rule_rate(rule: &Rule) -> f64 {
    1e9 / rule.params.interval_ns.max(1) as f64
}

/// The implicit share of a rule at count `n`, as a record of `burst`
/// counts it (rounded down: what this daemon holds at most).
pub(super) fn implicit_share(rule: Option<&Rule>, n: u32, burst: u64) -> Share {
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

/// Whether this daemon's demand (its claim in `claims`, at `at`) should be
/// written for the others: only when the split would move by more than
/// [`HYSTERESIS`] of an equal share for anyone, were the record to say it
/// instead of what it says (`as_recorded`; `recorded` the demand it
/// holds, if any), or when demand went to zero (an idle record can then be
/// deleted). A bucket every daemon wants more of than its share (an even
/// hot key) thus costs no write however its demand moves: the split is
/// equal whatever the demands say.
fn demand_report_due(
    rate: f64,
    claims: &[Claim],
    at: usize,
    as_recorded: Claim,
    recorded: Option<f64>,
) -> bool {
    if claims[at].demand == 0.0 {
        return recorded != Some(0.0);
    }
    let mut before = claims.to_vec();
    before[at] = as_recorded;
    let tolerance = HYSTERESIS * rate / claims.len() as f64;
    share::targets(rate, &before)
        .iter()
        .zip(share::targets(rate, claims))
        .any(|(a, b)| (a - b).abs() > tolerance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_reported_only_when_it_moves_the_split() {
        let c = |demand| Claim {
            demand,
            measured: true,
        };
        let unreported = Claim {
            demand: 20.0 / 3.0,
            measured: false,
        };
        // An even hot key (20/s, three daemons each wanting ~10/s): the split
        // is equal whatever the demands say, so no report, not even a first.
        let hot = [c(9.0), c(12.0), c(10.0)];
        assert!(!demand_report_due(20.0, &hot, 1, c(8.0), Some(8.0)));
        assert!(!demand_report_due(20.0, &hot, 1, unreported, None));
        // Uneven: this daemon wants 2/s of a 20/s key the others want all
        // of: its report frees what it does not use.
        let uneven = [c(30.0), c(2.0), c(30.0)];
        assert!(demand_report_due(20.0, &uneven, 1, unreported, None));
        assert!(!demand_report_due(20.0, &uneven, 1, c(2.1), Some(2.1)));
        // Gone to zero: always said (an idle record is deleted on it).
        let idle = [c(30.0), c(0.0), c(30.0)];
        assert!(demand_report_due(20.0, &idle, 1, c(20.0), Some(20.0)));
        assert!(!demand_report_due(20.0, &idle, 1, c(0.0), Some(0.0)));
    }

    #[test]
    pub(super) fn shares_step_down_at_once_and_up_into_room() {
        const NONE_SHORT: (bool, bool) = (false, false);
        let s = |rate, depth| Share { rate, depth };
        let all = s(SCALE, 100);
        // Lower: at once.
        assert_eq!(
            step_toward(s(1000, 10), s(500, 5), all, false, NONE_SHORT),
            s(500, 5)
        );
        // Noise within the hysteresis: nothing moves...
        assert_eq!(
            step_toward(s(1000, 10), s(1050, 10), all, false, NONE_SHORT),
            s(1000, 10)
        );
        // ...unless demand is clearly beyond the share: then a small raise
        // into free room is made (a lowering still waits).
        assert_eq!(
            step_toward(s(1000, 10), s(1050, 11), all, true, NONE_SHORT),
            s(1050, 11)
        );
        assert_eq!(
            step_toward(s(1000, 10), s(1050, 11), s(1020, 10), true, NONE_SHORT),
            s(1020, 10)
        );
        assert_eq!(
            step_toward(s(1000, 10), s(980, 10), all, true, NONE_SHORT),
            s(1000, 10)
        );
        // Raise as far as the room goes, never below what is held.
        assert_eq!(
            step_toward(s(1000, 10), s(3000, 30), s(2000, 20), false, NONE_SHORT),
            s(2000, 20)
        );
        assert_eq!(
            step_toward(s(1000, 10), s(3000, 30), s(500, 5), false, NONE_SHORT),
            s(1000, 10)
        );
        // A first token of depth moves whatever the hysteresis says.
        assert_eq!(
            step_toward(s(1000, 0), s(1000, 1), all, false, NONE_SHORT),
            s(1000, 1)
        );
        // The others short of rate: a 6% lowering is made (not of depth,
        // which they are not short of).
        assert_eq!(
            step_toward(s(1000, 10), s(940, 9), all, false, (true, false)),
            s(940, 10)
        );
        assert_eq!(
            step_toward(s(1000, 10), s(990, 10), all, false, (true, true)),
            s(1000, 10)
        );
    }

    #[test]
    fn a_share_too_slow_to_refill_holds_no_depth() {
        let s = |rate, depth| Share { rate, depth };
        // 2 per hour: one token every 1,800 s.
        let interval = 1_800_000_000_000;
        assert_eq!(holdable(s(SCALE / 5, 1), interval), s(SCALE / 5, 1));
        assert_eq!(holdable(s(0, 1), interval), s(0, 0));
        // 1 part in 2^32 of the rate: one token in 245,000 years (beyond
        // what a bucket's interval can say).
        assert_eq!(holdable(s(1, 1), interval), s(1, 0));
        // The same sliver of 1,000/s is a token every 50 days: holdable.
        assert_eq!(holdable(s(1, 1), 1_000_000), s(1, 1));
    }
}
