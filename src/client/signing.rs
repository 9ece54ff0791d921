//! Publisher signatures (seed 000's `X-Niso-Signature`): an Ed25519
//! signature of the archive's bytes by whoever built it, which `push --sign`
//! makes and `pull --require-signature` checks against a publisher key the
//! user trusts.
//!
//! Keys are the PEM files `openssl genpkey -algorithm ed25519` (private,
//! PKCS#8) and `openssl pkey -pubout` (public, SPKI) write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256, Sha512};

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 {what} key in PEM ({reason}); make one with `openssl genpkey -algorithm ed25519 -out publisher.pem` (public half: `openssl pkey -in publisher.pem -pubout`)")]
    Key {
        path: String,
        what: &'static str,
        reason: String,
    },
    #[error("cannot sign the archive: {0}")]
    Sign(String),
}

fn read_text(path: &Path) -> Result<String, SigningError> {
    std::fs::read_to_string(path).map_err(|source| SigningError::Read {
        path: path.display().to_string(),
        source,
    })
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, SigningError> {
    SigningKey::from_pkcs8_pem(&read_text(path)?).map_err(|e| SigningError::Key {
        path: path.display().to_string(),
        what: "private",
        reason: e.to_string(),
    })
}

pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, SigningError> {
    VerifyingKey::from_public_key_pem(&read_text(path)?).map_err(|e| SigningError::Key {
        path: path.display().to_string(),
        what: "public",
        reason: e.to_string(),
    })
}

/// The id indexes record with a signature: `ed25519:` and the first 16 hex
/// digits of SHA-256 of the raw public key (as the key store computes it).
pub fn key_id(key: &VerifyingKey) -> String {
    format!("ed25519:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// Whether `id` (from an index) names `key`: its full fingerprint, or the
/// 64-bit prefix of it that indexes written before the full one held.
pub fn names_key(id: &str, key: &VerifyingKey) -> bool {
    let full = key_id(key);
    id == full || (id.len() == "ed25519:".len() + 16 && full.starts_with(id))
}

/// Feeds the whole of `file` to `f`, in chunks, from offset 0 (positional
/// reads: the file's cursor is not used).
fn each_chunk(file: &File, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            return Ok(());
        }
        f(&buf[..n]);
        offset += n as u64;
    }
}

/// Signs the bytes of `file` (ordinary Ed25519, as the server checks it)
/// without holding them in memory.
///
/// Ed25519 hashes the message twice, so the file is read twice: it must be
/// a private snapshot nobody else writes (push signs its own copy), or two
/// different messages could share a nonce. The signature is verified
/// against the file once more before it is returned.
pub fn sign_file(key: &SigningKey, file: &File) -> Result<Signature, SigningError> {
    let expanded = ed25519_dalek::hazmat::ExpandedSecretKey::from(&key.to_bytes());
    let failed = std::cell::Cell::new(None::<std::io::Error>);
    let sig = ed25519_dalek::hazmat::raw_sign_byupdate::<Sha512, _>(
        &expanded,
        |h: &mut Sha512| {
            each_chunk(file, |c| h.update(c)).map_err(|e| {
                failed.set(Some(e));
                ed25519_dalek::SignatureError::new()
            })
        },
        &key.verifying_key(),
    )
    .map_err(|e| match failed.take() {
        Some(io) => SigningError::Sign(io.to_string()),
        None => SigningError::Sign(e.to_string()),
    })?;
    if !verify_file(&key.verifying_key(), &sig, file)
        .map_err(|e| SigningError::Sign(e.to_string()))?
    {
        return Err(SigningError::Sign(
            "the file changed while it was signed".into(),
        ));
    }
    Ok(sig)
}

/// Whether `sig` is `key`'s signature of the bytes of `file`.
pub fn verify_file(key: &VerifyingKey, sig: &Signature, file: &File) -> std::io::Result<bool> {
    let Ok(mut v) = key.verify_stream(sig) else {
        return Ok(false);
    };
    each_chunk(file, |c| v.update(c))?;
    Ok(v.finalize_and_verify().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use std::io::Write;

    #[test]
    fn a_file_signature_is_an_ordinary_ed25519_signature() {
        use ed25519_dalek::{Signer, Verifier};
        let sk = SigningKey::from_bytes(&[7; 32]);
        let mut f = tempfile::tempfile().unwrap();
        let body: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&body).unwrap();
        let sig = sign_file(&sk, &f).unwrap();
        assert_eq!(sig, sk.sign(&body));
        assert!(sk.verifying_key().verify(&body, &sig).is_ok());
        assert!(verify_file(&sk.verifying_key(), &sig, &f).unwrap());
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(!verify_file(&other.verifying_key(), &sig, &f).unwrap());
    }

    #[test]
    fn keys_load_from_pem_and_ids_match_the_key_store() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SigningKey::from_bytes(&[9; 32]);
        let private = dir.path().join("p.pem");
        let public = dir.path().join("p.pub");
        std::fs::write(
            &private,
            sk.to_pkcs8_pem(Default::default()).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::write(
            &public,
            sk.verifying_key()
                .to_public_key_pem(Default::default())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            load_signing_key(&private).unwrap().to_bytes(),
            sk.to_bytes()
        );
        let vk = load_verifying_key(&public).unwrap();
        assert_eq!(vk, sk.verifying_key());
        let record = crate::auth::KeyRecord {
            id: "key_x".into(),
            name: "x".into(),
            scopes: crate::auth::Scopes::parse(&["push"]).unwrap(),
            created_at: 0,
            last_used: None,
            publisher_key: Some(vk.to_bytes()),
        };
        assert_eq!(record.publisher_key_id().unwrap(), key_id(&vk));
        let e = load_signing_key(&public).unwrap_err();
        assert!(e.to_string().contains("openssl genpkey"));
    }
}
