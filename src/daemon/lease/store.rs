//! The etcd side of shares: the watch that feeds the [`View`](super::view),
//! and the writes: this daemon's member key (its operating count) and its
//! entries in records, many records per transaction.
//!
//! A batch is one transaction of nested per-record transactions (etcd
//! 3.3+): each record's compare decides only its own write, so a record
//! another daemon moved fails alone and the rest commit in the same raft
//! round. Nothing is read back: the watch brings every commit, this
//! daemon's included, in etcd's order, and that is how an answer lost in
//! transit is resolved (the record shows the operation's identity, or moved
//! on without it, or is unchanged and the same write is sent again: its
//! compare lets at most one attempt commit).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::view::{MemberValue, Paths};
use super::{LeaseError, LeaseStats};
use crate::daemon::health::{CallError, Health};
use crate::daemon::telemetry::Telemetry;

/// Records per transaction (etcd's default `--max-txn-ops` is 128; a nested
/// transaction counts its compares and its write).
pub const MAX_RECORDS_PER_TXN: usize = 60;

/// A watch that answers nothing (not even the progress asked for every
/// second) for this long is made anew.
pub const WATCH_SILENCE: Duration = Duration::from_secs(3);

/// One write of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordWrite {
    pub key: String,
    /// The record's mod_revision this write replaces (0: it is absent).
    pub expect: i64,
    /// A creation also requires that no member key changed after this
    /// revision (the creator listed every operating daemon as of it).
    pub members_at: Option<i64>,
    /// The new value (`None`: delete the record).
    pub value: Option<String>,
}

/// How a write ended.
#[derive(Debug)]
pub enum Written {
    /// Committed at this revision.
    Committed(i64),
    /// Its compare failed: the record (or the members) moved; the view has
    /// the news by this revision.
    Moved(i64),
    /// May or may not have committed (no answer).
    Unknown(LeaseError),
    /// Not applied.
    Failed(LeaseError),
}

/// What the watch tells the coordinator.
#[derive(Debug)]
pub enum Fed {
    /// Everything under the prefix as of `revision` (a fresh start: the
    /// view is replaced).
    Snapshot {
        kvs: Vec<etcd_client::KeyValue>,
        revision: i64,
    },
    /// Events in etcd's order.
    Events(Vec<etcd_client::Event>),
    /// The watch knows everything up to this revision.
    Progress(i64),
}

/// etcd I/O of shares.
#[derive(Clone)]
pub struct Store {
    client: etcd_client::Client,
    pub paths: Paths,
    pub node: String,
    /// Deadline of one call (the etcd timeout: slow is not down).
    deadline: Duration,
    health: Arc<Health>,
    stats: Arc<LeaseStats>,
    telemetry: Option<Arc<Telemetry>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.paths.root)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(
        client: etcd_client::Client,
        prefix: &str,
        node: String,
        deadline: Duration,
        health: Arc<Health>,
        stats: Arc<LeaseStats>,
        telemetry: Option<Arc<Telemetry>>,
    ) -> Store {
        Store {
            client,
            paths: Paths::new(prefix),
            node,
            deadline,
            health,
            stats,
            telemetry,
        }
    }

    async fn call<T, Fut>(&self, call: impl FnMut() -> Fut) -> Result<T, LeaseError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.health
            .guard(self.deadline, call)
            .await
            .map_err(|e| match e {
                CallError::Timeout(d) => LeaseError::Timeout(d),
                CallError::Etcd(e) => LeaseError::Etcd(e),
            })
    }

    async fn txn(
        &self,
        txn: Txn,
        rules: &[&str],
        writes: usize,
    ) -> Result<etcd_client::TxnResponse, LeaseError> {
        let wall = self.telemetry.as_ref().map(|_| SystemTime::now());
        let started = Instant::now();
        let client = self.client.clone();
        let result = self
            .call(|| {
                let (mut c, txn) = (client.clone(), txn.clone());
                async move { c.txn(txn).await }
            })
            .await;
        match &result {
            Ok(_) => {
                self.stats.txns.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .latency
                    .record_one(started.elapsed().as_nanos() as u64);
            }
            Err(_) => {
                self.stats.txn_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(t), Some(wall)) = (&self.telemetry, wall) {
            let error = result.as_ref().err().map(ToString::to_string);
            t.lease_txn(wall, rules, writes, error.as_deref().map_or(Ok(()), Err));
        }
        result
    }

    /// Writes this daemon's operating count under `lease`. A raise (or a
    /// start) passes `members_at`: it commits only if no member key changed
    /// after that revision (the counts it was checked against still hold).
    /// `Ok(Some(revision))` when committed, `Ok(None)` when a compare failed.
    ///
    /// # Errors
    /// etcd unreachable (the outcome of a raise is then unknown: the watch
    /// tells).
    pub async fn write_count(
        &self,
        lease: i64,
        n: u32,
        members_at: Option<i64>,
    ) -> Result<Option<i64>, LeaseError> {
        let key = self.paths.member(&self.node);
        let value = serde_json::to_string(&MemberValue {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            n,
        })
        .expect("member values serialize");
        let mut when = vec![Compare::lease(key.as_str(), CompareOp::Equal, lease)];
        if let Some(rev) = members_at {
            when.push(
                Compare::mod_revision(self.paths.members.as_str(), CompareOp::Less, rev + 1)
                    .with_prefix(),
            );
        }
        let txn = Txn::new().when(when).and_then([TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let resp = self.txn(txn, &[], 1).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Applies writes of distinct records; one result per write, in order.
    pub async fn apply(&self, writes: &[RecordWrite]) -> Vec<Written> {
        let mut out = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(MAX_RECORDS_PER_TXN) {
            out.extend(self.apply_chunk(chunk).await);
        }
        out
    }

    async fn apply_chunk(&self, writes: &[RecordWrite]) -> Vec<Written> {
        let nested: Vec<TxnOp> = writes
            .iter()
            .map(|w| {
                let mut when = vec![Compare::mod_revision(
                    w.key.as_str(),
                    CompareOp::Equal,
                    w.expect,
                )];
                if let Some(rev) = w.members_at {
                    when.push(
                        Compare::mod_revision(
                            self.paths.members.as_str(),
                            CompareOp::Less,
                            rev + 1,
                        )
                        .with_prefix(),
                    );
                }
                let op = match &w.value {
                    Some(v) => TxnOp::put(w.key.as_str(), v.as_str(), None),
                    None => TxnOp::delete(w.key.as_str(), None),
                };
                TxnOp::txn(Txn::new().when(when).and_then([op]))
            })
            .collect();
        self.stats
            .ops
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        let mut rules: Vec<&str> = writes
            .iter()
            .filter_map(|w| self.paths.rule_of(&w.key))
            .collect();
        rules.sort_unstable();
        rules.dedup();
        match self
            .txn(Txn::new().and_then(nested), &rules, writes.len())
            .await
        {
            Ok(resp) => {
                let revision = resp.header().map_or(0, |h| h.revision());
                resp.op_responses()
                    .iter()
                    .map(|r| match r {
                        TxnOpResponse::Txn(inner) if inner.succeeded() => {
                            Written::Committed(revision)
                        }
                        _ => {
                            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                            Written::Moved(revision)
                        }
                    })
                    .collect()
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                writes
                    .iter()
                    .map(|_| {
                        // A refusal that names why (a full database, no
                        // permission) was not applied; anything else may
                        // have been.
                        if e.applied_nothing() {
                            Written::Failed(e.clone_kind())
                        } else {
                            Written::Unknown(e.clone_kind())
                        }
                    })
                    .collect()
            }
        }
    }

    /// Takes the compactor role if no live daemon holds it; `true` if this
    /// daemon holds it (now or already).
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn claim_compactor(&self, lease: i64) -> Result<bool, LeaseError> {
        let key = self.paths.compactor.as_str();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.node.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(txn, &[], 1).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        Ok(resp.op_responses().iter().any(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == self.node.as_bytes() && kv.lease() == lease),
            _ => false,
        }))
    }

    /// Compacts etcd's history up to `revision` (the revisions before it are
    /// dropped; watches that need them start over from a listing).
    ///
    /// # Errors
    /// etcd unreachable, or the revision already compacted.
    pub async fn compact(&self, revision: i64) -> Result<(), LeaseError> {
        let client = self.client.clone();
        self.call(|| {
            let mut c = client.clone();
            async move { c.compact(revision, None).await }
        })
        .await
        .map(drop)
    }

    /// Lists everything under the prefix.
    async fn list(&self) -> Result<(Vec<etcd_client::KeyValue>, i64), LeaseError> {
        let client = self.client.clone();
        let root = self.paths.root.clone();
        let mut resp = self
            .call(|| {
                let (mut c, root) = (client.clone(), root.clone());
                async move { c.get(root, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs(), revision))
    }

    /// Feeds `to` with a listing, then the events after it, until `cancel`;
    /// starts over from a listing whenever the stream breaks (from the next
    /// revision when it can, a fresh listing when that was compacted away).
    /// `relist` asks for a fresh listing (after an outage).
    pub async fn run_watch(
        self,
        to: mpsc::Sender<Fed>,
        relist: Arc<tokio::sync::Notify>,
        cancel: CancellationToken,
    ) {
        let mut next: Option<i64> = None;
        loop {
            let start = match next {
                Some(rev) => rev,
                None => match self.list().await {
                    Ok((kvs, revision)) => {
                        if to.send(Fed::Snapshot { kvs, revision }).await.is_err() {
                            return;
                        }
                        revision + 1
                    }
                    Err(e) => {
                        tracing::debug!("cannot list shares: {e}");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(250)) => {}
                        }
                        continue;
                    }
                },
            };
            next = Some(start);
            let mut client = self.client.clone();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(start)
                .with_progress_notify();
            let (mut watcher, mut stream) =
                match client.watch(self.paths.root.as_str(), Some(options)).await {
                    Ok(watch) => watch.split(),
                    Err(e) => {
                        tracing::debug!("cannot watch shares: {e}");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(250)) => {}
                        }
                        continue;
                    }
                };
            // Progress is asked for every second, so a quiet prefix still
            // shows the watch is alive and how far it got; a stream that
            // answers nothing for a few seconds has stalled (its member died
            // behind a connection that stays open) and is made anew.
            let mut progress = tokio::time::interval(Duration::from_secs(1));
            let mut heard = tokio::time::Instant::now();
            loop {
                let message = tokio::select! {
                    () = cancel.cancelled() => return,
                    () = relist.notified() => {
                        next = None;
                        break;
                    }
                    _ = progress.tick() => {
                        if heard.elapsed() > WATCH_SILENCE {
                            tracing::debug!("the shares watch went silent; watching again");
                            break;
                        }
                        if watcher.request_progress().await.is_err() {
                            break;
                        }
                        continue;
                    }
                    m = stream.message() => m,
                };
                heard = tokio::time::Instant::now();
                match message {
                    Ok(Some(resp)) if resp.compact_revision() > 0 => {
                        tracing::info!(
                            compacted = resp.compact_revision(),
                            "the shares watch fell behind etcd's compaction; listing again"
                        );
                        next = None;
                        break;
                    }
                    Ok(Some(resp)) if resp.canceled() => break,
                    Ok(Some(resp)) => {
                        let revision = resp.header().map_or(0, |h| h.revision());
                        let events = resp.events().to_vec();
                        let fed = if events.is_empty() {
                            Fed::Progress(revision)
                        } else {
                            next = Some(
                                events
                                    .last()
                                    .and_then(|e| e.kv())
                                    .map_or(start, |kv| kv.mod_revision() + 1),
                            );
                            Fed::Events(events)
                        };
                        if to.send(fed).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::debug!("shares watch ended; watching again");
                        break;
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}
