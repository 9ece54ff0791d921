//! Index file encoding: `gzip(Signed{payload, signature})`.
//!
//! Encoding is deterministic (fixed gzip header with no time or name, fixed
//! compression level, deterministic PKCS#1 v1.5 signature, prost writes fields
//! in number order), so the same index content always gives the same bytes.
//! That is what makes a full rebuild byte-identical to a series of incremental
//! publishes, and what lets rsync mirrors skip unchanged files.
//!
//! Decoding follows the order Hex's registry v2 spec gives: gunzip (bounded),
//! decode `Signed`, verify the signature, and only then decode the payload.

use std::io::{Read, Write};

use flate2::{read::GzDecoder, Compression, GzBuilder};
use prost::Message;
use rayon::prelude::*;

use super::keys::{KeyError, PublicKey, Signer};
use super::pb;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not gzip data or corrupt gzip stream: {0}")]
    Gzip(std::io::Error),
    #[error("index is larger than the limit of {limit} bytes once decompressed")]
    TooLarge { limit: u64 },
    #[error("not a Signed protobuf message: {0}")]
    Signed(prost::DecodeError),
    #[error("index has no signature")]
    Unsigned,
    #[error(transparent)]
    Signature(#[from] KeyError),
    #[error("payload is not a valid {what} message: {source}")]
    Payload {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("index is for repository {found:?}, expected {expected:?}")]
    Repository { expected: String, found: String },
}

/// gzip level for index files. 6 (zlib's default) gives within a few percent
/// of 9's size on protobuf indexes at about half the CPU.
const GZIP_LEVEL: u32 = 6;

/// Encodes, signs and gzips one index payload.
pub fn encode_index<M: Message>(message: &M, signer: &dyn Signer) -> Result<Vec<u8>, KeyError> {
    encode_payload(message.encode_to_vec(), signer)
}

/// Signs and gzips an already encoded index payload.
pub fn encode_payload(payload: Vec<u8>, signer: &dyn Signer) -> Result<Vec<u8>, KeyError> {
    encode_signed(payload, signer, Compression::new(GZIP_LEVEL))
}

/// Like [`encode_index`], in a gzip container without compression: for the
/// freshness record, mostly SHA-256 digests that do not compress, where
/// deflate would cost milliseconds per publish for little gain.
pub fn encode_index_stored<M: Message>(
    message: &M,
    signer: &dyn Signer,
) -> Result<Vec<u8>, KeyError> {
    encode_signed(message.encode_to_vec(), signer, Compression::none())
}

fn encode_signed(
    payload: Vec<u8>,
    signer: &dyn Signer,
    level: Compression,
) -> Result<Vec<u8>, KeyError> {
    let signature = signer.sign(&payload)?;
    let signed = pb::Signed {
        payload,
        signature: Some(signature),
    };
    Ok(gzip_with(&signed.encode_to_vec(), level))
}

/// Deterministic gzip: no mtime, no file name, OS byte "unknown".
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    gzip_with(bytes, Compression::new(GZIP_LEVEL))
}

fn gzip_with(bytes: &[u8], level: Compression) -> Vec<u8> {
    if bytes.len() <= GZIP_CHUNK {
        let mut enc = GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(Vec::with_capacity(bytes.len() / 2 + 64), level);
        // Writing into a Vec cannot fail.
        enc.write_all(bytes).expect("write to Vec");
        return enc.finish().expect("write to Vec");
    }
    // A large index (`versions` of thousands of packages) is deflated in
    // chunks on every core, as pigz does.
    let parts: Vec<Piece> = bytes
        .par_chunks(GZIP_CHUNK)
        .enumerate()
        .map(|(i, chunk)| Piece::deflate(chunk, level, (i + 1) * GZIP_CHUNK >= bytes.len()))
        .collect();
    assemble(&parts)
}

/// Raw deflate of part of a stream, with the CRC and length of its input.
/// Every piece but the last ends with a full flush (byte-aligned, no
/// back-references across it), so pieces deflated apart concatenate into
/// one ordinary deflate stream, and their CRCs combine into the stream's.
struct Piece {
    deflated: Vec<u8>,
    crc: crc32fast::Hasher,
    len: usize,
}

impl Piece {
    fn deflate(raw: &[u8], level: Compression, last: bool) -> Self {
        let mut crc = crc32fast::Hasher::new();
        crc.update(raw);
        Piece {
            deflated: deflate_chunk(raw, level, last),
            crc,
            len: raw.len(),
        }
    }
}

/// One gzip stream of `pieces`, in order; the last must end the stream.
fn assemble<'a>(pieces: impl IntoIterator<Item = &'a Piece> + Clone) -> Vec<u8> {
    let size: usize = pieces.clone().into_iter().map(|p| p.deflated.len()).sum();
    let mut out = Vec::with_capacity(size + 18);
    out.extend_from_slice(&GZIP_HEADER);
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0usize;
    for p in pieces {
        out.extend_from_slice(&p.deflated);
        crc.combine(&p.crc);
        len += p.len;
    }
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    // ISIZE is the length modulo 2^32.
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out
}

/// The header GzBuilder writes for small streams: no flags, mtime 0, no
/// extra flags, OS "unknown".
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// Above this many bytes, gzip streams are deflated in chunks in parallel.
const GZIP_CHUNK: usize = 128 * 1024;

/// Raw deflate of one chunk: ending the stream if `last`, else with a full
/// flush.
fn deflate_chunk(chunk: &[u8], level: Compression, last: bool) -> Vec<u8> {
    use flate2::{Compress, FlushCompress, Status};
    let mut c = Compress::new(level, false);
    let mut out = Vec::with_capacity(chunk.len() / 2 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Full
    };
    loop {
        let consumed = c.total_in() as usize;
        // Compressing into a Vec with spare room cannot fail.
        let status = c
            .compress_vec(&chunk[consumed..], &mut out, flush)
            .expect("deflate into a Vec");
        let done = c.total_in() as usize == chunk.len() && out.len() < out.capacity();
        if status == Status::StreamEnd || (!last && done) {
            return out;
        }
        out.reserve(out.capacity().max(1024));
    }
}

/// Gunzips at most `limit` bytes; more is an error, not a truncation.
pub fn gunzip_limited(bytes: &[u8], limit: u64) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    GzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(CodecError::Gzip)?;
    if out.len() as u64 > limit {
        return Err(CodecError::TooLarge { limit });
    }
    Ok(out)
}

/// Gunzips and verifies an index file, returning the signed payload bytes.
pub fn verified_payload(bytes: &[u8], key: &PublicKey, limit: u64) -> Result<Vec<u8>, CodecError> {
    let raw = gunzip_limited(bytes, limit)?;
    let signed = pb::Signed::decode(raw.as_slice()).map_err(CodecError::Signed)?;
    let sig = signed.signature.ok_or(CodecError::Unsigned)?;
    key.verify(&signed.payload, &sig)?;
    Ok(signed.payload)
}

/// Index messages that carry a `repository` field clients must check.
pub trait IndexMessage: Message + Default {
    const WHAT: &'static str;
    fn repository(&self) -> &str;
}

impl IndexMessage for pb::Names {
    const WHAT: &'static str = "Names";
    fn repository(&self) -> &str {
        &self.repository
    }
}
impl IndexMessage for pb::Versions {
    const WHAT: &'static str = "Versions";
    fn repository(&self) -> &str {
        &self.repository
    }
}
impl IndexMessage for pb::Package {
    const WHAT: &'static str = "Package";
    fn repository(&self) -> &str {
        &self.repository
    }
}
impl IndexMessage for pb::PublisherKeys {
    const WHAT: &'static str = "PublisherKeys";
    fn repository(&self) -> &str {
        &self.repository
    }
}
impl IndexMessage for pb::Freshness {
    const WHAT: &'static str = "Freshness";
    fn repository(&self) -> &str {
        &self.repository
    }
}

/// Verifies and decodes an index file, and checks it names `repository`.
pub fn decode_index<M: IndexMessage>(
    bytes: &[u8],
    key: &PublicKey,
    repository: &str,
    limit: u64,
) -> Result<M, CodecError> {
    let payload = verified_payload(bytes, key, limit)?;
    let message = M::decode(payload.as_slice()).map_err(|source| CodecError::Payload {
        what: M::WHAT,
        source,
    })?;
    if message.repository() != repository {
        return Err(CodecError::Repository {
            expected: repository.to_string(),
            found: message.repository().to_string(),
        });
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::keys::RepoKey;
    use std::sync::OnceLock;

    fn key() -> &'static RepoKey {
        static KEY: OnceLock<RepoKey> = OnceLock::new();
        KEY.get_or_init(|| RepoKey::generate().expect("keygen"))
    }

    fn sample_package() -> pb::Package {
        pb::Package {
            name: "demo".into(),
            repository: "acme".into(),
            releases: vec![pb::Release {
                version: "1.0.0".into(),
                inner_checksum: vec![],
                outer_checksum: Some(vec![7; 32]),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_verifies_and_checks_repository() {
        let bytes = encode_index(&sample_package(), key()).unwrap();
        let back: pb::Package = decode_index(&bytes, key().public_key(), "acme", 1 << 20).unwrap();
        assert_eq!(back, sample_package());
        let wrong = decode_index::<pb::Package>(&bytes, key().public_key(), "other", 1 << 20);
        assert!(matches!(wrong, Err(CodecError::Repository { .. })));
    }

    #[test]
    fn encoding_is_deterministic() {
        let a = encode_index(&sample_package(), key()).unwrap();
        let b = encode_index(&sample_package(), key()).unwrap();
        assert_eq!(a, b);
        // gzip header: magic, deflate, no flags, mtime 0.
        assert_eq!(&a[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn proto2_required_fields_are_written_even_when_empty() {
        // hex_core's decoder fails on a missing required field, so an empty
        // inner_checksum and an empty repository must still be on the wire.
        let release = pb::Release {
            version: String::new(),
            inner_checksum: vec![],
            ..Default::default()
        };
        assert_eq!(release.encode_to_vec(), vec![0x0a, 0x00, 0x12, 0x00]);
        let names = pb::Names::default();
        assert_eq!(names.encode_to_vec(), vec![0x12, 0x00]);
        let signed = pb::Signed {
            payload: vec![],
            signature: Some(vec![]),
        };
        assert_eq!(signed.encode_to_vec(), vec![0x0a, 0x00, 0x12, 0x00]);
    }

    #[test]
    fn hex_field_numbers_are_exact() {
        // Field keys (number << 3 | wire type) as Hex's package.proto defines them.
        let pkg = pb::Package {
            name: "n".into(),
            repository: "r".into(),
            releases: vec![pb::Release {
                version: "1.0.0".into(),
                inner_checksum: vec![1],
                outer_checksum: Some(vec![2]),
                dependencies: vec![pb::Dependency {
                    package: "d".into(),
                    requirement: "~> 1.0".into(),
                    optional: Some(true),
                    app: Some("a".into()),
                    repository: Some("x".into()),
                }],
                retired: Some(pb::RetirementStatus {
                    reason: pb::RetirementReason::RetiredSecurity as i32,
                    message: Some("m".into()),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = pkg.encode_to_vec();
        assert_eq!(bytes[0], 1 << 3 | 2, "releases = 1");
        let tail = &bytes[bytes.len() - 6..];
        assert_eq!(tail, &[2 << 3 | 2, 1, b'n', 3 << 3 | 2, 1, b'r']);
        let release = pkg.releases[0].encode_to_vec();
        assert_eq!(
            &release[..9],
            &[0x0a, 5, b'1', b'.', b'0', b'.', b'0', 0x12, 1]
        );
        // retired = 4 then outer_checksum = 5 follow the dependency (3).
        let dep_len = pkg.releases[0].dependencies[0].encoded_len();
        let after_dep = 7 + 3 + 2 + dep_len;
        assert_eq!(release[after_dep], 4 << 3 | 2);
        let ver = pb::Versions {
            packages: vec![pb::VersionsPackage {
                name: "n".into(),
                versions: vec!["1.0.0".into()],
                retired: vec![0],
            }],
            repository: "r".into(),
        };
        let vb = ver.packages[0].encode_to_vec();
        // retired = 3 is packed (length-delimited).
        assert_eq!(&vb[vb.len() - 3..], &[3 << 3 | 2, 1, 0]);
    }

    #[test]
    fn tampering_is_detected() {
        let bytes = encode_index(&sample_package(), key()).unwrap();
        let raw = gunzip_limited(&bytes, 1 << 20).unwrap();
        let mut signed = pb::Signed::decode(raw.as_slice()).unwrap();
        signed.payload[3] ^= 1;
        let tampered = gzip(&signed.encode_to_vec());
        let e = decode_index::<pb::Package>(&tampered, key().public_key(), "acme", 1 << 20);
        assert!(matches!(
            e,
            Err(CodecError::Signature(KeyError::BadSignature))
        ));

        signed.signature = None;
        let unsigned = gzip(&signed.encode_to_vec());
        let e = decode_index::<pb::Package>(&unsigned, key().public_key(), "acme", 1 << 20);
        assert!(matches!(e, Err(CodecError::Unsigned)));

        let e = decode_index::<pb::Package>(b"garbage", key().public_key(), "acme", 1 << 20);
        assert!(matches!(e, Err(CodecError::Gzip(_))));
    }

    #[test]
    fn large_streams_are_deflated_in_chunks_that_any_gunzip_reads() {
        // Index-like data: compressible, but not trivially.
        let mut data = Vec::new();
        let mut i = 0u64;
        while data.len() < 3 * GZIP_CHUNK + 12_345 {
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            data.extend_from_slice(
                format!("pkg-{:05}\x12\x051.{}.0", i % 99_991, i % 7).as_bytes(),
            );
        }
        let gz = gzip(&data);
        let mut back = Vec::new();
        GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        // No trailing members or garbage: exactly one gzip stream.
        let mut d = GzDecoder::new(&gz[..]);
        std::io::copy(&mut d, &mut std::io::sink()).unwrap();
        assert!(d.into_inner().is_empty());
        // Deterministic, and about as small as one stream.
        assert_eq!(gzip(&data), gz);
        let mut whole = GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(Vec::new(), Compression::new(GZIP_LEVEL));
        whole.write_all(&data).unwrap();
        let whole = whole.finish().unwrap();
        assert!(
            gz.len() < whole.len() * 11 / 10,
            "{} vs {}",
            gz.len(),
            whole.len()
        );
        // The same header as the small case.
        assert_eq!(gz[..10], gzip(b"x")[..10]);
    }

    #[test]
    fn decompression_is_bounded() {
        let bomb = gzip(&vec![0u8; 1 << 20]);
        assert!(matches!(
            gunzip_limited(&bomb, 1000),
            Err(CodecError::TooLarge { limit: 1000 })
        ));
        assert_eq!(gunzip_limited(&bomb, 1 << 20).unwrap().len(), 1 << 20);
    }
}
