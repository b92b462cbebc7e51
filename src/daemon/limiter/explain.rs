//! `explain`: what a request would meet, spending nothing. Every rule that
//! matches, whether it applies or which rule overrides it, its bucket's
//! tokens, what it would decide, and the answer an acquire would get, read
//! under each bucket's shard lock in turn. No bucket is created or charged.

use std::borrow::Cow;
use std::cmp::Reverse;

use super::bucket::{Verdict, try_take};
use super::shares::{params_of, tokens};
use super::{AcquireError, Limiter, check_name, global};
use crate::protocol::{Decision, Explanation, Outcome, Priority, RuleExplained};

impl Limiter {
    /// What (client, resource, cost, priority) would meet at `now`.
    ///
    /// # Errors
    /// Empty or overlong names.
    pub fn explain(
        &self,
        client: &str,
        resource: &str,
        cost: u64,
        priority: Priority,
        now: u64,
    ) -> Result<Explanation<'static>, AcquireError> {
        check_name("client", client)?;
        check_name("resource", resource)?;
        let rules = self.rules();
        let mut out = Vec::new();
        // (rule index in `out`, verdict) of the rules that apply.
        let mut applying: Vec<(usize, Verdict, bool)> = Vec::new();
        for (rule, over) in rules.matching(client, resource) {
            let names = super::stack::bucket_names(rule, client, resource);
            let (c, r) = (&*names.0, &*names.1);
            let hash = self.table.hash_bucket(rule.id(), c, r);
            let (tat, params) = {
                let mut guard = self.table.lock(self.table.shard_of(hash));
                let shard = &mut *guard;
                match shard.buckets.find_in(hash, rule.id(), c, r) {
                    Some(e) if e.rule.id() == rule.id() => (e.tat, params_of(e)),
                    // No bucket yet (or one another rule decided so far):
                    // what a new one would hold.
                    _ if rule.global.is_some() => {
                        let (interval, depth, _, fresh) =
                            global::share_of(rule, &shard.book, hash, c, r, now);
                        (fresh, (interval, depth))
                    }
                    _ => (0, (rule.params.interval_ns, rule.params.capacity)),
                }
            };
            let usable = rule.params.usable(priority);
            let mut verdict = None;
            if over.is_none() {
                let mut t = tat;
                let v = match rule.params.share(params.0, params.1) {
                    Some(p) if cost <= p.capacity && cost <= usable => {
                        try_take(&mut t, &p, now, cost, priority)
                    }
                    _ if priority == Priority::Critical => Verdict {
                        outcome: Outcome::Bypassed,
                        remaining: 0,
                        retry_after_ns: 0,
                        reset_after_ns: 0,
                    },
                    _ => Verdict {
                        outcome: Outcome::Denied,
                        remaining: 0,
                        retry_after_ns: if cost > usable {
                            0
                        } else {
                            cost.saturating_mul(rule.params.interval_ns)
                        },
                        reset_after_ns: 0,
                    },
                };
                applying.push((out.len(), v, rule.spec.shadow));
                verdict = Some(v);
            }
            out.push(RuleExplained {
                id: rule.id().to_owned(),
                per: rule.spec.per,
                shadow: rule.spec.shadow,
                scope: rule.spec.scope,
                overridden_by: over.map(|o| o.id().to_owned()),
                // The names the rule keys the request by (a shadow's own
                // bucket shows the request's names).
                client: rule.spec.per.key(client, resource).0.to_owned(),
                resource: rule.spec.per.key(client, resource).1.to_owned(),
                tokens: tokens(tat, params, now),
                depth: params.1,
                outcome: verdict.map(|v| v.outcome),
                retry_after_ns: verdict.map_or(0, |v| v.retry_after_ns),
                cost_too_high: cost > usable,
            });
        }
        // The answer, as the stacked decision picks it.
        let enforcing = || applying.iter().filter(|a| !a.2);
        let denied = enforcing().any(|a| a.1.outcome == Outcome::Denied);
        let chosen = if denied {
            enforcing()
                .filter(|a| a.1.outcome == Outcome::Denied)
                .min_by_key(|a| Reverse(a.1.retry_after_ns))
        } else {
            enforcing().min_by_key(|a| a.1.remaining)
        };
        let decision = match chosen {
            Some(&(at, v, _)) => Decision {
                outcome: v.outcome,
                limit: rules.get(&out[at].id).map_or(0, |r| r.spec.limit),
                remaining: v.remaining,
                retry_after_ns: v.retry_after_ns,
                reset_after_ns: v.reset_after_ns,
                rule: Cow::Owned(out[at].id.clone()),
            },
            None => self.default_decision(),
        };
        Ok(Explanation {
            decision,
            rules: out,
        })
    }
}
