//! [`Client`]: one connection shared by many tasks. Callers encode their own
//! frames; a writer task sends whatever is queued in one write per wake-up and a
//! reader task hands each response to its caller by id, so concurrent callers
//! are pipelined automatically. Each call waits at most the request timeout;
//! once the connection fails, the next call connects again (one caller
//! reconnects, the others wait for it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::BytesMut;
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::{
    ClientError, Connection, ServerInfo, Timeouts, expect_applied, expect_decision,
    expect_decisions, expect_deleted, expect_health, expect_rule, expect_rules, expect_stats,
};
use crate::protocol::codec::{FrameCodec, HEADER_LEN, decode_response, encode};
use crate::protocol::{
    Acquire, BatchItem, Decision, HealthReport, MAX_RESPONSE_FRAME, ProtocolError, Request,
    Response, RuleInfo, StatsReport,
};
use crate::rule::RuleSpec;

type Reply = oneshot::Sender<Result<Response<'static>, ClientError>>;

/// Requests queued for the writer task before callers wait.
const QUEUE_DEPTH: usize = 1024;

/// A cloneable, pipelining client. Must be created inside a Tokio runtime.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    timeouts: Timeouts,
    /// The current connection (replaced when it fails).
    current: RwLock<Arc<Shared>>,
    /// Held by the one caller that reconnects.
    reconnecting: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Shared {
    outgoing: mpsc::Sender<Outgoing>,
    next_id: AtomicU64,
    server: ServerInfo,
    routes: Mutex<Routes>,
}

#[derive(Debug, Default)]
struct Routes {
    waiting: HashMap<u64, Reply>,
    /// Set once the connection is gone; later calls fail at once with it.
    closed: Option<String>,
}

#[derive(Debug)]
struct Outgoing {
    id: u64,
    frame: BytesMut,
    reply: Reply,
}

impl Client {
    /// Connects, performs the handshake and starts the I/O tasks, with the
    /// default [`Timeouts`].
    ///
    /// # Errors
    /// As [`Connection::connect`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, Timeouts::default()).await
    }

    /// [`Client::connect`] with the given timeouts.
    ///
    /// # Errors
    /// As [`Connection::connect`].
    pub async fn connect_with(
        path: impl AsRef<Path>,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref().to_owned();
        let shared = start(Connection::connect_with(&path, timeouts).await?);
        Ok(Client {
            inner: Arc::new(Inner {
                path,
                timeouts,
                current: RwLock::new(shared),
                reconnecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The daemon's handshake answer (of the current connection).
    pub fn server(&self) -> ServerInfo {
        self.inner.current.read().server.clone()
    }

    /// The current connection, reconnecting first if it failed.
    async fn live(&self) -> Result<Arc<Shared>, ClientError> {
        let current = Arc::clone(&self.inner.current.read());
        if current.routes.lock().closed.is_none() {
            return Ok(current);
        }
        let _one = self.inner.reconnecting.lock().await;
        let current = Arc::clone(&self.inner.current.read());
        if current.routes.lock().closed.is_none() {
            return Ok(current); // another caller reconnected meanwhile
        }
        let conn = Connection::connect_with(&self.inner.path, self.inner.timeouts).await?;
        let fresh = start(conn);
        *self.inner.current.write() = Arc::clone(&fresh);
        Ok(fresh)
    }

    /// Sends a request and waits for its answer (at most the request
    /// timeout); an `Error` response becomes [`ClientError::Server`].
    ///
    /// # Errors
    /// The request is too large, the connection failed (the next call
    /// reconnects), the server refused, or [`ClientError::Timeout`].
    pub async fn call(&self, request: &Request<'_>) -> Result<Response<'static>, ClientError> {
        let after = self.inner.timeouts.request;
        let deadline = tokio::time::Instant::now() + after;
        let timed_out = || ClientError::Timeout {
            what: request.name(),
            after,
        };
        // Reconnecting counts against the call's deadline too.
        let shared = tokio::time::timeout_at(deadline, self.live())
            .await
            .map_err(|_| timed_out())??;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::new();
        encode(&(id, request), &mut frame)?;
        let len = frame.len() - HEADER_LEN;
        let max = shared.server.max_frame as usize;
        if len > max {
            return Err(ProtocolError::FrameTooLarge { len, max }.into());
        }
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            shared
                .outgoing
                .send(Outgoing { id, frame, reply })
                .await
                .map_err(|_| ClientError::Closed)?;
            answer.await.map_err(|_| ClientError::Closed)?
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(Response::Error(e))) => Err(ClientError::Server(e)),
            Ok(result) => result,
            Err(_) => {
                shared.routes.lock().waiting.remove(&id);
                Err(timed_out())
            }
        }
    }

    /// See [`Connection::acquire`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn acquire(&self, acquire: Acquire<'_>) -> Result<Decision<'static>, ClientError> {
        let request = Request::Acquire(acquire);
        expect_decision(&request, self.call(&request).await?)
    }

    /// See [`Connection::acquire_many`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn acquire_many(
        &self,
        items: Vec<Acquire<'_>>,
    ) -> Result<Vec<BatchItem<'static>>, ClientError> {
        let request = Request::AcquireMany(items);
        expect_decisions(&request, self.call(&request).await?)
    }

    /// See [`Connection::rule_set`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn rule_set(&self, rules: Vec<RuleSpec>) -> Result<u32, ClientError> {
        let request = super::rule_set_request(&self.server(), rules)?;
        expect_applied(&request, self.call(&request).await?)
    }

    /// See [`Connection::explain`].
    ///
    /// # Errors
    /// Bad names, or a daemon older than protocol version 3.
    pub async fn explain(
        &self,
        acquire: crate::protocol::Acquire<'_>,
    ) -> Result<crate::protocol::Explanation<'static>, ClientError> {
        let request = super::explain_request(&self.server(), acquire)?;
        super::expect_explanation(&request, self.call(&request).await?)
    }

    /// See [`Connection::rule_get`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn rule_get(&self, id: &str) -> Result<RuleInfo, ClientError> {
        let request = super::rule_get_request(&self.server(), id);
        expect_rule(&request, self.call(&request).await?)
    }

    /// See [`Connection::rule_list`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn rule_list(&self) -> Result<Vec<RuleInfo>, ClientError> {
        let request = super::rule_list_request(&self.server());
        expect_rules(&request, self.call(&request).await?)
    }

    /// See [`Connection::rule_delete`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn rule_delete(&self, id: &str) -> Result<(), ClientError> {
        let request = Request::RuleDelete { id: id.into() };
        expect_deleted(&request, self.call(&request).await?)
    }

    /// See [`Connection::stats`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn stats(&self) -> Result<StatsReport, ClientError> {
        let request = Request::Stats;
        expect_stats(&request, self.call(&request).await?)
    }

    /// See [`Connection::health`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn health(&self) -> Result<HealthReport, ClientError> {
        let request = Request::Health;
        expect_health(&request, self.call(&request).await?)
    }
}

/// Starts the I/O tasks of a connected, greeted connection.
fn start(conn: Connection) -> Arc<Shared> {
    let server = conn.server.clone();
    let next_id = conn.next_id;
    let (read, write) = conn.stream.into_split();
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let shared = Arc::new(Shared {
        outgoing: tx,
        next_id: AtomicU64::new(next_id),
        server,
        routes: Mutex::new(Routes::default()),
    });
    // The tasks hold weak references: once every handle (and the client's
    // current pointer) lets go, the queue's sender drops, the writer
    // half-closes and the daemon ends the connection.
    tokio::spawn(write_loop(write, rx, Arc::downgrade(&shared)));
    tokio::spawn(read_loop(read, conn.read_buf, Arc::downgrade(&shared)));
    shared
}

impl Shared {
    /// Marks the connection dead and fails every waiting call.
    fn close(&self, why: String) {
        let waiting = {
            let mut routes = self.routes.lock();
            routes.closed.get_or_insert(why.clone());
            std::mem::take(&mut routes.waiting)
        };
        for (_, reply) in waiting {
            let _ = reply.send(Err(ClientError::Io(std::io::Error::other(why.clone()))));
        }
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: Weak<Shared>,
) {
    let mut batch = Vec::with_capacity(64);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let Some(shared) = shared.upgrade() else {
            break;
        };
        {
            let mut routes = shared.routes.lock();
            for out in batch.drain(..) {
                if let Some(why) = &routes.closed {
                    let _ = out
                        .reply
                        .send(Err(ClientError::Io(std::io::Error::other(why.clone()))));
                    continue;
                }
                // A call that timed out while queued waits for nothing.
                if out.reply.is_closed() {
                    continue;
                }
                routes.waiting.insert(out.id, out.reply);
                buf.extend_from_slice(&out.frame);
            }
        }
        if let Err(e) = write.write_all(&buf).await {
            shared.close(format!("writing to rld failed: {e}"));
        }
        buf.clear();
    }
    // Every handle is gone: half-close so the daemon ends the connection.
    let _ = write.shutdown().await;
}

async fn read_loop(mut read: OwnedReadHalf, mut buf: BytesMut, shared: Weak<Shared>) {
    let mut codec = FrameCodec::new(MAX_RESPONSE_FRAME);
    let why = loop {
        match codec.decode_frame(&mut buf) {
            Ok(Some(frame)) => match decode_response(&frame) {
                Ok(resp) => {
                    let Some(shared) = shared.upgrade() else {
                        return; // nobody is waiting any more
                    };
                    let reply = shared.routes.lock().waiting.remove(&resp.id);
                    match reply {
                        Some(reply) => {
                            let _ = reply.send(Ok(resp.response));
                        }
                        // Id 0: the daemon could not read a request and is
                        // closing. Another id: a call that timed out.
                        None => {
                            if let (0, Response::Error(e)) = (resp.id, resp.response) {
                                break e.to_string();
                            }
                        }
                    }
                }
                Err(e) => break e.to_string(),
            },
            Ok(None) => match read.read_buf(&mut buf).await {
                Ok(0) => break "rld closed the connection".to_string(),
                Ok(_) => {}
                Err(e) => break format!("reading from rld failed: {e}"),
            },
            Err(e) => break e.to_string(),
        }
    };
    if let Some(shared) = shared.upgrade() {
        shared.close(why);
    }
}
