//! The read path of `pull`, `search`, `list-tags` and `push`'s "already
//! published?" check: fetch from a registry's static tree and verify
//! everything against the pinned key before anything is used.
//!
//! Every read starts with the signed `freshness` record (see
//! [`super::freshness`]), then a package's index through its freshness bin,
//! then (for a pull) the archive against the index. Any static host serves
//! these files: `niso registry serve`, nginx, S3, `python3 -m http.server`.

use std::io::Write;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::freshness::{self, Allow, Fresh, FreshnessError};
use super::transport::{Transport, TransportError};
use crate::archive;
use crate::ident::{Arch, PackageName, RepoName, TagName, Version};
use crate::index::codec::{decode_index, CodecError};
use crate::index::json;
use crate::index::keys::KeyError;
use crate::index::layout::{self, Layout};
use crate::index::{pb, PublicKey};
use crate::limits::Limits;

/// Where a package's signed index lives, relative to its repository's root.
///
/// The one place that knows it: niso's own index of every release,
/// `niso/packages/NAME` (Hex's `packages/NAME` lists only the releases with
/// a Hex tarball).
pub fn package_index_path(name: &PackageName) -> String {
    format!("{}/{name}", layout::NISO_PACKAGES_DIR)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Freshness(#[from] FreshnessError),
    #[error("{path}: the signature does not verify with the key pinned for this registry (sha256:{fingerprint}): the file was tampered with, or the registry now signs with another key. If its operator confirms a new key, add the registry again with `niso registry add` to pin it")]
    Signature { path: String, fingerprint: String },
    #[error("{path}: {source}")]
    Index { path: String, source: CodecError },
    #[error("{location}: this is not a niso registry, or not the root of one (no signed freshness record); check the URL")]
    NotARegistry { location: String },
    #[error("{location}: no organization repository {org} here (nothing was ever published into it, or your API key may not see it)")]
    NoOrganization { location: String, org: String },
    #[error("no package {name} in repository {repository}; try `niso search {name}`")]
    NoPackage { name: String, repository: String },
    #[error("{path}: names package {found:?}, not {expected:?}")]
    WrongPackage {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{path}: {size} bytes, but the signed index says {expected}: refusing it")]
    ArchiveSize {
        path: String,
        size: u64,
        expected: u64,
    },
    #[error("{path}: larger than the {expected} bytes the signed index says: refusing it")]
    ArchiveTooLarge { path: String, expected: u64 },
    #[error("{path}: SHA-256 {found}, but the signed index says {expected}: the archive was tampered with or corrupted; refusing it")]
    ArchiveDigest {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{path}: {reason}; refusing it")]
    ArchiveContent { path: String, reason: String },
    #[error("cannot write the download: {0}")]
    Io(#[from] std::io::Error),
}

/// One repository of a registry (the root one, or an organization's
/// `repos/ORG/`), read through a transport rooted at it.
pub struct RepoReader {
    transport: Box<dyn Transport>,
    key: PublicKey,
    repository: String,
    /// Path of this repository's freshness record from the registry's root:
    /// what the client's state remembers generations by.
    freshness_path: String,
    org: Option<RepoName>,
    limits: Limits,
}

impl RepoReader {
    /// `transport` must be rooted at the repository (`URL/` or
    /// `URL/repos/ORG/`); `org` says which.
    pub fn new(
        transport: Box<dyn Transport>,
        key: PublicKey,
        repository: &RepoName,
        org: Option<&RepoName>,
    ) -> Self {
        let prefix = org.map(Layout::organization).unwrap_or_else(Layout::root);
        Self {
            transport,
            key,
            repository: repository.to_string(),
            freshness_path: prefix.dir(layout::FRESHNESS),
            org: org.cloned(),
            limits: Limits::default(),
        }
    }

    pub fn freshness_path(&self) -> &str {
        &self.freshness_path
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    fn index_error(&self, path: &str, source: CodecError) -> ReadError {
        match source {
            CodecError::Signature(KeyError::BadSignature) => ReadError::Signature {
                path: self.transport.location(path),
                fingerprint: self.key.fingerprint(),
            },
            source => ReadError::Index {
                path: self.transport.location(path),
                source,
            },
        }
    }

    /// Fetches and verifies the freshness record: signature, repository,
    /// no rollback below `seen`, not expired (unless allowed).
    pub fn fresh(&self, now: i64, seen: Option<u64>, allow: Allow) -> Result<Fresh, ReadError> {
        let bytes = match self
            .transport
            .fetch(layout::FRESHNESS, self.limits.max_index)
        {
            Ok(b) => b,
            Err(TransportError::NotFound { location }) => {
                return Err(match &self.org {
                    Some(org) => ReadError::NoOrganization {
                        location,
                        org: org.to_string(),
                    },
                    None => ReadError::NotARegistry { location },
                })
            }
            Err(e) => return Err(e.into()),
        };
        freshness::check_record(
            &bytes,
            &self.key,
            &self.repository,
            now,
            seen,
            allow,
            self.limits.max_index,
        )
        .map_err(|e| match e {
            FreshnessError::Index { path, source } => self.index_error(&path, source),
            e => e.into(),
        })
    }

    /// The verified index of package `name`, or `None` when the signed
    /// record says there is no such package.
    pub fn package(
        &self,
        fresh: &Fresh,
        name: &PackageName,
    ) -> Result<Option<pb::Package>, ReadError> {
        let bin_path = freshness::bin_path(name.as_str());
        // A bin that holds no package is not in the record at all.
        if !fresh.lists(&bin_path) {
            return Ok(None);
        }
        let bin_bytes = self.transport.fetch(&bin_path, self.limits.max_index)?;
        let bin = fresh.check_bin(&bin_path, &bin_bytes)?;
        let path = package_index_path(name);
        if !bin.lists(&path) {
            return Ok(None);
        }
        let bytes = self.transport.fetch(&path, self.limits.max_index)?;
        bin.check_index(&path, &bytes)?;
        let pkg: pb::Package =
            decode_index(&bytes, &self.key, &self.repository, self.limits.max_index)
                .map_err(|e| self.index_error(&path, e))?;
        if pkg.name != name.as_str() {
            return Err(ReadError::WrongPackage {
                path: self.transport.location(&path),
                found: pkg.name,
                expected: name.to_string(),
            });
        }
        Ok(Some(pkg))
    }

    /// The publisher keys the registry has accepted signatures from, from
    /// its signed `publisher-keys` (checked against the record); empty when
    /// the record lists none.
    pub fn publisher_keys(&self, fresh: &Fresh) -> Result<Vec<pb::PublisherKey>, ReadError> {
        let path = layout::PUBLISHER_KEYS;
        if !fresh.lists(path) {
            return Ok(Vec::new());
        }
        let bytes = self.transport.fetch(path, self.limits.max_index)?;
        fresh.check_file(path, &bytes)?;
        let keys: pb::PublisherKeys =
            decode_index(&bytes, &self.key, &self.repository, self.limits.max_index)
                .map_err(|e| self.index_error(path, e))?;
        Ok(keys.keys)
    }

    /// Like [`Self::package`], but a missing package is an error.
    pub fn require_package(
        &self,
        fresh: &Fresh,
        name: &PackageName,
    ) -> Result<pb::Package, ReadError> {
        self.package(fresh, name)?
            .ok_or_else(|| ReadError::NoPackage {
                name: name.to_string(),
                repository: self.repository.clone(),
            })
    }

    /// The static package list (`v1/packages/index.json`). It is not signed:
    /// use it only to find candidates, and read what is shown of each from
    /// its verified index.
    pub fn package_list(&self) -> Result<json::PackageList, ReadError> {
        let bytes = self
            .transport
            .fetch(layout::V1_INDEX, self.limits.max_index)?;
        serde_json::from_slice(&bytes).map_err(|e| ReadError::ArchiveContent {
            path: self.transport.location(layout::V1_INDEX),
            reason: format!("not a package list: {e}"),
        })
    }

    /// Downloads an artifact into `out`, checking its size and SHA-256
    /// against the signed index as it streams (at most `size` bytes are
    /// read, and hashed once, on a second thread), then what the archive
    /// says it is (name, version and arch, from its head: see
    /// [`identify`]). `out` must be a fresh, empty file.
    pub fn download(
        &self,
        pkg: &pb::Package,
        release: &pb::Release,
        artifact: &pb::Artifact,
        out: &mut std::fs::File,
    ) -> Result<(), ReadError> {
        use std::io::Seek;
        let location = self.transport.location(&artifact.path);
        let fetched = std::thread::scope(|scope| {
            // SHA-256 on a thread of its own, beside the one that receives
            // and writes: hashing inline was a third of a pull's CPU, all on
            // its critical path (BENCHMARKS.md, "Pull").
            let (chunks, hashed) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(4);
            let hasher = scope.spawn(move || {
                let mut h = Sha256::new();
                for c in hashed {
                    h.update(&c[..]);
                }
                h.finalize()
            });
            let mut tee = Tee {
                file: &*out,
                buf: Vec::with_capacity(Tee::CHUNK),
                chunks: Some(chunks),
                written: 0,
                flushing: 0,
            };
            let n = self
                .transport
                .fetch_to(&artifact.path, &mut tee, artifact.size);
            let end = tee.finish();
            let digest = hasher
                .join()
                .map_err(|_| std::io::Error::other("the hashing thread failed"));
            (n, end, digest)
        });
        let n = match fetched.0 {
            Ok(n) => n,
            Err(TransportError::TooLarge { .. }) => {
                return Err(ReadError::ArchiveTooLarge {
                    path: location,
                    expected: artifact.size,
                })
            }
            Err(e) => return Err(e.into()),
        };
        fetched.1?;
        let digest = fetched.2?;
        check_artifact_bytes(&location, artifact, n, digest.as_slice())?;
        out.rewind()?;
        let (name, version, arch) = identify(std::io::BufReader::new(&mut *out), &self.limits)
            .map_err(|reason| ReadError::ArchiveContent {
                path: location.clone(),
                reason: format!("not a valid archive: {reason}"),
            })?;
        if name != pkg.name || version != release.version || arch != artifact.arch {
            return Err(ReadError::ArchiveContent {
                path: location,
                reason: format!(
                    "it holds {name} {version} ({arch}), the signed index says {} {} ({})",
                    pkg.name, release.version, artifact.arch
                ),
            });
        }
        Ok(())
    }
}

fn path_of<R: std::io::Read>(e: &tar::Entry<'_, R>) -> Result<String, String> {
    Ok(e.path()
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned())
}

/// What an archive says it is, (name, version, arch), read from its head
/// only: a `.niso`'s first entry `niso.toml` (a few KiB inflated), a Hex
/// tarball's `metadata.config` (before its `contents.tar.gz`).
///
/// Not the whole archive again: every path that makes an index name an
/// archive (upload, `publish`, `build`, recovery) first runs the registry's
/// full check of it (`archive::inspect`: every entry, the gzip stream to its
/// end), and the SHA-256 the caller has just verified binds these bytes to
/// that signed index. Re-reading it all inflated every byte, which was most
/// of a pull's CPU (see BENCHMARKS.md, "Pull"). What is left to check here
/// is that the index names the archive for what it is.
pub fn identify(
    mut reader: impl std::io::BufRead,
    limits: &Limits,
) -> Result<(String, String, String), String> {
    use std::io::Read;
    let small = |r: &mut dyn Read, file: &str| -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        r.take(limits.max_metadata + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("{file}: {e}"))?;
        if out.len() as u64 > limits.max_metadata {
            return Err(format!(
                "{file} is larger than {} bytes",
                limits.max_metadata
            ));
        }
        Ok(out)
    };
    let head = reader.fill_buf().map_err(|e| e.to_string())?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut tar = tar::Archive::new(flate2::bufread::GzDecoder::new(reader));
        let mut entries = tar.entries().map_err(|e| e.to_string())?;
        let mut first = entries
            .next()
            .ok_or("no entries")?
            .map_err(|e| e.to_string())?;
        let path = path_of(&first)?;
        if path != archive::niso::MANIFEST {
            return Err(format!(
                "its first entry is {path:?}, not {}",
                archive::niso::MANIFEST
            ));
        }
        let bytes = small(&mut first, archive::niso::MANIFEST)?;
        let m = archive::niso::Manifest::parse(&bytes).map_err(|e| e.to_string())?;
        return Ok((
            m.name.to_string(),
            m.version.to_string(),
            m.arch.to_string(),
        ));
    }
    let mut tar = tar::Archive::new(reader);
    // VERSION, CHECKSUM, metadata.config, contents.tar.gz: the order the
    // registry's reader requires.
    for entry in tar.entries().map_err(|e| e.to_string())?.take(3) {
        let mut entry = entry.map_err(|e| e.to_string())?;
        if path_of(&entry)? == "metadata.config" {
            let bytes = small(&mut entry, "metadata.config")?;
            let text = String::from_utf8(bytes).map_err(|_| "metadata.config is not UTF-8")?;
            let m = archive::hex_metadata::parse_metadata(&text).map_err(|e| e.to_string())?;
            return Ok((m.name, m.version, Arch::ANY.to_string()));
        }
    }
    Err("neither a .niso archive nor a Hex tarball with metadata.config".into())
}

/// Size and digest of downloaded bytes against the signed index (`n` is
/// at most `artifact.size`; the transport stops one byte past it).
pub fn check_artifact_bytes(
    location: &str,
    artifact: &pb::Artifact,
    n: u64,
    sha256: &[u8],
) -> Result<(), ReadError> {
    if n != artifact.size {
        return Err(ReadError::ArchiveSize {
            path: location.to_string(),
            size: n,
            expected: artifact.size,
        });
    }
    if sha256 != artifact.sha256.as_slice() {
        return Err(ReadError::ArchiveDigest {
            path: location.to_string(),
            found: hex::encode(sha256),
            expected: hex::encode(&artifact.sha256),
        });
    }
    Ok(())
}

/// Writes what passes to a file in large writes, and hands each chunk to
/// a hashing thread.
struct Tee<'a> {
    file: &'a std::fs::File,
    buf: Vec<u8>,
    /// `None` once finished.
    chunks: Option<std::sync::mpsc::SyncSender<Arc<Vec<u8>>>>,
    /// Bytes written, and the offset up to which the disk has been asked
    /// to start writing them.
    written: u64,
    flushing: u64,
}

impl Tee<'_> {
    /// 1 MiB writes: a hundred for a 100 MiB archive, not the 13,000 of
    /// an 8 KiB buffer.
    const CHUNK: usize = 1 << 20;
    /// How often the disk is asked to start writing what was written, so
    /// the fsync before the download is installed has little left to do
    /// (it was a fifth of a 100 MiB pull's time, after the transfer).
    const FLUSH_EVERY: u64 = 8 << 20;

    fn ship(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Arc::new(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(Self::CHUNK),
        ));
        // Sent first, so it is hashed while it is written.
        self.chunks
            .as_ref()
            .ok_or_else(|| std::io::Error::other("write after the end"))?
            .send(chunk.clone())
            .map_err(|_| std::io::Error::other("the hashing thread stopped"))?;
        let mut file = self.file;
        file.write_all(&chunk)?;
        self.written += chunk.len() as u64;
        if self.written - self.flushing >= Self::FLUSH_EVERY {
            start_writeback(self.file, self.flushing, self.written - self.flushing);
            self.flushing = self.written;
        }
        Ok(())
    }

    /// Writes the rest and lets the hashing thread finish.
    fn finish(&mut self) -> std::io::Result<()> {
        let shipped = self.ship();
        self.chunks = None;
        shipped
    }
}

impl Write for Tee<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = Self::CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == Self::CHUNK {
            self.ship()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts writeback of a range of `file` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): advice, so a failure is
/// ignored; the fsync that follows is what makes the file durable.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for as long as `file` is borrowed;
    // the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

/// What a user asked to pull: `NAME`, `NAME:VERSION` or `NAME:TAG`, the
/// name possibly `ORG/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRef {
    pub org: Option<RepoName>,
    pub name: PackageName,
    pub want: Want,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Latest,
    Version(Version),
    Tag(TagName),
}

#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error(
        "{text:?}: {reason} (expected NAME, NAME:VERSION or NAME:TAG, NAME possibly ORG/NAME)"
    )]
    Syntax { text: String, reason: String },
}

impl std::str::FromStr for PackageRef {
    type Err = RefError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| RefError::Syntax {
            text: text.to_string(),
            reason,
        };
        let (path, want) = match text.split_once(':') {
            Some((p, w)) => (p, Some(w)),
            None => (text, None),
        };
        let (org, name) = match path.split_once('/') {
            Some((o, n)) => (Some(RepoName::new(o).map_err(|e| bad(e.to_string()))?), n),
            None => (None, path),
        };
        let name = PackageName::new(name).map_err(|e| bad(e.to_string()))?;
        // Versions start with a digit, tags with a letter: never ambiguous.
        let want = match want {
            None => Want::Latest,
            Some(w) if w.starts_with(|c: char| c.is_ascii_digit()) => {
                Want::Version(Version::new(w).map_err(|e| bad(e.to_string()))?)
            }
            Some(w) => Want::Tag(TagName::new(w).map_err(|e| bad(e.to_string()))?),
        };
        Ok(Self { org, name, want })
    }
}

impl std::fmt::Display for PackageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(o) = &self.org {
            write!(f, "{o}/")?;
        }
        write!(f, "{}", self.name)?;
        match &self.want {
            Want::Latest => Ok(()),
            Want::Version(v) => write!(f, ":{v}"),
            Want::Tag(t) => write!(f, ":{t}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{name} has no version {version} (versions: {available}); see `niso registry list-tags {name}` for its tags")]
    NoVersion {
        name: String,
        version: String,
        available: String,
    },
    #[error("{name} has no tag {tag} (tags: {available}); see `niso registry list-tags {name}`")]
    NoTag {
        name: String,
        tag: String,
        available: String,
    },
    #[error("{name} {version} has no artifact for {arch} (arches: {available}); pass --arch ARCH")]
    NoArch {
        name: String,
        version: String,
        arch: String,
        available: String,
    },
    #[error("{name} has no release for {arch}; pass --arch ARCH, or name a version")]
    NoRelease { name: String, arch: String },
}

/// The release and artifact a pull takes.
#[derive(Debug)]
pub struct Resolved<'a> {
    pub release: &'a pb::Release,
    pub artifact: &'a pb::Artifact,
}

fn semver_of(r: &pb::Release) -> Option<semver::Version> {
    semver::Version::parse(&r.version).ok()
}

/// An artifact of `r` for `arch`, or its arch-independent one (`any`, a
/// Hex tarball).
fn artifact_for<'a>(r: &'a pb::Release, arch: &Arch) -> Option<&'a pb::Artifact> {
    r.artifacts
        .iter()
        .find(|a| a.arch == arch.as_str())
        .or_else(|| r.artifacts.iter().find(|a| a.arch == Arch::ANY))
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Picks the release and artifact: the version named, the version a tag
/// (from the signed index) points at, or the newest stable release with an
/// artifact for `arch` (retired releases skipped; pre-releases only when
/// there is no stable one).
pub fn resolve<'a>(
    pkg: &'a pb::Package,
    want: &Want,
    arch: &Arch,
) -> Result<Resolved<'a>, ResolveError> {
    let by_version = |v: &str| pkg.releases.iter().find(|r| r.version == v);
    let release = match want {
        Want::Version(v) => by_version(v.as_str()).ok_or_else(|| ResolveError::NoVersion {
            name: pkg.name.clone(),
            version: v.to_string(),
            available: list(pkg.releases.iter().map(|r| r.version.clone())),
        })?,
        Want::Tag(t) => {
            let tag = pkg
                .tags
                .iter()
                .find(|x| x.tag == t.as_str())
                .ok_or_else(|| ResolveError::NoTag {
                    name: pkg.name.clone(),
                    tag: t.to_string(),
                    available: list(pkg.tags.iter().map(|x| x.tag.clone())),
                })?;
            by_version(&tag.version).ok_or_else(|| ResolveError::NoVersion {
                name: pkg.name.clone(),
                version: tag.version.clone(),
                available: list(pkg.releases.iter().map(|r| r.version.clone())),
            })?
        }
        Want::Latest => {
            let candidates = pkg
                .releases
                .iter()
                .filter(|r| r.retired.is_none() && artifact_for(r, arch).is_some())
                .filter_map(|r| semver_of(r).map(|v| (v, r)));
            let (stable, pre): (Vec<_>, Vec<_>) = candidates.partition(|(v, _)| v.pre.is_empty());
            let pick = |v: Vec<(semver::Version, &'a pb::Release)>| {
                v.into_iter().max_by(|a, b| a.0.cmp(&b.0)).map(|(_, r)| r)
            };
            pick(stable)
                .or_else(|| pick(pre))
                .ok_or_else(|| ResolveError::NoRelease {
                    name: pkg.name.clone(),
                    arch: arch.to_string(),
                })?
        }
    };
    let artifact = artifact_for(release, arch).ok_or_else(|| ResolveError::NoArch {
        name: pkg.name.clone(),
        version: release.version.clone(),
        arch: arch.to_string(),
        available: list(release.artifacts.iter().map(|a| a.arch.clone())),
    })?;
    Ok(Resolved { release, artifact })
}

/// The newest stable version of a package (any arch), as search shows it.
pub fn latest_version(pkg: &pb::Package) -> Option<String> {
    let all: Vec<(semver::Version, &pb::Release)> = pkg
        .releases
        .iter()
        .filter(|r| !r.artifacts.is_empty())
        .filter_map(|r| semver_of(r).map(|v| (v, r)))
        .collect();
    let best = |stable: bool| {
        all.iter()
            .filter(|(v, _)| !stable || v.pre.is_empty())
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, r)| r.version.clone())
    };
    best(true).or_else(|| best(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(v: &str, arches: &[&str]) -> pb::Release {
        pb::Release {
            version: v.into(),
            artifacts: arches
                .iter()
                .map(|a| pb::Artifact {
                    arch: (*a).into(),
                    path: format!("archives/p-{v}-{a}.niso"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn pkg() -> pb::Package {
        let mut retired = release("1.3.0", &["x86_64"]);
        retired.retired = Some(pb::RetirementStatus::default());
        pb::Package {
            name: "p".into(),
            releases: vec![
                release("1.0.0", &["x86_64", "aarch64"]),
                release("1.2.0", &["aarch64"]),
                release("1.10.0", &["x86_64"]),
                retired,
                release("2.0.0-rc.1", &["x86_64"]),
            ],
            tags: vec![pb::Tag {
                tag: "stable".into(),
                version: "1.0.0".into(),
            }],
            ..Default::default()
        }
    }

    fn arch(a: &str) -> Arch {
        Arch::new(a).unwrap()
    }

    #[test]
    fn latest_is_the_newest_stable_unretired_release_for_the_arch() {
        let p = pkg();
        let r = resolve(&p, &Want::Latest, &arch("x86_64")).unwrap();
        assert_eq!(r.release.version, "1.10.0"); // semver order, not text
        let r = resolve(&p, &Want::Latest, &arch("aarch64")).unwrap();
        assert_eq!(r.release.version, "1.2.0");
        assert!(matches!(
            resolve(&p, &Want::Latest, &arch("riscv64")),
            Err(ResolveError::NoRelease { .. })
        ));
        assert_eq!(latest_version(&p).as_deref(), Some("1.10.0"));
    }

    #[test]
    fn versions_and_tags_resolve_from_the_index() {
        let p = pkg();
        let v = Want::Version(Version::new("1.2.0").unwrap());
        assert!(matches!(
            resolve(&p, &v, &arch("x86_64")),
            Err(ResolveError::NoArch { .. })
        ));
        assert_eq!(
            resolve(&p, &v, &arch("aarch64")).unwrap().artifact.arch,
            "aarch64"
        );
        let t = Want::Tag(TagName::new("stable").unwrap());
        assert_eq!(
            resolve(&p, &t, &arch("x86_64")).unwrap().release.version,
            "1.0.0"
        );
        let t = Want::Tag(TagName::new("beta").unwrap());
        assert!(matches!(
            resolve(&p, &t, &arch("x86_64")),
            Err(ResolveError::NoTag { .. })
        ));
    }

    #[test]
    fn an_archive_is_identified_from_its_head() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let id = |path: std::path::PathBuf| {
            let f = std::fs::File::open(path).unwrap();
            identify(std::io::BufReader::new(f), &Limits::default())
        };
        assert_eq!(
            id(fixtures.join("niso/my-app-1.1.0-aarch64.niso")).unwrap(),
            ("my-app".into(), "1.1.0".into(), "aarch64".into())
        );
        assert_eq!(
            id(fixtures.join("hex/decimal-2.0.0.tar")).unwrap(),
            ("decimal".into(), "2.0.0".into(), "any".into())
        );
        let read = |bytes: &[u8]| identify(bytes, &Limits::default());
        assert!(read(b"").is_err());
        assert!(read(b"not an archive at all").is_err());
        // A gzip tar whose first entry is not the manifest.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "payload/x", &b"abc"[..]).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar.into_inner().unwrap()).unwrap();
        let e = read(&gz.finish().unwrap()).unwrap_err();
        assert!(e.contains("first entry is \"payload/x\""), "{e}");
    }

    #[test]
    fn references_parse() {
        let r: PackageRef = "my-api".parse().unwrap();
        assert_eq!(r.want, Want::Latest);
        let r: PackageRef = "my-api:1.0.0".parse().unwrap();
        assert_eq!(r.want, Want::Version(Version::new("1.0.0").unwrap()));
        let r: PackageRef = "team/my-api:stable".parse().unwrap();
        assert_eq!(r.org.as_ref().map(|o| o.as_str()), Some("team"));
        assert_eq!(r.want, Want::Tag(TagName::new("stable").unwrap()));
        assert_eq!(r.to_string(), "team/my-api:stable");
        for bad in ["", "My-Api", "a:", "a:1.0", "../x", "a/b/c", "a:b:c"] {
            assert!(bad.parse::<PackageRef>().is_err(), "{bad}");
        }
    }
}
