//! The sweeper: a timer that visits the bucket table one shard at a time,
//! dropping idle full buckets (see `ShardedTable::evict_idle`), then removes
//! run-time rules whose `expire_idle` has passed. The eviction logic itself is
//! synchronous and lives with the table, so it is tested without a runtime.

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
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&shared).await;
    }
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
