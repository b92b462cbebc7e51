//! Stacked rules: a request that rules keyed differently (`per`) apply to
//! is allowed only if every enforcing rule allows it, and a request that
//! one denies is charged by none. The shards of its buckets are locked once
//! each, in ascending order (so two requests can never wait on each other
//! in a circle, and no global lock is taken), for the whole decision:
//! nobody sees a charge that is then undone. Shadow rules are decided and
//! counted alongside, but never deny and are charged only when the request
//! is admitted (what they would have done, had they enforced).

use std::borrow::Cow;
use std::cmp::Reverse;

use parking_lot::MutexGuard;

use super::bucket::Verdict;
use super::rules::{Rule, RuleSet};
use super::{AcquireError, Limiter, check_cost, table};
use crate::protocol::{Decision, Outcome, Priority};
use crate::rule::Per;

/// At most one enforcing rule of each of the four `per` groups applies, and
/// one shadow of each.
const MOST: usize = 8;

thread_local! {
    /// While [`observe_shadows`] runs: what the shadow rules of the
    /// decisions made on this thread decided (a traced decision's span
    /// carries them). `None` otherwise: nothing is kept.
    static SHADOWS: std::cell::RefCell<Option<Vec<(String, Outcome)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `decide` (one synchronous decision) and returns, beside its result,
/// what each shadow rule that applied decided: (rule id, outcome).
pub fn observe_shadows<R>(decide: impl FnOnce() -> R) -> (R, Vec<(String, Outcome)>) {
    SHADOWS.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let out = decide();
    let seen = SHADOWS.with(|s| s.borrow_mut().take()).unwrap_or_default();
    (out, seen)
}

/// The names of `rule`'s bucket for a request: the parts a rule is not
/// keyed by are empty (no request's name is), which makes the bucket the
/// rule's own (its id is part of its hash and match). A shadow keyed per
/// client and resource gets a bucket of its own the same way (else it would
/// share the enforcing rule's): an empty client, and the request's names,
/// the client's length first, as the resource.
pub(super) fn bucket_names<'a>(
    rule: &Rule,
    client: &'a str,
    resource: &'a str,
) -> (Cow<'a, str>, Cow<'a, str>) {
    if rule.spec.shadow && rule.spec.per == Per::ClientResource {
        let own = format!("{}:{client}{resource}", client.len());
        return (Cow::Borrowed(""), Cow::Owned(own));
    }
    let (c, r) = rule.spec.per.key(client, resource);
    (Cow::Borrowed(c), Cow::Borrowed(r))
}

/// One applicable rule's bucket and what it decided.
struct Part<'a> {
    rule: &'a std::sync::Arc<Rule>,
    /// The bucket's names (see [`bucket_names`]).
    names: (Cow<'a, str>, Cow<'a, str>),
    hash: u64,
    shard: usize,
    verdict: Verdict,
    /// The bucket's TAT before the take: restoring it undoes the charge.
    before: u64,
}

/// Decides (client, resource) against every rule of `rules` that applies.
/// Never inlined: the one-rule path stays as small as it was.
#[inline(never)]
pub(super) fn decide<'a, R>(
    limiter: &Limiter,
    rules: &'a RuleSet,
    (client, resource): (&'a str, &'a str),
    cost: u64,
    priority: Priority,
    now: u64,
    answer: impl FnOnce(&Decision<'_>) -> R,
) -> Result<R, AcquireError> {
    let table = limiter.table();
    let mut parts: [Option<Part<'a>>; MOST] = Default::default();
    let mut n = 0;
    for rule in rules.applicable(client, resource) {
        // A cost no enforcing rule can ever admit is an error before
        // anything is charged (a shadow just counts it denied).
        if !rule.spec.shadow {
            check_cost(rule, cost, priority)?;
        }
        let names = bucket_names(rule, client, resource);
        let hash = table.hash_bucket(rule.id(), &names.0, &names.1);
        parts[n] = Some(Part {
            rule,
            names,
            hash,
            shard: table.shard_of(hash),
            verdict: Verdict {
                outcome: Outcome::Denied,
                remaining: 0,
                retry_after_ns: 0,
                reset_after_ns: 0,
            },
            before: 0,
        });
        n += 1;
    }
    let parts = &mut parts[..n];
    // Each shard once, in ascending order.
    let mut order = [usize::MAX; MOST];
    for (slot, p) in order.iter_mut().zip(parts.iter().flatten()) {
        *slot = p.shard;
    }
    let order = &mut order[..n];
    order.sort_unstable();
    let mut shards = 0;
    for i in 0..n {
        if i == 0 || order[i] != order[shards - 1] {
            order[shards] = order[i];
            shards += 1;
        }
    }
    let order = &order[..shards];
    let mut guards: [Option<MutexGuard<'_, table::Shard>>; MOST] = Default::default();
    for (guard, &shard) in guards.iter_mut().zip(order) {
        *guard = Some(table.lock(shard));
    }
    let generation = rules.generation as u32;
    for p in parts.iter_mut().flatten() {
        let at = order.iter().position(|&s| s == p.shard).expect("locked");
        let table::Shard { buckets, book, .. } = &mut **guards[at].as_mut().expect("locked");
        let names = (&*p.names.0, &*p.names.1);
        let entry = match buckets.find_in(p.hash, p.rule.id(), names.0, names.1) {
            Some(entry) => {
                limiter.adopt(entry, p.rule, book, p.hash, names, now);
                entry.generation = generation;
                entry
            }
            None => limiter.create(buckets, book, p.rule, generation, p.hash, names, now),
        };
        let usable = p.rule.params.usable(priority);
        (p.verdict, p.before) = if p.rule.spec.shadow && cost > usable {
            // Never admissible under this shadow: counted denied, untouched.
            let never = Verdict {
                outcome: Outcome::Denied,
                remaining: 0,
                retry_after_ns: 0,
                reset_after_ns: 0,
            };
            (never, entry.tat)
        } else {
            limiter.charge(entry, book, p.hash, names, cost, priority, now)
        };
    }
    let enforcing = |p: &&Part<'_>| !p.rule.spec.shadow;
    let denied = parts
        .iter()
        .flatten()
        .filter(enforcing)
        .any(|p| p.verdict.outcome == Outcome::Denied);
    if denied {
        // All or nothing: what the others took goes back (a shadow's too:
        // the request was not admitted).
        for p in parts.iter().flatten() {
            if p.verdict.outcome == Outcome::Denied {
                continue;
            }
            let at = order.iter().position(|&s| s == p.shard).expect("locked");
            let shard = &mut **guards[at].as_mut().expect("locked");
            if let Some(entry) = shard
                .buckets
                .find_in(p.hash, p.rule.id(), &p.names.0, &p.names.1)
            {
                entry.tat = p.before;
            }
        }
    }
    drop(guards);
    // A rule counts what it decided: a shadow what it would have, an
    // enforcing rule its admissions, or its denial (a request another rule
    // denied is counted by that rule only).
    let mut counted = [0u64; 3];
    for p in parts.iter().flatten() {
        if p.rule.spec.shadow {
            SHADOWS.with(|s| {
                if let Some(seen) = s.borrow_mut().as_mut() {
                    seen.push((p.rule.id().to_owned(), p.verdict.outcome));
                }
            });
        }
        if p.rule.spec.shadow || !denied || p.verdict.outcome == Outcome::Denied {
            p.rule.activity.record(p.shard, p.verdict.outcome, now);
            if !p.rule.spec.shadow {
                counted[p.verdict.outcome as usize] += 1;
            }
        }
    }
    // The answer names the rule that decided: the denying rule that needs
    // the longest wait, or the enforcing rule with the fewest tokens left.
    let chosen = if denied {
        parts
            .iter()
            .flatten()
            .filter(enforcing)
            .filter(|p| p.verdict.outcome == Outcome::Denied)
            .min_by_key(|p| Reverse(p.verdict.retry_after_ns))
    } else {
        parts
            .iter()
            .flatten()
            .filter(enforcing)
            .min_by_key(|p| p.verdict.remaining)
    };
    // The request counts once in the totals, as answered: every other rule
    // count it made is extra (a Critical request may be allowed by one rule
    // and bypassed by another).
    if let Some(p) = chosen {
        for outcome in [Outcome::Allowed, Outcome::Denied, Outcome::Bypassed] {
            let answered = u64::from(outcome == p.verdict.outcome);
            let extra = counted[outcome as usize].saturating_sub(answered);
            limiter.overcounted(p.shard, outcome, extra);
        }
    }
    let Some(p) = chosen else {
        // Only shadows apply: the request is as unmatched.
        let stripe = table.shard_of(table.hash(client, resource));
        return Ok(answer(&limiter.unmatched(stripe)));
    };
    Ok(answer(&Decision {
        outcome: p.verdict.outcome,
        limit: p.rule.spec.limit,
        remaining: p.verdict.remaining,
        retry_after_ns: p.verdict.retry_after_ns,
        reset_after_ns: p.verdict.reset_after_ns,
        rule: Cow::Borrowed(p.rule.id()),
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::super::{DefaultAction, Limiter, LimiterConfig};
    use crate::protocol::{Outcome, Priority, RuleSource};
    use crate::rule::{Per, RuleSpec};

    fn limiter(rules: Vec<RuleSpec>) -> Limiter {
        let l = Limiter::new(LimiterConfig {
            shards: 4,
            max_buckets: 100_000,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        });
        l.set_rules(
            rules
                .into_iter()
                .map(|r| (r, RuleSource::Runtime))
                .collect(),
            0,
        )
        .unwrap();
        l
    }

    fn rule(id: &str, client: &str, resource: &str, burst: u64, per: Per) -> RuleSpec {
        let mut r = RuleSpec::new(id, client, resource, burst, Duration::from_secs(3600));
        r.per = per;
        r
    }

    fn ask(l: &Limiter, client: &str, resource: &str) -> (Outcome, String) {
        let d = l.acquire(client, resource, 1, Priority::Normal, 1).unwrap();
        (d.outcome, d.rule.into_owned())
    }

    #[test]
    fn every_rule_applies_and_a_denied_request_is_charged_by_none() {
        // Each client 3, everyone together 5, one bucket per (client, resource) 10.
        let l = limiter(vec![
            rule("each", "*", "api/*", 3, Per::Client),
            rule("total", "*", "api/*", 5, Per::None),
            rule("pair", "*", "*", 10, Per::ClientResource),
        ]);
        for _ in 0..3 {
            assert_eq!(ask(&l, "a", "api/x").0, Outcome::Allowed);
        }
        // a's own limit: denied by "each", so "total" keeps its 2 tokens.
        assert_eq!(ask(&l, "a", "api/y"), (Outcome::Denied, "each".into()));
        assert_eq!(ask(&l, "a", "api/y"), (Outcome::Denied, "each".into()));
        assert_eq!(ask(&l, "b", "api/x").0, Outcome::Allowed);
        assert_eq!(ask(&l, "c", "api/x").0, Outcome::Allowed);
        // The total is spent: b is denied by it, and its own bucket is not
        // charged (b has 2 left under "each" once the total allows again).
        assert_eq!(ask(&l, "b", "api/x"), (Outcome::Denied, "total".into()));
        let rules = l.rules();
        let each = rules.get("each").unwrap().activity.totals();
        assert_eq!((each.0, each.1), (5, 2), "each: allowed 5, denied 2");
        let total = rules.get("total").unwrap().activity.totals();
        assert_eq!((total.0, total.1), (5, 1), "total: allowed 5, denied 1");
        // Another resource: only "pair" applies.
        assert_eq!(ask(&l, "a", "db").0, Outcome::Allowed);
        // Requests, not rule counts: 6 admitted, 3 denied.
        assert_eq!(l.decision_totals(), (6, 3, 0));
    }

    #[test]
    fn a_specific_rule_overrides_within_its_group_only() {
        let l = limiter(vec![
            rule("each", "*", "*", 1, Per::Client),
            rule("vip", "vip", "*", 3, Per::Client),
            rule("total", "*", "*", 100, Per::None),
        ]);
        for _ in 0..3 {
            assert_eq!(ask(&l, "vip", "x").0, Outcome::Allowed);
        }
        assert_eq!(ask(&l, "vip", "x"), (Outcome::Denied, "vip".into()));
        assert_eq!(ask(&l, "bob", "x").0, Outcome::Allowed);
        assert_eq!(ask(&l, "bob", "y"), (Outcome::Denied, "each".into()));
        assert_eq!(l.rules().get("total").unwrap().activity.totals().0, 4);
    }

    #[test]
    fn a_shadow_never_denies_and_counts_what_it_would_have_done() {
        let mut shadow = rule("new-cap", "*", "*", 2, Per::None);
        shadow.shadow = true;
        let l = limiter(vec![rule("each", "*", "*", 3, Per::Client), shadow]);
        let mut outcomes = Vec::new();
        for c in ["a", "a", "a", "a", "b"] {
            outcomes.push(ask(&l, c, "x"));
        }
        assert_eq!(
            outcomes.iter().map(|o| o.0).collect::<Vec<_>>(),
            [
                Outcome::Allowed,
                Outcome::Allowed,
                Outcome::Allowed,
                Outcome::Denied,
                Outcome::Allowed
            ]
        );
        assert!(outcomes.iter().all(|o| o.1 == "each"), "{outcomes:?}");
        let rules = l.rules();
        let (allowed, denied, _) = rules.get("new-cap").unwrap().activity.totals();
        // Two it would have admitted; the third, fourth (denied by "each",
        // so not charged) and fifth it would have denied.
        assert_eq!((allowed, denied), (2, 3));
        // Only shadows apply: the default action answers.
        let only = limiter(vec![{
            let mut r = rule("s", "*", "*", 1, Per::None);
            r.shadow = true;
            r
        }]);
        assert_eq!(ask(&only, "a", "x"), (Outcome::Allowed, String::new()));
        assert_eq!(ask(&only, "a", "x"), (Outcome::Allowed, String::new()));
        assert_eq!(only.rules().get("s").unwrap().activity.totals().1, 1);
    }

    #[test]
    fn a_shadow_rolls_out_beside_the_rule_it_would_replace() {
        // The rule in force (2 per pair), and its next version as a shadow
        // with the same patterns and per (5), and a more specific shadow for
        // vip (1): the enforcing rule still decides for everyone.
        let mut next = rule("pair-v2", "*", "*", 5, Per::ClientResource);
        next.shadow = true;
        let mut vip = rule("vip-v2", "vip", "*", 1, Per::ClientResource);
        vip.shadow = true;
        let l = limiter(vec![
            rule("pair", "*", "*", 2, Per::ClientResource),
            next,
            vip,
        ]);
        for c in ["a", "vip"] {
            assert_eq!(ask(&l, c, "x"), (Outcome::Allowed, "pair".into()));
            assert_eq!(ask(&l, c, "x"), (Outcome::Allowed, "pair".into()));
            assert_eq!(ask(&l, c, "x"), (Outcome::Denied, "pair".into()));
        }
        let rules = l.rules();
        let count = |id: &str| {
            let (a, d, _) = rules.get(id).unwrap().activity.totals();
            (a, d)
        };
        // pair-v2 saw a's three (would allow all), vip-v2 vip's three (one).
        assert_eq!(count("pair-v2"), (3, 0));
        assert_eq!(count("vip-v2"), (1, 2));
        assert_eq!(count("pair"), (4, 2));
        // A lone shadow never denies, whatever its per.
        let mut lone = rule("lone", "*", "*", 1, Per::ClientResource);
        lone.shadow = true;
        let only = limiter(vec![lone]);
        for _ in 0..3 {
            assert_eq!(ask(&only, "a", "x").0, Outcome::Allowed);
        }
        // Two shadows with the same patterns and per are still ambiguous.
        let mut a = rule("s1", "*", "*", 1, Per::Client);
        a.shadow = true;
        let mut b = rule("s2", "*", "*", 1, Per::Client);
        b.shadow = true;
        let set = Limiter::new(LimiterConfig {
            shards: 4,
            max_buckets: 10,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        })
        .set_rules(vec![(a, RuleSource::Runtime), (b, RuleSource::Runtime)], 0);
        assert!(set.is_err());
    }

    #[test]
    fn a_critical_request_counts_once_as_answered() {
        let l = limiter(vec![
            rule("each", "*", "*", 1, Per::Client),
            rule("total", "*", "*", 5, Per::None),
        ]);
        assert_eq!(ask(&l, "a", "x").0, Outcome::Allowed);
        // each is spent: bypassed there, allowed by total; answered bypassed.
        let d = l.acquire("a", "x", 1, Priority::Critical, 1).unwrap();
        assert_eq!((d.outcome, &*d.rule), (Outcome::Bypassed, "each"));
        assert_eq!(l.decision_totals(), (1, 0, 1));
    }

    #[test]
    fn a_cost_above_an_enforcing_burst_is_an_error_and_charges_nothing() {
        let l = limiter(vec![
            rule("each", "*", "*", 10, Per::Client),
            rule("total", "*", "*", 4, Per::None),
        ]);
        assert!(l.acquire("a", "x", 5, Priority::Normal, 1).is_err());
        let d = l.acquire("a", "x", 4, Priority::Normal, 1).unwrap();
        assert_eq!((d.outcome, d.remaining), (Outcome::Allowed, 0));
    }

    proptest! {
        /// With time standing still (nothing refills), a request is
        /// admitted exactly when every enforcing rule that applies has room
        /// for it in a model that charges admitted requests only: so no
        /// bucket is charged for a denied request, and no bucket admits more
        /// than its burst. (A build that charged as it went and stopped at
        /// the first denial fails this at once.)
        #[test]
        fn no_bucket_is_charged_for_a_denied_request(
            bursts in proptest::collection::vec(1u64..6, 5),
            shadow in any::<bool>(),
            requests in proptest::collection::vec((0usize..3, 0usize..2, 1u64..3), 1..120),
        ) {
            let mut specs = vec![
                rule("pair", "*", "*", bursts[0], Per::ClientResource),
                rule("each", "*", "*", bursts[1], Per::Client),
                rule("c0", "c0", "*", bursts[2], Per::Client),
                rule("res", "*", "r*", bursts[3], Per::Resource),
                rule("all", "*", "*", bursts[4], Per::None),
            ];
            specs[4].shadow = shadow;
            let l = limiter(specs.clone());
            let mut used: HashMap<(String, String, String), u64> = HashMap::new();
            for (c, r, cost) in requests {
                let client = format!("c{c}");
                let resource = format!("r{r}");
                // The model: one rule per group, the most specific.
                let applicable: Vec<&RuleSpec> = specs
                    .iter()
                    .filter(|s| {
                        let ok = |pat: &str, name: &str| {
                            pat == "*" || pat == name || pat.strip_suffix('*').is_some_and(|p| name.starts_with(p))
                        };
                        ok(&s.client, &client) && ok(&s.resource, &resource)
                    })
                    .filter(|s| !(s.id == "each" && client == "c0"))
                    .collect();
                let key = |s: &RuleSpec| {
                    let (a, b) = s.per.key(&client, &resource);
                    (s.id.clone(), a.to_owned(), b.to_owned())
                };
                let fits: Vec<bool> = applicable
                    .iter()
                    .map(|s| used.get(&key(s)).copied().unwrap_or(0) + cost <= s.capacity())
                    .collect();
                let expected = applicable.iter().zip(&fits).all(|(s, f)| s.shadow || *f);
                let got = l.acquire(&client, &resource, cost, Priority::Normal, 1);
                let allowed = match got {
                    Ok(d) => d.outcome == Outcome::Allowed,
                    // A cost above an enforcing burst: never admissible.
                    Err(_) => false,
                };
                prop_assert_eq!(allowed, expected, "{} {} cost {}", client, resource, cost);
                if allowed {
                    for (s, f) in applicable.iter().zip(&fits) {
                        if !s.shadow || *f {
                            *used.entry(key(s)).or_default() += cost;
                        }
                    }
                }
            }
        }
    }
}
