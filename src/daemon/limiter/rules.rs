//! Compiled rules and the matcher that finds the rule for a (client, resource).
//!
//! A [`RuleSet`] is an immutable snapshot: built once per rule change, shared by
//! every shard through an `Arc`. Each snapshot has a new generation; a bucket
//! resolved under an older generation re-resolves on its next request (a new
//! rule may be more specific). Rules whose spec did not change keep their
//! `Arc<Rule>` across snapshots, so re-resolving finds the same rule and keeps
//! the bucket's state.
//! Per-rule counters live in a [`RuleActivity`] carried across spec changes by id.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::utils::CachePadded;
use hashbrown::HashMap;

use super::bucket::BucketParams;
use super::global::GlobalRuleState;
use crate::protocol::{Outcome, RuleSource};
use crate::rule::{Pattern, Per, RuleError, RuleSpec, Scope, precedence};

/// Stripes of the per-rule counters: enough that cores rarely share one.
pub const STRIPES: usize = 8;

/// [`RuleActivity::last_match_ns`] is refreshed at most this often, so it may
/// lag the true last match by up to this much.
pub const LAST_MATCH_GRANULE_NS: u64 = 1_000_000_000;

/// Idle time after which a full bucket is dropped, unless the rule's window
/// asks for longer (`max(2 x window, MIN_IDLE_TTL)`).
pub const MIN_IDLE_TTL_NS: u64 = 60_000_000_000;

/// A validated rule ready for the hot path.
#[derive(Debug)]
pub struct Rule {
    pub spec: RuleSpec,
    pub source: RuleSource,
    pub params: BucketParams,
    client: Pattern,
    resource: Pattern,
    /// How long a full bucket of this rule may sit unused before eviction.
    pub idle_ttl_ns: u64,
    pub activity: Arc<RuleActivity>,
    /// Lease state of a global rule (`scope = "global"`); `None` for local.
    pub global: Option<GlobalRuleState>,
}

impl Rule {
    fn compile(
        spec: RuleSpec,
        source: RuleSource,
        activity: Arc<RuleActivity>,
    ) -> Result<Rule, RuleError> {
        spec.validate()?;
        let client = spec.client_pattern().expect("validated");
        let resource = spec.resource_pattern().expect("validated");
        let window_ns = u64::try_from(spec.window.as_nanos()).expect("validated window fits");
        Ok(Rule {
            params: BucketParams::from_spec(&spec),
            idle_ttl_ns: window_ns.saturating_mul(2).max(MIN_IDLE_TTL_NS),
            client,
            resource,
            global: (spec.scope == Scope::Global).then(|| GlobalRuleState::new(&spec)),
            spec,
            source,
            activity,
        })
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }
}

/// Decision counters and last use of a rule id, striped to avoid contention.
#[derive(Debug)]
pub struct RuleActivity {
    stripes: [CachePadded<[AtomicU64; 3]>; STRIPES],
    /// Monotonic ns of the last match, updated at most once per
    /// [`LAST_MATCH_GRANULE_NS`].
    last_match_ns: AtomicU64,
}

impl RuleActivity {
    pub fn new(now_ns: u64) -> RuleActivity {
        RuleActivity {
            stripes: Default::default(),
            last_match_ns: AtomicU64::new(now_ns),
        }
    }

    /// Counts one decision. `stripe` is any number; callers pass their shard.
    #[inline]
    pub fn record(&self, stripe: usize, outcome: Outcome, now_ns: u64) {
        let slot = match outcome {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::Bypassed => 2,
        };
        self.stripes[stripe % STRIPES][slot].fetch_add(1, Ordering::Relaxed);
        // Read first: the line stays shared unless a granule has passed.
        if now_ns.saturating_sub(self.last_match_ns.load(Ordering::Relaxed))
            >= LAST_MATCH_GRANULE_NS
        {
            self.last_match_ns.store(now_ns, Ordering::Relaxed);
        }
    }

    /// (allowed, rejected, bypassed) so far.
    pub fn totals(&self) -> (u64, u64, u64) {
        self.stripes.iter().fold((0, 0, 0), |(a, r, b), s| {
            (
                a + s[0].load(Ordering::Relaxed),
                r + s[1].load(Ordering::Relaxed),
                b + s[2].load(Ordering::Relaxed),
            )
        })
    }

    pub fn last_match_ns(&self) -> u64 {
        self.last_match_ns.load(Ordering::Relaxed)
    }
}

/// An immutable, indexed set of rules.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// Increases with every snapshot a limiter installs.
    pub generation: u64,
    rules: Vec<Arc<Rule>>,
    by_id: HashMap<String, usize>,
    /// One client index (of resource indexes) of the enforcing rules per
    /// `per` value, in [`Per::ALL`] order: rules override one another within
    /// an index only.
    groups: [Index<Index<usize>>; 4],
    /// The same with the shadow rules as if they enforced (a shadow wins a
    /// tie with an enforcing rule of the same patterns: it is the rule it
    /// would replace): a shadow decides where it wins here.
    what_if: [Index<Index<usize>>; 4],
    /// Some rule is keyed other than per (client, resource), or is a shadow:
    /// requests may take more than one bucket.
    stacked: bool,
    /// Bit `per as usize` set: some enforcing rule has that `per` (empty
    /// groups are not searched).
    used: u8,
    /// The same for shadow rules.
    shadow_used: u8,
}

/// Patterns of one dimension: exact names by hash, prefixes longest first, `*`.
#[derive(Debug)]
struct Index<T> {
    exact: HashMap<Box<str>, T>,
    prefixes: Vec<(Box<str>, T)>,
    any: Option<T>,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Index {
            exact: HashMap::new(),
            prefixes: Vec::new(),
            any: None,
        }
    }
}

impl<T> Index<T> {
    fn slot(&mut self, pattern: &Pattern, make: impl FnOnce() -> T) -> &mut T {
        match pattern {
            Pattern::Any => self.any.get_or_insert_with(make),
            Pattern::Exact(e) => self.exact.entry(e.clone()).or_insert_with(make),
            Pattern::Prefix(p) => {
                let pos = match self.prefixes.iter().position(|(q, _)| q == p) {
                    Some(pos) => pos,
                    None => {
                        self.prefixes.push((p.clone(), make()));
                        self.prefixes.len() - 1
                    }
                };
                &mut self.prefixes[pos].1
            }
        }
    }

    fn sort(&mut self) {
        self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    }

    /// Candidates matching `name`, most specific first.
    fn candidates<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s T> + 's {
        self.exact
            .get(name)
            .into_iter()
            .chain(
                self.prefixes
                    .iter()
                    .filter(move |(p, _)| name.starts_with(&**p))
                    .map(|(_, t)| t),
            )
            .chain(self.any.as_ref())
    }
}

/// Why a set of rules cannot be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleSetError {
    #[error(transparent)]
    Invalid(#[from] RuleError),
    #[error("rule id {0:?} appears twice; rule ids must be unique")]
    DuplicateId(String),
    #[error(
        "rules {0:?} and {1:?} have the same client and resource patterns and the same per, so neither is more specific; change one pattern or per, or merge them"
    )]
    Ambiguous(String, String),
}

impl RuleSet {
    /// Compiles `specs` into a snapshot, reusing the `Arc<Rule>` of `previous`
    /// for every rule whose spec and source are unchanged.
    ///
    /// # Errors
    /// An invalid rule, a duplicate id, or two rules with identical patterns.
    pub fn build(
        specs: Vec<(RuleSpec, RuleSource)>,
        previous: &RuleSet,
        now_ns: u64,
    ) -> Result<RuleSet, RuleSetError> {
        let mut set = RuleSet {
            generation: previous.generation + 1,
            ..RuleSet::default()
        };
        for (spec, source) in specs {
            if set.by_id.contains_key(&spec.id) {
                return Err(RuleSetError::DuplicateId(spec.id));
            }
            let old = previous.get(&spec.id);
            let rule = match old {
                Some(old) if old.spec == spec && old.source == source => Arc::clone(old),
                _ => {
                    let activity = old.map_or_else(
                        || Arc::new(RuleActivity::new(now_ns)),
                        |o| Arc::clone(&o.activity),
                    );
                    Arc::new(Rule::compile(spec, source, activity)?)
                }
            };
            let idx = set.rules.len();
            set.stacked |= rule.spec.per != Per::ClientResource || rule.spec.shadow;
            let group = rule.spec.per as usize;
            // Enforcing rules are ambiguous among themselves, shadows among
            // themselves; a shadow may repeat an enforcing rule's patterns
            // (a new version of it, rolled out).
            let index = if rule.spec.shadow {
                set.shadow_used |= 1 << group;
                &mut set.what_if[group]
            } else {
                set.used |= 1 << group;
                &mut set.groups[group]
            };
            let slot = index
                .slot(&rule.client, Index::default)
                .slot(&rule.resource, || usize::MAX);
            if *slot != usize::MAX {
                let other = set.rules[*slot].id().to_owned();
                return Err(RuleSetError::Ambiguous(other, rule.id().to_owned()));
            }
            *slot = idx;
            set.by_id.insert(rule.id().to_owned(), idx);
            set.rules.push(rule);
        }
        // The enforcing rules join the shadows' view where no shadow has
        // their patterns.
        if set.shadow_used != 0 {
            for (idx, rule) in set.rules.iter().enumerate() {
                if rule.spec.shadow {
                    continue;
                }
                let slot = set.what_if[rule.spec.per as usize]
                    .slot(&rule.client, Index::default)
                    .slot(&rule.resource, || usize::MAX);
                if *slot == usize::MAX {
                    *slot = idx;
                }
            }
        }
        for clients in set.groups.iter_mut().chain(set.what_if.iter_mut()) {
            clients.sort();
            clients.exact.values_mut().for_each(Index::sort);
            clients.prefixes.iter_mut().for_each(|(_, i)| i.sort());
            if let Some(i) = clients.any.as_mut() {
                i.sort();
            }
        }
        Ok(set)
    }

    /// The most specific rule keyed per (client, resource) matching
    /// (client, resource): the client pattern decides first (exact, then
    /// longest prefix, then `*`), the resource pattern second.
    #[inline]
    pub fn resolve(&self, client: &str, resource: &str) -> Option<&Arc<Rule>> {
        self.resolve_in(Per::ClientResource, client, resource)
    }

    /// The most specific rule of the `per` group matching (client, resource).
    #[inline]
    pub fn resolve_in(&self, per: Per, client: &str, resource: &str) -> Option<&Arc<Rule>> {
        let idx = self.groups[per as usize]
            .candidates(client)
            .find_map(|resources| resources.candidates(resource).next())?;
        let rule = &self.rules[*idx];
        debug_assert!(self.rules.iter().all(|r| r.spec.per != per
            || r.spec.shadow
            || !(r.client.matches(client) && r.resource.matches(resource))
            || precedence((&rule.client, &rule.resource), (&r.client, &r.resource)).is_ge()));
        Some(rule)
    }

    /// The most specific rule of the `per` group matching (client,
    /// resource) with the shadows counted as if they enforced.
    fn resolve_what_if(&self, per: Per, client: &str, resource: &str) -> Option<&Arc<Rule>> {
        let idx = self.what_if[per as usize]
            .candidates(client)
            .find_map(|resources| resources.candidates(resource).next())?;
        Some(&self.rules[*idx])
    }

    /// Every rule that applies to (client, resource): the most specific
    /// enforcing rule of each `per` group, in [`Per::ALL`] order, then each
    /// shadow that would be the most specific of its group if it enforced.
    pub fn applicable<'s>(
        &'s self,
        client: &'s str,
        resource: &'s str,
    ) -> impl Iterator<Item = &'s Arc<Rule>> + 's {
        let enforcing = Per::ALL
            .into_iter()
            .filter(move |&per| self.used & (1 << per as usize) != 0)
            .filter_map(move |per| self.resolve_in(per, client, resource));
        let shadows = Per::ALL
            .into_iter()
            .filter(move |&per| self.shadow_used & (1 << per as usize) != 0)
            .filter_map(move |per| self.resolve_what_if(per, client, resource))
            .filter(|r| r.spec.shadow);
        enforcing.chain(shadows)
    }

    /// Every rule matching (client, resource), each with the rule that
    /// overrides it (`None`: it applies), in [`Per::ALL`] order, most
    /// specific first within a group (for `explain`).
    pub fn matching<'s>(
        &'s self,
        client: &str,
        resource: &str,
    ) -> Vec<(&'s Arc<Rule>, Option<&'s Arc<Rule>>)> {
        let mut out = Vec::new();
        for per in Per::ALL {
            let enforcing = self.resolve_in(per, client, resource);
            let what_if = self.resolve_what_if(per, client, resource);
            let mut group: Vec<&Arc<Rule>> = self
                .rules
                .iter()
                .filter(|r| {
                    r.spec.per == per && r.client.matches(client) && r.resource.matches(resource)
                })
                .collect();
            group.sort_by(|a, b| precedence((&b.client, &b.resource), (&a.client, &a.resource)));
            for r in group {
                let winner = if r.spec.shadow { what_if } else { enforcing };
                let over = winner.filter(|w| !Arc::ptr_eq(w, r));
                out.push((r, over));
            }
        }
        out
    }

    /// Whether some rule is keyed other than per (client, resource), or is
    /// a shadow (requests then take the stacked path).
    #[inline]
    pub fn stacked(&self) -> bool {
        self.stacked
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Rule>> {
        self.by_id.get(id).map(|&i| &self.rules[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.iter()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(id: &str, client: &str, resource: &str) -> (RuleSpec, RuleSource) {
        (
            RuleSpec::new(id, client, resource, 10, Duration::from_secs(1)),
            RuleSource::Runtime,
        )
    }

    fn build(specs: Vec<(RuleSpec, RuleSource)>) -> Result<RuleSet, RuleSetError> {
        RuleSet::build(specs, &RuleSet::default(), 0)
    }

    #[test]
    fn most_specific_rule_wins_client_first() {
        let set = build(vec![
            spec("any", "*", "*"),
            spec("team", "team-*", "*"),
            spec("team-a", "team-a*", "*"),
            spec("team-api", "team-*", "api/*"),
            spec("bob", "bob", "*"),
            spec("search", "*", "search"),
        ])
        .unwrap();
        let r = |c, res| set.resolve(c, res).map(|r| r.id().to_owned());
        assert_eq!(r("zed", "x").as_deref(), Some("any"));
        assert_eq!(r("zed", "search").as_deref(), Some("search"));
        assert_eq!(r("bob", "search").as_deref(), Some("bob"));
        assert_eq!(r("team-b", "api/x").as_deref(), Some("team-api"));
        assert_eq!(r("team-b", "db").as_deref(), Some("team"));
        assert_eq!(r("team-abc", "api/x").as_deref(), Some("team-a"));
    }

    #[test]
    fn falls_through_when_a_specific_client_has_no_matching_resource() {
        let set = build(vec![spec("bob-db", "bob", "db"), spec("all", "*", "*")]).unwrap();
        assert_eq!(set.resolve("bob", "api").unwrap().id(), "all");
        assert_eq!(set.resolve("bob", "db").unwrap().id(), "bob-db");
        let none = build(vec![spec("bob-db", "bob", "db")]).unwrap();
        assert!(none.resolve("bob", "api").is_none());
    }

    #[test]
    fn identical_patterns_are_ambiguous() {
        let e = build(vec![spec("a", "x*", "y"), spec("b", "x*", "y")]).unwrap_err();
        assert_eq!(e, RuleSetError::Ambiguous("a".into(), "b".into()));
        let e = build(vec![spec("a", "x", "y"), spec("a", "z", "y")]).unwrap_err();
        assert_eq!(e, RuleSetError::DuplicateId("a".into()));
    }

    #[test]
    fn unchanged_rules_keep_identity_and_counters_follow_the_id() {
        let first = build(vec![spec("a", "*", "a"), spec("b", "*", "b")]).unwrap();
        let mut changed = spec("b", "*", "b");
        changed.0.limit = 99;
        let second = RuleSet::build(vec![spec("a", "*", "a"), changed], &first, 0).unwrap();
        assert!(Arc::ptr_eq(
            first.get("a").unwrap(),
            second.get("a").unwrap()
        ));
        assert!(Arc::ptr_eq(
            &first.get("b").unwrap().activity,
            &second.get("b").unwrap().activity
        ));
        assert!(!Arc::ptr_eq(
            first.get("b").unwrap(),
            second.get("b").unwrap()
        ));
        assert_eq!(second.generation, first.generation + 1);
    }
}
