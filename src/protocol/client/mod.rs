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
#[cfg(feature = "async-client")]
mod connection;
#[cfg(feature = "async-client")]
mod mux;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "async-client")]
pub use connection::Connection;
#[cfg(feature = "async-client")]
pub use mux::Client;

use super::{
    BatchItem, Decision, ErrorBody, HealthReport, ProtocolError, Request, Response, RuleInfo,
    StatsReport,
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
    /// The request needs a newer protocol than the daemon speaks (not sent).
    #[error("{0}")]
    Unsupported(String),
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

/// What the daemon said in its handshake answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: u16,
    pub server: String,
    pub max_frame: u32,
    /// The versions the daemon speaks (from protocol 2; a version 1 daemon
    /// reports only its own).
    pub min_version: u16,
    pub max_version: u16,
    /// Optional behaviours the daemon offers (empty from a version 1 daemon).
    pub capabilities: Vec<String>,
}

/// What a handshake answer says: the server, or a version to try instead.
enum Greeting {
    Welcome(ServerInfo),
    /// The daemon speaks only older versions (up to this one).
    TryVersion(u16),
}

/// Reads the answer to `Hello { version }` (see rld-protocol(7)): `Welcome`
/// (version 2+), `HelloOk` (version 1), or a daemon that speaks only older
/// versions (`UnsupportedVersion`, or a version 1 daemon's error).
fn greeting(hello: &Request<'_>, answer: Response<'_>) -> Result<Greeting, ClientError> {
    match answer {
        Response::Welcome(w) => Ok(Greeting::Welcome(ServerInfo {
            version: w.version,
            server: w.server.into_owned(),
            max_frame: w.max_frame,
            min_version: w.min_version,
            max_version: w.max_version,
            capabilities: w.capabilities.into_iter().map(|c| c.into_owned()).collect(),
        })),
        Response::HelloOk {
            version,
            server,
            max_frame,
        } => Ok(Greeting::Welcome(ServerInfo {
            version,
            server: server.into_owned(),
            max_frame,
            min_version: version,
            max_version: version,
            capabilities: Vec::new(),
        })),
        Response::UnsupportedVersion { max_version, .. } => Ok(Greeting::TryVersion(max_version)),
        Response::Error(e) if e.code == super::ErrorCode::UNSUPPORTED_VERSION => {
            Ok(Greeting::TryVersion(1))
        }
        Response::Error(e) => Err(ClientError::Server(e.into_owned())),
        other => Err(unexpected(hello, &other)),
    }
}

fn unexpected(request: &Request<'_>, got: &Response<'_>) -> ClientError {
    let got = match got {
        Response::HelloOk { .. } => "HelloOk",
        Response::Welcome(_) => "Welcome",
        Response::UnsupportedVersion { .. } => "UnsupportedVersion",
        Response::Decision(_) => "Decision",
        Response::Decisions(_) => "Decisions",
        Response::RulesApplied { .. } => "RulesApplied",
        Response::Rule(_) => "Rule",
        Response::Rules(_) => "Rules",
        Response::RuleDeleted => "RuleDeleted",
        Response::Stats(_) => "Stats",
        Response::Health(_) => "Health",
        Response::Error(_) => "Error",
        Response::RuleV3(_) => "RuleV3",
        Response::RulesV3(_) => "RulesV3",
        Response::Explanation(_) => "Explanation",
    };
    ClientError::Unexpected {
        request: request.name(),
        got,
    }
}

macro_rules! expect_fns {
    ($($name:ident -> $ty:ty { $($pat:pat => $val:expr),+ })*) => {
        $(
            pub(crate) fn $name(request: &Request<'_>, response: Response<'static>) -> Result<$ty, ClientError> {
                match response {
                    $($pat => Ok($val),)+
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
    expect_rule -> RuleInfo {
        Response::RuleV3(r) => r,
        Response::Rule(r) => r.map_spec(RuleSpec::from)
    }
    expect_rules -> Vec<RuleInfo> {
        Response::RulesV3(r) => r,
        Response::Rules(r) => r.into_iter().map(|r| r.map_spec(RuleSpec::from)).collect()
    }
    expect_deleted -> () { Response::RuleDeleted => () }
    expect_explanation -> super::Explanation<'static> { Response::Explanation(e) => e }
    expect_stats -> StatsReport { Response::Stats(s) => *s }
    expect_health -> HealthReport { Response::Health(h) => h }
}

/// `RuleSet` in the layout the daemon speaks: version 3 carries every
/// field; to an older daemon, rules that need version 3 (a `per` other
/// than client and resource, or a shadow) are refused here rather than
/// sent without what makes them what they are.
pub(crate) fn rule_set_request(
    server: &ServerInfo,
    rules: Vec<RuleSpec>,
) -> Result<Request<'static>, ClientError> {
    if server.version >= 3 {
        return Ok(Request::RuleSetV3 { rules });
    }
    if let Some(r) = rules
        .iter()
        .find(|r| r.per != crate::rule::Per::default() || r.shadow)
    {
        return Err(ClientError::Unsupported(format!(
            "rule {:?} sets per or shadow, which this rld (protocol version {}) does not know; \
             upgrade rld to set it",
            r.id, server.version
        )));
    }
    Ok(Request::RuleSet {
        rules: rules.into_iter().map(super::RuleSpecV2::from).collect(),
    })
}

/// `RuleGet` in the layout the daemon speaks.
pub(crate) fn rule_get_request<'a>(server: &ServerInfo, id: &'a str) -> Request<'a> {
    if server.version >= 3 {
        Request::RuleGetV3 { id: id.into() }
    } else {
        Request::RuleGet { id: id.into() }
    }
}

/// `RuleList` in the layout the daemon speaks.
pub(crate) fn rule_list_request(server: &ServerInfo) -> Request<'static> {
    if server.version >= 3 {
        Request::RuleListV3
    } else {
        Request::RuleList
    }
}

/// `Explain`, which needs version 3.
pub(crate) fn explain_request<'a>(
    server: &ServerInfo,
    acquire: super::Acquire<'a>,
) -> Result<Request<'a>, ClientError> {
    if server.version < 3 {
        return Err(ClientError::Unsupported(format!(
            "this rld speaks protocol version {}; explain needs version 3: upgrade rld",
            server.version
        )));
    }
    Ok(Request::Explain(acquire))
}
