//! Size and count limits for untrusted input, in one place.
//!
//! Archives and indexes come from uploaders and mirrors we do not trust. Each
//! bound below exists to stop one kind of resource exhaustion (a gzip bomb, a
//! tar with millions of entries, an endless index); callers pass a `Limits`
//! instead of hard-coding numbers.

/// Bounds applied when reading archives and indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest archive accepted, in bytes, as stored (compressed). Default 1 GiB.
    pub max_archive: u64,
    /// Largest total size of an archive's entries once decompressed. Default 4 GiB.
    pub max_unpacked: u64,
    /// Most entries (files and directories) in one archive. Default 100,000.
    pub max_entries: u64,
    /// Largest single metadata file inside an archive (`niso.toml`,
    /// `metadata.config`, `README.md`). Default 1 MiB.
    pub max_metadata: u64,
    /// Largest index file, compressed or not. Default 256 MiB: `versions` for
    /// 100,000 packages is about 10 MiB.
    pub max_index: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_archive: 1 << 30,
            max_unpacked: 4 << 30,
            max_entries: 100_000,
            max_metadata: 1 << 20,
            max_index: 256 << 20,
        }
    }
}
