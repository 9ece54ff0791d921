//! `GET /v1/auth/check`: the question nginx's `auth_request` asks before it
//! serves a file of an organization repository, or any `v1/` download.
//!
//! The path comes in `X-Original-URI` as nginx normalised it (`$uri`:
//! decoded, dot segments resolved, slashes merged), and goes through the
//! same [`door`] as every request to `serve`, spelled
//! [`Spelling::Normalised`]: it is not decoded a second time, and a path
//! that is not already normal is refused. So the file nginx serves is the
//! file this check judged.
//!
//! Answers: 200 (the caller may read it; for a download,
//! `X-Niso-Content-Disposition` carries the header to send, since nginx
//! cannot read an index to learn which version `latest/ARCH` is), 401 (no
//! key), 403 (not this key), and otherwise what `serve` itself would answer
//! the read with (400 for a refused path, 404 for a path that names no
//! file, 429). nginx turns anything but 2xx/401/403 into a 500;
//! `nginx.conf.example` sends those, and 401/403, on to `serve`, which
//! then gives the caller the same answer it gives without nginx.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use crate::server::door::{self, FileKind, Spelling};
use crate::server::error::{ApiError, ApiResult};
use crate::server::files;
use crate::server::middleware::Caller;
use crate::server::AppState;

/// The header that carries a download's `Content-Disposition` to nginx.
pub const DISPOSITION_HEADER: &str = "x-niso-content-disposition";

/// `GET /v1/auth/check` with `X-Original-URI: $uri`.
pub async fn check_pull(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let uri = headers
        .get("x-original-uri")
        .ok_or_else(|| ApiError::bad_request("X-Original-URI header required"))?;
    let target = door::open(uri.as_bytes(), Spelling::Normalised)?;
    let Some(file) = target.file() else {
        return Err(target.not_found());
    };
    door::authorize_caller(&app, &caller, &target.access())?;
    let mut resp = StatusCode::OK.into_response();
    if matches!(file.kind, FileKind::V1Download { .. }) {
        let disposition = files::content_disposition(&app, &target)
            .await
            .ok_or_else(|| ApiError::not_found("no such file"))?;
        let value = HeaderValue::from_str(&disposition).map_err(ApiError::internal)?;
        resp.headers_mut().insert(DISPOSITION_HEADER, value);
    }
    Ok(resp)
}
