//! Reading a tree through a [`Store`] (a bucket, or the in-memory store of
//! tests), for readers that are synchronous (`verify`). Call from a thread
//! that is not running async tasks (a `spawn_blocking` thread, or a plain
//! one): each read waits on the runtime `handle` belongs to.

use std::io::Write;
use std::sync::Arc;

use futures_util::StreamExt;

use super::transport::{Transport, TransportError};
use crate::store::{Store, TreePath};

pub struct StoreTransport {
    store: Arc<dyn Store>,
    /// Prepended to every path (`repos/ORG` for an organization), no slash.
    prefix: String,
    handle: tokio::runtime::Handle,
}

impl StoreTransport {
    pub fn new(store: Arc<dyn Store>, prefix: &str, handle: tokio::runtime::Handle) -> Self {
        Self {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            handle,
        }
    }

    fn path(&self, path: &str) -> Result<TreePath, TransportError> {
        let full = if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        };
        TreePath::new(full).map_err(|e| TransportError::Other {
            location: self.location(path),
            reason: e.to_string(),
        })
    }
}

impl Transport for StoreTransport {
    fn fetch(&self, path: &str, limit: u64) -> Result<Vec<u8>, TransportError> {
        let mut out = Vec::new();
        self.fetch_to(path, &mut out, limit)?;
        Ok(out)
    }

    fn fetch_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64, TransportError> {
        let location = self.location(path);
        let tree_path = self.path(path)?;
        let other = |reason: String| TransportError::Other {
            location: location.clone(),
            reason,
        };
        self.handle.block_on(async {
            let Some((meta, mut stream)) = self
                .store
                .get_stream(&tree_path)
                .await
                .map_err(|e| other(e.to_string()))?
            else {
                return Err(TransportError::NotFound {
                    location: location.clone(),
                });
            };
            if meta.size > limit {
                return Err(TransportError::TooLarge {
                    location: location.clone(),
                    limit,
                });
            }
            let mut n = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| other(e.to_string()))?;
                n += chunk.len() as u64;
                if n > limit {
                    return Err(TransportError::TooLarge {
                        location: location.clone(),
                        limit,
                    });
                }
                out.write_all(&chunk).map_err(|e| other(e.to_string()))?;
            }
            Ok(n)
        })
    }

    fn location(&self, path: &str) -> String {
        let base = self.store.describe();
        if self.prefix.is_empty() {
            format!("{}/{path}", base.trim_end_matches('/'))
        } else {
            format!("{}/{}/{path}", base.trim_end_matches('/'), self.prefix)
        }
    }
}
