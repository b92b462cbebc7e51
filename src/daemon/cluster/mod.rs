//! The etcd side of a daemon: the client (with deadlines and keep-alives so a
//! hung etcd hangs nothing), membership (one key per daemon under a lease, so
//! the number of live daemons `N` is known, rewritten every probe with this
//! daemon's wall clock for the clock check in `clock`), the prober that
//! drives the health machine, and the rules stored in etcd (listed, watched,
//! written).
//!
//! Key schema (v1), under the configured prefix:
//! `/v1/members/{node}` (JSON `{pid, version, wall_ns}`, attached to the
//! daemon's lease),
//! `/v1/rules/{id}` (JSON in the TOML field names), and
//! `/v1/buckets/{rule}/{hash}` (see `lease::etcd`).

pub mod clock;
mod rules;
pub mod security;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

pub use crate::daemon::health::Health;
pub use clock::ClockCheck;
pub use rules::{rule_from_json, rule_to_json};

use super::config::EtcdConfig;
use super::limiter::global::ClusterLink;
use crate::rule::RuleSpec;

/// Seconds a member key outlives its daemon.
const MEMBER_TTL_SECS: i64 = 5;
/// A failing cluster is declared degraded after this long.
const DEGRADE_AFTER: Duration = Duration::from_millis(400);
/// Probe cadence while unhealthy (twice this while healthy).
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Why the cluster refused us.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot set up the etcd client: {0}")]
    Client(etcd_client::Error),
    #[error("etcd security settings: {0}")]
    Security(#[from] security::SecurityError),
    #[error(
        "node id {0:?} is in use by another live rld (its member key exists in etcd); give each daemon its own --node-id"
    )]
    DuplicateNode(String),
    #[error("etcd is unreachable: {0}; the change was not made, retry when etcd is back")]
    Unavailable(String),
}

/// The connection to etcd and what is known about the cluster.
pub struct Cluster {
    client: Client,
    pub config: EtcdConfig,
    pub health: Arc<Health>,
    pub link: Arc<ClusterLink>,
    /// Live daemons, counted by the prober.
    pub members: Arc<AtomicU64>,
    /// This daemon's clock against its peers', and whether it may lease.
    pub clock: Arc<ClockCheck>,
    /// The lease our member key is attached to (0 until registered).
    lease_id: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("endpoints", &self.config.endpoints)
            .field("node", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the client. Connecting is lazy: this succeeds with etcd down;
    /// [`Cluster::join`] makes the first real call.
    ///
    /// # Errors
    /// Malformed endpoints.
    pub async fn connect(
        config: EtcdConfig,
        link: Arc<ClusterLink>,
        members: Arc<AtomicU64>,
    ) -> Result<Cluster, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(1), config.timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let options = config
            .security
            .connect_options(&config.endpoints, options)
            .map_err(ClusterError::Security)?;
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(ClusterError::Client)?;
        let health = Arc::new(Health::new(Arc::clone(&link), DEGRADE_AFTER));
        let clock = Arc::new(ClockCheck::new(
            config.node_id.clone(),
            config.max_clock_skew,
            Arc::clone(&link),
        ));
        Ok(Cluster {
            client,
            health,
            link,
            members,
            clock,
            lease_id: AtomicU64::new(0),
            config,
        })
    }

    /// A clone of the client (cheap; shares the channel).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/v1/{rest}", self.config.prefix)
    }

    fn member_key(&self) -> String {
        self.key(&format!("members/{}", self.config.node_id))
    }

    /// Runs one call with the deadline, feeding the health machine.
    async fn call<T, Fut>(&self, call: impl FnMut() -> Fut) -> Result<T, String>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.health
            .guard(self.config.timeout, call)
            .await
            .map_err(|e| e.to_string())
    }

    /// Registers this daemon. A member key of the same node id that stays
    /// alive for a lease period belongs to another daemon: refused. With etcd
    /// unreachable this returns `Ok` (the prober registers later).
    ///
    /// # Errors
    /// [`ClusterError::DuplicateNode`].
    pub async fn join(&self) -> Result<(), ClusterError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(MEMBER_TTL_SECS as u64 + 1);
        loop {
            match self.register().await {
                Ok(true) => {
                    // Rules listed at start-up are planned for this count.
                    if let Ok(members) = self.count_members().await {
                        self.members
                            .store(members.len().max(1) as u64, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Ok(false) if tokio::time::Instant::now() < deadline => {
                    // Perhaps our own previous run, whose lease has not expired.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(false) => return Err(ClusterError::DuplicateNode(self.config.node_id.clone())),
                Err(e) => {
                    tracing::warn!(
                        endpoints = ?self.config.endpoints,
                        "etcd unreachable at start-up ({e}); serving, global rules follow on_failure"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Our member key's value, stamped with the wall clock read now (each
    /// attempt of a write calls this again, so the stamp is taken just before
    /// the request leaves). The clock check times the write's watch event.
    fn member_value(&self) -> String {
        let wall_ns = clock::wall_now_ns();
        self.clock.sending(wall_ns);
        serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "wall_ns": wall_ns,
        })
        .to_string()
    }

    /// Writes our member key under `lease` if `guard` holds.
    async fn write_member(&self, lease: i64, guard: Compare) -> Result<bool, String> {
        let client = self.client.clone();
        let key = self.member_key();
        let resp = self
            .call(|| {
                let txn = Txn::new().when([guard.clone()]).and_then([TxnOp::put(
                    key.as_str(),
                    self.member_value(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
                let mut c = client.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            self.clock.written();
        }
        Ok(resp.succeeded())
    }

    /// Creates our member key under a fresh lease if no one holds the node id.
    async fn register(&self) -> Result<bool, String> {
        let client = self.client.clone();
        let lease = self
            .call(|| {
                let mut c = client.clone();
                async move { c.lease_grant(MEMBER_TTL_SECS, None).await }
            })
            .await?;
        let key = self.member_key();
        let fresh = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        if self.write_member(lease.id(), fresh).await? {
            self.lease_id.store(lease.id() as u64, Ordering::Relaxed);
            Ok(true)
        } else {
            let _ = self.revoke(lease.id()).await;
            Ok(false)
        }
    }

    /// Rewrites our member key with the wall clock now, under our existing
    /// lease; `false` if the key is not under that lease any more (expired,
    /// or deleted by hand), so we register again.
    async fn publish_clock(&self, lease: i64) -> Result<bool, String> {
        let key = self.member_key();
        let ours = Compare::lease(key.as_str(), CompareOp::Equal, lease);
        self.write_member(lease, ours).await
    }

    async fn revoke(&self, id: i64) -> Result<(), String> {
        let client = self.client.clone();
        self.call(|| {
            let mut c = client.clone();
            async move { c.lease_revoke(id).await }
        })
        .await
        .map(drop)
    }

    /// One keep-alive of our member lease; `false` if the lease is gone.
    async fn keep_alive(&self, id: i64) -> Result<bool, String> {
        let client = self.client.clone();
        let resp = self
            .call(|| {
                let mut c = client.clone();
                async move {
                    let (mut keeper, mut stream) = match c.lease_keep_alive(id).await {
                        Ok(pair) => pair,
                        // etcd answered: the lease is gone (it expired while
                        // we were cut off). Not a failure: register again.
                        Err(etcd_client::Error::LeaseKeepAliveError(m))
                            if m.contains("not found") =>
                        {
                            return Ok(None);
                        }
                        Err(e) => return Err(e),
                    };
                    keeper.keep_alive().await?;
                    stream.message().await
                }
            })
            .await?;
        Ok(resp.is_some_and(|r| r.ttl() > 0))
    }

    /// The node ids of the live members (a real call: it also probes etcd).
    async fn count_members(&self) -> Result<Vec<String>, String> {
        let client = self.client.clone();
        let prefix = self.key("members/");
        let resp = self
            .call(|| {
                let (mut c, prefix) = (client.clone(), prefix.clone());
                async move {
                    c.get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
                }
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let node = kv.key().strip_prefix(prefix.as_bytes())?;
                Some(String::from_utf8_lossy(node).into_owned())
            })
            .collect())
    }

    /// Keeps the member lease alive and our wall clock published, counts
    /// members, runs the clock check, and probes etcd (which drives the
    /// health machine) until `cancel`; then revokes the lease so the others
    /// see one daemon less at once.
    pub async fn run_membership(self: Arc<Self>, cancel: CancellationToken) {
        // The clock side of the health machine runs apart from the probes,
        // so a probe hanging until its deadline cannot delay DEGRADED.
        let timeouts = {
            let health = Arc::clone(&self.health);
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = tick.tick() => health.check_timeout(),
                    }
                }
            })
        };
        let clock_watch = tokio::spawn(Arc::clone(&self).run_clock_watch(cancel.clone()));
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats = 0u64;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            beats += 1;
            // Every tick while unhealthy, every other one otherwise.
            let healthy = self.link.state() == super::limiter::global::EtcdState::Healthy;
            if healthy && beats % 2 != 0 {
                continue;
            }
            let id = self.lease_id.load(Ordering::Relaxed) as i64;
            if id == 0 {
                if let Ok(false) = self.register().await {
                    tracing::error!(
                        node = %self.config.node_id,
                        "node id in use by another live daemon; not registered (membership count excludes us)"
                    );
                }
            } else {
                let alive = match self.keep_alive(id).await {
                    Ok(true) => self.publish_clock(id).await,
                    other => other,
                };
                if let Ok(false) = alive {
                    // The lease expired while we were cut off: register again.
                    self.lease_id.store(0, Ordering::Relaxed);
                }
            }
            let members = self.count_members().await.ok();
            if let Some(members) = &members {
                self.members
                    .store(members.len().max(1) as u64, Ordering::Relaxed);
            }
            self.clock.tick(members.as_deref());
        }
        timeouts.abort();
        clock_watch.abort();
        let id = self.lease_id.load(Ordering::Relaxed) as i64;
        if id != 0 {
            let _ = self.revoke(id).await;
        }
    }

    /// Writes rules (all or none, one transaction).
    ///
    /// # Errors
    /// etcd unreachable; nothing was written.
    pub async fn put_rules(&self, specs: &[RuleSpec]) -> Result<(), ClusterError> {
        let ops: Vec<TxnOp> = specs
            .iter()
            .map(|s| TxnOp::put(self.key(&format!("rules/{}", s.id)), rule_to_json(s), None))
            .collect();
        let txn = Txn::new().and_then(ops);
        let client = self.client.clone();
        self.call(|| {
            let (mut c, txn) = (client.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await
        .map(drop)
        .map_err(ClusterError::Unavailable)
    }

    /// Deletes a rule; `false` if it did not exist.
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn delete_rule(&self, id: &str) -> Result<bool, ClusterError> {
        let client = self.client.clone();
        let key = self.key(&format!("rules/{id}"));
        self.call(|| {
            let (mut c, key) = (client.clone(), key.clone());
            async move { c.delete(key, None).await }
        })
        .await
        .map(|r| r.deleted() > 0)
        .map_err(ClusterError::Unavailable)
    }

    /// Every rule under the prefix and the revision read at. Values that are
    /// not valid rules are skipped with an error naming the key.
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn list_rules(&self) -> Result<(Vec<RuleSpec>, i64), ClusterError> {
        let client = self.client.clone();
        let prefix = self.key("rules/");
        let resp = self
            .call(|| {
                let (mut c, prefix) = (client.clone(), prefix.clone());
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await
            .map_err(ClusterError::Unavailable)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut specs = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match rule_from_json(kv.value()) {
                Ok(spec) if key.ends_with(&format!("/rules/{}", spec.id)) => specs.push(spec),
                Ok(spec) => {
                    tracing::error!(%key, id = %spec.id, "skipping rule whose id does not match its key")
                }
                Err(e) => tracing::error!(%key, "skipping invalid rule in etcd: {e}"),
            }
        }
        Ok((specs, revision))
    }

    /// The prefix rules live under (for the watcher).
    pub fn rules_prefix(&self) -> String {
        self.key("rules/")
    }
}
