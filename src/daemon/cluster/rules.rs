//! Rules stored in etcd: their JSON form (the TOML field names, so `etcdctl get`
//! reads like the config file) and the watcher that keeps every daemon's etcd
//! layer current: list the prefix, watch from the next revision, re-list on
//! every change, and start over from a fresh list whenever the stream breaks.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchOptions;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::daemon::rulebook::RuleBook;
use crate::rule::RuleSpec;
use crate::rule::file::RuleEntry;

/// The JSON stored for a rule.
pub fn rule_to_json(spec: &RuleSpec) -> String {
    serde_json::to_string(&RuleEntry::from_spec(spec)).expect("rule entries serialize")
}

/// Parses and validates a stored rule.
///
/// # Errors
/// Not JSON of a rule, or a rule that fails validation.
pub fn rule_from_json(bytes: &[u8]) -> Result<RuleSpec, String> {
    let entry: RuleEntry = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    entry.to_spec().map_err(|e| e.to_string())
}

impl Cluster {
    /// Keeps `book`'s etcd layer equal to the rules in etcd until `cancel`.
    pub async fn run_rules_watch(self: Arc<Self>, book: Arc<RuleBook>, cancel: CancellationToken) {
        loop {
            if let Some(revision) = self.relist(&book).await {
                let mut client = self.client();
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify();
                match client.watch(self.rules_prefix(), Some(options)).await {
                    Ok(watch) => {
                        let (mut requests, mut stream) = watch.split();
                        // Progress asked for every second: a stream silent
                        // for longer than `WATCH_SILENCE` has stalled.
                        let mut progress = tokio::time::interval(Duration::from_secs(1));
                        let mut heard = tokio::time::Instant::now();
                        loop {
                            let next = tokio::select! {
                                () = cancel.cancelled() => return,
                                () = self.health.recovering.notified() => {
                                    tracing::debug!("etcd recovering: re-listing rules and re-watching");
                                    break;
                                }
                                _ = progress.tick() => {
                                    if heard.elapsed() > crate::daemon::lease::store::WATCH_SILENCE
                                        || requests.request_progress().await.is_err()
                                    {
                                        tracing::debug!("rule watch went silent; re-listing");
                                        break;
                                    }
                                    continue;
                                }
                                m = stream.message() => m,
                            };
                            heard = tokio::time::Instant::now();
                            match next {
                                Ok(Some(resp)) if resp.canceled() => break,
                                Ok(Some(resp)) if !resp.events().is_empty() => {
                                    if self.relist(&book).await.is_none() {
                                        break;
                                    }
                                }
                                Ok(Some(_)) => {}
                                Ok(None) | Err(_) => {
                                    tracing::debug!("rule watch ended; re-listing");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!("cannot watch rules: {e}"),
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Lists the rules and installs them; the revision read at, or `None`
    /// if etcd could not be read.
    async fn relist(&self, book: &Arc<RuleBook>) -> Option<i64> {
        let (specs, revision) = self.list_rules().await.ok()?;
        let book = Arc::clone(book);
        let applied =
            tokio::task::spawn_blocking(move || book.replace_etcd_layer(specs, revision)).await;
        if let Err(e) = applied {
            tracing::error!("applying rules from etcd failed: {e}");
        }
        Some(revision)
    }
}
