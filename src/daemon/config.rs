//! Daemon configuration: command-line flags ([`Args`]), the TOML file
//! (`/etc/rld/rld.toml` by default, documented in `rld.toml(5)`), and the
//! resolved [`Config`] where flags override the file and defaults fill the rest.
//!
//! Parsing and checking only; nothing here opens sockets or starts tasks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use super::cluster::security::{EtcdSecurity, SecurityError};
use super::exporter::MetricsAddr;
use super::limiter::DefaultAction;
use super::telemetry::TraceConfig;
use crate::protocol::{DEFAULT_MAX_FRAME, daemon_socket_path};
use crate::rule::file::{RuleEntry, RuleFileError, specs_from_entries};
use crate::rule::{OnFailure, RuleSpec, parse_duration};

/// The config file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rld/rld.toml";

/// `rld`: the rate limiter daemon.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "rld",
    version,
    about = "Rate limiter daemon: answers \"may client C use resource R now?\" over a Unix socket",
    long_about = "Rate limiter daemon. Local applications connect to its Unix socket and ask \
whether a client may use a resource now; rld answers from memory in microseconds using \
token buckets configured by rules. Rules come from the config file and from `rlctl rules set` \
(persisted in the state directory; with --etcd, stored in etcd and shared, as are the limits of \
global rules). See rld.toml(5) for the file format, rlctl(1) for the CLI and rld-protocol(7) \
for the wire protocol."
)]
pub struct Args {
    /// Config file (TOML). Default: /etc/rld/rld.toml if it exists, else built-in defaults.
    #[arg(long, short = 'c', value_name = "FILE", env = "RLD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Unix socket to listen on. Default: /run/rld/rld.sock as root, else
    /// $XDG_RUNTIME_DIR/rld.sock.
    #[arg(long, short = 's', value_name = "PATH", env = "RLD_SOCKET")]
    pub socket: Option<PathBuf>,

    /// Directory where rules set at run time are persisted. Default:
    /// /var/lib/rld as root, else $XDG_STATE_HOME/rld (~/.local/state/rld).
    #[arg(long, value_name = "DIR", env = "RLD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Answer for requests no rule matches.
    #[arg(long, value_name = "ACTION", value_parser = ["allow", "deny"])]
    pub default_action: Option<String>,

    /// Hard cap on the number of buckets held in memory.
    #[arg(long, value_name = "N")]
    pub max_buckets: Option<usize>,

    /// Maximum simultaneous client connections.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Group (name or gid) whose members may change rules, besides root and
    /// the daemon's own user.
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,

    /// etcd endpoints (comma-separated) to share global limits and rules with
    /// other daemons, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379.
    /// Without it rld runs standalone.
    #[arg(long, value_name = "URLS", value_delimiter = ',', env = "RLD_ETCD")]
    pub etcd: Vec<String>,

    /// Key prefix of this deployment in etcd.
    #[arg(long, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,

    /// This daemon's name among the daemons sharing etcd (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, value_name = "FILTER", env = "RLD_LOG", default_value = "info")]
    pub log_level: String,

    /// Check the config file and its rules, print a summary, and exit.
    #[arg(long)]
    pub check_config: bool,

    /// Serve Prometheus metrics (GET /metrics) on ADDR: an IP address with a
    /// port (127.0.0.1:9464) or an absolute Unix socket path. Off by default.
    #[arg(long, value_name = "ADDR", env = "RLD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Export traces over OTLP/gRPC to URL (e.g. http://127.0.0.1:4317).
    /// Off by default.
    #[arg(long, value_name = "URL", env = "RLD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share (0 to 1) of decisions without a client trace context that are
    /// traced (default 0.01); a client's sampled traceparent is always followed.
    #[arg(long, value_name = "RATIO")]
    pub trace_sample_ratio: Option<f64>,

    /// Append one JSON line per write of this daemon's shares and, every
    /// 100 ms, the requests admitted per global rule to FILE (checked by
    /// `rlctl audit`; off by default).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,

    /// How often one daemon (chosen through etcd) compacts etcd's history,
    /// keeping one interval of it (default 5m; 0s: never, the operator
    /// compacts).
    #[arg(long, value_name = "DURATION")]
    pub etcd_compact_interval: Option<String>,
}

/// Sections of `rld(8)` beyond the options (appended to the generated page).
pub const MAN_EXTRA: &str = r#".SH EXIT STATUS
.TP
0
Stopped cleanly (SIGTERM or SIGINT), or --check-config found no problem.
.TP
1
Failed at run time: the socket is in use by another rld, the state directory
is locked or unwritable, persisted rules are invalid.
.TP
2
Bad command line or configuration.
.SH SIGNALS
.TP
SIGTERM, SIGINT
Stop accepting, answer every request already received, remove the socket, exit.
.TP
SIGHUP
Re-read the rules of the config file; if they are invalid the previous rules
stay in force and the error is logged.
.SH FILES
.TP
/etc/rld/rld.toml
Configuration, see rld.toml(5).
.TP
/run/rld/rld.sock
Default socket (root); $XDG_RUNTIME_DIR/rld.sock for other users.
.TP
/var/lib/rld/rules.toml
Rules set at run time (rlctl rules set), written atomically.
.SH SYSTEMD
The daemon supports Type=notify (READY=1 once the socket is bound and rules
are loaded), the watchdog (WatchdogSec=) and socket activation (rld.socket).
Units are shipped in dist/systemd.
.SH SEE ALSO
rlctl(1), rld.toml(5), rld-protocol(7)
"#;

/// The TOML config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub socket: Option<PathBuf>,
    /// Octal string, like "0660".
    pub socket_mode: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub default_action: Option<DefaultAction>,
    pub max_buckets: Option<usize>,
    /// Bytes.
    pub max_table_bytes: Option<usize>,
    pub shards: Option<usize>,
    pub max_frame: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_uid: Option<usize>,
    pub admin_connections: Option<usize>,
    pub idle_timeout: Option<String>,
    pub write_timeout: Option<String>,
    /// Bytes.
    pub answer_memory: Option<usize>,
    /// Lease audit log file (etcd mode).
    pub audit_log: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`127.0.0.1:9464`, `/run/rld/metrics.sock`).
    pub metrics_listen: Option<String>,
    /// OTLP/gRPC collector for traces.
    pub otlp_endpoint: Option<String>,
    /// gRPC metadata sent with every export.
    #[serde(default)]
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// Deadline of one export.
    pub otlp_timeout: Option<String>,
    /// Share of decisions without a client trace context that are traced.
    pub trace_sample_ratio: Option<f64>,
    pub drain_timeout: Option<String>,
    pub sweep_interval: Option<String>,
    pub admin_group: Option<String>,
    /// etcd endpoints; none means standalone.
    #[serde(default)]
    pub etcd: Vec<String>,
    pub etcd_prefix: Option<String>,
    pub node_id: Option<String>,
    /// Deadline of each etcd call.
    pub etcd_timeout: Option<String>,
    /// TLS and authentication towards etcd (see `EtcdSecurity`).
    pub etcd_tls_ca: Option<PathBuf>,
    pub etcd_tls_cert: Option<PathBuf>,
    pub etcd_tls_key: Option<PathBuf>,
    pub etcd_tls_domain: Option<String>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    /// Ignored since v2 leases (shares do not use wall clocks); accepted so
    /// older config files still load.
    pub max_clock_skew: Option<String>,
    /// How often the compactor daemon compacts etcd's history ("0s": never).
    pub etcd_compact_interval: Option<String>,
    /// `on_failure` of global rules that set none.
    pub default_on_failure: Option<OnFailure>,
    /// Extra fraction for the default fallback limit: limit x (1 + slack) / N.
    pub fallback_slack: Option<f64>,
    /// Global buckets per rule this daemon leases for at once.
    pub max_buckets_per_rule: Option<usize>,
    #[serde(rename = "rule", default)]
    pub rules: Vec<RuleEntry>,
}

/// How this daemon shares limits through etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash (`/rld`).
    pub prefix: String,
    pub node_id: String,
    /// Deadline of each etcd call. A call past it counts as failed (two in
    /// a row make the cluster SUSPECT); shares stay in force until their
    /// own deadline, so a slow etcd changes no decision.
    pub timeout: Duration,
    /// Set in the config file though no longer used (warned about at start).
    pub max_clock_skew: Option<Duration>,
    /// How often one daemon (chosen through etcd) compacts etcd's history,
    /// keeping one period of it; zero: never (the operator compacts).
    pub compact_every: Duration,
    pub default_on_failure: OnFailure,
    pub fallback_slack: f64,
    /// Global buckets per rule this daemon leases for; requests on further
    /// new buckets are denied until idle ones are forgotten (60 s unused).
    pub max_buckets_per_rule: usize,
    /// TLS and authentication towards etcd.
    pub security: EtcdSecurity,
}

fn metrics_addr(field: &'static str, text: &str) -> Result<MetricsAddr, ConfigError> {
    text.parse()
        .map_err(|message| ConfigError::Value { field, message })
}

/// Largest `max_buckets`.
pub const MAX_BUCKETS: usize = 1_000_000_000;
/// Largest `shards`.
pub const MAX_SHARDS: usize = 65_536;
/// Largest `max_connections`.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// Smallest and largest `max_table_bytes`.
pub const MIN_TABLE_BYTES: usize = 1024 * 1024;
pub const MAX_TABLE_BYTES: usize = 1024 * 1024 * 1024 * 1024;
/// Smallest and largest `answer_memory`.
pub const MIN_ANSWER_MEMORY: usize = 16 * 1024 * 1024;
pub const MAX_ANSWER_MEMORY: usize = 64 * 1024 * 1024 * 1024;
const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);

/// Largest `max_buckets_per_rule`.
pub const MAX_BUCKETS_PER_RULE_LIMIT: usize = 10_000_000;

/// Everything the daemon needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file read, if any (reloaded on SIGHUP).
    pub config_path: Option<PathBuf>,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub state_dir: PathBuf,
    pub default_action: DefaultAction,
    pub max_buckets: usize,
    /// Cap on the bucket table's memory (default: a quarter of physical memory).
    pub max_table_bytes: usize,
    pub shards: usize,
    pub max_frame: usize,
    pub max_connections: usize,
    /// Connections one non-admin uid may hold (`None`: an eighth of
    /// `max_connections`).
    pub max_connections_per_uid: Option<usize>,
    /// Of `max_connections`, how many only admins may take (`None`: 16, or
    /// a quarter of `max_connections` when that is fewer).
    pub admin_connections: Option<usize>,
    /// Close connections that complete no request for this long (`None`:
    /// never). Bytes that do not complete a frame do not count.
    pub idle_timeout: Option<Duration>,
    /// Close connections that do not read their answers for this long.
    pub write_timeout: Duration,
    /// Bytes all connections together may hold for large answers.
    pub answer_memory: usize,
    /// How long shutdown waits for connections to finish.
    pub drain_timeout: Duration,
    /// How often the sweeper visits every shard.
    pub sweep_interval: Duration,
    pub admin_gid: Option<u32>,
    /// Rules of the config file (the per-host layer).
    pub rules: Vec<RuleSpec>,
    /// `None`: standalone.
    pub etcd: Option<EtcdConfig>,
    /// The lease audit log (etcd mode), if any.
    pub audit_log: Option<PathBuf>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics_listen: Option<MetricsAddr>,
    /// Where and how much to trace, if at all.
    pub trace: Option<TraceConfig>,
}

/// Default share of decisions without a client trace context traced.
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.01;
/// Default deadline of one span export.
pub const DEFAULT_OTLP_TIMEOUT: Duration = Duration::from_secs(10);

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {source}")]
    Rules {
        path: PathBuf,
        source: RuleFileError,
    },
    #[error("{field}: {message}")]
    Value {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    EtcdSecurity(#[from] SecurityError),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            config_path: None,
            socket: daemon_socket_path(),
            socket_mode: 0o660,
            state_dir: default_state_dir(),
            default_action: DefaultAction::Allow,
            max_buckets: 1_000_000,
            max_table_bytes: default_table_bytes(),
            shards: default_shards(),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 4096,
            max_connections_per_uid: None,
            admin_connections: None,
            idle_timeout: Some(Duration::from_secs(600)),
            write_timeout: Duration::from_secs(10),
            answer_memory: 256 * 1024 * 1024,
            drain_timeout: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(1),
            admin_gid: None,
            rules: Vec::new(),
            etcd: None,
            audit_log: None,
            metrics_listen: None,
            trace: None,
        }
    }
}

impl Config {
    /// Connections one non-admin uid may hold.
    pub fn per_uid_connections(&self) -> usize {
        self.max_connections_per_uid
            .unwrap_or((self.max_connections / 8).max(1))
            .min(self.max_connections)
    }

    /// Of `max_connections`, how many only admins may take.
    pub fn connections_kept_for_admins(&self) -> usize {
        self.admin_connections
            .unwrap_or((self.max_connections / 4).min(16))
            .min(self.max_connections - 1)
    }

    /// Resolves flags, the config file and defaults.
    ///
    /// # Errors
    /// Unreadable or invalid config file, invalid values, unknown admin group.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let path = match &args.config {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let mut file = match &path {
            Some(p) => read_file(p)?,
            None => ConfigFile::default(),
        };
        if !args.etcd.is_empty() {
            // The flag's endpoints, with every other etcd key of the file
            // (prefix, TLS, user...).
            file.etcd = args.etcd.clone();
        }
        if let Some(endpoint) = &args.otlp_endpoint {
            // Likewise: the flag's (or RLD_OTLP_ENDPOINT's) collector with
            // the file's trace settings.
            file.otlp_endpoint = Some(endpoint.clone());
        }
        if let Some(every) = &args.etcd_compact_interval {
            file.etcd_compact_interval = Some(every.clone());
        }
        let mut config = Config::from_file(file, path.as_deref())?;
        config.config_path = path;
        if let Some(s) = &args.socket {
            config.socket = s.clone();
        }
        if let Some(d) = &args.state_dir {
            config.state_dir = d.clone();
        }
        if let Some(f) = &args.audit_log {
            config.audit_log = Some(f.clone());
        }
        if let Some(a) = &args.metrics_listen {
            config.metrics_listen = Some(metrics_addr("--metrics-listen", a)?);
        }
        if let Some(r) = args.trace_sample_ratio {
            match config.trace.as_mut() {
                Some(t) => t.sample_ratio = r,
                None => {
                    return Err(ConfigError::Value {
                        field: "--trace-sample-ratio",
                        message: "needs --otlp-endpoint (or otlp_endpoint in the config file)"
                            .into(),
                    });
                }
            }
        }
        if let Some(a) = &args.default_action {
            config.default_action = if a == "deny" {
                DefaultAction::Deny
            } else {
                DefaultAction::Allow
            };
        }
        if let Some(n) = args.max_buckets {
            config.max_buckets = n;
        }
        if let Some(n) = args.max_connections {
            config.max_connections = n;
        }
        if let Some(g) = &args.admin_group {
            config.admin_gid = Some(resolve_group(g)?);
        }
        if let Some(etcd) = config.etcd.as_mut() {
            if let Some(p) = &args.etcd_prefix {
                etcd.prefix = normalize_prefix(p)?;
            }
            if let Some(n) = &args.node_id {
                etcd.node_id = n.clone();
            }
        } else if args.etcd_prefix.is_some() || args.node_id.is_some() {
            return Err(ConfigError::Value {
                field: "etcd",
                message: "--etcd-prefix and --node-id need --etcd (or etcd in the config file)"
                    .into(),
            });
        }
        config.check()?;
        Ok(config)
    }

    /// Applies a parsed file over the defaults.
    ///
    /// # Errors
    /// Invalid values or rules.
    pub fn from_file(file: ConfigFile, path: Option<&Path>) -> Result<Config, ConfigError> {
        let d = Config::default();
        let duration = |field, v: Option<String>, default| match v {
            Some(text) => {
                parse_duration(&text).map_err(|message| ConfigError::Value { field, message })
            }
            None => Ok(default),
        };
        let path_buf = path.map_or_else(|| PathBuf::from("<built-in>"), Path::to_owned);
        let rules = specs_from_entries(&file.rules).map_err(|source| ConfigError::Rules {
            path: path_buf.clone(),
            source,
        })?;
        if let Some(r) = rules.iter().find(|r| r.expire_idle.is_some()) {
            return Err(ConfigError::Rules {
                path: path_buf,
                source: RuleFileError::Rule(crate::rule::RuleError {
                    id: r.id.clone(),
                    field: "expire_idle",
                    problem: "is only for rules set at run time (rlctl rules set --expire-idle); \
                              remove it from the config file"
                        .into(),
                }),
            });
        }
        let idle = duration("idle_timeout", file.idle_timeout, Duration::from_secs(600))?;
        let socket_mode = match file.socket_mode {
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| {
                ConfigError::Value {
                    field: "socket_mode",
                    message: format!("{m:?} is not an octal mode like \"0660\""),
                }
            })?,
            None => d.socket_mode,
        };
        Ok(Config {
            config_path: path.map(Path::to_owned),
            socket: file.socket.unwrap_or(d.socket),
            socket_mode,
            state_dir: file.state_dir.unwrap_or(d.state_dir),
            default_action: file.default_action.unwrap_or(d.default_action),
            max_buckets: file.max_buckets.unwrap_or(d.max_buckets),
            max_table_bytes: file.max_table_bytes.unwrap_or(d.max_table_bytes),
            shards: file.shards.filter(|&s| s != 0).unwrap_or(d.shards),
            max_frame: file.max_frame.unwrap_or(d.max_frame),
            max_connections: file.max_connections.unwrap_or(d.max_connections),
            max_connections_per_uid: file.max_connections_per_uid,
            admin_connections: file.admin_connections,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            write_timeout: duration("write_timeout", file.write_timeout, d.write_timeout)?,
            answer_memory: file.answer_memory.unwrap_or(d.answer_memory),
            drain_timeout: duration("drain_timeout", file.drain_timeout, d.drain_timeout)?,
            sweep_interval: duration("sweep_interval", file.sweep_interval, d.sweep_interval)?,
            admin_gid: file.admin_group.as_deref().map(resolve_group).transpose()?,
            etcd: if file.etcd.is_empty() {
                None
            } else {
                let mut e = EtcdConfig::defaults(file.etcd);
                if let Some(p) = &file.etcd_prefix {
                    e.prefix = normalize_prefix(p)?;
                }
                if let Some(n) = file.node_id {
                    e.node_id = n;
                }
                e.timeout = duration("etcd_timeout", file.etcd_timeout, e.timeout)?;
                e.max_clock_skew = file
                    .max_clock_skew
                    .map(|v| duration("max_clock_skew", Some(v), Duration::ZERO))
                    .transpose()?;
                e.compact_every = duration(
                    "etcd_compact_interval",
                    file.etcd_compact_interval,
                    e.compact_every,
                )?;
                if let Some(p) = file.default_on_failure {
                    e.default_on_failure = p;
                }
                if let Some(s) = file.fallback_slack {
                    e.fallback_slack = s;
                }
                if let Some(n) = file.max_buckets_per_rule {
                    e.max_buckets_per_rule = n;
                }
                e.security = EtcdSecurity {
                    tls_ca: file.etcd_tls_ca,
                    tls_cert: file.etcd_tls_cert,
                    tls_key: file.etcd_tls_key,
                    tls_domain: file.etcd_tls_domain,
                    user: file.etcd_user,
                    password_file: file.etcd_password_file,
                };
                Some(e)
            },
            rules,
            audit_log: file.audit_log,
            metrics_listen: file
                .metrics_listen
                .as_deref()
                .map(|a| metrics_addr("metrics_listen", a))
                .transpose()?,
            trace: match file.otlp_endpoint {
                Some(endpoint) => Some(TraceConfig {
                    endpoint,
                    sample_ratio: file
                        .trace_sample_ratio
                        .unwrap_or(DEFAULT_TRACE_SAMPLE_RATIO),
                    headers: file.otlp_headers.into_iter().collect(),
                    timeout: duration("otlp_timeout", file.otlp_timeout, DEFAULT_OTLP_TIMEOUT)?,
                }),
                None if file.trace_sample_ratio.is_some()
                    || !file.otlp_headers.is_empty()
                    || file.otlp_timeout.is_some() =>
                {
                    return Err(ConfigError::Value {
                        field: "otlp_endpoint",
                        message: "trace_sample_ratio, otlp_headers and otlp_timeout need \
                                  otlp_endpoint"
                            .into(),
                    });
                }
                None => None,
            },
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| {
            Err(ConfigError::Value {
                field,
                message: message.into(),
            })
        };
        for (field, value, max) in [
            ("max_buckets", self.max_buckets, MAX_BUCKETS),
            ("shards", self.shards, MAX_SHARDS),
            ("max_connections", self.max_connections, MAX_CONNECTIONS),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::Value {
                    field,
                    message: format!("is {value}; it must be between 1 and {max}"),
                });
            }
        }
        if let Some(n) = self.max_connections_per_uid
            && !(1..=self.max_connections).contains(&n)
        {
            return bad(
                "max_connections_per_uid",
                "must be between 1 and max_connections",
            );
        }
        if self
            .admin_connections
            .is_some_and(|n| n >= self.max_connections)
        {
            return bad(
                "admin_connections",
                "must be below max_connections (others need a slot too)",
            );
        }
        if !(64..=16 * 1024 * 1024).contains(&self.max_frame) {
            return bad("max_frame", "must be between 64 bytes and 16 MiB");
        }
        if !(MIN_TABLE_BYTES..=MAX_TABLE_BYTES).contains(&self.max_table_bytes) {
            return bad(
                "max_table_bytes",
                "must be between 1 MiB and 1 TiB (in bytes)",
            );
        }
        if !(MIN_ANSWER_MEMORY..=MAX_ANSWER_MEMORY).contains(&self.answer_memory) {
            return bad(
                "answer_memory",
                "must be between 16 MiB and 64 GiB (in bytes)",
            );
        }
        if self.socket_mode & !0o777 != 0 {
            return bad("socket_mode", "must be a permission mode like \"0660\"");
        }
        for (field, value, min, max) in [
            ("sweep_interval", Some(self.sweep_interval), MS * 10, HOUR),
            ("idle_timeout", self.idle_timeout, MS * 100, 7 * 24 * HOUR),
            ("write_timeout", Some(self.write_timeout), MS * 100, HOUR),
            (
                "drain_timeout",
                Some(self.drain_timeout),
                Duration::ZERO,
                HOUR,
            ),
        ] {
            if let Some(v) = value
                && !(min..=max).contains(&v)
            {
                return Err(ConfigError::Value {
                    field,
                    message: format!(
                        "is {}; it must be between {} and {}",
                        humantime::format_duration(v),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                });
            }
        }
        if let Some(e) = &self.etcd {
            if let Some(bad_url) = e
                .endpoints
                .iter()
                .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                return Err(ConfigError::Value {
                    field: "etcd",
                    message: format!(
                        "endpoint {bad_url:?} must be a URL like http://127.0.0.1:2379"
                    ),
                });
            }
            e.security
                .check(&e.endpoints)
                .map_err(ConfigError::EtcdSecurity)?;
            if let Err(problem) = crate::rule::validate_rule_id(&e.node_id) {
                return Err(ConfigError::Value {
                    field: "node_id",
                    message: problem,
                });
            }
            if !(MS * 10..=Duration::from_secs(60)).contains(&e.timeout) {
                return bad("etcd_timeout", "must be between 10ms and 1m");
            }
            if e.max_clock_skew
                .is_some_and(|d| d > Duration::from_secs(60))
            {
                return bad("max_clock_skew", "must be at most 1m");
            }
            if !e.compact_every.is_zero() && e.compact_every < Duration::from_secs(10) {
                return bad(
                    "etcd_compact_interval",
                    "must be 0s (never) or at least 10s",
                );
            }
            if !(0.0..=10.0).contains(&e.fallback_slack) {
                return bad("fallback_slack", "must be between 0.0 and 10.0");
            }
            if !(1..=MAX_BUCKETS_PER_RULE_LIMIT).contains(&e.max_buckets_per_rule) {
                return bad("max_buckets_per_rule", "must be between 1 and 10000000");
            }
        }
        if let Some(t) = &self.trace {
            if let Err(e) = super::telemetry::check_endpoint(&t.endpoint) {
                return Err(ConfigError::Value {
                    field: "otlp_endpoint",
                    message: e.to_string(),
                });
            }
            if !(0.0..=1.0).contains(&t.sample_ratio) {
                return bad("trace_sample_ratio", "must be between 0.0 and 1.0");
            }
            if !(MS * 100..=Duration::from_secs(60)).contains(&t.timeout) {
                return bad("otlp_timeout", "must be between 100ms and 1m");
            }
        }
        Ok(())
    }
}

/// Reads and parses a config file.
///
/// # Errors
/// Unreadable file or TOML errors (with line and column).
pub fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

impl EtcdConfig {
    /// Defaults for the given endpoints.
    pub fn defaults(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/rld".into(),
            node_id: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "rld".into()),
            timeout: Duration::from_secs(2),
            max_clock_skew: None,
            compact_every: Duration::from_secs(300),
            default_on_failure: OnFailure::Local,
            fallback_slack: 0.1,
            max_buckets_per_rule: 100_000,
            security: EtcdSecurity::default(),
        }
    }
}

fn normalize_prefix(p: &str) -> Result<String, ConfigError> {
    let trimmed = p.trim_end_matches('/');
    if !trimmed.starts_with('/') || trimmed.len() < 2 {
        return Err(ConfigError::Value {
            field: "etcd_prefix",
            message: format!("{p:?} must start with '/' and name something, like \"/rld\""),
        });
    }
    Ok(trimmed.to_owned())
}

/// A quarter of physical memory (1 GiB when it cannot be read), within
/// [`MIN_TABLE_BYTES`]..=[`MAX_TABLE_BYTES`].
pub fn default_table_bytes() -> usize {
    use nix::unistd::{SysconfVar, sysconf};
    let pages = sysconf(SysconfVar::_PHYS_PAGES).ok().flatten();
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten();
    match (pages, page) {
        (Some(pages), Some(page)) => {
            usize::try_from(pages)
                .unwrap_or(0)
                .saturating_mul(usize::try_from(page).unwrap_or(0))
                / 4
        }
        _ => 1 << 30,
    }
    .clamp(MIN_TABLE_BYTES, MAX_TABLE_BYTES)
}

/// `4 x cores x 16` shards: enough that two cores rarely meet on one lock.
pub fn default_shards() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    (4 * cores * 16).next_power_of_two()
}

/// `$STATE_DIRECTORY` under systemd (`StateDirectory=rld`), else
/// `/var/lib/rld` for root, else `$XDG_STATE_HOME/rld` or `~/.local/state/rld`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = crate::protocol::systemd_directory("STATE_DIRECTORY") {
        return dir;
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/rld");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rld");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/rld"),
        None => PathBuf::from(format!("/tmp/rld-{}/state", nix::unistd::geteuid())),
    }
}

fn resolve_group(name: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(ConfigError::Value {
            field: "admin_group",
            message: format!("no group named {name:?}; create it or give a gid"),
        }),
        Err(e) => Err(ConfigError::Value {
            field: "admin_group",
            message: format!("cannot look up group {name:?}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_apply_and_unknown_keys_fail() {
        let file: ConfigFile = toml::from_str(
            "socket = '/tmp/x.sock'\ndefault_action = 'deny'\nmax_buckets = 10\nidle_timeout = '0s'\n\
             [[rule]]\nid='a'\nclient='*'\nresource='*'\nlimit=5\nwindow='1s'\n",
        )
        .unwrap();
        let c = Config::from_file(file, None).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.default_action, DefaultAction::Deny);
        assert_eq!(c.max_buckets, 10);
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.rules.len(), 1);
        assert!(toml::from_str::<ConfigFile>("sockt = 'x'").is_err());
    }

    #[test]
    fn config_rules_may_not_expire() {
        let file: ConfigFile = toml::from_str(
            "[[rule]]\nid='a'\nclient='*'\nresource='*'\nlimit=5\nwindow='1s'\nexpire_idle='1h'\n",
        )
        .unwrap();
        let e = Config::from_file(file, None).unwrap_err();
        assert!(e.to_string().contains("expire_idle"), "{e}");
    }

    #[test]
    fn the_files_trace_settings_go_with_an_endpoint_given_on_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rld.toml");
        std::fs::write(
            &path,
            "trace_sample_ratio = 0.5\notlp_headers = { authorization = \"Bearer x\" }\n",
        )
        .unwrap();
        let config_arg = path.to_str().unwrap();
        let args = Args::parse_from(["rld", "--config", config_arg]);
        let e = Config::load(&args).unwrap_err().to_string();
        assert!(e.contains("otlp_endpoint"), "{e}");
        let args = Args::parse_from([
            "rld",
            "--config",
            config_arg,
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
        ]);
        let t = Config::load(&args).unwrap().trace.unwrap();
        assert_eq!(t.endpoint, "http://127.0.0.1:4317");
        assert_eq!(t.sample_ratio, 0.5);
        assert_eq!(t.headers, vec![("authorization".into(), "Bearer x".into())]);
        assert_eq!(t.timeout, DEFAULT_OTLP_TIMEOUT);
    }

    /// Every count and duration has a documented maximum and is refused
    /// beyond it with the key's name, never accepted and wrapped.
    #[test]
    fn values_beyond_their_maximum_are_refused() {
        let cases = [
            ("max_buckets = 1000000001", "max_buckets"),
            ("shards = 65537", "shards"),
            ("max_connections = 1000001", "max_connections"),
            (
                "max_connections = 8\nmax_connections_per_uid = 9",
                "max_connections_per_uid",
            ),
            (
                "max_connections = 8\nadmin_connections = 8",
                "admin_connections",
            ),
            ("max_frame = 16777217", "max_frame"),
            ("answer_memory = 1024", "answer_memory"),
            ("max_table_bytes = 1024", "max_table_bytes"),
            ("idle_timeout = '8d'", "idle_timeout"),
            ("idle_timeout = '600y'", "idle_timeout"),
            ("write_timeout = '2h'", "write_timeout"),
            ("drain_timeout = '2h'", "drain_timeout"),
            ("sweep_interval = '1ms'", "sweep_interval"),
            ("etcd = ['http://a:1']\netcd_timeout = '2m'", "etcd_timeout"),
            (
                "etcd = ['http://a:1']\nmax_clock_skew = '2m'",
                "max_clock_skew",
            ),
        ];
        for (text, key) in cases {
            let file: ConfigFile = toml::from_str(text).unwrap();
            let e = Config::from_file(file, None)
                .and_then(|c| c.check().map(|()| c))
                .expect_err(text);
            assert!(e.to_string().starts_with(key), "{text}: {e}");
        }
        let file: ConfigFile = toml::from_str("idle_timeout = '7d'\nmax_connections = 8").unwrap();
        let c = Config::from_file(file, None).unwrap();
        c.check().expect("the maxima themselves are fine");
        assert_eq!(
            (c.per_uid_connections(), c.connections_kept_for_admins()),
            (1, 2)
        );
    }

    /// Endpoints from `--etcd` keep the file's other etcd keys.
    #[test]
    fn etcd_flag_endpoints_keep_the_files_etcd_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rld.toml");
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "pw\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::write(
            &path,
            format!(
                "etcd_prefix = '/team'\netcd_timeout = '2s'\netcd_user = 'rld'\n\
                 etcd_password_file = {:?}\n",
                secret.to_str().unwrap()
            ),
        )
        .unwrap();
        let args = Args::parse_from([
            "rld",
            "--config",
            path.to_str().unwrap(),
            "--etcd",
            "http://127.0.0.1:2379",
        ]);
        let e = Config::load(&args).unwrap().etcd.unwrap();
        assert_eq!(e.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(e.prefix, "/team");
        assert_eq!(e.timeout, Duration::from_secs(2));
        assert_eq!(e.security.user.as_deref(), Some("rld"));
    }
}
