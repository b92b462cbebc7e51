//! The scale scenarios beyond `scale` and `fairness`: many keys with Zipf
//! demand, many quiet keys, demand moving between daemons, and a key used
//! under its limit. Each starts its own daemons on its own key prefix.

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand_distr::Distribution;
use serde_json::{Value, json};

use super::{
    Bins, EtcdCluster, LoadRun, LoadSpec, Measured, TICK, measure, pct_diff, round1, round2,
    start_daemons, stop_daemons, ticks_per, wait_rule,
};

/// Sets global rule `id` on resource `id` through `socket`.
fn set_rule(bins: &Bins, socket: &std::path::Path, id: &str, limit: u64, burst: u64) {
    let (limit, burst) = (limit.to_string(), burst.to_string());
    bins.rlctl_ok(
        socket,
        &[
            "rules",
            "set",
            id,
            "--client",
            "*",
            "--resource",
            id,
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
}

/// The etcd figures of a run, as JSON.
fn etcd_json(m: &Measured) -> Value {
    json!({
        "puts_per_s": round1(m.etcd_rates.puts),
        "deletes_per_s": round1(m.etcd_rates.deletes),
        "txns_per_s": round1(m.etcd_rates.txns),
        "proposals_per_s": round1(m.etcd_rates.proposals),
        "db_bytes": m.etcd_rates.db_bytes,
        "members_cpu_s": round2(m.etcd_cpu_s),
        "record_writes": m.delta.get("lease_ops"),
        "conflicts": m.delta.get("lease_conflicts"),
        "state_changes": m.delta.get("state_changes"),
        "states_after": m.states_after,
        "rld_cpu_s": round2(m.rld_cpu_s),
    })
}

fn print_etcd(m: &Measured) {
    println!(
        "   etcd: {:.0} puts/s, {:.0} deletes/s, {:.0} txns/s, {:.0} proposals/s, db {} bytes, \
         members {:.1} CPU-s; rld {:.1} CPU-s; {} record writes, {} conflicts, {} state changes, \
         states after {:?}",
        m.etcd_rates.puts,
        m.etcd_rates.deletes,
        m.etcd_rates.txns,
        m.etcd_rates.proposals,
        m.etcd_rates.db_bytes,
        m.etcd_cpu_s,
        m.rld_cpu_s,
        m.delta.get("lease_ops"),
        m.delta.get("lease_conflicts"),
        m.delta.get("state_changes"),
        m.states_after,
    );
}

/// Sums per client over every daemon's run: (sent, allowed).
fn per_client(runs: &[LoadRun], k: usize) -> (Vec<u64>, Vec<u64>) {
    let mut sent = vec![0u64; k];
    let mut allowed = vec![0u64; k];
    for r in runs {
        for (c, n) in r.sent_per_client.iter().enumerate() {
            sent[c] += u64::from(*n);
        }
        for &(_, c) in &r.allowed_events {
            allowed[c as usize] += 1;
        }
    }
    (sent, allowed)
}

// ---------------------------------------------------------------------------
// zipf: 20,000 keys, Zipf(1.1), ~100k/s, then twice that.

const ZIPF_KEYS: usize = 20_000;
const ZIPF_LIMIT: u64 = 20;
const ZIPF_SECS: u64 = 15;

pub fn zipf(rt: &tokio::runtime::Runtime, bins: &Bins, etcd: &EtcdCluster) -> Value {
    println!(
        "\n== zipf: 3 daemons, {ZIPF_KEYS} keys with Zipf(1.1) demand, per-key rule {ZIPF_LIMIT}/s \
         burst {ZIPF_LIMIT}, each request sent to the daemons in turn, {ZIPF_SECS} s at ~100k/s \
         and again at ~200k/s"
    );
    let mut rows = Vec::new();
    for offered in [100_000.0, 200_000.0] {
        rows.push(zipf_one(rt, bins, etcd, offered));
    }
    let w = |i: usize| rows[i]["etcd"]["puts_per_s"].as_f64().unwrap_or(0.0);
    let growth = if w(0) > 0.0 {
        100.0 * (w(1) - w(0)) / w(0)
    } else {
        0.0
    };
    println!(
        "   doubling the offered load changed etcd puts/s by {growth:+.1}% ({:.0} -> {:.0})",
        w(0),
        w(1)
    );
    json!({"runs": rows, "puts_growth_pct_when_doubled": round2(growth)})
}

fn zipf_one(rt: &tokio::runtime::Runtime, bins: &Bins, etcd: &EtcdCluster, offered: f64) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = format!("/bench-zipf-{}", offered as u64);
    let daemons = start_daemons(bins, etcd, dir.path(), &prefix, 3);
    set_rule(bins, &daemons[0].socket, "z", ZIPF_LIMIT, ZIPF_LIMIT);
    wait_rule(bins, &daemons, "z");
    let clients: Arc<Vec<String>> = Arc::new((0..ZIPF_KEYS).map(|i| format!("z{i:05}")).collect());
    // One sample of 200,000 draws, visited in turn by all three daemons
    // from different points: each key's requests spread over the daemons.
    let zipf = rand_distr::Zipf::new(ZIPF_KEYS as f64, 1.1).expect("zipf");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let order: Arc<Vec<u32>> = Arc::new(
        (0..200_000)
            .map(|_| (zipf.sample(&mut rng) as u32).saturating_sub(1))
            .collect(),
    );
    let loads: Vec<LoadSpec> = daemons
        .iter()
        .enumerate()
        .map(|(d, daemon)| LoadSpec {
            socket: daemon.socket.clone(),
            clients: Arc::clone(&clients),
            resource: "z".into(),
            rate: offered / 3.0,
            first_client: d * order.len() / 3,
            order: Some(Arc::clone(&order)),
            from: Duration::ZERO,
            until: None,
        })
        .collect();
    let m = measure(
        rt,
        bins,
        etcd,
        &daemons,
        loads,
        Duration::from_secs(ZIPF_SECS),
    );
    let notes = stop_daemons(daemons);
    let secs = m.elapsed.as_secs_f64();
    let (sent, allowed) = per_client(&m.runs, ZIPF_KEYS);
    // Keys offered at least 10% over their limit: each should admit its
    // limit for the run plus its burst, within 5%.
    let ideal = ZIPF_LIMIT as f64 * secs + ZIPF_LIMIT as f64;
    let mut over: Vec<f64> = (0..ZIPF_KEYS)
        .filter(|&c| sent[c] as f64 >= 1.1 * ideal)
        .map(|c| pct_diff(allowed[c] as f64, ideal))
        .collect();
    over.sort_by(f64::total_cmp);
    let outside = over.iter().filter(|d| d.abs() > 5.0).count();
    let offered_total: u64 = sent.iter().sum();
    println!(
        "-- {:.0}/s offered ({offered_total} sent in {secs:.1} s): {} keys over their limit; \
         admitted vs limit x t + burst: worst {:+.2}%, median {:+.2}%, best {:+.2}%; {} outside 5%",
        offered_total as f64 / secs,
        over.len(),
        over.first().copied().unwrap_or(0.0),
        over.get(over.len() / 2).copied().unwrap_or(0.0),
        over.last().copied().unwrap_or(0.0),
        outside
    );
    print_etcd(&m);
    json!({
        "offered_per_s": round1(offered_total as f64 / secs),
        "keys_over_limit": over.len(),
        "admitted_vs_ideal_pct": {
            "worst": over.first().copied().map(round2),
            "median": over.get(over.len() / 2).copied().map(round2),
            "best": over.last().copied().map(round2),
        },
        "keys_outside_5pct": outside,
        "etcd": etcd_json(&m),
        "log_notes": notes,
    })
}

// ---------------------------------------------------------------------------
// sparse: 100,000 keys at 1 request/s each, all under their limit.

const SPARSE_KEYS: usize = 100_000;
const SPARSE_SECS: u64 = 15;

pub fn sparse(rt: &tokio::runtime::Runtime, bins: &Bins, etcd: &EtcdCluster) -> Value {
    println!(
        "\n== sparse: 3 daemons, {SPARSE_KEYS} keys at 1 request/s each (a third of each on each \
         daemon), per-key rule 20/s burst 20, {SPARSE_SECS} s"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let daemons = start_daemons(bins, etcd, dir.path(), "/bench-sparse", 3);
    set_rule(bins, &daemons[0].socket, "s", 20, 20);
    wait_rule(bins, &daemons, "s");
    let clients: Arc<Vec<String>> =
        Arc::new((0..SPARSE_KEYS).map(|i| format!("s{i:06}")).collect());
    let loads: Vec<LoadSpec> = daemons
        .iter()
        .enumerate()
        .map(|(d, daemon)| LoadSpec {
            socket: daemon.socket.clone(),
            clients: Arc::clone(&clients),
            resource: "s".into(),
            rate: SPARSE_KEYS as f64 / 3.0,
            first_client: d * SPARSE_KEYS / 3,
            order: None,
            from: Duration::ZERO,
            until: None,
        })
        .collect();
    let m = measure(
        rt,
        bins,
        etcd,
        &daemons,
        loads,
        Duration::from_secs(SPARSE_SECS),
    );
    let notes = stop_daemons(daemons);
    let sent: u64 = m.runs.iter().map(|r| r.sent).sum();
    let allowed: u64 = m.runs.iter().map(|r| r.allowed).sum();
    println!(
        "-- {sent} sent ({:.0}/s), {} denied",
        sent as f64 / m.elapsed.as_secs_f64(),
        sent - allowed
    );
    print_etcd(&m);
    json!({
        "sent": sent,
        "denied": sent - allowed,
        "offered_per_s": round1(sent as f64 / m.elapsed.as_secs_f64()),
        "etcd": etcd_json(&m),
        "log_notes": notes,
    })
}

// ---------------------------------------------------------------------------
// moving: one hot key's demand moves from one daemon to another.

pub fn moving(rt: &tokio::runtime::Runtime, bins: &Bins, etcd: &EtcdCluster) -> Value {
    const RATE: u64 = 1000;
    const PHASE: Duration = Duration::from_secs(4);
    println!(
        "\n== moving: 3 daemons, one key {RATE}/s burst 100; 2000/s offered on d1 for {PHASE:?}, \
         then on d2 for {PHASE:?}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let daemons = start_daemons(bins, etcd, dir.path(), "/bench-moving", 3);
    set_rule(bins, &daemons[0].socket, "m", RATE, 100);
    wait_rule(bins, &daemons, "m");
    let clients = Arc::new(vec!["hot".to_string()]);
    // d1 offers for the first phase, d2 for the second.
    let spec = |d: usize, from: Duration| LoadSpec {
        socket: daemons[d].socket.clone(),
        clients: Arc::clone(&clients),
        resource: "m".into(),
        rate: 2000.0,
        first_client: 0,
        order: None,
        from,
        until: Some(from + PHASE),
    };
    let m = measure(
        rt,
        bins,
        etcd,
        &daemons,
        vec![spec(0, Duration::ZERO), spec(1, PHASE)],
        2 * PHASE,
    );
    let notes = stop_daemons(daemons);
    // d2's admissions per 250 ms window from the switch on.
    let d2 = &m.runs[1].allowed_per_tick;
    let at = ticks_per(PHASE);
    let window = ticks_per(Duration::from_millis(250));
    let per_window: Vec<u64> = (0..8)
        .map(|w| {
            d2[at + w * window..(at + (w + 1) * window).min(d2.len())]
                .iter()
                .map(|&n| u64::from(n))
                .sum()
        })
        .collect();
    // The first 50 ms step after which d2's next 250 ms admit 90% of the rate.
    let step = ticks_per(Duration::from_millis(50));
    let target = 0.9 * RATE as f64 * 0.25;
    let reached = (0..40).find(|&i| {
        let from = at + i * step;
        let sum: u64 = d2[from..(from + window).min(d2.len())]
            .iter()
            .map(|&n| u64::from(n))
            .sum();
        sum as f64 >= target
    });
    let reached_ms = reached.map(|i| (i * step) as u64 * TICK.as_millis() as u64);
    println!(
        "-- after the switch d2 admitted per 250 ms: {per_window:?} (rate: 250); 90% of the rate \
         from {} after the switch",
        reached_ms.map_or("never".to_owned(), |ms| format!("{ms} ms"))
    );
    print_etcd(&m);
    json!({
        "d2_per_250ms_after_switch": per_window,
        "ms_until_90pct": reached_ms,
        "etcd": etcd_json(&m),
        "log_notes": notes,
    })
}

// ---------------------------------------------------------------------------
// underlimit: 900/s of a 1,000/s key, split 70/20/10.

pub fn underlimit(rt: &tokio::runtime::Runtime, bins: &Bins, etcd: &EtcdCluster) -> Value {
    const SECS: u64 = 10;
    println!(
        "\n== underlimit: 3 daemons, one key 1000/s burst 100; 900/s offered split 70/20/10 for {SECS} s"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let daemons = start_daemons(bins, etcd, dir.path(), "/bench-under", 3);
    set_rule(bins, &daemons[0].socket, "u", 1000, 100);
    wait_rule(bins, &daemons, "u");
    let clients = Arc::new(vec!["steady".to_string()]);
    let loads: Vec<LoadSpec> = daemons
        .iter()
        .zip([630.0, 180.0, 90.0])
        .map(|(d, rate)| LoadSpec {
            socket: d.socket.clone(),
            clients: Arc::clone(&clients),
            resource: "u".into(),
            rate,
            first_client: 0,
            order: None,
            from: Duration::ZERO,
            until: None,
        })
        .collect();
    let m = measure(rt, bins, etcd, &daemons, loads, Duration::from_secs(SECS));
    let notes = stop_daemons(daemons);
    let denied: Vec<u64> = m.runs.iter().map(|r| r.sent - r.allowed).collect();
    let sent: Vec<u64> = m.runs.iter().map(|r| r.sent).collect();
    // When the denials happened (10 ms ticks with one), for the record.
    let first_denial_ms: Vec<Option<u64>> = m
        .runs
        .iter()
        .map(|r| {
            r.denied_ticks
                .first()
                .map(|&t| u64::from(t) * TICK.as_millis() as u64)
        })
        .collect();
    println!("-- sent {sent:?}, denied {denied:?} (first denial at {first_denial_ms:?} ms)");
    print_etcd(&m);
    json!({
        "sent": sent,
        "denied": denied,
        "first_denial_ms": first_denial_ms,
        "etcd": etcd_json(&m),
        "log_notes": notes,
    })
}
