//! What `Stats`, `Health`, `RuleGet` and `RuleList` answer: counters gathered
//! from the limiter, the metrics and, with etcd, the cluster and the share
//! of every global rule. Admin-rate work, run on the blocking pool; the
//! one scan of the bucket table (tokens held per global rule) runs at most
//! every [`HELD_SCAN_EVERY`] however many clients ask.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, UNIX_EPOCH};

use parking_lot::Mutex;

use super::Shared;
use super::limiter::Rule;
use super::limiter::global::EtcdState;
use super::metrics::Metrics;
use crate::protocol::{
    ClusterStats, EtcdHealth, GlobalRuleStats, HealthReport, LeaseInfo, RuleInfo, ServingState,
    ShareStats, StatsReport,
};

/// How stale the held-token figures of stats and rule lists may be.
pub const HELD_SCAN_EVERY: Duration = Duration::from_millis(250);

/// Tokens held per global rule id.
type Held = Arc<hashbrown::HashMap<String, u64>>;

/// The latest scan of tokens held per global rule, and when it was taken.
#[derive(Debug, Default)]
pub(crate) struct HeldScan {
    latest: Mutex<Option<(Instant, Held)>>,
}

impl Shared {
    /// Tokens held per global rule: the latest scan if it is recent enough,
    /// else a new one (callers wait for one scan rather than each scanning).
    fn held_tokens(&self) -> Held {
        if !self.limiter.rules().iter().any(|r| r.global.is_some()) {
            return Arc::default();
        }
        let mut latest = self.held_scan.latest.lock();
        if let Some((at, held)) = &*latest
            && at.elapsed() < HELD_SCAN_EVERY
        {
            return Arc::clone(held);
        }
        let held = Arc::new(self.limiter.held_tokens(self.clock.now_ns()));
        *latest = Some((Instant::now(), Arc::clone(&held)));
        held
    }

    /// Counters, gauges and latency for `Stats`.
    pub fn stats(&self) -> StatsReport {
        let per_rule = self.limiter.rule_counters();
        let (allowed, rejected, bypassed) = self.limiter.decision_totals();
        let m = &self.metrics;
        let table = self.limiter.table();
        StatsReport {
            uptime_ns: self.clock.now_ns(),
            allowed,
            rejected,
            bypassed,
            unmatched: self.limiter.unmatched_total(),
            buckets: table.len() as u64,
            max_buckets: table.max_buckets() as u64,
            evicted_idle: Metrics::get(&table.evictions.idle),
            evicted_lru: Metrics::get(&table.evictions.lru),
            rules: per_rule.len() as u64,
            rules_expired: Metrics::get(&m.rules_expired),
            connections_open: Metrics::get(&m.connections_open),
            connections_total: Metrics::get(&m.connections_total),
            connections_rejected: Metrics::total(&m.connections_refused),
            protocol_errors: Metrics::get(&m.protocol_errors),
            latency: m.latency.summary(),
            per_rule,
            cluster: self.cluster_stats(),
        }
    }

    fn cluster_stats(&self) -> Option<ClusterStats> {
        let cluster = self.cluster.as_ref()?;
        let s = self.lease.as_ref()?;
        let held = self.held_tokens();
        let rules = self
            .limiter
            .rules()
            .iter()
            .filter_map(|r| {
                let lease = self.lease_info(r, held.get(r.id()).copied().unwrap_or(0))?;
                Some(GlobalRuleStats {
                    id: r.id().to_owned(),
                    lease,
                })
            })
            .collect();
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Some(ClusterStats {
            state: cluster.health.state().name().into(),
            state_changes: get(&cluster.health.transitions),
            members: get(&cluster.members),
            lease_txns: get(&s.txns),
            lease_conflicts: get(&s.conflicts),
            lease_failures: get(&s.failures),
            tokens_leased: 0,
            tokens_returned: 0,
            debt_charged: 0,
            dropped_events: get(&cluster.link.dropped_events),
            txn_latency: s.latency.summary(),
            rules,
            clock: Default::default(),
            lease_ops: get(&s.ops),
            lease_unknown: get(&s.unknown),
            lease_resolved: get(&s.resolved),
            lease_repairs: 0,
            lease_clamped: 0,
            bucket_cap_refusals: 0,
            shares: Some(self.share_stats(cluster, s)),
        })
    }

    fn share_stats(
        &self,
        cluster: &super::cluster::Cluster,
        s: &super::lease::LeaseStats,
    ) -> ShareStats {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let now = self.clock.now_ns();
        ShareStats {
            count: get(&s.count),
            valid_for_ns: cluster.link.valid_until().saturating_sub(now),
            recorded: self.limiter.recorded_shares() as u64,
            records_created: get(&s.records_created),
            records_deleted: get(&s.records_deleted),
            raises: get(&s.raises),
            lowers: get(&s.lowers),
            count_changes: get(&s.count_changes),
            etcd_db_bytes: get(&cluster.db.size_bytes),
            etcd_nospace: cluster.db.nospace.load(Ordering::Relaxed),
        }
    }

    /// The share of a global rule on this daemon (`None` for local rules).
    fn lease_info(&self, rule: &Rule, held: u64) -> Option<LeaseInfo> {
        let g = rule.global.as_ref()?;
        self.cluster.as_ref()?;
        let members = g.members.load(Ordering::Relaxed).max(1);
        Some(LeaseInfo {
            // The implicit share's depth (a bucket with no record).
            batch: g.implicit_bucket(&rule.params).1,
            per_request: false,
            members,
            // Shares sum to at most the rule: nothing beyond rate x t + burst.
            bound: 0.0,
            allowed_error: 0.0,
            held,
        })
    }

    /// One rule with counters (and lease plan) for `RuleGet`.
    pub fn rule_info(&self, id: &str) -> Option<RuleInfo> {
        let mut info = self.rulebook.get(id)?;
        if let Some(rule) = self.limiter.rules().get(id) {
            let held = if rule.global.is_some() {
                self.held_tokens().get(id).copied().unwrap_or(0)
            } else {
                0
            };
            info.lease = self.lease_info(rule, held);
        }
        Some(info)
    }

    /// Every rule for `RuleList`.
    pub fn rule_list(&self) -> Vec<RuleInfo> {
        let rules = self.limiter.rules();
        let held = self.held_tokens();
        let mut list = self.rulebook.list();
        for info in &mut list {
            if let Some(rule) = rules.get(&info.spec.id) {
                info.lease = self.lease_info(rule, held.get(rule.id()).copied().unwrap_or(0));
            }
        }
        list
    }

    /// Serving state for `Health`.
    pub fn health(&self) -> HealthReport {
        let etcd = self.cluster.as_ref().map(|c| {
            let (state, since, last_error) = c.health.snapshot();
            // A full database is the one thing to say, whatever the last
            // call said.
            let last_error = if c.db.nospace.load(Ordering::Relaxed) {
                "etcd's NOSPACE alarm is raised: its database reached its quota and it refuses \
                 every write; compact, defragment (etcdctl defrag), disarm the alarm \
                 (etcdctl alarm disarm) or raise --quota-backend-bytes"
                    .to_owned()
            } else {
                last_error
            };
            EtcdHealth {
                state: state.name().into(),
                since_unix_ms: since
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                members: c.members.load(Ordering::Relaxed),
                node_id: c.config.node_id.clone(),
                last_error,
                clock: Default::default(),
            }
        });
        let degraded = self
            .cluster
            .as_ref()
            .is_some_and(|c| c.health.state() != EtcdState::Healthy);
        HealthReport {
            state: if self.stopping.load(Ordering::Relaxed) {
                ServingState::Stopping
            } else if degraded {
                ServingState::Degraded
            } else {
                ServingState::Ok
            },
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ns: self.clock.now_ns(),
            rules: self.limiter.rules().len() as u64,
            mode: if self.cluster.is_some() {
                "etcd"
            } else {
                "standalone"
            }
            .into(),
            etcd,
        }
    }
}
