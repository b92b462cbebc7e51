//! The Prometheus endpoint (`--metrics-listen`): `GET /metrics` over
//! HTTP/1.1 on a TCP address or a Unix socket, answered in the Prometheus
//! text format, or OpenMetrics when the scraper's `Accept` asks for it.
//!
//! A scrape reads the same counters `rlctl stats` does ([`families`]), on
//! the blocking pool and sharing the report turns (`Shared::reports`), so
//! scrapes never run on a connection's worker and never hold a shard lock
//! for more than one shard's scan of held tokens (cached for 250 ms).

pub mod families;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::listener::{self, BindError};
use super::throttle::LogThrottle;
use families::Snapshot;

/// Scrape connections served at once; more are answered 503 (Prometheus
/// uses one per target).
const CONNECTIONS: usize = 16;
/// How long a scraper may take to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may last, keep-alive included: a scraper that
/// stops reading (or keeps reconnecting to hold a slot) cannot keep it.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);
/// The answer to a connection over [`CONNECTIONS`].
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Length: 48\r\nConnection: close\r\nRetry-After: 1\r\n\r\n\
too many scrape connections open; retry shortly\n";

/// Where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<MetricsAddr, String> {
        if text.starts_with('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(text)));
        }
        text.parse::<SocketAddr>()
            .map(MetricsAddr::Tcp)
            .map_err(|_| {
                format!(
                    "{text:?} is neither an IP address with a port (127.0.0.1:9464, [::1]:9464, \
                 0.0.0.0:9464) nor an absolute Unix socket path (/run/rld/metrics.sock)"
                )
            })
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{} (GET /metrics)", p.display()),
        }
    }
}

/// Why the metrics endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error(
        "cannot serve metrics on {addr}: the address is in use (another rld, or another \
         exporter); choose another --metrics-listen"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot serve metrics on {addr}: {source}; check --metrics-listen")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve metrics: {0} (--metrics-listen)")]
    Unix(BindError),
}

enum Listener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A bound metrics endpoint, not yet serving.
pub struct Exporter {
    listener: Listener,
    addr: MetricsAddr,
    /// The Unix socket file, removed with the exporter whether the daemon
    /// served or failed to start.
    _file: Option<listener::SocketFile>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Exporter({})", self.addr)
    }
}

impl Exporter {
    /// Binds `addr` (a Unix socket gets `mode`, like the main socket). Must
    /// run inside a Tokio runtime.
    ///
    /// # Errors
    /// The address is in use, cannot be bound, or names a file that is not
    /// a socket.
    pub fn bind(addr: &MetricsAddr, mode: u32) -> Result<Exporter, ExporterError> {
        match addr {
            MetricsAddr::Tcp(a) => {
                let tcp_err = |source: std::io::Error| match source.kind() {
                    std::io::ErrorKind::AddrInUse => ExporterError::InUse { addr: *a },
                    _ => ExporterError::Tcp { addr: *a, source },
                };
                let std = std::net::TcpListener::bind(a).map_err(tcp_err)?;
                std.set_nonblocking(true).map_err(tcp_err)?;
                // The port the kernel chose for `:0`.
                let local = std.local_addr().map_err(tcp_err)?;
                Ok(Exporter {
                    listener: Listener::Tcp(TcpListener::from_std(std).map_err(tcp_err)?),
                    addr: MetricsAddr::Tcp(local),
                    _file: None,
                })
            }
            MetricsAddr::Unix(path) => {
                let bound = listener::bind_path(path, mode).map_err(ExporterError::Unix)?;
                let file = listener::SocketFile::of(&bound);
                Ok(Exporter {
                    listener: Listener::Unix(bound.listener),
                    addr: addr.clone(),
                    _file: Some(file),
                })
            }
        }
    }

    /// Where it serves (with the port chosen for `:0`).
    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }

    /// Serves scrapes until `cancel` fires (its Unix socket file goes with
    /// `self`).
    pub async fn serve(self, shared: Arc<Shared>, cancel: CancellationToken) {
        let turns = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
        match &self.listener {
            Listener::Tcp(l) => {
                accept(
                    || async { l.accept().await.map(|(s, _)| s) },
                    &shared,
                    &turns,
                    &cancel,
                )
                .await;
            }
            Listener::Unix(l) => {
                accept(
                    || async { l.accept().await.map(|(s, _)| s) },
                    &shared,
                    &turns,
                    &cancel,
                )
                .await;
            }
        }
    }
}

async fn accept<S, F, Fut>(
    mut next: F,
    shared: &Arc<Shared>,
    turns: &Arc<tokio::sync::Semaphore>,
    cancel: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    static FAILED: LogThrottle = LogThrottle::new();
    static BUSY_LOG: LogThrottle = LogThrottle::new();
    let busy = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            s = next() => s,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if let Some(suppressed) = FAILED.allow() {
                    tracing::warn!(suppressed, "metrics: accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Beyond the cap: a short 503, written within a second or dropped;
        // beyond as many 503s at once, closed (so that a flood of scrape
        // connections cannot take the file descriptors clients need).
        let Ok(turn) = Arc::clone(turns).try_acquire_owned() else {
            let Ok(refusing) = Arc::clone(&busy).try_acquire_owned() else {
                continue;
            };
            if let Some(suppressed) = BUSY_LOG.allow() {
                tracing::warn!(
                    suppressed,
                    "metrics: {CONNECTIONS} scrape connections open; answering 503 to more"
                );
            }
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _refusing = refusing;
                let mut stream = stream;
                // Read the request first (closing with it unread would reset
                // the connection before the scraper reads the answer).
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut request = [0u8; 2048];
                    let _ = stream.read(&mut request).await;
                    let _ = stream.write_all(BUSY).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
            continue;
        };
        let shared = Arc::clone(shared);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _turn = turn;
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(answer(&req, shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = cancel.cancelled() => {}
                r = tokio::time::timeout(CONNECTION_LIMIT, conn) => match r {
                    Ok(Err(e)) => tracing::debug!("metrics connection: {e}"),
                    Err(_) => tracing::debug!("metrics connection closed after {CONNECTION_LIMIT:?}"),
                    Ok(Ok(())) => {}
                },
            }
        });
    }
}

/// The answer to one HTTP request.
async fn answer(req: &Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "rld serves its metrics at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "/metrics answers GET and HEAD\n",
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let openmetrics = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let turns = Arc::clone(&shared);
    let Ok(_turn) = turns.reports.acquire().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "rld is stopping\n");
    };
    let body =
        tokio::task::spawn_blocking(move || Snapshot::take(&shared).encode(openmetrics)).await;
    match body {
        Ok(body) => {
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            r
        }
        Err(e) => {
            tracing::error!("metrics scrape failed: {e}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scrape failed; see rld's log\n",
            )
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_expected() {
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:0".parse(),
            Ok(MetricsAddr::Tcp("[::1]:0".parse().unwrap()))
        );
        assert_eq!(
            "/run/rld/metrics.sock".parse(),
            Ok(MetricsAddr::Unix("/run/rld/metrics.sock".into()))
        );
        for bad in ["localhost:9464", "9464", "127.0.0.1", "metrics.sock", ""] {
            let e = bad.parse::<MetricsAddr>().unwrap_err();
            assert!(e.contains("127.0.0.1:9464"), "{bad}: {e}");
        }
    }
}
