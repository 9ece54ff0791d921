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

use super::durable::{self, Durable};
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
    /// Files this stage replaced, still open (see [`hold_replaced`]).
    replaced: Vec<File>,
}

/// Above this many paths to sync at once, one `syncfs` replaces an fsync
/// each (see [`LocalStore::sync_all`]).
const SYNCFS_THRESHOLD: usize = 16;

/// At most this many replaced files are held open at once, across all
/// changes (a publish of 32 uploads replaces about 100): if closing them
/// falls behind, renames free the files themselves again.
const HOLD_MAX: usize = 1024;

/// Replaced files held open now (see [`hold_replaced`] and [`release`]).
static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Opens the file at `full`, if there is one, before a rename replaces it.
/// Replacing the last link of a file frees its inode and blocks inside
/// rename(2), which then waits for the file system (ext4 with online
/// discard trims the freed blocks there and then). While the file is open
/// the rename only unlinks it, and the freeing happens when the handle is
/// closed, on a background thread, after the change is durable. On this
/// project's machine a rename over a 3 KB file took 269 µs, and 19.5 µs
/// with the old file held open (244 µs moved to the close); 1.2–1.6 ms
/// for the 1.35 MB `v1/packages/index.json` of 10,000 packages.
fn hold_replaced(full: &Path) -> Option<File> {
    use std::sync::atomic::Ordering;
    if HELD.load(Ordering::Relaxed) >= HOLD_MAX {
        return None;
    }
    let file = File::open(full).ok()?;
    HELD.fetch_add(1, Ordering::Relaxed);
    Some(file)
}

/// Closes replaced files on the store's kept threads ([`durable::spawn`]).
fn release(files: Vec<File>) {
    if files.is_empty() {
        return;
    }
    durable::spawn(move || {
        let n = files.len();
        drop(files);
        HELD.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    });
}

/// One op of a stage, prepared: everything but the step that makes it
/// visible, which waits for the stage's sync round.
enum Step {
    /// A temp file to rename over `full`. `file` is the temp file still
    /// open from writing it, until the data round syncs it.
    Rename {
        tmp: tempfile::TempPath,
        file: Option<File>,
        full: PathBuf,
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
    /// An archive already linked into place while staging (see
    /// [`LocalStore::prepare_ops`]): visible, but named by no index until
    /// the later stages are published. Removed again if the change is
    /// dropped.
    Created {
        src: Source,
        full: PathBuf,
    },
}

impl Step {
    /// What the data round must make durable for this step, if anything:
    /// new bytes (taking the open temp file, which the round then closes),
    /// and for an archive created while staging, its directory entry too.
    fn take_durable(&mut self, into: &mut Vec<Durable>) {
        match self {
            Step::Rename { tmp, file, .. } => into.push(match file.take() {
                Some(f) => Durable::File(f, tmp.to_path_buf()),
                None => Durable::Path(tmp.to_path_buf()),
            }),
            Step::Create { src, .. } => into.push(Durable::Path(src.path().to_path_buf())),
            Step::Created { src, full } => {
                into.push(Durable::Path(src.path().to_path_buf()));
                if let Some(parent) = full.parent() {
                    into.push(Durable::Path(parent.to_path_buf()));
                }
            }
            _ => {}
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

impl Drop for LocalStaged<'_> {
    /// A change dropped before it was published leaves the tree as it was:
    /// the archives it linked while staging go again (temp files remove
    /// themselves).
    fn drop(&mut self) {
        for (steps, _) in self.prepared.iter().flatten() {
            for step in steps {
                if let Step::Created { full, .. } = step {
                    let _ = fs::remove_file(full);
                }
            }
        }
    }
}

impl Staged for LocalStaged<'_> {
    fn publish(mut self: Box<Self>) -> Result<(), StoreError> {
        let store = self.store;
        // From here on the archives linked while staging belong to the
        // change's first stage, which publishing applies.
        let prepared = std::mem::take(&mut self.prepared);
        // Renames of the previous stage, whose directories still need a sync.
        let mut pending: BTreeSet<PathBuf> = BTreeSet::new();
        let mut replaced = Vec::new();
        for chunks in prepared {
            store.sync_dirs(&pending)?;
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
        store.sync_dirs(&pending)?;
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
            // The missing directories, deepest first.
            let mut missing = Vec::new();
            let mut dir = parent.as_path();
            while !dir.is_dir() {
                missing.push(dir.to_path_buf());
                match dir.parent() {
                    Some(up) => dir = up,
                    None => break,
                }
            }
            // Made from the top down. Only the parent of a directory made
            // here gains an entry to sync: syncing every ancestor cost three
            // needless fsyncs per new version (0.4 ms each on a disk whose
            // flushes do not overlap).
            for dir in missing.iter().rev() {
                match fs::create_dir(dir) {
                    Ok(()) => {
                        dirs.created.insert(dir.clone());
                    }
                    // Made meanwhile by a change staged beside this one:
                    // not empty for sure, but synced here all the same.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err("create directory", dir)(e)),
                }
                if let Some(up) = dir.parent() {
                    dirs.sync.insert(up.to_path_buf());
                }
            }
        }
        dirs.known.insert(parent.clone());
        Ok(parent)
    }

    /// Writes `bytes` to a temp file beside `full` (not yet synced), and
    /// returns it still open.
    fn stage_bytes(
        &self,
        full: &Path,
        bytes: &[u8],
        dirs: &mut StageDirs,
    ) -> Result<tempfile::NamedTempFile, StoreError> {
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
        Ok(tmp)
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
    /// (kept open for the data round's fsync when `keep_open`), and new
    /// archives linked into place.
    ///
    /// An archive is linked under its final name now, not when its stage is
    /// published: nothing names it until the package indexes of a later
    /// stage are, and linking it here lets the data round make its
    /// directory entry durable, which saves the change a whole round of
    /// directory syncs. If the name is taken (an earlier change that deletes
    /// that file is not yet published), the link waits for publishing, as
    /// [`Op::Create`] says, and fails then if the name is still taken.
    fn prepare_ops(
        &self,
        ops: &[Op],
        keep_open: bool,
    ) -> Result<(Vec<Step>, StageDirs), StoreError> {
        let mut dirs = StageDirs::default();
        let mut steps: Vec<Step> = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { path, bytes } => {
                    let full = self.full(path);
                    let (file, tmp) = self.stage_bytes(&full, bytes, &mut dirs)?.into_parts();
                    steps.push(Step::Rename {
                        tmp,
                        file: keep_open.then_some(file),
                        full,
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
                    let mut linked = fs::hard_link(src.path(), &full);
                    if matches!(&linked, Err(e) if e.kind() == io::ErrorKind::NotFound)
                        && self.restore_parent(&full, &mut dirs)?
                    {
                        linked = fs::hard_link(src.path(), &full);
                    }
                    match linked {
                        Ok(()) => steps.push(Step::Created { src, full }),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            steps.push(Step::Create { src, full });
                        }
                        Err(e) => return Err(io_err("link", &full)(e)),
                    }
                }
            }
        }
        Ok((steps, dirs))
    }

    /// Prepares one stage, in contiguous runs of ops: one run, or for a
    /// rebuild's stage of thousands of new files (bound by the kernel's
    /// work per file) one run per share of the cores, each kept in order.
    /// Removals prune directories, which runs in parallel could race on.
    fn prepare_stage(
        &self,
        stage: &[Op],
        keep_open: bool,
    ) -> Result<Vec<(Vec<Step>, StageDirs)>, StoreError> {
        let parallel = stage.len() >= PARALLEL_STAGE
            && !stage.iter().any(|op| matches!(op, Op::Remove { .. }));
        if !parallel {
            return Ok(vec![self.prepare_ops(stage, keep_open)?]);
        }
        let threads = rayon::current_num_threads().max(1);
        stage
            .par_chunks(stage.len().div_ceil(threads * 4))
            .map(|ops| self.prepare_ops(ops, keep_open))
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
                Step::Rename { tmp, file, full } => {
                    // The data round has taken and closed it already.
                    drop(file);
                    let old = hold_replaced(&full);
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
                // Visible and durable since the data round.
                Step::Created { .. } => {}
            }
        }
        Ok((dirs.sync, dirs.replaced))
    }

    /// Makes files or directories durable: an fsync each, all at once on
    /// the threads of [`durable`], or for more than [`SYNCFS_THRESHOLD`]
    /// paths one `syncfs(2)` of the tree's file system. Every fsync pays a
    /// disk flush of its own (ext4 without a journal has no commit to fold
    /// them into), so syncfs is cheaper for many files (10 new files on
    /// this project's machine: 2.4 ms with parallel fsyncs, 1.0 ms with one
    /// syncfs). But syncfs also writes back every other dirty page of that
    /// file system, such as a large upload streaming into `staging/`, so a
    /// small change keeps to its own files: a syncfs for every round made
    /// sequential uploads slower end to end here (BENCHMARKS.md, session of
    /// 2026-12-02).
    fn sync_all(&self, items: Vec<Durable>) -> Result<(), StoreError> {
        if items.len() > SYNCFS_THRESHOLD {
            let paths: Vec<&Path> = items.iter().map(Durable::path).collect();
            return sync_filesystem(&self.root, &paths);
        }
        durable::sync_all(items).map_err(|(path, e)| io_err("sync", &path)(e))
    }

    /// [`LocalStore::sync_all`] for directories.
    fn sync_dirs<'a>(&self, dirs: impl IntoIterator<Item = &'a PathBuf>) -> Result<(), StoreError> {
        self.sync_all(dirs.into_iter().cloned().map(Durable::Path).collect())
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
        //
        // Temp files stay open until their fsync unless there are too many
        // for one process's descriptors (a rebuild), which a syncfs covers.
        let new_files = stages
            .iter()
            .flatten()
            .filter(|op| matches!(op, Op::Put { .. } | Op::Create { .. }))
            .count();
        let keep_open = new_files <= SYNCFS_THRESHOLD;
        let mut staged = LocalStaged {
            store: self,
            prepared: Vec::new(),
        };
        for stage in stages.iter().filter(|stage| !stage.is_empty()) {
            // Pushed one by one: on an error, dropping `staged` removes
            // what the stages before linked.
            let chunks = self.prepare_stage(stage, keep_open)?;
            staged.prepared.push(chunks);
        }
        let mut round = Vec::new();
        for (steps, dirs) in staged.prepared.iter_mut().flatten() {
            for step in steps.iter_mut() {
                step.take_durable(&mut round);
            }
            // So far `dirs.sync` holds the parents of the directories
            // staging created: they exist now, so their entries are made
            // durable with the data, and publishing syncs only what its
            // renames touch.
            round.extend(
                std::mem::take(&mut dirs.sync)
                    .into_iter()
                    .map(Durable::Path),
            );
        }
        round.sort_by(|a, b| a.path().cmp(b.path()));
        round.dedup_by(|a, b| a.path() == b.path());
        self.sync_all(round)?;
        Ok(Box::new(staged))
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
        durable::sync_all(
            paths
                .iter()
                .map(|p| Durable::Path(p.to_path_buf()))
                .collect(),
        )
        .map_err(|(path, e)| io_err("sync", &path)(e))
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
    fn replaced_files_are_closed_off_the_writers_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let big = |b: u8| Op::Put {
            path: p("v1/packages/index.json"),
            bytes: vec![b; 100_000],
        };
        store.apply(&[vec![big(1)]]).unwrap();
        let full = dir.path().join("v1/packages/index.json");
        let held = hold_replaced(&full);
        assert!(held.is_some());
        assert!(hold_replaced(&dir.path().join("missing")).is_none());
        fs::write(dir.path().join("small"), b"x").unwrap();
        let small = hold_replaced(&dir.path().join("small"));
        assert!(small.is_some());
        release(held.into_iter().chain(small).collect());
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
    fn new_directories_sync_only_the_entries_they_add() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        fs::create_dir_all(dir.path().join("v1/packages/x")).unwrap();
        let mut dirs = StageDirs::default();
        let full = dir.path().join("v1/packages/x/1.0.0/sub/manifest");
        let parent = store.ensure_parent(&full, &mut dirs).unwrap();
        assert_eq!(parent, dir.path().join("v1/packages/x/1.0.0/sub"));
        assert!(parent.is_dir());
        let set = |paths: &[&str]| -> BTreeSet<PathBuf> {
            paths.iter().map(|p| dir.path().join(p)).collect()
        };
        // x gained 1.0.0, and 1.0.0 gained sub; nothing above x changed.
        assert_eq!(dirs.sync, set(&["v1/packages/x", "v1/packages/x/1.0.0"]));
        assert_eq!(
            dirs.created.iter().cloned().collect::<BTreeSet<_>>(),
            set(&["v1/packages/x/1.0.0", "v1/packages/x/1.0.0/sub"])
        );
        // A directory that exists adds nothing.
        let mut dirs = StageDirs::default();
        store
            .ensure_parent(&dir.path().join("v1/packages/x/versions"), &mut dirs)
            .unwrap();
        assert!(dirs.sync.is_empty() && dirs.created.is_empty());
    }

    #[test]
    fn archives_are_linked_while_staging_and_removed_if_the_change_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("tree"));
        let upload = dir.path().join("upload");
        fs::write(&upload, b"archive").unwrap();
        let change = [
            vec![Op::Create {
                path: p("archives/x-1"),
                staged: upload.clone(),
            }],
            vec![Op::Put {
                path: p("packages/x"),
                bytes: b"names x-1".to_vec(),
            }],
        ];
        let staged = store.stage(&change).unwrap();
        // The archive is in place (nothing names it); the index is not.
        assert_eq!(store.list("").unwrap(), vec![p("archives/x-1")]);
        drop(staged);
        assert_eq!(store.list("").unwrap(), Vec::<TreePath>::new());
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(fs::read(&upload).unwrap(), b"archive", "the upload stays");

        store.stage(&change).unwrap().publish().unwrap();
        assert_eq!(
            store.list("").unwrap(),
            vec![p("archives/x-1"), p("packages/x")]
        );
    }

    #[test]
    fn an_archive_whose_name_an_earlier_change_frees_is_created_when_published() {
        // Change k deletes archives/x-1; change k+1, staged before k is
        // published, uploads it again. Staging finds the name taken, so the
        // create waits for publishing, after k.
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("tree"));
        let old = dir.path().join("old");
        fs::write(&old, b"old").unwrap();
        let create = |staged: &Path| {
            vec![vec![Op::Create {
                path: p("archives/x-1"),
                staged: staged.to_path_buf(),
            }]]
        };
        store.apply(&create(&old)).unwrap();
        let new = dir.path().join("new");
        fs::write(&new, b"new").unwrap();
        let again = create(&new);
        let staged = store.stage(&again).unwrap();
        assert_eq!(store.get(&p("archives/x-1")).unwrap().unwrap(), b"old");
        store
            .apply(&[vec![Op::Remove {
                path: p("archives/x-1"),
            }]])
            .unwrap();
        staged.publish().unwrap();
        assert_eq!(store.get(&p("archives/x-1")).unwrap().unwrap(), b"new");

        // Dropping a change whose create waited removes nothing.
        let taken = create(&old);
        drop(store.stage(&taken).unwrap());
        assert_eq!(store.get(&p("archives/x-1")).unwrap().unwrap(), b"new");
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
        // Staging linked x-2 into `archives/` already, so only `v1/` went.
        assert!(!dir.path().join("v1").exists());
        assert_eq!(
            store.list("archives").unwrap(),
            vec![p("archives/x-2")],
            "the staged archive is in place, named by nothing yet"
        );
        staged.publish().unwrap();
        assert_eq!(store.get(&p("archives/x-2")).unwrap().unwrap(), b"two");
        assert_eq!(store.get(&p("v1/x/latest/any")).unwrap().unwrap(), b"two");
        assert_eq!(temp_files(dir.path()), 0);
    }
}
