//! The rules in force and where they come from: the config file (a read-only
//! per-host layer, reloaded on SIGHUP) and rules set at run time: standalone,
//! persisted atomically in the state directory (they survive restarts and
//! `kill -9`); with etcd, stored in etcd and shared by every daemon (this
//! module then checks changes and mirrors what the watcher lists).
//!
//! Every change is checked as a whole, persisted, and only then installed in
//! the limiter: a rejected or unpersistable change leaves the rules in force
//! untouched. Admin operations run here, off the request path, serialized by
//! one mutex; this module does blocking file I/O and must be called from
//! `spawn_blocking` in async code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::limiter::rules::LAST_MATCH_GRANULE_NS;
use super::limiter::{Limiter, MonotonicClock, RuleSetError};
use crate::protocol::{ErrorBody, ErrorCode, RuleInfo, RuleSource};
use crate::rule::{RuleSpec, Scope};

pub use super::store::{RULES_FILE, StateStore};

/// Why a rule change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleBookError {
    #[error(transparent)]
    Invalid(#[from] RuleSetError),
    #[error(
        "rule {id:?} has scope = \"global\", which needs etcd; start rld with --etcd or use scope = \"local\""
    )]
    GlobalNeedsEtcd { id: String },
    #[error(
        "rule {id:?} is defined in the config file {path}; edit it there and reload rld (SIGHUP)"
    )]
    ReadOnly { id: String, path: String },
    #[error("no rule with id {0:?}; `rlctl rules list` shows the rules in force")]
    NotFound(String),
    #[error(
        "could not save rules to {path}: {source}; nothing was changed. Free space or fix permissions and retry"
    )]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path}: {message}; fix or remove the file")]
    CorruptState { path: PathBuf, message: String },
    /// The state directory or a file in it cannot be used at all (read at
    /// start, nothing being saved): what is wrong and the fix.
    #[error("{path}: {problem}")]
    StateUnusable { path: PathBuf, problem: String },
    #[error(
        "state directory {path} is in use by another rld (lock held); give each daemon its own --state-dir"
    )]
    Locked { path: PathBuf },
}

impl RuleBookError {
    /// The wire error for this refusal.
    pub fn to_wire(&self) -> ErrorBody<'static> {
        let code = match self {
            RuleBookError::Invalid(_) | RuleBookError::GlobalNeedsEtcd { .. } => {
                ErrorCode::INVALID_RULE
            }
            RuleBookError::ReadOnly { .. } => ErrorCode::RULE_READ_ONLY,
            RuleBookError::NotFound(_) => ErrorCode::RULE_NOT_FOUND,
            RuleBookError::Storage { .. }
            | RuleBookError::CorruptState { .. }
            | RuleBookError::StateUnusable { .. }
            | RuleBookError::Locked { .. } => ErrorCode::STORAGE_FAILED,
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// The layers of rules and the lock serializing changes to them.
#[derive(Debug)]
pub struct RuleBook {
    limiter: Arc<Limiter>,
    clock: MonotonicClock,
    store: StateStore,
    /// Run-time rules live in etcd (and global rules can be served).
    etcd_mode: bool,
    layers: Mutex<Layers>,
}

#[derive(Debug, Default)]
struct Layers {
    config_path: String,
    config: Vec<RuleSpec>,
    /// Rules set at run time: the state file's, or etcd's (those in force:
    /// etcd rules that clash with this host's config rules are left out).
    runtime: BTreeMap<String, RuleSpec>,
    runtime_source: Option<RuleSource>,
    /// With etcd: every rule etcd holds as last seen, in force or not, so a
    /// rule left out for a clash comes back once the config rule goes.
    etcd: BTreeMap<String, RuleSpec>,
}

impl Layers {
    fn combined(&self) -> Vec<(RuleSpec, RuleSource)> {
        let source = self.runtime_source.unwrap_or(RuleSource::Runtime);
        self.config
            .iter()
            .map(|s| (s.clone(), RuleSource::Config))
            .chain(self.runtime.values().map(|s| (s.clone(), source)))
            .collect()
    }

    fn with_runtime(&self, runtime: BTreeMap<String, RuleSpec>) -> Layers {
        Layers {
            config_path: self.config_path.clone(),
            config: self.config.clone(),
            runtime,
            runtime_source: self.runtime_source,
            etcd: self.etcd.clone(),
        }
    }
}

impl RuleBook {
    /// Loads persisted rules, combines them with the config layer and installs
    /// them.
    ///
    /// # Errors
    /// Unusable state directory or a combined set that does not validate.
    pub fn open(
        limiter: Arc<Limiter>,
        clock: MonotonicClock,
        store: StateStore,
        config_path: Option<&Path>,
        config_rules: Vec<RuleSpec>,
        etcd_mode: bool,
    ) -> Result<RuleBook, RuleBookError> {
        // With etcd, run-time rules come from etcd (the watcher lists them).
        let runtime = if etcd_mode {
            BTreeMap::new()
        } else {
            store
                .load()?
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect()
        };
        let layers = Layers {
            config_path: config_path.map_or_else(String::new, |p| p.display().to_string()),
            config: config_rules,
            runtime,
            runtime_source: Some(if etcd_mode {
                RuleSource::Etcd
            } else {
                RuleSource::Runtime
            }),
            etcd: BTreeMap::new(),
        };
        let book = RuleBook {
            limiter,
            clock,
            store,
            etcd_mode,
            layers: Mutex::new(Layers::default()),
        };
        book.check_scopes(layers.config.iter().chain(layers.runtime.values()))?;
        book.limiter
            .set_rules(layers.combined(), book.clock.now_ns())?;
        *book.layers.lock() = layers;
        Ok(book)
    }

    fn check_scopes<'a>(
        &self,
        specs: impl IntoIterator<Item = &'a RuleSpec>,
    ) -> Result<(), RuleBookError> {
        if self.etcd_mode {
            return Ok(());
        }
        match specs.into_iter().find(|s| s.scope == Scope::Global) {
            Some(s) => Err(RuleBookError::GlobalNeedsEtcd { id: s.id.clone() }),
            None => Ok(()),
        }
    }

    /// Creates or replaces run-time rules, all or none (standalone: persisted
    /// in the state directory). Returns how many rules were created or changed.
    ///
    /// # Errors
    /// Invalid rules, ids owned by the config file, or a failed save.
    pub fn set(&self, specs: Vec<RuleSpec>) -> Result<u32, RuleBookError> {
        let mut layers = self.layers.lock();
        let (next, changed) = self.next_runtime(&layers, specs)?;
        if changed == 0 {
            return Ok(0);
        }
        self.commit(&mut layers, next)?;
        Ok(changed)
    }

    /// Checks a change for etcd before it is written there: every rule valid,
    /// none owned by the config file, and the combined set unambiguous here.
    /// Returns how many rules it creates or changes.
    ///
    /// # Errors
    /// As [`RuleBook::set`]. (A rule with `expire_idle` expires when no
    /// daemon has matched it for that long: see the sweeper.)
    pub fn check_etcd_set(&self, specs: &[RuleSpec]) -> Result<u32, RuleBookError> {
        let layers = self.layers.lock();
        let (next, changed) = self.next_runtime(&layers, specs.to_vec())?;
        self.limiter
            .check_rules(layers.with_runtime(next).combined(), self.clock.now_ns())?;
        Ok(changed)
    }

    /// Mirrors rules just written to etcd (the watcher confirms them later).
    pub fn apply_etcd_upserts(&self, specs: Vec<RuleSpec>) {
        let mut layers = self.layers.lock();
        let mut next = layers.etcd.clone();
        for s in specs {
            next.insert(s.id.clone(), s);
        }
        self.install_lenient(&mut layers, next);
    }

    /// Mirrors a rule just deleted from etcd.
    pub fn apply_etcd_delete(&self, id: &str) {
        let mut layers = self.layers.lock();
        let mut next = layers.etcd.clone();
        if next.remove(id).is_some() {
            self.install_lenient(&mut layers, next);
        }
    }

    /// Replaces the etcd layer with what etcd holds at `revision` (the
    /// watcher's list), and caches it in the state directory for a restart
    /// while etcd is unreachable. Blocking file I/O.
    pub fn replace_etcd_layer(&self, specs: Vec<RuleSpec>, revision: i64) {
        let mut layers = self.layers.lock();
        if let Err(e) = self.store.save_etcd_cache(&specs, revision) {
            tracing::warn!(
                "cannot cache the rules from etcd ({e}); a restart while etcd is unreachable will not have them"
            );
        }
        let next = specs.into_iter().map(|s| (s.id.clone(), s)).collect();
        if next != layers.etcd {
            self.install_lenient(&mut layers, next);
        }
    }

    /// At start with etcd unreachable: installs the rules last listed from
    /// etcd, if cached, and says so; otherwise warns that `default_action`
    /// answers for them until etcd is reachable. Blocking file I/O.
    pub fn apply_etcd_cache(&self) {
        let path = self.store.etcd_cache_path();
        match self.store.load_etcd_cache() {
            Ok(Some((specs, revision))) => {
                tracing::warn!(
                    rules = specs.len(),
                    revision,
                    cache = %path.display(),
                    "etcd unreachable at start: serving the rules last seen in etcd until it answers"
                );
                let mut layers = self.layers.lock();
                let next = specs.into_iter().map(|s| (s.id.clone(), s)).collect();
                self.install_lenient(&mut layers, next);
            }
            Ok(None) => tracing::warn!(
                "etcd unreachable at start and no rules cached from an earlier run: only config-file \
                 rules apply (default_action answers the rest) until etcd answers"
            ),
            Err(e) => tracing::error!(
                "etcd unreachable at start and its cached rules are unusable ({e}); only config-file \
                 rules apply until etcd answers"
            ),
        }
    }

    /// Installs a run-time layer from etcd, leaving out (with an error) each
    /// rule that clashes with this host's config rules, so one bad rule
    /// cannot take the others down.
    fn install_lenient(&self, layers: &mut Layers, etcd: BTreeMap<String, RuleSpec>) {
        if let Err(e) = self.try_install_lenient(layers, etcd) {
            tracing::error!("rules from etcd not installed: {e}");
        }
    }

    /// [`Self::install_lenient`], saying why the combined set failed.
    fn try_install_lenient(
        &self,
        layers: &mut Layers,
        etcd: BTreeMap<String, RuleSpec>,
    ) -> Result<(), RuleBookError> {
        let now = self.clock.now_ns();
        let mut accepted = BTreeMap::new();
        for (id, spec) in etcd.clone() {
            if layers.config.iter().any(|c| c.id == id) {
                tracing::error!(rule = %id, "etcd rule has the id of a config-file rule; the config rule wins");
                continue;
            }
            let mut trial = accepted.clone();
            trial.insert(id.clone(), spec.clone());
            match self
                .limiter
                .check_rules(layers.with_runtime(trial).combined(), now)
            {
                Ok(()) => {
                    accepted.insert(id, spec);
                }
                Err(e) => tracing::error!(rule = %id, "skipping rule from etcd: {e}"),
            }
        }
        let mut next = layers.with_runtime(accepted);
        next.etcd = etcd;
        self.limiter.set_rules(next.combined(), now)?;
        *layers = next;
        Ok(())
    }

    /// The run-time layer after upserting `specs`, and how many changed.
    fn next_runtime(
        &self,
        layers: &Layers,
        specs: Vec<RuleSpec>,
    ) -> Result<(BTreeMap<String, RuleSpec>, u32), RuleBookError> {
        self.check_scopes(&specs)?;
        let mut next = layers.runtime.clone();
        let mut changed = 0;
        let mut seen = std::collections::HashMap::new();
        for spec in specs {
            spec.validate().map_err(RuleSetError::from)?;
            if seen
                .insert(spec.id.clone(), spec.clone())
                .is_some_and(|s| s != spec)
            {
                return Err(RuleSetError::DuplicateId(spec.id).into());
            }
            if layers.config.iter().any(|c| c.id == spec.id) {
                return Err(RuleBookError::ReadOnly {
                    id: spec.id,
                    path: layers.config_path.clone(),
                });
            }
            if spec.scope == Scope::Global && spec.reserve != crate::rule::Reserve::default() {
                return Err(RuleSetError::Invalid(crate::rule::RuleError {
                    id: spec.id,
                    field: "reserve",
                    problem: "is not supported on global rules yet; remove it".into(),
                })
                .into());
            }
            if next.get(&spec.id) != Some(&spec) {
                changed += 1;
                next.insert(spec.id.clone(), spec);
            }
        }
        Ok((next, changed))
    }

    /// Checks that `id` may be deleted here (not a config-file rule).
    ///
    /// # Errors
    /// [`RuleBookError::ReadOnly`].
    pub fn check_delete(&self, id: &str) -> Result<(), RuleBookError> {
        let layers = self.layers.lock();
        if layers.config.iter().any(|c| c.id == id) {
            return Err(RuleBookError::ReadOnly {
                id: id.to_owned(),
                path: layers.config_path.clone(),
            });
        }
        Ok(())
    }

    /// Whether run-time rules live in etcd.
    pub fn etcd_mode(&self) -> bool {
        self.etcd_mode
    }

    /// Deletes a run-time rule.
    ///
    /// # Errors
    /// Unknown id, a config-file rule, or a failed save.
    pub fn delete(&self, id: &str) -> Result<(), RuleBookError> {
        let mut layers = self.layers.lock();
        if layers.config.iter().any(|c| c.id == id) {
            return Err(RuleBookError::ReadOnly {
                id: id.to_owned(),
                path: layers.config_path.clone(),
            });
        }
        let mut next = layers.runtime.clone();
        if next.remove(id).is_none() {
            return Err(RuleBookError::NotFound(id.to_owned()));
        }
        self.commit(&mut layers, next)
    }

    /// Replaces the config layer (SIGHUP).
    ///
    /// # Errors
    /// The new set does not validate; the old rules stay in force.
    pub fn reload_config(&self, config_rules: Vec<RuleSpec>) -> Result<(), RuleBookError> {
        let mut layers = self.layers.lock();
        self.check_scopes(&config_rules)?;
        if self.etcd_mode {
            // As at start: a config rule wins over the etcd rule with its id
            // (left out, logged), and an etcd rule left out before comes
            // back when the config rule is gone.
            let mut next = layers.with_runtime(BTreeMap::new());
            next.config = config_rules;
            self.limiter
                .check_rules(next.combined(), self.clock.now_ns())?;
            let etcd = next.etcd.clone();
            self.try_install_lenient(&mut next, etcd)?;
            *layers = next;
            return Ok(());
        }
        let next = Layers {
            config: config_rules,
            ..layers.with_runtime(layers.runtime.clone())
        };
        if let Some(clash) = next
            .config
            .iter()
            .find(|c| next.runtime.contains_key(&c.id))
        {
            return Err(RuleSetError::DuplicateId(clash.id.clone()).into());
        }
        self.limiter
            .set_rules(next.combined(), self.clock.now_ns())?;
        *layers = next;
        Ok(())
    }

    /// Removes run-time rules with `expire_idle` that no request has matched
    /// for that long (plus the granule of the last-match time, so a rule in
    /// use is never removed). Returns the ids removed.
    ///
    /// # Errors
    /// A failed save (the rules then stay).
    pub fn expire_idle(&self, now_ns: u64) -> Result<Vec<String>, RuleBookError> {
        let rules = self.limiter.rules();
        let expired: Vec<String> = rules
            .iter()
            .filter(|r| r.source == RuleSource::Runtime)
            .filter(|r| {
                r.spec.expire_idle.is_some_and(|idle| {
                    let idle_ns = now_ns.saturating_sub(r.activity.last_match_ns());
                    idle_ns
                        >= u64::try_from(idle.as_nanos())
                            .unwrap_or(u64::MAX)
                            .saturating_add(LAST_MATCH_GRANULE_NS)
                })
            })
            .map(|r| r.id().to_owned())
            .collect();
        if expired.is_empty() {
            return Ok(expired);
        }
        let mut layers = self.layers.lock();
        let mut next = layers.runtime.clone();
        for id in &expired {
            next.remove(id);
        }
        self.commit(&mut layers, next)?;
        Ok(expired)
    }

    /// Checks, persists, then installs a new run-time layer.
    fn commit(
        &self,
        layers: &mut Layers,
        runtime: BTreeMap<String, RuleSpec>,
    ) -> Result<(), RuleBookError> {
        let next = layers.with_runtime(runtime);
        let now = self.clock.now_ns();
        self.limiter.check_rules(next.combined(), now)?;
        let specs: Vec<RuleSpec> = next.runtime.values().cloned().collect();
        self.store.save(&specs)?;
        self.limiter.set_rules(next.combined(), now)?;
        *layers = next;
        Ok(())
    }

    /// One rule with its counters.
    pub fn get(&self, id: &str) -> Option<RuleInfo> {
        let now = self.clock.now_ns();
        self.limiter.rules().get(id).map(|r| info(r, now))
    }

    /// Every rule in force, config rules first.
    pub fn list(&self) -> Vec<RuleInfo> {
        let now = self.clock.now_ns();
        self.limiter.rules().iter().map(|r| info(r, now)).collect()
    }
}

fn info(rule: &super::limiter::Rule, now: u64) -> RuleInfo {
    let (allowed, rejected, bypassed) = rule.activity.totals();
    RuleInfo {
        spec: rule.spec.clone(),
        source: rule.source,
        allowed,
        rejected,
        bypassed,
        idle_ns: now.saturating_sub(rule.activity.last_match_ns()),
        lease: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::limiter::{DefaultAction, LimiterConfig};
    use std::fs;
    use std::time::Duration;

    fn book(dir: &Path, config: Vec<RuleSpec>) -> RuleBook {
        open_book(dir, config, false)
    }

    fn open_book(dir: &Path, config: Vec<RuleSpec>, etcd_mode: bool) -> RuleBook {
        let limiter = Arc::new(Limiter::new(LimiterConfig {
            shards: 4,
            max_buckets: 100,
            max_table_bytes: usize::MAX,
            default_action: DefaultAction::Allow,
        }));
        RuleBook::open(
            limiter,
            MonotonicClock::new(),
            StateStore::open(dir).unwrap(),
            Some(Path::new("/etc/rld/rld.toml")),
            config,
            etcd_mode,
        )
        .unwrap()
    }

    fn spec(id: &str, client: &str) -> RuleSpec {
        RuleSpec::new(id, client, "*", 10, Duration::from_secs(1))
    }

    /// (id, source, client pattern) of the rules in force.
    fn in_force(b: &RuleBook) -> Vec<(String, RuleSource, String)> {
        let mut v: Vec<_> = b
            .limiter
            .rules()
            .iter()
            .map(|r| (r.id().to_owned(), r.source, r.spec.client.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn with_etcd_a_config_rule_wins_on_reload_and_the_etcd_rule_returns_after() {
        let dir = tempfile::tempdir().unwrap();
        let b = open_book(dir.path(), vec![spec("local", "l*")], true);
        b.replace_etcd_layer(vec![spec("shared", "e*"), spec("other", "o*")], 5);
        let etcd = |id: &str, c: &str| (id.to_owned(), RuleSource::Etcd, c.to_owned());
        let config = |id: &str, c: &str| (id.to_owned(), RuleSource::Config, c.to_owned());
        assert_eq!(
            in_force(&b),
            vec![
                config("local", "l*"),
                etcd("other", "o*"),
                etcd("shared", "e*")
            ]
        );
        // SIGHUP with a config rule of the same id as an etcd rule: as at
        // start, the config rule wins; the etcd one is left out (logged).
        b.reload_config(vec![spec("local", "l*"), spec("shared", "c*")])
            .unwrap();
        assert_eq!(
            in_force(&b),
            vec![
                config("local", "l*"),
                etcd("other", "o*"),
                config("shared", "c*")
            ]
        );
        // etcd changes meanwhile still apply; the left-out rule stays out.
        b.apply_etcd_upserts(vec![spec("shared", "e2*"), spec("new", "n*")]);
        b.apply_etcd_delete("other");
        assert_eq!(
            in_force(&b),
            vec![
                config("local", "l*"),
                etcd("new", "n*"),
                config("shared", "c*")
            ]
        );
        // The config rule goes: the etcd rule (its latest version) is back.
        b.reload_config(vec![spec("local", "l*")]).unwrap();
        assert_eq!(
            in_force(&b),
            vec![
                config("local", "l*"),
                etcd("new", "n*"),
                etcd("shared", "e2*")
            ]
        );
        // An invalid config is refused and changes nothing.
        let mut bad = spec("bad", "b*");
        bad.limit = 0;
        assert!(b.reload_config(vec![bad]).is_err());
        assert_eq!(
            in_force(&b),
            vec![
                config("local", "l*"),
                etcd("new", "n*"),
                etcd("shared", "e2*")
            ]
        );
    }

    #[test]
    fn rules_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = book(dir.path(), vec![]);
            assert_eq!(b.set(vec![spec("a", "x"), spec("b", "y")]).unwrap(), 2);
            assert_eq!(b.set(vec![spec("a", "x")]).unwrap(), 0);
            b.delete("b").unwrap();
        }
        let b = book(dir.path(), vec![]);
        let ids: Vec<String> = b.list().into_iter().map(|r| r.spec.id).collect();
        assert_eq!(ids, ["a"]);
    }

    #[test]
    fn config_rules_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let b = book(dir.path(), vec![spec("cfg", "x")]);
        assert!(matches!(
            b.set(vec![spec("cfg", "y")]),
            Err(RuleBookError::ReadOnly { .. })
        ));
        assert!(matches!(
            b.delete("cfg"),
            Err(RuleBookError::ReadOnly { .. })
        ));
        assert!(matches!(b.delete("nope"), Err(RuleBookError::NotFound(_))));
    }

    #[test]
    fn rejected_changes_leave_rules_and_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let b = book(dir.path(), vec![]);
        b.set(vec![spec("a", "x")]).unwrap();
        let before = fs::read_to_string(dir.path().join(RULES_FILE)).unwrap();
        // Same patterns as "a": ambiguous.
        assert!(matches!(
            b.set(vec![spec("b", "x")]),
            Err(RuleBookError::Invalid(RuleSetError::Ambiguous(..)))
        ));
        let mut global = spec("g", "z");
        global.scope = Scope::Global;
        assert!(matches!(
            b.set(vec![global]),
            Err(RuleBookError::GlobalNeedsEtcd { .. })
        ));
        assert_eq!(
            fs::read_to_string(dir.path().join(RULES_FILE)).unwrap(),
            before
        );
        assert_eq!(b.list().len(), 1);
    }

    #[test]
    fn a_failed_save_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = book(dir.path(), vec![]);
        b.set(vec![spec("a", "x")]).unwrap();
        // Make the rename target a non-empty directory: the save must fail.
        fs::remove_file(dir.path().join(RULES_FILE)).unwrap();
        fs::create_dir(dir.path().join(RULES_FILE)).unwrap();
        fs::write(dir.path().join(RULES_FILE).join("x"), "x").unwrap();
        let e = b.set(vec![spec("b", "y")]).unwrap_err();
        assert!(matches!(e, RuleBookError::Storage { .. }), "{e}");
        assert_eq!(b.list().len(), 1, "the rule in force is unchanged");
    }

    #[test]
    fn a_second_daemon_cannot_share_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateStore::open(dir.path()).unwrap();
        assert!(matches!(
            StateStore::open(dir.path()),
            Err(RuleBookError::Locked { .. })
        ));
    }

    #[test]
    fn idle_rules_expire() {
        let dir = tempfile::tempdir().unwrap();
        let b = book(dir.path(), vec![]);
        let mut s = spec("tenant", "t1");
        s.expire_idle = Some(Duration::from_secs(5));
        b.set(vec![s, spec("keep", "k")]).unwrap();
        assert!(b.expire_idle(0).unwrap().is_empty());
        let expired = b
            .expire_idle(10 * 1_000_000_000 + b.clock.now_ns())
            .unwrap();
        assert_eq!(expired, ["tenant"]);
        assert_eq!(b.list().len(), 1);
    }
}
