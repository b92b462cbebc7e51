//! Process signals: SIGTERM and SIGINT cancel the root token (graceful
//! shutdown); SIGHUP asks for a config reload.

use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT and notifies `reload` on
/// every SIGHUP. A second SIGTERM or SIGINT during the drain exits at once
/// (status 128 + the signal), as an operator who insists expects.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn install(token: CancellationToken, reload: Arc<Notify>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let (name, number) = tokio::select! {
                _ = term.recv() => ("SIGTERM", 15),
                _ = int.recv() => ("SIGINT", 2),
                _ = hup.recv() => {
                    reload.notify_one();
                    continue;
                }
            };
            if token.is_cancelled() {
                tracing::warn!("second {name} while draining: exiting now");
                std::process::exit(128 + number);
            }
            tracing::info!("{name}: shutting down");
            token.cancel();
        }
    });
    Ok(())
}
