//! OpenTelemetry traces (`--otlp-endpoint`) received by an OTLP/gRPC
//! receiver running in the test (the `opentelemetry-proto` service on
//! 127.0.0.1:0): decision spans follow the client's W3C trace context,
//! sampled-out parents produce none, lease transactions, etcd states and
//! rule changes become spans, and an unreachable collector costs nothing
//! but counted drops.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use rld::daemon::telemetry::TraceConfig;
use rld::protocol::{Acquire, Outcome, TraceContext};

use crate::harness::{Etcd, HEAVY, ProcessDaemon, TestDaemon, code, rlctl, rule, stderr, wait_for};

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
struct Received {
    resource: Vec<KeyValue>,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// The OTLP receiver: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<parking_lot::Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on a loopback port of the kernel's choice: (receiver, URL).
    async fn start() -> (Receiver, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (receiver, url)
    }

    /// Waits (up to 20 s: spans are sent every second) for a span matching
    /// `f`, and returns it.
    async fn wait_for(&self, what: &str, f: impl Fn(&Received) -> bool) -> Received {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self.spans.lock().iter().find(|r| f(r)) {
                return r.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} span received; got {:#?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn names(&self) -> Vec<String> {
        self.spans
            .lock()
            .iter()
            .map(|r| r.span.name.clone())
            .collect()
    }

    fn with_trace(&self, trace_id: &[u8]) -> Vec<Received> {
        self.spans
            .lock()
            .iter()
            .filter(|r| r.span.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn traced(endpoint: &str, ratio: f64) -> impl FnOnce(&mut rld::daemon::Config) {
    let endpoint = endpoint.to_owned();
    move |c| {
        c.trace = Some(TraceConfig {
            endpoint,
            sample_ratio: ratio,
            headers: vec![("x-test".into(), "rld".into())],
            timeout: Duration::from_secs(5),
        });
        c.rules = vec![rule("api", "*", "api", 2, Duration::from_secs(3600))];
    }
}

fn context(n: u8, sampled: bool) -> TraceContext {
    TraceContext {
        trace_id: [n; 16],
        span_id: [n.wrapping_add(1); 8],
        flags: u8::from(sampled),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_span_is_a_child_of_the_clients_trace_context() {
    let (receiver, url) = Receiver::start().await;
    // No root decisions: only requests with a sampled parent are traced.
    let d = TestDaemon::start_with(traced(&url, 0.0)).await;
    let mut conn = d.connect().await;

    // A sampled-out parent and no parent first, then a sampled parent: the
    // first two, had they made spans, would have been sent with the third
    // or before it.
    let out = context(0x11, false);
    let sampled = context(0x22, true);
    conn.acquire(Acquire::new("alice", "api").trace(out))
        .await
        .unwrap();
    conn.acquire(Acquire::new("alice", "api")).await.unwrap();
    let decision = conn
        .acquire(Acquire::new("alice", "api").trace(sampled))
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Denied, "the burst of 2 is spent");

    let span = receiver
        .wait_for("rld.decide", |r| r.span.trace_id == sampled.trace_id)
        .await;
    assert_eq!(span.span.name, "rld.decide");
    assert_eq!(span.span.parent_span_id, sampled.span_id);
    assert_eq!(span.span.trace_id, sampled.trace_id);
    assert_eq!(span.attr("rld.client").as_deref(), Some("alice"));
    assert_eq!(span.attr("rld.resource").as_deref(), Some("api"));
    assert_eq!(span.attr("rld.rule").as_deref(), Some("api"));
    assert_eq!(span.attr("rld.outcome").as_deref(), Some("rejected"));
    assert_eq!(span.attr("rld.remaining").as_deref(), Some("0"));
    assert_eq!(span.attr("rld.priority").as_deref(), Some("normal"));
    assert_eq!(span.attr("rld.cost").as_deref(), Some("1"));
    for (key, value) in [
        ("service.name", Some("rld".to_owned())),
        (
            "service.version",
            Some(env!("CARGO_PKG_VERSION").to_owned()),
        ),
    ] {
        assert_eq!(attr(&span.resource, key), value, "{key}");
    }
    assert!(attr(&span.resource, "host.name").is_some_and(|h| !h.is_empty()));
    assert!(attr(&span.resource, "service.instance.id").is_some());
    assert!(receiver.with_trace(&out.trace_id).is_empty());
    // Ratio 0: the request without a parent made no span either.
    let decides = receiver
        .names()
        .iter()
        .filter(|n| *n == "rld.decide")
        .count();
    assert_eq!(decides, 1, "{:?}", receiver.names());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_follow_the_ratio_and_invalid_contexts_are_ignored_and_counted() {
    let (receiver, url) = Receiver::start().await;
    let d = TestDaemon::start_with(traced(&url, 1.0)).await;
    let mut conn = d.connect().await;
    // An all-zero trace id is not a context: decided, counted, and traced as
    // a root (ratio 1).
    let invalid = TraceContext {
        trace_id: [0; 16],
        span_id: [7; 8],
        flags: 1,
    };
    let decision = conn
        .acquire(Acquire::new("bob", "api").trace(invalid))
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Allowed);
    let span = receiver
        .wait_for("root rld.decide", |r| {
            r.span.name == "rld.decide" && r.attr("rld.client").as_deref() == Some("bob")
        })
        .await;
    assert!(span.span.parent_span_id.is_empty(), "{span:?}");
    assert_ne!(span.span.trace_id, vec![0u8; 16]);
    let stats = conn.stats().await.unwrap();
    assert_eq!(stats.allowed, 1);
    assert_eq!(
        d.shared
            .metrics
            .invalid_trace_contexts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let t = d.shared.telemetry.as_ref().unwrap();
    wait_for_async(|| t.stats.exported.load(std::sync::atomic::Ordering::Relaxed) >= 1).await;
}

async fn wait_for_async(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rlctl_propagates_traceparent_from_its_flag_and_the_environment() {
    let (receiver, url) = Receiver::start().await;
    let d = TestDaemon::start_with(traced(&url, 0.0)).await;
    let flag = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let env = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
    let socket = d.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        let by_flag = rlctl(&socket, &["acquire", "carol", "api", "--traceparent", flag]);
        let by_env = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"))
            .args([
                "--socket",
                socket.to_str().unwrap(),
                "acquire",
                "carol",
                "api",
            ])
            .env("TRACEPARENT", env)
            .output()
            .unwrap();
        let bad_env = std::process::Command::new(env!("CARGO_BIN_EXE_rlctl"))
            .args([
                "--socket",
                socket.to_str().unwrap(),
                "acquire",
                "dave",
                "api",
            ])
            .env("TRACEPARENT", "not-a-traceparent")
            .output()
            .unwrap();
        let bad_flag = rlctl(
            &socket,
            &["acquire", "dave", "api", "--traceparent", "00-zz"],
        );
        (by_flag, by_env, bad_env, bad_flag)
    })
    .await
    .unwrap();
    let (by_flag, by_env, bad_env, bad_flag) = out;
    assert_eq!(code(&by_flag), 0, "{}", stderr(&by_flag));
    assert_eq!(code(&by_env), 0, "{}", stderr(&by_env));
    // A malformed TRACEPARENT in the environment is ignored with a warning.
    assert_eq!(code(&bad_env), 0, "{}", stderr(&bad_env));
    assert!(
        stderr(&bad_env).contains("ignoring TRACEPARENT"),
        "{}",
        stderr(&bad_env)
    );
    // A malformed --traceparent is a usage error.
    assert_eq!(code(&bad_flag), 2, "{}", stderr(&bad_flag));
    assert!(
        stderr(&bad_flag).contains("W3C traceparent"),
        "{}",
        stderr(&bad_flag)
    );
    for tp in [flag, env] {
        let t = TraceContext::parse_traceparent(tp).unwrap();
        let span = receiver
            .wait_for(tp, |r| r.span.trace_id == t.trace_id)
            .await;
        assert_eq!(span.span.parent_span_id, t.span_id);
        assert_eq!(span.attr("rld.client").as_deref(), Some("carol"));
    }
}

#[test]
fn an_unreachable_collector_costs_counted_drops_and_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on (taken, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let d = ProcessDaemon::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--trace-sample-ratio",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let dropped = || d.metric("rld_trace_spans_dropped_total") as u64;
    // Two rounds of decisions, each exported (and failing) separately.
    let mut last = 0;
    for round in 0..2 {
        for _ in 0..5 {
            let out = rlctl(&d.socket, &["acquire", "erin", "anything"]);
            assert_eq!(code(&out), 0, "round {round}: {}", stderr(&out));
        }
        wait_for(Duration::from_secs(30), || dropped() >= last + 5);
        last = dropped();
    }
    let log = d.log();
    assert_eq!(
        log.matches("cannot export spans").count(),
        1,
        "one warning for the whole outage: {log}"
    );
    assert!(log.contains(&endpoint), "{log}");
    assert!(d.terminate().success());
}

#[test]
fn bad_trace_settings_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            vec!["--otlp-endpoint", "127.0.0.1:4317"],
            "http://127.0.0.1:4317",
        ),
        (
            vec![
                "--otlp-endpoint",
                "http://127.0.0.1:4317",
                "--trace-sample-ratio",
                "2",
            ],
            "trace_sample_ratio",
        ),
        (vec!["--trace-sample-ratio", "0.5"], "needs --otlp-endpoint"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rld"))
            .arg("--socket")
            .arg(dir.path().join("rld.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(&args)
            .env_remove("RLD_CONFIG")
            .output()
            .unwrap();
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_transactions_etcd_states_and_rule_changes_are_spans() {
    let Some(etcd) = Etcd::get() else { return };
    let _group = HEAVY.read().await;
    let (receiver, url) = Receiver::start().await;
    let node = format!("traced-{}", std::process::id());
    let d = TestDaemon::start_with(|c| {
        traced(&url, 0.0)(c);
        c.rules.clear();
        let mut e = rld::daemon::config::EtcdConfig::defaults(
            etcd.endpoints.split(',').map(str::to_owned).collect(),
        );
        e.prefix = etcd.prefix.clone();
        e.node_id = node.clone();
        c.etcd = Some(e);
    })
    .await;
    let socket = d.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        rlctl(
            &socket,
            &[
                "rules",
                "set",
                "g",
                "--client",
                "*",
                "--resource",
                "g",
                "--limit",
                "100",
                "--window",
                "1s",
                "--scope",
                "global",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut conn = d.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while conn.acquire(Acquire::new("c", "g")).await.unwrap().outcome != Outcome::Allowed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the global rule never admitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let set = receiver
        .wait_for("rld.rule.set", |r| r.span.name == "rld.rule.set")
        .await;
    assert_eq!(set.attr("rld.rule").as_deref(), Some("g"));
    let txn = receiver
        .wait_for("rld.lease.txn", |r| r.span.name == "rld.lease.txn")
        .await;
    assert_eq!(txn.attr("rld.outcome").as_deref(), Some("answered"));
    assert_eq!(attr(&txn.resource, "rld.node_id"), Some(node.clone()));
    let state = receiver
        .wait_for("rld.etcd.state", |r| r.span.name == "rld.etcd.state")
        .await;
    assert_eq!(state.attr("rld.etcd.to").as_deref(), Some("healthy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_span_carries_what_the_shadow_rules_decided() {
    let (receiver, url) = Receiver::start().await;
    let d = TestDaemon::start_with(|c| {
        traced(&url, 0.0)(c);
        // The rule in force (2) and its next version as a shadow (1).
        let mut next = rule("api-next", "*", "api", 1, Duration::from_secs(3600));
        next.shadow = true;
        c.rules.push(next);
    })
    .await;
    let mut conn = d.connect().await;
    let mut spans = Vec::new();
    for n in [0x31u8, 0x41] {
        let sampled = context(n, true);
        let decision = conn
            .acquire(Acquire::new("alice", "api").trace(sampled))
            .await
            .unwrap();
        assert_eq!(
            decision.outcome,
            Outcome::Allowed,
            "the shadow never denies"
        );
        spans.push(
            receiver
                .wait_for("rld.decide", |r| r.span.trace_id == sampled.trace_id)
                .await,
        );
    }
    assert_eq!(spans[0].attr("rld.rule").as_deref(), Some("api"));
    assert_eq!(
        spans[0].attr("rld.shadows").as_deref(),
        Some("api-next=allowed")
    );
    assert_eq!(
        spans[1].attr("rld.shadows").as_deref(),
        Some("api-next=rejected")
    );
}
