//! The publisher: the one code path that changes a repository's tree.
//!
//! Every change — an upload, a delete, a tag, a full rebuild — goes through
//! [`Publisher`], which keeps the repository's packages in memory, applies the
//! change, and hands ordered stages of file operations to the [`Store`]:
//!
//! 1. the archives, each created once (a second upload of the same file
//!    loses);
//! 2. `packages/NAME` and the package's `v1/` documents and links;
//! 3. `versions`, `names`, `v1/packages/index.json`, then the signed
//!    freshness record listing the digest of every index, renamed into place
//!    in that order;
//! 4. removals (archives of deleted releases, stale `v1/` files), after no
//!    index names them any more.
//!
//! Each stage is durable before the next becomes visible, so a reader (or a
//! crash) never sees an index that names a missing file. All rendering goes
//! through [`render`], so N incremental publishes and one [`Publisher::rebuild`]
//! give byte-identical indexes.

pub mod layout;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

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

struct State {
    packages: BTreeMap<String, pb::Package>,
    /// Each package's pre-encoded share of `versions`, `names` and the v1
    /// list, same keys as `packages`.
    rows: BTreeMap<String, render::Row>,
    /// Digest of every `packages/NAME`, `versions` and `names`, for the
    /// freshness sidecar (kept so a publish need not re-read other packages).
    digests: BTreeMap<String, Digest256>,
    generation: u64,
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
            state: Mutex::new(State {
                packages: BTreeMap::new(),
                rows: BTreeMap::new(),
                digests: BTreeMap::new(),
                generation: 0,
            }),
        };
        let loaded = this.load()?;
        *this.lock() = loaded;
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the in-memory state possibly
        // ahead of the tree; the tree itself is always consistent, so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut state = State {
            packages: BTreeMap::new(),
            rows: BTreeMap::new(),
            digests: BTreeMap::new(),
            generation: 0,
        };
        let fresh_path = self.layout.path(layout::FRESHNESS)?;
        if let Some(bytes) = self.store.get(&fresh_path)? {
            let f: pb::Freshness = self.decode(&fresh_path, &bytes)?;
            state.generation = f.generation;
        }
        let names_path = self.layout.path(layout::NAMES)?;
        let Some(names_bytes) = self.store.get(&names_path)? else {
            return Ok(state);
        };
        let names: pb::Names = self.decode(&names_path, &names_bytes)?;
        state
            .digests
            .insert(layout::NAMES.into(), Digest256::of(&names_bytes));
        let versions_path = self.layout.path(layout::VERSIONS)?;
        if let Some(b) = self.store.get(&versions_path)? {
            state
                .digests
                .insert(layout::VERSIONS.into(), Digest256::of(&b));
        }
        for entry in names.packages {
            let name = PackageName::new(&entry.name)?;
            let path = self.layout.package(&name)?;
            let bytes = self.store.get(&path)?.ok_or_else(|| {
                PublishError::Invalid(format!("{names_path} names {name} but {path} is missing"))
            })?;
            let pkg: pb::Package = self.decode(&path, &bytes)?;
            state.digests.insert(
                format!("{}/{name}", layout::PACKAGES_DIR),
                Digest256::of(&bytes),
            );
            state.rows.insert(entry.name.clone(), render::row(&pkg));
            state.packages.insert(entry.name, pkg);
        }
        Ok(state)
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
    /// the shared index write fails them all.
    pub fn publish_batch(&self, uploads: Vec<Upload>) -> Vec<Result<Published, PublishError>> {
        let mut state = self.lock();
        let mut results: Vec<Option<Result<Published, PublishError>>> =
            uploads.iter().map(|_| None).collect();

        // 1. Check every upload against the repository and the uploads before
        //    it in the batch, on copies of the packages they touch.
        let mut scratch: BTreeMap<String, pb::Package> = BTreeMap::new();
        let mut candidates = Vec::new();
        for (i, up) in uploads.iter().enumerate() {
            match self.stage_artifact(&state.packages, &mut scratch, up) {
                Ok(()) => candidates.push(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        // 2. Archives before any index names them: all in one batch.
        let mut puts = Vec::with_capacity(candidates.len());
        for &i in &candidates {
            match self.layout.path(&uploads[i].info.tree_path()) {
                Ok(p) => puts.push((p, uploads[i].staged.clone())),
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        candidates.retain(|i| results[*i].is_none());
        let mut stored = Vec::with_capacity(candidates.len());
        for (&i, r) in candidates.iter().zip(self.store.put_archives(&puts)) {
            match r {
                Ok(()) => stored.push(i),
                Err(StoreError::AlreadyExists { .. }) => {
                    let info = &uploads[i].info;
                    results[i] = Some(Err(PublishError::Conflict(format!(
                        "{} {} ({}) is already published",
                        info.name, info.version, info.arch
                    ))));
                }
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        if stored.len() < candidates.len() {
            // Some archives were refused by the store: redo the merge with
            // only the stored ones (fewer uploads can only conflict less).
            scratch.clear();
            for &i in &stored {
                if let Err(e) = self.stage_artifact(&state.packages, &mut scratch, &uploads[i]) {
                    results[i] = Some(Err(e));
                }
            }
        }
        // 3. One rewrite of the touched packages and the global indexes.
        if !scratch.is_empty() {
            let touched: BTreeSet<String> = scratch.keys().cloned().collect();
            let mut undo = Vec::with_capacity(scratch.len());
            for (name, pkg) in scratch {
                undo.push((name.clone(), state.packages.insert(name, pkg)));
            }
            if let Err(e) = self.write_packages(&mut state, &touched, Vec::new()) {
                for (name, old) in undo {
                    match old {
                        Some(p) => state.packages.insert(name, p),
                        None => state.packages.remove(&name),
                    };
                }
                let msg = e.to_string();
                for &i in &stored {
                    results[i].get_or_insert_with(|| {
                        Err(PublishError::Invalid(format!("index write failed: {msg}")))
                    });
                }
            }
        }
        uploads
            .iter()
            .zip(results)
            .map(|(up, r)| {
                r.unwrap_or_else(|| {
                    let info = &up.info;
                    Ok(Published {
                        name: info.name.clone(),
                        version: info.version.clone(),
                        arch: info.arch.clone(),
                        path: self.layout.path(&info.tree_path())?,
                        sha256: info.sha256,
                        size: info.size,
                    })
                })
            })
            .collect()
    }

    /// Merges one upload into `scratch` (copies of the packages a batch
    /// touches), leaving `scratch` unchanged if it is refused.
    fn stage_artifact(
        &self,
        packages: &BTreeMap<String, pb::Package>,
        scratch: &mut BTreeMap<String, pb::Package>,
        upload: &Upload,
    ) -> Result<(), PublishError> {
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
        render::normalize(&mut pkg);
        scratch.insert(name.to_string(), pkg);
        Ok(())
    }

    /// Removes one artifact; a release without artifacts disappears, with the
    /// tags that pointed at it, and a package without releases disappears.
    pub fn delete(
        &self,
        name: &PackageName,
        version: &Version,
        arch: &Arch,
    ) -> Result<(), PublishError> {
        let mut state = self.lock();
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
        let old = if pkg.releases.is_empty() {
            state.packages.remove(name.as_str())
        } else {
            state.packages.insert(name.to_string(), pkg)
        };
        let removals = vec![
            Op::Remove {
                path: self.layout.path(&removed.path)?,
            },
            Op::Remove {
                path: self.layout.v1_archive(name, version, arch)?,
            },
        ];
        let touched = BTreeSet::from([name.to_string()]);
        if let Err(e) = self.write_packages(&mut state, &touched, removals) {
            if let Some(old) = old {
                state.packages.insert(name.to_string(), old);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Points `tag` at `version` (creating or moving it).
    pub fn set_tag(
        &self,
        name: &PackageName,
        tag: &TagName,
        version: &Version,
    ) -> Result<(), PublishError> {
        let mut state = self.lock();
        let mut pkg = state
            .packages
            .get(name.as_str())
            .cloned()
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
        let old = state.packages.insert(name.to_string(), pkg);
        let touched = BTreeSet::from([name.to_string()]);
        if let Err(e) = self.write_packages(&mut state, &touched, Vec::new()) {
            if let Some(old) = old {
                state.packages.insert(name.to_string(), old);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Re-signs the freshness sidecar with a new generation and expiry, and
    /// writes any index that is missing (a new repository's empty ones).
    pub fn refresh(&self) -> Result<(), PublishError> {
        let mut state = self.lock();
        self.write_packages(&mut state, &BTreeSet::new(), Vec::new())
    }

    /// Writes the touched packages, the global indexes and the sidecar, then
    /// applies `removals`.
    fn write_packages(
        &self,
        state: &mut State,
        touched: &BTreeSet<String>,
        removals: Vec<Op>,
    ) -> Result<(), PublishError> {
        let mut stage_packages = Vec::new();
        let mut stale = Vec::new();
        let mut new_digests = Vec::new();
        for name in touched {
            let dir = self.layout.v1_dir(name);
            let existing: BTreeSet<TreePath> = self.store.list(&dir)?.into_iter().collect();
            match state.packages.get(name) {
                Some(pkg) => {
                    let (ops, digest) =
                        render::package_files(&self.layout, pkg, self.signer.as_ref())?;
                    let owned: BTreeSet<TreePath> =
                        render::owned_v1_paths(&ops).into_iter().collect();
                    stale.extend(
                        existing
                            .difference(&owned)
                            .map(|p| Op::Remove { path: p.clone() }),
                    );
                    // Only what changed: the other releases' documents of a
                    // package with many versions stay as they are.
                    for op in ops {
                        if !existing.contains(op.path()) || !self.unchanged(&op)? {
                            stage_packages.push(op);
                        }
                    }
                    new_digests.push((format!("{}/{name}", layout::PACKAGES_DIR), Some(digest)));
                }
                None => {
                    let pname = PackageName::new(name)?;
                    stale.extend(existing.into_iter().map(|p| Op::Remove { path: p }));
                    stale.push(Op::Remove {
                        path: self.layout.package(&pname)?,
                    });
                    new_digests.push((format!("{}/{name}", layout::PACKAGES_DIR), None));
                }
            }
        }
        // Rows of the touched packages, merged in name order with the kept
        // rows of all the others.
        let new_rows: BTreeMap<&String, Option<render::Row>> = touched
            .iter()
            .map(|n| (n, state.packages.get(n).map(render::row)))
            .collect();
        // `names` changes only when a package appears or disappears.
        let names_changed = touched
            .iter()
            .any(|n| state.rows.contains_key(n) != state.packages.contains_key(n))
            || !state.digests.contains_key(layout::NAMES);
        let globals = {
            let mut merged = Vec::with_capacity(state.rows.len() + new_rows.len());
            let mut fresh = new_rows.iter().peekable();
            for (name, row) in &state.rows {
                while let Some((_, r)) = fresh.next_if(|(n, _)| **n < name) {
                    merged.extend(r.as_ref());
                }
                match fresh.next_if(|(n, _)| *n == &name) {
                    Some((_, r)) => merged.extend(r.as_ref()),
                    None => merged.push(row),
                }
            }
            merged.extend(fresh.filter_map(|(_, r)| r.as_ref()));
            render::global_files(
                self.repository.as_str(),
                merged,
                names_changed,
                self.signer.as_ref(),
            )?
        };
        // Update the digests in place (a copy costs O(N) per publish) and
        // put them back if the write fails.
        let mut undo: Vec<(String, Option<Digest256>)> = Vec::with_capacity(new_digests.len() + 2);
        new_digests.push((
            layout::VERSIONS.into(),
            Some(Digest256::of(&globals.versions)),
        ));
        if let Some(names) = &globals.names {
            new_digests.push((layout::NAMES.into(), Some(Digest256::of(names))));
        }
        for (path, d) in new_digests {
            let old = match d {
                Some(d) => state.digests.insert(path.clone(), d),
                None => state.digests.remove(&path),
            };
            undo.push((path, old));
        }
        let written = self.write_globals(state, stage_packages, globals, removals, stale);
        if written.is_ok() {
            for (name, row) in new_rows {
                match row {
                    Some(r) => state.rows.insert(name.clone(), r),
                    None => state.rows.remove(name),
                };
            }
        } else {
            for (path, old) in undo.into_iter().rev() {
                match old {
                    Some(d) => state.digests.insert(path, d),
                    None => state.digests.remove(&path),
                };
            }
        }
        written
    }

    /// The stages after the packages: `versions`, `names` (with the key and
    /// the v1 list), the freshness record, then removals.
    fn write_globals(
        &self,
        state: &mut State,
        stage_packages: Vec<Op>,
        globals: render::GlobalFiles,
        mut removals: Vec<Op>,
        stale: Vec<Op>,
    ) -> Result<(), PublishError> {
        let generation = state.generation + 1;
        let now = (self.clock)();
        let fresh = render::freshness(
            self.repository.as_str(),
            generation,
            now,
            now + self.options.freshness_ttl,
            &state.digests,
            self.signer.as_ref(),
        )?;
        let mut names_stage = Vec::with_capacity(3);
        let key_path = self.layout.path(layout::PUBLIC_KEY)?;
        let public_key = self.signer.public_key().to_pem().into_bytes();
        if self.store.get(&key_path)?.as_deref() != Some(public_key.as_slice()) {
            names_stage.push(Op::Put {
                path: key_path,
                bytes: public_key,
            });
        }
        if let Some(names) = globals.names {
            names_stage.push(Op::Put {
                path: self.layout.path(layout::NAMES)?,
                bytes: names,
            });
        }
        names_stage.push(Op::Put {
            path: self.layout.path(layout::V1_INDEX)?,
            bytes: globals.v1_index,
        });
        removals.extend(stale);
        // versions before names: a reader of names finds every package in
        // versions. All of them become visible in this order, after the
        // packages they name are durable.
        let mut globals_stage = vec![Op::Put {
            path: self.layout.path(layout::VERSIONS)?,
            bytes: globals.versions,
        }];
        globals_stage.extend(names_stage);
        globals_stage.push(Op::Put {
            path: self.layout.path(layout::FRESHNESS)?,
            bytes: fresh,
        });
        let stages = vec![stage_packages, globals_stage, removals];
        self.store.apply(&stages)?;
        state.generation = generation;
        Ok(())
    }

    /// Regenerates every index of the repository from the archives in the
    /// tree (`tarballs/*.tar`, `archives/*.niso`).
    ///
    /// What archives cannot tell — upload times, publisher signatures, tags,
    /// retirements — is carried over from the current (verified) indexes;
    /// an archive no index knows gets its file's modification time as upload
    /// time. Any bad archive refuses the whole rebuild, changing nothing.
    pub fn rebuild(&self) -> Result<RebuildReport, PublishError> {
        let mut state = self.lock();
        let mut paths = self.store.list(&self.layout.dir(layout::TARBALLS_DIR))?;
        paths.extend(self.store.list(&self.layout.dir(layout::ARCHIVES_DIR))?);
        let inspected = self.inspect_all(&paths);

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
        // what differs, remove what no longer belongs.
        let rendered = self.render_all(&packages, &state)?;
        let mut existing: BTreeSet<TreePath> = self
            .store
            .list(&self.layout.dir(layout::PACKAGES_DIR))?
            .into_iter()
            .collect();
        existing.extend(self.store.list(&self.layout.dir("v1"))?);
        let mut stage_packages = Vec::new();
        let mut keep = BTreeSet::new();
        let mut digests = BTreeMap::new();
        for (name, ops, digest) in rendered {
            digests.insert(format!("{}/{name}", layout::PACKAGES_DIR), digest);
            // Kept even when unchanged and so not rendered again.
            keep.insert(self.layout.package(&PackageName::new(&name)?)?);
            for op in ops {
                keep.insert(op.path().clone());
                if existing.contains(op.path()) && self.unchanged(&op)? {
                    continue;
                }
                stage_packages.push(op);
            }
        }
        let rows: BTreeMap<String, render::Row> = packages
            .iter()
            .map(|(n, p)| (n.clone(), render::row(p)))
            .collect();
        let globals = render::global_files(
            self.repository.as_str(),
            rows.values(),
            true,
            self.signer.as_ref(),
        )?;
        digests.insert(layout::VERSIONS.into(), Digest256::of(&globals.versions));
        if let Some(names) = &globals.names {
            digests.insert(layout::NAMES.into(), Digest256::of(names));
        }
        keep.insert(self.layout.path(layout::V1_INDEX)?);
        let removals: Vec<Op> = existing
            .difference(&keep)
            .map(|p| Op::Remove { path: p.clone() })
            .collect();
        report.files_written = stage_packages.len() + 4;
        report.files_removed = removals.len();

        let previous = std::mem::replace(&mut state.digests, digests);
        if let Err(e) =
            self.write_globals(&mut state, stage_packages, globals, removals, Vec::new())
        {
            state.digests = previous;
            return Err(e);
        }
        state.packages = packages;
        state.rows = rows;
        Ok(report)
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
            Op::Remove { .. } => Ok(false),
        }
    }

    /// Inspects archives on two threads (or more when the machine has them).
    fn inspect_all(&self, paths: &[TreePath]) -> Vec<Result<(ArchiveInfo, i64), PublishError>> {
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(8);
        let chunk = paths.len().div_ceil(workers).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = paths
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || part.iter().map(|p| self.inspect_one(p)).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(PublishError::Invalid("archive reader panicked".into()))]
                    })
                })
                .collect()
        })
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

    /// Renders every package, signing on several threads: RSA signatures are
    /// most of a rebuild's CPU time. A package whose content equals the
    /// current (verified) index is not signed again: its index stays as it is.
    #[allow(clippy::type_complexity)]
    fn render_all(
        &self,
        packages: &BTreeMap<String, pb::Package>,
        current: &State,
    ) -> Result<Vec<(String, Vec<Op>, Digest256)>, PublishError> {
        let list: Vec<&pb::Package> = packages.values().collect();
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(8);
        let chunk = list.len().div_ceil(workers).max(1);
        let render = |p: &pb::Package| -> Result<(String, Vec<Op>, Digest256), PublishError> {
            let path = format!("{}/{}", layout::PACKAGES_DIR, p.name);
            if current.packages.get(&p.name) == Some(p) {
                if let Some(d) = current.digests.get(&path) {
                    return Ok((
                        p.name.clone(),
                        render::v1_files(&self.layout, p)?,
                        d.clone(),
                    ));
                }
            }
            let (ops, d) = render::package_files(&self.layout, p, self.signer.as_ref())?;
            Ok((p.name.clone(), ops, d))
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = list
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|p| render(p))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(list.len());
            for h in handles {
                let part = h
                    .join()
                    .map_err(|_| PublishError::Invalid("index renderer panicked".into()))??;
                out.extend(part);
            }
            Ok(out)
        })
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
