//! `rlctl acquire` and `rlctl run`: one `Acquire` request (repeated with
//! `--wait` after each retry-after), for shell scripts that gate jobs.

use std::path::Path;
use std::time::{Duration, Instant};

use super::output::fmt_ns;
use super::{AcquireArgs, CliError, DecisionArgs, Exit, Output, RunArgs, connect};
use crate::protocol::{Acquire, Decision, Outcome, TraceContext};

/// Shortest sleep between retries (a retry-after of 0 would spin).
const MIN_RETRY: Duration = Duration::from_millis(1);

pub async fn acquire(
    socket: &Path,
    a: AcquireArgs,
    timeout: Option<Duration>,
    out: &mut Output,
) -> Result<Exit, CliError> {
    let decision = decide(socket, &a.client, &a.resource, &a.decision, timeout).await?;
    if out.json() {
        out.json_value(&decision)?;
    } else if !a.quiet {
        out.line(describe(&decision))?;
    }
    Ok(if decision.is_allowed() {
        Exit::Ok
    } else {
        Exit::Denied
    })
}

pub async fn run(socket: &Path, r: RunArgs, timeout: Option<Duration>) -> Result<Exit, CliError> {
    // As shells and env(1) do: 127 not found, 126 not executable; checked
    // before asking, so no token is spent on a command that cannot start.
    if let Err((status, why)) = resolve(&r.command[0]) {
        eprintln!("rlctl: {}: {why}", r.command[0]);
        std::process::exit(status);
    }
    let decision = decide(socket, &r.client, &r.resource, &r.decision, timeout).await?;
    if !decision.is_allowed() {
        eprintln!(
            "rlctl: not running {}: {}",
            r.command[0],
            describe(&decision)
        );
        std::process::exit(i32::from(r.denied_exit));
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&r.command[0])
        .args(&r.command[1..])
        .exec();
    eprintln!("rlctl: cannot run {}: {err}", r.command[0]);
    std::process::exit(126);
}

/// Finds `program` as execvp would: a path if it has a slash, else in
/// `$PATH`. `Err((127 | 126, why))` when it cannot be started.
fn resolve(program: &str) -> Result<std::path::PathBuf, (i32, String)> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = Path::new(program);
        return if !p.exists() {
            Err((127, "no such file".into()))
        } else if executable(p) {
            Ok(p.to_owned())
        } else {
            Err((126, "not executable".into()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut found_not_executable = false;
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
        found_not_executable |= candidate.exists();
    }
    if found_not_executable {
        Err((126, "not executable".into()))
    } else {
        Err((127, "command not found".into()))
    }
}

/// `TRACEPARENT` from the environment (as set by tracing-aware shells and
/// CI systems). A malformed one is ignored with a warning: the environment
/// is not this command's input, and a job gate must not fail over it.
fn trace_from_env() -> Option<TraceContext> {
    let value = std::env::var("TRACEPARENT").ok()?;
    match TraceContext::parse_traceparent(value.trim()) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("rlctl: ignoring TRACEPARENT: {e}");
            None
        }
    }
}

/// Asks once, or until allowed / timed out with `--wait`.
async fn decide(
    socket: &Path,
    client: &str,
    resource: &str,
    args: &DecisionArgs,
    timeout: Option<Duration>,
) -> Result<Decision<'static>, CliError> {
    let trace = match args.traceparent.as_deref() {
        Some(t) => Some(TraceContext::parse_traceparent(t).map_err(CliError::usage)?),
        None => trace_from_env(),
    };
    let request = Acquire {
        client: client.into(),
        resource: resource.into(),
        cost: args.cost,
        priority: args.priority,
        trace,
    };
    // Without --wait the whole command is bounded by the caller.
    let deadline = timeout.filter(|_| args.wait).map(|t| Instant::now() + t);
    // Each step (connect, one request) takes at most the default timeout,
    // and never past the deadline.
    let step = |deadline: Option<Instant>| {
        deadline.map_or(super::DEFAULT_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
                .min(super::DEFAULT_TIMEOUT)
        })
    };
    let limit = step(deadline);
    let mut conn = tokio::time::timeout(limit, connect(socket))
        .await
        .map_err(|_| super::no_answer(socket, limit))??;
    loop {
        let limit = step(deadline);
        let decision = tokio::time::timeout(limit, conn.acquire(request.clone()))
            .await
            .map_err(|_| super::no_answer(socket, limit))??;
        if decision.is_allowed() || !args.wait {
            return Ok(decision);
        }
        if decision.rule.is_empty() {
            // Denied by the default action: no bucket will ever refill.
            return Ok(decision);
        }
        let mut pause = Duration::from_nanos(decision.retry_after_ns).max(MIN_RETRY);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || left < Duration::from_nanos(decision.retry_after_ns) {
                eprintln!(
                    "rlctl: gave up waiting: the next token comes in {}, after --timeout",
                    fmt_ns(decision.retry_after_ns)
                );
                return Ok(decision);
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
    }
}

/// One line describing a decision.
pub fn describe(d: &Decision<'_>) -> String {
    let rule = if d.rule.is_empty() {
        "no rule matched; default action".to_string()
    } else {
        format!("rule {}", crate::rule::escape_text(&d.rule))
    };
    match d.outcome {
        Outcome::Allowed => format!("allowed: {} remaining ({rule})", d.remaining),
        Outcome::Bypassed => format!("allowed over the limit as critical ({rule})"),
        Outcome::Denied if d.rule.is_empty() => format!("denied ({rule})"),
        Outcome::Denied => format!(
            "rate limited: retry after {} ({rule}, limit {})",
            fmt_ns(d.retry_after_ns),
            d.limit
        ),
    }
}
