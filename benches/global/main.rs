//! Global rules across real `rld` processes sharing a real 3-node etcd
//! cluster. Scenarios (each a separate run with its own daemons):
//! - `scale`: per-client buckets, 2,000 keys x 20/s offered 40/s each
//!   (`RLD_BENCH_SCALE_KEYS` for other counts), and `scale-delay`, the same
//!   with 5 ms added between the daemons and etcd;
//! - `zipf`: 20,000 keys, Zipf(1.1) demand, ~100k/s offered, then twice that;
//! - `sparse`: 100,000 keys at 1 request/s each, all under their limit;
//! - `fairness`: one hot key, 5 daemons, demands 50/20/15/10/5% of 3x;
//! - `moving`: one hot key whose demand moves from one daemon to another;
//! - `underlimit`: 900/s of a 1,000/s key split 70/20/10.
//!
//! Figures only, no assertions: the machine is shared.
//!
//! Run: `cargo bench --bench global` (every scenario), or
//! `cargo bench --bench global -- zipf` for those whose name contains the
//! words given. Needs
//! `etcd` on PATH (`scripts/deps`); uses the release binaries `rld` and
//! `rlctl` of this target directory (built with `cargo build --release
//! --bins` first). The etcd cluster listens on loopback ports
//! `RLD_BENCH_ETCD_BASE_PORT` (default 32200, below the ephemeral port range) + 1..3 and + 11..13. Figures
//! are printed and written as JSON to `<target dir>/bench-global.json`.
//!
//! Load is open loop from this process: one task per daemon, a tick every
//! 10 ms sending the tick's share of the offered rate in `AcquireMany`
//! frames, recording what each tick and each client was allowed. Every
//! process started here (etcd members, daemons) is stopped by PID, also
//! when the bench panics (drop guards).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rld::protocol::{Acquire, BatchItem, Connection};
use serde_json::{Value, json};

mod etcd_stats;
mod proxy;
mod scenarios;

use etcd_stats::EtcdCounters;

/// Load tick.
const TICK: Duration = Duration::from_millis(10);
/// Largest `AcquireMany` frame sent (well under the 64 KiB frame limit).
const MAX_ITEMS_PER_FRAME: usize = 1000;
/// Longest wait for one `AcquireMany` answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // must not start clusters.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| name.contains(w));
    const ALL: [&str; 7] = [
        "scale",
        "scale-delay",
        "zipf",
        "sparse",
        "fairness",
        "moving",
        "underlimit",
    ];
    if !ALL.iter().any(|s| run(s)) {
        eprintln!("global: nothing to run (scenarios: {})", ALL.join(", "));
        return;
    }

    let bins = Bins::locate();
    let base: u16 = std::env::var("RLD_BENCH_ETCD_BASE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32_200);
    let etcd = EtcdCluster::start(base);
    println!(
        "etcd cluster {} (3 members, data on {})",
        etcd.endpoints,
        etcd.dir.path().display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    let keys: Vec<usize> = std::env::var("RLD_BENCH_SCALE_KEYS")
        .ok()
        .map(|v| v.split(',').filter_map(|k| k.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2000]);
    // "scale" also matches "scale-delay": run the plain one only when named
    // exactly or when everything runs.
    if wanted.is_empty() || wanted.contains(&"scale") {
        report.insert("scale".into(), scale(&rt, &bins, &etcd, &keys, None));
    }
    if run("scale-delay") {
        let delay = proxy::DelayProxy::start(&rt, &etcd.endpoints, Duration::from_micros(2500));
        report.insert(
            "scale_delay".into(),
            scale(&rt, &bins, &etcd, &keys, Some(&delay.endpoints)),
        );
    }
    if run("zipf") {
        report.insert("zipf".into(), scenarios::zipf(&rt, &bins, &etcd));
    }
    if run("sparse") {
        report.insert("sparse".into(), scenarios::sparse(&rt, &bins, &etcd));
    }
    if run("fairness") {
        report.insert("fairness".into(), fairness(&rt, &bins, &etcd));
    }
    if run("moving") {
        report.insert("moving".into(), scenarios::moving(&rt, &bins, &etcd));
    }
    if run("underlimit") {
        report.insert(
            "underlimit".into(),
            scenarios::underlimit(&rt, &bins, &etcd),
        );
    }
    let out = bins.target.join("bench-global.json");
    let text = serde_json::to_string_pretty(&Value::Object(report)).expect("json");
    match std::fs::write(&out, text + "\n") {
        Ok(()) => println!("\nfigures written to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}

// ---------------------------------------------------------------------------
// Scenario "scale": per-client buckets, 100 / 500 / 2,000 keys.

const SCALE_DAEMONS: usize = 3;
const SCALE_LIMIT: u64 = 20;
const SCALE_OFFERED_PER_CLIENT: f64 = 40.0;
const SCALE_SECS: u64 = 15;

fn scale(
    rt: &tokio::runtime::Runtime,
    bins: &Bins,
    etcd: &EtcdCluster,
    keys: &[usize],
    via: Option<&str>,
) -> Value {
    println!(
        "\n== scale{}: {SCALE_DAEMONS} daemons, rule --client '*' --resource r --limit {SCALE_LIMIT} \
         --window 1s --scope global; each client offered \
         {SCALE_OFFERED_PER_CLIENT}/s split evenly across the daemons for {SCALE_SECS} s",
        if via.is_some() {
            " with 5 ms added between the daemons and etcd"
        } else {
            ""
        }
    );
    let mut rows = Vec::new();
    for &k in keys {
        rows.push(scale_one(rt, bins, etcd, k, via));
    }
    print_scale_table(&rows);
    Value::Array(rows)
}

fn scale_one(
    rt: &tokio::runtime::Runtime,
    bins: &Bins,
    etcd: &EtcdCluster,
    k: usize,
    via: Option<&str>,
) -> Value {
    println!("\n-- {k} keys: starting daemons");
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = format!(
        "/bench-scale-{k}{}",
        if via.is_some() { "-delay" } else { "" }
    );
    let daemons = start_daemons_via(
        bins,
        via.unwrap_or(&etcd.endpoints),
        dir.path(),
        &prefix,
        SCALE_DAEMONS,
    );
    let limit = SCALE_LIMIT.to_string();
    bins.rlctl_ok(
        &daemons[0].socket,
        &[
            "rules",
            "set",
            "r",
            "--client",
            "*",
            "--resource",
            "r",
            "--limit",
            &limit,
            "--window",
            "1s",
            "--scope",
            "global",
        ],
    );
    let rule = wait_rule(bins, &daemons, "r");
    let bound = rule["lease"]["bound"].as_f64().unwrap_or(f64::NAN);
    let batch = rule["lease"]["batch"].as_u64().unwrap_or(0);
    let burst = rule["burst_effective"].as_u64().unwrap_or(SCALE_LIMIT);

    let clients: Arc<Vec<String>> = Arc::new((0..k).map(|i| format!("c{i:05}")).collect());
    let per_daemon = k as f64 * SCALE_OFFERED_PER_CLIENT / SCALE_DAEMONS as f64;
    let loads: Vec<LoadSpec> = daemons
        .iter()
        .enumerate()
        .map(|(d, daemon)| LoadSpec {
            socket: daemon.socket.clone(),
            clients: Arc::clone(&clients),
            resource: "r".into(),
            rate: per_daemon,
            // Daemons visit the clients in the same order from different
            // points, so one client's requests arrive spread over daemons.
            first_client: d * k / SCALE_DAEMONS,
            order: None,
            from: Duration::ZERO,
            until: None,
        })
        .collect();
    println!(
        "   rule planned: batch {batch}, bound {bound:.2} tokens, burst {burst}; offering {:.0}/s for {SCALE_SECS} s",
        per_daemon * SCALE_DAEMONS as f64
    );
    let measured = measure(
        rt,
        bins,
        etcd,
        &daemons,
        loads,
        Duration::from_secs(SCALE_SECS),
    );
    let log_notes = stop_daemons(daemons);
    print_log_notes(&log_notes);

    let secs = SCALE_SECS as f64;
    let ideal = k as f64 * SCALE_LIMIT as f64 * secs + k as f64 * burst as f64;
    let admitted: u64 = measured.runs.iter().map(|r| r.allowed).sum();
    let offered: u64 = measured.runs.iter().map(|r| r.sent).sum();
    let intended = k as f64 * SCALE_OFFERED_PER_CLIENT * secs;
    let behind_ticks: u64 = measured.runs.iter().map(|r| r.capped_ticks).sum();
    let errors: u64 = measured.runs.iter().map(|r| r.errors).sum();

    // Per client: admitted over the run against rate x T + burst, and the
    // busiest 1 s window against rate + burst.
    let mut per_client = vec![0u64; k];
    let mut events: Vec<Vec<u32>> = vec![Vec::new(); k];
    for run in &measured.runs {
        for &(tick, c) in &run.allowed_events {
            per_client[c as usize] += 1;
            events[c as usize].push(tick);
        }
    }
    let allowance = SCALE_LIMIT as f64 * secs + burst as f64;
    let mut excess: Vec<f64> = per_client.iter().map(|&a| a as f64 - allowance).collect();
    excess.sort_by(f64::total_cmp);
    let above = excess.iter().filter(|&&e| e > bound).count();
    let window_allowance = SCALE_LIMIT as f64 + burst as f64;
    let mut window_excess: Vec<f64> = events
        .iter_mut()
        .map(|ev| {
            ev.sort_unstable();
            max_in_window(ev, ticks_per(Duration::from_secs(1))) as f64 - window_allowance
        })
        .collect();
    window_excess.sort_by(f64::total_cmp);
    let window_above = window_excess.iter().filter(|&&e| e > bound).count();
    // And every 10 s window against rate x 10 s + burst.
    let window10_allowance = SCALE_LIMIT as f64 * 10.0 + burst as f64;
    let window10_above = events
        .iter()
        .filter(|ev| {
            max_in_window(ev, ticks_per(Duration::from_secs(10))) as f64
                > window10_allowance + bound
        })
        .count();

    // Admitted per second of the run, all clients together.
    let mut per_second = vec![0u64; SCALE_SECS as usize + 1];
    for run in &measured.runs {
        for &(tick, _) in &run.allowed_events {
            let s = (tick as usize) / ticks_per(Duration::from_secs(1));
            if let Some(n) = per_second.get_mut(s) {
                *n += 1;
            }
        }
    }
    let d = &measured.delta;
    let txns = d.get("lease_txns");
    let elapsed = measured.elapsed.as_secs_f64();
    let row = json!({
        "admitted_per_s": per_second,
        "keys": k,
        "daemons": SCALE_DAEMONS,
        "seconds": SCALE_SECS,
        "load_elapsed_s": round3(elapsed),
        "offered_intended": intended as u64,
        "offered": offered,
        "offered_per_s": round1(offered as f64 / elapsed),
        "load_ticks_capped": behind_ticks,
        "load_errors": errors,
        "rule": {"limit_per_s": SCALE_LIMIT, "burst": burst, "batch": batch, "bound": bound},
        "ideal_admitted": ideal as u64,
        "admitted": admitted,
        "admitted_vs_ideal_pct": round2(pct_diff(admitted as f64, ideal)),
        "per_client": {
            "allowance": allowance,
            "bound": bound,
            "clients_above_bound": above,
            "excess_median": median(&excess),
            "excess_max": excess.last().copied().unwrap_or(0.0),
            "excess_min": excess.first().copied().unwrap_or(0.0),
            "window_1s_allowance": window_allowance,
            "window_1s_clients_above_bound": window_above,
            "window_1s_excess_median": median(&window_excess),
            "window_1s_excess_max": window_excess.last().copied().unwrap_or(0.0),
            "window_10s_allowance": window10_allowance,
            "window_10s_clients_above_bound": window10_above,
        },
        "etcd": {
            "lease_txns": txns,
            "txn_per_s": round1(txns as f64 / elapsed),
            "lease_ops": d.get("lease_ops"),
            "keys_per_txn": round2(d.get("lease_ops") as f64 / txns.max(1) as f64),
            "tokens_leased": d.get("tokens_leased"),
            "tokens_per_txn": round2(d.get("tokens_leased") as f64 / txns.max(1) as f64),
            "tokens_returned": d.get("tokens_returned"),
            "lease_conflicts": d.get("lease_conflicts"),
            "lease_failures": d.get("lease_failures"),
            "lease_unknown": d.get("lease_unknown"),
            "dropped_events": d.get("dropped_events"),
            "bucket_cap_refusals": d.get("bucket_cap_refusals"),
            "txn_latency_p99_ms_max": measured.txn_p99_ms_max,
            "members_cpu_s": round2(measured.etcd_cpu_s),
            "puts_per_s": round1(measured.etcd_rates.puts),
            "deletes_per_s": round1(measured.etcd_rates.deletes),
            "txns_per_s": round1(measured.etcd_rates.txns),
            "proposals_per_s": round1(measured.etcd_rates.proposals),
            "db_bytes": measured.etcd_rates.db_bytes,
        },
        "health": {
            "state_changes": d.get("state_changes"),
            "clock_transitions": d.get("clock_transitions"),
            "states_after": measured.states_after,
            "log_notes": log_notes,
        },
        "cpu_s": {
            "etcd": round2(measured.etcd_cpu_s),
            "rld": round2(measured.rld_cpu_s),
            "bench": round2(measured.bench_cpu_s),
        },
    });
    println!(
        "   admitted {admitted} of ideal {} ({:+.2}%), offered {offered} of {} intended; \
         clients over rate x t + burst: {above} in the run, {window_above} in a 1 s window, \
         {window10_above} in a 10 s window; etcd: {:.0} puts/s, {:.0} deletes/s, {:.0} \
         proposals/s, {:.1} CPU-s (members), rld {:.1} CPU-s",
        ideal as u64,
        pct_diff(admitted as f64, ideal),
        intended as u64,
        measured.etcd_rates.puts,
        measured.etcd_rates.deletes,
        measured.etcd_rates.proposals,
        measured.etcd_cpu_s,
        measured.rld_cpu_s,
    );
    row
}

/// How a table cell is drawn from a result row.
type Cell = Box<dyn Fn(&Value) -> String>;

fn print_scale_table(rows: &[Value]) {
    println!("\nscale results");
    let cols: Vec<(&str, Cell)> = vec![
        ("keys", Box::new(|r| r["keys"].to_string())),
        (
            "offered/s (intended)",
            Box::new(|r| {
                format!(
                    "{:.0} ({:.0})",
                    r["offered_per_s"].as_f64().unwrap_or(0.0),
                    r["offered_intended"].as_f64().unwrap_or(0.0) / SCALE_SECS as f64
                )
            }),
        ),
        ("ideal", Box::new(|r| r["ideal_admitted"].to_string())),
        ("admitted", Box::new(|r| r["admitted"].to_string())),
        (
            "diff",
            Box::new(|r| {
                format!(
                    "{:+.2}%",
                    r["admitted_vs_ideal_pct"].as_f64().unwrap_or(0.0)
                )
            }),
        ),
        (
            "bound",
            Box::new(|r| format!("{:.2}", r["per_client"]["bound"].as_f64().unwrap_or(0.0))),
        ),
        (
            "clients>bound",
            Box::new(|r| r["per_client"]["clients_above_bound"].to_string()),
        ),
        (
            "excess med/max",
            Box::new(|r| {
                format!(
                    "{}/{}",
                    r["per_client"]["excess_median"], r["per_client"]["excess_max"]
                )
            }),
        ),
        (
            "1s-win>bound",
            Box::new(|r| r["per_client"]["window_1s_clients_above_bound"].to_string()),
        ),
        (
            "1s-win excess med/max",
            Box::new(|r| {
                format!(
                    "{}/{}",
                    r["per_client"]["window_1s_excess_median"],
                    r["per_client"]["window_1s_excess_max"]
                )
            }),
        ),
        ("txn/s", Box::new(|r| r["etcd"]["txn_per_s"].to_string())),
        (
            "etcd puts/s",
            Box::new(|r| r["etcd"]["puts_per_s"].to_string()),
        ),
        (
            "etcd proposals/s",
            Box::new(|r| r["etcd"]["proposals_per_s"].to_string()),
        ),
        (
            "10s-win>bound",
            Box::new(|r| r["per_client"]["window_10s_clients_above_bound"].to_string()),
        ),
        (
            "keys/txn",
            Box::new(|r| r["etcd"]["keys_per_txn"].to_string()),
        ),
        (
            "conflicts",
            Box::new(|r| r["etcd"]["lease_conflicts"].to_string()),
        ),
        (
            "failures",
            Box::new(|r| r["etcd"]["lease_failures"].to_string()),
        ),
        (
            "state chg",
            Box::new(|r| r["health"]["state_changes"].to_string()),
        ),
        (
            "etcd cpu s",
            Box::new(|r| format!("{:.2}", r["cpu_s"]["etcd"].as_f64().unwrap_or(0.0))),
        ),
        (
            "rld cpu s",
            Box::new(|r| format!("{:.2}", r["cpu_s"]["rld"].as_f64().unwrap_or(0.0))),
        ),
        (
            "bench cpu s",
            Box::new(|r| format!("{:.2}", r["cpu_s"]["bench"].as_f64().unwrap_or(0.0))),
        ),
    ];
    // One block per row: many columns read better transposed.
    let width = cols.iter().map(|(h, _)| h.len()).max().unwrap_or(0);
    let header: Vec<String> = rows
        .iter()
        .map(|r| format!("{:>14}", format!("{} keys", r["keys"])))
        .collect();
    println!("{:width$}  {}", "", header.join(""));
    for (name, f) in cols.iter().skip(1) {
        let cells: Vec<String> = rows.iter().map(|r| format!("{:>14}", f(r))).collect();
        println!("{name:width$}  {}", cells.join(""));
    }
    for r in rows {
        println!(
            "  {} keys: record writes {}, unknown {}, dropped events {}, \
             txn p99 (max over daemons) {} ms, load ticks capped {}, load errors {}, \
             states after {}",
            r["keys"],
            r["etcd"]["lease_ops"],
            r["etcd"]["lease_unknown"],
            r["etcd"]["dropped_events"],
            r["etcd"]["txn_latency_p99_ms_max"],
            r["load_ticks_capped"],
            r["load_errors"],
            r["health"]["states_after"],
        );
    }
}

// ---------------------------------------------------------------------------
// Scenario "fairness": one global key, uneven load over 5 daemons.

const FAIR_DAEMONS: usize = 5;
const FAIR_LIMIT: u64 = 1000;
const FAIR_BURST: u64 = 100;
const FAIR_OFFERED: f64 = 3000.0;
const FAIR_SPLIT: [f64; FAIR_DAEMONS] = [0.50, 0.20, 0.15, 0.10, 0.05];
const FAIR_SECS: u64 = 20;

fn fairness(rt: &tokio::runtime::Runtime, bins: &Bins, etcd: &EtcdCluster) -> Value {
    println!(
        "\n== fairness: {FAIR_DAEMONS} daemons, one global key, limit {FAIR_LIMIT}/s burst {FAIR_BURST}; \
         {FAIR_OFFERED}/s offered split 50/20/15/10/5 % for {FAIR_SECS} s"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let daemons = start_daemons(bins, etcd, dir.path(), "/bench-fairness", FAIR_DAEMONS);
    let (limit, burst) = (FAIR_LIMIT.to_string(), FAIR_BURST.to_string());
    bins.rlctl_ok(
        &daemons[0].socket,
        &[
            "rules",
            "set",
            "f",
            "--client",
            "*",
            "--resource",
            "f",
            "--limit",
            &limit,
            "--window",
            "1s",
            "--burst",
            &burst,
            "--scope",
            "global",
        ],
    );
    let rule = wait_rule(bins, &daemons, "f");
    let bound = rule["lease"]["bound"].as_f64().unwrap_or(f64::NAN);
    let batch = rule["lease"]["batch"].as_u64().unwrap_or(0);
    let clients = Arc::new(vec!["load".to_string()]);
    let loads: Vec<LoadSpec> = daemons
        .iter()
        .zip(FAIR_SPLIT)
        .map(|(d, share)| LoadSpec {
            socket: d.socket.clone(),
            clients: Arc::clone(&clients),
            resource: "f".into(),
            rate: FAIR_OFFERED * share,
            first_client: 0,
            order: None,
            from: Duration::ZERO,
            until: None,
        })
        .collect();
    println!("   rule planned: batch {batch}, bound {bound:.2} tokens");
    let measured = measure(
        rt,
        bins,
        etcd,
        &daemons,
        loads,
        Duration::from_secs(FAIR_SECS),
    );
    let log_notes = stop_daemons(daemons);

    let demands: Vec<f64> = FAIR_SPLIT.iter().map(|s| FAIR_OFFERED * s).collect();
    let fair = max_min_fair(&demands, FAIR_LIMIT as f64);
    let admitted: Vec<u64> = measured.runs.iter().map(|r| r.allowed).collect();
    let total: u64 = admitted.iter().sum();
    let offered: Vec<u64> = measured.runs.iter().map(|r| r.sent).collect();
    let offered_total: u64 = offered.iter().sum();
    let ideal = (FAIR_LIMIT * FAIR_SECS + FAIR_BURST) as f64;
    // Busiest 1 s window of all daemons together (10 ms grid of this
    // process's clock).
    let ticks = measured
        .runs
        .iter()
        .map(|r| r.allowed_per_tick.len())
        .max()
        .unwrap_or(0);
    let mut sum_per_tick = vec![0u64; ticks];
    for r in &measured.runs {
        for (i, a) in r.allowed_per_tick.iter().enumerate() {
            sum_per_tick[i] += u64::from(*a);
        }
    }
    let window = ticks_per(Duration::from_secs(1));
    let mut worst = 0u64;
    let mut acc = 0u64;
    for i in 0..sum_per_tick.len() {
        acc += sum_per_tick[i];
        if i >= window {
            acc -= sum_per_tick[i - window];
        }
        worst = worst.max(acc);
    }
    let window_limit = FAIR_LIMIT as f64 + FAIR_BURST as f64 + bound;

    let elapsed = measured.elapsed.as_secs_f64();
    let mut per_daemon = Vec::new();
    println!("\nfairness results (load {elapsed:.2} s)");
    println!(
        "{:<7} {:>10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>11} {:>7} {:>9} {:>7}",
        "daemon",
        "offered/s",
        "offered%",
        "admitted",
        "admitted%",
        "fair/s",
        "fair%",
        "adm-fair pt",
        "txns",
        "conflicts",
        "leased"
    );
    for (i, d) in demands.iter().enumerate() {
        let off_pct = 100.0 * offered[i] as f64 / offered_total.max(1) as f64;
        let adm_pct = 100.0 * admitted[i] as f64 / total.max(1) as f64;
        let fair_pct = 100.0 * fair[i] / FAIR_LIMIT as f64;
        println!(
            "{:<7} {:>10.0} {:>9.2} {:>9} {:>10.2} {:>9.1} {:>10.2} {:>+11.2} {:>7} {:>9} {:>7}",
            format!("d{}", i + 1),
            offered[i] as f64 / elapsed,
            off_pct,
            admitted[i],
            adm_pct,
            fair[i],
            fair_pct,
            adm_pct - fair_pct,
            measured.per_daemon[i].get("lease_txns"),
            measured.per_daemon[i].get("lease_conflicts"),
            measured.per_daemon[i].get("tokens_leased"),
        );
        per_daemon.push(json!({
            "daemon": format!("d{}", i + 1),
            "demand_per_s": d,
            "offered": offered[i],
            "offered_pct": round2(off_pct),
            "admitted": admitted[i],
            "admitted_pct": round2(adm_pct),
            "fair_per_s": round2(fair[i]),
            "fair_pct": round2(fair_pct),
            "admitted_minus_fair_pts": round2(adm_pct - fair_pct),
            "load_ticks_capped": measured.runs[i].capped_ticks,
            "load_errors": measured.runs[i].errors,
            "lease_txns": measured.per_daemon[i].get("lease_txns"),
            "lease_conflicts": measured.per_daemon[i].get("lease_conflicts"),
            "lease_failures": measured.per_daemon[i].get("lease_failures"),
            "tokens_leased": measured.per_daemon[i].get("tokens_leased"),
            "tokens_returned": measured.per_daemon[i].get("tokens_returned"),
            "state_changes": measured.per_daemon[i].get("state_changes"),
        }));
    }
    let d = &measured.delta;
    let txns = d.get("lease_txns");
    println!(
        "total   admitted {total} vs ideal {} ({:+.2}%), offered {offered_total} of {} intended",
        ideal as u64,
        pct_diff(total as f64, ideal),
        (FAIR_OFFERED * FAIR_SECS as f64) as u64
    );
    println!(
        "window  worst 1 s (all daemons) {worst} vs rate + burst + bound = {window_limit:.1} (bound {bound:.2}, batch {batch})"
    );
    println!(
        "etcd    {txns} txns ({:.1}/s), {:.2} tokens/txn, conflicts {}, failures {}, state changes {}, \
         clock-check changes {}, members' CPU {:.2} s; rld CPU {:.2} s; bench CPU {:.2} s; states after {:?}",
        txns as f64 / elapsed,
        d.get("tokens_leased") as f64 / txns.max(1) as f64,
        d.get("lease_conflicts"),
        d.get("lease_failures"),
        d.get("state_changes"),
        d.get("clock_transitions"),
        measured.etcd_cpu_s,
        measured.rld_cpu_s,
        measured.bench_cpu_s,
        measured.states_after
    );
    print_log_notes(&log_notes);
    json!({
        "daemons": FAIR_DAEMONS,
        "seconds": FAIR_SECS,
        "load_elapsed_s": round3(elapsed),
        "rule": {"limit_per_s": FAIR_LIMIT, "burst": FAIR_BURST, "batch": batch, "bound": bound},
        "per_daemon": per_daemon,
        "offered": offered_total,
        "offered_intended": (FAIR_OFFERED * FAIR_SECS as f64) as u64,
        "ideal_admitted": ideal as u64,
        "admitted": total,
        "admitted_vs_ideal_pct": round2(pct_diff(total as f64, ideal)),
        "worst_1s_window": worst,
        "worst_1s_window_limit": window_limit,
        "etcd": {
            "lease_txns": txns,
            "txn_per_s": round1(txns as f64 / elapsed),
            "tokens_leased": d.get("tokens_leased"),
            "tokens_per_txn": round2(d.get("tokens_leased") as f64 / txns.max(1) as f64),
            "tokens_returned": d.get("tokens_returned"),
            "lease_conflicts": d.get("lease_conflicts"),
            "lease_failures": d.get("lease_failures"),
            "members_cpu_s": round2(measured.etcd_cpu_s),
        },
        "health": {
            "state_changes": d.get("state_changes"),
            "clock_transitions": d.get("clock_transitions"),
            "states_after": measured.states_after,
            "log_notes": log_notes,
        },
        "cpu_s": {
            "etcd": round2(measured.etcd_cpu_s),
            "rld": round2(measured.rld_cpu_s),
            "bench": round2(measured.bench_cpu_s),
        },
    })
}

/// Max-min fair shares of `capacity` for `demands`: every unsatisfied
/// claimant gets an equal split of what is left, capped at its demand,
/// until all are satisfied or nothing is left.
fn max_min_fair(demands: &[f64], capacity: f64) -> Vec<f64> {
    let mut share = vec![0.0; demands.len()];
    let mut left = capacity;
    let mut open: Vec<usize> = (0..demands.len()).collect();
    // Each round satisfies at least one claimant or hands out everything.
    for _ in 0..demands.len() {
        if open.is_empty() || left <= 1e-9 {
            break;
        }
        let equal = left / open.len() as f64;
        let mut still = Vec::new();
        for &i in &open {
            let give = (demands[i] - share[i]).min(equal);
            share[i] += give;
            left -= give;
            if demands[i] - share[i] > 1e-9 {
                still.push(i);
            }
        }
        open = still;
    }
    share
}

// ---------------------------------------------------------------------------
// One measured run: counters and CPU before and after an open-loop load.

struct Measured {
    runs: Vec<LoadRun>,
    elapsed: Duration,
    delta: Counters,
    per_daemon: Vec<Counters>,
    states_after: Vec<String>,
    txn_p99_ms_max: f64,
    /// What etcd did per second during the load.
    etcd_rates: EtcdCounters,
    etcd_cpu_s: f64,
    rld_cpu_s: f64,
    bench_cpu_s: f64,
}

fn measure(
    rt: &tokio::runtime::Runtime,
    bins: &Bins,
    etcd: &EtcdCluster,
    daemons: &[Daemon],
    loads: Vec<LoadSpec>,
    duration: Duration,
) -> Measured {
    let tck = clock_ticks();
    let etcd_pids = etcd.pids();
    let rld_pids: Vec<u32> = daemons.iter().map(|d| d.child.id()).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() as f64 / tck;
    let before: Vec<Value> = daemons.iter().map(|d| bins.stats(&d.socket)).collect();
    let (etcd0, rld0, self0) = (cpu(&etcd_pids), cpu(&rld_pids), cpu(&[std::process::id()]));
    let counters0 = EtcdCounters::read(&etcd.endpoints);
    let start = Instant::now();
    let runs = rt.block_on(async {
        let tasks: Vec<_> = loads
            .into_iter()
            .map(|l| tokio::spawn(drive(l, start, duration)))
            .collect();
        let mut runs = Vec::new();
        for t in tasks {
            runs.push(t.await.expect("load task"));
        }
        runs
    });
    let elapsed = start.elapsed().min(duration);
    let (etcd1, rld1, self1) = (cpu(&etcd_pids), cpu(&rld_pids), cpu(&[std::process::id()]));
    let etcd_rates = counters0.rates(&EtcdCounters::read(&etcd.endpoints), elapsed.as_secs_f64());
    // Leases in flight at the end land in the counters within a round trip.
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<Value> = daemons.iter().map(|d| bins.stats(&d.socket)).collect();
    let mut delta = Counters::default();
    let mut per_daemon = Vec::new();
    for (b, a) in before.iter().zip(&after) {
        delta.add_delta(&b["cluster"], &a["cluster"]);
        let mut one = Counters::default();
        one.add_delta(&b["cluster"], &a["cluster"]);
        per_daemon.push(one);
    }
    let states_after = after
        .iter()
        .map(|a| a["cluster"]["state"].as_str().unwrap_or("?").to_owned())
        .collect();
    let txn_p99_ms_max = after
        .iter()
        .filter_map(|a| a["cluster"]["txn_latency"]["p99_ns"].as_u64())
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    Measured {
        runs,
        elapsed,
        delta,
        per_daemon,
        states_after,
        txn_p99_ms_max: round2(txn_p99_ms_max),
        etcd_rates,
        etcd_cpu_s: etcd1 - etcd0,
        rld_cpu_s: rld1 - rld0,
        bench_cpu_s: self1 - self0,
    }
}

/// Sums of cluster counter deltas over daemons.
#[derive(Default)]
struct Counters(Vec<(String, u64)>);

impl Counters {
    const FIELDS: [&'static str; 13] = [
        "lease_txns",
        "lease_ops",
        "tokens_leased",
        "tokens_returned",
        "lease_conflicts",
        "lease_failures",
        "lease_unknown",
        "dropped_events",
        "bucket_cap_refusals",
        "state_changes",
        "debt_charged",
        "lease_resolved",
        // cluster.clock.transitions: the clock check stopping or resuming
        // leasing.
        "clock_transitions",
    ];

    fn add_delta(&mut self, before: &Value, after: &Value) {
        for f in Self::FIELDS {
            let get = |v: &Value| match f {
                "clock_transitions" => v["clock"]["transitions"].as_u64(),
                _ => v[f].as_u64(),
            };
            let d = get(after)
                .unwrap_or(0)
                .saturating_sub(get(before).unwrap_or(0));
            match self.0.iter_mut().find(|(n, _)| n == f) {
                Some((_, v)) => *v += d,
                None => self.0.push((f.to_owned(), d)),
            }
        }
    }

    fn get(&self, f: &str) -> u64 {
        self.0.iter().find(|(n, _)| n == f).map_or(0, |(_, v)| *v)
    }
}

// ---------------------------------------------------------------------------
// Open-loop load.

struct LoadSpec {
    socket: PathBuf,
    clients: Arc<Vec<String>>,
    resource: String,
    /// Requests per second offered to this daemon, over all clients.
    rate: f64,
    first_client: usize,
    /// The order clients are visited in (cycled), when not round-robin
    /// (a Zipf sample, say).
    order: Option<Arc<Vec<u32>>>,
    /// The load runs from `from` to `until` of the shared clock (`None`:
    /// the whole run).
    from: Duration,
    until: Option<Duration>,
}

/// What one load task saw.
#[derive(Default)]
struct LoadRun {
    sent: u64,
    allowed: u64,
    /// Allowed per 10 ms tick since the shared start.
    allowed_per_tick: Vec<u32>,
    /// (tick, client index) of every allowed request.
    allowed_events: Vec<(u32, u32)>,
    /// Ticks whose due requests exceeded the per-tick cap (the generator
    /// was behind).
    capped_ticks: u64,
    /// Calls that failed or timed out (the load stops at the first).
    errors: u64,
    /// Requests sent per client.
    sent_per_client: Vec<u32>,
    /// Ticks in which a request was denied.
    denied_ticks: Vec<u32>,
}

/// Sends, every tick, the requests due by the end of that tick at `rate`
/// (catching up at most 3 ticks' worth at once), clients in round-robin
/// order. Bounded by `duration` and by a tick count.
async fn drive(spec: LoadSpec, start: Instant, duration: Duration) -> LoadRun {
    let mut run = LoadRun {
        allowed_per_tick: vec![0; ticks_per(duration) + 1],
        ..LoadRun::default()
    };
    let mut conn = match Connection::connect(&spec.socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connect {}: {e}", spec.socket.display());
            run.errors += 1;
            return run;
        }
    };
    let k = spec.clients.len();
    run.sent_per_client = vec![0; k];
    let cycle = spec.order.as_ref().map_or(k, |o| o.len());
    let cap = (spec.rate * TICK.as_secs_f64() * 3.0).ceil() as u64 + 1;
    let mut cursor = spec.first_client;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_loops = ticks_per(duration) + 10;
    for _ in 0..max_loops {
        tick.tick().await;
        let now = start.elapsed();
        let until = spec.until.unwrap_or(duration).min(duration);
        if now >= until {
            break;
        }
        if now + TICK <= spec.from {
            continue;
        }
        let slot =
            ((now.as_nanos() / TICK.as_nanos()) as usize).min(run.allowed_per_tick.len() - 1);
        let due_total = ((((now + TICK).min(until)).saturating_sub(spec.from)).as_secs_f64()
            * spec.rate) as u64;
        let mut due = due_total.saturating_sub(run.sent);
        if due > cap {
            due = cap;
            run.capped_ticks += 1;
        }
        let mut left = due as usize;
        while left > 0 {
            let n = left.min(MAX_ITEMS_PER_FRAME);
            let who: Vec<u32> = (0..n)
                .map(|i| match &spec.order {
                    Some(o) => o[(cursor + i) % cycle],
                    None => ((cursor + i) % k) as u32,
                })
                .collect();
            cursor = (cursor + n) % cycle;
            let items: Vec<Acquire<'_>> = who
                .iter()
                .map(|&c| Acquire::new(spec.clients[c as usize].as_str(), spec.resource.as_str()))
                .collect();
            let answers = match tokio::time::timeout(CALL_TIMEOUT, conn.acquire_many(items)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    eprintln!("acquire_many on {}: {e}", spec.socket.display());
                    run.errors += 1;
                    return run;
                }
                Err(_) => {
                    eprintln!(
                        "acquire_many on {}: no answer in {CALL_TIMEOUT:?}",
                        spec.socket.display()
                    );
                    run.errors += 1;
                    return run;
                }
            };
            run.sent += n as u64;
            for &c in &who {
                run.sent_per_client[c as usize] += 1;
            }
            for (c, a) in who.iter().zip(&answers) {
                if matches!(a, BatchItem::Decision(d) if d.is_allowed()) {
                    run.allowed += 1;
                    run.allowed_per_tick[slot] += 1;
                    run.allowed_events.push((slot as u32, *c));
                } else if run.denied_ticks.last() != Some(&(slot as u32)) {
                    run.denied_ticks.push(slot as u32);
                }
            }
            left -= n;
        }
    }
    run
}

fn ticks_per(d: Duration) -> usize {
    (d.as_nanos() / TICK.as_nanos()) as usize
}

/// Most entries of sorted tick indices within any `window` consecutive ticks.
fn max_in_window(sorted: &[u32], window: usize) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= window as u32 {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

// ---------------------------------------------------------------------------
// Processes: binaries, daemons, the etcd cluster.

struct Bins {
    target: PathBuf,
    rld: PathBuf,
    rlctl: PathBuf,
}

impl Bins {
    /// The release binaries of this target directory, built (or brought up
    /// to date) with `cargo build --release --bins`.
    fn locate() -> Bins {
        let target = target_dir();
        let release = target.join("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bins", "--quiet"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", &target)
            .status();
        let bins = Bins {
            rld: release.join("rld"),
            rlctl: release.join("rlctl"),
            target,
        };
        match status {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("cargo build --release --bins: {other:?}");
                assert!(
                    bins.rld.exists() && bins.rlctl.exists(),
                    "no release binaries in {}",
                    release.display()
                );
                eprintln!("using the existing (maybe stale) binaries");
            }
        }
        bins
    }

    fn rlctl(&self, socket: &Path, args: &[&str]) -> Output {
        Command::new(&self.rlctl)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env_remove("RLD_SOCKET")
            .output()
            .expect("run rlctl")
    }

    fn rlctl_ok(&self, socket: &Path, args: &[&str]) -> Output {
        let out = self.rlctl(socket, args);
        assert!(
            out.status.success(),
            "rlctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stats(&self, socket: &Path) -> Value {
        let out = self.rlctl_ok(socket, &["stats", "--json"]);
        serde_json::from_slice(&out.stdout).expect("stats json")
    }
}

/// The target directory: `CARGO_TARGET_DIR`, else the one this bench binary
/// runs from (`<target>/release/deps/global-*`), else `./target`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() {
            d
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(d)
        };
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_owned()))
        .filter(|t| t.join("release").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// An `rld` process, sent SIGTERM (then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(bins: &Bins, dir: &Path, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(dir).expect("daemon dir");
        let socket = dir.join("rld.sock");
        let log = dir.join("rld.log");
        let child = Command::new(&bins.rld)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env_remove("RLD_SOCKET")
            .env_remove("RLD_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn rld");
        let daemon = Daemon { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "rld did not start: {}",
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    fn signal_term(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    /// Waits up to `limit` for exit, then kills.
    fn reap(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "rld {} did not exit after SIGTERM; killing it",
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal_term();
            self.reap(Duration::from_secs(10));
        }
    }
}

fn start_daemons(
    bins: &Bins,
    etcd: &EtcdCluster,
    dir: &Path,
    prefix: &str,
    n: usize,
) -> Vec<Daemon> {
    start_daemons_via(bins, &etcd.endpoints, dir, prefix, n)
}

/// [`start_daemons`] on the etcd `endpoints` given (a proxy's).
fn start_daemons_via(
    bins: &Bins,
    endpoints: &str,
    dir: &Path,
    prefix: &str,
    n: usize,
) -> Vec<Daemon> {
    // RLD_BENCH_AUDIT=DIR keeps each daemon's audit log there.
    let audit = std::env::var_os("RLD_BENCH_AUDIT").map(PathBuf::from);
    (0..n)
        .map(|i| {
            let node = format!("bench-{}", i + 1);
            let mut args = vec![
                "--etcd".to_owned(),
                endpoints.to_owned(),
                "--etcd-prefix".to_owned(),
                prefix.to_owned(),
                "--node-id".to_owned(),
                node.clone(),
            ];
            if let Some(a) = &audit {
                args.push("--audit-log".into());
                args.push(
                    a.join(format!("{}{node}.audit", prefix.replace('/', "_")))
                        .display()
                        .to_string(),
                );
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Daemon::start(bins, &dir.join(&node), &args)
        })
        .collect()
}

/// SIGTERM to all at once (they give tokens back in parallel), then reaps;
/// returns each daemon's warnings, errors and etcd state changes from its log.
fn stop_daemons(mut daemons: Vec<Daemon>) -> Vec<Vec<String>> {
    for d in &daemons {
        d.signal_term();
    }
    for d in &mut daemons {
        d.reap(Duration::from_secs(10));
    }
    daemons.iter().map(|d| notable_log_lines(&d.log)).collect()
}

/// Warnings, errors and etcd health transitions in a daemon log (ANSI
/// colours removed).
fn notable_log_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(strip_ansi)
        .filter(|l| {
            l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("etcd healthy")
                || l.contains("reachable again")
                || l.contains("wall clock")
        })
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then a final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints, per daemon, how often each notable log message occurred (the
/// full lines go to the JSON).
fn print_log_notes(notes: &[Vec<String>]) {
    for (i, lines) in notes.iter().enumerate() {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for l in lines {
            let m = log_message(l);
            match counts.iter_mut().find(|(k, _)| *k == m) {
                Some((_, n)) => *n += 1,
                None => counts.push((m, 1)),
            }
        }
        let text: Vec<String> = counts
            .iter()
            .map(|(m, n)| format!("{n}x \"{m}\""))
            .collect();
        println!(
            "   log of bench-{}: {}",
            i + 1,
            if text.is_empty() {
                "nothing notable".to_string()
            } else {
                text.join(", ")
            }
        );
    }
}

/// The message of a tracing line: after `LEVEL target: `, before the
/// first `key=value` field.
fn log_message(line: &str) -> String {
    let after_target = line.split_once(": ").map_or(line, |(_, rest)| rest).trim();
    let mut words = Vec::new();
    for w in after_target.split(' ') {
        if w.contains('=') {
            break;
        }
        words.push(w);
    }
    words.join(" ")
}

/// Waits (up to 20 s) until every daemon has rule `id` planned for all of
/// them; returns the rule as the first daemon shows it.
fn wait_rule(bins: &Bins, daemons: &[Daemon], id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let n = daemons.len() as u64;
    loop {
        let views: Vec<Option<Value>> = daemons
            .iter()
            .map(|d| {
                let out = bins.rlctl(&d.socket, &["rules", "get", id, "--json"]);
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).ok())
                    .flatten()
            })
            .collect();
        if views
            .iter()
            .all(|v| v.as_ref().is_some_and(|v| v["lease"]["members"] == n))
        {
            // The batch size is re-planned for the membership every 250 ms
            // (coordinator tick): let two ticks pass, then read the plan.
            std::thread::sleep(Duration::from_millis(600));
            let out = bins.rlctl_ok(&daemons[0].socket, &["rules", "get", id, "--json"]);
            return serde_json::from_slice(&out.stdout).expect("rule json");
        }
        assert!(
            Instant::now() < deadline,
            "rule {id} not planned for {n} daemons within 20 s: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private 3-node etcd cluster (`scripts/etcd-cluster`), stopped by PID
/// when dropped.
struct EtcdCluster {
    dir: tempfile::TempDir,
    script: PathBuf,
    endpoints: String,
}

impl EtcdCluster {
    fn start(base: u16) -> EtcdCluster {
        let dir = tempfile::tempdir_in("/dev/shm")
            .unwrap_or_else(|_| tempfile::tempdir().expect("temp dir"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/etcd-cluster");
        let out = Command::new(&script)
            .arg("start")
            .arg(dir.path())
            .env("RLD_ETCD_BASE_PORT", base.to_string())
            .output()
            .expect("run scripts/etcd-cluster");
        // From here on the guard stops whatever did start.
        let cluster = EtcdCluster {
            dir,
            script,
            endpoints: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        };
        assert!(
            out.status.success(),
            "etcd did not start (is etcd installed? ports {base}+1..13 free?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn pids(&self) -> Vec<u32> {
        (1..=3)
            .filter_map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("n{i}.pid")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

// ---------------------------------------------------------------------------
// Small helpers.

/// utime + stime of a process, in clock ticks (0 if it is gone).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let etcd = Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    json!({"cpus": cpus, "etcd": etcd})
}

fn pct_diff(got: f64, ideal: f64) -> f64 {
    100.0 * (got - ideal) / ideal
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
