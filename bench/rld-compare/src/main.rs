//! `rld-compare`: the same load against rld, Redis 7 with a Lua token bucket,
//! Redis with the redis-cell module (GCRA, `CL.THROTTLE`), and the governor
//! crate in process (the ceiling). Servers are started and stopped here, by
//! PID; rounds are interleaved (every target once per round) to cancel drift;
//! the table shows medians over rounds and ratios against rld.
//! Run it through `bench/compare` (which builds the pieces).

mod keys;
mod load;
mod servers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

use keys::KeyChooser;
use load::{LoadResult, Wire};

#[derive(Debug, Parser)]
#[command(about = "Compare rld with Redis + Lua, Redis + redis-cell and governor under one load")]
struct Opts {
    /// The rld binary.
    #[arg(long)]
    rld: PathBuf,
    /// The redis-server binary.
    #[arg(long)]
    redis_server: PathBuf,
    /// The redis-cell module (libredis_cell.so).
    #[arg(long)]
    cell_module: PathBuf,
    /// Connections per run.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Zipf exponent; uniform when not given.
    #[arg(long)]
    zipf: Option<f64>,
    /// Length of each run.
    #[arg(long, default_value = "3s", value_parser = humantime_parse)]
    duration: Duration,
    /// Rounds (each runs every target once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    rld::rule::parse_duration(s)
}

/// Tokens per second and burst of every bucket in every target: high enough
/// that the load measures decisions, not denials.
const RATE: u64 = 1000;
const BURST: u64 = 1000;

#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    target: String,
    decisions_per_sec: f64,
    ratio_to_rld: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    allowed_fraction: f64,
}

struct Scenario {
    name: &'static str,
    pipeline: usize,
    /// (target name, wire) pairs; the first is rld, the reference.
    targets: Vec<(&'static str, Wire)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut opts = Opts::parse();
    // Servers run in a temp directory: make every path absolute (without
    // resolving symlinks: redis-server is a link that dispatches on its name).
    for path in [&mut opts.rld, &mut opts.redis_server, &mut opts.cell_module] {
        *path = std::path::absolute(&*path)?;
    }
    let dir = tempfile::tempdir()?;
    let rld = servers::Rld::start(&opts.rld, dir.path(), RATE, BURST).await?;
    let redis = servers::Redis::start(&opts.redis_server, &opts.cell_module, dir.path()).await?;
    let sha = redis.load_script(servers::LUA_TOKEN_BUCKET).await?;
    let lua = Wire::RedisLua {
        sha,
        rate: RATE.to_string(),
        burst: BURST.to_string(),
    };
    let cell = Wire::RedisCell {
        max_burst: (BURST - 1).to_string(),
        rate: RATE.to_string(),
    };
    let scenarios = [
        Scenario {
            name: "no pipelining",
            pipeline: 1,
            targets: vec![
                ("rld", Wire::Rld { batch: 1 }),
                ("redis+lua", lua.clone()),
                ("redis-cell", cell.clone()),
            ],
        },
        Scenario {
            name: "pipeline 16",
            pipeline: 16,
            targets: vec![
                ("rld", Wire::Rld { batch: 1 }),
                ("redis+lua", lua.clone()),
                ("redis-cell", cell.clone()),
            ],
        },
        Scenario {
            name: "batches of 16 (redis: pipeline 16)",
            pipeline: 1,
            targets: vec![
                ("rld AcquireMany", Wire::Rld { batch: 16 }),
                ("redis+lua", lua.clone()),
                ("redis-cell", cell.clone()),
            ],
        },
    ];
    let chooser = KeyChooser::new(opts.keys, opts.zipf);
    let total_runs = opts.rounds * scenarios.iter().map(|s| s.targets.len()).sum::<usize>();
    eprintln!(
        "{total_runs} runs of {:?} + governor: {} connections, {} keys ({}), {} rounds",
        opts.duration,
        opts.connections,
        opts.keys,
        opts.zipf.map_or("uniform".into(), |s| format!("zipf {s}")),
        opts.rounds
    );
    let mut results: Vec<Vec<Vec<LoadResult>>> = scenarios
        .iter()
        .map(|s| vec![Vec::new(); s.targets.len()])
        .collect();
    let mut governor_runs = Vec::new();
    for round in 0..opts.rounds {
        for (si, s) in scenarios.iter().enumerate() {
            for (ti, (name, wire)) in s.targets.iter().enumerate() {
                // Redis pipelines 16 where rld batches 16.
                let pipeline = if matches!(wire, Wire::Rld { .. }) || s.pipeline > 1 {
                    s.pipeline
                } else {
                    s.targets[0].1.batch().max(s.pipeline)
                };
                let socket = if matches!(wire, Wire::Rld { .. }) {
                    &rld.socket
                } else {
                    &redis.socket
                };
                let run = load::run(
                    socket,
                    wire,
                    opts.connections,
                    pipeline,
                    &chooser,
                    opts.duration,
                );
                let r = tokio::time::timeout(opts.duration + Duration::from_secs(30), run)
                    .await
                    .map_err(|_| anyhow::anyhow!("{name} did not finish in time"))??;
                eprintln!(
                    "round {} {:<36} {:<16} {:>10.0}/s  p50 {:>7.1}µs  p99 {:>7.1}µs",
                    round + 1,
                    s.name,
                    name,
                    r.per_sec(),
                    r.p50_us,
                    r.p99_us
                );
                results[si][ti].push(r);
            }
        }
        let g = governor_run(&chooser, opts.duration);
        eprintln!(
            "round {} governor in process (1 thread)          {g:>10.0}/s",
            round + 1
        );
        governor_runs.push(g);
    }
    drop(rld);
    drop(redis);

    let mut rows = Vec::new();
    for (si, s) in scenarios.iter().enumerate() {
        let reference = median(results[si][0].iter().map(LoadResult::per_sec).collect());
        for (ti, (name, _)) in s.targets.iter().enumerate() {
            let runs = &results[si][ti];
            let per_sec = median(runs.iter().map(LoadResult::per_sec).collect());
            let decisions: u64 = runs.iter().map(|r| r.decisions).sum();
            let allowed: u64 = runs.iter().map(|r| r.allowed).sum();
            rows.push(Row {
                scenario: s.name.into(),
                target: (*name).into(),
                decisions_per_sec: per_sec,
                ratio_to_rld: per_sec / reference,
                p50_us: Some(median(runs.iter().map(|r| r.p50_us).collect())),
                p99_us: Some(median(runs.iter().map(|r| r.p99_us).collect())),
                allowed_fraction: allowed as f64 / decisions.max(1) as f64,
            });
        }
    }
    let g = median(governor_runs);
    let rld_best = rows
        .iter()
        .filter(|r| r.target.starts_with("rld"))
        .map(|r| r.decisions_per_sec)
        .fold(0.0, f64::max);
    rows.push(Row {
        scenario: "in process, no socket".into(),
        target: "governor (1 thread)".into(),
        decisions_per_sec: g,
        ratio_to_rld: g / rld_best,
        p50_us: None,
        p99_us: None,
        allowed_fraction: 1.0,
    });
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows, &opts);
    }
    Ok(())
}

fn governor_run(chooser: &KeyChooser, duration: Duration) -> f64 {
    use std::num::NonZeroU32;
    let gov: governor::DefaultKeyedRateLimiter<&'static str> = governor::RateLimiter::keyed(
        governor::Quota::per_second(NonZeroU32::new(RATE as u32).unwrap())
            .allow_burst(NonZeroU32::new(BURST as u32).unwrap()),
    );
    let mut keys = chooser.fork(0);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        for _ in 0..1024 {
            std::hint::black_box(gov.check_key(&keys.next()).is_ok());
        }
        n += 1024;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_table(rows: &[Row], opts: &Opts) {
    println!(
        "{} connections, {} keys ({}), {} x {:?} per target, medians over rounds\n",
        opts.connections,
        opts.keys,
        opts.zipf.map_or("uniform".into(), |s| format!("zipf {s}")),
        opts.rounds,
        opts.duration
    );
    println!(
        "{:<36} {:<20} {:>14} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "target", "decisions/s", "vs rld", "p50 µs", "p99 µs", "allowed"
    );
    let mut last = String::new();
    for r in rows {
        let scenario = if r.scenario == last { "" } else { &r.scenario };
        last.clone_from(&r.scenario);
        let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        println!(
            "{:<36} {:<20} {:>14.0} {:>8.2}x {:>9} {:>9} {:>7.1}%",
            scenario,
            r.target,
            r.decisions_per_sec,
            r.ratio_to_rld,
            us(r.p50_us),
            us(r.p99_us),
            r.allowed_fraction * 100.0
        );
    }
}
