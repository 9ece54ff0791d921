//! `niso registry mirror`: a verified, consistent copy of one repository,
//! into a local directory (a verbatim copy that keeps the source's
//! signatures) or into another registry (uploads through its API, which
//! re-signs with its own key).
//!
//! # A consistent snapshot of a tree that keeps changing
//!
//! The source may take uploads while it is read. Every read starts with its
//! signed `freshness` record (signature, repository, no rollback, expiry),
//! which names the SHA-256 and length of `names`, `versions` and every bin
//! `freshness-bins/XX`; each bin names those of the package indexes in it.
//! The mirror fetches exactly those files and checks each against the
//! record. A file that does not match (the source moved on between two
//! reads) restarts the walk from a fresh record; the files already fetched
//! are kept by their digest, so a restart only fetches what changed. Every
//! other file of the tree follows from the verified indexes: the archives
//! they name (checked by size and SHA-256 as they stream, then by the
//! archive reader) and the `v1/` documents and downloads, which are rendered
//! here by the code the publisher writes them with ([`render::v1_files`])
//! rather than downloaded.
//!
//! # Into a directory
//!
//! The copy is written in the order a reader needs: archives first, then
//! the `v1/` downloads (hard links to them), then the package indexes and
//! `v1/` documents, then `names`, `versions` and `v1/packages/index.json`,
//! then the bins, and `freshness` last; files the source no longer has are
//! removed only after that, once no index names them. Each file is a temp
//! file (`.tmp-PID-N-NAME`, never served, removed by the next run if this
//! one dies) renamed into place, and each stage is made durable with one
//! `syncfs(2)` before the next becomes visible (one per stage rather than
//! one `fsync` per file: a mirror writes tens of thousands of files). Only
//! files that differ are written, and a rewritten file always gets a later
//! modification time, so an rsync of the mirror sees every change.
//!
//! A run killed half way leaves archives that were complete (they are
//! renamed into place as each one is verified) and nothing half-written;
//! the next run keeps every archive whose size and SHA-256 match the signed
//! index and fetches only the rest.
//!
//! # Into a registry
//!
//! Each archive the destination does not have is downloaded, verified, and
//! uploaded through the write API (`upload::Pusher::send`: lost answers are
//! retried, identical bytes already there are a success), carrying its
//! publisher signature; tags follow. The destination signs its own indexes,
//! so only what its API can express is mirrored: releases and tags, not
//! upload times, retirements or deletions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use prost::Message;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::api::{self, ApiClient, ApiError};
use super::fetch::{check_artifact_bytes, ReadError};
use super::freshness::{self, Allow, FreshnessError};
use super::session::{Session, SessionError};
use super::transport::{Transport, TransportError};
use super::upload::{Prepared, PushError, Pusher};
use crate::archive::{self, ArchiveKind};
use crate::ident::{Arch, PackageName, RepoName, TagName, Version};
use crate::index::codec::decode_index;
use crate::index::layout::{self, Layout};
use crate::index::view::{self as render, Content};
use crate::index::{json, pb, PublicKey};
use crate::limits::Limits;

/// How many times the walk starts over because the source changed under it
/// before the mirror gives up. A source taking uploads back to back is
/// always in the middle of a commit (its `versions` is renamed before its
/// `freshness`), so a walk may need many tries; each one fetches only what
/// changed.
pub const MAX_RESTARTS: usize = 100;

/// How many contents of one path the cache keeps: a record read now may
/// name the bytes of a path fetched a few tries ago, during its commit.
const CACHE_VERSIONS: usize = 4;

/// The default number of downloads (or uploads) at once.
pub const DEFAULT_JOBS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("{location}: {source}")]
    Freshness {
        location: String,
        source: FreshnessError,
    },
    #[error("{location}: {reason}; the source is not a consistent registry tree (`niso registry verify` it)")]
    Inconsistent { location: String, reason: String },
    #[error("{path} did not match the source's signed freshness record, even read again {restarts} times: the source keeps changing faster than it can be read, or serves a file its own record does not vouch for (a stale cache in front of it, or tampering); try again later, or check it with `niso registry verify`")]
    Unsettled { restarts: usize, path: String },
    #[error("{path}: the mirror already holds generation {have}, newer than the source's {found}: the source (or a cache in front of it) serves an old copy of the tree; refusing to roll the mirror back")]
    Rollback { path: String, have: u64, found: u64 },
    #[error("{path}: {reason}")]
    Destination { path: String, reason: String },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("cannot read what the destination registry has published: {0}")]
    DestinationRead(#[from] SessionError),
    #[error("cannot start {jobs} download threads: {reason}")]
    Threads { jobs: usize, reason: String },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MirrorError {
    let path = path.display().to_string();
    move |source| MirrorError::Io {
        action,
        path,
        source,
    }
}

/// A failure inside one walk: either the source moved on under it (start
/// over from a new record) or something that starting over cannot fix.
enum Fail {
    Moved(String),
    Fatal(MirrorError),
}

impl<E: Into<MirrorError>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail::Fatal(e.into())
    }
}

/// One repository to copy: a transport rooted at it (`URL/`, `DIR/`,
/// `URL/repos/ORG/`) and what its indexes must be signed with.
pub struct Source {
    pub transport: Box<dyn Transport>,
    pub key: PublicKey,
    /// The `repository` every index must carry.
    pub repository: String,
    /// The highest generation this client has verified before: an older
    /// record is a rollback.
    pub seen: Option<u64>,
    /// Whether an expired record may be copied (an old offline copy).
    pub allow: Allow,
    /// Unix seconds, to judge the record's expiry.
    pub now: i64,
}

impl Source {
    fn location(&self, path: &str) -> String {
        self.transport.location(path)
    }
}

/// How to mirror.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Downloads (or uploads) at once.
    pub jobs: usize,
    pub limits: Limits,
    /// Upload archives to a registry without the publisher signatures they
    /// carry at the source.
    pub strip_signatures: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            jobs: DEFAULT_JOBS,
            limits: Limits::default(),
            strip_signatures: false,
        }
    }
}

/// Told what the mirror is doing (a progress bar); every call may come
/// from any download thread.
pub trait Progress: Send + Sync {
    /// The archives to fetch are known: `count` of them, `bytes` in all.
    fn fetching(&self, _repository: &str, _count: u64, _bytes: u64) {}
    /// One archive is fetched (and uploaded, for a registry), `bytes` long.
    fn fetched(&self, _bytes: u64) {}
    /// The archives are done; the indexes are being written.
    fn finishing(&self) {}
}

/// A [`Progress`] that shows nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// What a mirror of one repository did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub repository: String,
    /// The generation of the source's record that was copied.
    pub generation: u64,
    /// The record had expired (copied because that was allowed).
    pub expired: bool,
    pub packages: usize,
    pub releases: usize,
    /// Archives the snapshot names.
    pub archives: usize,
    /// Of those, already at the destination with the right bytes.
    pub kept: usize,
    /// Archives fetched from the source (uploaded, for a registry).
    pub fetched: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Index, document and link files written (a directory).
    pub files_written: usize,
    /// Files the source no longer has, removed (a directory).
    pub files_removed: usize,
    /// Tags set through the API (a registry).
    pub tags_set: usize,
    /// Times the walk started over because the source changed.
    pub restarts: usize,
    /// Index files fetched from the source (across restarts).
    pub index_fetches: usize,
    /// What could not be mirrored (a registry: conflicts, refused
    /// signatures), one line each.
    pub problems: Vec<String>,
}

// ---------------------------------------------------------------------------
// The snapshot.

/// A verified, consistent view of the source at one generation.
pub struct Snapshot {
    pub generation: u64,
    pub expired: bool,
    freshness: Vec<u8>,
    names: Vec<u8>,
    versions: Vec<u8>,
    public_key: Option<Vec<u8>>,
    /// `publisher-keys`, verbatim, when the record lists it.
    publisher_keys: Option<Vec<u8>>,
    bins: Vec<(String, Vec<u8>)>,
    /// By name.
    packages: Vec<PackageSnap>,
}

struct PackageSnap {
    name: PackageName,
    /// `niso/packages/NAME`, verbatim.
    niso: Vec<u8>,
    /// `packages/NAME` (Hex's view), verbatim, when it has Hex releases.
    hex: Option<Vec<u8>>,
    index: pb::Package,
}

/// One artifact the snapshot names, checked: its path follows from its
/// (validated) name, version and arch, so it cannot point outside the tree.
#[derive(Debug, Clone)]
struct Wanted {
    package: usize,
    name: PackageName,
    version: Version,
    arch: Arch,
    path: String,
    size: u64,
    sha256: Vec<u8>,
    inner_checksum: Vec<u8>,
    hex: bool,
    publisher_signature: Option<Vec<u8>>,
    publisher_key_id: Option<String>,
}

impl Wanted {
    fn what(&self) -> String {
        format!("{} {} ({})", self.name, self.version, self.arch)
    }

    fn as_artifact(&self) -> pb::Artifact {
        pb::Artifact {
            arch: self.arch.to_string(),
            sha256: self.sha256.clone(),
            size: self.size,
            path: self.path.clone(),
            ..Default::default()
        }
    }
}

impl Snapshot {
    fn wanted(&self, location: impl Fn(&str) -> String) -> Result<Vec<Wanted>, MirrorError> {
        let mut out = Vec::new();
        for (i, p) in self.packages.iter().enumerate() {
            let bad = |reason: String| MirrorError::Inconsistent {
                location: location(&index_path(&p.name)),
                reason,
            };
            for r in &p.index.releases {
                let version = Version::new(&r.version).map_err(|e| bad(e.to_string()))?;
                for a in &r.artifacts {
                    let arch = Arch::new(&a.arch).map_err(|e| bad(e.to_string()))?;
                    let hex = render::is_hex(a);
                    let path = if hex {
                        format!("{}/{}-{version}.tar", layout::TARBALLS_DIR, p.name)
                    } else {
                        format!("{}/{}-{version}-{arch}.niso", layout::ARCHIVES_DIR, p.name)
                    };
                    if a.path != path || (hex && a.arch != Arch::ANY) {
                        return Err(bad(format!(
                            "{} {version} ({arch}) is said to be at {:?}, not {path:?}",
                            p.name, a.path
                        )));
                    }
                    out.push(Wanted {
                        package: i,
                        name: p.name.clone(),
                        version: version.clone(),
                        arch,
                        path,
                        size: a.size,
                        sha256: a.sha256.clone(),
                        inner_checksum: r.inner_checksum.clone(),
                        hex,
                        publisher_signature: a.publisher_signature.clone(),
                        publisher_key_id: a.publisher_key_id.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn releases(&self) -> usize {
        self.packages.iter().map(|p| p.index.releases.len()).sum()
    }
}

fn index_path(name: &PackageName) -> String {
    format!("{}/{name}", layout::NISO_PACKAGES_DIR)
}

fn matches(d: &pb::FileDigest, bytes: &[u8]) -> bool {
    d.length == bytes.len() as u64 && d.sha256.as_slice() == Sha256::digest(bytes).as_slice()
}

/// Index files fetched so far, by path, with the digest of what was
/// fetched (the last few contents of each): a restart reuses every file
/// whose digest the new record names.
#[derive(Default)]
struct Cache {
    files: Mutex<Files>,
    fetches: AtomicUsize,
}

/// Path → (SHA-256, bytes), newest last.
type Files = HashMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Files> {
        // A thread that panicked holding it left a plain map behind.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file the digest names: from the cache, or fetched. Bytes that do
    /// not match (or a file that is gone) mean the source moved on.
    fn get(&self, source: &Source, d: &pb::FileDigest, limit: u64) -> Result<Vec<u8>, Fail> {
        if let Some(seen) = self.lock().get(&d.path) {
            let hit = seen
                .iter()
                .find(|(digest, bytes)| *digest == d.sha256 && bytes.len() as u64 == d.length);
            if let Some((_, bytes)) = hit {
                return Ok(bytes.clone());
            }
        }
        let bytes = match fetch_patiently(source, &d.path, limit) {
            Ok(b) => b,
            Err(TransportError::NotFound { .. }) => return Err(Fail::Moved(d.path.clone())),
            Err(e) => return Err(e.into()),
        };
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let ok = matches(d, &bytes);
        let digest = Sha256::digest(&bytes).to_vec();
        {
            let mut files = self.lock();
            let seen = files.entry(d.path.clone()).or_default();
            seen.retain(|(other, _)| *other != digest);
            if seen.len() >= CACHE_VERSIONS {
                seen.remove(0);
            }
            seen.push((digest, bytes.clone()));
        }
        if ok {
            Ok(bytes)
        } else {
            Err(Fail::Moved(d.path.clone()))
        }
    }
}

/// Runs `f` on every item on the pool's threads, in order; the first error
/// stops the rest.
fn par_try<T: Sync, R: Send, E: Send>(
    pool: &rayon::ThreadPool,
    items: &[T],
    f: impl Fn(&T) -> Result<R, E> + Sync + Send,
) -> Result<Vec<R>, E> {
    pool.install(|| items.par_iter().map(f).collect())
}

fn pool(jobs: usize) -> Result<rayon::ThreadPool, MirrorError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .thread_name(|i| format!("niso-mirror-{i}"))
        .build()
        .map_err(|e| MirrorError::Threads {
            jobs,
            reason: e.to_string(),
        })
}

/// How long one request the server keeps turning away (busy, rate
/// limited) is waited for before the mirror gives up.
const BUSY_BUDGET: Duration = Duration::from_secs(600);

/// The longest single wait before trying such a request again.
const BUSY_MAX_WAIT: Duration = Duration::from_secs(60);

/// Said once per process: the rest go to the debug log.
static BUSY_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits before trying again a request the server turned away: as long as
/// it asked (`Retry-After`), or half a second doubling each time, plus up
/// to a quarter second at random so the download threads do not come back
/// all at once. `waited` is this request's total so far; returns false
/// when the budget is spent.
fn busy_pause(waited: &mut Duration, retry_after: Option<u64>, location: &str) -> bool {
    if *waited >= BUSY_BUDGET {
        return false;
    }
    let backoff = Duration::from_millis(500)
        .saturating_mul(1 << (waited.as_secs() / 2).min(6))
        .min(BUSY_MAX_WAIT);
    let wait = retry_after
        .map(Duration::from_secs)
        .unwrap_or(backoff)
        .min(BUSY_MAX_WAIT)
        + Duration::from_millis(rand::random::<u64>() % 250);
    if BUSY_SAID.swap(true, Ordering::Relaxed) {
        tracing::debug!("{location}: busy, waiting {:.1} s", wait.as_secs_f64());
    } else {
        tracing::warn!(
            "{location}: the server asks to slow down; waiting as it says (a niso registry limits anonymous reads per address: --rate-limit-ip)"
        );
    }
    std::thread::sleep(wait);
    *waited += wait;
    true
}

/// `fetch`, tried again while the server is busy.
fn fetch_patiently(source: &Source, path: &str, limit: u64) -> Result<Vec<u8>, TransportError> {
    let mut waited = Duration::ZERO;
    loop {
        match source.transport.fetch(path, limit) {
            Err(TransportError::Busy {
                location,
                retry_after,
                ..
            }) if busy_pause(&mut waited, retry_after, &location) => {}
            r => return r,
        }
    }
}

/// `niso/packages/NAME` or `packages/NAME` of a valid name, and which.
fn index_file(path: &str) -> Option<(bool, PackageName)> {
    let (niso, name) = match path.strip_prefix(&format!("{}/", layout::NISO_PACKAGES_DIR)) {
        Some(n) => (true, n),
        None => (
            false,
            path.strip_prefix(&format!("{}/", layout::PACKAGES_DIR))?,
        ),
    };
    PackageName::new(name).ok().map(|n| (niso, n))
}

/// `freshness-bins/XX`, and XX.
fn bin_file(path: &str) -> Option<u8> {
    path.strip_prefix(&format!("{}/", layout::FRESHNESS_BINS_DIR))
        .and_then(|b| u8::from_str_radix(b, 16).ok())
        .filter(|b| Layout::freshness_bin_rel(*b) == path)
}

/// One walk of the source: the record, then the files it names, each
/// checked against it, then every index decoded and checked for agreement.
fn take_snapshot(
    source: &Source,
    cache: &Cache,
    pool: &rayon::ThreadPool,
    limits: &Limits,
) -> Result<Snapshot, Fail> {
    let limit = limits.max_index;
    let fresh_location = source.location(layout::FRESHNESS);
    let record_bytes = match fetch_patiently(source, layout::FRESHNESS, limit) {
        Ok(b) => b,
        Err(TransportError::NotFound { location }) => {
            return Err(ReadError::NotARegistry { location }.into())
        }
        Err(e) => return Err(e.into()),
    };
    let fresh = freshness::check_record(
        &record_bytes,
        &source.key,
        &source.repository,
        source.now,
        source.seen,
        source.allow,
        limit,
    )
    .map_err(|e| MirrorError::Freshness {
        location: fresh_location.clone(),
        source: e,
    })?;
    // Verified just above; decoded again for the list it holds.
    let record: pb::Freshness = decode_index(&record_bytes, &source.key, &source.repository, limit)
        .map_err(|e| MirrorError::Freshness {
            location: fresh_location.clone(),
            source: FreshnessError::Index {
                path: layout::FRESHNESS.into(),
                source: e,
            },
        })?;
    let inconsistent = |location: String, reason: String| {
        Fail::Fatal(MirrorError::Inconsistent { location, reason })
    };
    for d in &record.files {
        let top = [layout::NAMES, layout::VERSIONS, layout::PUBLISHER_KEYS];
        if !top.contains(&d.path.as_str()) && bin_file(&d.path).is_none() {
            return Err(inconsistent(
                fresh_location.clone(),
                format!(
                    "lists {:?}, which is not an index of a registry tree",
                    cut(&d.path)
                ),
            ));
        }
    }
    for top in [layout::NAMES, layout::VERSIONS] {
        if !fresh.lists(top) {
            return Err(inconsistent(
                fresh_location.clone(),
                format!("does not list {top}"),
            ));
        }
    }
    let tops = par_try(pool, &record.files, |d| cache.get(source, d, limit))?;

    // The bins: each one's package indexes, checked to belong to it.
    let mut names = Vec::new();
    let mut versions = Vec::new();
    let mut bins = Vec::new();
    let mut publisher_keys = None;
    let mut niso_digests: BTreeMap<String, pb::FileDigest> = BTreeMap::new();
    let mut hex_digests: BTreeMap<String, pb::FileDigest> = BTreeMap::new();
    for (d, bytes) in record.files.iter().zip(tops) {
        match d.path.as_str() {
            layout::NAMES => names = bytes,
            layout::VERSIONS => versions = bytes,
            layout::PUBLISHER_KEYS => {
                // Checked against the record by the cache; its own
                // signature too, so a mirror never carries a forged list.
                decode_index::<pb::PublisherKeys>(&bytes, &source.key, &source.repository, limit)
                    .map_err(|e| MirrorError::Freshness {
                    location: source.location(layout::PUBLISHER_KEYS),
                    source: FreshnessError::Index {
                        path: layout::PUBLISHER_KEYS.into(),
                        source: e,
                    },
                })?;
                publisher_keys = Some(bytes);
            }
            path => {
                let number = bin_file(path).unwrap_or_default();
                fresh
                    .check_bin(path, &bytes)
                    .map_err(|e| MirrorError::Freshness {
                        location: source.location(path),
                        source: e,
                    })?;
                let bin = pb::FreshnessBin::decode(bytes.as_slice()).map_err(|e| {
                    inconsistent(source.location(path), format!("not a freshness bin: {e}"))
                })?;
                for f in bin.files {
                    let Some((niso, name)) = index_file(&f.path) else {
                        return Err(inconsistent(
                            source.location(path),
                            format!("lists {:?}, which is not a package index", cut(&f.path)),
                        ));
                    };
                    if render::bin_of(name.as_str()) != number {
                        return Err(inconsistent(
                            source.location(path),
                            format!("lists {}, which does not belong in it", f.path),
                        ));
                    }
                    let into = if niso {
                        &mut niso_digests
                    } else {
                        &mut hex_digests
                    };
                    into.insert(name.to_string(), f);
                }
                bins.push((path.to_string(), bytes));
            }
        }
    }
    for name in hex_digests.keys() {
        if !niso_digests.contains_key(name) {
            return Err(inconsistent(
                source.location(&format!("{}/{name}", layout::PACKAGES_DIR)),
                format!("listed, but {name} has no niso index"),
            ));
        }
    }

    // Every package index, checked against its bin, then decoded.
    let wanted: Vec<(&String, &pb::FileDigest, Option<&pb::FileDigest>)> = niso_digests
        .iter()
        .map(|(n, d)| (n, d, hex_digests.get(n)))
        .collect();
    let fetched = par_try(pool, &wanted, |(_, niso, hex)| {
        let n = cache.get(source, niso, limit)?;
        let h = match hex {
            Some(h) => Some(cache.get(source, h, limit)?),
            None => None,
        };
        Ok::<_, Fail>((n, h))
    })?;
    let decode = |path: &str, bytes: &[u8]| -> Result<pb::Package, Fail> {
        decode_index::<pb::Package>(bytes, &source.key, &source.repository, limit).map_err(|e| {
            Fail::Fatal(MirrorError::Freshness {
                location: source.location(path),
                source: FreshnessError::Index {
                    path: path.into(),
                    source: e,
                },
            })
        })
    };
    let decoded = par_try(
        pool,
        &wanted.iter().zip(fetched).collect::<Vec<_>>(),
        |((name, _, _), (niso, hex))| {
            let name = PackageName::new(name)
                .map_err(|e| inconsistent(source.location(layout::FRESHNESS), e.to_string()))?;
            let path = index_path(&name);
            let index = decode(&path, niso)?;
            if index.name != name.as_str() {
                return Err(inconsistent(
                    source.location(&path),
                    format!("names package {:?}", cut(&index.name)),
                ));
            }
            let hex_path = format!("{}/{name}", layout::PACKAGES_DIR);
            match (render::hex_view(&index), hex) {
                (Some(view), Some(bytes)) => {
                    if decode(&hex_path, bytes)? != view {
                        return Err(inconsistent(
                            source.location(&hex_path),
                            format!("is not Hex's view of {path}"),
                        ));
                    }
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(inconsistent(
                        source.location(&path),
                        format!("has Hex releases, but its bin does not list {hex_path}"),
                    ))
                }
                (None, Some(_)) => {
                    return Err(inconsistent(
                        source.location(&hex_path),
                        format!("listed, but {name} has no release with a Hex tarball"),
                    ))
                }
            }
            Ok(PackageSnap {
                name,
                niso: niso.clone(),
                hex: hex.clone(),
                index,
            })
        },
    )?;

    // `names` and `versions` are Hex's view of the package indexes.
    let hex_names: Vec<String> = decoded
        .iter()
        .filter(|p| p.hex.is_some())
        .map(|p| p.name.to_string())
        .collect();
    let hex_versions: Vec<pb::VersionsPackage> = decoded
        .iter()
        .filter_map(|p| render::hex_view(&p.index))
        .map(|v| render::versions_entry(&v))
        .collect();
    let n: pb::Names =
        decode_index(&names, &source.key, &source.repository, limit).map_err(|e| {
            MirrorError::Freshness {
                location: source.location(layout::NAMES),
                source: FreshnessError::Index {
                    path: layout::NAMES.into(),
                    source: e,
                },
            }
        })?;
    if n.packages.into_iter().map(|p| p.name).collect::<Vec<_>>() != hex_names {
        return Err(inconsistent(
            source.location(layout::NAMES),
            "does not list exactly the packages with Hex releases".into(),
        ));
    }
    let v: pb::Versions =
        decode_index(&versions, &source.key, &source.repository, limit).map_err(|e| {
            MirrorError::Freshness {
                location: source.location(layout::VERSIONS),
                source: FreshnessError::Index {
                    path: layout::VERSIONS.into(),
                    source: e,
                },
            }
        })?;
    if v.packages != hex_versions {
        return Err(inconsistent(
            source.location(layout::VERSIONS),
            "does not list the Hex releases of the package indexes".into(),
        ));
    }

    // The key file is not in the record: it must be the key everything was
    // verified with.
    let public_key = match fetch_patiently(source, layout::PUBLIC_KEY, 1 << 20) {
        Ok(b) => match PublicKey::from_pem(&b, layout::PUBLIC_KEY) {
            Ok(k) if k == source.key => Some(b),
            Ok(k) => {
                return Err(inconsistent(
                    source.location(layout::PUBLIC_KEY),
                    format!(
                        "is key sha256:{}, not the key the indexes are signed with (sha256:{})",
                        k.fingerprint(),
                        source.key.fingerprint()
                    ),
                ))
            }
            Err(e) => {
                return Err(inconsistent(
                    source.location(layout::PUBLIC_KEY),
                    e.to_string(),
                ))
            }
        },
        Err(TransportError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };

    Ok(Snapshot {
        generation: fresh.generation,
        expired: fresh.expired,
        freshness: record_bytes,
        names,
        versions,
        public_key,
        publisher_keys,
        bins,
        packages: decoded,
    })
}

/// At most 100 bytes of text the source chose, for messages.
fn cut(s: &str) -> String {
    if s.len() <= 100 {
        return s.to_string();
    }
    let mut end = 100;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Walks the source until one walk, and `then` on its result, both finish
/// without the source having moved on under them.
fn settle<T>(
    source: &Source,
    cache: &Cache,
    pool: &rayon::ThreadPool,
    limits: &Limits,
    restarts: &mut usize,
    mut then: impl FnMut(&Snapshot) -> Result<T, Fail>,
) -> Result<(Snapshot, T), MirrorError> {
    loop {
        let attempt = take_snapshot(source, cache, pool, limits).and_then(|s| {
            let t = then(&s)?;
            Ok((s, t))
        });
        match attempt {
            Ok(done) => return Ok(done),
            Err(Fail::Fatal(e)) => return Err(e),
            Err(Fail::Moved(path)) => {
                *restarts += 1;
                if *restarts > MAX_RESTARTS {
                    return Err(MirrorError::Unsettled {
                        restarts: *restarts - 1,
                        path,
                    });
                }
                tracing::info!("{path} changed while it was read; reading the source again");
                // Time for a commit in progress to land its record (a
                // few milliseconds); at random, so as not to fall into step
                // with a source committing at a steady pace.
                let pause = 10 + rand::random::<u64>() % 40;
                std::thread::sleep(Duration::from_millis(pause));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Archives.

struct Hashing<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Downloads an artifact into `out` (empty, at its start), checking size
/// and SHA-256 as it streams and then its contents with the archive reader.
/// A digest that does not match is read once more (a cache in front of the
/// source may have served a broken copy) before it is refused.
fn download(source: &Source, w: &Wanted, out: &mut File, limits: &Limits) -> Result<u64, Fail> {
    let location = source.location(&w.path);
    let artifact = w.as_artifact();
    let mut tries = 0;
    let mut waited = Duration::ZERO;
    loop {
        tries += 1;
        out.set_len(0)
            .map_err(io_err("truncate", Path::new(&location)))?;
        out.rewind()
            .map_err(io_err("rewind", Path::new(&location)))?;
        let (n, digest) = {
            // Sized to the archive (a large buffer costs an mmap each time).
            let capacity = usize::try_from(w.size.clamp(8 << 10, 256 << 10)).unwrap_or(8 << 10);
            let mut hashing = Hashing {
                inner: io::BufWriter::with_capacity(capacity, &mut *out),
                hasher: Sha256::new(),
            };
            let n = match source.transport.fetch_to(&w.path, &mut hashing, w.size) {
                Ok(n) => n,
                // Deleted at the source after the record was read.
                Err(TransportError::NotFound { .. }) => return Err(Fail::Moved(w.path.clone())),
                Err(TransportError::TooLarge { .. }) => {
                    return Err(ReadError::ArchiveTooLarge {
                        path: location,
                        expected: w.size,
                    }
                    .into())
                }
                Err(TransportError::Busy {
                    location,
                    retry_after,
                    ..
                }) if busy_pause(&mut waited, retry_after, &location) => {
                    tries -= 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            hashing
                .inner
                .flush()
                .map_err(io_err("write", Path::new(&location)))?;
            (n, hashing.hasher.finalize())
        };
        match check_artifact_bytes(&location, &artifact, n, digest.as_slice()) {
            Ok(()) => break,
            Err(_) if tries < 2 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    out.rewind().map_err(io_err("read", Path::new(&location)))?;
    let info =
        archive::inspect(BufReader::with_capacity(16 << 10, &mut *out), limits).map_err(|e| {
            ReadError::ArchiveContent {
                path: location.clone(),
                reason: format!("not a valid archive: {e}"),
            }
        })?;
    let inner_ok = info.kind != ArchiveKind::Hex || info.inner_checksum == w.inner_checksum;
    if info.name != w.name
        || info.version != w.version
        || info.arch != w.arch
        || (info.kind == ArchiveKind::Hex) != w.hex
        || !inner_ok
    {
        return Err(ReadError::ArchiveContent {
            path: location,
            reason: format!(
                "it holds {} {} ({}){}, the signed index says {}",
                info.name,
                info.version,
                info.arch,
                if inner_ok {
                    ""
                } else {
                    " with another inner checksum"
                },
                w.what()
            ),
        }
        .into());
    }
    Ok(w.size)
}

/// Whether `path` holds exactly the bytes the signed index names.
fn have_archive(path: &Path, w: &Wanted) -> Result<bool, MirrorError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("read", path))?;
    if !meta.is_file() || meta.len() != w.size {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(io_err("read", path))?;
    Ok(hasher.finalize().as_slice() == w.sha256.as_slice())
}

// ---------------------------------------------------------------------------
// Into a directory.

/// Top-level entries of a repository's tree.
const TREE_ENTRIES: [&str; 11] = [
    layout::NAMES,
    layout::VERSIONS,
    layout::FRESHNESS,
    layout::PUBLIC_KEY,
    layout::FRESHNESS_BINS_DIR,
    layout::PACKAGES_DIR,
    "niso",
    layout::TARBALLS_DIR,
    layout::ARCHIVES_DIR,
    "v1",
    layout::REPOS_DIR,
];

/// The directories whose every file follows from the indexes: what the
/// mirror may remove when the source no longer has it.
const DERIVED_DIRS: [&str; 6] = [
    "v1",
    layout::PACKAGES_DIR,
    "niso",
    layout::FRESHNESS_BINS_DIR,
    layout::TARBALLS_DIR,
    layout::ARCHIVES_DIR,
];

/// A local directory receiving a verbatim copy of one repository (the
/// root one at `DIR/`, an organization's at `DIR/repos/ORG/`).
pub struct DirTarget {
    root: PathBuf,
    /// The directory to `syncfs`: the mirror's top, which exists.
    top: PathBuf,
    /// Whether this is the root repository (its `repos/` is not its own).
    is_root: bool,
    temp: AtomicU64,
    stamp: AtomicU64,
    /// syncfs calls and the time they took (for the debug log).
    syncs: AtomicU64,
    sync_ns: AtomicU64,
}

fn elapsed_ns(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl DirTarget {
    /// The repository at `top` (`org` None) or at `top/repos/ORG`.
    pub fn new(top: &Path, org: Option<&RepoName>) -> Self {
        let root = match org {
            Some(o) => top.join(layout::REPOS_DIR).join(o.as_str()),
            None => top.to_path_buf(),
        };
        Self {
            root,
            top: top.to_path_buf(),
            is_root: org.is_none(),
            temp: AtomicU64::new(0),
            stamp: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_ns: AtomicU64::new(0),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuses a directory that is not this repository's mirror (another
    /// repository's, a data directory, unrelated files), and returns the
    /// generation it holds, if any.
    fn check(&self, source: &Source) -> Result<Option<u64>, MirrorError> {
        let refuse = |reason: String| MirrorError::Destination {
            path: self.root.display().to_string(),
            reason,
        };
        if !self.root.exists() {
            return Ok(None);
        }
        if !self.root.is_dir() {
            return Err(refuse("not a directory".into()));
        }
        if self.top.join(crate::datadir::CONFIG_FILE).exists() {
            return Err(MirrorError::Destination {
                path: self.top.display().to_string(),
                reason: "is a registry data directory, which signs its own tree: mirror into a plain directory, or into that registry through its API (add it with `niso registry add` and give its name)".into(),
            });
        }
        let path = self.root.join(layout::FRESHNESS);
        match fs::read(&path) {
            Ok(bytes) => {
                let record: pb::Freshness =
                    decode_index(&bytes, &source.key, &source.repository, 256 << 20).map_err(
                        |e| refuse(format!(
                            "holds a tree whose freshness record does not verify with the source's key and name ({e}): it is not a mirror of this repository; choose another directory"
                        )),
                    )?;
                Ok(Some(record.generation))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A mirror killed before its first record: only tree
                // entries and temp files. Anything else is someone's files.
                let entries = fs::read_dir(&self.root).map_err(io_err("read", &self.root))?;
                for entry in entries {
                    let entry = entry.map_err(io_err("read", &self.root))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !name.starts_with('.') && !TREE_ENTRIES.contains(&name.as_str()) {
                        return Err(refuse(format!(
                            "is not empty and holds no registry tree (it has {}): mirror into an empty directory, or into an earlier mirror of this repository",
                            cut(&name)
                        )));
                    }
                }
                Ok(None)
            }
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    fn full(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// A modification time later than any given before and than `old`'s.
    fn next_stamp(&self, old: Option<SystemTime>) -> SystemTime {
        let nanos = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        let now = nanos(SystemTime::now());
        let old = old.map_or(0, |t| nanos(t).saturating_add(1));
        let mut last = self.stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(old).max(last + 1);
            match self
                .stamp
                .compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return UNIX_EPOCH + Duration::from_nanos(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// A name for a temp file beside `full`, its directory made (named as
    /// the store names its own, so a later run or `serve` cleans it up and
    /// never serves it; unique to this process).
    fn temp_name(&self, full: &Path) -> Result<PathBuf, MirrorError> {
        let dir = full
            .parent()
            .ok_or_else(|| io_err("write", full)(io::Error::other("no parent directory")))?;
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = self.temp.fetch_add(1, Ordering::Relaxed);
        Ok(dir.join(format!(".tmp-{}-m{n}-{name}", std::process::id())))
    }

    /// A new temp file beside `full`.
    fn temp_beside(&self, full: &Path) -> Result<(PathBuf, File), MirrorError> {
        let tmp = self.temp_name(full)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok((tmp, file))
    }

    fn sync(&self) -> Result<(), MirrorError> {
        let t = std::time::Instant::now();
        let r = sync_file_system(&self.top);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_ns.fetch_add(elapsed_ns(t), Ordering::Relaxed);
        r
    }

    /// Fetches one archive into place, unless it is there already.
    /// Returns the bytes fetched (0 when kept).
    fn archive(&self, source: &Source, w: &Wanted, limits: &Limits) -> Result<Option<u64>, Fail> {
        let full = self.full(&w.path);
        if have_archive(&full, w)? {
            return Ok(None);
        }
        let (tmp, mut file) = self.temp_beside(&full)?;
        let guard = TempGuard(Some(tmp.clone()));
        let n = download(source, w, &mut file, limits)?;
        let old = fs::metadata(&full).ok().and_then(|m| m.modified().ok());
        file.set_times(fs::FileTimes::new().set_modified(self.next_stamp(old)))
            .map_err(io_err("stamp", &tmp))?;
        drop(file);
        // Visible at once, and kept if this run dies: no index of the
        // mirror names it yet, and the next run checks it by its digest.
        // The stage's syncfs makes it durable before any index names it.
        fs::rename(&tmp, &full).map_err(io_err("rename into", &full))?;
        guard.keep();
        Ok(Some(n))
    }

    /// Makes each `to` a hard link of `from` (a copy where links fail),
    /// skipping those that already are; returns how many changed. Not
    /// synced: the next [`Self::stages`] syncs them with its temp files.
    fn links(
        &self,
        pool: &rayon::ThreadPool,
        links: &[(String, String)],
    ) -> Result<usize, MirrorError> {
        let changed = par_try(pool, links, |(from, to)| {
            let (src, dst) = (self.full(from), self.full(to));
            if same_file(&src, &dst) {
                return Ok(false);
            }
            let tmp = self.temp_name(&dst)?;
            let guard = TempGuard(Some(tmp.clone()));
            if fs::hard_link(&src, &tmp).is_err() {
                fs::copy(&src, &tmp).map_err(io_err("copy to", &tmp))?;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&tmp)
                    .map_err(io_err("open", &tmp))?;
                let old = fs::metadata(&dst).ok().and_then(|m| m.modified().ok());
                f.set_times(fs::FileTimes::new().set_modified(self.next_stamp(old)))
                    .map_err(io_err("stamp", &tmp))?;
            }
            fs::rename(&tmp, &dst).map_err(io_err("rename into", &dst))?;
            guard.keep();
            Ok::<_, MirrorError>(true)
        })?;
        Ok(changed.into_iter().filter(|c| *c).count())
    }

    /// Writes the files whose bytes differ from what is there, stage after
    /// stage: every temp file of every stage first, one sync (which also
    /// makes the links before it durable), then each stage's renames
    /// followed by a sync, so no stage is visible before the one it needs.
    /// Returns how many files changed.
    fn stages(
        &self,
        pool: &rayon::ThreadPool,
        stages: &[&[(String, Vec<u8>)]],
        pending: bool,
    ) -> Result<usize, MirrorError> {
        let mut temps: Vec<Vec<(TempGuard, PathBuf)>> = Vec::new();
        for files in stages {
            let written = par_try(pool, files, |(rel, bytes)| {
                let full = self.full(rel);
                let old = match fs::read(&full) {
                    Ok(b) if b == *bytes => return Ok(None),
                    Ok(_) => fs::metadata(&full).ok().and_then(|m| m.modified().ok()),
                    Err(_) => None,
                };
                let (tmp, mut file) = self.temp_beside(&full)?;
                let guard = TempGuard(Some(tmp.clone()));
                file.write_all(bytes).map_err(io_err("write", &tmp))?;
                file.set_times(fs::FileTimes::new().set_modified(self.next_stamp(old)))
                    .map_err(io_err("stamp", &tmp))?;
                Ok::<_, MirrorError>(Some((guard, full)))
            })?;
            temps.push(written.into_iter().flatten().collect());
        }
        let n: usize = temps.iter().map(Vec::len).sum();
        if n == 0 && !pending {
            return Ok(0);
        }
        self.sync()?;
        for stage in temps.into_iter().filter(|s| !s.is_empty()) {
            for (guard, full) in stage {
                fs::rename(guard.path(), &full).map_err(io_err("rename into", &full))?;
                guard.keep();
            }
            self.sync()?;
        }
        Ok(n)
    }

    /// Removes the files under the derived directories that `keep` does
    /// not hold, and the directories that leaves empty.
    fn remove_stale(&self, keep: &BTreeSet<String>) -> Result<usize, MirrorError> {
        if !self.root.is_dir() {
            return Ok(0);
        }
        let mut removed = 0;
        let mut dirs = BTreeSet::new();
        let is_root = self.is_root;
        let walk = walkdir::WalkDir::new(&self.root)
            .into_iter()
            .filter_entry(|e| {
                let name = e.file_name().to_string_lossy();
                e.depth() == 0
                    || !(name.starts_with('.')
                        || (e.depth() == 1 && (is_root && name == layout::REPOS_DIR)))
            });
        for entry in walk {
            let entry = entry.map_err(|e| MirrorError::Io {
                action: "list",
                path: self.root.display().to_string(),
                source: e.into(),
            })?;
            if entry.file_type().is_dir() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&self.root) else {
                continue;
            };
            let rel = rel.to_string_lossy().replace('\\', "/");
            let first = rel.split('/').next().unwrap_or_default();
            if DERIVED_DIRS.contains(&first) && !keep.contains(&rel) {
                fs::remove_file(entry.path()).map_err(io_err("remove", entry.path()))?;
                removed += 1;
                if let Some(p) = entry.path().parent() {
                    dirs.insert(p.to_path_buf());
                }
            }
        }
        // Deepest first: a directory emptied by its children's removal goes too.
        for dir in dirs.iter().rev() {
            let mut d = dir.clone();
            while d != self.root && d.starts_with(&self.root) && fs::remove_dir(&d).is_ok() {
                match d.parent() {
                    Some(p) => d = p.to_path_buf(),
                    None => break,
                }
            }
        }
        if removed > 0 {
            self.sync()?;
        }
        Ok(removed)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Makes everything written to the file system holding `dir` durable: one
/// `syncfs(2)` for a whole stage instead of an fsync per file. (It also
/// writes back other programs' pending data on that file system.)
fn sync_file_system(dir: &Path) -> Result<(), MirrorError> {
    let d = File::open(dir).map_err(io_err("open", dir))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs only uses the descriptor, which `d` keeps open.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io_err("sync", dir)(io::Error::last_os_error()));
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = d;
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
    }
    Ok(())
}

/// A temp file removed on drop unless kept (renamed into place).
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Removes temp files of mirrors (and publishers) that no longer run.
fn clean_leftovers(top: &Path) -> Result<usize, MirrorError> {
    if !top.is_dir() {
        return Ok(0);
    }
    let store = crate::store::LocalStore::new(top);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(io_err("start a runtime for", top))?;
    rt.block_on(crate::store::Store::clean_leftovers(&store))
        .map_err(|e| MirrorError::Destination {
            path: top.display().to_string(),
            reason: format!("cannot remove the temp files of an earlier run: {e}"),
        })
}

/// Mirrors `source` into a directory, verbatim.
pub fn mirror_to_dir(
    source: &Source,
    target: &DirTarget,
    options: &Options,
    progress: &dyn Progress,
) -> Result<Summary, MirrorError> {
    let started = std::time::Instant::now();
    let have = target.check(source)?;
    // Nothing there before: nothing to remove after (unless the source
    // moved on under this run, which may leave archives no index names).
    let was_empty = fs::read_dir(&target.root).map_or(true, |mut d| d.next().is_none());
    clean_leftovers(&target.top)?;
    let pool = pool(options.jobs)?;
    let cache = Cache::default();
    let mut summary = Summary {
        repository: source.repository.clone(),
        ..Default::default()
    };
    // Downloads of this run, by path (a restart may download more).
    let fetched: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let bytes = AtomicU64::new(0);
    let mut restarts = 0;
    let mut archives_from = Duration::ZERO;
    let (snap, wanted) = settle(
        source,
        &cache,
        &pool,
        &options.limits,
        &mut restarts,
        |snap| {
            if let Some(have) = have {
                if have > snap.generation {
                    return Err(Fail::Fatal(MirrorError::Rollback {
                        path: target.full(layout::FRESHNESS).display().to_string(),
                        have,
                        found: snap.generation,
                    }));
                }
            }
            let wanted = snap.wanted(|p| source.location(p))?;
            archives_from = started.elapsed();
            // Which are missing is known only once each present one is
            // hashed: report them all, and count the kept ones.
            let total: u64 = wanted.iter().map(|w| w.size).sum();
            progress.fetching(&source.repository, wanted.len() as u64, total);
            par_try(&pool, &wanted, |w| {
                let r = target.archive(source, w, &options.limits)?;
                progress.fetched(w.size);
                if let Some(n) = r {
                    fetched
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(w.path.clone());
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                Ok::<_, Fail>(())
            })?;
            Ok(wanted)
        },
    )?;
    progress.finishing();
    // Every archive durable before any index of the mirror names it.
    if !fetched.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        target.sync()?;
    }

    let mut keep: BTreeSet<String> = wanted.iter().map(|w| w.path.clone()).collect();
    let mut links = Vec::new();
    let mut docs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut summaries = Vec::new();
    for p in &snap.packages {
        docs.push((index_path(&p.name), p.niso.clone()));
        if let Some(h) = &p.hex {
            docs.push((format!("{}/{}", layout::PACKAGES_DIR, p.name), h.clone()));
        }
        if !p.index.releases.is_empty() {
            summaries.push(render::summary(&p.index));
        }
        let files =
            render::v1_files(&Layout::root(), &p.index).map_err(|e| MirrorError::Inconsistent {
                location: source.location(&index_path(&p.name)),
                reason: e.to_string(),
            })?;
        for f in files {
            match f.content {
                Content::Bytes(b) => docs.push((f.path.to_string(), b)),
                Content::Copy(from) => links.push((from.to_string(), f.path.to_string())),
            }
        }
    }
    if let Some(k) = &snap.public_key {
        docs.push((layout::PUBLIC_KEY.into(), k.clone()));
    }
    let v1_index = json::to_bytes(&json::PackageList {
        packages: summaries,
    });
    let mut globals: Vec<(String, Vec<u8>)> = vec![
        (layout::NAMES.into(), snap.names.clone()),
        (layout::VERSIONS.into(), snap.versions.clone()),
        (layout::V1_INDEX.into(), v1_index),
    ];
    if let Some(k) = &snap.publisher_keys {
        globals.push((layout::PUBLISHER_KEYS.into(), k.clone()));
    }
    let last = vec![(layout::FRESHNESS.to_string(), snap.freshness.clone())];
    keep.extend(links.iter().map(|(_, to)| to.clone()));
    for stage in [&docs, &globals, &snap.bins, &last] {
        keep.extend(stage.iter().map(|(p, _)| p.clone()));
    }

    let fetched_at = started.elapsed();
    let linked = target.links(&pool, &links)?;
    let linked_at = started.elapsed();
    let written =
        linked + target.stages(&pool, &[&docs, &globals, &snap.bins, &last], linked > 0)?;
    let written_at = started.elapsed();
    if !(was_empty && restarts == 0) {
        summary.files_removed = target.remove_stale(&keep)?;
    }
    tracing::debug!(
        "mirror of {}: indexes {} ms, archives {} ms, links {} ms, indexes and documents {} ms, removals {} ms; {} syncfs took {} ms",
        source.repository,
        archives_from.as_millis(),
        (fetched_at - archives_from).as_millis(),
        (linked_at - fetched_at).as_millis(),
        (written_at - linked_at).as_millis(),
        (started.elapsed() - written_at).as_millis(),
        target.syncs.load(Ordering::Relaxed),
        target.sync_ns.load(Ordering::Relaxed) / 1_000_000
    );

    summary.generation = snap.generation;
    summary.expired = snap.expired;
    summary.packages = snap
        .packages
        .iter()
        .filter(|p| !p.index.releases.is_empty())
        .count();
    summary.releases = snap.releases();
    summary.archives = wanted.len();
    let fetched = fetched.into_inner().unwrap_or_else(|e| e.into_inner());
    summary.kept = wanted.iter().filter(|w| !fetched.contains(&w.path)).count();
    summary.fetched = fetched.len();
    summary.bytes = bytes.into_inner();
    summary.files_written = written;
    summary.restarts = restarts;
    summary.index_fetches = cache.fetches.into_inner();
    Ok(summary)
}

// ---------------------------------------------------------------------------
// Into a registry.

/// A registry receiving the releases through its write API.
pub struct RegistryTarget<'a> {
    /// Reads the destination's own signed indexes (its pinned key).
    pub session: &'a Session,
    pub api: &'a ApiClient,
    pub org: Option<&'a RepoName>,
}

/// Mirrors `source`'s releases and tags into a registry. What cannot be
/// mirrored (another archive already published under a version, a
/// publisher signature the destination refuses) is reported in
/// [`Summary::problems`] and the rest goes on.
pub fn mirror_to_registry(
    source: &Source,
    target: &RegistryTarget<'_>,
    options: &Options,
    progress: &dyn Progress,
) -> Result<Summary, MirrorError> {
    let pool = pool(options.jobs)?;
    let cache = Cache::default();
    let mut restarts = 0;
    let (snap, wanted) = settle(
        source,
        &cache,
        &pool,
        &options.limits,
        &mut restarts,
        |snap| Ok(snap.wanted(|p| source.location(p))?),
    )?;

    // What the destination has, from its own signed indexes.
    let dest_fresh = match target.session.fresh() {
        Ok(f) => Some(f),
        // The first mirror into an organization creates its repository.
        Err(SessionError::Read(ReadError::NoOrganization { .. })) => None,
        Err(e) => return Err(e.into()),
    };
    let published = par_try(&pool, &snap.packages, |p| {
        let Some(f) = &dest_fresh else {
            return Ok(None);
        };
        let mut waited = Duration::ZERO;
        loop {
            match target.session.reader.package(f, &p.name) {
                Err(ReadError::Transport(TransportError::Busy {
                    location,
                    retry_after,
                    ..
                })) if busy_pause(&mut waited, retry_after, &location) => {}
                r => return r.map_err(|e| MirrorError::DestinationRead(e.into())),
            }
        }
    })?;

    let mut summary = Summary {
        repository: source.repository.clone(),
        generation: snap.generation,
        expired: snap.expired,
        packages: snap
            .packages
            .iter()
            .filter(|p| !p.index.releases.is_empty())
            .count(),
        releases: snap.releases(),
        archives: wanted.len(),
        restarts,
        index_fetches: cache.fetches.load(Ordering::Relaxed),
        ..Default::default()
    };
    // (package, version) present at the destination once this is done.
    let mut present: BTreeSet<(usize, String)> = BTreeSet::new();
    let mut todo = Vec::new();
    for w in &wanted {
        let there = published[w.package]
            .iter()
            .flat_map(|p| p.releases.iter())
            .filter(|r| r.version == w.version.as_str())
            .flat_map(|r| r.artifacts.iter())
            .find(|a| a.arch == w.arch.as_str());
        match there {
            None => todo.push(w),
            Some(a) if a.sha256 == w.sha256 => {
                summary.kept += 1;
                present.insert((w.package, w.version.to_string()));
            }
            Some(a) => summary.problems.push(format!(
                "{}: the destination already publishes other bytes under this version (SHA-256 {}, the source's is {}); published versions never change, so it was left as it is",
                w.what(),
                hex::encode(&a.sha256),
                hex::encode(&w.sha256)
            )),
        }
    }

    let total: u64 = todo.iter().map(|w| w.size).sum();
    progress.fetching(&source.repository, todo.len() as u64, total);
    let pusher = Pusher {
        session: target.session,
        api: target.api,
        org: target.org,
    };
    let results: Vec<Result<u64, String>> = pool.install(|| {
        todo.par_iter()
            .map(|w| {
                let r = upload_one(source, &pusher, w, options);
                progress.fetched(w.size);
                r
            })
            .collect()
    });
    progress.finishing();
    for (w, r) in todo.iter().zip(results) {
        match r {
            Ok(n) => {
                summary.fetched += 1;
                summary.bytes += n;
                present.insert((w.package, w.version.to_string()));
            }
            Err(problem) => summary.problems.push(problem),
        }
    }

    // Tags the destination lacks (or points elsewhere), for versions it has.
    for (i, p) in snap.packages.iter().enumerate() {
        for t in &p.index.tags {
            let same = published[i]
                .iter()
                .flat_map(|d| d.tags.iter())
                .any(|d| d.tag == t.tag && d.version == t.version);
            if same {
                continue;
            }
            let what = format!("tag {} of {} ({})", t.tag, p.name, t.version);
            if !present.contains(&(i, t.version.clone())) {
                summary
                    .problems
                    .push(format!("{what}: not set, the version was not mirrored"));
                continue;
            }
            let (Ok(tag), Ok(version)) = (TagName::new(&t.tag), Version::new(&t.version)) else {
                summary
                    .problems
                    .push(format!("{what}: not a valid tag and version"));
                continue;
            };
            match target
                .api
                .call::<api::TagSet>(&api::set_tag(target.org, &p.name, &tag, &version))
            {
                Ok(_) => summary.tags_set += 1,
                Err(e) => summary.problems.push(format!("{what}: {e}")),
            }
        }
    }
    Ok(summary)
}

/// Downloads one archive from the source, verified, and uploads it.
fn upload_one(
    source: &Source,
    pusher: &Pusher<'_>,
    w: &Wanted,
    options: &Options,
) -> Result<u64, String> {
    let what = w.what();
    let mut file =
        tempfile::tempfile().map_err(|e| format!("{what}: cannot make a temp file: {e}"))?;
    let n = match download(source, w, &mut file, &options.limits) {
        Ok(n) => n,
        Err(Fail::Moved(_)) => {
            return Err(format!(
                "{what}: deleted at the source while the mirror ran; not mirrored"
            ))
        }
        Err(Fail::Fatal(e)) => return Err(format!("{what}: {e}")),
    };
    let info = file
        .rewind()
        .map_err(|e| e.to_string())
        .and_then(|()| {
            archive::inspect(BufReader::new(&mut file), &options.limits).map_err(|e| e.to_string())
        })
        .and_then(|info| file.rewind().map(|()| info).map_err(|e| e.to_string()))
        .map_err(|e| format!("{what}: {e}"))?;
    let prepared = Prepared::from_verified(file, info);
    let signature = match (&w.publisher_signature, options.strip_signatures) {
        (Some(s), false) => Some(base64::engine::general_purpose::STANDARD.encode(s)),
        _ => None,
    };
    match pusher.send(&prepared, signature.as_deref(), None) {
        Ok(_) => Ok(n),
        Err(PushError::Api {
            source: ApiError::BadRequest { message },
            ..
        }) if signature.is_some() && message.contains("X-Niso-Signature") => Err(format!(
            "{what}: the destination refused the publisher signature it carries ({message}). It was signed at the source by publisher key {}: an admin of the destination registers that public key for the API key you mirror with (POST /v1/auth/keys/ID/publisher-key), or pass --strip-signatures to publish it there unsigned",
            w.publisher_key_id.as_deref().unwrap_or("(unnamed)")
        )),
        Err(PushError::Api {
            source: ApiError::BadRequest { message },
            ..
        }) if signature.is_none() && message.contains("publisher key") => Err(format!(
            "{what}: {message}; the archive is unsigned{}: mirror with an API key that has no publisher key",
            if w.publisher_signature.is_some() { " (--strip-signatures)" } else { " at the source" }
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_index_paths_of_valid_names_are_fetched() {
        assert!(matches!(
            index_file("niso/packages/my-app"),
            Some((true, _))
        ));
        assert!(matches!(index_file("packages/my_app"), Some((false, _))));
        for bad in [
            "packages/../names",
            "packages/a/b",
            "niso/packages/",
            "packages/My",
            "tarballs/x",
            "../packages/x",
        ] {
            assert!(index_file(bad).is_none(), "{bad}");
        }
        assert_eq!(bin_file("freshness-bins/0a"), Some(10));
        for bad in [
            "freshness-bins/a",
            "freshness-bins/0A",
            "freshness-bins/100",
            "x/0a",
        ] {
            assert!(bin_file(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn rewritten_files_always_get_a_later_time() {
        let t = DirTarget::new(Path::new("/nonexistent"), None);
        let future = SystemTime::now() + Duration::from_secs(3600);
        let a = t.next_stamp(Some(future));
        assert!(a > future);
        let b = t.next_stamp(None);
        assert!(b > a);
    }
}
