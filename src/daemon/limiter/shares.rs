//! The limiter's side of leasing, for global rules: what the lease
//! coordinator reads from buckets (demand), writes into them (recorded
//! shares, kept in the shards' books), and the scans it needs (a new etcd
//! lease empties every bucket; tokens held, for stats). Everything here
//! locks one shard at a time and runs on the coordinator, the sweeper or
//! admin paths, never per request.

use super::book::{BookEntry, Recorded};
use super::bucket;
use super::global::{self, ShareAux};
use super::key::BucketKey;
use super::{Limiter, table};

/// A bucket's state collected for the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Tokens asked for over the last `span_ns` (since the previous
    /// collection, or at most the bucket's demand window, 0.8 s).
    pub wanted: u64,
    pub span_ns: u64,
    /// Ns since the bucket's last request (16.8 ms resolution).
    pub idle_ns: u64,
    /// Whole tokens the bucket holds now, and its depth.
    pub tokens: u64,
    pub depth: u64,
}

/// A bucket's parameters: (ns per token, depth).
pub(super) fn params_of(entry: &table::Entry) -> (u64, u64) {
    if entry.rule.global.is_some() {
        (entry.share, ShareAux::unpack(entry.aux).depth)
    } else {
        (entry.rule.params.interval_ns, entry.rule.params.capacity)
    }
}

/// Whether `next` has more depth than `old` (in `next`'s burst).
fn raised(old: Recorded, next: Recorded) -> bool {
    let old_depth = old.bucket(1, next.counted_in.max(1)).1;
    next.depth > old_depth
}

/// Whole tokens a bucket with parameters `(interval, depth)` and `tat` holds.
pub(super) fn tokens(tat: u64, (interval, depth): (u64, u64), now: u64) -> u64 {
    if interval == 0 || interval == u64::MAX || depth == 0 {
        return 0;
    }
    let tau = u128::from(interval) * u128::from(depth);
    let used = u128::from(tat.saturating_sub(now));
    u64::try_from(tau.saturating_sub(used) / u128::from(interval)).unwrap_or(u64::MAX)
}

/// Whole tokens a bucket of `rule` created at `now` would hold: under a
/// recorded `(share, start)`, or the implicit share if `None`.
fn virtual_tokens(
    rule: &super::Rule,
    recorded: Option<(Recorded, Option<(u64, u64)>)>,
    now: u64,
) -> u64 {
    let Some(g) = &rule.global else { return 0 };
    let p = &rule.params;
    match recorded {
        Some((share, start)) => {
            let bucket = share.bucket(p.interval_ns, p.capacity);
            tokens(
                super::global::start_tat(start, bucket.0, bucket.1, now),
                bucket,
                now,
            )
        }
        None => {
            let bucket = g.implicit_bucket(p);
            tokens(g.fresh_tat(now), bucket, now)
        }
    }
}

impl Limiter {
    /// A bucket is gone (evicted, removed): the coordinator hears of it if it
    /// had a recorded share (its demand is zero now).
    pub(super) fn release(&self, entry: &table::Entry) {
        if entry.rule.global.is_none() || !ShareAux::unpack(entry.aux).recorded {
            return;
        }
        if let Some(link) = self.link.get() {
            link.released(&entry.rule, entry.key().clone());
        }
    }

    /// Records this daemon's share of (rule, key): `Some` recorded share,
    /// or `None` for the rule's implicit share (the record is gone). The
    /// bucket, if it exists under this rule, moves to it keeping its tokens
    /// (capped at the new depth) plus `fill` tokens taken from the record's
    /// pool into the room a raise adds (which otherwise starts empty; so
    /// does a bucket created later). `implicit_depth` is the depth the
    /// implicit share had (in the new share's burst), for a first recording.
    ///
    /// Returns the whole tokens the bucket held above its new depth (given
    /// up: the coordinator puts them in the record's pool).
    #[allow(clippy::too_many_arguments)]
    pub fn set_share(
        &self,
        rule_id: &str,
        key: &BucketKey,
        hash: u64,
        share: Option<Recorded>,
        implicit_depth: u64,
        fill: u64,
        now: u64,
    ) -> u64 {
        let (client, resource) = key.names();
        let mut guard = self.table.lock(self.table.shard_of(hash));
        let table::Shard {
            buckets,
            book,
            rules,
            ..
        } = &mut *guard;
        let before = book
            .get(hash, rule_id, client, resource)
            .map(|e| (e.share, e.start));
        // What a bucket not in the table holds: it would be created as
        // its book entry (or the implicit share) says.
        let rule = rules.get(rule_id).filter(|r| r.global.is_some()).cloned();
        let virtual_before = rule
            .as_deref()
            .map_or(0, |r| virtual_tokens(r, before, now));
        match share {
            Some(next) => {
                let start = match before {
                    // The old share's tokens at most (those it held then, if
                    // it was still filling after an earlier raise), and what
                    // came from the pool.
                    Some((old, start)) if raised(old, next) => Some((
                        now,
                        start.map_or(old.depth, |(_, t)| t.min(old.depth)) + fill,
                    )),
                    Some((_, start)) => start,
                    // From the implicit share: a bucket created now would
                    // have been full at it.
                    None if next.depth > implicit_depth => Some((now, implicit_depth + fill)),
                    None => None,
                };
                book.put(
                    hash,
                    BookEntry {
                        rule: rule_id.into(),
                        key: key.clone(),
                        share: next,
                        start,
                    },
                );
            }
            None => {
                book.remove(hash, rule_id, client, resource);
            }
        }
        let mut discarded = 0;
        if let Some(entry) = buckets.find_in(hash, rule_id, client, resource)
            && entry.rule.id() == rule_id
            && let Some(g) = &entry.rule.global
        {
            let mut a = ShareAux::unpack(entry.aux);
            a.recorded = share.is_some();
            if !a.fallback {
                // (A bucket on its fallback moves to its share when shares
                // are back.)
                let p = &entry.rule.params;
                let new = match share {
                    Some(s) => s.bucket(p.interval_ns, p.capacity),
                    None => g.implicit_bucket(p),
                };
                let old = (entry.share, a.depth);
                let held = tokens(entry.tat, old, now);
                entry.tat = bucket::retune(entry.tat, old, new, now);
                discarded = held.saturating_sub(tokens(entry.tat, new, now));
                if fill > 0 && new.0 != u64::MAX {
                    // Full tokens from the pool: the TAT moves back by as
                    // many intervals, never past a full bucket.
                    let back = fill.saturating_mul(new.0);
                    entry.tat = entry.tat.saturating_sub(back).max(now.saturating_sub(1));
                }
                entry.share = new.0;
                a.depth = new.1;
            }
            entry.aux = a.pack();
        } else if let (Some(r), Some(_)) = (rule.as_deref(), share) {
            // No bucket: the tokens the book said a new one would hold
            // beyond the new share are given up all the same (else a
            // lowered share of a key this daemon has not seen lately would
            // lose them to everyone).
            let after = book
                .get(hash, rule_id, client, resource)
                .map(|e| (e.share, e.start));
            discarded = virtual_before.saturating_sub(virtual_tokens(r, after, now));
        }
        discarded
    }

    /// The demand and tokens of (rule, key) for the coordinator; the demand
    /// counter restarts. `None` if there is no such bucket.
    pub fn collect(
        &self,
        rule_id: &str,
        key: &BucketKey,
        hash: u64,
        now: u64,
    ) -> Option<Collected> {
        let (client, resource) = key.names();
        let mut guard = self.table.lock(self.table.shard_of(hash));
        let entry = guard.buckets.find_in(hash, rule_id, client, resource)?;
        if entry.rule.id() != rule_id || entry.rule.global.is_none() {
            return None;
        }
        let mut a = ShareAux::unpack(entry.aux);
        let tick_ns = 1u64 << table::TICK_SHIFT;
        // A request that read the clock after `now` may have taken the lock
        // first: its bucket is not idle (the difference wraps), and its
        // count is no older than its window.
        let idle_ticks = table::tick(now).wrapping_sub(entry.last_used);
        let idle_ticks = if idle_ticks > u32::MAX / 2 {
            0
        } else {
            idle_ticks
        };
        let out = Collected {
            wanted: u64::from(a.wanted),
            // The count started somewhere in its start tick: count the
            // tick as half elapsed.
            span_ns: u64::from(a.age(now).min(global::WINDOW_TICKS)) * tick_ns + tick_ns / 2,
            idle_ns: u64::from(idle_ticks) * tick_ns,
            tokens: tokens(entry.tat, params_of(entry), now),
            depth: a.depth,
        };
        a.restart(now);
        entry.aux = a.pack();
        Some(out)
    }

    /// The coordinator stopped watching (rule, key): its next shortfall is
    /// told again.
    pub fn clear_signal(&self, rule_id: &str, key: &BucketKey, hash: u64) {
        let (client, resource) = key.names();
        let mut guard = self.table.lock(self.table.shard_of(hash));
        if let Some(entry) = guard.buckets.find_in(hash, rule_id, client, resource)
            && entry.rule.id() == rule_id
            && entry.rule.global.is_some()
        {
            let mut a = ShareAux::unpack(entry.aux);
            a.signaled = false;
            entry.aux = a.pack();
        }
    }

    /// A new etcd lease (this daemon registered again): every share it held
    /// may have been taken by others meanwhile, so every global bucket is
    /// emptied and holds no share until the coordinator grants one again,
    /// and every recorded share is zero.
    pub fn drop_all_shares(&self) {
        for shard in 0..self.table.shard_count() {
            let mut guard = self.table.lock(shard);
            let table::Shard { buckets, book, .. } = &mut *guard;
            book.for_each_mut(|e| {
                e.share = Recorded::ZERO;
                e.start = None;
            });
            buckets.for_each_mut(|e| {
                if e.rule.global.is_some() {
                    let mut a = ShareAux::unpack(e.aux);
                    a.depth = 0;
                    a.signaled = false;
                    e.share = u64::MAX;
                    e.tat = 0;
                    e.aux = a.pack();
                }
            });
        }
    }

    /// Moves every global bucket on its rule's implicit share to that share
    /// as it is now ([`global::follow_implicit`]): called after the
    /// operating count rose, before it is recorded.
    pub fn follow_implicit(&self, now: u64) {
        for shard in 0..self.table.shard_count() {
            self.table.lock(shard).buckets.for_each_mut(|e| {
                let slot = global::Slot {
                    tat: &mut e.tat,
                    share: &mut e.share,
                    aux: &mut e.aux,
                };
                global::follow_implicit(slot, &e.rule, now);
            });
        }
    }

    /// Forgets every recorded share of rules `keep` rejects (deleted rules).
    pub fn forget_shares(&self, mut keep: impl FnMut(&str) -> bool) {
        for shard in 0..self.table.shard_count() {
            self.table.lock(shard).book.retain(|e| keep(&e.rule));
        }
    }

    /// Whole tokens held by global buckets, per rule id (a scan; for stats).
    pub fn held_tokens(&self, now: u64) -> hashbrown::HashMap<String, u64> {
        let mut held: hashbrown::HashMap<String, u64> = hashbrown::HashMap::new();
        for shard in 0..self.table.shard_count() {
            self.table.lock(shard).buckets.for_each_mut(|e| {
                if e.rule.global.is_some() {
                    *held.entry_ref(e.rule.id()).or_default() += tokens(e.tat, params_of(e), now);
                }
            });
        }
        held
    }

    /// Recorded shares in this daemon's books (for stats).
    pub fn recorded_shares(&self) -> usize {
        (0..self.table.shard_count())
            .map(|s| self.table.lock(s).book.len())
            .sum()
    }
}
