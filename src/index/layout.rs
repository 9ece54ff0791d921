//! Where each file goes in a repository's tree. One function per file kind,
//! so the publisher, `verify` and the servers agree on every path.
//!
//! ```text
//! names, versions, packages/NAME      Hex registry v2 indexes (signed)
//! public_key                          the repository's RSA public key (PEM)
//! freshness                           niso's signed freshness sidecar
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
use crate::store::{StoreError, TreePath};

pub const NAMES: &str = "names";
pub const VERSIONS: &str = "versions";
pub const PUBLIC_KEY: &str = "public_key";
pub const FRESHNESS: &str = "freshness";
pub const FRESHNESS_BINS_DIR: &str = "freshness-bins";
pub const PACKAGES_DIR: &str = "packages";
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
