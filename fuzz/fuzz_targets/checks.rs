//! What each fuzz target checks, shared by the cargo-fuzz targets (this
//! directory) and by `tests/fuzz_regressions.rs`, which replays every input
//! kept under `fuzz/regressions/TARGET/` in a plain `cargo test`.
//!
//! Beyond "no panic, no unbounded allocation" (libFuzzer's `-rss_limit_mb`
//! and `-malloc_limit_mb` catch the latter), each target checks a property:
//!
//! * archives: a refusal's message is short; an accepted archive holds only
//!   files and directories with safe paths even when read by a tar reader
//!   that ignores the end-of-archive marker (as `tar -i` does), and a second
//!   read gives the same answer;
//! * `metadata.config`: terms printed back as Erlang text parse to the same
//!   terms;
//! * the manifest: an accepted manifest written back as TOML parses to the
//!   same manifest;
//! * indexes: a payload that decodes, re-encoded and signed, decodes to the
//!   same message.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::sync::OnceLock;

use niso::archive::{self, ArchiveError, ArchiveInfo, ArchiveKind};
use niso::index::{self, pb, PublicKey, RepoKey, Signer};
use niso::limits::Limits;
use prost::Message;

/// Limits for fuzzing: the defaults, with a smaller unpacked size so one
/// input cannot spend seconds inflating gigabytes.
pub fn limits() -> Limits {
    Limits {
        max_unpacked: 16 << 20,
        max_hex_unpacked: 16 << 20,
        ..Limits::default()
    }
}

/// A refusal's message, which must stay short whatever the input.
fn check_message(e: &ArchiveError) {
    let text = e.to_string();
    assert!(
        text.len() <= 2048,
        "error message of {} bytes: {:.300}",
        text.len(),
        text
    );
}

fn gzip_fast(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("write to a Vec");
    enc.finish().expect("write to a Vec")
}

/// One entry as the `tar` crate lists it: its path, its type, and the path
/// in its pax header if it has one (GNU tar's choice when the two differ).
type Listed = (Vec<u8>, tar::EntryType, Option<Vec<u8>>);

/// Every entry of a tar, the end-of-archive marker honoured or not. `None`
/// if the tar does not parse.
fn listing(tar_bytes: &[u8], ignore_zeros: bool) -> Option<Vec<Listed>> {
    let mut a = tar::Archive::new(tar_bytes);
    a.set_ignore_zeros(ignore_zeros);
    let mut out = Vec::new();
    for e in a.entries().ok()? {
        let mut e = e.ok()?;
        let pax_path = match e.pax_extensions() {
            Ok(Some(records)) => records
                .filter_map(Result::ok)
                .find(|r| r.key_bytes() == b"path")
                .map(|r| r.value_bytes().to_vec()),
            _ => None,
        };
        out.push((
            e.path_bytes().into_owned(),
            e.header().entry_type(),
            pax_path,
        ));
    }
    Some(out)
}

/// An accepted tar must look the same to a reader that reads past the
/// end-of-archive marker, name each entry the same whichever of its names a
/// reader takes, and hold only files and directories with safe paths.
fn check_accepted_tar(what: &str, tar_bytes: &[u8]) {
    let plain = listing(tar_bytes, false).expect("an accepted tar parses");
    if let Some(all) = listing(tar_bytes, true) {
        assert_eq!(plain, all, "{what}: entries hidden after the end marker");
    }
    for (path, kind, pax_path) in &plain {
        if let Some(pax_path) = pax_path {
            assert_eq!(pax_path, path, "{what}: an entry with two names");
        }
        assert!(
            matches!(
                kind,
                tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory
            ),
            "{what}: accepted an entry of type {kind:?}"
        );
        let path = std::str::from_utf8(path).expect("accepted paths are UTF-8");
        assert!(
            archive::safe::check_path(path).is_ok(),
            "{what}: accepted the path {path:?}"
        );
    }
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("an accepted archive gunzips");
    out
}

fn inspect_and_check(bytes: &[u8]) -> Result<ArchiveInfo, ArchiveError> {
    let result = archive::inspect(bytes, &limits());
    match &result {
        Err(e) => check_message(e),
        Ok(info) => {
            match info.kind {
                ArchiveKind::Niso => check_accepted_tar(".niso", &gunzip(bytes)),
                ArchiveKind::Hex => check_accepted_hex(bytes),
            }
            let again = archive::inspect(bytes, &limits()).expect("accepted twice");
            assert_eq!(info, &again, "a second read differs");
        }
    }
    result
}

fn check_accepted_hex(bytes: &[u8]) {
    check_accepted_tar("Hex outer tar", bytes);
    let mut outer = tar::Archive::new(bytes);
    for e in outer.entries().expect("accepted") {
        let mut e = e.expect("accepted");
        if &*e.path_bytes() == b"contents.tar.gz" {
            let mut contents = Vec::new();
            e.read_to_end(&mut contents).expect("accepted");
            check_accepted_tar("contents.tar.gz", &gunzip(&contents));
        }
    }
}

/// Reads a compact description of a tar and writes the tar, every header
/// with a correct checksum: blind mutations of a tar die on header
/// checksums, so without this the fuzzer never builds, say, a valid entry
/// after an end-of-archive marker. The description is a sequence of ops;
/// each op byte is
///
/// * bit 5 set: an end-of-archive marker (two zero blocks);
/// * else bit 6 set: raw bytes, `u16` LE length then the bytes, as they are
///   (misaligned blocks, broken headers);
/// * else an entry: bits 0-2 pick its type from [`TYPES`], bit 4 a ustar
///   header (else GNU), then a name (`u8` length, at most 100 bytes), data
///   (`u16` LE length, bytes), and with bit 3 a declared size (`u32` LE)
///   that replaces the data's length in the header. With bit 7, a pax
///   header's data is `key=value` lines written as well-formed records.
pub fn structured_tar(description: &[u8]) -> Vec<u8> {
    let mut d = Cursor(description);
    let mut out = Vec::new();
    while let Some(op) = d.u8() {
        if op & 32 != 0 {
            out.extend_from_slice(&[0u8; 1024]);
            continue;
        }
        if op & 64 != 0 {
            let n = usize::from(d.u16());
            out.extend_from_slice(d.bytes(n));
            continue;
        }
        let kind = TYPES[usize::from(op & 7)];
        let name_len = usize::from(d.u8().unwrap_or(0)).min(100);
        let name = d.bytes(name_len).to_vec();
        let data_len = usize::from(d.u16());
        let mut data = d.bytes(data_len).to_vec();
        if op & 128 != 0 && kind == b'x' {
            data = pax_records(&data);
        }
        let declared = if op & 8 != 0 {
            u64::from(d.u32())
        } else {
            data.len() as u64
        };
        let mut h = if op & 16 != 0 {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(&name);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(declared);
        h.set_mode(0o644);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out
}

/// The entry types [`structured_tar`] writes: file, directory, GNU long
/// name, pax, GNU long link, pax global, symlink, hard link.
const TYPES: [u8; 8] = [b'0', b'5', b'L', b'x', b'K', b'g', b'2', b'1'];

/// `key=value` lines as pax records, each with its right length.
fn pax_records(lines: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let body_len = line.len() + 2; // the space and the newline
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len += 1;
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

/// Reads a fuzz input front to back; past its end, zeros and empty slices.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8().unwrap_or(0), self.u8().unwrap_or(0)])
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// `.niso` reader. The first byte picks how the rest is read (mod 3):
/// 0, the archive as uploaded; 1, a plain tar, gzipped here, so mutations
/// reach the tar layer and the manifest instead of dying in the deflate
/// stream; 2, a [`structured_tar`] description, gzipped here.
///
/// Returns whether the archive was accepted (false for an empty input).
pub fn niso_archive(data: &[u8]) -> bool {
    let Some((mode, rest)) = data.split_first() else {
        return false;
    };
    let bytes = match mode % 3 {
        0 => rest.to_vec(),
        1 => gzip_fast(rest),
        _ => gzip_fast(&structured_tar(rest)),
    };
    inspect_and_check(&bytes).is_ok()
}

/// Hex tarball reader. The first byte picks how the rest is read (mod 4):
/// 0, the tarball as uploaded; 1, `LEN` (`u16` LE), a metadata.config of
/// LEN bytes and a plain inner tar, assembled here into a tarball with a
/// correct CHECKSUM, so mutations reach the metadata parser and the
/// contents checks; 2, the outer tar as a [`structured_tar`] description;
/// 3, as 1 with the inner tar as a [`structured_tar`] description.
///
/// Returns whether the tarball was accepted (false for a short input).
pub fn hex_tarball(data: &[u8]) -> bool {
    let Some((mode, rest)) = data.split_first() else {
        return false;
    };
    let bytes = match mode % 4 {
        0 => rest.to_vec(),
        2 => structured_tar(rest),
        m => {
            let Some((len, rest)) = rest.split_first_chunk::<2>() else {
                return false;
            };
            let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
            let (metadata, inner) = rest.split_at(len);
            let inner = if m == 1 {
                inner.to_vec()
            } else {
                structured_tar(inner)
            };
            assemble_hex(metadata, &gzip_fast(&inner))
        }
    };
    inspect_and_check(&bytes).is_ok()
}

/// A Hex tarball (format 3) of `metadata` and `contents`, CHECKSUM right.
pub fn assemble_hex(metadata: &[u8], contents: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"3");
    h.update(metadata);
    h.update(contents);
    let checksum = hex::encode_upper(h.finalize());
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("VERSION", &b"3"[..]),
        ("CHECKSUM", checksum.as_bytes()),
        ("metadata.config", metadata),
        ("contents.tar.gz", contents),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        b.append_data(&mut header, name, data)
            .expect("write to a Vec");
    }
    b.into_inner().expect("write to a Vec")
}

/// `metadata.config`: read as hex.rs reads it (UTF-8, else Latin-1); terms
/// that parse, printed back, parse to the same terms.
pub fn metadata_config(data: &[u8]) {
    use niso::archive::hex_metadata::{parse_metadata, parse_terms};
    let text: String = match std::str::from_utf8(data) {
        Ok(t) => t.to_string(),
        Err(_) => data.iter().map(|&b| b as char).collect(),
    };
    let _ = parse_metadata(&text);
    if let Ok(terms) = parse_terms(&text) {
        let printed: String = terms.iter().map(|t| format!("{}.\n", erlang(t))).collect();
        match parse_terms(&printed) {
            Ok(again) => assert_eq!(terms, again, "printed as:\n{printed}"),
            Err(e) => panic!("printed terms do not parse ({e}):\n{printed}"),
        }
    }
}

/// A term as Erlang text (every character that is not plain ASCII
/// alphanumeric or a space written as `\x{..}`).
fn erlang(t: &niso::archive::hex_metadata::Term) -> String {
    use niso::archive::hex_metadata::Term;
    fn escaped(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == ' ' {
                    c.to_string()
                } else {
                    format!("\\x{{{:X}}}", u32::from(c))
                }
            })
            .collect()
    }
    let list = |items: &[Term]| items.iter().map(erlang).collect::<Vec<_>>().join(",");
    match t {
        Term::Binary(s) => format!("<<\"{}\"/utf8>>", escaped(s)),
        Term::String(s) => format!("\"{}\"", escaped(s)),
        Term::Atom(a) => format!("'{}'", escaped(a)),
        Term::Integer(n) => n.to_string(),
        Term::Float(f) => {
            // Erlang wants digits on both sides of the point.
            let s = format!("{f:?}");
            match s.split_once('e') {
                Some((m, e)) if !m.contains('.') => format!("{m}.0e{e}"),
                _ => s,
            }
        }
        Term::List(items) => format!("[{}]", list(items)),
        Term::Tuple(items) => format!("{{{}}}", list(items)),
        Term::Map(pairs) => format!(
            "#{{{}}}",
            pairs
                .iter()
                .map(|(k, v)| format!("{} => {}", erlang(k), erlang(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// The `.niso` manifest: an accepted one, written back as TOML, parses to
/// the same manifest; a refusal's message is short.
pub fn manifest(data: &[u8]) {
    use niso::archive::niso::{
        Manifest, ManifestBinary, ManifestFile, ManifestIsolation, ManifestPackage,
    };
    let m = match Manifest::parse(data) {
        Ok(m) => m,
        Err(e) => return check_message(&e),
    };
    let file = ManifestFile {
        package: ManifestPackage {
            name: m.name.to_string(),
            version: m.version.to_string(),
            arch: m.arch.to_string(),
            description: m.description.clone(),
        },
        binary: ManifestBinary {
            entrypoint: m.entrypoint.clone(),
        },
        isolation: m.preset.clone().map(|preset| ManifestIsolation { preset }),
    };
    let text = toml::to_string(&file).expect("a manifest serializes");
    let again = Manifest::parse(text.as_bytes()).expect("a written manifest parses");
    assert_eq!(m, again, "written as:\n{text}");
}

fn repo_key() -> &'static RepoKey {
    static KEY: OnceLock<RepoKey> = OnceLock::new();
    KEY.get_or_init(|| {
        RepoKey::from_pem(
            include_bytes!("../../fixtures/keys/pkcs1.pem"),
            "fixture key",
        )
        .expect("the fixture key loads")
    })
}

fn decode_all(bytes: &[u8], key: &PublicKey) -> [bool; 4] {
    const LIMIT: u64 = 1 << 20;
    [
        index::decode_index::<pb::Names>(bytes, key, "acme", LIMIT).is_ok(),
        index::decode_index::<pb::Versions>(bytes, key, "acme", LIMIT).is_ok(),
        index::decode_index::<pb::Package>(bytes, key, "acme", LIMIT).is_ok(),
        index::decode_index::<pb::Freshness>(bytes, key, "acme", LIMIT).is_ok(),
    ]
}

/// Same message after encode, sign and decode again.
fn round_trip<M: index::codec::IndexMessage + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    let key = repo_key();
    if let Ok(m) = index::decode_index::<M>(bytes, key.public_key(), "acme", 1 << 20) {
        let encoded = index::encode_index(&m, key).expect("signing works");
        let again = index::decode_index::<M>(&encoded, key.public_key(), "acme", 1 << 22)
            .expect("a re-encoded index decodes");
        assert_eq!(m, again);
    }
}

/// Index decode and verify. First byte below 128: the rest is an index file
/// as fetched (almost never signed, so this exercises gunzip and the
/// `Signed` envelope). Otherwise the rest is a payload, signed here with the
/// fixture key, so the payload decoders and the repository check run too.
pub fn index_decode(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let key = repo_key();
    if *mode < 128 {
        decode_all(rest, key.public_key());
        return;
    }
    let signed = pb::Signed {
        payload: rest.to_vec(),
        signature: Some(key.sign(rest).expect("signing works")),
    };
    let bytes = index::codec::gzip(&signed.encode_to_vec());
    decode_all(&bytes, key.public_key());
    round_trip::<pb::Names>(&bytes);
    round_trip::<pb::Versions>(&bytes);
    round_trip::<pb::Package>(&bytes);
    round_trip::<pb::Freshness>(&bytes);
}
