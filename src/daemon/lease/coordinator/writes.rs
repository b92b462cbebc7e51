//! Writes of records: creation (every operating daemon listed at its
//! implicit share, the burst's remainder full in the pool), this daemon's
//! entry (lowered parts applied before, raised ones after the commit), and
//! deletion; sent many per transaction, at most two transactions at once,
//! and settled from their answers or, when an answer is lost, from the view.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Batch, Coordinator, IN_FLIGHT, Kind, Pending, RESEND};
use crate::daemon::lease::audit::Record as AuditRecord;
use crate::daemon::lease::share::{self, Entry, Record, Share};
use crate::daemon::lease::store::{RecordWrite, Written};
use crate::daemon::limiter::Rule;

impl Coordinator {
    /// Queues the creation of `key`'s record: every operating daemon listed
    /// at its implicit share as its member key says (so no share changes),
    /// this one with its demand.
    pub(super) fn create(&mut self, key: &str, rule: &Rule, demand: f64) {
        let burst = rule.params.capacity;
        let me = self.me().to_owned();
        let mut entries = std::collections::BTreeMap::new();
        for (node, m) in &self.view.members {
            if m.n == 0 {
                continue;
            }
            let (n, depth) = share::implicit(m.n, burst);
            entries.insert(
                node.clone(),
                Entry {
                    lease: m.lease,
                    rate: 0,
                    n,
                    depth,
                    demand: None,
                    op: 0,
                },
            );
        }
        let op = self.next_op();
        let Some(w) = self.watched.get(key) else {
            return;
        };
        let (client, resource) = w.key.names();
        let mut entry = entries.get(&me).cloned().unwrap_or(Entry {
            lease: self.lease,
            rate: 0,
            n: 0,
            depth: 0,
            demand: None,
            op: 0,
        });
        entry.demand = Some(demand);
        entry.op = op;
        entries.insert(me.clone(), entry.clone());
        let expect = self.view.broken.get(key).copied().unwrap_or(0);
        // The depth no implicit share holds (the burst's remainder over
        // the counts) was never anyone's: it starts full in the pool, so a
        // burst smaller than the number of daemons is admitted somewhere.
        // (A record deleted lately left nothing behind to reuse: it is
        // deleted only once idle for as long as the burst takes to refill.)
        // Over an unreadable value, whose state is unknown, nothing is.
        let held: u64 = entries.values().map(|e| e.depth).sum();
        let pool = if expect == 0 {
            burst.saturating_sub(held)
        } else {
            0
        };
        let record = Record {
            client: client.to_owned(),
            resource: resource.to_owned(),
            burst,
            entries,
            pool,
        };
        let write = RecordWrite {
            key: key.to_owned(),
            expect,
            members_at: Some(self.view.revision),
            value: Some(serde_json::to_string(&record).expect("records serialize")),
        };
        let w = self.watched.get_mut(key).expect("watched");
        w.last_op = op;
        w.quiet_since = None;
        w.pending = Some(Pending {
            op,
            kind: Kind::Create,
            write,
            entry: Some(entry),
            raise_to: None,
            fill: 0,
            sent: None,
            in_flight: false,
            uncertain: false,
            committed: false,
            moved: false,
        });
    }

    /// Queues a write of this daemon's entry: lowered parts apply now
    /// (the tokens they held above the new depth owed to the pool), raised
    /// ones once committed (taking what the pool has into the new room).
    pub(super) fn write_entry(
        &mut self,
        key: &str,
        record: &Record,
        expect: i64,
        next: Share,
        demand: f64,
        applied: Share,
    ) {
        let lowered = Share {
            rate: applied.rate.min(next.rate),
            depth: applied.depth.min(next.depth),
        };
        if lowered != applied {
            // Lower locally before recording the lower value.
            self.stats.lowers.fetch_add(1, Ordering::Relaxed);
            self.applied.insert(key.to_owned(), lowered);
            let rule = self
                .view
                .records
                .get(key)
                .map(|k| k.rule.clone())
                .unwrap_or_default();
            let r = self.limiter.rules().get(&rule).cloned();
            let discarded = self.apply(&rule, record, r.as_deref(), lowered, 0);
            tracing::debug!(key, ?lowered, discarded, "lowered before writing");
            self.owe(key, discarded);
        }
        let op = self.next_op();
        let entry = Entry {
            lease: self.lease,
            rate: next.rate,
            n: 0,
            depth: next.depth,
            demand: Some(demand),
            op,
        };
        let me = self.me().to_owned();
        let recorded_depth = record
            .entries
            .get(&me)
            .filter(|e| e.lease == self.lease)
            .map_or(0, |e| e.depth);
        let mut value = record.clone();
        value.entries.insert(me, entry.clone());
        // Entries of daemons that are gone are dropped while we write anyway.
        let view = &self.view;
        value
            .entries
            .retain(|node, e| view.live(node, e.lease) || e.lease == entry.lease);
        // The room this write fills is what it adds to the share applied
        // here (lowered), not to the one recorded: a lowering applied but
        // not recorded yet (its write lost to a conflict) and then taken
        // back gets its own tokens back, where counting from the recorded
        // depth gave it none and the pool's cap dropped them (a burst of 2
        // over five daemons lost a token for good that way).
        //
        // No token is dropped by the cap: the record says (CAS) others'
        // depths O + our recorded depth R + pool P <= burst, and what we
        // owe, W, came out of depth we still record: W <= R - lowered.
        // So P + W - taken <= burst - O - lowered - taken, which is at most
        // free_after = burst - O - next when the room (next - lowered) is
        // filled, and the pool is empty otherwise. (Tokens discarded because
        // a record listed us lower than we applied came out of depth no
        // longer ours: the cap may drop those, fewer tokens, never more.)
        let owed = self.watched.get(key).map_or(0, |w| w.owed);
        let held: u64 = value.entries.values().map(|e| e.depth).sum();
        let (fill, pool) = share::take_from_pool(
            record.pool,
            next.depth.saturating_sub(lowered.depth),
            owed,
            value.burst.saturating_sub(held),
        );
        value.pool = pool;
        tracing::debug!(
            key,
            pool_was = record.pool,
            owed,
            recorded_depth,
            ?next,
            fill,
            pool,
            "entry write"
        );
        let write = RecordWrite {
            key: key.to_owned(),
            expect,
            members_at: None,
            value: Some(serde_json::to_string(&value).expect("records serialize")),
        };
        let raise = next != lowered;
        let Some(w) = self.watched.get_mut(key) else {
            return;
        };
        w.last_op = op;
        w.carrying = Some((op, owed));
        w.quiet_since = None;
        w.pending = Some(Pending {
            op,
            kind: Kind::Entry,
            write,
            entry: Some(entry),
            raise_to: raise.then_some(next),
            // Tokens (ours owed, then the pool's) come into the room this
            // raise adds here.
            fill,
            sent: None,
            in_flight: false,
            uncertain: false,
            committed: false,
            moved: false,
        });
    }

    pub(super) fn delete(&mut self, key: &str, expect: i64) {
        let op = self.next_op();
        let Some(w) = self.watched.get_mut(key) else {
            return;
        };
        w.pending = Some(Pending {
            op,
            kind: Kind::Delete,
            write: RecordWrite {
                key: key.to_owned(),
                expect,
                members_at: None,
                value: None,
            },
            entry: None,
            raise_to: None,
            fill: 0,
            sent: None,
            in_flight: false,
            uncertain: false,
            committed: false,
            moved: false,
        });
    }

    /// Sends the writes that are ready, at most [`IN_FLIGHT`] transactions.
    pub(super) fn flush(&mut self) {
        if self.lease == 0 {
            return;
        }
        let now = Instant::now();
        while self.batches.len() < IN_FLIGHT {
            let mut keys = Vec::new();
            let mut writes = Vec::new();
            for (key, w) in &mut self.watched {
                let Some(p) = &mut w.pending else { continue };
                if p.in_flight || p.committed || p.moved {
                    continue;
                }
                if p.uncertain && p.sent.is_some_and(|t| now.duration_since(t) < RESEND) {
                    continue;
                }
                p.in_flight = true;
                p.sent = Some(now);
                keys.push((key.clone(), p.clone()));
                writes.push(p.write.clone());
                if writes.len() >= crate::daemon::lease::store::MAX_RECORDS_PER_TXN {
                    break;
                }
            }
            if writes.is_empty() {
                return;
            }
            let store = self.store.clone();
            self.batches.spawn(async move {
                let results = store.apply(&writes).await;
                (keys, results)
            });
        }
    }

    pub(super) fn finished(&mut self, (sent, results): Batch) {
        let now = Instant::now();
        for ((key, p), result) in sent.into_iter().zip(results) {
            let (outcome, revision) = match &result {
                Written::Committed(rev) => ("committed", *rev),
                Written::Moved(rev) => ("moved", *rev),
                Written::Unknown(_) => ("unknown", 0),
                Written::Failed(_) => ("failed", 0),
            };
            match &result {
                Written::Committed(_) => {
                    match p.kind {
                        Kind::Create => self.stats.records_created.fetch_add(1, Ordering::Relaxed),
                        Kind::Delete => self.stats.records_deleted.fetch_add(1, Ordering::Relaxed),
                        Kind::Entry => 0,
                    };
                    if p.raise_to.is_some() {
                        self.stats.raises.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Written::Unknown(_) => {
                    self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            tracing::debug!(key, op = p.op, outcome, revision, "write settled");
            if self.audit.enabled() {
                let entry = p.entry.as_ref();
                self.audit.write(&AuditRecord::Share {
                    node: self.store.node.clone(),
                    key: key.clone(),
                    op: p.op,
                    kind: p.kind.name().into(),
                    lease: self.lease,
                    rate: entry.map_or(0, |e| Share::held(e).rate),
                    depth: entry.map_or(0, |e| e.depth),
                    outcome: outcome.into(),
                    revision,
                    wall_ns: crate::daemon::lease::audit::wall_ns(),
                });
            }
            // The write may have been settled by the watch already (it can
            // be faster than the answer): only this very write is updated.
            let Some(w) = self.watched.get_mut(&key) else {
                continue;
            };
            if w.pending.as_ref().is_none_or(|q| q.op != p.op) {
                continue;
            }
            let pending = w.pending.as_mut().expect("checked");
            pending.in_flight = false;
            match result {
                Written::Committed(rev) => {
                    // Applied when the watch shows it (in etcd's order); a
                    // deletion is done.
                    w.view_at = rev;
                    pending.committed = true;
                    if p.kind == Kind::Delete {
                        w.pending = None;
                    }
                }
                Written::Moved(rev) if pending.uncertain => {
                    // A resend found the record moved, maybe by the first
                    // attempt: the view shows which (never applied twice).
                    pending.moved = true;
                    w.view_at = rev;
                }
                Written::Moved(rev) => {
                    // Decided again as soon as the view shows the record
                    // that moved (its change marks it dirty), from that
                    // record: each round of a conflict commits someone's
                    // write, so retrying at once cannot livelock.
                    w.pending = None;
                    w.view_at = rev;
                    w.not_before = now;
                }
                Written::Unknown(_) => pending.uncertain = true,
                Written::Failed(_) => {
                    w.pending = None;
                    w.not_before = now + Duration::from_millis(100);
                }
            }
            if (outcome == "committed" && p.kind != Kind::Delete) || outcome == "moved" {
                self.reconcile(&key);
            }
        }
    }
}
