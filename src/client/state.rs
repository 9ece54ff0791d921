//! What the client remembers between runs to refuse rollbacks: the highest
//! freshness generation it has verified, per registry and per repository.
//!
//! `$XDG_STATE_HOME/niso/registries/REGISTRY.toml` (`~/.local/state/…`):
//!
//! ```toml
//! fingerprint = "…"          # the pinned key the generations were read with
//!
//! [generations]
//! "freshness" = 12           # the root repository's record
//! "repos/team/freshness" = 4 # an organization's
//! ```
//!
//! Generations only grow here: an update is a read-modify-write under an
//! exclusive `flock`, keeping the larger value, so two pulls at once cannot
//! lower it. A record signed by another key (the registry was re-added with
//! a new key) starts over.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::RegistryName;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot find your home directory to keep the niso state in; set XDG_STATE_HOME")]
    NoStateDir,
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid niso state file: {reason}; remove it to start over (this forgets the freshness generations seen)")]
    Parse { path: String, reason: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct StateFile {
    #[serde(default)]
    fingerprint: String,
    #[serde(default)]
    generations: BTreeMap<String, u64>,
}

/// The state of one registry.
pub struct RegistryState {
    path: PathBuf,
    fingerprint: String,
}

impl RegistryState {
    /// The state of `registry`, whose pinned key has `fingerprint`.
    pub fn open(registry: &RegistryName, fingerprint: &str) -> Result<Self, StateError> {
        let dir = dirs::state_dir()
            .ok_or(StateError::NoStateDir)?
            .join("niso")
            .join("registries");
        Ok(Self::at(
            dir.join(format!("{registry}.toml")),
            fingerprint.to_string(),
        ))
    }

    /// The state of a registry read by URL alone (not configured), whose
    /// key has `fingerprint`: kept by the URL's digest, so a replayed older
    /// tree at that URL is a rollback there too.
    pub fn for_url(url: &str, fingerprint: &str) -> Result<Self, StateError> {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(url.trim_end_matches('/').as_bytes());
        let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let dir = dirs::state_dir()
            .ok_or(StateError::NoStateDir)?
            .join("niso")
            .join("urls");
        Ok(Self::at(
            dir.join(format!("{name}.toml")),
            fingerprint.to_string(),
        ))
    }

    pub fn at(path: PathBuf, fingerprint: String) -> Self {
        Self { path, fingerprint }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<StateFile, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::default()),
            Err(source) => {
                return Err(StateError::Io {
                    action: "read",
                    path: self.path.display().to_string(),
                    source,
                })
            }
        };
        let file: StateFile = toml::from_str(&text).map_err(|e| StateError::Parse {
            path: self.path.display().to_string(),
            reason: e.message().to_string(),
        })?;
        Ok(if file.fingerprint == self.fingerprint {
            file
        } else {
            StateFile::default()
        })
    }

    /// The highest generation verified for the record at `freshness_path`.
    pub fn seen(&self, freshness_path: &str) -> Result<Option<u64>, StateError> {
        Ok(self.read()?.generations.get(freshness_path).copied())
    }

    /// Records that `generation` was verified for `freshness_path`; a lower
    /// value than the one kept changes nothing.
    pub fn record(&self, freshness_path: &str, generation: u64) -> Result<(), StateError> {
        let io = |action: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| StateError::Io {
                action,
                path,
                source,
            }
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        flock_exclusive(&lock).map_err(io("lock", &lock_path))?;
        let mut file = self.read()?;
        let kept = file.generations.get(freshness_path).copied().unwrap_or(0);
        if generation <= kept && file.fingerprint == self.fingerprint {
            return Ok(());
        }
        file.fingerprint.clone_from(&self.fingerprint);
        file.generations
            .insert(freshness_path.to_string(), generation.max(kept));
        let text = toml::to_string(&file).map_err(|e| StateError::Parse {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".state-")
            .tempfile_in(dir)
            .map_err(io("create a temp file in", dir))?;
        tmp.write_all(text.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io("write", tmp.path()))?;
        tmp.persist(&self.path)
            .map_err(|e| e.error)
            .map_err(io("replace", &self.path))?;
        // The lock is released when `lock` is dropped (closed).
        Ok(())
    }

    /// Forgets everything (the registry was removed or re-added).
    pub fn forget(&self) -> Result<(), StateError> {
        for path in [self.path.clone(), self.path.with_extension("lock")] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        action: "remove",
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

fn flock_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_only_grow_and_a_new_key_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        let s = RegistryState::at(path.clone(), "k1".into());
        assert_eq!(s.seen("freshness").unwrap(), None);
        s.record("freshness", 5).unwrap();
        s.record("freshness", 3).unwrap();
        s.record("repos/team/freshness", 2).unwrap();
        assert_eq!(s.seen("freshness").unwrap(), Some(5));
        assert_eq!(s.seen("repos/team/freshness").unwrap(), Some(2));
        let other = RegistryState::at(path, "k2".into());
        assert_eq!(other.seen("freshness").unwrap(), None);
        other.record("freshness", 1).unwrap();
        assert_eq!(other.seen("freshness").unwrap(), Some(1));
        assert_eq!(s.seen("freshness").unwrap(), None);
    }
}
