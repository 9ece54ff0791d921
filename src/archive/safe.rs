//! The checks every archive entry passes, and the stream adapters that hash
//! and bound bytes as they flow.
//!
//! WARNING: these checks are what stands between an uploader and every user
//! who unpacks a package. An entry named `../../.bashrc`, an absolute path, a
//! symlink to `/etc`, a device node, or a gzip bomb must never get through.
//! Nor may a tar that another reader (GNU tar, Python, erl_tar) would read
//! differently from the `tar` crate that checks it here: entries hidden
//! after the end-of-archive marker, a pax header read two ways. What we
//! check must be what every client unpacks.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Component, Path};

use sha2::{Digest, Sha256};

use super::ArchiveError;
use crate::limits::{Limits, Quoted};

/// Marks an I/O error raised by a limit or by [`TarGuard`], so it can be
/// told apart from a real read failure after it has passed through tar and
/// flate2.
#[derive(Debug, Clone)]
struct Refused(Refusal);

#[derive(Debug, Clone)]
enum Refusal {
    Archive(u64),
    Unpacked(u64),
    Extension(u64),
    AfterEnd(&'static str),
    BadExtension(&'static str, String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("archive refused by the guard")
    }
}
impl std::error::Error for Refused {}

fn refused(r: Refusal) -> io::Error {
    io::Error::other(Refused(r))
}

/// Turns an I/O error into the archive error it stands for.
pub fn io_error(e: io::Error) -> ArchiveError {
    if let Some(Refused(r)) = e.get_ref().and_then(|i| i.downcast_ref()) {
        return match r.clone() {
            Refusal::Archive(limit) => ArchiveError::TooLarge { limit },
            Refusal::Unpacked(limit) => ArchiveError::UnpackedTooLarge { limit },
            Refusal::Extension(limit) => ArchiveError::MetadataTooLarge {
                file: "a tar long-name or pax header".into(),
                limit,
            },
            Refusal::AfterEnd(file) => ArchiveError::DataAfterEnd { file },
            Refusal::BadExtension(file, reason) => ArchiveError::BadExtension { file, reason },
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

    /// Lowers the limit once the kind of archive is known (Hex tarballs
    /// have a smaller one).
    pub fn tighten(&mut self, limit: u64) {
        self.limit = self.limit.min(limit);
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
            return Err(refused(Refusal::Archive(self.limit)));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Slack above `max_unpacked` for tar headers and padding, which count
/// against the decompressed stream but not against the entries' sizes.
pub const HEADER_SLACK: u64 = 1 << 20;

/// Fails once the decompressed stream passes `limit` plus `slack`: wraps
/// decompressors so a gzip bomb stops at the limit instead of filling memory
/// or disk. The error names `limit`, the configured bound.
pub struct UnpackLimit<R> {
    inner: R,
    count: u64,
    limit: u64,
    slack: u64,
}

impl<R: Read> UnpackLimit<R> {
    pub fn new(inner: R, limit: u64, slack: u64) -> Self {
        Self {
            inner,
            count: 0,
            limit,
            slack,
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
        if self.count > self.limit.saturating_add(self.slack) {
            return Err(refused(Refusal::Unpacked(self.limit)));
        }
        Ok(n)
    }
}

/// Largest GNU long-name or pax extension block accepted. Paths over 255
/// bytes are refused anyway; this only has to hold a few records.
pub const MAX_EXTENSION: u64 = 64 * 1024;

/// Watches the tar framing as bytes pass, framing it exactly as the `tar`
/// crate does (tar 0.4's `next_entry_raw`), and refuses, before the tar
/// reader acts on them:
///
/// * an extension header (GNU long name `L` or long link `K`, pax `x` or
///   `g`) larger than [`MAX_EXTENSION`], counted with its own size: the
///   reader buffers such a block whole, so without this a 50 KiB gzip could
///   make it allocate gigabytes for one "file name". As in tar, a pax `size`
///   record applies to the next *file* header, never to an extension header
///   in between: applying it there let a `size=0` hide a 256 MiB long name;
/// * a pax header that tar readers could understand differently (see
///   [`check_pax`]), and an entry named twice, by a GNU long name and a pax
///   `path` (the `tar` crate takes the first, GNU tar the second);
/// * any byte other than zero after the end-of-archive marker (the first
///   all-zero header block, where the tar reader stops): `tar -i` and
///   Python's `ignore_zeros` would unpack entries hidden there that no check
///   has seen.
///
/// The caller reads the stream to its end through the guard after the tar
/// reader is done ([`TarGuard::drain`]), so the last rule sees every byte.
pub struct TarGuard<R> {
    inner: R,
    /// Which tar this is, for messages ("archive", "tarball",
    /// "contents.tar.gz").
    label: &'static str,
    header: [u8; 512],
    filled: usize,
    /// Bytes of the current entry's data (with padding) still to pass.
    data_left: u64,
    /// Data of a pax block being collected, and its unpadded length.
    pax: Option<(Vec<u8>, u64)>,
    /// A pax `size` record waiting for the file header it applies to.
    pax_size: Option<u64>,
    /// The extension headers before the next file header gave a GNU long
    /// name, a pax `path`.
    long_name: bool,
    pax_path: bool,
    /// The end-of-archive marker has passed: only zeros may follow.
    ended: bool,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, label: &'static str) -> Self {
        Self {
            inner,
            label,
            header: [0; 512],
            filled: 0,
            data_left: 0,
            pax: None,
            pax_size: None,
            long_name: false,
            pax_path: false,
            ended: false,
        }
    }

    /// Reads whatever the tar reader left (the end blocks, padding, and
    /// anything hidden after them) through the checks.
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn bad(&self, reason: String) -> io::Error {
        refused(Refusal::BadExtension(self.label, reason))
    }

    fn on_header(&mut self) -> io::Result<()> {
        if self.header.iter().all(|b| *b == 0) {
            self.ended = true;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&self.header);
        let ty = h.entry_type();
        let is_extension = ty.is_gnu_longname()
            || ty.is_gnu_longlink()
            || ty.is_pax_local_extensions()
            || ty.is_pax_global_extensions();
        // The raw size field, as tar reads it (not `size()`, which gives a
        // GNU sparse file's unpacked size).
        let mut size = h.entry_size()?;
        if is_extension {
            if size > MAX_EXTENSION {
                return Err(refused(Refusal::Extension(MAX_EXTENSION)));
            }
            if ty.is_gnu_longname() {
                self.long_name = true;
            }
            if ty.is_pax_local_extensions() {
                self.pax = Some((Vec::with_capacity(size as usize), size));
            }
        } else {
            if std::mem::take(&mut self.long_name) && std::mem::take(&mut self.pax_path) {
                return Err(self.bad(
                    "an entry named both by a GNU long name and by a pax path (tar readers disagree on which counts)"
                        .into(),
                ));
            }
            self.pax_path = false;
            if let Some(s) = self.pax_size.take() {
                size = s;
            }
        }
        self.data_left = size.div_ceil(512).saturating_mul(512);
        if self.data_left == 0 {
            self.finish_pax()?;
        }
        Ok(())
    }

    fn finish_pax(&mut self) -> io::Result<()> {
        if let Some((data, _)) = self.pax.take() {
            let pax = check_pax(&data).map_err(|reason| self.bad(reason))?;
            self.pax_size = pax.size;
            self.pax_path = pax.path;
        }
        Ok(())
    }
}

/// What the guard needs from a pax extended header.
#[derive(Debug, PartialEq, Eq)]
struct PaxFacts {
    size: Option<u64>,
    path: bool,
}

/// Reads a pax extended header strictly, refusing what tar readers could
/// understand differently:
///
/// * a record that is not `LEN key=value\n` with LEN counting the whole
///   record, or holds a newline inside (the `tar` crate splits records at
///   newlines and ignores a header it cannot parse, GNU tar does neither);
/// * a key given twice (the `tar` crate takes the first, GNU tar the last);
/// * a `size` that is not plain decimal digits;
/// * `GNU.sparse.*` records: GNU tar and Python unpack such an entry under
///   the name (`GNU.sparse.name`) and size they give, which the `tar` crate
///   ignores, so what was checked would not be what is unpacked.
///
/// Every header accepted here the `tar` crate parses into the same records.
fn check_pax(mut data: &[u8]) -> Result<PaxFacts, String> {
    let malformed = || "malformed pax extended header record".to_string();
    let mut keys: HashSet<&str> = HashSet::new();
    let mut facts = PaxFacts {
        size: None,
        path: false,
    };
    while !data.is_empty() {
        let space = data.iter().position(|b| *b == b' ').ok_or_else(malformed)?;
        let digits = &data[..space];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(malformed());
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(malformed)?;
        if len <= space + 1 || len > data.len() {
            return Err(malformed());
        }
        let body = data[space + 1..len]
            .strip_suffix(b"\n")
            .ok_or_else(malformed)?;
        if body.contains(&b'\n') {
            return Err(malformed());
        }
        let eq = body.iter().position(|b| *b == b'=').ok_or_else(malformed)?;
        let key = std::str::from_utf8(&body[..eq]).map_err(|_| malformed())?;
        if key.is_empty() {
            return Err(malformed());
        }
        let value = &body[eq + 1..];
        if key.starts_with("GNU.sparse.") {
            return Err(format!(
                "pax record {} is not allowed (GNU sparse files unpack under another name and size)",
                Quoted(key)
            ));
        }
        if !keys.insert(key) {
            return Err(format!(
                "pax record {} appears twice (tar readers disagree on which counts)",
                Quoted(key)
            ));
        }
        match key {
            "size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| "pax record size is not a decimal number".to_string())?;
                facts.size = Some(size);
            }
            "path" => facts.path = true,
            _ => {}
        }
        data = &data[len..];
    }
    Ok(facts)
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.ended {
            let n = self.inner.read(buf)?;
            if buf[..n].iter().any(|b| *b != 0) {
                return Err(refused(Refusal::AfterEnd(self.label)));
            }
            return Ok(n);
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
                self.finish_pax()?;
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
    fn pax_records_are_read_strictly() {
        let facts = |size, path| Ok(PaxFacts { size, path });
        assert_eq!(check_pax(b"11 size=42\n"), facts(Some(42), false));
        assert_eq!(
            check_pax(b"18 path=a/long/nm\n10 size=7\n"),
            facts(Some(7), true)
        );
        assert_eq!(check_pax(b""), facts(None, false));
        for bad in [
            &b"garbage"[..],
            b"12 size=42\n",           // LEN one too many
            b"10 size=42\n",           // one too few
            b"11 size=42\n\n",         // an empty record
            b"11 size=4\n2\n",         // a newline inside
            b"9 size42\n",             // no '='
            b"7 =abc\n",               // no key
            b"+11 size=42\n",          // LEN not plain digits
            b"11 size=+2\n",           // size not plain digits
            b"10 size=7\n10 size=7\n", // a key twice
            b"22 GNU.sparse.major=1\n",
        ] {
            assert!(
                check_pax(bad).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn unpack_limit_stops_reading() {
        let data = vec![0u8; 100 + HEADER_SLACK as usize];
        let mut r = UnpackLimit::new(data.as_slice(), 50, HEADER_SLACK);
        let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(matches!(
            io_error(e),
            ArchiveError::UnpackedTooLarge { limit: 50 }
        ));
    }
}
