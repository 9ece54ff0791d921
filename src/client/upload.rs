//! `push`: upload an archive, safe to re-run.
//!
//! The archive is first copied into a private snapshot, and everything —
//! the checks, the publisher signature, the upload — uses that snapshot, so
//! the bytes signed are the bytes sent even if the file changes meanwhile.
//!
//! Whether a version is already published is decided from the registry's
//! signed index, not from the server's status code: the archive's SHA-256
//! equal to the index's means the same bytes are published (a success, so
//! CI can re-run a push), another SHA-256 means a conflict. The index is
//! read before uploading (nothing to send when the bytes are there), and
//! again when the server answers 409. An answer lost on the way back (a
//! dropped connection) is retried; the retry meets the bytes the first try
//! published, and that is a success too.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::SigningKey;

use super::api::{self, ApiClient, ApiError, Uploaded};
use super::fetch::ReadError;
use super::session::{Session, SessionError};
use super::signing::{self, SigningError};
use crate::archive::{self, ArchiveError, ArchiveInfo};
use crate::ident::{PackageName, RepoName};
use crate::index::pb;
use crate::limits::Limits;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an archive the registry accepts: {source}")]
    Archive { path: String, source: ArchiveError },
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("cannot check what the registry has published: {0}")]
    Check(#[from] SessionError),
    #[error("{what} is already published with other bytes (SHA-256 {published}, this file's is {ours}); published versions never change: bump the version and push again")]
    Different {
        what: String,
        published: String,
        ours: String,
    },
    #[error("{what}: {source}")]
    Api { what: String, source: ApiError },
}

/// An archive ready to push: a private copy and what it says it is.
pub struct Prepared {
    snapshot: File,
    pub info: ArchiveInfo,
}

impl Prepared {
    /// "my-api 1.0.0 (x86_64)"
    pub fn what(&self) -> String {
        format!(
            "{} {} ({})",
            self.info.name, self.info.version, self.info.arch
        )
    }

    /// An archive the caller already holds as a private file (an anonymous
    /// temp file nobody else can change) and has read with
    /// [`archive::inspect`]: what a mirror downloaded and verified.
    pub fn from_verified(snapshot: File, info: ArchiveInfo) -> Self {
        Self { snapshot, info }
    }
}

/// Copies `path` into an anonymous temp file and reads name, version and
/// arch from the copy with the registry's own archive checks.
pub fn prepare(path: &Path, limits: &Limits) -> Result<Prepared, PushError> {
    let read = |source| PushError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut src = File::open(path).map_err(read)?;
    let mut snapshot = tempfile::tempfile().map_err(read)?;
    // One byte past the limit is enough to know the archive is too large.
    std::io::copy(&mut (&mut src).take(limits.max_archive + 1), &mut snapshot).map_err(read)?;
    snapshot.rewind().map_err(read)?;
    let info =
        archive::inspect(std::io::BufReader::new(&mut snapshot), limits).map_err(|source| {
            PushError::Archive {
                path: path.display().to_string(),
                source,
            }
        })?;
    snapshot.rewind().map_err(read)?;
    Ok(Prepared { snapshot, info })
}

/// What the signed index says of an artifact.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    No,
    /// The same bytes (same SHA-256).
    Identical,
    /// Other bytes, with this SHA-256 (hex).
    Different(String),
}

/// Sans-IO: is `info`'s (version, arch) in `pkg`, and with which bytes?
pub fn published(pkg: Option<&pb::Package>, info: &ArchiveInfo) -> Published {
    let artifact = pkg
        .into_iter()
        .flat_map(|p| p.releases.iter())
        .filter(|r| r.version == info.version.as_str())
        .flat_map(|r| r.artifacts.iter())
        .find(|a| a.arch == info.arch.as_str());
    match artifact {
        None => Published::No,
        Some(a) if a.sha256.as_slice() == info.sha256.as_slice() => Published::Identical,
        Some(a) => Published::Different(hex::encode(&a.sha256)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Uploaded now (`retried`: after an answer was lost or refused for a
    /// while).
    Uploaded { retried: bool },
    /// The registry already had these exact bytes; nothing was sent.
    AlreadyPublished,
}

/// Called with the number of bytes sent so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// How many times an upload is tried, and the first wait between tries
/// (doubling).
const ATTEMPTS: u32 = 4;
const FIRST_WAIT: Duration = Duration::from_millis(500);
/// A server asking to wait longer than this is not waited for.
const MAX_WAIT: Duration = Duration::from_secs(30);

pub struct Pusher<'a> {
    pub session: &'a Session,
    pub api: &'a ApiClient,
    pub org: Option<&'a RepoName>,
}

impl Pusher<'_> {
    fn check(&self, prepared: &Prepared) -> Result<Published, PushError> {
        let fresh = match self.session.fresh() {
            Ok(f) => f,
            // The first push into an organization creates its repository.
            Err(SessionError::Read(ReadError::NoOrganization { .. })) => return Ok(Published::No),
            Err(e) => return Err(e.into()),
        };
        let name: &PackageName = &prepared.info.name;
        let pkg = self
            .session
            .reader
            .package(&fresh, name)
            .map_err(SessionError::from)?;
        self.session.remember(&fresh)?;
        Ok(published(pkg.as_ref(), &prepared.info))
    }

    fn different(prepared: &Prepared, published: String) -> PushError {
        PushError::Different {
            what: prepared.what(),
            published,
            ours: hex::encode(prepared.info.sha256),
        }
    }

    /// Pushes a prepared archive, signed with `signer` when given.
    pub fn push(
        &self,
        prepared: &Prepared,
        signer: Option<&SigningKey>,
        progress: Option<Progress>,
    ) -> Result<Pushed, PushError> {
        match self.check(prepared)? {
            Published::Identical => return Ok(Pushed::AlreadyPublished),
            Published::Different(sha) => return Err(Self::different(prepared, sha)),
            Published::No => {}
        }
        let signature = signer
            .map(|k| signing::sign_file(k, &prepared.snapshot))
            .transpose()?
            .map(|s| base64::engine::general_purpose::STANDARD.encode(s.to_bytes()));
        self.send(prepared, signature.as_deref(), progress)
    }

    /// Uploads a prepared archive with `signature` (base64 Ed25519, sent as
    /// `X-Niso-Signature`), without first asking whether it is published
    /// (the caller knows it is not): lost answers are retried, and a 409 is
    /// decided from the signed index as in [`Self::push`].
    pub fn send(
        &self,
        prepared: &Prepared,
        signature: Option<&str>,
        progress: Option<Progress>,
    ) -> Result<Pushed, PushError> {
        let info = &prepared.info;
        let path = api::upload_path(self.org, &info.name, &info.version, &info.arch);
        let api_err = |source| PushError::Api {
            what: format!("cannot push {}", prepared.what()),
            source,
        };
        let mut wait = FIRST_WAIT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = Body::new(&prepared.snapshot, progress.clone()).map_err(|source| {
                PushError::Read {
                    path: "the archive's snapshot".into(),
                    source,
                }
            })?;
            let answer = self.api.upload(&path, body, info.size, signature).and_then(
                |(status, retry_after, body)| api::parse::<Uploaded>(status, retry_after, &body),
            );
            let error = match answer {
                Ok(_) => {
                    return Ok(Pushed::Uploaded {
                        retried: attempt > 1,
                    })
                }
                Err(ApiError::Conflict { message }) => {
                    // Decide from the signed index, whatever the server says.
                    return match self.check(prepared)? {
                        Published::Identical if attempt > 1 => {
                            Ok(Pushed::Uploaded { retried: true })
                        }
                        Published::Identical => Ok(Pushed::AlreadyPublished),
                        Published::Different(sha) => Err(Self::different(prepared, sha)),
                        Published::No => Err(api_err(ApiError::Conflict { message })),
                    };
                }
                Err(e) => e,
            };
            if !error.is_retryable() || attempt >= ATTEMPTS {
                return Err(api_err(error));
            }
            let pause = match &error {
                ApiError::RateLimited { retry_after, .. } => Duration::from_secs(*retry_after),
                _ => wait,
            };
            if pause > MAX_WAIT {
                return Err(api_err(error));
            }
            tracing::warn!(
                "upload of {} failed ({error}); retrying ({attempt} of {ATTEMPTS} tries made)",
                prepared.what()
            );
            std::thread::sleep(pause);
            wait *= 2;
        }
    }
}

/// An upload body: the snapshot read from its start, reporting progress.
struct Body {
    file: File,
    sent: u64,
    progress: Option<Progress>,
}

impl Body {
    fn new(snapshot: &File, progress: Option<Progress>) -> std::io::Result<Self> {
        let mut file = snapshot.try_clone()?;
        file.rewind()?;
        if let Some(p) = &progress {
            p(0);
        }
        Ok(Self {
            file,
            sent: 0,
            progress,
        })
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.sent += n as u64;
        if let Some(p) = &self.progress {
            p(self.sent);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_compares_the_archive_with_the_signed_index() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/niso");
        let info = prepare(&dir.join("my-app-1.0.0-x86_64.niso"), &Limits::default())
            .unwrap()
            .info;
        let artifact = |sha: Vec<u8>, arch: &str| pb::Artifact {
            arch: arch.into(),
            sha256: sha,
            ..Default::default()
        };
        let pkg = |a: pb::Artifact| pb::Package {
            name: "my-app".into(),
            releases: vec![pb::Release {
                version: "1.0.0".into(),
                artifacts: vec![a],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(published(None, &info), Published::No);
        let same = pkg(artifact(info.sha256.to_vec(), "x86_64"));
        assert_eq!(published(Some(&same), &info), Published::Identical);
        let other = pkg(artifact(vec![1; 32], "x86_64"));
        assert_eq!(
            published(Some(&other), &info),
            Published::Different(hex::encode([1u8; 32]))
        );
        let other_arch = pkg(artifact(vec![1; 32], "aarch64"));
        assert_eq!(published(Some(&other_arch), &info), Published::No);
    }

    #[test]
    fn a_file_that_is_not_an_archive_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.niso");
        std::fs::write(&path, b"not an archive").unwrap();
        assert!(matches!(
            prepare(&path, &Limits::default()),
            Err(PushError::Archive { .. })
        ));
    }
}
