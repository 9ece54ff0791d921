//! Where a client reads a tree from: a local directory or an HTTP(S) base URL.
//!
//! "Not found" is told apart from "broken" ([`TransportError::NotFound`]): a
//! missing file is a finding for `verify`, an unreachable server is not.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{location}: not found")]
    NotFound { location: String },
    #[error("{location}: larger than the limit of {limit} bytes")]
    TooLarge { location: String, limit: u64 },
    /// The server turned the request away for now (429, 502, 503, 504):
    /// the same request may succeed later, after `retry_after` seconds
    /// when the server said (`Retry-After`).
    #[error("{location}: HTTP {status}: the server is busy or limits the rate of requests{}; try again later", retry_after.map(|s| format!(" (it asks to wait {s} s)")).unwrap_or_default())]
    Busy {
        location: String,
        status: u16,
        retry_after: Option<u64>,
    },
    #[error("{location}: {reason}")]
    Other { location: String, reason: String },
}

/// Fetches files of a tree by their path relative to its root.
pub trait Transport: Send + Sync {
    /// The whole file, at most `limit` bytes.
    fn fetch(&self, path: &str, limit: u64) -> Result<Vec<u8>, TransportError>;
    /// Streams the file into `out` (at most `limit` bytes); returns its length.
    fn fetch_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64, TransportError>;
    /// Human-readable location of `path`, for messages.
    fn location(&self, path: &str) -> String;
}

/// A tree in a local directory.
pub struct DirTransport {
    root: PathBuf,
}

impl DirTransport {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Transport for DirTransport {
    fn fetch(&self, path: &str, limit: u64) -> Result<Vec<u8>, TransportError> {
        let mut out = Vec::new();
        self.fetch_to(path, &mut out, limit)?;
        Ok(out)
    }

    fn fetch_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64, TransportError> {
        let location = self.location(path);
        let file = std::fs::File::open(self.root.join(path)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TransportError::NotFound {
                    location: location.clone(),
                }
            } else {
                TransportError::Other {
                    location: location.clone(),
                    reason: e.to_string(),
                }
            }
        })?;
        copy_limited(file, out, limit, &location)
    }

    fn location(&self, path: &str) -> String {
        self.root.join(path).display().to_string()
    }
}

/// A tree served over HTTP(S) by any static host.
pub struct HttpTransport {
    base: String,
    client: reqwest::blocking::Client,
    /// Sent as `Authorization: Bearer …` (organization repositories are
    /// readable with a `pull:` key only).
    bearer: Option<String>,
}

impl HttpTransport {
    pub fn new(base: &str) -> Result<Self, TransportError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("niso/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TransportError::Other {
                location: base.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            client,
            bearer: None,
        })
    }

    /// The same, sending `key` with every request.
    pub fn with_key(base: &str, key: Option<&str>) -> Result<Self, TransportError> {
        let mut t = Self::new(base)?;
        t.bearer = key.map(str::to_string);
        Ok(t)
    }
}

impl Transport for HttpTransport {
    fn fetch(&self, path: &str, limit: u64) -> Result<Vec<u8>, TransportError> {
        let mut out = Vec::new();
        self.fetch_to(path, &mut out, limit)?;
        Ok(out)
    }

    fn fetch_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64, TransportError> {
        let location = self.location(path);
        let other = |reason: String| TransportError::Other {
            location: location.clone(),
            reason,
        };
        let mut req = self.client.get(&location);
        if let Some(k) = &self.bearer {
            req = req.bearer_auth(k);
        }
        let resp = req.send().map_err(|e| other(error_chain(&e)))?;
        match resp.status() {
            s if s.is_success() => {}
            reqwest::StatusCode::UNAUTHORIZED => {
                return Err(other(
                    "HTTP 401: this registry wants an API key to read this; log in with `niso login URL --key KEY` or set NISO_KEY".into(),
                ))
            }
            reqwest::StatusCode::FORBIDDEN if self.bearer.is_some() => {
                return Err(other(
                    "HTTP 403: the API key may not read this (it needs a matching pull: scope)"
                        .into(),
                ))
            }
            reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::FORBIDDEN => {
                // S3 answers 403 for a missing key when listing is not allowed.
                return Err(TransportError::NotFound { location });
            }
            s @ (reqwest::StatusCode::TOO_MANY_REQUESTS
            | reqwest::StatusCode::BAD_GATEWAY
            | reqwest::StatusCode::SERVICE_UNAVAILABLE
            | reqwest::StatusCode::GATEWAY_TIMEOUT) => {
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                return Err(TransportError::Busy {
                    location,
                    status: s.as_u16(),
                    retry_after,
                });
            }
            s => return Err(other(format!("HTTP {s}"))),
        }
        copy_limited(resp, out, limit, &location)
    }

    fn location(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

/// reqwest's own message ("error sending request") hides the cause
/// (connection refused, DNS); show the whole chain once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn copy_limited(
    r: impl Read,
    out: &mut dyn Write,
    limit: u64,
    location: &str,
) -> Result<u64, TransportError> {
    let n = std::io::copy(&mut r.take(limit.saturating_add(1)), out).map_err(|e| {
        TransportError::Other {
            location: location.to_string(),
            reason: e.to_string(),
        }
    })?;
    if n > limit {
        return Err(TransportError::TooLarge {
            location: location.to_string(),
            limit,
        });
    }
    Ok(n)
}
