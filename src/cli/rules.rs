//! `rlctl rules ...`: one request per subcommand (`RuleSet`, `RuleGet`,
//! `RuleList`, `RuleDelete`; `import` sends one all-or-nothing `RuleSet`).
//! Rules are shown in their TOML/JSON form (durations as "1m").

use std::path::Path;

use serde::Serialize;

use super::output::fmt_ns;
use super::{CliError, Exit, Output, RuleSetArgs, RulesCommand, connect};
use crate::protocol::{LeaseInfo, RuleInfo, RuleSource};
use crate::rule::file::{ReserveEntry, RuleEntry, parse_rules};
use crate::rule::{OnFailure, Per, RuleSpec, Scope, escape_text};

pub async fn run(socket: &Path, cmd: RulesCommand, out: &mut Output) -> Result<Exit, CliError> {
    match cmd {
        RulesCommand::Set(args) => {
            let spec = spec_from_args(args)?;
            let id = spec.id.clone();
            let changed = connect(socket).await?.rule_set(vec![spec]).await?;
            if out.json() {
                out.json_value(&serde_json::json!({ "id": id, "changed": changed }))?;
            } else if changed == 0 {
                out.line(format!("rule {id} unchanged"))?;
            } else {
                out.line(format!("rule {id} set"))?;
            }
        }
        RulesCommand::Get { id } => {
            let info = connect(socket).await?.rule_get(&id).await?;
            if out.json() {
                out.json_value(&RuleView::from(&info))?;
            } else {
                show_rule(&info, out)?;
            }
        }
        RulesCommand::List => {
            let rules = connect(socket).await?.rule_list().await?;
            if out.json() {
                let views: Vec<RuleView> = rules.iter().map(RuleView::from).collect();
                out.json_value(&views)?;
            } else if rules.is_empty() {
                out.line("no rules; add one with `rlctl rules set`")?;
            } else {
                list_rules(&rules, out)?;
            }
        }
        RulesCommand::Delete { id } => {
            connect(socket).await?.rule_delete(&id).await?;
            if out.json() {
                out.json_value(&serde_json::json!({ "id": id, "deleted": true }))?;
            } else {
                out.line(format!("rule {id} deleted"))?;
            }
        }
        RulesCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
            let specs = parse_rules(&text)
                .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
            let count = specs.len();
            let changed = connect(socket).await?.rule_set(specs).await?;
            if out.json() {
                out.json_value(&serde_json::json!({ "rules": count, "changed": changed }))?;
            } else {
                out.line(format!(
                    "imported {count} rules from {} ({changed} created or changed)",
                    file.display()
                ))?;
            }
        }
    }
    Ok(Exit::Ok)
}

/// Builds a spec from flags through the same TOML entry type the files use,
/// so flags and files accept exactly the same values.
fn spec_from_args(a: RuleSetArgs) -> Result<RuleSpec, CliError> {
    let reserve = (a.reserve_high.is_some()
        || a.reserve_normal.is_some()
        || a.reserve_low.is_some())
    .then(|| ReserveEntry {
        high: a.reserve_high.unwrap_or(0.0),
        normal: a.reserve_normal.unwrap_or(0.0),
        low: a.reserve_low.unwrap_or(0.0),
    });
    let entry = RuleEntry {
        id: a.id,
        client: a.client,
        resource: a.resource,
        limit: a.limit,
        window: a.window,
        burst: a.burst,
        expire_idle: a.expire_idle,
        reserve,
        scope: a.scope.map(|s| {
            if s == "global" {
                Scope::Global
            } else {
                Scope::Local
            }
        }),
        on_failure: a.on_failure.map(|p| match p.as_str() {
            "open" => OnFailure::Open,
            "closed" => OnFailure::Closed,
            _ => OnFailure::Local,
        }),
        accuracy: a.accuracy,
        fallback_limit: a.fallback_limit,
        per: a
            .per
            .as_deref()
            .map(|p| {
                Per::parse_flag(p).map(|p| p.names().iter().map(|n| (*n).to_owned()).collect())
            })
            .transpose()
            .map_err(|e| CliError::usage(format!("--per: {e}")))?,
        shadow: a.shadow,
    };
    let spec = entry
        .to_spec()
        .map_err(|e| CliError::usage(e.to_string()))?;
    spec.validate_new()
        .map_err(|e| CliError::usage(e.to_string()))?;
    Ok(spec)
}

/// A rule as `--json` shows it: the TOML fields plus live counters.
#[derive(Debug, Serialize)]
struct RuleView {
    #[serde(flatten)]
    rule: RuleEntry,
    burst_effective: u64,
    source: RuleSource,
    allowed: u64,
    rejected: u64,
    bypassed: u64,
    idle_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseInfo>,
}

impl From<&RuleInfo> for RuleView {
    fn from(info: &RuleInfo) -> Self {
        RuleView {
            rule: RuleEntry::from_spec(&info.spec),
            burst_effective: info.spec.capacity(),
            source: info.source,
            allowed: info.allowed,
            rejected: info.rejected,
            bypassed: info.bypassed,
            idle_ms: info.idle_ns / 1_000_000,
            lease: info.lease.clone(),
        }
    }
}

fn source_name(s: RuleSource) -> &'static str {
    match s {
        RuleSource::Config => "config",
        RuleSource::Runtime => "runtime",
        RuleSource::Etcd => "etcd",
    }
}

fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Local => "local",
        Scope::Global => "global",
    }
}

fn show_rule(info: &RuleInfo, out: &mut Output) -> Result<(), CliError> {
    let s = &info.spec;
    let e = RuleEntry::from_spec(s);
    let mut lines = vec![
        format!("id            {}", escape_text(&s.id)),
        format!("client        {}", escape_text(&s.client)),
        format!("resource      {}", escape_text(&s.resource)),
        format!("limit         {} per {}", s.limit, e.window),
        format!("burst         {}", s.capacity()),
        format!("per           {}", s.per),
        format!("scope         {}", scope_name(s.scope)),
        format!("source        {}", source_name(info.source)),
    ];
    if let Some(idle) = &e.expire_idle {
        lines.push(format!("expire_idle   {idle}"));
    }
    if let Some(r) = e.reserve {
        lines.push(format!(
            "reserve       high {} normal {} low {}",
            r.high, r.normal, r.low
        ));
    }
    if let Some(a) = &e.accuracy {
        lines.push(format!(
            "accuracy      {a} (not used: shares keep the bound exactly)"
        ));
    }
    if let Some(p) = s.on_failure {
        lines.push(format!("on_failure    {p:?}").to_lowercase());
    }
    if let Some(f) = s.fallback_limit {
        lines.push(format!("fallback      {f} per {}", e.window));
    }
    if let Some(l) = &info.lease {
        lines.push(format!(
            "sharing       {} daemons; a key with no record holds 1/{} of the rate and {} tokens here",
            l.members, l.members, l.batch
        ));
        lines.push(format!("held          {} tokens on this daemon", l.held));
        lines.push(
            "promise       all daemons together allow at most rate x t + burst in any \
             interval t (while shares are in force; on_failure decides once they lapse)"
                .to_string(),
        );
    }
    if s.shadow {
        lines.push(
            "shadow        yes: decided and counted, never denies, never charges the other rules"
                .to_string(),
        );
        lines.push(format!(
            "decisions     would allow {}  would deny {}  bypassed {}",
            info.allowed, info.rejected, info.bypassed
        ));
    } else {
        lines.push(format!(
            "decisions     allowed {}  rejected {}  bypassed {}",
            info.allowed, info.rejected, info.bypassed
        ));
    }
    lines.push(format!("last match    {} ago", fmt_ns(info.idle_ns)));
    out.line(lines.join("\n"))
}

fn list_rules(rules: &[RuleInfo], out: &mut Output) -> Result<(), CliError> {
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            let e = RuleEntry::from_spec(&r.spec);
            vec![
                r.spec.id.clone(),
                r.spec.client.clone(),
                r.spec.resource.clone(),
                if r.spec.shadow {
                    format!("{} (shadow)", r.spec.per)
                } else {
                    r.spec.per.to_string()
                },
                r.spec.limit.to_string(),
                e.window,
                r.spec.capacity().to_string(),
                scope_name(r.spec.scope).into(),
                source_name(r.source).into(),
                e.expire_idle.unwrap_or_else(|| "-".into()),
                r.allowed.to_string(),
                r.rejected.to_string(),
            ]
        })
        .collect();
    out.table(
        &[
            "ID", "CLIENT", "RESOURCE", "PER", "LIMIT", "WINDOW", "BURST", "SCOPE", "SOURCE",
            "EXPIRE", "ALLOWED", "REJECTED",
        ],
        &rows,
    )
}
