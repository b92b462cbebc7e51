//! The `rld` daemon: wiring and lifecycle.
//!
//! [`Daemon::start`] loads rules (config layer + persisted run-time layer) and
//! binds the socket; [`Daemon::serve`] runs the accept loop, the sweeper and
//! the SIGHUP reloader until the token is cancelled, then drains: stop
//! accepting, let connections answer what they have read, stop the sweeper,
//! remove the socket file.
//!
//! Submodules: [`config`] (flags and TOML), [`listener`] (socket, accept,
//! connection cap), [`conn`] (one connection), [`limiter`] (the decision core),
//! [`rulebook`] (rule layers and persistence), [`sweeper`] (eviction timer),
//! [`metrics`], [`auth`] (peer credentials), [`shutdown`] (signals).

pub mod auth;
pub mod config;
pub mod conn;
pub mod limiter;
pub mod listener;
pub mod metrics;
pub mod rulebook;
pub mod shutdown;
pub mod sweeper;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

use auth::Authorizer;
use limiter::{Limiter, LimiterConfig, MonotonicClock};
use listener::{BindError, Bound};
use metrics::Metrics;
use rulebook::{RuleBook, RuleBookError, StateStore};

use crate::protocol::{HealthReport, ServingState, StatsReport};

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
}

/// State shared by every connection and background task.
#[derive(Debug)]
pub struct Shared {
    pub limiter: Arc<Limiter>,
    pub rulebook: Arc<RuleBook>,
    pub metrics: Metrics,
    pub clock: MonotonicClock,
    pub auth: Authorizer,
    pub max_frame: usize,
    pub idle_timeout: Option<Duration>,
    stopping: AtomicBool,
}

impl Shared {
    /// Counters, gauges and latency for `Stats`.
    pub fn stats(&self) -> StatsReport {
        let per_rule = self.limiter.rule_counters();
        let sum = |f: fn(&crate::protocol::RuleCounters) -> u64| per_rule.iter().map(f).sum();
        let m = &self.metrics;
        let table = self.limiter.table();
        let unmatched = self.limiter.unmatched_total();
        StatsReport {
            uptime_ns: self.clock.now_ns(),
            allowed: sum(|r| r.allowed),
            rejected: sum(|r| r.rejected),
            bypassed: sum(|r| r.bypassed),
            unmatched,
            buckets: table.len() as u64,
            max_buckets: table.max_buckets() as u64,
            evicted_idle: Metrics::get(&table.evictions.idle),
            evicted_lru: Metrics::get(&table.evictions.lru),
            rules: per_rule.len() as u64,
            rules_expired: Metrics::get(&m.rules_expired),
            connections_open: Metrics::get(&m.connections_open),
            connections_total: Metrics::get(&m.connections_total),
            connections_rejected: Metrics::get(&m.connections_rejected),
            protocol_errors: Metrics::get(&m.protocol_errors),
            latency: m.latency.summary(),
            per_rule,
        }
    }

    /// Serving state for `Health`.
    pub fn health(&self) -> HealthReport {
        HealthReport {
            state: if self.stopping.load(Ordering::Relaxed) {
                ServingState::Stopping
            } else {
                ServingState::Ok
            },
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ns: self.clock.now_ns(),
            rules: self.limiter.rules().len() as u64,
            mode: "standalone".into(),
        }
    }

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
}

impl Daemon {
    /// Loads state and rules and binds the socket. Must run inside a Tokio
    /// runtime.
    ///
    /// # Errors
    /// Unusable state directory, invalid persisted rules, or a socket that is
    /// in use or cannot be bound.
    pub fn start(config: Config) -> Result<Daemon, DaemonError> {
        let clock = MonotonicClock::new();
        let limiter = Arc::new(Limiter::new(LimiterConfig {
            shards: config.shards,
            max_buckets: config.max_buckets,
            default_action: config.default_action,
        }));
        let store = StateStore::open(&config.state_dir)?;
        let rulebook = Arc::new(RuleBook::open(
            Arc::clone(&limiter),
            clock,
            store,
            config.config_path.as_deref(),
            config.rules.clone(),
            false,
        )?);
        let bound = listener::bind(&config.socket, config.socket_mode)?;
        let shared = Arc::new(Shared {
            limiter,
            rulebook,
            metrics: Metrics::default(),
            clock,
            auth: Authorizer::new(config.admin_gid),
            max_frame: config.max_frame,
            idle_timeout: config.idle_timeout,
            stopping: AtomicBool::new(false),
        });
        Ok(Daemon {
            shared,
            bound,
            socket: config.socket.clone(),
            config,
        })
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
        } = self;
        let tracker = TaskTracker::new();
        let background = cancel.child_token();
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
            "rld {} serving (standalone)",
            env!("CARGO_PKG_VERSION")
        );
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let watchdog = tokio::spawn(watchdog(Arc::clone(&shared), background.clone()));
        listener::accept_loop(
            bound.listener,
            Arc::clone(&shared),
            config.max_connections,
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
        if let Some(path) = bound.owned_path {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("could not remove socket {}: {e}", path.display());
            }
        }
        tracing::info!("rld stopped");
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

/// Starts and serves until SIGTERM/SIGINT (the `rld` binary's body).
///
/// # Errors
/// As [`Daemon::start`]; also if signal handlers cannot be installed.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let cancel = CancellationToken::new();
    let reload = Arc::new(Notify::new());
    shutdown::install(cancel.clone(), Arc::clone(&reload)).map_err(DaemonError::Signals)?;
    let daemon = Daemon::start(config)?;
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
    if let Some(g) = config
        .rules
        .iter()
        .find(|r| r.scope == crate::rule::Scope::Global)
    {
        return Err(RuleBookError::GlobalNeedsEtcd { id: g.id.clone() }.into());
    }
    Ok(format!(
        "config OK: {} ({} rules), socket {}, state dir {}",
        config
            .config_path
            .as_deref()
            .map_or_else(|| "built-in defaults".into(), |p| p.display().to_string()),
        config.rules.len(),
        config.socket.display(),
        config.state_dir.display()
    ))
}
