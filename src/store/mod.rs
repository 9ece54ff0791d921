//! Where the served tree lives: objects, not files.
//!
//! The publisher, `build`, `verify`, search and the server's reads all go
//! through [`Store`], which has three implementations:
//!
//! * [`LocalStore`]: a local directory. Every put is a temp file, fsync,
//!   rename, fsync of the directory; conditional puts compare the file's
//!   version under a lock file, so several processes (`serve` and `build`)
//!   can write one tree.
//! * [`ObjectBackend`] over the `object_store` crate: S3 (or any
//!   S3-compatible server) and, for tests, object_store's in-memory store.
//!   Each put is atomic per object; create-only and conditional puts are S3's
//!   `If-None-Match: *` and `If-Match: ETAG`.
//!
//! The contract has no hard links and no directories: a second path holding
//! the same bytes is a [`Store::copy`] (a hard link on a local disk, a server
//! side copy on S3), and a prefix is just the start of a path. Objects carry
//! [`Attributes`] (`Content-Type`, `Cache-Control`, `Content-Disposition`) so
//! a bucket read anonymously answers like `niso registry serve`. Paths are
//! [`TreePath`]s, checked once so no write can leave the tree.

mod local;
mod object;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::stream::BoxStream;

pub(crate) use local::is_alive;
pub use local::LocalStore;
pub use object::ObjectBackend;

/// A checked path inside the tree: relative, `/`-separated, each component
/// made of ASCII letters, digits, `.`, `_` and `-`, never `.` or `..` and never
/// starting with `.` (temp files start with `.`, and are never served).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreePath(String);

impl TreePath {
    pub fn new(path: impl Into<String>) -> Result<Self, StoreError> {
        let path = path.into();
        let ok = !path.is_empty()
            && path.len() <= 1024
            && path.split('/').all(|c| {
                !c.is_empty()
                    && !c.starts_with('.')
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if ok {
            Ok(Self(path))
        } else {
            Err(StoreError::BadPath { path: cut(&path) })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path with `prefix/` in front (for organization repositories).
    pub fn under(&self, prefix: &str) -> Result<Self, StoreError> {
        if prefix.is_empty() {
            Ok(self.clone())
        } else {
            Self::new(format!("{prefix}/{}", self.0))
        }
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

/// At most 200 bytes of a path someone else chose, for messages.
fn cut(s: &str) -> String {
    if s.len() <= 200 {
        return s.to_string();
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl std::fmt::Display for TreePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a static host sends with an object. The publisher chooses them
/// (see `index::layout::attributes`); an object store keeps them with the
/// object, a local directory derives them from the path again when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub content_type: String,
    pub cache_control: String,
    pub content_disposition: Option<String>,
}

/// An opaque version of one object: an S3 ETag, or a local file's inode,
/// modification time and size. Equal versions mean equal bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion(pub String);

impl ObjectVersion {
    /// As an HTTP `ETag` value (quoted).
    pub fn etag(&self) -> String {
        if self.0.starts_with('"') || self.0.starts_with("W/\"") {
            self.0.clone()
        } else {
            format!("\"{}\"", self.0)
        }
    }
}

/// What a put may replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Whatever is there.
    Overwrite,
    /// Nothing: fails with [`StoreError::AlreadyExists`] if the path exists
    /// (archives, which never change once written).
    Create,
    /// Exactly this version, the one the writer last read: fails with
    /// [`StoreError::Precondition`] if another writer changed (or removed)
    /// the object since.
    Update(ObjectVersion),
}

impl PutMode {
    /// `Update` of `last` when the writer saw an object, `Create` when it saw
    /// none.
    pub fn after(last: Option<&ObjectVersion>) -> Self {
        match last {
            Some(v) => PutMode::Update(v.clone()),
            None => PutMode::Create,
        }
    }
}

/// What a put writes.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Bytes),
    /// A local file (an upload staged on disk), streamed or linked, never
    /// read whole into memory by a local store.
    File(PathBuf),
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Body::Bytes(Bytes::from(v))
    }
}

/// An object's metadata.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub size: u64,
    pub version: ObjectVersion,
    pub last_modified: Option<SystemTime>,
    pub attributes: Option<Attributes>,
}

/// An object read whole.
#[derive(Debug, Clone)]
pub struct Object {
    pub meta: ObjectMeta,
    pub bytes: Bytes,
}

pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("refusing to use path {path:?}: not a plain relative path inside the tree")]
    BadPath { path: String },
    #[error("{path} already exists")]
    AlreadyExists { path: String },
    #[error("{path} was changed by another writer")]
    Precondition { path: String },
    #[error("{path} does not exist")]
    NotFound { path: String },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// `error` is shown summarised (S3's XML error document cut down), and
    /// is not a `source`: the whole of it would follow in the chain.
    #[error("failed to {action} {path}: {}", object::summary(error))]
    Remote {
        action: &'static str,
        path: String,
        error: Box<object_store::Error>,
    },
    #[error("{0}")]
    Config(String),
    /// A failure injected by a test store.
    #[error("injected failure: {0}")]
    Injected(String),
}

impl StoreError {
    pub fn is_precondition(&self) -> bool {
        matches!(self, StoreError::Precondition { .. })
    }
}

/// A place that holds the served tree: a set of objects by path.
///
/// Every put is atomic (readers see the old object or the new one) and
/// durable when it returns. Ordering across objects is the caller's: the
/// publisher writes archives before the indexes that name them.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where the tree is, for messages (`/var/lib/niso/public`,
    /// `s3://bucket/prefix`).
    fn describe(&self) -> String;

    /// The object at `path`, read whole, or `None`.
    async fn get(&self, path: &TreePath) -> Result<Option<Object>, StoreError>;

    /// The object at `path` as a stream of chunks, or `None` (archives).
    async fn get_stream(
        &self,
        path: &TreePath,
    ) -> Result<Option<(ObjectMeta, ByteStream)>, StoreError>;

    /// The object's metadata, or `None`.
    async fn head(&self, path: &TreePath) -> Result<Option<ObjectMeta>, StoreError>;

    /// Writes `body` at `path` as `mode` allows; returns the new version.
    async fn put(
        &self,
        path: &TreePath,
        body: Body,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError>;

    /// Makes `to` hold the bytes of `from` (which must exist), as `mode`
    /// allows. A hard link on a local disk, a server-side copy (or a get and
    /// a put, when the attributes differ) on an object store.
    async fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError>;

    /// Every object whose path starts with `prefix/` (or every object, for
    /// `""`), sorted. Temp files are never listed.
    async fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError>;

    /// [`Store::list`] with each object's version, in one listing where the
    /// store gives versions with it (S3 does).
    async fn list_versions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(TreePath, ObjectVersion)>, StoreError>;

    /// Removes `path`; a missing object is not an error.
    async fn delete(&self, path: &TreePath) -> Result<(), StoreError>;

    /// Removes what writers that no longer run left behind (temp files of a
    /// process killed mid-write); returns how many. Object stores have no
    /// such leftovers: a put is one request.
    async fn clean_leftovers(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// The local directory holding the tree, when there is one (rsync and
    /// `serve --read-only` of a plain directory).
    fn local_root(&self) -> Option<&Path> {
        None
    }
}

/// Reads a whole object into memory; `None` if it does not exist.
pub async fn get_bytes(store: &dyn Store, path: &TreePath) -> Result<Option<Bytes>, StoreError> {
    Ok(store.get(path).await?.map(|o| o.bytes))
}

/// Opens the store a `--store` URL names: a directory path (or `file://`),
/// `s3://BUCKET/PREFIX` (settings from the standard `AWS_*` environment
/// variables), or `memory://` (tests).
pub fn open(url: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        return Ok(std::sync::Arc::new(ObjectBackend::s3_from_env(rest)?));
    }
    if url == "memory://" {
        return Ok(std::sync::Arc::new(ObjectBackend::memory()));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.contains("://") {
        return Err(StoreError::Config(format!(
            "unsupported store {url:?}: use a directory, s3://BUCKET/PREFIX or memory://"
        )));
    }
    Ok(std::sync::Arc::new(LocalStore::new(path)))
}
