//! [`EtcdSource`]: lease operations of many buckets applied to etcd in few
//! transactions.
//!
//! Key (schema v1 path, v2 value): `{prefix}/v1/buckets/{rule}/{xxh3-128 of
//! the bucket key}`; the value is described in [`super::value`].
//!
//! One batch of operations (one per bucket, at most [`MAX_KEYS_PER_TXN`] per
//! transaction, under etcd's default `--max-txn-ops` of 128) costs:
//! - one read-only transaction for the keys whose value is not known yet
//!   (first contact, or after an unknown outcome);
//! - one compare-and-swap transaction: compare every key's mod_revision, put
//!   every new value; on a failed compare the else branch returns every
//!   current value, the keys that did not move are retried at once and the
//!   ones that moved go in a transaction of their own, so one contended key
//!   cannot hold the good ones back for long.
//!
//! Every value names the last operation of each daemon (`holders[node].op`),
//! so an operation whose outcome was unknown (deadline passed, connection
//! cut, leader change) is resolved on the next attempt: if its id is in the
//! value it committed, and its recorded grant is used; otherwise it is tried
//! again under the same id, and the compare on mod_revision makes sure at
//! most one of the attempts can commit.
//!
//! Keys are written under an etcd lease per rule that is never kept alive
//! and is replaced every [`KEY_LEASE_RENEW`]: a key expires no sooner than
//! the rule's bucket depth plus a margin after its last write (by then the
//! bucket would be full anyway), so idle buckets leave etcd by themselves.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use parking_lot::Mutex;

use super::value::{self, BucketValue, Params};
use super::{BucketRef, Done, Known, LeaseError, LeaseStats, Op, Outcome, Source};
use crate::daemon::health::{CallError, Health};
use crate::daemon::telemetry::Telemetry;

/// Keys per transaction (etcd's default `--max-txn-ops` is 128).
pub const MAX_KEYS_PER_TXN: usize = 100;
/// Compare-and-swap attempts of one batch before reporting contention.
const MAX_ATTEMPTS: u32 = 4;
/// A rule's key lease is replaced this often.
pub const KEY_LEASE_RENEW: Duration = Duration::from_secs(15);
/// How long a key outlives a full bucket, beyond the renewal period.
const KEY_MARGIN: Duration = Duration::from_secs(60);

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

/// The parameters of a bucket's rule.
pub fn params_of(bucket: &BucketRef) -> Params {
    Params {
        interval_ns: bucket.rule.params.interval_ns,
        tau_ns: bucket.rule.params.tau_ns,
    }
}

/// Leases from etcd.
#[derive(Clone)]
pub struct EtcdSource {
    client: etcd_client::Client,
    prefix: String,
    node: String,
    /// Upper bound of one call's deadline (the etcd timeout).
    deadline: Duration,
    health: Arc<Health>,
    stats: Arc<LeaseStats>,
    /// Transactions become spans when traces are exported.
    telemetry: Option<Arc<Telemetry>>,
    /// Per rule and bucket depth: the etcd lease new key writes attach to,
    /// and when it was granted.
    key_leases: Arc<Mutex<HashMap<String, (i64, Instant)>>>,
    /// Keys other daemons write too (a compare failed on them recently):
    /// their value is read just before the write instead of trusting our
    /// last one, which is stale, so the write does not fail and cost a
    /// second raft round. A read is a linearizable read (no raft entry).
    contended: Arc<Mutex<Contended>>,
}

/// Keys seen contended, forgotten every [`CONTENDED_FOR`] (bounded by the
/// number of buckets this daemon leases for).
#[derive(Debug)]
struct Contended {
    keys: std::collections::HashSet<String>,
    since: Instant,
}

/// How long a key seen contended is treated so.
const CONTENDED_FOR: Duration = Duration::from_secs(10);

impl std::fmt::Debug for EtcdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSource")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// One operation being worked on within a batch.
struct Slot {
    op: Op,
    key: String,
    done: Option<Done>,
    /// Set when the value read was not a bucket value and was replaced.
    repaired: bool,
}

impl EtcdSource {
    pub fn new(
        client: etcd_client::Client,
        prefix: String,
        node: String,
        deadline: Duration,
        health: Arc<Health>,
        stats: Arc<LeaseStats>,
        telemetry: Option<Arc<Telemetry>>,
    ) -> EtcdSource {
        EtcdSource {
            client,
            prefix,
            node,
            deadline,
            health,
            stats,
            telemetry,
            key_leases: Arc::new(Mutex::new(HashMap::new())),
            contended: Arc::new(Mutex::new(Contended {
                keys: std::collections::HashSet::new(),
                since: Instant::now(),
            })),
        }
    }

    /// This daemon's node id (the holder name in bucket values).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs one etcd call within the adaptive deadline, feeding the health
    /// machine and the failure count.
    async fn call<T, Fut>(&self, call: impl FnMut() -> Fut) -> Result<T, LeaseError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = self
            .stats
            .txn_deadline(self.deadline)
            .unwrap_or(self.deadline);
        self.health.guard(deadline, call).await.map_err(|e| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            match e {
                CallError::Timeout(d) => {
                    self.stats.timed_out(d);
                    LeaseError::Timeout(d)
                }
                CallError::Etcd(e) => LeaseError::Etcd(e),
            }
        })
    }

    /// One transaction over `slots[idx]` (a read or a swap).
    async fn txn(
        &self,
        txn: Txn,
        slots: &[Slot],
        idx: &[usize],
    ) -> Result<etcd_client::TxnResponse, LeaseError> {
        let wall = self.telemetry.as_ref().map(|_| SystemTime::now());
        let result = self.txn_untraced(txn).await;
        if let (Some(t), Some(wall)) = (&self.telemetry, wall) {
            let mut rules: Vec<&str> = idx.iter().map(|&i| slots[i].op.bucket.rule.id()).collect();
            rules.sort_unstable();
            rules.dedup();
            let error = result.as_ref().err().map(ToString::to_string);
            t.lease_txn(
                wall,
                &rules,
                idx.len(),
                error.as_deref().map_or(Ok(()), Err),
            );
        }
        result
    }

    async fn txn_untraced(&self, txn: Txn) -> Result<etcd_client::TxnResponse, LeaseError> {
        let client = self.client.clone();
        let started = Instant::now();
        let resp = self
            .call(|| {
                let (mut c, txn) = (client.clone(), txn.clone());
                async move { c.txn(txn).await }
            })
            .await
            .inspect_err(|_| {
                self.stats.txn_failures.fetch_add(1, Ordering::Relaxed);
            })?;
        self.stats.txns.fetch_add(1, Ordering::Relaxed);
        self.stats
            .latency
            .record_one(started.elapsed().as_nanos() as u64);
        Ok(resp)
    }

    /// The lease a new write of `rule`'s keys attaches to (granted anew
    /// every [`KEY_LEASE_RENEW`], with a TTL of the bucket depth plus margins).
    async fn key_lease(&self, rule: &str, params: Params) -> Result<i64, LeaseError> {
        // Per rule *and* depth: an edited rule with a deeper bucket must not
        // reuse a lease whose TTL was sized for the old one (its keys would
        // expire while not yet full, and come back full).
        let cache_key = format!("{rule}/{}", params.tau_ns);
        if let Some((id, at)) = self.key_leases.lock().get(&cache_key)
            && at.elapsed() < KEY_LEASE_RENEW
        {
            return Ok(*id);
        }
        let ttl = Duration::from_nanos(params.tau_ns) + KEY_LEASE_RENEW + KEY_MARGIN;
        let ttl = ttl.as_secs().max(1) as i64;
        let client = self.client.clone();
        let lease = self
            .call(|| {
                let mut c = client.clone();
                async move { c.lease_grant(ttl, None).await }
            })
            .await?;
        let mut leases = self.key_leases.lock();
        leases.retain(|_, (_, at)| at.elapsed() < KEY_LEASE_RENEW);
        leases.insert(cache_key, (lease.id(), Instant::now()));
        Ok(lease.id())
    }

    /// Reads the values of the slots that have none known. On failure those
    /// slots are done (`Failed`, or `Unknown` if they were uncertain).
    async fn read_unknown(&self, slots: &mut [Slot]) {
        let idx: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].done.is_none() && slots[i].op.known.is_none())
            .collect();
        if idx.is_empty() {
            return;
        }
        let gets: Vec<TxnOp> = idx
            .iter()
            .map(|&i| TxnOp::get(slots[i].key.as_str(), None))
            .collect();
        match self.txn(Txn::new().and_then(gets), slots, &idx).await {
            Ok(resp) => {
                for (&i, r) in idx.iter().zip(resp.op_responses().iter()) {
                    let slot = &mut slots[i];
                    let (known, repaired) = known_from(&slot.key, &slot.op, r);
                    slot.op.known = Some(known);
                    slot.repaired |= repaired;
                }
            }
            Err(e) => {
                for &i in &idx {
                    let slot = &mut slots[i];
                    slot.done = Some(not_done(&slot.op, e.clone_kind()));
                }
            }
        }
    }

    /// Resolves uncertain slots whose operation is recorded in the value:
    /// it committed, and its recorded grant stands.
    /// Not only uncertain slots: a transaction the call layer resent after
    /// Unavailable / a transport error may have committed the first time,
    /// and our identity in the value is the proof either way.
    fn resolve(&self, slots: &mut [Slot]) {
        for slot in slots.iter_mut().filter(|s| s.done.is_none()) {
            let Some(known) = &slot.op.known else {
                continue;
            };
            if let Some(h) = known.value.holders.get(&self.node)
                && h.op == slot.op.ask.op
            {
                slot.done = Some(Done {
                    outcome: Outcome::Committed {
                        granted: h.granted,
                        retry_after: Duration::ZERO,
                        revision: known.revision,
                    },
                    known: slot.op.known.clone(),
                    resolved: true,
                    repaired: slot.repaired,
                    clamped: false,
                });
            }
        }
    }

    /// One compare-and-swap round over the open slots in `idx`, in one
    /// transaction of nested per-key transactions (etcd 3.3+): each key's
    /// compare decides only its own write, so a key another daemon moved
    /// fails alone (answered with its current value) and the others commit
    /// in the same raft round. Returns the slots whose key moved (to retry);
    /// every other slot is done.
    async fn swap(&self, slots: &mut [Slot], idx: &[usize]) -> Vec<usize> {
        // Slots whose value could not be read are already done (failed).
        let idx: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| slots[i].done.is_none())
            .collect();
        let idx = idx.as_slice();
        if idx.is_empty() {
            return Vec::new();
        }
        let now = wall_ns();
        let mut nested = Vec::with_capacity(idx.len());
        let mut results = Vec::with_capacity(idx.len());
        for &i in idx {
            let slot = &mut slots[i];
            let params = params_of(&slot.op.bucket);
            let known = slot.op.known.as_ref().expect("read before swap");
            let mut next = known.value.clone();
            let clamped = value::normalize(&mut next, params, now);
            let applied = value::apply(&mut next, &self.node, &slot.op.ask, params, now);
            let lease = match self.key_lease(slot.op.bucket.rule.id(), params).await {
                Ok(id) => id,
                Err(e) => {
                    // Nothing was sent for any slot of this round.
                    for &j in idx {
                        let s = &mut slots[j];
                        if s.done.is_none() {
                            s.done = Some(not_done(&s.op, e.clone_kind()));
                        }
                    }
                    return Vec::new();
                }
            };
            let compare = if known.revision == 0 {
                Compare::create_revision(slot.key.as_str(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(slot.key.as_str(), CompareOp::Equal, known.revision)
            };
            let json = serde_json::to_vec(&next).expect("bucket values serialize");
            let put = TxnOp::put(
                slot.key.as_str(),
                json,
                Some(PutOptions::new().with_lease(lease)),
            );
            let get = TxnOp::get(slot.key.as_str(), None);
            nested.push(TxnOp::txn(
                Txn::new().when([compare]).and_then([put]).or_else([get]),
            ));
            results.push((next, applied, clamped));
        }
        let resp = match self.txn(Txn::new().and_then(nested), slots, idx).await {
            Ok(resp) => resp,
            Err(e) => {
                // The transaction may or may not have committed.
                for &i in idx {
                    let slot = &mut slots[i];
                    slot.op.uncertain = true;
                    slot.op.known = None;
                    slot.done = Some(Done {
                        outcome: Outcome::Unknown(e.clone_kind()),
                        known: None,
                        resolved: false,
                        repaired: slot.repaired,
                        clamped: false,
                    });
                }
                return Vec::new();
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        let answers = resp.op_responses();
        let mut moved = Vec::new();
        for ((&i, (next, applied, clamped)), answer) in idx.iter().zip(results).zip(answers) {
            let slot = &mut slots[i];
            let inner = match answer {
                TxnOpResponse::Txn(inner) => inner,
                // Not what was asked: treat the key as moved and re-read it.
                _ => {
                    slot.op.known = None;
                    moved.push(i);
                    continue;
                }
            };
            if inner.succeeded() {
                let known = Known {
                    value: next,
                    revision,
                };
                slot.done = Some(Done {
                    outcome: Outcome::Committed {
                        granted: applied.granted,
                        retry_after: applied.retry_after,
                        revision,
                    },
                    known: Some(known),
                    resolved: false,
                    repaired: slot.repaired,
                    clamped,
                });
            } else {
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                self.contended.lock().keys.insert(slot.key.clone());
                // Its compare failed: nothing was written for it. Learn its
                // current value from the answer.
                let current = inner.op_responses();
                match current.first() {
                    Some(r) => {
                        let (known, repaired) = known_from(&slot.key, &slot.op, r);
                        slot.op.known = Some(known);
                        slot.repaired |= repaired;
                    }
                    None => slot.op.known = None,
                }
                moved.push(i);
            }
        }
        moved
    }

    /// Applies one chunk (at most [`MAX_KEYS_PER_TXN`] operations).
    async fn apply_chunk(&self, slots: &mut [Slot]) {
        {
            let mut contended = self.contended.lock();
            if contended.since.elapsed() >= CONTENDED_FOR {
                contended.keys.clear();
                contended.since = Instant::now();
            }
            for slot in slots.iter_mut() {
                // Uncertain operations are resolved from a fresh read anyway.
                if contended.keys.contains(&slot.key) {
                    slot.op.known = None;
                }
            }
        }
        self.read_unknown(slots).await;
        self.resolve(slots);
        let mut queue: Vec<Vec<usize>> = vec![
            (0..slots.len())
                .filter(|&i| slots[i].done.is_none())
                .collect(),
        ];
        let mut attempts = 0;
        while let Some(idx) = queue.pop() {
            if idx.is_empty() {
                continue;
            }
            if attempts >= MAX_ATTEMPTS * 2 {
                for &i in &idx {
                    let slot = &mut slots[i];
                    slot.done = Some(not_done(&slot.op, LeaseError::Contended(MAX_ATTEMPTS)));
                }
                continue;
            }
            attempts += 1;
            self.read_unknown(slots).await;
            let moved = self.swap(slots, &idx).await;
            if moved.is_empty() && idx.iter().all(|&i| slots[i].done.is_some()) {
                continue;
            }
            // Another daemon's write may have carried our uncertain op.
            self.resolve(slots);
            let open: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&i| slots[i].done.is_none())
                .collect();
            let (hot, calm): (Vec<usize>, Vec<usize>) =
                open.into_iter().partition(|i| moved.contains(i));
            if !hot.is_empty() {
                // Spread retries of contended keys between daemons.
                let jitter = rand::random::<u64>() % (1_000 * u64::from(attempts));
                tokio::time::sleep(Duration::from_micros(jitter)).await;
            }
            queue.push(hot);
            queue.push(calm);
        }
    }
}

impl LeaseError {
    /// A copy of the error's kind and message (etcd errors are not `Clone`).
    pub fn clone_kind(&self) -> LeaseError {
        match self {
            LeaseError::Timeout(d) => LeaseError::Timeout(*d),
            LeaseError::Contended(n) => LeaseError::Contended(*n),
            other => LeaseError::Failed(other.to_string()),
        }
    }
}

/// The outcome of an operation that was not sent this time: still unknown
/// if an earlier attempt may have committed, otherwise not applied.
fn not_done(op: &Op, e: LeaseError) -> Done {
    Done {
        outcome: if op.uncertain {
            Outcome::Unknown(e)
        } else {
            Outcome::Failed(e)
        },
        known: None,
        resolved: false,
        repaired: false,
        clamped: false,
    }
}

/// The known value from a get response; an unreadable value is replaced by
/// [`value::repaired`] (an empty bucket) at the same revision, so the next
/// write overwrites it.
fn known_from(key: &str, op: &Op, resp: &TxnOpResponse) -> (Known, bool) {
    let kv = match resp {
        TxnOpResponse::Get(get) => get.kvs().first(),
        _ => None,
    };
    let Some(kv) = kv else {
        return (
            Known {
                value: value::fresh(params_of(&op.bucket)),
                revision: 0,
            },
            false,
        );
    };
    match serde_json::from_slice::<BucketValue>(kv.value()) {
        Ok(value) => (
            Known {
                value,
                revision: kv.mod_revision(),
            },
            false,
        ),
        Err(e) => {
            tracing::error!(
                %key,
                "global bucket value is unreadable ({e}); rewriting it as an empty bucket"
            );
            (
                Known {
                    value: value::repaired(params_of(&op.bucket), wall_ns()),
                    revision: kv.mod_revision(),
                },
                true,
            )
        }
    }
}

impl Source for EtcdSource {
    fn node(&self) -> &str {
        &self.node
    }

    async fn apply(&self, ops: Vec<Op>) -> Vec<(Op, Done)> {
        let mut slots: Vec<Slot> = ops
            .into_iter()
            .map(|op| Slot {
                key: bucket_key(&self.prefix, &op.bucket),
                op,
                done: None,
                repaired: false,
            })
            .collect();
        // Chunks go one after another: the number of transactions in flight
        // per daemon is bounded by the coordinator's batches in flight.
        for chunk in slots.chunks_mut(MAX_KEYS_PER_TXN) {
            self.apply_chunk(chunk).await;
        }
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let mut done = slot
                .done
                .unwrap_or_else(|| not_done(&slot.op, LeaseError::Failed("not attempted".into())));
            done.repaired |= slot.repaired;
            if done.repaired {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.health.failure(
                    "an unreadable global bucket value was repaired",
                    Instant::now(),
                );
            }
            if done.clamped {
                self.stats.clamped.fetch_add(1, Ordering::Relaxed);
            }
            out.push((slot.op, done));
        }
        out
    }
}
