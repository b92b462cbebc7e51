//! Memory stays bounded under a flood of unique clients: 1,000,000 distinct
//! clients, one request each, against `max_buckets = 100000`.

use rld::protocol::{Acquire, BatchItem, Connection};

use crate::harness::{ProcessDaemon, rlctl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_clients_never_exceed_the_bucket_cap() {
    const CLIENTS: usize = 1_000_000;
    const CAP: u64 = 100_000;
    const BATCH: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &["--max-buckets", &CAP.to_string()]);
    let set = rlctl(
        &d.socket,
        &[
            "rules",
            "set",
            "per-client",
            "--client",
            "*",
            "--resource",
            "*",
            "--limit",
            "10",
            "--window",
            "1m",
        ],
    );
    assert!(set.status.success());
    let mut c = Connection::connect(&d.socket).await.unwrap();
    let baseline_kib = d.rss_kib();
    let names: Vec<String> = (0..BATCH).map(|i| format!("{i:03}")).collect();
    let mut peak_buckets = 0;
    for batch in 0..CLIENTS / BATCH {
        let prefix = format!("client-{batch:04}-");
        let clients: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
        let items = clients
            .iter()
            .map(|c| Acquire::new(c.as_str(), "api"))
            .collect();
        let answers = c.acquire_many(items).await.unwrap();
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, BatchItem::Decision(d) if d.is_allowed()))
        );
        if batch % 50 == 0 {
            let stats = c.stats().await.unwrap();
            assert!(
                stats.buckets <= CAP,
                "{} buckets above the cap {CAP}",
                stats.buckets
            );
            peak_buckets = peak_buckets.max(stats.buckets);
        }
    }
    let stats = c.stats().await.unwrap();
    assert!(stats.buckets <= CAP);
    assert!(
        peak_buckets > CAP / 2,
        "the table was actually filled: {peak_buckets}"
    );
    assert!(stats.evicted_lru >= CLIENTS as u64 - CAP, "{stats:?}");
    assert_eq!(stats.allowed, CLIENTS as u64);
    // 1,000,000 retained buckets would take well over 100 MiB; 100,000 far less.
    let grown_mib = d.rss_kib().saturating_sub(baseline_kib) / 1024;
    assert!(grown_mib < 64, "RSS grew by {grown_mib} MiB");
    // The first client's bucket was the least recently used: evicted, so
    // its next request starts a full bucket (10 per minute, 1 spent: 9 left)
    // instead of the 8 its kept bucket would show.
    let again = c
        .acquire(Acquire::new("client-0000-000", "api"))
        .await
        .unwrap();
    assert!(again.is_allowed());
    assert_eq!(again.remaining, 9, "{again:?}");
}
