//! The client's configuration: the registries a user has added, each with
//! its URL, its pinned repository key and repository name, and optionally
//! an API key.
//!
//! One TOML file, `$XDG_CONFIG_HOME/niso/config.toml` (`~/.config/niso/…`),
//! mode 0600 because it holds API keys; written atomically (temp file in the
//! same directory, fsync, rename), so a crash leaves the old file or the new
//! one. Its directory is made 0700.
//!
//! ```toml
//! default = "private"
//!
//! [registries.private]
//! url = "https://registry.example.com"
//! repository = "acme"                  # the name every index must carry
//! public_key = """                     # pinned when the registry was added
//! -----BEGIN PUBLIC KEY-----
//! …
//! -----END PUBLIC KEY-----
//! """
//! key = "niso_k1_…"                    # optional; NISO_KEY overrides it
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ident::RepoName;
use crate::index::{KeyError, PublicKey};

pub const CONFIG_FILE: &str = "config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot find your home directory to keep the niso config in; set XDG_CONFIG_HOME")]
    NoConfigDir,
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid niso config: {reason}; fix or remove it")]
    Parse { path: String, reason: String },
    #[error("invalid registry name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    Name(String),
    #[error("the pinned key of registry {registry} in {path} is unusable: {source}; add the registry again with `niso registry add`")]
    PinnedKey {
        registry: String,
        path: String,
        source: KeyError,
    },
    #[error("{url:?} is not an http(s) URL (e.g. https://registry.example.com)")]
    Url { url: String },
    #[error("no registry is configured: add one with `niso registry add NAME URL` (or `niso login URL --key KEY`)")]
    NoRegistry,
    #[error("unknown registry {chosen:?} ({known}); add it with `niso registry add NAME URL`")]
    Unknown { chosen: String, known: String },
    #[error("several registries are configured ({known}) and none is the default: pass --registry NAME, or make one the default with `niso registry add NAME URL --default`")]
    NoDefault { known: String },
}

/// The local name of a configured registry (`private`, `niso.dev`). Used as
/// a path segment of the package store and the state directory, hence the
/// strict alphabet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegistryName(String);

impl RegistryName {
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(ConfigError::Name(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegistryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RegistryName {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for RegistryName {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<RegistryName> for String {
    fn from(n: RegistryName) -> Self {
        n.0
    }
}

/// A registry's base URL, normalised without a trailing slash.
pub fn normalize_url(url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(trimmed.to_string())
        }
        _ => Err(ConfigError::Url {
            url: url.to_string(),
        }),
    }
}

/// One configured registry, as stored.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub url: String,
    /// The repository name every index of the root repository must carry.
    pub repository: String,
    /// The pinned repository key, PEM (SPKI).
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl fmt::Debug for RegistryEntry {
    // Never print the API key, not even in a debug log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryEntry")
            .field("url", &self.url)
            .field("repository", &self.repository)
            .field("key", &self.key.as_ref().map(|_| "niso_k1_…"))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<RegistryName>,
    #[serde(default)]
    pub registries: BTreeMap<RegistryName, RegistryEntry>,
}

/// A registry chosen for a command, with its pinned key parsed.
#[derive(Debug, Clone)]
pub struct Registry {
    pub name: RegistryName,
    pub url: String,
    pub repository: RepoName,
    pub public_key: PublicKey,
    /// The API key: `NISO_KEY` if set, else the stored one.
    pub key: Option<String>,
}

/// Where the config file lives: `$XDG_CONFIG_HOME/niso/config.toml`.
pub fn config_path() -> Result<PathBuf, ConfigError> {
    Ok(dirs::config_dir()
        .ok_or(ConfigError::NoConfigDir)?
        .join("niso")
        .join(CONFIG_FILE))
}

impl Config {
    /// Reads the config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Io {
                    action: "read",
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        warn_if_readable_by_others(path);
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.message().to_string(),
        })?;
        if let Some(d) = &config.default {
            if !config.registries.contains_key(d) {
                return Err(ConfigError::Parse {
                    path: path.display().to_string(),
                    reason: format!("the default registry {d} is not configured"),
                });
            }
        }
        Ok(config)
    }

    /// Writes the config atomically, readable by the user alone.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let io = |action: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| ConfigError::Io {
                action,
                path,
                source,
            }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(io("create", dir))?;
        // toml serializes these plain structs infallibly; map the error anyway.
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // NamedTempFile is created 0600, so the secret is never readable by
        // others, not even before the rename.
        let mut tmp = tempfile::Builder::new()
            .prefix(".config-")
            .tempfile_in(dir)
            .map_err(io("create a temp file in", dir))?;
        tmp.write_all(text.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io("write", tmp.path()))?;
        tmp.persist(path)
            .map_err(|e| e.error)
            .map_err(io("replace", path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The registry a command uses: `chosen` (a name or the URL of a
    /// configured registry; from `--registry` or `NISO_REGISTRY`), else the
    /// default, else the only one.
    pub fn select(&self, chosen: Option<&str>, path: &Path) -> Result<Registry, ConfigError> {
        let name = match chosen {
            Some(c) => self.find(c).ok_or_else(|| ConfigError::Unknown {
                chosen: c.to_string(),
                known: self.known(),
            })?,
            None => match &self.default {
                Some(d) => d.clone(),
                None => {
                    let mut names = self.registries.keys();
                    match (names.next(), names.next()) {
                        (Some(only), None) => only.clone(),
                        (None, _) => return Err(ConfigError::NoRegistry),
                        (Some(_), Some(_)) => {
                            return Err(ConfigError::NoDefault {
                                known: self.known(),
                            })
                        }
                    }
                }
            },
        };
        self.registry(&name, path)
    }

    /// Finds a registry by name, or by URL.
    pub fn find(&self, name_or_url: &str) -> Option<RegistryName> {
        if let Ok(n) = RegistryName::new(name_or_url) {
            if self.registries.contains_key(&n) {
                return Some(n);
            }
        }
        let url = normalize_url(name_or_url).ok()?;
        self.registries
            .iter()
            .find(|(_, e)| e.url == url)
            .map(|(n, _)| n.clone())
    }

    fn known(&self) -> String {
        if self.registries.is_empty() {
            "none is configured".into()
        } else {
            let names: Vec<&str> = self.registries.keys().map(RegistryName::as_str).collect();
            format!("configured: {}", names.join(", "))
        }
    }

    fn registry(&self, name: &RegistryName, path: &Path) -> Result<Registry, ConfigError> {
        let e = self
            .registries
            .get(name)
            .ok_or_else(|| ConfigError::Unknown {
                chosen: name.to_string(),
                known: self.known(),
            })?;
        let public_key = PublicKey::from_pem(
            e.public_key.as_bytes(),
            &format!("the pinned key of {name}"),
        )
        .map_err(|source| ConfigError::PinnedKey {
            registry: name.to_string(),
            path: path.display().to_string(),
            source,
        })?;
        let repository = RepoName::new(&e.repository).map_err(|err| ConfigError::Parse {
            path: path.display().to_string(),
            reason: format!("registry {name}: {err}"),
        })?;
        let key = match std::env::var(KEY_ENV) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => e.key.clone(),
        };
        Ok(Registry {
            name: name.clone(),
            url: e.url.clone(),
            repository,
            public_key,
            key,
        })
    }
}

/// The API key for CI, overriding a stored one.
pub const KEY_ENV: &str = "NISO_KEY";
/// The registry to use (a configured name or URL), like `--registry`.
pub const REGISTRY_ENV: &str = "NISO_REGISTRY";

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "niso: warning: {} holds API keys but others may read it; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_path_safe() {
        for ok in ["private", "niso.dev", "a", "127.0.0.1-5000", "my_reg"] {
            assert!(RegistryName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "-x",
            ".hidden",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(RegistryName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_normalised_and_checked() {
        assert_eq!(
            normalize_url("https://r.example.com/").unwrap(),
            "https://r.example.com"
        );
        assert_eq!(
            normalize_url("http://127.0.0.1:5000").unwrap(),
            "http://127.0.0.1:5000"
        );
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("https://").is_err());
        assert!(normalize_url("registry.example.com").is_err());
    }

    #[test]
    fn saved_config_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("niso").join(CONFIG_FILE);
        let mut c = Config::default();
        let name = RegistryName::new("private").unwrap();
        c.registries.insert(
            name.clone(),
            RegistryEntry {
                url: "https://r.example.com".into(),
                repository: "acme".into(),
                public_key: "PEM".into(),
                key: Some("niso_k1_secret".into()),
            },
        );
        c.default = Some(name);
        c.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Config::load(&path).unwrap(), c);
        // Debug never shows the key.
        assert!(!format!("{c:?}").contains("secret"));
    }
}
