//! The tree as a local directory, written with atomic renames.
//!
//! Each file is written to a temp file in its own directory (so the rename
//! never crosses file systems), made durable, renamed into place, and the
//! directory is synced so the rename itself survives a crash.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{Op, Staged, Store, StoreError, TreePath};

/// Directories one stage touches.
#[derive(Default)]
struct StageDirs {
    /// To fsync once the stage's renames are done.
    sync: BTreeSet<PathBuf>,
    /// Known to exist (saves a stat per file).
    known: std::collections::HashSet<PathBuf>,
    /// Made by this stage: nothing in them can exist yet.
    created: std::collections::HashSet<PathBuf>,
    /// Large files this stage replaced, still open (see [`hold_if_large`]).
    replaced: Vec<File>,
}

/// Above this many paths to sync at once, one `syncfs` replaces an fsync
/// each (see [`LocalStore::sync_all`]).
const SYNCFS_THRESHOLD: usize = 16;

/// Replaced files at least this large are closed off the caller's path.
const RELEASE_LATER: u64 = 64 * 1024;

/// At most this many replaced files are held open per stage run.
const RELEASE_LATER_MAX: usize = 64;

/// Opens the file at `full` if it is large, before a rename replaces it.
/// Replacing the last link of a file frees its blocks inside rename(2):
/// 1.2–1.6 ms for the 1.35 MB `v1/packages/index.json` of 10,000 packages
/// on this project's machine (ext4 with online discard). While the file is
/// open the rename only unlinks it, and the blocks are freed when the
/// handle is closed on a background thread, after the change is durable.
fn hold_if_large(full: &Path, dirs: &StageDirs) -> Option<File> {
    if dirs.replaced.len() >= RELEASE_LATER_MAX {
        return None;
    }
    let file = File::open(full).ok()?;
    let len = file.metadata().ok()?.len();
    (len >= RELEASE_LATER).then_some(file)
}

/// Closes replaced files on another thread. If none can start, the
/// closure holding them is dropped at once, which closes them inline.
fn release(files: Vec<File>) {
    if !files.is_empty() {
        let _ = std::thread::Builder::new()
            .name("niso-release".into())
            .spawn(move || drop(files));
    }
}

/// One op of a stage, prepared: everything but the step that makes it
/// visible, which waits for the stage's sync round.
enum Step {
    /// A temp file to rename over `full`; `new_bytes` when its data is new
    /// (not a link to a file that is durable already).
    Rename {
        tmp: tempfile::TempPath,
        full: PathBuf,
        new_bytes: bool,
    },
    Remove {
        full: PathBuf,
    },
    /// A link from `src` to make at `full`. Made when the stage becomes
    /// visible, not before: `src` may be a file an earlier stage of the
    /// same change creates (a `v1/` download of a new archive).
    Link {
        src: PathBuf,
        full: PathBuf,
        new_dir: bool,
    },
    /// An archive to link into place, failing if `full` exists.
    Create {
        src: Source,
        full: PathBuf,
    },
}

impl Step {
    /// The file whose data the sync round must make durable, if any.
    fn new_bytes(&self) -> Option<&Path> {
        match self {
            Step::Rename {
                tmp,
                new_bytes: true,
                ..
            } => Some(tmp.as_ref()),
            Step::Create { src, .. } => Some(src.path()),
            _ => None,
        }
    }
}

/// Where an archive to create comes from.
enum Source {
    /// The staged file itself, on the tree's file system.
    Staged(PathBuf),
    /// A copy beside the target (staging is on another file system).
    Copied(tempfile::TempPath),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Staged(p) => p,
            Source::Copied(t) => t.as_ref(),
        }
    }
}

/// A change of a [`LocalStore`] whose new bytes are durable in temp files.
struct LocalStaged<'a> {
    store: &'a LocalStore,
    prepared: Vec<Vec<(Vec<Step>, StageDirs)>>,
}

impl Staged for LocalStaged<'_> {
    fn publish(self: Box<Self>) -> Result<(), StoreError> {
        let store = self.store;
        // Renames of the previous stage, whose directories still need a sync.
        let mut pending: BTreeSet<PathBuf> = BTreeSet::new();
        let mut replaced = Vec::new();
        for chunks in self.prepared {
            store.sync_all(pending.iter().map(PathBuf::as_path))?;
            let finished: Vec<(BTreeSet<PathBuf>, Vec<File>)> = if chunks.len() > 1 {
                chunks
                    .into_par_iter()
                    .map(|(steps, dirs)| store.finish_steps(steps, dirs))
                    .collect::<Result<_, _>>()?
            } else {
                chunks
                    .into_iter()
                    .map(|(steps, dirs)| store.finish_steps(steps, dirs))
                    .collect::<Result<_, _>>()?
            };
            pending = BTreeSet::new();
            for (dirs, files) in finished {
                pending.extend(dirs);
                replaced.extend(files);
            }
        }
        store.sync_all(pending.iter().map(PathBuf::as_path))?;
        release(replaced);
        Ok(())
    }
}

/// A tree rooted at a directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// Stages with at least this many ops are applied on several threads.
const PARALLEL_STAGE: usize = 512;

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full(&self, path: &TreePath) -> PathBuf {
        self.root.join(path.as_str())
    }

    /// Creates `full`'s directory if needed. New directories are added to
    /// `dirs.sync` with their parents, whose entries must then be synced.
    fn ensure_parent(&self, full: &Path, dirs: &mut StageDirs) -> Result<PathBuf, StoreError> {
        let parent = full.parent().unwrap_or(&self.root).to_path_buf();
        if dirs.known.contains(&parent) {
            return Ok(parent);
        }
        if !parent.is_dir() {
            fs::create_dir_all(&parent).map_err(io_err("create directory", &parent))?;
            dirs.created.insert(parent.clone());
            let mut dir = parent.as_path();
            while let Some(up) = dir.parent() {
                dirs.sync.insert(up.to_path_buf());
                if up == self.root || !up.starts_with(&self.root) {
                    break;
                }
                dir = up;
            }
        }
        dirs.known.insert(parent.clone());
        Ok(parent)
    }

    /// Writes `bytes` to a temp file beside `full` (not yet synced).
    fn stage_bytes(
        &self,
        full: &Path,
        bytes: &[u8],
        dirs: &mut StageDirs,
    ) -> Result<tempfile::TempPath, StoreError> {
        let parent = self.ensure_parent(full, dirs)?;
        let mut builder = tempfile::Builder::new();
        builder.prefix(".tmp-");
        // Served files must be world-readable so a web server running as
        // another user can serve them (temp files default to 0600).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(fs::Permissions::from_mode(0o644));
        }
        let mut tmp = builder
            .tempfile_in(&parent)
            .map_err(io_err("create temp file in", &parent))?;
        tmp.write_all(bytes).map_err(io_err("write", full))?;
        Ok(tmp.into_temp_path())
    }

    /// Removes the directories a removal left empty, up to the root, so a
    /// deleted release leaves nothing behind for mirrors to copy.
    fn prune_empty_dirs(&self, removed: &Path, dirs: &mut StageDirs) {
        let mut dir = removed.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || fs::remove_dir(d).is_err() {
                // The first directory that stays holds the last change.
                if d.is_dir() {
                    dirs.sync.insert(d.to_path_buf());
                }
                break;
            }
            dirs.sync.remove(d);
            dir = d.parent();
        }
    }

    /// Prepares a staged archive for [`Op::Create`]: world-readable, and on
    /// the tree's file system (copied into a temp file beside its target when
    /// staging is elsewhere), so the link that publishes it cannot fail with
    /// EXDEV after the sync round.
    fn prepare_create(
        &self,
        full: &Path,
        staged: &Path,
        dirs: &mut StageDirs,
    ) -> Result<Source, StoreError> {
        let parent = self.ensure_parent(full, dirs)?;
        if same_device(staged, &parent) {
            set_readable_path(staged)?;
            return Ok(Source::Staged(staged.to_path_buf()));
        }
        let mut builder = tempfile::Builder::new();
        builder.prefix(".tmp-");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(fs::Permissions::from_mode(0o644));
        }
        let tmp = builder
            .tempfile_in(&parent)
            .map_err(io_err("create temp file in", &parent))?;
        fs::copy(staged, tmp.path()).map_err(io_err("copy", staged))?;
        Ok(Source::Copied(tmp.into_temp_path()))
    }

    /// Everything of `ops` but what makes them visible: temp files written
    /// and archives made ready to link.
    fn prepare_ops(&self, ops: &[Op]) -> Result<(Vec<Step>, StageDirs), StoreError> {
        let mut dirs = StageDirs::default();
        let mut steps: Vec<Step> = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { path, bytes } => {
                    let full = self.full(path);
                    let tmp = self.stage_bytes(&full, bytes, &mut dirs)?;
                    steps.push(Step::Rename {
                        tmp,
                        full,
                        new_bytes: true,
                    });
                }
                Op::Link { from, to } => {
                    let full = self.full(to);
                    let parent = self.ensure_parent(&full, &mut dirs)?;
                    steps.push(Step::Link {
                        src: self.full(from),
                        new_dir: dirs.created.contains(&parent),
                        full,
                    });
                }
                Op::Remove { path } => steps.push(Step::Remove {
                    full: self.full(path),
                }),
                Op::Create { path, staged } => {
                    let full = self.full(path);
                    let src = self.prepare_create(&full, staged, &mut dirs)?;
                    steps.push(Step::Create { src, full });
                }
            }
        }
        Ok((steps, dirs))
    }

    /// Prepares one stage, in contiguous runs of ops: one run, or for a
    /// rebuild's stage of thousands of new files (bound by the kernel's
    /// work per file) one run per share of the cores, each kept in order.
    /// Removals prune directories, which runs in parallel could race on.
    fn prepare_stage(&self, stage: &[Op]) -> Result<Vec<(Vec<Step>, StageDirs)>, StoreError> {
        let parallel = stage.len() >= PARALLEL_STAGE
            && !stage.iter().any(|op| matches!(op, Op::Remove { .. }));
        if !parallel {
            return Ok(vec![self.prepare_ops(stage)?]);
        }
        let threads = rayon::current_num_threads().max(1);
        stage
            .par_chunks(stage.len().div_ceil(threads * 4))
            .map(|ops| self.prepare_ops(ops))
            .collect()
    }

    /// Makes `full` a link to `src`, atomically replacing any file there.
    fn link(&self, src: &Path, full: &Path, new_dir: bool) -> Result<(), StoreError> {
        let parent = full.parent().unwrap_or(&self.root);
        match if new_dir {
            Err(io::ErrorKind::NotFound.into())
        } else {
            fs::symlink_metadata(full)
        } {
            // A new path: link(2) creates it atomically (unless an earlier
            // op of the change put a file there: then replace it).
            Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::hard_link(src, full) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                done => return done.map_err(io_err("link", full)),
            },
            // rename(2) between two links to one inode does nothing and
            // leaves the temp name behind: skip.
            Ok(_) if same_inode(src, full) => return Ok(()),
            _ => {}
        }
        // Link into a fresh temp name, then rename over the target:
        // replacing a link is then atomic too.
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .make_in(parent, |p| fs::hard_link(src, p))
            .map_err(io_err("link", full))?
            .into_temp_path();
        tmp.persist(full)
            .map_err(|e| io_err("rename into", full)(e.error))
    }

    /// Creates `full`'s directory again if a change published after this
    /// one was staged removed it (a deleted release prunes the directories
    /// it leaves empty, and a directory staged for a link holds nothing
    /// yet). Returns whether it did.
    fn restore_parent(&self, full: &Path, dirs: &mut StageDirs) -> Result<bool, StoreError> {
        let parent = full.parent().unwrap_or(&self.root);
        if parent.is_dir() {
            return Ok(false);
        }
        dirs.known.remove(parent);
        self.ensure_parent(full, dirs)?;
        Ok(true)
    }

    /// Makes prepared steps visible, in order; returns the directories to
    /// sync.
    fn finish_steps(
        &self,
        steps: Vec<Step>,
        mut dirs: StageDirs,
    ) -> Result<(BTreeSet<PathBuf>, Vec<File>), StoreError> {
        for step in steps {
            match step {
                Step::Rename {
                    tmp,
                    full,
                    new_bytes,
                } => {
                    let old = if new_bytes {
                        hold_if_large(&full, &dirs)
                    } else {
                        None
                    };
                    tmp.persist(&full)
                        .map_err(|e| io_err("rename into", &full)(e.error))?;
                    dirs.replaced.extend(old);
                    if let Some(parent) = full.parent() {
                        dirs.sync.insert(parent.to_path_buf());
                    }
                }
                Step::Link { src, full, new_dir } => {
                    if let Err(e) = self.link(&src, &full, new_dir) {
                        if !self.restore_parent(&full, &mut dirs)? {
                            return Err(e);
                        }
                        self.link(&src, &full, true)?;
                    }
                    if let Some(parent) = full.parent() {
                        dirs.sync.insert(parent.to_path_buf());
                    }
                }
                Step::Remove { full } => {
                    match fs::remove_file(&full) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove", &full)(e)),
                    }
                    self.prune_empty_dirs(&full, &mut dirs);
                }
                Step::Create { src, full } => {
                    // link(2) fails with EEXIST if the target exists.
                    let mut linked = fs::hard_link(src.path(), &full);
                    if matches!(&linked, Err(e) if e.kind() == io::ErrorKind::NotFound)
                        && self.restore_parent(&full, &mut dirs)?
                    {
                        linked = fs::hard_link(src.path(), &full);
                    }
                    match linked {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            return Err(StoreError::AlreadyExists {
                                path: full.strip_prefix(&self.root).map_or_else(
                                    |_| full.display().to_string(),
                                    |p| p.display().to_string(),
                                ),
                            })
                        }
                        Err(e) => return Err(io_err("link", &full)(e)),
                    }
                    if let Some(parent) = full.parent() {
                        dirs.sync.insert(parent.to_path_buf());
                    }
                }
            }
        }
        Ok((dirs.sync, dirs.replaced))
    }

    /// Makes files or directories durable: an fsync each, on parallel
    /// threads, or for more than [`SYNCFS_THRESHOLD`] paths one `syncfs(2)`
    /// of the tree's file system. Every fsync pays a disk flush of its own
    /// (ext4 without a journal has no commit to fold them into), so syncfs
    /// is cheaper for many files (10 new files on this project's machine:
    /// 2.4 ms with parallel fsyncs, 1.0 ms with one syncfs). But syncfs
    /// also writes back every other dirty page of that file system, such as
    /// a large upload streaming into `staging/`, so a small change keeps to
    /// its own files: end to end, upload latency showed no difference
    /// between the two within this machine's noise.
    fn sync_all<'a>(&self, paths: impl IntoIterator<Item = &'a Path>) -> Result<(), StoreError> {
        let paths: Vec<&Path> = paths.into_iter().collect();
        match paths.as_slice() {
            [] => Ok(()),
            [one] => sync_path(one),
            many if many.len() > SYNCFS_THRESHOLD => sync_filesystem(&self.root, many),
            few => std::thread::scope(|s| {
                let handles: Vec<_> = few.iter().map(|p| s.spawn(move || sync_path(p))).collect();
                handles.into_iter().try_for_each(|h| {
                    h.join()
                        .unwrap_or_else(|_| sync_filesystem(&self.root, few))
                })
            }),
        }
    }
}

impl Store for LocalStore {
    fn get(&self, path: &TreePath) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.full(path);
        match fs::read(&full) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &full)(e)),
        }
    }

    fn exists(&self, path: &TreePath) -> Result<bool, StoreError> {
        let full = self.full(path);
        full.try_exists().map_err(io_err("check", &full))
    }

    fn apply(&self, stages: &[Vec<Op>]) -> Result<(), StoreError> {
        self.stage(stages)?.publish()
    }

    fn stage<'a>(&'a self, stages: &'a [Vec<Op>]) -> Result<Box<dyn Staged + 'a>, StoreError> {
        // Every stage's new bytes go to temp files first, and one round of
        // syncs makes all of them durable: temp files are invisible, so
        // only the renames need the stage order (and a caller may stage
        // the next change while this one is being published). A change
        // costs one data round and one directory round per stage, instead
        // of a data round per stage; a failure while writing data leaves
        // nothing visible.
        let prepared: Vec<Vec<(Vec<Step>, StageDirs)>> = stages
            .iter()
            .filter(|stage| !stage.is_empty())
            .map(|stage| self.prepare_stage(stage))
            .collect::<Result<_, _>>()?;
        self.sync_all(
            prepared
                .iter()
                .flatten()
                .flat_map(|(steps, _)| steps.iter().filter_map(Step::new_bytes)),
        )?;
        Ok(Box::new(LocalStaged {
            store: self,
            prepared,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError> {
        let base = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.root.join(prefix)
        };
        if !base.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(&base).sort_by_file_name() {
            let entry = entry.map_err(|e| io_err("list", &base)(e.into()))?;
            if !entry.file_type().is_file() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&self.root) else {
                continue;
            };
            let Some(rel) = rel.to_str() else { continue };
            // Temp files and anything else outside the path rule are not
            // part of the tree.
            if let Ok(p) = TreePath::new(rel.replace(std::path::MAIN_SEPARATOR, "/")) {
                out.push(p);
            }
        }
        Ok(out)
    }

    fn local_path(&self, path: &TreePath) -> Option<PathBuf> {
        Some(self.full(path))
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Whether two paths are links to the same file.
pub(crate) fn same_inode(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(a), fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        false
    }
}

/// Whether `file` is on the file system of `dir` (so it can be hard-linked
/// into it).
fn same_device(file: &Path, dir: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(file), fs::metadata(dir)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, dir);
        false
    }
}

/// fsync a file, or a directory so renames and new entries in it are durable.
fn sync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", path))
}

/// One `syncfs(2)` for the file system holding `root` (and `paths`);
/// elsewhere, an fsync per path.
fn sync_filesystem(root: &Path, paths: &[&Path]) -> Result<(), StoreError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let _ = paths;
        let dir = File::open(root).map_err(io_err("open", root))?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
        let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
        if rc != 0 {
            return Err(io_err("sync file system of", root)(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = root;
        paths.iter().try_for_each(|p| sync_path(p))
    }
}

/// Staged uploads are created 0600; served files must be world-readable so a
/// web server running as another user can serve them.
fn set_readable_path(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))
            .map_err(io_err("set permissions on", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TreePath {
        TreePath::new(s).unwrap()
    }

    /// Temp files anywhere under `dir`.
    fn temp_files(dir: &Path) -> usize {
        walkdir::WalkDir::new(dir)
            .min_depth(1)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .count()
    }

    #[test]
    fn tree_paths_stay_inside_the_tree() {
        for ok in [
            "names",
            "packages/a_b",
            "v1/packages/x/1.0.0-rc.1/x86_64",
            "repos/acme/names",
        ] {
            assert!(TreePath::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/names",
            "../x",
            "a/../b",
            "a//b",
            ".tmp-x",
            "a/.hidden",
            "a b",
            "a\\b",
            "a/",
        ] {
            assert!(TreePath::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stages_write_replace_link_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .apply(&[
                vec![Op::Put {
                    path: p("a/one"),
                    bytes: b"1".to_vec(),
                }],
                vec![Op::Link {
                    from: p("a/one"),
                    to: p("b/two"),
                }],
            ])
            .unwrap();
        assert_eq!(store.get(&p("b/two")).unwrap().unwrap(), b"1");
        // Linking again to the same file is a no-op that leaves no temp file.
        store
            .apply(&[vec![Op::Link {
                from: p("a/one"),
                to: p("b/two"),
            }]])
            .unwrap();
        store
            .apply(&[vec![
                Op::Put {
                    path: p("a/one"),
                    bytes: b"2".to_vec(),
                },
                Op::Remove { path: p("b/two") },
                Op::Remove {
                    path: p("b/missing"),
                },
            ]])
            .unwrap();
        assert_eq!(store.get(&p("a/one")).unwrap().unwrap(), b"2");
        assert!(store.get(&p("b/two")).unwrap().is_none());
        assert_eq!(store.list("").unwrap(), vec![p("a/one")]);
        // Many files take the syncfs path; many more, several threads.
        for n in [40, PARALLEL_STAGE + 100] {
            let mut many: Vec<Op> = (0..n)
                .map(|i| Op::Put {
                    path: p(&format!("m{n}/d{}/f{i}", i % 7)),
                    bytes: vec![i as u8],
                })
                .collect();
            many.push(Op::Link {
                from: p("a/one"),
                to: p(&format!("m{n}/link")),
            });
            store.apply(&[many]).unwrap();
            assert_eq!(store.list(&format!("m{n}")).unwrap().len(), n + 1, "{n}");
            for i in 0..n {
                let got = store.get(&p(&format!("m{n}/d{}/f{i}", i % 7))).unwrap();
                assert_eq!(got, Some(vec![i as u8]));
            }
            assert_eq!(store.get(&p(&format!("m{n}/link"))).unwrap().unwrap(), b"2");
        }
        // No temp files are left behind.
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[test]
    fn a_link_may_name_a_file_an_earlier_stage_creates() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("tree"));
        let staged = dir.path().join("staged");
        fs::write(&staged, b"archive").unwrap();
        store
            .apply(&[vec![Op::Put {
                path: p("v/old"),
                bytes: b"old".to_vec(),
            }]])
            .unwrap();
        store
            .apply(&[
                vec![Op::Create {
                    path: p("archives/x.tar"),
                    staged: staged.clone(),
                }],
                // One new path, one replaced, in a directory made now and in
                // one that exists.
                vec![
                    Op::Link {
                        from: p("archives/x.tar"),
                        to: p("v1/x/download"),
                    },
                    Op::Link {
                        from: p("archives/x.tar"),
                        to: p("v/old"),
                    },
                ],
            ])
            .unwrap();
        for path in ["archives/x.tar", "v1/x/download", "v/old"] {
            assert_eq!(store.get(&p(path)).unwrap().unwrap(), b"archive", "{path}");
        }
        assert!(same_inode(
            &dir.path().join("tree/archives/x.tar"),
            &dir.path().join("tree/v/old")
        ));
    }

    #[test]
    fn a_failed_create_leaves_no_later_stage_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("tree"));
        let staged = dir.path().join("staged");
        fs::write(&staged, b"archive").unwrap();
        let stages = |n: &str| {
            vec![
                vec![Op::Create {
                    path: p("archives/x.tar"),
                    staged: staged.clone(),
                }],
                vec![Op::Put {
                    path: p("packages/x"),
                    bytes: n.as_bytes().to_vec(),
                }],
            ]
        };
        store.apply(&stages("first")).unwrap();
        let again = store.apply(&stages("second"));
        assert!(
            matches!(again, Err(StoreError::AlreadyExists { .. })),
            "{again:?}"
        );
        // The second change's index was written to a temp file before the
        // create failed; it never became visible and was cleaned up.
        assert_eq!(store.get(&p("packages/x")).unwrap().unwrap(), b"first");
        assert_eq!(temp_files(&dir.path().join("tree")), 0);
    }

    #[test]
    fn large_replaced_files_are_closed_off_the_writers_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let big = |b: u8| Op::Put {
            path: p("v1/packages/index.json"),
            bytes: vec![b; RELEASE_LATER as usize + 1],
        };
        store.apply(&[vec![big(1)]]).unwrap();
        let full = dir.path().join("v1/packages/index.json");
        let dirs = StageDirs::default();
        assert!(hold_if_large(&full, &dirs).is_some());
        assert!(hold_if_large(&dir.path().join("missing"), &dirs).is_none());
        fs::write(dir.path().join("small"), b"x").unwrap();
        assert!(hold_if_large(&dir.path().join("small"), &dirs).is_none());
        for b in 2..5 {
            store.apply(&[vec![big(b)]]).unwrap();
            assert_eq!(
                store.get(&p("v1/packages/index.json")).unwrap().unwrap()[0],
                b
            );
        }
        // Every replaced file is closed soon after: no descriptor of this
        // process is left on a deleted file of the tree.
        let held = || {
            fs::read_dir("/proc/self/fd")
                .map(|fds| {
                    fds.filter_map(Result::ok)
                        .filter_map(|fd| fs::read_link(fd.path()).ok())
                        .filter(|target| target.starts_with(dir.path()))
                        .count()
                })
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while held() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(held(), 0);
    }

    #[test]
    fn archives_are_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("tree"));
        let staged = dir.path().join("staged");
        fs::write(&staged, b"archive").unwrap();
        let create = |staged: &Path| {
            store.apply(&[vec![Op::Create {
                path: p("tarballs/x-1.0.0.tar"),
                staged: staged.to_path_buf(),
            }]])
        };
        create(&staged).unwrap();
        let other = dir.path().join("other");
        fs::write(&other, b"other").unwrap();
        let again = create(&other);
        assert!(
            matches!(&again, Err(StoreError::AlreadyExists { path }) if path == "tarballs/x-1.0.0.tar"),
            "{again:?}"
        );
        assert_eq!(
            store.get(&p("tarballs/x-1.0.0.tar")).unwrap().unwrap(),
            b"archive"
        );
    }

    #[test]
    fn a_staged_change_is_invisible_until_published_and_dropping_it_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .apply(&[vec![Op::Put {
                path: p("a/old"),
                bytes: b"old".to_vec(),
            }]])
            .unwrap();
        let change = [
            vec![Op::Put {
                path: p("a/new"),
                bytes: b"new".to_vec(),
            }],
            vec![
                Op::Put {
                    path: p("a/old"),
                    bytes: b"replaced".to_vec(),
                },
                Op::Link {
                    from: p("a/new"),
                    to: p("b/link"),
                },
            ],
        ];
        let staged = store.stage(&change).unwrap();
        // The bytes are written, but no reader sees them yet.
        assert_eq!(store.list("").unwrap(), vec![p("a/old")]);
        assert_eq!(store.get(&p("a/old")).unwrap().unwrap(), b"old");
        assert!(temp_files(dir.path()) > 0);
        drop(staged);
        assert_eq!(store.list("").unwrap(), vec![p("a/old")]);
        assert_eq!(
            temp_files(dir.path()),
            0,
            "a dropped change left temp files"
        );

        store.stage(&change).unwrap().publish().unwrap();
        assert_eq!(store.get(&p("a/old")).unwrap().unwrap(), b"replaced");
        assert_eq!(store.get(&p("b/link")).unwrap().unwrap(), b"new");
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[test]
    fn a_change_staged_before_an_earlier_one_prunes_its_directories_still_lands() {
        // The server stages change k+1 while change k is published. If k
        // deletes the last file of a directory that k+1 links or creates
        // into, k prunes that directory after k+1 saw it: publishing k+1
        // must make it again rather than fail.
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .apply(&[vec![
                Op::Put {
                    path: p("archives/x-1"),
                    bytes: b"one".to_vec(),
                },
                Op::Link {
                    from: p("archives/x-1"),
                    to: p("v1/x/latest/any"),
                },
            ]])
            .unwrap();
        let staging = tempfile::tempdir().unwrap();
        let upload = staging.path().join("upload");
        fs::write(&upload, b"two").unwrap();
        let later = [
            vec![Op::Create {
                path: p("archives/x-2"),
                staged: upload,
            }],
            vec![Op::Link {
                from: p("archives/x-2"),
                to: p("v1/x/latest/any"),
            }],
        ];
        let staged = store.stage(&later).unwrap();
        // The earlier change: x-1 is deleted, and with it every directory.
        store
            .apply(&[vec![
                Op::Remove {
                    path: p("v1/x/latest/any"),
                },
                Op::Remove {
                    path: p("archives/x-1"),
                },
            ]])
            .unwrap();
        assert!(!dir.path().join("v1").exists() && !dir.path().join("archives").exists());
        staged.publish().unwrap();
        assert_eq!(store.get(&p("archives/x-2")).unwrap().unwrap(), b"two");
        assert_eq!(store.get(&p("v1/x/latest/any")).unwrap().unwrap(), b"two");
        assert_eq!(temp_files(dir.path()), 0);
    }
}
