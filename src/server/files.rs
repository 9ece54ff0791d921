//! Serving the tree: every read endpoint is a file, answered the way a static
//! host answers it (ETag, Last-Modified, 304s), so `serve` and nginx give the
//! same bytes. Two additions a static host cannot make: seed 002's
//! pagination on the list endpoints, and `Content-Disposition` on downloads.
//!
//! Which file a path names, and who may read it, is the [`door`]'s answer:
//! files of organization repositories (`/repos/ORG/…`) need a key with a
//! matching `pull:` scope, and their answers are `Cache-Control: private`.

use std::io::Read;

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
use crate::store::TreePath;

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
        let bytes = read_small(&app, &file.path).await?;
        return paginate(&target, &bytes, &query);
    }
    send_file(&app, &target, &headers).await
}

/// A whole file of the tree (a list to paginate or search).
pub async fn read_small(app: &AppState, path: &TreePath) -> ApiResult<Bytes> {
    match app.store.get(path).await {
        Ok(Some(o)) => Ok(o.bytes),
        Ok(None) => Err(ApiError::not_found("no such file")),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn send_file(app: &AppState, target: &Target, headers: &HeaderMap) -> ApiResult<Response> {
    let Some(TreeFile { path, kind }) = target.file() else {
        return Err(ApiError::not_found("no such file"));
    };
    // From the store the publisher writes: a local directory, or a bucket.
    let Some((meta, stream)) = app
        .store
        .get_stream(path)
        .await
        .map_err(ApiError::internal)?
    else {
        return Err(ApiError::not_found("no such file"));
    };
    let etag = meta.version.etag();
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CONTENT_TYPE, kind.content_type())
        .header(header::CACHE_CONTROL, target.cache_control());
    if let Some(modified) = meta.last_modified {
        builder = builder.header(header::LAST_MODIFIED, httpdate(modified));
    }
    // The object's own (a bucket keeps them), else the layout's rule (an
    // archive's name), else the index's (a download's name).
    let attributes = meta
        .attributes
        .unwrap_or_else(|| layout::attributes(path.as_str(), None));
    let disposition = match attributes.content_disposition {
        Some(d) => Some(d),
        None => content_disposition(app, target).await,
    };
    if let Some(d) = disposition {
        builder = builder.header(header::CONTENT_DISPOSITION, d);
    }
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(ApiError::internal);
    }
    builder
        .header(header::CONTENT_LENGTH, meta.size)
        .body(Body::from_stream(stream))
        .map_err(ApiError::internal)
}

fn httpdate(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&f).unwrap_or_default()
}

/// `Content-Disposition` of a `v1/` download (seed 000): `attachment` with
/// the archive's file name, which the package's index gives (`latest/ARCH`
/// names no version; `any` may be a Hex tarball or a `.niso`). For a store
/// that keeps it with the object (S3) the object's own is used instead.
/// `None` for other files, and for a download the index does not name.
pub async fn content_disposition(app: &AppState, target: &Target) -> Option<String> {
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
    // niso's index names every release; a tree written before it existed
    // has them all in Hex's.
    let mut pkg = None;
    for dir in [layout::NISO_PACKAGES_DIR, layout::PACKAGES_DIR] {
        let path = TreePath::new(format!("{prefix}{dir}/{name}")).ok()?;
        if let Ok(Some(o)) = app.store.get(&path).await {
            pkg = decode_unverified(&o.bytes);
            break;
        }
    }
    let pkg = pkg?;
    let arch = arch.as_str();
    let release = match version {
        Some(v) => pkg.releases.iter().find(|r| r.version == v.as_str())?,
        None => crate::index::view::latest(&pkg, |r| r.artifacts.iter().any(|a| a.arch == arch))?,
    };
    let artifact = release.artifacts.iter().find(|a| a.arch == arch)?;
    Some(format!(
        "attachment; filename=\"{}\"",
        layout::download_name(&artifact.path)
    ))
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
