//! Process signals: SIGTERM and SIGINT cancel the root token (graceful
//! shutdown); SIGHUP asks for a config reload.

use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT and notifies `reload` on
/// every SIGHUP, until `token` is cancelled.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn install(token: CancellationToken, reload: Arc<Notify>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down");
                    token.cancel();
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: shutting down");
                    token.cancel();
                }
                _ = hup.recv() => reload.notify_one(),
            }
        }
    });
    Ok(())
}
