//! Request handlers, one module per resource, named `<verb>_<resource>`.

pub mod body;
pub mod check;
pub mod keys;
pub mod packages;

use axum::Json;

/// `GET /health`
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
