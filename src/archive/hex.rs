//! Hex package tarballs (format version 3), read per hexpm/specifications
//! `package_tarball.md`.
//!
//! The outer tar holds exactly `VERSION` ("3"), `CHECKSUM`, `metadata.config`
//! and `contents.tar.gz`. The inner checksum is SHA-256 over the bytes of
//! VERSION, metadata.config and contents.tar.gz concatenated in that order;
//! `CHECKSUM` states it in hex. The outer checksum is SHA-256 of the whole
//! file. We require `VERSION` and `metadata.config` to come before
//! `contents.tar.gz` (the order hex_core and mix write), so the inner checksum
//! can be computed while `contents.tar.gz` streams past instead of buffering it.

use std::io::{self, BufRead, BufReader, Read};

use flate2::bufread::GzDecoder;
use sha2::{Digest, Sha256};

use super::hex_metadata::{parse_metadata, HexMetadata};
use super::safe::{self, EntryChecker, EntryKind, TarGuard, UnpackLimit};
use super::{ArchiveError, ArchiveInfo, ArchiveKind, Dependency};
use crate::ident::{Arch, PackageName, Version};
use crate::limits::Limits;

/// A Hex tarball, read and checked, before its outer hash is known.
pub struct HexTarball {
    meta: HexMetadata,
    name: PackageName,
    version: Version,
    inner_checksum: [u8; 32],
}

impl HexTarball {
    pub fn into_info(self, sha256: [u8; 32], size: u64) -> ArchiveInfo {
        ArchiveInfo {
            kind: ArchiveKind::Hex,
            name: self.name,
            version: self.version,
            arch: Arch::any(),
            sha256,
            size,
            inner_checksum: self.inner_checksum.to_vec(),
            description: self.meta.description,
            dependencies: self
                .meta
                .requirements
                .into_iter()
                .map(|r| Dependency {
                    package: r.name,
                    requirement: r.requirement,
                    optional: r.optional,
                    app: r.app,
                    repository: r.repository,
                })
                .collect(),
            runtime: None,
        }
    }
}

/// Reads the outer tar. `reader` yields the raw file bytes. Hex's own limits
/// apply ([`Limits::for_hex`]); the caller bounds the raw bytes with
/// `limits.for_hex().max_archive`.
pub fn read(reader: impl Read, limits: &Limits) -> Result<HexTarball, ArchiveError> {
    let limits = &limits.for_hex();
    let mut archive = tar::Archive::new(TarGuard::new(reader, "tarball"));
    let mut outer = EntryChecker::new(limits);
    let mut version_file: Option<Vec<u8>> = None;
    let mut checksum_file: Option<Vec<u8>> = None;
    let mut metadata_file: Option<Vec<u8>> = None;
    let mut inner: Option<[u8; 32]> = None;

    for entry in archive.entries().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        let (path, kind) = outer.check(&entry)?;
        if kind != EntryKind::File {
            return Err(unexpected(&path, "a Hex tarball holds only files"));
        }
        match path.as_str() {
            "VERSION" => {
                version_file = Some(safe::read_small(&mut entry, "VERSION", 16)?);
            }
            "CHECKSUM" => {
                checksum_file = Some(safe::read_small(&mut entry, "CHECKSUM", 128)?);
            }
            "metadata.config" => {
                metadata_file = Some(safe::read_small(
                    &mut entry,
                    "metadata.config",
                    limits.max_metadata,
                )?);
            }
            "contents.tar.gz" => {
                let (Some(v), Some(m)) = (&version_file, &metadata_file) else {
                    return Err(unexpected(
                        &path,
                        "VERSION and metadata.config must come before contents.tar.gz",
                    ));
                };
                let mut hasher = Sha256::new();
                hasher.update(v);
                hasher.update(m);
                check_contents(&mut entry, &mut hasher, limits)?;
                inner = Some(hasher.finalize().into());
            }
            _ => return Err(unexpected(
                &path,
                "a Hex tarball holds only VERSION, CHECKSUM, metadata.config and contents.tar.gz",
            )),
        }
    }

    // Only zeros may follow the outer tar's end marker.
    archive.into_inner().drain().map_err(not_tar)?;

    let version_file = version_file.ok_or(ArchiveError::Missing("VERSION"))?;
    if version_file.trim_ascii() != b"3" {
        return Err(ArchiveError::Invalid {
            file: "VERSION",
            reason: format!(
                "tarball format {:?} is not supported (only \"3\")",
                String::from_utf8_lossy(&version_file)
            ),
        });
    }
    let checksum_file = checksum_file.ok_or(ArchiveError::Missing("CHECKSUM"))?;
    let metadata_file = metadata_file.ok_or(ArchiveError::Missing("metadata.config"))?;
    let inner = inner.ok_or(ArchiveError::Missing("contents.tar.gz"))?;

    let stated = std::str::from_utf8(checksum_file.trim_ascii()).unwrap_or("");
    let actual = hex::encode_upper(inner);
    if !stated.eq_ignore_ascii_case(&actual) {
        return Err(ArchiveError::ChecksumMismatch {
            stated: String::from_utf8_lossy(&checksum_file).trim().to_string(),
            actual,
        });
    }

    // hex_core reads a metadata.config that is not UTF-8 as Latin-1 (old
    // tarballs); do the same so every tarball it accepts is accepted here.
    let text: std::borrow::Cow<'_, str> = match std::str::from_utf8(&metadata_file) {
        Ok(t) => t.into(),
        Err(_) => metadata_file
            .iter()
            .map(|&b| b as char)
            .collect::<String>()
            .into(),
    };
    let meta = parse_metadata(&text).map_err(|e| ArchiveError::Invalid {
        file: "metadata.config",
        reason: e.to_string(),
    })?;
    let name = PackageName::new(&meta.name)?;
    let version = Version::new(&meta.version)?;
    for r in &meta.requirements {
        // A requirement only names a package (perhaps in another
        // repository); it never becomes a path here.
        PackageName::reference(&r.name).map_err(|e| ArchiveError::Invalid {
            file: "metadata.config",
            reason: format!("requirement: {e}"),
        })?;
        if r.requirement.len() > 256 {
            return Err(ArchiveError::Invalid {
                file: "metadata.config",
                reason: format!("requirement of {} is longer than 256 bytes", r.name),
            });
        }
    }
    // The same rule as a .niso description: it lands in the indexes and in
    // v1/packages/index.json, which clients show on terminals and pages.
    let mut meta = meta;
    meta.description = super::check_description(meta.description.take()).map_err(|reason| {
        ArchiveError::Invalid {
            file: "metadata.config",
            reason,
        }
    })?;
    Ok(HexTarball {
        meta,
        name,
        version,
        inner_checksum: inner,
    })
}

/// Streams `contents.tar.gz` through the hasher while checking every entry of
/// the inner tar, without writing anything anywhere.
fn check_contents(
    entry: &mut impl Read,
    hasher: &mut Sha256,
    limits: &Limits,
) -> Result<(), ArchiveError> {
    let tee = BufReader::with_capacity(
        64 * 1024,
        TeeHash {
            inner: entry,
            hasher,
        },
    );
    let gz = GzDecoder::new(tee);
    // No slack for tar headers: hex_core counts the whole decompressed
    // stream against its limit, so that is what is counted here.
    let bounded = TarGuard::new(
        UnpackLimit::new(gz, limits.max_unpacked, 0),
        "contents.tar.gz",
    );
    let mut inner_tar = tar::Archive::new(bounded);
    let mut checker = EntryChecker::new(limits);
    {
        let entries = inner_tar.entries().map_err(contents_error)?;
        for e in entries {
            let e = e.map_err(contents_error)?;
            checker.check(&e).map_err(|err| match err {
                ArchiveError::UnsafeEntry { path, reason } => ArchiveError::UnsafeEntry {
                    path: format!("contents.tar.gz:{path}"),
                    reason,
                },
                ArchiveError::DuplicateEntry { path } => ArchiveError::DuplicateEntry {
                    path: format!("contents.tar.gz:{path}"),
                },
                other => other,
            })?;
        }
    }
    // Finish the tar through the guard (only zeros may follow its end
    // marker) and the gzip stream (its CRC is checked at the end), then
    // refuse anything after it: a second gzip member would be unpacked by
    // clients as more files that were never checked here.
    let mut bounded = inner_tar.into_inner();
    bounded.drain().map_err(contents_error)?;
    let mut rest = bounded.into_inner().into_inner().into_inner();
    if !rest.fill_buf().map_err(contents_error)?.is_empty() {
        return Err(ArchiveError::Invalid {
            file: "contents.tar.gz",
            reason: "trailing data after the gzip stream".into(),
        });
    }
    Ok(())
}

struct TeeHash<'a, R> {
    inner: R,
    hasher: &'a mut Sha256,
}

impl<R: Read> Read for TeeHash<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn not_tar(e: io::Error) -> ArchiveError {
    match safe::io_error(e) {
        ArchiveError::Io(e) => ArchiveError::Invalid {
            file: "tarball",
            reason: format!("not a valid tar archive: {e}"),
        },
        other => other,
    }
}

fn contents_error(e: io::Error) -> ArchiveError {
    match safe::io_error(e) {
        ArchiveError::Io(e) => ArchiveError::Invalid {
            file: "contents.tar.gz",
            reason: format!("not a valid gzip tar: {e}"),
        },
        other => other,
    }
}

fn unexpected(path: &str, reason: &str) -> ArchiveError {
    ArchiveError::UnexpectedEntry {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}
