//! The demand of one bucket on this daemon: tokens per second asked for
//! (allowed or not), read from the bucket's own count so the first reading
//! comes at once, smoothed against noise, and quick to fall when the
//! bucket goes quiet (demand that moved elsewhere frees its share fast).

use std::time::{Duration, Instant};

use super::{FIRST_SAMPLE, SAMPLE};

/// Demand of one bucket on this daemon.
#[derive(Debug, Clone, Copy)]
pub(super) struct Demand {
    /// Tokens per second (smoothed); meaningful once `known`.
    pub(super) rate: f64,
    pub(super) known: bool,
    /// Tokens seen over `span` since the last sample.
    acc: u64,
    span: Duration,
    /// When the coordinator last read the bucket (`None`: never: the
    /// bucket's own count says over what span it counted).
    read_at: Option<Instant>,
}

/// Tokens a demand sample should see before it is believed (fewer make a
/// noisy estimate: a low-rate bucket's demand would swing and rewrite its
/// record for nothing).
const SAMPLE_TOKENS: u64 = 16;

/// Tokens each later sample should see: a slow bucket's demand is judged
/// over seconds (its Poisson noise over 16 tokens, +-25%, moved shares
/// back and forth for nothing).
const STEADY_TOKENS: u64 = 32;

/// Tokens an early estimate ([`Demand::early`]) needs.
const EARLY_TOKENS: u64 = 4;

impl Demand {
    pub(super) fn new() -> Demand {
        Demand {
            rate: 0.0,
            known: false,
            acc: 0,
            span: Duration::ZERO,
            read_at: None,
        }
    }

    /// Adds a reading of the bucket at `now`: `wanted` tokens since the
    /// last one (the first reading: over `first_span`, as the bucket
    /// counted), the bucket idle for `idle`. A sample is taken once it saw
    /// [`SAMPLE_TOKENS`] tokens over at least [`FIRST_SAMPLE`] (a first one
    /// at once if it spans that long), or once it spans as long as the
    /// current estimate needs to show that many (at least [`SAMPLE`]). A
    /// bucket idle for as long as that is at zero at once: demand that moved
    /// elsewhere frees its share fast. A sample below half the estimate is
    /// believed at once; others are smoothed.
    pub(super) fn add(&mut self, wanted: u64, first_span: Duration, idle: Duration, now: Instant) {
        let span = match self.read_at {
            Some(at) => now.duration_since(at),
            None => first_span,
        };
        self.read_at = Some(now);
        self.acc += wanted;
        self.span += span;
        let tokens = if self.known {
            STEADY_TOKENS
        } else {
            SAMPLE_TOKENS
        };
        let patience = if self.known && self.rate > 0.0 {
            Duration::from_secs_f64((tokens as f64 / self.rate).min(60.0)).max(SAMPLE)
        } else {
            SAMPLE
        };
        if self.known && self.rate > 0.0 && idle >= patience {
            self.rate = 0.0;
            self.acc = 0;
            self.span = Duration::ZERO;
            return;
        }
        let enough = self.acc >= tokens && self.span >= FIRST_SAMPLE;
        if !(enough || self.span >= patience) {
            return;
        }
        let sample = self.acc as f64 / self.span.as_secs_f64().max(1e-3);
        self.rate = if !self.known || sample < self.rate / 2.0 {
            sample
        } else {
            0.5 * self.rate + 0.5 * sample
        };
        self.known = true;
        self.acc = 0;
        self.span = Duration::ZERO;
    }

    /// An estimate before the first sample, for a bucket whose share cannot
    /// hold anything (no depth): any demand there is unmet.
    pub(super) fn provisional(&self) -> Option<f64> {
        (self.acc > 0).then(|| self.acc as f64 / self.span.max(SAMPLE).as_secs_f64())
    }

    /// An early estimate before the first sample: what the tokens seen so
    /// far (at least [`EARLY_TOKENS`], over at least [`FIRST_SAMPLE`])
    /// say, leaning up by one token (lowering a share on too low an
    /// estimate would deny this daemon's callers).
    pub(super) fn early(&self) -> Option<f64> {
        (self.acc >= EARLY_TOKENS && self.span >= FIRST_SAMPLE)
            .then(|| (self.acc + 1) as f64 / self.span.as_secs_f64())
    }

    /// No bucket: no demand, known at once.
    pub(super) fn none(&mut self, now: Instant) {
        *self = Demand {
            rate: 0.0,
            known: true,
            acc: 0,
            span: Duration::ZERO,
            read_at: Some(now),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_samples_wait_for_enough_tokens_and_drops_are_believed() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        // A first reading over the bucket's own count: 20 tokens in 45 ms.
        let mut d = Demand::new();
        d.add(20, ms(45), ms(0), t0);
        assert!(d.known);
        assert!((d.rate - 20.0 / 0.045).abs() < 1.0);
        // Too few tokens too soon: no sample yet.
        let mut e = Demand::new();
        e.add(5, ms(20), ms(0), t0);
        assert!(!e.known);
        // ...nor an early estimate (too short a span); 10 ms later there is
        // one: 6 tokens in 30 ms, leaning up by one.
        assert_eq!(e.early(), None);
        e.add(0, ms(0), ms(10), t0 + ms(10));
        assert!(!e.known);
        assert!((e.early().unwrap() - 6.0 / 0.030).abs() < 0.5);
        // A busy bucket gone quiet: idle for as long as 16 tokens take at
        // its rate (at least 100 ms), its demand is zero at once.
        d.add(0, ms(0), ms(50), t0 + ms(95));
        assert!(d.rate > 400.0);
        d.add(0, ms(0), ms(100), t0 + ms(145));
        assert_eq!(d.rate, 0.0);
        // A slow bucket (13/s) is not judged on a tenth of a second: its
        // estimate needs 16 tokens or the time they take.
        let mut slow = Demand::new();
        slow.add(16, ms(1200), ms(0), t0);
        assert!((slow.rate - 13.3).abs() < 0.1);
        slow.add(1, ms(0), ms(10), t0 + ms(100));
        slow.add(0, ms(0), ms(200), t0 + ms(300));
        assert!(
            (slow.rate - 13.3).abs() < 0.1,
            "not yet judged: {}",
            slow.rate
        );
    }
}
