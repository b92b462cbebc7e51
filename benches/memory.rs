//! Bytes per bucket: resident memory before and after creating 1,000,000
//! buckets (distinct clients, one request each), divided by the count; the
//! governor crate's keyed limiter on the same keys for comparison.
//! Run: `cargo bench --bench memory`.

use std::num::NonZeroU32;
use std::time::Duration;

use rld::daemon::limiter::{DefaultAction, Limiter, LimiterConfig};
use rld::protocol::{Priority, RuleSource};
use rld::rule::RuleSpec;

const BUCKETS: usize = 1_000_000;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // should not spend the time.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let names: Vec<String> = (0..BUCKETS).map(|i| format!("client-{i:07}")).collect();
    let key_bytes = names[0].len() + "api".len();

    let before = rss_bytes();
    let limiter = Limiter::new(LimiterConfig {
        shards: 128,
        max_buckets: BUCKETS * 2,
        max_table_bytes: usize::MAX,
        default_action: DefaultAction::Allow,
    });
    let rule = RuleSpec::new("r", "*", "*", 100, Duration::from_secs(60));
    limiter
        .set_rules(vec![(rule, RuleSource::Config)], 0)
        .unwrap();
    for (i, n) in names.iter().enumerate() {
        limiter
            .decide(n, "api", 1, Priority::Normal, i as u64, |_| ())
            .unwrap();
    }
    assert_eq!(limiter.table().len(), BUCKETS);
    let rld_bytes = (rss_bytes() - before) as f64 / BUCKETS as f64;
    drop(limiter);

    let before = rss_bytes();
    let gov: governor::DefaultKeyedRateLimiter<String> =
        governor::RateLimiter::keyed(governor::Quota::per_minute(NonZeroU32::new(100).unwrap()));
    for n in &names {
        let _ = gov.check_key(n);
    }
    let gov_bytes = (rss_bytes() - before) as f64 / BUCKETS as f64;
    // governor clones each key into its map; the names vector is shared.
    println!("buckets            {BUCKETS}");
    println!(
        "key bytes          {key_bytes} (client {} + resource 3)",
        names[0].len()
    );
    println!("rld bytes/bucket   {rld_bytes:.1} (incl. its own copy of the key)");
    println!("governor bytes/key {gov_bytes:.1} (incl. its own copy of the key)");
    drop(gov);
}
