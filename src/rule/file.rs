//! The human syntax of rules: `[[rule]]` tables in TOML (the daemon's config
//! file, `rlctl rules import`, the standalone state file) and the same shape in
//! JSON output. Durations are strings (`"1m"`), reserves are fractions (`0.1`).
//!
//! Converts to and from [`RuleSpec`]; owns no state and does no I/O.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{
    Accuracy, OnFailure, Per, Reserve, RuleError, RuleSpec, Scope, format_duration, parse_duration,
};

/// One `[[rule]]` table as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    pub id: String,
    pub client: String,
    pub resource: String,
    pub limit: u64,
    pub window: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_idle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve: Option<ReserveEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_limit: Option<u64>,
    /// `["client", "resource"]` (the default), `["client"]`, `["resource"]`
    /// or `[]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `reserve = { high = 0.1, normal = 0.2, low = 0.3 }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveEntry {
    #[serde(default)]
    pub high: f64,
    #[serde(default)]
    pub normal: f64,
    #[serde(default)]
    pub low: f64,
}

/// A file holding only `[[rule]]` tables.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(rename = "rule", default)]
    pub rules: Vec<RuleEntry>,
}

/// A rules file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RuleFileError {
    #[error("{0}")]
    Toml(String),
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(
        "rule id {0:?} is defined twice with different settings; give one of them another id or remove it"
    )]
    Duplicate(String),
}

impl RuleEntry {
    /// Converts and validates the entry.
    ///
    /// # Errors
    /// The first field that cannot be parsed or fails [`RuleSpec::validate`].
    pub fn to_spec(&self) -> Result<RuleSpec, RuleError> {
        let err = |field, problem| RuleError {
            id: self.id.clone(),
            field,
            problem,
        };
        let window = parse_duration(&self.window).map_err(|e| err("window", e))?;
        let expire_idle = self
            .expire_idle
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| err("expire_idle", e))?;
        let accuracy = self
            .accuracy
            .as_deref()
            .map(Accuracy::parse)
            .transpose()
            .map_err(|e| err("accuracy", e))?;
        let reserve = match self.reserve {
            Some(r) => Reserve {
                high: fraction_to_permille(r.high).map_err(|p| err("reserve", p))?,
                normal: fraction_to_permille(r.normal).map_err(|p| err("reserve", p))?,
                low: fraction_to_permille(r.low).map_err(|p| err("reserve", p))?,
            },
            None => Reserve::default(),
        };
        let per = match &self.per {
            Some(names) => Per::from_names(names).map_err(|e| err("per", e))?,
            None => Per::default(),
        };
        let spec = RuleSpec {
            id: self.id.clone(),
            client: self.client.clone(),
            resource: self.resource.clone(),
            limit: self.limit,
            window,
            burst: self.burst,
            expire_idle,
            reserve,
            scope: self.scope.unwrap_or_default(),
            on_failure: self.on_failure,
            accuracy,
            fallback_limit: self.fallback_limit,
            per,
            shadow: self.shadow,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The TOML form of a spec (inverse of [`RuleEntry::to_spec`]).
    pub fn from_spec(spec: &RuleSpec) -> RuleEntry {
        let r = spec.reserve;
        RuleEntry {
            id: spec.id.clone(),
            client: spec.client.clone(),
            resource: spec.resource.clone(),
            limit: spec.limit,
            window: format_duration(spec.window),
            burst: spec.burst,
            expire_idle: spec.expire_idle.map(format_duration),
            reserve: (r != Reserve::default()).then(|| ReserveEntry {
                high: f64::from(r.high) / 1000.0,
                normal: f64::from(r.normal) / 1000.0,
                low: f64::from(r.low) / 1000.0,
            }),
            scope: (spec.scope != Scope::Local).then_some(spec.scope),
            on_failure: spec.on_failure,
            accuracy: spec.accuracy.map(|a| a.to_string()),
            fallback_limit: spec.fallback_limit,
            per: (spec.per != Per::default())
                .then(|| spec.per.names().iter().map(|n| (*n).to_owned()).collect()),
            shadow: spec.shadow,
        }
    }
}

fn fraction_to_permille(f: f64) -> Result<u16, String> {
    if !(0.0..1.0).contains(&f) {
        return Err(format!(
            "value {f} is out of range; write a fraction from 0.0 up to (not including) 1.0"
        ));
    }
    Ok((f * 1000.0).round() as u16)
}

/// Parses a TOML document of `[[rule]]` tables into validated specs, in file
/// order. The same id twice with identical settings counts once.
///
/// # Errors
/// TOML syntax (with line and column), an invalid rule, or a duplicate id with
/// different settings.
pub fn parse_rules(text: &str) -> Result<Vec<RuleSpec>, RuleFileError> {
    let file: RulesFile = toml::from_str(text).map_err(|e| RuleFileError::Toml(e.to_string()))?;
    specs_from_entries(&file.rules)
}

/// Validates entries and removes exact duplicates.
///
/// # Errors
/// As [`parse_rules`].
pub fn specs_from_entries(entries: &[RuleEntry]) -> Result<Vec<RuleSpec>, RuleFileError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut specs: Vec<RuleSpec> = Vec::with_capacity(entries.len());
    for entry in entries {
        let spec = entry.to_spec()?;
        match seen.get(&spec.id) {
            Some(&i) if specs[i] == spec => {}
            Some(_) => return Err(RuleFileError::Duplicate(spec.id)),
            None => {
                seen.insert(spec.id.clone(), specs.len());
                specs.push(spec);
            }
        }
    }
    Ok(specs)
}

/// Renders specs as a TOML document that [`parse_rules`] reads back.
pub fn render_rules(specs: &[RuleSpec]) -> String {
    let file = RulesFile {
        rules: specs.iter().map(RuleEntry::from_spec).collect(),
    };
    toml::to_string(&file).expect("rule entries always serialize to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[rule]]
id = "api-per-client"
client = "*"
resource = "api/*"
limit = 100
window = "1m"
burst = 150
expire_idle = "1h"
reserve = { high = 0.1, normal = 0.2, low = 0.3 }

[[rule]]
id = "global-search"
client = "team-*"
resource = "search"
limit = 1000
window = "1s"
scope = "global"
on_failure = "local"
accuracy = "2%/10s"
fallback_limit = 400
"#;

    #[test]
    fn parses_and_round_trips() {
        let specs = parse_rules(SAMPLE).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].burst, Some(150));
        assert_eq!(specs[0].reserve.low, 300);
        assert_eq!(specs[1].scope, Scope::Global);
        let again = parse_rules(&render_rules(&specs)).unwrap();
        assert_eq!(specs, again);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_durations() {
        let e = parse_rules(
            "[[rule]]\nid='a'\nclient='*'\nresource='*'\nlimit=1\nwindow='1s'\nlimt=2\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("limt"), "{e}");
        let e = parse_rules("[[rule]]\nid='a'\nclient='*'\nresource='*'\nlimit=1\nwindow='soon'\n")
            .unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
    }

    #[test]
    fn duplicate_ids_must_agree() {
        let one = "[[rule]]\nid='a'\nclient='*'\nresource='*'\nlimit=1\nwindow='1s'\n";
        assert_eq!(parse_rules(&format!("{one}{one}")).unwrap().len(), 1);
        let other = one.replace("limit=1", "limit=2");
        let e = parse_rules(&format!("{one}{other}")).unwrap_err();
        assert!(matches!(e, RuleFileError::Duplicate(_)), "{e}");
    }
}
