//! Uploads, deletes, tags and search.

use std::collections::HashMap;
use std::io::Write;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::archive::{self, ArchiveError};
use crate::auth::{Action, KeyRecord};
use crate::ident::{Arch, PackageName, RepoName, TagName, Version};
use crate::index::json;
use crate::index::layout;
use crate::publish::{unix_now, PublisherSignature, StagedFile, Upload};
use crate::server::door::{self, Target};
use crate::server::error::{ApiError, ApiResult};
use crate::server::files::{self, json_response, ListQuery};
use crate::server::handlers::body::{json_body, Kind, Shape};
use crate::server::middleware::Caller;
use crate::server::AppState;

/// The repository a write is for, from the optional `{org}` segment. An
/// invalid name is a 400 with the rule, as an invalid package name is: the
/// request is wrong, not the repository missing.
fn org_of(params: &HashMap<String, String>) -> ApiResult<Option<RepoName>> {
    params
        .get("org")
        .map(|o| RepoName::new(o).map_err(ApiError::from))
        .transpose()
}

fn param<'a>(params: &'a HashMap<String, String>, key: &str) -> &'a str {
    params.get(key).map(String::as_str).unwrap_or_default()
}

/// The scope subject of a package: its normalised name, `ORG/` in front for
/// an organization's packages.
fn subject(org: Option<&RepoName>, name: &PackageName) -> String {
    match org {
        Some(o) => format!("{o}/{}", name.normalized()),
        None => name.normalized(),
    }
}

/// The key of an authenticated caller allowed to `action` on the package.
fn require<'a>(
    caller: &'a Caller,
    action: Action,
    org: Option<&RepoName>,
    name: &PackageName,
) -> ApiResult<&'a KeyRecord> {
    let key = caller.key().ok_or_else(ApiError::unauthorized)?;
    let what = match action {
        Action::Push => "push",
        Action::Pull => "pull",
        Action::Delete => "delete",
    };
    if key.scopes.allows(action, &subject(org, name)) {
        Ok(key)
    } else {
        Err(ApiError::forbidden(format!(
            "this key does not have the scope to {what} {}",
            subject(org, name)
        )))
    }
}

fn parse_ids(params: &HashMap<String, String>) -> ApiResult<(PackageName, Version, Arch)> {
    Ok((
        PackageName::new(param(params, "name"))?,
        Version::new(param(params, "version"))?,
        Arch::new(param(params, "arch"))?,
    ))
}

/// `POST /v1/packages/{name}/{version}/{arch}`: the body is the archive.
pub async fn upload(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let org = org_of(&params)?;
    let (name, version, arch) = parse_ids(&params)?;
    let key = require(&caller, Action::Push, org.as_ref(), &name)?;
    let max = app.settings.max_upload;
    if let Some(len) = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max {
            return Err(ApiError::too_large(max));
        }
    }
    let signature = signature_of(&headers, key)?;

    // Stream to a staged file, feeding the signature check as bytes pass:
    // memory stays flat whatever the archive's size.
    std::fs::create_dir_all(&app.staging).map_err(ApiError::internal)?;
    // Named for this process: a later start removes what a killed server
    // left here (see `DataDir::clean_staging`).
    let staged = tempfile::Builder::new()
        .prefix(&crate::datadir::staging_prefix("upload"))
        .tempfile_in(&app.staging)
        .map_err(ApiError::internal)?;
    let mut file = std::io::BufWriter::with_capacity(
        256 * 1024,
        staged.as_file().try_clone().map_err(ApiError::internal)?,
    );
    let mut verifier = match &signature {
        Some((sig, vk, _)) => Some(vk.verify_stream(sig).map_err(|_| {
            ApiError::bad_request("X-Niso-Signature is not a valid Ed25519 signature")
        })?),
        None => None,
    };
    let mut received: u64 = 0;
    let mut pace = UploadPace::new(&app.settings);
    let mut stream = body.into_data_stream();
    loop {
        let wait = pace.wait(app.settings.upload_idle_timeout);
        let next = match tokio::time::timeout_at(wait.deadline, stream.next()).await {
            Ok(next) => next,
            // A window closed with no chunk in it: judge it, then wait on.
            // (`next()` is cancel-safe: no data is lost by timing it out.)
            Err(_) if wait.window_end => {
                pace.check(received)?;
                continue;
            }
            Err(_) => return Err(pace.stalled()),
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("upload interrupted: {e}")))?;
        received += chunk.len() as u64;
        if received > max {
            return Err(ApiError::too_large(max));
        }
        pace.check(received)?;
        if let Some(v) = verifier.as_mut() {
            v.update(&chunk);
        }
        // Small synchronous writes into a buffer; the OS absorbs them.
        file.write_all(&chunk).map_err(ApiError::internal)?;
    }
    file.flush().map_err(ApiError::internal)?;
    drop(file);
    if received == 0 {
        return Err(ApiError::bad_request(
            "the request body is empty: send the archive",
        ));
    }

    let limits = archive_limits(&app).await?;
    let staged_path = staged.path().to_path_buf();
    let info = tokio::task::spawn_blocking(move || archive::inspect_file(&staged_path, &limits))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| match e {
            // Over a size limit for its kind (a Hex tarball over
            // --max-hex-tarball): the upload itself is too large.
            ArchiveError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("invalid archive: {e}"),
            ),
            e => ApiError::bad_request(format!("invalid archive: {e}")),
        })?;
    if info.name != name || info.version != version || info.arch != arch {
        return Err(ApiError::bad_request(format!(
            "the archive holds {} {} ({}) but the URL names {name} {version} ({arch})",
            info.name, info.version, info.arch
        )));
    }
    let publisher_signature = match (signature, verifier) {
        (Some((sig, _, key_id)), Some(v)) => {
            v.finalize_and_verify().map_err(|_| {
                ApiError::bad_request(
                    "X-Niso-Signature does not verify with this key's publisher key",
                )
            })?;
            Some(PublisherSignature {
                signature: sig.to_bytes().to_vec(),
                key_id,
            })
        }
        _ => None,
    };
    let committer = app.committer(org.as_ref()).await?;
    // The staged file now belongs to the upload: if this client hangs up,
    // the change that publishes it keeps it.
    let published = committer
        .publish(Upload {
            info,
            staged: StagedFile::Owned(staged.into_temp_path()),
            uploaded_at: unix_now(),
            signature: publisher_signature,
        })
        .await?;
    // The same answer for a retry of the same bytes (its first upload
    // time), so a client whose answer was lost can simply send again.
    let body = serde_json::json!({
        "name": published.name.as_str(),
        "version": published.version.as_str(),
        "arch": published.arch.as_str(),
        "size": published.size,
        "sha256": hex::encode(published.sha256),
        "uploaded_at": json::rfc3339(published.uploaded_at),
    });
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if !published.created {
        resp.headers_mut().insert(
            "x-niso-already-published",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// How fast an upload body must come: at least `upload_min_rate` bytes a
/// second over each window of `upload_rate_window`, no pause longer than the
/// idle timeout, all of it within `upload_timeout`. A client that trickles a
/// byte now and then would otherwise hold a connection and a staged file for
/// as long as it likes.
struct UploadPace {
    deadline: tokio::time::Instant,
    timeout: std::time::Duration,
    min_rate: u64,
    window: std::time::Duration,
    window_start: tokio::time::Instant,
    /// Bytes received when the current window started.
    window_base: u64,
}

/// When to stop waiting for the next chunk, and why.
struct Wait {
    deadline: tokio::time::Instant,
    /// The deadline is the end of a rate window (not the idle timeout or the
    /// overall deadline).
    window_end: bool,
}

impl UploadPace {
    fn new(settings: &crate::server::Settings) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            deadline: now + settings.upload_timeout,
            timeout: settings.upload_timeout,
            min_rate: settings.upload_min_rate,
            // A zero window would judge every chunk alone.
            window: settings
                .upload_rate_window
                .max(std::time::Duration::from_millis(100)),
            window_start: now,
            window_base: 0,
        }
    }

    fn wait(&self, idle: std::time::Duration) -> Wait {
        let idle_end = tokio::time::Instant::now() + idle;
        let mut wait = Wait {
            deadline: idle_end.min(self.deadline),
            window_end: false,
        };
        if self.min_rate > 0 {
            let window_end = self.window_start + self.window;
            if window_end < wait.deadline {
                wait = Wait {
                    deadline: window_end,
                    window_end: true,
                };
            }
        }
        wait
    }

    /// Refuses the upload if its time is up or a finished window brought
    /// too little; starts the next window otherwise.
    fn check(&mut self, received: u64) -> ApiResult<()> {
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "upload not finished within {} s: received {received} bytes",
                    self.timeout.as_secs()
                ),
            ));
        }
        if self.min_rate == 0 || now < self.window_start + self.window {
            return Ok(());
        }
        let elapsed = now.duration_since(self.window_start);
        let needed = (self.min_rate as f64 * elapsed.as_secs_f64()) as u64;
        let got = received - self.window_base;
        if got < needed {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "upload too slow: {got} bytes in the last {:.0} s, the minimum is {} bytes a second",
                    elapsed.as_secs_f64(),
                    self.min_rate
                ),
            ));
        }
        self.window_start = now;
        self.window_base = received;
        Ok(())
    }

    fn stalled(&self) -> ApiError {
        if tokio::time::Instant::now() >= self.deadline {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("upload not finished within {} s", self.timeout.as_secs()),
            )
        } else {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, "upload stalled")
        }
    }
}

/// The limits an upload is checked with: the publisher's (the serve
/// command's flags; every repository's publisher has the same, and the
/// root one is open from start-up), bounded by `--max-upload`.
async fn archive_limits(app: &AppState) -> ApiResult<crate::limits::Limits> {
    let limits = *app.committer(None).await?.publisher().limits();
    Ok(crate::limits::Limits {
        max_archive: app.settings.max_upload,
        ..limits
    })
}

type SignatureParts = (
    ed25519_dalek::Signature,
    ed25519_dalek::VerifyingKey,
    String,
);

/// Parses `X-Niso-Signature` and finds the key to check it with. A key that
/// has a publisher key must sign: otherwise whoever steals the API key could
/// publish unsigned archives in that publisher's name.
fn signature_of(headers: &HeaderMap, key: &KeyRecord) -> ApiResult<Option<SignatureParts>> {
    let Some(value) = headers.get("x-niso-signature") else {
        return match key.publisher_key_id() {
            Some(id) => Err(ApiError::bad_request(format!(
                "this API key has a publisher key ({id}): sign the archive with it and send the signature in X-Niso-Signature"
            ))),
            None => Ok(None),
        };
    };
    let bytes = value
        .to_str()
        .ok()
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .ok_or_else(|| ApiError::bad_request("X-Niso-Signature must be base64"))?;
    let sig = ed25519_dalek::Signature::from_slice(&bytes).map_err(|_| {
        ApiError::bad_request("X-Niso-Signature must be a 64-byte Ed25519 signature")
    })?;
    let (Some(public), Some(key_id)) = (key.publisher_key, key.publisher_key_id()) else {
        return Err(ApiError::bad_request(
            "X-Niso-Signature given, but this API key has no publisher key: an admin registers one with POST /v1/auth/keys/{id}/publisher-key",
        ));
    };
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&public).map_err(ApiError::internal)?;
    Ok(Some((sig, vk, key_id)))
}

/// `DELETE /v1/packages/{name}/{version}/{arch}`
pub async fn delete_artifact(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Response> {
    let org = org_of(&params)?;
    let (name, version, arch) = parse_ids(&params)?;
    require(&caller, Action::Delete, org.as_ref(), &name)?;
    let publisher = app.committer(org.as_ref()).await?.publisher().clone();
    let (n, v, a) = (name.clone(), version.clone(), arch.clone());
    publisher.delete(&n, &v, &a).await?;
    Ok(Json(serde_json::json!({
        "name": name.as_str(), "version": version.as_str(), "arch": arch.as_str(), "deleted": true
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRequest {
    tag: String,
    version: String,
}

/// The body of `POST …/tags`.
pub const TAG_REQUEST: Shape = Shape {
    example: r#"{"tag": "stable", "version": "1.1.0"}"#,
    fields: &[("tag", Kind::String), ("version", Kind::String)],
};

/// `POST /v1/packages/{name}/tags` `{"tag": "stable", "version": "1.1.0"}`
pub async fn set_tag(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(params): Path<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let org = org_of(&params)?;
    let name = PackageName::new(param(&params, "name"))?;
    require(&caller, Action::Push, org.as_ref(), &name)?;
    let req: TagRequest = json_body(&body, &TAG_REQUEST)?;
    let tag = TagName::new(&req.tag)?;
    let version = Version::new(&req.version)?;
    let publisher = app.committer(org.as_ref()).await?.publisher().clone();
    let (n, t, v) = (name.clone(), tag.clone(), version.clone());
    publisher.set_tag(&n, &t, &v).await?;
    Ok(
        Json(serde_json::json!({ "tag": tag.as_str(), "version": version.as_str() }))
            .into_response(),
    )
}

/// `GET /v1/search?q=TERM`: packages whose name or description contains
/// TERM (case-insensitive), best matches first; paginated like the lists.
pub async fn search(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(target): Extension<Target>,
    query: ListQuery,
) -> ApiResult<Response> {
    // `/repos/Team/v1/search` reaches this route too, but names no
    // repository (and must not search the root one).
    if target.resource != door::Resource::Search {
        return Err(ApiError::not_found(match target.why_nothing() {
            Some(why) => format!("no such repository: {why}"),
            None => "no such repository".to_string(),
        }));
    }
    let org = target.repo.clone();
    door::authorize_caller(&app, &caller, &target.access())?;
    let term = query.q.clone().unwrap_or_default();
    let needle = term.trim().to_ascii_lowercase();
    if needle.is_empty() || needle.len() > 100 {
        return Err(ApiError::bad_request("q must be 1 to 100 characters"));
    }
    let prefix = org
        .as_ref()
        .map(|o| format!("repos/{o}/"))
        .unwrap_or_default();
    let path = crate::store::TreePath::new(format!("{prefix}{}", layout::V1_INDEX))
        .map_err(ApiError::internal)?;
    let bytes = match app.store.get(&path).await {
        Ok(Some(o)) => o.bytes,
        Ok(None) => return Err(ApiError::not_found("no such repository")),
        Err(e) => return Err(ApiError::internal(e)),
    };
    let list: json::PackageList = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
    let mut hits: Vec<(u8, json::PackageSummary)> = list
        .packages
        .into_iter()
        .filter_map(|p| {
            let name = p.name.to_ascii_lowercase();
            let desc = p.description.as_deref().unwrap_or("").to_ascii_lowercase();
            let rank = if name == needle {
                0
            } else if name.starts_with(&needle) {
                1
            } else if name.contains(&needle) {
                2
            } else if desc.contains(&needle) {
                3
            } else {
                return None;
            };
            Some((rank, p))
        })
        .collect();
    hits.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let results: Vec<json::PackageSummary> = hits.into_iter().map(|(_, p)| p).collect();
    // Relevance order unless the caller asks for another.
    let (results, pagination) = if query.sort_by.is_some() {
        files::page_of(
            results,
            &query,
            &target.path,
            files::package_sort_key,
            "name",
        )?
    } else {
        let ranked: Vec<(usize, json::PackageSummary)> = results.into_iter().enumerate().collect();
        let (page, pagination) = files::page_of(
            ranked,
            &query,
            &target.path,
            |(i, _), _| Ok(format!("{i:010}")),
            "rank",
        )?;
        (page.into_iter().map(|(_, p)| p).collect(), pagination)
    };
    let mut resp = json_response(
        &serde_json::json!({ "term": term, "results": results, "pagination": pagination }),
    );
    files::set_cache_control(&mut resp, &target);
    Ok(resp)
}
