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
        ("rule-set", frame(5, Request::RuleSet { rules: vec![spec] })),
        ("rule-get", frame(6, Request::RuleGet { id: "api".into() })),
        ("rule-list", frame(7, Request::RuleList)),
        (
            "rule-delete",
            frame(8, Request::RuleDelete { id: "api".into() }),
        ),
        ("stats", frame(9, Request::Stats)),
        ("health", frame(10, Request::Health)),
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
    vec![
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
    ]
}

#[test]
fn man_page_vectors_match_the_codec() {
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
    for (name, msg) in responses() {
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
