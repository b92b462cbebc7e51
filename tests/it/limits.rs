//! What one local client can take from the daemon: connection slots per uid
//! and for admins, idle time that a trickle cannot renew, peers that do not
//! read, and batches whose answers would not fit (in a frame or in the
//! daemon's answer budget), refused before anything is decided.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rld::protocol::codec::encode;
use rld::protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{TestDaemon, rule};
use crate::wire::{greeted, read_frame};

const HOUR: Duration = Duration::from_secs(3600);

/// A process running as `uid` that opens `count` connections to `socket`
/// and holds them until dropped; `outcomes` says, per connection, `ok` or
/// the refusal the daemon sent.
struct Holder {
    child: Child,
    outcomes: Vec<String>,
}

/// Opens each connection, sends Hello and prints the first answer frame in
/// hex (a refused connection's error, or HelloOk); then holds them all until
/// its stdin closes.
const HOLDER: &str = r#"
import socket, sys
path, count = sys.argv[1], int(sys.argv[2])
held = []
def read(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(bytes([0, 0, 0, 3, 1, 0, 1]))
    except OSError:
        pass  # refused and closed already; its answer is still readable
    head = read(s, 4)
    print(read(s, int.from_bytes(head, "big")).hex() if len(head) == 4 else "", flush=True)
    held.append(s)
sys.stdin.read()
"#;

impl Holder {
    fn start(uid: u32, socket: &std::path::Path, count: usize) -> Holder {
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .args(["/usr/bin/python3", "-c", HOLDER])
            .arg(socket)
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv and /usr/bin/python3 (scripts/deps test installs them)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let outcomes = (0..count)
            .map(|_| {
                let hex = lines.next().expect("one line per connection").unwrap();
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                match rld::protocol::codec::decode_response(&bytes)
                    .expect("an answer frame")
                    .response
                {
                    Response::HelloOk { .. } => "ok".to_owned(),
                    Response::Error(e) => format!("refused {}", e.message),
                    other => panic!("unexpected first answer {other:?}"),
                }
            })
            .collect();
        Holder { child, outcomes }
    }

    fn accepted(&self) -> usize {
        self.outcomes.iter().filter(|o| *o == "ok").count()
    }

    fn refusals(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter_map(|o| o.strip_prefix("refused "))
            .collect()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_take_every_slot_and_admins_keep_theirs() {
    let d = TestDaemon::start_with(|c| {
        c.socket_mode = 0o666;
        c.max_connections = 8;
        c.max_connections_per_uid = Some(3);
        c.admin_connections = Some(2);
    })
    .await;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let greedy = Holder::start(65534, &d.socket, 5);
    assert_eq!(greedy.accepted(), 3, "{:?}", greedy.outcomes);
    for refusal in greedy.refusals() {
        assert!(
            refusal.contains("uid 65534 already holds 3 connections"),
            "{refusal}"
        );
    }
    let second = Holder::start(65533, &d.socket, 3);
    assert_eq!(second.accepted(), 3, "{:?}", second.outcomes);
    // 6 of 8 held by non-admins: the last 2 are kept for admins.
    let third = Holder::start(65532, &d.socket, 1);
    assert_eq!(third.accepted(), 0);
    assert!(
        third.refusals()[0].contains("keeps them for admins"),
        "{:?}",
        third.outcomes
    );

    // Root (this process) still gets in and can change rules.
    let mut admin = d.connect().await;
    let changed = admin
        .rule_set(vec![rule("r", "*", "*", 5, HOUR)])
        .await
        .expect("an admin changes rules while users hold their slots");
    assert_eq!(changed, 1);
    let _second_admin = d.connect().await;
    let err = Connection::connect(&d.socket).await.unwrap_err();
    assert!(err.to_string().contains("limit of 8 connections"), "{err}");

    // Slots come back when their holder leaves.
    drop(greedy);
    let start = Instant::now();
    while admin.stats().await.unwrap().connections_open > 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slots given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = Holder::start(65532, &d.socket, 1);
    assert_eq!(after.accepted(), 1, "{:?}", after.outcomes);
    let stats = admin.stats().await.unwrap();
    assert_eq!(
        stats.connections_rejected, 4,
        "2 per uid, 1 admin slot, 1 full"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_of_bytes_does_not_keep_a_connection() {
    let d = TestDaemon::start_with(|c| c.idle_timeout = Some(Duration::from_secs(1))).await;
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 0, 1]).await.unwrap();
    read_frame(&mut s).await.unwrap();
    // A frame announced as 1,000 bytes, sent one byte per 50 ms: each byte
    // arrives well inside the idle timeout, no request ever completes.
    s.write_all(&[0, 0, 3, 232]).await.unwrap();
    let start = Instant::now();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if s.write_all(&[0]).await.is_err() {
            break true;
        }
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), s.read(&mut byte)).await
        {
            break true;
        }
        if start.elapsed() > Duration::from_secs(10) {
            break false;
        }
    };
    assert!(closed, "a connection completing no request was kept 10 s");
    // Complete requests do keep a connection: each renews the idle time.
    let mut c = d.connect().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.health()
            .await
            .expect("a connection with requests is kept");
    }
}

/// Pipelines acquires on `socket` without reading answers until the daemon
/// stops reading; returns the stuck stream.
fn stuck_peer(socket: std::path::PathBuf) -> std::os::unix::net::UnixStream {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 0, 1]).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let frames = [0, 0, 0, 9, 2, 1, 1, b'a', 1, b'b', 1, 1, 0].repeat(1024);
    let mut sent = 0usize;
    while sent < 64 << 20 && s.write(&frames).is_ok() {
        sent += frames.len();
    }
    assert!(sent < 64 << 20, "the daemon stopped reading");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_its_answers_is_disconnected() {
    let d = TestDaemon::start_with(|c| {
        c.rules = vec![rule("all", "*", "*", 1_000_000, HOUR)];
        c.write_timeout = Duration::from_millis(300);
    })
    .await;
    let socket = d.socket.clone();
    let stuck = tokio::task::spawn_blocking(move || stuck_peer(socket))
        .await
        .unwrap();
    let mut c = d.connect().await;
    let start = Instant::now();
    loop {
        let open = c.stats().await.unwrap().connections_open;
        if open == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{open} connections open 10 s after a peer stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stuck);
}

/// Encodes `items` acquires of `resource` as one `AcquireMany` frame.
fn batch(id: u64, items: usize, resource: &str) -> BytesMut {
    let items: Vec<Acquire> = (0..items).map(|_| Acquire::new("c", resource)).collect();
    let mut buf = BytesMut::new();
    encode(
        &RequestFrame {
            id,
            request: Request::AcquireMany(items),
        },
        &mut buf,
    )
    .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_answer_cannot_fit_is_refused_before_deciding() {
    let d = TestDaemon::start_with(|c| c.max_frame = 16 * 1024 * 1024).await;
    let mut c = d.connect().await;
    let items: Vec<Acquire> = (0..=MAX_BATCH_ITEMS)
        .map(|_| Acquire::new("c", "r"))
        .collect();
    let err = c.acquire_many(items).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("the most one batch may hold is 25000"),
        "{err}"
    );
    assert_eq!(c.stats().await.unwrap().unmatched, 0, "nothing was decided");
    let items: Vec<Acquire> = (0..MAX_BATCH_ITEMS)
        .map(|_| Acquire::new("c", "r"))
        .collect();
    let answers = c.acquire_many(items).await.unwrap();
    assert_eq!(answers.len(), MAX_BATCH_ITEMS);
    assert_eq!(c.stats().await.unwrap().unmatched, MAX_BATCH_ITEMS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_share_a_budget_and_are_refused_before_deciding() {
    let long_rule = "r".repeat(100);
    let d = TestDaemon::start_with(|c| {
        c.rules = vec![rule(&long_rule, "*", "*", 1 << 30, HOUR)];
        c.max_frame = 1 << 20;
        c.answer_memory = 16 << 20;
        c.write_timeout = HOUR;
    })
    .await;
    // A holds the budget: its answer (about 3 MB) waits until A reads.
    let mut a = greeted(&d).await;
    a.write_all(&batch(1, MAX_BATCH_ITEMS, "x")).await.unwrap();
    let mut c = d.connect().await;
    let start = Instant::now();
    while c.stats().await.unwrap().allowed < MAX_BATCH_ITEMS as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "A's batch decided"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // B's batch cannot reserve its worst case: refused, nothing decided.
    let mut b = greeted(&d).await;
    b.write_all(&batch(2, MAX_BATCH_ITEMS, "y")).await.unwrap();
    let answer = read_frame(&mut b).await.unwrap();
    let Response::Error(e) = answer.response else {
        panic!("expected a refusal, got a {:?}", answer.response)
    };
    assert_eq!(e.code, ErrorCode::UNAVAILABLE);
    assert!(e.message.contains("answer_memory"), "{e}");
    assert_eq!(c.stats().await.unwrap().allowed, MAX_BATCH_ITEMS as u64);
    // A holds only its answer's real size (about 118 bytes an item here),
    // not the worst case it reserved.
    let held = d.shared.answers.used();
    assert!(
        held < MAX_BATCH_ITEMS * 200,
        "{held} bytes held for A's answer"
    );
    // Once A has read its answer, the budget is free again.
    let frame = read_frame(&mut a).await.unwrap();
    assert!(matches!(frame.response, Response::Decisions(ref d) if d.len() == MAX_BATCH_ITEMS));
    // (Given back just after the daemon's last write: wait for it.)
    let start = Instant::now();
    while d.shared.answers.used() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "budget given back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.write_all(&batch(3, MAX_BATCH_ITEMS, "y")).await.unwrap();
    let frame = read_frame(&mut b).await.unwrap();
    assert!(matches!(frame.response, Response::Decisions(ref d) if d.len() == MAX_BATCH_ITEMS));
}

/// Sends its stdin to the socket as is, then reads `count` answer frames and
/// prints how many it got.
const SENDER: &str = r#"
import socket, sys
path, count = sys.argv[1], int(sys.argv[2])
import threading
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
# Sent from a thread while answers are read, so that neither side's buffer
# has to hold the whole exchange.
data = sys.stdin.buffer.read()
threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
got = 0
buf = b""
while got < count:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    buf += chunk
    while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
        buf = buf[4 + int.from_bytes(buf[:4], "big"):]
        got += 1
print(got)
"#;

#[test]
fn a_flood_of_refused_admin_requests_does_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("rld.toml");
    std::fs::write(&config, "socket_mode = '0666'\n").unwrap();
    let d =
        crate::harness::ProcessDaemon::start(dir.path(), &["--config", config.to_str().unwrap()]);
    const REQUESTS: usize = 20_000;
    let mut frames = BytesMut::new();
    frames.extend_from_slice(&[0, 0, 0, 3, 1, 0, 1]);
    for id in 0..REQUESTS as u64 {
        let request = Request::RuleDelete { id: "r".into() };
        encode(
            &RequestFrame {
                id: id + 2,
                request,
            },
            &mut frames,
        )
        .unwrap();
    }
    let start = Instant::now();
    let mut sender = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", SENDER])
        .arg(&d.socket)
        .arg((REQUESTS + 1).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sender.stdin.take().unwrap().write_all(&frames).unwrap();
    let out = sender.wait_with_output().unwrap();
    let answered: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // At most 5 lines in each second the flood spanned.
    let most = 5 * (start.elapsed().as_secs() as usize + 2);
    assert_eq!(answered, REQUESTS + 1, "every request answered");
    let log = d.log();
    d.terminate();
    let refusals = log.lines().filter(|l| l.contains("refused:")).count();
    assert!(
        (1..=most).contains(&refusals),
        "{refusals} refusal lines logged for {REQUESTS} refused requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_cannot_take_more_than_the_table_byte_budget() {
    let budget = 4 << 20;
    let d = TestDaemon::start_with(|c| {
        c.rules = vec![rule("all", "*", "*", 1_000_000, HOUR)];
        c.max_table_bytes = budget;
        c.max_frame = 1 << 20;
    })
    .await;
    let mut c = d.connect().await;
    let name = "n".repeat(500);
    let clients: Vec<String> = (0..20_000).map(|i| format!("{i}-{name}")).collect();
    for chunk in clients.chunks(1_000) {
        let items = chunk
            .iter()
            .map(|client| Acquire::new(client.as_str(), name.as_str()));
        let answers = c.acquire_many(items.collect()).await.unwrap();
        assert_eq!(answers.len(), chunk.len());
    }
    let table = d.shared.limiter.table();
    assert!(table.bytes() <= budget, "{} bytes held", table.bytes());
    let stats = c.stats().await.unwrap();
    assert!(stats.evicted_lru > 10_000, "{stats:?}");
    // About 1.1 KB per bucket: the budget keeps a few thousand of them.
    assert!(
        (1_000..=4_000).contains(&stats.buckets),
        "{} buckets kept",
        stats.buckets
    );
}

/// The memory rld.toml(5) says connections take is what they take: the
/// daemon's resident memory over 1,000 idle connections, then after one
/// large answer each, per connection, within 30% below and 10% above the
/// page's figures (a change of memory use makes the page change too).
#[test]
fn idle_connections_take_the_memory_rld_toml_5_says() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man/rld.toml.5"),
    )
    .unwrap();
    let text = page.replace('\n', " ");
    let figure = |after: &str| -> f64 {
        let at = text
            .find(after)
            .unwrap_or_else(|| panic!("rld.toml(5) says {after:?}"));
        let rest = &text[at + after.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let idle_kib = figure("connections take about 4096 \\(mu");
    let answered_kib = figure("MiB idle, about 4096 \\(mu");
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rld.toml");
    std::fs::write(
        &config,
        "max_connections = 4096\nmax_connections_per_uid = 4096\n",
    )
    .unwrap();
    let d = crate::harness::ProcessDaemon::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--log-level", "error"],
    );
    let rss_kib = || -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    const N: usize = 1000;
    std::thread::sleep(Duration::from_millis(300));
    let start = rss_kib();
    let hello = [0u8, 0, 0, 3, 1, 0, 1];
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(&hello).unwrap();
        read_blocking(&mut s);
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle = (rss_kib() - start) / N as f64;
    let large = batch(2, (65536 - 8) / 7, "b");
    for s in &mut conns {
        s.write_all(&large).unwrap();
        read_blocking(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let answered = (rss_kib() - start) / N as f64;
    eprintln!(
        "per connection: {idle:.1} KiB idle (page: {idle_kib}), {answered:.1} KiB after a \
         large answer (page: {answered_kib})"
    );
    for (what, measured, stated) in [
        ("idle", idle, idle_kib),
        ("after a large answer", answered, answered_kib),
    ] {
        assert!(
            measured <= stated * 1.1 && measured >= stated * 0.7,
            "{what}: {measured:.1} KiB per connection, rld.toml(5) says {stated} KiB"
        );
    }
}

/// Reads one frame (blocking).
fn read_blocking(s: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    use std::io::Read;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
    s.read_exact(&mut body).unwrap();
    body
}
