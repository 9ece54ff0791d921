//! The local package store `pull` writes into.
//!
//! ```text
//! $XDG_DATA_HOME/niso/packages/REGISTRY/NAME/VERSION/NAME-VERSION-ARCH.niso
//! $XDG_DATA_HOME/niso/packages/REGISTRY/ORG/NAME/VERSION/…   (organization packages)
//! ```
//!
//! (`~/.local/share/niso/packages/…` by default.) A version starts with a
//! digit and a name with a letter, so `REGISTRY/ORG/NAME` never meets
//! `REGISTRY/NAME/VERSION`. Hex tarballs keep their tree name
//! (`NAME-VERSION.tar`).
//!
//! A pull downloads into an anonymous temp file outside the store and
//! checks it there; only a fully verified archive is copied into a temp file
//! beside its destination, synced, and renamed into place. A refused pull
//! leaves the store exactly as it was.

use std::fs::File;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use super::config::RegistryName;
use crate::ident::{PackageName, RepoName};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot find your home directory to keep packages in; set XDG_DATA_HOME")]
    NoDataDir,
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("refusing to store {0:?}: not a plain file name")]
    FileName(String),
}

pub struct PackageStore {
    root: PathBuf,
}

impl PackageStore {
    /// `$XDG_DATA_HOME/niso/packages`.
    pub fn open_default() -> Result<Self, StoreError> {
        Ok(Self::at(
            dirs::data_dir()
                .ok_or(StoreError::NoDataDir)?
                .join("niso")
                .join("packages"),
        ))
    }

    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an artifact is kept. Every segment is a validated name; the
    /// file name comes from the signed index and is checked here once more.
    pub fn destination(
        &self,
        registry: &RegistryName,
        org: Option<&RepoName>,
        name: &PackageName,
        version: &str,
        file_name: &str,
    ) -> Result<PathBuf, StoreError> {
        let plain = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
        };
        if !plain(file_name) || !plain(version) {
            return Err(StoreError::FileName(format!("{version}/{file_name}")));
        }
        let mut p = self.root.join(registry.as_str());
        if let Some(o) = org {
            p.push(o.as_str());
        }
        p.push(name.as_str());
        p.push(version);
        p.push(file_name);
        Ok(p)
    }

    /// Copies the verified `download` to `dest` atomically: a temp file in
    /// the same directory, synced, renamed, the directory synced.
    pub fn install(&self, download: &mut File, dest: &Path) -> Result<(), StoreError> {
        let io = |action: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        let dir = dest.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".pull-")
            .tempfile_in(dir)
            .map_err(io("create a temp file in", dir))?;
        download.rewind().map_err(io("read", tmp.path()))?;
        std::io::copy(download, tmp.as_file_mut()).map_err(io("write", tmp.path()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let f = tmp.as_file_mut();
            f.flush().map_err(io("write", dest))?;
            // Packages are not secrets: readable like any installed file.
            f.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io("set the mode of", dest))?;
            f.sync_all().map_err(io("sync", dest))?;
        }
        tmp.persist(dest)
            .map_err(|e| e.error)
            .map_err(io("rename into", dest))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_follow_the_documented_layout() {
        let s = PackageStore::at(PathBuf::from("/d"));
        let reg = RegistryName::new("private").unwrap();
        let name = PackageName::new("my-api").unwrap();
        assert_eq!(
            s.destination(&reg, None, &name, "1.0.0", "my-api-1.0.0-x86_64.niso")
                .unwrap(),
            PathBuf::from("/d/private/my-api/1.0.0/my-api-1.0.0-x86_64.niso")
        );
        let org = RepoName::new("team").unwrap();
        assert_eq!(
            s.destination(&reg, Some(&org), &name, "1.0.0", "f.niso")
                .unwrap(),
            PathBuf::from("/d/private/team/my-api/1.0.0/f.niso")
        );
        for bad in ["", "..", "a/b"] {
            assert!(s.destination(&reg, None, &name, "1.0.0", bad).is_err());
        }
    }
}
