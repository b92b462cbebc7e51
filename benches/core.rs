//! The limiter core without the socket: ns per decision on 1 hot key, 100,000
//! and 1,000,000 keys (uniformly random), on 1 and 2 threads, with and without
//! eviction pressure, beside the governor crate's keyed limiter (the
//! in-process ceiling) on the same keys; and a global rule's decision from
//! held tokens beside a local rule's; and three stacked rules beside one.
//! Run: `cargo bench --bench core`.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rld::daemon::limiter::{DefaultAction, Limiter, LimiterConfig, MonotonicClock};
use rld::protocol::{Priority, RuleSource};
use rld::rule::RuleSpec;

/// Client names and a pre-drawn random visiting order (so RNG cost is not
/// measured, and both limiters see the same sequence).
struct Keys {
    names: Vec<String>,
    order: Vec<u32>,
}

impl Keys {
    fn new(count: usize) -> Keys {
        let names = (0..count).map(|i| format!("client-{i}")).collect();
        // xorshift: deterministic and cheap.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let order = (0..(1 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % count as u64) as u32
            })
            .collect();
        Keys { names, order }
    }

    #[inline]
    fn get(&self, i: usize) -> &String {
        &self.names[self.order[i & (self.order.len() - 1)] as usize]
    }
}

fn limiter(max_buckets: usize) -> Limiter {
    let l = Limiter::new(LimiterConfig {
        shards: 128,
        max_buckets,
        max_table_bytes: usize::MAX,
        default_action: DefaultAction::Allow,
    });
    let rule = RuleSpec::new("bench", "*", "*", 1_000, Duration::from_secs(1));
    l.set_rules(vec![(rule, RuleSource::Config)], 0).unwrap();
    l
}

type Governor = governor::DefaultKeyedRateLimiter<String>;

fn governor() -> Governor {
    governor::RateLimiter::keyed(governor::Quota::per_second(NonZeroU32::new(1000).unwrap()))
}

/// Runs `iters` decisions split over `threads` threads; returns wall time.
fn run_threads(
    threads: usize,
    iters: u64,
    op: impl Fn(usize, u64) + Send + Sync + 'static + Clone,
) -> Duration {
    let per = iters / threads as u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let op = op.clone();
            s.spawn(move || {
                for i in 0..per {
                    op(t, i);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let clock = MonotonicClock::new();
    for (label, keys, cap) in [
        ("1 key", 1usize, 1_000_000usize),
        ("100k keys", 100_000, 1_000_000),
        ("1M keys", 1_000_000, 2_000_000),
        ("1M keys, cap 100k (eviction)", 1_000_000, 100_000),
    ] {
        let mut group = c.benchmark_group(format!("decision/{label}"));
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_secs(1));
        let keys = Arc::new(Keys::new(keys));
        for threads in [1usize, 2] {
            let l = Arc::new(limiter(cap));
            // Fill the table first so the measurement is the steady state.
            for i in 0..keys.names.len().min(cap) {
                let _ = l.acquire(&keys.names[i], "api", 1, Priority::Normal, clock.now_ns());
            }
            let (l2, k2) = (Arc::clone(&l), Arc::clone(&keys));
            group.bench_function(format!("rld/{threads} thread"), move |b| {
                let (l, k) = (Arc::clone(&l2), Arc::clone(&k2));
                b.iter_custom(move |iters| {
                    let (l, k) = (Arc::clone(&l), Arc::clone(&k));
                    run_threads(threads, iters, move |t, i| {
                        // The daemon reads the clock once per wake-up or
                        // sampled decision, not per decision; so does this.
                        thread_local!(static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
                        let now = NOW.with(|n| {
                            if i % 8 == 0 {
                                n.set(clock.now_ns());
                            }
                            n.get()
                        });
                        let key = k.get(i as usize * 2 + t);
                        let allowed = l.decide(key, "api", 1, Priority::Normal, now, |d| d.is_allowed());
                        black_box(allowed.unwrap());
                    })
                })
            });
            if cap >= keys.names.len() {
                let g = Arc::new(governor());
                let k2 = Arc::clone(&keys);
                group.bench_function(format!("governor/{threads} thread"), move |b| {
                    let (g, k) = (Arc::clone(&g), Arc::clone(&k2));
                    b.iter_custom(move |iters| {
                        let (g, k) = (Arc::clone(&g), Arc::clone(&k));
                        run_threads(threads, iters, move |t, i| {
                            let key = k.get(i as usize * 2 + t);
                            black_box(g.check_key(key).is_ok());
                        })
                    })
                });
            }
        }
        group.finish();
    }
}

/// A global rule's decision from this daemon's share (the common case with
/// etcd: no I/O, one more word per bucket), beside the same limiter's local
/// rule, 100,000 keys on 1 thread.
fn bench_global(c: &mut Criterion) {
    use rld::daemon::limiter::global::{ClusterLink, NullSink};
    use rld::rule::{OnFailure, Scope};
    let clock = MonotonicClock::new();
    let keys = Arc::new(Keys::new(100_000));
    let mut group = c.benchmark_group("decision/100k keys, global vs local rule");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for global in [true, false] {
        let l = Arc::new(Limiter::new(LimiterConfig {
            shards: 128,
            max_buckets: 1_000_000,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        }));
        let link = Arc::new(ClusterLink::new(NullSink, OnFailure::Local));
        link.set_valid_until(u64::MAX);
        l.attach(link);
        let mut rule = RuleSpec::new("bench", "*", "*", 1_000, Duration::from_secs(1));
        if global {
            rule.scope = Scope::Global;
        }
        l.set_rules(vec![(rule, RuleSource::Config)], 0).unwrap();
        let r = Arc::clone(l.rules().get("bench").unwrap());
        if let Some(g) = &r.global {
            // The implicit share of one daemon: the whole rule.
            g.set_count(1, &r.params, 0);
        }
        for name in &keys.names {
            let _ = l.acquire(name, "api", 1, Priority::Normal, clock.now_ns());
        }
        let k = Arc::clone(&keys);
        let name = if global { "global (share)" } else { "local" };
        group.bench_function(name, move |b| {
            let (l, k) = (Arc::clone(&l), Arc::clone(&k));
            b.iter_custom(move |iters| {
                let (l, k) = (Arc::clone(&l), Arc::clone(&k));
                run_threads(1, iters, move |_, i| {
                    let key = k.get(i as usize);
                    let allowed = l.decide(key, "api", 1, Priority::Normal, clock.now_ns(), |d| {
                        d.is_allowed()
                    });
                    black_box(allowed.unwrap());
                })
            })
        });
    }
    group.finish();
}

/// Stacked rules: one request checked against three rules (per client and
/// resource, per client, one bucket for all), all or nothing, beside the
/// same keys under one rule; 100,000 keys on 1 thread. (Three buckets in up
/// to three shards, each locked once.)
fn bench_stacked(c: &mut Criterion) {
    let clock = MonotonicClock::new();
    let keys = Arc::new(Keys::new(100_000));
    let mut group = c.benchmark_group("decision/100k keys, stacked rules");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (name, stacked) in [("1 rule", false), ("3 rules", true)] {
        let l = Limiter::new(LimiterConfig {
            shards: 128,
            max_buckets: 1_000_000,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        });
        let mut rules = vec![(
            RuleSpec::new("pair", "*", "*", 1_000, Duration::from_secs(1)),
            RuleSource::Config,
        )];
        if stacked {
            let mut each = RuleSpec::new("each", "*", "*", 1_000, Duration::from_secs(1));
            each.per = rld::rule::Per::Client;
            let mut all = RuleSpec::new("all", "*", "*", 1_000_000_000, Duration::from_secs(1));
            all.per = rld::rule::Per::None;
            rules.push((each, RuleSource::Config));
            rules.push((all, RuleSource::Config));
        }
        l.set_rules(rules, 0).unwrap();
        for k in &keys.names {
            let _ = l.acquire(k, "api", 1, Priority::Normal, clock.now_ns());
        }
        let (l, k) = (Arc::new(l), Arc::clone(&keys));
        group.bench_function(name, move |b| {
            let (l, k) = (Arc::clone(&l), Arc::clone(&k));
            b.iter_custom(move |iters| {
                let (l, k) = (Arc::clone(&l), Arc::clone(&k));
                run_threads(1, iters, move |_, i| {
                    thread_local!(static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
                    let now = NOW.with(|n| {
                        if i % 8 == 0 {
                            n.set(clock.now_ns());
                        }
                        n.get()
                    });
                    let key = k.get(i as usize);
                    let allowed = l.decide(key, "api", 1, Priority::Normal, now, |d| d.is_allowed());
                    black_box(allowed.unwrap());
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_global, bench_stacked);
criterion_main!(benches);
