//! What this daemon knows of the shares in etcd: the member keys (each with
//! its etcd lease and operating count) and the share records, as of one etcd
//! revision, kept current by one watch on `{prefix}/v2/` and applied in
//! etcd's order. No I/O here.
//!
//! Key schema (v2), under the configured prefix:
//! - `/v2/members/{node}`: JSON `{"pid":..,"version":..,"n":..}` under the
//!   daemon's etcd lease; `n` is its operating count (0: not using implicit
//!   shares yet).
//! - `/v2/shares/{rule}/{xxh3-128 of the bucket key}`: a
//!   [`Record`](super::share::Record) (JSON).
//! - `/v2/compactor`: the node that compacts etcd's history, under its lease.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::share::Record;
use crate::daemon::limiter::key::BucketKey;

/// The value of a member key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberValue {
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub version: String,
    /// The operating count: implicit shares are `1/n`; 0: none.
    #[serde(default)]
    pub n: u32,
}

/// A live member as the view knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The etcd lease its key is attached to (entries written under another
    /// lease are not its: they belong to an earlier run, which stopped).
    pub lease: i64,
    pub n: u32,
    pub mod_revision: i64,
}

/// A record as the view knows it.
#[derive(Debug, Clone)]
pub struct Known {
    pub rule: Box<str>,
    pub record: Record,
    pub mod_revision: i64,
}

/// What one applied event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Member(String),
    /// A record's key (created, changed or deleted).
    Record(String),
    /// Nothing the view keeps.
    None,
}

/// The etcd paths of the shares.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `{prefix}/v2/`, what the watch covers.
    pub root: String,
    pub members: String,
    pub shares: String,
    pub compactor: String,
}

impl Paths {
    pub fn new(prefix: &str) -> Paths {
        let root = format!("{prefix}/v2/");
        Paths {
            members: format!("{root}members/"),
            shares: format!("{root}shares/"),
            compactor: format!("{root}compactor"),
            root,
        }
    }

    pub fn member(&self, node: &str) -> String {
        format!("{}{node}", self.members)
    }

    /// The record key of (rule, bucket key).
    pub fn record(&self, rule: &str, key: &BucketKey) -> String {
        let hash = xxhash_rust::xxh3::xxh3_128(key.bytes());
        format!("{}{rule}/{hash:032x}", self.shares)
    }

    /// The rule id of a record key.
    pub fn rule_of<'a>(&self, record_key: &'a str) -> Option<&'a str> {
        let rest = record_key.strip_prefix(&self.shares)?;
        let (rule, hash) = rest.rsplit_once('/')?;
        (hash.len() == 32 && !rule.is_empty()).then_some(rule)
    }
}

/// The view.
#[derive(Debug)]
pub struct View {
    pub paths: Paths,
    /// The revision everything here is as of (0: nothing loaded yet).
    pub revision: i64,
    pub members: BTreeMap<String, Member>,
    pub records: HashMap<String, Known>,
    /// Record keys whose value could not be read, with their mod_revision.
    /// Every daemon treats such a bucket as unrecorded (implicit shares,
    /// which sum to at most the rule); the next daemon that records the
    /// bucket overwrites the value (comparing that revision).
    pub broken: HashMap<String, i64>,
    /// Values under the prefix that could not be read.
    pub unreadable: u64,
}

impl View {
    pub fn new(prefix: &str) -> View {
        View {
            paths: Paths::new(prefix),
            revision: 0,
            members: BTreeMap::new(),
            records: HashMap::new(),
            broken: HashMap::new(),
            unreadable: 0,
        }
    }

    /// Whether `node` lives under `lease`.
    pub fn live(&self, node: &str, lease: i64) -> bool {
        self.members.get(node).is_some_and(|m| m.lease == lease)
    }

    /// Forgets everything (before a fresh listing).
    pub fn clear(&mut self) {
        self.members.clear();
        self.records.clear();
        self.broken.clear();
        self.revision = 0;
    }

    /// Applies a put of `key` (mod_revision `rev`, etcd lease `lease`).
    pub fn put(&mut self, key: &[u8], value: &[u8], rev: i64, lease: i64) -> Change {
        let Ok(key) = std::str::from_utf8(key) else {
            return Change::None;
        };
        self.revision = self.revision.max(rev);
        if let Some(node) = key.strip_prefix(&self.paths.members) {
            let v: MemberValue = serde_json::from_slice(value).unwrap_or_else(|_| {
                self.unreadable += 1;
                // An unreadable member counts as operating at 1: the most
                // any daemon could take (never less than it may hold).
                MemberValue {
                    n: 1,
                    ..MemberValue::default()
                }
            });
            self.members.insert(
                node.to_owned(),
                Member {
                    lease,
                    n: v.n,
                    mod_revision: rev,
                },
            );
            return Change::Member(node.to_owned());
        }
        if let Some(rule) = self.paths.rule_of(key) {
            match serde_json::from_slice::<Record>(value) {
                Ok(record) => {
                    self.broken.remove(key);
                    self.records.insert(
                        key.to_owned(),
                        Known {
                            rule: rule.into(),
                            record,
                            mod_revision: rev,
                        },
                    );
                }
                Err(e) => {
                    self.unreadable += 1;
                    tracing::error!(%key, "unreadable share record ({e}); the bucket counts as unrecorded until it is rewritten");
                    self.records.remove(key);
                    self.broken.insert(key.to_owned(), rev);
                }
            }
            return Change::Record(key.to_owned());
        }
        Change::None
    }

    /// Applies a delete of `key` at revision `rev`.
    pub fn delete(&mut self, key: &[u8], rev: i64) -> Change {
        let Ok(key) = std::str::from_utf8(key) else {
            return Change::None;
        };
        self.revision = self.revision.max(rev);
        if let Some(node) = key.strip_prefix(&self.paths.members) {
            self.members.remove(node);
            return Change::Member(node.to_owned());
        }
        if self.paths.rule_of(key).is_some() {
            self.records.remove(key);
            self.broken.remove(key);
            return Change::Record(key.to_owned());
        }
        Change::None
    }

    /// The operating counts written by live members other than `me`.
    pub fn other_counts(&self, me: &str) -> Vec<u32> {
        self.members
            .iter()
            .filter(|(node, _)| node.as_str() != me)
            .map(|(_, m)| m.n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let p = Paths::new("/rld");
        let k = p.record("api/v1", &BucketKey::new("c", "r"));
        assert!(k.starts_with("/rld/v2/shares/api/v1/"));
        assert_eq!(p.rule_of(&k), Some("api/v1"));
        assert_eq!(p.rule_of("/rld/v2/shares/x"), None);
        assert_eq!(p.member("n1"), "/rld/v2/members/n1");
    }

    #[test]
    fn events_build_the_view() {
        let mut v = View::new("/rld");
        let m = v.put(b"/rld/v2/members/a", br#"{"n":3}"#, 5, 77);
        assert_eq!(m, Change::Member("a".into()));
        assert!(v.live("a", 77));
        assert!(!v.live("a", 78));
        let key = v.paths.record("g", &BucketKey::new("c", "r"));
        let rec = r#"{"client":"c","resource":"r","burst":10,"entries":{"a":{"lease":77,"n":3,"depth":3}}}"#;
        assert_eq!(
            v.put(key.as_bytes(), rec.as_bytes(), 6, 0),
            Change::Record(key.clone())
        );
        assert_eq!(v.records[&key].record.entries["a"].n, 3);
        assert_eq!(v.revision, 6);
        // An unreadable record counts as none (and is counted), not kept stale.
        v.put(key.as_bytes(), b"{", 7, 0);
        assert!(!v.records.contains_key(&key));
        assert_eq!((v.unreadable, v.broken[&key]), (1, 7));
        v.delete(b"/rld/v2/members/a", 8);
        assert!(!v.live("a", 77));
        assert_eq!(v.other_counts("b"), Vec::<u32>::new());
    }
}
