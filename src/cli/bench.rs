//! `rlctl bench`: a closed-loop load generator against a running daemon.
//!
//! `--connections` tasks each keep `--pipeline` requests in flight (each an
//! `Acquire`, or an `AcquireMany` of `--batch` items), choosing clients named
//! `<client-prefix><k>` with `k` drawn uniformly or Zipf-distributed from
//! `--keys`. Each wake-up drains every answer already received, refills the
//! pipeline and writes once. Latency is per round trip (request or batch).
//! Bounded by `--duration` and/or `--requests`.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::Zipf;
use serde::Serialize;

use super::{CliError, Exit, Output, connect};
use crate::daemon::metrics::{LatencyHistogram, LocalHistogram};
use crate::protocol::{
    Acquire, BatchItem, Connection, Outcome, Priority, Request, Response, ResponseFrame,
};

/// Options of `rlctl bench`.
#[derive(Debug, Clone, ClapArgs)]
pub struct BenchArgs {
    /// Concurrent connections.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub pipeline: usize,
    /// Decisions per request (AcquireMany when above 1).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch: usize,
    /// Distinct clients to spread the load over.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub keys: u64,
    /// How clients are chosen among the keys.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Zipf exponent for --distribution zipf.
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    pub zipf_exponent: f64,
    /// Tokens per decision.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cost: u64,
    /// Priority of every request.
    #[arg(long, default_value = "normal", value_name = "PRIORITY")]
    pub priority: Priority,
    /// How long to run.
    #[arg(long, default_value = "5s", value_name = "DURATION",
          value_parser = super::parse_duration_arg)]
    pub duration: Duration,
    /// Stop after this many requests in total (whichever comes first with --duration).
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// Clients are named PREFIX followed by a key number; point a rule at "PREFIX*".
    #[arg(long, default_value = "bench-", value_name = "PREFIX")]
    pub client_prefix: String,
    /// The resource every request names.
    #[arg(long, default_value = "bench", value_name = "NAME")]
    pub resource: String,
    /// Seed of the key sequence (same seed, same keys).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,
}

/// Key distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipf,
}

/// The result of a run (`--json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub connections: usize,
    pub pipeline: usize,
    pub batch: usize,
    pub keys: u64,
    pub distribution: Distribution,
    pub elapsed_s: f64,
    pub requests: u64,
    pub decisions: u64,
    pub decisions_per_sec: f64,
    pub requests_per_sec: f64,
    pub allowed: u64,
    pub rejected: u64,
    pub errors: u64,
    pub latency_us: LatencyUs,
}

/// Round-trip latency in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyUs {
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    allowed: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    latency: LatencyHistogram,
    stop: AtomicBool,
}

pub async fn run(socket: &Path, args: BenchArgs, out: &mut Output) -> Result<Exit, CliError> {
    let report = bench(
        socket,
        &args,
        !out.json() && std::io::stderr().is_terminal(),
    )
    .await?;
    if out.json() {
        out.json_value(&report)?;
    } else {
        out.line(render(&report))?;
    }
    Ok(if report.errors > 0 {
        Exit::Failure
    } else {
        Exit::Ok
    })
}

/// Runs the load and returns its report.
///
/// # Errors
/// Bad options (exit 2) or a connection failure (exit 3).
pub async fn bench(
    socket: &Path,
    args: &BenchArgs,
    progress: bool,
) -> Result<BenchReport, CliError> {
    if args.connections == 0 || args.pipeline == 0 || args.batch == 0 || args.keys == 0 {
        return Err(CliError::usage(
            "--connections, --pipeline, --batch and --keys must be at least 1",
        ));
    }
    if args.distribution == Distribution::Zipf
        && (args.zipf_exponent.is_nan() || args.zipf_exponent < 0.0)
    {
        return Err(CliError::usage("--zipf-exponent must be 0 or more"));
    }
    let names: Arc<Vec<String>> = Arc::new(
        (0..args.keys)
            .map(|k| format!("{}{k}", args.client_prefix))
            .collect(),
    );
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(connect(socket).await?);
    }
    let totals = Arc::new(Totals::default());
    let bar = progress_bar(args, progress);
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let worker = Worker {
            conn,
            names: Arc::clone(&names),
            args: args.clone(),
            totals: Arc::clone(&totals),
            rng: SmallRng::seed_from_u64(args.seed.wrapping_add(i as u64)),
            zipf: Zipf::new(args.keys as f64, args.zipf_exponent).ok(),
        };
        tasks.push(tokio::spawn(worker.run(deadline)));
    }
    let ticker = bar.clone().map(|bar| {
        let totals = Arc::clone(&totals);
        let args = args.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let done = totals.requests.load(Ordering::Relaxed);
                match args.requests {
                    Some(_) => bar.set_position(done),
                    None => bar.set_position(start.elapsed().as_millis() as u64),
                }
                bar.set_message(format!(
                    "{:.0} decisions/s",
                    (done * args.batch as u64) as f64 / start.elapsed().as_secs_f64()
                ));
            }
        })
    });
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(CliError::failure(format!("bench task failed: {e}"))),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let requests = totals.requests.load(Ordering::Relaxed);
    let decisions = requests * args.batch as u64;
    let l = totals.latency.summary();
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(BenchReport {
        connections: args.connections,
        pipeline: args.pipeline,
        batch: args.batch,
        keys: args.keys,
        distribution: args.distribution,
        elapsed_s: elapsed,
        requests,
        decisions,
        decisions_per_sec: decisions as f64 / elapsed,
        requests_per_sec: requests as f64 / elapsed,
        allowed: totals.allowed.load(Ordering::Relaxed),
        rejected: totals.rejected.load(Ordering::Relaxed),
        errors: totals.errors.load(Ordering::Relaxed),
        latency_us: LatencyUs {
            avg: us(l.avg_ns),
            p50: us(l.p50_ns),
            p90: us(l.p90_ns),
            p99: us(l.p99_ns),
            p999: us(l.p999_ns),
            max: us(l.max_ns),
        },
    })
}

fn progress_bar(args: &BenchArgs, show: bool) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let (len, unit) = match args.requests {
        Some(n) => (n, "requests"),
        None => (args.duration.as_millis() as u64, "ms"),
    };
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} [{{bar:40}}] {{pos}}/{{len}} {unit}  {{msg}}"
    ))
    .expect("the template is valid");
    bar.set_style(style);
    Some(bar)
}

struct Worker {
    conn: Connection,
    names: Arc<Vec<String>>,
    args: BenchArgs,
    totals: Arc<Totals>,
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
}

impl Worker {
    async fn run(mut self, deadline: Instant) -> Result<(), CliError> {
        let mut latency = LocalHistogram::default();
        let mut sent_at = std::collections::VecDeque::with_capacity(self.args.pipeline);
        let mut in_flight = 0;
        loop {
            while in_flight < self.args.pipeline && self.may_send(deadline) {
                self.queue()?;
                sent_at.push_back(Instant::now());
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            self.conn.flush().await?;
            let frame = self.conn.receive().await?;
            let mut frames = vec![frame];
            while let Some(f) = self.conn.receive_buffered()? {
                frames.push(f);
            }
            let now = Instant::now();
            for frame in frames {
                let sent = sent_at.pop_front().expect("an answer matches a request");
                latency.record(now.duration_since(sent).as_nanos() as u64);
                self.count(frame);
                in_flight -= 1;
            }
            latency.merge_into(&self.totals.latency);
        }
        latency.merge_into(&self.totals.latency);
        Ok(())
    }

    /// Claims the right to send one more request.
    fn may_send(&self, deadline: Instant) -> bool {
        if self.totals.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return false;
        }
        let claimed = self.totals.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.args.requests.is_some_and(|max| claimed > max) {
            self.totals.requests.fetch_sub(1, Ordering::Relaxed);
            self.totals.stop.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn next_key(&mut self) -> usize {
        match &self.zipf {
            Some(z) if self.args.distribution == Distribution::Zipf => {
                (self.rng.sample(z) as usize).saturating_sub(1)
            }
            _ => self.rng.random_range(0..self.names.len()),
        }
    }

    fn queue(&mut self) -> Result<(), CliError> {
        if self.args.batch == 1 {
            let k = self.next_key();
            let request = Request::Acquire(item(&self.names, &self.args, k));
            self.conn.queue(&request)?;
        } else {
            let keys: Vec<usize> = (0..self.args.batch).map(|_| self.next_key()).collect();
            let (names, args) = (&self.names, &self.args);
            let request =
                Request::AcquireMany(keys.into_iter().map(|k| item(names, args, k)).collect());
            self.conn.queue(&request)?;
        }
        Ok(())
    }

    fn count(&self, frame: ResponseFrame<'static>) {
        let t = &self.totals;
        let tally = |outcome: Outcome| match outcome {
            Outcome::Allowed | Outcome::Bypassed => t.allowed.fetch_add(1, Ordering::Relaxed),
            Outcome::Denied => t.rejected.fetch_add(1, Ordering::Relaxed),
        };
        match frame.response {
            Response::Decision(d) => {
                tally(d.outcome);
            }
            Response::Decisions(items) => {
                for item in items {
                    match item {
                        BatchItem::Decision(d) => {
                            tally(d.outcome);
                        }
                        BatchItem::Error(_) => {
                            t.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            _ => {
                t.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn item<'a>(names: &'a [String], args: &'a BenchArgs, k: usize) -> Acquire<'a> {
    Acquire {
        client: names[k].as_str().into(),
        resource: args.resource.as_str().into(),
        cost: args.cost,
        priority: args.priority,
        trace: None,
    }
}

fn render(r: &BenchReport) -> String {
    let l = &r.latency_us;
    format!(
        "{} connections x pipeline {} x batch {}, {} keys ({})\n\
         {:.2}s: {} requests, {} decisions\n\
         throughput   {:.0} decisions/s  ({:.0} requests/s)\n\
         decisions    allowed {}  rejected {}  errors {}\n\
         latency      avg {:.1}µs  p50 {:.1}µs  p90 {:.1}µs  p99 {:.1}µs  p99.9 {:.1}µs  max {:.1}µs",
        r.connections,
        r.pipeline,
        r.batch,
        r.keys,
        match r.distribution {
            Distribution::Uniform => "uniform",
            Distribution::Zipf => "zipf",
        },
        r.elapsed_s,
        r.requests,
        r.decisions,
        r.decisions_per_sec,
        r.requests_per_sec,
        r.allowed,
        r.rejected,
        r.errors,
        l.avg,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max
    )
}
