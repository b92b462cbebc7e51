//! The rule model shared by the daemon, the CLI and the wire protocol: what a
//! rule says ([`RuleSpec`]), how it is checked ([`RuleSpec::validate`]) and how
//! operators write it in TOML ([`mod@file`]).
//!
//! Pure data and pure checks: no I/O, no limiter state. A rule that passes
//! [`RuleSpec::validate`] can always be compiled into a bucket configuration
//! without overflow.

#[cfg(feature = "daemon")]
pub mod file;
mod pattern;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use pattern::{MAX_NAME_BYTES, Pattern, PatternError, Specificity, precedence};

/// Longest rule id accepted, in bytes.
pub const MAX_RULE_ID_BYTES: usize = 128;
/// Shortest window accepted.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);
/// Longest window accepted (one year).
pub const MAX_WINDOW: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest burst accepted. Keeps `burst * interval` far from `u64` overflow.
pub const MAX_BURST: u64 = 1 << 40;
/// Longest time a bucket may need to refill from empty (`burst * interval`):
/// 100 years, so nanosecond arithmetic on it never overflows.
pub const MAX_REFILL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Shortest `expire_idle` accepted; the sweeper runs about once a second.
pub const MIN_EXPIRE_IDLE: Duration = Duration::from_secs(1);
/// Longest `expire_idle` accepted (100 years; longer wrapped the nanosecond
/// arithmetic and deleted the rule at once).
pub const MAX_EXPIRE_IDLE: Duration = MAX_REFILL;

/// One rate-limit rule as written by an operator and carried on the wire.
///
/// A bucket exists per (rule, client, resource) that the rule matches; it holds
/// `burst` tokens and refills at `limit` tokens per `window`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Unique name; shown in every decision so callers can tell which rule limited them.
    pub id: String,
    /// Client pattern: exact, `prefix*` or `*`.
    pub client: String,
    /// Resource pattern: exact, `prefix*` or `*`.
    pub resource: String,
    /// Tokens added per `window`.
    pub limit: u64,
    /// The refill period of `limit`.
    #[serde(with = "nanos")]
    pub window: Duration,
    /// Bucket capacity; `None` means `limit`.
    pub burst: Option<u64>,
    /// Remove the rule once no request has matched it for this long (rules set at
    /// run time for per-tenant limits, so they do not pile up).
    #[serde(with = "opt_nanos")]
    pub expire_idle: Option<Duration>,
    /// Fraction of the bucket each priority class may not spend.
    pub reserve: Reserve,
    /// `Local`: one limit per host. `Global`: one limit shared by all hosts via etcd.
    pub scope: Scope,
    /// What a global rule does while etcd is unreachable (global rules only).
    pub on_failure: Option<OnFailure>,
    /// Allowed over-admission and its horizon (global rules only).
    pub accuracy: Option<Accuracy>,
    /// Per-host limit per `window` used by `on_failure = "local"` (global rules only).
    pub fallback_limit: Option<u64>,
    /// What the rule's buckets are keyed by. Rules with the same `per`
    /// override one another by specificity; rules with different `per` all
    /// apply (stacked). On the wire from protocol version 3 only.
    pub per: Per,
    /// Decided and counted, but never denies and never charges the other
    /// rules: how a new limit is rolled out. Protocol version 3 only.
    pub shadow: bool,
}

/// What a rule's buckets are keyed by: one bucket per (client, resource)
/// (the default), per client, per resource, or one for everything the rule
/// matches.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Per {
    #[default]
    ClientResource,
    Client,
    Resource,
    None,
}

impl Per {
    /// Every value, in the order stacked rules are checked and shown.
    pub const ALL: [Per; 4] = [Per::ClientResource, Per::Client, Per::Resource, Per::None];

    /// The names of a bucket of this `per` for a request: the part a rule
    /// is not keyed by is empty (no request name is: they are refused).
    #[inline]
    pub fn key<'a>(self, client: &'a str, resource: &'a str) -> (&'a str, &'a str) {
        match self {
            Per::ClientResource => (client, resource),
            Per::Client => (client, ""),
            Per::Resource => ("", resource),
            Per::None => ("", ""),
        }
    }

    /// The TOML list (`["client", "resource"]`, ..., `[]`).
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Per::ClientResource => &["client", "resource"],
            Per::Client => &["client"],
            Per::Resource => &["resource"],
            Per::None => &[],
        }
    }

    /// Parses the TOML list; order does not matter.
    ///
    /// # Errors
    /// An unknown or repeated name.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Per, String> {
        let (mut client, mut resource) = (false, false);
        for n in names {
            let seen = match n.as_ref() {
                "client" => &mut client,
                "resource" => &mut resource,
                other => {
                    return Err(format!(
                        "has {other:?}; a bucket is keyed by \"client\", \"resource\", both or neither: \
                         per = [\"client\", \"resource\"] (the default), [\"client\"], [\"resource\"] or []"
                    ));
                }
            };
            if *seen {
                return Err(format!(
                    "names {:?} twice; name each at most once",
                    n.as_ref()
                ));
            }
            *seen = true;
        }
        Ok(match (client, resource) {
            (true, true) => Per::ClientResource,
            (true, false) => Per::Client,
            (false, true) => Per::Resource,
            (false, false) => Per::None,
        })
    }

    /// The command-line form: `client,resource`, `client`, `resource`, `none`.
    pub fn flag(self) -> &'static str {
        match self {
            Per::ClientResource => "client,resource",
            Per::Client => "client",
            Per::Resource => "resource",
            Per::None => "none",
        }
    }

    /// Parses the command-line form (also `resource,client`).
    ///
    /// # Errors
    /// Anything else, with the accepted values.
    pub fn parse_flag(text: &str) -> Result<Per, String> {
        match text.trim() {
            "none" | "" => Ok(Per::None),
            t => Per::from_names(&t.split(',').map(str::trim).collect::<Vec<_>>()).map_err(|_| {
                format!(
                    "{text:?} is not a key; use client,resource (the default), client, resource or none"
                )
            }),
        }
    }
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag())
    }
}

/// Per-priority reserve floors, in thousandths of the bucket (`100` = 10%).
///
/// A request of class `low` is denied if it would leave fewer than
/// `low / 1000 * burst` tokens; `critical` has no floor and bypasses the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserve {
    pub high: u16,
    pub normal: u16,
    pub low: u16,
}

/// Where a rule's bucket lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each host enforces the limit on its own.
    #[default]
    Local,
    /// All hosts share one limit, leased in batches from etcd.
    Global,
}

/// Behaviour of a global rule while etcd is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Admit everything (counted).
    Open,
    /// Deny once the tokens already held are spent.
    Closed,
    /// Enforce a lenient per-host limit.
    Local,
}

/// The accuracy knob of a global rule: over-admission of at most
/// `error_bp / 10_000` of the limit over any `horizon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Allowed error in basis points (`200` = 2%).
    pub error_bp: u32,
    #[serde(with = "nanos")]
    pub horizon: Duration,
}

impl Default for Accuracy {
    fn default() -> Self {
        Accuracy {
            error_bp: 200,
            horizon: Duration::from_secs(10),
        }
    }
}

impl Accuracy {
    /// Parses `"2%/10s"`.
    ///
    /// # Errors
    /// Anything but `<percent>%/<duration>` with a percent in (0, 100].
    pub fn parse(text: &str) -> Result<Accuracy, String> {
        let (pct, horizon) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not of the form \"2%/10s\""))?;
        let pct = pct
            .trim()
            .strip_suffix('%')
            .ok_or_else(|| format!("{text:?}: the error needs a '%' sign, as in \"2%/10s\""))?;
        let pct: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {pct:?} is not a number"))?;
        if !(pct > 0.0 && pct <= 100.0) {
            return Err(format!(
                "{text:?}: the error must be above 0% and at most 100%"
            ));
        }
        let horizon = parse_duration(horizon.trim()).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Accuracy {
            error_bp: (pct * 100.0).round().max(1.0) as u32,
            horizon,
        })
    }
}

impl fmt::Display for Accuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = f64::from(self.error_bp) / 100.0;
        write!(f, "{pct}%/{}", format_duration(self.horizon))
    }
}

/// A rule that failed validation: the field and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {id:?}: {field} {problem}")]
pub struct RuleError {
    /// The rule id as given (may be empty or invalid itself).
    pub id: String,
    /// The offending field, as spelled in TOML and on the command line.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl RuleSpec {
    /// A local rule with defaults for everything optional.
    pub fn new(
        id: impl Into<String>,
        client: impl Into<String>,
        resource: impl Into<String>,
        limit: u64,
        window: Duration,
    ) -> RuleSpec {
        RuleSpec {
            id: id.into(),
            client: client.into(),
            resource: resource.into(),
            limit,
            window,
            burst: None,
            expire_idle: None,
            reserve: Reserve::default(),
            scope: Scope::Local,
            on_failure: None,
            accuracy: None,
            fallback_limit: None,
            per: Per::ClientResource,
            shadow: false,
        }
    }

    /// Bucket capacity: `burst`, or `limit` when unset.
    pub fn capacity(&self) -> u64 {
        self.burst.unwrap_or(self.limit)
    }

    /// Nanoseconds between two tokens, rounded up so that rounding can only
    /// under-admit (by at most 1 ns per token).
    pub fn interval_ns(&self) -> u64 {
        let window = self.window.as_nanos() as u64;
        window.div_ceil(self.limit.max(1))
    }

    /// The parsed client pattern. Valid after [`RuleSpec::validate`].
    ///
    /// # Errors
    /// See [`Pattern::parse`].
    pub fn client_pattern(&self) -> Result<Pattern, PatternError> {
        Pattern::parse(&self.client)
    }

    /// The parsed resource pattern. Valid after [`RuleSpec::validate`].
    ///
    /// # Errors
    /// See [`Pattern::parse`].
    pub fn resource_pattern(&self) -> Result<Pattern, PatternError> {
        Pattern::parse(&self.resource)
    }

    /// Checks what [`RuleSpec::validate`] does, and also that the client and
    /// resource patterns hold no character of [`unsafe_in_text`]: for rules
    /// set now (rules loaded from older state files may hold such patterns;
    /// they load, and are shown escaped).
    ///
    /// # Errors
    /// The first field that is wrong, with the fix in the message.
    pub fn validate_new(&self) -> Result<(), RuleError> {
        self.validate()?;
        for (field, text) in [("client", &self.client), ("resource", &self.resource)] {
            if text.chars().any(unsafe_in_text) {
                return Err(RuleError {
                    id: self.id.clone(),
                    field,
                    problem: format!(
                        "{} contains a control character or a bidirectional control; \
                         patterns are printable text",
                        escape_text(text)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks every field on its own (not against other rules).
    ///
    /// # Errors
    /// The first field that is wrong, with the fix in the message.
    pub fn validate(&self) -> Result<(), RuleError> {
        let err = |field: &'static str, problem: String| RuleError {
            id: self.id.clone(),
            field,
            problem,
        };
        validate_rule_id(&self.id).map_err(|p| err("id", p))?;
        self.client_pattern()
            .map_err(|e| err("client", e.to_string()))?;
        self.resource_pattern()
            .map_err(|e| err("resource", e.to_string()))?;
        if self.limit == 0 {
            return Err(err(
                "limit",
                "is 0; it must be at least 1 token per window".into(),
            ));
        }
        if self.window < MIN_WINDOW {
            return Err(err(
                "window",
                format!(
                    "is {}; it must be at least 1ms (for example \"250ms\", \"1s\", \"1m\")",
                    format_duration(self.window)
                ),
            ));
        }
        if self.window > MAX_WINDOW {
            return Err(err(
                "window",
                format!(
                    "is {}; it must be at most 365d",
                    format_duration(self.window)
                ),
            ));
        }
        if (self.window.as_nanos() as u64) < self.limit {
            return Err(err(
                "limit",
                format!(
                    "of {} per {} is above one token per nanosecond; use a longer window or a smaller limit",
                    self.limit,
                    format_duration(self.window)
                ),
            ));
        }
        match self.burst {
            Some(0) => {
                return Err(err(
                    "burst",
                    "is 0; it must be at least 1 (or left out to default to limit)".into(),
                ));
            }
            Some(b) if b > MAX_BURST => {
                return Err(err("burst", format!("is {b}; the maximum is {MAX_BURST}")));
            }
            _ => {}
        }
        if self.burst.is_none() && self.limit > MAX_BURST {
            return Err(err(
                "limit",
                format!(
                    "is {}; without a burst the maximum is {MAX_BURST}",
                    self.limit
                ),
            ));
        }
        let refill = u128::from(self.capacity()) * u128::from(self.interval_ns());
        if refill > MAX_REFILL.as_nanos() {
            return Err(err(
                "burst",
                "takes more than 100 years to refill at this limit; lower burst or raise limit"
                    .into(),
            ));
        }
        if let Some(idle) = self.expire_idle
            && idle < MIN_EXPIRE_IDLE
        {
            return Err(err(
                "expire_idle",
                format!("is {}; it must be at least 1s", format_duration(idle)),
            ));
        }
        if let Some(idle) = self.expire_idle
            && idle > MAX_EXPIRE_IDLE
        {
            return Err(err(
                "expire_idle",
                format!(
                    "is {}; it must be at most 100 years (leave it out to keep the rule)",
                    format_duration(idle)
                ),
            ));
        }
        let r = self.reserve;
        for (name, v) in [("high", r.high), ("normal", r.normal), ("low", r.low)] {
            if v >= 1000 {
                return Err(err(
                    "reserve",
                    format!(
                        "{name} is {}; each reserve must be below 1.0",
                        f64::from(v) / 1000.0
                    ),
                ));
            }
        }
        if !(r.high <= r.normal && r.normal <= r.low) {
            return Err(err(
                "reserve",
                "must keep more back from lower classes: high <= normal <= low".into(),
            ));
        }
        if self.scope == Scope::Local {
            let global_only = [
                ("on_failure", self.on_failure.is_some()),
                ("accuracy", self.accuracy.is_some()),
                ("fallback_limit", self.fallback_limit.is_some()),
            ];
            if let Some((field, _)) = global_only.iter().find(|(_, set)| *set) {
                return Err(err(
                    field,
                    "only applies to scope = \"global\" rules; remove it or set scope = \"global\""
                        .into(),
                ));
            }
        }
        if self.shadow {
            let failure_only = [
                ("on_failure", self.on_failure.is_some()),
                ("fallback_limit", self.fallback_limit.is_some()),
            ];
            if let Some((field, _)) = failure_only.iter().find(|(_, set)| *set) {
                return Err(err(
                    field,
                    "is set on a shadow rule, which never denies (not even while etcd is \
                     unreachable); remove it, or make the rule enforce (no shadow)"
                        .into(),
                ));
            }
        }
        if self.fallback_limit == Some(0) {
            return Err(err(
                "fallback_limit",
                "is 0; use on_failure = \"closed\" to deny while etcd is unreachable".into(),
            ));
        }
        if let Some(acc) = self.accuracy
            && (acc.error_bp == 0 || acc.error_bp > 10_000 || acc.horizon < Duration::from_secs(1))
        {
            return Err(err(
                "accuracy",
                "must be an error in (0%, 100%] over a horizon of at least 1s, like \"2%/10s\""
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Checks a rule id: 1 to [`MAX_RULE_ID_BYTES`] bytes, no control characters,
/// no `/` (ids are etcd key segments).
///
/// # Errors
/// A message saying what is wrong.
pub fn validate_rule_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty; give the rule a name".into());
    }
    if id.len() > MAX_RULE_ID_BYTES {
        return Err(format!(
            "is {} bytes long; the maximum is {MAX_RULE_ID_BYTES} bytes",
            id.len()
        ));
    }
    if id.chars().any(|c| unsafe_in_text(c) || c == '/') {
        return Err(
            "contains '/', a control character or a bidirectional control; use letters, \
             digits, '-', '_' or '.'"
                .into(),
        );
    }
    Ok(())
}

/// Characters refused in ids and new patterns and escaped wherever text a
/// client sent is shown: control characters (a terminal obeys ESC
/// sequences; a newline splits a table row) and the Unicode bidirectional
/// controls (U+202E shows text reversed).
pub fn unsafe_in_text(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` as it is safe to show on a terminal or in a log line: each
/// character of [`unsafe_in_text`] written as a Rust escape (`\u{1b}`,
/// `\n`), backslashes doubled only then, so ordinary text is shown as it
/// is.
///
/// ```
/// use rld::rule::escape_text;
/// assert_eq!(escape_text("api/*"), "api/*");
/// assert_eq!(escape_text("a\u{1b}[31mRED\n"), "a\\u{1b}[31mRED\\n");
/// assert_eq!(escape_text("\u{202E}abc"), "\\u{202e}abc");
/// ```
pub fn escape_text(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(unsafe_in_text) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_in_text(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Parses `"250ms"`, `"30s"`, `"1m"`, `"2h"`, `"1d"` (and combinations like `"1h 30m"`).
///
/// # Errors
/// A message naming the accepted units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write a number and a unit: ms, s, m, h or d")
    })
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serde helper: a `Duration` as integer nanoseconds (`u64`).
pub mod nanos {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_nanos(u64::deserialize(d)?))
    }
}

/// Serde helper: an `Option<Duration>` as optional integer nanoseconds.
pub mod opt_nanos {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> RuleSpec {
        RuleSpec::new("api", "*", "api/*", 100, Duration::from_secs(60))
    }

    #[test]
    fn accepts_a_plain_rule() {
        rule().validate().unwrap();
        assert_eq!(rule().capacity(), 100);
        assert_eq!(rule().interval_ns(), 600_000_000);
    }

    #[test]
    fn rejects_bad_fields_naming_them() {
        type Mutation = Box<dyn Fn(&mut RuleSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.window = Duration::ZERO), "window"),
            (Box::new(|r| r.limit = 0), "limit"),
            (Box::new(|r| r.burst = Some(0)), "burst"),
            (Box::new(|r| r.id = String::new()), "id"),
            (Box::new(|r| r.id = "a/b".into()), "id"),
            (Box::new(|r| r.id = "x".repeat(MAX_RULE_ID_BYTES + 1)), "id"),
            (Box::new(|r| r.client = "a*b".into()), "client"),
            (Box::new(|r| r.resource = String::new()), "resource"),
            (
                Box::new(|r| r.expire_idle = Some(Duration::from_millis(10))),
                "expire_idle",
            ),
            (
                Box::new(|r| r.expire_idle = Some(Duration::from_secs(600 * 365 * 24 * 3600))),
                "expire_idle",
            ),
            (
                Box::new(|r| r.accuracy = Some(Accuracy::default())),
                "accuracy",
            ),
            (Box::new(|r| r.reserve.low = 1000), "reserve"),
            (
                Box::new(|r| {
                    r.reserve.high = 500;
                    r.reserve.low = 100
                }),
                "reserve",
            ),
            (
                Box::new(|r| {
                    r.limit = 2_000_000_000;
                    r.window = Duration::from_secs(1)
                }),
                "limit",
            ),
            (
                Box::new(|r| {
                    r.limit = 1;
                    r.window = Duration::from_secs(300 * 24 * 3600);
                    r.burst = Some(1000)
                }),
                "burst",
            ),
        ];
        for (mutate, field) in cases {
            let mut r = rule();
            mutate(&mut r);
            let e = r.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn unicode_ids_at_the_maximum_are_fine() {
        let mut r = rule();
        r.id = "é".repeat(MAX_RULE_ID_BYTES / 2);
        r.validate().unwrap();
    }

    #[test]
    fn parses_accuracy_and_durations() {
        let a = Accuracy::parse("2%/10s").unwrap();
        assert_eq!(a, Accuracy::default());
        assert_eq!(a.to_string(), "2%/10s");
        assert_eq!(Accuracy::parse("0.5%/1m").unwrap().error_bp, 50);
        assert!(Accuracy::parse("2/10s").is_err());
        assert!(Accuracy::parse("0%/10s").is_err());
        for (text, ms) in [
            ("250ms", 250),
            ("30s", 30_000),
            ("1m", 60_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
        ] {
            assert_eq!(parse_duration(text).unwrap(), Duration::from_millis(ms));
        }
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("1 fortnight").is_err());
    }
}
