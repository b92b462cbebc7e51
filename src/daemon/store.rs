//! The state directory: one TOML file of the rules set at run time
//! (standalone), the rules last seen in etcd with their revision (etcd mode:
//! what a restart applies while etcd is unreachable), each replaced
//! atomically (temp file, fsync, rename, fsync dir), and a lock file held
//! for the daemon's life so two daemons never share it.
//! Blocking file I/O: call from the blocking pool in async code.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use nix::fcntl::{Flock, FlockArg};

use super::rulebook::RuleBookError;
use crate::rule::RuleSpec;
use crate::rule::file::{parse_rules, render_rules};

/// File in the state directory holding the run-time rules.
pub const RULES_FILE: &str = "rules.toml";
/// File in the state directory caching the rules last listed from etcd.
pub const ETCD_CACHE_FILE: &str = "etcd-rules.toml";
const REVISION_LINE: &str = "# etcd revision ";
const LOCK_FILE: &str = "lock";

/// Mode of the state directory and of its files, whatever the umask: rules
/// are readable by the daemon's group (operators), nobody else.
const DIR_MODE: u32 = 0o750;
const FILE_MODE: u32 = 0o640;

/// Persists run-time rules in one TOML file, replaced atomically.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    /// Held for the daemon's lifetime so two daemons never share a state dir.
    _lock: Flock<File>,
    /// What we last wrote to each file, to notice edits made by hand.
    written: Mutex<std::collections::HashMap<String, String>>,
}

impl StateStore {
    /// Creates the directory if needed and takes its lock.
    ///
    /// # Errors
    /// The directory cannot be created or is locked by another daemon.
    pub fn open(dir: &Path) -> Result<StateStore, RuleBookError> {
        let storage = |source| RuleBookError::Storage {
            path: dir.to_owned(),
            source,
        };
        let unusable = |problem: String| RuleBookError::StateUnusable {
            path: dir.to_owned(),
            problem,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(unusable(
                "the state directory is not a directory; point --state-dir (state_dir) at a \
                 directory, or remove this file and rld creates the directory"
                    .into(),
            ));
        }
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(storage)?;
            // The umask may have narrowed it; never widened it.
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(storage)?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| {
                unusable(format!(
                    "cannot open the lock file {LOCK_FILE} in the state directory: {e}; rld must \
                     be able to write there (fix its owner or permissions)"
                ))
            })?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
            .map_err(|_| RuleBookError::Locked { path: dir.into() })?;
        Ok(StateStore {
            dir: dir.to_owned(),
            _lock: lock,
            written: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The run-time rules in `dir` (none if no file), read without taking
    /// the directory's lock: for `rld --check-config` next to a running
    /// daemon.
    ///
    /// # Errors
    /// An unreadable or invalid file, named.
    pub fn peek(dir: &Path) -> Result<Vec<RuleSpec>, RuleBookError> {
        let path = dir.join(RULES_FILE);
        let Some(text) = read_if_present(&path)? else {
            return Ok(Vec::new());
        };
        parse_rules(&text).map_err(|e| RuleBookError::CorruptState {
            path,
            message: e.to_string(),
        })
    }

    /// The persisted rules (none if the file does not exist yet).
    ///
    /// # Errors
    /// An unreadable or invalid file.
    pub fn load(&self) -> Result<Vec<RuleSpec>, RuleBookError> {
        StateStore::peek(&self.dir)
    }

    /// Replaces the file: write a temporary file, fsync, rename over, fsync the
    /// directory. A crash at any point leaves either the old or the new file.
    ///
    /// # Errors
    /// Any I/O failure (full disk included); the old file is then intact.
    pub fn save(&self, rules: &[RuleSpec]) -> Result<(), RuleBookError> {
        let text = format!(
            "# Rules set at run time with `rlctl rules set`. Written by rld; edits are read at start.\n{}",
            render_rules(rules)
        );
        self.replace(RULES_FILE, &text)
    }

    /// Path of the etcd rule cache.
    pub fn etcd_cache_path(&self) -> PathBuf {
        self.dir.join(ETCD_CACHE_FILE)
    }

    /// Caches the rules listed from etcd at `revision`.
    ///
    /// # Errors
    /// Any I/O failure; the previous cache is then intact.
    pub fn save_etcd_cache(&self, rules: &[RuleSpec], revision: i64) -> Result<(), RuleBookError> {
        let text = format!(
            "{REVISION_LINE}{revision}\n# The rules last listed from etcd, applied at start while etcd is unreachable. Written by rld; do not edit.\n{}",
            render_rules(rules)
        );
        self.replace(ETCD_CACHE_FILE, &text)
    }

    /// The cached etcd rules and their revision; `None` if there is no cache.
    ///
    /// # Errors
    /// An unreadable or invalid cache file.
    pub fn load_etcd_cache(&self) -> Result<Option<(Vec<RuleSpec>, i64)>, RuleBookError> {
        let path = self.etcd_cache_path();
        let Some(text) = read_if_present(&path)? else {
            return Ok(None);
        };
        let corrupt = |message: String| RuleBookError::CorruptState {
            path: path.clone(),
            message,
        };
        let revision = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix(REVISION_LINE))
            .and_then(|r| r.trim().parse::<i64>().ok())
            .ok_or_else(|| corrupt(format!("the first line is not `{REVISION_LINE}N`")))?;
        let rules = parse_rules(&text).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some((rules, revision)))
    }

    /// Replaces `name` atomically (mode 0640), keeping its previous content
    /// as `name.prev`; warns when the file was edited by hand since we wrote
    /// it (the edit is then what `.prev` keeps).
    fn replace(&self, name: &str, text: &str) -> Result<(), RuleBookError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let prev = self.dir.join(format!("{name}.prev"));
        let storage = |source| RuleBookError::Storage {
            path: path.clone(),
            source,
        };
        let current = fs::read_to_string(&path).ok();
        if let (Some(current), Some(ours)) = (&current, self.written.lock().get(name))
            && current != ours
        {
            tracing::warn!(
                file = %path.display(),
                kept = %prev.display(),
                "the file was changed by hand while rld ran; rld rewrites it, the changed version is kept"
            );
        }
        let write = |at: &Path, content: &str| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(FILE_MODE)
                .open(at)?;
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
            f.write_all(content.as_bytes())?;
            f.sync_all()
        };
        let result = (|| {
            if let Some(current) = &current {
                let prev_tmp = self.dir.join(format!(".{name}.prev.tmp"));
                write(&prev_tmp, current)?;
                fs::rename(&prev_tmp, &prev)?;
            }
            write(&tmp, text)?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        } else {
            self.written.lock().insert(name.to_owned(), text.to_owned());
        }
        result.map_err(storage)
    }
}

/// A file's text, or `None` if it does not exist.
fn read_if_present(path: &Path) -> Result<Option<String>, RuleBookError> {
    let unusable = |problem: String| RuleBookError::StateUnusable {
        path: path.to_owned(),
        problem,
    };
    if path.is_dir() {
        return Err(unusable(
            "this state file is a directory; remove it (rld writes the file itself)".into(),
        ));
    }
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(unusable(
            "this state file is not UTF-8 text; restore it from its .prev copy or remove it".into(),
        )),
        Err(e) => Err(unusable(format!(
            "cannot read this state file: {e}; rld must be able to read it (fix its owner or \
             permissions)"
        ))),
    }
}
