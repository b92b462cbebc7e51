//! The shared test harness: daemons in-process (fast, most tests) or as real
//! `rld` processes (restarts, `kill -9`, signals, memory), and `rlctl` runs.
//! Every daemon lives in its own temp directory; processes are ended by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rld::daemon::{Config, Daemon, Shared};
use rld::protocol::Connection;
use rld::rule::RuleSpec;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A daemon running inside the test process.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub shared: Arc<Shared>,
    cancel: CancellationToken,
    _task: tokio::task::JoinHandle<()>,
}

impl TestDaemon {
    /// Starts with default settings and `rules` as config-file rules.
    pub async fn start(rules: Vec<RuleSpec>) -> TestDaemon {
        TestDaemon::start_with(|c| c.rules = rules).await
    }

    /// Starts after `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            socket: dir.path().join("rld.sock"),
            state_dir: dir.path().join("state"),
            shards: 16,
            ..Config::default()
        };
        tweak(&mut config);
        let daemon = Daemon::start(config).await.expect("daemon starts");
        let socket = daemon.socket().to_owned();
        let shared = Arc::clone(daemon.shared());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(daemon.serve(cancel.clone(), Arc::new(Notify::new())));
        TestDaemon {
            dir,
            socket,
            shared,
            cancel,
            _task: task,
        }
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.socket).await.expect("connect")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Whether a listener accepts on `socket` within `limit` (polled).
pub fn socket_answers_within(socket: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// An `rld` process.
pub struct ProcessDaemon {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr_path: PathBuf,
}

impl ProcessDaemon {
    /// Starts `rld` with `--socket dir/rld.sock --state-dir dir/state` plus
    /// `extra` arguments and waits until it answers.
    pub fn start(dir: &Path, extra: &[&str]) -> ProcessDaemon {
        ProcessDaemon::start_env(dir, extra, &[])
    }

    /// [`ProcessDaemon::start`] with extra environment variables.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> ProcessDaemon {
        let socket = dir.join("rld.sock");
        let stderr_path = dir.join(format!("rld-{}.log", Instant::now().elapsed().as_nanos()));
        let log = std::fs::File::create(&stderr_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_rld"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env_remove("RLD_SOCKET")
            .env_remove("RLD_CONFIG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rld");
        let daemon = ProcessDaemon {
            child,
            socket,
            stderr_path,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&self) {
        if !socket_answers_within(&self.socket, Duration::from_secs(20)) {
            panic!("rld did not start: {}", self.log());
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The address `--metrics-listen 127.0.0.1:0` was given (from the log).
    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        let from = "metrics served on http://";
        let at = log
            .find(from)
            .unwrap_or_else(|| panic!("no metrics address in the log: {log}"))
            + from.len();
        log[at..at + log[at..].find("/metrics").unwrap()].to_owned()
    }

    /// The value of `series` (`name{labels}`) in a scrape of `/metrics`.
    pub fn metric(&self, series: &str) -> f64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics_addr()).expect("metrics address");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in the scrape: {body}"))
            .parse()
            .unwrap()
    }

    /// Sends a signal to this process only.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// SIGTERM, then waits (up to 10 s) for exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits (up to 10 s) for an exit already asked for (a signal sent with
    /// [`ProcessDaemon::signal`]); a second SIGTERM would exit at once.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("rld did not exit after SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for ProcessDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `rlctl` against `socket` with `args`.
pub fn rlctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("RLD_SOCKET")
        .output()
        .expect("run rlctl")
}

/// Async wrapper for `rlctl` (runs on the blocking pool).
pub async fn rlctl_async(socket: &Path, args: &[&str]) -> Output {
    let socket = socket.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        rlctl(&socket, &refs)
    })
    .await
    .expect("rlctl task")
}

/// `rlctl rules set ID --client '*' --resource ID` plus `extra` on `socket`,
/// which must succeed.
pub fn set_rule(socket: &Path, id: &str, extra: &[&str]) {
    let mut args = vec!["rules", "set", id, "--client", "*", "--resource", id];
    args.extend_from_slice(extra);
    let out = rlctl(socket, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// A local rule of `limit` per `window`.
pub fn rule(id: &str, client: &str, resource: &str, limit: u64, window: Duration) -> RuleSpec {
    RuleSpec::new(id, client, resource, limit, window)
}

/// An etcd cluster for a test: the suite's shared one (`RLD_TEST_ETCD`, set by
/// scripts/test) or, failing that, a private 3-node cluster started here and
/// stopped (by PID) on drop. Each test also gets its own key prefix.
pub struct Etcd {
    pub endpoints: String,
    pub prefix: String,
    private: Option<(tempfile::TempDir, PathBuf)>,
}

impl Etcd {
    /// `None` (with a note) when etcd is not available outside CI; under
    /// `CI=true` a missing etcd fails the test.
    pub fn get() -> Option<Etcd> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("/rld-test-{}-{n}", std::process::id());
        if let Ok(endpoints) = std::env::var("RLD_TEST_ETCD") {
            return Some(Etcd {
                endpoints,
                prefix,
                private: None,
            });
        }
        if !etcd_installed() {
            return None;
        }
        // Ports 24000-30000, 20 per cluster, apart per process and per test;
        // all below Linux's ephemeral range (32768-60999), where any
        // outgoing connection may hold a port and make etcd's bind fail.
        let slot = (std::process::id() % 30) * 10 + n % 10;
        Some(Etcd::private(prefix, 24_000 + slot as u16 * 20))
    }

    /// Starts a private cluster with client ports `base+1..3`.
    pub fn private(prefix: String, base: u16) -> Etcd {
        Etcd::private_with(prefix, base, &[])
    }

    /// [`Etcd::private`] with more environment for `scripts/etcd-cluster`
    /// (`RLD_ETCD_QUOTA_BYTES`).
    pub fn private_with(prefix: String, base: u16, env: &[(&str, &str)]) -> Etcd {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/etcd-cluster");
        let out = Command::new(&script)
            .args(["start"])
            .arg(dir.path())
            .env("RLD_ETCD_BASE_PORT", base.to_string())
            .envs(env.iter().copied())
            .output()
            .expect("run scripts/etcd-cluster");
        assert!(out.status.success(), "etcd did not start: {}", stderr(&out));
        Etcd {
            endpoints: stdout(&out).trim().to_owned(),
            prefix,
            private: Some((dir, script)),
        }
    }

    /// `rld` arguments joining this cluster as `node`. Compaction is off:
    /// the suite's clusters are shared, and the audit tests read etcd's
    /// history from its start (the compaction test turns it on).
    pub fn args(&self, node: &str) -> Vec<String> {
        vec![
            "--etcd".into(),
            self.endpoints.clone(),
            "--etcd-prefix".into(),
            self.prefix.clone(),
            "--node-id".into(),
            node.into(),
            "--etcd-compact-interval".into(),
            "0s".into(),
        ]
    }

    pub async fn client(&self) -> etcd_client::Client {
        let eps: Vec<&str> = self.endpoints.split(',').collect();
        // Bounded calls: with a member killed, a call routed to it must fail
        // (and the test with it), never hang the suite.
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        etcd_client::Client::connect(eps, Some(options))
            .await
            .expect("etcd client")
    }
}

/// Whether `etcd` is on PATH. Under `CI=true` a missing etcd fails the test
/// (scripts/test installs etcd-server); elsewhere the test is skipped, saying so.
fn etcd_installed() -> bool {
    if Command::new("etcd").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "etcd is missing under CI: scripts/test installs etcd-server and sets RLD_TEST_ETCD"
    );
    eprintln!("skipped: etcd is not installed (run scripts/test)");
    false
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some((dir, script)) = &self.private {
            let _ = Command::new(script).arg("stop").arg(dir.path()).output();
        }
    }
}

impl Etcd {
    /// A private cluster (faults allowed), on its own ports.
    pub fn private_for_faults() -> Option<Etcd> {
        Etcd::private_for_faults_with(&[])
    }

    /// [`Etcd::private_for_faults`] with more environment for the script.
    pub fn private_for_faults_with(env: &[(&str, &str)]) -> Option<Etcd> {
        if !etcd_installed() {
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Ports 30000-32000: after the shared clusters, below the ephemeral range.
        let slot = 300 + (std::process::id() % 25) * 4 + n % 4;
        let prefix = format!("/rld-fault-{n}");
        Some(Etcd::private_with(prefix, 24_000 + slot as u16 * 20, env))
    }

    fn dir(&self) -> &Path {
        self.private.as_ref().expect("a private cluster").0.path()
    }

    /// PIDs of the live members, by member number 1..=3. A PID file of a
    /// member that died is stale (its PID may be another process's by now,
    /// pid_max being 32768 here), so a PID counts only while its command
    /// line still names the member's data directory.
    pub fn pids(&self) -> Vec<(usize, i32)> {
        (1..=3)
            .filter_map(|i| {
                let pid = std::fs::read_to_string(self.dir().join(format!("n{i}.pid"))).ok()?;
                let pid: i32 = pid.trim().parse().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let data_dir = self.dir().join(format!("n{i}"));
                let ours = cmdline
                    .split(|&b| b == 0)
                    .any(|arg| arg == data_dir.as_os_str().as_encoded_bytes());
                ours.then_some((i, pid))
            })
            .collect()
    }

    /// Sends `sig` to member `i` (1..=3).
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let (_, pid) = self
            .pids()
            .into_iter()
            .find(|(n, _)| *n == i)
            .expect("member");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }

    /// Sends `sig` to every member.
    pub fn signal_all(&self, sig: nix::sys::signal::Signal) {
        for (i, _) in self.pids() {
            self.signal(i, sig);
        }
    }

    /// Kills every member and waits until they have exited (their ports
    /// are free then; their data stays).
    pub fn kill_all(&self) {
        self.signal_all(nix::sys::signal::Signal::SIGKILL);
        // An exited member's /proc entry no longer names its data dir (a
        // zombie's command line is empty), so it leaves `pids()`.
        wait_for(Duration::from_secs(10), || self.pids().is_empty());
    }

    /// Starts every member again on its existing data.
    pub fn restart(&self) {
        let (dir, script) = self.private.as_ref().expect("a private cluster");
        let base: u16 = self
            .endpoints
            .split(',')
            .next()
            .and_then(|e| e.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
            .expect("port")
            - 1;
        let out = Command::new(script)
            .arg("start")
            .arg(dir.path())
            .env("RLD_ETCD_BASE_PORT", base.to_string())
            .output()
            .expect("restart etcd");
        assert!(
            out.status.success(),
            "etcd did not restart: {}",
            stderr(&out)
        );
    }

    /// The member number (1..=3) of the current leader.
    pub async fn leader(&self) -> usize {
        for (i, endpoint) in self.endpoints.split(',').enumerate() {
            if let Ok(mut c) = etcd_client::Client::connect([endpoint], None).await
                && let Ok(status) = c.status().await
                && status.leader() == status.header().map_or(0, |h| h.member_id())
            {
                return i + 1;
            }
        }
        panic!("no etcd member says it is the leader");
    }
}

/// A TCP proxy in front of etcd members that a test can cut: while
/// `blackhole` is on, bytes are neither forwarded nor connections closed
/// (a silent partition).
pub struct Proxy {
    pub endpoints: String,
    pub blackhole: Arc<std::sync::atomic::AtomicBool>,
    /// Forward requests but drop etcd's answers, closing the connection
    /// (the request may have been applied: an unknown outcome).
    pub drop_answers: Arc<std::sync::atomic::AtomicBool>,
    /// Hold each of etcd's answers this many milliseconds before passing it
    /// on (0: none): answers arrive after the caller's deadline.
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// One listener on 127.0.0.1 per target endpoint.
    pub async fn start(targets: &str) -> Proxy {
        let blackhole = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drop_answers = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut endpoints = Vec::new();
        let mut tasks = Vec::new();
        for target in targets.split(',') {
            let addr = target.trim_start_matches("http://").to_owned();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            endpoints.push(format!("http://{}", listener.local_addr().unwrap()));
            let hole = Arc::clone(&blackhole);
            let drop = Arc::clone(&drop_answers);
            let delay = Arc::clone(&delay_ms);
            tasks.push(tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let (addr, hole) = (addr.clone(), Arc::clone(&hole));
                    let drop = Arc::clone(&drop);
                    let delay = Arc::clone(&delay);
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(&addr).await else {
                            return;
                        };
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::join!(
                            pipe(ri, wo, Arc::clone(&hole), None, None),
                            pipe(ro, wi, hole, Some(drop), Some(delay))
                        );
                    });
                }
            }));
        }
        Proxy {
            endpoints: endpoints.join(","),
            blackhole,
            drop_answers,
            delay_ms,
            tasks,
        }
    }

    pub fn cut(&self, on: bool) {
        self.blackhole
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds every answer `delay` before passing it on (zero: off).
    pub fn delay_answers(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// While on: requests reach etcd, answers are dropped and the
    /// connection closed.
    pub fn drop_answers(&self, on: bool) {
        self.drop_answers
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<std::sync::atomic::AtomicBool>,
    drop: Option<Arc<std::sync::atomic::AtomicBool>>,
    delay: Option<Arc<std::sync::atomic::AtomicU64>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Partitioned: hold the bytes back (drop them) but keep the
        // connection open, as a network that silently loses packets.
        if hole.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        // An answer lost: drop it and close our side to the client.
        if drop
            .as_ref()
            .is_some_and(|d| d.load(std::sync::atomic::Ordering::SeqCst))
        {
            return;
        }
        let ms = delay
            .as_ref()
            .map_or(0, |d| d.load(std::sync::atomic::Ordering::SeqCst));
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Groups the tests that depend on timing: the heavy ones (etcd clusters
/// or the daemon under load, faults) take it for writing and run alone; the
/// other tests that talk to etcd take it for reading and run together, never
/// beside a heavy one, whose load would make their etcd calls slow.
pub static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What an open-loop load saw, per 10 ms tick.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    /// (time since start, allowed per resource, round trip of the tick's batch)
    pub ticks: Vec<(Duration, Vec<u32>, Duration)>,
    pub per_tick: Vec<u32>,
}

impl Timeline {
    /// Allowed of resource `r` in [from, to).
    pub fn allowed(&self, r: usize, from: Duration, to: Duration) -> u64 {
        self.ticks
            .iter()
            .filter(|(t, _, _)| *t >= from && *t < to)
            .map(|(_, a, _)| u64::from(a[r]))
            .sum()
    }

    /// Offered of resource `r` in [from, to).
    pub fn offered(&self, r: usize, from: Duration, to: Duration) -> u64 {
        let ticks = self
            .ticks
            .iter()
            .filter(|(t, _, _)| *t >= from && *t < to)
            .count();
        ticks as u64 * u64::from(self.per_tick[r])
    }

    pub fn max_latency(&self) -> Duration {
        self.ticks
            .iter()
            .map(|(_, _, l)| *l)
            .max()
            .unwrap_or_default()
    }

    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut l: Vec<Duration> = self.ticks.iter().map(|(_, _, l)| *l).collect();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// Offers `rates[i]` requests/s of client "load" on `resources[i]`, in one
/// `AcquireMany` every 10 ms (open loop), until `stop` or `limit`.
pub async fn drive(
    socket: PathBuf,
    resources: Vec<String>,
    rates: Vec<u32>,
    start: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
    limit: Duration,
) -> Timeline {
    let mut conn = Connection::connect(&socket).await.expect("connect");
    let per_tick: Vec<u32> = rates.iter().map(|r| r / 100).collect();
    let mut timeline = Timeline {
        ticks: Vec::new(),
        per_tick: per_tick.clone(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < limit {
        tick.tick().await;
        let mut items = Vec::new();
        for (r, n) in resources.iter().zip(&per_tick) {
            for _ in 0..*n {
                items.push(rld::protocol::Acquire::new("load", r.as_str()));
            }
        }
        let sent = Instant::now();
        let answers = match conn.acquire_many(items).await {
            Ok(answers) => answers,
            // The daemon was stopped on purpose after the load was told to stop.
            Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
            Err(e) => panic!("every request is answered: {e:?}"),
        };
        let rtt = sent.elapsed();
        let mut allowed = vec![0u32; resources.len()];
        let mut i = 0;
        for (r, n) in per_tick.iter().enumerate() {
            for _ in 0..*n {
                if matches!(&answers[i], rld::protocol::BatchItem::Decision(d) if d.is_allowed()) {
                    allowed[r] += 1;
                }
                i += 1;
            }
        }
        timeline.ticks.push((start.elapsed(), allowed, rtt));
    }
    timeline
}

/// [`drive`] against each daemon at `rate` on one resource, all sharing
/// `start` and `stop`.
pub fn drive_each(
    daemons: &[&ProcessDaemon],
    resource: &str,
    rate: u32,
    start: Instant,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<Timeline>> {
    daemons
        .iter()
        .map(|d| {
            tokio::spawn(drive(
                d.socket.clone(),
                vec![resource.to_owned()],
                vec![rate],
                start,
                Arc::clone(stop),
                limit,
            ))
        })
        .collect()
}

/// The etcd state a daemon reports (`healthy`, `degraded`, ...).
/// Polls `cond` every 20 ms until it holds; fails after `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cond(), "condition not reached within {limit:?}");
}

pub fn etcd_state(socket: &Path) -> String {
    let out = rlctl(socket, &["health", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["etcd"]["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Polls until the daemon reports `state`; returns when (since `start`).
pub async fn wait_state(socket: &Path, state: &str, start: Instant, limit: Duration) -> Duration {
    let deadline = Instant::now() + limit;
    loop {
        let s = {
            let socket = socket.to_owned();
            tokio::task::spawn_blocking(move || etcd_state(&socket))
                .await
                .unwrap()
        };
        if s == state {
            return start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{} not {state} within {limit:?} (is {s})",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
