//! The metric families a scrape returns: a [`Snapshot`] of the daemon's
//! counters (taken once per scrape, from the same figures `rlctl stats`
//! shows) encoded with `prometheus-client` in the Prometheus text format or
//! OpenMetrics. Labels carry rule ids, reasons and codes only, never a
//! client id or a resource name (unbounded, and possibly personal data).

use std::ops::RangeInclusive;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::daemon::Shared;
use crate::daemon::limiter::global::EtcdState;
use crate::daemon::metrics::{ERROR_CODE_SLOTS, Metrics, REFUSAL_REASONS};
use crate::protocol::{ErrorCode, StatsReport};

/// Decision latency buckets: 2^6 ns (64 ns) to 2^27 ns (134 ms).
const DECISION_BUCKETS: RangeInclusive<u32> = 6..=27;
/// Lease Txn latency buckets: 2^17 ns (131 µs) to 2^33 ns (8.6 s).
const TXN_BUCKETS: RangeInclusive<u32> = 17..=33;

/// A histogram as Prometheus wants it: sum (seconds), count, buckets.
type Buckets = (f64, u64, Vec<(f64, u64)>);

/// Everything one scrape reports, read once.
#[derive(Debug)]
pub struct Snapshot {
    stats: StatsReport,
    /// Ids of the shadow rules in force: their outcomes are labelled
    /// `shadow_allowed`, `shadow_rejected`, `shadow_bypassed`.
    shadows: std::collections::HashSet<String>,
    refused: Vec<(&'static str, u64)>,
    errors: Vec<(&'static str, u64)>,
    decision_latency: Buckets,
    etcd: Option<EtcdSnapshot>,
    invalid_trace_contexts: u64,
    /// Spans exported and dropped, when traces are exported.
    spans: Option<(u64, u64)>,
}

#[derive(Debug)]
struct EtcdSnapshot {
    state: EtcdState,
    txn_latency: Buckets,
    txn_failures: u64,
}

impl Snapshot {
    /// Reads the daemon's counters. Admin-rate work (it takes
    /// [`Shared::stats`]'s per-rule sums and its cached held-token scan):
    /// run it on the blocking pool.
    pub fn take(shared: &Shared) -> Snapshot {
        let m = &shared.metrics;
        let refused = REFUSAL_REASONS
            .iter()
            .zip(&m.connections_refused)
            .map(|(r, c)| (*r, Metrics::get(c)))
            .collect();
        let errors = (0..ERROR_CODE_SLOTS)
            .filter_map(|code| {
                let n = Metrics::get(&m.errors[code]);
                let name = ErrorCode(code as u16).name();
                // Every code the daemon sends, zero or not, so that rate()
                // sees a series from its first scrape.
                (n > 0 || name != "unknown").then_some((name, n))
            })
            .collect();
        let etcd = shared.cluster.as_ref().map(|cluster| {
            let lease = shared.lease.as_deref();
            EtcdSnapshot {
                state: cluster.link.state(),
                txn_latency: lease.map_or_else(empty_buckets, |s| s.latency.buckets(TXN_BUCKETS)),
                txn_failures: lease.map_or(0, |s| Metrics::get(&s.txn_failures)),
            }
        });
        Snapshot {
            stats: shared.stats(),
            shadows: shared
                .limiter
                .rules()
                .iter()
                .filter(|r| r.spec.shadow)
                .map(|r| r.id().to_owned())
                .collect(),
            refused,
            errors,
            decision_latency: m.latency.buckets(DECISION_BUCKETS),
            etcd,
            invalid_trace_contexts: Metrics::get(&m.invalid_trace_contexts),
            spans: shared.telemetry.as_ref().map(|t| {
                (
                    Metrics::get(&t.stats.exported),
                    Metrics::get(&t.stats.dropped),
                )
            }),
        }
    }

    /// The snapshot in the Prometheus text format (0.0.4), or OpenMetrics
    /// 1.0 when `openmetrics`.
    pub fn encode(self, openmetrics: bool) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        };
        // Writing to a String cannot fail, and every name and label here is
        // fixed or a validated rule id.
        encoded.expect("encoding metrics into a String");
        out
    }
}

fn empty_buckets() -> Buckets {
    (0.0, 0, vec![(f64::INFINITY, 0)])
}

/// Encodes one family of `(labels, value)` series.
fn family<'a, L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet + 'a,
    M: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    (sum, count, buckets): &Buckets,
) -> Result<(), std::fmt::Error> {
    let mut metric: MetricEncoder =
        encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(*sum, *count, buckets, None)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let e = &mut e;
        prometheus_client::metrics::info::Info::new([("version", env!("CARGO_PKG_VERSION"))])
            .encode(e.encode_descriptor(
                "rld_build",
                "The running rld's version.",
                None,
                MetricType::Info,
            )?)?;
        gauge(
            e,
            "rld_uptime_seconds",
            "Seconds since the daemon started.",
            s.uptime_ns as f64 / 1e9,
        )?;
        let outcomes = s.per_rule.iter().flat_map(|r| {
            let names = if self.shadows.contains(&r.id) {
                ["shadow_allowed", "shadow_rejected", "shadow_bypassed"]
            } else {
                ["allowed", "rejected", "bypassed"]
            };
            [
                (names[0], r.allowed),
                (names[1], r.rejected),
                (names[2], r.bypassed),
            ]
            .map(|(outcome, n)| {
                (
                    [("rule", r.id.as_str()), ("outcome", outcome)],
                    ConstCounter::new(n),
                )
            })
        });
        // Requests no rule matched have no rule: an empty label, which
        // Prometheus stores as no label.
        let unmatched = std::iter::once((
            [("rule", ""), ("outcome", "unmatched")],
            ConstCounter::new(s.unmatched),
        ));
        family(
            e,
            "rld_decisions",
            "Decisions by rule and outcome: allowed, rejected, bypassed (a Critical request \
             admitted over the limit, still charged), unmatched (no rule matched; \
             default_action answered); a shadow rule's as shadow_allowed, shadow_rejected, \
             shadow_bypassed (what it would have decided). A request stacked rules decide \
             counts under each of them that admitted it, or under those that denied it.",
            MetricType::Counter,
            outcomes.chain(unmatched),
        )?;
        histogram(
            e,
            "rld_decision_duration_seconds",
            "Time to decide inside the daemon, from one decision in 8 (timing every one \
             would cost as much as deciding).",
            &self.decision_latency,
        )?;
        gauge(e, "rld_buckets", "Token buckets in memory.", s.buckets)?;
        gauge(
            e,
            "rld_buckets_max",
            "The most buckets kept in memory (max_buckets).",
            s.max_buckets,
        )?;
        family(
            e,
            "rld_evictions",
            "Buckets evicted: idle (full and unused) or lru (the table was at its cap).",
            MetricType::Counter,
            [
                ([("reason", "idle")], ConstCounter::new(s.evicted_idle)),
                ([("reason", "lru")], ConstCounter::new(s.evicted_lru)),
            ],
        )?;
        gauge(e, "rld_rules", "Rules in force.", s.rules)?;
        counter(
            e,
            "rld_rules_expired",
            "Rules removed after going unused for their expire_idle.",
            s.rules_expired,
        )?;
        gauge(
            e,
            "rld_connections",
            "Client connections open.",
            s.connections_open,
        )?;
        counter(
            e,
            "rld_connections_accepted",
            "Client connections accepted and served.",
            s.connections_total,
        )?;
        family(
            e,
            "rld_connections_refused",
            "Client connections refused: full (max_connections), kept_for_admins \
             (the last admin_connections slots), per_uid (max_connections_per_uid).",
            MetricType::Counter,
            self.refused
                .iter()
                .map(|(reason, n)| ([("reason", *reason)], ConstCounter::new(*n))),
        )?;
        counter(
            e,
            "rld_protocol_errors",
            "Requests that could not be read (malformed or oversized frames, unknown \
             versions, requests before Hello).",
            s.protocol_errors,
        )?;
        family(
            e,
            "rld_error_answers",
            "Requests answered with an error, by error code (see rld-protocol(7)).",
            MetricType::Counter,
            self.errors
                .iter()
                .map(|(code, n)| ([("code", *code)], ConstCounter::new(*n))),
        )?;
        counter(
            e,
            "rld_trace_invalid_contexts",
            "Requests whose trace context had an all-zero id (ignored).",
            self.invalid_trace_contexts,
        )?;
        if let Some((exported, dropped)) = self.spans {
            counter(
                e,
                "rld_trace_spans_exported",
                "Spans the OTLP collector accepted.",
                exported,
            )?;
            counter(
                e,
                "rld_trace_spans_dropped",
                "Spans dropped: the export failed (collector unreachable) or the queue was full.",
                dropped,
            )?;
        }
        if let (Some(c), Some(etcd)) = (&s.cluster, &self.etcd) {
            self.encode_cluster(e, c, etcd)?;
        }
        Ok(())
    }
}

impl Snapshot {
    fn encode_cluster(
        &self,
        e: &mut DescriptorEncoder,
        c: &crate::protocol::ClusterStats,
        etcd: &EtcdSnapshot,
    ) -> Result<(), std::fmt::Error> {
        family(
            e,
            "rld_etcd_state",
            "The daemon's view of etcd: 1 for the current state, 0 for the others.",
            MetricType::Gauge,
            EtcdState::ALL.iter().map(|st| {
                (
                    [("state", st.name())],
                    ConstGauge::new(i64::from(*st == etcd.state)),
                )
            }),
        )?;
        counter(
            e,
            "rld_etcd_state_changes",
            "Transitions between etcd states.",
            c.state_changes,
        )?;
        gauge(
            e,
            "rld_etcd_members",
            "Live daemons sharing limits through etcd (this one included).",
            c.members,
        )?;
        family(
            e,
            "rld_lease_txns",
            "Lease transactions: answered by etcd, or failed (error or timeout: outcome \
             unknown until resolved).",
            MetricType::Counter,
            [
                ([("result", "answered")], ConstCounter::new(c.lease_txns)),
                ([("result", "failed")], ConstCounter::new(etcd.txn_failures)),
            ],
        )?;
        histogram(
            e,
            "rld_lease_txn_duration_seconds",
            "Round trip of answered lease transactions (and of timed-out ones, counted \
             at their deadline).",
            &etcd.txn_latency,
        )?;
        counter(
            e,
            "rld_lease_conflicts",
            "Record writes whose compare failed (another daemon moved the record first).",
            c.lease_conflicts,
        )?;
        counter(
            e,
            "rld_lease_unknown_outcomes",
            "Record writes whose outcome was unknown (lost answer, timeout).",
            c.lease_unknown,
        )?;
        counter(
            e,
            "rld_lease_unknown_resolved",
            "Unknown record writes the watch later showed committed (applied once, never twice).",
            c.lease_resolved,
        )?;
        counter(
            e,
            "rld_lease_dropped_events",
            "Shortfall or release events dropped because the lease coordinator lagged.",
            c.dropped_events,
        )?;
        family(
            e,
            "rld_global_held_tokens",
            "Tokens of each global rule this daemon holds now (scanned at most every 250 ms).",
            MetricType::Gauge,
            c.rules
                .iter()
                .map(|r| ([("rule", r.id.as_str())], ConstGauge::new(r.lease.held))),
        )?;
        family(
            e,
            "rld_global_overadmission_bound_tokens",
            "Tokens all daemons together may admit beyond rate x t + burst in any interval t: \
             0 (shares of all daemons sum to at most the rule).",
            MetricType::Gauge,
            c.rules
                .iter()
                .map(|r| ([("rule", r.id.as_str())], ConstGauge::new(r.lease.bound))),
        )?;
        family(
            e,
            "rld_global_implicit_depth_tokens",
            "Depth of this daemon's implicit share of each global rule (burst / n): what a \
             bucket with no record holds.",
            MetricType::Gauge,
            c.rules
                .iter()
                .map(|r| ([("rule", r.id.as_str())], ConstGauge::new(r.lease.batch))),
        )?;
        let Some(sh) = &c.shares else {
            return Ok(());
        };
        gauge(
            e,
            "rld_share_daemons",
            "This daemon's operating count n: implicit shares are 1/n of each global rule \
             (0: not using shares).",
            sh.count,
        )?;
        gauge(
            e,
            "rld_share_valid_seconds",
            "Seconds until this daemon's shares lapse unless its etcd lease is renewed \
             (0: lapsed, global rules follow on_failure).",
            sh.valid_for_ns as f64 / 1e9,
        )?;
        gauge(
            e,
            "rld_share_recorded_buckets",
            "Buckets with a recorded (non-implicit) share on this daemon.",
            sh.recorded,
        )?;
        family(
            e,
            "rld_share_records",
            "Share records this daemon created and deleted in etcd.",
            MetricType::Counter,
            [
                (
                    [("action", "created")],
                    ConstCounter::new(sh.records_created),
                ),
                (
                    [("action", "deleted")],
                    ConstCounter::new(sh.records_deleted),
                ),
            ],
        )?;
        family(
            e,
            "rld_share_changes",
            "Changes of this daemon's recorded shares: raised (after etcd committed) and \
             lowered (before it recorded them); and of its operating count.",
            MetricType::Counter,
            [
                ([("change", "raised")], ConstCounter::new(sh.raises)),
                ([("change", "lowered")], ConstCounter::new(sh.lowers)),
                ([("change", "count")], ConstCounter::new(sh.count_changes)),
            ],
        )?;
        gauge(
            e,
            "rld_etcd_db_size_bytes",
            "etcd's database size as last read (every 10 s).",
            sh.etcd_db_bytes,
        )?;
        gauge(
            e,
            "rld_etcd_nospace",
            "1 while etcd's NOSPACE alarm is raised: it refuses every write until an operator \
             compacts, defragments and disarms it.",
            i64::from(sh.etcd_nospace),
        )
    }
}
