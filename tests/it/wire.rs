//! The wire format, pinned: the hex vectors printed in man/rld-protocol.7 are
//! encoded and decoded here, and a daemon is driven with hand-written bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BytesMut;
use rld::protocol::codec::{decode_request, decode_response, encode};
use rld::protocol::*;
use rld::rule::RuleSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{TestDaemon, rule};

/// `name -> frame bytes` from the `.\" test-vector: NAME` blocks of the page.
pub fn page_vectors() -> BTreeMap<String, Vec<u8>> {
    let page = include_str!("../../man/rld-protocol.7");
    let mut vectors = BTreeMap::new();
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix(".\\\" test-vector: ") else {
            continue;
        };
        let mut bytes = Vec::new();
        let mut in_example = false;
        for l in lines.by_ref() {
            match l {
                ".EX" => in_example = true,
                ".EE" => break,
                _ if in_example => {
                    // Hex bytes, then (after two spaces) the annotation.
                    let hex = l.split("  ").next().unwrap_or("");
                    for tok in hex.split_whitespace() {
                        bytes.push(u8::from_str_radix(tok, 16).unwrap_or_else(|_| {
                            panic!("vector {name}: {tok:?} is not a hex byte in {l:?}")
                        }));
                    }
                }
                _ => {}
            }
        }
        vectors.insert(name.to_owned(), bytes);
    }
    vectors
}

fn requests() -> Vec<(&'static str, RequestFrame<'static>)> {
    let trace =
        TraceContext::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .unwrap();
    let mut spec = RuleSpec::new("api", "*", "api/*", 100, Duration::from_secs(60));
    spec.burst = Some(150);
    let frame = |id, request| RequestFrame { id, request };
    vec![
        ("hello", frame(1, Request::Hello { version: 1 })),
        ("hello-v2", frame(1, Request::Hello { version: 2 })),
        (
            "acquire",
            frame(2, Request::Acquire(Acquire::new("alice", "api/search"))),
        ),
        (
            "acquire-trace",
            frame(
                300,
                Request::Acquire(Acquire {
                    client: "bob".into(),
                    resource: "db".into(),
                    cost: 5,
                    priority: Priority::Critical,
                    trace: Some(trace),
                }),
            ),
        ),
        (
            "acquire-many",
            frame(
                4,
                Request::AcquireMany(vec![
                    Acquire::new("a", "x"),
                    Acquire::new("b", "x").cost(2).priority(Priority::Low),
                ]),
            ),
        ),
        (
            "rule-set",
            frame(
                5,
                Request::RuleSet {
                    rules: vec![spec.into()],
                },
            ),
        ),
        ("rule-get", frame(6, Request::RuleGet { id: "api".into() })),
        ("rule-list", frame(7, Request::RuleList)),
        (
            "rule-delete",
            frame(8, Request::RuleDelete { id: "api".into() }),
        ),
        ("stats", frame(9, Request::Stats)),
        ("health", frame(10, Request::Health)),
        ("hello-v3", frame(1, Request::Hello { version: 3 })),
        (
            "rule-set-v3",
            frame(
                13,
                Request::RuleSetV3 {
                    rules: vec![spec_v3()],
                },
            ),
        ),
        (
            "rule-get-v3",
            frame(14, Request::RuleGetV3 { id: "each".into() }),
        ),
        ("rule-list-v3", frame(15, Request::RuleListV3)),
        (
            "explain",
            frame(16, Request::Explain(Acquire::new("alice", "api/x"))),
        ),
    ]
}

/// The version 3 vectors' rule: 100 per minute per client, a shadow.
fn spec_v3() -> RuleSpec {
    let mut spec = RuleSpec::new("each", "*", "api/*", 100, Duration::from_secs(60));
    spec.per = rld::rule::Per::Client;
    spec.shadow = true;
    spec
}

/// Vectors of the answers with nested reports (rule with every optional
/// field, stats and health with etcd), a bypassed decision and an error
/// under its request's id.
pub fn new_responses() -> Vec<(&'static str, ResponseFrame<'static>)> {
    use rld::rule::{Accuracy, OnFailure, Reserve, Scope};
    let frame = |id, response| ResponseFrame { id, response };
    let lease = LeaseInfo {
        batch: 12,
        per_request: false,
        members: 3,
        bound: 46.5,
        allowed_error: 0.02,
        held: 7,
    };
    let clock = ClockReport {
        offset_ns: -1500,
        max_skew_ns: 10_000_000,
        skewed: false,
        transitions: 0,
        delay_ns: 200_000,
        peers: vec![PeerClock {
            node: "web-2".into(),
            offset_ns: 3000,
            samples: 12,
        }],
    };
    let mut spec = RuleSpec::new("search", "*", "api/search", 1000, Duration::from_secs(1));
    spec.burst = Some(100);
    spec.expire_idle = Some(Duration::from_secs(3600));
    spec.reserve = Reserve {
        high: 50,
        normal: 100,
        low: 200,
    };
    spec.scope = Scope::Global;
    spec.on_failure = Some(OnFailure::Local);
    spec.accuracy = Some(Accuracy {
        error_bp: 200,
        horizon: Duration::from_secs(10),
    });
    spec.fallback_limit = Some(400);
    let latency = LatencySummary {
        count: 8,
        avg_ns: 5000,
        p50_ns: 4096,
        p90_ns: 8192,
        p99_ns: 16384,
        p999_ns: 16384,
        max_ns: 20000,
    };
    vec![
        (
            "welcome",
            frame(
                1,
                Response::Welcome(Welcome {
                    version: 2,
                    min_version: 1,
                    max_version: 2,
                    server: "rld".into(),
                    max_frame: 65536,
                    capabilities: vec!["acquire-many".into(), "priorities".into()],
                }),
            ),
        ),
        (
            "unsupported-version",
            frame(
                1,
                Response::UnsupportedVersion {
                    requested: 3,
                    min_version: 1,
                    max_version: 2,
                },
            ),
        ),
        (
            "decision-bypassed",
            frame(
                11,
                Response::Decision(Decision {
                    outcome: Outcome::Bypassed,
                    limit: 100,
                    remaining: 0,
                    retry_after_ns: 0,
                    reset_after_ns: 120_000_000_000,
                    rule: "api".into(),
                }),
            ),
        ),
        (
            "error-with-id",
            frame(
                6,
                Response::Error(ErrorBody::new(ErrorCode::RULE_NOT_FOUND, "no rule \"api\"")),
            ),
        ),
        (
            "rule-info",
            frame(
                12,
                Response::Rule(RuleInfo {
                    spec: spec.into(),
                    source: RuleSource::Etcd,
                    allowed: 5,
                    rejected: 1,
                    bypassed: 0,
                    idle_ns: 2_000_000_000,
                    lease: Some(lease.clone()),
                }),
            ),
        ),
        (
            "stats-report",
            frame(
                9,
                Response::Stats(Box::new(StatsReport {
                    uptime_ns: 60_000_000_000,
                    allowed: 5,
                    rejected: 1,
                    bypassed: 0,
                    unmatched: 2,
                    buckets: 3,
                    max_buckets: 1_000_000,
                    evicted_idle: 0,
                    evicted_lru: 0,
                    rules: 1,
                    rules_expired: 0,
                    connections_open: 1,
                    connections_total: 4,
                    connections_rejected: 0,
                    protocol_errors: 0,
                    latency,
                    per_rule: vec![RuleCounters {
                        id: "search".into(),
                        allowed: 5,
                        rejected: 1,
                        bypassed: 0,
                    }],
                    cluster: Some(ClusterStats {
                        state: "healthy".into(),
                        state_changes: 0,
                        members: 3,
                        lease_txns: 10,
                        lease_conflicts: 1,
                        lease_failures: 0,
                        tokens_leased: 120,
                        tokens_returned: 5,
                        debt_charged: 0,
                        dropped_events: 0,
                        txn_latency: latency,
                        rules: vec![GlobalRuleStats {
                            id: "search".into(),
                            lease,
                        }],
                        clock: clock.clone(),
                        lease_ops: 10,
                        lease_unknown: 0,
                        lease_resolved: 0,
                        lease_repairs: 0,
                        lease_clamped: 0,
                        bucket_cap_refusals: 0,
                        shares: Some(ShareStats {
                            count: 3,
                            valid_for_ns: 9_000_000_000,
                            recorded: 1,
                            records_created: 1,
                            records_deleted: 0,
                            raises: 2,
                            lowers: 1,
                            count_changes: 2,
                            etcd_db_bytes: 1_048_576,
                            etcd_nospace: false,
                        }),
                    }),
                })),
            ),
        ),
        (
            "health-etcd",
            frame(
                10,
                Response::Health(HealthReport {
                    state: ServingState::Ok,
                    version: "0.1.0".into(),
                    uptime_ns: 60_000_000_000,
                    rules: 1,
                    mode: "etcd".into(),
                    etcd: Some(EtcdHealth {
                        state: "healthy".into(),
                        since_unix_ms: 1_764_460_800_000,
                        members: 3,
                        node_id: "web-1".into(),
                        last_error: String::new(),
                        clock,
                    }),
                }),
            ),
        ),
    ]
}

/// Answers of version 3.
fn v3_responses() -> Vec<(&'static str, ResponseFrame<'static>)> {
    let frame = |id, response| ResponseFrame { id, response };
    vec![
        (
            "rule-v3",
            frame(
                14,
                Response::RuleV3(RuleInfo {
                    spec: spec_v3(),
                    source: RuleSource::Runtime,
                    allowed: 3,
                    rejected: 1,
                    bypassed: 0,
                    idle_ns: 0,
                    lease: None,
                }),
            ),
        ),
        (
            "explanation",
            frame(
                16,
                Response::Explanation(Explanation {
                    decision: Decision {
                        outcome: Outcome::Allowed,
                        limit: 10,
                        remaining: 9,
                        retry_after_ns: 0,
                        reset_after_ns: 6_000_000_000,
                        rule: "total".into(),
                    },
                    rules: vec![RuleExplained {
                        id: "total".into(),
                        per: rld::rule::Per::None,
                        shadow: false,
                        scope: rld::rule::Scope::Local,
                        overridden_by: None,
                        client: String::new(),
                        resource: String::new(),
                        tokens: 10,
                        depth: 10,
                        outcome: Some(Outcome::Allowed),
                        retry_after_ns: 0,
                        cost_too_high: false,
                    }],
                }),
            ),
        ),
    ]
}

fn responses() -> Vec<(&'static str, ResponseFrame<'static>)> {
    let frame = |id, response| ResponseFrame { id, response };
    let decision = |outcome, limit, remaining, retry, reset, rule: &'static str| Decision {
        outcome,
        limit,
        remaining,
        retry_after_ns: retry,
        reset_after_ns: reset,
        rule: rule.into(),
    };
    let mut all = vec![
        (
            "hello-ok",
            frame(
                1,
                Response::HelloOk {
                    version: 1,
                    server: "rld".into(),
                    max_frame: 65536,
                },
            ),
        ),
        (
            "decision-allowed",
            frame(
                2,
                Response::Decision(decision(Outcome::Allowed, 100, 99, 0, 600_000_000, "api")),
            ),
        ),
        (
            "decision-denied",
            frame(
                3,
                Response::Decision(decision(
                    Outcome::Denied,
                    100,
                    0,
                    250_000_000,
                    60_000_000_000,
                    "api",
                )),
            ),
        ),
        (
            "decisions",
            frame(
                4,
                Response::Decisions(vec![
                    BatchItem::Decision(decision(Outcome::Allowed, 10, 9, 0, 100_000_000, "r")),
                    BatchItem::Error(ErrorBody::new(ErrorCode::COST_EXCEEDS_BURST, "too big")),
                ]),
            ),
        ),
        (
            "error",
            frame(
                0,
                Response::Error(ErrorBody::new(
                    ErrorCode::FRAME_TOO_LARGE,
                    "frame too large",
                )),
            ),
        ),
        (
            "rules-applied",
            frame(5, Response::RulesApplied { changed: 1 }),
        ),
        ("rule-deleted", frame(8, Response::RuleDeleted)),
        (
            "health-report",
            frame(
                10,
                Response::Health(HealthReport {
                    state: ServingState::Ok,
                    version: "0.1.0".into(),
                    uptime_ns: 1_000_000_000,
                    rules: 2,
                    mode: "standalone".into(),
                    etcd: None,
                }),
            ),
        ),
    ];
    all.extend(new_responses());
    all
}

#[test]
fn man_page_vectors_match_the_codec() {
    if std::env::var_os("RLD_PRINT_VECTORS").is_some() {
        for (name, msg) in requests() {
            let mut encoded = BytesMut::new();
            encode(&msg, &mut encoded).unwrap();
            eprintln!("{name}: {}", hex(&encoded));
        }
        for (name, msg) in responses().into_iter().chain(v3_responses()) {
            let mut encoded = BytesMut::new();
            encode(&msg, &mut encoded).unwrap();
            eprintln!("{name}: {}", hex(&encoded));
        }
    }
    let vectors = page_vectors();
    let mut checked = 0;
    for (name, msg) in requests() {
        let bytes = vectors
            .get(name)
            .unwrap_or_else(|| panic!("no vector {name} in the page"));
        let mut encoded = BytesMut::new();
        encode(&msg, &mut encoded).unwrap();
        assert_eq!(&encoded[..], &bytes[..], "encoding of {name}");
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4, "length prefix of {name}");
        assert_eq!(
            decode_request(&bytes[4..]).unwrap(),
            msg,
            "decoding of {name}"
        );
        checked += 1;
    }
    for (name, msg) in responses().into_iter().chain(v3_responses()) {
        let bytes = vectors
            .get(name)
            .unwrap_or_else(|| panic!("no vector {name} in the page"));
        let mut encoded = BytesMut::new();
        encode(&msg, &mut encoded).unwrap();
        assert_eq!(&encoded[..], &bytes[..], "encoding of {name}");
        assert_eq!(
            decode_response(&bytes[4..]).unwrap(),
            msg,
            "decoding of {name}"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        vectors.len(),
        "every vector in the page is checked"
    );
}

/// Reads one frame from a raw stream.
pub async fn read_frame(stream: &mut UnixStream) -> Option<ResponseFrame<'static>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(decode_response(&body).expect("daemon sends valid frames"))
}

/// Opens a raw stream and completes the handshake.
pub async fn greeted(d: &TestDaemon) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 0, 1]).await.unwrap();
    assert!(matches!(
        read_frame(&mut s).await.unwrap().response,
        Response::HelloOk { .. }
    ));
    s
}

/// Whether the daemon closed the stream (EOF within 5 s).
pub async fn is_closed(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_bytes_get_hand_checked_answers() {
    let d = TestDaemon::start(vec![rule(
        "api",
        "*",
        "api/*",
        100,
        Duration::from_secs(60),
    )])
    .await;
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    // Hello id 1 version 1, then Acquire id 2 alice api/search, pipelined.
    let mut bytes = vec![0, 0, 0, 3, 1, 0, 1];
    bytes.extend_from_slice(&[0, 0, 0, 0x16, 2, 1, 5]);
    bytes.extend_from_slice(b"alice");
    bytes.push(10);
    bytes.extend_from_slice(b"api/search");
    bytes.extend_from_slice(&[1, 1, 0]);
    s.write_all(&bytes).await.unwrap();
    let hello = read_frame(&mut s).await.unwrap();
    assert_eq!(hello.id, 1);
    assert!(matches!(
        hello.response,
        Response::HelloOk {
            version: 1,
            max_frame: 65536,
            ..
        }
    ));
    // The decision, byte for byte: id 2, Decision, allowed, limit 100, 99 left,
    // retry 0, reset 600 ms, rule "api".
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(
        body,
        [
            2, 1, 0, 100, 99, 0, 0x80, 0x8c, 0x8d, 0x9e, 0x02, 3, b'a', b'p', b'i'
        ]
    );
}

/// Bytes as the page prints them (for `RLD_PRINT_VECTORS=1`, to write a
/// new vector).
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
