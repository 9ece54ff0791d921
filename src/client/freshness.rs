//! The client's freshness checks, in one place and free of I/O: given bytes
//! fetched from a tree, decide whether to trust them.
//!
//! A tree's signed `freshness` record (a generation that only grows, an
//! expiry, and the SHA-256 and length of `names`, `versions` and every bin
//! `freshness-bins/XX`; each bin lists the digest of each package index in
//! it) commits to every index file. So a client that checks
//!
//! 1. the record's signature and repository, that its generation is not
//!    lower than one it has verified before (a rollback), and that it has
//!    not expired (a frozen mirror);
//! 2. a bin's bytes against the record;
//! 3. a package index's bytes against its bin,
//!
//! reads a consistent, current snapshot, and cannot be served an old but
//! validly signed index (a replay).

use std::collections::BTreeMap;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::index::codec::{decode_index, CodecError};
use crate::index::json::rfc3339;
use crate::index::layout::{self, Layout};
use crate::index::{pb, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    #[error("{path}: {source}")]
    Index { path: String, source: CodecError },
    #[error("{path}: generation {found} is older than generation {seen}, which this client has already verified: the registry (or a mirror or cache in front of it) is serving an old copy of the tree (a rollback); refusing it. Try again later, or ask the registry's operator")]
    Rollback { path: String, found: u64, seen: u64 },
    #[error("{path}: the freshness record expired at {at}: the registry (or a mirror) has not been re-signed since; refusing a possibly stale tree. Ask its operator to run `niso registry build`, or pass --allow-expired to use an offline copy knowingly")]
    Expired { path: String, at: String },
    #[error("{path}: not listed in the signed freshness record")]
    NotListed { path: String },
    #[error("{path}: its bytes do not match the digest in the signed freshness record (a stale, replayed or tampered file)")]
    Digest { path: String },
    #[error("{path}: not a valid freshness bin: {reason}")]
    Bin { path: String, reason: String },
}

/// A verified freshness record.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub generation: u64,
    pub expires_at: i64,
    /// Set when the record had expired and the caller allowed it.
    pub expired: bool,
    listed: BTreeMap<String, pb::FileDigest>,
    repository: String,
}

/// What a caller allows beyond the strict rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allow {
    /// Accept an expired record (an offline copy, used knowingly).
    pub expired: bool,
}

/// Step 1: verifies the record's signature and repository, refuses a
/// generation below `seen` and (unless allowed) an expired record.
pub fn check_record(
    bytes: &[u8],
    key: &PublicKey,
    repository: &str,
    now: i64,
    seen: Option<u64>,
    allow: Allow,
    limit: u64,
) -> Result<Fresh, FreshnessError> {
    let path = layout::FRESHNESS.to_string();
    let record: pb::Freshness =
        decode_index(bytes, key, repository, limit).map_err(|source| FreshnessError::Index {
            path: path.clone(),
            source,
        })?;
    if let Some(seen) = seen {
        if record.generation < seen {
            return Err(FreshnessError::Rollback {
                path,
                found: record.generation,
                seen,
            });
        }
    }
    let expired = record.expires_at <= now;
    if expired && !allow.expired {
        return Err(FreshnessError::Expired {
            path,
            at: rfc3339(record.expires_at),
        });
    }
    Ok(Fresh {
        generation: record.generation,
        expires_at: record.expires_at,
        expired,
        listed: record
            .files
            .into_iter()
            .map(|d| (d.path.clone(), d))
            .collect(),
        repository: repository.to_string(),
    })
}

fn matches(d: &pb::FileDigest, bytes: &[u8]) -> bool {
    d.length == bytes.len() as u64 && d.sha256.as_slice() == Sha256::digest(bytes).as_slice()
}

/// The bin that lists a package's index: the first byte of SHA-256 of its
/// name, as the publisher files it.
pub fn bin_path(package: &str) -> String {
    Layout::freshness_bin_rel(Sha256::digest(package.as_bytes())[0])
}

/// A verified bin: the digests of the package indexes in it.
#[derive(Debug, Clone)]
pub struct Bin {
    files: BTreeMap<String, pb::FileDigest>,
}

impl Fresh {
    /// Step 2 for a top-level file (`names`, `versions`): its bytes must be
    /// the ones the record lists.
    pub fn check_file(&self, path: &str, bytes: &[u8]) -> Result<(), FreshnessError> {
        let d = self
            .listed
            .get(path)
            .ok_or_else(|| FreshnessError::NotListed { path: path.into() })?;
        if matches(d, bytes) {
            Ok(())
        } else {
            Err(FreshnessError::Digest { path: path.into() })
        }
    }

    /// Whether the record lists `path` at all. A bin that holds no package
    /// is not listed, so a missing bin means "no such package".
    pub fn lists(&self, path: &str) -> bool {
        self.listed.contains_key(path)
    }

    /// Step 2 for a bin: checks its bytes against the record and decodes it.
    pub fn check_bin(&self, path: &str, bytes: &[u8]) -> Result<Bin, FreshnessError> {
        self.check_file(path, bytes)?;
        let bin = pb::FreshnessBin::decode(bytes).map_err(|e| FreshnessError::Bin {
            path: path.into(),
            reason: e.to_string(),
        })?;
        if bin.repository != self.repository {
            return Err(FreshnessError::Bin {
                path: path.into(),
                reason: format!(
                    "it is for repository {:?}, expected {:?}",
                    bin.repository, self.repository
                ),
            });
        }
        if bin.bin > 255 || Layout::freshness_bin_rel(bin.bin as u8) != path {
            return Err(FreshnessError::Bin {
                path: path.into(),
                reason: format!("it says it is bin {}", bin.bin),
            });
        }
        Ok(Bin {
            files: bin.files.into_iter().map(|d| (d.path.clone(), d)).collect(),
        })
    }
}

impl Bin {
    /// Whether the bin lists the index at `path`: a verified "no such
    /// package" when it does not.
    pub fn lists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// Step 3: a package index's bytes must be the ones its bin lists.
    pub fn check_index(&self, path: &str, bytes: &[u8]) -> Result<(), FreshnessError> {
        let d = self
            .files
            .get(path)
            .ok_or_else(|| FreshnessError::NotListed { path: path.into() })?;
        if matches(d, bytes) {
            Ok(())
        } else {
            Err(FreshnessError::Digest { path: path.into() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::codec::encode_index_stored;
    use crate::index::{RepoKey, Signer};

    fn key() -> &'static RepoKey {
        static KEY: std::sync::OnceLock<RepoKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| {
            RepoKey::from_file(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keys/pkcs1.pem"),
            )
            .unwrap()
        })
    }

    fn digest(path: &str, bytes: &[u8]) -> pb::FileDigest {
        pb::FileDigest {
            path: path.into(),
            sha256: Sha256::digest(bytes).to_vec(),
            length: bytes.len() as u64,
        }
    }

    /// A record of generation 7 expiring at 1000, listing `versions` and
    /// the bin of `my-app`, which lists `packages/my-app`.
    fn tree() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
        let versions = b"versions bytes".to_vec();
        let index = b"index bytes".to_vec();
        let bin_rel = bin_path("my-app");
        let bin = pb::FreshnessBin {
            repository: "acme".into(),
            bin: u32::from(Sha256::digest(b"my-app")[0]),
            files: vec![digest("packages/my-app", &index)],
        }
        .encode_to_vec();
        let record = pb::Freshness {
            repository: "acme".into(),
            generation: 7,
            issued_at: 0,
            expires_at: 1000,
            files: vec![digest("versions", &versions), digest(&bin_rel, &bin)],
        };
        let bytes = encode_index_stored(&record, key()).unwrap();
        (bytes, versions, bin, index)
    }

    fn check(
        bytes: &[u8],
        now: i64,
        seen: Option<u64>,
        allow: Allow,
    ) -> Result<Fresh, FreshnessError> {
        check_record(bytes, key().public_key(), "acme", now, seen, allow, 1 << 20)
    }

    #[test]
    fn a_current_record_vouches_for_every_file() {
        let (record, versions, bin, index) = tree();
        let f = check(&record, 10, Some(7), Allow::default()).unwrap();
        assert_eq!(f.generation, 7);
        f.check_file("versions", &versions).unwrap();
        let b = f.check_bin(&bin_path("my-app"), &bin).unwrap();
        b.check_index("packages/my-app", &index).unwrap();
        assert!(!b.lists("packages/other"));
    }

    #[test]
    fn rollbacks_expiry_and_replays_are_refused() {
        let (record, versions, bin, index) = tree();
        assert!(matches!(
            check(&record, 10, Some(8), Allow::default()),
            Err(FreshnessError::Rollback {
                found: 7,
                seen: 8,
                ..
            })
        ));
        assert!(matches!(
            check(&record, 1000, None, Allow::default()),
            Err(FreshnessError::Expired { .. })
        ));
        let f = check(&record, 5000, None, Allow { expired: true }).unwrap();
        assert!(f.expired);
        let mut stale = versions.clone();
        stale.push(b'!');
        assert!(matches!(
            f.check_file("versions", &stale),
            Err(FreshnessError::Digest { .. })
        ));
        assert!(matches!(
            f.check_file("names", &versions),
            Err(FreshnessError::NotListed { .. })
        ));
        let b = f.check_bin(&bin_path("my-app"), &bin).unwrap();
        assert!(matches!(
            b.check_index("packages/my-app", b"an older index"),
            Err(FreshnessError::Digest { .. })
        ));
        let _ = index;
        // Another repository's record, and a record signed by another key.
        assert!(matches!(
            check_record(
                &record,
                key().public_key(),
                "other",
                10,
                None,
                Allow::default(),
                1 << 20
            ),
            Err(FreshnessError::Index {
                source: CodecError::Repository { .. },
                ..
            })
        ));
        let mut tampered = record.clone();
        let n = tampered.len();
        tampered[n / 2] ^= 1;
        assert!(check(&tampered, 10, None, Allow::default()).is_err());
    }
}
