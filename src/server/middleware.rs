//! What every request passes: authentication, rate limiting, one log line.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::auth::{ApiKey, KeyRecord};
use crate::publish::unix_now;

/// Who is calling, set by [`authenticate`] for handlers to read.
#[derive(Debug, Clone)]
pub enum Caller {
    Anonymous,
    Key(Box<KeyRecord>),
}

impl Caller {
    pub fn key(&self) -> Option<&KeyRecord> {
        match self {
            Caller::Key(k) => Some(k),
            Caller::Anonymous => None,
        }
    }
}

/// Reads the API key from `Authorization`: `Bearer KEY`, or the bare key as
/// Hex clients send it. `Ok(None)` when there is no header.
pub fn presented_key(headers: &HeaderMap) -> Result<Option<ApiKey>, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("the Authorization header must be ASCII"))?
        .trim();
    let key = match text.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        Some(_) => return Err(ApiError::unauthorized()),
        None => text,
    };
    ApiKey::parse(key).map(Some).map_err(|_| {
        let mut e = ApiError::unauthorized();
        e.message = "invalid API key".into();
        e
    })
}

pub async fn authenticate(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    // A load balancer's health check must never be refused: /health needs
    // no key and spends no rate-limit token.
    if req.uri().path() == "/health" {
        req.extensions_mut().insert(Caller::Anonymous);
        return next.run(req).await;
    }
    let forwarded = app
        .settings
        .trust_proxy
        .then(|| req.headers().get("x-forwarded-for"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        // The proxy appends the address it saw last.
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_string());
    let ip = forwarded.unwrap_or_else(|| {
        req.extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_else(|| "unknown".into())
    });
    // An address that has failed authentication too often is refused before
    // its key is looked at, so guessing gets no answer, right or wrong.
    let failures = &app.auth_failure_limiter;
    let presents_key = app.keys.is_some()
        && req
            .headers()
            .contains_key(axum::http::header::AUTHORIZATION);
    if presents_key && failures.enabled() {
        let d = failures.peek(&ip);
        if !d.allowed {
            return too_many_failures(&d);
        }
    }
    let caller = match resolve(&app, req.headers()).await {
        Ok(c) => c,
        Err(e) => {
            // A wrong, malformed or revoked key spends a token; a server
            // error (the key database) does not.
            let failed = matches!(
                e.status,
                axum::http::StatusCode::UNAUTHORIZED | axum::http::StatusCode::BAD_REQUEST
            );
            if !(failed && failures.enabled()) {
                return e.into_response();
            }
            let d = failures.check(&ip);
            if !d.allowed {
                return too_many_failures(&d);
            }
            let mut resp = e.into_response();
            add_rate_headers(resp.headers_mut(), &d);
            return resp;
        }
    };
    let (limiter, bucket) = match &caller {
        Caller::Key(k) => (&app.key_limiter, format!("key:{}", k.id)),
        Caller::Anonymous => (&app.ip_limiter, format!("ip:{ip}")),
    };
    let decision = limiter.enabled().then(|| limiter.check(&bucket));
    if let Some(d) = decision.filter(|d| !d.allowed) {
        let mut e = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            format!(
                "rate limit of {} requests a minute exceeded; retry in {} s",
                d.limit, d.retry_after
            ),
        );
        e.headers.push(("retry-after", d.retry_after.to_string()));
        let mut resp = e.into_response();
        add_rate_headers(resp.headers_mut(), &d);
        return resp;
    }
    req.extensions_mut().insert(caller);
    let mut resp = next.run(req).await;
    if let Some(d) = decision {
        add_rate_headers(resp.headers_mut(), &d);
    }
    resp
}

/// The 429 of an address whose failed-authentication budget is spent.
fn too_many_failures(d: &super::ratelimit::Decision) -> Response {
    let mut e = ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        format!(
            "too many failed authentications from this address (limit {} a minute); retry in {} s",
            d.limit, d.retry_after
        ),
    );
    e.headers.push(("retry-after", d.retry_after.to_string()));
    let mut resp = e.into_response();
    add_rate_headers(resp.headers_mut(), d);
    resp
}

async fn resolve(app: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if app.keys.is_none() {
        // A read-only server has no keys and never reads the header:
        // everything it serves is public, and it refuses writes the same
        // way whatever the header says.
        return Ok(Caller::Anonymous);
    }
    let Some(key) = presented_key(headers)? else {
        return Ok(Caller::Anonymous);
    };
    let app = app.clone();
    let found = tokio::task::spawn_blocking(move || {
        app.keys
            .as_ref()
            .map(|s| s.authenticate(&key, unix_now()))
            .transpose()
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?
    .flatten();
    match found {
        Some(record) => Ok(Caller::Key(Box::new(record))),
        None => {
            let mut e = ApiError::unauthorized();
            e.message = "invalid or revoked API key".into();
            Err(e)
        }
    }
}

/// Wraps the write and key-management routes: on a `--read-only` server
/// they answer 405 before their handlers run, whoever calls (see
/// [`ApiError::read_only`]). `allow` is what the route's path still answers
/// to there.
pub async fn refuse_when_read_only(
    State((app, allow)): State<(AppState, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    if app.settings.read_only {
        return ApiError::read_only(allow).into_response();
    }
    next.run(req).await
}

fn add_rate_headers(h: &mut HeaderMap, d: &super::ratelimit::Decision) {
    let reset = unix_now() as u64 + d.reset_after;
    for (name, value) in [
        ("x-ratelimit-limit", d.limit.to_string()),
        ("x-ratelimit-remaining", d.remaining.to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

/// One structured log line per request; and every error answer in the JSON
/// envelope, including those made by the framework (405, 408, 413).
pub async fn log_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let reason = status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase();
        let mut json = ApiError::new(status, reason).into_response();
        for (name, value) in resp.headers() {
            if name != axum::http::header::CONTENT_TYPE
                && name != axum::http::header::CONTENT_LENGTH
            {
                json.headers_mut().insert(name.clone(), value.clone());
            }
        }
        resp = json;
    }
    tracing::info!(
        %method,
        path,
        status = resp.status().as_u16(),
        // Two decimals (10 µs) is all a request log needs; the raw float
        // printed as `ms=0.06640800000000001`.
        ms = (start.elapsed().as_secs_f64() * 100_000.0).round() / 100.0,
        "request"
    );
    resp
}
