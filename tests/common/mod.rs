//! Helpers shared by the end-to-end tests: run the built `niso` binary, copy
//! fixtures, snapshot a tree, and run the real Hex client check.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod moto;

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

/// A `niso registry serve` child process on 127.0.0.1 with an OS-chosen port.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub admin: String,
}

pub const ADMIN_KEY: &str = "niso_k1_TestAdminKey00000000000000000000";

impl Server {
    /// Starts a server on a new data directory under `dir`.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_on(&dir.join("data"), extra)
    }

    pub fn start_on(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(data_dir, extra, Vec::<(&str, String)>::new())
    }

    /// [`Server::start_on`] with more environment variables (a store's
    /// settings).
    pub fn start_with_env<'a>(
        data_dir: &Path,
        extra: &[&str],
        env: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_niso"))
            .args(["registry", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--name", "acme"])
            .args(extra)
            .envs(env)
            .env("NISO_ADMIN_KEY", ADMIN_KEY)
            .env("NISO_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start niso registry serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("Listening at http://") {
                        break a.trim().to_string();
                    }
                    seen.push(line);
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server exited before listening:\n{}", seen.join("\n"));
                }
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            admin: ADMIN_KEY.to_string(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn tree(&self) -> PathBuf {
        self.data_dir.join("public")
    }

    /// `niso registry verify` on the served tree must find nothing wrong.
    pub fn assert_tree_verifies(&self) {
        let key = self.tree().join("public_key");
        let out = niso(&[
            "registry",
            "verify",
            p(&self.data_dir),
            "--public-key",
            p(&key),
            "--name",
            "acme",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "tree does not verify:\n{}",
            text(&out)
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal, valid Hex tarball (format 3) of `name` `version`, made here
/// rather than by hex_core so a test can make thousands.
pub fn hex_tarball(name: &str, version: &str) -> Vec<u8> {
    use sha2::Digest;
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, *data).expect("tar in memory");
        }
        b.into_inner().expect("tar in memory")
    }
    let contents = {
        let inner = tar_of(&[("lib/x.ex", b"defmodule X do\nend\n")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &inner).expect("gzip in memory");
        gz.finish().expect("gzip in memory")
    };
    let metadata = format!(
        "{{<<\"name\">>,<<\"{name}\">>}}.\n{{<<\"version\">>,<<\"{version}\">>}}.\n\
         {{<<\"description\">>,<<\"A test package\">>}}.\n{{<<\"app\">>,<<\"{name}\">>}}.\n\
         {{<<\"build_tools\">>,[<<\"mix\">>]}}.\n{{<<\"requirements\">>,[]}}.\n\
         {{<<\"files\">>,[<<\"lib/x.ex\">>]}}.\n{{<<\"licenses\">>,[<<\"MIT\">>]}}.\n"
    );
    let mut h = sha2::Sha256::new();
    h.update(b"3");
    h.update(metadata.as_bytes());
    h.update(&contents);
    let checksum = hex::encode_upper(h.finalize());
    tar_of(&[
        ("VERSION", b"3"),
        ("CHECKSUM", checksum.as_bytes()),
        ("metadata.config", metadata.as_bytes()),
        ("contents.tar.gz", &contents),
    ])
}
