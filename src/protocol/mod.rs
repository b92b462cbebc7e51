//! The rld wire protocol, version 1, and the client that speaks it.
//!
//! # Wire format
//!
//! * Transport: a Unix stream socket. Default path `/run/rld/rld.sock` for a
//!   daemon run as root, `$XDG_RUNTIME_DIR/rld.sock` (or `/tmp/rld-$UID/rld.sock`)
//!   otherwise; `--socket` or `RLD_SOCKET` override both.
//! * Frame: a 4-byte big-endian unsigned length `N`, then `N` bytes of one
//!   [postcard](https://postcard.jamesmunns.com/wire-format)-encoded message.
//!   Requests may be at most [`DEFAULT_MAX_FRAME`] bytes unless the daemon says
//!   otherwise in `HelloOk.max_frame`; a larger length prefix gets a
//!   `frame_too_large` error and the connection is closed. Responses may be up
//!   to [`MAX_RESPONSE_FRAME`] bytes.
//! * A request frame is [`RequestFrame`] `{ id: u64, request: Request }`; its
//!   response is [`ResponseFrame`] `{ id, response }` with the same id.
//!   Responses come back in request order, so a client may pipeline: write many
//!   requests, then read the answers.
//! * The first request must be `Hello { version }`. Version 1 is answered
//!   `HelloOk { version, server, max_frame }`; version 2 `Welcome` (the
//!   versions the daemon speaks, its frame limit and capabilities). A version
//!   above what the daemon speaks gets `UnsupportedVersion { requested,
//!   min_version, max_version }` (asked by a version 2+ client) or the
//!   `unsupported_version` error, and the connection is closed.
//! * Malformed frames, unknown request types and oversized frames get an
//!   `Error` response (id 0 when the id is unreadable) and the connection is
//!   closed; other connections are unaffected.
//!
//! # Compatibility
//!
//! Within a version nothing changes. Enum variants and error codes are only
//! appended; a change to an existing message bumps [`PROTOCOL_VERSION`], and the
//! daemon keeps accepting every version from [`MIN_PROTOCOL_VERSION`].
//! `man/rld-protocol.7` documents every message byte by byte with test vectors
//! that the test suite checks.

#[cfg(feature = "client")]
pub mod client;
pub mod codec;
mod message;

use std::path::PathBuf;

#[cfg(feature = "async-client")]
pub use client::{Client, Connection};
#[cfg(feature = "client")]
pub use client::{ClientError, ServerInfo, Timeouts};
pub use message::{
    Acquire, BatchItem, ClockReport, ClusterStats, Decision, ErrorBody, ErrorCode, EtcdHealth,
    Explanation, GlobalRuleStats, HealthReport, LatencySummary, LeaseInfo, Outcome, PeerClock,
    Priority, REQUEST_VARIANTS, Request, RequestFrame, Response, ResponseFrame, RuleCounters,
    RuleExplained, RuleInfo, RuleSource, RuleSpecV2, ServingState, ShareStats, StatsReport,
    TraceContext, Welcome,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Default maximum request frame, in bytes (body, header excluded).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// Maximum response frame a client accepts, in bytes.
pub const MAX_RESPONSE_FRAME: usize = 16 * 1024 * 1024;
/// The most items one `AcquireMany` may hold (so that its answer always fits
/// in a response frame); a larger batch is refused before anything in it is
/// decided.
pub const MAX_BATCH_ITEMS: usize = 25_000;
/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/rld/rld.sock";

/// A framing or message error. Each maps to an [`ErrorCode`] sent to the peer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes; split the batch")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error(
        "unknown request type {0}; this rld speaks protocol {PROTOCOL_VERSION} (request types 0 to 8): upgrade rld or use a client of the same version"
    )]
    UnknownRequest(u32),
    #[error(
        "unsupported protocol version {0}; this rld speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion(u16),
    #[error("the first request on a connection must be Hello {{ version }}")]
    HandshakeRequired,
}

impl ProtocolError {
    /// The code sent to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            ProtocolError::Malformed(_) => ErrorCode::MALFORMED_FRAME,
            ProtocolError::UnknownRequest(_) => ErrorCode::UNKNOWN_REQUEST,
            ProtocolError::UnsupportedVersion(_) => ErrorCode::UNSUPPORTED_VERSION,
            ProtocolError::HandshakeRequired => ErrorCode::HANDSHAKE_REQUIRED,
        }
    }
}

/// The per-user socket: `$XDG_RUNTIME_DIR/rld.sock`, else `/tmp/rld-$UID/rld.sock`.
#[cfg(feature = "client")]
pub fn user_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("rld.sock"),
        _ => PathBuf::from(format!("/tmp/rld-{}", nix::unistd::geteuid())).join("rld.sock"),
    }
}

/// The first directory of a systemd `*_DIRECTORY` variable (a colon-separated
/// list), if set.
pub fn systemd_directory(var: &str) -> Option<PathBuf> {
    let value = std::env::var_os(var)?;
    let first = value.to_str()?.split(':').next()?.to_owned();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// Where the daemon listens by default: `$RUNTIME_DIRECTORY/rld.sock` under
/// systemd (`RuntimeDirectory=rld` makes it `/run/rld`, whatever `User=`),
/// else the system socket for root and the user socket otherwise.
#[cfg(feature = "client")]
pub fn daemon_socket_path() -> PathBuf {
    if let Some(dir) = systemd_directory("RUNTIME_DIRECTORY") {
        return dir.join("rld.sock");
    }
    if nix::unistd::geteuid().is_root() {
        PathBuf::from(SYSTEM_SOCKET)
    } else {
        user_socket_path()
    }
}

/// Where clients look by default: a non-root user's own daemon if its socket
/// exists, else the system daemon.
#[cfg(feature = "client")]
pub fn client_socket_path() -> PathBuf {
    if !nix::unistd::geteuid().is_root() {
        let user = user_socket_path();
        if user.exists() {
            return user;
        }
    }
    PathBuf::from(SYSTEM_SOCKET)
}
