//! The limiter's side of leasing, for global rules: grants credited to
//! buckets, a bucket's demand and debt collected for its next lease
//! operation, refill requests cleared, leases taken out (shutdown, recovery),
//! held tokens counted, and leases released when buckets go away or their
//! rule changes. Everything here locks one shard at a time and is called by
//! the coordinator, the sweeper or admin paths, never per request.

use std::sync::Arc;

use super::global::Allotment;
use super::key::BucketKey;
use super::rules::{Rule, RuleSet};
use super::{Limiter, table};

/// A bucket's state collected for its next lease operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub held: u64,
    /// Debt moved out of the bucket into the operation.
    pub debt: u64,
    /// Tokens asked for since the last collection.
    pub wanted: u64,
}

impl Limiter {
    /// Gives a bucket's lease state back to the coordinator (no-op for local
    /// buckets or when nothing is held or owed).
    pub(super) fn release(&self, entry: &table::Entry) {
        let allotment = Allotment::unpack(entry.aux);
        if entry.rule.global.is_none() || (allotment.held == 0 && allotment.debt == 0) {
            return;
        }
        if let Some(link) = self.link.get() {
            link.release(&entry.rule, entry.key().clone(), allotment);
        }
    }

    /// Adds leased tokens to the bucket of (rule, key) and clears its refill
    /// request. Returns the tokens that could not be credited (all of them if
    /// that bucket no longer exists or now follows another rule): the caller
    /// gives them back.
    pub fn credit(&self, rule: &Arc<Rule>, key: &BucketKey, hash: u64, tokens: u64) -> u64 {
        let (client, resource) = key.names();
        let mut guard = self.table.lock(self.table.shard_of(hash));
        match guard.buckets.find(hash, client, resource) {
            Some(entry) if Arc::ptr_eq(&entry.rule, rule) => {
                let mut a = Allotment::unpack(entry.aux);
                let left = a.credit(tokens);
                entry.aux = a.pack();
                left
            }
            _ => tokens,
        }
    }

    /// Clears the refill request of (rule, key) after a lease round ended
    /// without tokens (empty or failed), so the next request asks again; the
    /// bucket is no longer fresh, so it never borrows again.
    pub fn clear_request(&self, rule: &Arc<Rule>, key: &BucketKey, hash: u64) {
        let (client, resource) = key.names();
        let mut guard = self.table.lock(self.table.shard_of(hash));
        if let Some(entry) = guard.buckets.find(hash, client, resource)
            && Arc::ptr_eq(&entry.rule, rule)
        {
            let mut a = Allotment::unpack(entry.aux);
            a.requested = false;
            a.leased = true;
            entry.aux = a.pack();
        }
    }

    /// For the next lease operation of (rule, key): the held tokens, the
    /// debt (moved out: the operation now owes it) and the tokens asked for
    /// since the last call. `None` if the bucket is gone or follows another
    /// rule.
    pub fn collect(&self, rule: &Arc<Rule>, key: &BucketKey, hash: u64) -> Option<Collected> {
        let (client, resource) = key.names();
        let mut guard = self.table.lock(self.table.shard_of(hash));
        let entry = guard.buckets.find(hash, client, resource)?;
        if !Arc::ptr_eq(&entry.rule, rule) {
            return None;
        }
        let mut a = Allotment::unpack(entry.aux);
        let out = Collected {
            held: u64::from(a.held),
            debt: u64::from(a.debt),
            wanted: u64::from(a.wanted),
        };
        a.debt = 0;
        a.wanted = 0;
        entry.aux = a.pack();
        Some(out)
    }

    /// Takes the lease state out of every global bucket matching `which`:
    /// `(rule, key, held, debt)` for each with anything held or owed; the
    /// buckets keep serving from zero. For shutdown (everything) and
    /// recovery (`held` kept, only debts taken).
    pub fn take_leases(&self, take_held: bool) -> Vec<(Arc<Rule>, BucketKey, u64, u64)> {
        let mut out = Vec::new();
        for shard in 0..self.table.shard_count() {
            self.table.lock(shard).buckets.for_each_mut(|e| {
                if e.rule.global.is_none() {
                    return;
                }
                let mut a = Allotment::unpack(e.aux);
                let held = if take_held { a.held } else { 0 };
                if held == 0 && a.debt == 0 {
                    return;
                }
                out.push((
                    Arc::clone(&e.rule),
                    e.key().clone(),
                    u64::from(held),
                    u64::from(a.debt),
                ));
                if take_held {
                    a.held = 0;
                }
                a.debt = 0;
                e.aux = a.pack();
            });
        }
        out
    }

    /// Tokens held by global buckets, per rule id (a scan; for stats).
    pub fn held_tokens(&self) -> hashbrown::HashMap<String, u64> {
        let mut held: hashbrown::HashMap<String, u64> = hashbrown::HashMap::new();
        for shard in 0..self.table.shard_count() {
            self.table.lock(shard).buckets.for_each_mut(|e| {
                if e.rule.global.is_some() {
                    let a = Allotment::unpack(e.aux);
                    *held.entry_ref(e.rule.id()).or_default() += u64::from(a.held);
                }
            });
        }
        held
    }

    /// Gives back the leases of buckets whose global rule was changed or
    /// deleted (they would otherwise wait for their next request or eviction).
    pub(super) fn release_replaced(&self, next: &RuleSet) {
        for shard in 0..self.table.shard_count() {
            self.table.lock(shard).buckets.for_each_mut(|e| {
                let stale = e.rule.global.is_some()
                    && next
                        .get(e.rule.id())
                        .is_none_or(|n| !Arc::ptr_eq(n, &e.rule));
                if stale {
                    self.release(e);
                    // Not fresh again: an edited rule does not hand out credit.
                    e.aux = Allotment {
                        leased: Allotment::unpack(e.aux).leased,
                        ..Allotment::default()
                    }
                    .pack();
                }
            });
        }
    }
}
