//! `niso registry mirror` end to end, and the air-gapped walk-through of
//! the README: the built binary against registries started here on
//! 127.0.0.1 (`niso registry serve`, nginx, a counting static host written
//! below), each client run with its own HOME and XDG directories.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixtures, hex_tarball, p, Server, ADMIN_KEY};
use serde_json::Value;

// ---------------------------------------------------------------------------
// A client with its own home (as in tests/client.rs).

struct Client {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Client {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(env!("CARGO_BIN_EXE_niso"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_DATA_HOME", d.join("data"))
            .env("XDG_STATE_HOME", d.join("state"))
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run niso")
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let (o, e) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "niso {args:?} failed:\nstdout:\n{o}\nstderr:\n{e}"
        );
        (o, e)
    }

    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let (o, e) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(code),
            "niso {args:?} should exit {code}:\nstdout:\n{o}\nstderr:\n{e}"
        );
        e
    }

    fn add(&self, name: &str, url: &str, extra: &[&str]) {
        let mut args = vec!["registry", "add", name, url, "--yes"];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// `mirror … --json`: the root repository's `mirrored` line (exit 0).
    fn mirror(&self, args: &[&str]) -> Value {
        self.mirror_all(args).remove(0)
    }

    /// `mirror … --json`: one `mirrored` line per repository (exit 0).
    fn mirror_all(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["registry", "mirror"];
        all.extend_from_slice(args);
        all.push("--json");
        let (o, _) = self.ok(&all);
        let lines = json_lines(&o);
        assert!(!lines.is_empty(), "{o}");
        assert!(lines.iter().all(|l| l["type"] == "mirrored"), "{o}");
        lines
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join("niso").join(name)
}

const V100: &str = "my-app-1.0.0-x86_64.niso";
const V110: &str = "my-app-1.1.0-x86_64.niso";
const V110_ARM: &str = "my-app-1.1.0-aarch64.niso";

/// Every file of a tree (path → bytes), temp files left out: what a reader
/// of the tree can see.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    common::snapshot(root)
        .into_iter()
        .filter(|(k, _)| !k.split('/').any(|c| c.starts_with('.')))
        .collect()
}

fn temp_files(root: &Path) -> Vec<String> {
    common::snapshot(root)
        .into_keys()
        .filter(|k| k.split('/').any(|c| c.starts_with('.')))
        .collect()
}

/// `niso registry verify` of a directory: (exit code, output).
fn verify(dir: &Path, key: &Path, name: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "registry",
        "verify",
        p(dir),
        "--public-key",
        p(key),
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    let out = common::niso(&args);
    (out.status.code(), common::text(&out))
}

fn assert_verifies(dir: &Path, key: &Path, name: &str) {
    let (code, text) = verify(dir, key, name, &[]);
    assert_eq!(code, Some(0), "{} does not verify:\n{text}", dir.display());
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
}

/// Uploads bytes through the API with `key`.
fn upload(s: &Server, key: &str, name: &str, version: &str, arch: &str, bytes: Vec<u8>) {
    let r = http()
        .post(s.url(&format!("/v1/packages/{name}/{version}/{arch}")))
        .bearer_auth(key)
        .body(bytes)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap_or_default());
}

/// A data directory holding `count` packages of Hex tarballs, published
/// offline (one `registry publish`).
fn hex_registry(dir: &Path, name: &str, count: usize) -> PathBuf {
    let dd = dir.join(format!("dd-{name}"));
    common::niso_ok(&["registry", "init", "--data-dir", p(&dd), "--name", name]);
    let files = dir.join(format!("tarballs-{name}"));
    std::fs::create_dir_all(&files).unwrap();
    let mut paths = Vec::new();
    for i in 0..count {
        let pkg = format!("pkg_{i:03}");
        let f = files.join(format!("{pkg}-1.0.0.tar"));
        std::fs::write(&f, hex_tarball(&pkg, "1.0.0")).unwrap();
        paths.push(f);
    }
    let mut args = vec!["registry", "publish", "--data-dir", p(&dd)];
    args.extend(paths.iter().map(|f| p(f)));
    common::niso_ok(&args);
    dd
}

// ---------------------------------------------------------------------------
// A static host that counts what it is asked for.

/// Each request's path and `Authorization` header.
type RequestLog = Mutex<Vec<(String, Option<String>)>>;

/// Serves a directory over HTTP/1.1 keep-alive, recording each request's
/// path and `Authorization` header; optionally slows down archive reads,
/// or redirects every request to another base URL.
struct CountingHost {
    port: u16,
    log: Arc<RequestLog>,
    stop: Arc<AtomicBool>,
}

impl CountingHost {
    fn start(root: &Path, archive_delay: Duration, redirect: Option<String>) -> Self {
        Self::start_with(root, archive_delay, redirect, 0)
    }

    /// Answers every `busy_every`-th request with 429 (`Retry-After: 0`).
    fn start_with(
        root: &Path,
        archive_delay: Duration,
        redirect: Option<String>,
        busy_every: usize,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (root, l, st) = (root.to_path_buf(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (root, log, redirect) = (root.clone(), l.clone(), redirect.clone());
                std::thread::spawn(move || {
                    serve_conn(conn, &root, &log, archive_delay, redirect, busy_every)
                });
            }
        });
        Self { port, log, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Drop for CountingHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_conn(
    conn: TcpStream,
    root: &Path,
    log: &RequestLog,
    delay: Duration,
    redirect: Option<String>,
    busy_every: usize,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let mut auth = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("authorization") {
                    auth = Some(v.trim().to_string());
                }
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
        let n = {
            let mut log = log.lock().unwrap();
            log.push((path.clone(), auth));
            log.len()
        };
        if busy_every > 0 && n % busy_every == 0 {
            let _ = write!(
                out,
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n"
            );
            continue;
        }
        if let Some(base) = &redirect {
            let _ = write!(
                out,
                "HTTP/1.1 302 Found\r\nLocation: {base}{path}\r\nContent-Length: 0\r\n\r\n"
            );
            continue;
        }
        if path.starts_with("/tarballs/") || path.starts_with("/archives/") {
            std::thread::sleep(delay);
        }
        let rel = path.trim_start_matches('/');
        let safe = !rel.split('/').any(|c| c.is_empty() || c.starts_with('.'));
        let body = if safe {
            std::fs::read(root.join(rel)).ok()
        } else {
            None
        };
        let written = match body {
            Some(b) => write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )
            .and_then(|()| out.write_all(&b)),
            None => write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        };
        if written.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// nginx and python's http.server, to serve a carried copy.

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal nginx serving a tree as plain files (ETags on, its default).
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(tree: &Path, work: &Path) -> Self {
        std::fs::create_dir_all(work).unwrap();
        let port = free_port();
        let w = work.display();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root root;\n"
        } else {
            ""
        };
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\n{user}\
             pid {w}/nginx.pid;\nerror_log {w}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n\
             \x20 client_body_temp_path {w}/client_body;\n  proxy_temp_path {w}/proxy;\n\
             \x20 fastcgi_temp_path {w}/fastcgi;\n  uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    root {tree};\n\
             \x20   location ~ /\\. {{ return 404; }}\n\
             \x20   location / {{ try_files $uri =404; }}\n  }}\n}}\n",
            tree = tree.display()
        );
        let conf_path = work.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(work)
            .arg("-e")
            .arg(work.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is needed for this test (scripts/install-test-deps)");
        let mut n = Nginx { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = n.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(work.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}):\n{log}");
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return n;
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3 -m http.server` over a directory.
struct PythonHost {
    child: Child,
    port: u16,
}

impl PythonHost {
    fn start(root: &Path) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for this test");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected http.server banner: {line:?}"));
        Self { child, port }
    }
}

impl Drop for PythonHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Re-signs a tree's freshness record after `change`, with the data
/// directory's own key (as only its holder could).
fn resign_freshness(dd: &Path, tree: &Path, change: impl FnOnce(&mut niso::index::pb::Freshness)) {
    use niso::index::{RepoKey, Signer};
    let key = RepoKey::from_file(&dd.join("keys/repository.pem")).unwrap();
    let bytes = std::fs::read(tree.join("freshness")).unwrap();
    let mut record: niso::index::pb::Freshness =
        niso::index::decode_index(&bytes, key.public_key(), "acme", 1 << 24).unwrap();
    change(&mut record);
    let out = niso::index::codec::encode_index_stored(&record, &key).unwrap();
    std::fs::write(tree.join("freshness"), out).unwrap();
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------
// 1. Into a directory.

#[test]
fn a_directory_mirror_is_a_verbatim_copy_kept_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let key = s.tree().join("public_key");
    let c = Client::new();
    c.add("src", &s.url(""), &["--key", ADMIN_KEY]);
    for f in [V100, V110, V110_ARM] {
        c.ok(&["push", p(&fixture(f))]);
    }
    c.ok(&["push", p(&fixtures().join("hex/jason-1.4.4.tar"))]);
    c.ok(&["tag", "my-app:1.0.0", "my-app:stable"]);
    c.ok(&["push", p(&fixture(V100)), "--org", "team"]);

    let dst = tmp.path().join("mirror");
    // An organization's repository too, read with the stored key.
    let all = c.mirror_all(&["--from", "src", "--to", p(&dst), "--org", "team"]);
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[1]["repository"].as_str(), all[1]["prefix"].as_str()),
        (Some("team"), Some("repos/team"))
    );
    let v = &all[0];
    assert_eq!(
        (v["archives"].as_u64(), v["fetched"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(v["kept"], 0);
    assert_eq!(v["repository"], "acme");
    // The same files, byte for byte, as the source serves: its signatures
    // kept, so it verifies with the source's key and name.
    assert_eq!(tree(&s.tree()), tree(&dst));
    assert_verifies(&dst, &key, "acme");
    let (ok, out) = common::hex_client_check(&dst, "acme", &key);
    assert!(ok, "a Hex client cannot read the mirror:\n{out}");
    assert!(temp_files(&dst).is_empty(), "{:?}", temp_files(&dst));

    // Again: nothing fetched but the indexes, nothing written.
    let v = c.mirror(&["--from", "src", "--to", p(&dst), "--org", "team"]);
    assert_eq!(
        (v["fetched"].as_u64(), v["kept"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(
        (v["files_written"].as_u64(), v["files_removed"].as_u64()),
        (Some(0), Some(0))
    );

    // Keep an old copy of the source for later.
    let old = tmp.path().join("old-source");
    let st = Command::new("cp")
        .arg("-a")
        .arg(s.tree())
        .arg(&old)
        .status()
        .unwrap();
    assert!(st.success());

    // The source changes: a new release, a deletion, a tag moved. Only
    // the new archive is fetched; what the source no longer has goes.
    let new = tmp.path().join("fresh-1.0.0.tar");
    std::fs::write(&new, hex_tarball("fresh", "1.0.0")).unwrap();
    c.ok(&["push", p(&new)]);
    let r = http()
        .delete(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .unwrap();
    assert!(r.status().is_success());
    c.ok(&["tag", "my-app:1.1.0", "my-app:stable"]);
    let v = c.mirror(&["--from", "src", "--to", p(&dst), "--org", "team"]);
    assert_eq!(
        (v["fetched"].as_u64(), v["kept"].as_u64()),
        (Some(1), Some(3))
    );
    assert!(v["files_removed"].as_u64().unwrap() >= 3, "{v}");
    assert!(!dst.join("archives/my-app-1.0.0-x86_64.niso").exists());
    assert_eq!(tree(&s.tree()), tree(&dst));
    assert_verifies(&dst, &key, "acme");

    // An older copy of the source is refused: the mirror is not rolled back.
    let before = tree(&dst);
    let e = c.fails(
        &[
            "registry",
            "mirror",
            "--from",
            p(&old),
            "--to",
            p(&dst),
            "--public-key",
            p(&key),
            "--name",
            "acme",
        ],
        2,
    );
    assert!(e.contains("newer than the source's"), "{e}");
    assert!(e.contains("refusing to roll the mirror back"), "{e}");
    assert_eq!(before, tree(&dst));
}

#[test]
fn mirror_refuses_what_it_cannot_do_safely() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = hex_registry(tmp.path(), "acme", 2);
    let key = dd.join("public/public_key");
    let c = Client::new();
    let from = p(&dd);
    // A misspelt registry name is not taken for a new directory.
    let e = c.fails(&["registry", "mirror", "--from", from, "--to", "privte"], 2);
    assert!(e.contains("write ./privte"), "{e}");
    assert!(!Path::new("privte").exists());
    // An unknown URL needs the key and name to verify with.
    let e = c.fails(
        &[
            "registry",
            "mirror",
            "--from",
            "http://127.0.0.1:9/",
            "--to",
            p(&tmp.path().join("x")),
        ],
        2,
    );
    assert!(e.contains("--public-key FILE --name REPO"), "{e}");
    // So does a plain directory.
    let e = c.fails(
        &[
            "registry",
            "mirror",
            "--from",
            p(&dd.join("public")),
            "--to",
            p(&tmp.path().join("x")),
        ],
        2,
    );
    assert!(e.contains("--public-key FILE --name REPO"), "{e}");
    // A data directory is not a mirror: it signs its own tree.
    let other = tmp.path().join("other-dd");
    common::niso_ok(&[
        "registry",
        "init",
        "--data-dir",
        p(&other),
        "--name",
        "acme",
    ]);
    let before = common::snapshot(&other);
    let e = c.fails(
        &["registry", "mirror", "--from", from, "--to", p(&other)],
        2,
    );
    assert!(e.contains("is a registry data directory"), "{e}");
    assert_eq!(before, common::snapshot(&other));
    // Nor is a directory of someone's files.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("packages")).unwrap();
    std::fs::write(home.join("packages/notes.txt"), b"mine").unwrap();
    std::fs::write(home.join("todo.txt"), b"mine").unwrap();
    let e = c.fails(&["registry", "mirror", "--from", from, "--to", p(&home)], 2);
    assert!(
        e.contains("holds no registry tree (it has todo.txt)"),
        "{e}"
    );
    assert!(home.join("packages/notes.txt").exists());
    // Nor a mirror of another repository.
    let elsewhere = hex_registry(tmp.path(), "other", 1);
    let m = tmp.path().join("m");
    c.mirror(&["--from", p(&elsewhere), "--to", p(&m)]);
    let before = tree(&m);
    let e = c.fails(&["registry", "mirror", "--from", from, "--to", p(&m)], 2);
    assert!(e.contains("is not a mirror of this repository"), "{e}");
    assert_eq!(before, tree(&m));
    // The wrong key for a source: refused before anything is written.
    let e = c.fails(
        &[
            "registry",
            "mirror",
            "--from",
            p(&dd.join("public")),
            "--to",
            p(&tmp.path().join("n")),
            "--public-key",
            p(&elsewhere.join("public/public_key")),
            "--name",
            "acme",
        ],
        2,
    );
    assert!(e.contains("signature"), "{e}");
    assert!(!tmp.path().join("n/freshness").exists());
    // The right one works, and into itself is refused.
    let n = tmp.path().join("n");
    c.mirror(&[
        "--from",
        p(&dd.join("public")),
        "--to",
        p(&n),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    assert_verifies(&n, &key, "acme");
    let e = c.fails(
        &[
            "registry",
            "mirror",
            "--from",
            p(&n),
            "--to",
            p(&n),
            "--public-key",
            p(&key),
            "--name",
            "acme",
        ],
        2,
    );
    assert!(e.contains("the same directory"), "{e}");
    // An index the source's own record does not vouch for (tampered, or a
    // stale cache): read again, then refused; the mirror keeps what it had.
    let before = tree(&n);
    common::flip_byte(&dd.join("public/niso/packages/pkg_001"));
    let e = c.fails(&["registry", "mirror", "--from", from, "--to", p(&n)], 2);
    assert!(
        e.contains("niso/packages/pkg_001 did not match the source's signed freshness record"),
        "{e}"
    );
    assert_eq!(before, tree(&n));
}

// ---------------------------------------------------------------------------
// 2. Killed half way, resumed.

#[test]
fn a_mirror_killed_half_way_resumes_without_fetching_again() {
    let tmp = tempfile::tempdir().unwrap();
    const TOTAL: usize = 120;
    let dd = hex_registry(tmp.path(), "acme", TOTAL);
    let key = dd.join("public/public_key");
    // Archives are slow to come, so the mirror is still fetching them
    // when it is killed.
    let host = CountingHost::start(&dd.join("public"), Duration::from_millis(25), None);
    let c = Client::new();
    let dst = tmp.path().join("mirror");
    let args = [
        "registry",
        "mirror",
        "--from",
        &host.url(),
        "--to",
        p(&dst),
        "--public-key",
        p(&key),
        "--name",
        "acme",
        "--jobs",
        "2",
    ];
    let mut child = c
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let archives = |d: &Path| -> usize {
        std::fs::read_dir(d.join("tarballs"))
            .map(|r| {
                r.filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('.')
                })
                .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while archives(&dst) < 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the mirror finished before it was killed"
        );
        assert!(Instant::now() < deadline, "the mirror fetched nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let present = archives(&dst);
    assert!(present < TOTAL, "{present}");
    // No index was written yet: nothing names a missing archive.
    assert!(!dst.join("freshness").exists() && !dst.join("names").exists());

    host.clear();
    let v = c.mirror(&args[2..]);
    let fetched: Vec<String> = host
        .requests()
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| path.starts_with("/tarballs/"))
        .collect();
    // Only what was missing is fetched again, each archive once.
    assert_eq!(fetched.len(), TOTAL - present, "{fetched:?}");
    assert_eq!(v["fetched"].as_u64(), Some((TOTAL - present) as u64));
    assert_eq!(v["kept"].as_u64(), Some(present as u64));
    assert_eq!(archives(&dst), TOTAL);
    assert_verifies(&dst, &key, "acme");
    assert_eq!(tree(&dd.join("public")), tree(&dst));
    // The killed run's temp files are gone.
    assert!(temp_files(&dst).is_empty(), "{:?}", temp_files(&dst));
}

#[test]
fn a_mirror_waits_when_the_source_asks_it_to_slow_down() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = hex_registry(tmp.path(), "acme", 12);
    let key = dd.join("public/public_key");
    // Every third request is turned away (429), as a rate-limited niso
    // registry or a busy proxy does.
    let host = CountingHost::start_with(&dd.join("public"), Duration::ZERO, None, 3);
    let c = Client::new();
    let dst = tmp.path().join("mirror");
    let v = c.mirror(&[
        "--from",
        &host.url(),
        "--to",
        p(&dst),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    assert_eq!(v["fetched"], 12);
    let requests = host.requests().len();
    assert!(requests >= 3 * 12 / 2, "{requests}");
    assert_verifies(&dst, &key, "acme");
    assert_eq!(tree(&dd.join("public")), tree(&dst));
}

// ---------------------------------------------------------------------------
// 3. While uploads land.

#[test]
fn a_mirror_taken_while_uploads_land_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        &["--rate-limit-key", "0", "--rate-limit-ip", "0"],
    );
    let key = s.tree().join("public_key");
    const PACKAGES: usize = 40;
    for i in 0..PACKAGES {
        let name = format!("pkg_{i:03}");
        upload(
            &s,
            ADMIN_KEY,
            &name,
            "1.0.0",
            "any",
            hex_tarball(&name, "1.0.0"),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let uploads = {
        let (stop, base) = (stop.clone(), s.url(""));
        std::thread::spawn(move || {
            let client = http();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("pkg_{:03}", n % PACKAGES);
                let version = format!("1.{n}.0");
                let r = client
                    .post(format!("{base}/v1/packages/{name}/{version}/any"))
                    .bearer_auth(ADMIN_KEY)
                    .body(hex_tarball(&name, &version))
                    .send()
                    .unwrap();
                assert!(r.status().is_success());
            }
            n
        })
    };
    let c = Client::new();
    let dst = tmp.path().join("mirror");
    let mut restarts = 0;
    for _ in 0..3 {
        let v = c.mirror(&[
            "--from",
            &s.url(""),
            "--to",
            p(&dst),
            "--public-key",
            p(&key),
            "--name",
            "acme",
            "--jobs",
            "2",
        ]);
        restarts += v["restarts"].as_u64().unwrap();
        // Whatever moment it copied, the copy is whole and consistent.
        assert_verifies(&dst, &key, "acme");
    }
    stop.store(true, Ordering::Relaxed);
    let n = uploads.join().unwrap();
    assert!(n > 10, "only {n} uploads landed meanwhile");
    assert!(
        restarts > 0,
        "the source never moved under the mirror; the test proves nothing"
    );
    c.mirror(&[
        "--from",
        &s.url(""),
        "--to",
        p(&dst),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    assert_eq!(tree(&s.tree()), tree(&dst));
}

// ---------------------------------------------------------------------------
// 4. Into a second registry.

#[test]
fn a_registry_mirror_uploads_through_the_api_and_the_destination_re_signs() {
    use base64::Engine;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let tmp = tempfile::tempdir().unwrap();
    let a = Server::start(&tmp.path().join("a"), &[]);
    let b = Server::start(&tmp.path().join("b"), &[]);
    let c = Client::new();
    c.add("src", &a.url(""), &["--key", ADMIN_KEY]);
    c.add("dst", &b.url(""), &["--key", ADMIN_KEY]);
    // At the source: a signed release, unsigned ones, a tag.
    let sk = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let private = tmp.path().join("publisher.pem");
    let public = tmp.path().join("publisher.pub");
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
    let register = |s: &Server, id: &str| {
        let r = http()
            .post(s.url(&format!("/v1/auth/keys/{id}/publisher-key")))
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({
                "public_key": base64::engine::general_purpose::STANDARD.encode(sk.verifying_key().as_bytes())
            }))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    };
    let create_key = |s: &Server, name: &str| -> (String, String) {
        let v: Value = http()
            .post(s.url("/v1/auth/keys"))
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({ "name": name, "scopes": ["push:*"] }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        (
            v["id"].as_str().unwrap().into(),
            v["key"].as_str().unwrap().into(),
        )
    };
    let (signer_id, signer_key) = create_key(&a, "signer");
    register(&a, &signer_id);
    for f in [V110, V110_ARM] {
        c.ok(&["push", p(&fixture(f)), "--registry", "src"]);
    }
    c.ok(&[
        "push",
        p(&fixtures().join("hex/jason-1.4.4.tar")),
        "--registry",
        "src",
    ]);
    let mut signer = Client::new();
    signer.add("src", &a.url(""), &[]);
    signer.env.push(("NISO_KEY".into(), signer_key));
    signer.ok(&["push", p(&fixture(V100)), "--sign", p(&private)]);
    c.ok(&["tag", "my-app:1.0.0", "my-app:stable", "--registry", "src"]);
    c.ok(&["tag", "jason:1.4.4", "jason:stable", "--registry", "src"]);

    // The mirroring key has no publisher key at the destination: the signed
    // archive (and the tag on its version) cannot be mirrored; the rest is.
    c.ok(&[
        "push",
        p(&fixture(V110)),
        "--org",
        "team",
        "--registry",
        "src",
    ]);
    let out = c.run(&[
        "registry", "mirror", "--from", "src", "--to", "dst", "--org", "team",
    ]);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{o}\n{e}");
    assert!(
        e.contains("my-app 1.0.0 (x86_64): the destination refused the publisher signature"),
        "{e}"
    );
    assert!(e.contains("--strip-signatures"), "{e}");
    assert!(
        e.contains("tag stable of my-app (1.0.0): not set, the version was not mirrored"),
        "{e}"
    );
    assert!(o.contains("(3 uploaded, 0 already there)"), "{o}");
    assert!(o.contains("Mirrored organization team (generation "), "{o}");
    assert!(
        o.contains("into dst: 1 archives (1 uploaded, 0 already there)"),
        "{o}"
    );
    b.assert_tree_verifies();
    assert!(b
        .tree()
        .join("repos/team/archives/my-app-1.1.0-x86_64.niso")
        .is_file());
    // The destination signs with its own key: the copy verifies with it,
    // not with the source's.
    let (code, _) = verify(&b.tree(), &a.tree().join("public_key"), "acme", &[]);
    assert_eq!(code, Some(1));

    // A key at the destination with the same publisher key carries it.
    let (id, mirror_key) = create_key(&b, "mirror");
    register(&b, &id);
    let mut m = Client::new();
    m.add("src", &a.url(""), &["--key", ADMIN_KEY]);
    m.add("dst", &b.url(""), &[]);
    m.env.push(("NISO_KEY".into(), mirror_key));
    let v = m.mirror(&["--from", "src", "--to", "dst"]);
    assert_eq!(
        (v["fetched"].as_u64(), v["kept"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(v["tags_set"], 1);
    b.assert_tree_verifies();
    // Pulled from the destination: the source's bytes, with the publisher's
    // signature checked.
    let puller = Client::new();
    puller.add("dst", &b.url(""), &[]);
    let (o, _) = puller.ok(&[
        "pull",
        "my-app:stable",
        "--arch",
        "x86_64",
        "--require-signature",
        "--publisher-key",
        p(&public),
    ]);
    let pulled = std::fs::read(o.trim()).unwrap();
    assert_eq!(pulled, std::fs::read(fixture(V100)).unwrap());
    let (o, _) = puller.ok(&["registry", "list-tags", "jason"]);
    assert!(
        o.contains("stable   1.4.4") || o.contains("stable  1.4.4"),
        "{o}"
    );

    // Again: nothing to upload, and safe.
    let v = c.mirror(&["--from", "src", "--to", "dst"]);
    assert_eq!(
        (
            v["fetched"].as_u64(),
            v["kept"].as_u64(),
            v["tags_set"].as_u64()
        ),
        (Some(0), Some(4), Some(0))
    );
    // Other bytes already published under a version at the destination:
    // reported, left alone.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let clash = other.join("clash-1.0.0.tar");
    std::fs::write(&clash, hex_tarball("clash", "1.0.0")).unwrap();
    c.ok(&["push", p(&clash), "--registry", "src"]);
    // Same name and version at the destination, other contents.
    upload(
        &b,
        ADMIN_KEY,
        "clash",
        "1.0.0",
        "any",
        other_tarball("clash", "1.0.0"),
    );
    let e = c.fails(&["registry", "mirror", "--from", "src", "--to", "dst"], 2);
    assert!(
        e.contains("clash 1.0.0 (any): the destination already publishes other bytes"),
        "{e}"
    );
}

/// A Hex tarball of NAME VERSION with other contents than `hex_tarball`'s.
fn other_tarball(name: &str, version: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("escript")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hex_client/make_sample_tree.escript"),
        )
        .args(["tarball", p(dir.path()), name, version])
        .output()
        .expect("escript (scripts/install-test-deps)");
    assert!(out.status.success(), "{}", common::text(&out));
    std::fs::read(dir.path().join(format!("{name}-{version}.tar"))).unwrap()
}

// ---------------------------------------------------------------------------
// 5. The air-gapped walk-through of the README.

#[test]
fn the_air_gapped_walk_through_of_the_readme_works() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let key = tmp.path().join("acme.pem");
    std::fs::copy(s.tree().join("public_key"), &key).unwrap();
    let c = Client::new();
    c.add("src", &s.url(""), &["--key", ADMIN_KEY]);
    for f in [V100, V110] {
        c.ok(&["push", p(&fixture(f))]);
    }
    c.ok(&["push", p(&fixtures().join("hex/jason-1.4.4.tar"))]);

    // 1. Mirror to a directory (the README's command: a URL, key and name).
    let usb = tmp.path().join("usb/registry");
    let (o, _) = c.ok(&[
        "registry",
        "mirror",
        "--from",
        &s.url(""),
        "--to",
        p(&usb),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    assert!(o.starts_with("Mirrored acme (generation "), "{o}");
    // 2. Carry it (any medium: here a tar archive).
    let site = tmp.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let tar = tmp.path().join("carry.tar");
    assert!(Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&usb)
        .arg(".")
        .status()
        .unwrap()
        .success());
    assert!(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&site)
        .status()
        .unwrap()
        .success());
    // 3. Verify it offline.
    assert_verifies(&site, &key, "acme");
    // 4. Serve it: `serve --read-only` and nginx send ETags (rebar3 needs
    // them), python's http.server does not.
    let ro = Server::start_on(&site, &["--read-only"]);
    let nginx = Nginx::start(&site, &tmp.path().join("nginx"));
    let py = PythonHost::start(&site);
    let etag = |url: String| {
        http()
            .get(url)
            .send()
            .unwrap()
            .headers()
            .get("etag")
            .cloned()
    };
    assert!(etag(ro.url("/tarballs/jason-1.4.4.tar")).is_some());
    assert!(etag(format!("{}/tarballs/jason-1.4.4.tar", nginx.url())).is_some());
    assert!(etag(format!(
        "http://127.0.0.1:{}/tarballs/jason-1.4.4.tar",
        py.port
    ))
    .is_none());
    // 5. Pull from it.
    for (name, url) in [("airgap", ro.url("")), ("airgap-nginx", nginx.url())] {
        let user = Client::new();
        user.add(name, &url, &["--public-key", p(&key)]);
        let (o, _) = user.ok(&["pull", "my-app", "--arch", "x86_64"]);
        assert_eq!(
            std::fs::read(o.trim()).unwrap(),
            std::fs::read(fixture(V110)).unwrap()
        );
    }

    // A copy older than the freshness record's expiry: verify and pull say
    // so, and go on only with --allow-expired.
    resign_freshness(&s.data_dir, &s.tree(), |f| f.expires_at = now() - 60);
    let stale = tmp.path().join("stale");
    let mirror = [
        "registry",
        "mirror",
        "--from",
        &s.url(""),
        "--to",
        p(&stale),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ];
    let e = c.fails(&mirror, 2);
    assert!(e.contains("--allow-expired"), "{e}");
    let mut allowed = mirror.to_vec();
    allowed.push("--allow-expired");
    let (_, e) = c.ok(&allowed);
    assert!(e.contains("WARNING"), "{e}");
    let (code, text) = verify(&stale, &key, "acme", &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("freshness: expired at") && text.contains("--allow-expired"),
        "{text}"
    );
    let (code, text) = verify(&stale, &key, "acme", &["--allow-expired"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("WARNING: freshness: expired at"), "{text}");
    let ro2 = Server::start_on(&stale, &["--read-only"]);
    let user = Client::new();
    user.add("stale", &ro2.url(""), &["--public-key", p(&key)]);
    let e = user.fails(&["pull", "my-app:1.0.0", "--arch", "x86_64"], 2);
    assert!(e.contains("expired at"), "{e}");
    user.ok(&[
        "pull",
        "my-app:1.0.0",
        "--arch",
        "x86_64",
        "--allow-expired",
    ]);
}

// ---------------------------------------------------------------------------
// 6. `verify URL --org` sends a key, to that host only.

#[test]
fn verify_of_an_organization_over_http_sends_the_key_to_that_host_only() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let key = s.tree().join("public_key");
    let c = Client::new();
    c.add("private", &s.url(""), &["--key", ADMIN_KEY]);
    c.ok(&["push", p(&fixture(V100)), "--org", "team"]);
    c.ok(&["push", p(&fixture(V110))]);
    let verify_url = |client: &Client, url: &str, extra: &[&str]| {
        let mut args = vec![
            "registry",
            "verify",
            url,
            "--public-key",
            p(&key),
            "--name",
            "acme",
            "--org",
            "team",
        ];
        args.extend_from_slice(extra);
        client.run(&args)
    };
    // With no key anywhere: the organization's files are refused.
    let anon = Client::new();
    let out = verify_url(&anon, &s.url(""), &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        texts(&out).1.contains("401") || texts(&out).0.contains("401"),
        "{:?}",
        texts(&out)
    );
    // --key, NISO_KEY, or the configured registry at that URL.
    let out = verify_url(&anon, &s.url(""), &["--key", ADMIN_KEY]);
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
    let mut env = Client::new();
    env.env.push(("NISO_KEY".into(), ADMIN_KEY.into()));
    assert_eq!(verify_url(&env, &s.url(""), &[]).status.code(), Some(0));
    let out = verify_url(&c, &s.url("/"), &[]);
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
    let (o, e) = texts(&out);
    assert!(e.contains("Repository team: 1 packages"), "{o}{e}");

    // A host that redirects elsewhere: the key goes to the host named and
    // only for the organization's files; the other host never sees it.
    let elsewhere = CountingHost::start(tmp.path(), Duration::ZERO, None);
    let named = CountingHost::start(
        tmp.path(),
        Duration::ZERO,
        Some(format!("http://localhost:{}", elsewhere.port)),
    );
    verify_url(&anon, &named.url(), &["--key", ADMIN_KEY]);
    let seen = named.requests();
    assert!(
        seen.iter().any(|(p, a)| p.starts_with("/repos/team/")
            && a.as_deref() == Some(&format!("Bearer {ADMIN_KEY}") as &str)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|(p, _)| !p.starts_with("/repos/"))
            .all(|(_, a)| a.is_none()),
        "{seen:?}"
    );
    let leaked = elsewhere.requests();
    assert!(!leaked.is_empty(), "the redirect was not followed");
    assert!(leaked.iter().all(|(_, a)| a.is_none()), "{leaked:?}");
}

#[test]
fn mirror_help_has_the_manual_example() {
    let (o, _) = Client::new().ok(&["registry", "mirror", "--help"]);
    assert!(
        o.contains("niso registry mirror --from niso.dev --to private"),
        "{o}"
    );
}

#[test]
fn the_destination_key_is_never_sent_to_the_source() {
    // NISO_KEY is the destination's push key: a hostile source must not get
    // it. An organization of a plain URL is read with --from-key alone.
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let key = s.tree().join("public_key");
    let c = Client::new();
    c.add("src", &s.url(""), &["--key", ADMIN_KEY]);
    c.ok(&["push", p(&fixture(V100)), "--org", "team"]);

    let mut env = Client::new();
    env.env.push(("NISO_KEY".into(), ADMIN_KEY.into()));
    let dst = tmp.path().join("mirror");
    let url = s.url("");
    let refused = [
        "registry",
        "mirror",
        "--from",
        &url,
        "--to",
        p(&dst),
        "--public-key",
        p(&key),
        "--name",
        "acme",
        "--org",
        "team",
    ];
    let e = env.fails(&refused, 2);
    assert!(e.contains("401"), "{e}");
    let with = [&refused[..], &["--from-key", ADMIN_KEY]].concat();
    env.ok(&with);
    assert_verifies(&dst, &key, "acme");
    assert!(dst.join("repos/team/niso/packages/my-app").is_file());
}

#[test]
fn one_mirror_run_at_a_time_writes_a_directory() {
    // A second run (an overlapping cron job) into the same directory would
    // roll the first one's copy back; it is refused while the first runs.
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let key = s.tree().join("public_key");
    let dst = tmp.path().join("mirror");
    std::fs::create_dir(&dst).unwrap();
    // -o: the lock stays with flock(1), not with its child.
    let mut holder = Command::new("flock")
        .arg("-o")
        .arg(&dst)
        .args(["sleep", "30"])
        .spawn()
        .expect("flock(1)");
    let args = [
        "registry",
        "mirror",
        "--from",
        &s.url(""),
        "--to",
        p(&dst),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ];
    let c = Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        let out = c.run(&args);
        let (o, e) = texts(&out);
        if out.status.code() == Some(2) && e.contains("another process is writing") {
            break e;
        }
        // flock(1) may not hold it yet.
        assert!(Instant::now() < deadline, "{:?}: {o}{e}", out.status);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(std::fs::read_dir(&dst).unwrap().next().is_none(), "{e}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    c.ok(&args);
    assert_verifies(&dst, &key, "acme");
}

#[test]
fn a_url_source_that_goes_back_in_time_is_a_rollback_for_any_destination() {
    // A source given by URL alone: the generation seen there is kept, so a
    // replayed older tree at that URL is refused even into a new directory.
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let key = s.tree().join("public_key");
    let c = Client::new();
    c.add("src", &s.url(""), &["--key", ADMIN_KEY]);
    c.ok(&["push", p(&fixture(V100))]);
    let old = tmp.path().join("old");
    let site = tmp.path().join("site");
    let copy = |from: &Path, to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        let st = Command::new("cp").arg("-a").arg(from).arg(to).status();
        assert!(st.unwrap().success());
    };
    copy(&s.tree(), &old);
    c.ok(&["push", p(&fixture(V110))]);
    copy(&s.tree(), &site);
    let host = CountingHost::start(&site, Duration::ZERO, None);
    let mirror = |to: &Path| {
        c.run(&[
            "registry",
            "mirror",
            "--from",
            &host.url(),
            "--to",
            p(to),
            "--public-key",
            p(&key),
            "--name",
            "acme",
        ])
    };
    let out = mirror(&tmp.path().join("first"));
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
    copy(&old, &site);
    let second = tmp.path().join("second");
    let out = mirror(&second);
    let (o, e) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{o}{e}");
    assert!(e.contains("(a rollback)"), "{e}");
    assert!(!second.join("freshness").exists(), "{e}");
}
