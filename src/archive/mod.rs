//! Reading package archives safely: Hex tarballs and `.niso` archives.
//!
//! Archives come from uploaders we do not trust, so nothing here unpacks to
//! disk. [`inspect`] streams an archive once, hashing it as bytes pass, checks
//! every entry (no `..`, no absolute paths, no links or devices, bounded sizes,
//! counts and decompression; see [`safe`]) and returns the facts the publisher
//! needs as an [`ArchiveInfo`]. Every tar passes one guard
//! ([`safe::TarGuard`]) before the tar reader acts on it: extension headers
//! counted with their own sizes, pax headers read strictly, nothing after the
//! end-of-archive marker. Hex tarballs get Hex's own size limits
//! ([`Limits::for_hex`]). A rejected archive gets one precise
//! [`ArchiveError`], short whatever the archive holds, and nothing else
//! happens.
//!
//! The kind is told by content, not by file name: a `.niso` archive is gzip,
//! a Hex tarball is a plain tar.

pub mod hex;
pub mod hex_metadata;
pub mod niso;
pub mod safe;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::ident::{Arch, IdentError, PackageName, Version};
use crate::limits::{Clipped, Limits, Quoted};

/// Which format an archive is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A Hex package tarball (v3): served as `tarballs/NAME-VERSION.tar`.
    Hex,
    /// A niso binary package: served as `archives/NAME-VERSION-ARCH.niso`.
    Niso,
}

/// A dependency of a release (from a Hex tarball's `requirements`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub package: String,
    pub requirement: String,
    pub optional: bool,
    pub app: Option<String>,
    pub repository: Option<String>,
}

/// The run-time part of a `.niso` manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub entrypoint: String,
    pub preset: Option<String>,
}

/// What an archive says about itself, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    pub kind: ArchiveKind,
    pub name: PackageName,
    pub version: Version,
    pub arch: Arch,
    /// SHA-256 of the whole archive file (Hex's "outer checksum").
    pub sha256: [u8; 32],
    pub size: u64,
    /// Hex's "inner checksum" (SHA-256 of VERSION + metadata.config +
    /// contents.tar.gz); empty for `.niso` archives.
    pub inner_checksum: Vec<u8>,
    pub description: Option<String>,
    pub dependencies: Vec<Dependency>,
    pub runtime: Option<Runtime>,
}

impl ArchiveInfo {
    /// The archive's path in the tree, relative to the repository root.
    pub fn tree_path(&self) -> String {
        match self.kind {
            ArchiveKind::Hex => format!("tarballs/{}-{}.tar", self.name, self.version),
            ArchiveKind::Niso => {
                format!("archives/{}-{}-{}.niso", self.name, self.version, self.arch)
            }
        }
    }
}

/// Why an archive was refused. Text taken from the archive (names, paths,
/// parser messages) is shown through [`Quoted`] and [`Clipped`], so a
/// message stays a few hundred bytes whatever the archive holds.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("failed to read {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("failed to read the archive: {0}")]
    Io(std::io::Error),
    #[error("archive is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("archive unpacks to more than the limit of {limit} bytes")]
    UnpackedTooLarge { limit: u64 },
    #[error("archive has more than the limit of {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("{file} is larger than the limit of {limit} bytes")]
    MetadataTooLarge { file: String, limit: u64 },
    #[error("archive is empty")]
    Empty,
    #[error("unsafe entry {}: {reason}", Quoted(path))]
    UnsafeEntry { path: String, reason: &'static str },
    #[error("entry {} appears twice", Quoted(path))]
    DuplicateEntry { path: String },
    #[error("unexpected entry {}: {}", Quoted(path), Clipped(reason))]
    UnexpectedEntry { path: String, reason: String },
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{file}: {}", Clipped(reason))]
    Invalid { file: &'static str, reason: String },
    #[error(transparent)]
    Ident(#[from] IdentError),
    #[error("CHECKSUM says {} but the contents hash to {actual}", Clipped(stated))]
    ChecksumMismatch { stated: String, actual: String },
    #[error("trailing data after the gzip stream")]
    TrailingData,
    /// Bytes other than zeros after a tar's end-of-archive marker: entries
    /// hidden there are unpacked by `tar -i` without ever being checked.
    #[error(
        "{file}: data after the tar end-of-archive marker (tar -i would unpack it as more entries)"
    )]
    DataAfterEnd { file: &'static str },
    /// A tar extension header (pax, GNU long name) that tar readers could
    /// understand differently.
    #[error("{file}: {}", Clipped(reason))]
    BadExtension { file: &'static str, reason: String },
}

/// Longest description accepted, in bytes (`.niso` manifests and Hex
/// metadata alike).
pub const MAX_DESCRIPTION: usize = 512;

/// The rule for a package description, whichever format it comes from: one
/// line of at most [`MAX_DESCRIPTION`] bytes without control characters (it
/// lands in every index and in `v1/packages/index.json`, which clients print
/// on terminals). A blank one is no description. The error is the reason.
pub(crate) fn check_description(d: Option<String>) -> Result<Option<String>, String> {
    match d {
        Some(d) if d.len() > MAX_DESCRIPTION => Err(format!(
            "description is longer than {MAX_DESCRIPTION} bytes ({} bytes)",
            d.len()
        )),
        Some(d) if d.chars().any(char::is_control) => {
            Err("description must be one line without control characters".into())
        }
        Some(d) if d.trim().is_empty() => Ok(None),
        d => Ok(d),
    }
}

/// Reads and checks the archive at `path`.
pub fn inspect_file(path: &Path, limits: &Limits) -> Result<ArchiveInfo, ArchiveError> {
    let file = File::open(path).map_err(|source| ArchiveError::Open {
        path: path.display().to_string(),
        source,
    })?;
    inspect(BufReader::with_capacity(64 * 1024, file), limits)
}

/// Reads and checks an archive from a stream, sniffing its kind.
pub fn inspect(reader: impl Read, limits: &Limits) -> Result<ArchiveInfo, ArchiveError> {
    let mut hashed = safe::HashingReader::new(reader, limits.max_archive);
    let mut head = [0u8; 2];
    let got = read_up_to(&mut hashed, &mut head)?;
    let is_niso = head[..got] == [0x1f, 0x8b];
    if !is_niso {
        // A Hex tarball gets Hex's size limit (hex_core's tarball_max_size):
        // a larger one is a tarball no Hex client would unpack.
        hashed.tighten(limits.for_hex().max_archive);
    }
    let replay = std::io::Cursor::new(head[..got].to_vec()).chain(&mut hashed);
    match &head[..got] {
        [] => Err(ArchiveError::Empty),
        _ if is_niso => {
            let parsed = niso::read(replay, limits)?;
            let (sha256, size) = hashed.finish_after_drain()?;
            parsed.into_info(sha256, size)
        }
        _ => {
            let parsed = hex::read(replay, limits)?;
            let (sha256, size) = hashed.finish_after_drain()?;
            Ok(parsed.into_info(sha256, size))
        }
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ArchiveError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(safe::io_error(e)),
        }
    }
    Ok(n)
}
