//! Clients for the rld socket.
//!
//! * [`Connection`]: one socket, owned by one task. Explicit pipelining:
//!   [`Connection::queue`] many requests, [`Connection::flush`] once, then
//!   [`Connection::receive`] the answers in order. Used by `rlctl`.
//! * [`Client`]: a cloneable handle that many tasks share; it pipelines their
//!   requests over one connection and routes answers by id.
//! * [`blocking::Client`]: the same calls for code without an async runtime.
//!
//! Every call is bounded by [`Timeouts`] (5 s to connect and handshake, 5 s
//! per request by default): a stopped or wedged daemon gives
//! [`ClientError::Timeout`], never a hang. [`Client`] and
//! [`blocking::Client`] reconnect on the next call after their connection
//! failed (the daemon restarted); a request in flight when it failed gets an
//! error.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rld::protocol::ClientError> {
//! use rld::protocol::{Acquire, Client};
//! let client = Client::connect("/run/rld/rld.sock").await?;
//! let decision = client.acquire(Acquire::new("alice", "api/search")).await?;
//! if !decision.is_allowed() {
//!     println!("retry in {} ms", decision.retry_after_ns / 1_000_000);
//! }
//! # Ok(()) }
//! ```

pub mod blocking;
mod mux;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub use mux::Client;

use super::codec::{FrameCodec, decode_response, encode};
use super::{
    Acquire, BatchItem, Decision, ErrorBody, HealthReport, MAX_RESPONSE_FRAME, PROTOCOL_VERSION,
    ProtocolError, Request, Response, ResponseFrame, RuleInfo, StatsReport,
};
use crate::rule::RuleSpec;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to rld at {path}: {source}; is rld running? Start it, or point --socket or RLD_SOCKET at its socket"
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("connection to rld failed: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{}", .0.message)]
    Server(ErrorBody<'static>),
    #[error(
        "rld answered {got} to a {request} request; is the daemon the same version as this client?"
    )]
    Unexpected {
        request: &'static str,
        got: &'static str,
    },
    #[error("rld closed the connection")]
    Closed,
    #[error(
        "rld did not answer {what} within {after:?}; is it stopped or overloaded? \
         (a request in flight may still have been decided)"
    )]
    Timeout { what: &'static str, after: Duration },
}

/// How long a client waits for the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and the `Hello` handshake.
    pub connect: Duration,
    /// Each request, from sending it to its answer.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(5),
        }
    }
}

/// What the daemon said in its `HelloOk`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: u16,
    pub server: String,
    pub max_frame: u32,
}

/// One connection to rld, driven by one task. See the module docs.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    codec: FrameCodec,
    read_buf: BytesMut,
    write_buf: BytesMut,
    next_id: u64,
    server: ServerInfo,
    timeouts: Timeouts,
}

impl Connection {
    /// Connects and performs the `Hello` handshake, with the default
    /// [`Timeouts`].
    ///
    /// # Errors
    /// [`ClientError::Connect`] when nothing listens at `path`; a server error
    /// when the daemon does not speak this protocol version;
    /// [`ClientError::Timeout`] when it does not answer.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Connection, ClientError> {
        Connection::connect_with(path, Timeouts::default()).await
    }

    /// [`Connection::connect`] with the given timeouts ([`Connection::call`]
    /// is bounded by `timeouts.request`; `queue`, `flush` and `receive` are
    /// the caller's to bound).
    ///
    /// # Errors
    /// As [`Connection::connect`].
    pub async fn connect_with(
        path: impl AsRef<Path>,
        timeouts: Timeouts,
    ) -> Result<Connection, ClientError> {
        let handshake = Connection::handshake(path.as_ref(), timeouts);
        tokio::time::timeout(timeouts.connect, handshake)
            .await
            .unwrap_or(Err(ClientError::Timeout {
                what: "the handshake",
                after: timeouts.connect,
            }))
    }

    async fn handshake(path: &Path, timeouts: Timeouts) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let mut conn = Connection {
            stream,
            codec: FrameCodec::new(MAX_RESPONSE_FRAME),
            read_buf: BytesMut::with_capacity(16 * 1024),
            write_buf: BytesMut::with_capacity(16 * 1024),
            next_id: 1,
            server: ServerInfo::default(),
            timeouts,
        };
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        match conn.exchange(&hello).await? {
            Response::HelloOk {
                version,
                server,
                max_frame,
            } => {
                conn.server = ServerInfo {
                    version,
                    server: server.into_owned(),
                    max_frame,
                };
                Ok(conn)
            }
            other => Err(unexpected(&hello, &other)),
        }
    }

    /// The daemon's handshake answer.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// Encodes a request into the write buffer and returns its id. Nothing is
    /// sent until [`Connection::flush`].
    ///
    /// # Errors
    /// [`ProtocolError::FrameTooLarge`] if the request exceeds the daemon's
    /// maximum frame (nothing is queued).
    pub fn queue(&mut self, request: &Request<'_>) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let start = self.write_buf.len();
        // A (id, request) tuple encodes exactly like `RequestFrame`, without a clone.
        encode(&(id, request), &mut self.write_buf)?;
        let len = self.write_buf.len() - start - super::codec::HEADER_LEN;
        let max = self.server.max_frame as usize;
        if max != 0 && len > max {
            self.write_buf.truncate(start);
            return Err(ProtocolError::FrameTooLarge { len, max }.into());
        }
        Ok(id)
    }

    /// Sends everything queued.
    ///
    /// # Errors
    /// The socket write failed.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        Ok(())
    }

    /// Reads the next response.
    ///
    /// # Errors
    /// [`ClientError::Closed`] on end of stream, I/O or decoding errors.
    pub async fn receive(&mut self) -> Result<ResponseFrame<'static>, ClientError> {
        let frame = self.receive_raw().await?;
        Ok(decode_response(&frame)?)
    }

    /// The next response if one is already buffered, without reading the socket
    /// (to drain a pipeline in one wake-up).
    ///
    /// # Errors
    /// A malformed frame.
    pub fn receive_buffered(&mut self) -> Result<Option<ResponseFrame<'static>>, ClientError> {
        match self.codec.decode_frame(&mut self.read_buf)? {
            Some(frame) => Ok(Some(decode_response(&frame)?)),
            None => Ok(None),
        }
    }

    /// Reads the next response frame without decoding it (for load generators).
    ///
    /// # Errors
    /// As [`Connection::receive`].
    pub async fn receive_raw(&mut self) -> Result<BytesMut, ClientError> {
        loop {
            if let Some(frame) = self.codec.decode_frame(&mut self.read_buf)? {
                return Ok(frame);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Sends one request and waits for its answer, within the request
    /// timeout. An `Error` response becomes [`ClientError::Server`].
    ///
    /// # Errors
    /// Transport errors, server errors, a response with the wrong id, or
    /// [`ClientError::Timeout`] (drop the connection then: its answer may
    /// still arrive).
    pub async fn call(&mut self, request: &Request<'_>) -> Result<Response<'static>, ClientError> {
        let after = self.timeouts.request;
        tokio::time::timeout(after, self.exchange(request))
            .await
            .unwrap_or(Err(ClientError::Timeout {
                what: request.name(),
                after,
            }))
    }

    async fn exchange(&mut self, request: &Request<'_>) -> Result<Response<'static>, ClientError> {
        let id = self.queue(request)?;
        if let Err(e) = self.flush().await {
            // The daemon may have refused us (too many connections) and closed
            // before we wrote: its reason is still readable.
            if let Ok(ResponseFrame {
                response: Response::Error(body),
                ..
            }) = self.receive().await
            {
                return Err(ClientError::Server(body));
            }
            return Err(e);
        }
        let frame = self.receive().await?;
        if let Response::Error(e) = frame.response {
            return Err(ClientError::Server(e));
        }
        if frame.id != id {
            return Err(ProtocolError::Malformed(format!(
                "response id {} does not match request id {id}",
                frame.id
            ))
            .into());
        }
        Ok(frame.response)
    }

    /// Asks for one decision.
    ///
    /// # Errors
    /// See [`Connection::call`]; a cost above the bucket size is a server error
    /// with code `cost_exceeds_burst`.
    pub async fn acquire(
        &mut self,
        acquire: Acquire<'_>,
    ) -> Result<Decision<'static>, ClientError> {
        let request = Request::Acquire(acquire);
        expect_decision(&request, self.call(&request).await?)
    }

    /// Asks for many decisions in one frame, decided independently in order.
    ///
    /// # Errors
    /// See [`Connection::call`].
    pub async fn acquire_many(
        &mut self,
        items: Vec<Acquire<'_>>,
    ) -> Result<Vec<BatchItem<'static>>, ClientError> {
        let request = Request::AcquireMany(items);
        expect_decisions(&request, self.call(&request).await?)
    }

    /// Creates or replaces rules, all or none. Returns how many changed.
    ///
    /// # Errors
    /// `invalid_rule` naming the field, `permission_denied`, `storage_failed`.
    pub async fn rule_set(&mut self, rules: Vec<RuleSpec>) -> Result<u32, ClientError> {
        let request = Request::RuleSet { rules };
        expect_applied(&request, self.call(&request).await?)
    }

    /// One rule and its counters.
    ///
    /// # Errors
    /// `rule_not_found`.
    pub async fn rule_get(&mut self, id: &str) -> Result<RuleInfo, ClientError> {
        let request = Request::RuleGet { id: id.into() };
        expect_rule(&request, self.call(&request).await?)
    }

    /// All rules in force.
    ///
    /// # Errors
    /// See [`Connection::call`].
    pub async fn rule_list(&mut self) -> Result<Vec<RuleInfo>, ClientError> {
        let request = Request::RuleList;
        expect_rules(&request, self.call(&request).await?)
    }

    /// Deletes a rule set at run time.
    ///
    /// # Errors
    /// `rule_not_found`, `rule_read_only` (config-file rules), `permission_denied`.
    pub async fn rule_delete(&mut self, id: &str) -> Result<(), ClientError> {
        let request = Request::RuleDelete { id: id.into() };
        expect_deleted(&request, self.call(&request).await?)
    }

    /// Counters and latency.
    ///
    /// # Errors
    /// See [`Connection::call`].
    pub async fn stats(&mut self) -> Result<StatsReport, ClientError> {
        let request = Request::Stats;
        expect_stats(&request, self.call(&request).await?)
    }

    /// Serving state.
    ///
    /// # Errors
    /// See [`Connection::call`].
    pub async fn health(&mut self) -> Result<HealthReport, ClientError> {
        let request = Request::Health;
        expect_health(&request, self.call(&request).await?)
    }
}

fn unexpected(request: &Request<'_>, got: &Response<'_>) -> ClientError {
    let got = match got {
        Response::HelloOk { .. } => "HelloOk",
        Response::Decision(_) => "Decision",
        Response::Decisions(_) => "Decisions",
        Response::RulesApplied { .. } => "RulesApplied",
        Response::Rule(_) => "Rule",
        Response::Rules(_) => "Rules",
        Response::RuleDeleted => "RuleDeleted",
        Response::Stats(_) => "Stats",
        Response::Health(_) => "Health",
        Response::Error(_) => "Error",
    };
    ClientError::Unexpected {
        request: request.name(),
        got,
    }
}

macro_rules! expect_fns {
    ($($name:ident -> $ty:ty { $pat:pat => $val:expr })*) => {
        $(
            pub(crate) fn $name(request: &Request<'_>, response: Response<'static>) -> Result<$ty, ClientError> {
                match response {
                    $pat => Ok($val),
                    Response::Error(e) => Err(ClientError::Server(e)),
                    other => Err(unexpected(request, &other)),
                }
            }
        )*
    };
}

expect_fns! {
    expect_decision -> Decision<'static> { Response::Decision(d) => d }
    expect_decisions -> Vec<BatchItem<'static>> { Response::Decisions(d) => d }
    expect_applied -> u32 { Response::RulesApplied { changed } => changed }
    expect_rule -> RuleInfo { Response::Rule(r) => r }
    expect_rules -> Vec<RuleInfo> { Response::Rules(r) => r }
    expect_deleted -> () { Response::RuleDeleted => () }
    expect_stats -> StatsReport { Response::Stats(s) => *s }
    expect_health -> HealthReport { Response::Health(h) => h }
}
