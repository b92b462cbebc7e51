//! The sweeper: a timer that visits the bucket table one shard at a time,
//! dropping idle full buckets (see `ShardedTable::evict_idle`), then removes
//! run-time rules whose `expire_idle` has passed. The eviction logic itself is
//! synchronous and lives with the table, so it is tested without a runtime.
//!
//! Rules in etcd with `expire_idle` expire when no daemon has matched them
//! for that long: a daemon that matches one marks it used in etcd (a key on
//! a lease of `expire_idle` plus a quarter, renewed at most every quarter),
//! and a daemon that has not matched it for `expire_idle` deletes it only
//! if no daemon's mark is alive, in one transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::metrics::Metrics;

/// Shards visited between yields to the runtime.
const SHARDS_PER_YIELD: usize = 16;

/// Sweeps every `interval` until `cancel` fires.
pub async fn run(shared: Arc<Shared>, interval: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut marks = Marks::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&shared).await;
        expire_etcd_rules(&shared, &mut marks).await;
    }
}

/// Per etcd rule with `expire_idle`: the last match this daemon marked in
/// etcd, and when (monotonic ns); and when a deletion was last tried.
#[derive(Debug, Default)]
struct Marks {
    rules: HashMap<String, Mark>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Mark {
    /// The rule's last match (`RuleActivity::last_match_ns`) when marked.
    matched: u64,
    /// When it was marked.
    at: Option<u64>,
    /// When this daemon last tried to delete it.
    tried: Option<u64>,
}

/// Marks the etcd rules this daemon matched since it last said so (at most
/// every quarter of their `expire_idle`), and deletes those no daemon has
/// matched for their `expire_idle` (their use key gone). Nothing happens
/// while etcd is unreachable: a rule is never deleted on a guess.
async fn expire_etcd_rules(shared: &Arc<Shared>, marks: &mut Marks) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let rules = shared.limiter.rules();
    let now = shared.clock.now_ns();
    let mut live = Vec::new();
    for r in rules.iter() {
        let Some(idle) = r.spec.expire_idle else {
            continue;
        };
        if r.source != crate::protocol::RuleSource::Etcd {
            continue;
        }
        live.push(r.id().to_owned());
        let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let quarter = (idle_ns / 4).max(1_000_000_000);
        let last = r.activity.last_match_ns();
        let mark = marks.rules.entry(r.id().to_owned()).or_default();
        let fresh = mark.at.is_none() || last > mark.matched;
        if fresh && mark.at.is_none_or(|at| now.saturating_sub(at) >= quarter) {
            let ttl = idle.saturating_add(idle / 4);
            match cluster.mark_rule_used(r.id(), ttl).await {
                Ok(()) => {
                    *mark = Mark {
                        matched: last,
                        at: Some(now),
                        tried: mark.tried,
                    };
                }
                Err(e) => tracing::debug!(rule = %r.id(), "could not mark the rule used: {e}"),
            }
            continue;
        }
        let unused = now.saturating_sub(last)
            >= idle_ns.saturating_add(crate::daemon::limiter::rules::LAST_MATCH_GRANULE_NS);
        let retry = mark.tried.is_none_or(|t| now.saturating_sub(t) >= quarter);
        if unused && retry {
            mark.tried = Some(now);
            match cluster.delete_rule_if_unused(r.id()).await {
                Ok(true) => {
                    Metrics::inc(&shared.metrics.rules_expired);
                    tracing::info!(
                        rule = %r.id(),
                        "deleted the rule from etcd: no daemon matched it for its expire_idle"
                    );
                    let book = Arc::clone(&shared.rulebook);
                    let id = r.id().to_owned();
                    let _ = tokio::task::spawn_blocking(move || book.apply_etcd_delete(&id)).await;
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(rule = %r.id(), "could not expire the rule: {e}"),
            }
        }
    }
    marks.rules.retain(|id, _| live.contains(id));
}

/// One pass over the table and the rules.
pub async fn sweep(shared: &Arc<Shared>) {
    let table = shared.limiter.table();
    let mut evicted = 0;
    for shard in 0..table.shard_count() {
        evicted += shared.limiter.evict_idle(shard, shared.clock.now_ns());
        if shard % SHARDS_PER_YIELD == SHARDS_PER_YIELD - 1 {
            tokio::task::yield_now().await;
        }
    }
    if evicted > 0 {
        tracing::debug!(evicted, "evicted idle buckets");
    }
    let expiring = shared
        .limiter
        .rules()
        .iter()
        .any(|r| r.spec.expire_idle.is_some());
    if !expiring {
        return;
    }
    let book = Arc::clone(&shared.rulebook);
    let now = shared.clock.now_ns();
    match tokio::task::spawn_blocking(move || book.expire_idle(now)).await {
        Ok(Ok(ids)) => {
            for id in &ids {
                Metrics::inc(&shared.metrics.rules_expired);
                tracing::info!(rule = %id, "removed rule idle longer than its expire_idle");
            }
        }
        Ok(Err(e)) => tracing::warn!("could not expire idle rules: {e}"),
        Err(e) => tracing::error!("rule expiry task failed: {e}"),
    }
}
