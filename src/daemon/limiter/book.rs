//! The share book: this daemon's recorded shares of global buckets, one
//! book per shard of the bucket table (under the same lock, so no global
//! lock and no second lookup structure to coordinate).
//!
//! A global bucket with no record in etcd uses its rule's implicit share; a
//! bucket with a record uses what the book holds for it, whether or not the
//! bucket exists in the table right now: a bucket created later (after an
//! eviction, or for a key another daemon recorded) looks here first. Only
//! the lease coordinator writes the book; the hot path reads it when it
//! creates a bucket or changes its parameters, never per request.

use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::key::BucketKey;

/// Rate fractions are parts of `SCALE` (2^32).
pub const SCALE: u64 = 1 << 32;

/// A recorded share: a fraction of the rule's rate and tokens of a burst,
/// independent of the rule's parameters (an edited rule keeps its shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recorded {
    /// Parts of [`SCALE`] of the rule's rate.
    pub rate: u64,
    /// Tokens of depth, of a burst of `counted_in`.
    pub depth: u64,
    pub counted_in: u64,
}

impl Recorded {
    /// Nothing: a daemon unlisted in a record, or whose entry is dead.
    pub const ZERO: Recorded = Recorded {
        rate: 0,
        depth: 0,
        counted_in: 0,
    };

    /// The local bucket of this share on a rule with `interval_ns` per token
    /// and burst `burst`: (ns per token, depth in tokens). Intervals round
    /// up and depths down, so a bucket never holds more than its share. A
    /// depth counted in another burst (during a rule edit) scales to this
    /// one. No rate gives `u64::MAX` ns per token.
    ///
    /// ```
    /// use rld::daemon::limiter::book::{Recorded, SCALE};
    /// // A third of 1000/s with 20 tokens of a burst of 60: one token every 3 ms.
    /// let s = Recorded { rate: SCALE / 3, depth: 20, counted_in: 60 };
    /// assert_eq!(s.bucket(1_000_000, 60), (3_000_001, 20));
    /// assert_eq!(s.bucket(1_000_000, 30), (3_000_001, 10));
    /// ```
    pub fn bucket(self, interval_ns: u64, burst: u64) -> (u64, u64) {
        let interval = if self.rate == 0 {
            u64::MAX
        } else {
            let n = u128::from(interval_ns.max(1)) * u128::from(SCALE);
            u64::try_from(n.div_ceil(u128::from(self.rate.min(SCALE)))).unwrap_or(u64::MAX)
        };
        let depth = if burst == self.counted_in || self.counted_in == 0 {
            self.depth.min(burst)
        } else {
            u64::try_from(u128::from(self.depth) * u128::from(burst) / u128::from(self.counted_in))
                .unwrap_or(u64::MAX)
                .min(burst)
        };
        (interval, depth)
    }
}

/// One recorded share in a shard's book.
#[derive(Debug, Clone)]
pub struct BookEntry {
    pub rule: Arc<str>,
    pub key: BucketKey,
    pub share: Recorded,
    /// After a raise: (when, tokens): a bucket created later starts as one
    /// that held `tokens` then and filled at the share's rate since (the new
    /// room starts empty). `None`: a new bucket starts full.
    pub start: Option<(u64, u64)>,
}

/// The recorded shares of one shard.
#[derive(Debug, Default)]
pub struct ShareBook {
    map: HashTable<BookEntry>,
    hasher: DefaultHashBuilder,
}

impl ShareBook {
    pub fn new(hasher: DefaultHashBuilder) -> ShareBook {
        ShareBook {
            map: HashTable::new(),
            hasher,
        }
    }

    /// The recorded share of (rule, client, resource), if any.
    #[inline]
    pub fn get(&self, hash: u64, rule: &str, client: &str, resource: &str) -> Option<&BookEntry> {
        self.map.find(hash, |e| {
            &*e.rule == rule && e.key.matches(client, resource)
        })
    }

    /// Records a share (replacing the one before).
    pub fn put(&mut self, hash: u64, entry: BookEntry) {
        let (client, resource) = entry.key.names();
        match self.map.find_mut(hash, |e| {
            e.rule == entry.rule && e.key.matches(client, resource)
        }) {
            Some(slot) => *slot = entry,
            None => {
                let hasher = &self.hasher;
                self.map.insert_unique(hash, entry, |e| {
                    let (client, resource) = e.key.names();
                    super::key::bucket_hash(hasher, &e.rule, client, resource)
                });
            }
        }
    }

    /// Forgets the share of (rule, client, resource): the bucket follows its
    /// rule's implicit share again. Returns what was there.
    pub fn remove(
        &mut self,
        hash: u64,
        rule: &str,
        client: &str,
        resource: &str,
    ) -> Option<BookEntry> {
        match self.map.find_entry(hash, |e| {
            &*e.rule == rule && e.key.matches(client, resource)
        }) {
            Ok(slot) => Some(slot.remove().0),
            Err(_) => None,
        }
    }

    /// Visits every share mutably.
    pub fn for_each_mut(&mut self, f: impl FnMut(&mut BookEntry)) {
        self.map.iter_mut().for_each(f);
    }

    /// Keeps the shares `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut BookEntry) -> bool) {
        self.map.retain(|e| keep(e));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
