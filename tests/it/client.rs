//! The Rust clients against a stopped and a restarted daemon: every call is
//! bounded by its timeout, and the next call after a failure reconnects.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rld::protocol::client::blocking;
use rld::protocol::{Acquire, Client, ClientError, ErrorBody, ErrorCode, Response, Timeouts};

use crate::harness::{ProcessDaemon, wait_for};

/// Short enough for a stopped daemon, long enough for a debug daemon on a
/// loaded machine.
const SHORT: Timeouts = Timeouts {
    connect: Duration::from_secs(1),
    request: Duration::from_secs(1),
};

/// Stops the daemon and waits until every one of its threads is stopped
/// (SIGSTOP reaches threads one by one: a worker could still answer).
fn stop(d: &ProcessDaemon) {
    d.signal(Signal::SIGSTOP);
    let stopped = || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .all(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('T'))
            })
    };
    wait_for(Duration::from_secs(5), stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_times_out_on_a_stopped_daemon_and_reconnects_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    let client = Client::connect_with(&d.socket, SHORT).await.unwrap();
    client.health().await.unwrap();

    stop(&d);
    let start = Instant::now();
    let err = client.acquire(Acquire::new("a", "b")).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "bounded by the timeout"
    );
    assert!(
        err.to_string().contains("did not answer Acquire within 1s"),
        "{err}"
    );
    d.signal(Signal::SIGCONT);

    // A restart on the same socket: the first call may see the old
    // connection closed; the next one reconnects.
    d.terminate();
    let d = ProcessDaemon::start(dir.path(), &[]);
    let first = client.health().await;
    if let Err(e) = &first {
        assert!(!matches!(e, ClientError::Timeout { .. }), "{e}");
    }
    client
        .health()
        .await
        .expect("reconnected after the restart");
    assert!(
        client
            .acquire(Acquire::new("a", "b"))
            .await
            .unwrap()
            .is_allowed()
    );
    drop(d);
}

#[test]
fn the_blocking_client_times_out_on_a_stopped_daemon_and_reconnects_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = ProcessDaemon::start(dir.path(), &[]);
    let mut client = blocking::Client::connect_with(&d.socket, SHORT).unwrap();
    client.health().unwrap();

    stop(&d);
    let start = Instant::now();
    let err = client.stats().unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "bounded by the timeout"
    );
    // Connecting to a stopped daemon is bounded too (the handshake is unanswered).
    let err = blocking::Client::connect_with(&d.socket, SHORT).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    d.signal(Signal::SIGCONT);

    d.terminate();
    let d = ProcessDaemon::start(dir.path(), &[]);
    let first = client.health();
    if let Err(e) = &first {
        assert!(!matches!(e, ClientError::Timeout { .. }), "{e}");
    }
    client.health().expect("reconnected after the restart");
    assert!(client.acquire(Acquire::new("a", "b")).unwrap().is_allowed());
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connection() {
    let d = crate::harness::TestDaemon::start(vec![]).await;
    let open = || {
        d.shared
            .metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let client = Client::connect(&d.socket).await.unwrap();
    client.health().await.unwrap();
    assert_eq!(open(), 1);
    drop(client);
    let start = Instant::now();
    while open() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "connection closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A listener that never accepts: once its backlog is full, a blocking
/// connect would wait forever; the blocking client gives up at its timeout.
#[test]
fn the_blocking_client_gives_up_on_a_full_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut held = Vec::new();
    // Fill the backlog (128 by default; bounded at 10,000 attempts).
    for _ in 0..10_000 {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()) {
            Ok(()) => held.push(fd),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("connect: {e}"),
        }
    }
    assert!(held.len() < 10_000, "the backlog filled");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(blocking::Client::connect_with(&path, SHORT).map(|_| ()));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("connect returned instead of hanging");
    let err = result.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
}

/// Both clients greet with version 3 and learn the daemon's range and
/// capabilities; an older daemon that speaks only version 1 (played here by
/// a scripted listener) is greeted again with version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_greet_with_version_3_and_fall_back_to_1() {
    let d = crate::harness::TestDaemon::start(vec![]).await;
    let conn = rld::protocol::Connection::connect(&d.socket).await.unwrap();
    let info = conn.server().clone();
    assert_eq!(
        (info.version, info.min_version, info.max_version),
        (3, 1, 3)
    );
    assert!(
        info.capabilities.iter().any(|c| c == "acquire-many"),
        "{info:?}"
    );
    assert!(
        !info.capabilities.iter().any(|c| c == "global-rules"),
        "standalone"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Four connections: each client greets with 3 (refused), then 1.
    let old_daemon = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for _ in 0..4 {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 7];
            s.read_exact(&mut hello).unwrap();
            let answer = if hello[6] == 1 {
                Response::HelloOk {
                    version: 1,
                    server: "rld 0.0.9".into(),
                    max_frame: 65536,
                }
            } else {
                let body = ErrorBody::new(ErrorCode::UNSUPPORTED_VERSION, "speaks 1 to 1");
                Response::Error(body)
            };
            let mut out = bytes::BytesMut::new();
            rld::protocol::codec::encode(&(u64::from(hello[4]), answer), &mut out).unwrap();
            s.write_all(&out).unwrap();
            if hello[6] == 1 {
                // Stays open until the client has read its answer and left.
                let _ = s.read(&mut [0u8; 1]);
            }
        }
    });
    let blocking_path = path.clone();
    let old = tokio::task::spawn_blocking(move || {
        blocking::Client::connect_with(&blocking_path, SHORT)
            .unwrap()
            .server()
            .clone()
    })
    .await
    .unwrap();
    assert_eq!((old.version, old.max_version), (1, 1));
    assert!(old.capabilities.is_empty());
    let conn = rld::protocol::Connection::connect_with(&path, SHORT)
        .await
        .unwrap();
    assert_eq!(conn.server().version, 1);
    drop(conn);
    tokio::task::spawn_blocking(move || old_daemon.join().unwrap())
        .await
        .unwrap();
}
