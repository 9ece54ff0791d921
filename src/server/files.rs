//! Serving the tree: every read endpoint is a file, answered the way a static
//! host answers it (ETag, Last-Modified, 304s), so `serve` and nginx give the
//! same bytes. Two additions a static host cannot make: seed 002's
//! pagination on the list endpoints, and `Content-Disposition` on downloads.
//!
//! Which file a path names, and who may read it, is the [`door`]'s answer:
//! files of organization repositories (`/repos/ORG/…`) need a key with a
//! matching `pull:` scope, and their answers are `Cache-Control: private`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use prost::Message;

use super::door::{self, FileKind, Spelling, Target, TreeFile};
use super::error::{ApiError, ApiResult};
use super::middleware::Caller;
use super::AppState;
use crate::index::json;
use crate::index::layout;
use crate::index::pb;

/// Files up to this size are read whole; larger ones are streamed.
const SMALL_FILE: u64 = 256 * 1024;

/// Seed 002's list parameters, read by our own extractor so that a bad one
/// gets a message naming it and what it accepts (axum's `Query` answers a
/// bare "bad request"). Other parameters are ignored, as a static host
/// ignores them.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub page: Option<usize>,
    pub per_page: Option<usize>,
    pub sort_by: Option<String>,
    pub order: Option<String>,
    pub q: Option<String>,
}

/// Highest `page` accepted: far past any real list, and a number a message
/// can name.
pub const MAX_PAGE: usize = 1_000_000_000;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ListQuery {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        // Decoding into pairs cannot fail: bad escapes decode leniently.
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|_| ApiError::bad_request("the query string is not form-encoded"))?;
        Self::from_pairs(pairs)
    }
}

impl ListQuery {
    /// Checks each known parameter: given once, and a value it accepts.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> ApiResult<Self> {
        let mut q = Self::default();
        for (key, value) in pairs {
            let slot_taken = match key.as_str() {
                "page" => q.page.replace(number(&key, &value, MAX_PAGE)?).is_some(),
                "per_page" => q
                    .per_page
                    .replace(number(&key, &value, MAX_PER_PAGE)?)
                    .is_some(),
                "sort_by" => q.sort_by.replace(value).is_some(),
                "order" => {
                    if value != "asc" && value != "desc" {
                        return Err(ApiError::bad_request(format!(
                            "order must be asc or desc, not {}",
                            quote(&value)
                        )));
                    }
                    q.order.replace(value).is_some()
                }
                "q" => q.q.replace(value).is_some(),
                _ => false,
            };
            if slot_taken {
                return Err(ApiError::bad_request(format!(
                    "the query parameter {key} is given more than once: give it once"
                )));
            }
        }
        Ok(q)
    }

    fn wants_pages(&self) -> bool {
        self.page.is_some()
            || self.per_page.is_some()
            || self.sort_by.is_some()
            || self.order.is_some()
    }
}

/// A whole number from 1 to `max`, for the query parameter `key`.
fn number(key: &str, value: &str, max: usize) -> ApiResult<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{key} must be a whole number from 1 to {max}, not {}",
                quote(value)
            ))
        })
}

/// A client's value in quotes, cut.
fn quote(s: &str) -> String {
    format!("{:?}", super::error::cut(s))
}

/// The fast path for the common read: a public file, no key, no query, no
/// rate limit to count. It skips routing, authentication and the other
/// layers, which cost more than the file read itself; anything it cannot
/// answer with 200/304 goes down the normal path. It decides from the same
/// [`door::open`] as the normal path, so no spelling of a private file is
/// public here.
pub async fn fast_static(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let eligible = (req.method() == Method::GET || req.method() == Method::HEAD)
        && req.uri().query().is_none()
        && !app.ip_limiter.enabled()
        && !req.headers().contains_key(header::AUTHORIZATION);
    if !eligible {
        return next.run(req).await;
    }
    let Ok(target) = door::open(req.uri().path().as_bytes(), Spelling::Raw) else {
        return next.run(req).await;
    };
    if target.access() != door::Access::Public || target.file().is_none() {
        return next.run(req).await;
    }
    let start = std::time::Instant::now();
    match send_file(&app, &target, req.headers()).await {
        Ok(mut resp) => {
            resp.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            tracing::info!(
                method = %req.method(),
                path = req.uri().path(),
                status = resp.status().as_u16(),
                ms = start.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
            resp
        }
        Err(_) => next.run(req).await,
    }
}

/// GET/HEAD of any path: a file of the tree, as the door names it.
pub async fn serve_tree(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(target): Extension<Target>,
    method: Method,
    query: ListQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ));
    }
    let Some(file) = target.file() else {
        return Err(target.not_found());
    };
    door::authorize_caller(&app, &caller, &target.access())?;
    if query.wants_pages() && matches!(file.kind, FileKind::V1Index | FileKind::V1Versions(_)) {
        let bytes = read_small(&app.tree.join(file.path.as_str())).await?;
        return paginate(&target, &bytes, &query);
    }
    send_file(&app, &target, &headers).await
}

async fn read_small(path: &Path) -> ApiResult<Vec<u8>> {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found("no such file"))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn send_file(app: &AppState, target: &Target, headers: &HeaderMap) -> ApiResult<Response> {
    let Some(TreeFile {
        path: tree_path,
        kind,
    }) = target.file()
    else {
        return Err(ApiError::not_found("no such file"));
    };
    let full = app.tree.join(tree_path.as_str());
    let file = match app.file_cache.get(tree_path.as_str(), &full) {
        Ok(Some(f)) => f,
        Ok(None) => return Err(ApiError::not_found("no such file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found("no such file"))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let mut builder = Response::builder()
        .header(header::ETAG, file.etag.clone())
        .header(header::CONTENT_TYPE, kind.content_type())
        .header(header::CACHE_CONTROL, target.cache_control());
    if let Some(modified) = &file.last_modified {
        builder = builder.header(header::LAST_MODIFIED, modified.clone());
    }
    if let Some(disposition) = content_disposition(app, target) {
        builder = builder.header(header::CONTENT_DISPOSITION, disposition);
    }
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let etag = file.etag.as_bytes();
            v.split(',')
                .any(|t| t.trim().as_bytes() == etag || t.trim() == "*")
        });
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(ApiError::internal);
    }
    let body = match file.body {
        FileBody::Small(bytes) => Body::from(bytes),
        FileBody::Large(f) => Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(f),
            64 * 1024,
        )),
    };
    builder
        .header(header::CONTENT_LENGTH, file.len)
        .body(body)
        .map_err(ApiError::internal)
}

enum FileBody {
    /// Shared with the cache: sending it copies nothing.
    Small(Bytes),
    Large(std::fs::File),
}

/// A file to send, with the headers that come from its metadata.
struct OpenFile {
    len: u64,
    etag: HeaderValue,
    last_modified: Option<HeaderValue>,
    body: FileBody,
}

/// The small files of the tree recently served, each checked against the
/// file's metadata (device, inode, modification time, size) on every
/// request, so a file the publisher replaced (a rename: a new inode) or
/// anyone else changed is read again. Saves the open, read and close, and
/// the copy, of the common read; the `stat` stays, as it does for a static
/// server without an open-file cache.
#[derive(Default)]
pub struct FileCache {
    entries: Mutex<HashMap<String, Arc<Cached>>>,
    bytes: AtomicUsize,
}

struct Cached {
    id: FileId,
    body: Bytes,
    etag: HeaderValue,
    last_modified: Option<HeaderValue>,
}

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Self {
                dev: meta.dev(),
                ino: meta.ino(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                len: meta.len(),
            }
        }
        #[cfg(not(unix))]
        {
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            Self {
                dev: 0,
                ino: 0,
                mtime_ns,
                len: meta.len(),
            }
        }
    }
}

/// Most bytes the cache holds; past it, it starts again empty.
const CACHE_BYTES: usize = 64 << 20;

impl FileCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Cached>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file at `full` (`key` is its tree path); `None` if it is not a
    /// regular file.
    fn get(&self, key: &str, full: &Path) -> std::io::Result<Option<OpenFile>> {
        let meta = std::fs::metadata(full)?;
        if !meta.is_file() {
            return Ok(None);
        }
        let id = FileId::of(&meta);
        if let Some(c) = self.lock().get(key).filter(|c| c.id == id).cloned() {
            return Ok(Some(OpenFile {
                len: id.len,
                etag: c.etag.clone(),
                last_modified: c.last_modified.clone(),
                body: FileBody::Small(c.body.clone()),
            }));
        }
        // Described by the descriptor read, not the earlier stat: the path
        // may have been replaced in between.
        let mut f = std::fs::File::open(full)?;
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        let id = FileId::of(&meta);
        let etag = HeaderValue::from_str(&etag(&meta)).map_err(std::io::Error::other)?;
        let last_modified = meta
            .modified()
            .ok()
            .and_then(|m| HeaderValue::from_str(&httpdate(m)).ok());
        if meta.len() > SMALL_FILE {
            return Ok(Some(OpenFile {
                len: meta.len(),
                etag,
                last_modified,
                body: FileBody::Large(f),
            }));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut bytes)?;
        let body = Bytes::from(bytes);
        let cached = Arc::new(Cached {
            id,
            body: body.clone(),
            etag: etag.clone(),
            last_modified: last_modified.clone(),
        });
        {
            let mut entries = self.lock();
            if self.bytes.load(Ordering::Relaxed) + body.len() > CACHE_BYTES {
                entries.clear();
                self.bytes.store(0, Ordering::Relaxed);
            }
            if let Some(old) = entries.insert(key.to_string(), cached) {
                self.bytes.fetch_sub(old.body.len(), Ordering::Relaxed);
            }
            self.bytes.fetch_add(body.len(), Ordering::Relaxed);
        }
        Ok(Some(OpenFile {
            len: body.len() as u64,
            etag,
            last_modified,
            body: FileBody::Small(body),
        }))
    }
}

fn etag(meta: &std::fs::Metadata) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        format!(
            "\"{:x}-{:x}{:09x}-{:x}\"",
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.size()
        )
    }
    #[cfg(not(unix))]
    {
        let m = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        format!("\"{m:x}-{:x}\"", meta.len())
    }
}

fn httpdate(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&f).unwrap_or_default()
}

/// `Content-Disposition` of a `v1/` download (seed 000): `attachment` with
/// the archive's file name. `None` for other files, and for a `latest/ARCH`
/// whose release the package's index does not name.
pub fn content_disposition(app: &AppState, target: &Target) -> Option<String> {
    let file = target.file()?;
    let FileKind::V1Download {
        name,
        version,
        arch,
    } = &file.kind
    else {
        return None;
    };
    let prefix = target
        .repo
        .as_ref()
        .map(|o| format!("{}/{o}/", layout::REPOS_DIR))
        .unwrap_or_default();
    let file_name = match version {
        Some(version) => {
            // `any` is a Hex tarball unless a .niso archive of arch any exists.
            let niso = format!("{name}-{version}-{arch}.niso");
            if arch.as_str() != crate::ident::Arch::ANY
                || app.tree.join(format!("{prefix}archives/{niso}")).is_file()
            {
                niso
            } else {
                format!("{name}-{version}.tar")
            }
        }
        None => {
            // `latest` names no version: the package's index says which.
            let index = app.tree.join(format!("{prefix}packages/{name}"));
            let bytes = std::fs::read(index).ok()?;
            let pkg = decode_unverified(&bytes)?;
            let arch = arch.as_str();
            let release = crate::publish::render::latest(&pkg, |r| {
                r.artifacts.iter().any(|a| a.arch == arch)
            })?;
            let artifact = release.artifacts.iter().find(|a| a.arch == arch)?;
            layout::download_name(&artifact.path).to_string()
        }
    };
    Some(format!("attachment; filename=\"{file_name}\""))
}

/// Our own index, read for display only (the bytes served are the file's).
fn decode_unverified(bytes: &[u8]) -> Option<pb::Package> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(64 << 20)
        .read_to_end(&mut raw)
        .ok()?;
    let signed = pb::Signed::decode(raw.as_slice()).ok()?;
    pb::Package::decode(signed.payload.as_slice()).ok()
}

/// Seed 002's pagination metadata.
#[derive(Debug, serde::Serialize)]
pub struct Pagination {
    pub page: usize,
    pub per_page: usize,
    pub total: usize,
    pub prev: Option<String>,
    pub next: Option<String>,
}

pub const DEFAULT_PER_PAGE: usize = 100;
pub const MAX_PER_PAGE: usize = 1000;

/// Sorts and cuts `items`, returning the page and its pagination block.
/// `prev` and `next` are relative links (`/v1/packages?page=2&per_page=10`)
/// on `path`, the request's normal path: never built from `Host` or other
/// headers a caller controls, and right behind any proxy.
pub fn page_of<T>(
    mut items: Vec<T>,
    query: &ListQuery,
    path: &str,
    sort_key: impl Fn(&T, &str) -> Result<String, ApiError>,
    default_sort: &str,
) -> ApiResult<(Vec<T>, Pagination)> {
    // Both were checked when the query was read (`ListQuery`).
    let page = query.page.unwrap_or(1).max(1);
    let per_page = query.per_page.unwrap_or(DEFAULT_PER_PAGE).max(1);
    let sort_by = query.sort_by.as_deref().unwrap_or(default_sort);
    let desc = match query.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order must be asc or desc, not {}",
                quote(other)
            )))
        }
    };
    let mut keyed = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        keyed.push((sort_key(&item, sort_by)?, item));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    if desc {
        keyed.reverse();
    }
    let total = keyed.len();
    let start = (page - 1).saturating_mul(per_page).min(total);
    let end = start.saturating_add(per_page).min(total);
    let items: Vec<T> = keyed
        .into_iter()
        .skip(start)
        .take(end - start)
        .map(|(_, t)| t)
        .collect();
    let link = |p: usize| {
        let mut q = format!("page={p}&per_page={per_page}");
        if let Some(s) = &query.sort_by {
            q.push_str(&format!("&sort_by={}", encode_query(s)));
        }
        if let Some(o) = &query.order {
            q.push_str(&format!("&order={}", encode_query(o)));
        }
        if let Some(term) = &query.q {
            q.push_str(&format!("&q={}", encode_query(term)));
        }
        format!("{path}?{q}")
    };
    let pagination = Pagination {
        page,
        per_page,
        total,
        prev: (page > 1 && start > 0).then(|| link(page - 1)),
        next: (end < total).then(|| link(page + 1)),
    };
    Ok((items, pagination))
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn paginate(target: &Target, bytes: &[u8], query: &ListQuery) -> ApiResult<Response> {
    let path = &target.path;
    let mut resp = if target.file().map(|f| &f.kind) == Some(&FileKind::V1Index) {
        let list: json::PackageList = serde_json::from_slice(bytes).map_err(ApiError::internal)?;
        let (packages, pagination) = page_of(list.packages, query, path, package_sort_key, "name")?;
        json_response(&serde_json::json!({ "packages": packages, "pagination": pagination }))
    } else {
        let list: json::VersionList = serde_json::from_slice(bytes).map_err(ApiError::internal)?;
        let (versions, pagination) = page_of(
            list.versions,
            query,
            path,
            |v: &json::VersionEntry, key| match key {
                "version" => Ok(version_sort_key(&v.version, &v.arch)),
                "uploaded_at" => Ok(format!(
                    "{} {}",
                    v.uploaded_at,
                    version_sort_key(&v.version, &v.arch)
                )),
                other => Err(ApiError::bad_request(format!(
                    "sort_by must be version or uploaded_at, not {}",
                    quote(other)
                ))),
            },
            "version",
        )?;
        json_response(
            &serde_json::json!({ "name": list.name, "versions": versions, "pagination": pagination }),
        )
    };
    set_cache_control(&mut resp, target);
    Ok(resp)
}

/// The `Cache-Control` of an answer computed from `target`'s files: the
/// file's own (`private` in an organization).
pub fn set_cache_control(resp: &mut Response, target: &Target) {
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(target.cache_control()),
    );
}

pub fn package_sort_key(p: &json::PackageSummary, key: &str) -> Result<String, ApiError> {
    match key {
        "name" | "title" => Ok(p.name.clone()),
        "description" => Ok(format!(
            "{}\0{}",
            p.description.as_deref().unwrap_or(""),
            p.name
        )),
        other => Err(ApiError::bad_request(format!(
            "sort_by must be name or description, not {}",
            quote(other)
        ))),
    }
}

/// Sorts versions by semver: zero-padded numeric fields, pre-releases first.
fn version_sort_key(version: &str, arch: &str) -> String {
    match semver::Version::parse(version) {
        Ok(v) => format!(
            "{:020}.{:020}.{:020}.{}{} {arch}",
            v.major,
            v.minor,
            v.patch,
            if v.pre.is_empty() { "1" } else { "0" },
            v.pre
        ),
        Err(_) => format!("~{version} {arch}"),
    }
}

pub fn json_response<T: serde::Serialize>(doc: &T) -> Response {
    let mut resp = json::to_bytes(doc).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_semver() {
        let mut v = ["1.10.0", "1.2.0", "1.2.0-rc.1"].map(|s| version_sort_key(s, "x"));
        v.sort();
        assert!(
            v[0].contains("rc.1") && v[2].starts_with("00000000000000000001.00000000000000000010")
        );
    }
}
