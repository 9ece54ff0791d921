//! The repository key: RSA, PKCS#1 v1.5 signatures over SHA-512, as Hex
//! registry v2 requires.
//!
//! Signing and verification use aws-lc-rs (AWS-LC, a BoringSSL descendant):
//! its RSA private-key operations are constant-time and blinded, unlike the
//! pure-Rust `rsa` crate, whose signing leaks timing (RUSTSEC-2023-0071,
//! "Marvin"). PKCS#1 v1.5 signatures are deterministic, which is what lets a
//! rebuild reproduce the indexes byte for byte.

use std::path::Path;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, UnparsedPublicKey};

/// What signs index payloads. Today a PEM file on disk; the seam is here so a
/// KMS or HSM can sign instead without touching the publisher.
pub trait Signer: Send + Sync {
    /// Signs `payload` (the protobuf bytes inside `Signed`).
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// The public half, to publish as `public_key` and to verify our own output.
    fn public_key(&self) -> &PublicKey;
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not PEM: {source}")]
    Pem { what: String, source: pem::PemError },
    #[error("{what}: unsupported PEM block {tag:?} (expected {expected})")]
    PemTag {
        what: String,
        tag: String,
        expected: &'static str,
    },
    #[error("{what} is not a usable RSA key: {reason}")]
    Rejected { what: String, reason: String },
    #[error("RSA key generation failed")]
    Generate,
    #[error("signing failed")]
    Sign,
    #[error("signature does not verify with the repository public key")]
    BadSignature,
}

/// The repository's RSA private key.
pub struct RepoKey {
    pair: KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RepoKey").finish_non_exhaustive()
    }
}

impl RepoKey {
    /// A new 2048-bit key: Hex's own size, and signing stays near 1 ms.
    pub fn generate() -> Result<Self, KeyError> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
        Self::from_pair(pair, "generated key")
    }

    /// Reads a PEM private key: PKCS#1 (`RSA PRIVATE KEY`, what
    /// `openssl genrsa` and `mix hex.registry` write) or PKCS#8 (`PRIVATE KEY`).
    pub fn from_pem(text: &[u8], what: &str) -> Result<Self, KeyError> {
        let block = pem::parse(text).map_err(|source| KeyError::Pem {
            what: what.to_string(),
            source,
        })?;
        let rejected = |e: aws_lc_rs::error::KeyRejected| KeyError::Rejected {
            what: what.to_string(),
            reason: e.to_string(),
        };
        let pair = match block.tag() {
            "RSA PRIVATE KEY" => KeyPair::from_der(block.contents()).map_err(rejected)?,
            "PRIVATE KEY" => KeyPair::from_pkcs8(block.contents()).map_err(rejected)?,
            tag => {
                return Err(KeyError::PemTag {
                    what: what.to_string(),
                    tag: tag.to_string(),
                    expected: "RSA PRIVATE KEY or PRIVATE KEY",
                })
            }
        };
        Self::from_pair(pair, what)
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text, &path.display().to_string())
    }

    fn from_pair(pair: KeyPair, what: &str) -> Result<Self, KeyError> {
        let spki = pair.public_key().as_der().map_err(|_| KeyError::Rejected {
            what: what.to_string(),
            reason: "cannot encode its public key".into(),
        })?;
        let public = PublicKey::from_spki_der(spki.as_ref().to_vec());
        Ok(Self { pair, public })
    }

    /// The private key as PKCS#8 PEM, for `registry init` to store (0600).
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let der = self.pair.as_der().map_err(|_| KeyError::Rejected {
            what: "repository key".into(),
            reason: "cannot encode as PKCS#8".into(),
        })?;
        Ok(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            der.as_ref().to_vec(),
        )))
    }
}

impl Signer for RepoKey {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut sig = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA512,
                &SystemRandom::new(),
                payload,
                &mut sig,
            )
            .map_err(|_| KeyError::Sign)?;
        Ok(sig)
    }

    fn public_key(&self) -> &PublicKey {
        &self.public
    }
}

/// The repository's public key, as SubjectPublicKeyInfo DER.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey(sha256:{})", &self.fingerprint()[..16])
    }
}

impl PublicKey {
    fn from_spki_der(spki_der: Vec<u8>) -> Self {
        Self { spki_der }
    }

    /// Reads `PUBLIC KEY` (SPKI, what niso and Hex publish) or
    /// `RSA PUBLIC KEY` (PKCS#1) PEM. A private key is refused: a user who
    /// passes one by mistake should hear so rather than have it accepted.
    pub fn from_pem(text: &[u8], what: &str) -> Result<Self, KeyError> {
        let block = pem::parse(text).map_err(|source| KeyError::Pem {
            what: what.to_string(),
            source,
        })?;
        let der = match block.tag() {
            "PUBLIC KEY" => block.contents().to_vec(),
            // Re-wrap PKCS#1 as SPKI so one form is kept and compared.
            "RSA PUBLIC KEY" => pkcs1_to_spki(block.contents()),
            tag => {
                return Err(KeyError::PemTag {
                    what: what.to_string(),
                    tag: tag.to_string(),
                    expected: "PUBLIC KEY or RSA PUBLIC KEY",
                })
            }
        };
        // Check it is an RSA key we can verify with before accepting it.
        aws_lc_rs::rsa::PublicEncryptingKey::from_der(&der).map_err(|e| KeyError::Rejected {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self { spki_der: der })
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text, &path.display().to_string())
    }

    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PUBLIC KEY", self.spki_der.clone()))
    }

    /// SHA-256 of the SPKI DER, lowercase hex: what users compare when they
    /// pin a registry's key.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&self.spki_der))
    }

    pub fn verify(&self, payload: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA512, &self.spki_der)
            .verify(payload, sig)
            .map_err(|_| KeyError::BadSignature)
    }
}

/// Wraps a PKCS#1 `RSAPublicKey` in a SubjectPublicKeyInfo with the
/// rsaEncryption algorithm identifier (RFC 8017 A.1, RFC 5280 4.1).
fn pkcs1_to_spki(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0u8];
    bit_string.extend_from_slice(pkcs1);
    let mut body = RSA_ALGORITHM.to_vec();
    der_push(&mut body, 0x03, &bit_string);
    let mut out = Vec::new();
    der_push(&mut out, 0x30, &body);
    out
}

fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    pub(crate) fn test_key() -> &'static RepoKey {
        static KEY: OnceLock<RepoKey> = OnceLock::new();
        KEY.get_or_init(|| RepoKey::generate().expect("keygen"))
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let key = test_key();
        let sig = key.sign(b"payload").unwrap();
        assert_eq!(sig.len(), 256);
        key.public_key().verify(b"payload", &sig).unwrap();
        assert!(key.public_key().verify(b"payloaD", &sig).is_err());
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert!(key.public_key().verify(b"payload", &bad).is_err());
    }

    #[test]
    fn signatures_are_deterministic() {
        let key = test_key();
        assert_eq!(key.sign(b"x").unwrap(), key.sign(b"x").unwrap());
    }

    #[test]
    fn pkcs8_pem_round_trips_and_public_pem_parses() {
        let key = test_key();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let again = RepoKey::from_pem(pem.as_bytes(), "test").unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let public = PublicKey::from_pem(key.public_key().to_pem().as_bytes(), "pub").unwrap();
        assert_eq!(&public, key.public_key());
    }

    #[test]
    fn pkcs1_pem_is_accepted() {
        // Made by `openssl genrsa -traditional 2048` (PKCS#1), kept in fixtures.
        let text = include_bytes!("../../fixtures/keys/pkcs1.pem");
        let key = RepoKey::from_pem(text, "pkcs1").unwrap();
        let public_text = include_bytes!("../../fixtures/keys/pkcs1.pub.pem");
        let public = PublicKey::from_pem(public_text, "pkcs1 public").unwrap();
        assert_eq!(key.public_key(), &public);
        let rsa_public_text = include_bytes!("../../fixtures/keys/pkcs1.rsapub.pem");
        let rsa_public = PublicKey::from_pem(rsa_public_text, "pkcs1 rsa public").unwrap();
        assert_eq!(rsa_public, public);
        public.verify(b"m", &key.sign(b"m").unwrap()).unwrap();
    }

    #[test]
    fn wrong_pem_kinds_are_refused_with_the_reason() {
        let key = test_key();
        let e = RepoKey::from_pem(key.public_key().to_pem().as_bytes(), "k").unwrap_err();
        assert!(e.to_string().contains("unsupported PEM block"), "{e}");
        let e = PublicKey::from_pem(key.to_pkcs8_pem().unwrap().as_bytes(), "k").unwrap_err();
        assert!(e.to_string().contains("unsupported PEM block"), "{e}");
        let e = RepoKey::from_pem(b"not pem", "k").unwrap_err();
        assert!(e.to_string().contains("not PEM"), "{e}");
        let ed = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![0u8; 48]));
        assert!(matches!(
            RepoKey::from_pem(ed.as_bytes(), "k"),
            Err(KeyError::Rejected { .. })
        ));
    }
}
