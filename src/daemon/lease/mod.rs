//! Leasing tokens of global rules: the batch-size arithmetic ([`plan`]), the
//! [`Source`] of tokens (implemented on etcd by [`etcd::EtcdSource`]) and the
//! [`Coordinator`] task that owns it.
//!
//! The hot path never waits for any of this: it spends held tokens and, below
//! a low-water mark, sends a refill event (`limiter::global`). The coordinator
//! runs at most one lease transaction per bucket at a time, sizes each batch
//! from the bucket's own demand, caps it by the rule's accuracy knob, backs off
//! while the global bucket is empty, and writes grants back with
//! `Limiter::credit`. Tokens come back to the global bucket on shutdown, rule
//! change and eviction.

mod coordinator;
pub mod etcd;

pub use coordinator::{Coordinator, LeaseSettings};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::limiter::Rule;
use super::limiter::key::BucketKey;
use super::metrics::LatencyHistogram;
use crate::rule::{Accuracy, RuleSpec};

/// The global bucket of one (rule, client, resource).
#[derive(Debug, Clone)]
pub struct BucketRef {
    pub rule: Arc<Rule>,
    pub key: BucketKey,
}

/// The answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken (0 when the global bucket is empty).
    pub tokens: u64,
    /// When empty: how long until the wanted tokens are there.
    pub retry_after: Duration,
}

/// Why a lease call failed. The outcome of a failed call is unknown, so it
/// counts as no tokens (possible under-admission, never over-admission).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd call timed out after {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("global bucket {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("gave up after {0} conflicting updates")]
    Contended(u32),
}

/// Where tokens come from. Implemented on etcd; unit tests script a fake.
pub trait Source: Clone + Send + Sync + 'static {
    /// Takes up to `want` tokens from the global bucket, or none if fewer
    /// than `min` are there.
    fn take(
        &self,
        bucket: &BucketRef,
        want: u64,
        min: u64,
    ) -> impl Future<Output = Result<Grant, LeaseError>> + Send;

    /// Returns `held` unspent tokens and charges `debt` tokens admitted while
    /// the bucket could not be reached.
    fn give_back(
        &self,
        bucket: &BucketRef,
        held: u64,
        debt: u64,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
}

/// Lease counters (for `rlctl stats` and metrics).
#[derive(Debug, Default)]
pub struct LeaseStats {
    pub txns: AtomicU64,
    pub conflicts: AtomicU64,
    pub failures: AtomicU64,
    pub tokens_leased: AtomicU64,
    pub tokens_returned: AtomicU64,
    pub debt_charged: AtomicU64,
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
    fn the_bound_is_members_times_batch_plus_skew() {
        let p = plan(&global(1000, 100), 3, Duration::from_millis(10));
        assert!((p.bound - (3.0 * p.b_max + 10.0)).abs() < 1e-6);
        assert!(p.bound <= allowed_error(&global(1000, 100)) + 10.0);
    }
}
