//! Where the served tree lives.
//!
//! The publisher never touches files directly: it stages [`Op`]s and hands
//! them to a [`Store`] in ordered stages. A local directory
//! ([`LocalStore`]) is the only back end today; an object store (S3) is the
//! next, behind the same trait. Paths are [`TreePath`]s, checked once so no
//! write can leave the tree.

mod durable;
mod local;

pub(crate) use local::same_inode;

pub use local::LocalStore;

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
            Err(StoreError::BadPath { path })
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
}

impl std::fmt::Display for TreePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of object a path holds; object stores set caching from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// Archives never change once written: cache forever.
    Immutable,
    /// Indexes and documents change with every publish: cache briefly.
    Mutable,
}

/// One change to the tree.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write these bytes at `path` (replacing any file there).
    Put { path: TreePath, bytes: Vec<u8> },
    /// Make `to` hold the same bytes as `from` (a hard link locally, a copy on
    /// an object store), replacing any file at `to`.
    Link { from: TreePath, to: TreePath },
    /// Remove `path`; a missing file is not an error.
    Remove { path: TreePath },
    /// Create `path` (an immutable archive) from a staged local file,
    /// failing with [`StoreError::AlreadyExists`] if `path` exists: an
    /// atomic create, so two racing uploads of one file cannot both win.
    /// Only for files no index names yet: a store may make it visible as
    /// soon as the change is staged (see [`Store::stage`]).
    Create {
        path: TreePath,
        staged: std::path::PathBuf,
    },
}

impl Op {
    pub fn path(&self) -> &TreePath {
        match self {
            Op::Put { path, .. } | Op::Remove { path } | Op::Create { path, .. } => path,
            Op::Link { to, .. } => to,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("refusing to use path {path:?}: not a plain relative path inside the tree")]
    BadPath { path: String },
    #[error("{path} already exists")]
    AlreadyExists { path: String },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// A change staged by [`Store::stage`], not yet visible.
pub trait Staged: Send {
    /// Makes the change visible, stage by stage, as [`Store::apply`] does.
    fn publish(self: Box<Self>) -> Result<(), StoreError>;
}

impl<F: FnOnce() -> Result<(), StoreError> + Send> Staged for F {
    fn publish(self: Box<Self>) -> Result<(), StoreError> {
        (*self)()
    }
}

/// A place that holds the served tree.
///
/// Every write is atomic per file (readers see the old bytes or the new ones),
/// and [`Store::apply`] makes each stage durable before the next stage
/// becomes visible, which is how the publisher gets its order: archives, then
/// `packages/NAME`, then `versions`, then `names`.
pub trait Store: Send + Sync {
    /// The bytes at `path`, or `None` if there is no such file.
    fn get(&self, path: &TreePath) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether `path` exists.
    fn exists(&self, path: &TreePath) -> Result<bool, StoreError>;

    /// Applies the stages in order; each stage is durable before the next
    /// one becomes visible. Within a stage, ops become visible in their
    /// order, except that a store may split a stage of many ops into
    /// contiguous runs applied at once, each run in order. A store may
    /// write the data of every stage before it makes the first one visible
    /// (a link is only made when its stage becomes visible, so it may name a
    /// file an earlier stage creates). A failure stops at once: earlier
    /// stages stay applied (each is complete and consistent on its own),
    /// later ones never become visible.
    fn apply(&self, stages: &[Vec<Op>]) -> Result<(), StoreError>;

    /// The first half of [`Store::apply`]: makes the new bytes of `stages`
    /// durable where no reader sees them, and returns what makes them
    /// visible. The one exception is an [`Op::Create`]: a store may create
    /// the archive under its final name while staging, since no index
    /// names it before a later stage is published. Staging may run while
    /// another change is being published; the publishes keep the order the
    /// caller gives them. Dropping the result instead of publishing it
    /// leaves the tree as it was (archives created early are removed). A
    /// store that cannot stage ahead does all of the work in `publish` (the
    /// default).
    fn stage<'a>(&'a self, stages: &'a [Vec<Op>]) -> Result<Box<dyn Staged + 'a>, StoreError> {
        Ok(Box::new(move || self.apply(stages)))
    }

    /// Every file under `prefix` (a directory path; `""` for the whole tree),
    /// sorted. Temp files are never listed.
    fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError>;

    /// A local path to read `path` from, when the store is a local directory
    /// (lets a rebuild stream archives without copying them).
    fn local_path(&self, path: &TreePath) -> Option<std::path::PathBuf>;
}
