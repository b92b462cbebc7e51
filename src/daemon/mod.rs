//! The `rld` daemon: wiring and lifecycle.
//!
//! [`Daemon::start`] loads rules (config layer + run-time layer from the state
//! directory or etcd), joins the etcd cluster when configured, and binds the
//! socket; [`Daemon::serve`] runs the accept loop, the sweeper, the SIGHUP
//! reloader and (with etcd) membership, the rules watch and the lease
//! coordinator until the token is cancelled, then drains: stop accepting, let
//! connections answer what they have read, stop the sweeper, give leased
//! shares out of force, leave the cluster (the others get them back at
//! once), remove the socket file.
//!
//! Submodules: [`config`] (flags and TOML), [`listener`] (socket, accept,
//! connection cap), [`conn`] (one connection), [`limiter`] (the decision core),
//! [`rulebook`] (rule layers) and [`store`] (standalone persistence),
//! [`cluster`] (etcd: registration, health, rules), [`lease`] (shares of
//! global rules), [`sweeper`] (eviction timer), [`metrics`], `report`
//! (stats and health answers), [`auth`] (peer credentials), [`shutdown`]
//! (signals).

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod exporter;
pub mod health;
pub mod lease;
pub mod limiter;
pub mod limits;
pub mod listener;
pub mod metrics;
mod report;
pub mod rulebook;
pub mod shutdown;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod throttle;
pub mod turns;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

use auth::Authorizer;
use cluster::{Cluster, ClusterError};
use lease::{Coordinator, LeaseEvent, LeaseSettings, LeaseStats, Planner, QueueSink};
use limiter::global::ClusterLink;
use limiter::{Limiter, LimiterConfig, MonotonicClock};
use listener::{BindError, Bound};
use metrics::Metrics;
use rulebook::{RuleBook, RuleBookError, StateStore};

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Rules(#[from] RuleBookError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Metrics(#[from] exporter::ExporterError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
}

/// State shared by every connection and background task.
#[derive(Debug)]
pub struct Shared {
    pub limiter: Arc<Limiter>,
    /// Held tokens per global rule, scanned at most every
    /// [`report::HELD_SCAN_EVERY`] for stats and rule lists.
    pub(crate) held_scan: report::HeldScan,
    pub rulebook: Arc<RuleBook>,
    pub metrics: Metrics,
    pub clock: MonotonicClock,
    pub auth: Authorizer,
    pub max_frame: usize,
    pub idle_timeout: Option<Duration>,
    pub write_timeout: Duration,
    /// Connection slots (total, per uid, kept for admins).
    pub slots: Arc<limits::Slots>,
    /// Memory for large answers, shared by all connections.
    pub answers: limits::AnswerBudget,
    /// Turns for reports (stats, rule lists) on the blocking pool: however
    /// many clients ask, a few run at once and rule changes are not queued
    /// behind them.
    pub reports: tokio::sync::Semaphore,
    /// Heavy turns (a connection's work beyond its first few decisions per
    /// wake-up), shared fairly by uid.
    pub turns: turns::Turns,
    /// The etcd side, when limits are shared.
    pub cluster: Option<Arc<Cluster>>,
    /// Lease counters, when limits are shared.
    pub lease: Option<Arc<LeaseStats>>,
    /// The tracer, when spans are exported (`--otlp-endpoint`).
    pub telemetry: Option<Arc<telemetry::Telemetry>>,
    pub(crate) stopping: AtomicBool,
}

impl Shared {
    fn count_connection(&self, open: bool) {
        if open {
            Metrics::inc(&self.metrics.connections_open);
            Metrics::inc(&self.metrics.connections_total);
        } else {
            self.metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A daemon with its rules loaded and its socket bound, not yet serving.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    bound: Bound,
    config: Config,
    socket: PathBuf,
    /// The hot path's lease events, for the coordinator started by `serve`.
    lease_events: Option<(tokio::sync::mpsc::Receiver<LeaseEvent>, Arc<Planner>)>,
    /// The Prometheus endpoint, when configured.
    exporter: Option<exporter::Exporter>,
}

/// Reports computed at once on the blocking pool.
const REPORTS_AT_ONCE: usize = 4;

/// Lease events queued between the hot path and the coordinator; beyond it
/// events are dropped and counted (a bucket then asks again).
const LEASE_QUEUE: usize = 65_536;

impl Daemon {
    /// Loads state and rules and binds the socket. Must run inside a Tokio
    /// runtime.
    ///
    /// # Errors
    /// Unusable state directory, invalid persisted rules, or a socket that is
    /// in use or cannot be bound.
    pub async fn start(mut config: Config) -> Result<Daemon, DaemonError> {
        config.max_connections = fit_connections_to_files(config.max_connections);
        let clock = MonotonicClock::new();
        let limiter = Arc::new(Limiter::new(LimiterConfig {
            shards: config.shards,
            max_buckets: config.max_buckets,
            max_table_bytes: config.max_table_bytes,
            default_action: config.default_action,
        }));
        let store = StateStore::open(&config.state_dir)?;
        // Addresses are checked before etcd: a daemon that cannot serve
        // exits before it registers as a member (a phantom member would
        // shrink the others' batches for a TTL). The metrics endpoint is
        // bound now (its file removed if the start fails); the socket is
        // only checked, and bound once the rules are in force, so that it
        // answers from its first connection.
        let exporter = config
            .metrics_listen
            .as_ref()
            .map(|addr| exporter::Exporter::bind(addr, config.socket_mode))
            .transpose()?;
        if let Some(e) = &exporter {
            // Logged once bound, before the socket is: whoever waits for the
            // socket finds the address (the port chosen for `:0`). Scrapes
            // wait in the backlog until `serve` accepts them.
            tracing::info!("metrics served on {}", e.addr());
        }
        listener::check_free(&config.socket)?;
        let telemetry = match &config.trace {
            Some(t) => {
                let node = config
                    .etcd
                    .as_ref()
                    .map_or_else(host_name, |e| e.node_id.clone());
                Some(Arc::new(telemetry::Telemetry::start(t, &node)?))
            }
            None => None,
        };
        let (cluster, lease_events, lease) = match &config.etcd {
            Some(etcd) => {
                if etcd.max_clock_skew.is_some() {
                    tracing::warn!(
                        "max_clock_skew is set but no longer used: global rules lease shares (a rate and a depth), which do not depend on wall clocks; remove it from the config"
                    );
                }
                let (tx, rx) = tokio::sync::mpsc::channel(LEASE_QUEUE);
                let members = Arc::new(AtomicU64::new(1));
                let planner = Arc::new(Planner::new(
                    LeaseSettings {
                        fallback_slack: etcd.fallback_slack,
                        max_buckets_per_rule: etcd.max_buckets_per_rule,
                        compact_every: etcd.compact_every,
                    },
                    Arc::clone(&members),
                    clock,
                ));
                let sink = QueueSink {
                    events: tx,
                    planner: Arc::clone(&planner),
                };
                let link = Arc::new(ClusterLink::new(sink, etcd.default_on_failure));
                limiter.attach(Arc::clone(&link));
                let cluster = Arc::new(Cluster::connect(etcd.clone(), link, members, clock).await?);
                if let Some(t) = &telemetry {
                    cluster.health.trace_with(Arc::clone(t));
                }
                cluster.join().await?;
                (
                    Some(cluster),
                    Some((rx, planner)),
                    Some(Arc::new(LeaseStats::default())),
                )
            }
            None => (None, None, None),
        };
        let rulebook = Arc::new(RuleBook::open(
            Arc::clone(&limiter),
            clock,
            store,
            config.config_path.as_deref(),
            config.rules.clone(),
            cluster.is_some(),
        )?);
        if let Some(cluster) = &cluster {
            // Rules from etcd are in force before the socket answers.
            match cluster.list_rules().await {
                Ok((specs, revision)) => rulebook.replace_etcd_layer(specs, revision),
                Err(e) => {
                    tracing::warn!("rules in etcd not loaded yet: {e}");
                    rulebook.apply_etcd_cache();
                }
            }
        }

        let bound = listener::bind(&config.socket, config.socket_mode)?;
        let shared = Arc::new(Shared {
            limiter,
            held_scan: report::HeldScan::default(),
            rulebook,
            metrics: Metrics::default(),
            clock,
            auth: Authorizer::new(config.admin_gid),
            max_frame: config.max_frame,
            idle_timeout: config.idle_timeout,
            write_timeout: config.write_timeout,
            slots: Arc::new(limits::Slots::new(
                config.max_connections,
                config.per_uid_connections(),
                config.connections_kept_for_admins(),
            )),
            answers: limits::AnswerBudget::new(config.answer_memory, conn::LARGEST_ANSWER),
            reports: tokio::sync::Semaphore::new(REPORTS_AT_ONCE),
            turns: turns::Turns::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            cluster,
            lease,
            telemetry,
            stopping: AtomicBool::new(false),
        });
        Ok(Daemon {
            shared,
            bound,
            socket: config.socket.clone(),
            config,
            lease_events,
            exporter,
        })
    }

    /// Where Prometheus metrics are served (with the port chosen for `:0`).
    pub fn metrics_addr(&self) -> Option<&exporter::MetricsAddr> {
        self.exporter.as_ref().map(exporter::Exporter::addr)
    }

    /// The socket path clients should use.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The shared state (for in-process tests and benchmarks).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `cancel` fires, then drains and cleans up. `reload` is
    /// notified on SIGHUP to re-read the config file's rules.
    pub async fn serve(self, cancel: CancellationToken, reload: Arc<Notify>) {
        let Daemon {
            shared,
            bound,
            config,
            socket,
            lease_events,
            exporter,
        } = self;
        let tracker = TaskTracker::new();
        let background = cancel.child_token();
        // Cluster tasks stop after the connections have drained, so leases
        // are returned last.
        let cluster_stop = CancellationToken::new();
        let mut cluster_tasks = Vec::new();
        if let (Some(cluster), Some((events, planner)), Some(stats)) =
            (&shared.cluster, lease_events, &shared.lease)
        {
            cluster_tasks.push(tokio::spawn(
                Arc::clone(cluster).run_membership(cluster_stop.clone()),
            ));
            cluster_tasks.push(tokio::spawn(
                Arc::clone(cluster)
                    .run_rules_watch(Arc::clone(&shared.rulebook), cluster_stop.clone()),
            ));
            let etcd = &cluster.config;
            let store = lease::store::Store::new(
                cluster.client(),
                &etcd.prefix,
                etcd.node_id.clone(),
                etcd.timeout,
                Arc::clone(&cluster.health),
                Arc::clone(stats),
                shared.telemetry.clone(),
            );
            let audit = match &config.audit_log {
                Some(path) => match lease::audit::AuditLog::open(path) {
                    Ok(log) => log,
                    Err(e) => {
                        tracing::error!(
                            "cannot open the audit log {}: {e}; auditing is off",
                            path.display()
                        );
                        lease::audit::AuditLog::disabled()
                    }
                },
                None => lease::audit::AuditLog::disabled(),
            };
            let coordinator = Coordinator::new(
                store,
                Arc::clone(&shared.limiter),
                lease::Wiring {
                    link: Arc::clone(&cluster.link),
                    health: Arc::clone(&cluster.health),
                    registration: Arc::clone(&cluster.registration),
                    stats: Arc::clone(stats),
                    clock: shared.clock,
                },
                events,
                planner,
                audit,
            );
            cluster_tasks.push(tokio::spawn(coordinator.run(cluster_stop.clone())));
        }
        let sweeper = tokio::spawn(sweeper::run(
            Arc::clone(&shared),
            config.sweep_interval,
            background.clone(),
        ));
        let reloader = tokio::spawn(reload_on_notify(
            Arc::clone(&shared),
            config.config_path.clone(),
            reload,
            background.clone(),
        ));
        tracing::info!(
            socket = %socket.display(),
            rules = shared.limiter.rules().len(),
            shards = shared.limiter.table().shard_count(),
            max_buckets = shared.limiter.table().max_buckets(),
            mode = if shared.cluster.is_some() { "etcd" } else { "standalone" },
            "rld {} serving",
            env!("CARGO_PKG_VERSION")
        );
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let watchdog = tokio::spawn(watchdog(Arc::clone(&shared), background.clone()));
        let exporter =
            exporter.map(|e| tokio::spawn(e.serve(Arc::clone(&shared), background.clone())));
        listener::accept_loop(
            bound.listener,
            Arc::clone(&shared),
            tracker.clone(),
            cancel.clone(),
        )
        .await;

        shared.stopping.store(true, Ordering::Relaxed);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracker.close();
        if tokio::time::timeout(config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "connections still open after the drain timeout; closing them"
            );
        }
        background.cancel();
        let _ = sweeper.await;
        let _ = reloader.await;
        let _ = watchdog.await;
        if let Some(exporter) = exporter {
            let _ = exporter.await;
        }
        cluster_stop.cancel();
        for task in cluster_tasks {
            let _ = task.await;
        }
        listener::remove_if_ours(bound.owned_path.as_deref(), bound.identity);
        if let Some(t) = shared.telemetry.clone() {
            // Export what is queued (blocking, bounded).
            let _ = tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(2))).await;
        }
        tracing::info!("rld stopped");
    }
}

/// File descriptors kept for everything but client connections (etcd,
/// state files, the listener, logs, the metrics endpoint's 16 scrape
/// connections and 16 refusals, the OTLP exporter).
const RESERVED_FDS: u64 = 100;

/// Raises the soft open-file limit to the hard one and returns how many
/// connections fit under it: `max_connections`, or fewer (with a warning)
/// so that new clients are refused with an answer instead of hanging on a
/// failing accept.
fn fit_connections_to_files(max_connections: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let fit = usize::try_from(soft.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX);
    if fit < max_connections {
        tracing::warn!(
            max_connections,
            open_files_limit = soft,
            "max_connections lowered to {fit} to fit the open-file limit; raise it (LimitNOFILE=, ulimit -n) for more"
        );
        fit
    } else {
        max_connections
    }
}

/// Makes glibc serve allocations of 32 KiB and more (a large frame or
/// answer) from their own mappings, returned to the system when freed. By
/// default glibc raises that threshold after the first such free, and then
/// keeps freed answer buffers resident for good (1 GB after 2,000 clients
/// with large answers had left).
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; glibc serialises it
    // with allocations.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 32 * 1024);
    }
}

/// Pings the systemd watchdog (`WatchdogSec=`) at half its interval, after
/// taking every shard lock once, so a wedged daemon gets restarted.
async fn watchdog(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _buckets = shared.limiter.table().len();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

/// Re-reads the config file's rules whenever `reload` is notified.
async fn reload_on_notify(
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    reload: Arc<Notify>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = reload.notified() => {}
        }
        let Some(path) = path.clone() else {
            tracing::info!("SIGHUP: no config file to reload");
            continue;
        };
        let book = Arc::clone(&shared.rulebook);
        let result = tokio::task::spawn_blocking(move || {
            let file = config::read_file(&path)?;
            let config = Config::from_file(file, Some(&path))?;
            book.reload_config(config.rules).map_err(DaemonError::from)
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!("SIGHUP: config rules reloaded"),
            Ok(Err(e)) => {
                tracing::error!("SIGHUP: reload refused, previous rules stay in force: {e}")
            }
            Err(e) => tracing::error!("SIGHUP: reload task failed: {e}"),
        }
    }
}

/// This host's name (the node id of traces without etcd, `host.name`).
pub(crate) fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "rld".into())
}

/// Starts and serves until SIGTERM/SIGINT (the `rld` binary's body).
///
/// # Errors
/// As [`Daemon::start`]; also if signal handlers cannot be installed.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    return_large_buffers_to_the_system();
    let cancel = CancellationToken::new();
    let reload = Arc::new(Notify::new());
    shutdown::install(cancel.clone(), Arc::clone(&reload)).map_err(DaemonError::Signals)?;
    let daemon = Daemon::start(config).await?;
    daemon.serve(cancel, reload).await;
    Ok(())
}

/// Validates a config (its rules as a whole included) without starting:
/// `rld --check-config`. Returns a one-line summary.
///
/// # Errors
/// The first problem found.
pub fn check_config(config: &Config) -> Result<String, DaemonError> {
    let limiter = Limiter::new(LimiterConfig {
        shards: 1,
        max_buckets: 1,
        max_table_bytes: config.max_table_bytes,
        default_action: config.default_action,
    });
    let specs = config
        .rules
        .iter()
        .map(|s| (s.clone(), crate::protocol::RuleSource::Config))
        .collect();
    limiter
        .check_rules(specs, 0)
        .map_err(|e| DaemonError::Rules(RuleBookError::Invalid(e)))?;
    // Standalone, the run-time rules in the state directory join the
    // config's at start: a clash there must fail here, not at start.
    let mut state_rules = 0;
    if config.etcd.is_none() {
        let runtime = StateStore::peek(&config.state_dir)?;
        state_rules = runtime.len();
        let path = config.state_dir.join(store::RULES_FILE);
        let specs = config
            .rules
            .iter()
            .map(|s| (s.clone(), crate::protocol::RuleSource::Config))
            .chain(
                runtime
                    .into_iter()
                    .map(|s| (s, crate::protocol::RuleSource::Runtime)),
            )
            .collect();
        limiter.check_rules(specs, 0).map_err(|e| {
            DaemonError::Rules(RuleBookError::CorruptState {
                path,
                message: format!(
                    "with the config's rules: {e} (rename the rule in one of the two files)"
                ),
            })
        })?;
    }
    if config.etcd.is_none()
        && let Some(g) = config
            .rules
            .iter()
            .find(|r| r.scope == crate::rule::Scope::Global)
    {
        return Err(RuleBookError::GlobalNeedsEtcd { id: g.id.clone() }.into());
    }
    let mode = match &config.etcd {
        Some(e) => format!("etcd {} as {}", e.endpoints.join(","), e.node_id),
        None => "standalone".into(),
    };
    Ok(format!(
        "config OK: {} ({} rules), socket {}, state dir {} ({state_rules} run-time rules), {mode}",
        config
            .config_path
            .as_deref()
            .map_or_else(|| "built-in defaults".into(), |p| p.display().to_string()),
        config.rules.len(),
        config.socket.display(),
        config.state_dir.display()
    ))
}
