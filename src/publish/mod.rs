//! The publisher: the one code path that changes a repository's tree.
//!
//! Every change — uploads (one, or a group commit of many), a delete, a tag,
//! a freshness refresh, a rebuild — is made the same way:
//!
//! 1. **validate** it against the model (the repository's packages, kept in
//!    memory) and **render** every file it changes, in memory;
//! 2. write the **archives**, create-only (an archive never changes);
//! 3. write each touched package's `niso/packages/NAME` (conditional on the
//!    version this writer last read: the package's truth), then its Hex
//!    `packages/NAME` and its `v1/` files;
//! 4. write `versions`, `names`, `v1/packages/index.json`;
//! 5. the touched **freshness bins**;
//! 6. **`freshness`** last: the commit point for readers that want a
//!    consistent snapshot;
//! 7. remove what no index names any more (archives of deleted artifacts,
//!    their `v1/` files).
//!
//! Every mutable file is written with a conditional put against the version
//! this writer last read. Another writer (a second `serve` on the same
//! bucket, `build` beside `serve`) that got there first makes the put fail:
//! the writer then reloads what changed (the versions of the shared files
//! first, then the packages that differ), renders its change again on top,
//! and retries. A writer renders the shared files from a model that holds
//! everything the version it replaces was rendered from, so no release
//! another writer acknowledged is ever dropped.
//!
//! A crash at any point leaves archives that no index names yet, or
//! indexes that are ahead of the files derived from them. [`Publisher::recover`]
//! (run by `serve`, `build` and `publish` on start) finishes such changes:
//! it adopts an archive no index names (it passed every check before it was
//! written), removes one whose version was deleted (the delete was cut off),
//! and rewrites every derived file that differs from what the indexes say.
//! An upload retried with the same bytes is a success that changes nothing,
//! so clients can retry safely.

pub mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use rayon::prelude::*;

use crate::archive::{self, ArchiveError, ArchiveInfo, ArchiveKind};
use crate::ident::{Arch, IdentError, PackageName, RepoName, TagName, Version};
use crate::index::codec::{decode_index, CodecError};
pub use crate::index::layout::{self, Layout};
use crate::index::{pb, KeyError, Signer};
use crate::limits::Limits;
use crate::store::{Body, ObjectVersion, PutMode, Store, StoreError, TreePath};
use render::{Content, Digest256, FileOut};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The tree could not be written; nothing acknowledged was lost, and the
    /// change may be retried.
    #[error("not applied: writing the tree failed ({0}); try again")]
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

impl From<crate::index::view::ViewError> for PublishError {
    fn from(e: crate::index::view::ViewError) -> Self {
        match e {
            crate::index::view::ViewError::Ident(e) => PublishError::Ident(e),
            crate::index::view::ViewError::Path(e) => PublishError::Store(e),
        }
    }
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

/// The local file an upload's bytes are in. An owned temp file lives as
/// long as the upload does (not as long as the request that brought it:
/// a client that hangs up does not take the file away from the change).
#[derive(Debug)]
pub enum StagedFile {
    Owned(tempfile::TempPath),
    /// A file the caller keeps (`niso registry publish FILE`).
    Borrowed(PathBuf),
}

impl StagedFile {
    pub fn path(&self) -> &Path {
        match self {
            StagedFile::Owned(t) => t,
            StagedFile::Borrowed(p) => p,
        }
    }
}

/// One archive to add: inspected, staged on local disk.
#[derive(Debug)]
pub struct Upload {
    pub info: ArchiveInfo,
    pub staged: StagedFile,
    /// Unix seconds.
    pub uploaded_at: i64,
    pub signature: Option<PublisherSignature>,
}

/// What a successful publish added (or found already published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub name: PackageName,
    pub version: Version,
    pub arch: Arch,
    pub path: TreePath,
    pub sha256: [u8; 32],
    pub size: u64,
    /// Unix seconds of the first upload of these bytes.
    pub uploaded_at: i64,
    /// False when the same bytes were already published (a retry).
    pub created: bool,
}

/// What a rebuild or a recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub packages: usize,
    pub releases: usize,
    pub artifacts: usize,
    pub files_written: usize,
    pub files_removed: usize,
    /// Archives no index named, now published.
    pub adopted: Vec<String>,
    /// Archives removed: of deleted versions, or refused by the checks.
    pub discarded: Vec<String>,
}

/// The global files this writer keeps versions of, besides the bins.
const GLOBALS: [&str; 6] = [
    layout::VERSIONS,
    layout::NAMES,
    layout::V1_INDEX,
    layout::PUBLIC_KEY,
    layout::PUBLISHER_KEYS,
    layout::FRESHNESS,
];

/// How often a change is tried again after losing to another writer.
const MAX_ATTEMPTS: usize = 32;

/// How many objects are written or read at once.
const PARALLEL: usize = 16;

/// One package in the model.
#[derive(Debug, Clone)]
struct Entry {
    index: pb::Package,
    /// The version of `niso/packages/NAME` this writer last read or wrote
    /// (`None`: not in the tree yet).
    version: Option<ObjectVersion>,
    /// Digests of the package's index files, by path relative to the
    /// repository (for its freshness bin).
    digests: BTreeMap<String, Digest256>,
    /// Its freshness bin.
    bin: u8,
}

/// The repository as this writer knows it.
#[derive(Default)]
struct Model {
    packages: BTreeMap<String, Entry>,
    rows: render::Rows,
    /// Version of each global file and bin (relative path) as last read or
    /// written; absent from the map: never read; `None`: known missing.
    seen: HashMap<String, Option<ObjectVersion>>,
    /// Digest of each global file and bin as last written or read.
    written: HashMap<String, Digest256>,
    generation: u64,
    /// What the freshness record in the tree lists (`None`: none, or not
    /// readable).
    fresh_files: Option<BTreeMap<String, Digest256>>,
    /// The publisher keys to publish in `publisher-keys` (`None`: this
    /// writer does not know them, e.g. `build` of a plain directory; the
    /// tree's file stays as it is).
    publisher_keys: Option<Vec<pb::PublisherKey>>,
    /// A write failed half way: the tree must be reconciled before the next
    /// change.
    dirty: bool,
}

/// A change as rendered: the packages it gives new content, the archives it
/// creates (already written by the caller) and removes.
#[derive(Default)]
struct Plan {
    packages: BTreeMap<String, pb::Package>,
    /// Archives to remove once no index names them.
    removals: Vec<TreePath>,
    /// Write the freshness record even if nothing else changed.
    refresh: bool,
}

/// Why writing a change stopped.
enum WriteError {
    /// Another writer changed a file first: reload and try again.
    Conflict(String),
    Failed(PublishError),
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Precondition { path } | StoreError::AlreadyExists { path } => {
                WriteError::Conflict(path)
            }
            other => WriteError::Failed(other.into()),
        }
    }
}

impl From<PublishError> for WriteError {
    fn from(e: PublishError) -> Self {
        WriteError::Failed(e)
    }
}

/// Milliseconds, for timings in logs.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs `futs`, at most [`PARALLEL`] at once; results in order. (The
/// futures are made before the stream, so it holds no closure that borrows:
/// the future stays `Send`.)
async fn all<T, F: std::future::Future<Output = T>>(futs: Vec<F>) -> Vec<T> {
    stream::iter(futs).buffered(PARALLEL).collect().await
}

/// [`all`], stopping at the first error.
async fn try_all<T, E, F: std::future::Future<Output = Result<T, E>>>(
    futs: Vec<F>,
) -> Result<Vec<T>, E> {
    stream::iter(futs).buffered(PARALLEL).try_collect().await
}

/// Runs CPU-heavy work (signing) without stalling the async threads.
fn cpu<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Publishes into one repository (the root one, or an organization's).
pub struct Publisher {
    store: Arc<dyn Store>,
    signer: Arc<dyn Signer>,
    repository: RepoName,
    layout: Layout,
    options: Options,
    clock: fn() -> i64,
    model: tokio::sync::Mutex<Model>,
}

impl Publisher {
    /// Opens the repository, loading and verifying its current indexes. An
    /// empty tree is an empty repository. Call [`Publisher::recover`] before
    /// the first change when another process may have been cut off.
    pub async fn open(
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
            model: tokio::sync::Mutex::new(Model::default()),
        };
        let loaded = this.load().await?;
        *this.model.lock().await = loaded;
        Ok(this)
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

    /// The current index of one package (niso's: every release).
    pub async fn package(&self, name: &str) -> Option<pb::Package> {
        self.model
            .lock()
            .await
            .packages
            .get(name)
            .map(|e| e.index.clone())
    }

    /// Every package name.
    pub async fn package_names(&self) -> Vec<String> {
        self.model.lock().await.packages.keys().cloned().collect()
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

    fn public_key_pem(&self) -> Vec<u8> {
        self.signer.public_key().to_pem().into_bytes()
    }

    // ---------------------------------------------------------------
    // Loading

    /// Reads the whole repository: every `niso/packages/NAME` (a tree
    /// written before those existed is read from Hex's indexes, and marked
    /// for recovery), the versions of the shared files, the generation.
    async fn load(&self) -> Result<Model, PublishError> {
        let mut model = Model::default();
        self.read_globals(&mut model).await?;
        let listed = self
            .store
            .list_versions(&self.layout.dir(layout::NISO_PACKAGES_DIR))
            .await?;
        if listed.is_empty() {
            self.load_legacy(&mut model).await?;
        } else {
            self.read_packages(&mut model, listed).await?;
        }
        model.rows = model
            .packages
            .iter()
            .map(|(n, e)| (n.clone(), render::row(&e.index)))
            .collect();
        Ok(model)
    }

    /// The versions of the global files and bins, and the generation.
    /// The bins are found by one listing: only those that exist and changed
    /// since this writer last read them are read (on S3 every read is a
    /// request, and most of the 256 bins of a small repository are absent).
    async fn read_globals(&self, model: &mut Model) -> Result<(), PublishError> {
        let bins_dir = format!("{}/", self.layout.dir(layout::FRESHNESS_BINS_DIR));
        let listed: HashMap<String, ObjectVersion> = self
            .store
            .list_versions(&self.layout.dir(layout::FRESHNESS_BINS_DIR))
            .await?
            .into_iter()
            .filter_map(|(p, v)| {
                let bin = p.as_str().strip_prefix(&bins_dir)?;
                let rel = format!("{}/{bin}", layout::FRESHNESS_BINS_DIR);
                Some((rel, v))
            })
            .collect();
        let mut rels: Vec<String> = GLOBALS.iter().map(|s| s.to_string()).collect();
        let mut kept: Vec<(String, ObjectVersion, Digest256)> = Vec::new();
        for rel in (0..=255u8).map(Layout::freshness_bin_rel) {
            match (
                listed.get(&rel),
                model.seen.get(&rel),
                model.written.get(&rel),
            ) {
                (None, _, _) => {}
                (Some(v), Some(Some(seen)), Some(d)) if v == seen => {
                    kept.push((rel, v.clone(), d.clone()))
                }
                (Some(_), _, _) => rels.push(rel),
            }
        }
        let reads: Vec<_> = rels
            .into_iter()
            .map(|rel| async move {
                let path = self.layout.path(&rel)?;
                let got = self.store.get(&path).await?;
                Ok::<_, PublishError>((rel, got.map(|o| (o.meta.version, Digest256::of(&o.bytes)))))
            })
            .collect();
        let mut read: Vec<(String, Option<(ObjectVersion, Digest256)>)> = try_all(reads).await?;
        read.extend(kept.into_iter().map(|(rel, v, d)| (rel, Some((v, d)))));
        model.seen.clear();
        model.written.clear();
        // A bin not listed is known missing (one created since makes this
        // writer's create of it fail, and it reloads).
        for rel in (0..=255u8).map(Layout::freshness_bin_rel) {
            model.seen.insert(rel, None);
        }
        for (rel, got) in read {
            match got {
                Some((v, d)) => {
                    model.seen.insert(rel.clone(), Some(v));
                    model.written.insert(rel, d);
                }
                None => {
                    model.seen.insert(rel, None);
                }
            }
        }
        let fresh_path = self.layout.path(layout::FRESHNESS)?;
        model.fresh_files = None;
        if let Some(o) = self.store.get(&fresh_path).await? {
            let f: pb::Freshness = self.decode(&fresh_path, &o.bytes)?;
            model.generation = model.generation.max(f.generation);
            model.fresh_files = Some(fresh_listing(&f));
        }
        Ok(())
    }

    /// Fetches the packages of `listed` whose version differs from the
    /// model's, and drops the model's packages not listed.
    async fn read_packages(
        &self,
        model: &mut Model,
        listed: Vec<(TreePath, ObjectVersion)>,
    ) -> Result<Vec<String>, PublishError> {
        let prefix = format!("{}/", self.layout.dir(layout::NISO_PACKAGES_DIR));
        let mut present = BTreeSet::new();
        let mut stale = Vec::new();
        for (path, version) in listed {
            let Some(name) = path.as_str().strip_prefix(&prefix) else {
                continue;
            };
            if name.contains('/') {
                continue;
            }
            present.insert(name.to_string());
            let same = model
                .packages
                .get(name)
                .is_some_and(|e| e.version.as_ref() == Some(&version));
            if !same {
                stale.push(name.to_string());
            }
        }
        let reads: Vec<_> = stale
            .into_iter()
            .map(|name| async move {
                let entry = self.read_package(&name).await?;
                Ok::<_, PublishError>((name, entry))
            })
            .collect();
        let fetched: Vec<(String, Entry)> = try_all(reads)
            .await?
            .into_iter()
            .filter_map(|(n, e)| e.map(|e| (n, e)))
            .collect();
        let mut changed: Vec<String> = model
            .packages
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for n in &changed {
            model.packages.remove(n);
        }
        for (name, entry) in fetched {
            changed.push(name.clone());
            model.packages.insert(name, entry);
        }
        Ok(changed)
    }

    /// One package's niso index (verified) and the digests of its indexes.
    async fn read_package(&self, name: &str) -> Result<Option<Entry>, PublishError> {
        let pname = PackageName::new(name)?;
        let path = self.layout.niso_package(&pname)?;
        let Some(obj) = self.store.get(&path).await? else {
            return Ok(None);
        };
        let index: pb::Package = self.decode(&path, &obj.bytes)?;
        if index.name != name {
            return Err(PublishError::Invalid(format!(
                "{path} holds the index of {:?}",
                index.name
            )));
        }
        let mut digests = BTreeMap::new();
        digests.insert(
            format!("{}/{name}", layout::NISO_PACKAGES_DIR),
            Digest256::of(&obj.bytes),
        );
        if render::hex_view(&index).is_some() {
            let hex = self.layout.package(&pname)?;
            if let Some(h) = self.store.get(&hex).await? {
                digests.insert(
                    format!("{}/{name}", layout::PACKAGES_DIR),
                    Digest256::of(&h.bytes),
                );
            }
        }
        Ok(Some(Entry {
            bin: render::bin_of(name),
            index,
            version: Some(obj.meta.version),
            digests,
        }))
    }

    /// A tree written before `niso/packages/` existed: every release is in
    /// Hex's `packages/NAME`. Recovery writes the niso indexes.
    async fn load_legacy(&self, model: &mut Model) -> Result<(), PublishError> {
        let names_path = self.layout.path(layout::NAMES)?;
        let Some(obj) = self.store.get(&names_path).await? else {
            return Ok(());
        };
        let names: pb::Names = self.decode(&names_path, &obj.bytes)?;
        for entry in names.packages {
            let name = PackageName::new(&entry.name)?;
            let path = self.layout.package(&name)?;
            let bytes = self.store.get(&path).await?.ok_or_else(|| {
                PublishError::Invalid(format!("{names_path} names {name} but {path} is missing"))
            })?;
            let index: pb::Package = self.decode(&path, &bytes.bytes)?;
            model.packages.insert(
                entry.name.clone(),
                Entry {
                    bin: render::bin_of(&entry.name),
                    index,
                    version: None,
                    digests: BTreeMap::new(),
                },
            );
        }
        model.dirty = !model.packages.is_empty();
        Ok(())
    }

    /// After losing to another writer: the versions of the shared files
    /// first, then the packages (so the model holds at least what those
    /// versions were rendered from).
    async fn reload(&self, model: &mut Model) -> Result<(), PublishError> {
        self.read_globals(model).await?;
        let listed = self
            .store
            .list_versions(&self.layout.dir(layout::NISO_PACKAGES_DIR))
            .await?;
        let changed = self.read_packages(model, listed).await?;
        let rows: render::RowChanges = changed
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    model.packages.get(n).map(|e| render::row(&e.index)),
                )
            })
            .collect();
        render::apply(&mut model.rows, rows);
        Ok(())
    }

    // ---------------------------------------------------------------
    // Changes

    /// Publishes one archive.
    pub async fn publish(&self, upload: Upload) -> Result<Published, PublishError> {
        self.publish_batch(vec![upload])
            .await
            .pop()
            .unwrap_or_else(|| Err(PublishError::Invalid("empty batch".into())))
    }

    /// Publishes several archives with one rewrite of the shared files
    /// (group commit). Each upload succeeds or fails on its own; a failure
    /// to write the shared files fails those that were not yet published.
    pub async fn publish_batch(
        &self,
        uploads: Vec<Upload>,
    ) -> Vec<Result<Published, PublishError>> {
        let mut model = self.model.lock().await;
        if let Err(e) = self.ensure_clean(&mut model).await {
            let msg = match e {
                PublishError::Aborted(m) => m,
                other => other.to_string(),
            };
            return uploads
                .iter()
                .map(|_| Err(PublishError::Aborted(msg.clone())))
                .collect();
        }
        // First the archives of every upload that fits the model, each on
        // its own (one refused upload does not hold up the others).
        let mut results: Vec<Option<Result<Published, PublishError>>> =
            uploads.iter().map(|_| None).collect();
        let mut created = Vec::new();
        {
            let model = &*model;
            let futs: Vec<_> = uploads
                .iter()
                .map(|up| self.write_archive(model, up))
                .collect();
            let checks: Vec<Result<Option<TreePath>, PublishError>> = all(futs).await;
            for (i, check) in checks.into_iter().enumerate() {
                match check {
                    Ok(Some(path)) => created.push((i, path)),
                    Ok(None) => {}
                    // The tree could not be written (a full disk): the
                    // create left nothing, and a retry may succeed.
                    Err(PublishError::Store(e)) => {
                        tracing::error!(error = %e, "writing an archive to the tree failed");
                        results[i] = Some(Err(PublishError::Aborted(e.to_string())));
                    }
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
        }
        // Then the indexes, for all of them at once.
        let outcome = self
            .apply(&mut model, |model, _attempt| {
                let mut plan = Plan::default();
                let mut out = Vec::with_capacity(uploads.len());
                for (i, up) in uploads.iter().enumerate() {
                    if results[i].is_some() {
                        out.push(None);
                        continue;
                    }
                    out.push(Some(self.merge_upload(model, &mut plan, up)));
                }
                Ok((plan, out))
            })
            .await;
        match outcome {
            Ok(out) => {
                for (i, r) in out.into_iter().enumerate() {
                    if let Some(mut r) = r {
                        // Written by this call, though a retry after losing
                        // to another writer found it in place.
                        if let Ok(p) = &mut r {
                            p.created |= created.iter().any(|(j, _)| *j == i);
                        }
                        results[i] = Some(r);
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(PublishError::Aborted(msg.clone())));
                }
            }
        }
        // An archive this call created for an upload that ended refused is
        // named by no index: take it away again. (Not after a failed write:
        // an index may name it already; recovery decides.)
        for (i, path) in created {
            if matches!(results[i], Some(Err(ref e)) if !matches!(e, PublishError::Aborted(_))) {
                let named = model
                    .packages
                    .values()
                    .any(|e| names_archive(&e.index, &self.layout, &path));
                if !named {
                    let _ = self.store.delete(&path).await;
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PublishError::Invalid("not processed".into()))))
            .collect()
    }

    /// Checks an upload against the model and creates its archive. `Some`:
    /// this call created the archive; `None`: the same bytes are already
    /// there (a retry, or published already).
    async fn write_archive(
        &self,
        model: &Model,
        up: &Upload,
    ) -> Result<Option<TreePath>, PublishError> {
        let info = &up.info;
        if let Some(existing) = find_artifact(model, info) {
            return if existing.sha256 == info.sha256 {
                Ok(None)
            } else {
                Err(already_published(info))
            };
        }
        check_tombstone(model, info)?;
        let path = self.layout.path(&info.tree_path())?;
        let attrs = layout::attributes(path.as_str(), None);
        match self
            .store
            .put(
                &path,
                Body::File(up.staged.path().to_path_buf()),
                &attrs,
                PutMode::Create,
            )
            .await
        {
            Ok(_) => Ok(Some(path)),
            // Left by a change that was cut off (or by another writer's
            // identical upload): fine if it holds these bytes.
            Err(StoreError::AlreadyExists { .. }) => {
                if self.archive_sha256(&path).await? == Some(info.sha256) {
                    Ok(None)
                } else {
                    Err(PublishError::Conflict(format!(
                        "{path} already exists with other bytes (another upload of {} {} ({}) \
                         is being published)",
                        info.name, info.version, info.arch
                    )))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// SHA-256 of an object, read as a stream.
    async fn archive_sha256(&self, path: &TreePath) -> Result<Option<[u8; 32]>, PublishError> {
        use sha2::Digest;
        let Some((_, mut s)) = self.store.get_stream(path).await? else {
            return Ok(None);
        };
        let mut h = sha2::Sha256::new();
        while let Some(chunk) = s.next().await {
            h.update(&chunk?);
        }
        Ok(Some(h.finalize().into()))
    }

    /// Merges one upload into `plan` (on copies of the packages it
    /// touches).
    fn merge_upload(
        &self,
        model: &Model,
        plan: &mut Plan,
        up: &Upload,
    ) -> Result<Published, PublishError> {
        let info = &up.info;
        let path = self.layout.path(&info.tree_path())?;
        let name = info.name.as_str();
        let current = plan
            .packages
            .get(name)
            .or_else(|| model.packages.get(name).map(|e| &e.index));
        let published = |uploaded_at, created| Published {
            name: info.name.clone(),
            version: info.version.clone(),
            arch: info.arch.clone(),
            path: path.clone(),
            sha256: info.sha256,
            size: info.size,
            uploaded_at,
            created,
        };
        if let Some(a) = current.and_then(|p| artifact_in(p, info)) {
            return if a.sha256 == info.sha256 {
                Ok(published(a.uploaded_at, false))
            } else {
                Err(already_published(info))
            };
        }
        if current.is_none() {
            check_confusable(model.packages.keys(), &info.name)?;
            check_confusable(plan.packages.keys(), &info.name)?;
        }
        let mut pkg = current.cloned().unwrap_or_else(|| pb::Package {
            name: name.to_string(),
            repository: self.repository.to_string(),
            ..Default::default()
        });
        // A deleted artifact may come back only with the bytes it had.
        restore_tombstone(&mut pkg, info)?;
        let artifact = artifact_from(info, up.uploaded_at, up.signature.as_ref());
        merge_artifact(&mut pkg, info, artifact)?;
        render::normalize(&mut pkg);
        plan.packages.insert(name.to_string(), pkg);
        Ok(published(up.uploaded_at, true))
    }

    /// Removes one artifact, leaving a tombstone with its SHA-256: its
    /// (version, arch) can never serve other bytes. A release without
    /// artifacts disappears, with the tags that pointed at it.
    pub async fn delete(
        &self,
        name: &PackageName,
        version: &Version,
        arch: &Arch,
    ) -> Result<(), PublishError> {
        let item = (name.clone(), version.clone(), arch.clone());
        self.delete_many(std::slice::from_ref(&item))
            .await?
            .pop()
            .unwrap_or_else(|| Err(PublishError::Invalid("empty delete".into())))
    }

    /// Removes several artifacts as [`Publisher::delete`] does, with one
    /// rewrite of the shared files for all of them (`gc` removes hundreds:
    /// one `versions`, `names` and freshness record, not one per artifact).
    /// The outer error: nothing was written. Each item then succeeds or
    /// fails on its own (`NotFound`: not published, or named twice); the
    /// others are removed all the same.
    pub async fn delete_many(
        &self,
        items: &[(PackageName, Version, Arch)],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        let mut model = self.model.lock().await;
        self.ensure_clean(&mut model).await?;
        let now = (self.clock)();
        self.apply(&mut model, |model, attempt| {
            let mut plan = Plan::default();
            let mut out = Vec::with_capacity(items.len());
            for (name, version, arch) in items {
                let current = plan
                    .packages
                    .get(name.as_str())
                    .or_else(|| model.packages.get(name.as_str()).map(|e| &e.index));
                let mut pkg = match current {
                    Some(p) => p.clone(),
                    None => {
                        out.push(Err(not_published(name, version, arch)));
                        continue;
                    }
                };
                let Some(removed) = remove_artifact(&mut pkg, version, arch, now) else {
                    // A retry after losing to another writer may find this
                    // delete made already (its tombstone in place).
                    let done = attempt > 0
                        && pkg
                            .tombstones
                            .iter()
                            .any(|t| t.version == version.as_str() && t.arch == arch.as_str());
                    out.push(if done {
                        Ok(())
                    } else {
                        Err(not_published(name, version, arch))
                    });
                    continue;
                };
                plan.removals.push(self.layout.path(&removed.path)?);
                plan.packages.insert(name.to_string(), pkg);
                out.push(Ok(()));
            }
            Ok((plan, out))
        })
        .await
    }

    /// Points `tag` at `version` (creating or moving it).
    pub async fn set_tag(
        &self,
        name: &PackageName,
        tag: &TagName,
        version: &Version,
    ) -> Result<(), PublishError> {
        let mut model = self.model.lock().await;
        self.ensure_clean(&mut model).await?;
        self.apply(&mut model, |model, _attempt| {
            let mut pkg = model
                .packages
                .get(name.as_str())
                .filter(|e| !e.index.releases.is_empty())
                .map(|e| e.index.clone())
                .ok_or_else(|| PublishError::NotFound(format!("package {name} does not exist")))?;
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
            let mut plan = Plan::default();
            plan.packages.insert(name.to_string(), pkg);
            Ok((plan, ()))
        })
        .await
    }

    /// Re-signs the freshness record with a new generation and expiry, and
    /// writes any shared file that is missing (a new repository's).
    pub async fn refresh(&self) -> Result<(), PublishError> {
        let mut model = self.model.lock().await;
        self.ensure_clean(&mut model).await?;
        self.apply(&mut model, |_, _| {
            Ok((
                Plan {
                    refresh: true,
                    ..Default::default()
                },
                (),
            ))
        })
        .await
    }

    /// Publishes `keys` (every publisher key the registry accepts or
    /// accepted signatures from) in the signed `publisher-keys`, listed in
    /// the freshness record, so clients can check publisher signatures from
    /// the tree alone. Writes nothing when the tree already says so.
    pub async fn set_publisher_keys(
        &self,
        mut keys: Vec<pb::PublisherKey>,
    ) -> Result<(), PublishError> {
        keys.sort_by(|a, b| (a.registered_at, &a.id).cmp(&(b.registered_at, &b.id)));
        keys.dedup();
        let mut model = self.model.lock().await;
        self.ensure_clean(&mut model).await?;
        let bytes = self.publisher_keys_file(&keys)?;
        model.publisher_keys = Some(keys);
        if model.written.get(layout::PUBLISHER_KEYS) == Some(&Digest256::of(&bytes)) {
            return Ok(());
        }
        self.apply(&mut model, |_, _| {
            Ok((
                Plan {
                    refresh: true,
                    ..Default::default()
                },
                (),
            ))
        })
        .await
    }

    fn publisher_keys_file(&self, keys: &[pb::PublisherKey]) -> Result<Vec<u8>, PublishError> {
        let msg = pb::PublisherKeys {
            repository: self.repository.to_string(),
            keys: keys.to_vec(),
        };
        Ok(cpu(|| {
            crate::index::encode_index(&msg, self.signer.as_ref())
        })?)
    }

    /// The expiry of the freshness record as this writer last wrote or read
    /// it is less than `margin` seconds away (or there is none).
    pub async fn freshness_expires_within(&self, margin: i64) -> Result<bool, PublishError> {
        let path = self.layout.path(layout::FRESHNESS)?;
        let Some(obj) = self.store.get(&path).await? else {
            return Ok(true);
        };
        let f: pb::Freshness = self.decode(&path, &obj.bytes)?;
        Ok(f.expires_at - (self.clock)() < margin)
    }

    /// Reconciles the tree before a change when an earlier write failed.
    /// If that fails too, the change is not applied, and may be retried
    /// (every kind of change: uploads, deletes, tags).
    async fn ensure_clean(&self, model: &mut Model) -> Result<(), PublishError> {
        if model.dirty {
            tracing::warn!(
                repository = %self.repository,
                "an earlier write to the tree failed or was cut off; reconciling the tree"
            );
            self.reconcile(model, false).await.map_err(|e| match e {
                e @ PublishError::Aborted(_) => e,
                other => PublishError::Aborted(other.to_string()),
            })?;
        }
        Ok(())
    }

    /// Applies the change `plan` renders from the model, retrying after a
    /// reload when another writer got there first. `plan` gets the attempt
    /// number: on a retry, part of the change may be in the tree already.
    async fn apply<T>(
        &self,
        model: &mut Model,
        plan: impl Fn(&Model, usize) -> Result<(Plan, T), PublishError>,
    ) -> Result<T, PublishError> {
        // Removals due from attempts that lost (see `write`).
        let mut carried: Vec<TreePath> = Vec::new();
        // Packages an attempt that lost may have written part of: their
        // index may be in the tree already (so the retry finds nothing to
        // change) while files derived from it, or the shared files, were
        // written by another writer from an older view, or overwritten by
        // this one's late writes. Each retry writes them whole again.
        let mut unfinished: BTreeSet<String> = BTreeSet::new();
        for attempt in 0..MAX_ATTEMPTS {
            let (mut p, out) = plan(model, attempt)?;
            for name in &unfinished {
                if let Some(e) = model.packages.get(name) {
                    p.packages
                        .entry(name.clone())
                        .or_insert_with(|| e.index.clone());
                }
            }
            let touched: Vec<String> = p.packages.keys().cloned().collect();
            let started = std::time::Instant::now();
            match self.write(model, p, &unfinished, &mut carried).await {
                Ok(()) => {
                    tracing::debug!(attempt, ms = ms(started.elapsed()), "change written");
                    return Ok(out);
                }
                Err(WriteError::Conflict(path)) => {
                    unfinished.extend(touched);
                    tracing::info!(%path, attempt, "another writer changed the tree; reloading");
                    if let Err(e) = self.reload(model).await {
                        model.dirty = true;
                        return Err(PublishError::Aborted(e.to_string()));
                    }
                }
                Err(WriteError::Failed(e)) => {
                    tracing::error!(error = %e, "writing to the tree failed");
                    model.dirty = true;
                    return Err(match e {
                        PublishError::Store(s) => PublishError::Aborted(s.to_string()),
                        other => other,
                    });
                }
            }
        }
        model.dirty = true;
        Err(PublishError::Aborted(format!(
            "gave up after {MAX_ATTEMPTS} attempts: other writers kept changing the tree"
        )))
    }

    /// Writes a change, stage by stage, and brings the model up to date
    /// with it. On an error the model is left as it was.
    /// `unfinished`: packages written whole even if their index does not
    /// change (see [`Publisher::apply`]). `carried`: removals of the change
    /// kept across attempts (a retry may find the change made, with nothing
    /// left to plan, and its archive still to remove).
    async fn write(
        &self,
        model: &mut Model,
        plan: Plan,
        unfinished: &BTreeSet<String>,
        carried: &mut Vec<TreePath>,
    ) -> Result<(), WriteError> {
        // Packages whose content does not change are left alone.
        let changes: Vec<(String, pb::Package)> = plan
            .packages
            .into_iter()
            .filter(|(n, p)| {
                unfinished.contains(n) || model.packages.get(n).map(|e| &e.index) != Some(p)
            })
            .collect();
        if changes.is_empty() && !plan.refresh && plan.removals.is_empty() && carried.is_empty() {
            return Ok(());
        }

        // Stage 2: each package's indexes and v1 files.
        let rendered: Vec<Rendered> = cpu(|| {
            changes
                .par_iter()
                .map(|(name, pkg)| {
                    let (files, digests) =
                        render::package_files(&self.layout, pkg, self.signer.as_ref())?;
                    Ok((name.clone(), pkg.clone(), files, digests))
                })
                .collect::<Result<_, PublishError>>()
        })?;
        let mut stale: Vec<TreePath> = Vec::new();
        let futs: Vec<_> = rendered
            .iter()
            .map(|(name, pkg, files, _)| {
                let old = model.packages.get(name);
                let whole = unfinished.contains(name);
                // Its index as the tree holds it already: kept, not written
                // again (which would make every other writer reload it).
                let current = old
                    .filter(|e| whole && &e.index == pkg)
                    .and_then(|e| e.version.clone());
                self.write_package(name, old, files, whole, current)
            })
            .collect();
        carried.extend(plan.removals.iter().cloned());
        let written: Vec<(String, ObjectVersion, Vec<TreePath>)> = try_all(futs).await?;
        let mut new_versions = HashMap::new();
        for (name, version, removed) in written {
            new_versions.insert(name, version);
            stale.extend(removed);
        }

        // Stages 3–6: the shared files, from the model with the change.
        let mut next = ModelUpdate::default();
        for (name, pkg, _, digests) in &rendered {
            next.packages.insert(
                name.clone(),
                Entry {
                    bin: render::bin_of(name),
                    index: pkg.clone(),
                    version: new_versions.get(name).cloned(),
                    digests: digests.clone(),
                },
            );
        }
        self.write_globals(model, &mut next, plan.refresh, true)
            .await?;

        // Stage 7: what no index names any more.
        carried.extend(stale);
        let removals: BTreeSet<TreePath> = std::mem::take(carried).into_iter().collect();
        for path in &removals {
            if let Err(e) = self.store.delete(path).await {
                // The change is complete without it: recovery removes it.
                tracing::warn!(%path, error = %e, "could not remove a file no index names");
                model.dirty = true;
            }
        }
        Ok(())
    }

    /// Writes one package's files: `niso/packages/NAME` conditionally (the
    /// package's truth), then its derived files. Returns the new version of
    /// the niso index and the derived files it no longer has, to remove once
    /// the shared files stop naming them.
    /// With `whole`, every derived file is written (but a release's own
    /// files `old` had), not only those that differ from `old`'s; with
    /// `current`, the niso index is that version in the tree already and is
    /// not written.
    async fn write_package(
        &self,
        name: &str,
        old: Option<&Entry>,
        files: &[FileOut],
        whole: bool,
        current: Option<ObjectVersion>,
    ) -> Result<(String, ObjectVersion, Vec<TreePath>), WriteError> {
        let pname = PackageName::new(name).map_err(PublishError::from)?;
        let niso_path = self
            .layout
            .niso_package(&pname)
            .map_err(PublishError::from)?;
        // What the package had: its v1 files (rendering them signs
        // nothing) and the digests of its indexes.
        let old_v1 = match old {
            Some(e) => render::v1_files(&self.layout, &e.index).map_err(PublishError::from)?,
            None => Vec::new(),
        };
        let hex_path = self.layout.package(&pname).map_err(PublishError::from)?;
        let hex_rel = format!("{}/{name}", layout::PACKAGES_DIR);
        let old_hex = old.and_then(|e| e.digests.get(&hex_rel));
        // Derived files first where a reader follows them from the index
        // (v1 downloads before v1/…/versions), the index itself first of
        // the signed ones: a conflict on it stops before anything derived
        // from this writer's view is written.
        let niso = files
            .iter()
            .find(|f| f.path == niso_path)
            .ok_or_else(|| PublishError::Invalid(format!("{niso_path} was not rendered")))?;
        let Content::Bytes(bytes) = &niso.content else {
            return Err(PublishError::Invalid(format!("{niso_path} is not a document")).into());
        };
        let version = match current {
            Some(v) => v,
            None => {
                let mode = PutMode::after(old.and_then(|e| e.version.as_ref()));
                self.store
                    .put(
                        &niso_path,
                        Body::Bytes(bytes.clone().into()),
                        &niso.attributes,
                        mode,
                    )
                    .await?
            }
        };
        let derived: Vec<&FileOut> = files
            .iter()
            .filter(|f| f.path != niso_path)
            .filter(|f| {
                (whole && !(per_release(&f.path) && old_v1.contains(f)))
                    || match &f.content {
                        Content::Bytes(b) if f.path == hex_path => {
                            old_hex != Some(&Digest256::of(b))
                        }
                        _ => !old_v1.contains(f),
                    }
            })
            .collect();
        let futs: Vec<_> = derived
            .into_iter()
            .map(|f| self.put_file(f, PutMode::Overwrite))
            .collect();
        try_all(futs).await?;
        // Another writer may have replaced the index meanwhile and written
        // its derived files before these: then they are stale.
        let now = self.store.head(&niso_path).await?.map(|m| m.version);
        if now.as_ref() != Some(&version) {
            return Err(WriteError::Conflict(niso_path.to_string()));
        }
        let new_paths: BTreeSet<&TreePath> = files.iter().map(|f| &f.path).collect();
        let mut removed: Vec<TreePath> = old_v1
            .iter()
            .map(|f| f.path.clone())
            .filter(|p| !new_paths.contains(p))
            .collect();
        if old_hex.is_some() && !new_paths.contains(&hex_path) {
            removed.push(hex_path);
        }
        Ok((name.to_string(), version, removed))
    }

    async fn put_file(&self, f: &FileOut, mode: PutMode) -> Result<ObjectVersion, StoreError> {
        match &f.content {
            Content::Bytes(b) => {
                self.store
                    .put(&f.path, Body::Bytes(b.clone().into()), &f.attributes, mode)
                    .await
            }
            Content::Copy(from) => self.store.copy(from, &f.path, &f.attributes, mode).await,
        }
    }

    /// Renders and writes `versions`, `names`, the v1 list, the bins that
    /// changed and the freshness record, each conditional on the version
    /// last seen; then makes `next` the model. `refresh`: every bin is
    /// rendered again. Unless `sign` (a change was made), the record is
    /// written only when what it lists differs from the tree's.
    async fn write_globals(
        &self,
        model: &mut Model,
        next: &mut ModelUpdate,
        refresh: bool,
        sign: bool,
    ) -> Result<(), WriteError> {
        let rows: render::RowChanges = next
            .packages
            .iter()
            .map(|(n, e)| (n.clone(), Some(render::row(&e.index))))
            .collect();
        let repository = self.repository.to_string();
        let globals = {
            let all = render::rows_with(&model.rows, &rows);
            cpu(|| {
                render::global_files(&repository, &all, render::Wanted::ALL, self.signer.as_ref())
            })?
        };
        // The bins of the packages that changed (all of them for a
        // refresh), and any bin whose file this writer has not seen.
        let mut touched: BTreeSet<u8> = next.packages.values().map(|e| e.bin).collect();
        for e in model.packages.values() {
            if refresh
                || !model
                    .written
                    .contains_key(&Layout::freshness_bin_rel(e.bin))
            {
                touched.insert(e.bin);
            }
        }
        if refresh {
            touched.extend(0..=255u8);
        }
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let keys = match &model.publisher_keys {
            Some(k) => Some(self.publisher_keys_file(k)?),
            None => None,
        };
        for (rel, bytes) in [
            (layout::VERSIONS, globals.versions),
            (layout::PUBLIC_KEY, Some(self.public_key_pem())),
            (layout::PUBLISHER_KEYS, keys),
            (layout::NAMES, globals.names),
            (layout::V1_INDEX, globals.v1_index),
        ] {
            if let Some(b) = bytes {
                files.push((rel.to_string(), b));
            }
        }
        let mut bins: BTreeMap<u8, BTreeMap<String, Digest256>> = BTreeMap::new();
        for (name, e) in &model.packages {
            if touched.contains(&e.bin) && !next.packages.contains_key(name) {
                bins.entry(e.bin).or_default().extend(e.digests.clone());
            }
        }
        for e in next.packages.values() {
            bins.entry(e.bin).or_default().extend(e.digests.clone());
        }
        let mut top: BTreeMap<String, Digest256> = BTreeMap::new();
        for bin in 0..=255u8 {
            let rel = Layout::freshness_bin_rel(bin);
            if !touched.contains(&bin) {
                if let Some(d) = model.written.get(&rel) {
                    top.insert(rel, d.clone());
                }
                continue;
            }
            match bins.get(&bin) {
                Some(digests) if !digests.is_empty() => {
                    let bytes = render::freshness_bin(self.repository.as_str(), bin, digests);
                    top.insert(rel.clone(), Digest256::of(&bytes));
                    files.push((rel, bytes));
                }
                _ => {
                    if model.seen.get(&rel).is_some_and(Option::is_some) {
                        next.removed_bins.push(rel);
                    }
                }
            }
        }
        // The record lists names, versions, the publisher keys and every
        // bin.
        for (rel, bytes) in &files {
            if *rel == layout::VERSIONS || *rel == layout::NAMES || *rel == layout::PUBLISHER_KEYS {
                top.insert(rel.clone(), Digest256::of(bytes));
            }
        }
        if model.publisher_keys.is_none() {
            // Not this writer's to change: listed as the tree has it.
            if let Some(d) = model.written.get(layout::PUBLISHER_KEYS) {
                top.insert(layout::PUBLISHER_KEYS.to_string(), d.clone());
            }
        }
        let changed = files
            .iter()
            .any(|(rel, bytes)| model.written.get(rel) != Some(&Digest256::of(bytes)))
            || !next.removed_bins.is_empty();
        if !sign && !changed && model.fresh_files.as_ref() == Some(&top) {
            // Nothing to say that the record does not say already.
            render::apply(&mut model.rows, rows);
            for (name, entry) in std::mem::take(&mut next.packages) {
                model.packages.insert(name, entry);
            }
            return Ok(());
        }
        let now = (self.clock)();
        let generation = model.generation + 1;
        let fresh = cpu(|| {
            render::freshness(
                self.repository.as_str(),
                generation,
                now,
                now + self.options.freshness_ttl,
                &top,
                self.signer.as_ref(),
            )
        })?;
        files.push((layout::FRESHNESS.to_string(), fresh));

        let mut versions = HashMap::new();
        for (rel, bytes) in &files {
            let digest = Digest256::of(bytes);
            // Unchanged (and not the record): nothing to write.
            if rel != layout::FRESHNESS && model.written.get(rel) == Some(&digest) {
                continue;
            }
            let path = self.layout.path(rel).map_err(PublishError::from)?;
            let mode = match model.seen.get(rel) {
                Some(v) => PutMode::after(v.as_ref()),
                // Never read: overwrite only what is not there.
                None => PutMode::Create,
            };
            let attrs = layout::attributes(path.as_str(), None);
            let v = self
                .store
                .put(&path, Body::Bytes(bytes.clone().into()), &attrs, mode)
                .await?;
            versions.insert(rel.clone(), (v, digest));
        }
        for rel in std::mem::take(&mut next.removed_bins) {
            let path = self.layout.path(&rel).map_err(PublishError::from)?;
            self.store.delete(&path).await?;
            model.seen.insert(rel.clone(), None);
            model.written.remove(&rel);
        }

        // Everything is written: the model follows.
        render::apply(&mut model.rows, rows);
        for (name, entry) in std::mem::take(&mut next.packages) {
            model.packages.insert(name, entry);
        }
        for (rel, (v, d)) in versions {
            model.seen.insert(rel.clone(), Some(v));
            model.written.insert(rel, d);
        }
        model.generation = generation;
        model.fresh_files = Some(top);
        Ok(())
    }
}

/// A release's own v1 files (its downloads and manifest): every writer
/// writes them with the same bytes, so no late write leaves them stale.
fn per_release(path: &TreePath) -> bool {
    let (rel, _) = layout::split_repository(path.as_str());
    layout::FileKind::of(rel) == layout::FileKind::Download || rel.ends_with("/manifest")
}

/// What a freshness record lists, by path.
fn fresh_listing(f: &pb::Freshness) -> BTreeMap<String, Digest256> {
    f.files
        .iter()
        .filter_map(|d| {
            Some((
                d.path.clone(),
                Digest256 {
                    sha256: d.sha256.clone().try_into().ok()?,
                    length: d.length,
                },
            ))
        })
        .collect()
}

/// One package rendered: its name and index, its files, the digests of its
/// indexes.
type Rendered = (
    String,
    pb::Package,
    Vec<FileOut>,
    BTreeMap<String, Digest256>,
);

/// The packages a change gives new content, with their new versions.
#[derive(Default)]
struct ModelUpdate {
    packages: BTreeMap<String, Entry>,
    removed_bins: Vec<String>,
}

fn already_published(info: &ArchiveInfo) -> PublishError {
    PublishError::Conflict(format!(
        "{} {} ({}) is already published with other bytes; a published version never \
         changes: publish a new version",
        info.name, info.version, info.arch
    ))
}

/// The artifact of (version, arch) in a package index.
fn artifact_in<'a>(pkg: &'a pb::Package, info: &ArchiveInfo) -> Option<&'a pb::Artifact> {
    pkg.releases
        .iter()
        .find(|r| r.version == info.version.as_str())?
        .artifacts
        .iter()
        .find(|a| a.arch == info.arch.as_str())
}

fn find_artifact<'a>(model: &'a Model, info: &ArchiveInfo) -> Option<&'a pb::Artifact> {
    artifact_in(&model.packages.get(info.name.as_str())?.index, info)
}

fn check_tombstone(model: &Model, info: &ArchiveInfo) -> Result<(), PublishError> {
    if let Some(e) = model.packages.get(info.name.as_str()) {
        let mut pkg = e.index.clone();
        restore_tombstone(&mut pkg, info)?;
    }
    Ok(())
}

/// Lifts the tombstone of (version, arch) if `info` has the deleted bytes;
/// refuses other bytes.
fn restore_tombstone(pkg: &mut pb::Package, info: &ArchiveInfo) -> Result<(), PublishError> {
    let Some(i) = pkg
        .tombstones
        .iter()
        .position(|t| t.version == info.version.as_str() && t.arch == info.arch.as_str())
    else {
        return Ok(());
    };
    if pkg.tombstones[i].sha256 != info.sha256 {
        return Err(PublishError::Conflict(format!(
            "{} {} ({}) was deleted; a version never serves other bytes than it once did, \
             so only the deleted archive (SHA-256 {}) can restore it: publish a new version",
            info.name,
            info.version,
            info.arch,
            hex::encode(&pkg.tombstones[i].sha256)
        )));
    }
    pkg.tombstones.remove(i);
    Ok(())
}

/// Whether an index names the archive at `path`.
fn not_published(name: &PackageName, version: &Version, arch: &Arch) -> PublishError {
    PublishError::NotFound(format!("{name} {version} ({arch}) is not published"))
}

/// Takes (version, arch) out of `pkg`, leaving its tombstone; a release
/// left without artifacts goes, with the tags that pointed at it. `None`:
/// not published.
fn remove_artifact(
    pkg: &mut pb::Package,
    version: &Version,
    arch: &Arch,
    now: i64,
) -> Option<pb::Artifact> {
    let ri = pkg
        .releases
        .iter()
        .position(|r| r.version == version.as_str())?;
    let release = &mut pkg.releases[ri];
    let ai = release
        .artifacts
        .iter()
        .position(|a| a.arch == arch.as_str())?;
    let removed = release.artifacts.remove(ai);
    if render::is_hex(&removed) {
        release.inner_checksum.clear();
        release.outer_checksum = None;
        release.dependencies.clear();
    }
    if release.artifacts.is_empty() {
        pkg.releases.remove(ri);
        pkg.tags.retain(|t| t.version != version.as_str());
    }
    pkg.tombstones.push(pb::Tombstone {
        version: version.to_string(),
        arch: arch.to_string(),
        sha256: removed.sha256.clone(),
        deleted_at: now,
    });
    render::normalize(pkg);
    Some(removed)
}

fn names_archive(pkg: &pb::Package, layout: &Layout, path: &TreePath) -> bool {
    pkg.releases
        .iter()
        .flat_map(|r| &r.artifacts)
        .any(|a| layout.path(&a.path).is_ok_and(|p| &p == path))
}

/// Refuses a name that differs from an existing package only by `-`/`_`.
fn check_confusable<'a>(
    mut existing: impl Iterator<Item = &'a String>,
    name: &PackageName,
) -> Result<(), PublishError> {
    let fold = |b: u8| if b == b'_' { b'-' } else { b };
    let wanted = name.as_str().as_bytes();
    let similar = |k: &str| {
        k != name.as_str()
            && k.len() == wanted.len()
            && k.bytes().zip(wanted).all(|(a, b)| fold(a) == fold(*b))
    };
    if let Some(other) = existing.find(|k| similar(k)) {
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

mod reconcile;
