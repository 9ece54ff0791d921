//! Serving the tree: every read endpoint is a file, answered the way a static
//! host answers it (ETag, Last-Modified, 304s), so `serve` and nginx give the
//! same bytes. Two additions a static host cannot make: seed 002's
//! pagination on the list endpoints, and `Content-Disposition` on downloads.
//!
//! Files of organization repositories (`/repos/ORG/…`) need a key with a
//! matching `pull:` scope.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use prost::Message;
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::middleware::Caller;
use super::AppState;
use crate::auth::Action;
use crate::ident::{PackageName, RepoName, Version};
use crate::index::json;
use crate::index::layout;
use crate::index::pb;
use crate::store::TreePath;

/// Files up to this size are read whole; larger ones are streamed.
const SMALL_FILE: u64 = 256 * 1024;

/// Seed 002's list parameters.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub page: Option<usize>,
    pub per_page: Option<usize>,
    pub sort_by: Option<String>,
    pub order: Option<String>,
    pub q: Option<String>,
}

impl ListQuery {
    fn wants_pages(&self) -> bool {
        self.page.is_some()
            || self.per_page.is_some()
            || self.sort_by.is_some()
            || self.order.is_some()
    }
}

/// A request path split into its repository and the path inside it.
pub struct TreeRequest {
    pub org: Option<RepoName>,
    pub rest: String,
}

pub fn split_repo(path: &str) -> Result<TreeRequest, ApiError> {
    let path = path.trim_start_matches('/');
    if let Some(after) = path.strip_prefix("repos/") {
        let (org, rest) = after.split_once('/').unwrap_or((after, ""));
        let org = RepoName::new(org).map_err(|_| ApiError::not_found("no such file"))?;
        return Ok(TreeRequest {
            org: Some(org),
            rest: rest.to_string(),
        });
    }
    Ok(TreeRequest {
        org: None,
        rest: path.to_string(),
    })
}

/// The package a tree path belongs to, if any (for `pull:` checks and
/// download names).
pub fn package_of(rest: &str) -> Option<String> {
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("packages"), Some(name), None) => Some(name.to_string()),
        (Some("v1"), Some("packages"), Some(name)) if name != "index.json" => {
            Some(name.to_string())
        }
        (Some("tarballs"), Some(file), None) => split_name_version(file.strip_suffix(".tar")?),
        (Some("archives"), Some(file), None) => {
            let stem = file.strip_suffix(".niso")?;
            split_name_version(stem.rsplit_once('-')?.0)
        }
        _ => None,
    }
}

fn split_name_version(stem: &str) -> Option<String> {
    stem.match_indices('-').find_map(|(i, _)| {
        let (name, version) = (&stem[..i], &stem[i + 1..]);
        (PackageName::new(name).is_ok() && Version::new(version).is_ok()).then(|| name.to_string())
    })
}

/// Whether `caller` may read `rest` in repository `org`.
pub fn may_pull(
    app: &AppState,
    caller: &Caller,
    org: Option<&RepoName>,
    rest: &str,
) -> Result<(), ApiError> {
    let Some(org) = org else { return Ok(()) };
    if app.keys.is_none() {
        return Ok(());
    }
    let Some(key) = caller.key() else {
        return Err(ApiError::unauthorized());
    };
    let allowed = match package_of(rest) {
        Some(name) => key
            .scopes
            .allows(Action::Pull, &format!("{org}/{}", name.replace('_', "-"))),
        None => key.scopes.allows_some_in(Action::Pull, org.as_str()),
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this key may not pull from repository {org}"
        )))
    }
}

/// The fast path for the common read: a public file, no key, no query, no
/// rate limit to count. It skips routing, authentication and the other
/// layers, which cost more than the file read itself; anything it cannot
/// answer with 200/304 goes down the normal path.
pub async fn fast_static(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let eligible = (req.method() == Method::GET || req.method() == Method::HEAD)
        && req.uri().query().is_none()
        && !app.ip_limiter.enabled()
        && !req.headers().contains_key(header::AUTHORIZATION)
        && is_plain_file_path(req.uri().path());
    if !eligible {
        return next.run(req).await;
    }
    let start = std::time::Instant::now();
    let path = req.uri().path();
    let rel = match path {
        "/v1/packages" => layout::V1_INDEX,
        p => p.trim_start_matches('/'),
    };
    let Ok(tree_path) = TreePath::new(rel) else {
        return next.run(req).await;
    };
    match send_file(&app, &tree_path, rel, req.headers()).await {
        Ok(mut resp) => {
            resp.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            tracing::info!(
                method = %req.method(),
                path,
                status = resp.status().as_u16(),
                ms = start.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
            resp
        }
        Err(_) => next.run(req).await,
    }
}

/// Paths that are always public files: not the API, not an organization.
fn is_plain_file_path(path: &str) -> bool {
    !(path.starts_with("/repos/")
        || path.starts_with("/v1/auth/")
        || path.starts_with("/v1/search")
        || path == "/health"
        || path.ends_with('/'))
}

/// GET/HEAD of any path: a file of the tree.
pub async fn serve_tree(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    method: Method,
    uri: Uri,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ));
    }
    let req = split_repo(uri.path())?;
    may_pull(&app, &caller, req.org.as_ref(), &req.rest)?;
    let prefix = req
        .org
        .as_ref()
        .map(|o| format!("repos/{o}/"))
        .unwrap_or_default();
    let rest = req.rest.trim_end_matches('/');
    let file = if rest == "v1/packages" {
        layout::V1_INDEX.to_string()
    } else {
        rest.to_string()
    };
    let tree_path = TreePath::new(format!("{prefix}{file}"))
        .map_err(|_| ApiError::not_found("no such file"))?;

    if query.wants_pages() {
        let parts: Vec<&str> = file.split('/').collect();
        if file == layout::V1_INDEX
            || (parts.len() == 4 && parts[0] == "v1" && parts[3] == "versions")
        {
            let bytes = read_small(&app.tree.join(tree_path.as_str())).await?;
            return paginate(&file, &bytes, &query, &uri, &headers);
        }
    }
    send_file(&app, &tree_path, &file, &headers).await
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

async fn send_file(
    app: &AppState,
    tree_path: &TreePath,
    rel: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
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
        .header(header::CONTENT_TYPE, content_type(rel))
        .header(header::CACHE_CONTROL, cache_control(rel));
    if let Some(modified) = &file.last_modified {
        builder = builder.header(header::LAST_MODIFIED, modified.clone());
    }
    if let Some(name) = download_name(app, tree_path, rel) {
        builder = builder.header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        );
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

fn is_archive(rel: &str) -> bool {
    rel.starts_with("tarballs/") || rel.starts_with("archives/") || is_v1_archive(rel)
}

/// `v1/packages/N/V/ARCH` or `v1/packages/N/latest/ARCH` (not a manifest).
fn is_v1_archive(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    parts.len() == 5 && parts[0] == "v1" && parts[1] == "packages" && parts[4] != "manifest"
}

fn content_type(rel: &str) -> &'static str {
    if rel == layout::PUBLIC_KEY {
        "application/x-pem-file"
    } else if rel.starts_with("v1/") && !is_v1_archive(rel) {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

fn cache_control(rel: &str) -> &'static str {
    let parts: Vec<&str> = rel.split('/').collect();
    let latest = parts.len() == 5 && parts[3] == "latest";
    if is_archive(rel) && !latest {
        // Published archives never change.
        "public, max-age=31536000, immutable"
    } else {
        // Indexes change with every publish: revalidate (cheap, with ETags).
        "public, no-cache"
    }
}

/// The file name of a `v1/` download. For `VERSION/ARCH` it follows from
/// the path; `latest/ARCH` needs the package's index to know the version.
fn download_name(app: &AppState, tree_path: &TreePath, rel: &str) -> Option<String> {
    if !is_v1_archive(rel) {
        return None;
    }
    let parts: Vec<&str> = rel.split('/').collect();
    let (name, version, arch) = (parts[2], parts[3], parts[4]);
    let prefix = tree_path.as_str().strip_suffix(rel)?;
    if version != "latest" {
        // `any` is a Hex tarball unless a .niso archive of arch any exists.
        let niso = format!("{name}-{version}-{arch}.niso");
        if arch != crate::ident::Arch::ANY
            || app.tree.join(format!("{prefix}archives/{niso}")).is_file()
        {
            return Some(niso);
        }
        return Some(format!("{name}-{version}.tar"));
    }
    let index = app.tree.join(format!("{prefix}packages/{name}"));
    let bytes = std::fs::read(index).ok()?;
    let pkg = decode_unverified(&bytes)?;
    let release =
        crate::publish::render::latest(&pkg, |r| r.artifacts.iter().any(|a| a.arch == arch))?;
    let artifact = release.artifacts.iter().find(|a| a.arch == arch)?;
    Some(layout::download_name(&artifact.path).to_string())
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
pub fn page_of<T>(
    mut items: Vec<T>,
    query: &ListQuery,
    uri: &Uri,
    headers: &HeaderMap,
    sort_key: impl Fn(&T, &str) -> Result<String, ApiError>,
    default_sort: &str,
) -> ApiResult<(Vec<T>, Pagination)> {
    let page = query.page.unwrap_or(1);
    let per_page = query.per_page.unwrap_or(DEFAULT_PER_PAGE);
    if page == 0 || per_page == 0 || per_page > MAX_PER_PAGE {
        return Err(ApiError::bad_request(format!(
            "page must be at least 1 and per_page between 1 and {MAX_PER_PAGE}"
        )));
    }
    let sort_by = query.sort_by.as_deref().unwrap_or(default_sort);
    let desc = match query.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order must be asc or desc, not {other:?}"
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
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let scheme = headers
            .get("x-forwarded-proto")
            .and_then(|h| h.to_str().ok())
            .filter(|s| *s == "https")
            .unwrap_or("http");
        let mut q = format!("page={p}&per_page={per_page}");
        if let Some(s) = &query.sort_by {
            q.push_str(&format!("&sort_by={s}"));
        }
        if let Some(o) = &query.order {
            q.push_str(&format!("&order={o}"));
        }
        if let Some(term) = &query.q {
            q.push_str(&format!("&q={}", encode_query(term)));
        }
        format!("{scheme}://{host}{}?{q}", uri.path())
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

fn paginate(
    file: &str,
    bytes: &[u8],
    query: &ListQuery,
    uri: &Uri,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    if file == layout::V1_INDEX {
        let list: json::PackageList = serde_json::from_slice(bytes).map_err(ApiError::internal)?;
        let (packages, pagination) =
            page_of(list.packages, query, uri, headers, package_sort_key, "name")?;
        Ok(json_response(
            &serde_json::json!({ "packages": packages, "pagination": pagination }),
        ))
    } else {
        let list: json::VersionList = serde_json::from_slice(bytes).map_err(ApiError::internal)?;
        let (versions, pagination) = page_of(
            list.versions,
            query,
            uri,
            headers,
            |v: &json::VersionEntry, key| match key {
                "version" => Ok(version_sort_key(&v.version, &v.arch)),
                "uploaded_at" => Ok(format!(
                    "{} {}",
                    v.uploaded_at,
                    version_sort_key(&v.version, &v.arch)
                )),
                other => Err(ApiError::bad_request(format!(
                    "sort_by must be version or uploaded_at, not {other:?}"
                ))),
            },
            "version",
        )?;
        Ok(json_response(
            &serde_json::json!({ "name": list.name, "versions": versions, "pagination": pagination }),
        ))
    }
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
            "sort_by must be name or description, not {other:?}"
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
    fn package_of_finds_the_package_in_every_kind_of_path() {
        assert_eq!(package_of("packages/my-app").as_deref(), Some("my-app"));
        assert_eq!(
            package_of("v1/packages/my-app/1.0.0/x86_64").as_deref(),
            Some("my-app")
        );
        assert_eq!(package_of("v1/packages/index.json"), None);
        assert_eq!(
            package_of("tarballs/x-2-1.0.0-rc.1.tar").as_deref(),
            Some("x-2")
        );
        assert_eq!(
            package_of("archives/my-app-1.1.0-x86_64.niso").as_deref(),
            Some("my-app")
        );
        assert_eq!(package_of("names"), None);
    }

    #[test]
    fn versions_sort_by_semver() {
        let mut v = ["1.10.0", "1.2.0", "1.2.0-rc.1"].map(|s| version_sort_key(s, "x"));
        v.sort();
        assert!(
            v[0].contains("rc.1") && v[2].starts_with("00000000000000000001.00000000000000000010")
        );
    }
}
