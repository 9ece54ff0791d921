//! The tree as a local directory.
//!
//! A put writes a temp file beside its target (so the rename never crosses
//! file systems), syncs it, renames it into place and syncs the directory, so
//! the new bytes and their name both survive a crash. Temp files are named
//! `.tmp-PID-N-NAME`: never listed, never served (every component of a
//! [`TreePath`] starts with something other than a dot), and removed by
//! [`Store::clean_leftovers`] once their process is gone.
//!
//! Versions are `INODE-MTIME_NS-SIZE`: a rename gives a path a new inode, so
//! every replacement is a new version. A conditional put ([`PutMode::Update`])
//! compares the path's current version with the expected one and renames
//! under an exclusive `flock` of the tree's root directory, which every
//! process that writes the tree takes for the same few microseconds; that is
//! what lets `build` run beside `serve`.
//!
//! Every file this process writes gets a modification time later than any
//! it wrote before (a nanosecond later when the clock has not moved): a file
//! rewritten at the same size never keeps its time stamp, so a mirror that
//! compares sizes and times (`rsync --modify-window=-1`) always sees it
//! change.
//!
//! A copy is a hard link: the bytes of an immutable archive under a second
//! path cost nothing (falling back to a real copy where links fail). Neither
//! path is ever written in place, so the two can never differ.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;

use super::{
    Attributes, Body, ByteStream, Object, ObjectMeta, ObjectVersion, PutMode, Store, StoreError,
    TreePath,
};

const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Serialises this process's conditional puts (a `flock` excludes other
    /// processes, not other threads sharing the open file description).
    local: Mutex<()>,
    /// Counter for temp file names.
    temp: AtomicU64,
    /// The modification time (ns since the epoch) last given to a file.
    stamp: AtomicU64,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                root: root.into(),
                local: Mutex::new(()),
                temp: AtomicU64::new(0),
                stamp: AtomicU64::new(0),
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Runs blocking file system work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Io {
                action: "run",
                path: "a file system task".into(),
                source: io::Error::other(e),
            })?
    }
}

/// The version of the file `meta` describes.
fn version_of(meta: &fs::Metadata) -> ObjectVersion {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ObjectVersion(format!(
            "{:x}-{:x}{:09x}-{:x}",
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.size()
        ))
    }
    #[cfg(not(unix))]
    {
        let m = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        ObjectVersion(format!("{m:x}-{:x}", meta.len()))
    }
}

fn meta_of(meta: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        size: meta.len(),
        version: version_of(meta),
        last_modified: meta.modified().ok(),
        // A file keeps no headers: readers derive them from the path.
        attributes: None,
    }
}

/// `Ok(None)` for a missing path (or a directory: not an object).
fn stat(full: &Path) -> Result<Option<fs::Metadata>, StoreError> {
    match fs::metadata(full) {
        Ok(m) if m.is_file() => Ok(Some(m)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // `a/b` where `a` is a file.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(io_err("read", full)(e)),
    }
}

fn open_file(full: &Path) -> Result<Option<(File, fs::Metadata)>, StoreError> {
    let file = match File::open(full) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
        Err(e) => return Err(io_err("open", full)(e)),
    };
    // Described by the descriptor: the path may be replaced meanwhile.
    let meta = file.metadata().map_err(io_err("read", full))?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some((file, meta)))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// Whether process `pid` still runs (owners of leftovers are judged by it).
pub(crate) fn is_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // Signal 0 checks existence; EPERM means it exists as someone else.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Holds the tree's lock file exclusively while alive.
struct TreeLock {
    file: File,
}

impl Drop for TreeLock {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

impl Inner {
    fn full(&self, path: &TreePath) -> PathBuf {
        self.root.join(path.as_str())
    }

    /// Locks the root directory itself: no lock file in the tree.
    fn lock_tree(&self) -> Result<TreeLock, StoreError> {
        let path = self.root.clone();
        let file = File::open(&path).map_err(io_err("open", &path))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            loop {
                let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
                if r == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(io_err("lock", &path)(e));
                }
            }
        }
        Ok(TreeLock { file })
    }

    /// A modification time later than any this process gave before, and
    /// than `old` (the time stamp of the file about to be replaced).
    fn next_stamp(&self, old: Option<&fs::Metadata>) -> SystemTime {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let old = old
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64 + 1);
        let mut last = self.stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(old).max(last + 1);
            match self
                .stamp
                .compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return UNIX_EPOCH + Duration::from_nanos(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// Makes the parent directories of `full`, syncing each new one's
    /// parent so the new entries survive a crash.
    fn make_parents(&self, full: &Path) -> Result<PathBuf, StoreError> {
        let parent = full
            .parent()
            .ok_or_else(|| io_err("write", full)(io::Error::other("no parent directory")))?
            .to_path_buf();
        if parent.is_dir() {
            return Ok(parent);
        }
        let mut missing = Vec::new();
        let mut d = parent.as_path();
        while !d.is_dir() {
            missing.push(d.to_path_buf());
            match d.parent() {
                Some(p) if p.starts_with(&self.root) => d = p,
                _ => break,
            }
        }
        fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
        for dir in missing.iter().rev() {
            if let Some(p) = dir.parent() {
                sync_dir(p)?;
            }
        }
        Ok(parent)
    }

    /// A new temp file beside `full`, its directories made if needed.
    fn temp_beside(&self, full: &Path) -> Result<(PathBuf, File), StoreError> {
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A concurrent delete may prune the directory between making it and
        // creating the file: make it again.
        let mut tries = 0;
        loop {
            let dir = self.make_parents(full)?;
            let n = self.temp.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!("{TEMP_PREFIX}{}-{n}-{name}", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => return Ok((tmp, f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => tries += 1,
                Err(e) => return Err(io_err("create", &tmp)(e)),
            }
        }
    }

    /// Writes `body` to a synced temp file beside `full`, stamped.
    fn write_temp(
        &self,
        full: &Path,
        body: &Body,
        old: Option<&fs::Metadata>,
    ) -> Result<TempFile, StoreError> {
        let (tmp, mut file) = self.temp_beside(full)?;
        let guard = TempFile(Some(tmp.clone()));
        match body {
            Body::Bytes(b) => file.write_all(b).map_err(io_err("write", &tmp))?,
            Body::File(src) => {
                let mut from = File::open(src).map_err(io_err("open", src))?;
                io::copy(&mut from, &mut file).map_err(io_err("copy to", &tmp))?;
            }
        }
        file.set_times(fs::FileTimes::new().set_modified(self.next_stamp(old)))
            .map_err(io_err("stamp", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        Ok(guard)
    }

    /// Makes `tmp` visible at `full` as `mode` allows, and syncs the
    /// directory. Returns the new version.
    fn commit(
        &self,
        path: &TreePath,
        tmp: TempFile,
        full: &Path,
        mode: &PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let tmp_path = tmp.path().to_path_buf();
        match mode {
            PutMode::Overwrite => {
                fs::rename(&tmp_path, full).map_err(io_err("rename into", full))?;
            }
            PutMode::Create => {
                // link(2) fails if the name exists: an atomic create.
                match fs::hard_link(&tmp_path, full) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(StoreError::AlreadyExists {
                            path: path.to_string(),
                        })
                    }
                    Err(e) => return Err(io_err("create", full)(e)),
                }
            }
            PutMode::Update(expected) => {
                let _process = self.local.lock().unwrap_or_else(|e| e.into_inner());
                let _tree = self.lock_tree()?;
                let current = stat(full)?.map(|m| version_of(&m));
                if current.as_ref() != Some(expected) {
                    return Err(StoreError::Precondition {
                        path: path.to_string(),
                    });
                }
                fs::rename(&tmp_path, full).map_err(io_err("rename into", full))?;
            }
        }
        let meta = fs::metadata(full).map_err(io_err("read", full))?;
        drop(tmp); // after a create, removes the temp name
        if let Some(dir) = full.parent() {
            sync_dir(dir)?;
        }
        Ok(version_of(&meta))
    }

    fn put(&self, path: &TreePath, body: Body, mode: PutMode) -> Result<ObjectVersion, StoreError> {
        let full = self.full(path);
        let old = stat(&full)?;
        if mode == PutMode::Create && old.is_some() {
            return Err(StoreError::AlreadyExists {
                path: path.to_string(),
            });
        }
        if let PutMode::Update(v) = &mode {
            if old.as_ref().map(version_of).as_ref() != Some(v) {
                return Err(StoreError::Precondition {
                    path: path.to_string(),
                });
            }
        }
        // An archive staged on this file system is linked, not copied.
        if let (Body::File(src), PutMode::Create) = (&body, &mode) {
            if let Some(v) = self.link_staged(path, src, &full)? {
                return Ok(v);
            }
        }
        let tmp = self.write_temp(&full, &body, old.as_ref())?;
        self.commit(path, tmp, &full, &mode)
    }

    /// Creates `full` as a hard link of the staged file `src`, after syncing
    /// and stamping it. `None` when linking is not possible here (another
    /// file system): the caller copies.
    fn link_staged(
        &self,
        path: &TreePath,
        src: &Path,
        full: &Path,
    ) -> Result<Option<ObjectVersion>, StoreError> {
        let file = OpenOptions::new()
            .write(true)
            .open(src)
            .map_err(io_err("open", src))?;
        file.set_times(fs::FileTimes::new().set_modified(self.next_stamp(None)))
            .map_err(io_err("stamp", src))?;
        file.sync_all().map_err(io_err("sync", src))?;
        self.make_parents(full)?;
        match fs::hard_link(src, full) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists {
                    path: path.to_string(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The directory was pruned meanwhile: make it again.
                self.make_parents(full)?;
                fs::hard_link(src, full).map_err(io_err("create", full))?;
            }
            Err(_) => return Ok(None),
        }
        if let Some(dir) = full.parent() {
            sync_dir(dir)?;
        }
        let meta = fs::metadata(full).map_err(io_err("read", full))?;
        Ok(Some(version_of(&meta)))
    }

    fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let src = self.full(from);
        if stat(&src)?.is_none() {
            return Err(StoreError::NotFound {
                path: from.to_string(),
            });
        }
        let full = self.full(to);
        let old = stat(&full)?;
        match (&mode, &old) {
            (PutMode::Create, Some(_)) => {
                return Err(StoreError::AlreadyExists {
                    path: to.to_string(),
                })
            }
            (PutMode::Update(v), o) if o.as_ref().map(version_of).as_ref() != Some(v) => {
                return Err(StoreError::Precondition {
                    path: to.to_string(),
                })
            }
            _ => {}
        }
        let (tmp, _) = self.temp_beside(&full)?;
        let _ = fs::remove_file(&tmp);
        let guard = TempFile(Some(tmp.clone()));
        if fs::hard_link(&src, &tmp).is_err() {
            // No links here: a real copy, synced.
            let (tmp2, mut f) = self.temp_beside(&full)?;
            let guard2 = TempFile(Some(tmp2.clone()));
            let mut from_file = File::open(&src).map_err(io_err("open", &src))?;
            io::copy(&mut from_file, &mut f).map_err(io_err("copy to", &tmp2))?;
            f.sync_all().map_err(io_err("sync", &tmp2))?;
            drop(guard);
            return self.commit(to, guard2, &full, &mode);
        }
        self.commit(to, guard, &full, &mode)
    }

    fn delete(&self, path: &TreePath) -> Result<(), StoreError> {
        let full = self.full(path);
        match fs::remove_file(&full) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
            Err(e) => return Err(io_err("remove", &full)(e)),
        }
        // Prune directories the removal emptied (a deleted version's),
        // syncing the first one that stays.
        let mut dir = full.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) {
                return sync_dir(&d);
            }
            match fs::remove_dir(&d) {
                Ok(()) => dir = d.parent().map(Path::to_path_buf),
                Err(_) => return sync_dir(&d),
            }
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError> {
        Ok(self
            .list_meta(prefix)?
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    }

    fn list_meta(&self, prefix: &str) -> Result<Vec<(TreePath, fs::Metadata)>, StoreError> {
        let base = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.root.join(prefix)
        };
        if !base.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let walk = walkdir::WalkDir::new(&base)
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
        for entry in walk {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(&base).display().to_string();
                StoreError::Io {
                    action: "list",
                    path,
                    source: e.into(),
                }
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&self.root) else {
                continue;
            };
            // Files whose names are not tree paths (put there by hand) are
            // not objects of the tree.
            if let Some(p) = rel.to_str().and_then(|s| TreePath::new(s).ok()) {
                let meta = entry.metadata().map_err(|e| StoreError::Io {
                    action: "read",
                    path: entry.path().display().to_string(),
                    source: e.into(),
                })?;
                out.push((p, meta));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn clean_leftovers(&self) -> Result<usize, StoreError> {
        if !self.root.is_dir() {
            return Ok(0);
        }
        let mut removed = 0;
        for entry in walkdir::WalkDir::new(&self.root).into_iter().flatten() {
            let name = entry.file_name().to_string_lossy();
            let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let stale = match pid {
                Some(p) => p != std::process::id() && !is_alive(p),
                // A temp file of another naming (an older niso): no writer
                // of this version owns it.
                None => true,
            };
            if stale && entry.file_type().is_file() && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A temp file removed on drop unless it was renamed away.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

#[async_trait::async_trait]
impl Store for LocalStore {
    fn describe(&self) -> String {
        self.inner.root.display().to_string()
    }

    async fn get(&self, path: &TreePath) -> Result<Option<Object>, StoreError> {
        let path = path.clone();
        self.blocking(move |s| {
            let full = s.full(&path);
            let Some((mut file, meta)) = open_file(&full)? else {
                return Ok(None);
            };
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            file.read_to_end(&mut bytes)
                .map_err(io_err("read", &full))?;
            Ok(Some(Object {
                meta: meta_of(&meta),
                bytes: Bytes::from(bytes),
            }))
        })
        .await
    }

    async fn get_stream(
        &self,
        path: &TreePath,
    ) -> Result<Option<(ObjectMeta, ByteStream)>, StoreError> {
        let p = path.clone();
        let opened = self
            .blocking(move |s| {
                let full = s.full(&p);
                Ok(open_file(&full)?.map(|(f, m)| (f, m, full)))
            })
            .await?;
        let Some((file, meta, full)) = opened else {
            return Ok(None);
        };
        let shown = full.display().to_string();
        let stream =
            tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024)
                .map(move |r| {
                    r.map_err(|source| StoreError::Io {
                        action: "read",
                        path: shown.clone(),
                        source,
                    })
                });
        Ok(Some((meta_of(&meta), Box::pin(stream))))
    }

    async fn head(&self, path: &TreePath) -> Result<Option<ObjectMeta>, StoreError> {
        let path = path.clone();
        self.blocking(move |s| Ok(stat(&s.full(&path))?.map(|m| meta_of(&m))))
            .await
    }

    async fn put(
        &self,
        path: &TreePath,
        body: Body,
        _attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let path = path.clone();
        self.blocking(move |s| s.put(&path, body, mode)).await
    }

    async fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        _attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let (from, to) = (from.clone(), to.clone());
        self.blocking(move |s| s.copy(&from, &to, mode)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |s| s.list(&prefix)).await
    }

    async fn list_versions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(TreePath, ObjectVersion)>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |s| {
            Ok(s.list_meta(&prefix)?
                .into_iter()
                .map(|(p, m)| (p, version_of(&m)))
                .collect())
        })
        .await
    }

    async fn delete(&self, path: &TreePath) -> Result<(), StoreError> {
        let path = path.clone();
        self.blocking(move |s| s.delete(&path)).await
    }

    async fn clean_leftovers(&self) -> Result<usize, StoreError> {
        self.blocking(|s| s.clean_leftovers()).await
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.inner.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TreePath {
        TreePath::new(s).unwrap()
    }

    fn attrs() -> Attributes {
        crate::index::layout::attributes("x", None)
    }

    #[test]
    fn tree_paths_stay_inside_the_tree() {
        for bad in [
            "", "/abs", "a//b", "../x", "a/../b", "./a", ".hidden", "a/.tmp", "a b", "a\\b", "é",
            "a/",
        ] {
            assert!(TreePath::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "names",
            "packages/my_app",
            "tarballs/x-1.0.0.tar",
            "v1/packages/a/1.0.0/x86_64",
        ] {
            assert!(TreePath::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn conditional_puts_refuse_stale_versions_and_creates_refuse_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        let a = p("packages/a");
        let v1 = s
            .put(&a, b"one".to_vec().into(), &attrs(), PutMode::Create)
            .await
            .unwrap();
        assert!(matches!(
            s.put(&a, b"two".to_vec().into(), &attrs(), PutMode::Create)
                .await,
            Err(StoreError::AlreadyExists { .. })
        ));
        let v2 = s
            .put(
                &a,
                b"two".to_vec().into(),
                &attrs(),
                PutMode::Update(v1.clone()),
            )
            .await
            .unwrap();
        assert_ne!(v1, v2);
        // A writer that last read v1 loses.
        assert!(s
            .put(&a, b"three".to_vec().into(), &attrs(), PutMode::Update(v1))
            .await
            .unwrap_err()
            .is_precondition());
        let got = s.get(&a).await.unwrap().unwrap();
        assert_eq!(&got.bytes[..], b"two");
        assert_eq!(got.meta.version, v2);
        // Same size, rewritten at once: still a new version and a later time.
        let v3 = s
            .put(
                &a,
                b"TWO".to_vec().into(),
                &attrs(),
                PutMode::Update(v2.clone()),
            )
            .await
            .unwrap();
        assert_ne!(v2, v3);
        assert_eq!(s.list("").await.unwrap(), vec![a.clone()]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("packages"))
                .unwrap()
                .count(),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn rewrites_always_move_the_modification_time_forward() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        let f = p("freshness");
        let mut last = None;
        let mut v = s
            .put(&f, b"0000".to_vec().into(), &attrs(), PutMode::Create)
            .await
            .unwrap();
        for i in 0..50 {
            v = s
                .put(
                    &f,
                    format!("{i:04}").into_bytes().into(),
                    &attrs(),
                    PutMode::Update(v),
                )
                .await
                .unwrap();
            let t = std::fs::metadata(dir.path().join("freshness"))
                .unwrap()
                .modified()
                .unwrap();
            if let Some(l) = last {
                assert!(t > l, "rewrite {i} kept the time stamp");
            }
            last = Some(t);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn copies_delete_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        let staged = dir.path().join("staged.bin");
        std::fs::write(&staged, b"archive").unwrap();
        let arch = p("archives/a-1.0.0-x86_64.niso");
        s.put(&arch, Body::File(staged.clone()), &attrs(), PutMode::Create)
            .await
            .unwrap();
        let v1 = p("v1/packages/a/1.0.0/x86_64");
        s.copy(&arch, &v1, &attrs(), PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(&s.get(&v1).await.unwrap().unwrap().bytes[..], b"archive");
        assert!(matches!(
            s.copy(&p("archives/none"), &v1, &attrs(), PutMode::Overwrite)
                .await,
            Err(StoreError::NotFound { .. })
        ));
        s.delete(&v1).await.unwrap();
        s.delete(&v1).await.unwrap();
        assert!(
            !dir.path().join("v1").exists(),
            "emptied directories are pruned"
        );
        // A temp file of a process that is gone, and one of this process.
        let dead = dir.path().join("archives/.tmp-4194304000-1-x");
        std::fs::write(&dead, b"x").unwrap();
        let mine = dir
            .path()
            .join(format!("archives/.tmp-{}-9-y", std::process::id()));
        std::fs::write(&mine, b"y").unwrap();
        assert_eq!(s.clean_leftovers().await.unwrap(), 1);
        assert!(!dead.exists() && mine.exists());
        assert_eq!(s.list("archives").await.unwrap(), vec![arch]);
    }
}
