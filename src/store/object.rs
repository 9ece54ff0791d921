//! The tree in an object store, through the `object_store` crate: S3 (and
//! S3-compatible servers) in production, its in-memory store in tests.
//!
//! Create-only puts are `If-None-Match: *` and conditional puts `If-Match:
//! ETAG`, which S3 checks atomically; object_store maps the answers to
//! `AlreadyExists` and `Precondition`. Every put sets `Content-Type`,
//! `Cache-Control` and, for downloads, `Content-Disposition`, so the bucket
//! read anonymously answers as `niso registry serve` does.
//!
//! An archive is sent in one PUT (create-only needs it: a multipart upload
//! cannot be made conditional portably), from a memory map of the staged
//! file, so the process does not copy it onto its heap: the mapped pages
//! are the file's page cache (counted as the process's `RssFile`, dropped
//! by the kernel when memory is short). S3 takes at most 5 GB in one PUT;
//! niso's own limit is 1 GiB by default. A copy S3 cannot make by itself
//! (`latest/ARCH`, whose `Cache-Control` differs from the archive's) goes
//! through this process, through a temp file in `TMPDIR` when large.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, AttributeValue, CopyMode, CopyOptions, GetOptions, ObjectStore, PutOptions,
    PutPayload, UpdateVersion,
};

use super::{
    Attributes, Body, ByteStream, Object, ObjectMeta, ObjectVersion, PutMode, Store, StoreError,
    TreePath,
};

#[derive(Debug, Clone)]
pub struct ObjectBackend {
    inner: Arc<dyn ObjectStore>,
    /// Prepended to every path (`s3://bucket/PREFIX`), without slashes at
    /// either end; empty for the bucket's root.
    prefix: String,
    url: String,
}

fn remote(action: &'static str, path: &str) -> impl FnOnce(object_store::Error) -> StoreError {
    let path = path.to_string();
    move |e| match e {
        object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists { path },
        object_store::Error::Precondition { .. } => StoreError::Precondition { path },
        other => StoreError::Remote {
            action,
            path,
            error: Box::new(other),
        },
    }
}

/// object_store's message for `e`, with S3's XML error document (which it
/// quotes whole) cut down to its code and message, and at most 600 bytes.
pub(super) fn summary(e: &object_store::Error) -> String {
    let text = e.to_string();
    let tag = |t: &str| {
        let (open, close) = (format!("<{t}>"), format!("</{t}>"));
        let a = text.find(&open)? + open.len();
        let b = text[a..].find(&close)? + a;
        Some(text[a..b].to_string())
    };
    let start = text.find("<?xml").or_else(|| text.find("<Error>"));
    let shown = match (start, tag("Code")) {
        (Some(i), Some(code)) => {
            let message = tag("Message").unwrap_or_default();
            format!("{}{code}: {message}", &text[..i])
        }
        _ => text.clone(),
    };
    if shown.len() <= 600 {
        return shown;
    }
    let mut end = 600;
    while !shown.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &shown[..end])
}

impl ObjectBackend {
    /// Any object store (tests pass object_store's in-memory one).
    pub fn new(inner: Arc<dyn ObjectStore>, prefix: &str, url: impl Into<String>) -> Self {
        Self {
            inner,
            prefix: prefix.trim_matches('/').to_string(),
            url: url.into(),
        }
    }

    /// An empty in-memory store.
    pub fn memory() -> Self {
        Self::new(
            Arc::new(object_store::memory::InMemory::new()),
            "",
            "memory://",
        )
    }

    /// `BUCKET/PREFIX` on S3, configured from the standard environment
    /// variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`).
    pub fn s3_from_env(bucket_and_prefix: &str) -> Result<Self, StoreError> {
        let (bucket, prefix) = bucket_and_prefix
            .split_once('/')
            .unwrap_or((bucket_and_prefix, ""));
        if bucket.is_empty() {
            return Err(StoreError::Config(
                "an S3 store is s3://BUCKET or s3://BUCKET/PREFIX".into(),
            ));
        }
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::ClientConfigKey;
        let builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // object_store would refuse a plain http:// endpoint on the first
        // request, in words that do not name the setting.
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
        let allow_http = builder
            .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
            .is_some_and(|v| v == "true");
        if let Some(url) = endpoint.filter(|u| u.starts_with("http://")) {
            if !allow_http {
                return Err(StoreError::Config(format!(
                    "the S3 endpoint is a plain http:// URL ({}); set AWS_ALLOW_HTTP=true to use it",
                    super::cut(&url)
                )));
            }
        }
        let s3 = builder.build().map_err(|e| {
            StoreError::Config(format!(
                "cannot use s3://{bucket_and_prefix}: {e} (set AWS_ENDPOINT_URL, \
                     AWS_REGION and the credentials in the environment)"
            ))
        })?;
        Ok(Self::new(
            Arc::new(s3),
            prefix,
            format!("s3://{bucket_and_prefix}"),
        ))
    }

    fn key(&self, path: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(path)
        } else {
            ObjPath::from(format!("{}/{path}", self.prefix))
        }
    }

    fn tree_path(&self, key: &ObjPath) -> Option<TreePath> {
        let key = key.as_ref();
        let rel = if self.prefix.is_empty() {
            key
        } else {
            key.strip_prefix(&self.prefix)?.strip_prefix('/')?
        };
        TreePath::new(rel).ok()
    }

    fn put_options(attributes: &Attributes, mode: &PutMode) -> PutOptions {
        let mut attrs = object_store::Attributes::new();
        attrs.insert(
            Attribute::ContentType,
            AttributeValue::from(attributes.content_type.clone()),
        );
        attrs.insert(
            Attribute::CacheControl,
            AttributeValue::from(attributes.cache_control.clone()),
        );
        if let Some(d) = &attributes.content_disposition {
            attrs.insert(
                Attribute::ContentDisposition,
                AttributeValue::from(d.clone()),
            );
        }
        let mode = match mode {
            PutMode::Overwrite => object_store::PutMode::Overwrite,
            PutMode::Create => object_store::PutMode::Create,
            PutMode::Update(v) => object_store::PutMode::Update(UpdateVersion {
                e_tag: Some(v.0.clone()),
                version: None,
            }),
        };
        PutOptions {
            mode,
            attributes: attrs,
            ..Default::default()
        }
    }
}

fn attributes_of(a: &object_store::Attributes) -> Option<Attributes> {
    let get = |k: &Attribute| a.get(k).map(|v| v.as_ref().to_string());
    Some(Attributes {
        content_type: get(&Attribute::ContentType)?,
        cache_control: get(&Attribute::CacheControl).unwrap_or_default(),
        content_disposition: get(&Attribute::ContentDisposition),
    })
}

fn meta_of(m: &object_store::ObjectMeta, attributes: Option<Attributes>) -> ObjectMeta {
    ObjectMeta {
        size: m.size,
        // Every store this backend is used with gives ETags (S3 and the
        // in-memory one do); the time stamp stands in for one otherwise.
        version: ObjectVersion(m.e_tag.clone().unwrap_or_else(|| {
            m.last_modified
                .timestamp_nanos_opt()
                .unwrap_or(0)
                .to_string()
        })),
        last_modified: Some(m.last_modified.into()),
        attributes,
    }
}

/// A staged file's bytes without copying them onto the heap.
fn file_bytes(path: &std::path::Path) -> Result<Bytes, StoreError> {
    let file = std::fs::File::open(path).map_err(|source| StoreError::Io {
        action: "open",
        path: path.display().to_string(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| StoreError::Io {
            action: "read",
            path: path.display().to_string(),
            source,
        })?
        .len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // Safety: the staged file (or a copy's spool) belongs to this process
    // and is not changed while it is sent (it is only removed, which keeps
    // the mapping valid).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| StoreError::Io {
        action: "map",
        path: path.display().to_string(),
        source,
    })?;
    Ok(Bytes::from_owner(map))
}

/// Objects larger than this that a copy must read through this process are
/// spooled through a temp file (in `TMPDIR`) instead of memory.
const SPOOL_ABOVE: u64 = 8 << 20;

impl ObjectBackend {
    /// The object at `path`, written to a temp file (removed when the
    /// returned path is dropped).
    async fn spool(&self, path: &TreePath) -> Result<tempfile::TempPath, StoreError> {
        use tokio::io::AsyncWriteExt;
        let io = |action: &'static str| {
            let path = path.to_string();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        let Some((_, mut stream)) = self.get_stream(path).await? else {
            return Err(StoreError::NotFound {
                path: path.to_string(),
            });
        };
        let tmp = tempfile::NamedTempFile::new()
            .map_err(io("create a temp file for"))?
            .into_temp_path();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .await
            .map_err(io("open a temp file for"))?;
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk).await.map_err(io("spool"))?;
        }
        file.flush().await.map_err(io("spool"))?;
        Ok(tmp)
    }
}

#[async_trait::async_trait]
impl Store for ObjectBackend {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn get(&self, path: &TreePath) -> Result<Option<Object>, StoreError> {
        let Some((meta, mut stream)) = self.get_stream(path).await? else {
            return Ok(None);
        };
        // One chunk (the in-memory store, a small object) is kept as it is;
        // more are gathered into one buffer of the object's size, so the
        // object is held once, not twice.
        let mut first: Option<Bytes> = None;
        let mut buf: Option<BytesMut> = None;
        while let Some(chunk) = stream.try_next().await? {
            match (&mut buf, first.take()) {
                (Some(b), _) => b.extend_from_slice(&chunk),
                (None, None) => first = Some(chunk),
                (None, Some(f)) => {
                    // The size the server claims, up to a bound: a wrong
                    // claim costs a reallocation, never a huge reservation.
                    let cap = usize::try_from(meta.size.min(64 << 20)).unwrap_or(0);
                    let mut b = BytesMut::with_capacity(cap.max(f.len() + chunk.len()));
                    b.extend_from_slice(&f);
                    b.extend_from_slice(&chunk);
                    buf = Some(b);
                }
            }
        }
        let bytes = match buf {
            Some(b) => b.freeze(),
            None => first.unwrap_or_default(),
        };
        Ok(Some(Object { meta, bytes }))
    }

    async fn get_stream(
        &self,
        path: &TreePath,
    ) -> Result<Option<(ObjectMeta, ByteStream)>, StoreError> {
        let key = self.key(path.as_str());
        match self.inner.get_opts(&key, GetOptions::default()).await {
            Ok(r) => {
                let meta = meta_of(&r.meta, attributes_of(&r.attributes));
                let shown = path.to_string();
                let stream = r
                    .into_stream()
                    .map(move |c| c.map_err(remote("read", &shown)))
                    .boxed();
                Ok(Some((meta, stream)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("read", path.as_str())(e)),
        }
    }

    async fn head(&self, path: &TreePath) -> Result<Option<ObjectMeta>, StoreError> {
        // A ranged get of nothing would also give the attributes; a GET with
        // `head: true` is the portable way.
        let key = self.key(path.as_str());
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.inner.get_opts(&key, opts).await {
            Ok(r) => Ok(Some(meta_of(&r.meta, attributes_of(&r.attributes)))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("read", path.as_str())(e)),
        }
    }

    async fn put(
        &self,
        path: &TreePath,
        body: Body,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let bytes = match body {
            Body::Bytes(b) => b,
            Body::File(p) => tokio::task::spawn_blocking(move || file_bytes(&p))
                .await
                .map_err(|e| StoreError::Io {
                    action: "read",
                    path: path.to_string(),
                    source: std::io::Error::other(e),
                })??,
        };
        let key = self.key(path.as_str());
        let r = self
            .inner
            .put_opts(
                &key,
                PutPayload::from_bytes(bytes),
                Self::put_options(attributes, &mode),
            )
            .await
            .map_err(remote("write", path.as_str()))?;
        match r.e_tag {
            Some(e) => Ok(ObjectVersion(e)),
            // No ETag in the answer: ask for it.
            None => Ok(self
                .head(path)
                .await?
                .map(|m| m.version)
                .unwrap_or(ObjectVersion(String::new()))),
        }
    }

    async fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let Some(source) = self.head(from).await? else {
            return Err(StoreError::NotFound {
                path: from.to_string(),
            });
        };
        // A server-side copy keeps the source's attributes: usable only when
        // they are the ones wanted, and when no version must be matched.
        if source.attributes.as_ref() == Some(attributes) && mode != PutMode::Overwrite {
            if let PutMode::Create = mode {
                let opts = CopyOptions {
                    mode: CopyMode::Create,
                    ..Default::default()
                };
                match self
                    .inner
                    .copy_opts(&self.key(from.as_str()), &self.key(to.as_str()), opts)
                    .await
                {
                    Ok(()) => {
                        return self.head(to).await?.map(|m| m.version).ok_or_else(|| {
                            StoreError::NotFound {
                                path: to.to_string(),
                            }
                        })
                    }
                    // Create-only copies need configuration on S3: fall back.
                    Err(object_store::Error::NotImplemented { .. })
                    | Err(object_store::Error::NotSupported { .. }) => {}
                    Err(e) => return Err(remote("copy to", to.as_str())(e)),
                }
            }
        } else if source.attributes.as_ref() == Some(attributes) {
            self.inner
                .copy_opts(
                    &self.key(from.as_str()),
                    &self.key(to.as_str()),
                    CopyOptions::default(),
                )
                .await
                .map_err(remote("copy to", to.as_str()))?;
            return self
                .head(to)
                .await?
                .map(|m| m.version)
                .ok_or_else(|| StoreError::NotFound {
                    path: to.to_string(),
                });
        }
        // Otherwise through this process: the cost of a second path with
        // other attributes (`latest/ARCH`) on an object store. A large
        // object goes through a temp file, never whole onto the heap.
        if source.size <= SPOOL_ABOVE {
            let obj = self.get(from).await?.ok_or_else(|| StoreError::NotFound {
                path: from.to_string(),
            })?;
            return self.put(to, Body::Bytes(obj.bytes), attributes, mode).await;
        }
        let spooled = self.spool(from).await?;
        self.put(to, Body::File(spooled.to_path_buf()), attributes, mode)
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError> {
        Ok(self
            .list_versions(prefix)
            .await?
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    }

    async fn list_versions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(TreePath, ObjectVersion)>, StoreError> {
        let base = if prefix.is_empty() {
            if self.prefix.is_empty() {
                None
            } else {
                Some(ObjPath::from(self.prefix.as_str()))
            }
        } else {
            Some(self.key(prefix))
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(base.as_ref())
            .try_collect()
            .await
            .map_err(remote("list", prefix))?;
        let mut out: Vec<(TreePath, ObjectVersion)> = metas
            .iter()
            .filter_map(|m| Some((self.tree_path(&m.location)?, meta_of(m, None).version)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete(&self, path: &TreePath) -> Result<(), StoreError> {
        let key = self.key(path.as_str());
        let mut s = self
            .inner
            .delete_stream(futures_util::stream::iter([Ok(key)]).boxed());
        while let Some(r) = s.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(remote("remove", path.as_str())(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TreePath {
        TreePath::new(s).unwrap()
    }

    #[tokio::test]
    async fn the_memory_store_keeps_attributes_and_refuses_stale_writes() {
        let s = ObjectBackend::memory();
        let a = p("packages/a");
        let attrs = crate::index::layout::attributes("packages/a", None);
        let v1 = s
            .put(&a, b"one".to_vec().into(), &attrs, PutMode::Create)
            .await
            .unwrap();
        assert!(matches!(
            s.put(&a, b"x".to_vec().into(), &attrs, PutMode::Create)
                .await,
            Err(StoreError::AlreadyExists { .. })
        ));
        let v2 = s
            .put(
                &a,
                b"two".to_vec().into(),
                &attrs,
                PutMode::Update(v1.clone()),
            )
            .await
            .unwrap();
        assert!(s
            .put(&a, b"three".to_vec().into(), &attrs, PutMode::Update(v1))
            .await
            .unwrap_err()
            .is_precondition());
        let got = s.get(&a).await.unwrap().unwrap();
        assert_eq!((&got.bytes[..], &got.meta.version), (&b"two"[..], &v2));
        assert_eq!(got.meta.attributes.as_ref(), Some(&attrs));
        let latest = p("v1/packages/a/latest/x86_64");
        let other = crate::index::layout::attributes(latest.as_str(), Some("a-1.0.0-x86_64.niso"));
        s.copy(&a, &latest, &other, PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(
            s.head(&latest).await.unwrap().unwrap().attributes,
            Some(other)
        );
        assert_eq!(s.list("v1").await.unwrap(), vec![latest.clone()]);
        s.delete(&latest).await.unwrap();
        s.delete(&latest).await.unwrap();
        assert!(s.get(&latest).await.unwrap().is_none());
    }
}
