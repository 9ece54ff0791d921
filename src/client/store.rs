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

    /// A file to download into: anonymous (`O_TMPFILE`), so a pull that is
    /// refused or cut off (even by a signal) leaves nothing behind, and in
    /// the store's own file system, so [`Self::install_download`] links it
    /// into place instead of copying it.
    pub fn download_file(&self) -> Result<File, StoreError> {
        std::fs::create_dir_all(&self.root).map_err(|source| StoreError::Io {
            action: "create",
            path: self.root.display().to_string(),
            source,
        })?;
        tempfile::tempfile_in(&self.root).map_err(|source| StoreError::Io {
            action: "create a temp file in",
            path: self.root.display().to_string(),
            source,
        })
    }

    /// Puts a verified download made by [`Self::download_file`] at `dest`
    /// atomically: synced, linked under a temp name beside `dest`, renamed,
    /// the directory synced. Where the file cannot be linked (no
    /// `/proc/self/fd`, or not an `O_TMPFILE`), it is copied as
    /// [`Self::install`] does.
    pub fn install_download(&self, download: &mut File, dest: &Path) -> Result<(), StoreError> {
        let io = |action: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        let dir = dest.parent().unwrap_or(&self.root);
        {
            use std::os::unix::fs::PermissionsExt;
            download.flush().map_err(io("write", dest))?;
            // Packages are not secrets: readable like any installed file.
            download
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io("set the mode of", dest))?;
            download.sync_all().map_err(io("sync", dest))?;
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let file_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".pull-{}-{file_name}", std::process::id()));
        // Left by a pull of a process with this id that was cut off.
        let _ = std::fs::remove_file(&tmp);
        if link_anonymous(download, &tmp).is_err() {
            return self.install(download, dest);
        }
        if let Err(e) = std::fs::rename(&tmp, dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("rename into", dest)(e));
        }
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
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

/// Gives an anonymous file a name: `linkat` of its `/proc/self/fd` entry
/// (what `open(2)` documents for `O_TMPFILE` files; no privilege needed).
#[cfg(target_os = "linux")]
fn link_anonymous(file: &File, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the
    // call; linkat only reads them.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn link_anonymous(_file: &File, _to: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
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

    #[test]
    fn a_download_is_linked_into_place_leaving_nothing_else() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let s = PackageStore::at(tmp.path().join("packages"));
        let dest = s.root().join("r/my-api/1.0.0/my-api-1.0.0-x86_64.niso");
        let mut f = s.download_file().unwrap();
        f.write_all(b"archive bytes").unwrap();
        s.install_download(&mut f, &dest).unwrap();
        drop(f);
        assert_eq!(std::fs::read(&dest).unwrap(), b"archive bytes");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let files: Vec<PathBuf> = walkdir::WalkDir::new(s.root())
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect();
        assert_eq!(files, std::slice::from_ref(&dest));
        // A download dropped before it is installed leaves no file.
        let mut f = s.download_file().unwrap();
        f.write_all(b"refused").unwrap();
        drop(f);
        assert_eq!(
            walkdir::WalkDir::new(s.root())
                .into_iter()
                .filter(|e| e.as_ref().unwrap().file_type().is_file())
                .count(),
            1
        );
    }
}
