//! Every message of protocol v1, as serde types encoded with postcard.
//!
//! Field order is the wire order; enum variants are numbered in declaration
//! order and are only ever appended. Strings are `Cow` so the daemon decodes
//! requests borrowing from the frame buffer (no allocation per request) and
//! encodes decisions borrowing the rule id; clients decode owned values.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rule::RuleSpec;

/// A request and the id its response will echo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame<'a> {
    pub id: u64,
    #[serde(borrow)]
    pub request: Request<'a>,
}

/// Requests, numbered 0.. in this order on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// 0. Must be the first frame of a connection.
    Hello { version: u16 },
    /// 1. One decision.
    Acquire(#[serde(borrow)] Acquire<'a>),
    /// 2. Up to one frame of decisions, each decided independently, in order.
    AcquireMany(#[serde(borrow)] Vec<Acquire<'a>>),
    /// 3. Create or replace rules, all or none (admin); versions 1-2 layout.
    RuleSet { rules: Vec<RuleSpecV2> },
    /// 4. One rule with its counters.
    RuleGet {
        #[serde(borrow)]
        id: Cow<'a, str>,
    },
    /// 5. Every rule in force.
    RuleList,
    /// 6. Remove a rule set at run time (admin).
    RuleDelete {
        #[serde(borrow)]
        id: Cow<'a, str>,
    },
    /// 7. Counters and latency.
    Stats,
    /// 8. Liveness and coordination state.
    Health,
    /// 9. (Version 3.) `RuleSet` with `per` and `shadow` (admin).
    RuleSetV3 { rules: Vec<RuleSpec> },
    /// 10. (Version 3.) `RuleGet`, answered with `RuleV3`.
    RuleGetV3 {
        #[serde(borrow)]
        id: Cow<'a, str>,
    },
    /// 11. (Version 3.) `RuleList`, answered with `RulesV3`.
    RuleListV3,
    /// 12. (Version 3.) What an `Acquire` would meet; spends nothing.
    Explain(#[serde(borrow)] Acquire<'a>),
}

impl Request<'_> {
    /// Requests that change rules need an authorised peer.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::RuleSet { .. } | Request::RuleSetV3 { .. } | Request::RuleDelete { .. }
        )
    }

    /// Name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Hello",
            Request::Acquire(_) => "Acquire",
            Request::AcquireMany(_) => "AcquireMany",
            Request::RuleSet { .. } => "RuleSet",
            Request::RuleGet { .. } => "RuleGet",
            Request::RuleList => "RuleList",
            Request::RuleDelete { .. } => "RuleDelete",
            Request::Stats => "Stats",
            Request::Health => "Health",
            Request::RuleSetV3 { .. } => "RuleSetV3",
            Request::RuleGetV3 { .. } => "RuleGetV3",
            Request::RuleListV3 => "RuleListV3",
            Request::Explain(_) => "Explain",
        }
    }
}

/// Number of request variants this version knows; higher indices are unknown.
pub const REQUEST_VARIANTS: u32 = 13;

/// "May `client` use `resource` now, spending `cost` tokens?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire<'a> {
    #[serde(borrow)]
    pub client: Cow<'a, str>,
    #[serde(borrow)]
    pub resource: Cow<'a, str>,
    /// Tokens to take; 0 asks without spending.
    pub cost: u64,
    pub priority: Priority,
    /// W3C trace context of the caller, to link its trace to the daemon's spans.
    pub trace: Option<TraceContext>,
}

impl<'a> Acquire<'a> {
    /// A normal-priority request for one token.
    pub fn new(client: impl Into<Cow<'a, str>>, resource: impl Into<Cow<'a, str>>) -> Self {
        Acquire {
            client: client.into(),
            resource: resource.into(),
            cost: 1,
            priority: Priority::Normal,
            trace: None,
        }
    }

    /// Sets the cost.
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Carries the caller's trace context: with `--otlp-endpoint`, the
    /// daemon's decision span becomes a child of `trace`'s span (always
    /// recorded when `trace` is sampled, never when it is not).
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }
}

/// Request priority. Lower classes stop at their rule's reserve floor;
/// `Critical` is never denied but is counted, debited and reported as bypassed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            "critical" => Ok(Priority::Critical),
            _ => Err(format!(
                "unknown priority {s:?}; use low, normal, high or critical"
            )),
        }
    }
}

/// W3C `traceparent` in binary form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Whether both ids are non-zero, as W3C requires (an invalid context is
    /// ignored by the daemon, and counted).
    pub fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`.
    ///
    /// # Errors
    /// Anything that is not a version-00 traceparent with non-zero ids.
    pub fn parse_traceparent(s: &str) -> Result<TraceContext, String> {
        let bad = || format!("{s:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)");
        let parts: Vec<&str> = s.split('-').collect();
        if parts.len() != 4 || parts[0] != "00" {
            return Err(bad());
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_into(parts[1], &mut trace_id).ok_or_else(bad)?;
        hex_into(parts[2], &mut span_id).ok_or_else(bad)?;
        hex_into(parts[3], &mut flags).ok_or_else(bad)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(bad());
        }
        Ok(TraceContext {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        self.trace_id
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("-")?;
        self.span_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}

/// A response and the id of the request it answers (0 when the request's id
/// could not be read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame<'a> {
    pub id: u64,
    pub response: Response<'a>,
}

/// Responses, numbered 0.. in this order on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response<'a> {
    /// 0. Answer to `Hello`.
    HelloOk {
        version: u16,
        server: Cow<'a, str>,
        /// Largest request frame the daemon accepts, in bytes.
        max_frame: u32,
    },
    /// 1. Answer to `Acquire`.
    Decision(Decision<'a>),
    /// 2. Answer to `AcquireMany`, one item per request, in order.
    Decisions(Vec<BatchItem<'a>>),
    /// 3. Answer to `RuleSet`: how many rules were created or changed.
    RulesApplied { changed: u32 },
    /// 4. Answer to `RuleGet` (the version 1 and 2 rule layout).
    Rule(RuleInfo<RuleSpecV2>),
    /// 5. Answer to `RuleList` (the version 1 and 2 rule layout).
    Rules(Vec<RuleInfo<RuleSpecV2>>),
    /// 6. Answer to `RuleDelete`.
    RuleDeleted,
    /// 7. Answer to `Stats`.
    Stats(Box<StatsReport>),
    /// 8. Answer to `Health`.
    Health(HealthReport),
    /// 9. The request failed; see the code.
    Error(ErrorBody<'a>),
    /// 10. Answer to `Hello` from version 2: versions and capabilities.
    Welcome(Welcome<'a>),
    /// 11. Answer to `Hello` for a version above the daemon's (then closed).
    UnsupportedVersion {
        requested: u16,
        min_version: u16,
        max_version: u16,
    },
    /// 12. (Version 3.) Answer to `RuleGetV3`: every field of the rule.
    RuleV3(RuleInfo),
    /// 13. (Version 3.) Answer to `RuleListV3`.
    RulesV3(Vec<RuleInfo>),
    /// 14. (Version 3.) Answer to `Explain`.
    Explanation(Explanation<'a>),
}

/// What an acquire would meet now: every rule that matches, whether it
/// applies, its bucket, and the answer an `Acquire` would get. Nothing is
/// spent and no bucket is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation<'a> {
    /// What `Acquire` would answer now.
    pub decision: Decision<'a>,
    /// Every rule matching (client, resource), grouped by `per` (client and
    /// resource, client, resource, none), most specific first.
    pub rules: Vec<RuleExplained>,
}

/// One matching rule in an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleExplained {
    pub id: String,
    pub per: crate::rule::Per,
    pub shadow: bool,
    pub scope: crate::rule::Scope,
    /// The more specific rule with the same `per` that applies instead;
    /// `None`: this rule applies.
    pub overridden_by: Option<String>,
    /// The bucket's names: empty where the rule is not keyed by one.
    pub client: String,
    pub resource: String,
    /// Whole tokens in the bucket now (a bucket not created yet: what it
    /// would start with), and its depth (a global rule's share here).
    pub tokens: u64,
    pub depth: u64,
    /// What this rule would decide (`None` when overridden).
    pub outcome: Option<Outcome>,
    /// When it would deny: nanoseconds until it would allow.
    pub retry_after_ns: u64,
    /// The cost is above what the priority may ever take from this rule.
    pub cost_too_high: bool,
}

/// The protocol version 2 handshake answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome<'a> {
    /// The version this connection speaks (the one asked for).
    pub version: u16,
    /// The oldest and newest versions the daemon speaks.
    pub min_version: u16,
    pub max_version: u16,
    pub server: Cow<'a, str>,
    /// Largest request frame the daemon accepts, in bytes.
    pub max_frame: u32,
    /// Optional behaviours this daemon offers (see rld-protocol(7)); clients
    /// ignore names they do not know.
    pub capabilities: Vec<Cow<'a, str>>,
}

/// The answer to one acquire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision<'a> {
    pub outcome: Outcome,
    /// The rule's limit per window (0 when no rule matched).
    pub limit: u64,
    /// Whole tokens left in the bucket after this decision.
    pub remaining: u64,
    /// When denied: nanoseconds until the same request would be allowed.
    pub retry_after_ns: u64,
    /// Nanoseconds until the bucket is full again.
    pub reset_after_ns: u64,
    /// The rule that decided; empty when no rule matched and the default applied.
    pub rule: Cow<'a, str>,
}

impl Decision<'_> {
    /// Allowed or bypassed: the caller may go ahead.
    pub fn is_allowed(&self) -> bool {
        matches!(self.outcome, Outcome::Allowed | Outcome::Bypassed)
    }

    /// Detaches the decision from the buffer it borrows.
    pub fn into_owned(self) -> Decision<'static> {
        Decision {
            rule: Cow::Owned(self.rule.into_owned()),
            ..self
        }
    }
}

/// What happened to an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    /// A critical request admitted over the limit (still debited).
    Bypassed,
}

/// One item of an `AcquireMany` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchItem<'a> {
    Decision(Decision<'a>),
    Error(ErrorBody<'a>),
}

/// A typed error code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody<'a> {
    pub code: ErrorCode,
    pub message: Cow<'a, str>,
}

impl<'a> ErrorBody<'a> {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'a, str>>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }

    pub fn into_owned(self) -> ErrorBody<'static> {
        ErrorBody {
            code: self.code,
            message: Cow::Owned(self.message.into_owned()),
        }
    }
}

impl fmt::Display for ErrorBody<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// Error code on the wire: a `u16`, so codes added later still decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($name:ident = $value:literal, $text:literal;)*) => {
        impl ErrorCode {
            $(pub const $name: ErrorCode = ErrorCode($value);)*

            /// The code's name, or `unknown` for codes from a newer daemon.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($value => $text,)*
                    _ => "unknown",
                }
            }
        }
    };
}

error_codes! {
    MALFORMED_FRAME = 0, "malformed_frame";
    FRAME_TOO_LARGE = 1, "frame_too_large";
    UNSUPPORTED_VERSION = 2, "unsupported_version";
    HANDSHAKE_REQUIRED = 3, "handshake_required";
    UNKNOWN_REQUEST = 4, "unknown_request";
    INVALID_ARGUMENT = 5, "invalid_argument";
    COST_EXCEEDS_BURST = 6, "cost_exceeds_burst";
    INVALID_RULE = 7, "invalid_rule";
    RULE_NOT_FOUND = 8, "rule_not_found";
    PERMISSION_DENIED = 9, "permission_denied";
    STORAGE_FAILED = 10, "storage_failed";
    TOO_MANY_CONNECTIONS = 11, "too_many_connections";
    SHUTTING_DOWN = 12, "shutting_down";
    INTERNAL = 13, "internal";
    RULE_READ_ONLY = 14, "rule_read_only";
    UNAVAILABLE = 15, "unavailable";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.name())
    }
}

/// Where a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSource {
    /// The daemon's config file (read-only over the socket; edit the file and reload).
    Config,
    /// Set at run time (`rlctl rules set`), persisted in the state directory.
    Runtime,
    /// Set at run time and stored in etcd, shared by every daemon.
    Etcd,
}

/// A rule as protocol versions 1 and 2 carry it: a [`RuleSpec`] without
/// `per` and `shadow` (the wire layout of those versions, unchanged). A rule
/// keyed otherwise, or a shadow, is shown to them as if it were neither.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSpecV2 {
    pub id: String,
    pub client: String,
    pub resource: String,
    pub limit: u64,
    #[serde(with = "crate::rule::nanos")]
    pub window: std::time::Duration,
    pub burst: Option<u64>,
    #[serde(with = "crate::rule::opt_nanos")]
    pub expire_idle: Option<std::time::Duration>,
    pub reserve: crate::rule::Reserve,
    pub scope: crate::rule::Scope,
    pub on_failure: Option<crate::rule::OnFailure>,
    pub accuracy: Option<crate::rule::Accuracy>,
    pub fallback_limit: Option<u64>,
}

impl From<RuleSpecV2> for RuleSpec {
    fn from(r: RuleSpecV2) -> RuleSpec {
        RuleSpec {
            id: r.id,
            client: r.client,
            resource: r.resource,
            limit: r.limit,
            window: r.window,
            burst: r.burst,
            expire_idle: r.expire_idle,
            reserve: r.reserve,
            scope: r.scope,
            on_failure: r.on_failure,
            accuracy: r.accuracy,
            fallback_limit: r.fallback_limit,
            per: crate::rule::Per::default(),
            shadow: false,
        }
    }
}

impl From<RuleSpec> for RuleSpecV2 {
    fn from(r: RuleSpec) -> RuleSpecV2 {
        RuleSpecV2 {
            id: r.id,
            client: r.client,
            resource: r.resource,
            limit: r.limit,
            window: r.window,
            burst: r.burst,
            expire_idle: r.expire_idle,
            reserve: r.reserve,
            scope: r.scope,
            on_failure: r.on_failure,
            accuracy: r.accuracy,
            fallback_limit: r.fallback_limit,
        }
    }
}

impl<S> RuleInfo<S> {
    /// The same counters with the rule in another layout.
    pub fn map_spec<T>(self, f: impl FnOnce(S) -> T) -> RuleInfo<T> {
        RuleInfo {
            spec: f(self.spec),
            source: self.source,
            allowed: self.allowed,
            rejected: self.rejected,
            bypassed: self.bypassed,
            idle_ns: self.idle_ns,
            lease: self.lease,
        }
    }
}

/// A rule with its live counters. For a shadow rule, `allowed` and
/// `rejected` count what it would have decided (it never denies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleInfo<S = RuleSpec> {
    pub spec: S,
    pub source: RuleSource,
    pub allowed: u64,
    pub rejected: u64,
    pub bypassed: u64,
    /// Nanoseconds since a request last matched the rule.
    pub idle_ns: u64,
    /// Global rules: how tokens are leased here.
    pub lease: Option<LeaseInfo>,
}

/// How a global rule is shared on this daemon (v2 leases: each daemon holds
/// a share of the rule's rate and burst, and the shares of all daemons sum
/// to at most the rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// Depth in tokens of this daemon's implicit share (`floor(burst / n)`,
    /// what a bucket with no record holds); named for the v1 batch size.
    pub batch: u64,
    /// Always false since v2 leases (no rule leases per request).
    pub per_request: bool,
    /// Live daemons sharing the rule (`N`).
    pub members: u64,
    /// Tokens that all daemons together may admit beyond `rate x t + burst`
    /// in any interval `t`: 0 since v2 leases.
    pub bound: f64,
    /// Always 0 since v2 leases (the accuracy knob no longer applies).
    pub allowed_error: f64,
    /// Whole tokens this daemon's buckets of the rule hold now.
    pub held: u64,
}

/// Counters, gauges and latency of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub uptime_ns: u64,
    pub allowed: u64,
    pub rejected: u64,
    pub bypassed: u64,
    /// Requests no rule matched, answered by the default action.
    pub unmatched: u64,
    pub buckets: u64,
    pub max_buckets: u64,
    pub evicted_idle: u64,
    pub evicted_lru: u64,
    pub rules: u64,
    pub rules_expired: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    pub connections_rejected: u64,
    pub protocol_errors: u64,
    pub latency: LatencySummary,
    pub per_rule: Vec<RuleCounters>,
    /// Present when limits are shared through etcd.
    pub cluster: Option<ClusterStats>,
}

/// Coordination through etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// `healthy`, `suspect`, `degraded` or `recovering`.
    pub state: String,
    /// Transitions of the health state machine so far.
    pub state_changes: u64,
    pub members: u64,
    pub lease_txns: u64,
    /// Bucket writes whose compare failed (another daemon moved the key;
    /// retried with its current value).
    pub lease_conflicts: u64,
    pub lease_failures: u64,
    pub tokens_leased: u64,
    pub tokens_returned: u64,
    pub debt_charged: u64,
    /// Refill or release events dropped because the coordinator lagged.
    pub dropped_events: u64,
    pub txn_latency: LatencySummary,
    pub rules: Vec<GlobalRuleStats>,
    /// This daemon's wall clock against its peers'. Appended last so the
    /// fields before it keep their offsets.
    pub clock: ClockReport,
    /// Lease operations sent (one per bucket per transaction attempt; a
    /// transaction carries up to 100).
    pub lease_ops: u64,
    /// Operations whose outcome was unknown (a timeout, a lost answer), and
    /// how many of those were later found committed (never applied twice).
    pub lease_unknown: u64,
    pub lease_resolved: u64,
    /// Unreadable bucket values rewritten as empty buckets.
    pub lease_repairs: u64,
    /// Bucket TATs beyond the rule's depth (written by a clock ahead) clamped.
    pub lease_clamped: u64,
    /// Refills refused because the rule has `max_buckets_per_rule` buckets.
    /// Always 0 since v2 leases.
    pub bucket_cap_refusals: u64,
    /// Shares (v2 leases). Appended last so the fields before it keep their
    /// offsets; `None` from a daemon older than v2 leases.
    #[serde(default)]
    pub shares: Option<ShareStats>,
}

/// This daemon's shares of global rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareStats {
    /// This daemon's operating count `n` (implicit shares are `1/n`; 0: not
    /// using shares yet).
    pub count: u64,
    /// Nanoseconds until this daemon's shares lapse unless renewed (0:
    /// lapsed: global rules follow `on_failure`).
    pub valid_for_ns: u64,
    /// Buckets with a recorded share on this daemon.
    pub recorded: u64,
    /// Records this daemon created and deleted; its shares raised and
    /// lowered; changes of its operating count.
    pub records_created: u64,
    pub records_deleted: u64,
    pub raises: u64,
    pub lowers: u64,
    pub count_changes: u64,
    /// etcd's database size as last read, and whether its NOSPACE alarm is
    /// raised (etcd refuses writes until an operator clears it).
    pub etcd_db_bytes: u64,
    pub etcd_nospace: bool,
}

/// One global rule's lease state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalRuleStats {
    pub id: String,
    pub lease: LeaseInfo,
}

/// Decision latency inside the daemon, in nanoseconds, from a sample of one
/// decision in 8 (timing every one would cost as much as deciding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub avg_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// Decisions of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounters {
    pub id: String,
    pub allowed: u64,
    pub rejected: u64,
    pub bypassed: u64,
}

/// Whether the daemon is serving and how it coordinates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub state: ServingState,
    pub version: String,
    pub uptime_ns: u64,
    pub rules: u64,
    /// `standalone`, or `etcd` when limits are shared.
    pub mode: String,
    /// Present when limits are shared through etcd.
    pub etcd: Option<EtcdHealth>,
}

/// The etcd cluster as this daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdHealth {
    /// `healthy`, `suspect`, `degraded` or `recovering`.
    pub state: String,
    /// When the state was entered, Unix milliseconds.
    pub since_unix_ms: u64,
    /// Live daemons counted in etcd.
    pub members: u64,
    pub node_id: String,
    /// The last etcd error seen (empty if none).
    pub last_error: String,
    /// This daemon's wall clock against its peers'. Appended last so the
    /// fields before it keep their offsets.
    pub clock: ClockReport,
}

/// This daemon's wall clock measured against its peers' through their
/// member keys in etcd. Global buckets use wall-clock time, so a daemon
/// whose clock is off by more than `max_clock_skew` stops leasing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockReport {
    /// This daemon's clock minus the median clock of the live daemons
    /// (itself included), in nanoseconds: positive means ahead. 0 until a
    /// peer has been measured.
    pub offset_ns: i64,
    /// The configured `max_clock_skew`, in nanoseconds.
    pub max_skew_ns: u64,
    /// Beyond `max_clock_skew` from a strict majority of the live peers:
    /// leasing is stopped and global rules follow their `on_failure`.
    pub skewed: bool,
    /// Times `skewed` changed since start.
    pub transitions: u64,
    /// The measured latency from our own member-key write to its watch
    /// event, nanoseconds: the correction added to every peer sample, and
    /// about the size of the estimate's error.
    pub delay_ns: u64,
    /// Every live peer measured, by node id.
    pub peers: Vec<PeerClock>,
}

/// One peer's clock as this daemon measures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerClock {
    pub node: String,
    /// This daemon's clock minus the peer's, nanoseconds (median of recent
    /// samples): positive means this daemon is ahead of the peer.
    pub offset_ns: i64,
    /// Recent samples the estimate is taken from.
    pub samples: u32,
}

/// The daemon's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServingState {
    /// Serving with every subsystem healthy.
    Ok,
    /// Serving, but some rules run on their failure policy.
    Degraded,
    /// Draining before exit.
    Stopping,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse_traceparent(s).unwrap();
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), s);
        assert!(TraceContext::parse_traceparent("00-00-00-00").is_err());
        assert!(
            TraceContext::parse_traceparent(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            )
            .is_err()
        );
    }

    #[test]
    fn error_codes_have_names() {
        assert_eq!(ErrorCode::FRAME_TOO_LARGE.name(), "frame_too_large");
        assert_eq!(ErrorCode(999).name(), "unknown");
        assert_eq!(ErrorCode::INVALID_RULE.to_string(), "7 invalid_rule");
    }
}
