//! Helpers shared by the end-to-end tests: run the built `niso` binary, copy
//! fixtures, snapshot a tree, and run the real Hex client check.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn hex_fixtures() -> Vec<PathBuf> {
    sorted_files(&fixtures().join("hex"))
}

pub fn niso_fixtures() -> Vec<PathBuf> {
    sorted_files(&fixtures().join("niso"))
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixtures exist")
        .map(|e| e.expect("readable fixture dir").path())
        .collect();
    v.sort();
    v
}

/// Runs `niso ARGS` with a clean environment for logging.
pub fn niso(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_niso"))
        .args(args)
        .env_remove("NISO_LOG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run niso")
}

/// Runs niso and asserts the exit code, returning stdout+stderr as text.
pub fn niso_ok(args: &[&str]) -> String {
    let out = niso(args);
    let text = text(&out);
    assert_eq!(out.status.code(), Some(0), "niso {args:?} failed:\n{text}");
    text
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A fresh data directory with repository `name`.
pub fn init(dir: &Path, name: &str) -> PathBuf {
    let dd = dir.join("data");
    niso_ok(&["registry", "init", "--data-dir", p(&dd), "--name", name]);
    dd
}

/// Every file under `root` (path -> bytes), temp files included, so a test
/// can assert that nothing changed at all.
pub fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(root).expect("under root");
            (
                rel.to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

/// Flips one byte in the middle of a file.
pub fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).expect("write");
}

/// Runs the Hex client check (rebar3's own hex_core) on a tree. A missing
/// escript or rebar3 is a test failure: run scripts/install-test-deps.
pub fn hex_client_check(tree: &Path, repo: &str, public_key: &Path) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hex_client/check_tree.escript");
    let out = Command::new("escript")
        .arg(&script)
        .arg(tree)
        .arg(repo)
        .arg(public_key)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run escript ({e}); install the test tools with scripts/install-test-deps"
            )
        });
    (out.status.success(), text(&out))
}
