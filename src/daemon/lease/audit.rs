//! The lease audit log (`rld --audit-log FILE`, off by default) and its
//! checker.
//!
//! One JSON line per write of this daemon's shares (a record's entry, its
//! creation or deletion; its operating count) with its outcome, one per
//! change of the share it applies, and, every [`ADMITTED_EVERY`], one line
//! per global rule with the requests it admitted since the previous line.
//! The checker ([`check`]) verifies, from the logs of every daemon and
//! etcd's history of the shares:
//! - at every etcd revision, the shares in force of every record of the
//!   rule sum to at most the rate and its burst, and the operating counts
//!   of the live daemons keep `sum 1/n <= 1` (the implicit shares);
//! - every write a daemon counted as committed is in etcd's history (its
//!   identity in the record), and none is counted twice;
//! - the requests admitted by all daemons in every window of `w` seconds
//!   stay within `rate x w + burst`.
//!
//! Writing never blocks the hot path: only the coordinator writes, buffered,
//! flushed every [`ADMITTED_EVERY`]; a write error is logged once and the
//! log stops.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::share::{self, Record as ShareRecord};
use super::view::{MemberValue, Paths};

/// How often admitted counts are written: the resolution of the window check.
pub const ADMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
const SLOT_NS: u64 = 100_000_000;

/// Wall-clock nanoseconds since the Unix epoch (audit lines only: shares
/// never depend on wall clocks).
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// The outcome of one write of a record.
    Share {
        node: String,
        /// The record's etcd key.
        key: String,
        /// Identity of the write (the entry's `op`).
        op: u64,
        /// `create`, `write` or `delete`.
        kind: String,
        lease: i64,
        /// The entry written: parts of 2^32 of the rate, tokens of depth.
        rate: u64,
        depth: u64,
        /// `committed`, `moved` (its compare failed), `unknown`, `failed`.
        outcome: String,
        /// etcd revision of the commit (0 if none).
        revision: i64,
        wall_ns: u64,
    },
    /// The outcome of one write of the operating count.
    Count {
        node: String,
        lease: i64,
        n: u32,
        outcome: String,
        revision: i64,
        wall_ns: u64,
    },
    /// The share of a record this daemon applies from now on.
    Applied {
        node: String,
        key: String,
        rate: u64,
        depth: u64,
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

impl Record {
    pub fn node(&self) -> &str {
        match self {
            Record::Share { node, .. }
            | Record::Count { node, .. }
            | Record::Applied { node, .. }
            | Record::Admitted { node, .. } => node,
        }
    }
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

/// One event in etcd's history of the shares prefix.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub key: String,
    pub revision: i64,
    /// The value put, or `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// The etcd lease the key was put under.
    pub lease: i64,
}

/// The promise a rule makes, for the window check.
#[derive(Debug, Clone, Copy)]
pub struct RuleBound {
    /// Tokens per second.
    pub rate: f64,
    pub burst: f64,
}

/// What the checker found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub writes_committed: u64,
    pub writes_unknown: u64,
    pub count_writes: u64,
    pub admitted: u64,
    /// etcd revisions replayed, and records of the rule seen.
    pub revisions: u64,
    pub records: u64,
    /// The largest sum of shares of one record seen at any revision, as a
    /// fraction of the rate.
    pub fullest: f64,
    /// Worst admitted count in any window, and what the bound allowed there,
    /// per window length in seconds.
    pub worst_windows: BTreeMap<u64, (u64, f64)>,
    pub violations: Vec<String>,
}

/// Checks `records` (every daemon's log) against `history` (every event
/// under the shares prefix, oldest first) for `rule`, whose promise is
/// `bound`; windows of each length in `windows` (seconds). Admissions are
/// counted in slots of [`ADMITTED_EVERY`] by the time of their line, so a
/// window of `w` s of lines covers at most `w + 0.1` s of requests.
pub fn check(
    records: &[Record],
    history: &[HistoryEntry],
    paths: &Paths,
    rule: &str,
    bound: RuleBound,
    windows: &[u64],
) -> Report {
    let mut r = Report::default();
    // Replay: members (node -> (lease, n)) and the rule's records.
    let mut members: HashMap<String, (i64, u32)> = HashMap::new();
    let mut shares: HashMap<String, ShareRecord> = HashMap::new();
    let mut in_etcd: HashSet<(String, u64)> = HashSet::new();
    let mut deleted_at: HashSet<(String, i64)> = HashSet::new();
    let mut seen_records: HashSet<String> = HashSet::new();
    let mut i = 0;
    while i < history.len() {
        let revision = history[i].revision;
        let mut touched: Vec<String> = Vec::new();
        while i < history.len() && history[i].revision == revision {
            let h = &history[i];
            i += 1;
            if let Some(node) = h.key.strip_prefix(&paths.members) {
                match &h.value {
                    Some(v) => {
                        let n = serde_json::from_slice::<MemberValue>(v).map_or(1, |m| m.n);
                        members.insert(node.to_owned(), (h.lease, n));
                    }
                    None => {
                        members.remove(node);
                    }
                }
                continue;
            }
            if paths.rule_of(&h.key) != Some(rule) {
                continue;
            }
            match &h.value {
                Some(v) => match serde_json::from_slice::<ShareRecord>(v) {
                    Ok(rec) => {
                        for (node, e) in &rec.entries {
                            in_etcd.insert((node.clone(), e.op));
                        }
                        seen_records.insert(h.key.clone());
                        shares.insert(h.key.clone(), rec);
                        touched.push(h.key.clone());
                    }
                    Err(_) => {
                        shares.remove(&h.key);
                    }
                },
                None => {
                    shares.remove(&h.key);
                    deleted_at.insert((h.key.clone(), revision));
                }
            }
        }
        r.revisions += 1;
        let counts: Vec<u32> = members.values().map(|m| m.1).filter(|&n| n > 0).collect();
        if !share::counts_fit(&counts) {
            r.violations.push(format!(
                "revision {revision}: operating counts {counts:?} give implicit shares summing past the rate"
            ));
        }
        let live = |node: &str, lease: i64| members.get(node).is_some_and(|m| m.0 == lease);
        for key in touched {
            let rec = &shares[&key];
            if !share::holds(rec, live) {
                r.violations.push(format!(
                    "revision {revision}: the shares of {key} sum past the rule ({rec:?})"
                ));
            }
            r.fullest = r.fullest.max(share::fraction_in_force(rec, live));
        }
    }
    r.records = seen_records.len() as u64;
    let prefix = format!("{}{rule}/", paths.shares);
    let mut counted: HashSet<(String, u64)> = HashSet::new();
    let mut per_slot: BTreeMap<u64, u64> = BTreeMap::new();
    for rec in records {
        match rec {
            Record::Share {
                node,
                key,
                op,
                kind,
                outcome,
                revision,
                ..
            } if key.starts_with(&prefix) => match outcome.as_str() {
                "committed" => {
                    r.writes_committed += 1;
                    if !counted.insert((node.clone(), *op)) {
                        r.violations
                            .push(format!("write {op} of {node} counted as committed twice"));
                    }
                    let found = if kind == "delete" {
                        deleted_at.contains(&(key.clone(), *revision))
                    } else {
                        in_etcd.contains(&(node.clone(), *op))
                    };
                    if !found && !history.is_empty() {
                        r.violations.push(format!(
                            "write {op} of {node} ({kind} {key}) is not in etcd's history"
                        ));
                    }
                }
                "unknown" => r.writes_unknown += 1,
                _ => {}
            },
            Record::Count { outcome, .. } if outcome == "committed" => r.count_writes += 1,
            Record::Admitted {
                rule: rr,
                wall_ns,
                allowed,
                ..
            } if rr == rule => {
                r.admitted += allowed;
                *per_slot.entry(wall_ns / SLOT_NS).or_default() += allowed;
            }
            _ => {}
        }
    }
    // Windows.
    let slots_per_s = 1_000_000_000 / SLOT_NS;
    if let (Some(&first), Some(&last)) = (per_slot.keys().next(), per_slot.keys().last()) {
        for &w in windows {
            let mut worst = (0u64, 0.0f64);
            // A line covers up to one slot before it.
            let covered = w as f64 + SLOT_NS as f64 / 1e9;
            let allowed = bound.rate * covered + bound.burst;
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
    use crate::daemon::lease::share::{Entry, SCALE};
    use crate::daemon::limiter::key::BucketKey;

    fn paths() -> Paths {
        Paths::new("/rld")
    }

    fn member(node: &str, rev: i64, lease: i64, n: u32) -> HistoryEntry {
        HistoryEntry {
            key: paths().member(node),
            revision: rev,
            value: Some(format!(r#"{{"n":{n}}}"#).into_bytes()),
            lease,
        }
    }

    fn record(rev: i64, entries: &[(&str, i64, u64, u64, u64)]) -> HistoryEntry {
        let rec = ShareRecord {
            client: "c".into(),
            resource: "r".into(),
            pool: 0,
            burst: 10,
            entries: entries
                .iter()
                .map(|&(n, lease, rate, depth, op)| {
                    (
                        n.to_owned(),
                        Entry {
                            lease,
                            rate,
                            n: 0,
                            depth,
                            demand: Some(1.0),
                            op,
                        },
                    )
                })
                .collect(),
        };
        HistoryEntry {
            key: paths().record("g", &BucketKey::new("c", "r")),
            revision: rev,
            value: Some(serde_json::to_vec(&rec).unwrap()),
            lease: 0,
        }
    }

    fn write(node: &str, op: u64, rev: i64) -> Record {
        Record::Share {
            node: node.into(),
            key: paths().record("g", &BucketKey::new("c", "r")),
            op,
            kind: "write".into(),
            lease: 1,
            rate: 0,
            depth: 0,
            outcome: "committed".into(),
            revision: rev,
            wall_ns: 0,
        }
    }

    fn admitted(t: u64, n: u64) -> Record {
        Record::Admitted {
            node: "a".into(),
            rule: "g".into(),
            wall_ns: t,
            allowed: n,
            bypassed: 0,
        }
    }

    const B: RuleBound = RuleBound {
        rate: 10.0,
        burst: 10.0,
    };
    const S: u64 = 1_000_000_000;

    #[test]
    fn a_clean_history_passes() {
        let h = [
            member("a", 1, 1, 2),
            member("b", 2, 2, 2),
            record(3, &[("a", 1, SCALE / 2, 5, 7), ("b", 2, SCALE / 2, 5, 8)]),
        ];
        let logs = [write("a", 7, 3), admitted(S, 10), admitted(2 * S, 10)];
        let r = check(&logs, &h, &paths(), "g", B, &[1, 10]);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.writes_committed, r.admitted, r.records), (1, 20, 1));
        assert!((r.fullest - 1.0).abs() < 1e-9);
    }

    #[test]
    fn each_broken_promise_is_found() {
        // Over-full record.
        let h = [
            member("a", 1, 1, 2),
            member("b", 2, 2, 2),
            record(
                3,
                &[("a", 1, SCALE / 2 + 1, 5, 7), ("b", 2, SCALE / 2, 5, 8)],
            ),
        ];
        assert_eq!(check(&[], &h, &paths(), "g", B, &[1]).violations.len(), 1);
        // A dead entry holds nothing: b's lease is not its member's.
        let h = [
            member("a", 1, 1, 2),
            member("b", 2, 3, 2),
            record(3, &[("a", 1, SCALE, 10, 7), ("b", 2, SCALE, 10, 8)]),
        ];
        assert!(check(&[], &h, &paths(), "g", B, &[1]).violations.is_empty());
        // Counts that over-fill the implicit shares.
        let h = [member("a", 1, 1, 1), member("b", 2, 2, 2)];
        assert_eq!(check(&[], &h, &paths(), "g", B, &[1]).violations.len(), 1);
        // A write not in etcd, and one counted twice.
        let h = [member("a", 1, 1, 1), record(2, &[("a", 1, SCALE, 10, 7)])];
        let ghost = [write("a", 9, 2)];
        assert_eq!(
            check(&ghost, &h, &paths(), "g", B, &[1]).violations.len(),
            1
        );
        let twice = [write("a", 7, 2), write("a", 7, 2)];
        assert_eq!(
            check(&twice, &h, &paths(), "g", B, &[1]).violations.len(),
            1
        );
        // A window over the bound: 10/s x 1.1 s + 10 = 21.
        let burst = [admitted(S, 22)];
        assert_eq!(
            check(&burst, &h, &paths(), "g", B, &[1]).violations.len(),
            1
        );
    }
}
