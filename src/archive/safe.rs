//! The checks every archive entry passes, and the stream adapters that hash
//! and bound bytes as they flow.
//!
//! WARNING: these checks are what stands between an uploader and every user
//! who unpacks a package. An entry named `../../.bashrc`, an absolute path, a
//! symlink to `/etc`, a device node, or a gzip bomb must never get through.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Component, Path};

use sha2::{Digest, Sha256};

use super::ArchiveError;
use crate::limits::Limits;

/// Marks an I/O error raised by a limit so it can be told apart from a real
/// read failure after it has passed through tar and flate2.
#[derive(Debug)]
struct LimitExceeded(ArchiveErrorKind);

#[derive(Debug, Clone, Copy)]
enum ArchiveErrorKind {
    Archive(u64),
    Unpacked(u64),
    Extension(u64),
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("size limit exceeded")
    }
}
impl std::error::Error for LimitExceeded {}

/// Turns an I/O error into the archive error it stands for.
pub fn io_error(e: io::Error) -> ArchiveError {
    if let Some(LimitExceeded(kind)) = e.get_ref().and_then(|i| i.downcast_ref()) {
        return match *kind {
            ArchiveErrorKind::Archive(limit) => ArchiveError::TooLarge { limit },
            ArchiveErrorKind::Unpacked(limit) => ArchiveError::UnpackedTooLarge { limit },
            ArchiveErrorKind::Extension(limit) => ArchiveError::MetadataTooLarge {
                file: "a tar long-name or pax header".into(),
                limit,
            },
        };
    }
    ArchiveError::Io(e)
}

/// Hashes (SHA-256) and counts the raw archive bytes, failing once more than
/// `limit` bytes have passed.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
        }
    }

    /// Reads whatever the format parser left (tar padding, end blocks) so the
    /// hash covers the whole file, then returns (sha256, size).
    pub fn finish_after_drain(&mut self) -> Result<([u8; 32], u64), ArchiveError> {
        io::copy(self, &mut io::sink()).map_err(io_error)?;
        let hasher = std::mem::take(&mut self.hasher);
        Ok((hasher.finalize().into(), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(LimitExceeded(ArchiveErrorKind::Archive(
                self.limit,
            ))));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Slack above `max_unpacked` for tar headers and padding, which count
/// against the decompressed stream but not against the entries' sizes.
const HEADER_SLACK: u64 = 1 << 20;

/// Fails once the decompressed stream passes `limit` (plus room for tar
/// headers): wraps decompressors so a gzip bomb stops at the limit instead of
/// filling memory or disk. The error names `limit`, the configured bound.
pub struct UnpackLimit<R> {
    inner: R,
    count: u64,
    limit: u64,
}

impl<R: Read> UnpackLimit<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            count: 0,
            limit,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for UnpackLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit.saturating_add(HEADER_SLACK) {
            return Err(io::Error::other(LimitExceeded(ArchiveErrorKind::Unpacked(
                self.limit,
            ))));
        }
        Ok(n)
    }
}

/// Largest GNU long-name or pax extension block accepted. Paths over 255
/// bytes are refused anyway; this only has to hold a few records.
pub const MAX_EXTENSION: u64 = 64 * 1024;

/// Watches the tar framing as it passes and refuses an oversized GNU
/// long-name (`L`/`K`) or pax (`x`/`g`) block *before* the tar reader buffers
/// it whole: without this, a 50 KiB gzip could make the reader allocate
/// gigabytes for one "file name".
pub struct TarGuard<R> {
    inner: R,
    header: [u8; 512],
    filled: usize,
    /// Bytes of the current entry's data (with padding) still to pass.
    data_left: u64,
    /// Data of a pax block being collected, and its unpadded length.
    pax: Option<(Vec<u8>, u64)>,
    /// A pax `size` record that applies to the next entry.
    next_size: Option<u64>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            header: [0; 512],
            filled: 0,
            data_left: 0,
            pax: None,
            next_size: None,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn on_header(&mut self) -> io::Result<()> {
        if self.header.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&self.header);
        let size = match self.next_size.take() {
            Some(s) => s,
            None => h.size()?,
        };
        let ty = h.entry_type();
        let is_extension = matches!(
            ty,
            tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
                | tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
        );
        if is_extension && size > MAX_EXTENSION {
            return Err(io::Error::other(LimitExceeded(
                ArchiveErrorKind::Extension(MAX_EXTENSION),
            )));
        }
        if ty == tar::EntryType::XHeader {
            self.pax = Some((Vec::with_capacity(size as usize), size));
        }
        self.data_left = size.div_ceil(512).saturating_mul(512);
        if self.data_left == 0 {
            self.finish_pax();
        }
        Ok(())
    }

    fn finish_pax(&mut self) {
        if let Some((data, _)) = self.pax.take() {
            self.next_size = pax_size(&data);
        }
    }
}

/// The `size` record of a pax extended header, if any.
fn pax_size(mut data: &[u8]) -> Option<u64> {
    let mut size = None;
    // Records are "LEN key=value\n", LEN counting the whole record.
    while !data.is_empty() {
        let space = data.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..space]).ok()?.parse().ok()?;
        if len <= space || len > data.len() {
            return size;
        }
        let record = &data[space + 1..len];
        if let Some(v) = record.strip_prefix(b"size=") {
            let v = v.strip_suffix(b"\n").unwrap_or(v);
            size = std::str::from_utf8(v).ok()?.parse().ok();
        }
        data = &data[len..];
    }
    size
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.data_left > 0 {
            let want = buf
                .len()
                .min(self.data_left.min(usize::MAX as u64) as usize);
            let n = self.inner.read(&mut buf[..want])?;
            self.data_left -= n as u64;
            if let Some((data, len)) = self.pax.as_mut() {
                let keep = (*len as usize).saturating_sub(data.len()).min(n);
                data.extend_from_slice(&buf[..keep]);
            }
            if self.data_left == 0 {
                self.finish_pax();
            }
            return Ok(n);
        }
        let want = buf.len().min(512 - self.filled);
        let n = self.inner.read(&mut buf[..want])?;
        self.header[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
        self.filled += n;
        if self.filled == 512 {
            self.filled = 0;
            self.on_header()?;
        }
        Ok(n)
    }
}

/// What kind of entry a tar header describes, reduced to what we allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
}

/// Tracks entry count, total size and seen paths across one tar stream.
pub struct EntryChecker {
    limits: Limits,
    entries: u64,
    total: u64,
    seen: HashSet<String>,
}

impl EntryChecker {
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: *limits,
            entries: 0,
            total: 0,
            seen: HashSet::new(),
        }
    }

    /// Checks one entry and returns its normalised path (no trailing `/`,
    /// no leading `./`) and kind.
    pub fn check<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(String, EntryKind), ArchiveError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let raw = entry.path_bytes();
        let path = std::str::from_utf8(&raw)
            .map_err(|_| ArchiveError::UnsafeEntry {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason: "path is not UTF-8",
            })?
            .to_string();
        let kind = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                return Err(unsafe_entry(&path, "links are not allowed"))
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(unsafe_entry(&path, "devices and FIFOs are not allowed"))
            }
            _ => return Err(unsafe_entry(&path, "unsupported entry type")),
        };
        let clean = check_path(&path)?;
        // entry.size() includes a pax `size` override; the raw header may say 0.
        let size = entry.size();
        self.total = self.total.saturating_add(size);
        if self.total > self.limits.max_unpacked {
            return Err(ArchiveError::UnpackedTooLarge {
                limit: self.limits.max_unpacked,
            });
        }
        if !self.seen.insert(clean.clone()) {
            return Err(ArchiveError::DuplicateEntry { path: clean });
        }
        Ok((clean, kind))
    }
}

fn unsafe_entry(path: &str, reason: &'static str) -> ArchiveError {
    ArchiveError::UnsafeEntry {
        path: path.to_string(),
        reason,
    }
}

/// Checks a path from an archive: relative, only normal components, no `..`,
/// no NUL or backslash (a separator on Windows), at most 255 bytes.
pub fn check_path(path: &str) -> Result<String, ArchiveError> {
    if path.is_empty() {
        return Err(unsafe_entry(path, "empty path"));
    }
    if path.len() > 255 {
        return Err(unsafe_entry(path, "path longer than 255 bytes"));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(unsafe_entry(path, "backslash or NUL in path"));
    }
    if path.starts_with('/') {
        return Err(unsafe_entry(path, "absolute path"));
    }
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
            Component::CurDir => {}
            // `..` lets an entry escape the directory it is unpacked into.
            Component::ParentDir => return Err(unsafe_entry(path, "'..' in path")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(path, "absolute path"))
            }
        }
    }
    if parts.is_empty() {
        return Err(unsafe_entry(path, "path names no file"));
    }
    Ok(parts.join("/"))
}

/// Reads a whole small file from an entry, failing if it exceeds `limit`.
pub fn read_small(r: &mut impl Read, file: &str, limit: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut out = Vec::new();
    r.take(limit + 1).read_to_end(&mut out).map_err(io_error)?;
    if out.len() as u64 > limit {
        return Err(ArchiveError::MetadataTooLarge {
            file: file.to_string(),
            limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(check_path("a/b.txt").unwrap(), "a/b.txt");
        assert_eq!(check_path("./a/").unwrap(), "a");
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a\\b",
            ".",
            "./",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(check_path(&"a".repeat(256)).is_err());
    }

    #[test]
    fn hashing_reader_hashes_and_bounds() {
        let data = vec![7u8; 1000];
        let mut r = HashingReader::new(data.as_slice(), 1000);
        let (sum, n) = r.finish_after_drain().unwrap();
        assert_eq!(n, 1000);
        assert_eq!(sum.as_slice(), Sha256::digest(&data).as_slice());
        let mut r = HashingReader::new(data.as_slice(), 999);
        assert!(matches!(
            r.finish_after_drain(),
            Err(ArchiveError::TooLarge { limit: 999 })
        ));
    }

    #[test]
    fn pax_size_records_are_read() {
        assert_eq!(pax_size(b"11 size=42\n"), Some(42));
        assert_eq!(pax_size(b"18 path=a/long/nm\n10 size=7\n"), Some(7));
        assert_eq!(pax_size(b"garbage"), None);
    }

    #[test]
    fn unpack_limit_stops_reading() {
        let data = vec![0u8; 100 + HEADER_SLACK as usize];
        let mut r = UnpackLimit::new(data.as_slice(), 50);
        let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(matches!(
            io_error(e),
            ArchiveError::UnpackedTooLarge { limit: 50 }
        ));
    }
}
