//! Key management (admin only) and publisher keys.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;

use crate::auth::{KeyRecord, KeyStore, KeyStoreError, Scopes};
use crate::index::json::rfc3339;
use crate::publish::unix_now;
use crate::server::error::{ApiError, ApiResult};
use crate::server::middleware::Caller;
use crate::server::AppState;

fn keystore(app: &AppState) -> ApiResult<&KeyStore> {
    app.keys
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this registry is read-only"))
}

fn require_admin(caller: &Caller) -> ApiResult<&KeyRecord> {
    let key = caller.key().ok_or_else(ApiError::unauthorized)?;
    if key.scopes.is_admin() {
        Ok(key)
    } else {
        Err(ApiError::forbidden(
            "only a key with the admin scope may manage keys",
        ))
    }
}

fn key_error(e: KeyStoreError) -> ApiError {
    match e {
        KeyStoreError::Scope(e) => ApiError::bad_request(e.to_string()),
        KeyStoreError::Name(_) | KeyStoreError::PublisherKey(_) => {
            ApiError::bad_request(e.to_string())
        }
        KeyStoreError::NotFound(_) => ApiError::not_found(e.to_string()),
        other => ApiError::internal(other),
    }
}

fn key_json(k: &KeyRecord) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": k.id,
        "name": k.name,
        "scopes": k.scopes.to_strings(),
        "created_at": rfc3339(k.created_at),
        "last_used": k.last_used.map(rfc3339),
    });
    if let Some(id) = k.publisher_key_id() {
        v["publisher_key_id"] = id.into();
    }
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    scopes: Vec<String>,
}

/// `POST /v1/auth/keys` `{"name": "ci-deploy", "scopes": ["push:my-*"]}`
pub async fn create_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let req: CreateKey = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be {{\"name\": ..., \"scopes\": [...]}}: {e}"
        ))
    })?;
    let scopes = Scopes::parse(&req.scopes).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let app2 = app.clone();
    let new = tokio::task::spawn_blocking(move || {
        keystore(&app2)?
            .create(&req.name, &scopes, unix_now(), None)
            .map_err(key_error)
    })
    .await
    .map_err(ApiError::internal)??;
    let mut body = key_json(&new.record);
    body["key"] = new.key.expose().into();
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/auth/keys`: every live key, never the key itself.
pub async fn list_keys(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let app2 = app.clone();
    let keys = tokio::task::spawn_blocking(move || keystore(&app2)?.list().map_err(key_error))
        .await
        .map_err(ApiError::internal)??;
    let keys: Vec<_> = keys.iter().map(key_json).collect();
    Ok(Json(serde_json::json!({ "keys": keys })).into_response())
}

/// `DELETE /v1/auth/keys/{id}`: effective on the key's next request.
pub async fn revoke_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let id = params.get("id").cloned().unwrap_or_default();
    let app2 = app.clone();
    let id2 = id.clone();
    tokio::task::spawn_blocking(move || {
        keystore(&app2)?.revoke(&id2, unix_now()).map_err(key_error)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(serde_json::json!({ "id": id, "revoked": true })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherKey {
    /// Base64 of the 32-byte Ed25519 public key.
    public_key: String,
}

/// `POST /v1/auth/publisher-key` `{"public_key": "<base64>"}`: registers the
/// Ed25519 key that checks this API key's `X-Niso-Signature` headers.
pub async fn register_publisher_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let key = caller.key().ok_or_else(ApiError::unauthorized)?.clone();
    let req: PublisherKey = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be {{\"public_key\": \"<base64>\"}}: {e}"
        ))
    })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(req.public_key.trim())
        .map_err(|_| ApiError::bad_request("public_key must be base64"))?;
    let app2 = app.clone();
    let id = key.id.clone();
    tokio::task::spawn_blocking(move || {
        keystore(&app2)?
            .set_publisher_key(&id, &bytes)
            .map_err(key_error)
    })
    .await
    .map_err(ApiError::internal)??;
    let app3 = app.clone();
    let listed = tokio::task::spawn_blocking(move || keystore(&app3)?.list().map_err(key_error))
        .await
        .map_err(ApiError::internal)??;
    let record = listed
        .into_iter()
        .find(|k| k.id == key.id)
        .ok_or_else(|| ApiError::not_found("key revoked"))?;
    Ok(Json(key_json(&record)).into_response())
}
