//! Leasing tokens of global rules: the batch-size arithmetic ([`plan`]), the
//! bucket values in etcd and their ledger rules ([`value`]), the [`Source`]
//! of tokens (implemented on etcd by [`etcd::EtcdSource`]), the
//! [`Coordinator`] task that owns it, and the audit log ([`audit`]).
//!
//! All token traffic with etcd lives here. The hot path never waits for any
//! of it: it spends held tokens and, below a low-water mark, sends a refill
//! event through `limiter::global::LeaseSink`. The coordinator turns events
//! into lease operations (take, give back, charge debt), one per bucket in
//! flight, many buckets per etcd transaction, each with an identity so an
//! unknown outcome is never applied twice; it sizes batches from demand
//! within the rule's plan, backs off while a global bucket is empty, and
//! writes grants back with `Limiter::credit`.

pub mod audit;
mod coordinator;
pub mod etcd;
pub mod value;

pub use coordinator::{
    Coordinator, LeaseEvent, LeaseHandle, LeaseSettings, Planner, QueueSink, Wiring,
};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::limiter::Rule;
use super::limiter::key::BucketKey;
use super::metrics::LatencyHistogram;
use crate::rule::{Accuracy, RuleSpec};
use value::{Ask, BucketValue};

/// The global bucket of one (rule, client, resource).
#[derive(Debug, Clone)]
pub struct BucketRef {
    pub rule: Arc<Rule>,
    pub key: BucketKey,
}

/// A bucket's value as last seen, with its mod_revision (0: absent).
#[derive(Debug, Clone)]
pub struct Known {
    pub value: BucketValue,
    pub revision: i64,
}

/// One lease operation on one global bucket.
#[derive(Debug, Clone)]
pub struct Op {
    pub bucket: BucketRef,
    pub ask: Ask,
    /// The value last seen (`None`: read it first).
    pub known: Option<Known>,
    /// An earlier attempt of this very operation (same `ask.op`) may have
    /// committed: resolve before applying it again.
    pub uncertain: bool,
}

/// How an operation ended.
#[derive(Debug)]
pub enum Outcome {
    /// Committed (by this attempt or, if `resolved`, an earlier one).
    Committed {
        granted: u64,
        retry_after: Duration,
        revision: i64,
    },
    /// Not applied (nothing sent, or a response said so); safe to drop.
    Failed(LeaseError),
    /// May have committed: retry under the same identity.
    Unknown(LeaseError),
}

/// An operation's outcome with what was learnt about its bucket.
#[derive(Debug)]
pub struct Done {
    pub outcome: Outcome,
    /// The value after the operation (`None` when unknown).
    pub known: Option<Known>,
    /// The commit was found in the value (an earlier attempt's).
    pub resolved: bool,
    /// The value was unreadable and was rewritten.
    pub repaired: bool,
    /// The stored TAT was beyond the rule's depth and was clamped.
    pub clamped: bool,
}

/// Why a lease call failed. The outcome of a failed call is unknown, so it
/// counts as no tokens (possible under-admission, never over-admission).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd call timed out after {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("gave up after {0} conflicting updates")]
    Contended(u32),
    #[error("{0}")]
    Failed(String),
}

/// Where tokens come from. Implemented on etcd; unit tests script a fake.
pub trait Source: Clone + Send + Sync + 'static {
    /// The name this daemon holds tokens under.
    fn node(&self) -> &str;

    /// Applies operations on distinct buckets; one result per operation.
    fn apply(&self, ops: Vec<Op>) -> impl Future<Output = Vec<(Op, Done)>> + Send;
}

/// Lease counters (for `rlctl stats` and metrics).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Transactions etcd answered.
    pub txns: AtomicU64,
    /// Transactions that failed or timed out (their outcome is unknown
    /// until resolved; also counted in `failures`).
    pub txn_failures: AtomicU64,
    /// Bucket writes whose compare failed (another daemon moved the key).
    pub conflicts: AtomicU64,
    pub failures: AtomicU64,
    pub tokens_leased: AtomicU64,
    pub tokens_returned: AtomicU64,
    pub debt_charged: AtomicU64,
    /// Unreadable bucket values rewritten.
    pub repairs: AtomicU64,
    /// Bucket TATs beyond the rule's depth (a clock ahead) clamped.
    pub clamped: AtomicU64,
    /// Operations whose outcome was unknown, and how many of those were
    /// later found committed.
    pub unknown: AtomicU64,
    pub resolved: AtomicU64,
    /// Lease operations sent (one per bucket per transaction attempt).
    pub ops: AtomicU64,
    /// Per-request leases that did not answer within their deadline (or
    /// could not be queued): the request followed its rule's `on_failure`.
    pub per_request_fallbacks: AtomicU64,
    /// Refill requests refused because the rule has its maximum of buckets.
    pub bucket_cap_refusals: AtomicU64,
    pub latency: LatencyHistogram,
}

/// The shortest deadline a lease transaction gets.
pub const MIN_TXN_DEADLINE: Duration = Duration::from_millis(50);

impl LeaseStats {
    /// The deadline of a lease transaction: `max(50 ms, 3 x p99)` of recent
    /// ones, at most `cap`, so a stalled cluster is noticed within a few
    /// round trips. `None` before any transaction has been timed.
    pub fn txn_deadline(&self, cap: Duration) -> Option<Duration> {
        let p99 = Duration::from_nanos(self.latency.summary().p99_ns);
        (!p99.is_zero()).then(|| (p99 * 3).clamp(MIN_TXN_DEADLINE, cap))
    }

    /// A call gave no answer within `deadline`: its latency was at least
    /// that, so it counts as a sample of it. Deadlines learn from timeouts
    /// too: when etcd becomes slower than the deadline, the next deadlines
    /// grow (up to their cap) instead of every call timing out forever.
    pub fn timed_out(&self, deadline: Duration) {
        self.latency
            .record_one(u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX));
    }
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
    fn deadlines_learn_from_timeouts() {
        let stats = LeaseStats::default();
        let cap = Duration::from_secs(2);
        assert_eq!(stats.txn_deadline(cap), None);
        for _ in 0..100 {
            stats.latency.record_one(1_000_000);
        }
        let fast = stats.txn_deadline(cap).unwrap();
        assert_eq!(fast, MIN_TXN_DEADLINE, "3 x 1 ms is below the floor");
        // etcd got slower than the deadline: every call times out.
        let mut deadline = fast;
        for _ in 0..20 {
            for _ in 0..10 {
                stats.timed_out(deadline);
            }
            deadline = stats.txn_deadline(cap).unwrap();
        }
        assert!(
            deadline > Duration::from_millis(500),
            "grew to {deadline:?}"
        );
        assert!(deadline <= cap);
    }

    #[test]
    fn the_bound_is_members_times_batch_plus_skew() {
        // Worked by hand, not by the formula under test: 1000/s, burst 100,
        // 3 daemons, 10 ms skew, accuracy 2% over 10 s. The accuracy budget
        // is 200 tokens, less 10 for skew: 190 / 3 = 63.3 per daemon; a third
        // of the burst is 33.3, smaller, so b_max = 33.3 and the bound is
        // 3 x 33.3 + 10 = 110 tokens.
        let p = plan(&global(1000, 100), 3, Duration::from_millis(10));
        assert!((p.b_max - 100.0 / 3.0).abs() < 1e-9, "{p:?}");
        assert!((p.bound - 110.0).abs() < 1e-9, "{p:?}");
        assert!(!p.per_request);
        // A burst of 1000: the accuracy budget binds, 190 / 3 each.
        let q = plan(&global(1000, 1000), 3, Duration::from_millis(10));
        assert!((q.b_max - 190.0 / 3.0).abs() < 1e-9, "{q:?}");
        assert!((q.bound - 200.0).abs() < 1e-9, "{q:?}");
        assert!(q.bound <= allowed_error(&global(1000, 1000)) + 10.0 + 1e-9);
    }
}
