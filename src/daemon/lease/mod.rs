//! Leasing shares of global rules through etcd (the v2 lease): the share
//! arithmetic ([`share`], pure and property-tested), what this daemon knows
//! of etcd ([`view`]), the etcd I/O ([`store`]), the [`Coordinator`] task
//! that decides what to write, and the audit log ([`audit`]).
//!
//! The hot path never waits for any of this: it decides from a local
//! bucket at this daemon's share (`limiter::global`) and, when a bucket
//! wants more, sends the coordinator an event without waiting. etcd work
//! follows keys whose demand is uneven, never the request rate: a bucket
//! with no record uses the implicit share `1/n`, which costs nothing.

pub mod audit;
mod coordinator;
pub mod share;
pub mod store;
pub mod view;

pub use coordinator::{Coordinator, LeaseEvent, Planner, QueueSink, Wiring};

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::metrics::LatencyHistogram;

/// How long a member key (and with it every share of its daemon) outlives
/// the daemon's last keep-alive: a dead daemon's shares return to the
/// others this long after it stopped renewing.
pub const MEMBER_TTL: Duration = Duration::from_secs(10);

/// A daemon stops using its shares this long before its member key can
/// expire: a margin for the two clocks (this host's monotonic clock against
/// the etcd leader's) running at different rates, and for the time between
/// deciding and answering. With `MEMBER_TTL` of 10 s, shares are in force
/// for at most 9.6 s after the keep-alive that renewed them was *sent*.
pub fn validity_after_send(ttl: Duration) -> Duration {
    // 1% of the TTL for clock rates (NTP slews at most 0.05%), plus 300 ms.
    ttl.saturating_sub(ttl / 100 + Duration::from_millis(300))
}

/// Why a lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd call timed out after {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Failed(String),
}

impl LeaseError {
    /// A copy for reporting to each operation of a batch.
    pub fn clone_kind(&self) -> LeaseError {
        match self {
            LeaseError::Timeout(d) => LeaseError::Timeout(*d),
            other => LeaseError::Failed(other.to_string()),
        }
    }

    /// etcd answered and refused: nothing of the call was applied (a full
    /// database, a permission, a malformed request). A timeout or a broken
    /// connection may have applied it.
    pub fn applied_nothing(&self) -> bool {
        match self {
            LeaseError::Etcd(etcd_client::Error::GRpcStatus(s)) => matches!(
                s.code(),
                tonic::Code::ResourceExhausted
                    | tonic::Code::PermissionDenied
                    | tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::Unauthenticated
                    | tonic::Code::OutOfRange
            ),
            _ => false,
        }
    }
}

/// Lease counters (for `rlctl stats` and metrics).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Transactions etcd answered.
    pub txns: AtomicU64,
    /// Transactions that failed or timed out.
    pub txn_failures: AtomicU64,
    /// Record writes whose compare failed (another daemon moved the record
    /// first; decided again from the view).
    pub conflicts: AtomicU64,
    pub failures: AtomicU64,
    /// Record writes sent (one per record per transaction).
    pub ops: AtomicU64,
    /// Writes whose outcome was unknown, and how many of those the watch
    /// later showed committed.
    pub unknown: AtomicU64,
    pub resolved: AtomicU64,
    /// Records this daemon created and deleted; its shares raised and
    /// lowered; changes of its operating count.
    pub records_created: AtomicU64,
    pub records_deleted: AtomicU64,
    pub raises: AtomicU64,
    pub lowers: AtomicU64,
    pub count_changes: AtomicU64,
    /// The operating count now (0: shares not in force).
    pub count: AtomicU64,
    pub latency: LatencyHistogram,
}

/// Tuning of the coordinator.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// Fallback limit of `on_failure = "local"`: `limit * (1 + slack) / N`.
    pub fallback_slack: f64,
    /// Buckets per rule whose demand this daemon watches at once; beyond it
    /// new ones stay at their implicit share until others go quiet.
    pub max_buckets_per_rule: usize,
    /// Compact etcd's history this often (when this daemon holds the
    /// compactor role), keeping what is newer than one period; zero: never.
    pub compact_every: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            fallback_slack: 0.1,
            max_buckets_per_rule: 100_000,
            compact_every: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_end_before_the_member_key_can_expire() {
        let v = validity_after_send(MEMBER_TTL);
        assert_eq!(v, Duration::from_millis(9_600));
        assert!(v < MEMBER_TTL);
        assert_eq!(
            validity_after_send(Duration::from_millis(200)),
            Duration::ZERO
        );
    }
}
