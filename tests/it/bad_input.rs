//! Bad input gets a clear error and loses nothing: the offending connection is
//! answered (where possible) and closed, every other connection keeps being
//! served, and the rules in force never change because of a bad request.

use std::io::Write;
use std::time::Duration;

use rld::protocol::*;
use rld::rule::{MAX_NAME_BYTES, MAX_RULE_ID_BYTES, RuleSpec};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::harness::{TestDaemon, rule};
use crate::wire::{greeted, is_closed, read_frame};

const HOUR: Duration = Duration::from_secs(3600);

fn error_of(frame: ResponseFrame<'static>) -> (u64, ErrorCode, String) {
    match frame.response {
        Response::Error(e) => (frame.id, e.code, e.message.into_owned()),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Sends `bytes` on a fresh greeted (or not) connection and expects one error
/// with `code`, then a closed connection, while a bystander keeps working.
async fn expect_rejected(d: &TestDaemon, greet: bool, bytes: &[u8], code: ErrorCode) -> String {
    let mut bystander = d.connect().await;
    let mut s = if greet {
        greeted(d).await
    } else {
        UnixStream::connect(&d.socket).await.unwrap()
    };
    s.write_all(bytes).await.unwrap();
    let (_, got, message) = error_of(read_frame(&mut s).await.expect("an error answer"));
    assert_eq!(got, code, "{message}");
    assert!(is_closed(&mut s).await, "connection closed after {code}");
    let dec = bystander
        .acquire(Acquire::new("bystander", "r"))
        .await
        .unwrap();
    assert!(dec.is_allowed(), "other connections are unaffected");
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_are_refused() {
    let d = TestDaemon::start(vec![]).await;
    let msg = expect_rejected(
        &d,
        false,
        b"GET / HTTP/1.1\r\n\r\n",
        ErrorCode::FRAME_TOO_LARGE,
    )
    .await;
    assert!(msg.contains("exceeds the maximum of 65536"), "{msg}");
    // Small garbage that fits in a frame is malformed.
    expect_rejected(
        &d,
        false,
        &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
        ErrorCode::MALFORMED_FRAME,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_is_refused_before_reading_the_body() {
    let d = TestDaemon::start(vec![]).await;
    let len = (DEFAULT_MAX_FRAME as u32 + 1).to_be_bytes();
    let msg = expect_rejected(&d, true, &len, ErrorCode::FRAME_TOO_LARGE).await;
    assert!(msg.contains("65537"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_is_reported_when_the_peer_stops_sending() {
    let d = TestDaemon::start(vec![]).await;
    let mut s = greeted(&d).await;
    s.write_all(&[0, 0, 0, 10, 1, 2, 3]).await.unwrap();
    s.shutdown().await.unwrap();
    let (id, code, msg) = error_of(read_frame(&mut s).await.unwrap());
    assert_eq!((id, code), (0, ErrorCode::MALFORMED_FRAME));
    assert!(msg.contains("middle of a frame"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_requests_and_versions_are_named() {
    let d = TestDaemon::start(vec![]).await;
    // Request variant 42 with id 7.
    let msg = expect_rejected(&d, true, &[0, 0, 0, 2, 7, 42], ErrorCode::UNKNOWN_REQUEST).await;
    assert!(msg.contains("unknown request type 42"), "{msg}");
    // Hello for version 0 (below every version): the error, for any client.
    let msg = expect_rejected(
        &d,
        false,
        &[0, 0, 0, 3, 1, 0, 0],
        ErrorCode::UNSUPPORTED_VERSION,
    )
    .await;
    assert!(msg.contains("versions 1 to 3"), "{msg}");
    // Hello for version 99, from a client of version 2 or later: the range
    // as fields, then the connection closes.
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 0, 99]).await.unwrap();
    let answer = read_frame(&mut s).await.unwrap();
    assert_eq!(
        answer.response,
        Response::UnsupportedVersion {
            requested: 99,
            min_version: 1,
            max_version: 3
        }
    );
    assert!(is_closed(&mut s).await);
    // No Hello first.
    expect_rejected(
        &d,
        false,
        &[0, 0, 0, 2, 1, 7],
        ErrorCode::HANDSHAKE_REQUIRED,
    )
    .await;
    // An Acquire cut short inside a string, and trailing junk after a request.
    expect_rejected(
        &d,
        true,
        &[0, 0, 0, 4, 2, 1, 9, b'a'],
        ErrorCode::MALFORMED_FRAME,
    )
    .await;
    expect_rejected(&d, true, &[0, 0, 0, 3, 2, 7, 0], ErrorCode::MALFORMED_FRAME).await;
    let stats = d.connect().await.stats().await.unwrap();
    assert!(stats.protocol_errors >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_echoes_the_request_id_when_it_is_readable() {
    let d = TestDaemon::start(vec![]).await;
    let mut s = greeted(&d).await;
    s.write_all(&[0, 0, 0, 2, 0xac, 0x02]).await.unwrap(); // id 300, no request type
    let (id, code, _) = error_of(read_frame(&mut s).await.unwrap());
    assert_eq!((id, code), (300, ErrorCode::MALFORMED_FRAME));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_up_to_the_maximum_are_fine_and_longer_ones_are_errors() {
    let d = TestDaemon::start(vec![rule("all", "*", "*", 1000, HOUR)]).await;
    let mut c = d.connect().await;
    let long = "é".repeat(MAX_NAME_BYTES / 2);
    assert_eq!(long.len(), MAX_NAME_BYTES);
    assert!(
        c.acquire(Acquire::new(long.as_str(), "ünïcødé/☃"))
            .await
            .unwrap()
            .is_allowed()
    );
    let too_long = format!("{long}x");
    let err = c
        .acquire(Acquire::new(too_long.as_str(), "r"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Server(e) if e.code == ErrorCode::INVALID_ARGUMENT),
        "{err}"
    );
    assert!(err.to_string().contains("maximum is 512 bytes"), "{err}");
    let err = c.acquire(Acquire::new("", "r")).await.unwrap_err();
    assert!(err.to_string().contains("client is empty"), "{err}");
    // The connection survives argument errors.
    assert!(
        c.acquire(Acquire::new("a", "r"))
            .await
            .unwrap()
            .is_allowed()
    );

    let id = "ü".repeat(MAX_RULE_ID_BYTES / 2);
    c.rule_set(vec![rule(&id, "x", "y", 1, HOUR)])
        .await
        .unwrap();
    let err = c
        .rule_set(vec![rule(&format!("{id}z"), "x", "z", 1, HOUR)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("maximum is 128 bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rules_are_rejected_naming_the_field_and_change_nothing() {
    let d = TestDaemon::start(vec![]).await;
    let mut c = d.connect().await;
    c.rule_set(vec![rule("good", "a", "b", 5, HOUR)])
        .await
        .unwrap();
    let mut zero_window = rule("w", "x", "y", 1, Duration::ZERO);
    zero_window.burst = Some(1);
    let mut no_tokens = rule("l", "x", "y", 0, HOUR);
    no_tokens.burst = Some(0);
    let cases: Vec<(Vec<RuleSpec>, &str)> = vec![
        (vec![zero_window], "window"),
        (vec![no_tokens], "limit"),
        (vec![rule("bad*id", "x*y", "y", 1, HOUR)], "client"),
        // Same patterns as "good": neither is more specific.
        (
            vec![rule("twin", "a", "b", 7, HOUR)],
            "same client and resource patterns",
        ),
        // The same id twice with different specs in one request.
        (
            vec![
                rule("dup", "p", "q", 1, HOUR),
                rule("dup", "p", "q", 2, HOUR),
            ],
            "appears twice",
        ),
    ];
    for (rules, needle) in cases {
        let err = c.rule_set(rules).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(e) if e.code == ErrorCode::INVALID_RULE),
            "{err}"
        );
        assert!(
            err.to_string().contains(needle),
            "{err} should mention {needle}"
        );
    }
    let rules = c.rule_list().await.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].spec, rule("good", "a", "b", 5, HOUR));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_does_not_wedge_the_daemon() {
    let d = TestDaemon::start(vec![rule("all", "*", "*", 1_000_000, HOUR)]).await;
    let socket = d.socket.clone();
    // Pipeline requests without ever reading answers, until the socket blocks.
    let writer = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.write_all(&[0, 0, 0, 3, 1, 0, 1]).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let frame = [0, 0, 0, 9, 2, 1, 1, b'a', 1, b'b', 1, 1, 0];
        let mut sent = 0usize;
        let frames = frame.repeat(1024);
        while sent < 64 << 20 {
            match s.write(&frames) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        (sent, s)
    });
    let (sent, stuck) = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(
        sent < 64 << 20,
        "the daemon stopped reading a peer that does not read"
    );
    let mut c = d.connect().await;
    let dec = tokio::time::timeout(Duration::from_secs(5), c.acquire(Acquire::new("x", "y")))
        .await
        .expect("answered while another peer is stuck")
        .unwrap();
    assert!(dec.is_allowed());
    let stats = c.stats().await.unwrap();
    assert_eq!(
        stats.protocol_errors, 0,
        "the stuck peer sent valid requests"
    );
    assert!(
        stats.allowed > 1000,
        "the daemon answered the stuck peer until it blocked"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_closed() {
    let d = TestDaemon::start_with(|c| c.idle_timeout = Some(Duration::from_millis(200))).await;
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&[0, 0]).await.unwrap(); // half a header, then silence
    assert!(is_closed(&mut s).await);
    assert!(d.connect().await.health().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_with_a_reason() {
    let d = TestDaemon::start_with(|c| c.max_connections = 2).await;
    let _a = d.connect().await;
    let _b = d.connect().await;
    let err = Connection::connect(&d.socket).await.unwrap_err();
    assert!(err.to_string().contains("limit of 2 connections"), "{err}");
    drop(_a);
    // Its slot comes back once the daemon has seen it close.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d
        .shared
        .metrics
        .connections_open
        .load(std::sync::atomic::Ordering::Relaxed)
        > 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(Connection::connect(&d.socket).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_the_frame_limit_is_refused_by_the_client() {
    let d = TestDaemon::start(vec![]).await;
    let mut c = d.connect().await;
    let name = "n".repeat(500);
    let items: Vec<Acquire> = (0..200).map(|_| Acquire::new(name.as_str(), "r")).collect();
    let err = c.acquire_many(items).await.unwrap_err();
    assert!(err.to_string().contains("exceeds the maximum"), "{err}");
    assert!(
        c.health().await.is_ok(),
        "nothing was sent, the connection is fine"
    );
}
