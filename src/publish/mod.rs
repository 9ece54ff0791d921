//! The publisher: the one code path that changes a repository's tree.
//!
//! Every change — an upload, a delete, a tag, a full rebuild — goes through
//! [`Publisher`], which keeps the repository's packages in memory, applies the
//! change, and hands ordered stages of file operations to the [`Store`]:
//!
//! 1. the archives, each created once (a second upload of the same file
//!    loses);
//! 2. `packages/NAME` and the package's `v1/` documents and links;
//! 3. `versions`, `names`, `v1/packages/index.json`, the freshness bins,
//!    then the signed freshness record, renamed into place in that order;
//! 4. removals (archives of deleted releases, stale `v1/` files), after no
//!    index names them any more.
//!
//! Each stage is durable before the next becomes visible, so a reader (or a
//! crash) never sees an index that names a missing file. All rendering goes
//! through [`render`], so N incremental publishes and one [`Publisher::rebuild`]
//! give byte-identical indexes.
//!
//! A change is made in two steps. [`Publisher::prepare_batch`] (and the other
//! `prepare` paths) check it, render and sign its files and apply it to the
//! in-memory model, under the model's lock; [`Publisher::commit`] then writes
//! it to the store, in the order the changes were prepared, without that lock.
//! So while one batch waits for the disk the next one is already being signed
//! (a pipelined group commit). If a write fails, every change prepared on top
//! of it fails too, and the model is reloaded from the tree before the next.

pub use crate::index::layout;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rayon::prelude::*;

use crate::archive::{self, ArchiveError, ArchiveInfo, ArchiveKind};
use crate::ident::{Arch, IdentError, PackageName, RepoName, TagName, Version};
use crate::index::codec::{decode_index, CodecError};
use crate::index::{pb, KeyError, Signer};
use crate::limits::Limits;
use crate::store::{Op, Store, StoreError, TreePath};
pub use layout::Layout;
use render::Digest256;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Not applied because a change prepared before it failed to be written.
    #[error("not applied: an earlier write to the tree failed ({0}); try again")]
    Aborted(String),
    #[error(transparent)]
    Ident(#[from] IdentError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {source}")]
    Index { path: String, source: CodecError },
    #[error("rebuild refused, nothing was changed:\n{}", .0.join("\n"))]
    Rebuild(Vec<String>),
}

/// Settings of a publisher.
#[derive(Debug, Clone)]
pub struct Options {
    pub limits: Limits,
    /// How long a freshness sidecar stays valid, in seconds. Default 30 days.
    pub freshness_ttl: i64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            freshness_ttl: 30 * 24 * 3600,
        }
    }
}

/// An optional end-to-end signature of an archive by its publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherSignature {
    pub signature: Vec<u8>,
    pub key_id: String,
}

/// One archive to add: inspected, staged on local disk.
#[derive(Debug, Clone)]
pub struct Upload {
    pub info: ArchiveInfo,
    /// The archive's bytes, in a local file the store can link or copy from.
    pub staged: PathBuf,
    /// Unix seconds.
    pub uploaded_at: i64,
    pub signature: Option<PublisherSignature>,
}

/// What a successful publish added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub name: PackageName,
    pub version: Version,
    pub arch: Arch,
    pub path: TreePath,
    pub sha256: [u8; 32],
    pub size: u64,
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub packages: usize,
    pub releases: usize,
    pub artifacts: usize,
    pub files_written: usize,
    pub files_removed: usize,
}

/// The in-memory model of the repository, as the prepared changes left it.
struct State {
    packages: BTreeMap<String, pb::Package>,
    /// Each package's pre-encoded share of `versions`, `names` and the v1
    /// list, same keys as `packages`, in the groups the global files are
    /// made of.
    rows: render::Rows,
    /// The digest of each `packages/NAME`, by name, in its freshness bin
    /// ([`render::FRESHNESS_BINS`] of them).
    bins: Vec<BTreeMap<String, Digest256>>,
    /// What `freshness` lists: `names`, `versions` and each bin file, by path
    /// relative to the repository.
    top: BTreeMap<String, Digest256>,
    /// Bins whose file in the tree is missing or stale (a tree written
    /// before bins existed): written by the next change.
    dirty_bins: BTreeSet<u8>,
    /// Whether the tree's `public_key` is this signer's.
    key_written: bool,
    generation: u64,
    /// Sequence number of the next prepared change.
    next_seq: u64,
    /// Bumped each time the model is reloaded after a failed write.
    epoch: u64,
}

impl State {
    fn empty() -> Self {
        Self {
            packages: BTreeMap::new(),
            rows: render::Rows::default(),
            bins: vec![BTreeMap::new(); render::FRESHNESS_BINS],
            top: BTreeMap::new(),
            dirty_bins: BTreeSet::new(),
            key_written: false,
            generation: 0,
            next_seq: 0,
            epoch: 0,
        }
    }
}

/// Orders commits: each waits for the one prepared before it.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    turn: Condvar,
}

#[derive(Default)]
struct QueueState {
    /// Every change with a lower sequence number has been committed or
    /// failed.
    done: u64,
    /// The epoch of a failed write, with its error: changes prepared in that
    /// epoch were built on it and must not be written.
    broken: Option<(u64, String)>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finish(&self, seq: u64, epoch: u64, error: Option<String>) {
        let mut q = self.lock();
        if let Some(e) = error {
            // The first failure of an epoch is the cause of the others.
            if q.broken.as_ref().is_none_or(|(b, _)| *b != epoch) {
                q.broken = Some((epoch, e));
            }
        }
        q.done = q.done.max(seq + 1);
        self.turn.notify_all();
    }
}

/// A change that is in the model but not yet in the tree: hand it to
/// [`Publisher::commit`]. Dropping it instead counts as a failed write.
#[must_use = "a prepared change must be committed"]
pub struct Prepared {
    seq: u64,
    epoch: u64,
    stages: Vec<Vec<Op>>,
    queue: Arc<Queue>,
    finished: bool,
}

impl Prepared {
    /// How many file operations the change makes.
    pub fn ops(&self) -> usize {
        self.stages.iter().map(Vec::len).sum()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.finished {
            self.queue.finish(
                self.seq,
                self.epoch,
                Some("a prepared change was dropped".into()),
            );
        }
    }
}

/// A prepared batch of uploads: each upload's own outcome, valid once the
/// batch is committed.
pub struct PreparedBatch {
    results: Vec<Result<Published, PublishError>>,
    prepared: Option<Prepared>,
}

/// One package's new content (`None`: the package is gone).
struct Change {
    name: String,
    new: Option<pb::Package>,
}

/// Publishes into one repository (the root one, or an organization's).
pub struct Publisher {
    store: Arc<dyn Store>,
    signer: Arc<dyn Signer>,
    repository: RepoName,
    layout: Layout,
    options: Options,
    clock: fn() -> i64,
    state: Mutex<State>,
    queue: Arc<Queue>,
    /// The deflated groups of the last `versions` and `names`. Only ever
    /// locked while `state` is (or by a rebuild, which holds the tree).
    global_cache: Mutex<render::GlobalCache>,
}

/// Milliseconds, for timings in logs.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

/// `f()`, and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, std::time::Duration) {
    let started = std::time::Instant::now();
    let out = f();
    (out, started.elapsed())
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Publisher {
    /// Opens the repository, loading and verifying its current indexes. An
    /// empty tree is an empty repository.
    pub fn open(
        store: Arc<dyn Store>,
        signer: Arc<dyn Signer>,
        repository: RepoName,
        layout: Layout,
        options: Options,
    ) -> Result<Self, PublishError> {
        let this = Self {
            store,
            signer,
            repository,
            layout,
            options,
            clock: unix_now,
            state: Mutex::new(State::empty()),
            queue: Arc::default(),
            global_cache: Mutex::default(),
        };
        let loaded = this.load()?;
        *this.lock() = loaded;
        Ok(this)
    }

    /// The cache of deflated `versions`/`names` groups. Its entries are
    /// checked before use, so one left behind by a panic is still sound.
    fn global_cache(&self) -> MutexGuard<'_, render::GlobalCache> {
        self.global_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: fn() -> i64) -> Self {
        self.clock = clock;
        self
    }

    pub fn repository(&self) -> &RepoName {
        &self.repository
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.options.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock may leave the model ahead of the
        // tree; the tree itself is always consistent, so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model's lock, with the model reloaded from the tree first if a
    /// write it was ahead of has failed.
    fn lock_current(&self) -> Result<MutexGuard<'_, State>, PublishError> {
        let mut state = self.lock();
        let broken = self.queue.lock().broken.clone();
        if let Some((epoch, error)) = broken {
            if epoch == state.epoch {
                tracing::warn!(%error, "a write to the tree failed; reloading the indexes");
                let mut fresh = self.load()?;
                fresh.next_seq = state.next_seq;
                // `broken` stays set: changes of the old epoch still
                // waiting for their turn must find it and not write.
                fresh.epoch = state.epoch + 1;
                *state = fresh;
            }
        }
        Ok(state)
    }

    fn decode<M: crate::index::codec::IndexMessage>(
        &self,
        path: &TreePath,
        bytes: &[u8],
    ) -> Result<M, PublishError> {
        decode_index(
            bytes,
            self.signer.public_key(),
            self.repository.as_str(),
            self.options.limits.max_index,
        )
        .map_err(|source| PublishError::Index {
            path: path.to_string(),
            source,
        })
    }

    fn load(&self) -> Result<State, PublishError> {
        let mut state = State::empty();
        let fresh_path = self.layout.path(layout::FRESHNESS)?;
        if let Some(bytes) = self.store.get(&fresh_path)? {
            let f: pb::Freshness = self.decode(&fresh_path, &bytes)?;
            state.generation = f.generation;
        }
        let key_path = self.layout.path(layout::PUBLIC_KEY)?;
        state.key_written =
            self.store.get(&key_path)?.as_deref() == Some(self.public_key_pem().as_slice());
        let names_path = self.layout.path(layout::NAMES)?;
        let Some(names_bytes) = self.store.get(&names_path)? else {
            return Ok(state);
        };
        let names: pb::Names = self.decode(&names_path, &names_bytes)?;
        state
            .top
            .insert(layout::NAMES.into(), Digest256::of(&names_bytes));
        let versions_path = self.layout.path(layout::VERSIONS)?;
        if let Some(b) = self.store.get(&versions_path)? {
            state.top.insert(layout::VERSIONS.into(), Digest256::of(&b));
        }
        let mut rows = BTreeMap::new();
        for entry in names.packages {
            let name = PackageName::new(&entry.name)?;
            let path = self.layout.package(&name)?;
            let bytes = self.store.get(&path)?.ok_or_else(|| {
                PublishError::Invalid(format!("{names_path} names {name} but {path} is missing"))
            })?;
            let pkg: pb::Package = self.decode(&path, &bytes)?;
            state.bins[usize::from(render::bin_of(&entry.name))]
                .insert(entry.name.clone(), Digest256::of(&bytes));
            rows.insert(entry.name.clone(), render::row(&pkg));
            state.packages.insert(entry.name, pkg);
        }
        state.rows = render::Rows::new(rows);
        // The bins as the tree should hold them; any that differ are
        // rewritten by the next change.
        for (bin, digests) in state.bins.iter().enumerate() {
            if digests.is_empty() {
                continue;
            }
            let bin = bin as u8;
            let bytes = self.bin_file(bin, digests, &mut state.top);
            if self.store.get(&self.layout.freshness_bin(bin)?)?.as_deref() != Some(&bytes[..]) {
                state.dirty_bins.insert(bin);
            }
        }
        Ok(state)
    }

    fn public_key_pem(&self) -> Vec<u8> {
        self.signer.public_key().to_pem().into_bytes()
    }

    /// The current index of one package.
    pub fn package(&self, name: &str) -> Option<pb::Package> {
        self.lock().packages.get(name).cloned()
    }

    /// Every package name.
    pub fn package_names(&self) -> Vec<String> {
        self.lock().packages.keys().cloned().collect()
    }

    /// Publishes one archive.
    pub fn publish(&self, upload: Upload) -> Result<Published, PublishError> {
        self.publish_batch(vec![upload])
            .pop()
            .unwrap_or_else(|| Err(PublishError::Invalid("empty batch".into())))
    }

    /// Publishes several archives with one rewrite of `versions` and `names`
    /// (group commit). Each upload succeeds or fails on its own; a failure of
    /// the shared write fails them all.
    pub fn publish_batch(&self, uploads: Vec<Upload>) -> Vec<Result<Published, PublishError>> {
        self.commit_batch(self.prepare_batch(uploads))
    }

    /// The first half of [`Publisher::publish_batch`]: checks the uploads and
    /// prepares one change for those that pass.
    pub fn prepare_batch(&self, uploads: Vec<Upload>) -> PreparedBatch {
        let mut state = match self.lock_current() {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                return PreparedBatch {
                    results: uploads
                        .iter()
                        .map(|_| Err(PublishError::Aborted(msg.clone())))
                        .collect(),
                    prepared: None,
                };
            }
        };
        let mut results: Vec<Result<Published, PublishError>> = Vec::with_capacity(uploads.len());
        let mut scratch: BTreeMap<String, pb::Package> = BTreeMap::new();
        let mut creates = Vec::new();
        for up in &uploads {
            let r = self
                .stage_artifact(&state.packages, &mut scratch, up)
                .map(|path| {
                    creates.push(Op::Create {
                        path: path.clone(),
                        staged: up.staged.clone(),
                    });
                    Published {
                        name: up.info.name.clone(),
                        version: up.info.version.clone(),
                        arch: up.info.arch.clone(),
                        path,
                        sha256: up.info.sha256,
                        size: up.info.size,
                    }
                });
            results.push(r);
        }
        if scratch.is_empty() {
            return PreparedBatch {
                results,
                prepared: None,
            };
        }
        let changes = scratch
            .into_iter()
            .map(|(name, pkg)| Change {
                name,
                new: Some(pkg),
            })
            .collect();
        match self.prepare_changes(&mut state, changes, creates, Vec::new()) {
            Ok(prepared) => PreparedBatch {
                results,
                prepared: Some(prepared),
            },
            Err(e) => {
                let msg = e.to_string();
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(PublishError::Aborted(msg.clone()));
                }
                PreparedBatch {
                    results,
                    prepared: None,
                }
            }
        }
    }

    /// The second half of [`Publisher::publish_batch`].
    pub fn commit_batch(&self, batch: PreparedBatch) -> Vec<Result<Published, PublishError>> {
        let PreparedBatch {
            mut results,
            prepared,
        } = batch;
        if let Some(prepared) = prepared {
            if let Err(e) = self.commit(prepared) {
                let msg = e.to_string();
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(match &e {
                        PublishError::Aborted(m) => PublishError::Aborted(m.clone()),
                        _ => PublishError::Aborted(msg.clone()),
                    });
                }
            }
        }
        results
    }

    /// Writes a prepared change to the tree, after every change prepared
    /// before it.
    pub fn commit(&self, mut prepared: Prepared) -> Result<(), PublishError> {
        // The new bytes are written and synced before the turn comes: they
        // stay invisible until published, so this overlaps the change
        // before, which is still being published.
        let started = std::time::Instant::now();
        let staged = self.store.stage(&prepared.stages);
        let staged_at = started.elapsed();
        let broken = {
            let mut q = self.queue.lock();
            while q.done < prepared.seq {
                q = self.queue.turn.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            q.broken
                .as_ref()
                .filter(|(epoch, _)| *epoch == prepared.epoch)
                .map(|(_, e)| e.clone())
        };
        let turn_at = started.elapsed();
        let result = match (broken, staged) {
            (Some(e), _) => Err(PublishError::Aborted(e)),
            (None, Err(e)) => Err(e.into()),
            (None, Ok(staged)) => staged.publish().map_err(PublishError::from),
        };
        // Where a commit's time goes: writing and syncing the new bytes,
        // waiting for the change before it, making it visible.
        tracing::debug!(
            seq = prepared.seq,
            ops = prepared.ops(),
            stage_ms = ms(staged_at),
            wait_ms = ms(turn_at - staged_at),
            publish_ms = ms(started.elapsed() - turn_at),
            "commit"
        );
        let error = match &result {
            Ok(()) => None,
            Err(PublishError::Aborted(e)) => Some(e.clone()),
            Err(e) => {
                tracing::error!(error = %e, "writing to the tree failed");
                Some(e.to_string())
            }
        };
        self.queue.finish(prepared.seq, prepared.epoch, error);
        prepared.finished = true;
        result
    }

    /// Merges one upload into `scratch` (copies of the packages a batch
    /// touches), leaving `scratch` unchanged if it is refused. Returns the
    /// archive's path in the tree.
    fn stage_artifact(
        &self,
        packages: &BTreeMap<String, pb::Package>,
        scratch: &mut BTreeMap<String, pb::Package>,
        upload: &Upload,
    ) -> Result<TreePath, PublishError> {
        let info = &upload.info;
        let name = info.name.as_str();
        if !packages.contains_key(name) && !scratch.contains_key(name) {
            check_confusable(packages, &info.name)?;
            check_confusable(scratch, &info.name)?;
        }
        let mut pkg = match scratch.get(name).or_else(|| packages.get(name)) {
            Some(p) => p.clone(),
            None => pb::Package {
                name: name.to_string(),
                repository: self.repository.to_string(),
                ..Default::default()
            },
        };
        let artifact = artifact_from(info, upload.uploaded_at, upload.signature.as_ref());
        merge_artifact(&mut pkg, info, artifact)?;
        let path = self.layout.path(&info.tree_path())?;
        // Not in any index, yet in the tree: left by a publish that was
        // interrupted before its indexes were written.
        if self.store.exists(&path)? {
            return Err(PublishError::Conflict(format!(
                "{path} already exists in the tree, though no index names it \
                 (an interrupted publish?); `niso registry build` adopts it"
            )));
        }
        render::normalize(&mut pkg);
        scratch.insert(name.to_string(), pkg);
        Ok(path)
    }

    /// Removes one artifact; a release without artifacts disappears, with the
    /// tags that pointed at it, and a package without releases disappears.
    pub fn delete(
        &self,
        name: &PackageName,
        version: &Version,
        arch: &Arch,
    ) -> Result<(), PublishError> {
        let prepared = {
            let mut state = self.lock_current()?;
            let not_found =
                || PublishError::NotFound(format!("{name} {version} ({arch}) is not published"));
            let mut pkg = state
                .packages
                .get(name.as_str())
                .cloned()
                .ok_or_else(not_found)?;
            let ri = pkg
                .releases
                .iter()
                .position(|r| r.version == version.as_str())
                .ok_or_else(not_found)?;
            let release = &mut pkg.releases[ri];
            let ai = release
                .artifacts
                .iter()
                .position(|a| a.arch == arch.as_str())
                .ok_or_else(not_found)?;
            let removed = release.artifacts.remove(ai);
            if removed.path.starts_with(layout::TARBALLS_DIR) {
                release.inner_checksum.clear();
                release.outer_checksum = None;
                release.dependencies.clear();
            }
            if release.artifacts.is_empty() {
                pkg.releases.remove(ri);
                pkg.tags.retain(|t| t.version != version.as_str());
            }
            render::normalize(&mut pkg);
            let change = Change {
                name: name.to_string(),
                new: (!pkg.releases.is_empty()).then_some(pkg),
            };
            let removals = vec![Op::Remove {
                path: self.layout.path(&removed.path)?,
            }];
            self.prepare_changes(&mut state, vec![change], Vec::new(), removals)?
        };
        self.commit(prepared)
    }

    /// Points `tag` at `version` (creating or moving it).
    pub fn set_tag(
        &self,
        name: &PackageName,
        tag: &TagName,
        version: &Version,
    ) -> Result<(), PublishError> {
        let prepared = {
            let mut state = self.lock_current()?;
            let mut pkg =
                state.packages.get(name.as_str()).cloned().ok_or_else(|| {
                    PublishError::NotFound(format!("package {name} does not exist"))
                })?;
            if !pkg.releases.iter().any(|r| r.version == version.as_str()) {
                return Err(PublishError::NotFound(format!(
                    "{name} {version} is not published"
                )));
            }
            pkg.tags.retain(|t| t.tag != tag.as_str());
            pkg.tags.push(pb::Tag {
                tag: tag.to_string(),
                version: version.to_string(),
            });
            render::normalize(&mut pkg);
            let change = Change {
                name: name.to_string(),
                new: Some(pkg),
            };
            self.prepare_changes(&mut state, vec![change], Vec::new(), Vec::new())?
        };
        self.commit(prepared)
    }

    /// Re-signs the freshness sidecar with a new generation and expiry, and
    /// writes any index that is missing (a new repository's empty ones).
    pub fn refresh(&self) -> Result<(), PublishError> {
        let prepared = {
            let mut state = self.lock_current()?;
            self.prepare_changes(&mut state, Vec::new(), Vec::new(), Vec::new())?
        };
        self.commit(prepared)
    }

    /// Renders `changes` (signing the touched packages in parallel), applies
    /// them to the model and returns the stages that write them: `creates`
    /// (new archives) first, `removals` (files no index names any more)
    /// last. On error the model is unchanged.
    ///
    /// The `v1/` files to write are found by comparing what the package's
    /// old and new content render to, in memory: a publish reads nothing
    /// from the tree. (`rebuild` compares with the tree itself.)
    fn prepare_changes(
        &self,
        state: &mut State,
        changes: Vec<Change>,
        creates: Vec<Op>,
        mut removals: Vec<Op>,
    ) -> Result<Prepared, PublishError> {
        // Unchanged packages (a tag set to where it points) are left alone.
        let changes: Vec<Change> = changes
            .into_iter()
            .filter(|c| state.packages.get(&c.name) != c.new.as_ref())
            .collect();
        // Rows and which global files they change.
        let mut wanted = render::Wanted {
            versions: !state.top.contains_key(layout::VERSIONS),
            names: !state.top.contains_key(layout::NAMES),
            v1_index: false,
        };
        let new_rows: render::RowChanges = changes
            .iter()
            .map(|c| (c.name.clone(), c.new.as_ref().map(render::row)))
            .collect();
        for (name, row) in &new_rows {
            match (state.rows.get(name), row) {
                (Some(old), Some(new)) => {
                    wanted.versions |= old.versions != new.versions;
                    wanted.names |= old.names != new.names;
                    wanted.v1_index |= old.json != new.json;
                }
                (None, None) => {}
                _ => wanted = render::Wanted::ALL,
            }
        }
        // The v1 list is written with the first indexes of a repository.
        wanted.v1_index |= state.top.is_empty();
        let regrouped = state.rows.regroup(&new_rows);
        // The packages and the global files are signed at the same time.
        let render_packages = || -> Result<Vec<RenderedChange>, PublishError> {
            changes
                .par_iter()
                .map(|c| self.render_change(state.packages.get(&c.name), c))
                .collect()
        };
        let render_globals = || -> Result<render::GlobalFiles, PublishError> {
            if !(wanted.versions || wanted.names || wanted.v1_index) {
                return Ok(render::GlobalFiles::default());
            }
            render::global_files(
                self.repository.as_str(),
                &state.rows.groups_with(&regrouped),
                wanted,
                self.signer.as_ref(),
                &mut self.global_cache(),
            )
        };
        let t0 = std::time::Instant::now();
        let ((rendered, t_pkg), (globals, t_glob)) =
            rayon::join(|| timed(render_packages), || timed(render_globals));
        let (rendered, globals) = (rendered?, globals?);
        let t_join = t0.elapsed();

        // The bins the changed packages live in, and the top-level list.
        let mut bins: BTreeMap<u8, BTreeMap<String, Digest256>> = BTreeMap::new();
        for bin in &state.dirty_bins {
            bins.insert(*bin, state.bins[usize::from(*bin)].clone());
        }
        for r in &rendered {
            let bin = render::bin_of(&r.name);
            let entry = bins
                .entry(bin)
                .or_insert_with(|| state.bins[usize::from(bin)].clone());
            match &r.digest {
                Some(d) => entry.insert(r.name.clone(), d.clone()),
                None => entry.remove(&r.name),
            };
        }
        let mut top = state.top.clone();
        let mut bin_ops = Vec::new();
        for (bin, digests) in &bins {
            let path = self.layout.freshness_bin(*bin)?;
            if digests.is_empty() {
                top.remove(&Layout::freshness_bin_rel(*bin));
                removals.push(Op::Remove { path });
            } else {
                let bytes = self.bin_file(*bin, digests, &mut top);
                bin_ops.push(Op::Put { path, bytes });
            }
        }
        let global_ops = self.global_ops(state, globals, bin_ops, &mut top)?;
        // Where preparing a change goes: the packages and the global lists
        // are rendered and signed side by side, then the freshness record.
        tracing::debug!(
            packages_ms = ms(t_pkg),
            globals_ms = ms(t_glob),
            join_ms = ms(t_join),
            total_ms = ms(t0.elapsed()),
            "prepared"
        );

        let mut package_ops = Vec::new();
        for r in rendered {
            package_ops.extend(r.writes);
            removals.extend(r.removals);
        }

        // Nothing below fails: apply the change to the model.
        state.rows.apply(new_rows, regrouped);
        for c in changes {
            match c.new {
                Some(p) => state.packages.insert(c.name, p),
                None => state.packages.remove(&c.name),
            };
        }
        for (bin, digests) in bins {
            state.bins[usize::from(bin)] = digests;
        }
        Ok(self.enqueue(state, top, vec![creates, package_ops, global_ops, removals]))
    }

    /// Renders freshness bin `bin` and lists its digest in `top`.
    fn bin_file(
        &self,
        bin: u8,
        digests: &BTreeMap<String, Digest256>,
        top: &mut BTreeMap<String, Digest256>,
    ) -> Vec<u8> {
        let bytes = render::freshness_bin(self.repository.as_str(), bin, digests);
        top.insert(Layout::freshness_bin_rel(bin), Digest256::of(&bytes));
        bytes
    }

    /// The stage of the global files: `versions`, the public key if the
    /// tree lacks it, `names`, the v1 list, the freshness bins, then the
    /// freshness record over `top` (which gets the digests of `versions` and
    /// `names`), signed with the next generation. versions before names: a
    /// reader of names finds every package in versions. All of them become
    /// visible in this order, after the packages they name are durable.
    fn global_ops(
        &self,
        state: &State,
        globals: render::GlobalFiles,
        bin_ops: Vec<Op>,
        top: &mut BTreeMap<String, Digest256>,
    ) -> Result<Vec<Op>, PublishError> {
        if let Some(v) = &globals.versions {
            top.insert(layout::VERSIONS.into(), Digest256::of(v));
        }
        if let Some(n) = &globals.names {
            top.insert(layout::NAMES.into(), Digest256::of(n));
        }
        let now = (self.clock)();
        let fresh = render::freshness(
            self.repository.as_str(),
            state.generation + 1,
            now,
            now + self.options.freshness_ttl,
            top,
            self.signer.as_ref(),
        )?;
        let key = (!state.key_written).then(|| self.public_key_pem());
        let mut ops = Vec::with_capacity(bin_ops.len() + 5);
        for (rel, bytes) in [
            (layout::VERSIONS, globals.versions),
            (layout::PUBLIC_KEY, key),
            (layout::NAMES, globals.names),
            (layout::V1_INDEX, globals.v1_index),
        ] {
            if let Some(bytes) = bytes {
                ops.push(Op::Put {
                    path: self.layout.path(rel)?,
                    bytes,
                });
            }
        }
        ops.extend(bin_ops);
        ops.push(Op::Put {
            path: self.layout.path(layout::FRESHNESS)?,
            bytes: fresh,
        });
        Ok(ops)
    }

    /// Records in the model that a change whose files are `stages` was
    /// prepared (the freshness record over `top`, the next generation), and
    /// queues it for [`Publisher::commit`].
    fn enqueue(
        &self,
        state: &mut State,
        top: BTreeMap<String, Digest256>,
        stages: Vec<Vec<Op>>,
    ) -> Prepared {
        state.top = top;
        state.dirty_bins.clear();
        state.key_written = true;
        state.generation += 1;
        let seq = state.next_seq;
        state.next_seq += 1;
        Prepared {
            seq,
            epoch: state.epoch,
            stages,
            queue: self.queue.clone(),
            finished: false,
        }
    }

    /// The files one package change writes and removes.
    fn render_change(
        &self,
        old: Option<&pb::Package>,
        change: &Change,
    ) -> Result<RenderedChange, PublishError> {
        let old_ops = match old {
            Some(p) => render::v1_files(&self.layout, p)?,
            None => Vec::new(),
        };
        let (new_ops, digest) = match &change.new {
            Some(p) => {
                let (ops, d) = render::package_files(&self.layout, p, self.signer.as_ref())?;
                (ops, Some(d))
            }
            None => (Vec::new(), None),
        };
        let new_paths: BTreeSet<&TreePath> = new_ops.iter().map(Op::path).collect();
        let mut removals: Vec<Op> = old_ops
            .iter()
            .map(Op::path)
            .filter(|p| !new_paths.contains(p))
            .map(|p| Op::Remove { path: p.clone() })
            .collect();
        if change.new.is_none() {
            removals.push(Op::Remove {
                path: self.layout.package(&PackageName::new(&change.name)?)?,
            });
        }
        let writes = new_ops
            .into_iter()
            .filter(|op| !old_ops.iter().any(|o| same_op(o, op)))
            .collect();
        Ok(RenderedChange {
            name: change.name.clone(),
            writes,
            removals,
            digest,
        })
    }

    /// Regenerates every index of the repository from the archives in the
    /// tree (`tarballs/*.tar`, `archives/*.niso`).
    ///
    /// What archives cannot tell — upload times, publisher signatures, tags,
    /// retirements — is carried over from the current (verified) indexes;
    /// an archive no index knows gets its file's modification time as upload
    /// time. Any bad archive refuses the whole rebuild, changing nothing.
    pub fn rebuild(&self) -> Result<RebuildReport, PublishError> {
        let (prepared, report) = {
            let mut state = self.lock_current()?;
            self.prepare_rebuild(&mut state)?
        };
        self.commit(prepared)?;
        Ok(report)
    }

    fn prepare_rebuild(
        &self,
        state: &mut State,
    ) -> Result<(Prepared, RebuildReport), PublishError> {
        let mut paths = self.store.list(&self.layout.dir(layout::TARBALLS_DIR))?;
        paths.extend(self.store.list(&self.layout.dir(layout::ARCHIVES_DIR))?);
        let inspected: Vec<_> = paths.par_iter().map(|p| self.inspect_one(p)).collect();

        let mut problems = Vec::new();
        let mut packages: BTreeMap<String, pb::Package> = BTreeMap::new();
        let mut normalized: std::collections::HashMap<String, String> = Default::default();
        for (path, result) in paths.iter().zip(inspected) {
            let (info, mtime) = match result {
                Ok(x) => x,
                Err(e) => {
                    problems.push(format!("{path}: {e}"));
                    continue;
                }
            };
            let expected = self.layout.path(&info.tree_path())?;
            if &expected != path {
                problems.push(format!(
                    "{path}: holds {} {} ({}), so it must be named {expected}",
                    info.name, info.version, info.arch
                ));
                continue;
            }
            // One normalised name per package (see check_confusable), kept
            // in a map: a scan per archive would make a rebuild O(N²).
            match normalized.entry(info.name.normalized()) {
                std::collections::hash_map::Entry::Occupied(e) if e.get() != info.name.as_str() => {
                    problems.push(format!(
                        "{path}: package name {} is too similar to the package {}",
                        info.name,
                        e.get()
                    ));
                    continue;
                }
                std::collections::hash_map::Entry::Occupied(_) => {}
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(info.name.to_string());
                }
            }
            let old = state.packages.get(info.name.as_str());
            let old_artifact = old.and_then(|p| {
                p.releases
                    .iter()
                    .find(|r| r.version == info.version.as_str())
                    .and_then(|r| r.artifacts.iter().find(|a| a.arch == info.arch.as_str()))
                    .filter(|a| a.sha256 == info.sha256)
            });
            let mut artifact = artifact_from(&info, mtime, None);
            if let Some(o) = old_artifact {
                artifact.uploaded_at = o.uploaded_at;
                artifact.publisher_signature = o.publisher_signature.clone();
                artifact.publisher_key_id = o.publisher_key_id.clone();
            }
            let pkg = packages
                .entry(info.name.to_string())
                .or_insert_with(|| pb::Package {
                    name: info.name.to_string(),
                    repository: self.repository.to_string(),
                    ..Default::default()
                });
            if let Err(e) = merge_artifact(pkg, &info, artifact) {
                problems.push(format!("{path}: {e}"));
            }
        }
        if !problems.is_empty() {
            return Err(PublishError::Rebuild(problems));
        }
        // Carry over tags and retirements that still point at a release.
        for (name, pkg) in &mut packages {
            if let Some(old) = state.packages.get(name) {
                for r in &mut pkg.releases {
                    if let Some(o) = old.releases.iter().find(|o| o.version == r.version) {
                        r.retired = o.retired.clone();
                    }
                }
                let versions: BTreeSet<&str> =
                    pkg.releases.iter().map(|r| r.version.as_str()).collect();
                pkg.tags = old
                    .tags
                    .iter()
                    .filter(|t| versions.contains(t.version.as_str()))
                    .cloned()
                    .collect();
            }
            render::normalize(pkg);
        }

        let mut report = RebuildReport {
            packages: packages.len(),
            releases: packages.values().map(|p| p.releases.len()).sum(),
            artifacts: packages
                .values()
                .flat_map(|p| p.releases.iter())
                .map(|r| r.artifacts.len())
                .sum(),
            ..Default::default()
        };

        // Everything that is not an archive is derived: render it all, write
        // what differs from the tree, remove what no longer belongs.
        let rendered = self.render_all(&packages, state)?;
        let mut existing: BTreeSet<TreePath> = BTreeSet::new();
        for dir in [layout::PACKAGES_DIR, "v1", layout::FRESHNESS_BINS_DIR] {
            existing.extend(self.store.list(&self.layout.dir(dir))?);
        }
        let mut keep = BTreeSet::new();
        let mut bins = vec![BTreeMap::new(); render::FRESHNESS_BINS];
        let mut candidates = Vec::new();
        for (name, ops, digest) in rendered {
            // Kept even when unchanged and so not rendered again.
            keep.insert(self.layout.package(&PackageName::new(&name)?)?);
            bins[usize::from(render::bin_of(&name))].insert(name, digest);
            for op in ops {
                keep.insert(op.path().clone());
                candidates.push(op);
            }
        }
        let rows = render::Rows::new(
            packages
                .iter()
                .map(|(n, p)| (n.clone(), render::row(p)))
                .collect(),
        );
        let globals = render::global_files(
            self.repository.as_str(),
            &rows.groups(),
            render::Wanted::ALL,
            self.signer.as_ref(),
            &mut self.global_cache(),
        )?;
        let mut top = BTreeMap::new();
        for (bin, digests) in bins.iter().enumerate() {
            if digests.is_empty() {
                continue;
            }
            let bin = bin as u8;
            let bytes = self.bin_file(bin, digests, &mut top);
            let path = self.layout.freshness_bin(bin)?;
            keep.insert(path.clone());
            candidates.push(Op::Put { path, bytes });
        }
        keep.insert(self.layout.path(layout::V1_INDEX)?);
        // Comparing with the tree reads every file: on as many threads as
        // the machine has.
        let unchanged: Vec<bool> = candidates
            .par_iter()
            .map(|op| Ok(existing.contains(op.path()) && self.unchanged(op)?))
            .collect::<Result<_, PublishError>>()?;
        let stage_packages: Vec<Op> = candidates
            .into_iter()
            .zip(unchanged)
            .filter(|(_, same)| !same)
            .map(|(op, _)| op)
            .collect();
        let removals: Vec<Op> = existing
            .difference(&keep)
            .map(|p| Op::Remove { path: p.clone() })
            .collect();
        report.files_written = stage_packages.len() + 4;
        report.files_removed = removals.len();
        // The bins are compared with the tree above, so not in this stage.
        let global_ops = self.global_ops(state, globals, Vec::new(), &mut top)?;

        state.packages = packages;
        state.rows = rows;
        state.bins = bins;
        let prepared = self.enqueue(state, top, vec![stage_packages, global_ops, removals]);
        Ok((prepared, report))
    }

    /// Whether `op` would leave the tree as it is (same bytes, or a link to
    /// the same file), so a rebuild rewrites only what changed.
    fn unchanged(&self, op: &Op) -> Result<bool, PublishError> {
        match op {
            Op::Put { path, bytes } => {
                Ok(self.store.get(path)?.as_deref() == Some(bytes.as_slice()))
            }
            Op::Link { from, to } => {
                let (Some(a), Some(b)) = (self.store.local_path(from), self.store.local_path(to))
                else {
                    return Ok(false);
                };
                Ok(crate::store::same_inode(&a, &b))
            }
            Op::Remove { .. } | Op::Create { .. } => Ok(false),
        }
    }

    fn inspect_one(&self, path: &TreePath) -> Result<(ArchiveInfo, i64), PublishError> {
        let local = self
            .store
            .local_path(path)
            .ok_or_else(|| PublishError::Invalid(format!("{path}: rebuild needs a local store")))?;
        let info = archive::inspect_file(&local, &self.options.limits)?;
        let mtime = std::fs::metadata(&local)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        Ok((info, mtime))
    }

    /// Renders every package, signing in parallel: RSA signatures are most
    /// of a rebuild's CPU time. A package whose content equals the current
    /// (verified) index is not signed again: its index stays as it is.
    #[allow(clippy::type_complexity)]
    fn render_all(
        &self,
        packages: &BTreeMap<String, pb::Package>,
        current: &State,
    ) -> Result<Vec<(String, Vec<Op>, Digest256)>, PublishError> {
        let list: Vec<&pb::Package> = packages.values().collect();
        list.par_iter()
            .map(|p| {
                if current.packages.get(&p.name) == Some(*p) {
                    let bin = &current.bins[usize::from(render::bin_of(&p.name))];
                    if let Some(d) = bin.get(&p.name) {
                        return Ok((
                            p.name.clone(),
                            render::v1_files(&self.layout, p)?,
                            d.clone(),
                        ));
                    }
                }
                let (ops, d) = render::package_files(&self.layout, p, self.signer.as_ref())?;
                Ok((p.name.clone(), ops, d))
            })
            .collect()
    }
}

/// What one package change writes and removes, and the new digest of its
/// `packages/NAME` (`None`: removed).
struct RenderedChange {
    name: String,
    writes: Vec<Op>,
    removals: Vec<Op>,
    digest: Option<Digest256>,
}

/// Whether two ops leave the same file at the same path.
fn same_op(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (Op::Put { path: p, bytes: x }, Op::Put { path: q, bytes: y }) => p == q && x == y,
        (Op::Link { from: f, to: t }, Op::Link { from: g, to: u }) => f == g && t == u,
        _ => false,
    }
}

/// Refuses a name that differs from an existing package only by `-`/`_`.
/// Compares in place: one allocation per existing name would make a publish
/// O(N) allocations, and a rebuild O(N²).
fn check_confusable(
    packages: &BTreeMap<String, pb::Package>,
    name: &PackageName,
) -> Result<(), PublishError> {
    if packages.contains_key(name.as_str()) {
        return Ok(());
    }
    let fold = |b: u8| if b == b'_' { b'-' } else { b };
    let wanted = name.as_str().as_bytes();
    let similar = |k: &str| {
        k.len() == wanted.len() && k.bytes().zip(wanted).all(|(a, b)| fold(a) == fold(*b))
    };
    if let Some(other) = packages.keys().find(|k| similar(k)) {
        return Err(PublishError::Conflict(format!(
            "package name {name} is too similar to the existing package {other}"
        )));
    }
    Ok(())
}

fn artifact_from(
    info: &ArchiveInfo,
    uploaded_at: i64,
    sig: Option<&PublisherSignature>,
) -> pb::Artifact {
    pb::Artifact {
        arch: info.arch.to_string(),
        sha256: info.sha256.to_vec(),
        size: info.size,
        path: info.tree_path(),
        uploaded_at,
        publisher_signature: sig.map(|s| s.signature.clone()),
        publisher_key_id: sig.map(|s| s.key_id.clone()),
    }
}

/// Adds `artifact` to its release in `pkg`, enforcing immutability and that
/// every artifact of a release describes the release the same way.
fn merge_artifact(
    pkg: &mut pb::Package,
    info: &ArchiveInfo,
    artifact: pb::Artifact,
) -> Result<(), PublishError> {
    let version = info.version.as_str();
    let idx = match pkg.releases.iter().position(|r| r.version == version) {
        Some(i) => i,
        None => {
            pkg.releases.push(pb::Release {
                version: version.to_string(),
                ..Default::default()
            });
            pkg.releases.len() - 1
        }
    };
    let release = &mut pkg.releases[idx];
    if release.artifacts.iter().any(|a| a.arch == artifact.arch) {
        return Err(PublishError::Conflict(format!(
            "{} {} ({}) is already published",
            info.name, info.version, info.arch
        )));
    }
    let first = release.artifacts.is_empty();
    if let Some(d) = &info.description {
        match &release.description {
            Some(existing) if existing != d && !first => {
                return Err(PublishError::Conflict(format!(
                    "{} {}: description {d:?} differs from the one already published for this version ({existing:?})",
                    info.name, info.version
                )))
            }
            _ => release.description = Some(d.clone()),
        }
    }
    if let Some(rt) = &info.runtime {
        let differs = release
            .entrypoint
            .as_ref()
            .is_some_and(|e| *e != rt.entrypoint || release.isolation_preset != rt.preset);
        if differs {
            return Err(PublishError::Conflict(format!(
                "{} {}: entrypoint or isolation preset differ from the ones already published for this version",
                info.name, info.version
            )));
        }
        release.entrypoint = Some(rt.entrypoint.clone());
        release.isolation_preset = rt.preset.clone();
    }
    if info.kind == ArchiveKind::Hex {
        release.inner_checksum = info.inner_checksum.clone();
        release.outer_checksum = Some(info.sha256.to_vec());
        release.dependencies = info
            .dependencies
            .iter()
            .map(|d| pb::Dependency {
                package: d.package.clone(),
                requirement: d.requirement.clone(),
                optional: d.optional.then_some(true),
                app: d.app.clone(),
                repository: d.repository.clone(),
            })
            .collect();
    }
    release.artifacts.push(artifact);
    Ok(())
}
