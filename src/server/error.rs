//! The one error shape of the HTTP API: `{"error": "...", "status": N}`.
//!
//! Handlers return [`ApiError`]; unexpected failures are logged with their
//! cause and answered with a fixed 500 message, so internals never leak.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::ident::IdentError;
use crate::publish::PublishError;

/// Most bytes of a client's own text quoted back in a message.
pub const QUOTE_MAX: usize = 100;

/// `s` cut to [`QUOTE_MAX`] bytes at a character boundary, `…` marking a
/// cut: a message quotes what it refuses, but not 64 KiB of it.
pub fn cut(s: &str) -> String {
    if s.len() <= QUOTE_MAX {
        return s.to_string();
    }
    let mut end = QUOTE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// How every refusal of a `--read-only` server starts.
pub const READ_ONLY: &str = "this registry is read-only (a mirror)";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Extra headers (Retry-After, WWW-Authenticate).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }

    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication required: send Authorization: Bearer niso_k1_...",
        );
        e.headers.push(("www-authenticate", "Bearer".into()));
        e
    }

    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }

    /// The answer of a `--read-only` server to any write or key-management
    /// request, whatever its Authorization header says (such a server has no
    /// keys). `allow` is what the path still answers to (`GET, HEAD` for a
    /// file of the tree, nothing for the key API), as a 405 must say.
    pub fn read_only(allow: &str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{READ_ONLY}: it takes no uploads, deletes, tags or key management; send them to the registry it copies"),
        );
        e.headers.push(("allow", allow.to_string()));
        e
    }

    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// Logs the real cause; the client sees a fixed message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
    }
}

/// An identifier from a URL or a body that breaks its rule: 400 with the
/// rule, the identifier cut (see [`cut_ident`]).
impl From<IdentError> for ApiError {
    fn from(e: IdentError) -> Self {
        Self::bad_request(cut_ident(e).to_string())
    }
}

/// `e` with the client's identifier in it cut (see [`cut`]).
pub fn cut_ident(e: IdentError) -> IdentError {
    match e {
        IdentError::PackageName { name, rule } => IdentError::PackageName {
            name: cut(&name),
            rule,
        },
        IdentError::Version { version, reason } => IdentError::Version {
            version: cut(&version),
            reason,
        },
        IdentError::Arch { arch, rule } => IdentError::Arch {
            arch: cut(&arch),
            rule,
        },
        IdentError::RepoName { name, rule } => IdentError::RepoName {
            name: cut(&name),
            rule,
        },
        IdentError::Tag { tag, rule } => IdentError::Tag {
            tag: cut(&tag),
            rule,
        },
        // A variant added later is quoted whole until it is listed here.
        #[allow(unreachable_patterns)]
        other => other,
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Conflict(m) => Self::conflict(m),
            PublishError::NotFound(m) => Self::not_found(m),
            PublishError::Invalid(m) => Self::bad_request(m),
            PublishError::Ident(e) => Self::from(e),
            PublishError::Archive(e) => Self::bad_request(format!("invalid archive: {e}")),
            // This change's write failed, or mending the tree after an
            // earlier one did. The cause was logged when the write failed
            // (and may name paths on the server); the change is safe to
            // retry.
            e @ PublishError::Aborted(_) => {
                tracing::warn!(error = %e, "change not applied");
                let mut err = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the registry could not write this change to its tree; try again",
                );
                err.headers.push(("retry-after", "1".to_string()));
                err
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "status": self.status.as_u16() });
        let mut resp = (self.status, Json(body)).into_response();
        for (name, value) in self.headers {
            if let Ok(v) = value.parse() {
                resp.headers_mut().insert(name, v);
            }
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
