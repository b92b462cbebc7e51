//! The lease ledger audited under faults, and the clock check under real
//! skew. Three daemons share one global rule on a private etcd cluster,
//! each writing `--audit-log`; the checker (`rld::daemon::lease::audit`)
//! then verifies from the logs and the bucket key's etcd history that no
//! grant was counted twice, that every admitted request was covered by a
//! grant or bounded credit, and that every 1 s and 10 s window stayed within
//! `rate x t + burst + bound`. Figures go to stderr
//! (`cargo test --test it audit -- --nocapture`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rld::daemon::lease::audit::{self, HistoryEntry, RuleBound};

use crate::harness::{
    Etcd, HEAVY, ProcessDaemon, Proxy, code, drive_each, etcd_state, rlctl, stderr,
};

const LIMIT: u64 = 1000;
const BURST: u64 = 100;

fn daemon(
    endpoints: &str,
    etcd: &Etcd,
    dir: &Path,
    node: &str,
    env: &[(&str, &str)],
) -> ProcessDaemon {
    let sub = dir.join(node);
    std::fs::create_dir_all(&sub).unwrap();
    let log = audit_path(dir, node);
    ProcessDaemon::start_env(
        &sub,
        &[
            "--etcd",
            endpoints,
            "--etcd-prefix",
            &etcd.prefix,
            "--node-id",
            node,
            "--audit-log",
            log.to_str().unwrap(),
        ],
        env,
    )
}

fn audit_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.audit"))
}

fn set_rule(d: &ProcessDaemon) {
    let (limit, burst) = (LIMIT.to_string(), BURST.to_string());
    let out = rlctl(
        &d.socket,
        &[
            "rules",
            "set",
            "g",
            "--client",
            "*",
            "--resource",
            "g",
            "--scope",
            "global",
            "--limit",
            &limit,
            "--window",
            "1s",
            "--burst",
            &burst,
            "--accuracy",
            "2%/10s",
            "--on-failure",
            "closed",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

fn rule_json(d: &ProcessDaemon) -> serde_json::Value {
    let out = rlctl(&d.socket, &["rules", "get", "g", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Every committed value of the rule's bucket keys, from etcd's history.
async fn history(etcd: &Etcd) -> Vec<HistoryEntry> {
    let mut client = etcd.client().await;
    let prefix = format!("{}/v1/buckets/g/", etcd.prefix);
    rld::cli::audit::history(&mut client, &prefix)
        .await
        .unwrap()
}

fn records(dir: &Path, nodes: &[&str]) -> Vec<audit::Record> {
    let mut all = Vec::new();
    for node in nodes {
        let text = std::fs::read_to_string(audit_path(dir, node)).unwrap_or_default();
        all.extend(audit::parse(&text).expect("audit lines parse"));
    }
    all
}

/// Unknown outcomes (answers dropped after etcd applied the request), an
/// unreadable bucket value, and a daemon stopped under load: the ledger
/// stays exact and no window exceeds the stated bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_holds_under_lost_answers_bad_values_and_restarts() {
    let Some(etcd) = Etcd::private_for_faults() else {
        return;
    };
    let _heavy = HEAVY.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&etcd.endpoints).await;
    let a = daemon(&etcd.endpoints, &etcd, dir.path(), "a", &[]);
    let b = daemon(&etcd.endpoints, &etcd, dir.path(), "b", &[]);
    let c = daemon(&proxy.endpoints, &etcd, dir.path(), "c", &[]);
    set_rule(&a);
    for d in [&a, &b, &c] {
        let start = Instant::now();
        while rule_json(d)["lease"]["members"] != 3 {
            assert!(start.elapsed() < Duration::from_secs(10), "3 members seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let bound = rule_json(&a)["lease"]["bound"].as_f64().unwrap();

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(20);
    let mut loads = drive_each(&[&a], "g", 600, start, &stop, limit);
    loads.extend(drive_each(&[&b], "g", 600, start, &stop_b, limit));
    loads.extend(drive_each(&[&c], "g", 600, start, &stop, limit));
    let at = |s: u64| start + Duration::from_secs(s);

    // 3-4 s: c's requests reach etcd, etcd's answers do not reach c.
    tokio::time::sleep_until(at(3).into()).await;
    proxy.drop_answers(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.drop_answers(false);

    // 6 s: the bucket value is overwritten with something unreadable.
    tokio::time::sleep_until(at(6).into()).await;
    let mut client = etcd.client().await;
    let prefix = format!("{}/v1/buckets/g/", etcd.prefix);
    let keys = client
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let key = keys.kvs()[0].key().to_vec();
    client.put(key, "not json {", None).await.unwrap();

    // 10 s: b stops under load (SIGTERM: its held tokens go back).
    tokio::time::sleep_until(at(10).into()).await;
    let b_stats: serde_json::Value =
        serde_json::from_slice(&rlctl(&b.socket, &["stats", "--json"]).stdout).unwrap();
    stop_b.store(true, std::sync::atomic::Ordering::Relaxed);
    let b_status = b.terminate();
    tokio::time::sleep_until(at(14).into()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut admitted = Vec::new();
    for l in loads {
        let t = l.await.unwrap();
        admitted.push(t.allowed(0, Duration::ZERO, Duration::from_secs(60)));
    }
    let mut stats: Vec<serde_json::Value> = [&a, &c]
        .iter()
        .map(|d| serde_json::from_slice(&rlctl(&d.socket, &["stats", "--json"]).stdout).unwrap())
        .collect();
    stats.push(b_stats);
    for line in c
        .log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        eprintln!("  c: {line}");
    }
    // Stop the others cleanly so their logs are complete.
    drop(proxy);
    assert!(a.terminate().success());
    let _ = c.terminate();
    assert!(b_status.success());

    let batch = stats[0]["cluster"]["rules"][0]["lease"]["batch"]
        .as_u64()
        .unwrap();
    let history = history(&etcd).await;
    let records = records(dir.path(), &["a", "b", "c"]);
    let credit = 64f64.max(batch as f64);
    let report = audit::check(
        &records,
        &history,
        "g",
        RuleBound {
            rate: LIMIT as f64,
            burst: BURST as f64,
            bound,
            credit,
        },
        &[1, 10],
    );
    let sum = |k: &str| -> u64 {
        stats
            .iter()
            .map(|s| s["cluster"][k].as_u64().unwrap_or(0))
            .sum()
    };
    eprintln!(
        "audit: admitted per daemon {admitted:?} (ideal {} in 14 s + burst {BURST}); \
         {} ops committed ({} resolved after an unknown outcome), {} unknown, {} tokens granted; \
         worst windows {:?} (admitted, allowed); bound {bound:.1}, batch {batch}; \
         all: {} lease txns, {} ops, {} unknown, {} resolved, {} repairs, {} failures; \
         {} history entries",
        LIMIT * 14,
        report.ops_committed,
        report.ops_resolved,
        report.ops_unknown,
        report.tokens_granted,
        report.worst_windows,
        sum("lease_txns"),
        sum("lease_ops"),
        sum("lease_unknown"),
        sum("lease_resolved"),
        sum("lease_repairs"),
        sum("lease_failures"),
        history.len(),
    );
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    // The same check from the shell: `rlctl audit` exits 0 and says ok.
    let logs: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| audit_path(dir.path(), n).display().to_string())
        .collect();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"))
        .args([
            "audit",
            "--rule",
            "g",
            "--etcd",
            &etcd.endpoints,
            "--etcd-prefix",
            &etcd.prefix,
        ])
        .args(["--members", "3"])
        .args(&logs)
        .output()
        .unwrap();
    let text = crate::harness::stdout(&cli);
    eprintln!("rlctl audit:\n{text}");
    assert_eq!(cli.status.code(), Some(0), "{text}{}", stderr(&cli));
    assert!(text.contains("ok: no violation"), "{text}");
    assert!(
        report.ops_unknown > 0,
        "the dropped answers made outcomes unknown"
    );
    assert!(
        sum("lease_repairs") >= 1,
        "the unreadable value was repaired"
    );
    // Every unknown outcome was settled by its retry under the same identity
    // (found committed, or committed then), never applied twice.
    for rec in &records {
        if let audit::Record::Op {
            node, op, outcome, ..
        } = rec
            && outcome == "unknown"
        {
            let mine: Vec<_> = records
                .iter()
                .filter(|r| matches!(r, audit::Record::Op { node: n, op: o, .. } if n == node && o == op))
                .collect();
            let settled = mine.iter().any(|r| {
                matches!(r, audit::Record::Op { outcome, .. } if outcome == "resolved" || outcome == "committed")
            });
            assert!(settled, "operation {op} of {node} never settled: {mine:?}");
        }
    }
    // Everything admitted while the daemons ran, as the load saw it, is what
    // the logs say (b's last lines were flushed at its SIGTERM).
    assert_eq!(report.admitted, admitted.iter().sum::<u64>());
}

/// A daemon whose wall clock is 2 s off (libfaketime; the monotonic clock
/// left true) measures its offset, says so in `rlctl health`, stops leasing
/// and follows `on_failure = "closed"`; the others keep the global limit.
async fn skewed(offset: &str) {
    let Some(etcd) = Etcd::get() else { return };
    let _heavy = HEAVY.lock().await;
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    assert!(
        Path::new(lib).exists(),
        "libfaketime is missing: scripts/test installs the faketime package"
    );
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&etcd.endpoints, &etcd, dir.path(), "a", &[]);
    let b = daemon(&etcd.endpoints, &etcd, dir.path(), "b", &[]);
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME", offset),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let c = daemon(&etcd.endpoints, &etcd, dir.path(), "c", &env);
    set_rule(&a);
    // c finds out it is skewed.
    let start = Instant::now();
    let health = loop {
        let out = rlctl(&c.socket, &["health", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["etcd"]["clock"]["skewed"] == true {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "c never found its clock {offset} off: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let detected = start.elapsed();
    let offset_ns = health["etcd"]["clock"]["offset_ns"].as_i64().unwrap();
    let want: i64 = if offset.starts_with('-') {
        -2_000_000_000
    } else {
        2_000_000_000
    };
    // c is one of three: the median is a healthy clock, so c is ~2 s off it.
    assert!(
        (offset_ns - want).abs() < 100_000_000,
        "offset {offset_ns} ns, expected about {want}"
    );
    assert_eq!(health["state"], "degraded", "{health}");
    for d in [&a, &b] {
        let out = rlctl(&d.socket, &["health", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["etcd"]["clock"]["skewed"], false, "{v}");
    }
    let text = crate::harness::stdout(&rlctl(&c.socket, &["health"]));
    assert!(text.contains("SKEWED"), "{text}");

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let loads = drive_each(&[&a, &b, &c], "g", 600, t0, &stop, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut admitted = Vec::new();
    for l in loads {
        let t = l.await.unwrap();
        admitted.push(t.allowed(0, Duration::ZERO, Duration::from_secs(60)));
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "clock {offset}: detected after {detected:?}, offset {:.1} ms; admitted a/b/c {admitted:?} \
         in {secs:.1} s (limit {LIMIT}/s, c closed); c state {}",
        offset_ns as f64 / 1e6,
        etcd_state(&c.socket)
    );
    assert_eq!(
        admitted[2], 0,
        "a skewed daemon on a closed rule admits nothing"
    );
    let ab = (admitted[0] + admitted[1]) as f64;
    let ideal = LIMIT as f64 * secs;
    assert!(
        ab <= ideal * 1.02 + BURST as f64 + 100.0,
        "a+b admitted {ab} of {ideal}"
    );
    assert!(
        ab >= ideal * 0.9,
        "a and b are not starved: {ab} of {ideal}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_2s_behind_stops_leasing_loudly() {
    skewed("-2s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_2s_ahead_stops_leasing_loudly() {
    skewed("+2s").await;
}
