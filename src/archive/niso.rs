//! `.niso` archives: niso's binary packages, one per arch.
//!
//! Format (also in the README): a gzip-compressed tar whose entries are, in
//! this order,
//!
//! 1. `niso.toml`, the manifest (first, so a reader learns what it holds
//!    before any payload byte);
//! 2. `README.md`, optional;
//! 3. `payload/…`, the files to install: regular files and directories only.
//!
//! ```toml
//! [package]
//! name = "my-app"            # package-name rule, see ident.rs
//! version = "1.1.0"          # semver, no build metadata
//! arch = "x86_64"            # or "any"
//! description = "My application"   # optional, one line, <= 512 bytes
//!
//! [binary]
//! entrypoint = "bin/my-app"  # a regular file under payload/
//!
//! [isolation]
//! preset = "server"          # optional
//! ```
//!
//! `niso package DIR` ([`create`]) writes one from a directory with the same
//! layout, deterministically: entries sorted, owner 0, mtime 0, mode 0644 or
//! 0755 (kept from the file's executable bit), gzip without a time stamp.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;
use serde::{Deserialize, Serialize};

use super::safe::{self, EntryChecker, EntryKind, TarGuard, UnpackLimit};
use super::{ArchiveError, ArchiveInfo, ArchiveKind, Runtime};
use crate::ident::{Arch, PackageName, Version};
use crate::limits::{Limits, Quoted};

pub const MANIFEST: &str = "niso.toml";
pub const README: &str = "README.md";
pub const PAYLOAD: &str = "payload";

/// `niso.toml`, as written by users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub package: ManifestPackage,
    pub binary: ManifestBinary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<ManifestIsolation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestBinary {
    pub entrypoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestIsolation {
    pub preset: String,
}

/// A manifest whose every field has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: PackageName,
    pub version: Version,
    pub arch: Arch,
    pub description: Option<String>,
    /// Path relative to `payload/`.
    pub entrypoint: String,
    pub preset: Option<String>,
}

fn invalid(reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid {
        file: MANIFEST,
        reason: reason.into(),
    }
}

impl Manifest {
    pub fn parse(text: &[u8]) -> Result<Self, ArchiveError> {
        let text = std::str::from_utf8(text).map_err(|_| invalid("not UTF-8"))?;
        let file: ManifestFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let description = super::check_description(file.package.description).map_err(invalid)?;
        let entrypoint = safe::check_path(&file.binary.entrypoint).map_err(|_| {
            invalid(format!(
                "binary.entrypoint {} must be a relative path inside payload/ without '..'",
                Quoted(&file.binary.entrypoint)
            ))
        })?;
        let preset = match file.isolation {
            Some(i) => {
                let ok = !i.preset.is_empty()
                    && i.preset.len() <= 32
                    && i.preset.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    });
                if !ok {
                    return Err(invalid(format!(
                        "isolation.preset {} must be 1 to 32 lowercase ASCII letters, digits, '-' or '_'",
                        Quoted(&i.preset)
                    )));
                }
                Some(i.preset)
            }
            None => None,
        };
        Ok(Self {
            name: PackageName::new(&file.package.name)?,
            version: Version::new(&file.package.version)?,
            arch: Arch::new(&file.package.arch)?,
            description,
            entrypoint,
            preset,
        })
    }
}

/// A `.niso` archive, read and checked, before its outer hash is known.
pub struct NisoArchive {
    manifest: Manifest,
}

impl NisoArchive {
    pub fn into_info(self, sha256: [u8; 32], size: u64) -> Result<ArchiveInfo, ArchiveError> {
        let m = self.manifest;
        Ok(ArchiveInfo {
            kind: ArchiveKind::Niso,
            name: m.name,
            version: m.version,
            arch: m.arch,
            sha256,
            size,
            inner_checksum: Vec::new(),
            description: m.description,
            dependencies: Vec::new(),
            runtime: Some(Runtime {
                entrypoint: m.entrypoint,
                preset: m.preset,
            }),
        })
    }
}

/// Reads a `.niso` archive from its raw (gzip) bytes.
pub fn read(reader: impl Read, limits: &Limits) -> Result<NisoArchive, ArchiveError> {
    // bufread's decoder leaves unread input in the BufReader (the read one
    // would swallow up to 32 KiB of it), so trailing bytes can be seen.
    let gz = GzDecoder::new(BufReader::with_capacity(64 * 1024, reader));
    let bounded = TarGuard::new(
        UnpackLimit::new(gz, limits.max_unpacked, safe::HEADER_SLACK),
        "archive",
    );
    let mut archive = tar::Archive::new(bounded);
    let mut checker = EntryChecker::new(limits);
    let mut manifest: Option<Manifest> = None;
    let mut files = BTreeSet::new();
    let mut position = 0usize;
    {
        for entry in archive.entries().map_err(gz_error)? {
            let mut entry = entry.map_err(gz_error)?;
            let (path, kind) = checker.check(&entry)?;
            position += 1;
            if position == 1 {
                if path != MANIFEST || kind != EntryKind::File {
                    return Err(ArchiveError::UnexpectedEntry {
                        path,
                        reason: format!("the first entry must be {MANIFEST}"),
                    });
                }
                let bytes = safe::read_small(&mut entry, MANIFEST, limits.max_metadata)
                    .map_err(reclassify)?;
                manifest = Some(Manifest::parse(&bytes)?);
                continue;
            }
            if path == README && position == 2 && kind == EntryKind::File {
                safe::read_small(&mut entry, README, limits.max_metadata).map_err(reclassify)?;
                continue;
            }
            match path.strip_prefix("payload") {
                Some("") if kind == EntryKind::Dir => {}
                Some(rest) if rest.starts_with('/') => {
                    if kind == EntryKind::File {
                        files.insert(rest[1..].to_string());
                    }
                }
                _ => {
                    return Err(ArchiveError::UnexpectedEntry {
                        path,
                        reason: format!(
                            "entries after {MANIFEST} must be {README} (optional, second) or under {PAYLOAD}/"
                        ),
                    })
                }
            }
        }
    }
    // Finish the tar through the guard (only zeros may follow its end
    // marker) and the gzip stream so its CRC is checked, and refuse bytes
    // after it: a second gzip member would be read by `tar xzf` as more
    // entries that were never checked here.
    let mut bounded = archive.into_inner();
    bounded.drain().map_err(gz_error)?;
    let mut raw = bounded.into_inner().into_inner().into_inner();
    if !raw.fill_buf().map_err(safe::io_error)?.is_empty() {
        return Err(ArchiveError::TrailingData);
    }
    let manifest = manifest.ok_or(ArchiveError::Missing(MANIFEST))?;
    if !files.contains(&manifest.entrypoint) {
        return Err(invalid(format!(
            "binary.entrypoint {} is not a file under payload/",
            Quoted(&manifest.entrypoint)
        )));
    }
    Ok(NisoArchive { manifest })
}

/// A read failure inside the gzip stream is a broken archive, not an I/O
/// problem of ours.
fn reclassify(e: ArchiveError) -> ArchiveError {
    match e {
        ArchiveError::Io(e) => gz_error(e),
        other => other,
    }
}

fn gz_error(e: io::Error) -> ArchiveError {
    match safe::io_error(e) {
        ArchiveError::Io(e) => ArchiveError::Invalid {
            file: "archive",
            reason: format!("not a valid gzip-compressed tar: {e}"),
        },
        other => other,
    }
}

/// Why `niso package` could not make an archive.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("failed to write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error(transparent)]
    Manifest(#[from] ArchiveError),
}

/// Makes a `.niso` archive from `dir` (holding `niso.toml`, an optional
/// `README.md` and `payload/`) into `out_dir`, named
/// `NAME-VERSION-ARCH.niso`. Returns the archive's path and its manifest.
///
/// The archive is checked with the same reader the registry uses before it is
/// moved into place, so what `niso package` makes, the registry accepts.
pub fn create(
    dir: &Path,
    out_dir: &Path,
    limits: &Limits,
) -> Result<(PathBuf, Manifest), PackageError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackageError::Read { path, source }
    };
    let manifest_path = dir.join(MANIFEST);
    let manifest_bytes = std::fs::read(&manifest_path).map_err(read_err(&manifest_path))?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    let payload = dir.join(PAYLOAD);
    if !payload.is_dir() {
        return Err(PackageError::Layout {
            path: payload,
            reason: "missing: put the files to install under payload/".into(),
        });
    }

    let out = out_dir.join(format!(
        "{}-{}-{}.niso",
        manifest.name, manifest.version, manifest.arch
    ));
    let write_err = |source| PackageError::Write {
        path: out.clone(),
        source,
    };
    let tmp = tempfile::NamedTempFile::new_in(out_dir).map_err(write_err)?;
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(
            io::BufWriter::new(tmp.as_file()),
            flate2::Compression::default(),
        );
    let mut builder = tar::Builder::new(gz);
    builder.mode(tar::HeaderMode::Deterministic);
    append_file(&mut builder, MANIFEST, &manifest_bytes, 0o644).map_err(write_err)?;
    let readme = dir.join(README);
    if readme.is_file() {
        let bytes = std::fs::read(&readme).map_err(read_err(&readme))?;
        append_file(&mut builder, README, &bytes, 0o644).map_err(write_err)?;
    }
    append_dir(&mut builder, PAYLOAD).map_err(write_err)?;
    for entry in walkdir::WalkDir::new(&payload)
        .min_depth(1)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| PackageError::Read {
            path: payload.clone(),
            source: e.into(),
        })?;
        let rel = entry
            .path()
            .strip_prefix(&payload)
            .unwrap_or(entry.path())
            .to_str()
            .ok_or_else(|| PackageError::Layout {
                path: entry.path().to_path_buf(),
                reason: "file name is not UTF-8".into(),
            })?
            .to_string();
        let name = format!("{PAYLOAD}/{rel}");
        let ft = entry.file_type();
        if ft.is_dir() {
            append_dir(&mut builder, &name).map_err(write_err)?;
        } else if ft.is_file() {
            let meta = entry.metadata().map_err(|e| PackageError::Read {
                path: entry.path().to_path_buf(),
                source: e.into(),
            })?;
            let mode = if is_executable(&meta) { 0o755 } else { 0o644 };
            let mut header = owned_by_root();
            header.set_size(meta.len());
            header.set_mode(mode);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mtime(0);
            let f = File::open(entry.path()).map_err(read_err(entry.path()))?;
            builder
                .append_data(&mut header, &name, f)
                .map_err(write_err)?;
        } else {
            return Err(PackageError::Layout {
                path: entry.path().to_path_buf(),
                reason: "only regular files and directories can be packaged (no links or devices)"
                    .into(),
            });
        }
    }
    let gz = builder.into_inner().map_err(write_err)?;
    let mut buf = gz.finish().map_err(write_err)?;
    buf.flush().map_err(write_err)?;
    drop(buf);

    inspect_created(tmp.path(), limits)?;
    // Temp files are created 0600; an archive is for sharing.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(write_err)?;
    }
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(&out).map_err(|e| write_err(e.error))?;
    Ok((out, manifest))
}

/// Checks the new archive with the registry's reader. Size limits are the
/// registry's choice (`serve --max-upload`), so they are not applied here.
fn inspect_created(path: &Path, limits: &Limits) -> Result<(), PackageError> {
    let unbounded = Limits {
        max_archive: u64::MAX,
        max_unpacked: u64::MAX,
        ..*limits
    };
    super::inspect_file(path, &unbounded)?;
    Ok(())
}

/// A ustar header owned by uid/gid 0 (left empty, some readers fail).
fn owned_by_root() -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> io::Result<()> {
    let mut header = owned_by_root();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(0);
    b.append_data(&mut header, name, bytes)
}

fn append_dir<W: Write>(b: &mut tar::Builder<W>, name: &str) -> io::Result<()> {
    let mut header = owned_by_root();
    header.set_size(0);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mtime(0);
    b.append_data(&mut header, format!("{name}/"), io::empty())
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &std::fs::Metadata) -> bool {
    false
}
