//! Token-bucket arithmetic in GCRA form: a bucket is one integer, its
//! theoretical arrival time (TAT) in nanoseconds of an injected clock.
//!
//! A bucket of capacity `B` refilling one token every `T` ns is full when
//! `tat <= now`; taking `k` tokens moves `tat` to `max(tat, now) + k*T` and is
//! allowed while `tat - now <= B*T` (= `tau`). Integers only, so nothing drifts.
//! Pure functions: no clock reads, no locks, no allocation.

use crate::protocol::{Outcome, Priority};
use crate::rule::RuleSpec;

/// Everything the arithmetic needs from a rule, precomputed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketParams {
    /// Nanoseconds per token (`T`), rounded up.
    pub interval_ns: u64,
    /// Bucket capacity (`burst`) in tokens.
    pub capacity: u64,
    /// `capacity * interval_ns`: how far ahead of now the TAT may run.
    pub tau_ns: u64,
    /// Reserve floors in ns of TAT for `[low, normal, high]`: those classes are
    /// denied if they would leave less than this much of the bucket.
    floors_ns: [u64; 3],
    /// The same floors in thousandths of the bucket, to scale them to a
    /// share of it ([`BucketParams::share`]).
    floors_permille: [u16; 3],
}

/// The result of one [`try_take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Whole tokens left after the decision.
    pub remaining: u64,
    /// When denied, ns until the same request would be allowed; else 0.
    pub retry_after_ns: u64,
    /// Ns until the bucket is full again.
    pub reset_after_ns: u64,
}

impl BucketParams {
    /// Parameters of a validated rule.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use rld::daemon::limiter::BucketParams;
    /// use rld::rule::RuleSpec;
    /// let p = BucketParams::from_spec(&RuleSpec::new("r", "*", "*", 10, Duration::from_secs(1)));
    /// assert_eq!((p.interval_ns, p.capacity, p.tau_ns), (100_000_000, 10, 1_000_000_000));
    /// ```
    pub fn from_spec(spec: &RuleSpec) -> BucketParams {
        let interval_ns = spec.interval_ns();
        let capacity = spec.capacity();
        let tau_ns = interval_ns.saturating_mul(capacity);
        let floor = |permille: u16| {
            u64::try_from(u128::from(tau_ns) * u128::from(permille) / 1000)
                .expect("a fraction of tau fits in u64")
        };
        let r = spec.reserve;
        BucketParams {
            interval_ns,
            capacity,
            tau_ns,
            floors_ns: [floor(r.low), floor(r.normal), floor(r.high)],
            floors_permille: [r.low, r.normal, r.high],
        }
    }

    /// The parameters of a share of this rule's bucket: one token every
    /// `interval_ns`, `depth` tokens deep, with the rule's reserves as the
    /// same fractions of it. `None` for a share that can admit nothing (no
    /// depth, or no rate).
    #[inline]
    pub fn share(&self, interval_ns: u64, depth: u64) -> Option<BucketParams> {
        if depth == 0 || interval_ns == 0 || interval_ns == u64::MAX {
            return None;
        }
        let tau_ns = u64::try_from(u128::from(interval_ns) * u128::from(depth)).ok()?;
        // Keep `tat` arithmetic (now + 2 tau) clear of overflow.
        if tau_ns > u64::MAX / 4 {
            return None;
        }
        let floor = |permille: u16| {
            u64::try_from(u128::from(tau_ns) * u128::from(permille) / 1000)
                .expect("a fraction of tau fits in u64")
        };
        let [low, normal, high] = self.floors_permille;
        Some(BucketParams {
            interval_ns,
            capacity: depth,
            tau_ns,
            floors_ns: [floor(low), floor(normal), floor(high)],
            floors_permille: self.floors_permille,
        })
    }

    /// Parameters without reserves: one token every `interval_ns`, a bucket
    /// of `tau_ns` (the local fallback of global rules).
    pub fn plain(interval_ns: u64, tau_ns: u64) -> BucketParams {
        BucketParams {
            interval_ns,
            capacity: tau_ns / interval_ns,
            tau_ns,
            floors_ns: [0; 3],
            floors_permille: [0; 3],
        }
    }

    /// Tokens a request of `priority` can ever take at once: the bucket less
    /// the priority's reserve (all of it for critical).
    pub fn usable(&self, priority: Priority) -> u64 {
        self.tau_ns.saturating_sub(self.floor_ns(priority)) / self.interval_ns.max(1)
    }

    fn floor_ns(&self, priority: Priority) -> u64 {
        match priority {
            Priority::Low => self.floors_ns[0],
            Priority::Normal => self.floors_ns[1],
            Priority::High => self.floors_ns[2],
            Priority::Critical => 0,
        }
    }
}

/// Takes `cost` tokens from the bucket whose TAT is `tat`, if the priority's
/// floor allows. A critical request over the limit is admitted as `Bypassed`
/// and still debited, but the debt is capped at one full bucket so a flood of
/// critical traffic cannot lock out everyone else for longer than `tau`.
///
/// The caller guarantees `cost <= params.capacity` (a larger cost can never be
/// allowed and is reported as an error before this point).
///
/// ```
/// # use std::time::Duration;
/// use rld::daemon::limiter::{BucketParams, try_take};
/// use rld::protocol::{Outcome, Priority};
/// use rld::rule::RuleSpec;
/// let p = BucketParams::from_spec(&RuleSpec::new("r", "*", "*", 2, Duration::from_secs(1)));
/// let mut tat = 0;
/// assert_eq!(try_take(&mut tat, &p, 0, 1, Priority::Normal).outcome, Outcome::Allowed);
/// assert_eq!(try_take(&mut tat, &p, 0, 1, Priority::Normal).outcome, Outcome::Allowed);
/// let denied = try_take(&mut tat, &p, 0, 1, Priority::Normal);
/// assert_eq!((denied.outcome, denied.retry_after_ns), (Outcome::Denied, 500_000_000));
/// ```
#[inline]
pub fn try_take(
    tat: &mut u64,
    params: &BucketParams,
    now: u64,
    cost: u64,
    priority: Priority,
) -> Verdict {
    debug_assert!(cost <= params.capacity);
    let base = (*tat).max(now);
    let next = base + cost * params.interval_ns;
    let full_at = now + params.tau_ns;
    let limit_at = full_at - params.floor_ns(priority);
    if next <= limit_at {
        *tat = next;
        return Verdict {
            outcome: Outcome::Allowed,
            remaining: (full_at - next) / params.interval_ns,
            retry_after_ns: 0,
            reset_after_ns: next - now,
        };
    }
    if priority == Priority::Critical {
        *tat = next.min(full_at + params.tau_ns);
        return Verdict {
            outcome: Outcome::Bypassed,
            remaining: 0,
            retry_after_ns: 0,
            reset_after_ns: *tat - now,
        };
    }
    Verdict {
        outcome: Outcome::Denied,
        remaining: full_at.saturating_sub(base) / params.interval_ns,
        retry_after_ns: next - limit_at,
        reset_after_ns: base - now,
    }
}

/// Whether a bucket is full at `now` (so forgetting it changes nothing).
#[inline]
pub fn is_full(tat: u64, now: u64) -> bool {
    tat <= now
}

/// Carries a bucket's consumption over to changed parameters of the same rule:
/// the tokens spent and not yet refilled stay spent (rounded up), capped at the
/// new bucket's size.
pub fn rescale(tat: u64, old: &BucketParams, new: &BucketParams, now: u64) -> u64 {
    if tat <= now {
        return tat;
    }
    let spent = (tat - now).div_ceil(old.interval_ns);
    now + spent.saturating_mul(new.interval_ns).min(new.tau_ns)
}

/// Carries a bucket's tokens over to new parameters (one token every
/// `new.0` ns, `new.1` tokens deep) from old ones: the tokens it holds stay
/// (fractions included), capped at the new depth, and an overdraft (a
/// Critical request's) stays owed; room added by a deeper bucket starts
/// empty and fills at the new rate. Parameters with no rate or no depth hold
/// nothing: to or from them the bucket is empty.
///
/// ```
/// use rld::daemon::limiter::bucket::retune;
/// // 3 of 5 tokens (one per 10 ns) left at t=100; 10 deep at one per 20 ns:
/// // still 3 tokens, so 7 to refill, 140 ns.
/// let tat = 100 + 20;
/// assert_eq!(retune(tat, (10, 5), (20, 10), 100), 100 + 140);
/// ```
pub fn retune(tat: u64, old: (u64, u64), new: (u64, u64), now: u64) -> u64 {
    let usable = |(interval, depth): (u64, u64)| depth > 0 && interval > 0 && interval != u64::MAX;
    let new_tau = u128::from(new.0) * u128::from(new.1);
    if !usable(new) {
        // Nothing to hold: an empty bucket of whatever shape.
        return now;
    }
    let new_tau_ns = u64::try_from(new_tau)
        .unwrap_or(u64::MAX / 4)
        .min(u64::MAX / 4);
    if !usable(old) {
        return now.saturating_add(new_tau_ns);
    }
    let old_tau = i128::from(old.0) * i128::from(old.1);
    let used = (i128::from(tat) - i128::from(now)).max(0);
    // The tokens held, in ns of the old bucket (negative: an overdraft),
    // as ns of the new one: used' = new_tau - held x new.0 / old.0, rounded
    // toward holding less. Fractions of a token are kept: a bucket moved
    // back and forth between close parameters loses nothing.
    let held_ns = old_tau - used;
    let held_new = match held_ns.checked_mul(i128::from(new.0)) {
        Some(scaled) => scaled.div_euclid(i128::from(old.0)),
        // Beyond i128 (ns per token near u64::MAX): whole tokens only.
        None => held_ns.div_euclid(i128::from(old.0)) * i128::from(new.0),
    };
    let used_new = (new_tau as i128 - held_new).clamp(0, 2 * i128::from(new_tau_ns));
    now.saturating_add(u64::try_from(used_new).unwrap_or(u64::MAX / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Reserve;
    use proptest::prelude::*;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    fn params(limit: u64, window: Duration, burst: Option<u64>) -> BucketParams {
        let mut spec = RuleSpec::new("r", "*", "*", limit, window);
        spec.burst = burst;
        BucketParams::from_spec(&spec)
    }

    #[test]
    fn denies_after_burst_then_refills_at_rate() {
        let p = params(10, Duration::from_secs(1), Some(5));
        let mut tat = 0;
        let now = 100 * SEC;
        for i in 0..5 {
            let v = try_take(&mut tat, &p, now, 1, Priority::Normal);
            assert_eq!(v.outcome, Outcome::Allowed);
            assert_eq!(v.remaining, 4 - i);
        }
        let v = try_take(&mut tat, &p, now, 1, Priority::Normal);
        assert_eq!(v.outcome, Outcome::Denied);
        assert_eq!(v.retry_after_ns, SEC / 10);
        assert_eq!(v.reset_after_ns, SEC / 2);
        // 100 ms later exactly one token is back.
        let later = now + SEC / 10;
        assert_eq!(
            try_take(&mut tat, &p, later, 1, Priority::Normal).outcome,
            Outcome::Allowed
        );
        assert_eq!(
            try_take(&mut tat, &p, later, 1, Priority::Normal).outcome,
            Outcome::Denied
        );
    }

    #[test]
    fn a_denial_does_not_spend() {
        let p = params(1, Duration::from_secs(1), None);
        let mut tat = 0;
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::Normal).outcome,
            Outcome::Allowed
        );
        let before = tat;
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::Normal).outcome,
            Outcome::Denied
        );
        assert_eq!(tat, before);
    }

    #[test]
    fn cost_takes_several_tokens() {
        let p = params(10, Duration::from_secs(1), None);
        let mut tat = 0;
        let v = try_take(&mut tat, &p, 0, 7, Priority::Normal);
        assert_eq!((v.outcome, v.remaining), (Outcome::Allowed, 3));
        let v = try_take(&mut tat, &p, 0, 4, Priority::Normal);
        assert_eq!((v.outcome, v.remaining), (Outcome::Denied, 3));
        assert_eq!(v.retry_after_ns, SEC / 10);
    }

    #[test]
    fn reserves_hold_back_lower_classes() {
        let mut spec = RuleSpec::new("r", "*", "*", 10, Duration::from_secs(1));
        spec.reserve = Reserve {
            high: 100,
            normal: 200,
            low: 300,
        };
        let p = BucketParams::from_spec(&spec);
        let mut tat = 0;
        // Low may take 7 of 10 tokens, normal one more, high one more.
        for _ in 0..7 {
            assert_eq!(
                try_take(&mut tat, &p, 0, 1, Priority::Low).outcome,
                Outcome::Allowed
            );
        }
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::Low).outcome,
            Outcome::Denied
        );
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::Normal).outcome,
            Outcome::Allowed
        );
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::Normal).outcome,
            Outcome::Denied
        );
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::High).outcome,
            Outcome::Allowed
        );
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::High).outcome,
            Outcome::Denied
        );
        assert_eq!(
            try_take(&mut tat, &p, 0, 1, Priority::Critical).outcome,
            Outcome::Allowed
        );
    }

    #[test]
    fn critical_bypasses_with_capped_debt() {
        let p = params(10, Duration::from_secs(1), None);
        let mut tat = 0;
        for _ in 0..10 {
            try_take(&mut tat, &p, 0, 1, Priority::Normal);
        }
        for _ in 0..100 {
            let v = try_take(&mut tat, &p, 0, 1, Priority::Critical);
            assert_eq!(v.outcome, Outcome::Bypassed);
        }
        assert_eq!(tat, 2 * SEC, "debt is capped at one extra bucket");
        assert_eq!(
            try_take(&mut tat, &p, SEC, 1, Priority::Normal).outcome,
            Outcome::Denied
        );
        assert_eq!(
            try_take(&mut tat, &p, SEC + SEC / 10, 1, Priority::Normal).outcome,
            Outcome::Allowed
        );
    }

    #[test]
    fn rescale_keeps_spent_tokens_within_the_new_bucket() {
        let one = params(1, Duration::from_secs(1), None);
        let ten = params(10, Duration::from_secs(1), None);
        // One token spent at 1/s is one token spent at 10/s.
        assert_eq!(rescale(SEC, &one, &ten, 0), SEC / 10);
        // Ten tokens spent at 10/s cannot exceed the 1-token bucket.
        assert_eq!(rescale(SEC, &ten, &one, 0), SEC);
        assert_eq!(rescale(5, &one, &ten, 10), 5, "a full bucket stays full");
    }

    proptest! {
        /// Admitted cost in any interval of length t never exceeds burst + rate * t.
        #[test]
        fn admitted_never_exceeds_burst_plus_rate(
            limit in 1u64..1000,
            window_ms in 1u64..5000,
            burst in 1u64..200,
            steps in proptest::collection::vec((0u64..50_000_000, 0u64..20, 0u8..4), 1..300),
        ) {
            let window = Duration::from_millis(window_ms);
            let p = params(limit, window, Some(burst));
            let mut tat = 0u64;
            let mut now = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (dt, cost, prio) in steps {
                now += dt;
                let cost = cost.min(burst);
                let priority = [Priority::Low, Priority::Normal, Priority::High, Priority::Normal][prio as usize];
                let v = try_take(&mut tat, &p, now, cost, priority);
                if v.outcome == Outcome::Allowed {
                    admitted.push((now, cost));
                }
            }
            let window_ns = window.as_nanos();
            for i in 0..admitted.len() {
                let mut sum = 0u128;
                for &(t, c) in &admitted[i..] {
                    sum += u128::from(c);
                    let elapsed = u128::from(t - admitted[i].0);
                    // burst + limit * elapsed / window, in exact integers.
                    let bound = u128::from(burst) * window_ns + u128::from(limit) * elapsed;
                    prop_assert!(sum * window_ns <= bound,
                        "admitted {} in {} ns > burst {} + rate", sum, elapsed, burst);
                }
            }
        }

        /// The other side: what try_take reports is exact and it does not
        /// deny what it should allow. `remaining` is the whole tokens left
        /// above nothing; a denied request is allowed exactly once its
        /// `retry_after` has passed (and not a nanosecond before); critical
        /// requests are never denied; reserves keep their share back.
        #[test]
        fn verdicts_are_exact_and_retry_after_is_tight(
            limit in 1u64..1000,
            window_ms in 1u64..60_000,
            burst in 1u64..200,
            reserve in (0u16..300, 0u16..300, 0u16..300),
            steps in proptest::collection::vec((0u64..120_000_000_000, 0u64..20, 0u8..4), 1..200),
        ) {
            let mut spec = RuleSpec::new("r", "*", "*", limit, Duration::from_millis(window_ms));
            spec.burst = Some(burst);
            // high <= normal <= low < 1.0 (permille).
            let (h, n, l) = reserve;
            let mut r = [h, n, l];
            r.sort_unstable();
            spec.reserve = Reserve { high: r[0], normal: r[1], low: r[2] };
            let p = BucketParams::from_spec(&spec);
            let mut tat = 0u64;
            let mut now = 1_000 * SEC;
            for (dt, cost, prio) in steps {
                now += dt;
                let priority = [Priority::Low, Priority::Normal, Priority::High, Priority::Critical][prio as usize];
                // Larger costs are refused before try_take (check_cost).
                let usable = p.usable(priority);
                if usable == 0 {
                    continue;
                }
                let cost = cost.clamp(1, usable);
                let before = tat;
                let v = try_take(&mut tat, &p, now, cost, priority);
                match v.outcome {
                    Outcome::Allowed => {
                        let full_at = now + p.tau_ns;
                        prop_assert_eq!(v.remaining, (full_at - tat) / p.interval_ns);
                        prop_assert_eq!(tat, before.max(now) + cost * p.interval_ns);
                    }
                    Outcome::Bypassed => prop_assert_eq!(priority, Priority::Critical),
                    Outcome::Denied => {
                        prop_assert!(priority != Priority::Critical, "critical is never denied");
                        prop_assert_eq!(tat, before, "a denial spends nothing");
                        prop_assert!(v.retry_after_ns > 0);
                        let mut probe = tat;
                        let early = try_take(&mut probe, &p, now + v.retry_after_ns - 1, cost, priority);
                        prop_assert_eq!(early.outcome, Outcome::Denied, "allowed before retry_after");
                        let mut probe = tat;
                        let on_time = try_take(&mut probe, &p, now + v.retry_after_ns, cost, priority);
                        prop_assert_eq!(on_time.outcome, Outcome::Allowed, "denied after retry_after");
                    }
                }
            }
        }

        /// A rule edit keeps the tokens spent (rounded up), within the new
        /// bucket; unchanged parameters change nothing; a full bucket stays full.
        #[test]
        fn rescale_keeps_what_was_spent(
            old_limit in 1u64..1000, new_limit in 1u64..1000,
            old_burst in 1u64..500, new_burst in 1u64..500,
            spent_ns in 0u64..1_000_000_000_000,
        ) {
            let old = params(old_limit, Duration::from_secs(1), Some(old_burst));
            let new = params(new_limit, Duration::from_secs(1), Some(new_burst));
            let now = 1_000 * SEC;
            let tat = now + spent_ns.min(old.tau_ns);
            prop_assert_eq!(rescale(tat, &old, &old, now), now + (tat - now).div_ceil(old.interval_ns) * old.interval_ns);
            prop_assert_eq!(rescale(now - 1, &old, &new, now), now - 1);
            let spent = (tat - now).div_ceil(old.interval_ns);
            let after = rescale(tat, &old, &new, now);
            prop_assert_eq!(after - now, (spent * new.interval_ns).min(new.tau_ns));
        }
    }
}
