//! The bucket table: `S` shards (a power of two) of `hashbrown` tables behind
//! `parking_lot` mutexes, keyed by (client, resource) hashed once.
//!
//! Owns bucket storage and eviction: idle eviction (a full bucket unused for
//! its rule's idle TTL, which is safe because a full bucket is what a missing
//! one means) and the hard caps, on buckets and on bytes (per shard, least
//! recently used first, in batches so a flood of new keys costs O(1)
//! amortised per insert). Bytes count the hash table's slots as allocated
//! (64-byte entries plus a control byte, at hashbrown's 7/8 load) and boxed
//! keys: a bucket costs about 64-128 bytes, plus its key rounded to 16 bytes
//! when client and resource together exceed 20 bytes.
//! No clock reads and no I/O; callers pass `now` and hold a shard for
//! nanoseconds.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::utils::CachePadded;
use hashbrown::DefaultHashBuilder;
use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};

use super::book::ShareBook;
use super::bucket;
use super::key::BucketKey;
use super::rules::{Rule, RuleSet};

/// Coarse time unit of [`Entry::last_used`]: 2^24 ns (about 16.8 ms), so a
/// `u32` spans 2.2 years and wrapping differences stay correct below that.
pub const TICK_SHIFT: u32 = 24;

/// The coarse tick of a nanosecond time.
#[inline]
pub fn tick(now_ns: u64) -> u32 {
    (now_ns >> TICK_SHIFT) as u32
}

/// One bucket: 64 bytes (one cache line), keys of up to 22 bytes included.
///
/// No hash is stored (the table rehashes keys when it grows, which is rare;
/// hashbrown's 7-bit tags already filter lookups), and times are coarse, so
/// that a bucket costs well under 128 bytes including table overhead.
#[derive(Debug)]
pub struct Entry {
    key: BucketKey,
    /// GCRA theoretical arrival time, ns.
    pub tat: u64,
    /// Global rules: ns per token of the bucket's current share (0 until
    /// set); else 0.
    pub share: u64,
    /// Global rules: the packed share state (`global::ShareAux`); else 0.
    pub aux: u64,
    /// The rule this bucket was resolved to...
    pub rule: Arc<Rule>,
    /// ...under this rules generation (truncated); re-resolved when the
    /// shard's differs.
    pub generation: u32,
    /// Last request, in [`tick`]s: orders LRU eviction and gates idle eviction.
    pub last_used: u32,
}

impl Entry {
    #[inline]
    fn matches(&self, client: &str, resource: &str) -> bool {
        self.key.matches(client, resource)
    }

    /// [`Entry::matches`], and for a stacked bucket, of rule `rule`.
    #[inline]
    fn matches_in(&self, rule: &str, client: &str, resource: &str) -> bool {
        self.key.matches(client, resource)
            && (!(client.is_empty() || resource.is_empty()) || self.rule.id() == rule)
    }

    fn hash_with(&self, hasher: &DefaultHashBuilder) -> u64 {
        let (client, resource) = self.key.names();
        super::key::bucket_hash(hasher, self.rule.id(), client, resource)
    }

    /// The (client, resource) this bucket belongs to.
    pub fn names(&self) -> (&str, &str) {
        self.key.names()
    }

    /// The bucket's key.
    pub fn key(&self) -> &BucketKey {
        &self.key
    }

    /// Whether dropping the bucket loses nothing: it is full (a global
    /// bucket at its current share), which is what a missing bucket means.
    fn is_settled(&self, now: u64) -> bool {
        bucket::is_full(self.tat, now)
    }
}

/// One shard: its buckets, the rules snapshot it resolves against, and the
/// recorded shares of global buckets that hash here.
#[derive(Debug)]
pub struct Shard {
    pub buckets: Buckets,
    /// The current rules. Each shard holds its own pointer so the hot path
    /// touches no shared lock or reference count.
    pub rules: Arc<RuleSet>,
    /// `rules.stacked()`, kept beside the pointer: the hot path reads it
    /// without touching the rule set.
    pub stacked: bool,
    pub book: ShareBook,
}

/// The buckets of one shard.
#[derive(Debug)]
pub struct Buckets {
    map: HashTable<Entry>,
    /// The table's hasher, to rehash keys when the map grows.
    hasher: DefaultHashBuilder,
    /// Most buckets this shard may hold.
    cap: usize,
    /// Most bytes this shard may hold (see [`Buckets::bytes`]).
    byte_cap: usize,
    /// Heap bytes of boxed keys.
    key_bytes: usize,
    /// Reused buffer for LRU selection.
    scratch: Vec<u32>,
}

/// Bytes of one hash table slot: the entry and its control byte.
const SLOT_BYTES: usize = std::mem::size_of::<Entry>() + 1;

impl Buckets {
    /// The bucket for (client, resource), if present.
    #[inline]
    pub fn find(&mut self, hash: u64, client: &str, resource: &str) -> Option<&mut Entry> {
        self.map.find_mut(hash, |e| e.matches(client, resource))
    }

    /// The bucket named (client, resource) of rule `rule` (a bucket keyed per
    /// (client, resource) whatever its rule: see [`super::key::bucket_hash`]).
    #[inline]
    pub fn find_in(
        &mut self,
        hash: u64,
        rule: &str,
        client: &str,
        resource: &str,
    ) -> Option<&mut Entry> {
        self.map
            .find_mut(hash, |e| e.matches_in(rule, client, resource))
    }

    /// Inserts a new bucket, first evicting the least recently used batch if
    /// the shard is at its cap (`on_evict` sees each evicted bucket). Returns
    /// the new entry and how many were evicted.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        hash: u64,
        client: &str,
        resource: &str,
        rule: Arc<Rule>,
        generation: u32,
        now: u64,
        mut on_evict: impl FnMut(&Entry),
    ) -> (&mut Entry, usize) {
        let key = BucketKey::new(client, resource);
        let key_bytes = key.heap_bytes();
        let mut evicted = 0;
        // A bounded number of LRU batches (each at least an eighth of what is
        // left); an empty shard always takes the bucket.
        for _ in 0..64 {
            if self.map.is_empty()
                || (self.map.len() < self.cap
                    && self.bytes_after_insert(key_bytes) <= self.byte_cap)
            {
                break;
            }
            evicted += self.evict_lru(now, &mut on_evict);
        }
        self.key_bytes += key_bytes;
        let entry = Entry {
            key,
            tat: 0,
            share: 0,
            aux: 0,
            rule,
            generation,
            last_used: tick(now),
        };
        let hasher = &self.hasher;
        let slot = self.map.insert_unique(hash, entry, |e| e.hash_with(hasher));
        (slot.into_mut(), evicted)
    }

    /// Removes the bucket for (client, resource) if present and returns it.
    pub fn remove(&mut self, hash: u64, client: &str, resource: &str) -> Option<Entry> {
        self.remove_in(hash, "", client, resource)
    }

    /// Removes rule `rule`'s bucket (client, resource), as [`Buckets::find_in`].
    pub fn remove_in(
        &mut self,
        hash: u64,
        rule: &str,
        client: &str,
        resource: &str,
    ) -> Option<Entry> {
        match self
            .map
            .find_entry(hash, |e| e.matches_in(rule, client, resource))
        {
            Ok(entry) => {
                let removed = entry.remove().0;
                self.key_bytes -= removed.key.heap_bytes();
                Some(removed)
            }
            Err(_) => None,
        }
    }

    /// The shard's memory: the hash table as allocated, plus boxed keys.
    pub fn bytes(&self) -> usize {
        self.map.allocation_size() + self.key_bytes
    }

    /// [`bytes`](Self::bytes) once a bucket with `key_bytes` of boxed key is
    /// inserted (the table doubles when full).
    fn bytes_after_insert(&self, key_bytes: usize) -> usize {
        let table = if self.map.len() < self.map.capacity() {
            self.map.allocation_size()
        } else {
            (2 * self.map.allocation_size()).max(8 * SLOT_BYTES)
        };
        table + self.key_bytes + key_bytes
    }

    /// Visits every bucket mutably (admin scans: draining leases, debts).
    pub fn for_each_mut(&mut self, f: impl FnMut(&mut Entry)) {
        self.map.iter_mut().for_each(f);
    }

    /// Evicts the least recently used eighth of the shard (at least one
    /// bucket). Of buckets tied at the cutoff age only as many go as the
    /// batch needs: a shard used within one tick is not emptied.
    fn evict_lru(&mut self, now: u64, mut on_evict: impl FnMut(&Entry)) -> usize {
        let now = tick(now);
        let batch = (self.cap.min(self.map.len()) / 8).max(1);
        self.scratch.clear();
        self.scratch
            .extend(self.map.iter().map(|e| now.wrapping_sub(e.last_used)));
        if self.scratch.is_empty() {
            return 0;
        }
        // The `batch` largest ages: select the cutoff from the top.
        let nth = self.scratch.len() - batch.min(self.scratch.len());
        let (_, &mut cutoff, older) = self.scratch.select_nth_unstable(nth);
        let mut ties = batch - older.iter().filter(|&&age| age > cutoff).count();
        let before = self.map.len();
        let key_bytes = &mut self.key_bytes;
        self.map.retain(|e| {
            let age = now.wrapping_sub(e.last_used);
            let keep = age < cutoff || (age == cutoff && ties == 0);
            if age == cutoff && !keep {
                ties -= 1;
            }
            if !keep {
                *key_bytes -= e.key.heap_bytes();
                on_evict(e);
            }
            keep
        });
        before - self.map.len()
    }

    /// Drops full buckets unused for their rule's idle TTL or resolved under
    /// an older rules generation than `generation` (forgetting a full bucket
    /// changes nothing); `on_evict` sees each. Returns how many were dropped.
    pub fn evict_idle(
        &mut self,
        now: u64,
        generation: u32,
        mut on_evict: impl FnMut(&Entry),
    ) -> usize {
        let before = self.map.len();
        let now_tick = tick(now);
        let key_bytes = &mut self.key_bytes;
        self.map.retain(|e| {
            let idle_ns = u64::from(now_tick.wrapping_sub(e.last_used)) << TICK_SHIFT;
            let idle = idle_ns >= e.rule.idle_ttl_ns;
            let settled = e.is_settled(now);
            let evict = settled && (idle || e.generation != generation);
            if evict {
                *key_bytes -= e.key.heap_bytes();
                on_evict(e);
            }
            !evict
        });
        before - self.map.len()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Eviction counters of the whole table.
#[derive(Debug, Default)]
pub struct EvictionCounters {
    pub idle: AtomicU64,
    pub lru: AtomicU64,
}

/// The sharded table.
#[derive(Debug)]
pub struct ShardedTable {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    hasher: DefaultHashBuilder,
    shift: u32,
    max_buckets: usize,
    pub evictions: EvictionCounters,
}

impl ShardedTable {
    /// A table of `shards` shards (rounded up to a power of two, and down so
    /// that each shard may hold at least 16 buckets and 64 KiB) holding at most
    /// `max_buckets` buckets and `max_bytes` bytes in total.
    pub fn new(shards: usize, max_buckets: usize, max_bytes: usize) -> ShardedTable {
        let max_buckets = max_buckets.max(1);
        let mut n = shards.max(1).next_power_of_two();
        // Each shard gets room for 16 buckets and 64 KiB (a byte share below
        // one bucket could not be kept).
        while n > 1 && (max_buckets / n < 16 || max_bytes / n < 64 * 1024) {
            n /= 2;
        }
        // Spread the remainder so the caps add up to exactly `max_buckets`.
        let (cap, extra) = (max_buckets / n, max_buckets % n);
        let hasher = DefaultHashBuilder::default();
        let shards = (0..n)
            .map(|i| {
                let cap = cap + usize::from(i < extra);
                CachePadded::new(Mutex::new(Shard {
                    buckets: Buckets {
                        map: HashTable::new(),
                        hasher: hasher.clone(),
                        cap,
                        byte_cap: max_bytes / n,
                        key_bytes: 0,
                        scratch: Vec::new(),
                    },
                    rules: Arc::new(RuleSet::default()),
                    stacked: false,
                    book: ShareBook::new(hasher.clone()),
                }))
            })
            .collect();
        ShardedTable {
            shards,
            hasher,
            // Shard choice uses bits 32.. of the hash; hashbrown uses the low
            // bits for the slot and the top 7 for tags, so they stay independent.
            shift: 32,
            max_buckets,
            evictions: EvictionCounters::default(),
        }
    }

    /// Hashes (client, resource) once for both shard choice and lookup.
    #[inline]
    pub fn hash(&self, client: &str, resource: &str) -> u64 {
        self.hasher.hash_one((client, resource))
    }

    /// The hash of rule `rule`'s bucket named (client, resource): see
    /// [`super::key::bucket_hash`] (the same as [`ShardedTable::hash`] for a bucket keyed
    /// per client and resource).
    #[inline]
    pub fn hash_bucket(&self, rule: &str, client: &str, resource: &str) -> u64 {
        super::key::bucket_hash(&self.hasher, rule, client, resource)
    }

    /// [`ShardedTable::hash_bucket`] of a bucket key.
    pub fn hash_key(&self, rule: &str, key: &super::key::BucketKey) -> u64 {
        let (client, resource) = key.names();
        self.hash_bucket(rule, client, resource)
    }

    /// The shard index for a hash.
    #[inline]
    pub fn shard_of(&self, hash: u64) -> usize {
        ((hash >> self.shift) as usize) & (self.shards.len() - 1)
    }

    /// Locks one shard.
    #[inline]
    pub fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.shards[shard].lock()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The cap on buckets across all shards.
    pub fn max_buckets(&self) -> usize {
        self.max_buckets
    }

    /// Total buckets (locks each shard briefly).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().buckets.len()).sum()
    }

    /// Total bytes (locks each shard briefly); see [`Buckets::bytes`].
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().buckets.bytes()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Idle eviction of one shard; the sweeper calls this shard by shard.
    pub fn evict_idle(&self, shard: usize, now: u64, on_evict: impl FnMut(&Entry)) -> usize {
        let n = {
            let shard = &mut *self.shards[shard].lock();
            shard
                .buckets
                .evict_idle(now, shard.rules.generation as u32, on_evict)
        };
        self.evictions.idle.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Points every shard at a new rules snapshot.
    pub fn install_rules(&self, rules: &Arc<RuleSet>) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.rules = Arc::clone(rules);
            shard.stacked = rules.stacked();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RuleSource;
    use crate::rule::RuleSpec;
    use std::time::Duration;

    fn rule() -> Arc<Rule> {
        let set = RuleSet::build(
            vec![(
                RuleSpec::new("r", "*", "*", 10, Duration::from_secs(1)),
                RuleSource::Runtime,
            )],
            &RuleSet::default(),
            0,
        )
        .unwrap();
        Arc::clone(set.get("r").unwrap())
    }

    #[test]
    fn shard_count_is_a_power_of_two_with_room_per_shard() {
        assert_eq!(
            ShardedTable::new(100, 1_000_000, usize::MAX).shard_count(),
            128
        );
        assert_eq!(ShardedTable::new(128, 100, usize::MAX).shard_count(), 4);
        assert_eq!(ShardedTable::new(128, 100, usize::MAX).max_buckets(), 100);
        assert_eq!(ShardedTable::new(8, 1, usize::MAX).shard_count(), 1);
    }

    /// Buckets all used within one tick: an LRU batch takes an eighth of
    /// them, not the whole shard.
    #[test]
    fn an_lru_batch_of_tied_buckets_takes_only_the_batch() {
        let table = ShardedTable::new(1, 64, usize::MAX);
        let r = rule();
        let shard = &mut table.lock(0).buckets;
        for i in 0..64 {
            let c = format!("c{i}");
            shard.insert(table.hash(&c, "x"), &c, "x", Arc::clone(&r), 0, 5, |_| {});
        }
        let (_, evicted) = shard.insert(
            table.hash("new", "x"),
            "new",
            "x",
            Arc::clone(&r),
            0,
            5,
            |_| {},
        );
        assert_eq!(evicted, 8);
        assert_eq!(shard.len(), 57);
    }

    /// Long names cost their bytes: under a byte cap the table evicts the
    /// least recently used buckets and never holds more than the cap.
    #[test]
    fn the_byte_cap_holds_with_long_names() {
        let cap = 256 * 1024;
        let table = ShardedTable::new(1, 1_000_000, cap);
        let r = rule();
        let shard = &mut table.lock(0).buckets;
        let name = "n".repeat(512);
        let mut evicted = 0;
        for i in 0..2_000u64 {
            let client = format!("{i}{name}");
            let h = table.hash(&client, "x");
            let (_, n) = shard.insert(h, &client, "x", Arc::clone(&r), 0, i << TICK_SHIFT, |_| {});
            evicted += n;
            assert!(shard.bytes() <= cap, "{} bytes after {i}", shard.bytes());
        }
        let expected = (512 + 4 + 2 + 8_usize).next_multiple_of(16);
        assert!(
            shard.len() >= cap / (expected + 2 * SLOT_BYTES) / 2,
            "{} kept",
            shard.len()
        );
        assert_eq!(evicted + shard.len(), 2_000);
        // The newest bucket is kept, the oldest went.
        let newest = format!("1999{name}");
        assert!(shard.find(table.hash(&newest, "x"), &newest, "x").is_some());
        let oldest = format!("0{name}");
        assert!(shard.find(table.hash(&oldest, "x"), &oldest, "x").is_none());
        // Keys leaving give their bytes back.
        let key_bytes: usize = shard.map.iter().map(|e| e.key.heap_bytes()).sum();
        assert_eq!(shard.key_bytes, key_bytes);
    }

    #[test]
    fn an_entry_is_64_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }

    #[test]
    fn keys_do_not_collide_across_the_split() {
        let table = ShardedTable::new(1, 100, usize::MAX);
        let shard = &mut table.lock(0).buckets;
        let r = rule();
        let h1 = table.hash("ab", "c");
        shard.insert(h1, "ab", "c", Arc::clone(&r), 0, 0, |_| {});
        assert!(shard.find(h1, "ab", "c").is_some());
        // Same bytes, different split: must not match even with the same hash.
        assert!(shard.find(h1, "a", "bc").is_none());
        let e = shard.find(h1, "ab", "c").unwrap();
        assert_eq!(e.names(), ("ab", "c"));
    }

    #[test]
    fn cap_evicts_least_recently_used_first() {
        let table = ShardedTable::new(1, 16, usize::MAX);
        let r = rule();
        let shard = &mut table.lock(0).buckets;
        let t = 1u64 << TICK_SHIFT;
        for i in 0..16u64 {
            let c = format!("c{i}");
            let h = table.hash(&c, "x");
            shard.insert(h, &c, "x", Arc::clone(&r), 0, i * t, |_| {});
        }
        // Touch c0 so it is the most recent.
        let h0 = table.hash("c0", "x");
        shard.find(h0, "c0", "x").unwrap().last_used = tick(100 * t);
        let h = table.hash("new", "x");
        let (_, evicted) = shard.insert(h, "new", "x", Arc::clone(&r), 0, 101 * t, |_| {});
        assert_eq!(evicted, 2, "cap/8 oldest go");
        assert!(shard.len() <= 16);
        assert!(shard.find(h0, "c0", "x").is_some());
        assert!(shard.find(table.hash("c1", "x"), "c1", "x").is_none());
        assert!(shard.find(table.hash("c2", "x"), "c2", "x").is_none());
        assert!(shard.find(table.hash("c3", "x"), "c3", "x").is_some());
    }

    #[test]
    fn idle_eviction_only_drops_full_idle_buckets() {
        let table = ShardedTable::new(1, 100, usize::MAX);
        let r = rule();
        // Times are kept in ticks: eviction may come up to one tick late.
        let ttl = r.idle_ttl_ns + (1 << TICK_SHIFT);
        {
            let shard = &mut table.lock(0).buckets;
            let (e, _) = shard.insert(
                table.hash("full", "x"),
                "full",
                "x",
                Arc::clone(&r),
                0,
                0,
                |_| {},
            );
            e.tat = 0;
            let (e, _) = shard.insert(
                table.hash("debt", "x"),
                "debt",
                "x",
                Arc::clone(&r),
                0,
                0,
                |_| {},
            );
            e.tat = ttl + 10;
            shard.insert(
                table.hash("fresh", "x"),
                "fresh",
                "x",
                Arc::clone(&r),
                0,
                ttl,
                |_| {},
            );
        }
        assert_eq!(table.evict_idle(0, ttl, |_| {}), 1);
        assert_eq!(table.len(), 2);
        assert_eq!(table.evictions.idle.load(Ordering::Relaxed), 1);
    }
}
