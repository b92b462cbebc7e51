//! The value of a global bucket in etcd and the pure arithmetic on it: one
//! lease operation (return held tokens, charge debt, take tokens) applied to
//! a value at a wall-clock time. No I/O here, so every rule of the ledger is
//! unit-tested.
//!
//! Value (JSON, schema v2):
//! `{"tat_ns":..,"interval_ns":..,"tau_ns":..,"holders":{"node":{"op":..,
//! "granted":..,"demand":..,"share_tat_ns":..,"at_ns":..}}}`.
//!
//! - `tat_ns`: the GCRA theoretical arrival time, wall-clock ns. Wall clocks
//!   (`base = max(tat, now)`) mean skew costs at most `rate x skew` and never
//!   accumulates; the cluster's clock check stops a daemon beyond
//!   `max_clock_skew`.
//! - `interval_ns`/`tau_ns`: the rule parameters the TAT was computed for. A
//!   daemon with other parameters (an edited rule) rescales the TAT, keeping
//!   the fraction of the bucket in use, instead of inheriting a TAT computed
//!   for another rate.
//! - `holders[node]`: the identity (`op`) and result (`granted`) of the last
//!   operation of each daemon, so a daemon whose transaction outcome was
//!   unknown can tell whether it committed and never applies it twice; its
//!   demand (tokens/s) for fair shares; a per-daemon share TAT; when it was
//!   written (`at_ns`), so holders of dead daemons are pruned.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Holders not heard from for this long are pruned from a value.
pub const HOLDER_TTL: Duration = Duration::from_secs(600);
/// A holder's demand counts for fair shares until it should have been back
/// for more: three times as long as its last grant lasts at its demand,
/// within these bounds. A daemon cut off from etcd stops holding a share
/// within seconds; a quiet one keeps its share between its rare leases.
pub const DEMAND_TTL_MIN: Duration = Duration::from_secs(2);
pub const DEMAND_TTL_MAX: Duration = Duration::from_secs(10);

/// One daemon's entry in a global bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    /// Identity of the daemon's last committed operation on this bucket.
    pub op: u64,
    /// Tokens that operation took.
    pub granted: u64,
    /// Tokens per second the daemon asks for (smoothed).
    pub demand: f64,
    /// The daemon's own GCRA TAT at its fair share of the rate.
    pub share_tat_ns: u64,
    /// Wall-clock ns of the write.
    pub at_ns: u64,
}

/// The JSON value of a global bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BucketValue {
    pub tat_ns: u64,
    pub interval_ns: u64,
    pub tau_ns: u64,
    #[serde(default)]
    pub holders: BTreeMap<String, Holder>,
}

/// The rule parameters a value is computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Nanoseconds per token (`window / limit`).
    pub interval_ns: u64,
    /// Bucket depth in ns (`burst x interval`).
    pub tau_ns: u64,
}

impl Params {
    /// Tokens per second.
    pub fn rate(self) -> f64 {
        1e9 / self.interval_ns.max(1) as f64
    }

    pub fn burst(self) -> u64 {
        self.tau_ns / self.interval_ns.max(1)
    }
}

/// What a daemon asks of one global bucket in one operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask {
    /// Identity of the operation (unique per daemon run and bucket).
    pub op: u64,
    /// Tokens wanted, and the fewest worth taking.
    pub take: u64,
    pub min: u64,
    /// Unspent tokens given back.
    pub give: u64,
    /// Tokens admitted without a grant, charged now.
    pub debt: u64,
    /// This daemon's demand, tokens per second.
    pub demand: f64,
}

/// The result of applying an [`Ask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub granted: u64,
    /// When nothing (or less than `min`) could be granted: how long until it can.
    pub retry_after: Duration,
}

/// A fresh value for `params`: a full bucket.
pub fn fresh(params: Params) -> BucketValue {
    BucketValue {
        tat_ns: 0,
        interval_ns: params.interval_ns,
        tau_ns: params.tau_ns,
        holders: BTreeMap::new(),
    }
}

/// A value that replaces an unreadable one: an empty bucket (so the repair
/// can only under-admit), no holders.
pub fn repaired(params: Params, now: u64) -> BucketValue {
    BucketValue {
        tat_ns: now.saturating_add(params.tau_ns),
        ..fresh(params)
    }
}

/// Brings a value to `params` and `now`: rescales a TAT computed for other
/// parameters (same fraction of the bucket in use), clamps a TAT beyond a
/// full bucket's depth (written by a clock ahead of ours), and prunes
/// holders not heard from in [`HOLDER_TTL`]. Returns whether it clamped.
pub fn normalize(value: &mut BucketValue, params: Params, now: u64) -> bool {
    if (value.interval_ns, value.tau_ns) != (params.interval_ns, params.tau_ns) {
        if value.tat_ns > now && value.tau_ns > 0 {
            let used = (value.tat_ns - now) as f64 / value.tau_ns as f64;
            value.tat_ns = now.saturating_add((used.min(1.0) * params.tau_ns as f64) as u64);
        }
        for h in value.holders.values_mut() {
            h.share_tat_ns = 0;
        }
        value.interval_ns = params.interval_ns;
        value.tau_ns = params.tau_ns;
    }
    let depth = now.saturating_add(params.tau_ns);
    let clamped = value.tat_ns > depth;
    if clamped {
        value.tat_ns = depth;
    }
    let horizon = now.saturating_sub(HOLDER_TTL.as_nanos() as u64);
    value.holders.retain(|_, h| h.at_ns >= horizon);
    clamped
}

/// This daemon's max-min fair share of `rate` (tokens/s) among holders with
/// recent demand. Daemons asking less than an equal split get what they ask;
/// the rest is split among the others the same way; what no one asks for is
/// split equally, so every share is positive and shares add up to `rate`.
///
/// ```
/// use rld::daemon::lease::value::fair_share;
/// // 100/s; demands 10, 30, 200: 10 and 30 are met, the busy host gets 60.
/// let d = [("a", 10.0), ("b", 30.0), ("c", 200.0)];
/// assert!((fair_share(100.0, "a", &d) - 10.0).abs() < 1e-9);
/// assert!((fair_share(100.0, "c", &d) - 60.0).abs() < 1e-9);
/// ```
pub fn fair_share(rate: f64, me: &str, demands: &[(&str, f64)]) -> f64 {
    let n = demands.len().max(1);
    let mut sorted: Vec<(&str, f64)> = demands.to_vec();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut left = rate;
    let mut mine = 0.0;
    for (i, (node, d)) in sorted.iter().enumerate() {
        let equal = left / (n - i) as f64;
        let given = d.max(0.0).min(equal);
        left -= given;
        if *node == me {
            mine = given;
        }
    }
    mine + left.max(0.0) / n as f64
}

/// Applies `ask` from `node` to `value` at wall-clock `now`: returns the
/// held tokens (never past a full bucket), charges the debt (at most one
/// bucket deep: no burst after an outage, no lock-out either), then takes up
/// to `take` tokens within both the global bucket and this daemon's fair
/// share, or none if fewer than `min` are there. Records the operation in
/// `holders[node]`. `value` must be [`normalize`]d for `params` and `now`.
pub fn apply(value: &mut BucketValue, node: &str, ask: &Ask, params: Params, now: u64) -> Applied {
    let Params {
        interval_ns,
        tau_ns,
    } = params;
    let interval = interval_ns.max(1);
    if ask.give > 0 && value.tat_ns > now {
        value.tat_ns = value
            .tat_ns
            .saturating_sub(ask.give.saturating_mul(interval))
            .max(now);
    }
    if ask.debt > 0 {
        value.tat_ns = value
            .tat_ns
            .max(now)
            .saturating_add(ask.debt.saturating_mul(interval))
            .min(now.saturating_add(tau_ns));
    }
    // Fair share among daemons with current demand (this one included).
    let mut demands: Vec<(&str, f64)> = value
        .holders
        .iter()
        .filter(|(n, h)| n.as_str() != node && h.demand > 0.0 && demand_current(h, now))
        .map(|(n, h)| (n.as_str(), h.demand))
        .collect();
    // A daemon that asks for tokens wants at least one a second (its
    // demand estimate may be zero right after an outage).
    demands.push((node, ask.demand.max(1.0)));
    let share = fair_share(params.rate(), node, &demands).max(1e-9);
    let share_interval = ((1e9 / share) as u64).max(interval);
    let share_tau = share_interval.saturating_mul(params.burst().max(1));
    let holder = value.holders.get(node).cloned().unwrap_or_default();

    let base = value.tat_ns.max(now);
    let room = now.saturating_add(tau_ns).saturating_sub(base) / interval;
    // Shares bind under contention only: tokens in the upper half of the
    // global bucket are there because the holders of shares did not take
    // them, and anyone may (work-conserving: a misjudged demand never
    // strands tokens). Below half, each daemon takes within its share.
    let free = room.saturating_sub(params.burst().div_ceil(2));
    let share_base = holder.share_tat_ns.max(now);
    let share_end = now.saturating_add(share_tau);
    let share_room = share_end.saturating_sub(share_base) / share_interval;
    let mut granted = ask.take.min(room).min(share_room.max(free));
    let mut retry_after = Duration::ZERO;
    if ask.take > 0 && (granted == 0 || granted < ask.min) {
        let need = ask.min.max(1);
        let global_ready = base
            .saturating_add(need.saturating_mul(interval))
            .saturating_sub(now.saturating_add(tau_ns));
        let share_ready = share_base
            .saturating_add(need.saturating_mul(share_interval))
            .saturating_sub(share_end);
        retry_after = Duration::from_nanos(global_ready.max(share_ready));
        granted = 0;
    }
    if granted > 0 {
        value.tat_ns = base.saturating_add(granted.saturating_mul(interval));
    }
    // Free tokens drain the share bucket too (never below empty), so a
    // daemon that took them has no share saved up when contention starts.
    let share_tat_ns = share_base
        .saturating_add(granted.saturating_mul(share_interval))
        .min(share_end);
    value.holders.insert(
        node.to_owned(),
        Holder {
            op: ask.op,
            granted,
            demand: ask.demand,
            share_tat_ns,
            at_ns: now,
        },
    );
    Applied {
        granted,
        retry_after,
    }
}

/// Whether `h`'s demand still counts at `now` (see [`DEMAND_TTL_MIN`]).
fn demand_current(h: &Holder, now: u64) -> bool {
    let lasts = if h.demand > 0.0 {
        h.granted.max(1) as f64 / h.demand
    } else {
        0.0
    };
    let ttl = (3.0 * lasts).clamp(DEMAND_TTL_MIN.as_secs_f64(), DEMAND_TTL_MAX.as_secs_f64());
    now < h.at_ns.saturating_add((ttl * 1e9) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    /// 1 token per ms (1000/s), burst 100.
    const P: Params = Params {
        interval_ns: MS,
        tau_ns: 100 * MS,
    };
    const NOW: u64 = 1_000_000 * MS;

    fn ask(take: u64) -> Ask {
        Ask {
            op: 1,
            take,
            min: 1,
            give: 0,
            debt: 0,
            demand: 0.0,
        }
    }

    #[test]
    fn takes_only_what_the_bucket_has() {
        let mut v = fresh(P);
        assert_eq!(apply(&mut v, "a", &ask(30), P, NOW).granted, 30);
        assert_eq!(v.tat_ns, NOW + 30 * MS);
        let mut v = BucketValue {
            tat_ns: NOW + 90 * MS,
            ..fresh(P)
        };
        assert_eq!(apply(&mut v, "a", &ask(30), P, NOW).granted, 10);
        assert_eq!(v.tat_ns, NOW + 100 * MS);
        let mut empty = BucketValue {
            tat_ns: NOW + 100 * MS,
            ..fresh(P)
        };
        let a = apply(&mut empty, "a", &ask(30), P, NOW);
        assert_eq!((a.granted, a.retry_after), (0, Duration::from_millis(1)));
        assert_eq!(empty.tat_ns, NOW + 100 * MS, "an empty take moves nothing");
    }

    #[test]
    fn returns_refill_and_debts_are_capped_at_one_bucket() {
        let give = |tat, held, debt| {
            let mut v = BucketValue {
                tat_ns: tat,
                ..fresh(P)
            };
            let a = Ask {
                give: held,
                debt,
                ..ask(0)
            };
            apply(&mut v, "a", &a, P, NOW);
            v.tat_ns
        };
        assert_eq!(give(NOW + 50 * MS, 20, 0), NOW + 30 * MS);
        assert_eq!(give(NOW + 5 * MS, 20, 0), NOW, "never past full");
        assert_eq!(give(NOW - 5 * MS, 20, 0), NOW - 5 * MS);
        assert_eq!(give(NOW, 0, 30), NOW + 30 * MS);
        assert_eq!(give(NOW, 0, 5000), NOW + 100 * MS);
    }

    #[test]
    fn the_operation_is_recorded_for_its_holder() {
        let mut v = fresh(P);
        let a = Ask {
            op: 77,
            demand: 12.5,
            ..ask(5)
        };
        apply(&mut v, "a", &a, P, NOW);
        let h = &v.holders["a"];
        assert_eq!((h.op, h.granted, h.at_ns), (77, 5, NOW));
        assert_eq!(h.demand, 12.5);
    }

    #[test]
    fn tats_from_a_clock_ahead_are_clamped() {
        // Written by a host an hour ahead.
        let mut v = BucketValue {
            tat_ns: NOW + 3_600_000 * MS,
            ..fresh(P)
        };
        assert!(normalize(&mut v, P, NOW));
        assert_eq!(v.tat_ns, NOW + P.tau_ns, "at most one bucket deep");
        let mut ok = BucketValue {
            tat_ns: NOW + 50 * MS,
            ..fresh(P)
        };
        assert!(!normalize(&mut ok, P, NOW));
    }

    #[test]
    fn an_edited_rule_rescales_the_tat() {
        // Half empty at 1000/s burst 100; the rule becomes 10/s burst 10.
        let mut v = BucketValue {
            tat_ns: NOW + 50 * MS,
            ..fresh(P)
        };
        let slow = Params {
            interval_ns: 100 * MS,
            tau_ns: 1000 * MS,
        };
        normalize(&mut v, slow, NOW);
        assert_eq!(v.tat_ns, NOW + 500 * MS, "still half empty");
        assert_eq!((v.interval_ns, v.tau_ns), (100 * MS, 1000 * MS));
    }

    #[test]
    fn dead_holders_are_pruned() {
        let mut v = fresh(P);
        v.holders.insert(
            "gone".into(),
            Holder {
                at_ns: NOW - HOLDER_TTL.as_nanos() as u64 - 1,
                ..Holder::default()
            },
        );
        v.holders.insert(
            "alive".into(),
            Holder {
                at_ns: NOW - 1,
                ..Holder::default()
            },
        );
        normalize(&mut v, P, NOW);
        assert_eq!(v.holders.keys().collect::<Vec<_>>(), ["alive"]);
    }

    #[test]
    fn shares_are_max_min_fair() {
        // Demands 50/20/15/10/5 % of 3x a limit of 100/s.
        let d = [
            ("a", 150.0),
            ("b", 60.0),
            ("c", 45.0),
            ("d", 30.0),
            ("e", 15.0),
        ];
        let shares: Vec<f64> = d.iter().map(|(n, _)| fair_share(100.0, n, &d)).collect();
        // Equal split 20: e (15) is met; 85 left for 4 -> 21.25 each.
        let want = [21.25, 21.25, 21.25, 21.25, 15.0];
        for (s, w) in shares.iter().zip(want) {
            assert!((s - w).abs() < 1e-9, "{shares:?}");
        }
        assert!((shares.iter().sum::<f64>() - 100.0).abs() < 1e-9);
        // Undersubscribed: everyone gets its demand plus an equal part of the rest.
        let light = [("a", 10.0), ("b", 20.0)];
        assert!((fair_share(100.0, "a", &light) - 45.0).abs() < 1e-9);
    }

    #[test]
    fn a_daemon_cannot_take_beyond_its_share_when_others_want_more() {
        // a asks 900/s, b asks 100/s of a 1000/s rule; b has been taking.
        let mut v = fresh(P);
        v.holders.insert(
            "b".into(),
            Holder {
                demand: 800.0,
                at_ns: NOW,
                ..Holder::default()
            },
        );
        let a = Ask {
            demand: 900.0,
            ..ask(1000)
        };
        // Share 500/s, depth = burst (100) tokens at that share.
        let got = apply(&mut v, "a", &a, P, NOW).granted;
        assert_eq!(got, 100, "the burst is there");
        let later = NOW + 100 * MS;
        normalize(&mut v, P, later);
        let got = apply(&mut v, "a", &a, P, later).granted;
        assert_eq!(got, 50, "then 500/s: 50 tokens per 100 ms");
    }

    #[test]
    fn demand_of_a_daemon_that_stopped_asking_expires() {
        let holder = |demand: f64, granted: u64, ago_ms: u64| Holder {
            demand,
            granted,
            at_ns: NOW - ago_ms * MS,
            ..Holder::default()
        };
        // Busy (a 400-token grant lasts 0.5 s at 800/s): counts for 2 s.
        assert!(demand_current(&holder(800.0, 400, 1_900), NOW));
        assert!(!demand_current(&holder(800.0, 400, 2_100), NOW));
        // Quiet (2 tokens last 4 s at 0.5/s): counts for 10 s, not 12.
        assert!(demand_current(&holder(0.5, 2, 9_000), NOW));
        assert!(!demand_current(&holder(0.5, 2, 10_100), NOW));
        // A cut-off daemon's old demand no longer holds back the others.
        let mut v = fresh(P);
        v.holders.insert("b".into(), holder(800.0, 400, 3_000));
        let a = Ask {
            demand: 900.0,
            ..ask(1000)
        };
        assert_eq!(apply(&mut v, "a", &a, P, NOW).granted, 100);
        let later = NOW + 100 * MS;
        normalize(&mut v, P, later);
        assert_eq!(
            apply(&mut v, "a", &a, P, later).granted,
            100,
            "the whole rate"
        );
    }

    proptest! {
        /// Whatever daemons ask, the tokens granted in any run of operations
        /// never exceed what the global bucket allows: burst + rate x time +
        /// what was given back.
        #[test]
        fn grants_never_exceed_the_bucket(
            steps in proptest::collection::vec((0u8..3, 0u64..200, 0u64..50_000_000, 0u64..20), 1..200)
        ) {
            let mut v = fresh(P);
            let mut now = NOW;
            let mut granted = 0u64;
            let mut given = 0u64;
            let start = now;
            let nodes = ["a", "b", "c"];
            for (i, (node, take, dt, give)) in steps.into_iter().enumerate() {
                now += dt;
                normalize(&mut v, P, now);
                let a = Ask { op: i as u64, take, min: 1, give, debt: 0, demand: take as f64 };
                let r = apply(&mut v, nodes[node as usize], &a, P, now);
                granted += r.granted;
                given += give;
                let allowed = P.burst() + (now - start) / P.interval_ns + given;
                prop_assert!(granted <= allowed, "granted {granted} > {allowed}");
                prop_assert!(v.tat_ns <= now + P.tau_ns);
            }
        }

        /// No arithmetic overflows (a panic in a lease batch stalls recovery)
        /// whatever the demands, parameters, debts and times.
        #[test]
        fn apply_never_overflows(
            interval in 1u64..u64::MAX / 4,
            burst in 1u64..1_000_000,
            steps in proptest::collection::vec(
                (0u8..3, any::<u64>(), any::<u64>(), any::<u64>(), 0f64..1e12, 0u64..u64::MAX / 4),
                1..50,
            ),
        ) {
            let p = Params { interval_ns: interval, tau_ns: interval.saturating_mul(burst) };
            let mut v = fresh(p);
            let nodes = ["a", "b", "c"];
            for (i, (node, take, give, debt, demand, now)) in steps.into_iter().enumerate() {
                normalize(&mut v, p, now);
                let a = Ask { op: i as u64, take, min: 1, give, debt, demand };
                let r = apply(&mut v, nodes[node as usize], &a, p, now);
                prop_assert!(r.granted <= take);
            }
        }
    }
}
