//! `rlctl audit`: checks the lease audit logs of every daemon sharing a global
//! rule (`rld --audit-log FILE`) against etcd's history of the shares (member
//! keys and the rule's records) and the rule's bound, `rate x t + burst`
//! (the checker is [`crate::daemon::lease::audit::check`]). Talks to etcd,
//! not to a daemon.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;
use etcd_client::{Client, WatchOptions};
use serde::Serialize;

use super::{CliError, Exit, Output};
use crate::daemon::cluster::rule_from_json;
use crate::daemon::cluster::security::EtcdSecurity;
use crate::daemon::lease::audit::{self, HistoryEntry, Record, RuleBound};
use crate::daemon::lease::view::Paths;

/// Options of `rlctl audit`.
#[derive(Debug, Clone, ClapArgs)]
pub struct AuditArgs {
    /// Audit logs of every daemon that served the rule.
    #[arg(required = true, value_name = "LOG")]
    pub logs: Vec<PathBuf>,
    /// The global rule to check.
    #[arg(long, value_name = "ID")]
    pub rule: String,
    /// etcd endpoints (comma-separated), as given to rld.
    #[arg(long, value_delimiter = ',', required = true, value_name = "URLS")]
    pub etcd: Vec<String>,
    /// Key prefix of the deployment, as given to rld.
    #[arg(long, default_value = "/rld", value_name = "PREFIX")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed etcd's certificate (https:// endpoints).
    #[arg(long, value_name = "FILE")]
    pub etcd_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "etcd_tls_key")]
    pub etcd_tls_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[arg(long, value_name = "FILE", requires = "etcd_tls_cert")]
    pub etcd_tls_key: Option<PathBuf>,
    /// Name to check etcd's certificate against, when not the endpoint's host.
    #[arg(long, value_name = "NAME")]
    pub etcd_tls_domain: Option<String>,
    /// etcd user, when etcd has authentication enabled.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// Window lengths to check, in seconds.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,10",
        value_name = "SECONDS"
    )]
    pub windows: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct AuditOutput {
    rule: String,
    daemons: usize,
    rate: f64,
    burst: f64,
    writes_committed: u64,
    writes_unknown: u64,
    count_writes: u64,
    admitted: u64,
    revisions: u64,
    records: u64,
    /// The fullest record seen, as a fraction of the rate.
    fullest: f64,
    /// Window seconds -> (worst admitted, allowed).
    worst_windows: Vec<(u64, u64, f64)>,
    violations: Vec<String>,
}

pub async fn run(args: AuditArgs, out: &mut Output) -> Result<Exit, CliError> {
    let mut records = Vec::new();
    for path in &args.logs {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
        records.extend(
            audit::parse(&text).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?,
        );
    }
    // One member at a time: a member that is down (killed, partitioned)
    // must not fail the audit while the others can answer.
    let rule_key = format!("{}/v1/rules/{}", args.etcd_prefix, args.rule);
    let paths = Paths::new(&args.etcd_prefix);
    let security = EtcdSecurity {
        tls_ca: args.etcd_tls_ca.clone(),
        tls_cert: args.etcd_tls_cert.clone(),
        tls_key: args.etcd_tls_key.clone(),
        tls_domain: args.etcd_tls_domain.clone(),
        user: args.etcd_user.clone(),
        password_file: args.etcd_password_file.clone(),
    };
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    let options = security
        .connect_options(&args.etcd, options)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let mut errors = Vec::new();
    let mut found = None;
    for endpoint in &args.etcd {
        match read_from(endpoint, options.clone(), &rule_key, &paths.root).await {
            Ok(r) => {
                found = Some(r);
                break;
            }
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
    }
    let Some((stored, history)) = found else {
        return Err(CliError::failure(format!(
            "no etcd member answered: {}",
            errors.join("; ")
        )));
    };
    let Some(value) = stored else {
        return Err(CliError::usage(format!(
            "no rule {} in etcd under {} (check --etcd-prefix)",
            args.rule, args.etcd_prefix
        )));
    };
    let spec = rule_from_json(&value)
        .map_err(|e| CliError::failure(format!("rule {} in etcd is unreadable: {e}", args.rule)))?;
    let daemons: std::collections::BTreeSet<&str> = records.iter().map(Record::node).collect();
    let bound = RuleBound {
        rate: spec.limit as f64 / spec.window.as_secs_f64(),
        burst: spec.capacity() as f64,
    };
    let report = audit::check(&records, &history, &paths, &args.rule, bound, &args.windows);
    let result = AuditOutput {
        rule: args.rule.clone(),
        daemons: daemons.len(),
        rate: bound.rate,
        burst: bound.burst,
        writes_committed: report.writes_committed,
        writes_unknown: report.writes_unknown,
        count_writes: report.count_writes,
        admitted: report.admitted,
        revisions: report.revisions,
        records: report.records,
        fullest: report.fullest,
        worst_windows: report
            .worst_windows
            .iter()
            .map(|(w, (n, allowed))| (*w, *n, *allowed))
            .collect(),
        violations: report.violations.clone(),
    };
    if out.json() {
        out.json_value(&result)?;
    } else {
        out.line(format!(
            "rule {}: {} daemons, rate {}/s, burst {}; bound rate x t + burst",
            result.rule, result.daemons, result.rate, result.burst
        ))?;
        out.line(format!(
            "shares: {} etcd revisions replayed, {} records of the rule, fullest at {:.1}% of the rate; {} share writes committed ({} of unknown outcome), {} count writes",
            result.revisions,
            result.records,
            result.fullest * 100.0,
            result.writes_committed,
            result.writes_unknown,
            result.count_writes,
        ))?;
        out.line(format!("admitted: {} requests", result.admitted))?;
        for (w, n, allowed) in &result.worst_windows {
            out.line(format!(
                "worst {w} s window: {n} admitted, {allowed:.0} allowed"
            ))?;
        }
        if result.violations.is_empty() {
            out.line("ok: no violation")?;
        }
        for v in &result.violations {
            out.line(format!("VIOLATION: {v}"))?;
        }
    }
    Ok(if result.violations.is_empty() {
        Exit::Ok
    } else {
        Exit::Denied
    })
}

/// The stored rule (if any) and the history of the shares, from one member.
async fn read_from(
    endpoint: &str,
    options: etcd_client::ConnectOptions,
    rule_key: &str,
    prefix: &str,
) -> Result<(Option<Vec<u8>>, Vec<HistoryEntry>), String> {
    let mut client = Client::connect([endpoint], Some(options))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let stored = client
        .get(rule_key, None)
        .await
        .map_err(|e| format!("cannot read {rule_key}: {e}"))?;
    let value = stored.kvs().first().map(|kv| kv.value().to_vec());
    let history = history(&mut client, prefix).await?;
    Ok((value, history))
}

/// Every event under `prefix` in etcd's history (a watch from revision 1),
/// oldest first, up to now: a marker key put under the prefix (and deleted
/// again) shows where the history read so far ends.
///
/// # Errors
/// etcd unreachable, or its history compacted.
pub async fn history(client: &mut Client, prefix: &str) -> Result<Vec<HistoryEntry>, String> {
    let call = Duration::from_secs(10);
    let marker = format!("{prefix}audit-marker-{}", std::process::id());
    let put = tokio::time::timeout(call, client.put(marker.as_str(), "", None))
        .await
        .map_err(|_| format!("etcd did not answer a write of {marker} within {call:?}"))?
        .map_err(|e| format!("cannot write {marker} to etcd: {e}"))?;
    let last = put.header().map_or(0, |h| h.revision());
    let options = WatchOptions::new().with_prefix().with_start_revision(1);
    let mut stream = tokio::time::timeout(call, client.watch(prefix, Some(options)))
        .await
        .map_err(|_| format!("etcd did not answer a watch of {prefix} within {call:?}"))?
        .map_err(|e| format!("cannot watch {prefix}: {e}"))?;
    let mut entries = Vec::new();
    'read: loop {
        let msg = match tokio::time::timeout(call, stream.message()).await {
            Ok(Ok(Some(msg))) => msg,
            Ok(Ok(None)) | Err(_) => {
                return Err(format!(
                    "etcd's history of {prefix} ended before revision {last}"
                ));
            }
            Ok(Err(e)) => return Err(format!("watching {prefix}: {e}")),
        };
        if msg.compact_revision() > 0 {
            return Err(format!(
                "etcd compacted its history up to revision {}; audit with compaction off (etcd_compact_interval = \"0s\") or before it runs",
                msg.compact_revision()
            ));
        }
        for event in msg.events() {
            let Some(kv) = event.kv() else { continue };
            if kv.mod_revision() >= last {
                break 'read;
            }
            entries.push(HistoryEntry {
                key: kv.key_str().unwrap_or_default().to_owned(),
                revision: kv.mod_revision(),
                value: (event.event_type() == etcd_client::EventType::Put)
                    .then(|| kv.value().to_vec()),
                lease: kv.lease(),
            });
        }
    }
    let _ = client.delete(marker.as_str(), None).await;
    Ok(entries)
}
