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
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("rld did not start: {}", self.log());
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
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
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "etcd is missing under CI: scripts/test installs etcd-server and sets RLD_TEST_ETCD"
            );
            eprintln!("skipped: etcd is not installed (run scripts/test)");
            return None;
        }
        // Ports 25000-35000, 20 per cluster, apart per process and per test.
        let slot = (std::process::id() % 50) * 10 + n % 10;
        Some(Etcd::private(prefix, 25_000 + slot as u16 * 20))
    }

    /// Starts a private cluster with client ports `base+1..3`.
    pub fn private(prefix: String, base: u16) -> Etcd {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/etcd-cluster");
        let out = Command::new(&script)
            .args(["start"])
            .arg(dir.path())
            .env("RLD_ETCD_BASE_PORT", base.to_string())
            .output()
            .expect("run scripts/etcd-cluster");
        assert!(out.status.success(), "etcd did not start: {}", stderr(&out));
        Etcd {
            endpoints: stdout(&out).trim().to_owned(),
            prefix,
            private: Some((dir, script)),
        }
    }

    /// `rld` arguments joining this cluster as `node`.
    pub fn args(&self, node: &str) -> Vec<String> {
        vec![
            "--etcd".into(),
            self.endpoints.clone(),
            "--etcd-prefix".into(),
            self.prefix.clone(),
            "--node-id".into(),
            node.into(),
        ]
    }

    pub async fn client(&self) -> etcd_client::Client {
        let eps: Vec<&str> = self.endpoints.split(',').collect();
        etcd_client::Client::connect(eps, None)
            .await
            .expect("etcd client")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some((dir, script)) = &self.private {
            let _ = Command::new(script).arg("stop").arg(dir.path()).output();
        }
    }
}
