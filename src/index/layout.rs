//! Where each file goes in a repository's tree. One function per file kind,
//! so the publisher, `verify` and the servers agree on every path.
//!
//! ```text
//! names, versions, packages/NAME      Hex registry v2 indexes (signed): the
//!                                     Hex view, only releases with a Hex tarball
//! niso/packages/NAME                  niso's index of the package (signed, same
//!                                     message): every release, every arch, tags,
//!                                     tombstones of deleted artifacts
//! public_key                          the repository's RSA public key (PEM)
//! freshness                           niso's signed freshness sidecar
//! publisher-keys                      the publisher (Ed25519) keys, signed
//! freshness-bins/XX                   digests of the package indexes in bin XX
//! tarballs/NAME-VERSION.tar           Hex tarballs (immutable)
//! archives/NAME-VERSION-ARCH.niso     .niso archives (immutable)
//! v1/packages/index.json              GET /v1/packages
//! v1/packages/NAME/versions           GET /v1/packages/NAME/versions
//! v1/packages/NAME/tags               GET /v1/packages/NAME/tags
//! v1/packages/NAME/VERSION/manifest   GET /v1/packages/NAME/VERSION/manifest
//! v1/packages/NAME/VERSION/ARCH       the archive (a hard link to it)
//! v1/packages/NAME/latest/ARCH        the newest archive for ARCH (a link)
//! repos/ORG/…                         an organization repository, same layout
//! ```
//!
//! `v1/packages` is a directory on disk, so its listing is
//! `v1/packages/index.json` (S3 could hold both, a file system cannot); the
//! embedded server and `nginx.conf.example` map one to the other. No package
//! name contains `.`, so `index.json` cannot collide with a package.

use crate::ident::{Arch, PackageName, Version};
use crate::store::{Attributes, StoreError, TreePath};

pub const NAMES: &str = "names";
pub const VERSIONS: &str = "versions";
pub const PUBLIC_KEY: &str = "public_key";
pub const FRESHNESS: &str = "freshness";
pub const PUBLISHER_KEYS: &str = "publisher-keys";
pub const FRESHNESS_BINS_DIR: &str = "freshness-bins";
pub const PACKAGES_DIR: &str = "packages";
pub const NISO_PACKAGES_DIR: &str = "niso/packages";
pub const TARBALLS_DIR: &str = "tarballs";
pub const ARCHIVES_DIR: &str = "archives";
pub const V1_INDEX: &str = "v1/packages/index.json";
pub const REPOS_DIR: &str = "repos";

/// Paths of one repository: the root repository (`prefix` empty) or an
/// organization's (`prefix` = `repos/ORG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    pub fn root() -> Self {
        Self {
            prefix: String::new(),
        }
    }

    pub fn organization(org: &crate::ident::RepoName) -> Self {
        Self {
            prefix: format!("{REPOS_DIR}/{org}"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A path under this repository. Every caller passes segments that are
    /// validated identifiers, so this only fails on a programming error.
    pub fn path(&self, rel: &str) -> Result<TreePath, StoreError> {
        TreePath::new(rel)?.under(&self.prefix)
    }

    pub fn dir(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// A freshness bin, relative to the repository (as `freshness` lists it).
    pub fn freshness_bin_rel(bin: u8) -> String {
        format!("{FRESHNESS_BINS_DIR}/{bin:02x}")
    }

    pub fn freshness_bin(&self, bin: u8) -> Result<TreePath, StoreError> {
        self.path(&Self::freshness_bin_rel(bin))
    }

    pub fn package(&self, name: &PackageName) -> Result<TreePath, StoreError> {
        self.path(&format!("{PACKAGES_DIR}/{name}"))
    }

    /// niso's own index of a package (every release; see the module doc).
    pub fn niso_package(&self, name: &PackageName) -> Result<TreePath, StoreError> {
        self.path(&format!("{NISO_PACKAGES_DIR}/{name}"))
    }

    pub fn v1_dir(&self, name: &str) -> String {
        self.dir(&format!("v1/packages/{name}"))
    }

    pub fn v1_versions(&self, name: &PackageName) -> Result<TreePath, StoreError> {
        self.path(&format!("v1/packages/{name}/versions"))
    }

    pub fn v1_tags(&self, name: &PackageName) -> Result<TreePath, StoreError> {
        self.path(&format!("v1/packages/{name}/tags"))
    }

    pub fn v1_manifest(
        &self,
        name: &PackageName,
        version: &Version,
    ) -> Result<TreePath, StoreError> {
        self.path(&format!("v1/packages/{name}/{version}/manifest"))
    }

    pub fn v1_archive(
        &self,
        name: &PackageName,
        version: &Version,
        arch: &Arch,
    ) -> Result<TreePath, StoreError> {
        self.path(&format!("v1/packages/{name}/{version}/{arch}"))
    }

    pub fn v1_latest(&self, name: &PackageName, arch: &Arch) -> Result<TreePath, StoreError> {
        self.path(&format!("v1/packages/{name}/latest/{arch}"))
    }
}

/// The file name a download of an artifact should be saved as (seed 000's
/// `Content-Disposition`): the base name of its path in the tree.
pub fn download_name(artifact_path: &str) -> &str {
    artifact_path.rsplit('/').next().unwrap_or(artifact_path)
}

/// Cache-Control of files that never change once written.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Cache-Control of files a publish rewrites: revalidate (cheap, with ETags).
pub const REVALIDATE: &str = "public, no-cache";

/// What kind of file a path of a repository's tree is (relative to the
/// repository's root, `repos/ORG/` already taken off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `tarballs/…`, `archives/…`: never change.
    Archive,
    /// `v1/packages/NAME/VERSION/ARCH`: a copy of an archive.
    Download,
    /// `v1/packages/NAME/latest/ARCH`: a copy of the newest archive.
    Latest,
    /// Every other `v1/` file: a JSON document.
    Json,
    PublicKey,
    /// Indexes, freshness record and bins.
    Index,
}

impl FileKind {
    pub fn of(rel: &str) -> Self {
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            [TARBALLS_DIR, _] | [ARCHIVES_DIR, _] => FileKind::Archive,
            ["v1", "packages", _, "latest", _] => FileKind::Latest,
            ["v1", "packages", _, _, arch] if *arch != "manifest" => FileKind::Download,
            ["v1", ..] => FileKind::Json,
            [PUBLIC_KEY] => FileKind::PublicKey,
            _ => FileKind::Index,
        }
    }
}

/// The path relative to its repository, and whether it is an
/// organization's (private) repository.
pub fn split_repository(path: &str) -> (&str, bool) {
    match path.strip_prefix("repos/") {
        Some(rest) => (rest.split_once('/').map_or("", |(_, r)| r), true),
        None => (path, false),
    }
}

/// The attributes every store keeps with the object at `path` (a tree
/// path), and every server sends with it: the one place that decides them.
/// `download` is the file name a download is saved as, when the caller
/// knows it (`latest/ARCH` needs it; other downloads follow from the path).
pub fn attributes(path: &str, download: Option<&str>) -> Attributes {
    let (rel, private) = split_repository(path);
    let kind = FileKind::of(rel);
    let content_type = match kind {
        FileKind::Json => "application/json",
        FileKind::PublicKey => "application/x-pem-file",
        _ => "application/octet-stream",
    };
    let cache = match kind {
        FileKind::Archive | FileKind::Download => IMMUTABLE,
        _ => REVALIDATE,
    };
    // An organization's files are read with a key: no shared cache may keep
    // them for others.
    let cache_control = if private {
        cache.replacen("public", "private", 1)
    } else {
        cache.to_string()
    };
    // A download's name comes from its artifact (the caller's); an archive's
    // is its own file name.
    let name = match (kind, download) {
        (FileKind::Archive | FileKind::Download | FileKind::Latest, Some(d)) => Some(d.to_string()),
        (FileKind::Archive, None) => Some(download_name(rel).to_string()),
        _ => None,
    };
    Attributes {
        content_type: content_type.to_string(),
        cache_control,
        content_disposition: name.map(|n| format!("attachment; filename=\"{n}\"")),
    }
}
