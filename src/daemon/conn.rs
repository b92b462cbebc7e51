//! One client connection: handshake, then frames in, answers out.
//!
//! Each wake-up decodes every complete frame in the read buffer, answers each
//! into one write buffer, and writes it with a single syscall, so a pipelining
//! client pays one wake-up per batch, not per request. Acquires are decided
//! inline (synchronous limiter call, requests borrowed from the frame, the
//! answer encoded straight into the buffer: no allocation per request). Admin
//! requests do blocking file I/O and run on the blocking pool. A bad frame gets
//! an error answer and closes this connection only.
//!
//! Fairness (see [`super::turns`]): a wake-up decides at most a few items
//! before the connection waits for a heavy turn; a batch is sized and its
//! answer reserved before it is decoded, and decoding it is charged to the
//! turn. Backpressure: the kernel holds at most about 64 KiB of a client's
//! unread answers (`SO_SNDBUF`); then flushing waits, without a heavy turn
//! held, and nothing more is read or decided for that client.
//!
//! Memory: a client that stops reading stops being read, and one that does not
//! read its answers for `write_timeout` is disconnected. A connection holds
//! two 8 KiB buffers; a large frame or answer grows them for that batch only
//! (they shrink back after). An `AcquireMany` answer larger than the write
//! threshold is reserved from the daemon-wide answer budget at its worst-case
//! size before anything in it is decided, and refused when it does not fit.
//! Idle time is counted from the last complete request, so a trickle of bytes
//! that never completes a frame cannot keep a connection.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::auth::Peer;
use super::cluster::Cluster;
use super::limiter::AcquireError;
use super::metrics::{LocalHistogram, Metrics};
use super::rulebook::RuleBookError;
use super::throttle::LogThrottle;
use super::turns::{FREE_ITEMS, TURN_ITEMS};
use crate::protocol::codec::{self, FrameCodec, HEADER_LEN, decode_request, encode};
use crate::protocol::{
    Acquire, BatchItem, Decision, ErrorBody, ErrorCode, MAX_BATCH_ITEMS, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, ProtocolError, Request, RequestFrame, Response, RuleSpecV2,
};
use crate::rule::RuleSpec;

/// What every daemon of this version offers, as named in `Welcome` (see
/// rld-protocol(7)); "global-rules" is added when limits are shared.
const CAPABILITIES: &[&str] = &[
    "acquire-many",
    "priorities",
    "trace-context",
    "rule-admin",
    "shutting-down",
];

/// The socket send buffer asked for (the kernel doubles it): with
/// [`FLUSH_BYTES`], the most answers a peer can leave unread before this
/// connection is neither read nor decided for until it reads.
const SEND_BUFFER: usize = 32 * 1024;
/// Answers are written out once this much is buffered, even mid-batch.
const FLUSH_BYTES: usize = 64 * 1024;
/// The buffers a connection starts with and shrinks back to.
const BUF_BYTES: usize = 8 * 1024;
/// Buffers grown beyond this for a large frame or answer are shrunk back
/// (at most one reallocation per large batch).
const SHRINK_ABOVE: usize = 4 * BUF_BYTES;
/// At shutdown, requests already sent are answered up to this many bytes...
const DRAIN_BYTES: usize = 1024 * 1024;
/// ...that arrive without a pause longer than this.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Serves one connection until the peer leaves, breaks the protocol, idles
/// out, or `cancel` fires (then requests already read are still answered).
pub async fn serve(stream: UnixStream, peer: Peer, shared: Arc<Shared>, cancel: CancellationToken) {
    // Bound what a peer that does not read can have decided for it: the
    // kernel holds at most this much of its unread answers (it doubles the
    // figure for its own bookkeeping), then flushes wait and nothing more
    // is read or decided for it.
    if let Err(e) =
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER)
    {
        tracing::debug!("cannot set the send buffer of a connection: {e}");
    }
    let shared_now = shared.clock.now_ns();
    let mut conn = Conn {
        codec: FrameCodec::new(shared.max_frame),
        stream,
        peer,
        shared,
        read_buf: BytesMut::with_capacity(BUF_BYTES),
        write_buf: BytesMut::with_capacity(BUF_BYTES),
        greeted: false,
        last_request_ns: shared_now,
        reserved: 0,
        stopping: false,
        latency: LocalHistogram::default(),
        timing: Timing::default(),
        turn_left: FREE_ITEMS,
        heavy: false,
        batch_reserved: 0,
        spent: 0,
        gated: false,
    };
    if let Err(e) = conn.run(&cancel).await {
        tracing::debug!(uid = conn.peer.uid, "connection ended: {e}");
    }
    conn.latency.merge_into(&conn.shared.metrics.latency);
}

impl Drop for Conn {
    /// Budget still reserved (an answer never written) goes back however the
    /// connection ends.
    fn drop(&mut self) {
        self.shared.answers.release(self.peer.uid, self.reserved);
        self.end_heavy_turn();
    }
}

struct Conn {
    stream: UnixStream,
    peer: Peer,
    shared: Arc<Shared>,
    codec: FrameCodec,
    read_buf: BytesMut,
    write_buf: BytesMut,
    greeted: bool,
    latency: LocalHistogram,
    timing: Timing,
    /// When the last complete request arrived, on the daemon's clock (idle
    /// time counts from here).
    last_request_ns: u64,
    /// Bytes of the answer budget held until the write buffer is written.
    reserved: usize,
    /// Shutdown has drained what was sent before it: requests are answered
    /// `shutting_down`, not decided.
    stopping: bool,
    /// Items this turn may still decide (see [`super::turns`]).
    turn_left: usize,
    /// This connection holds a heavy turn.
    heavy: bool,
    /// The answer of the batch being decoded, reserved before decoding.
    batch_reserved: usize,
    /// Items of work done in this wake-up...
    spent: usize,
    /// ...were more than a free turn's: the next read waits for a heavy
    /// turn.
    gated: bool,
}

/// Whether to keep the connection after a request.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

impl Conn {
    async fn run(&mut self, cancel: &CancellationToken) -> io::Result<()> {
        loop {
            let next = self.answer_buffered().await?;
            self.latency.merge_into(&self.shared.metrics.latency);
            self.flush().await?;
            if next == Next::Close {
                return Ok(());
            }
            if cancel.is_cancelled() {
                // Shutdown began while we were answering: what the peer
                // already sent is still answered (closing with unread bytes
                // would reset its connection).
                return self.drain().await;
            }
            let idle_until = self.shared.idle_timeout.map(|t| {
                tokio::time::Instant::from_std(self.shared.clock.instant_at(self.last_request_ns))
                    + t
            });
            let read = self.read_some();
            let n = tokio::select! {
                biased;
                () = cancel.cancelled() => return self.drain().await,
                r = idle_timeout(idle_until, read) => r?,
            };
            if n == 0 {
                if !self.read_buf.is_empty() {
                    let e = ProtocolError::Malformed(format!(
                        "connection closed in the middle of a frame ({} bytes unread)",
                        self.read_buf.len()
                    ));
                    self.protocol_error(0, &e);
                    // The peer may have only shut down its write side.
                    let _ = self.flush().await;
                }
                return Ok(());
            }
        }
    }

    /// Shutdown: answers whatever the peer had already sent (up to
    /// [`DRAIN_BYTES`]), answers what comes next `shutting_down`, then
    /// closes. Reads wait a few milliseconds: a `try_read` could see stale
    /// readiness and leave sent bytes unread, and closing with unread bytes
    /// resets the peer's connection.
    async fn drain(&mut self) -> io::Result<()> {
        self.read_pending().await?;
        self.answer_buffered().await?;
        // Requests that arrive after those are not decided: each is answered
        // shutting_down (so the client knows to retry elsewhere), then the
        // connection closes.
        self.stopping = true;
        self.read_pending().await?;
        self.answer_buffered().await?;
        self.flush().await
    }

    /// Reads what the peer sends without a pause longer than [`DRAIN_WAIT`],
    /// up to [`DRAIN_BYTES`].
    async fn read_pending(&mut self) -> io::Result<()> {
        let mut read = 0;
        while read < DRAIN_BYTES {
            let more = self.stream.read_buf(&mut self.read_buf);
            match tokio::time::timeout(DRAIN_WAIT, more).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => read += n,
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the peer sent. A connection that needed heavy turns in its
    /// last wake-up reads only in a heavy turn too (taken once the socket is
    /// readable): its reading and copying is shared fairly like its
    /// deciding, and a light client is not held up by hundreds of busy
    /// connections all reading at once.
    async fn read_some(&mut self) -> io::Result<usize> {
        loop {
            self.stream.readable().await?;
            if self.gated && !self.heavy {
                self.next_turn().await;
            }
            match self.stream.try_read_buf(&mut self.read_buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.end_heavy_turn(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Answers every complete frame in the read buffer.
    async fn answer_buffered(&mut self) -> io::Result<Next> {
        self.timing.now = self.shared.clock.now_ns();
        let wake_up = self.timing.now;
        // Requests borrow from the buffer while answers are written, so take
        // it out of `self` for the duration (no per-frame split or refcount).
        let mut buf = std::mem::take(&mut self.read_buf);
        let unread = buf.len();
        // Before frames are consumed: `capacity` counts from the read
        // position, so afterwards it no longer shows the allocation's size.
        let allocated = buf.capacity();
        if !self.heavy {
            self.turn_left = FREE_ITEMS;
        }
        self.spent = 0;
        let result = self.answer_frames(&mut buf).await;
        // More than a free turn's work: the next read waits for a turn.
        self.gated = self.spent > FREE_ITEMS;
        self.end_heavy_turn();
        if buf.len() != unread {
            // The wake-up's clock reading: no second one.
            self.last_request_ns = wake_up;
        }
        if allocated > SHRINK_ABOVE && buf.len() < BUF_BYTES {
            // A large frame has been answered: give its memory back.
            let mut small = BytesMut::with_capacity(BUF_BYTES);
            small.extend_from_slice(&buf);
            buf = small;
        }
        self.read_buf = buf;
        result
    }

    async fn answer_frames(&mut self, buf: &mut BytesMut) -> io::Result<Next> {
        loop {
            let len = match self.codec.frame_len(buf) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(Next::Continue),
                Err(e) => {
                    self.protocol_error(0, &e);
                    return Ok(Next::Close);
                }
            };
            // A batch's size, read without decoding it: an oversized batch
            // (25,000 items decode to about 2 MB, 3 million to 290), or one
            // whose answer the budget cannot hold, is refused before it is
            // built, and building it is charged to the turn.
            let batch = (len > SMALL_FRAME)
                .then(|| codec::batch_len(&buf[HEADER_LEN..HEADER_LEN + len]))
                .flatten();
            let weight =
                1 + batch.map_or(0, |(_, items)| items.min(MAX_BATCH_ITEMS) / DECODE_SHARE);
            if self.turn_left < weight.min(TURN_ITEMS) {
                // This turn is used up: what it answered goes out first (a
                // peer that does not read is not served on: backpressure),
                // without a heavy turn held while that waits.
                self.end_heavy_turn();
                self.flush().await?;
                self.next_turn().await;
            }
            self.charge(weight);
            let frame = &buf[HEADER_LEN..HEADER_LEN + len];
            let next = match batch {
                Some((id, items)) if items > MAX_BATCH_ITEMS => self.batch_too_large(id, items),
                Some((id, items)) if !self.reserve_answer(items) => {
                    self.budget_exhausted(id, "nothing was decided: ")
                }
                _ => match decode_request(frame) {
                    Ok(RequestFrame { id, request }) => self.answer(id, request).await,
                    Err(bad) => {
                        self.protocol_error(bad.id, &bad.error);
                        Next::Close
                    }
                },
            };
            // A reservation the frame did not use (answered shutting_down,
            // or malformed) stays in `reserved` until the next flush; it
            // must not count for the next batch.
            self.batch_reserved = 0;
            buf.advance(HEADER_LEN + len);
            if next == Next::Close {
                return Ok(next);
            }
            if self.write_buf.len() >= FLUSH_BYTES {
                // Never wait on a peer while holding a heavy turn.
                if self.heavy {
                    self.end_heavy_turn();
                    self.turn_left = 0;
                }
                self.flush().await?;
            }
        }
    }

    async fn answer(&mut self, id: u64, request: Request<'_>) -> Next {
        if self.stopping {
            let message = "rld is stopping; this request was not decided: retry, on this \
                           daemon once it is back or on another";
            return self.error(id, ErrorCode::SHUTTING_DOWN, message.into());
        }
        if !self.greeted {
            return self.hello(id, &request);
        }
        // Version 3 asks for rules with every field; 1 and 2 in their layout.
        let v3 = matches!(request, Request::RuleGetV3 { .. } | Request::RuleListV3);
        match request {
            Request::Acquire(acquire) => self.acquire(id, &acquire).await,
            Request::AcquireMany(items) => self.acquire_many(id, &items).await,
            Request::Hello { .. } => self.error(
                id,
                ErrorCode::INVALID_ARGUMENT,
                "Hello was already received on this connection".into(),
            ),
            Request::RuleGet { id: rule } | Request::RuleGetV3 { id: rule } => {
                let rule = rule.into_owned();
                let answer = report(&self.shared, move |s| match s.rule_info(&rule) {
                    Some(info) if v3 => Response::RuleV3(info),
                    Some(info) => Response::Rule(info.map_spec(RuleSpecV2::from)),
                    None => Response::Error(RuleBookError::NotFound(rule).to_wire()),
                });
                self.respond(id, &answer.await)
            }
            Request::RuleList | Request::RuleListV3 => {
                let answer = report(&self.shared, move |s| {
                    let rules = s.rule_list();
                    if v3 {
                        Response::RulesV3(rules)
                    } else {
                        Response::Rules(
                            rules
                                .into_iter()
                                .map(|r| r.map_spec(RuleSpecV2::from))
                                .collect(),
                        )
                    }
                });
                self.respond(id, &answer.await)
            }
            Request::Stats => {
                let answer = report(&self.shared, |s| Response::Stats(Box::new(s.stats())));
                self.respond(id, &answer.await)
            }
            Request::Health => self.respond(id, &Response::Health(self.shared.health())),
            Request::Explain(a) => {
                let now = self.shared.clock.now_ns();
                match self
                    .shared
                    .limiter
                    .explain(&a.client, &a.resource, a.cost, a.priority, now)
                {
                    Ok(e) => self.respond(id, &Response::Explanation(e)),
                    Err(e) => self.respond(id, &Response::Error(acquire_error(&e))),
                }
            }
            Request::RuleSet { .. } | Request::RuleSetV3 { .. } => {
                let rules: Vec<RuleSpec> = match request {
                    Request::RuleSet { rules } => rules.into_iter().map(RuleSpec::from).collect(),
                    Request::RuleSetV3 { rules } => rules,
                    _ => unreachable!("matched above"),
                };
                if !self.shared.auth.may_administer(&self.peer) {
                    return self.refuse(id, "set rules");
                }
                // Rules set now hold printable text only (rules loaded from
                // older state files may not: they are shown escaped).
                if let Some(e) = rules.iter().find_map(|r| r.validate_new().err()) {
                    let e = RuleBookError::from(crate::daemon::limiter::RuleSetError::from(e));
                    return self.respond(id, &Response::Error(e.to_wire()));
                }
                let traced = self.shared.telemetry.as_ref().map(|t| {
                    let ids: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
                    (Arc::clone(t), ids.join(","), std::time::SystemTime::now())
                });
                let answer = match self.shared.cluster.clone() {
                    Some(cluster) => self.set_in_etcd(&cluster, rules).await,
                    None => {
                        let book = Arc::clone(&self.shared.rulebook);
                        match tokio::task::spawn_blocking(move || book.set(rules)).await {
                            Ok(Ok(changed)) => Response::RulesApplied { changed },
                            Ok(Err(e)) => Response::Error(e.to_wire()),
                            Err(e) => internal(format!("rule change failed: {e}")),
                        }
                    }
                };
                if let Some((t, ids, started)) = traced {
                    t.rule_change("rld.rule.set", &ids, started, outcome_of(&answer));
                }
                self.respond(id, &answer)
            }
            Request::RuleDelete { id: rule } => {
                if !self.shared.auth.may_administer(&self.peer) {
                    return self.refuse(id, "delete rules");
                }
                let rule = rule.into_owned();
                let traced = self
                    .shared
                    .telemetry
                    .clone()
                    .map(|t| (t, rule.clone(), std::time::SystemTime::now()));
                let answer = match self.shared.cluster.clone() {
                    Some(cluster) => self.delete_in_etcd(&cluster, rule).await,
                    None => {
                        let book = Arc::clone(&self.shared.rulebook);
                        match tokio::task::spawn_blocking(move || book.delete(&rule)).await {
                            Ok(Ok(())) => Response::RuleDeleted,
                            Ok(Err(e)) => Response::Error(e.to_wire()),
                            Err(e) => internal(format!("rule change failed: {e}")),
                        }
                    }
                };
                if let Some((t, rule, started)) = traced {
                    t.rule_change("rld.rule.delete", &rule, started, outcome_of(&answer));
                }
                self.respond(id, &answer)
            }
        }
    }

    /// `RuleSet` with etcd: checked here first (an invalid rule never reaches
    /// etcd), written in one transaction, mirrored locally at once; the other
    /// daemons apply it from their watch.
    async fn set_in_etcd(&mut self, cluster: &Cluster, rules: Vec<RuleSpec>) -> Response<'static> {
        let book = Arc::clone(&self.shared.rulebook);
        let (checked, rules) = off_workers(move || (book.check_etcd_set(&rules), rules)).await;
        let changed = match checked {
            Ok(changed) => changed,
            Err(e) => return Response::Error(e.to_wire()),
        };
        if let Err(e) = cluster.put_rules(&rules).await {
            return Response::Error(ErrorBody::new(ErrorCode::UNAVAILABLE, e.to_string()));
        }
        let book = Arc::clone(&self.shared.rulebook);
        off_workers(move || book.apply_etcd_upserts(rules)).await;
        Response::RulesApplied { changed }
    }

    async fn delete_in_etcd(&mut self, cluster: &Cluster, rule: String) -> Response<'static> {
        let book = Arc::clone(&self.shared.rulebook);
        let (checked, rule) = off_workers(move || (book.check_delete(&rule), rule)).await;
        if let Err(e) = checked {
            return Response::Error(e.to_wire());
        }
        match cluster.delete_rule(&rule).await {
            Ok(true) => {
                let book = Arc::clone(&self.shared.rulebook);
                off_workers(move || book.apply_etcd_delete(&rule)).await;
                Response::RuleDeleted
            }
            Ok(false) => Response::Error(RuleBookError::NotFound(rule).to_wire()),
            Err(e) => Response::Error(ErrorBody::new(ErrorCode::UNAVAILABLE, e.to_string())),
        }
    }

    fn hello(&mut self, id: u64, request: &Request<'_>) -> Next {
        let Request::Hello { version } = *request else {
            self.protocol_error(id, &ProtocolError::HandshakeRequired);
            return Next::Close;
        };
        if version > PROTOCOL_VERSION {
            // The client speaks version 2 or later: it reads the range as
            // fields.
            self.respond(
                id,
                &Response::UnsupportedVersion {
                    requested: version,
                    min_version: MIN_PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                },
            );
            return Next::Close;
        }
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            self.protocol_error(id, &ProtocolError::UnsupportedVersion(version));
            return Next::Close;
        }
        self.greeted = true;
        let server = concat!("rld ", env!("CARGO_PKG_VERSION"));
        let max_frame = self.shared.max_frame as u32;
        if version == 1 {
            let server = server.into();
            return self.respond(
                id,
                &Response::HelloOk {
                    version,
                    server,
                    max_frame,
                },
            );
        }
        let mut capabilities: Vec<std::borrow::Cow<'_, str>> =
            CAPABILITIES.iter().map(|&c| c.into()).collect();
        if self.shared.cluster.is_some() {
            capabilities.push("global-rules".into());
        }
        let welcome = crate::protocol::Welcome {
            version,
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            server: server.into(),
            max_frame,
            capabilities,
        };
        self.respond(id, &Response::Welcome(welcome))
    }

    /// The hot path: decide and encode the answer straight into the write
    /// buffer (borrowing the rule id under the shard lock), nothing else.
    async fn acquire(&mut self, id: u64, a: &Acquire<'_>) -> Next {
        let out = &mut self.write_buf;
        let mut answer = |d: &Decision<'_>| encode(&(id, Response::Decision(d.clone())), out);
        let encoded = decide(
            &self.shared,
            &mut self.timing,
            &mut self.latency,
            a,
            &mut answer,
        )
        .await;
        match encoded {
            Ok(Ok(())) => Next::Continue,
            Ok(Err(e)) => self.error(id, ErrorCode::INTERNAL, e.to_string()),
            Err(e) => self.respond(id, &Response::Error(acquire_error(&e))),
        }
    }

    /// Decides each item in order, appending each answer to one
    /// `Response::Decisions` frame as it is decided (no intermediate list).
    async fn acquire_many(&mut self, id: u64, items: &[Acquire<'_>]) -> Next {
        if items.len() > MAX_BATCH_ITEMS {
            return self.batch_too_large(id, items.len());
        }
        let worst = items.len() * MAX_ITEM_ANSWER_BYTES;
        let large = worst > FLUSH_BYTES;
        let reserved_before = std::mem::take(&mut self.batch_reserved) == worst;
        if large && !reserved_before {
            if !self.shared.answers.reserve(self.peer.uid, worst) {
                return self.budget_exhausted(id, "nothing was decided: ");
            }
            self.reserved += worst;
        }
        let start = codec::begin_frame(&mut self.write_buf);
        let mut result = codec::append(&(id, DECISIONS_VARIANT, items.len()), &mut self.write_buf);
        for a in items {
            if self.turn_left == 0 {
                // Mid-frame: the answer so far stays buffered (its length
                // is written when it is complete).
                self.end_heavy_turn();
                self.next_turn().await;
            }
            self.charge(1);
            let Conn {
                shared,
                write_buf: out,
                timing,
                latency,
                ..
            } = self;
            let mut answer = |d: &Decision<'_>| codec::append(&BatchItem::Decision(d.clone()), out);
            let item = decide(shared, timing, latency, a, &mut answer).await;
            result = result.and(match item {
                Ok(encoded) => encoded,
                Err(e) => {
                    let body = acquire_error(&e);
                    shared.metrics.error_answered(body.code);
                    codec::append(&BatchItem::Error(body), out)
                }
            });
        }
        let out = &mut self.write_buf;
        let result = result.and_then(|()| codec::finish_frame(out, start));
        if large {
            // Keep only what the answer really takes.
            let unused = worst.saturating_sub(out.len() - start);
            self.reserved -= unused;
            self.shared.answers.release(self.peer.uid, unused);
        }
        match result {
            Ok(()) => Next::Continue,
            Err(e) => {
                self.write_buf.truncate(start);
                self.error(id, ErrorCode::INTERNAL, e.to_string())
            }
        }
    }

    /// Reserves the worst-case answer of a batch of `items` before it is
    /// decoded, when that answer is large; false when the budget cannot
    /// hold it.
    fn reserve_answer(&mut self, items: usize) -> bool {
        let worst = items * MAX_ITEM_ANSWER_BYTES;
        if worst <= FLUSH_BYTES {
            return true;
        }
        if !self.shared.answers.reserve(self.peer.uid, worst) {
            return false;
        }
        self.reserved += worst;
        self.batch_reserved = worst;
        true
    }

    fn batch_too_large(&mut self, id: u64, items: usize) -> Next {
        let message = format!(
            "AcquireMany of {items} items: the most one batch may hold is {MAX_BATCH_ITEMS} \
             (its answer must fit in one frame); nothing was decided, split the batch"
        );
        self.error(id, ErrorCode::INVALID_ARGUMENT, message)
    }

    /// The answer when the answer budget cannot hold a large answer.
    fn budget_exhausted(&mut self, id: u64, what: &str) -> Next {
        let message = format!(
            "the daemon's memory for large answers ({} MiB, answer_memory) is in use; \
             {what}retry shortly or ask for less",
            self.shared.answers.limit() >> 20
        );
        self.error(id, ErrorCode::UNAVAILABLE, message)
    }

    fn refuse(&mut self, id: u64, what: &str) -> Next {
        static REFUSED: LogThrottle = LogThrottle::new();
        let message = self.shared.auth.refusal(&self.peer, what);
        if let Some(suppressed) = REFUSED.allow() {
            tracing::warn!(uid = self.peer.uid, pid = ?self.peer.pid, suppressed, "refused: {message}");
        }
        self.error(id, ErrorCode::PERMISSION_DENIED, message)
    }

    fn error(&mut self, id: u64, code: ErrorCode, message: String) -> Next {
        self.respond(id, &Response::Error(ErrorBody::new(code, message)))
    }

    fn protocol_error(&mut self, id: u64, e: &ProtocolError) {
        Metrics::inc(&self.shared.metrics.protocol_errors);
        tracing::debug!(uid = self.peer.uid, pid = ?self.peer.pid, "protocol error: {e}");
        self.error(id, e.code(), e.to_string());
    }

    fn respond(&mut self, id: u64, response: &Response<'_>) -> Next {
        if let Response::Error(body) = response {
            self.shared.metrics.error_answered(body.code);
        }
        let start = self.write_buf.len();
        // An (id, response) tuple encodes exactly like `ResponseFrame`.
        if let Err(e) = encode(&(id, response), &mut self.write_buf) {
            self.shared.metrics.error_answered(ErrorCode::INTERNAL);
            let body = ErrorBody::new(ErrorCode::INTERNAL, format!("answer too large: {e}"));
            encode(&(id, Response::Error(body)), &mut self.write_buf)
                .expect("an error answer always fits");
            return Next::Continue;
        }
        // A large read-only answer (a long rule list) is charged to the
        // answer budget like a large batch; refusing it changes nothing.
        let size = self.write_buf.len() - start;
        if size > FLUSH_BYTES {
            if self.shared.answers.reserve(self.peer.uid, size) {
                self.reserved += size;
            } else {
                self.write_buf.truncate(start);
                return self.budget_exhausted(id, "");
            }
        }
        Next::Continue
    }

    /// Waits for a heavy turn (see [`super::turns`]), then lets the other
    /// tasks of this worker run before deciding on.
    async fn next_turn(&mut self) {
        self.shared.turns.take(self.peer.uid).await;
        self.heavy = true;
        tokio::task::yield_now().await;
        self.timing.now = self.shared.clock.now_ns();
        self.turn_left = TURN_ITEMS;
    }

    /// Counts `items` of work against this turn.
    fn charge(&mut self, items: usize) {
        self.turn_left = self.turn_left.saturating_sub(items);
        self.spent = self.spent.saturating_add(items);
    }

    fn end_heavy_turn(&mut self) {
        if std::mem::take(&mut self.heavy) {
            self.shared.turns.end();
        }
    }

    /// Writes the buffered answers, disconnecting a peer that does not read
    /// them within `write_timeout`. Most writes complete at once; only one
    /// that would block arms the timer.
    async fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        while written < self.write_buf.len() {
            match self.stream.try_write(&self.write_buf[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let rest = self.stream.write_all(&self.write_buf[written..]);
                    match tokio::time::timeout(self.shared.write_timeout, rest).await {
                        Ok(done) => done?,
                        Err(_) => {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!(
                                    "peer did not read its answers for {:?} ({} bytes unsent); \
                                     closed",
                                    self.shared.write_timeout,
                                    self.write_buf.len() - written
                                ),
                            ));
                        }
                    }
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.write_buf.clear();
        if self.write_buf.capacity() > SHRINK_ABOVE {
            self.write_buf = BytesMut::with_capacity(BUF_BYTES);
        }
        if self.reserved != 0 {
            let reserved = std::mem::take(&mut self.reserved);
            self.shared.answers.release(self.peer.uid, reserved);
        }
        Ok(())
    }
}

/// The most bytes one item of a `Decisions` answer can take: a decision with
/// every varint at its longest and the longest rule id, or an error with the
/// longest message an acquire can fail with (checked by a test).
const MAX_ITEM_ANSWER_BYTES: usize = 1 + 3 + 2 + MAX_ACQUIRE_ERROR_BYTES;
/// The longest acquire error message.
const MAX_ACQUIRE_ERROR_BYTES: usize = 640;
/// Frames up to this long are read as one item of work; longer ones are
/// sized first (a batch's item count).
const SMALL_FRAME: usize = 256;
/// Building a batch from its frame is charged to a turn as this fraction
/// of deciding its items.
const DECODE_SHARE: usize = 4;
/// The most answer bytes one batch may reserve.
pub const LARGEST_ANSWER: usize = MAX_BATCH_ITEMS * MAX_ITEM_ANSWER_BYTES;

/// The wire index of `Response::Decisions` (see rld-protocol(7)).
const DECISIONS_VARIANT: u32 = 2;

/// One decision in this many has its latency measured.
const SAMPLE_EVERY: u32 = 8;

/// The time decisions are made at. Reading the clock costs about as much as a
/// decision, so it is read at each wake-up and around one decision in
/// [`SAMPLE_EVERY`] (whose latency is then recorded); the others reuse the
/// latest reading, at most a few microseconds old, which can only make a
/// refill marginally conservative.
#[derive(Debug, Default)]
struct Timing {
    now: u64,
    decisions: u32,
}

impl Timing {
    /// [`Limiter::decide`](super::limiter::Limiter::decide) at the current
    /// time, sampling its latency.
    #[inline]
    fn decide<R>(
        &mut self,
        shared: &Shared,
        latency: &mut LocalHistogram,
        a: &Acquire<'_>,
        answer: impl FnOnce(&Decision<'_>) -> R,
    ) -> Result<R, AcquireError> {
        self.decisions = self.decisions.wrapping_add(1);
        let limiter = &shared.limiter;
        // The first decision of a connection is always timed (short-lived
        // clients like rlctl then show up in the latency figures).
        if self.decisions % SAMPLE_EVERY != 1 {
            return limiter.decide(&a.client, &a.resource, a.cost, a.priority, self.now, answer);
        }
        let start = shared.clock.now_ns();
        let result = limiter.decide(&a.client, &a.resource, a.cost, a.priority, start, answer);
        self.now = shared.clock.now_ns();
        latency.record(self.now - start);
        result
    }
}

fn internal(message: String) -> Response<'static> {
    Response::Error(ErrorBody::new(ErrorCode::INTERNAL, message))
}

/// A rule change's outcome for its span.
fn outcome_of(answer: &Response<'_>) -> Result<(), String> {
    match answer {
        Response::Error(e) => Err(format!("{}: {}", e.code.name(), e.message)),
        _ => Ok(()),
    }
}

/// Decides one acquire. Almost always synchronous; only a global rule whose
/// accuracy forbids batching (`per_request`) waits for one lease transaction,
/// bounded by a short deadline after which its `on_failure` policy decides.
async fn decide<R>(
    shared: &Shared,
    timing: &mut Timing,
    latency: &mut LocalHistogram,
    a: &Acquire<'_>,
    answer: &mut impl FnMut(&Decision<'_>) -> R,
) -> Result<R, AcquireError> {
    if let Some(trace) = &a.trace
        && !trace.is_valid()
    {
        Metrics::inc(&shared.metrics.invalid_trace_contexts);
    }
    if let Some(t) = &shared.telemetry
        && let Some(span) = t.decision(a.trace.as_ref().filter(|c| c.is_valid()))
    {
        // Inside the shard lock only the outcome is copied; the span is
        // filled in and ended after the lock is released.
        let mut seen = None;
        let mut traced = |d: &Decision<'_>| {
            seen = Some((d.outcome, d.remaining, d.rule.to_string()));
            answer(d)
        };
        // Synchronous: the shadows seen are this decision's.
        let (result, shadows) = crate::daemon::limiter::observe_shadows(|| {
            timing.decide(shared, latency, a, &mut traced)
        });
        match (&result, seen) {
            (Ok(_), Some((outcome, remaining, rule))) => {
                span.end(a, outcome, remaining, rule, &shadows)
            }
            (Err(e), _) => span.fail(e.to_string()),
            (Ok(_), None) => span.fail("no decision".into()),
        }
        return result;
    }
    decide_untraced(shared, timing, latency, a, answer).await
}

async fn decide_untraced<R>(
    shared: &Shared,
    timing: &mut Timing,
    latency: &mut LocalHistogram,
    a: &Acquire<'_>,
    answer: &mut impl FnMut(&Decision<'_>) -> R,
) -> Result<R, AcquireError> {
    timing.decide(shared, latency, a, &mut *answer)
}

/// A report (stats, rules) made on the blocking pool, a few at a time
/// however many clients ask.
async fn report(
    shared: &Arc<Shared>,
    make: impl FnOnce(&Shared) -> Response<'static> + Send + 'static,
) -> Response<'static> {
    let _turn = shared.reports.acquire().await.expect("never closed");
    let shared = Arc::clone(shared);
    off_workers(move || make(&shared)).await
}

/// Runs `work` (a scan of the table, a rule book change) on the blocking
/// pool, so that it never holds up the runtime's workers and the decisions
/// they serve.
async fn off_workers<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down and drops this task too.
        Err(_) => std::future::pending().await,
    }
}

/// `read`, failing at `until` (the idle deadline).
async fn idle_timeout<F: Future<Output = io::Result<usize>>>(
    until: Option<tokio::time::Instant>,
    read: F,
) -> io::Result<usize> {
    match until {
        Some(until) => tokio::time::timeout_at(until, read)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete request within idle_timeout; closed",
                ))
            }),
        None => read.await,
    }
}

fn acquire_error(e: &AcquireError) -> ErrorBody<'static> {
    let code = match e {
        AcquireError::CostExceedsBurst { .. } => ErrorCode::COST_EXCEEDS_BURST,
        AcquireError::Empty(_) | AcquireError::TooLong { .. } => ErrorCode::INVALID_ARGUMENT,
    };
    ErrorBody::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::decode_response;
    use crate::protocol::{Outcome, ResponseFrame};

    /// No item of a batch answer is longer than [`MAX_ITEM_ANSWER_BYTES`], so
    /// the largest batch's answer fits in a response frame.
    #[test]
    fn batch_answers_fit_the_bound() {
        use crate::protocol::MAX_RESPONSE_FRAME;
        use crate::rule::MAX_RULE_ID_BYTES;
        let rule: String = "\"\\".repeat(MAX_RULE_ID_BYTES / 2);
        let worst_error = acquire_error(&AcquireError::CostExceedsBurst {
            cost: u64::MAX,
            burst: u64::MAX,
            rule: rule.clone().into(),
        });
        let worst_decision = Decision {
            outcome: Outcome::Denied,
            limit: u64::MAX,
            remaining: u64::MAX,
            retry_after_ns: u64::MAX,
            reset_after_ns: u64::MAX,
            rule: rule.into(),
        };
        let too_long = acquire_error(&AcquireError::TooLong {
            field: "resource",
            len: usize::MAX,
        });
        for item in [
            BatchItem::Error(worst_error.clone()),
            BatchItem::Error(too_long),
            BatchItem::Decision(worst_decision),
        ] {
            let len = postcard::to_stdvec(&item).unwrap().len();
            assert!(len <= MAX_ITEM_ANSWER_BYTES, "{len} bytes: {item:?}");
        }
        assert!(worst_error.message.len() <= MAX_ACQUIRE_ERROR_BYTES);
        let header = 4 + 10 + 1 + 5;
        assert!(header + MAX_BATCH_ITEMS * MAX_ITEM_ANSWER_BYTES <= MAX_RESPONSE_FRAME);
    }

    /// The piecewise batch frame of `acquire_many` is byte for byte the
    /// owned `Response::Decisions`.
    #[test]
    fn piecewise_batch_frames_match_the_owned_encoding() {
        let decision = Decision {
            outcome: Outcome::Denied,
            limit: 5,
            remaining: 0,
            retry_after_ns: 7,
            reset_after_ns: 9,
            rule: "r".into(),
        };
        let error = acquire_error(&AcquireError::Empty("client"));
        let mut fast = BytesMut::new();
        let start = codec::begin_frame(&mut fast);
        codec::append(&(3u64, DECISIONS_VARIANT, 2usize), &mut fast).unwrap();
        codec::append(&BatchItem::Decision(decision.clone()), &mut fast).unwrap();
        codec::append(&BatchItem::Error(error.clone()), &mut fast).unwrap();
        codec::finish_frame(&mut fast, start).unwrap();
        let owned = ResponseFrame {
            id: 3,
            response: Response::Decisions(vec![
                BatchItem::Decision(decision),
                BatchItem::Error(error),
            ]),
        };
        let mut slow = BytesMut::new();
        encode(&owned, &mut slow).unwrap();
        assert_eq!(fast, slow);
        assert_eq!(decode_response(&fast[4..]).unwrap(), owned);
    }
}
