//! The rules `niso::archive` enforces on uploaded archives, one test per rule.
//!
//! Every archive here is built in memory, byte by byte where it matters (the
//! tar writer below puts raw names into headers, so `..`, absolute paths and
//! non-UTF-8 names can be written), and each test asserts the exact
//! [`ArchiveError`] variant an archive gets. Tests marked "regression test"
//! describe a hole an earlier version of `src/archive` had.
//!
//! Layout: builders (tar entries, gzip, Hex tarballs, `.niso` archives), then
//! accepted archives, `niso package`, Hex structure, hostile entries (both
//! formats), limits, `.niso` structure and manifests, and malformed input.

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

use niso::archive::niso::{create, PackageError};
use niso::archive::{
    inspect, inspect_file, ArchiveError, ArchiveInfo, ArchiveKind, Dependency, Runtime,
};
use niso::ident::IdentError;
use niso::limits::Limits;

// ---------------------------------------------------------------------------
// Allocation tracking (per thread), to check that bombs are not buffered.

mod alloc_track {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Tracking;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn record(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| {
                if now > peak.get() {
                    peak.set(now);
                }
            });
        });
    }

    unsafe impl GlobalAlloc for Tracking {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                record(layout.size() as isize);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                record(layout.size() as isize);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            record(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                record(new_size as isize - layout.size() as isize);
            }
            p
        }
    }

    /// Runs `f`; returns its result and the most bytes this thread held at
    /// once during the call, beyond what it held before.
    pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(start));
        let out = f();
        let peak = PEAK.with(Cell::get);
        (out, (peak - start).max(0) as usize)
    }
}

#[global_allocator]
static GLOBAL: alloc_track::Tracking = alloc_track::Tracking;

// ---------------------------------------------------------------------------
// Tar entries, written by hand so any name and type can be expressed.

const MIB: u64 = 1 << 20;

#[derive(Clone)]
struct Ent {
    name: Vec<u8>,
    kind: tar::EntryType,
    data: Vec<u8>,
    /// Size written in the header, when it should differ from `data.len()`.
    declared: Option<u64>,
    link: Vec<u8>,
    mode: u32,
}

fn ent(name: impl AsRef<[u8]>, kind: tar::EntryType) -> Ent {
    Ent {
        name: name.as_ref().to_vec(),
        kind,
        data: Vec::new(),
        declared: None,
        link: Vec::new(),
        mode: 0o644,
    }
}

fn file(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Ent {
    Ent {
        data: data.as_ref().to_vec(),
        ..ent(name, tar::EntryType::Regular)
    }
}

fn exe(name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Ent {
    Ent {
        mode: 0o755,
        ..file(name, data)
    }
}

fn dir(name: impl AsRef<[u8]>) -> Ent {
    Ent {
        mode: 0o755,
        ..ent(name, tar::EntryType::Directory)
    }
}

fn symlink(name: &str, target: &str) -> Ent {
    Ent {
        link: target.as_bytes().to_vec(),
        ..ent(name, tar::EntryType::Symlink)
    }
}

fn hardlink(name: &str, target: &str) -> Ent {
    Ent {
        link: target.as_bytes().to_vec(),
        ..ent(name, tar::EntryType::Link)
    }
}

fn chardev(name: &str) -> Ent {
    ent(name, tar::EntryType::Char)
}

fn fifo(name: &str) -> Ent {
    ent(name, tar::EntryType::Fifo)
}

/// A PAX extended header (`x`) applying `records` to the next entry.
fn pax(records: &[(&str, &str)]) -> Ent {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        // The length prefix counts itself.
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    Ent {
        data,
        ..ent("././@PaxHeader", tar::EntryType::XHeader)
    }
}

/// The raw 512-byte header of `e`: GNU format, raw name bytes (no checks).
fn header(e: &Ent) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().expect("gnu header");
        assert!(e.name.len() <= gnu.name.len(), "name too long for a header");
        gnu.name[..e.name.len()].copy_from_slice(&e.name);
        gnu.linkname[..e.link.len()].copy_from_slice(&e.link);
    }
    h.set_entry_type(e.kind);
    h.set_size(e.declared.unwrap_or(e.data.len() as u64));
    h.set_mode(e.mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    if e.kind == tar::EntryType::Char {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    }
    h.set_cksum();
    h
}

fn pad(out: &mut Vec<u8>) {
    while out.len() % 512 != 0 {
        out.push(0);
    }
}

/// Headers and data of `entries`, without the end-of-archive blocks.
fn tar_body(entries: &[Ent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(header(e).as_bytes());
        out.extend_from_slice(&e.data);
        pad(&mut out);
    }
    out
}

/// A complete tar of `entries`.
fn tar_of(entries: &[Ent]) -> Vec<u8> {
    let mut out = tar_body(entries);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// gzip of `prefix` followed by `zeros` zero bytes, without ever holding the
/// zeros in memory.
fn gz_with_zeros(prefix: &[u8], zeros: u64) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(prefix).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    enc.finish().unwrap()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

// ---------------------------------------------------------------------------
// Hex tarballs.

const HEX_REQUIREMENTS: &str = concat!(
    r#"[{<<"plug">>,[{<<"app">>,<<"plug">>},{<<"optional">>,true},"#,
    r#"{<<"repository">>,<<"hexpm">>},{<<"requirement">>,<<"~> 1.0">>}]},"#,
    r#"{<<"jason">>,#{<<"app">> => <<"jason">>,<<"optional">> => false,"#,
    r#"<<"requirement">> => <<">= 1.0.0">>}}]"#,
);

/// metadata.config as `mix hex.build` would write it.
fn hex_metadata(name: &str, version: &str, requirements: &str) -> Vec<u8> {
    format!(
        "{{<<\"app\">>,<<\"my_pkg\">>}}.\n\
         {{<<\"build_tools\">>,[<<\"mix\">>]}}.\n\
         {{<<\"description\">>,<<\"A test package\">>}}.\n\
         {{<<\"files\">>,[<<\"lib\">>,<<\"lib/my_pkg.ex\">>,<<\"mix.exs\">>]}}.\n\
         {{<<\"licenses\">>,[<<\"Apache-2.0\">>]}}.\n\
         {{<<\"name\">>,<<\"{name}\">>}}.\n\
         {{<<\"requirements\">>,{requirements}}}.\n\
         {{<<\"version\">>,<<\"{version}\">>}}.\n"
    )
    .into_bytes()
}

fn hex_contents_entries() -> Vec<Ent> {
    vec![
        dir("lib/"),
        file("lib/my_pkg.ex", "defmodule MyPkg do\nend\n"),
        file("mix.exs", "defmodule MyPkg.MixProject do\nend\n"),
    ]
}

/// The parts of a Hex tarball; `build` writes them in hex_core's order.
#[derive(Clone)]
struct Hex {
    version: Vec<u8>,
    metadata: Vec<u8>,
    contents: Vec<u8>,
    /// `None`: the correct CHECKSUM.
    checksum: Option<Vec<u8>>,
}

impl Hex {
    fn valid() -> Self {
        Self {
            version: b"3".to_vec(),
            metadata: hex_metadata("my_pkg", "1.2.3", HEX_REQUIREMENTS),
            contents: gz(&tar_of(&hex_contents_entries())),
            checksum: None,
        }
    }

    fn with_metadata(metadata: impl AsRef<[u8]>) -> Self {
        Self {
            metadata: metadata.as_ref().to_vec(),
            ..Self::valid()
        }
    }

    /// A valid tarball whose contents.tar.gz holds the usual files and then
    /// `extra`.
    fn with_extra_contents(extra: &[Ent]) -> Self {
        let mut entries = hex_contents_entries();
        entries.extend_from_slice(extra);
        Self {
            contents: gz(&tar_of(&entries)),
            ..Self::valid()
        }
    }

    fn inner_checksum(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.version);
        h.update(&self.metadata);
        h.update(&self.contents);
        h.finalize().into()
    }

    /// VERSION, CHECKSUM, metadata.config, contents.tar.gz.
    fn parts(&self) -> Vec<Ent> {
        let checksum = self
            .checksum
            .clone()
            .unwrap_or_else(|| hex::encode_upper(self.inner_checksum()).into_bytes());
        vec![
            file("VERSION", &self.version),
            file("CHECKSUM", checksum),
            file("metadata.config", &self.metadata),
            file("contents.tar.gz", &self.contents),
        ]
    }

    fn build(&self) -> Vec<u8> {
        tar_of(&self.parts())
    }

    /// The outer tar without the named parts.
    fn build_without(&self, names: &[&str]) -> Vec<u8> {
        let parts: Vec<Ent> = self
            .parts()
            .into_iter()
            .filter(|e| !names.iter().any(|n| e.name == n.as_bytes()))
            .collect();
        tar_of(&parts)
    }

    /// The outer tar with `extra` appended after the four parts.
    fn build_with_extra(&self, extra: &[Ent]) -> Vec<u8> {
        let mut parts = self.parts();
        parts.extend_from_slice(extra);
        tar_of(&parts)
    }
}

// ---------------------------------------------------------------------------
// .niso archives.

const MANIFEST: &str = r#"[package]
name = "my-app"
version = "1.1.0"
arch = "x86_64"
description = "My application"

[binary]
entrypoint = "bin/my-app"

[isolation]
preset = "server"
"#;

/// A manifest with one `key = value` line of `[package]` replaced (or, with
/// `None`, removed).
fn manifest_with(key: &str, value: Option<&str>) -> String {
    let mut out = String::new();
    for line in MANIFEST.lines() {
        if line.starts_with(&format!("{key} = ")) {
            if let Some(v) = value {
                out.push_str(&format!("{key} = {v}\n"));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn niso_entries_with_manifest(manifest: &str) -> Vec<Ent> {
    vec![
        file("niso.toml", manifest),
        file("README.md", "# my-app\n"),
        dir("payload/"),
        dir("payload/bin/"),
        exe("payload/bin/my-app", "#!/bin/sh\necho hi\n"),
        file("payload/share.txt", "data\n"),
    ]
}

fn niso_entries() -> Vec<Ent> {
    niso_entries_with_manifest(MANIFEST)
}

fn niso_of(entries: &[Ent]) -> Vec<u8> {
    gz(&tar_of(entries))
}

fn niso_valid() -> Vec<u8> {
    niso_of(&niso_entries())
}

fn niso_with_manifest(manifest: &str) -> Vec<u8> {
    niso_of(&niso_entries_with_manifest(manifest))
}

/// A valid `.niso` with `extra` appended after its entries.
fn niso_with_extra(extra: &[Ent]) -> Vec<u8> {
    let mut entries = niso_entries();
    entries.extend_from_slice(extra);
    niso_of(&entries)
}

// ---------------------------------------------------------------------------
// Running the reader.

fn limits() -> Limits {
    Limits::default()
}

#[track_caller]
fn accept(bytes: &[u8], limits: &Limits) -> ArchiveInfo {
    match inspect(bytes, limits) {
        Ok(info) => info,
        Err(e) => panic!("archive refused: {e} ({e:?})"),
    }
}

#[track_caller]
fn refuse(bytes: &[u8], limits: &Limits) -> ArchiveError {
    match inspect(bytes, limits) {
        Ok(info) => panic!("archive accepted: {info:?}"),
        Err(e) => e,
    }
}

/// Panics listing every failed case, so one run shows all of them.
#[track_caller]
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Asserts that `$e` (an `ArchiveError`) matches the pattern (matched against
/// a reference, so fields bind by reference) and returns its Display text.
macro_rules! assert_err {
    ($e:expr, $($pat:pat_param)|+ $(if $guard:expr)?) => {{
        let e: ArchiveError = $e;
        assert!(
            matches!(&e, $($pat)|+ $(if $guard)?),
            "unexpected error: {e:?} ({e})"
        );
        e.to_string()
    }};
}

/// The three places a hostile entry can sit, each built around `entry`:
/// (what, archive bytes, the path the error must name).
fn everywhere(entry: &Ent) -> Vec<(&'static str, Vec<u8>, String)> {
    let name = String::from_utf8_lossy(&entry.name).into_owned();
    vec![
        (
            ".niso",
            niso_with_extra(std::slice::from_ref(entry)),
            name.clone(),
        ),
        (
            "Hex outer tar",
            Hex::valid().build_with_extra(std::slice::from_ref(entry)),
            name.clone(),
        ),
        (
            "Hex contents.tar.gz",
            Hex::with_extra_contents(std::slice::from_ref(entry)).build(),
            format!("contents.tar.gz:{name}"),
        ),
    ]
}

/// Asserts that `entry` is refused as unsafe in all three places, with a
/// reason containing `reason` and the error naming the entry.
#[track_caller]
fn assert_unsafe_everywhere(entry: &Ent, reason_part: &str) {
    for (what, bytes, want_path) in everywhere(entry) {
        let e = refuse(&bytes, &limits());
        let text = e.to_string();
        match &e {
            ArchiveError::UnsafeEntry { path, reason } => {
                assert_eq!(path, &want_path, "{what}: {text}");
                assert!(reason.contains(reason_part), "{what}: {text}");
            }
            other => panic!("{what}: expected UnsafeEntry, got {other:?} ({other})"),
        }
        // Display quotes the path with `{:?}`.
        assert!(text.contains(&format!("{want_path:?}")), "{what}: {text}");
    }
}

// ---------------------------------------------------------------------------
// Accepted archives.

#[test]
fn valid_hex_tarball_is_accepted() {
    let hex = Hex::valid();
    let bytes = hex.build();
    let info = accept(&bytes, &limits());
    assert_eq!(info.kind, ArchiveKind::Hex);
    assert_eq!(info.name.as_str(), "my_pkg");
    assert_eq!(info.version.as_str(), "1.2.3");
    assert_eq!(info.arch.as_str(), "any");
    assert_eq!(info.description.as_deref(), Some("A test package"));
    assert_eq!(
        info.dependencies,
        vec![
            Dependency {
                package: "plug".into(),
                requirement: "~> 1.0".into(),
                optional: true,
                app: Some("plug".into()),
                repository: Some("hexpm".into()),
            },
            Dependency {
                package: "jason".into(),
                requirement: ">= 1.0.0".into(),
                optional: false,
                app: Some("jason".into()),
                repository: None,
            },
        ]
    );
    assert_eq!(info.inner_checksum, hex.inner_checksum().to_vec());
    let stated = hex::encode_upper(hex.inner_checksum());
    assert_eq!(hex::encode_upper(&info.inner_checksum), stated);
    assert_eq!(info.sha256, sha256(&bytes));
    assert_eq!(info.size, bytes.len() as u64);
    assert_eq!(info.runtime, None);
    assert_eq!(info.tree_path(), "tarballs/my_pkg-1.2.3.tar");
}

#[test]
fn valid_hex_tarball_from_a_file_matches_the_stream() {
    let bytes = Hex::valid().build();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my_pkg-1.2.3.tar");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        inspect_file(&path, &limits()).unwrap(),
        accept(&bytes, &limits())
    );
}

#[test]
fn hex_checksum_may_follow_contents() {
    // Only VERSION and metadata.config must precede contents.tar.gz.
    let hex = Hex::valid();
    let mut parts = hex.parts();
    let checksum = parts.remove(1);
    parts.push(checksum);
    let info = accept(&tar_of(&parts), &limits());
    assert_eq!(info.inner_checksum, hex.inner_checksum().to_vec());
}

#[test]
fn valid_hand_built_niso_is_accepted() {
    let bytes = niso_valid();
    let info = accept(&bytes, &limits());
    assert_eq!(info.kind, ArchiveKind::Niso);
    assert_eq!(info.name.as_str(), "my-app");
    assert_eq!(info.version.as_str(), "1.1.0");
    assert_eq!(info.arch.as_str(), "x86_64");
    assert_eq!(info.description.as_deref(), Some("My application"));
    assert_eq!(
        info.runtime,
        Some(Runtime {
            entrypoint: "bin/my-app".into(),
            preset: Some("server".into()),
        })
    );
    assert!(info.dependencies.is_empty());
    assert!(info.inner_checksum.is_empty());
    assert_eq!(info.sha256, sha256(&bytes));
    assert_eq!(info.size, bytes.len() as u64);
    assert_eq!(info.tree_path(), "archives/my-app-1.1.0-x86_64.niso");
}

#[test]
fn minimal_niso_is_accepted() {
    // No README, no description, no [isolation], arch "any", `./` prefixes.
    let manifest = "[package]\nname = \"tool\"\nversion = \"0.1.0-rc.1\"\narch = \"any\"\n\n\
                    [binary]\nentrypoint = \"tool\"\n";
    let bytes = niso_of(&[file("./niso.toml", manifest), exe("./payload/tool", "x")]);
    let info = accept(&bytes, &limits());
    assert_eq!(info.name.as_str(), "tool");
    assert_eq!(info.version.as_str(), "0.1.0-rc.1");
    assert_eq!(info.arch.as_str(), "any");
    assert_eq!(info.description, None);
    assert_eq!(
        info.runtime,
        Some(Runtime {
            entrypoint: "tool".into(),
            preset: None,
        })
    );
}

// ---------------------------------------------------------------------------
// `niso package` (archive::niso::create).

/// A package directory: niso.toml, README.md, payload/bin/my-app (0755),
/// payload/share/data.txt (0644).
fn package_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("niso.toml"), MANIFEST).unwrap();
    std::fs::write(d.join("README.md"), "# my-app\n").unwrap();
    std::fs::create_dir_all(d.join("payload/bin")).unwrap();
    std::fs::create_dir_all(d.join("payload/share")).unwrap();
    let bin = d.join("payload/bin/my-app");
    std::fs::write(&bin, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = d.join("payload/share/data.txt");
    std::fs::write(&data, "data\n").unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

/// (path, raw header) of every entry of a `.niso` file.
fn niso_listing(path: &Path) -> Vec<(String, tar::Header)> {
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            (path, e.header().clone())
        })
        .collect()
}

#[test]
fn create_makes_an_archive_the_reader_accepts() {
    let src = package_dir();
    let out = tempfile::tempdir().unwrap();
    let (path, manifest) = create(src.path(), out.path(), &limits()).unwrap();
    assert_eq!(path, out.path().join("my-app-1.1.0-x86_64.niso"));
    assert_eq!(manifest.name.as_str(), "my-app");
    assert_eq!(manifest.version.as_str(), "1.1.0");
    assert_eq!(manifest.arch.as_str(), "x86_64");
    assert_eq!(manifest.description.as_deref(), Some("My application"));
    assert_eq!(manifest.entrypoint, "bin/my-app");
    assert_eq!(manifest.preset.as_deref(), Some("server"));

    let bytes = std::fs::read(&path).unwrap();
    let info = inspect_file(&path, &limits()).unwrap();
    assert_eq!(info, accept(&bytes, &limits()));
    assert_eq!(info.kind, ArchiveKind::Niso);
    assert_eq!(info.name, manifest.name);
    assert_eq!(info.version, manifest.version);
    assert_eq!(info.arch, manifest.arch);
    assert_eq!(info.description, manifest.description);
    assert_eq!(
        info.runtime,
        Some(Runtime {
            entrypoint: manifest.entrypoint.clone(),
            preset: manifest.preset.clone(),
        })
    );
    assert_eq!(info.sha256, sha256(&bytes));
    assert_eq!(info.size, bytes.len() as u64);
    // Nothing but the archive is left in the output directory.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
}

#[test]
fn create_is_deterministic() {
    let src = package_dir();
    let out1 = tempfile::tempdir().unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let (p1, _) = create(src.path(), out1.path(), &limits()).unwrap();
    // A different mtime must not change the archive.
    let data = std::fs::File::options()
        .write(true)
        .open(src.path().join("payload/share/data.txt"))
        .unwrap();
    data.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    drop(data);
    let (p2, _) = create(src.path(), out2.path(), &limits()).unwrap();
    let (a, b) = (std::fs::read(p1).unwrap(), std::fs::read(p2).unwrap());
    assert!(!a.is_empty());
    assert!(a == b, "two runs over the same directory differ");
}

#[test]
fn create_keeps_the_executable_bit_and_orders_entries() {
    use tar::EntryType::{Directory as D, Regular as F};
    let src = package_dir();
    let out = tempfile::tempdir().unwrap();
    let (path, _) = create(src.path(), out.path(), &limits()).unwrap();
    let listing = niso_listing(&path);
    let want = [
        ("niso.toml", 0o644, F),
        ("README.md", 0o644, F),
        ("payload/", 0o755, D),
        ("payload/bin/", 0o755, D),
        ("payload/bin/my-app", 0o755, F),
        ("payload/share/", 0o755, D),
        ("payload/share/data.txt", 0o644, F),
    ];
    let got: Vec<(&str, u32, tar::EntryType)> = listing
        .iter()
        .map(|(p, h)| (p.as_str(), h.mode().unwrap(), h.entry_type()))
        .collect();
    assert_eq!(got, want);
    for (p, h) in &listing {
        assert_eq!(h.mtime().unwrap(), 0, "{p}");
    }
}

#[test]
fn create_writes_owner_zero_in_every_header() {
    let src = package_dir();
    let out = tempfile::tempdir().unwrap();
    let (path, _) = create(src.path(), out.path(), &limits()).unwrap();
    for (p, h) in niso_listing(&path) {
        // Regression test (this was a bug, now fixed): src/archive/niso.rs create()/append_file()/append_dir() build
        // headers with tar::Header::new_ustar() and never call set_uid(0) /
        // set_gid(0), so the uid and gid fields are left all-NUL. GNU tar and
        // Python read that as 0, but tar::Header::uid()/gid() fail with
        // "numeric field was not a number", contrary to "owner 0" in the
        // module doc.
        assert_eq!(h.uid().ok(), Some(0), "uid of {p}");
        assert_eq!(h.gid().ok(), Some(0), "gid of {p}");
    }
}

#[test]
fn create_refuses_a_symlink_in_payload() {
    let src = package_dir();
    let link = src.path().join("payload/bin/link");
    std::os::unix::fs::symlink("my-app", &link).unwrap();
    let out = tempfile::tempdir().unwrap();
    match create(src.path(), out.path(), &limits()) {
        Err(PackageError::Layout { path, reason }) => {
            assert_eq!(path, link);
            assert!(reason.contains("links"), "{reason}");
        }
        other => panic!("expected PackageError::Layout, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "a refused package must leave nothing behind"
    );
}

#[test]
fn create_refuses_a_manifest_whose_entrypoint_is_missing() {
    let src = package_dir();
    std::fs::remove_file(src.path().join("payload/bin/my-app")).unwrap();
    let out = tempfile::tempdir().unwrap();
    match create(src.path(), out.path(), &limits()) {
        Err(PackageError::Manifest(ArchiveError::Invalid { file, reason })) => {
            assert_eq!(file, "niso.toml");
            assert!(reason.contains("bin/my-app"), "{reason}");
        }
        other => panic!("expected PackageError::Manifest(Invalid), got {other:?}"),
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn inspect_file_reports_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.niso");
    match inspect_file(&missing, &limits()) {
        Err(ArchiveError::Open { path, source }) => {
            assert!(path.contains("nope.niso"), "{path}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Open, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Hex tarball structure.

#[test]
fn hex_missing_version() {
    // Without contents.tar.gz the reader gets to the end and reports it...
    let hex = Hex::valid();
    let e = refuse(
        &hex.build_without(&["VERSION", "contents.tar.gz"]),
        &limits(),
    );
    assert_err!(e, ArchiveError::Missing("VERSION"));
    // ...with it, the documented order rule fires first, naming VERSION.
    let e = refuse(&hex.build_without(&["VERSION"]), &limits());
    let text = assert_err!(
        e,
        ArchiveError::UnexpectedEntry { path, reason }
            if path == "contents.tar.gz" && reason.contains("VERSION")
    );
    assert!(text.contains("VERSION"), "{text}");
}

#[test]
fn hex_missing_checksum() {
    let e = refuse(&Hex::valid().build_without(&["CHECKSUM"]), &limits());
    let text = assert_err!(e, ArchiveError::Missing("CHECKSUM"));
    assert!(text.contains("CHECKSUM"), "{text}");
}

#[test]
fn hex_missing_metadata() {
    let hex = Hex::valid();
    let e = refuse(
        &hex.build_without(&["metadata.config", "contents.tar.gz"]),
        &limits(),
    );
    assert_err!(e, ArchiveError::Missing("metadata.config"));
    let e = refuse(&hex.build_without(&["metadata.config"]), &limits());
    assert_err!(
        e,
        ArchiveError::UnexpectedEntry { path, reason }
            if path == "contents.tar.gz" && reason.contains("metadata.config")
    );
}

#[test]
fn hex_missing_contents() {
    let e = refuse(&Hex::valid().build_without(&["contents.tar.gz"]), &limits());
    let text = assert_err!(e, ArchiveError::Missing("contents.tar.gz"));
    assert!(text.contains("contents.tar.gz"), "{text}");
}

#[test]
fn hex_version_2_is_refused() {
    let hex = Hex {
        version: b"2".to_vec(),
        ..Hex::valid()
    };
    let e = refuse(&hex.build(), &limits());
    let text = assert_err!(
        e,
        ArchiveError::Invalid {
            file: "VERSION",
            ..
        }
    );
    assert!(text.contains('2'), "{text}");
}

#[test]
fn hex_wrong_checksum_is_refused() {
    let hex = Hex {
        checksum: Some(vec![b'A'; 64]),
        ..Hex::valid()
    };
    let actual = hex::encode_upper(hex.inner_checksum());
    let e = refuse(&hex.build(), &limits());
    assert_err!(
        e,
        ArchiveError::ChecksumMismatch { stated, actual: a }
            if *stated == "A".repeat(64) && *a == actual
    );
    // A checksum of another tarball's contents is just as wrong.
    let other = Hex {
        checksum: Some(
            hex::encode_upper(
                Hex::with_metadata(hex_metadata("other", "1.0.0", "[]")).inner_checksum(),
            )
            .into_bytes(),
        ),
        ..Hex::valid()
    };
    assert_err!(
        refuse(&other.build(), &limits()),
        ArchiveError::ChecksumMismatch { .. }
    );
}

#[test]
fn hex_unknown_outer_entry_is_refused() {
    let bytes = Hex::valid().build_with_extra(&[file("extra.txt", "hi")]);
    let text = assert_err!(
        refuse(&bytes, &limits()),
        ArchiveError::UnexpectedEntry { path, .. } if path == "extra.txt"
    );
    assert!(text.contains("extra.txt"), "{text}");
}

#[test]
fn hex_outer_directory_is_refused() {
    let bytes = Hex::valid().build_with_extra(&[dir("lib/")]);
    assert_err!(
        refuse(&bytes, &limits()),
        ArchiveError::UnexpectedEntry { path, .. } if path == "lib"
    );
}

#[test]
fn hex_contents_before_metadata_is_refused() {
    let mut parts = Hex::valid().parts();
    let contents = parts.pop().unwrap();
    parts.insert(2, contents); // VERSION, CHECKSUM, contents, metadata
    assert_err!(
        refuse(&tar_of(&parts), &limits()),
        ArchiveError::UnexpectedEntry { path, reason }
            if path == "contents.tar.gz" && reason.contains("before")
    );
}

#[test]
fn hex_metadata_with_invalid_erlang_syntax_is_refused() {
    for bad in [
        "{<<\"name\">>,<<\"my_pkg\">>\n",        // unclosed tuple
        "{<<\"name\">>,<<\"my_pkg\">>}\n",       // no terminator
        "{<<\"name\">>, os:cmd(\"rm -rf /\")}.", // a call
    ] {
        let e = refuse(&Hex::with_metadata(bad).build(), &limits());
        let text = assert_err!(
            e,
            ArchiveError::Invalid {
                file: "metadata.config",
                ..
            }
        );
        assert!(text.contains("line"), "{bad:?}: {text}");
    }
    // Binary junk (not UTF-8, and not Erlang terms when read as Latin-1).
    let e = refuse(&Hex::with_metadata(b"\xff\xfe").build(), &limits());
    assert_err!(
        e,
        ArchiveError::Invalid {
            file: "metadata.config",
            ..
        }
    );
}

#[test]
fn hex_metadata_with_invalid_package_name_is_refused() {
    let meta = hex_metadata("Bad Name", "1.2.3", "[]");
    let e = refuse(&Hex::with_metadata(meta).build(), &limits());
    let text = assert_err!(
        e,
        ArchiveError::Ident(IdentError::PackageName { name, .. }) if name == "Bad Name"
    );
    assert!(text.contains("Bad Name"), "{text}");
}

#[test]
fn hex_metadata_with_invalid_version_is_refused() {
    for bad in ["1.0", "1.0.0+build", "../1.0.0"] {
        let meta = hex_metadata("my_pkg", bad, "[]");
        let e = refuse(&Hex::with_metadata(meta).build(), &limits());
        assert_err!(
            e,
            ArchiveError::Ident(IdentError::Version { version, .. }) if version == bad
        );
    }
}

#[test]
fn hex_requirement_with_invalid_name_is_refused() {
    let reqs = r#"[{<<"Bad Dep">>,[{<<"app">>,<<"x">>},{<<"optional">>,false},{<<"requirement">>,<<"~> 1.0">>}]}]"#;
    let meta = hex_metadata("my_pkg", "1.2.3", reqs);
    let e = refuse(&Hex::with_metadata(meta).build(), &limits());
    let text = assert_err!(
        e,
        ArchiveError::Invalid { file: "metadata.config", reason } if reason.contains("Bad Dep")
    );
    assert!(text.contains("requirement"), "{text}");
}

#[test]
fn hex_contents_that_are_not_gzip_are_refused() {
    let hex = Hex {
        contents: tar_of(&hex_contents_entries()),
        ..Hex::valid()
    };
    assert_err!(
        refuse(&hex.build(), &limits()),
        ArchiveError::Invalid {
            file: "contents.tar.gz",
            ..
        }
    );
}

// ---------------------------------------------------------------------------
// Hostile entries, in a .niso, a Hex outer tar and a Hex contents.tar.gz.

#[test]
fn parent_dir_entries_are_refused() {
    assert_unsafe_everywhere(&file("../evil", "x"), "'..'");
    assert_unsafe_everywhere(&file("a/../../evil", "x"), "'..'");
    assert_unsafe_everywhere(&file("payload/../../evil", "x"), "'..'");
    assert_unsafe_everywhere(&dir("../"), "'..'");
}

#[test]
fn absolute_paths_are_refused() {
    assert_unsafe_everywhere(&file("/etc/passwd", "root::0:0::/:/bin/sh\n"), "absolute");
    assert_unsafe_everywhere(&file("//etc/passwd", "x"), "absolute");
}

#[test]
fn backslashes_and_empty_names_are_refused() {
    assert_unsafe_everywhere(&file("payload\\..\\..\\evil", "x"), "backslash");
    assert_unsafe_everywhere(&file("./", "x"), "no file");
}

#[test]
fn symlink_entries_are_refused() {
    assert_unsafe_everywhere(&symlink("payload/etc", "/etc"), "links");
    assert_unsafe_everywhere(&symlink("payload/up", "../../.."), "links");
}

#[test]
fn hard_link_entries_are_refused() {
    assert_unsafe_everywhere(&hardlink("payload/passwd", "/etc/passwd"), "links");
    assert_unsafe_everywhere(&hardlink("payload/copy", "payload/bin/my-app"), "links");
}

#[test]
fn char_device_entries_are_refused() {
    assert_unsafe_everywhere(&chardev("payload/null"), "devices");
}

#[test]
fn block_device_entries_are_refused() {
    assert_unsafe_everywhere(&ent("payload/sda", tar::EntryType::Block), "devices");
}

#[test]
fn fifo_entries_are_refused() {
    assert_unsafe_everywhere(&fifo("payload/pipe"), "FIFO");
}

#[test]
fn non_utf8_paths_are_refused() {
    assert_unsafe_everywhere(&file(b"payload/\xff\xfe.bin", "x"), "UTF-8");
}

#[test]
fn duplicate_entries_are_refused() {
    // .niso: the same file twice, also spelled differently.
    for extra in [
        file("payload/share.txt", "again"),
        file("./payload/share.txt", "again"),
        file("niso.toml", "again"),
    ] {
        let name = String::from_utf8(extra.name.clone()).unwrap();
        let want = name.trim_start_matches("./").to_string();
        let text = assert_err!(
            refuse(&niso_with_extra(&[extra]), &limits()),
            ArchiveError::DuplicateEntry { path } if *path == want
        );
        assert!(text.contains(&want), "{text}");
    }
    // Hex outer tar: a second VERSION, and a second metadata.config that
    // would otherwise replace the first.
    for name in ["VERSION", "metadata.config"] {
        let bytes = Hex::valid().build_with_extra(&[file(name, "3")]);
        assert_err!(
            refuse(&bytes, &limits()),
            ArchiveError::DuplicateEntry { path } if path == name
        );
    }
}

#[test]
fn duplicate_entry_inside_contents_names_contents_tar_gz() {
    let bytes = Hex::with_extra_contents(&[file("mix.exs", "evil")]).build();
    // Regression test (this was a bug, now fixed): src/archive/hex.rs check_contents() prefixes only UnsafeEntry paths
    // with "contents.tar.gz:"; DuplicateEntry from the inner tar passes through
    // unchanged as {path: "mix.exs"}, so the error names a file that is not in
    // the uploaded (outer) tarball.
    assert_err!(
        refuse(&bytes, &limits()),
        ArchiveError::DuplicateEntry { path } if path == "contents.tar.gz:mix.exs"
    );
}

#[test]
fn unsupported_entry_types_are_refused() {
    // A PAX global header: neither a file nor a directory.
    let global = Ent {
        data: b"12 path=abc\n".to_vec(),
        ..ent("pax_global_header", tar::EntryType::XGlobalHeader)
    };
    assert_unsafe_everywhere(&global, "unsupported");
    // A GNU sparse file: the tar crate already fails on its (empty) sparse
    // map; either way it is refused, never accepted.
    for (what, bytes, _) in everywhere(&ent("payload/sparse", tar::EntryType::GNUSparse)) {
        let e = refuse(&bytes, &limits());
        assert!(
            matches!(
                &e,
                ArchiveError::UnsafeEntry { .. }
                    | ArchiveError::Invalid {
                        file: "archive" | "tarball" | "contents.tar.gz",
                        ..
                    }
            ),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn pax_path_overrides_are_checked_too() {
    // The header says "payload/ok", the PAX record says "../evil": the PAX
    // name is what tar tools unpack, so it is the one that must be checked.
    for (what, bytes) in [
        (
            ".niso",
            niso_with_extra(&[pax(&[("path", "../evil")]), file("payload/ok", "x")]),
        ),
        (
            "contents",
            Hex::with_extra_contents(&[pax(&[("path", "../evil")]), file("lib/ok", "x")]).build(),
        ),
    ] {
        let e = refuse(&bytes, &limits());
        assert!(
            matches!(&e, ArchiveError::UnsafeEntry { path, .. } if path.ends_with("../evil")),
            "{what}: {e:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Limits.

#[test]
fn archive_larger_than_max_archive_is_too_large() {
    for (what, bytes) in [("hex", Hex::valid().build()), (".niso", niso_valid())] {
        let len = bytes.len() as u64;
        let exact = Limits {
            max_archive: len,
            ..limits()
        };
        assert_eq!(accept(&bytes, &exact).size, len, "{what}");
        let small = Limits {
            max_archive: len - 1,
            ..limits()
        };
        let e = refuse(&bytes, &small);
        assert!(
            matches!(e, ArchiveError::TooLarge { limit } if limit == len - 1),
            "{what}: {e:?}"
        );
        let tiny = Limits {
            max_archive: 100,
            ..limits()
        };
        let e = refuse(&bytes, &tiny);
        assert!(
            matches!(e, ArchiveError::TooLarge { limit: 100 }),
            "{what}: {e:?}"
        );
    }
    // Trailing bytes after a Hex tar count too: the whole file is hashed.
    let mut bytes = Hex::valid().build();
    let len = bytes.len() as u64;
    bytes.extend_from_slice(&[0u8; 4096]);
    let e = refuse(
        &bytes,
        &Limits {
            max_archive: len,
            ..limits()
        },
    );
    assert!(matches!(e, ArchiveError::TooLarge { .. }), "{e:?}");
}

#[test]
fn unpacked_total_above_max_unpacked_is_refused() {
    // .niso: the sum of the entries' sizes, exactly at the limit, then one over.
    let entries = niso_entries();
    let total: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
    let bytes = niso_of(&entries);
    accept(
        &bytes,
        &Limits {
            max_unpacked: total,
            ..limits()
        },
    );
    let e = refuse(
        &bytes,
        &Limits {
            max_unpacked: total - 1,
            ..limits()
        },
    );
    assert_err!(e, ArchiveError::UnpackedTooLarge { limit } if *limit == total - 1);

    // Hex contents.tar.gz: one 200 KiB file against a 100 KiB limit (the
    // outer tar is small enough to pass).
    let big = Hex::with_extra_contents(&[file("priv/big.bin", vec![7u8; 200 * 1024])]);
    let small = Limits {
        max_unpacked: 100 * 1024,
        ..limits()
    };
    // (the plain tarball is fine under this limit)
    accept(&Hex::valid().build(), &small);
    assert_err!(
        refuse(&big.build(), &small),
        ArchiveError::UnpackedTooLarge { limit: 102400 }
    );
}

#[test]
fn unpacked_size_given_in_a_pax_header_counts() {
    // The header says 0 bytes, a PAX `size` record says 100,000: tar readers
    // (the `tar` crate included) use the PAX size, so that is what unpacks.
    let max = 10_000;
    let lim = Limits {
        max_unpacked: max,
        ..limits()
    };
    let big = |name: &str| Ent {
        declared: Some(0),
        ..file(name, vec![b'x'; 100_000])
    };
    let niso = niso_with_extra(&[pax(&[("size", "100000")]), big("payload/big.bin")]);
    let hex = Hex::with_extra_contents(&[pax(&[("size", "100000")]), big("priv/big.bin")]).build();
    // Regression test (this was a bug, now fixed): src/archive/safe.rs EntryChecker::check() sums
    // `entry.header().size()` (the raw header field, 0 here) instead of
    // `entry.size()` (the PAX-overridden size the tar crate actually reads),
    // so 100,000 unpacked bytes pass a 10,000-byte max_unpacked; only the
    // stream bound (max_unpacked + 1 MiB) would stop larger ones.
    let mut failures = Vec::new();
    for (what, bytes) in [(".niso", niso), ("contents", hex)] {
        match inspect(bytes.as_slice(), &lim) {
            Err(ArchiveError::UnpackedTooLarge { limit }) if limit == max => {}
            other => failures.push(format!("{what}: expected UnpackedTooLarge, got {other:?}")),
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn gzip_bomb_fails_fast_without_allocating() {
    let lim = Limits {
        max_unpacked: MIB,
        ..limits()
    };
    let bomb = 64 * MIB;
    // 1. A .niso that is nothing but 64 MiB of zeros.
    let zeros = gz_with_zeros(&[], bomb);
    // 2. A .niso whose payload file claims (and holds) 64 MiB.
    let head = tar_body(&[
        file("niso.toml", MANIFEST),
        dir("payload/"),
        Ent {
            declared: Some(bomb),
            ..file("payload/bin/my-app", "")
        },
    ]);
    let big_file = gz_with_zeros(&head, bomb + 1024);
    // 3. A Hex tarball whose contents.tar.gz is 64 MiB of zeros.
    let hex_zeros = Hex {
        contents: gz_with_zeros(&[], bomb),
        ..Hex::valid()
    }
    .build();
    // 4. A Hex tarball whose contents.tar.gz holds one 64 MiB file.
    let inner_head = tar_body(&[Ent {
        declared: Some(bomb),
        ..file("priv/zeros.bin", "")
    }]);
    let hex_big = Hex {
        contents: gz_with_zeros(&inner_head, bomb + 1024),
        ..Hex::valid()
    }
    .build();

    for (what, bytes) in [
        (".niso zeros", zeros),
        (".niso big file", big_file),
        ("hex zeros", hex_zeros),
        ("hex big file", hex_big),
    ] {
        assert!(
            bytes.len() < (MIB as usize),
            "{what}: the bomb should be small"
        );
        let start = std::time::Instant::now();
        let (result, peak) = alloc_track::peak_during(|| inspect(bytes.as_slice(), &lim));
        assert!(
            matches!(result, Err(ArchiveError::UnpackedTooLarge { .. })),
            "{what}: {result:?}"
        );
        assert!(peak < 4 * MIB as usize, "{what}: allocated {peak} bytes");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{what}: took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn unpacked_limit_error_reports_the_configured_limit() {
    let lim = Limits {
        max_unpacked: MIB,
        ..limits()
    };
    // Regression test (this was a bug, now fixed): src/archive/niso.rs read() and src/archive/hex.rs check_contents()
    // wrap the decompressor in UnpackLimit::new(.., max_unpacked + 1 MiB), and
    // safe.rs reports that inflated bound, so a 1 MiB limit is reported as
    // "more than the limit of 2097152 bytes" instead of 1048576.
    let mut failures = Vec::new();
    for (what, bytes) in [
        (".niso", gz_with_zeros(&[], 64 * MIB)),
        (
            "hex",
            Hex {
                contents: gz_with_zeros(&[], 64 * MIB),
                ..Hex::valid()
            }
            .build(),
        ),
    ] {
        match inspect(bytes.as_slice(), &lim) {
            Err(ArchiveError::UnpackedTooLarge { limit }) if limit == MIB => {}
            other => failures.push(format!("{what}: expected limit {MIB}, got {other:?}")),
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn long_name_headers_are_not_buffered_without_bound() {
    // A GNU long-name (`L`) header whose "name" is 48 MiB of zeros: it
    // compresses to ~50 KiB, and the tar crate reads a long name into memory
    // whole before yielding the entry it names.
    let lim = Limits {
        max_unpacked: 256 * MIB,
        ..limits()
    };
    let size = 48 * MIB;
    let long = |prefix: &[Ent]| {
        let mut head = tar_body(prefix);
        head.extend_from_slice(
            header(&Ent {
                declared: Some(size),
                ..ent("././@LongLink", tar::EntryType::GNULongName)
            })
            .as_bytes(),
        );
        head
    };
    let niso = gz_with_zeros(&long(&[file("niso.toml", MANIFEST)]), size + 1024);
    let hex = Hex {
        contents: gz_with_zeros(&long(&[]), size + 1024),
        ..Hex::valid()
    }
    .build();
    // tar::Archive::entries() reads a GNU long name (or a PAX header) into
    // memory whole before EntryChecker sees the entry, so safe::TarGuard must
    // refuse such a header from its size, before it is buffered.
    let mut failures = Vec::new();
    for (what, bytes) in [(".niso", niso), ("hex", hex)] {
        let (result, peak) = alloc_track::peak_during(|| inspect(bytes.as_slice(), &lim));
        if !matches!(
            result,
            Err(ArchiveError::MetadataTooLarge { limit: 65536, .. })
        ) {
            failures.push(format!("{what}: {result:?}"));
        }
        if peak >= 16 * MIB as usize {
            failures.push(format!(
                "{what}: allocated {peak} bytes for a long-name header"
            ));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn more_entries_than_max_entries_is_refused() {
    // .niso: 6 entries.
    let bytes = niso_valid();
    accept(
        &bytes,
        &Limits {
            max_entries: 6,
            ..limits()
        },
    );
    assert_err!(
        refuse(
            &bytes,
            &Limits {
                max_entries: 5,
                ..limits()
            }
        ),
        ArchiveError::TooManyEntries { limit: 5 }
    );
    // Hex: 4 outer entries, 3 + 2 in contents.tar.gz.
    let hex = Hex::with_extra_contents(&[file("a", ""), file("b", "")]).build();
    let five = Limits {
        max_entries: 5,
        ..limits()
    };
    accept(&hex, &five);
    assert_err!(
        refuse(
            &hex,
            &Limits {
                max_entries: 4,
                ..limits()
            }
        ),
        ArchiveError::TooManyEntries { limit: 4 }
    );
    assert_err!(
        refuse(
            &Hex::valid().build_with_extra(&[file("x", "")]),
            &Limits {
                max_entries: 4,
                ..limits()
            }
        ),
        ArchiveError::TooManyEntries { limit: 4 }
    );
}

#[test]
fn metadata_larger_than_max_metadata_is_refused() {
    let lim = Limits {
        max_metadata: 1000,
        ..limits()
    };
    // niso.toml: pad with a comment.
    let manifest = format!("{MANIFEST}# {}\n", "x".repeat(1000));
    let text = assert_err!(
        refuse(&niso_with_manifest(&manifest), &lim),
        ArchiveError::MetadataTooLarge { file, limit: 1000 } if file == "niso.toml"
    );
    assert!(text.contains("niso.toml"), "{text}");
    // README.md.
    let mut entries = niso_entries();
    entries[1] = file("README.md", "x".repeat(1001));
    assert_err!(
        refuse(&niso_of(&entries), &lim),
        ArchiveError::MetadataTooLarge { file, limit: 1000 } if file == "README.md"
    );
    entries[1] = file("README.md", "x".repeat(1000));
    accept(&niso_of(&entries), &lim);
    // metadata.config.
    let mut meta = hex_metadata("my_pkg", "1.2.3", "[]");
    meta.extend_from_slice(format!("%% {}\n", "x".repeat(1000)).as_bytes());
    assert_err!(
        refuse(&Hex::with_metadata(&meta).build(), &lim),
        ArchiveError::MetadataTooLarge { file, limit: 1000 } if file == "metadata.config"
    );
}

// ---------------------------------------------------------------------------
// .niso structure.

#[test]
fn niso_first_entry_must_be_the_manifest() {
    let mut entries = niso_entries();
    entries.swap(0, 1); // README.md first
    let text = assert_err!(
        refuse(&niso_of(&entries), &limits()),
        ArchiveError::UnexpectedEntry { path, reason }
            if path == "README.md" && reason.contains("niso.toml")
    );
    assert!(text.contains("README.md"), "{text}");
    // niso.toml as a directory.
    let mut entries = niso_entries();
    entries[0] = dir("niso.toml/");
    assert_err!(
        refuse(&niso_of(&entries), &limits()),
        ArchiveError::UnexpectedEntry { path, .. } if path == "niso.toml"
    );
    // A payload entry first.
    let entries = niso_entries();
    let reordered: Vec<Ent> = entries[2..].iter().chain(&entries[..2]).cloned().collect();
    assert_err!(
        refuse(&niso_of(&reordered), &limits()),
        ArchiveError::UnexpectedEntry { path, .. } if path == "payload"
    );
}

#[test]
fn niso_entry_outside_payload_is_refused() {
    for name in ["bin/tool", "payloadx/tool", "etc/", "NISO.toml"] {
        let want = name.trim_end_matches('/');
        let e = if name.ends_with('/') {
            dir(name)
        } else {
            file(name, "x")
        };
        let text = assert_err!(
            refuse(&niso_with_extra(&[e]), &limits()),
            ArchiveError::UnexpectedEntry { path, reason }
                if path == want && reason.contains("payload/")
        );
        assert!(text.contains(want), "{text}");
    }
    // `payload` itself as a file.
    let bytes = niso_of(&[file("niso.toml", MANIFEST), file("payload", "x")]);
    assert_err!(
        refuse(&bytes, &limits()),
        ArchiveError::UnexpectedEntry { path, .. } if path == "payload"
    );
}

#[test]
fn niso_readme_must_be_second() {
    let mut entries = niso_entries();
    let readme = entries.remove(1);
    entries.push(readme);
    assert_err!(
        refuse(&niso_of(&entries), &limits()),
        ArchiveError::UnexpectedEntry { path, .. } if path == "README.md"
    );
}

#[test]
fn niso_without_any_entry_is_missing_its_manifest() {
    assert_err!(
        refuse(&niso_of(&[]), &limits()),
        ArchiveError::Missing("niso.toml")
    );
}

// ---------------------------------------------------------------------------
// .niso manifests.

#[track_caller]
fn manifest_refused(manifest: &str) -> ArchiveError {
    refuse(&niso_with_manifest(manifest), &limits())
}

#[test]
fn manifest_with_unknown_field_is_refused() {
    for m in [
        format!("{MANIFEST}\n[extra]\nx = 1\n"),
        MANIFEST.replace("[binary]\n", "[binary]\nargs = [\"-v\"]\n"),
        MANIFEST.replace("arch = ", "license = \"MIT\"\narch = "),
        MANIFEST.replace("preset = ", "seccomp = \"off\"\npreset = "),
    ] {
        assert_err!(
            manifest_refused(&m),
            ArchiveError::Invalid {
                file: "niso.toml",
                ..
            }
        );
    }
}

#[test]
fn manifest_without_binary_is_refused() {
    let m = MANIFEST.replace("[binary]\nentrypoint = \"bin/my-app\"\n", "");
    assert!(!m.contains("[binary]"));
    let text = assert_err!(
        manifest_refused(&m),
        ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("binary")
    );
    assert!(text.starts_with("niso.toml"), "{text}");
    // And without [package].name, version or arch.
    for key in ["name", "version", "arch"] {
        assert_err!(
            manifest_refused(&manifest_with(key, None)),
            ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains(key)
        );
    }
}

#[test]
fn manifest_with_bad_name_is_refused() {
    for bad in ["My-App", "my app", "../x", "1app", "app-"] {
        assert_err!(
            manifest_refused(&manifest_with("name", Some(&format!("{bad:?}")))),
            ArchiveError::Ident(IdentError::PackageName { name, .. }) if name == bad
        );
    }
}

#[test]
fn manifest_with_bad_version_is_refused() {
    for bad in ["1.0", "v1.0.0", "1.0.0+build", "latest"] {
        assert_err!(
            manifest_refused(&manifest_with("version", Some(&format!("{bad:?}")))),
            ArchiveError::Ident(IdentError::Version { version, .. }) if version == bad
        );
    }
}

#[test]
fn manifest_with_bad_arch_is_refused() {
    for bad in [
        "manifest", "latest", "versions", "tags", "X86_64", "x86-64", "", "../x",
    ] {
        let text = assert_err!(
            manifest_refused(&manifest_with("arch", Some(&format!("{bad:?}")))),
            ArchiveError::Ident(IdentError::Arch { arch, .. }) if arch == bad
        );
        assert!(text.contains("arch"), "{text}");
    }
}

#[test]
fn manifest_entrypoint_must_be_a_file_under_payload() {
    // Missing from payload/.
    let m = MANIFEST.replace("bin/my-app", "bin/other");
    assert_err!(
        manifest_refused(&m),
        ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("bin/other")
    );
    // A directory.
    let m = MANIFEST.replace("bin/my-app", "bin");
    assert_err!(
        manifest_refused(&m),
        ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("not a file")
    );
    // Named with its payload/ prefix.
    let m = MANIFEST.replace("bin/my-app", "payload/bin/my-app");
    assert_err!(
        manifest_refused(&m),
        ArchiveError::Invalid {
            file: "niso.toml",
            ..
        }
    );
    // A file outside payload/ (README.md).
    let m = MANIFEST.replace("bin/my-app", "README.md");
    assert_err!(
        manifest_refused(&m),
        ArchiveError::Invalid {
            file: "niso.toml",
            ..
        }
    );
}

#[test]
fn manifest_entrypoint_with_parent_dir_or_absolute_path_is_refused() {
    for bad in ["../niso.toml", "bin/../../x", "/bin/sh", "", "bin\\my-app"] {
        let m = MANIFEST.replace("\"bin/my-app\"", &format!("{bad:?}"));
        assert_err!(
            manifest_refused(&m),
            ArchiveError::Invalid { file: "niso.toml", reason }
                if reason.contains("binary.entrypoint")
        );
    }
}

#[test]
fn manifest_description_must_be_one_short_line() {
    for bad in ["two\nlines", "tab\there", "bell\u{7}", "nul\u{0}"] {
        let m = manifest_with("description", Some(&format!("{bad:?}")));
        assert_err!(
            manifest_refused(&m),
            ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("description")
        );
    }
    let m = manifest_with("description", Some(&format!("{:?}", "d".repeat(513))));
    assert_err!(
        manifest_refused(&m),
        ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("description")
    );
    let m = manifest_with("description", Some(&format!("{:?}", "d".repeat(512))));
    accept(&niso_with_manifest(&m), &limits());
}

#[test]
fn manifest_with_bad_isolation_preset_is_refused() {
    for bad in ["", "Server", "a b", "../x", &"p".repeat(33)] {
        let m = MANIFEST.replace("\"server\"", &format!("{bad:?}"));
        assert_err!(
            manifest_refused(&m),
            ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("preset")
        );
    }
}

#[test]
fn manifest_that_is_not_toml_or_utf8_is_refused() {
    assert_err!(
        manifest_refused("[package\nname = "),
        ArchiveError::Invalid {
            file: "niso.toml",
            ..
        }
    );
    let bytes = niso_of(&[file("niso.toml", b"\xff\xfe"), dir("payload/")]);
    assert_err!(
        refuse(&bytes, &limits()),
        ArchiveError::Invalid { file: "niso.toml", reason } if reason.contains("UTF-8")
    );
}

// ---------------------------------------------------------------------------
// Malformed input.

#[test]
fn corrupt_gzip_is_an_error_not_a_panic() {
    let good = niso_valid();
    // A byte flipped in the middle of the deflate data.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    assert_err!(
        refuse(&bad, &limits()),
        ArchiveError::Invalid {
            file: "archive",
            ..
        } | ArchiveError::Invalid {
            file: "niso.toml",
            ..
        }
    );
    // A wrong CRC-32 in the gzip trailer.
    let mut bad = good.clone();
    let crc = bad.len() - 8;
    bad[crc] ^= 0x01;
    assert_err!(
        refuse(&bad, &limits()),
        ArchiveError::Invalid {
            file: "archive",
            ..
        }
    );
    // Every single-byte flip after the gzip header: never a panic, and never
    // accepted unless the flip leaves the decompressed bytes unchanged.
    let gunzip = |bytes: &[u8]| {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)
            .ok()
            .map(|_| out)
    };
    let plain = gunzip(&good).unwrap();
    for i in 10..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x55;
        if inspect(bad.as_slice(), &limits()).is_ok() {
            assert_eq!(
                gunzip(&bad).as_ref(),
                Some(&plain),
                "flip at {i} accepted with different contents"
            );
        }
    }
}

#[test]
fn truncated_niso_is_invalid_not_an_io_error() {
    let good = niso_valid();
    // Cut inside the payload: the tar reader's error becomes Invalid.
    assert_err!(
        refuse(&good[..good.len() - 20], &limits()),
        ArchiveError::Invalid {
            file: "archive",
            ..
        }
    );
    // Cut inside niso.toml.
    // Regression test (this was a bug, now fixed): src/archive/niso.rs read() reads niso.toml (and README.md) with
    // safe::read_small(), whose errors go through safe::io_error() and not
    // gz_error(), so a gzip stream that ends or is corrupt while the manifest
    // is read yields ArchiveError::Io("incomplete deflate stream") -- the
    // variant meant for a failed read -- instead of Invalid { file: "archive" }
    // like every other malformed-gzip case.
    assert_err!(
        refuse(&good[..good.len() / 2], &limits()),
        ArchiveError::Invalid {
            file: "archive",
            ..
        }
    );
}

#[test]
fn trailing_data_after_gzip_stream_is_refused() {
    // Regression test (this was a bug, now fixed): src/archive/niso.rs read() checks for trailing bytes by reading
    // from `bounded.into_inner().into_inner()`, but flate2::read::GzDecoder
    // buffers its input (32 KiB), and into_inner() drops whatever it had read
    // past the end of the gzip member. Trailing bytes that fit in that buffer
    // (all of them, for a small archive) are never seen.
    let mut failures = Vec::new();
    let mut garbage = niso_valid();
    garbage.extend_from_slice(b"trailing garbage");
    match inspect(garbage.as_slice(), &limits()) {
        Err(ArchiveError::TrailingData) => {}
        other => failures.push(format!("16 trailing bytes: {other:?}")),
    }

    // A second gzip member: `tar xzf` and `gunzip` read it as more of the same
    // tar, so it could smuggle entries the reader never checked.
    let first = tar_body(&niso_entries()); // no end-of-archive blocks
    let mut smuggled = gz(&first);
    smuggled.extend_from_slice(&gz(&tar_of(&[
        symlink("payload/etc", "/etc"),
        file("../evil", "x"),
    ])));
    match inspect(smuggled.as_slice(), &limits()) {
        Err(ArchiveError::TrailingData) => {}
        other => failures.push(format!("second gzip member: {other:?}")),
    }
    assert_no_failures(&failures);
}

#[test]
fn hex_contents_with_a_second_gzip_member_is_refused() {
    // contents.tar.gz = gzip(files, no end-of-archive blocks) ++
    // gzip(a symlink to /etc). `zlib:gunzip/1` and GNU `tar xzf` decode both
    // members as one tar and so see the symlink.
    let mut contents = gz(&tar_body(&hex_contents_entries()));
    contents.extend_from_slice(&gz(&tar_of(&[symlink("lib/etc", "/etc")])));
    let bytes = Hex {
        contents,
        ..Hex::valid()
    }
    .build();
    // Regression test (this was a bug, now fixed): src/archive/hex.rs check_contents() decodes only the first gzip
    // member (flate2::read::GzDecoder), then hashes whatever follows without
    // looking at it, so the symlink in the second member is never checked.
    // It should check every member (MultiGzDecoder) or refuse trailing bytes.
    assert_err!(
        refuse(&bytes, &limits()),
        ArchiveError::UnsafeEntry { .. }
            | ArchiveError::TrailingData
            | ArchiveError::Invalid {
                file: "contents.tar.gz",
                ..
            }
    );
}

#[test]
fn trailing_data_beyond_the_decoder_buffer_is_refused() {
    let mut bytes = niso_valid();
    bytes.extend_from_slice(&vec![0x42; 256 * 1024]);
    assert_err!(refuse(&bytes, &limits()), ArchiveError::TrailingData);
}

#[test]
fn empty_input_is_empty() {
    let text = assert_err!(refuse(&[], &limits()), ArchiveError::Empty);
    assert!(text.contains("empty"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.niso");
    std::fs::write(&path, b"").unwrap();
    assert_err!(
        inspect_file(&path, &limits()).unwrap_err(),
        ArchiveError::Empty
    );
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn random_bytes_are_refused() {
    for (len, seed) in [
        (1, 1),
        (2, 2),
        (100, 3),
        (511, 4),
        (512, 5),
        (4096, 6),
        (70_000, 7),
    ] {
        let mut bytes = noise(len, seed);
        if bytes.starts_with(&[0x1f, 0x8b]) {
            bytes[0] = 0;
        }
        assert_err!(
            refuse(&bytes, &limits()),
            ArchiveError::Invalid {
                file: "tarball",
                ..
            }
        );
        // The same noise behind a gzip magic number.
        let mut gzipish = vec![0x1f, 0x8b];
        gzipish.extend_from_slice(&bytes);
        assert_err!(
            refuse(&gzipish, &limits()),
            ArchiveError::Invalid {
                file: "archive",
                ..
            }
        );
    }
    // Text that is neither format.
    assert_err!(
        refuse(b"<html>not a package</html>", &limits()),
        ArchiveError::Invalid {
            file: "tarball",
            ..
        }
    );
}

// ---------------------------------------------------------------------------
// Security issue 16: extension headers, data after the end-of-archive
// marker, Hex's own limits, Hex descriptions, and the length of error
// messages. Each test below failed on commit eb07f8a.

/// The raw header of a GNU long-name (`L`) entry that announces `size` bytes.
fn long_name_header(size: u64) -> Vec<u8> {
    header(&Ent {
        declared: Some(size),
        ..ent("././@LongLink", tar::EntryType::GNULongName)
    })
    .as_bytes()
    .to_vec()
}

/// `prefix`, then a pax header holding `size=0`, then a GNU long-name header
/// of `size` bytes (its data is not included).
fn pax_then_long_name(prefix: &[Ent], size: u64) -> Vec<u8> {
    let mut head = tar_body(prefix);
    head.extend_from_slice(&tar_body(&[pax(&[("size", "0")])]));
    head.extend_from_slice(&long_name_header(size));
    head
}

/// Most bytes an error message may take: user text in it is cut to a few
/// hundred bytes.
const SHORT_MESSAGE: usize = 1024;

#[test]
fn pax_size_is_not_applied_to_a_following_extension_header() {
    // Regression test (security issue 16, item 2): safe::TarGuard applied a
    // pax `size` record to the next header even when that header was a GNU
    // long name, as tar does not. A pax header with size=0 followed by a
    // long name of many MiB of NULs passed the guard ("0 bytes"), the tar
    // reader buffered the whole name, and the error echoed it.
    let size = 64 * MIB;
    let niso = gz_with_zeros(
        &pax_then_long_name(&[file("niso.toml", MANIFEST)], size),
        size + 1024,
    );
    let contents = Hex {
        contents: gz_with_zeros(&pax_then_long_name(&[], size), size + 1024),
        ..Hex::valid()
    }
    .build();
    // The outer Hex tar is not compressed: 1 MiB of name is enough there.
    let mut outer = tar_body(&Hex::valid().parts());
    outer.extend_from_slice(&pax_then_long_name(&[], MIB));
    outer.extend_from_slice(&vec![0u8; MIB as usize + 1024]);

    let mut failures = Vec::new();
    for (what, bytes) in [
        (".niso", niso),
        ("contents.tar.gz", contents),
        ("Hex outer tar", outer),
    ] {
        let (result, peak) = alloc_track::peak_during(|| inspect(bytes.as_slice(), &limits()));
        match &result {
            Err(e @ ArchiveError::MetadataTooLarge { limit: 65536, .. }) => {
                let text = e.to_string();
                if text.len() > SHORT_MESSAGE {
                    failures.push(format!("{what}: message of {} bytes", text.len()));
                }
            }
            other => failures.push(format!(
                "{what}: expected MetadataTooLarge, got {:.300}",
                format!("{other:?}")
            )),
        }
        if peak >= 4 * MIB as usize {
            failures.push(format!("{what}: allocated {peak} bytes"));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn a_pax_size_applies_to_the_entry_after_a_long_name() {
    // tar (GNU tar and the `tar` crate alike) applies a pax header to the
    // next *file* entry, skipping GNU long-name headers in between. The
    // guard must frame the archive the same way: here the file's 512 bytes
    // of data look like a header announcing a 48 MiB long name, which a
    // guard that applied `size=512` to the long name would take for a
    // header (and refuse) instead of the file's contents.
    let fake = long_name_header(48 * MIB);
    let entries = |prefix: Vec<Ent>, name: &str| {
        let mut v = prefix;
        v.push(pax(&[("size", "512")]));
        v.push(Ent {
            data: format!("{name}\0").into_bytes(),
            ..ent("././@LongLink", tar::EntryType::GNULongName)
        });
        v.push(Ent {
            declared: Some(0),
            ..file("placeholder", &fake)
        });
        v
    };
    let niso = niso_of(&entries(niso_entries(), "payload/looks-like-a-header.bin"));
    let hex = Hex {
        contents: gz(&tar_of(&entries(
            hex_contents_entries(),
            "priv/looks-like-a-header.bin",
        ))),
        ..Hex::valid()
    }
    .build();
    accept(&niso, &limits());
    accept(&hex, &limits());
}

#[test]
fn ambiguous_pax_records_are_refused() {
    // Readers disagree on these, so what the guard checked is not what
    // every client unpacks: two `size` records (the `tar` crate takes the
    // first, GNU tar the last), a record that does not parse, and the
    // GNU.sparse.* records with which GNU tar and Python unpack an entry
    // under another name (`GNU.sparse.name`) and size.
    let cases: Vec<(&str, Vec<Ent>)> = vec![
        (
            "two size records",
            vec![
                pax(&[("size", "0"), ("size", "5")]),
                Ent {
                    declared: Some(0),
                    ..file("payload/a", "hello")
                },
            ],
        ),
        (
            "two path records",
            vec![
                pax(&[("path", "payload/a"), ("path", "../evil")]),
                file("payload/b", "x"),
            ],
        ),
        (
            "GNU.sparse.name",
            vec![
                pax(&[
                    ("GNU.sparse.major", "1"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.name", "../../../tmp/pwned"),
                    ("GNU.sparse.realsize", "5"),
                ]),
                file("payload/GNUSparseFile.0/a", "hello"),
            ],
        ),
        (
            "a record that does not parse",
            vec![
                Ent {
                    // LEN says 8, the record is 9 bytes.
                    data: b"8 size=5\n".to_vec(),
                    ..ent("././@PaxHeader", tar::EntryType::XHeader)
                },
                file("payload/a", "hello"),
            ],
        ),
        (
            "a size that is not a number",
            vec![pax(&[("size", "5x")]), file("payload/a", "hello")],
        ),
        // The `tar` crate names the entry by the long name, GNU tar by the
        // pax path: the checked name would not be the unpacked one.
        (
            "a long name and a pax path",
            vec![
                Ent {
                    data: b"payload/ok\0".to_vec(),
                    ..ent("././@LongLink", tar::EntryType::GNULongName)
                },
                pax(&[("path", "../../evil")]),
                file("payload/placeholder", "x"),
            ],
        ),
        (
            "a pax path and a long name",
            vec![
                pax(&[("path", "../../evil")]),
                Ent {
                    data: b"payload/ok\0".to_vec(),
                    ..ent("././@LongLink", tar::EntryType::GNULongName)
                },
                file("payload/placeholder", "x"),
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (case, extra) in cases {
        let contents_extra: Vec<Ent> = extra
            .iter()
            .map(|e| Ent {
                name: String::from_utf8_lossy(&e.name)
                    .replace("payload/", "lib/")
                    .into_bytes(),
                ..e.clone()
            })
            .collect();
        for (what, bytes) in [
            (".niso", niso_with_extra(&extra)),
            (
                "contents.tar.gz",
                Hex::with_extra_contents(&contents_extra).build(),
            ),
            ("Hex outer tar", Hex::valid().build_with_extra(&extra)),
        ] {
            match inspect(bytes.as_slice(), &limits()) {
                Err(ArchiveError::BadExtension { reason, .. }) if reason.contains("pax") => {}
                other => failures.push(format!("{case} in {what}: {other:?}")),
            }
        }
    }
    assert_no_failures(&failures);
}

/// Entries hidden after a tar's end-of-archive marker, as `tar -i` and
/// Python's `tarfile(ignore_zeros=True)` list them.
fn hidden_entries() -> Vec<Ent> {
    vec![
        file("../../../tmp/pwned", "owned\n"),
        symlink("payload/shadow", "/etc/shadow"),
    ]
}

#[test]
fn entries_after_the_end_of_archive_marker_are_refused() {
    // Regression test (security issue 16, item 3): the reader stopped at the
    // first zero block and never looked at what followed, so entries after
    // it were accepted unchecked.
    let hidden = tar_of(&hidden_entries());
    let one_byte = {
        let mut v = vec![0u8; 1024];
        v[700] = 1;
        v
    };
    let mut failures = Vec::new();
    for (tail_name, tail) in [("hidden entries", hidden), ("one non-zero byte", one_byte)] {
        let niso = {
            let mut t = tar_of(&niso_entries());
            t.extend_from_slice(&tail);
            gz(&t)
        };
        let outer = {
            let mut t = Hex::valid().build();
            t.extend_from_slice(&tail);
            t
        };
        let contents = {
            let mut t = tar_of(&hex_contents_entries());
            t.extend_from_slice(&tail);
            Hex {
                contents: gz(&t),
                ..Hex::valid()
            }
            .build()
        };
        for (what, bytes, label) in [
            (".niso", niso, "archive"),
            ("Hex outer tar", outer, "tarball"),
            ("contents.tar.gz", contents, "contents.tar.gz"),
        ] {
            match inspect(bytes.as_slice(), &limits()) {
                Err(e @ ArchiveError::DataAfterEnd { file }) if file == label => {
                    let text = e.to_string();
                    if !text.contains("end-of-archive") {
                        failures.push(format!("{tail_name} in {what}: message {text:?}"));
                    }
                }
                other => failures.push(format!("{tail_name} in {what}: {other:?}")),
            }
        }
    }
    // A lone zero block ends the archive for the tar crate; GNU tar warns
    // and reads on. Entries after one are refused too.
    let mut t = tar_body(&niso_entries());
    t.extend_from_slice(&[0u8; 512]);
    t.extend_from_slice(&tar_of(&hidden_entries()));
    match inspect(gz(&t).as_slice(), &limits()) {
        Err(ArchiveError::DataAfterEnd { file: "archive" }) => {}
        other => failures.push(format!("after a lone zero block: {other:?}")),
    }
    assert_no_failures(&failures);
}

#[test]
fn zero_padding_after_the_end_of_archive_marker_is_accepted() {
    // tar pads archives to a record of 10 KiB with zeros; that stays fine.
    let mut t = tar_of(&niso_entries());
    t.resize(t.len().div_ceil(10240) * 10240, 0);
    accept(&gz(&t), &limits());
    let mut outer = Hex::valid().build();
    outer.resize(outer.len().div_ceil(10240) * 10240, 0);
    accept(&outer, &limits());
    // No end-of-archive marker at all is accepted as before.
    accept(&gz(&tar_body(&niso_entries())), &limits());
}

/// A Hex tarball whose contents.tar.gz holds one file of `zeros` zero bytes
/// (compressed, so the tarball stays small).
fn hex_with_zeros(zeros: u64) -> Vec<u8> {
    let head = tar_body(&[Ent {
        declared: Some(zeros),
        ..file("priv/zeros.bin", "")
    }]);
    // Data, padding and the two end blocks.
    let tail = zeros.div_ceil(512) * 512 - zeros + 1024;
    Hex {
        contents: gz_with_zeros(&head, zeros + tail),
        ..Hex::valid()
    }
    .build()
}

/// The same, as a `.niso` whose payload holds the file.
fn niso_with_zeros(zeros: u64) -> Vec<u8> {
    let head = tar_body(&[
        file("niso.toml", MANIFEST),
        dir("payload/"),
        dir("payload/bin/"),
        exe("payload/bin/my-app", "#!/bin/sh\n"),
        Ent {
            declared: Some(zeros),
            ..file("payload/zeros.bin", "")
        },
    ]);
    let tail = zeros.div_ceil(512) * 512 - zeros + 1024;
    gz_with_zeros(&head, zeros + tail)
}

#[test]
fn hex_tarballs_get_hex_core_limits_by_default() {
    // Regression test (security issue 16, item 4): hex_core refuses a
    // tarball over 16 MiB or one whose contents.tar.gz unpacks to more than
    // 128 MiB; niso accepted a 600 KB upload unpacking to 600 MiB.
    let lim = Limits::default();
    assert_eq!(lim.max_hex_tarball, 16 * MIB);
    assert_eq!(lim.max_hex_unpacked, 128 * MIB);
    let bomb = hex_with_zeros(600 * MIB);
    // (about 600 KB at gzip's best compression; this one is made fast)
    assert!(bomb.len() < 3_000_000, "{} bytes", bomb.len());
    assert_err!(
        refuse(&bomb, &lim),
        ArchiveError::UnpackedTooLarge { limit } if *limit == 128 * MIB
    );
    // The same 200 MiB is fine in a .niso (its limit is 4 GiB), not in a
    // Hex tarball.
    accept(&niso_with_zeros(200 * MIB), &lim);
    assert_err!(
        refuse(&hex_with_zeros(200 * MIB), &lim),
        ArchiveError::UnpackedTooLarge { limit } if *limit == 128 * MIB
    );
    // A 17 MiB Hex tarball (incompressible contents) is over 16 MiB; a
    // .niso of that size is not refused for its size.
    let noise_bytes = noise(17 * MIB as usize, 99);
    let big = Hex::with_extra_contents(&[file("priv/noise.bin", &noise_bytes)]).build();
    assert!(big.len() as u64 > 17 * MIB);
    assert_err!(
        refuse(&big, &lim),
        ArchiveError::TooLarge { limit } if *limit == 16 * MIB
    );
    accept(
        &niso_with_extra(&[file("payload/noise.bin", &noise_bytes)]),
        &lim,
    );
}

#[test]
fn hex_limits_are_exact_and_configurable() {
    // The tarball's size, exactly at the limit and one byte over.
    let bytes = Hex::valid().build();
    let len = bytes.len() as u64;
    let at = Limits {
        max_hex_tarball: len,
        ..limits()
    };
    accept(&bytes, &at);
    assert_err!(
        refuse(
            &bytes,
            &Limits {
                max_hex_tarball: len - 1,
                ..limits()
            }
        ),
        ArchiveError::TooLarge { limit } if *limit == len - 1
    );
    // max_archive (the upload limit) still applies when it is the smaller.
    assert_err!(
        refuse(
            &bytes,
            &Limits {
                max_archive: len - 1,
                ..limits()
            }
        ),
        ArchiveError::TooLarge { limit } if *limit == len - 1
    );
    // Hex's limit does not touch .niso archives.
    accept(
        &niso_valid(),
        &Limits {
            max_hex_tarball: 1,
            max_hex_unpacked: 1,
            ..limits()
        },
    );
    // Unpacked: hex_core counts the whole decompressed contents tar
    // (headers and padding too), so that is the measure, with no slack.
    let hex = Hex::valid();
    let tar_len = {
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(hex.contents.as_slice()),
            &mut out,
        )
        .unwrap();
        out.len() as u64
    };
    accept(
        &hex.build(),
        &Limits {
            max_hex_unpacked: tar_len,
            ..limits()
        },
    );
    assert_err!(
        refuse(
            &hex.build(),
            &Limits {
                max_hex_unpacked: tar_len - 1,
                ..limits()
            }
        ),
        ArchiveError::UnpackedTooLarge { limit } if *limit == tar_len - 1
    );
    // Raised, a Hex tarball over the default is accepted.
    accept(
        &hex_with_zeros(200 * MIB),
        &Limits {
            max_hex_unpacked: 256 * MIB,
            ..limits()
        },
    );
}

/// metadata.config with `description` written as the Erlang binary `raw`.
fn hex_metadata_with_description(raw: &str) -> Vec<u8> {
    String::from_utf8(hex_metadata("my_pkg", "1.2.3", "[]"))
        .unwrap()
        .replace("<<\"A test package\">>", raw)
        .into_bytes()
}

#[test]
fn hex_descriptions_follow_the_niso_rule() {
    // Regression test (security issue 16, item 4): a 1 MB description with
    // NUL and escape codes was accepted and landed in v1/packages/index.json.
    let mut failures = Vec::new();
    let huge = format!("<<\"{}\\0\\e[31m\">>", "d".repeat(1_000_000 - 20));
    for (case, raw) in [
        ("1 MB with NUL and ESC", huge),
        ("513 bytes", format!("<<\"{}\">>", "d".repeat(513))),
        ("a newline", "<<\"two\\nlines\">>".to_string()),
        ("a NUL", "<<\"nul\\0\">>".to_string()),
        ("an escape code", "<<\"\\e[2J\">>".to_string()),
        ("a tab", "<<\"tab\\there\">>".to_string()),
    ] {
        let lim = Limits {
            max_metadata: 2 * MIB,
            ..limits()
        };
        match inspect(
            Hex::with_metadata(hex_metadata_with_description(&raw))
                .build()
                .as_slice(),
            &lim,
        ) {
            Err(
                ref e @ ArchiveError::Invalid {
                    file: "metadata.config",
                    ref reason,
                },
            ) if reason.contains("description") => {
                if e.to_string().len() > SHORT_MESSAGE {
                    failures.push(format!("{case}: message of {} bytes", e.to_string().len()));
                }
            }
            other => failures.push(format!("{case}: {:.300}", format!("{other:?}"))),
        }
    }
    assert_no_failures(&failures);
    // At the limit, and UTF-8 counted in bytes.
    let ok = format!("<<\"{}\"/utf8>>", "é".repeat(256));
    let info = accept(
        &Hex::with_metadata(hex_metadata_with_description(&ok)).build(),
        &limits(),
    );
    assert_eq!(info.description.as_deref(), Some("é".repeat(256).as_str()));
    // Blank is no description, as in niso.toml.
    let info = accept(
        &Hex::with_metadata(hex_metadata_with_description("<<\"  \">>")).build(),
        &limits(),
    );
    assert_eq!(info.description, None);
}

#[test]
fn windows_device_names_are_refused_in_archives() {
    // Regression test (security issue 16, item 5): a package `con` or an
    // arch `com1` becomes a path (`packages/con`, `v1/packages/NAME/VERSION/com1`)
    // that cannot be copied to a Windows machine.
    for name in ["con", "prn", "aux", "nul", "com1", "com9", "lpt1", "lpt9"] {
        let text = assert_err!(
            manifest_refused(&manifest_with("name", Some(&format!("{name:?}")))),
            ArchiveError::Ident(IdentError::PackageName { name: n, rule })
                if n == name && rule.contains("Windows")
        );
        assert!(text.contains(name), "{text}");
        assert_err!(
            manifest_refused(&manifest_with("arch", Some(&format!("{name:?}")))),
            ArchiveError::Ident(IdentError::Arch { arch, rule })
                if arch == name && rule.contains("Windows")
        );
        assert_err!(
            refuse(
                &Hex::with_metadata(hex_metadata(name, "1.0.0", "[]")).build(),
                &limits()
            ),
            ArchiveError::Ident(IdentError::PackageName { name: n, .. }) if n == name
        );
    }
    // Longer names that merely start with one are fine.
    for name in ["console", "auxiliary", "com10", "nullable"] {
        let info = accept(
            &Hex::with_metadata(hex_metadata(name, "1.0.0", "[]")).build(),
            &limits(),
        );
        assert_eq!(info.name.as_str(), name);
    }
}

#[test]
fn error_messages_cut_user_text_to_a_few_hundred_bytes() {
    // Regression test (security issue 16, item 2): errors repeated names,
    // paths and parser messages whole (the memory bomb's error was 805 MB).
    let mut failures = Vec::new();
    let mut check = |what: &str, e: ArchiveError| {
        let text = e.to_string();
        if text.len() > SHORT_MESSAGE {
            failures.push(format!("{what}: {} bytes: {:.200}", text.len(), text));
        }
    };
    // A 60 KiB long name (under the 64 KiB cap for long-name headers).
    let long = "a/".repeat(30 * 1024);
    let mut t = tar_body(&[file("niso.toml", MANIFEST)]);
    t.extend_from_slice(&tar_body(&[
        Ent {
            data: long.clone().into_bytes(),
            ..ent("././@LongLink", tar::EntryType::GNULongName)
        },
        file("x", "x"),
    ]));
    check("long path", refuse(&gz(&t), &limits()));
    // A name of 100 KB in metadata.config.
    let name = "a".repeat(100_000);
    check(
        "long package name",
        refuse(
            &Hex::with_metadata(hex_metadata(&name, "1.0.0", "[]")).build(),
            &limits(),
        ),
    );
    // A TOML error on a 500 KB line (the parser quotes the line).
    let manifest = format!("{MANIFEST}\nbad = [{}\n", "1,".repeat(250_000));
    check("TOML error", manifest_refused(&manifest));
    // A bad version and a bad requirement of 100 KB.
    check(
        "long version",
        refuse(
            &Hex::with_metadata(hex_metadata("my_pkg", &format!("1.0.0-{name}"), "[]")).build(),
            &limits(),
        ),
    );
    let req = format!("[{{<<\"{name}\">>,[{{<<\"requirement\">>,<<\"~> 1.0\">>}}]}}]");
    check(
        "long requirement name",
        refuse(
            &Hex::with_metadata(hex_metadata("my_pkg", "1.0.0", &req)).build(),
            &limits(),
        ),
    );
    // An Erlang syntax error after a long atom.
    let mut meta = hex_metadata("my_pkg", "1.0.0", "[]");
    meta.extend_from_slice(format!("{{'{}' ,, }}.\n", "q".repeat(250)).as_bytes());
    check(
        "syntax error",
        refuse(&Hex::with_metadata(meta).build(), &limits()),
    );
    assert_no_failures(&failures);
}
