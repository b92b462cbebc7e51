//! `rlctl`: the command-line client. Each subcommand maps to one request type
//! (`rules set` to `RuleSet`, `acquire` to `Acquire`, ...), prints a table or
//! `--json`, and exits with the documented status:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | ok / allowed |
//! | 1 | denied (rate limited) |
//! | 2 | usage or bad input (an invalid rule included) |
//! | 3 | daemon unreachable or failed |

mod acquire;
pub mod audit;
pub mod bench;
mod explain;
mod output;
mod rules;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::protocol::{ClientError, Connection, ErrorCode, Priority, client_socket_path};

pub use output::Output;

/// Sections of `rlctl(1)` beyond the options (appended to the generated page).
pub const MAN_EXTRA: &str = r#".SH EXIT STATUS
.TP
0
Success; for acquire and run, the request was allowed.
.TP
1
Denied: rate limited (acquire prints the retry-after time; run does not run
the command).
.TP
2
Usage error or bad input, an invalid rule included; also an unknown rule id
and a cost above the rule's burst.
.TP
3
The daemon is unreachable or failed (including permission denied for rule
changes).
.PP
rlctl run exits with the command's own status when it runs it; 75
(EX_TEMPFAIL, or \-\-denied\-exit N) when rate limited, without running it;
127 when the command is not found and 126 when it cannot be executed, both
checked before a token is taken.
.SH EXAMPLES
.EX
rlctl rules set api \-\-client '*' \-\-resource 'api/*' \-\-limit 100 \-\-window 1m
rlctl acquire alice api/search && curl ...
rlctl run \-\-client nightly \-\-resource backup \-\-wait \-\-timeout 1h \-\- ./backup.sh
rlctl stats \-\-watch
rlctl bench \-\-connections 16 \-\-pipeline 16 \-\-keys 100000
.EE
.SH ENVIRONMENT
.TP
RLD_SOCKET
The daemon's socket (same as \-\-socket).
.SH SEE ALSO
rld(8), rld.toml(5), rld-protocol(7)
"#;

/// `rlctl`: control and query the rld rate limiter.
#[derive(Debug, Parser)]
#[command(
    name = "rlctl",
    version,
    about = "Control and query the rld rate limiter",
    long_about = "Control and query the rld rate limiter over its Unix socket: manage rules, \
ask for decisions from shell scripts, read statistics, and generate load.\n\n\
Exit status: 0 ok or allowed, 1 denied (rate limited), 2 usage or bad input, \
3 daemon unreachable or failed."
)]
pub struct Args {
    /// The daemon's socket. Default: $XDG_RUNTIME_DIR/rld.sock if it exists
    /// (non-root), else /run/rld/rld.sock.
    #[arg(
        long,
        short = 's',
        global = true,
        value_name = "PATH",
        env = "RLD_SOCKET"
    )]
    pub socket: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up after DURATION (exit 3): connecting and the answer; with
    /// --wait, the whole wait (exit 1 when it gives up on a rate limit).
    /// Default: 5s; with --wait, no limit (each request still 5s at most).
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub timeout: Option<Duration>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect and delete rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Ask for a decision: exit 0 if allowed, 1 if rate limited.
    Acquire(AcquireArgs),
    /// Acquire, then run a command; if denied the command is not run (exit
    /// 75, EX_TEMPFAIL; see --denied-exit).
    Run(RunArgs),
    /// Show which rules a request would meet, in which order, which are
    /// overridden and by what, each bucket's tokens, and whether it would be
    /// allowed, without spending anything.
    Explain(ExplainArgs),
    /// Show counters, bucket usage and decision latency.
    Stats(StatsArgs),
    /// Show whether the daemon is serving.
    Health,
    /// Generate load against the daemon and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Check daemons' lease audit logs (rld --audit-log) against etcd's
    /// history and the rule's bound: exit 0 if the ledger holds, 1 if not.
    Audit(audit::AuditArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    /// to standard output, e.g. `rlctl completions bash >
    /// /usr/share/bash-completion/completions/rlctl`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

// Parsed once per process; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Create or replace a rule.
    Set(RuleSetArgs),
    /// Show one rule with its counters.
    Get {
        /// Rule id.
        id: String,
    },
    /// List every rule in force.
    List,
    /// Delete a rule set at run time.
    Delete {
        /// Rule id.
        id: String,
    },
    /// Create or replace every rule of a TOML file of `[[rule]]` tables, all or none.
    Import {
        /// TOML file with `[[rule]]` tables (the config file format).
        file: PathBuf,
    },
}

/// Options of `rules set`.
#[derive(Debug, ClapArgs)]
pub struct RuleSetArgs {
    /// Rule id (unique; shown in every decision the rule makes).
    pub id: String,
    /// Client pattern: exact, prefix glob like "team-*", or "*".
    #[arg(long, value_name = "PATTERN")]
    pub client: String,
    /// Resource pattern: exact, prefix glob like "api/*", or "*".
    #[arg(long, value_name = "PATTERN")]
    pub resource: String,
    /// Tokens per window.
    #[arg(long, value_name = "N")]
    pub limit: u64,
    /// Window: 250ms, 30s, 1m, 2h, 1d.
    #[arg(long, value_name = "DURATION")]
    pub window: String,
    /// Bucket capacity (default: the limit).
    #[arg(long, value_name = "N")]
    pub burst: Option<u64>,
    /// Remove the rule after no request has matched it for this long (with
    /// etcd: on any daemon; it goes between that and 1.5 times that after
    /// the last match anywhere).
    #[arg(long, value_name = "DURATION")]
    pub expire_idle: Option<String>,
    /// Fraction of the bucket high-priority requests may not use (0.0 to <1.0).
    #[arg(long, value_name = "FRACTION")]
    pub reserve_high: Option<f64>,
    /// Fraction of the bucket normal-priority requests may not use.
    #[arg(long, value_name = "FRACTION")]
    pub reserve_normal: Option<f64>,
    /// Fraction of the bucket low-priority requests may not use.
    #[arg(long, value_name = "FRACTION")]
    pub reserve_low: Option<f64>,
    /// local: each host enforces the limit; global: all hosts share it (needs etcd).
    #[arg(long, value_name = "SCOPE", value_parser = ["local", "global"])]
    pub scope: Option<String>,
    /// Allowed over-admission of a global rule, like 2%/10s.
    #[arg(long, value_name = "ERROR/HORIZON")]
    pub accuracy: Option<String>,
    /// What a global rule does while etcd is unreachable.
    #[arg(long, value_name = "POLICY", value_parser = ["open", "closed", "local"])]
    pub on_failure: Option<String>,
    /// Per-host limit per window for --on-failure local.
    #[arg(long, value_name = "N")]
    pub fallback_limit: Option<u64>,
    /// What the rule's buckets are keyed by: client,resource (one bucket
    /// per pair, the default), client, resource, or none (one bucket for
    /// all it matches). Rules keyed alike override one another by
    /// specificity; rules keyed differently all apply.
    #[arg(long, value_name = "KEY")]
    pub per: Option<String>,
    /// Decide and count, but never deny nor charge the other rules (to
    /// roll a new limit out and watch what it would do).
    #[arg(long)]
    pub shadow: bool,
}

/// Options shared by `acquire` and `run`.
#[derive(Debug, ClapArgs)]
pub struct DecisionArgs {
    /// Tokens to take.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cost: u64,
    /// low, normal, high or critical (critical is never denied, but counted).
    #[arg(long, default_value = "normal", value_name = "PRIORITY")]
    pub priority: Priority,
    /// When rate limited, sleep for the retry-after time and try again
    /// (bounded by --timeout).
    #[arg(long)]
    pub wait: bool,
    /// W3C traceparent (00-<trace id>-<span id>-<flags>) to link this
    /// request to a trace; default: $TRACEPARENT if set (ignored with a
    /// warning when malformed).
    #[arg(long, value_name = "TRACEPARENT")]
    pub traceparent: Option<String>,
}

/// Options of `explain`.
#[derive(Debug, ClapArgs)]
pub struct ExplainArgs {
    /// Who would ask.
    pub client: String,
    /// What they would want to use.
    pub resource: String,
    /// Tokens the request would take.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cost: u64,
    /// low, normal, high or critical.
    #[arg(long, default_value = "normal", value_name = "PRIORITY")]
    pub priority: Priority,
}

/// Options of `acquire`.
#[derive(Debug, ClapArgs)]
pub struct AcquireArgs {
    /// Who is asking (e.g. a tenant or user id).
    pub client: String,
    /// What they want to use (e.g. an API path).
    pub resource: String,
    #[command(flatten)]
    pub decision: DecisionArgs,
    /// Print nothing; only the exit status tells.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Options of `run`.
#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// Who is asking.
    #[arg(long)]
    pub client: String,
    /// What they want to use.
    #[arg(long)]
    pub resource: String,
    #[command(flatten)]
    pub decision: DecisionArgs,
    /// Exit status when rate limited (the command's own statuses stay
    /// distinguishable): 75 is EX_TEMPFAIL.
    #[arg(long, default_value_t = 75, value_name = "N")]
    pub denied_exit: u8,
    /// The command to run when allowed, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Options of `stats`.
#[derive(Debug, ClapArgs)]
pub struct StatsArgs {
    /// Refresh every INTERVAL until interrupted (default 1s).
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s",
          value_parser = parse_duration_arg)]
    pub watch: Option<Duration>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::rule::parse_duration(s)
}

/// Exit status of `rlctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Denied = 1,
    Usage = 2,
    Failure = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// A failed command: its exit status and a one-line message for stderr.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Usage,
            message: message.into(),
        }
    }

    pub fn failure(message: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Failure,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        let exit = match &e {
            ClientError::Server(body) => match body.code {
                ErrorCode::INVALID_ARGUMENT
                | ErrorCode::INVALID_RULE
                | ErrorCode::COST_EXCEEDS_BURST
                | ErrorCode::RULE_NOT_FOUND
                | ErrorCode::RULE_READ_ONLY
                | ErrorCode::FRAME_TOO_LARGE => Exit::Usage,
                _ => Exit::Failure,
            },
            ClientError::Protocol(crate::protocol::ProtocolError::FrameTooLarge { .. }) => {
                Exit::Usage
            }
            _ => Exit::Failure,
        };
        CliError {
            exit,
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError::failure(e.to_string())
    }
}

/// Runs a parsed command line. Returns the exit status; errors are printed.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rlctl: cannot start the runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let mut out = Output::new(args.json);
    let args_json = args.json;
    let result = runtime.block_on(dispatch(args, &mut out));
    match result {
        Ok(exit) => exit.into(),
        Err(e) if out.pipe_closed() => {
            let _ = e;
            Exit::Ok.into()
        }
        Err(e) => {
            if args_json {
                // Scripts reading --json get JSON on failure too.
                println!(
                    "{}",
                    serde_json::json!({ "error": e.message, "exit": e.exit as u8 })
                );
            }
            eprintln!("rlctl: {e}");
            e.exit.into()
        }
    }
}

/// How long one request to the daemon may take when `--timeout` says nothing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

async fn dispatch(args: Args, out: &mut Output) -> Result<Exit, CliError> {
    let socket = args.socket.clone().unwrap_or_else(client_socket_path);
    let timeout = args.timeout;
    // What bounds the whole command: --timeout, else 5s; a wait is bounded
    // by --timeout only (its requests by 5s each); bench and stats --watch
    // run as long as asked.
    let limit = match &args.command {
        Command::Acquire(AcquireArgs { decision, .. }) | Command::Run(RunArgs { decision, .. })
            if decision.wait =>
        {
            None
        }
        Command::Bench(_)
        | Command::Stats(StatsArgs { watch: Some(_) })
        | Command::Completions { .. } => None,
        _ => Some(timeout.unwrap_or(DEFAULT_TIMEOUT)),
    };
    let command = async {
        match args.command {
            Command::Rules(cmd) => rules::run(&socket, cmd, out).await,
            Command::Acquire(a) => acquire::acquire(&socket, a, timeout, out).await,
            Command::Run(r) => acquire::run(&socket, r, timeout).await,
            Command::Stats(s) => stats::stats(&socket, s, out).await,
            Command::Explain(e) => explain::run(&socket, e, out).await,
            Command::Health => stats::health(&socket, out).await,
            Command::Bench(b) => bench::run(&socket, b, out).await,
            Command::Audit(a) => audit::run(a, out).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut cmd = Args::command();
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut cmd, "rlctl", &mut script);
                out.line(String::from_utf8_lossy(&script).trim_end())?;
                Ok(Exit::Ok)
            }
        }
    };
    match limit {
        None => command.await,
        Some(limit) => tokio::time::timeout(limit, command)
            .await
            .unwrap_or_else(|_| Err(no_answer(&socket, limit))),
    }
}

/// The error of a daemon that did not answer in time.
pub fn no_answer(socket: &std::path::Path, limit: Duration) -> CliError {
    CliError::failure(format!(
        "no answer from rld at {} within {} (is it stopped or overloaded? --timeout sets the limit)",
        socket.display(),
        humantime::format_duration(limit)
    ))
}

/// Connects to the daemon.
///
/// # Errors
/// Exit 3 with the socket path and what to do.
pub async fn connect(socket: &std::path::Path) -> Result<Connection, CliError> {
    Ok(Connection::connect(socket).await?)
}
