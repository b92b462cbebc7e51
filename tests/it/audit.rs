//! Shares audited under faults, and a skewed wall clock that changes
//! nothing. Three daemons share one global rule on a private etcd cluster,
//! each writing `--audit-log`; the checker (`rld::daemon::lease::audit`)
//! then verifies from the logs and etcd's history of the shares that at
//! every revision the shares in force sum to at most the rule, that every
//! write counted as committed is in the history (once), and that every 1 s
//! and 10 s window stayed within `rate x t + burst`. Figures go to stderr
//! (`cargo test --test it audit -- --nocapture`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rld::daemon::lease::audit::{self, HistoryEntry, RuleBound};
use rld::daemon::lease::view::Paths;

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
            "--etcd-compact-interval",
            "0s",
        ],
        env,
    )
}

fn audit_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.audit"))
}

fn set_rule(d: &ProcessDaemon) {
    set_rule_on(d, "g", "g");
}

fn set_rule_on(d: &ProcessDaemon, id: &str, resource: &str) {
    let (limit, burst) = (LIMIT.to_string(), BURST.to_string());
    let out = rlctl(
        &d.socket,
        &[
            "rules",
            "set",
            id,
            "--client",
            "*",
            "--resource",
            resource,
            "--scope",
            "global",
            "--limit",
            &limit,
            "--window",
            "1s",
            "--burst",
            &burst,
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

/// Every event of the shares (members, records), from etcd's history, read
/// from the first member that answers (one may have been killed).
async fn history(etcd: &Etcd) -> Vec<HistoryEntry> {
    let prefix = format!("{}/v2/", etcd.prefix);
    let mut errors = Vec::new();
    for endpoint in etcd.endpoints.split(',') {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        let Ok(mut client) = etcd_client::Client::connect([endpoint], Some(options)).await else {
            continue;
        };
        match rld::cli::audit::history(&mut client, &prefix).await {
            Ok(h) => return h,
            Err(e) => errors.push(e),
        }
    }
    panic!("no etcd member gave the history: {errors:?}");
}

fn records(dir: &Path, nodes: &[&str]) -> Vec<audit::Record> {
    let mut all = Vec::new();
    for node in nodes {
        let text = std::fs::read_to_string(audit_path(dir, node)).unwrap_or_default();
        all.extend(audit::parse(&text).expect("audit lines parse"));
    }
    all
}

/// A fault injected at a second of an audited run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// c's proxy forwards requests and drops etcd's answers for 1 s.
    DropAnswers,
    /// c's proxy holds etcd's answers 2.5 s (past the call deadline) for
    /// 3 s, while c's demand for a key of its own ("s") begins: c records
    /// and raises its share with answers that come too late.
    DelayAnswers,
    /// c's connection to etcd is cut (bytes silently lost) for 1.5 s.
    Cut,
    /// The busy key's record is overwritten with something unreadable.
    Unreadable,
    /// The etcd leader is SIGKILLed.
    KillLeader,
    /// The rule is edited (burst 100 -> 150: depths are rescaled).
    EditRule,
    /// b stops under load: SIGTERM (shares handed back) or SIGKILL (held
    /// until its lease expires).
    TermB,
    KillB,
}

/// Three daemons (c behind a proxy) with audit logs, 600/s offered on each
/// for `secs` against a 1000/s rule, `faults` at their seconds; then the
/// ledger check from the logs and etcd's history, printed and asserted,
/// and the same check through `rlctl audit`.
async fn audited(name: &str, secs: u64, faults: &[(u64, Fault)]) {
    let Some(etcd) = Etcd::private_for_faults() else {
        return;
    };
    let _heavy = HEAVY.write().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&etcd.endpoints).await;
    let debug = [("RLD_LOG", "info,rld::daemon::lease=debug")];
    let a = daemon(&etcd.endpoints, &etcd, dir.path(), "a", &debug);
    let mut b = Some(daemon(&etcd.endpoints, &etcd, dir.path(), "b", &debug));
    let c = daemon(&proxy.endpoints, &etcd, dir.path(), "c", &debug);
    set_rule(&a);
    set_rule_on(&a, "solo", "s");
    for d in [&a, b.as_ref().unwrap(), &c] {
        let start = Instant::now();
        while rule_json(d)["lease"]["members"] != 3 || share_count(d) != 3 {
            assert!(start.elapsed() < Duration::from_secs(10), "3 members seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let edited = faults.iter().any(|f| f.1 == Fault::EditRule);
    let burst = if edited { 150 } else { BURST };

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(secs + 5);
    let mut loads = drive_each(&[&a], "g", 600, start, &stop, limit);
    loads.extend(drive_each(
        &[b.as_ref().unwrap()],
        "g",
        600,
        start,
        &stop_b,
        limit,
    ));
    loads.push(tokio::spawn(crate::harness::drive(
        c.socket.clone(),
        vec!["g".into()],
        vec![600],
        start,
        Arc::clone(&stop),
        limit,
    )));
    let at = |s: u64| start + Duration::from_secs(s);
    let mut b_stats = serde_json::Value::Null;
    let mut b_clean = true;
    for &(second, fault) in faults {
        tokio::time::sleep_until(at(second).into()).await;
        match fault {
            Fault::DropAnswers => {
                proxy.drop_answers(true);
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy.drop_answers(false);
            }
            Fault::DelayAnswers => {
                proxy.delay_answers(Duration::from_millis(2500));
                // c alone uses "solo": its demand (600/s of 1000/s, over
                // its third) makes it record the key and raise its share.
                loads.push(tokio::spawn(crate::harness::drive(
                    c.socket.clone(),
                    vec!["s".into()],
                    vec![600],
                    start,
                    Arc::clone(&stop),
                    limit,
                )));
                tokio::time::sleep(Duration::from_secs(3)).await;
                proxy.delay_answers(Duration::ZERO);
            }
            Fault::Cut => {
                proxy.cut(true);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                proxy.cut(false);
            }
            Fault::Unreadable => {
                let mut client = etcd.client().await;
                let prefix = format!("{}/v2/shares/g/", etcd.prefix);
                let options = etcd_client::GetOptions::new().with_prefix();
                let keys = client.get(prefix.as_str(), Some(options)).await.unwrap();
                let key = keys.kvs()[0].key().to_vec();
                client.put(key, "not json {", None).await.unwrap();
            }
            Fault::KillLeader => {
                let leader = etcd.leader().await;
                etcd.signal(leader, nix::sys::signal::Signal::SIGKILL);
            }
            Fault::EditRule => {
                let out = rlctl(
                    &a.socket,
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
                        &LIMIT.to_string(),
                        "--window",
                        "1s",
                        "--burst",
                        &burst.to_string(),
                        "--on-failure",
                        "closed",
                    ],
                );
                assert_eq!(code(&out), 0, "{}", stderr(&out));
            }
            Fault::TermB | Fault::KillB => {
                let d = b.take().unwrap();
                b_stats =
                    serde_json::from_slice(&rlctl(&d.socket, &["stats", "--json"]).stdout).unwrap();
                stop_b.store(true, std::sync::atomic::Ordering::Relaxed);
                if fault == Fault::TermB {
                    assert!(d.terminate().success());
                } else {
                    b_clean = false;
                    d.kill9();
                }
            }
        }
    }
    tokio::time::sleep_until(at(secs).into()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_b.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut admitted = Vec::new();
    let mut timelines = Vec::new();
    for l in loads {
        let t = l.await.unwrap();
        admitted.push(t.allowed(0, Duration::ZERO, Duration::from_secs(600)));
        timelines.push(t);
    }
    let per_second: Vec<Vec<u64>> = timelines
        .iter()
        .take(3)
        .map(|t| {
            (0..secs)
                .map(|i| t.allowed(0, Duration::from_secs(i), Duration::from_secs(i + 1)))
                .collect()
        })
        .collect();
    eprintln!("audit {name}: admitted per second a/b/c {per_second:?}");
    // After a rule edit every daemon still running keeps admitting (a
    // bucket whose lease was in flight during the edit once stalled).
    if let Some(&(edit, _)) = faults.iter().find(|f| f.1 == Fault::EditRule) {
        let b_stopped = faults
            .iter()
            .find(|f| matches!(f.1, Fault::TermB | Fault::KillB))
            .map(|f| f.0);
        for (i, node) in ["a", "b", "c"].iter().enumerate() {
            let until = if *node == "b" {
                b_stopped.unwrap_or(secs)
            } else {
                secs
            };
            let after: u64 = per_second[i][(edit + 1) as usize..until as usize]
                .iter()
                .sum();
            if after == 0 {
                let d = match *node {
                    "a" => Some(&a),
                    "b" => b.as_ref(),
                    _ => Some(&c),
                };
                if let Some(d) = d {
                    eprintln!("{node}'s log:\n{}", d.log());
                    for args in [
                        &["acquire", "load", "g", "--json"][..],
                        &["rules", "get", "g", "--json"],
                    ] {
                        eprintln!(
                            "{node} {args:?}: {}",
                            crate::harness::stdout(&rlctl(&d.socket, args))
                        );
                    }
                }
                let audit_n =
                    std::fs::read_to_string(audit_path(dir.path(), node)).unwrap_or_default();
                for l in audit_n.lines().filter(|l| !l.contains("admitted")) {
                    eprintln!("{node} audit: {l}");
                }
            }
            assert!(
                after > 0,
                "{node} admitted nothing after the rule edit: {per_second:?}"
            );
        }
    }
    let mut stats: Vec<serde_json::Value> = [Some(&a), b.as_ref(), Some(&c)]
        .into_iter()
        .flatten()
        .map(|d| serde_json::from_slice(&rlctl(&d.socket, &["stats", "--json"]).stdout).unwrap())
        .collect();
    if !b_stats.is_null() {
        stats.push(b_stats);
    }
    drop(proxy);
    assert!(a.terminate().success());
    assert!(c.terminate().success());
    if let Some(b) = b {
        assert!(b.terminate().success());
    }

    let history = history(&etcd).await;
    let records = records(dir.path(), &["a", "b", "c"]);
    let paths = Paths::new(&etcd.prefix);
    let report = audit::check(
        &records,
        &history,
        &paths,
        "g",
        RuleBound {
            rate: LIMIT as f64,
            burst: burst as f64,
        },
        &[1, 10],
    );
    let sum = |k: &str| -> u64 {
        stats
            .iter()
            .map(|s| s["cluster"][k].as_u64().unwrap_or(0))
            .sum()
    };
    let logged = |node: &str| -> u64 {
        records
            .iter()
            .map(|r| match r {
                audit::Record::Admitted {
                    node: n,
                    rule,
                    allowed,
                    ..
                } if n == node && rule == "g" => *allowed,
                _ => 0,
            })
            .sum()
    };
    eprintln!(
        "audit {name}: admitted a/b/c {:?} (ideal {} in {secs} s + burst {burst}); \
         {} etcd revisions replayed, {} records, fullest {:.1}% of the rate; \
         {} share writes committed, {} unknown; worst windows {:?} (admitted, allowed); \
         {} txns, {} writes sent, {} unknown, {} resolved, {} conflicts, {} failures",
        &admitted[..3],
        LIMIT * secs,
        report.revisions,
        report.records,
        report.fullest * 100.0,
        report.writes_committed,
        report.writes_unknown,
        report.worst_windows,
        sum("lease_txns"),
        sum("lease_ops"),
        sum("lease_unknown"),
        sum("lease_resolved"),
        sum("lease_conflicts"),
        sum("lease_failures"),
    );
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(
        report.revisions > 0 && report.records > 0,
        "the history was replayed"
    );
    // What each daemon admitted, as the load saw it, is what its log says
    // (a SIGKILLed daemon loses at most its last 100 ms of lines).
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        if *node == "b" && !b_clean {
            let lost = admitted[i] - logged(node);
            assert!(
                logged(node) <= admitted[i] && lost <= 200,
                "b lost {lost} lines' worth"
            );
        } else {
            assert_eq!(logged(node), admitted[i], "{node}'s log");
        }
    }
    for f in faults {
        if f.1 == Fault::DelayAnswers {
            // c's writes for "solo" got their answers too late: each was
            // resolved from the watch (found committed, or seen not to
            // have been), never applied twice (the ledger check above).
            let solo = audit::check(
                &records,
                &history,
                &paths,
                "solo",
                RuleBound {
                    rate: LIMIT as f64,
                    burst: BURST as f64,
                },
                &[1, 10],
            );
            eprintln!(
                "audit {name}, solo key: {} writes committed, {} unknown; {} resolved in all; worst windows {:?}",
                solo.writes_committed,
                solo.writes_unknown,
                sum("lease_resolved"),
                solo.worst_windows
            );
            assert!(solo.violations.is_empty(), "{:#?}", solo.violations);
            assert!(
                solo.writes_unknown > 0 && sum("lease_resolved") > 0,
                "late answers on the solo key: {} unknown, {} resolved",
                solo.writes_unknown,
                sum("lease_resolved")
            );
        }
    }
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
        .args(&logs)
        .output()
        .unwrap();
    let text = crate::harness::stdout(&cli);
    eprintln!("rlctl audit:\n{text}");
    assert_eq!(cli.status.code(), Some(0), "{text}{}", stderr(&cli));
    assert!(text.contains("ok: no violation"), "{text}");
}

/// This daemon's operating count (`rlctl stats`).
fn share_count(d: &ProcessDaemon) -> u64 {
    let out = rlctl(&d.socket, &["stats", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()["cluster"]
        ["shares"]["count"]
        .as_u64()
        .unwrap_or(0)
}

/// Unknown outcomes (answers dropped, or held past the deadline, after etcd
/// got the request), an unreadable bucket value, a daemon stopped under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_holds_under_lost_answers_bad_values_and_restarts() {
    audited(
        "lost answers, late answers, unreadable value, SIGTERM",
        14,
        &[
            (2, Fault::DropAnswers),
            (4, Fault::DelayAnswers),
            (7, Fault::Unreadable),
            (10, Fault::TermB),
        ],
    )
    .await;
}

/// The etcd leader killed, the rule edited, a daemon SIGKILLed, c's link
/// to etcd cut, all under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_holds_across_a_leader_kill_a_rule_edit_and_a_daemon_kill() {
    audited(
        "leader kill, rule edit, SIGKILL, cut",
        14,
        &[
            (3, Fault::KillLeader),
            (6, Fault::EditRule),
            (9, Fault::KillB),
            (10, Fault::Cut),
        ],
    )
    .await;
}

/// A daemon whose wall clock is 2 s off (libfaketime; the monotonic clock
/// left true) changes nothing: shares are rates and depths on monotonic
/// clocks, expiring by etcd's lease TTL, never wall-clock times. It stays
/// healthy, admits its share, and the three keep the global limit.
async fn skewed(offset: &str) {
    let Some(etcd) = Etcd::get() else { return };
    let _heavy = HEAVY.write().await;
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
    for d in [&a, &b, &c] {
        let start = Instant::now();
        while share_count(d) != 3 || rule_json(d)["lease"]["members"] != 3 {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "3 daemons sharing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
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
    let state = etcd_state(&c.socket);
    eprintln!(
        "clock {offset}: admitted a/b/c {admitted:?} in {secs:.1} s (limit {LIMIT}/s); c state {state}"
    );
    assert_eq!(state, "healthy", "a skewed wall clock is no fault");
    let total: u64 = admitted.iter().sum();
    let ideal = LIMIT as f64 * secs;
    assert!(
        (total as f64) <= ideal + BURST as f64,
        "admitted {total} of {ideal} + burst {BURST}"
    );
    // c serves its share like the others (a loose floor: a loaded machine
    // offers less than the load asks for).
    assert!(
        admitted[2] as f64 >= 0.2 * total as f64,
        "c admits its share: {admitted:?}"
    );
    let records = records(dir.path(), &["a", "b", "c"]);
    let report = audit::check(
        &records,
        &history(&etcd).await,
        &Paths::new(&etcd.prefix),
        "g",
        RuleBound {
            rate: LIMIT as f64,
            burst: BURST as f64,
        },
        &[1],
    );
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_2s_behind_changes_nothing() {
    skewed("-2s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_2s_ahead_changes_nothing() {
    skewed("+2s").await;
}
