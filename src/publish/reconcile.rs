//! Bringing the tree back in line with its indexes: [`Publisher::recover`]
//! after a crash, [`Publisher::rebuild`] from the archives.
//!
//! Both read every package's `niso/packages/NAME`, then the archives:
//!
//! * an archive no index names was written by a change that was cut off
//!   before its indexes: if its (version, arch) has a tombstone, the cut-off
//!   change was a delete, and the archive goes; otherwise it is checked and
//!   published (it passed every check before it was written), so the upload
//!   a client retries is found in place;
//! * `rebuild` also reads every archive an index names, and refuses the
//!   whole rebuild if one does not check out.
//!
//! Then every file derived from the indexes is rendered and compared with
//! the tree; what differs is written (conditionally, like any change), and
//! derived files no index calls for are removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures_util::StreamExt;
use rayon::prelude::*;

use super::render::{self, Content, FileOut};
use super::*;

/// An archive's facts and modification time, or why it cannot be read.
type Inspected = Result<(ArchiveInfo, i64), PublishError>;

/// How often a reconcile starts again when another writer changes a
/// package meanwhile.
const RECONCILE_ATTEMPTS: usize = 8;

impl Publisher {
    /// Finishes or undoes every change that was cut off (a crash, a failed
    /// write): adopts or removes archives no index names, rewrites derived
    /// files that differ from the indexes, removes temp files of writers
    /// that are gone, and re-signs the freshness record. `serve`, `build`
    /// and `publish` run it on start.
    pub async fn recover(&self) -> Result<RebuildReport, PublishError> {
        let mut model = self.model.lock().await;
        self.reconcile(&mut model, false).await
    }

    /// Regenerates every index of the repository from the archives in the
    /// tree (`tarballs/*.tar`, `archives/*.niso`).
    ///
    /// What archives cannot tell — upload times, publisher signatures, tags,
    /// retirements, tombstones — is carried over from the current (verified)
    /// indexes; an archive no index knows gets its modification time as
    /// upload time. Any bad archive refuses the whole rebuild, changing
    /// nothing.
    pub async fn rebuild(&self) -> Result<RebuildReport, PublishError> {
        let mut model = self.model.lock().await;
        self.reconcile(&mut model, true).await
    }

    pub(super) async fn reconcile(
        &self,
        model: &mut Model,
        rebuild: bool,
    ) -> Result<RebuildReport, PublishError> {
        let mut last = None;
        for _ in 0..RECONCILE_ATTEMPTS {
            match self.reconcile_once(model, rebuild).await {
                Ok(r) => {
                    model.dirty = false;
                    return Ok(r);
                }
                Err(WriteError::Conflict(path)) => {
                    tracing::info!(%path, "another writer changed the tree during recovery; again");
                    last = Some(path);
                }
                Err(WriteError::Failed(e)) => {
                    model.dirty = true;
                    return Err(e);
                }
            }
        }
        model.dirty = true;
        Err(PublishError::Aborted(format!(
            "other writers kept changing the tree during recovery (last: {})",
            last.unwrap_or_default()
        )))
    }

    async fn reconcile_once(
        &self,
        model: &mut Model,
        rebuild: bool,
    ) -> Result<RebuildReport, WriteError> {
        let leftovers = self.store.clean_leftovers().await?;
        if leftovers > 0 {
            tracing::info!(leftovers, "removed temp files of writers that are gone");
        }
        // What the writer was told, not what the tree holds.
        let keys = model.publisher_keys.take();
        *model = self.load().await?;
        model.publisher_keys = keys;
        let mut report = RebuildReport::default();

        // The archives, and what the indexes say of them.
        let mut archives = self
            .store
            .list(&self.layout.dir(layout::TARBALLS_DIR))
            .await?;
        archives.extend(
            self.store
                .list(&self.layout.dir(layout::ARCHIVES_DIR))
                .await?,
        );
        let present: BTreeSet<&TreePath> = archives.iter().collect();
        let mut named: HashMap<TreePath, (String, String, String)> = HashMap::new();
        let mut tombstoned: HashMap<TreePath, Vec<u8>> = HashMap::new();
        for (name, e) in &model.packages {
            for r in &e.index.releases {
                for a in &r.artifacts {
                    let path = self.layout.path(&a.path).map_err(PublishError::from)?;
                    named.insert(path, (name.clone(), r.version.clone(), a.arch.clone()));
                }
            }
            for t in &e.index.tombstones {
                for rel in [
                    format!("{}/{name}-{}.tar", layout::TARBALLS_DIR, t.version),
                    format!(
                        "{}/{name}-{}-{}.niso",
                        layout::ARCHIVES_DIR,
                        t.version,
                        t.arch
                    ),
                ] {
                    if let Ok(p) = self.layout.path(&rel) {
                        tombstoned.insert(p, t.sha256.clone());
                    }
                }
            }
        }

        // An index naming an archive that is gone (removed by hand): the
        // artifact goes from the index, so nothing names a missing file.
        let mut packages: BTreeMap<String, pb::Package> = model
            .packages
            .iter()
            .map(|(n, e)| (n.clone(), e.index.clone()))
            .collect();
        for (path, (name, version, arch)) in &named {
            if present.contains(path) {
                continue;
            }
            tracing::warn!(%path, "an index names an archive that is not in the tree; dropping it");
            if let Some(pkg) = packages.get_mut(name) {
                drop_artifact(pkg, version, arch);
            }
        }

        let to_read: Vec<TreePath> = archives
            .iter()
            .filter(|p| rebuild || !named.contains_key(*p))
            .filter(|p| named.contains_key(*p) || !tombstoned.contains_key(*p))
            .cloned()
            .collect();
        // Cut-off deletes: the archive of a tombstoned version.
        for path in archives
            .iter()
            .filter(|p| !named.contains_key(*p) && tombstoned.contains_key(*p))
        {
            tracing::info!(%path, "removing the archive of a deleted version (a delete was cut off)");
            self.store.delete(path).await?;
            report.discarded.push(path.to_string());
        }
        let futs: Vec<_> = to_read
            .into_iter()
            .map(|path| async move {
                let r = self.inspect(&path).await;
                (path, r)
            })
            .collect();
        let inspected: Vec<(TreePath, Inspected)> = all(futs).await;

        let mut problems = Vec::new();
        if rebuild {
            // From the archives alone, with what they cannot tell carried
            // over from the indexes.
            let old = std::mem::take(&mut packages);
            for (name, pkg) in &old {
                let mut fresh = pb::Package {
                    name: name.clone(),
                    repository: self.repository.to_string(),
                    tags: pkg.tags.clone(),
                    tombstones: pkg.tombstones.clone(),
                    ..Default::default()
                };
                fresh.releases.clear();
                packages.insert(name.clone(), fresh);
            }
            for (path, result) in &inspected {
                let (info, mtime) = match result {
                    Ok(x) => x,
                    Err(e) => {
                        problems.push(format!("{path}: {e}"));
                        continue;
                    }
                };
                if let Err(p) = self.check_place(path, info) {
                    problems.push(p);
                    continue;
                }
                let previous = old
                    .get(info.name.as_str())
                    .and_then(|p| artifact_in(p, info))
                    .filter(|a| a.sha256 == info.sha256);
                let mut artifact = artifact_from(info, *mtime, None);
                if let Some(o) = previous {
                    artifact.uploaded_at = o.uploaded_at;
                    artifact.publisher_signature = o.publisher_signature.clone();
                    artifact.publisher_key_id = o.publisher_key_id.clone();
                }
                if let Err(e) = self.adopt(&mut packages, info, artifact) {
                    problems.push(format!("{path}: {e}"));
                }
            }
            if !problems.is_empty() {
                return Err(PublishError::Rebuild(problems).into());
            }
            // Retirements of releases that are still there.
            for (name, pkg) in &mut packages {
                if let Some(o) = old.get(name) {
                    for r in &mut pkg.releases {
                        if let Some(or) = o.releases.iter().find(|x| x.version == r.version) {
                            r.retired = or.retired.clone();
                        }
                    }
                }
                let versions: BTreeSet<String> =
                    pkg.releases.iter().map(|r| r.version.clone()).collect();
                pkg.tags.retain(|t| versions.contains(&t.version));
                render::normalize(pkg);
            }
            packages.retain(|_, p| !render::is_empty(p));
        } else {
            for (path, result) in &inspected {
                let adopted = match result {
                    Ok((info, mtime)) => self
                        .check_place(path, info)
                        .map_err(PublishError::Invalid)
                        .and_then(|()| {
                            let artifact = artifact_from(info, *mtime, None);
                            self.adopt(&mut packages, info, artifact)
                        }),
                    Err(e) => Err(PublishError::Invalid(e.to_string())),
                };
                match adopted {
                    Ok(()) => {
                        tracing::info!(%path, "published an archive no index named (its change was cut off)");
                        report.adopted.push(path.to_string());
                    }
                    Err(e) => {
                        tracing::warn!(%path, error = %e, "removing an archive no index names and that cannot be published");
                        self.store.delete(path).await?;
                        report.discarded.push(path.to_string());
                    }
                }
            }
        }

        report.packages = packages.values().filter(|p| !p.releases.is_empty()).count();
        report.releases = packages.values().map(|p| p.releases.len()).sum();
        report.artifacts = packages
            .values()
            .flat_map(|p| &p.releases)
            .map(|r| r.artifacts.len())
            .sum();

        // Render everything and write what differs.
        let rendered: Vec<(String, Vec<FileOut>, BTreeMap<String, Digest256>)> = cpu(|| {
            packages
                .par_iter()
                .map(|(name, pkg)| {
                    let (files, digests) =
                        render::package_files(&self.layout, pkg, self.signer.as_ref())?;
                    Ok((name.clone(), files, digests))
                })
                .collect::<Result<_, PublishError>>()
        })?;
        let mut wanted: BTreeSet<TreePath> = BTreeSet::new();
        let mut writes = Vec::new();
        for (name, files, _) in &rendered {
            for f in files {
                wanted.insert(f.path.clone());
                writes.push((name.clone(), f));
            }
        }
        let loaded: HashMap<String, Option<ObjectVersion>> = model
            .packages
            .iter()
            .map(|(n, e)| (n.clone(), e.version.clone()))
            .collect();
        let loaded = &loaded;
        let futs: Vec<_> = writes
            .into_iter()
            .map(|(name, f)| async move {
                let version = loaded.get(&name).cloned().flatten();
                self.reconcile_file(f, version).await
            })
            .collect();
        let counts: Vec<bool> = try_all(futs).await?;
        report.files_written += counts.iter().filter(|w| **w).count();

        // Derived files no index calls for.
        let mut extra = Vec::new();
        for dir in [layout::PACKAGES_DIR, layout::NISO_PACKAGES_DIR, "v1"] {
            for p in self.store.list(&self.layout.dir(dir)).await? {
                if !wanted.contains(&p)
                    && p.as_str()
                        != self
                            .layout
                            .path(layout::V1_INDEX)
                            .map_err(PublishError::from)?
                            .as_str()
                {
                    extra.push(p);
                }
            }
        }
        for p in &extra {
            self.store.delete(p).await?;
        }
        report.files_removed += extra.len();

        // The model, then the shared files from it.
        let mut next = ModelUpdate::default();
        let futs: Vec<_> = rendered
            .iter()
            .map(|(n, _, _)| async move {
                let e = self.read_package(n).await?;
                Ok::<_, PublishError>((n.clone(), e))
            })
            .collect();
        let reread: Vec<(String, Option<Entry>)> = try_all(futs).await?;
        model.packages.clear();
        model.rows = render::Rows::default();
        for (name, entry) in reread {
            if let Some(e) = entry {
                next.packages.insert(name, e);
            }
        }
        let before = model.written.clone();
        let wrote = report.files_written > 0
            || report.files_removed > 0
            || !report.adopted.is_empty()
            || !report.discarded.is_empty();
        // `build` re-signs the record (a new expiry); recovery only when it
        // changed something.
        self.write_globals(model, &mut next, true, wrote || rebuild)
            .await?;
        report.files_written += model
            .written
            .iter()
            .filter(|(rel, d)| before.get(*rel) != Some(*d))
            .count();
        Ok(report)
    }

    /// Writes `f` if the tree does not hold it; whether it wrote.
    async fn reconcile_file(
        &self,
        f: &FileOut,
        niso_version: Option<ObjectVersion>,
    ) -> Result<bool, WriteError> {
        let is_niso = f
            .path
            .as_str()
            .starts_with(&format!("{}/", self.layout.dir(layout::NISO_PACKAGES_DIR)));
        match &f.content {
            Content::Bytes(b) => {
                let current = self.store.get(&f.path).await?;
                if current.as_ref().is_some_and(|o| o.bytes[..] == b[..]) {
                    return Ok(false);
                }
                // The niso index is the package's truth: written only over
                // the version this writer loaded.
                let mode = if is_niso {
                    PutMode::after(niso_version.as_ref())
                } else {
                    PutMode::after(current.as_ref().map(|o| &o.meta.version))
                };
                self.put_file(f, mode).await?;
                Ok(true)
            }
            Content::Copy(from) => {
                let (src, dst) = (
                    self.store.head(from).await?,
                    self.store.head(&f.path).await?,
                );
                let same = match (&src, &dst) {
                    (Some(s), Some(d)) => {
                        s.version == d.version
                            && d.attributes.as_ref().is_none_or(|a| *a == f.attributes)
                    }
                    _ => false,
                };
                if same {
                    return Ok(false);
                }
                self.put_file(f, PutMode::Overwrite).await?;
                Ok(true)
            }
        }
    }

    /// The archive's facts and its modification time.
    async fn inspect(&self, path: &TreePath) -> Result<(ArchiveInfo, i64), PublishError> {
        let limits = self.options.limits;
        let mtime = self
            .store
            .head(path)
            .await?
            .and_then(|m| m.last_modified)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(root) = self.store.local_root() {
            let full = root.join(path.as_str());
            let info = tokio::task::spawn_blocking(move || archive::inspect_file(&full, &limits))
                .await
                .map_err(|e| PublishError::Invalid(e.to_string()))??;
            return Ok((info, mtime));
        }
        // An object store: read it into a temp file first.
        let (_, mut s) = self
            .store
            .get_stream(path)
            .await?
            .ok_or_else(|| PublishError::NotFound(format!("{path} is gone")))?;
        let tmp =
            tempfile::NamedTempFile::new().map_err(|e| PublishError::Invalid(e.to_string()))?;
        {
            use std::io::Write;
            let mut w = std::io::BufWriter::new(tmp.as_file());
            while let Some(chunk) = s.next().await {
                w.write_all(&chunk?)
                    .map_err(|e| PublishError::Invalid(e.to_string()))?;
            }
            w.flush()
                .map_err(|e| PublishError::Invalid(e.to_string()))?;
        }
        let tmp_path = tmp.into_temp_path();
        let info = tokio::task::spawn_blocking(move || {
            let r = archive::inspect_file(&tmp_path, &limits);
            drop(tmp_path);
            r
        })
        .await
        .map_err(|e| PublishError::Invalid(e.to_string()))??;
        Ok((info, mtime))
    }

    /// An archive must sit where its content says.
    fn check_place(&self, path: &TreePath, info: &ArchiveInfo) -> Result<(), String> {
        let expected = self
            .layout
            .path(&info.tree_path())
            .map_err(|e| e.to_string())?;
        if &expected != path {
            return Err(format!(
                "{path}: holds {} {} ({}), so it must be named {expected}",
                info.name, info.version, info.arch
            ));
        }
        Ok(())
    }

    /// Adds an archive found in the tree to `packages`.
    fn adopt(
        &self,
        packages: &mut BTreeMap<String, pb::Package>,
        info: &ArchiveInfo,
        artifact: pb::Artifact,
    ) -> Result<(), PublishError> {
        let name = info.name.as_str();
        if !packages.contains_key(name) {
            check_confusable(packages.keys(), &info.name)?;
        }
        let pkg = packages
            .entry(name.to_string())
            .or_insert_with(|| pb::Package {
                name: name.to_string(),
                repository: self.repository.to_string(),
                ..Default::default()
            });
        restore_tombstone(pkg, info)?;
        merge_artifact(pkg, info, artifact)?;
        render::normalize(pkg);
        Ok(())
    }
}

/// Removes one artifact from an index (its release too, when it was the
/// last).
fn drop_artifact(pkg: &mut pb::Package, version: &str, arch: &str) {
    if let Some(ri) = pkg.releases.iter().position(|r| r.version == version) {
        pkg.releases[ri].artifacts.retain(|a| a.arch != arch);
        if pkg.releases[ri].artifacts.is_empty() {
            pkg.releases.remove(ri);
            pkg.tags.retain(|t| t.version != version);
        }
    }
    render::normalize(pkg);
}
