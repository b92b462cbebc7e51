//! A blocking client for programs without an async runtime, over
//! `std::os::unix::net::UnixStream` (no Tokio). Every call is bounded by the
//! client's [`Timeouts`]; after a failed call (the daemon restarted, a
//! timeout) the connection is dropped and the next call connects again.
//!
//! ```no_run
//! use rld::protocol::Acquire;
//! use rld::protocol::client::blocking::Client;
//!
//! let mut client = Client::connect("/run/rld/rld.sock")?;
//! let decision = client.acquire(Acquire::new("nightly-backup", "s3/upload").cost(10))?;
//! println!("allowed: {}", decision.is_allowed());
//! # Ok::<(), rld::protocol::ClientError>(())
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::BytesMut;

use super::{
    ClientError, Greeting, ServerInfo, Timeouts, expect_applied, expect_decision, expect_decisions,
    expect_deleted, expect_health, expect_rule, expect_rules, expect_stats, greeting,
};
use crate::protocol::codec::{FrameCodec, HEADER_LEN, decode_response, encode};
use crate::protocol::{
    Acquire, BatchItem, Decision, HealthReport, MAX_RESPONSE_FRAME, PROTOCOL_VERSION,
    ProtocolError, Request, Response, RuleInfo, StatsReport,
};
use crate::rule::RuleSpec;

/// A blocking connection to rld that reconnects when needed.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    timeouts: Timeouts,
    conn: Option<Conn>,
    server: ServerInfo,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    read_buf: BytesMut,
    codec: FrameCodec,
    next_id: u64,
}

impl Client {
    /// Connects and performs the handshake, with the default [`Timeouts`].
    ///
    /// # Errors
    /// [`ClientError::Connect`] when nothing listens at `path`,
    /// [`ClientError::Timeout`] when the daemon does not answer the handshake.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, Timeouts::default())
    }

    /// [`Client::connect`] with the given timeouts.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect_with(path: impl AsRef<Path>, timeouts: Timeouts) -> Result<Client, ClientError> {
        let mut client = Client {
            path: path.as_ref().to_owned(),
            timeouts,
            conn: None,
            server: ServerInfo::default(),
        };
        client.reconnect()?;
        Ok(client)
    }

    /// The daemon's handshake answer (of the latest connection).
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// Connects and greets with this build's version; a daemon that speaks
    /// only older ones (it closes the connection) is greeted again with the
    /// newest it names.
    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.conn = None;
        match self.greet(PROTOCOL_VERSION)? {
            None => Ok(()),
            Some(older) if older < PROTOCOL_VERSION && self.greet(older)?.is_none() => Ok(()),
            Some(_) => Err(ClientError::Unexpected {
                request: "Hello",
                got: "UnsupportedVersion",
            }),
        }
    }

    /// One handshake at `version`: `None` once connected, or the version the
    /// daemon says to try instead.
    fn greet(&mut self, version: u16) -> Result<Option<u16>, ClientError> {
        let connect_error = |source| ClientError::Connect {
            path: self.path.clone(),
            source,
        };
        let deadline = Instant::now() + self.timeouts.connect;
        let stream = connect_by(&self.path, deadline).map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => ClientError::Timeout {
                what: "the connection",
                after: self.timeouts.connect,
            },
            _ => connect_error(e),
        })?;
        let mut conn = Conn {
            stream,
            read_buf: BytesMut::with_capacity(8 * 1024),
            codec: FrameCodec::new(MAX_RESPONSE_FRAME),
            next_id: 1,
        };
        let hello = Request::Hello { version };
        let answer = conn.call(&hello, 0, deadline, "the handshake", self.timeouts.connect)?;
        match greeting(&hello, answer)? {
            Greeting::Welcome(server) => {
                self.server = server;
                self.conn = Some(conn);
                Ok(None)
            }
            Greeting::TryVersion(older) => Ok(Some(older)),
        }
    }

    /// Sends one request and waits for its answer (an `Error` response
    /// becomes [`ClientError::Server`]), connecting first if the previous
    /// connection failed.
    ///
    /// # Errors
    /// Transport errors and [`ClientError::Timeout`] (the connection is then
    /// dropped; a request in flight may or may not have been decided), server
    /// errors, a request larger than the daemon's frame limit.
    pub fn call(&mut self, request: &Request<'_>) -> Result<Response<'static>, ClientError> {
        if self.conn.is_none() {
            self.reconnect()?;
        }
        let conn = self.conn.as_mut().expect("connected above");
        let deadline = Instant::now() + self.timeouts.request;
        let max = self.server.max_frame as usize;
        let result = conn.call(
            request,
            max,
            deadline,
            request.name(),
            self.timeouts.request,
        );
        match result {
            Ok(Response::Error(e)) => Err(ClientError::Server(e)),
            Ok(response) => Ok(response),
            Err(e) => {
                if !matches!(
                    e,
                    ClientError::Protocol(ProtocolError::FrameTooLarge { .. })
                ) {
                    self.conn = None;
                }
                Err(e)
            }
        }
    }

    /// See [`Connection::acquire`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn acquire(&mut self, acquire: Acquire<'_>) -> Result<Decision<'static>, ClientError> {
        let request = Request::Acquire(acquire);
        expect_decision(&request, self.call(&request)?)
    }

    /// See [`Connection::acquire_many`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn acquire_many(
        &mut self,
        items: Vec<Acquire<'_>>,
    ) -> Result<Vec<BatchItem<'static>>, ClientError> {
        let request = Request::AcquireMany(items);
        expect_decisions(&request, self.call(&request)?)
    }

    /// See [`Connection::rule_set`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn rule_set(&mut self, rules: Vec<RuleSpec>) -> Result<u32, ClientError> {
        let request = super::rule_set_request(&self.server, rules)?;
        expect_applied(&request, self.call(&request)?)
    }

    /// See [`Connection::explain`].
    ///
    /// # Errors
    /// Bad names, or a daemon older than protocol version 3.
    pub fn explain(
        &mut self,
        acquire: crate::protocol::Acquire<'_>,
    ) -> Result<crate::protocol::Explanation<'static>, ClientError> {
        let request = super::explain_request(&self.server, acquire)?;
        super::expect_explanation(&request, self.call(&request)?)
    }

    /// See [`Connection::rule_get`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn rule_get(&mut self, id: &str) -> Result<RuleInfo, ClientError> {
        let request = super::rule_get_request(&self.server, id);
        expect_rule(&request, self.call(&request)?)
    }

    /// See [`Connection::rule_list`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn rule_list(&mut self) -> Result<Vec<RuleInfo>, ClientError> {
        let request = super::rule_list_request(&self.server);
        expect_rules(&request, self.call(&request)?)
    }

    /// See [`Connection::rule_delete`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn rule_delete(&mut self, id: &str) -> Result<(), ClientError> {
        let request = Request::RuleDelete { id: id.into() };
        expect_deleted(&request, self.call(&request)?)
    }

    /// See [`Connection::stats`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn stats(&mut self) -> Result<StatsReport, ClientError> {
        let request = Request::Stats;
        expect_stats(&request, self.call(&request)?)
    }

    /// See [`Connection::health`].
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn health(&mut self) -> Result<HealthReport, ClientError> {
        let request = Request::Health;
        expect_health(&request, self.call(&request)?)
    }
}

impl Conn {
    /// Sends `request` and reads until its answer, before `deadline`.
    fn call(
        &mut self,
        request: &Request<'_>,
        max_frame: usize,
        deadline: Instant,
        what: &'static str,
        limit: std::time::Duration,
    ) -> Result<Response<'static>, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = BytesMut::new();
        encode(&(id, request), &mut frame)?;
        let len = frame.len() - HEADER_LEN;
        if max_frame != 0 && len > max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: max_frame,
            }
            .into());
        }
        let timed_out = || ClientError::Timeout { what, after: limit };
        let remaining = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
        };
        // Each write gets what is left of the deadline, not all of it.
        let mut sent = 0;
        let mut written = Ok(());
        while sent < frame.len() {
            let step = remaining()
                .ok_or_else(timed_out)
                .and_then(|left| Ok(self.stream.set_write_timeout(Some(left))?))
                .and_then(|()| Ok(self.stream.write(&frame[sent..])?));
            match step {
                Ok(0) => {
                    written = Err(ClientError::Closed);
                    break;
                }
                Ok(n) => sent += n,
                Err(e) => {
                    written = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = written {
            // Refused (too many connections) and closed before we wrote: the
            // daemon's reason is still readable.
            if let Ok(Some(answer)) = self.next_frame(deadline) {
                if let Response::Error(body) = answer.response {
                    return Err(ClientError::Server(body));
                }
            }
            return Err(as_timeout(e, timed_out));
        }
        match self.next_frame(deadline) {
            Ok(Some(answer)) if answer.id == id => Ok(answer.response),
            // Id 0: the daemon could not read a request and is closing.
            Ok(Some(answer)) => match answer.response {
                Response::Error(body) if answer.id == 0 => Err(ClientError::Server(body)),
                _ => Err(ProtocolError::Malformed(format!(
                    "response id {} does not match request id {id}",
                    answer.id
                ))
                .into()),
            },
            Ok(None) => Err(ClientError::Closed),
            Err(e) => Err(as_timeout(e, timed_out)),
        }
    }

    /// The next response frame, reading before `deadline`; `None` at end of stream.
    fn next_frame(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<crate::protocol::ResponseFrame<'static>>, ClientError> {
        loop {
            if let Some(frame) = self.codec.decode_frame(&mut self.read_buf)? {
                return Ok(Some(decode_response(&frame)?));
            }
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                return Err(io::Error::from(io::ErrorKind::TimedOut).into());
            };
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            self.read_buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Connects to `path` before `deadline`. A Unix socket connect blocks
/// without limit while the listener's backlog is full (a stopped daemon), so
/// the connect is non-blocking and retried until the deadline.
fn connect_by(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(nix::errno::Errno::EAGAIN) => return Err(io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A socket timeout (`WouldBlock`/`TimedOut`) as [`ClientError::Timeout`].
fn as_timeout(e: ClientError, timed_out: impl FnOnce() -> ClientError) -> ClientError {
    match &e {
        ClientError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            timed_out()
        }
        ClientError::Timeout { .. } => timed_out(),
        _ => e,
    }
}
