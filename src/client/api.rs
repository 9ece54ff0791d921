//! The write API of seed 000 from the client's side: keys, tags, uploads.
//!
//! The protocol part is sans-IO: each call is a [`Call`] value (method,
//! path, JSON body) and each answer is parsed from `(status, body)` into a
//! typed value or a typed [`ApiError`], so it is tested without a network.
//! [`ApiClient`] only moves those values over HTTP.

use std::io::Read;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ident::{Arch, PackageName, RepoName, TagName, Version};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the registry refused the request without a valid API key ({message}): log in with `niso login URL --key KEY`, or set NISO_KEY")]
    Unauthorized { message: String },
    #[error("the registry refused: {message}; ask an admin for a key with that scope")]
    Forbidden { message: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    #[error("conflict: {message}")]
    Conflict { message: String },
    #[error("refused: {message}")]
    BadRequest { message: String },
    #[error("too large: {message}")]
    TooLarge { message: String },
    #[error("rate limited by the registry ({message}); try again in {retry_after} s")]
    RateLimited { message: String, retry_after: u64 },
    #[error("the registry is unavailable ({status}: {message}); try again later")]
    Unavailable { status: u16, message: String },
    #[error("the registry answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the registry's answer is not what the API promises: {reason}")]
    Decode { reason: String },
    #[error("cannot reach the registry at {url}: {reason}")]
    Transport { url: String, reason: String },
}

impl ApiError {
    /// Whether sending the same request again may succeed: the answer was
    /// lost, or the server asked to retry.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Transport { .. } | Self::Unavailable { .. } | Self::RateLimited { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
}

/// One request of the API, before any I/O.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: Method,
    /// From the registry's root, starting with `/`.
    pub path: String,
    pub body: Option<serde_json::Value>,
}

fn repo_prefix(org: Option<&RepoName>) -> String {
    org.map(|o| format!("/repos/{o}")).unwrap_or_default()
}

pub fn create_key(name: &str, scopes: &[String]) -> Call {
    Call {
        method: Method::Post,
        path: "/v1/auth/keys".into(),
        body: Some(serde_json::json!({ "name": name, "scopes": scopes })),
    }
}

pub fn list_keys() -> Call {
    Call {
        method: Method::Get,
        path: "/v1/auth/keys".into(),
        body: None,
    }
}

/// Key ids are `key_` and letters and digits; anything else is refused
/// before it reaches a URL.
pub fn revoke_key(id: &str) -> Result<Call, ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ApiError::BadRequest {
            message: format!("{id:?} is not a key id (see `niso registry list-keys`)"),
        });
    }
    Ok(Call {
        method: Method::Delete,
        path: format!("/v1/auth/keys/{id}"),
        body: None,
    })
}

pub fn set_tag(
    org: Option<&RepoName>,
    name: &PackageName,
    tag: &TagName,
    version: &Version,
) -> Call {
    Call {
        method: Method::Post,
        path: format!("{}/v1/packages/{name}/tags", repo_prefix(org)),
        body: Some(serde_json::json!({ "tag": tag.as_str(), "version": version.as_str() })),
    }
}

pub fn upload_path(
    org: Option<&RepoName>,
    name: &PackageName,
    version: &Version,
    arch: &Arch,
) -> String {
    format!("{}/v1/packages/{name}/{version}/{arch}", repo_prefix(org))
}

/// `POST /v1/auth/keys` → 201
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub key: String,
}

/// One entry of `GET /v1/auth/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub last_used: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_key_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyList {
    pub keys: Vec<KeyInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TagSet {
    pub tag: String,
    pub version: String,
}

/// `POST /v1/packages/{name}/{version}/{arch}` → 201 (or 200 for bytes
/// already published, once the server answers so).
#[derive(Debug, Clone, Deserialize)]
pub struct Uploaded {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// Parses an answer: a 2xx body into `T`, anything else into an error.
pub fn parse<T: DeserializeOwned>(
    status: u16,
    retry_after: Option<u64>,
    body: &[u8],
) -> Result<T, ApiError> {
    if (200..300).contains(&status) {
        return serde_json::from_slice(body).map_err(|e| ApiError::Decode {
            reason: e.to_string(),
        });
    }
    Err(error_of(status, retry_after, body))
}

/// The error an unsuccessful answer means. The server's message (the
/// `{"error": …}` envelope) is kept; a body that is not one (a proxy's HTML
/// page) is summarised, never dumped.
pub fn error_of(status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| format!("HTTP {status}"));
    match status {
        401 => ApiError::Unauthorized { message },
        403 => ApiError::Forbidden { message },
        404 => ApiError::NotFound { message },
        409 => ApiError::Conflict { message },
        400 | 422 => ApiError::BadRequest { message },
        413 => ApiError::TooLarge { message },
        429 => ApiError::RateLimited {
            message,
            retry_after: retry_after.unwrap_or(60),
        },
        502..=504 => ApiError::Unavailable { status, message },
        _ => ApiError::Status { status, message },
    }
}

/// Moves [`Call`]s over HTTP to one registry, with its API key.
pub struct ApiClient {
    base: String,
    key: Option<String>,
    http: reqwest::blocking::Client,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A raw answer: status, `Retry-After` seconds, body.
pub type Answer = (u16, Option<u64>, Vec<u8>);

impl ApiClient {
    pub fn new(base: &str, key: Option<String>) -> Result<Self, ApiError> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Uploads of large archives take long; stalls are caught by the
            // server's idle timeout and the connection's own errors.
            .timeout(None)
            .user_agent(concat!("niso/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport {
                url: base.to_string(),
                reason: super::transport::error_chain(&e),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            key,
            http,
        })
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    fn request(&self, method: Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let url = format!("{}{path}", self.base);
        let req = match method {
            Method::Get => self.http.get(url),
            Method::Post => self.http.post(url),
            Method::Delete => self.http.delete(url),
        };
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    fn send(&self, path: &str, req: reqwest::blocking::RequestBuilder) -> Result<Answer, ApiError> {
        let transport = |e: &dyn std::error::Error| ApiError::Transport {
            url: format!("{}{path}", self.base),
            reason: super::transport::error_chain(e),
        };
        let resp = req.send().map_err(|e| transport(&e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        // Answers of this API are small JSON documents: cap what is read.
        let mut body = Vec::new();
        resp.take(1 << 20)
            .read_to_end(&mut body)
            .map_err(|e| transport(&e))?;
        Ok((status, retry_after, body))
    }

    /// Sends a JSON call and parses its answer.
    pub fn call<T: DeserializeOwned>(&self, call: &Call) -> Result<T, ApiError> {
        let mut req = self.request(call.method, &call.path);
        if let Some(body) = &call.body {
            req = req.json(body);
        }
        let (status, retry_after, body) = self.send(&call.path, req)?;
        parse(status, retry_after, &body)
    }

    /// Streams `len` bytes from `body` as an upload to `path`.
    pub fn upload(
        &self,
        path: &str,
        body: impl Read + Send + 'static,
        len: u64,
        signature: Option<&str>,
    ) -> Result<Answer, ApiError> {
        let mut req = self
            .request(Method::Post, path)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::blocking::Body::sized(body, len));
        if let Some(sig) = signature {
            req = req.header("x-niso-signature", sig);
        }
        self.send(path, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_built_as_seed_000_says() {
        let c = create_key("ci-deploy", &["push:my-*".to_string()]);
        assert_eq!(c.method, Method::Post);
        assert_eq!(c.path, "/v1/auth/keys");
        assert_eq!(
            c.body.unwrap(),
            serde_json::json!({"name": "ci-deploy", "scopes": ["push:my-*"]})
        );
        let org = RepoName::new("team").unwrap();
        let name = PackageName::new("my-api").unwrap();
        let c = set_tag(
            Some(&org),
            &name,
            &TagName::new("stable").unwrap(),
            &Version::new("1.0.0").unwrap(),
        );
        assert_eq!(c.path, "/repos/team/v1/packages/my-api/tags");
        assert_eq!(
            upload_path(
                None,
                &name,
                &Version::new("1.0.0").unwrap(),
                &Arch::new("x86_64").unwrap()
            ),
            "/v1/packages/my-api/1.0.0/x86_64"
        );
        assert_eq!(
            revoke_key("key_abc123").unwrap().path,
            "/v1/auth/keys/key_abc123"
        );
        for bad in ["", "../admin", "key/1", "a b"] {
            assert!(revoke_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_become_typed_values_or_errors() {
        let ok: TagSet = parse(200, None, br#"{"tag":"stable","version":"1.0.0"}"#).unwrap();
        assert_eq!((ok.tag.as_str(), ok.version.as_str()), ("stable", "1.0.0"));
        let e = parse::<TagSet>(
            409,
            None,
            br#"{"error":"my-api 1.0.0 (x86_64) is already published","status":409}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, ApiError::Conflict { message } if message.contains("already published"))
        );
        assert!(matches!(
            parse::<TagSet>(401, None, b"{}"),
            Err(ApiError::Unauthorized { .. })
        ));
        let e = parse::<TagSet>(429, Some(7), b"").unwrap_err();
        assert!(e.to_string().contains("7 s"));
        assert!(e.is_retryable());
        let e = parse::<TagSet>(502, None, b"<html>bad gateway</html>").unwrap_err();
        assert!(e.is_retryable());
        assert!(!e.to_string().contains("html"));
        assert!(matches!(
            parse::<TagSet>(200, None, b"not json"),
            Err(ApiError::Decode { .. })
        ));
        assert!(!parse::<TagSet>(403, None, b"{}")
            .unwrap_err()
            .is_retryable());
    }
}
