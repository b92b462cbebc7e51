//! The listening socket and the accept loop.
//!
//! Binding replaces a stale socket file left by a crash but refuses to start
//! when another daemon answers on it, and never deletes a file that is not a
//! socket. Under systemd socket activation the inherited socket is used as is.
//! The accept loop gives each connection a slot (see [`super::limits`]; a
//! connection refused one gets a `too_many_connections` error saying which
//! limit it met, and is closed) and spawns it on a `TaskTracker` so shutdown
//! can wait for them.

use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;
use super::conn;
use super::limits::Slot;
use super::throttle::LogThrottle;
use crate::protocol::codec::encode;
use crate::protocol::{ErrorBody, ErrorCode, Response};

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "another rld is already serving {0}; stop it first, or start this one with a different --socket"
    )]
    InUse(PathBuf),
    #[error(
        "{0} exists and is not a socket; refusing to replace it. Remove it or choose another --socket"
    )]
    NotASocket(PathBuf),
    #[error("cannot bind {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound listener and whether we own (and must remove) its path.
#[derive(Debug)]
pub struct Bound {
    pub listener: UnixListener,
    /// `None` when the socket came from systemd.
    pub owned_path: Option<PathBuf>,
    /// Device and inode of the socket file we created, so that only our
    /// own socket is removed at exit (not one another rld put there since).
    pub identity: Option<(u64, u64)>,
}

/// Removes the socket file at `path` if it is still the one with
/// `identity` (device, inode) that we created, not one another rld put there
/// since.
pub fn remove_if_ours(path: Option<&Path>, identity: Option<(u64, u64)>) {
    use std::os::unix::fs::MetadataExt;
    let (Some(path), Some(identity)) = (path, identity) else {
        return;
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == identity => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("could not remove socket {}: {e}", path.display());
            }
        }
        Ok(_) => tracing::info!(
            path = %path.display(),
            "socket file replaced by another process since we bound it; leaving it"
        ),
        Err(_) => {}
    }
}

/// A socket file we created, removed when dropped (if it is still ours):
/// a start-up failure after the bind leaves nothing behind.
#[derive(Debug)]
pub struct SocketFile {
    path: Option<PathBuf>,
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    /// Guards the file `bound` created (nothing for a socket from systemd).
    pub fn of(bound: &Bound) -> SocketFile {
        SocketFile {
            path: bound.owned_path.clone(),
            identity: bound.identity,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        remove_if_ours(self.path.as_deref(), self.identity);
    }
}

/// Takes the socket from systemd (`LISTEN_FDS`) or binds `path` with `mode`.
///
/// # Errors
/// See [`BindError`].
pub fn bind(path: &Path, mode: u32) -> Result<Bound, BindError> {
    if let Some(listener) = inherited_listener() {
        return Ok(Bound {
            listener,
            owned_path: None,
            identity: None,
        });
    }
    bind_path(path, mode)
}

/// Fails as [`bind`] would if `path` is served by a live rld or is not a
/// socket (nothing to check when systemd passes the socket). Binds nothing.
///
/// # Errors
/// [`BindError::InUse`], [`BindError::NotASocket`].
pub fn check_free(path: &Path) -> Result<(), BindError> {
    if std::env::var_os("LISTEN_FDS").is_some() {
        return Ok(());
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(BindError::NotASocket(path.to_owned())),
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            Err(BindError::InUse(path.to_owned()))
        }
        _ => Ok(()),
    }
}

/// Binds a Unix socket at `path` with `mode`, replacing a stale socket file
/// but never a live one or a file that is not a socket.
///
/// # Errors
/// As [`bind`].
pub fn bind_path(path: &Path, mode: u32) -> Result<Bound, BindError> {
    let io_err = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket left by a previous run");
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    let identity = {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        (meta.dev(), meta.ino())
    };
    Ok(Bound {
        listener,
        owned_path: Some(path.to_owned()),
        identity: Some(identity),
    })
}

fn inherited_listener() -> Option<UnixListener> {
    let fds = sd_notify::listen_fds().ok()?;
    let fd = fds.into_iter().next()?;
    // SAFETY: systemd passed this descriptor to us (LISTEN_FDS/LISTEN_PID
    // checked by listen_fds) and nothing else in the process owns it.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std_listener.set_nonblocking(true).ok()?;
    UnixListener::from_std(std_listener).ok()
}

/// Accepts connections until `cancel` fires. Connection tasks get child tokens
/// of `cancel` and are tracked by `tracker`.
pub async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    static ACCEPT_FAILED: LogThrottle = LogThrottle::new();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(suppressed) = ACCEPT_FAILED.allow() {
                    tracing::warn!(
                        suppressed,
                        "accept failed: {e}; retrying in 100ms (check the open-file limit)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = match shared.auth.peer_of(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot read peer credentials: {e}; closing connection");
                continue;
            }
        };
        let admin = shared.auth.may_administer(&peer);
        let slot = match shared.slots.take(&peer, admin) {
            Ok(slot) => slot,
            Err(refusal) => {
                shared.metrics.refused(refusal);
                shared
                    .metrics
                    .error_answered(ErrorCode::TOO_MANY_CONNECTIONS);
                tracing::debug!(
                    uid = peer.uid,
                    reason = refusal.reason(),
                    "connection refused"
                );
                tracker.spawn(refuse(stream, refusal.message()));
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let token = cancel.child_token();
        tracker.spawn(async move {
            shared.count_connection(true);
            let _open = Open {
                shared: Arc::clone(&shared),
                slot: Some(slot),
            };
            conn::serve(stream, peer, shared, token).await;
        });
    }
}

/// A served connection's slot and its place in the open-connections gauge,
/// given back however the connection ends (a panic included).
struct Open {
    shared: Arc<Shared>,
    slot: Option<Slot>,
}

impl Drop for Open {
    fn drop(&mut self) {
        // The slot first: once the gauge shows the connection gone, its slot
        // is free.
        drop(self.slot.take());
        self.shared.count_connection(false);
    }
}

async fn refuse(mut stream: UnixStream, message: String) {
    let mut buf = BytesMut::new();
    let body = ErrorBody::new(ErrorCode::TOO_MANY_CONNECTIONS, message);
    if encode(&(0u64, Response::Error(body)), &mut buf).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
    }
}
