//! Key management (admin only) and publisher keys.
//!
//! Registering a publisher key is an admin act, done for a given API key:
//! if an API key could set its own, whoever stole it could sign as the
//! publisher. The list of publisher keys is public, as their place in the
//! signed tree will be.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;

use crate::auth::{
    publisher_key_fingerprint, publisher_key_id, KeyRecord, KeyStore, KeyStoreError,
    PublisherKeyRecord, Scopes,
};
use crate::index::json::rfc3339;
use crate::publish::unix_now;
use crate::server::error::{ApiError, ApiResult};
use crate::server::handlers::body::{json_body, Kind, Shape};
use crate::server::middleware::Caller;
use crate::server::AppState;

fn keystore(app: &AppState) -> ApiResult<&KeyStore> {
    app.keys.as_ref().ok_or_else(|| ApiError::read_only(""))
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
        KeyStoreError::LastAdmin(_) => ApiError::conflict(e.to_string()),
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
    if let Some(public) = &k.publisher_key {
        v["publisher_key_id"] = publisher_key_id(public).into();
        v["publisher_key_fingerprint"] = publisher_key_fingerprint(public).into();
    }
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    scopes: Vec<String>,
}

/// The body of `POST /v1/auth/keys`.
pub const CREATE_KEY: Shape = Shape {
    example: r#"{"name": "ci-deploy", "scopes": ["push:my-*"]}"#,
    fields: &[("name", Kind::String), ("scopes", Kind::Strings)],
};

/// `POST /v1/auth/keys` `{"name": "ci-deploy", "scopes": ["push:my-*"]}`
pub async fn create_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let req: CreateKey = json_body(&body, &CREATE_KEY)?;
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
    // Its publisher key, if it had one, is retired in the signed tree too.
    app.republish_publisher_keys().await?;
    Ok(Json(serde_json::json!({ "id": id, "revoked": true })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherKey {
    /// Base64 of the 32-byte Ed25519 public key.
    public_key: String,
}

/// The body of `POST /v1/auth/keys/{id}/publisher-key`.
pub const PUBLISHER_KEY: Shape = Shape {
    example: r#"{"public_key": "<base64 of the 32-byte Ed25519 public key>"}"#,
    fields: &[("public_key", Kind::String)],
};

/// `POST /v1/auth/keys/{id}/publisher-key` `{"public_key": "<base64>"}`
/// (admin): registers, or replaces, the Ed25519 key that checks API key
/// `id`'s `X-Niso-Signature` headers. From then on that key must sign every
/// upload. A replaced key stays listed, retired.
pub async fn register_publisher_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(params): Path<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let id = params.get("id").cloned().unwrap_or_default();
    let req: PublisherKey = json_body(&body, &PUBLISHER_KEY)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(req.public_key.trim())
        .map_err(|_| ApiError::bad_request("public_key must be base64"))?;
    let app2 = app.clone();
    let record = tokio::task::spawn_blocking(move || {
        let keys = keystore(&app2)?;
        keys.set_publisher_key(&id, &bytes, unix_now())
            .map_err(key_error)?;
        keys.list()
            .map_err(key_error)?
            .into_iter()
            .find(|k| k.id == id)
            // Revoked between the two statements.
            .ok_or_else(|| key_error(KeyStoreError::NotFound(id)))
    })
    .await
    .map_err(ApiError::internal)??;
    // Into the signed tree, so clients can check signatures offline.
    app.republish_publisher_keys().await?;
    Ok(Json(key_json(&record)).into_response())
}

/// `POST /v1/auth/publisher-key`, the old self-service route: an API key may
/// no longer choose its own publisher key.
pub async fn retired_publisher_key_route() -> ApiResult<Response> {
    Err(ApiError::new(
        StatusCode::GONE,
        "an API key can no longer register its own publisher key: an admin key registers it with POST /v1/auth/keys/{id}/publisher-key",
    ))
}

fn publisher_key_json(k: &PublisherKeyRecord) -> serde_json::Value {
    serde_json::json!({
        "api_key_id": k.api_key_id,
        "api_key_name": k.api_key_name,
        "public_key": base64::engine::general_purpose::STANDARD.encode(k.public_key),
        "index_key_id": k.index_key_id(),
        "fingerprint": k.fingerprint(),
        "registered_at": rfc3339(k.registered_at),
        "retired_at": k.retired_at.map(rfc3339),
    })
}

/// `GET /v1/auth/publisher-keys`: every publisher key ever registered,
/// current (`retired_at` null) and retired, oldest first. Public: these are
/// public keys, and a client checking an old release's signature needs the
/// key that made it.
pub async fn list_publisher_keys(State(app): State<AppState>) -> ApiResult<Response> {
    let app2 = app.clone();
    let keys =
        tokio::task::spawn_blocking(move || keystore(&app2)?.publisher_keys().map_err(key_error))
            .await
            .map_err(ApiError::internal)??;
    let keys: Vec<_> = keys.iter().map(publisher_key_json).collect();
    Ok(Json(serde_json::json!({ "publisher_keys": keys })).into_response())
}
