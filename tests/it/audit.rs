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

/// Every committed value of the rule's bucket keys, from etcd's history,
/// read from the first member that answers (one may have been killed).
async fn history(etcd: &Etcd, rule: &str) -> Vec<HistoryEntry> {
    let prefix = format!("{}/v1/buckets/{rule}/", etcd.prefix);
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
    /// c's proxy holds etcd's answers 300 ms (past the lease deadline) for 2 s.
    DelayAnswers,
    /// c's connection to etcd is cut (bytes silently lost) for 1.5 s.
    Cut,
    /// The bucket value is overwritten with something unreadable.
    Unreadable,
    /// The etcd leader is SIGKILLed.
    KillLeader,
    /// The rule is edited (burst 100 -> 150: the TAT is rescaled).
    EditRule,
    /// b stops under load: SIGTERM (tokens returned) or SIGKILL (lost).
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
    let a = daemon(&etcd.endpoints, &etcd, dir.path(), "a", &[]);
    let mut b = Some(daemon(&etcd.endpoints, &etcd, dir.path(), "b", &[]));
    let c = daemon(&proxy.endpoints, &etcd, dir.path(), "c", &[]);
    set_rule(&a);
    set_rule_on(&a, "solo", "s");
    for d in [&a, b.as_ref().unwrap(), &c] {
        let start = Instant::now();
        while rule_json(d)["lease"]["members"] != 3 {
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
    // c also uses a rule no other daemon does ("solo"): its lease writes
    // never conflict, so an operation whose answer came too late has surely
    // committed, and its retry must find it there ("resolved").
    loads.push(tokio::spawn(crate::harness::drive(
        c.socket.clone(),
        vec!["g".into(), "s".into()],
        vec![600, 300],
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
                proxy.delay_answers(Duration::from_millis(300));
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy.delay_answers(Duration::ZERO);
            }
            Fault::Cut => {
                proxy.cut(true);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                proxy.cut(false);
            }
            Fault::Unreadable => {
                let mut client = etcd.client().await;
                let prefix = format!("{}/v1/buckets/g/", etcd.prefix);
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
                        "--accuracy",
                        "2%/10s",
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
    let bound = rule_json(&a)["lease"]["bound"].as_f64().unwrap().max(
        // Before b stopped, with 3 members.
        3.0 * (burst as f64 / 3.0).min(190.0 / 3.0) + 10.0,
    );
    drop(proxy);
    assert!(a.terminate().success());
    assert!(c.terminate().success());
    if let Some(b) = b {
        assert!(b.terminate().success());
    }

    let history_g = history(&etcd, "g").await;
    let history_solo = history(&etcd, "solo").await;
    let history = history_g;
    let records = records(dir.path(), &["a", "b", "c"]);
    let credit = 64f64.max(burst as f64 / 3.0);
    let report = audit::check(
        &records,
        &history,
        "g",
        RuleBound {
            rate: LIMIT as f64,
            burst: burst as f64,
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
        "audit {name}: admitted a/b/c {admitted:?} (ideal {} in {secs} s + burst {burst}); \
         {} ops committed ({} resolved after an unknown outcome), {} unknown, {} tokens granted; \
         worst windows {:?} (admitted, allowed); bound {bound:.1}; \
         {} lease txns, {} ops, {} unknown, {} resolved, {} repairs, {} failures; \
         {} history entries",
        LIMIT * secs,
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
    // Every unknown outcome was settled by its retry under the same identity
    // (found committed, or committed then), never applied twice.
    for rec in &records {
        if let audit::Record::Op {
            node, op, outcome, ..
        } = rec
            && outcome == "unknown"
            && (node != "b" || b_clean)
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
        match f.1 {
            // Answers held past the deadline surely make outcomes unknown
            // (dropped ones only when a lease's answer is the one dropped).
            Fault::DelayAnswers => {
                // On the uncontended key every late answer's operation had
                // committed; each retry found it and did not apply it again.
                let solo = audit::check(
                    &records,
                    &history_solo,
                    "solo",
                    RuleBound {
                        rate: LIMIT as f64,
                        burst: BURST as f64,
                        bound,
                        credit,
                    },
                    &[1, 10],
                );
                eprintln!(
                    "audit {name}, solo key: {} committed, {} unknown, {} resolved; worst windows {:?}",
                    solo.ops_committed, solo.ops_unknown, solo.ops_resolved, solo.worst_windows
                );
                assert!(solo.violations.is_empty(), "{:#?}", solo.violations);
                assert!(
                    solo.ops_unknown > 0 && solo.ops_resolved > 0,
                    "late answers on the solo key: {} unknown, {} resolved",
                    solo.ops_unknown,
                    solo.ops_resolved
                );
            }
            Fault::Unreadable => assert!(
                sum("lease_repairs") >= 1,
                "the unreadable value was repaired"
            ),
            _ => {}
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
        .args(["--members", "3"])
        .args(&logs)
        .output()
        .unwrap();
    let text = crate::harness::stdout(&cli);
    eprintln!("rlctl audit:\n{text}");
    assert_eq!(cli.status.code(), Some(0), "{text}{}", stderr(&cli));
    assert!(text.contains("ok: no violation"), "{text}");
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
/// left true) measures its offset, says so in `rlctl health`, stops leasing
/// and follows `on_failure = "closed"`; the others keep the global limit.
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
    // Not starved by c's clock (a TAT written 2 s ahead would lock them out
    // for 2 s without the clamp); a loose floor, since a loaded machine
    // offers less than the load asks for.
    assert!(
        ab >= ideal * 0.5,
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
