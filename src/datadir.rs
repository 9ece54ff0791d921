//! A registry's data directory: what `niso registry init` creates and
//! `build`, `publish` and `serve` use.
//!
//! ```text
//! D/niso-registry.toml   settings: the repository name
//! D/keys/repository.pem  the RSA signing key (0600), outside the served tree
//! D/keys.sqlite          API keys, hashed (made by `serve` or `create-key`)
//! D/staging/             uploads being received, never served
//! D/public/              the served tree (unless the config names another
//!                        store, such as s3://BUCKET/PREFIX)
//! ```
//!
//! Several processes may write one tree at once (`build` beside `serve`,
//! two `serve` on one bucket): the publisher's conditional writes keep them
//! from losing each other's changes, so there is no lock to take.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ident::RepoName;
use crate::index::{KeyError, RepoKey, Signer};
use crate::publish::{Layout, Options, PublishError, Publisher};
use crate::store::{LocalStore, Store};

pub const CONFIG_FILE: &str = "niso-registry.toml";
pub const KEY_FILE: &str = "keys/repository.pem";
pub const PUBLIC_DIR: &str = "public";
pub const STAGING_DIR: &str = "staging";
pub const KEYS_FILE: &str = "keys.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{path} is not a niso registry data directory (no {CONFIG_FILE}); create one with `niso registry init --data-dir {path} --name NAME`")]
    NotInitialised { path: String },
    #[error("{path} already holds a registry ({CONFIG_FILE} exists); refusing to overwrite it")]
    AlreadyInitialised { path: String },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Keys(#[from] crate::auth::KeyStoreError),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError {
    let path = path.display().to_string();
    move |source| DataDirError::Io {
        action,
        path,
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The repository name written into every index.
    pub name: String,
    /// Where the tree lives: `s3://BUCKET/PREFIX`, or a directory (absent:
    /// `public/` in the data directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// An opened data directory.
pub struct DataDir {
    root: PathBuf,
    config: Config,
    repository: RepoName,
}

impl DataDir {
    /// Creates a data directory with a new key (or `import_key`'s), and an
    /// empty, signed repository in its store (`public/`, or `store`).
    pub async fn init(
        root: &Path,
        name: &RepoName,
        import_key: Option<&Path>,
        store: Option<&str>,
    ) -> Result<Self, DataDirError> {
        let config_path = root.join(CONFIG_FILE);
        if config_path.exists() {
            return Err(DataDirError::AlreadyInitialised {
                path: root.display().to_string(),
            });
        }
        let key = match import_key {
            Some(p) => RepoKey::from_file(p)?,
            None => RepoKey::generate()?,
        };
        let pem = key.to_pkcs8_pem()?;
        let config = Config {
            name: name.to_string(),
            store: store.map(str::to_string),
        };
        let text = toml::to_string(&config).map_err(|e| DataDirError::Config {
            path: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let this = Self {
            root: root.to_path_buf(),
            config,
            repository: name.clone(),
        };
        // The store is reached (a bucket: the settings, the credentials)
        // before anything is written, and the config is written last: until
        // it exists the directory is no registry, and init can run again.
        let publisher = this
            .publisher(Arc::new(key), Layout::root(), Options::default(), None)
            .await
            .map_err(|e| match store {
                // Say which store: the data directory is named already.
                Some(url) => DataDirError::Config {
                    path: url.to_string(),
                    reason: e.to_string(),
                },
                None => e,
            })?;
        for dir in ["keys", PUBLIC_DIR, STAGING_DIR] {
            let d = root.join(dir);
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        write_private(&root.join(KEY_FILE), pem.as_bytes())?;
        publisher.refresh().await?;
        fs::write(&config_path, text).map_err(io_err("write", &config_path))?;
        Ok(this)
    }

    pub fn open(root: &Path) -> Result<Self, DataDirError> {
        let config_path = root.join(CONFIG_FILE);
        let text = match fs::read_to_string(&config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataDirError::NotInitialised {
                    path: root.display().to_string(),
                })
            }
            Err(e) => return Err(io_err("read", &config_path)(e)),
        };
        let config: Config = toml::from_str(&text).map_err(|e| DataDirError::Config {
            path: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let repository = RepoName::new(&config.name).map_err(|e| DataDirError::Config {
            path: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            config,
            repository,
        })
    }

    pub fn is_data_dir(root: &Path) -> bool {
        root.join(CONFIG_FILE).is_file()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn repository(&self) -> &RepoName {
        &self.repository
    }

    pub fn public_dir(&self) -> PathBuf {
        self.root.join(PUBLIC_DIR)
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING_DIR)
    }

    /// Removes the files a process that no longer runs left in `staging/`
    /// (a server killed while it received or published uploads: an
    /// upload's staged file is removed by the process that made it, which a
    /// SIGKILL never lets happen). Files of running processes, this one's
    /// and those of a `publish` beside it, stay. Returns how many went.
    pub fn clean_staging(&self) -> Result<usize, DataDirError> {
        let dir = self.staging_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("read", &dir)(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_err("read", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // `KIND-PID-RANDOM`; another naming is an older niso's, whose
            // writer did not name itself: no writer of this version owns it.
            let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let stale = match pid {
                Some(p) => p != std::process::id() && !crate::store::is_alive(p),
                None => true,
            };
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if stale && is_file {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn key(&self) -> Result<RepoKey, DataDirError> {
        Ok(RepoKey::from_file(&self.root.join(KEY_FILE))?)
    }

    /// The API key database (created if missing). It needs no lock: SQLite
    /// serialises writers, so `create-key --data-dir` works beside a running
    /// server, which sees a new key on its next request. That is the way
    /// back in when no admin key is left:
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use niso::auth::Scopes;
    /// let dd = niso::datadir::DataDir::open("/var/lib/niso-registry".as_ref())?;
    /// let new = dd.key_store()?.create("rescue", &Scopes::parse(&["admin"])?, niso::publish::unix_now(), None)?;
    /// println!("{}", new.key.expose()); // shown once
    /// # Ok(()) }
    /// ```
    pub fn key_store(&self) -> Result<crate::auth::KeyStore, DataDirError> {
        Ok(crate::auth::KeyStore::open(&self.root.join(KEYS_FILE))?)
    }

    /// The publisher keys of the key store, as the tree lists them; `None`
    /// when the data directory has no key store yet (never served).
    pub fn publisher_keys(
        &self,
    ) -> Result<Option<Vec<crate::index::pb::PublisherKey>>, DataDirError> {
        if !self.root.join(KEYS_FILE).is_file() {
            return Ok(None);
        }
        let records = self.key_store()?.publisher_keys()?;
        Ok(Some(records.iter().map(|r| r.to_index()).collect()))
    }

    /// The store the tree lives in: `url` if given (`--store`), else the
    /// config's, else `public/`.
    pub fn store(&self, url: Option<&str>) -> Result<Arc<dyn Store>, DataDirError> {
        match url.or(self.config.store.as_deref()) {
            Some(u) => Ok(crate::store::open(u)?),
            None => Ok(Arc::new(LocalStore::new(self.public_dir()))),
        }
    }

    /// A publisher for the root repository (`Layout::root()`) or an
    /// organization's, on the store `store_url` (or the configured one).
    pub async fn publisher(
        &self,
        signer: Arc<dyn Signer>,
        layout: Layout,
        options: Options,
        store_url: Option<&str>,
    ) -> Result<Publisher, DataDirError> {
        let repository = match layout.prefix().strip_prefix("repos/") {
            Some(org) => RepoName::new(org).map_err(PublishError::from)?,
            None => self.repository.clone(),
        };
        Ok(Publisher::open(self.store(store_url)?, signer, repository, layout, options).await?)
    }
}

/// The start of the name of a file staged by this process: `KIND-PID-`, so
/// [`DataDir::clean_staging`] can tell whether its writer still runs.
pub fn staging_prefix(kind: &str) -> String {
    format!("{kind}-{}-", std::process::id())
}

/// Organization repositories present in a tree (`repos/*`).
pub async fn organizations(store: &dyn Store) -> Result<Vec<RepoName>, DataDirError> {
    let mut out = std::collections::BTreeSet::new();
    for p in store.list(crate::index::layout::REPOS_DIR).await? {
        if let Some(org) = p.as_str().split('/').nth(1) {
            out.insert(RepoName::new(org).map_err(PublishError::from)?);
        }
    }
    Ok(out.into_iter().collect())
}

/// Writes a secret file readable only by its owner, atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(parent)
        .map_err(io_err("create temp file in", parent))?;
    // tempfile creates files 0600 already; the explicit mode documents it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("set permissions on", path))?;
    }
    tmp.write_all(bytes).map_err(io_err("write", path))?;
    tmp.as_file().sync_all().map_err(io_err("sync", path))?;
    tmp.persist(path)
        .map_err(|e| io_err("write", path)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_of_processes_that_are_gone_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CONFIG_FILE), "name = \"acme\"\n").unwrap();
        let dd = DataDir::open(dir.path()).unwrap();
        assert_eq!(dd.clean_staging().unwrap(), 0, "no staging directory yet");
        let staging = dd.staging_dir();
        fs::create_dir_all(&staging).unwrap();
        // Above any PID Linux hands out: a process that is gone.
        let dead = staging.join("upload-4194304000-AbC123");
        let mine = staging.join(format!("{}XyZ789", staging_prefix("publish")));
        let older_niso = staging.join("upload-Qw3rTy");
        for f in [&dead, &mine, &older_niso] {
            fs::write(f, b"x").unwrap();
        }
        assert_eq!(dd.clean_staging().unwrap(), 2);
        assert!(!dead.exists() && !older_niso.exists() && mine.exists());
    }
}
