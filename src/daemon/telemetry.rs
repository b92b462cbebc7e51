//! OpenTelemetry traces (`--otlp-endpoint`): spans exported over OTLP/gRPC
//! with the OpenTelemetry SDK's batch processor, and what they cost.
//!
//! Spans: one per sampled decision (`rld.decide`, parented by the W3C trace
//! context the client sent), one per lease transaction (`rld.lease.txn`),
//! one per etcd state transition (`rld.etcd.state`) and per rule change
//! (`rld.rule.set`, `rld.rule.delete`).
//!
//! Sampling happens before anything is built: a decision whose client sent
//! a sampled parent is always traced, one whose parent is not sampled never,
//! one without a parent with probability `trace_sample_ratio`. A decision
//! that is not traced costs one branch (tracing off) or one random number
//! (tracing on); no span object, context or allocation. The decision span is
//! made with the SDK's tracer directly rather than through a `tracing` span
//! and `tracing-opentelemetry`: a `tracing` span exists (and costs) before
//! the sampler has spoken, which on a path of a few hundred nanoseconds is
//! the whole budget.
//!
//! Spans that cannot be exported (the collector is unreachable, the queue
//! is full) are dropped and counted (`rld_trace_spans_dropped_total`); the
//! first failure logs one warning, the recovery one line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};

use crate::protocol::{Acquire, Outcome, Priority, TraceContext};

/// Spans waiting for export at most; beyond, new ones are dropped (counted).
const QUEUE: u64 = 8192;
/// How often queued spans are sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Where and how much to trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// Share of decisions without a client trace context that are traced.
    pub sample_ratio: f64,
    /// gRPC metadata sent with every export (authentication tokens...).
    pub headers: Vec<(String, String)>,
    /// Deadline of one export.
    pub timeout: Duration,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0:?} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:4317)")]
    Endpoint(String),
    #[error(
        "otlp_headers: {0:?} is not a valid gRPC metadata entry (lowercase name = ASCII value)"
    )]
    Header(String),
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Counters of the span pipeline.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped: queue full, or the export failed.
    pub dropped: AtomicU64,
    /// Spans ended and not yet exported or dropped.
    queued: AtomicU64,
    /// The last export failed (a warning was logged).
    failing: AtomicBool,
}

/// The daemon's tracer.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// A root decision is traced when a random u64 falls below this.
    root_threshold: u64,
    pub stats: Arc<TraceStats>,
}

impl Telemetry {
    /// Sets up the exporter and the tracer. Must run inside a Tokio runtime
    /// (the gRPC channel's worker runs on it). Connects lazily: an
    /// unreachable collector is not an error here, its spans are dropped.
    ///
    /// # Errors
    /// An endpoint that is not a URL, a header that is not valid metadata.
    pub fn start(config: &TraceConfig, node_id: &str) -> Result<Telemetry, TelemetryError> {
        check_endpoint(&config.endpoint)?;
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (name, value) in &config.headers {
            let bad = || TelemetryError::Header(format!("{name}={value}"));
            let key =
                tonic::metadata::MetadataKey::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            metadata.insert(key, value.parse().map_err(|_| bad())?);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout)
            .with_metadata(metadata)
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: config.endpoint.clone(),
                message: e.to_string(),
            })?;
        let stats = Arc::new(TraceStats::default());
        let exporter = Counted {
            inner: exporter,
            stats: Arc::clone(&stats),
            endpoint: config.endpoint.clone(),
        };
        let batch = BatchSpanProcessor::new(
            exporter,
            BatchConfigBuilder::default()
                // Above our own bound, so the SDK never drops uncounted.
                .with_max_queue_size(QUEUE as usize * 2)
                .with_scheduled_delay(EXPORT_EVERY)
                .with_max_export_batch_size(512)
                .build(),
        );
        let host = super::host_name();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("rld")
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", node_id.to_owned()),
                KeyValue::new("host.name", host),
                KeyValue::new("rld.node_id", node_id.to_owned()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            // Decisions are sampled before a span is built (see the module
            // page); what reaches the SDK is kept, and a remote parent's
            // decision is followed.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(Bounded {
                inner: batch,
                stats: Arc::clone(&stats),
            })
            .build();
        let tracer = provider.tracer("rld");
        let ratio = config.sample_ratio.clamp(0.0, 1.0);
        Ok(Telemetry {
            provider,
            tracer,
            root_threshold: if ratio >= 1.0 {
                u64::MAX
            } else {
                (ratio * u64::MAX as f64) as u64
            },
            stats,
        })
    }

    /// Starts a decision span if this decision is to be traced: always
    /// under a sampled `parent`, never under one that is not, else with the
    /// configured ratio. `parent` must be valid (see
    /// [`TraceContext::is_valid`]).
    #[inline]
    pub fn decision(&self, parent: Option<&TraceContext>) -> Option<DecisionSpan> {
        match parent {
            Some(p) if p.flags & 1 == 0 => return None,
            Some(_) => {}
            None if !self.sample_root() => return None,
            None => {}
        }
        if self.stats.queued.load(Ordering::Relaxed) >= QUEUE {
            // The export queue is full: the span would be dropped once
            // built, so it is not built (and counted as dropped).
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(DecisionSpan(self.span(
            "rld.decide",
            SpanKind::Server,
            parent,
            Vec::new(),
        )))
    }

    #[inline]
    fn sample_root(&self) -> bool {
        match self.root_threshold {
            0 => false,
            u64::MAX => true,
            t => rand::random::<u64>() < t,
        }
    }

    fn span(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: Option<&TraceContext>,
        attributes: Vec<KeyValue>,
    ) -> opentelemetry_sdk::trace::Span {
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::NONE,
            )),
            None => Context::new(),
        };
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(SystemTime::now())
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &cx)
    }

    /// A span for a lease transaction that started at `started` and has
    /// ended with `outcome`.
    pub fn lease_txn(
        &self,
        started: SystemTime,
        rules: &[&str],
        ops: usize,
        outcome: Result<(), &str>,
    ) {
        let mut span = self
            .tracer
            .span_builder("rld.lease.txn")
            .with_kind(SpanKind::Client)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("rld.rules", rules.join(",")),
                KeyValue::new("rld.ops", ops as i64),
                KeyValue::new(
                    "rld.outcome",
                    if outcome.is_ok() {
                        "answered"
                    } else {
                        "failed"
                    },
                ),
                KeyValue::new("db.system.name", "etcd"),
            ])
            .start(&self.tracer);
        if let Err(e) = outcome {
            span.set_status(Status::error(e.to_owned()));
        }
        span.end();
    }

    /// A span for a change of the etcd state.
    pub fn etcd_state(&self, from: &'static str, to: &'static str, error: &str) {
        let mut attributes = vec![
            KeyValue::new("rld.etcd.from", from),
            KeyValue::new("rld.etcd.to", to),
        ];
        if !error.is_empty() {
            attributes.push(KeyValue::new("rld.etcd.last_error", error.to_owned()));
        }
        self.span("rld.etcd.state", SpanKind::Internal, None, attributes)
            .end();
    }

    /// A span for a rule change asked by a client (`name` is
    /// `rld.rule.set` or `rld.rule.delete`), from `started` until now.
    pub fn rule_change(
        &self,
        name: &'static str,
        rule: &str,
        started: SystemTime,
        outcome: Result<(), String>,
    ) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .with_attributes([KeyValue::new("rld.rule", rule.to_owned())])
            .start(&self.tracer);
        if let Err(e) = outcome {
            span.set_status(Status::error(e));
        }
        span.end();
    }

    /// Exports what is queued and stops (blocking: run it off the runtime's
    /// workers), waiting at most `limit`.
    pub fn shutdown(&self, limit: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(limit) {
            tracing::warn!("spans not all exported at shutdown: {e}");
        }
    }
}

/// A decision's span, ended once the decision is known.
#[derive(Debug)]
pub struct DecisionSpan(opentelemetry_sdk::trace::Span);

impl DecisionSpan {
    /// Records the decision on `a` and ends the span; `shadows` (rule id,
    /// outcome) become `rld.shadows`, "id=outcome" joined by commas.
    pub fn end(
        mut self,
        a: &Acquire<'_>,
        outcome: Outcome,
        remaining: u64,
        rule: String,
        shadows: &[(String, Outcome)],
    ) {
        let name = |o: Outcome| match o {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "rejected",
            Outcome::Bypassed => "bypassed",
        };
        let outcome = name(outcome);
        if !shadows.is_empty() {
            let text: Vec<String> = shadows
                .iter()
                .map(|(id, o)| format!("{id}={}", name(*o)))
                .collect();
            self.0
                .set_attribute(KeyValue::new("rld.shadows", text.join(",")));
        }
        let priority = match a.priority {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        };
        let s = &mut self.0;
        s.set_attributes([
            KeyValue::new("rld.client", a.client.to_string()),
            KeyValue::new("rld.resource", a.resource.to_string()),
            KeyValue::new("rld.cost", a.cost as i64),
            KeyValue::new("rld.priority", priority),
            KeyValue::new("rld.rule", rule),
            KeyValue::new("rld.outcome", outcome),
            KeyValue::new("rld.remaining", remaining as i64),
        ]);
        s.end();
    }

    /// Ends the span of a request that failed (an invalid request).
    pub fn fail(mut self, message: String) {
        self.0.set_status(Status::error(message));
        self.0.end();
    }
}

pub(crate) fn check_endpoint(endpoint: &str) -> Result<(), TelemetryError> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.starts_with(':') => Ok(()),
        _ => Err(TelemetryError::Endpoint(endpoint.to_owned())),
    }
}

/// Bounds the spans waiting for export, counting what it drops.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    stats: Arc<TraceStats>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.stats.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it sends and what fails.
#[derive(Debug)]
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    stats: Arc<TraceStats>,
    endpoint: String,
}

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let s = &self.stats;
        s.queued.fetch_sub(n, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                s.exported.fetch_add(n, Ordering::Relaxed);
                if s.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("spans are exported to {} again", self.endpoint);
                }
            }
            Err(e) => {
                s.dropped.fetch_add(n, Ordering::Relaxed);
                if !s.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot export spans to {}: {e}; dropping them (counted in \
                         rld_trace_spans_dropped_total) until the collector answers",
                        self.endpoint
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_urls() {
        for ok in [
            "http://127.0.0.1:4317",
            "https://collector.example:4317",
            "http://[::1]:4317",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "127.0.0.1:4317",
            "http://",
            "grpc://x:4317",
            "http://:4317",
            "",
        ] {
            let e = check_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains("http://127.0.0.1:4317"), "{bad}: {e}");
        }
    }
}
