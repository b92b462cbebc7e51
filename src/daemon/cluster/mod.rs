//! The etcd side of a daemon: the client (with deadlines and keep-alives so a
//! hung etcd hangs nothing), registration (one member key per daemon under
//! an etcd lease, kept alive; while it is, this daemon's shares are in
//! force until a deadline that ends before the lease can expire), the
//! database's size and alarms, and the rules stored in etcd (listed,
//! watched, written).
//!
//! Key schema, under the configured prefix: `/v2/members/{node}` (see
//! `lease::view`; written here at registration, then by the lease
//! coordinator), `/v2/shares/..` (`lease`), and `/v1/rules/{id}` (JSON in
//! the TOML field names; the rule format did not change with v2 leases).

mod rules;
pub mod security;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    AlarmAction, AlarmType, Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions,
    Txn, TxnOp,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

pub use crate::daemon::health::Health;
pub use rules::{rule_from_json, rule_to_json};

use super::config::EtcdConfig;
use super::lease::{MEMBER_TTL, validity_after_send, view::MemberValue, view::Paths};
use super::limiter::MonotonicClock;
use super::limiter::global::ClusterLink;
use crate::rule::RuleSpec;

/// Keep-alives of the member lease: a tenth of its TTL, so a few lost ones
/// change nothing.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// How often the database's size and alarms are read.
const DB_STATUS_EVERY: Duration = Duration::from_secs(10);

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

/// This daemon's registration: its etcd lease, until when its shares may be
/// used, and whether the lease coordinator is ready to use them under that
/// lease (it has cleared what an earlier lease held).
#[derive(Debug, Default)]
pub struct Registration {
    /// (lease id, deadline in ns of the monotonic clock); 0: not registered.
    lease: Mutex<(i64, u64)>,
    /// The lease the coordinator is ready to serve shares under.
    ready: AtomicI64,
    /// Woken when the lease changes (registered, lost).
    pub changed: tokio::sync::Notify,
}

impl Registration {
    /// The current lease (0: none).
    pub fn lease(&self) -> i64 {
        self.lease.lock().0
    }

    /// The lease the coordinator is ready under.
    pub fn set_ready(&self, lease: i64) {
        self.ready.store(lease, Ordering::Release);
    }

    /// Puts shares in force until the lease's deadline, if the coordinator
    /// is ready under the current lease.
    pub fn publish(&self, link: &ClusterLink) {
        let (lease, deadline) = *self.lease.lock();
        if lease != 0 && self.ready.load(Ordering::Acquire) == lease {
            link.set_valid_until(deadline);
        }
    }

    fn set(&self, lease: i64, deadline: u64) {
        let changed = {
            let mut l = self.lease.lock();
            let changed = l.0 != lease;
            *l = (lease, deadline);
            changed
        };
        if changed {
            self.changed.notify_waiters();
        }
    }
}

/// The etcd database as the last status read saw it.
#[derive(Debug, Default)]
pub struct DbStatus {
    pub size_bytes: AtomicU64,
    pub quota_bytes: AtomicU64,
    /// A NOSPACE alarm is raised: etcd refuses writes until an operator
    /// compacts, defragments and disarms it.
    pub nospace: AtomicBool,
}

/// The connection to etcd and what is known about the cluster.
pub struct Cluster {
    client: Client,
    pub config: EtcdConfig,
    pub health: Arc<Health>,
    pub link: Arc<ClusterLink>,
    /// Live daemons (member keys), kept current by the lease coordinator.
    pub members: Arc<AtomicU64>,
    pub registration: Arc<Registration>,
    pub db: DbStatus,
    clock: MonotonicClock,
    paths: Paths,
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
        clock: MonotonicClock,
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
        let health = Arc::new(Health::new(Arc::clone(&link)));
        Ok(Cluster {
            client,
            health,
            link,
            members,
            registration: Arc::new(Registration::default()),
            db: DbStatus::default(),
            clock,
            paths: Paths::new(&config.prefix),
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
        self.paths.member(&self.config.node_id)
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
    /// unreachable this returns `Ok` (registration is retried in the
    /// background).
    ///
    /// # Errors
    /// [`ClusterError::DuplicateNode`].
    pub async fn join(&self) -> Result<(), ClusterError> {
        self.warn_of_v1_members().await;
        let deadline = tokio::time::Instant::now() + MEMBER_TTL + Duration::from_secs(1);
        loop {
            match self.register().await {
                Ok(true) => return Ok(()),
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

    /// Daemons of the v1 lease (token batches) cannot share a rule with v2
    /// daemons (shares): says so loudly if any live under this prefix.
    async fn warn_of_v1_members(&self) {
        let client = self.client.clone();
        let prefix = self.key("members/");
        let found = self
            .call(|| {
                let (mut c, prefix) = (client.clone(), prefix.clone());
                async move {
                    c.get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                }
            })
            .await;
        if let Ok(resp) = found
            && resp.count() > 0
        {
            tracing::error!(
                daemons = resp.count(),
                prefix = %self.config.prefix,
                "daemons of an older rld (v1 token leases) are registered under this prefix; they do not see this daemon's shares and global limits are not kept while both run: upgrade every daemon"
            );
        }
    }

    /// Creates our member key (operating count 0) under a fresh lease if no
    /// one holds the node id.
    async fn register(&self) -> Result<bool, String> {
        let client = self.client.clone();
        let sent = self.clock.now_ns();
        let lease = self
            .call(|| {
                let mut c = client.clone();
                async move { c.lease_grant(MEMBER_TTL.as_secs() as i64, None).await }
            })
            .await?;
        let key = self.member_key();
        let value = serde_json::to_string(&MemberValue {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            n: 0,
        })
        .expect("member values serialize");
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let created = self
            .call(|| {
                let (mut c, txn) = (client.clone(), txn.clone());
                async move { c.txn(txn).await }
            })
            .await?
            .succeeded();
        if created {
            let ttl = Duration::from_secs(lease.ttl().max(0) as u64);
            self.registration.set(
                lease.id(),
                sent + validity_after_send(ttl).as_nanos() as u64,
            );
            tracing::info!(node = %self.config.node_id, lease = lease.id(), "registered in etcd");
            Ok(true)
        } else {
            let _ = self.revoke(lease.id()).await;
            Ok(false)
        }
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

    /// One keep-alive of our member lease: the TTL it was renewed for, or
    /// `None` if the lease is gone.
    async fn keep_alive(&self, id: i64) -> Result<Option<Duration>, String> {
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
        Ok(resp
            .filter(|r| r.ttl() > 0)
            .map(|r| Duration::from_secs(r.ttl() as u64)))
    }

    /// Reads the database's size and alarms; one log line per change of the
    /// NOSPACE alarm, not one per refused write.
    async fn read_db_status(&self) {
        let client = self.client.clone();
        if let Ok(status) = self
            .call(|| {
                let mut c = client.clone();
                async move { c.status().await }
            })
            .await
        {
            self.db
                .size_bytes
                .store(status.db_size().max(0) as u64, Ordering::Relaxed);
        }
        let alarms = self
            .call(|| {
                let mut c = client.clone();
                async move { c.alarm(AlarmAction::Get, AlarmType::None, None).await }
            })
            .await;
        if let Ok(alarms) = alarms {
            let nospace = alarms
                .alarms()
                .iter()
                .any(|a| a.alarm() == AlarmType::Nospace);
            if self.db.nospace.swap(nospace, Ordering::Relaxed) != nospace {
                if nospace {
                    tracing::error!(
                        db_bytes = self.db.size_bytes.load(Ordering::Relaxed),
                        "etcd raised NOSPACE: its database reached its quota and it refuses every write (shares cannot change, rules cannot be set); compact, defragment (etcdctl defrag) and disarm the alarm (etcdctl alarm disarm), or raise --quota-backend-bytes"
                    );
                } else {
                    tracing::info!("etcd's NOSPACE alarm is cleared; writes resume");
                }
            }
        }
    }

    /// Keeps the member lease alive (registering again when it was lost),
    /// publishes the deadline of this daemon's shares after each renewal,
    /// reads the database status, and updates the health machine, until
    /// `cancel`; then takes shares out of force and revokes the lease so the
    /// others get them back at once.
    pub async fn run_membership(self: Arc<Self>, cancel: CancellationToken) {
        // The health machine follows share validity on its own timer, so a
        // keep-alive hanging until its deadline cannot delay DEGRADED.
        let watcher = {
            let health = Arc::clone(&self.health);
            let link = Arc::clone(&self.link);
            let clock = self.clock;
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = tick.tick() => health.shares(link.shares_valid(clock.now_ns())),
                    }
                }
            })
        };
        let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let id = self.registration.lease();
            if id == 0 {
                if let Ok(false) = self.register().await {
                    tracing::error!(
                        node = %self.config.node_id,
                        "node id in use by another live daemon; not registered (global rules follow on_failure)"
                    );
                }
            } else {
                let sent = self.clock.now_ns();
                match self.keep_alive(id).await {
                    Ok(Some(ttl)) => {
                        self.registration
                            .set(id, sent + validity_after_send(ttl).as_nanos() as u64);
                        self.registration.publish(&self.link);
                    }
                    Ok(None) => {
                        // The lease expired while we were cut off: our
                        // shares may be others' by now. Out of force at once,
                        // and register again.
                        self.link.set_valid_until(0);
                        self.registration.set(0, 0);
                        tracing::warn!("etcd lease expired; registering again");
                    }
                    Err(_) => {}
                }
            }
            if last_status.is_none_or(|t| t.elapsed() >= DB_STATUS_EVERY) {
                last_status = Some(tokio::time::Instant::now());
                self.read_db_status().await;
            }
        }
        watcher.abort();
        self.link.set_valid_until(0);
        let id = self.registration.lease();
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

    /// Marks rule `id` used: its use key lives `ttl` from now, on a lease of
    /// its own. Every daemon's mark replaces the key (and its lease), so the
    /// key lives `ttl` after the latest mark by any daemon: etcd's lease
    /// clock, not any daemon's wall clock, says when a rule was last used.
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn mark_rule_used(&self, id: &str, ttl: Duration) -> Result<(), ClusterError> {
        let client = self.client.clone();
        let key = self.key(&format!("rule-use/{id}"));
        let secs = i64::try_from(ttl.as_secs().saturating_add(1)).unwrap_or(i64::MAX);
        self.call(|| {
            let (mut c, key) = (client.clone(), key.clone());
            async move {
                let lease = c.lease_grant(secs, None).await?.id();
                c.put(key, "", Some(PutOptions::new().with_lease(lease)))
                    .await
                    .map(drop)
            }
        })
        .await
        .map_err(ClusterError::Unavailable)
    }

    /// Deletes rule `id` if no daemon marked it used within its expiry (its
    /// use key is gone), in one transaction: `true` if it was deleted.
    ///
    /// # Errors
    /// etcd unreachable.
    pub async fn delete_rule_if_unused(&self, id: &str) -> Result<bool, ClusterError> {
        let client = self.client.clone();
        let rule = self.key(&format!("rules/{id}"));
        let used = self.key(&format!("rule-use/{id}"));
        let txn = Txn::new()
            .when([Compare::version(used, CompareOp::Equal, 0)])
            .and_then([TxnOp::delete(rule, None)]);
        self.call(|| {
            let (mut c, txn) = (client.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await
        .map(|r| {
            r.succeeded()
                && r.op_responses().iter().any(
                    |op| matches!(op, etcd_client::TxnOpResponse::Delete(d) if d.deleted() > 0),
                )
        })
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
