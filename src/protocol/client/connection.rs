//! [`Connection`]: one socket driven by one task, with explicit pipelining
//! (used by `rlctl`).

use std::path::Path;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{
    ClientError, Greeting, ServerInfo, Timeouts, expect_applied, expect_decision, expect_decisions,
    expect_deleted, expect_health, expect_rule, expect_rules, expect_stats, greeting,
};
use crate::protocol::codec::{FrameCodec, decode_response, encode};
use crate::protocol::{
    Acquire, BatchItem, Decision, HealthReport, MAX_RESPONSE_FRAME, PROTOCOL_VERSION,
    ProtocolError, Request, Response, ResponseFrame, RuleInfo, StatsReport,
};
use crate::rule::RuleSpec;

/// One connection to rld, driven by one task. See the module docs.
#[derive(Debug)]
pub struct Connection {
    pub(super) stream: UnixStream,
    codec: FrameCodec,
    pub(super) read_buf: BytesMut,
    write_buf: BytesMut,
    pub(super) next_id: u64,
    pub(super) server: ServerInfo,
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

    /// Greets with this build's version; a daemon that speaks only older
    /// ones (it closes the connection) is greeted again with the newest it
    /// names.
    async fn handshake(path: &Path, timeouts: Timeouts) -> Result<Connection, ClientError> {
        match Connection::greet(path, timeouts, PROTOCOL_VERSION).await? {
            Ok(conn) => Ok(conn),
            Err(older) if older < PROTOCOL_VERSION => {
                match Connection::greet(path, timeouts, older).await? {
                    Ok(conn) => Ok(conn),
                    Err(_) => Err(ClientError::Unexpected {
                        request: "Hello",
                        got: "UnsupportedVersion",
                    }),
                }
            }
            Err(_) => Err(ClientError::Unexpected {
                request: "Hello",
                got: "UnsupportedVersion",
            }),
        }
    }

    /// One handshake at `version`: the connection, or the version the daemon
    /// says to try instead.
    async fn greet(
        path: &Path,
        timeouts: Timeouts,
        version: u16,
    ) -> Result<Result<Connection, u16>, ClientError> {
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
        let hello = Request::Hello { version };
        let answer = match conn.exchange(&hello).await {
            Ok(answer) => answer,
            Err(ClientError::Server(e)) => Response::Error(e),
            Err(e) => return Err(e),
        };
        match greeting(&hello, answer)? {
            Greeting::Welcome(server) => {
                conn.server = server;
                Ok(Ok(conn))
            }
            Greeting::TryVersion(older) => Ok(Err(older)),
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
        let len = self.write_buf.len() - start - crate::protocol::codec::HEADER_LEN;
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
        let request = super::rule_set_request(&self.server, rules)?;
        expect_applied(&request, self.call(&request).await?)
    }

    /// What `acquire` would meet now: every matching rule, its bucket and
    /// what it would decide, and the answer; nothing is spent.
    ///
    /// # Errors
    /// Bad names, or a daemon older than protocol version 3.
    pub async fn explain(
        &mut self,
        acquire: crate::protocol::Acquire<'_>,
    ) -> Result<crate::protocol::Explanation<'static>, ClientError> {
        let request = super::explain_request(&self.server, acquire)?;
        super::expect_explanation(&request, self.call(&request).await?)
    }

    /// One rule and its counters.
    ///
    /// # Errors
    /// `rule_not_found`.
    pub async fn rule_get(&mut self, id: &str) -> Result<RuleInfo, ClientError> {
        let request = super::rule_get_request(&self.server, id);
        expect_rule(&request, self.call(&request).await?)
    }

    /// All rules in force.
    ///
    /// # Errors
    /// See [`Connection::call`].
    pub async fn rule_list(&mut self) -> Result<Vec<RuleInfo>, ClientError> {
        let request = super::rule_list_request(&self.server);
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
