//! `rlctl explain CLIENT RESOURCE`: one `Explain` request; shows every rule
//! the request would meet and the answer it would get. Spends nothing.

use std::path::Path;

use serde::Serialize;

use super::acquire::describe;
use super::output::fmt_ns;
use super::{CliError, Exit, ExplainArgs, Output, connect};
use crate::protocol::{Acquire, Outcome, RuleExplained};
use crate::rule::{Per, escape_text};

/// The `--json` form: the answer an acquire would get, and every rule.
#[derive(Debug, Serialize)]
struct View<'a> {
    client: &'a str,
    resource: &'a str,
    cost: u64,
    allowed: bool,
    outcome: Outcome,
    rule: &'a str,
    remaining: u64,
    retry_after_ms: u64,
    rules: Vec<RuleView<'a>>,
}

#[derive(Debug, Serialize)]
struct RuleView<'a> {
    id: &'a str,
    per: &'static [&'static str],
    shadow: bool,
    scope: crate::rule::Scope,
    applies: bool,
    overridden_by: Option<&'a str>,
    bucket: String,
    tokens: u64,
    depth: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<Outcome>,
    retry_after_ms: u64,
    cost_too_high: bool,
}

/// The bucket a rule keys the request by, as an operator reads it.
fn bucket_name(r: &RuleExplained) -> String {
    match r.per {
        Per::ClientResource => format!("{} {}", escape_text(&r.client), escape_text(&r.resource)),
        Per::Client => format!("client {}", escape_text(&r.client)),
        Per::Resource => format!("resource {}", escape_text(&r.resource)),
        Per::None => "(one for all)".to_owned(),
    }
}

pub async fn run(socket: &Path, a: ExplainArgs, out: &mut Output) -> Result<Exit, CliError> {
    let request = Acquire::new(a.client.as_str(), a.resource.as_str())
        .cost(a.cost)
        .priority(a.priority);
    let e = connect(socket).await?.explain(request).await?;
    let d = &e.decision;
    if out.json() {
        let view = View {
            client: &a.client,
            resource: &a.resource,
            cost: a.cost,
            allowed: d.is_allowed(),
            outcome: d.outcome,
            rule: &d.rule,
            remaining: d.remaining,
            retry_after_ms: d.retry_after_ns / 1_000_000,
            rules: e
                .rules
                .iter()
                .map(|r| RuleView {
                    id: &r.id,
                    per: r.per.names(),
                    shadow: r.shadow,
                    scope: r.scope,
                    applies: r.overridden_by.is_none(),
                    overridden_by: r.overridden_by.as_deref(),
                    bucket: bucket_name(r),
                    tokens: r.tokens,
                    depth: r.depth,
                    outcome: r.outcome,
                    retry_after_ms: r.retry_after_ns / 1_000_000,
                    cost_too_high: r.cost_too_high,
                })
                .collect(),
        };
        out.json_value(&view)?;
        return Ok(Exit::Ok);
    }
    out.line(format!("would be   {} (nothing spent)", describe(d)))?;
    if e.rules.is_empty() {
        out.line("no rule matches; the default action answers")?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = e
        .rules
        .iter()
        .map(|r| {
            let applies = match (&r.overridden_by, r.shadow) {
                (Some(by), _) => format!("overridden by {by}"),
                (None, true) => "yes (shadow)".to_owned(),
                (None, false) => "yes".to_owned(),
            };
            let decides = match r.outcome {
                None => "-".to_owned(),
                Some(_) if r.cost_too_high => "never (cost above its burst)".to_owned(),
                Some(Outcome::Allowed) => "allow".to_owned(),
                Some(Outcome::Bypassed) => "allow (critical)".to_owned(),
                Some(Outcome::Denied) => format!("deny, retry after {}", fmt_ns(r.retry_after_ns)),
            };
            vec![
                r.id.clone(),
                r.per.to_string(),
                applies,
                bucket_name(r),
                format!("{}/{}", r.tokens, r.depth),
                decides,
            ]
        })
        .collect();
    out.table(
        &["RULE", "PER", "APPLIES", "BUCKET", "TOKENS", "DECIDES"],
        &rows,
    )?;
    Ok(Exit::Ok)
}
