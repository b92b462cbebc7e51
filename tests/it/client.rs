//! The Rust clients against a stopped and a restarted daemon: every call is
//! bounded by its timeout, and the next call after a failure reconnects.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rld::protocol::client::blocking;
use rld::protocol::{Acquire, Client, ClientError, Timeouts};

use crate::harness::{ProcessDaemon, wait_for};

const SHORT: Timeouts = Timeouts {
    connect: Duration::from_millis(500),
    request: Duration::from_millis(300),
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
        err.to_string()
            .contains("did not answer Acquire within 300ms"),
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
