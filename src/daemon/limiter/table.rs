//! The bucket table: `S` shards (a power of two) of `hashbrown` tables behind
//! `parking_lot` mutexes, keyed by (client, resource) hashed once.
//!
//! Owns bucket storage and eviction: idle eviction (a full bucket unused for
//! its rule's idle TTL, which is safe because a full bucket is what a missing
//! one means) and the hard cap (per shard, least recently used first, in
//! batches so a flood of new keys costs O(1) amortised per insert).
//! No clock reads and no I/O; callers pass `now` and hold a shard for
//! nanoseconds.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::utils::CachePadded;
use hashbrown::DefaultHashBuilder;
use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};

use super::bucket;
use super::rules::{Rule, RuleSet};

/// One bucket. About 48 bytes plus the key bytes (and their allocation).
#[derive(Debug)]
pub struct Entry {
    /// The full hash, kept so the table can grow without rehashing keys.
    hash: u64,
    /// `client_len: u16 LE`, client bytes, resource bytes.
    key: Box<[u8]>,
    /// GCRA theoretical arrival time, ns.
    pub tat: u64,
    /// Last request, ns: orders LRU eviction and gates idle eviction.
    pub last_used: u64,
    /// The rule this bucket was resolved to...
    pub rule: Arc<Rule>,
    /// ...under this rules generation; re-resolved when the shard's differs.
    pub generation: u64,
}

impl Entry {
    fn matches(&self, hash: u64, client: &str, resource: &str) -> bool {
        self.hash == hash
            && self.key.len() == 2 + client.len() + resource.len()
            && self.key[..2] == (client.len() as u16).to_le_bytes()
            && &self.key[2..2 + client.len()] == client.as_bytes()
            && &self.key[2 + client.len()..] == resource.as_bytes()
    }

    /// The (client, resource) this bucket belongs to.
    pub fn names(&self) -> (&str, &str) {
        let split = 2 + usize::from(u16::from_le_bytes([self.key[0], self.key[1]]));
        let text = |b| std::str::from_utf8(b).expect("keys are built from str");
        (text(&self.key[2..split]), text(&self.key[split..]))
    }
}

/// One shard: its buckets and the rules snapshot it resolves against.
#[derive(Debug)]
pub struct Shard {
    pub buckets: Buckets,
    /// The current rules. Each shard holds its own pointer so the hot path
    /// touches no shared lock or reference count.
    pub rules: Arc<RuleSet>,
}

/// The buckets of one shard.
#[derive(Debug)]
pub struct Buckets {
    map: HashTable<Entry>,
    /// Most buckets this shard may hold.
    cap: usize,
    /// Reused buffer for LRU selection.
    scratch: Vec<u64>,
}

impl Buckets {
    /// The bucket for (client, resource), if present.
    #[inline]
    pub fn find(&mut self, hash: u64, client: &str, resource: &str) -> Option<&mut Entry> {
        self.map
            .find_mut(hash, |e| e.matches(hash, client, resource))
    }

    /// Inserts a new bucket, first evicting the least recently used batch if
    /// the shard is at its cap. Returns the new entry and how many were evicted.
    pub fn insert(
        &mut self,
        hash: u64,
        client: &str,
        resource: &str,
        rule: Arc<Rule>,
        generation: u64,
        now: u64,
    ) -> (&mut Entry, usize) {
        let evicted = if self.map.len() >= self.cap {
            self.evict_lru()
        } else {
            0
        };
        let mut key = Vec::with_capacity(2 + client.len() + resource.len());
        key.extend_from_slice(&(client.len() as u16).to_le_bytes());
        key.extend_from_slice(client.as_bytes());
        key.extend_from_slice(resource.as_bytes());
        let entry = Entry {
            hash,
            key: key.into_boxed_slice(),
            tat: 0,
            last_used: now,
            rule,
            generation,
        };
        let slot = self.map.insert_unique(hash, entry, |e| e.hash);
        (slot.into_mut(), evicted)
    }

    /// Removes the bucket for (client, resource) if present.
    pub fn remove(&mut self, hash: u64, client: &str, resource: &str) {
        if let Ok(entry) = self
            .map
            .find_entry(hash, |e| e.matches(hash, client, resource))
        {
            entry.remove();
        }
    }

    /// Evicts the oldest eighth of the shard (at least one bucket).
    fn evict_lru(&mut self) -> usize {
        let batch = (self.cap / 8).max(1);
        self.scratch.clear();
        self.scratch.extend(self.map.iter().map(|e| e.last_used));
        if self.scratch.is_empty() {
            return 0;
        }
        let nth = batch.min(self.scratch.len()) - 1;
        let (_, &mut cutoff, _) = self.scratch.select_nth_unstable(nth);
        let before = self.map.len();
        self.map.retain(|e| e.last_used > cutoff);
        before - self.map.len()
    }

    /// Drops buckets that are full and either unused for their rule's idle TTL
    /// or resolved under an older rules generation than `generation`.
    /// Returns how many were dropped.
    pub fn evict_idle(&mut self, now: u64, generation: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|e| {
            let full = bucket::is_full(e.tat, now);
            let idle = now.saturating_sub(e.last_used) >= e.rule.idle_ttl_ns;
            !(full && (idle || e.generation != generation))
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
    /// that each shard may hold at least 16 buckets) holding at most
    /// `max_buckets` buckets in total.
    pub fn new(shards: usize, max_buckets: usize) -> ShardedTable {
        let max_buckets = max_buckets.max(1);
        let mut n = shards.max(1).next_power_of_two();
        while n > 1 && max_buckets / n < 16 {
            n /= 2;
        }
        // Spread the remainder so the caps add up to exactly `max_buckets`.
        let (cap, extra) = (max_buckets / n, max_buckets % n);
        let shards = (0..n)
            .map(|i| {
                let cap = cap + usize::from(i < extra);
                CachePadded::new(Mutex::new(Shard {
                    buckets: Buckets {
                        map: HashTable::new(),
                        cap,
                        scratch: Vec::new(),
                    },
                    rules: Arc::new(RuleSet::default()),
                }))
            })
            .collect();
        ShardedTable {
            shards,
            hasher: DefaultHashBuilder::default(),
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Idle eviction of one shard; the sweeper calls this shard by shard.
    pub fn evict_idle(&self, shard: usize, now: u64) -> usize {
        let n = {
            let shard = &mut *self.shards[shard].lock();
            shard.buckets.evict_idle(now, shard.rules.generation)
        };
        self.evictions.idle.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Points every shard at a new rules snapshot.
    pub fn install_rules(&self, rules: &Arc<RuleSet>) {
        for shard in self.shards.iter() {
            shard.lock().rules = Arc::clone(rules);
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
        assert_eq!(ShardedTable::new(100, 1_000_000).shard_count(), 128);
        assert_eq!(ShardedTable::new(128, 100).shard_count(), 4);
        assert_eq!(ShardedTable::new(128, 100).max_buckets(), 100);
        assert_eq!(ShardedTable::new(8, 1).shard_count(), 1);
    }

    #[test]
    fn keys_do_not_collide_across_the_split() {
        let table = ShardedTable::new(1, 100);
        let shard = &mut table.lock(0).buckets;
        let r = rule();
        let h1 = table.hash("ab", "c");
        shard.insert(h1, "ab", "c", Arc::clone(&r), 0, 0);
        assert!(shard.find(h1, "ab", "c").is_some());
        // Same bytes, different split: must not match even with the same hash.
        assert!(shard.find(h1, "a", "bc").is_none());
        let e = shard.find(h1, "ab", "c").unwrap();
        assert_eq!(e.names(), ("ab", "c"));
    }

    #[test]
    fn cap_evicts_least_recently_used_first() {
        let table = ShardedTable::new(1, 16);
        let r = rule();
        let shard = &mut table.lock(0).buckets;
        for i in 0..16u64 {
            let c = format!("c{i}");
            let h = table.hash(&c, "x");
            shard.insert(h, &c, "x", Arc::clone(&r), 0, i);
        }
        // Touch c0 so it is the most recent.
        let h0 = table.hash("c0", "x");
        shard.find(h0, "c0", "x").unwrap().last_used = 100;
        let h = table.hash("new", "x");
        let (_, evicted) = shard.insert(h, "new", "x", Arc::clone(&r), 0, 101);
        assert_eq!(evicted, 2, "cap/8 oldest go");
        assert!(shard.len() <= 16);
        assert!(shard.find(h0, "c0", "x").is_some());
        assert!(shard.find(table.hash("c1", "x"), "c1", "x").is_none());
        assert!(shard.find(table.hash("c2", "x"), "c2", "x").is_none());
        assert!(shard.find(table.hash("c3", "x"), "c3", "x").is_some());
    }

    #[test]
    fn idle_eviction_only_drops_full_idle_buckets() {
        let table = ShardedTable::new(1, 100);
        let r = rule();
        let ttl = r.idle_ttl_ns;
        {
            let shard = &mut table.lock(0).buckets;
            let (e, _) = shard.insert(table.hash("full", "x"), "full", "x", Arc::clone(&r), 0, 0);
            e.tat = 0;
            let (e, _) = shard.insert(table.hash("debt", "x"), "debt", "x", Arc::clone(&r), 0, 0);
            e.tat = ttl + 10;
            shard.insert(
                table.hash("fresh", "x"),
                "fresh",
                "x",
                Arc::clone(&r),
                0,
                ttl,
            );
        }
        assert_eq!(table.evict_idle(0, ttl), 1);
        assert_eq!(table.len(), 2);
        assert_eq!(table.evictions.idle.load(Ordering::Relaxed), 1);
    }
}
