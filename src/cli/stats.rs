//! `rlctl stats` (`Stats`) and `rlctl health` (`Health`).

use crate::rule::escape_text;
use std::path::Path;

use super::output::fmt_ns;
use super::{CliError, Exit, Output, StatsArgs, connect};
use crate::protocol::{HealthReport, ServingState, StatsReport};

pub async fn stats(socket: &Path, args: StatsArgs, out: &mut Output) -> Result<Exit, CliError> {
    let mut conn = connect(socket).await?;
    loop {
        let report = conn.stats().await?;
        if out.json() {
            out.json_value(&report)?;
        } else {
            out.line(render_stats(&report))?;
        }
        match args.watch {
            Some(interval) => {
                tokio::time::sleep(interval).await;
                if !out.json() {
                    out.line("")?;
                }
            }
            None => return Ok(Exit::Ok),
        }
    }
}

fn render_stats(s: &StatsReport) -> String {
    let l = &s.latency;
    let mut text = format!(
        "uptime       {}\n\
         decisions    allowed {}  rejected {}  bypassed {}  unmatched {}\n\
         latency      avg {}  p50 {}  p99 {}  p99.9 {}  max {}  ({} sampled)\n\
         buckets      {} of {} max  evicted: idle {}  lru {}\n\
         connections  open {}  total {}  refused {}  protocol errors {}\n\
         rules        {}  expired {}",
        fmt_ns(s.uptime_ns),
        s.allowed,
        s.rejected,
        s.bypassed,
        s.unmatched,
        fmt_ns(l.avg_ns),
        fmt_ns(l.p50_ns),
        fmt_ns(l.p99_ns),
        fmt_ns(l.p999_ns),
        fmt_ns(l.max_ns),
        l.count,
        s.buckets,
        s.max_buckets,
        s.evicted_idle,
        s.evicted_lru,
        s.connections_open,
        s.connections_total,
        s.connections_rejected,
        s.protocol_errors,
        s.rules,
        s.rules_expired,
    );
    if let Some(c) = &s.cluster {
        text.push_str(&format!(
            "\netcd         {} ({} state changes)  members {}  txns {}  conflicts {}  failures {}  \
             txn p50 {} p99 {}",
            c.state,
            c.state_changes,
            c.members,
            c.lease_txns,
            c.lease_conflicts,
            c.lease_failures,
            fmt_ns(c.txn_latency.p50_ns),
            fmt_ns(c.txn_latency.p99_ns),
        ));
        if let Some(sh) = &c.shares {
            text.push_str(&format!(
                "\nshares       count {}  in force for {}  recorded buckets {}  records created {} deleted {}  \
                 raised {}  lowered {}",
                sh.count,
                fmt_ns(sh.valid_for_ns),
                sh.recorded,
                sh.records_created,
                sh.records_deleted,
                sh.raises,
                sh.lowers,
            ));
            text.push_str(&format!(
                "\netcd db      {} bytes{}",
                sh.etcd_db_bytes,
                if sh.etcd_nospace {
                    "  NOSPACE: etcd refuses writes (compact, defragment, disarm the alarm)"
                } else {
                    ""
                }
            ));
        }
        text.push_str(&format!(
            "\nwrites       sent {}  unknown {} (resolved {})  dropped events {}",
            c.lease_ops, c.lease_unknown, c.lease_resolved, c.dropped_events,
        ));
        for r in &c.rules {
            text.push_str(&format!(
                "\n  {}: held {}  implicit depth {}",
                escape_text(&r.id),
                r.lease.held,
                r.lease.batch,
            ));
        }
    }
    if !s.per_rule.is_empty() {
        let width = s
            .per_rule
            .iter()
            .map(|r| escape_text(&r.id).chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        text.push_str(&format!(
            "\n\n{:<width$}  {:>10}  {:>10}  {:>10}",
            "RULE", "ALLOWED", "REJECTED", "BYPASSED"
        ));
        for r in &s.per_rule {
            text.push_str(&format!(
                "\n{:<width$}  {:>10}  {:>10}  {:>10}",
                escape_text(&r.id),
                r.allowed,
                r.rejected,
                r.bypassed
            ));
        }
    }
    text
}

pub async fn health(socket: &Path, out: &mut Output) -> Result<Exit, CliError> {
    let report = connect(socket).await?.health().await?;
    if out.json() {
        out.json_value(&report)?;
    } else {
        out.line(render_health(&report))?;
    }
    Ok(match report.state {
        ServingState::Ok | ServingState::Degraded => Exit::Ok,
        ServingState::Stopping => Exit::Failure,
    })
}

fn render_health(h: &HealthReport) -> String {
    let state = match h.state {
        ServingState::Ok => "ok",
        ServingState::Degraded => "degraded",
        ServingState::Stopping => "stopping",
    };
    let mut text = format!(
        "{state}: rld {} ({}), up {}, {} rules",
        h.version,
        h.mode,
        fmt_ns(h.uptime_ns),
        h.rules
    );
    if let Some(e) = &h.etcd {
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.since_unix_ms);
        let ago = std::time::SystemTime::now()
            .duration_since(since)
            .map_or(0, |d| d.as_nanos() as u64);
        text.push_str(&format!(
            "\netcd: {} for {} as node {}, {} daemons",
            e.state,
            fmt_ns(ago),
            e.node_id,
            e.members
        ));
        if !e.last_error.is_empty() {
            text.push_str(&format!("; last error: {}", e.last_error));
        }
    }
    text
}
