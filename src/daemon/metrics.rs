//! Daemon-wide counters and the decision-latency histogram.
//!
//! Connection tasks record latencies into a private [`LocalHistogram`] and
//! merge it into the shared [`LatencyHistogram`] once per wake-up, so the hot
//! path writes no shared cache line per request. Per-rule decision counters
//! live with the rules (`limiter::RuleActivity`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::limits::SlotRefusal;
use crate::protocol::{ErrorCode, LatencySummary};

/// Histogram slots: exact below 16 ns, then 8 slots per power of two up to 2^40 ns.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const EXACT: usize = 16;
const MAX_EXP: u32 = 40;
pub const SLOTS: usize = EXACT + (MAX_EXP as usize - 4) * SUB;

/// The slot of a value (values above 2^40 ns share the last slot).
#[inline]
pub fn slot_of(ns: u64) -> usize {
    if ns < EXACT as u64 {
        return ns as usize;
    }
    let exp = (63 - ns.leading_zeros()).min(MAX_EXP - 1);
    let sub = ((ns >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    let slot = EXACT + (exp as usize - 4) * SUB + sub;
    slot.min(SLOTS - 1)
}

/// A representative value of a slot (its midpoint).
pub fn slot_value(slot: usize) -> u64 {
    if slot < EXACT {
        return slot as u64;
    }
    let exp = ((slot - EXACT) / SUB + 4) as u32;
    let sub = ((slot - EXACT) % SUB) as u64;
    let width = 1u64 << (exp - SUB_BITS);
    (1u64 << exp) + sub * width + width / 2
}

/// The shared histogram.
#[derive(Debug)]
pub struct LatencyHistogram {
    slots: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one value directly (for rare events such as etcd calls; the
    /// request path uses a [`LocalHistogram`]).
    pub fn record_one(&self, ns: u64) {
        self.slots[slot_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The histogram in Prometheus' shape: the sum in seconds, the count,
    /// and the count of each bucket below `2^k` ns for `k` in `exps`
    /// (powers of two are slot edges, so every bucket is exact), the last
    /// bucket (`+Inf`) holding the rest. Reads each slot once; slots may
    /// move while being read, so the count is taken from the same reads.
    pub fn buckets(&self, exps: std::ops::RangeInclusive<u32>) -> (f64, u64, Vec<(f64, u64)>) {
        let mut out = Vec::with_capacity(exps.clone().count() + 1);
        let mut slot = 0;
        let mut count = 0;
        for k in exps {
            let edge = slot_of(1u64 << k.clamp(4, MAX_EXP - 1));
            let n: u64 = self.slots[slot..edge.max(slot)]
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .sum();
            slot = edge.max(slot);
            count += n;
            out.push(((1u64 << k) as f64 / 1e9, n));
        }
        let rest: u64 = self.slots[slot..]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum();
        count += rest;
        out.push((f64::INFINITY, rest));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, out)
    }

    /// Count, mean, quantiles and maximum so far.
    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let quantile = |q: f64| {
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (slot, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return slot_value(slot);
                }
            }
            slot_value(SLOTS - 1)
        };
        let max = self.max_ns.load(Ordering::Relaxed);
        LatencySummary {
            count,
            avg_ns: self.sum_ns.load(Ordering::Relaxed) / count,
            p50_ns: quantile(0.50).min(max),
            p90_ns: quantile(0.90).min(max),
            p99_ns: quantile(0.99).min(max),
            p999_ns: quantile(0.999).min(max),
            max_ns: max,
        }
    }
}

/// A connection's private histogram, merged into the shared one in batches.
#[derive(Debug)]
pub struct LocalHistogram {
    slots: Box<[u32]>,
    /// Range of touched slots, so a merge reads only those.
    lo: usize,
    hi: usize,
    sum_ns: u64,
    max_ns: u64,
}

impl Default for LocalHistogram {
    fn default() -> Self {
        LocalHistogram {
            slots: vec![0; SLOTS].into_boxed_slice(),
            lo: SLOTS,
            hi: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LocalHistogram {
    #[inline]
    pub fn record(&mut self, ns: u64) {
        let slot = slot_of(ns);
        self.slots[slot] += 1;
        self.lo = self.lo.min(slot);
        self.hi = self.hi.max(slot);
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds everything recorded to `shared` and clears.
    pub fn merge_into(&mut self, shared: &LatencyHistogram) {
        if self.lo > self.hi {
            return;
        }
        for slot in self.lo..=self.hi {
            let n = std::mem::take(&mut self.slots[slot]);
            if n > 0 {
                shared.slots[slot].fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
        shared.sum_ns.fetch_add(self.sum_ns, Ordering::Relaxed);
        shared.max_ns.fetch_max(self.max_ns, Ordering::Relaxed);
        *self = LocalHistogram {
            slots: std::mem::take(&mut self.slots),
            ..LocalHistogram::default()
        };
    }
}

/// Connection and protocol counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    /// Connections refused, by [`SlotRefusal`](super::limits::SlotRefusal)
    /// reason (the order of [`REFUSAL_REASONS`]).
    pub connections_refused: [AtomicU64; REFUSAL_REASONS.len()],
    /// Requests the protocol could not read (malformed, oversized, unknown
    /// version...).
    pub protocol_errors: AtomicU64,
    /// Error answers sent, by error code (codes past the array share its
    /// last slot, which no code uses today).
    pub errors: [AtomicU64; ERROR_CODE_SLOTS],
    pub rules_expired: AtomicU64,
    /// Trace contexts received with an all-zero id: ignored.
    pub invalid_trace_contexts: AtomicU64,
    pub latency: LatencyHistogram,
}

/// Why connections are refused, as counted in [`Metrics::connections_refused`].
pub const REFUSAL_REASONS: [&str; 3] = ["full", "kept_for_admins", "per_uid"];

/// Slots of [`Metrics::errors`]: one per error code the daemon sends.
pub const ERROR_CODE_SLOTS: usize = 32;

impl Metrics {
    /// Counts a refused connection.
    pub fn refused(&self, refusal: SlotRefusal) {
        Self::inc(&self.connections_refused[refusal.index()]);
    }

    /// Counts an error answer with `code`.
    pub fn error_answered(&self, code: ErrorCode) {
        Self::inc(&self.errors[usize::from(code.0).min(ERROR_CODE_SLOTS - 1)]);
    }

    /// Sum of an array of counters.
    pub fn total(counters: &[AtomicU64]) -> u64 {
        counters.iter().map(Self::get).sum()
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_monotonic_and_close() {
        let mut last = 0;
        for v in [0u64, 1, 15, 16, 17, 100, 1_000, 12_345, 1 << 30, 1 << 39] {
            let s = slot_of(v);
            assert!(s >= last);
            last = s;
            let rep = slot_value(s);
            let err = rep.abs_diff(v) as f64 / (v.max(1) as f64);
            assert!(err <= 0.07, "{v} -> {rep}");
        }
        assert_eq!(slot_of(u64::MAX), SLOTS - 1);
    }

    #[test]
    fn quantiles_from_merged_local_histograms() {
        let shared = LatencyHistogram::default();
        let mut local = LocalHistogram::default();
        for v in 1..=1000u64 {
            local.record(v * 1000);
        }
        local.merge_into(&shared);
        local.merge_into(&shared);
        let s = shared.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.max_ns, 1_000_000);
        assert!((480_000..=530_000).contains(&s.p50_ns), "{s:?}");
        assert!((960_000..=1_000_000).contains(&s.p99_ns), "{s:?}");
        assert_eq!(s.avg_ns, 500_500);
    }

    #[test]
    fn prometheus_buckets_are_exact_at_powers_of_two() {
        let h = LatencyHistogram::default();
        // 1023 ns is below 2^10, 1024 is not; 5000 below 2^13; 2^40 beyond all.
        for v in [100, 1023, 1024, 5_000, 5_000, 1 << 40] {
            h.record_one(v);
        }
        let (sum, count, buckets) = h.buckets(7..=13);
        assert_eq!(count, 6);
        assert!(
            (sum - (100.0 + 1023.0 + 1024.0 + 10_000.0 + (1u64 << 40) as f64) / 1e9).abs() < 1e-9
        );
        let at = |le: f64| {
            buckets
                .iter()
                .find(|(b, _)| (*b - le).abs() < 1e-15)
                .unwrap()
                .1
        };
        assert_eq!(at(128e-9), 1); // 100
        assert_eq!(at(1024e-9), 1); // 1023
        assert_eq!(at(2048e-9), 1); // 1024
        assert_eq!(at(8192e-9), 2); // 5000 twice
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 1));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), count);
    }
}
