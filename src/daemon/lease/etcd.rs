//! The global buckets in etcd, and [`EtcdSource`], which leases from them.
//!
//! Key (schema v1): `{prefix}/v1/buckets/{rule}/{xxh3-128 of the bucket key}`;
//! value: JSON `{"tat_ns": .., "holders": {"node": tokens}}` where `tat_ns` is
//! the GCRA theoretical arrival time in wall-clock nanoseconds and `holders`
//! shows who holds tokens from the last grants. A lease is one transaction:
//! compare the key's mod_revision, put the advanced TAT; on conflict the else
//! branch returns the fresh value, so a retry costs one round trip. Wall
//! clocks (`base = max(tat, now)`) mean clock skew costs at most `rate x skew`
//! and never accumulates; durations use the monotonic clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::{BucketRef, Grant, LeaseError, LeaseStats, Source};
use crate::daemon::cluster::health::{CallError, Health};

/// Attempts of one lease before reporting contention.
const MAX_ATTEMPTS: u32 = 5;

/// The JSON value of a global bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketValue {
    pub tat_ns: u64,
    #[serde(default)]
    pub holders: BTreeMap<String, u64>,
}

/// The etcd key of a global bucket.
pub fn bucket_key(prefix: &str, bucket: &BucketRef) -> String {
    let hash = xxhash_rust::xxh3::xxh3_128(bucket.key.bytes());
    format!("{prefix}/v1/buckets/{}/{hash:032x}", bucket.rule.id())
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Takes up to `want` tokens: `(granted, new value)`.
pub fn take_tokens(
    value: &BucketValue,
    now: u64,
    want: u64,
    interval_ns: u64,
    tau_ns: u64,
) -> (u64, u64) {
    let base = value.tat_ns.max(now);
    let room = (now + tau_ns).saturating_sub(base) / interval_ns;
    let granted = want.min(room);
    (granted, base + granted * interval_ns)
}

/// Gives back `held` tokens and charges `debt`: the new TAT.
pub fn return_tokens(
    tat: u64,
    now: u64,
    held: u64,
    debt: u64,
    interval_ns: u64,
    tau_ns: u64,
) -> u64 {
    let mut tat = tat;
    if tat > now {
        // Returned tokens refill, but never past full.
        tat = tat
            .saturating_sub(held.saturating_mul(interval_ns))
            .max(now);
    }
    if debt > 0 {
        // Debt is charged at most one full bucket deep: no burst after an
        // outage, no lockout either.
        tat = (tat.max(now) + debt.saturating_mul(interval_ns)).min(now + tau_ns);
    }
    tat
}

/// Leases from etcd.
#[derive(Clone)]
pub struct EtcdSource {
    client: etcd_client::Client,
    prefix: String,
    node: String,
    deadline: Duration,
    health: Arc<Health>,
    stats: Arc<LeaseStats>,
}

impl std::fmt::Debug for EtcdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSource")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The current value and mod_revision of a key (revision 0: absent).
struct Current {
    value: BucketValue,
    revision: i64,
}

impl EtcdSource {
    pub fn new(
        client: etcd_client::Client,
        prefix: String,
        node: String,
        deadline: Duration,
        health: Arc<Health>,
        stats: Arc<LeaseStats>,
    ) -> EtcdSource {
        EtcdSource {
            client,
            prefix,
            node,
            deadline,
            health,
            stats,
        }
    }

    /// Runs one etcd call with the deadline (retrying Unavailable on another
    /// endpoint), feeding the health machine.
    async fn call<T, Fut>(&self, call: impl FnMut() -> Fut) -> Result<T, LeaseError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        // Adaptive within the etcd timeout, not the generic deadline.
        let deadline = self
            .stats
            .txn_deadline(self.deadline)
            .unwrap_or(self.deadline);
        self.health.guard(deadline, call).await.map_err(|e| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            match e {
                CallError::Timeout(d) => LeaseError::Timeout(d),
                CallError::Etcd(e) => LeaseError::Etcd(e),
            }
        })
    }

    async fn read(&self, key: &str) -> Result<Current, LeaseError> {
        let client = self.client.clone();
        let resp = self
            .call(|| {
                let mut c = client.clone();
                let key = key.to_owned();
                async move { c.get(key, None).await }
            })
            .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Current {
                value: parse(key, kv.value())?,
                revision: kv.mod_revision(),
            }),
            None => Ok(Current {
                value: BucketValue::default(),
                revision: 0,
            }),
        }
    }

    /// Compare-and-swap loop: `update` computes the new value from the
    /// current one (or `None` for no change).
    async fn update<R>(
        &self,
        key: &str,
        mut update: impl FnMut(&BucketValue, u64) -> Option<(BucketValue, R)>,
    ) -> Result<Option<R>, LeaseError> {
        let mut current = self.read(key).await?;
        for attempt in 0..MAX_ATTEMPTS {
            let Some((next, result)) = update(&current.value, wall_ns()) else {
                return Ok(None);
            };
            let json = serde_json::to_vec(&next).expect("bucket values serialize");
            let compare = if current.revision == 0 {
                Compare::create_revision(key, CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key, CompareOp::Equal, current.revision)
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key, json, None)])
                .or_else([TxnOp::get(key, None)]);
            let started = Instant::now();
            let client = self.client.clone();
            let resp = self
                .call(|| {
                    let (mut c, txn) = (client.clone(), txn.clone());
                    async move { c.txn(txn).await }
                })
                .await?;
            self.stats.txns.fetch_add(1, Ordering::Relaxed);
            self.stats
                .latency
                .record_one(started.elapsed().as_nanos() as u64);
            if resp.succeeded() {
                return Ok(Some(result));
            }
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            current = match resp.op_responses().into_iter().next() {
                Some(TxnOpResponse::Get(get)) => match get.kvs().first() {
                    Some(kv) => Current {
                        value: parse(key, kv.value())?,
                        revision: kv.mod_revision(),
                    },
                    None => Current {
                        value: BucketValue::default(),
                        revision: 0,
                    },
                },
                _ => self.read(key).await?,
            };
            // Conflicts mean another daemon is on this bucket: spread retries.
            let jitter = rand::random::<u64>() % (2_000 * u64::from(attempt + 1));
            tokio::time::sleep(Duration::from_micros(jitter)).await;
        }
        Err(LeaseError::Contended(MAX_ATTEMPTS))
    }
}

fn parse(key: &str, bytes: &[u8]) -> Result<BucketValue, LeaseError> {
    serde_json::from_slice(bytes).map_err(|e| LeaseError::Corrupt {
        key: key.to_owned(),
        message: format!("not a bucket value ({e}); delete the key to reset the bucket"),
    })
}

impl Source for EtcdSource {
    async fn take(&self, bucket: &BucketRef, want: u64, min: u64) -> Result<Grant, LeaseError> {
        let key = bucket_key(&self.prefix, bucket);
        let p = bucket.rule.params;
        let node = self.node.clone();
        let mut retry_after = Duration::ZERO;
        let granted = self
            .update(&key, |value, now| {
                let (granted, tat) = take_tokens(value, now, want, p.interval_ns, p.tau_ns);
                if granted == 0 || granted < min {
                    let base = value.tat_ns.max(now);
                    let ready = base + want.max(min) * p.interval_ns;
                    retry_after = Duration::from_nanos(ready.saturating_sub(now + p.tau_ns));
                    return None;
                }
                let mut next = value.clone();
                next.tat_ns = tat;
                next.holders.insert(node.clone(), granted);
                Some((next, granted))
            })
            .await?;
        let tokens = granted.unwrap_or(0);
        self.stats
            .tokens_leased
            .fetch_add(tokens, Ordering::Relaxed);
        Ok(Grant {
            tokens,
            retry_after,
        })
    }

    async fn give_back(&self, bucket: &BucketRef, held: u64, debt: u64) -> Result<(), LeaseError> {
        if held == 0 && debt == 0 {
            return Ok(());
        }
        let key = bucket_key(&self.prefix, bucket);
        let p = bucket.rule.params;
        let node = self.node.clone();
        self.update(&key, |value, now| {
            let mut next = value.clone();
            next.tat_ns = return_tokens(value.tat_ns, now, held, debt, p.interval_ns, p.tau_ns);
            next.holders.remove(&node);
            Some((next, ()))
        })
        .await?;
        self.stats
            .tokens_returned
            .fetch_add(held, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn takes_only_what_the_bucket_has() {
        // 1 token per ms, burst 100.
        let v = BucketValue::default();
        let now = 1_000_000 * MS;
        assert_eq!(take_tokens(&v, now, 30, MS, 100 * MS), (30, now + 30 * MS));
        let v = BucketValue {
            tat_ns: now + 90 * MS,
            ..Default::default()
        };
        assert_eq!(take_tokens(&v, now, 30, MS, 100 * MS), (10, now + 100 * MS));
        let empty = BucketValue {
            tat_ns: now + 100 * MS,
            ..Default::default()
        };
        assert_eq!(take_tokens(&empty, now, 30, MS, 100 * MS).0, 0);
    }

    #[test]
    fn returns_refill_and_debts_are_capped_at_one_bucket() {
        let now = 1_000 * MS;
        assert_eq!(
            return_tokens(now + 50 * MS, now, 20, 0, MS, 100 * MS),
            now + 30 * MS
        );
        assert_eq!(
            return_tokens(now + 5 * MS, now, 20, 0, MS, 100 * MS),
            now,
            "never past full"
        );
        assert_eq!(
            return_tokens(now - 5 * MS, now, 20, 0, MS, 100 * MS),
            now - 5 * MS
        );
        assert_eq!(return_tokens(now, now, 0, 30, MS, 100 * MS), now + 30 * MS);
        assert_eq!(
            return_tokens(now, now, 0, 5000, MS, 100 * MS),
            now + 100 * MS
        );
    }

    #[test]
    fn values_are_readable_json() {
        let mut v = BucketValue {
            tat_ns: 5,
            ..Default::default()
        };
        v.holders.insert("a".into(), 3);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, r#"{"tat_ns":5,"holders":{"a":3}}"#);
        assert!(parse("k", b"garbage").is_err());
    }
}
