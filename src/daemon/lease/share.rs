//! Share arithmetic of the v2 lease: pure functions, no I/O, no clock.
//!
//! A daemon's lease on a global bucket is a **share**: a fraction of the
//! rule's rate and a number of tokens of its burst (depth). The daemon
//! decides locally from a GCRA bucket at that rate and depth.
//!
//! **Invariant.** At every etcd revision, for every global bucket, the shares
//! in force on all daemons sum to at most the rate, and their depths to at
//! most the burst. Then the admissions of all daemons together in any window
//! of length `W` are at most `rate x W + burst`: each daemon admits at most
//! the tokens it holds at the window's start (at most its depth) plus what
//! its rate earns during the window.
//!
//! Two kinds of share keep it:
//! - **Implicit**: a bucket with no record in etcd gives every operating
//!   daemon exactly `1/n` of the rate and `floor(burst / n)` tokens of depth,
//!   where `n` is the daemon's *operating count*, published in its member key.
//!   [`may_raise_count`] is the rule for lowering `n` (raising the share):
//!   every other operating daemon already counts at least `n`, and at most `n`
//!   daemons operate, so the implicit shares sum to at most 1. A bucket that
//!   one daemon uses costs nothing in etcd; neither does one that all use
//!   evenly.
//! - **Recorded**: a bucket whose demand is uneven gets a [`Record`]: one entry
//!   per daemon (share, depth, demand). Only the daemon itself writes its
//!   entry: lower locally, then record the lower value; raise only into
//!   [`free`] capacity by compare-and-swap on the record, then apply. The
//!   record's creator lists every operating daemon at its implicit share (as
//!   its member key says), so creating a record changes no one's share.
//!
//! Targets follow max-min fairness by demand ([`targets`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::daemon::limiter::book::{Recorded, SCALE};

/// Headroom over measured demand that targets give: a daemon asking 100/s
/// is given up to 125/s, so noise does not make it ask again at once.
pub const HEADROOM: f64 = 1.25;

/// One daemon's entry in a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The etcd lease of the daemon's member key when the entry was written:
    /// the entry is in force only while that lease lives (a daemon stops
    /// using its shares before its lease can expire).
    pub lease: i64,
    /// Share of the rate, parts of [`SCALE`]; ignored when `n > 0`.
    #[serde(default)]
    pub rate: u64,
    /// The entry is the implicit share `1/n` (written by a record's creator
    /// for the daemons it lists), exactly.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n: u32,
    /// Tokens of depth, of the record's `burst`.
    pub depth: u64,
    /// Tokens per second the daemon wants (smoothed); `None`: not reported
    /// yet (a creator lists the others without knowing theirs).
    #[serde(default)]
    pub demand: Option<f64>,
    /// Identity of the daemon's last write of this entry (boot nonce and
    /// sequence): an answer lost in transit is resolved by reading it back.
    #[serde(default)]
    pub op: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The record of one global bucket (JSON in etcd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The bucket's names: any daemon can find its own bucket from a record.
    pub client: String,
    pub resource: String,
    /// The burst the depths are counted in (a daemon whose rule has another
    /// burst, during an edit, scales them: see [`Recorded::bucket`]).
    pub burst: u64,
    pub entries: BTreeMap<String, Entry>,
    /// Tokens of the free depth (not held by any entry) that are full:
    /// tokens move with depth. A daemon that lowers its depth puts the
    /// tokens it held above the new depth here; one that raises takes what
    /// is here into its new room (which otherwise starts empty). Never more
    /// than the free depth.
    #[serde(default)]
    pub pool: u64,
}

/// A share as a daemon applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Share {
    /// Parts of [`SCALE`] of the rate (`SCALE` = all of it).
    pub rate: u64,
    /// Tokens of depth, of the burst the share is counted in.
    pub depth: u64,
}

impl Share {
    pub const ZERO: Share = Share { rate: 0, depth: 0 };

    /// The exact share of an entry, in parts (an implicit `1/n` entry rounds
    /// up: the value is an upper bound, which is what others must assume).
    pub fn of(entry: &Entry) -> Share {
        Share {
            rate: if entry.n > 0 {
                SCALE.div_ceil(u64::from(entry.n))
            } else {
                entry.rate.min(SCALE)
            },
            depth: entry.depth,
        }
    }

    /// What a daemon holds of its own entry: an implicit `1/n` entry rounds
    /// down (converted to parts, its share must not grow).
    pub fn held(entry: &Entry) -> Share {
        Share {
            rate: if entry.n > 0 {
                SCALE / u64::from(entry.n)
            } else {
                entry.rate.min(SCALE)
            },
            depth: entry.depth,
        }
    }

    /// Whether `self` is at most `other` in both rate and depth.
    pub fn within(self, other: Share) -> bool {
        self.rate <= other.rate && self.depth <= other.depth
    }
}

/// The implicit share of a daemon operating with count `n` on a rule of
/// `burst`: `1/n` of the rate, `floor(burst / n)` tokens. `n = 0`: nothing.
pub fn implicit(n: u32, burst: u64) -> (u32, u64) {
    if n == 0 {
        (0, 0)
    } else {
        (n, burst / u64::from(n))
    }
}

/// An exact fraction, for sums of `p / SCALE` and `1 / n` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ratio {
    num: u128,
    den: u128,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Ratio {
    const ZERO: Ratio = Ratio { num: 0, den: 1 };

    fn add(self, num: u128, den: u128) -> Option<Ratio> {
        let g = gcd(self.den, den);
        let den_total = self.den.checked_mul(den / g)?;
        let num_total = self
            .num
            .checked_mul(den / g)?
            .checked_add(num.checked_mul(self.den / g)?)?;
        let r = gcd(num_total, den_total).max(1);
        Some(Ratio {
            num: num_total / r,
            den: den_total / r,
        })
    }

    fn at_most_one(self) -> bool {
        self.num <= self.den
    }

    /// `floor((1 - self) x SCALE)`, or 0 beyond one.
    fn free_parts(self) -> u64 {
        if self.num >= self.den {
            return 0;
        }
        let left = self.den - self.num;
        u64::try_from(left * u128::from(SCALE) / self.den).unwrap_or(SCALE)
    }
}

/// The exact sum of the rate shares of `entries` (`None` if it cannot be
/// computed, which callers treat as "full").
fn rate_sum<'a>(entries: impl Iterator<Item = &'a Entry>) -> Option<Ratio> {
    let mut sum = Ratio::ZERO;
    for e in entries {
        sum = if e.n > 0 {
            sum.add(1, u128::from(e.n))?
        } else {
            sum.add(u128::from(e.rate.min(SCALE)), u128::from(SCALE))?
        };
    }
    Some(sum)
}

/// Whether the entries in force (those `live` says are) keep the
/// invariant: rates sum to at most the whole rate, depths to at most the
/// record's burst.
pub fn holds(record: &Record, live: impl Fn(&str, i64) -> bool) -> bool {
    let in_force = || {
        record
            .entries
            .iter()
            .filter(|(node, e)| live(node, e.lease))
            .map(|(_, e)| e)
    };
    let depth: u128 = in_force().map(|e| u128::from(e.depth)).sum();
    depth + u128::from(record.pool) <= u128::from(record.burst)
        && rate_sum(in_force()).is_some_and(Ratio::at_most_one)
}

/// A daemon writes its entry in `record`, adding `room` tokens of depth to
/// what it applies (counted from its depth after any local lowering, not
/// from its recorded depth: a lowering applied but not recorded yet, then
/// taken back, is room to fill again), and giving the pool the `discarded`
/// tokens its lowerings took out of its bucket: (tokens the room gets, the
/// new pool). The daemon's own discarded tokens come back first, then the
/// pool's; what is left of the pool is capped at the free depth after the
/// write, `free_after`. Under the record's invariant nothing is dropped by
/// that cap (see the proof at the call); it only keeps a bad record from
/// ever minting tokens.
///
/// ```
/// use rld::daemon::lease::share::take_from_pool;
/// // 2 tokens pooled, raising by 3: 2 come full, the third starts empty.
/// assert_eq!(take_from_pool(2, 3, 0, 5), (2, 0));
/// // Lowering by 2 and giving back 1 held token.
/// assert_eq!(take_from_pool(0, 0, 1, 3), (0, 1));
/// // Lowered locally (1 token out, the write lost to a conflict), then
/// // raised back to the recorded depth while the free depth is all taken:
/// // the token comes back to the room, it is not dropped.
/// assert_eq!(take_from_pool(0, 1, 1, 0), (1, 0));
/// ```
pub fn take_from_pool(pool: u64, room: u64, discarded: u64, free_after: u64) -> (u64, u64) {
    let pool = pool.saturating_add(discarded);
    let taken = room.min(pool);
    (taken, (pool - taken).min(free_after))
}

/// The rate fraction (of 1) the entries in force of `record` hold.
pub fn fraction_in_force(record: &Record, live: impl Fn(&str, i64) -> bool) -> f64 {
    let sum = rate_sum(
        record
            .entries
            .iter()
            .filter(|(node, e)| live(node, e.lease))
            .map(|(_, e)| e),
    );
    sum.map_or(f64::INFINITY, |r| r.num as f64 / r.den as f64)
}

/// Whether operating counts `ns` (all positive) give implicit shares that
/// sum to at most the rate: `sum 1/n <= 1`, exactly.
///
/// ```
/// use rld::daemon::lease::share::counts_fit;
/// assert!(counts_fit(&[3, 3, 3]));
/// assert!(counts_fit(&[2, 3, 6]));
/// assert!(!counts_fit(&[2, 3, 5]));
/// ```
pub fn counts_fit(ns: &[u32]) -> bool {
    ns.iter()
        .try_fold(Ratio::ZERO, |sum, &n| sum.add(1, u128::from(n.max(1))))
        .is_some_and(Ratio::at_most_one)
}

/// The capacity of `record` not held by any entry in force other than
/// `me`'s: what `me` may hold in all (its entry included).
pub fn free_for(record: &Record, me: &str, live: impl Fn(&str, i64) -> bool) -> Share {
    let others = || {
        record
            .entries
            .iter()
            .filter(|(node, e)| node.as_str() != me && live(node, e.lease))
            .map(|(_, e)| e)
    };
    let depth: u64 = others().map(|e| e.depth).fold(0u64, u64::saturating_add);
    Share {
        rate: rate_sum(others()).map_or(0, Ratio::free_parts),
        depth: record.burst.saturating_sub(depth),
    }
}

/// The capacity of `record` held by no entry in force.
pub fn free(record: &Record, live: impl Fn(&str, i64) -> bool) -> Share {
    free_for(record, "", live)
}

/// Whether a daemon may lower its operating count to (or start operating
/// with) `n`: every other daemon that operates counts at least `n`, and with
/// this one at most `n` operate. Then the implicit shares `1/n_k` of all
/// operating daemons sum to at most `count / n <= 1`.
///
/// `others` are the operating counts written in the other live member keys
/// (0: not operating).
///
/// ```
/// use rld::daemon::lease::share::may_raise_count;
/// // Three daemons at 4 after a fourth left: each may go back to 3.
/// assert!(may_raise_count(3, &[4, 4]));
/// // A fourth joined (0): the others must count 4 before it starts.
/// assert!(!may_raise_count(4, &[3, 4, 4]));
/// assert!(may_raise_count(4, &[4, 4, 4]));
/// ```
pub fn may_raise_count(n: u32, others: &[u32]) -> bool {
    let operating = others.iter().filter(|&&k| k > 0).count() + 1;
    n > 0 && operating <= n as usize && others.iter().all(|&k| k == 0 || k >= n)
}

/// One participant of a bucket's fair split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    /// Tokens per second wanted.
    pub demand: f64,
    /// The demand is a measurement (headroom is added) rather than the
    /// current share of a daemon that has not reported (kept as it is).
    pub measured: bool,
}

/// Max-min fair targets (tokens/s) of `rate` among `claims`, by
/// water-filling in two passes. First the demands themselves: a daemon
/// asking less than an equal split gets what it asks; the rest is split
/// among the others the same way. Then, only if every demand is met, the
/// capacity left gives each measured demand up to [`HEADROOM`] over it (the
/// same way), so noise does not make a daemon ask again at once. Headroom
/// never comes out of another daemon's demand: under oversubscription a
/// daemon's unused headroom would be capacity no one admits with.
/// Capacity nobody asks for is left free (taken at once by the first
/// daemon that needs it), so targets may sum to less than `rate`.
///
/// ```
/// use rld::daemon::lease::share::{Claim, targets};
/// let c = |d| Claim { demand: d, measured: true };
/// // 1000/s, demands 1500, 600, 450, 300, 150 (3x oversubscribed):
/// // 150 is met (no headroom: the others need it), the other four split
/// // the rest equally.
/// let t = targets(1000.0, &[c(1500.0), c(600.0), c(450.0), c(300.0), c(150.0)]);
/// assert!((t[4] - 150.0).abs() < 1e-9);
/// assert!(t[..4].iter().all(|x| (x - 212.5).abs() < 1e-9));
/// // 900 of 1000 asked for: each demand met, the 100 left is headroom.
/// let t = targets(1000.0, &[c(630.0), c(180.0), c(90.0)]);
/// assert!((t[2] - 112.5).abs() < 1e-9);
/// assert!((t[0] - 668.75).abs() < 1e-9 && (t[1] - 218.75).abs() < 1e-9);
/// ```
pub fn targets(rate: f64, claims: &[Claim]) -> Vec<f64> {
    let demand: Vec<f64> = claims
        .iter()
        .map(|c| {
            if c.demand.is_finite() {
                c.demand.max(0.0)
            } else {
                rate
            }
        })
        .collect();
    let mut out = water_fill(rate.max(0.0), &demand);
    let left = rate.max(0.0) - out.iter().sum::<f64>();
    if left > 0.0 {
        let extra: Vec<f64> = claims
            .iter()
            .zip(&demand)
            .map(|(c, d)| {
                if c.measured {
                    d * (HEADROOM - 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        for (o, e) in out.iter_mut().zip(water_fill(left, &extra)) {
            *o += e;
        }
    }
    out
}

/// Max-min fair split of `amount` among `wants`: water-filling.
fn water_fill(amount: f64, wants: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]));
    let mut out = vec![0.0; wants.len()];
    let mut left = amount;
    for (i, &k) in order.iter().enumerate() {
        let equal = left / (order.len() - i) as f64;
        let given = wants[k].min(equal).max(0.0);
        out[k] = given;
        left -= given;
    }
    out
}

/// Whole tokens of `burst` for targets (tokens/s, any scale): proportional
/// floors, then the tokens left one each by largest remainder (ties to the
/// earlier participant); participants with no target get none. With a burst
/// smaller than the number of participants, the largest targets get a token
/// each: the burst is always admitted somewhere.
///
/// ```
/// use rld::daemon::lease::share::depths;
/// assert_eq!(depths(20, &[2.0, 1.0, 1.0]), vec![10, 5, 5]);
/// // burst 2 over five equal claims: two of them hold a token.
/// assert_eq!(depths(2, &[1.0; 5]).iter().sum::<u64>(), 2);
/// assert_eq!(depths(7, &[1.0, 0.0]), vec![7, 0]);
/// ```
pub fn depths(burst: u64, targets: &[f64]) -> Vec<u64> {
    let total: f64 = targets.iter().map(|t| t.max(0.0)).sum();
    if total <= 0.0 || burst == 0 {
        return vec![0; targets.len()];
    }
    let exact: Vec<f64> = targets
        .iter()
        .map(|t| t.max(0.0) / total * burst as f64)
        .collect();
    let mut out: Vec<u64> = exact
        .iter()
        .map(|x| (x.floor() as u64).min(burst))
        .collect();
    let mut left = burst.saturating_sub(out.iter().sum());
    let mut order: Vec<usize> = (0..targets.len()).filter(|&k| targets[k] > 0.0).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for k in order {
        if left == 0 {
            break;
        }
        out[k] += 1;
        left -= 1;
    }
    out
}

/// Parts of [`SCALE`] for `tokens_per_sec` of a rule of `rate` tokens/s,
/// rounded down (at most all of it).
pub fn parts_of(tokens_per_sec: f64, rate: f64) -> u64 {
    if rate <= 0.0 || tokens_per_sec <= 0.0 {
        return 0;
    }
    ((tokens_per_sec / rate).min(1.0) * SCALE as f64).floor() as u64
}

/// Tokens per second of `parts` of a rule of `rate` tokens/s.
pub fn rate_of(parts: u64, rate: f64) -> f64 {
    parts.min(SCALE) as f64 / SCALE as f64 * rate
}

impl Share {
    /// The share as the limiter's book keeps it (depth counted in `burst`).
    pub fn recorded(self, burst: u64) -> Recorded {
        Recorded {
            rate: self.rate,
            depth: self.depth,
            counted_in: burst,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(rate: u64, n: u32, depth: u64) -> Entry {
        Entry {
            lease: 1,
            rate,
            n,
            depth,
            demand: None,
            op: 0,
        }
    }

    fn record(entries: &[(&str, Entry)], burst: u64) -> Record {
        Record {
            client: "c".into(),
            resource: "r".into(),
            pool: 0,
            burst,
            entries: entries
                .iter()
                .map(|(n, e)| ((*n).to_owned(), e.clone()))
                .collect(),
        }
    }

    fn all(_: &str, _: i64) -> bool {
        true
    }

    #[test]
    fn implicit_thirds_fill_a_record_exactly() {
        let r = record(
            &[
                ("a", entry(0, 3, 6)),
                ("b", entry(0, 3, 6)),
                ("c", entry(0, 3, 6)),
            ],
            20,
        );
        assert!(holds(&r, all));
        let f = free(&r, all);
        assert_eq!(f, Share { rate: 0, depth: 2 });
        // Without c (dead), a third of the rate is free, and its depth.
        let f = free(&r, |n, _| n != "c");
        assert_eq!(f.depth, 8);
        assert_eq!(f.rate, SCALE / 3);
        // What `a` may hold in all: its third plus c's.
        let mine = free_for(&r, "a", |n, _| n != "c");
        assert_eq!(mine.rate, 2 * SCALE / 3);
    }

    #[test]
    fn an_entry_of_a_dead_lease_holds_nothing() {
        let r = record(&[("a", entry(SCALE, 0, 20))], 20);
        assert_eq!(
            free(&r, |_, lease| lease != 1),
            Share {
                rate: SCALE,
                depth: 20
            }
        );
        assert_eq!(free(&r, all), Share::ZERO);
    }

    #[test]
    fn over_full_records_are_caught() {
        let r = record(
            &[("a", entry(SCALE / 2 + 1, 0, 1)), ("b", entry(0, 2, 1))],
            2,
        );
        assert!(!holds(&r, all));
        let r = record(&[("a", entry(SCALE / 2, 0, 2)), ("b", entry(0, 2, 1))], 2);
        assert!(!holds(&r, all), "depth 3 of 2");
        let r = record(&[("a", entry(SCALE / 2, 0, 1)), ("b", entry(0, 2, 1))], 2);
        assert!(holds(&r, all));
    }

    #[test]
    fn counts_are_raised_only_when_everyone_counts_at_least_as_many() {
        assert!(may_raise_count(1, &[]));
        assert!(may_raise_count(3, &[0, 3]));
        assert!(!may_raise_count(2, &[3, 3]), "three operate");
        assert!(!may_raise_count(0, &[]));
        assert!(!may_raise_count(5, &[4, 5]));
    }

    #[test]
    fn low_bursts_go_to_the_largest_targets() {
        assert_eq!(depths(2, &[5.0, 1.0, 3.0]), vec![1, 0, 1]);
        assert_eq!(depths(1, &[1.0, 1.0]), vec![1, 0]);
        assert_eq!(depths(0, &[1.0]), vec![0]);
        assert_eq!(depths(10, &[0.0, 0.0]), vec![0, 0]);
    }

    proptest! {
        /// Whatever each daemon asks, raising only into the free capacity
        /// computed from the record (by compare-and-swap, so from the value
        /// it replaces) and lowering freely keeps the invariant, and no
        /// token is lost or minted: a model of daemons that lower locally
        /// first, whose writes may be lost to a conflict (their lowering
        /// stays applied, their discarded tokens owed to the next write),
        /// and that spend tokens, ends with every token still in a bucket,
        /// the pool or owed.
        #[test]
        fn raising_into_free_capacity_keeps_the_invariant_and_the_tokens(
            burst in 0u64..50,
            n in 1u32..6,
            steps in proptest::collection::vec(
                (0usize..5, 0u64..=SCALE, 0u64..60, any::<bool>(), any::<bool>(), 0u64..3),
                1..80,
            ),
        ) {
            #[derive(Default, Clone, Copy)]
            struct Daemon { applied: u64, tokens: u64, owed: u64 }
            let nodes = ["a", "b", "c", "d", "e"];
            let (_, d) = implicit(n, burst);
            let mut r = record(&[], burst);
            let mut ds = [Daemon::default(); 5];
            for (k, node) in nodes.iter().take(n as usize).enumerate() {
                r.entries.insert((*node).into(), entry(0, n, d));
                ds[k] = Daemon { applied: d, tokens: d, owed: 0 };
            }
            prop_assert!(holds(&r, all));
            r.pool = burst - r.entries.values().map(|e| e.depth).sum::<u64>();
            prop_assert!(holds(&r, all));
            let mut left = burst;
            for (who, rate, depth, raise, commits, spend) in steps {
                let node = nodes[who];
                let me = &mut ds[who];
                let spent = spend.min(me.tokens);
                me.tokens -= spent;
                left -= spent;
                let now = r.entries.get(node).map(Share::held).unwrap_or_default();
                let next = if raise {
                    let room = free_for(&r, node, all);
                    Share { rate: rate.min(room.rate), depth: depth.min(room.depth) }
                } else {
                    Share { rate: rate.min(now.rate), depth: depth.min(now.depth) }
                };
                // Lower locally before recording the lower value.
                let lowered = me.applied.min(next.depth);
                me.owed += me.tokens.saturating_sub(lowered);
                me.tokens = me.tokens.min(lowered);
                me.applied = lowered;
                let others: u64 = r.entries.iter().filter(|(n, _)| n.as_str() != node).map(|(_, e)| e.depth).sum();
                let free_after = burst - others - next.depth;
                let (taken, pool) = take_from_pool(r.pool, next.depth - lowered, me.owed, free_after);
                prop_assert!(taken <= next.depth - lowered);
                if commits {
                    r.pool = pool;
                    r.entries.insert(node.into(), entry(next.rate, 0, next.depth));
                    me.applied = next.depth;
                    me.tokens += taken;
                    me.owed = 0;
                }
                prop_assert!(holds(&r, all), "{:?}", r);
                let held: u64 = ds.iter().map(|d| d.tokens + d.owed).sum();
                prop_assert_eq!(held + r.pool, left, "a token lost or minted: {:?}", r);
                prop_assert!(ds.iter().all(|d| d.tokens <= d.applied));
            }
        }

        /// Implicit shares sum to at most one whatever order daemons raise
        /// and lower their counts in, as long as each raise passes
        /// `may_raise_count` against the counts others have written.
        #[test]
        fn operating_counts_keep_implicit_shares_within_the_rate(
            steps in proptest::collection::vec((0usize..6, 0u32..8), 1..100),
        ) {
            let mut counts = [0u32; 6];
            for (who, n) in steps {
                let current = counts[who];
                let lowering = n > current && current > 0;
                let others: Vec<u32> = (0..6).filter(|&k| k != who).map(|k| counts[k]).collect();
                if n == 0 || lowering || may_raise_count(n, &others) {
                    counts[who] = n;
                }
                let sum = counts
                    .iter()
                    .filter(|&&k| k > 0)
                    .try_fold(Ratio::ZERO, |s, &k| s.add(1, u128::from(k)))
                    .unwrap();
                prop_assert!(sum.at_most_one(), "{:?}", counts);
            }
        }

        /// Targets never exceed the rate in sum, never exceed a claim's
        /// (inflated) demand, and depths never exceed the burst.
        #[test]
        fn targets_and_depths_stay_within_the_rule(
            rate in 0.1f64..10_000.0,
            burst in 0u64..1000,
            demands in proptest::collection::vec((0.0f64..20_000.0, any::<bool>()), 1..8),
        ) {
            let claims: Vec<Claim> = demands.iter().map(|&(demand, measured)| Claim { demand, measured }).collect();
            let t = targets(rate, &claims);
            prop_assert!(t.iter().sum::<f64>() <= rate * (1.0 + 1e-9));
            for (c, x) in claims.iter().zip(&t) {
                let cap = if c.measured { c.demand * HEADROOM } else { c.demand };
                prop_assert!(*x <= cap + 1e-9);
            }
            // Max-min: a claim short of its demand gets at least as much as
            // any other (headroom only from capacity no demand needs).
            for (c, x) in claims.iter().zip(&t) {
                if *x < c.demand * (1.0 - 1e-9) - 1e-9 {
                    prop_assert!(t.iter().all(|y| *y <= x + 1e-6 * rate.max(1.0)), "{:?} -> {:?}", claims, t);
                }
            }
            let d = depths(burst, &t);
            prop_assert!(d.iter().sum::<u64>() <= burst);
            let parts: u64 = t.iter().map(|&x| parts_of(x, rate)).sum();
            prop_assert!(parts <= SCALE);
        }
    }
}
