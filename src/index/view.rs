//! What each file of a repository's tree must say, derived from a
//! package's niso index (`niso/packages/NAME`): the rules the publisher
//! writes by and every reader (`verify`, the client, mirrors) checks by.
//! Nothing here signs or writes; the publisher's `render` adds that.
//!
//! Each package has two signed indexes: `niso/packages/NAME`, every release
//! with every artifact, its tags and tombstones (what niso's clients read),
//! and Hex's `packages/NAME`, only the releases that have a Hex tarball (what
//! hex_core accepts: it refuses releases without checksums). `names` and
//! `versions` are the Hex view too; `v1/` lists everything.

use sha2::{Digest, Sha256};

use crate::ident::{Arch, IdentError, PackageName, Version};
use crate::index::json::{self, Manifest, ManifestBinary, ManifestIsolation, ManifestPackage};
use crate::index::layout::{self, Layout};
use crate::index::pb;
use crate::store::{Attributes, StoreError, TreePath};

/// Why a view could not be rendered (an index holding a name or version no
/// writer of this tree produces).
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Ident(#[from] IdentError),
    #[error(transparent)]
    Path(#[from] StoreError),
}

/// SHA-256 and length of a file, for the freshness sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest256 {
    pub sha256: [u8; 32],
    pub length: u64,
}

impl Digest256 {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            sha256: Sha256::digest(bytes).into(),
            length: bytes.len() as u64,
        }
    }
}

/// What a rendered file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    /// The bytes of another file of the tree (an archive).
    Copy(TreePath),
}

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOut {
    pub path: TreePath,
    pub content: Content,
    pub attributes: Attributes,
}

impl FileOut {
    pub fn bytes(path: TreePath, bytes: Vec<u8>) -> Self {
        let attributes = layout::attributes(path.as_str(), None);
        Self {
            path,
            content: Content::Bytes(bytes),
            attributes,
        }
    }

    pub fn copy(from: TreePath, to: TreePath, download: &str) -> Self {
        let attributes = layout::attributes(to.as_str(), Some(download));
        Self {
            path: to,
            content: Content::Copy(from),
            attributes,
        }
    }
}

/// Puts a package's lists into their canonical order and recomputes the
/// package-level description, so equal content always encodes equally.
pub fn normalize(pkg: &mut pb::Package) {
    pkg.releases.sort_by_cached_key(|r| version_key(&r.version));
    for r in &mut pkg.releases {
        r.artifacts.sort_by(|a, b| a.arch.cmp(&b.arch));
    }
    pkg.tags.sort_by(|a, b| a.tag.cmp(&b.tag));
    pkg.tombstones.sort_by(|a, b| {
        (version_key(&a.version), &a.arch).cmp(&(version_key(&b.version), &b.arch))
    });
    pkg.description = pkg
        .releases
        .iter()
        .rev()
        .find_map(|r| r.description.clone());
}

/// Orders versions by semver; an unparsable one (never written by us) sorts
/// first so it cannot become `latest`.
pub fn version_key(v: &str) -> Option<semver::Version> {
    semver::Version::parse(v).ok()
}

/// The newest release, preferring releases that are not pre-releases, among
/// those `filter` accepts.
pub fn latest(pkg: &pb::Package, filter: impl Fn(&pb::Release) -> bool) -> Option<&pb::Release> {
    let candidates: Vec<&pb::Release> = pkg.releases.iter().filter(|r| filter(r)).collect();
    let stable = candidates
        .iter()
        .rev()
        .find(|r| version_key(&r.version).is_some_and(|v| v.pre.is_empty()));
    stable.or(candidates.last()).copied()
}

/// Whether an artifact is a Hex tarball.
pub fn is_hex(a: &pb::Artifact) -> bool {
    a.path.starts_with(layout::TARBALLS_DIR)
}

/// Hex's view of a package: the releases that have a Hex tarball, with only
/// that artifact, and the tags that point at them. `None` when there are
/// none: the package is then not in Hex's `names` at all.
pub fn hex_view(pkg: &pb::Package) -> Option<pb::Package> {
    let releases: Vec<pb::Release> = pkg
        .releases
        .iter()
        .filter(|r| r.artifacts.iter().any(is_hex))
        .map(|r| {
            let mut r = r.clone();
            r.artifacts.retain(is_hex);
            r
        })
        .collect();
    if releases.is_empty() {
        return None;
    }
    let mut view = pb::Package {
        name: pkg.name.clone(),
        repository: pkg.repository.clone(),
        tags: pkg
            .tags
            .iter()
            .filter(|t| releases.iter().any(|r| r.version == t.version))
            .cloned()
            .collect(),
        releases,
        ..Default::default()
    };
    normalize(&mut view);
    Some(view)
}

/// Whether a package has anything left to say: releases, or tombstones that
/// keep deleted versions from coming back with other bytes.
pub fn is_empty(pkg: &pb::Package) -> bool {
    pkg.releases.is_empty() && pkg.tombstones.is_empty()
}

/// The `v1/` documents and downloads of one package (none for a package
/// that only has tombstones left).
pub fn v1_files(layout: &Layout, pkg: &pb::Package) -> Result<Vec<FileOut>, ViewError> {
    let name = PackageName::new(&pkg.name)?;
    let mut files = Vec::new();
    if pkg.releases.is_empty() {
        return Ok(files);
    }

    let mut entries = Vec::new();
    for r in &pkg.releases {
        let version = Version::new(&r.version)?;
        for a in &r.artifacts {
            entries.push(json::VersionEntry {
                version: r.version.clone(),
                arch: a.arch.clone(),
                size: a.size,
                sha256: hex::encode(&a.sha256),
                uploaded_at: json::rfc3339(a.uploaded_at),
                retired: r.retired.is_some(),
            });
            let arch = Arch::new(&a.arch)?;
            files.push(FileOut::copy(
                layout.path(&a.path)?,
                layout.v1_archive(&name, &version, &arch)?,
                layout::download_name(&a.path),
            ));
        }
        let manifest = Manifest {
            package: ManifestPackage {
                name: pkg.name.clone(),
                version: r.version.clone(),
                description: r.description.clone(),
            },
            binary: r
                .entrypoint
                .clone()
                .map(|entrypoint| ManifestBinary { entrypoint }),
            isolation: r
                .isolation_preset
                .clone()
                .map(|preset| ManifestIsolation { preset }),
        };
        files.push(FileOut::bytes(
            layout.v1_manifest(&name, &version)?,
            json::to_bytes(&manifest),
        ));
    }

    // latest/ARCH follows the newest release that has ARCH.
    let mut arches: Vec<&str> = pkg
        .releases
        .iter()
        .flat_map(|r| r.artifacts.iter().map(|a| a.arch.as_str()))
        .collect();
    arches.sort_unstable();
    arches.dedup();
    for arch in arches {
        if let Some(r) = latest(pkg, |r| r.artifacts.iter().any(|a| a.arch == arch)) {
            if let Some(a) = r.artifacts.iter().find(|a| a.arch == arch) {
                files.push(FileOut::copy(
                    layout.path(&a.path)?,
                    layout.v1_latest(&name, &Arch::new(arch)?)?,
                    layout::download_name(&a.path),
                ));
            }
        }
    }

    files.push(FileOut::bytes(
        layout.v1_versions(&name)?,
        json::to_bytes(&json::VersionList {
            name: pkg.name.clone(),
            versions: entries,
        }),
    ));
    files.push(FileOut::bytes(
        layout.v1_tags(&name)?,
        json::to_bytes(&json::TagList {
            tags: pkg
                .tags
                .iter()
                .map(|t| json::TagEntry {
                    tag: t.tag.clone(),
                    version: t.version.clone(),
                })
                .collect(),
        }),
    ));
    Ok(files)
}

/// A package's entry in `GET /v1/packages`.
pub fn summary(pkg: &pb::Package) -> json::PackageSummary {
    json::PackageSummary {
        name: pkg.name.clone(),
        versions: pkg.releases.iter().map(|r| r.version.clone()).collect(),
        latest: latest(pkg, |_| true).map(|r| r.version.clone()),
        description: pkg.description.clone(),
    }
}

/// A package's entry in `versions`: its versions in index order, and the
/// positions of the retired ones.
pub fn versions_entry(pkg: &pb::Package) -> pb::VersionsPackage {
    pb::VersionsPackage {
        name: pkg.name.clone(),
        versions: pkg.releases.iter().map(|r| r.version.clone()).collect(),
        retired: pkg
            .releases
            .iter()
            .enumerate()
            .filter(|(_, r)| r.retired.is_some())
            .map(|(i, _)| i as i32)
            .collect(),
    }
}

/// How many freshness bins a repository's package digests are spread over.
pub const FRESHNESS_BINS: usize = 256;

/// The freshness bin of a package: the first byte of the SHA-256 of its name
/// (uniform, and the same on every machine).
pub fn bin_of(name: &str) -> u8 {
    Sha256::digest(name.as_bytes())[0]
}
