//! The coordinator following the view: watch events applied in etcd's
//! order, a record's changes brought into this daemon's applied share (a
//! raise only once the record shows this daemon's own committed write), and
//! the share pushed into the limiter.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::Coordinator;
use super::decide::implicit_share;
use crate::daemon::lease::audit::Record as AuditRecord;
use crate::daemon::lease::share::{Record, Share};
use crate::daemon::lease::store::Fed;
use crate::daemon::lease::view::Change;
use crate::daemon::limiter::Rule;
use crate::daemon::limiter::key::BucketKey;

impl Coordinator {
    pub(super) fn feed(&mut self, fed: Fed) {
        let mut changed: Vec<String> = Vec::new();
        let mut members = false;
        match fed {
            Fed::Snapshot { kvs, revision } => {
                let before: Vec<String> = self.view.records.keys().cloned().collect();
                let names = self.names_of(&before);
                self.view.clear();
                for kv in &kvs {
                    self.view
                        .put(kv.key(), kv.value(), kv.mod_revision(), kv.lease());
                }
                self.view.revision = self.view.revision.max(revision);
                members = true;
                changed.extend(self.view.records.keys().cloned());
                for key in before {
                    if !self.view.records.contains_key(&key) {
                        self.record_gone(&key, names.get(&key));
                    }
                }
            }
            Fed::Events(events) => {
                for e in events {
                    let Some(kv) = e.kv() else { continue };
                    let change = match e.event_type() {
                        etcd_client::EventType::Put => {
                            self.view
                                .put(kv.key(), kv.value(), kv.mod_revision(), kv.lease())
                        }
                        etcd_client::EventType::Delete => {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let names = self.names_of(std::slice::from_ref(&key));
                            let change = self.view.delete(kv.key(), kv.mod_revision());
                            if let Change::Record(k) = &change {
                                self.record_gone(k, names.get(k));
                            }
                            change
                        }
                    };
                    match change {
                        Change::Member(_) => members = true,
                        Change::Record(k) => changed.push(k),
                        Change::None => {}
                    }
                }
            }
            Fed::Progress(revision) => {
                self.view.revision = self.view.revision.max(revision);
            }
        }
        if members {
            let n = self.view.members.len().max(1) as u64;
            if self.planner.members.swap(n, Ordering::Relaxed) != n {
                for rule in self.limiter.rules().iter() {
                    self.planner.plan(rule);
                }
            }
            self.count_seen();
        }
        for key in changed {
            self.reconcile(&key);
        }
    }

    /// (rule, client, resource) of records about to leave the view.
    pub(super) fn names_of(&self, keys: &[String]) -> HashMap<String, (Box<str>, BucketKey)> {
        keys.iter()
            .filter_map(|k| {
                let known = self.view.records.get(k)?;
                Some((
                    k.clone(),
                    (
                        known.rule.clone(),
                        BucketKey::new(&known.record.client, &known.record.resource),
                    ),
                ))
            })
            .collect()
    }

    /// A record was deleted: this daemon's bucket returns to the implicit
    /// share (every entry was at most implicit when it was deleted).
    pub(super) fn record_gone(&mut self, key: &str, names: Option<&(Box<str>, BucketKey)>) {
        self.applied.remove(key);
        // A write of ours is settled: a deletion is done, anything else has
        // nothing left to write to (if its answer is still to come, that
        // answer settles it).
        if let Some(w) = self.watched.get_mut(key)
            && let Some(p) = &w.pending
            && !p.in_flight
        {
            w.pending = None;
        }
        if let Some((rule, bucket)) = names {
            let hash = self.limiter.table().hash_key(rule, bucket);
            self.limiter
                .set_share(rule, bucket, hash, None, 0, 0, self.clock.now_ns());
        }
    }

    /// Brings this daemon's applied share of `key` in line with the view,
    /// and resolves a write of it the view shows ended.
    pub(super) fn reconcile(&mut self, key: &str) {
        let Some(known) = self.view.records.get(key) else {
            return;
        };
        let rule_id = known.rule.clone();
        let record = known.record.clone();
        let mod_revision = known.mod_revision;
        let mine = record
            .entries
            .get(self.me())
            .filter(|e| e.lease == self.lease && self.lease != 0);
        // Resolve a write of ours.
        let mut committed_raise = None;
        let mut fill = 0;
        let mut latest_is_mine = false;
        if let Some(w) = self.watched.get_mut(key) {
            if let Some(e) = mine
                && e.op == w.last_op
            {
                latest_is_mine = true;
            }
            // The owed tokens a write of ours carried are in the pool once
            // the view shows that write (once only).
            if let (Some(e), Some((op, pooled))) = (mine, w.carrying)
                && e.op == op
            {
                w.owed = w.owed.saturating_sub(pooled);
                w.carrying = None;
            }
            if let Some(p) = &w.pending {
                let ours = mine.is_some_and(|e| e.op == p.op);
                if ours {
                    committed_raise = p.raise_to;
                    fill = p.fill;
                    if p.uncertain {
                        self.stats.resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    w.pending = None;
                } else if mod_revision != p.write.expect && !p.in_flight {
                    // The record moved on without it: it did not commit.
                    w.pending = None;
                }
            }
        }
        let rule = self.limiter.rules().get(&rule_id).cloned();
        let prev = self
            .applied
            .get(key)
            .copied()
            .unwrap_or_else(|| implicit_share(rule.as_deref(), self.count, record.burst));
        let listed = mine.map_or(Share::ZERO, Share::held);
        let next = if latest_is_mine || committed_raise.is_some() {
            // Our own latest write: the record says what we hold.
            listed
        } else {
            Share {
                rate: prev.rate.min(listed.rate),
                depth: prev.depth.min(listed.depth),
            }
        };
        if self.applied.get(key) != Some(&next) {
            self.applied.insert(key.to_owned(), next);
            let discarded = self.apply(&rule_id, &record, rule.as_deref(), next, fill);
            tracing::debug!(
                key,
                ?next,
                fill,
                discarded,
                pool = record.pool,
                revision = mod_revision,
                "reconciled"
            );
            self.owe(key, discarded);
        }
        // A record listing us at an unreported demand (a creation), or one
        // that changed while we hold a share of it: decide.
        let respond =
            mine.is_some_and(|e| e.demand.is_none() || e.rate > 0 || e.n > 0 || e.depth > 0);
        if respond && !self.watched.contains_key(key) {
            let bucket = BucketKey::new(&record.client, &record.resource);
            self.watch(key, rule_id.as_ref(), bucket, None);
        }
        self.dirty.push(key.to_owned());
    }

    /// Tokens given up by lowering `key`'s share go to its record's pool
    /// with this daemon's next write of it.
    pub(super) fn owe(&mut self, key: &str, tokens: u64) {
        if tokens > 0
            && let Some(w) = self.watched.get_mut(key)
        {
            w.owed = w.owed.saturating_add(tokens);
        }
    }

    /// Applies `share` of a record to the limiter, with `fill` tokens from
    /// the pool in the room a raise adds; returns the tokens given up.
    pub(super) fn apply(
        &mut self,
        rule_id: &str,
        record: &Record,
        rule: Option<&Rule>,
        share: Share,
        fill: u64,
    ) -> u64 {
        let bucket = BucketKey::new(&record.client, &record.resource);
        let hash = self.limiter.table().hash_key(rule_id, &bucket);
        let implicit_depth = implicit_share(rule, self.count, record.burst).depth;
        let discarded = self.limiter.set_share(
            rule_id,
            &bucket,
            hash,
            Some(share.recorded(record.burst)),
            implicit_depth,
            fill,
            self.clock.now_ns(),
        );
        if self.audit.enabled() {
            self.audit.write(&AuditRecord::Applied {
                node: self.me().to_owned(),
                key: self.view.paths.record(rule_id, &bucket),
                rate: share.rate,
                depth: share.depth,
                wall_ns: crate::daemon::lease::audit::wall_ns(),
            });
        }
        discarded
    }
}
