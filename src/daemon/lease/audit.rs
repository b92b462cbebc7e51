//! The lease audit log (`rld --audit-log FILE`, off by default) and its
//! checker.
//!
//! One JSON line per lease operation outcome and, every [`ADMITTED_EVERY`],
//! one line per global rule with the requests it admitted since the previous
//! line. The
//! checker ([`check`]) verifies, from the logs of every daemon and the bucket
//! keys' etcd history, the ledger's promises:
//! - no operation is counted as committed twice, and every operation a
//!   daemon counted as committed is in etcd's history with the same grant;
//! - every token a daemon admitted is covered by a grant or by bounded
//!   credit (`admitted <= granted + credit bound` at every point in time);
//! - the requests admitted by all daemons in every window of `w` seconds
//!   stay within `rate x w + burst + bound`.
//!
//! Writing never blocks the hot path: only the coordinator writes, buffered,
//! flushed once a second; a write error is logged once and the log stops.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How often admitted counts are written: the resolution of the window check.
pub const ADMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
const SLOT_NS: u64 = 100_000_000;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// The outcome of one lease operation.
    Op {
        node: String,
        /// Identity of the operation (`holders[node].op` in the value).
        op: u64,
        rule: String,
        /// The bucket's etcd key.
        key: String,
        take: u64,
        give: u64,
        debt: u64,
        granted: u64,
        /// `committed`, `resolved` (an earlier attempt committed),
        /// `unknown` or `failed`.
        outcome: String,
        /// etcd revision of the commit (0 if none).
        revision: i64,
        wall_ns: u64,
    },
    /// Requests admitted on a global rule since the previous line.
    Admitted {
        node: String,
        rule: String,
        wall_ns: u64,
        allowed: u64,
        bypassed: u64,
    },
}

/// The writer (owned by the coordinator).
#[derive(Debug)]
pub struct AuditLog {
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl AuditLog {
    /// Opens `path` for appending.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AuditLog {
            out: Some(std::io::BufWriter::new(file)),
        })
    }

    /// A log that writes nothing.
    pub fn disabled() -> AuditLog {
        AuditLog { out: None }
    }

    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    pub fn write(&mut self, record: &Record) {
        let Some(out) = &mut self.out else { return };
        let line = serde_json::to_string(record).expect("audit records serialize");
        if let Err(e) = writeln!(out, "{line}") {
            tracing::error!("audit log write failed ({e}); the audit log stops here");
            self.out = None;
        }
    }

    pub fn flush(&mut self) {
        if let Some(out) = &mut self.out
            && let Err(e) = out.flush()
        {
            tracing::error!("audit log write failed ({e}); the audit log stops here");
            self.out = None;
        }
    }
}

/// Reads audit lines (blank lines skipped).
///
/// # Errors
/// A line that is not a record, naming its number.
pub fn parse(text: &str) -> Result<Vec<Record>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// One committed state of a bucket key in etcd's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub key: String,
    pub revision: i64,
    pub value: super::value::BucketValue,
}

/// The promise a rule makes, for the window check.
#[derive(Debug, Clone, Copy)]
pub struct RuleBound {
    /// Tokens per second.
    pub rate: f64,
    pub burst: f64,
    /// The stated over-admission bound, tokens.
    pub bound: f64,
    /// Per-daemon credit a fresh bucket may take before its first grant.
    pub credit: f64,
}

/// What the checker found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub ops_committed: u64,
    pub ops_unknown: u64,
    pub ops_resolved: u64,
    pub tokens_granted: u64,
    pub admitted: u64,
    /// Worst admitted count in any window, and what the bound allowed there,
    /// per window length in seconds.
    pub worst_windows: BTreeMap<u64, (u64, f64)>,
    pub violations: Vec<String>,
}

/// Checks `records` (every daemon's log) against the bucket history for
/// `rule`, whose promise is `bound`; windows of each length in `windows`
/// (seconds). Admissions are counted in slots of [`ADMITTED_EVERY`] by the
/// time of their line, so a window of `w` s of lines covers at most
/// `w + 0.1` s of requests.
pub fn check(
    records: &[Record],
    history: &[HistoryEntry],
    rule: &str,
    bound: RuleBound,
    windows: &[u64],
) -> Report {
    let mut r = Report::default();
    // Operations committed according to etcd: (node, op) -> granted.
    let mut in_etcd: HashMap<(String, u64), u64> = HashMap::new();
    for h in history {
        for (node, holder) in &h.value.holders {
            in_etcd
                .entry((node.clone(), holder.op))
                .or_insert(holder.granted);
        }
    }
    let mut counted: HashSet<(String, u64)> = HashSet::new();
    // Per node: (wall_ns, +granted) and (wall_ns, admitted) events.
    let mut per_node: HashMap<String, Vec<(u64, i64)>> = HashMap::new();
    let mut per_slot: BTreeMap<u64, u64> = BTreeMap::new();
    for rec in records {
        match rec {
            Record::Op {
                node,
                op,
                rule: rr,
                granted,
                outcome,
                wall_ns,
                ..
            } if rr == rule => match outcome.as_str() {
                "committed" | "resolved" => {
                    if outcome == "resolved" {
                        r.ops_resolved += 1;
                    }
                    r.ops_committed += 1;
                    r.tokens_granted += granted;
                    if !counted.insert((node.clone(), *op)) {
                        r.violations.push(format!(
                            "operation {op} of {node} counted as committed twice"
                        ));
                    }
                    match in_etcd.get(&(node.clone(), *op)) {
                        Some(g) if g == granted => {}
                        Some(g) => r.violations.push(format!(
                            "operation {op} of {node}: log says {granted} granted, etcd {g}"
                        )),
                        None if history.is_empty() => {}
                        None => r
                            .violations
                            .push(format!("operation {op} of {node} is not in etcd's history")),
                    }
                    per_node
                        .entry(node.clone())
                        .or_default()
                        .push((*wall_ns, *granted as i64));
                }
                "unknown" => r.ops_unknown += 1,
                _ => {}
            },
            Record::Admitted {
                node,
                rule: rr,
                wall_ns,
                allowed,
                ..
            } if rr == rule => {
                r.admitted += allowed;
                per_node
                    .entry(node.clone())
                    .or_default()
                    .push((*wall_ns, -(*allowed as i64)));
                *per_slot.entry(wall_ns / SLOT_NS).or_default() += allowed;
            }
            _ => {}
        }
    }
    // Coverage: at every admission line, what a daemon admitted so far is
    // within what it was granted so far plus its credit. Admission lines are
    // written up to a second late, grants at once, so a grant is counted
    // before the admissions it covers.
    for (node, mut events) in per_node {
        events.sort_by_key(|&(t, d)| (t, d < 0));
        let (mut granted, mut admitted) = (0i64, 0i64);
        for (t, d) in events {
            if d >= 0 {
                granted += d;
            } else {
                admitted -= d;
                if admitted as f64 > granted as f64 + bound.credit {
                    r.violations.push(format!(
                        "{node} admitted {admitted} by {t} but was granted {granted} (+{} credit)",
                        bound.credit
                    ));
                    break;
                }
            }
        }
    }
    // Windows.
    let slots_per_s = 1_000_000_000 / SLOT_NS;
    if let (Some(&first), Some(&last)) = (per_slot.keys().next(), per_slot.keys().last()) {
        for &w in windows {
            let mut worst = (0u64, 0.0f64);
            // A line covers up to one slot before it.
            let covered = w as f64 + SLOT_NS as f64 / 1e9;
            let allowed = bound.rate * covered + bound.burst + bound.bound;
            for start in first..=last {
                let sum: u64 = per_slot
                    .range(start..start + w * slots_per_s)
                    .map(|(_, n)| n)
                    .sum();
                if sum > worst.0 {
                    worst = (sum, allowed);
                }
                if sum as f64 > allowed {
                    r.violations.push(format!(
                        "{sum} admitted in the {w} s from {:.1} s, bound {allowed:.0}",
                        start as f64 / slots_per_s as f64
                    ));
                    break;
                }
            }
            r.worst_windows.insert(w, worst);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::lease::value::{BucketValue, Holder};

    fn op(node: &str, id: u64, granted: u64, outcome: &str, t: u64) -> Record {
        Record::Op {
            node: node.into(),
            op: id,
            rule: "g".into(),
            key: "k".into(),
            take: granted,
            give: 0,
            debt: 0,
            granted,
            outcome: outcome.into(),
            revision: 1,
            wall_ns: t,
        }
    }

    fn admitted(node: &str, t: u64, n: u64) -> Record {
        Record::Admitted {
            node: node.into(),
            rule: "g".into(),
            wall_ns: t,
            allowed: n,
            bypassed: 0,
        }
    }

    fn history(entries: &[(&str, u64, u64)]) -> Vec<HistoryEntry> {
        entries
            .iter()
            .enumerate()
            .map(|(i, (node, op, granted))| {
                let mut value = BucketValue::default();
                value.holders.insert(
                    (*node).into(),
                    Holder {
                        op: *op,
                        granted: *granted,
                        ..Holder::default()
                    },
                );
                HistoryEntry {
                    key: "k".into(),
                    revision: i as i64 + 1,
                    value,
                }
            })
            .collect()
    }

    const B: RuleBound = RuleBound {
        rate: 10.0,
        burst: 10.0,
        bound: 5.0,
        credit: 1.0,
    };
    const S: u64 = 1_000_000_000;

    #[test]
    fn a_clean_log_passes() {
        let recs = [
            op("a", 1, 10, "committed", S),
            admitted("a", 2 * S, 10),
            op("a", 2, 10, "resolved", 2 * S),
            admitted("a", 3 * S, 10),
        ];
        let r = check(
            &recs,
            &history(&[("a", 1, 10), ("a", 2, 10)]),
            "g",
            B,
            &[1, 10],
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.ops_committed, r.ops_resolved, r.admitted), (2, 1, 20));
    }

    #[test]
    fn each_broken_promise_is_found() {
        // Counted twice.
        let twice = [
            op("a", 1, 10, "committed", S),
            op("a", 1, 10, "resolved", S),
        ];
        assert_eq!(
            check(&twice, &history(&[("a", 1, 10)]), "g", B, &[1])
                .violations
                .len(),
            1
        );
        // Not in etcd / a different grant.
        let ghost = [op("a", 9, 10, "committed", S)];
        assert_eq!(
            check(&ghost, &history(&[("a", 1, 10)]), "g", B, &[1])
                .violations
                .len(),
            1
        );
        let differ = [op("a", 1, 7, "committed", S)];
        assert_eq!(
            check(&differ, &history(&[("a", 1, 10)]), "g", B, &[1])
                .violations
                .len(),
            1
        );
        // Admitted beyond grants and credit.
        let uncovered = [op("a", 1, 10, "committed", S), admitted("a", 2 * S, 12)];
        assert_eq!(
            check(&uncovered, &history(&[("a", 1, 10)]), "g", B, &[1])
                .violations
                .len(),
            1
        );
        // A window over the bound: 10/s x 2 s + 10 + 5 = 35.
        let burst = [op("a", 1, 100, "committed", S), admitted("a", S, 36)];
        assert_eq!(
            check(&burst, &history(&[("a", 1, 100)]), "g", B, &[1])
                .violations
                .len(),
            1
        );
    }
}
