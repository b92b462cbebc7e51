//! The hot path's side of the coordinator: the events it sends (a bucket
//! wants more; a recorded bucket is gone), the queue they go through, and
//! the [`Planner`] that sets each global rule's implicit share and fallback
//! (synchronously, when a rule is installed, so its first request has them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::daemon::lease::LeaseSettings;
use crate::daemon::limiter::global::LeaseSink;
use crate::daemon::limiter::key::BucketKey;
use crate::daemon::limiter::{MonotonicClock, Rule};

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
