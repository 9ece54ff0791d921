//! The `niso` client end to end: the built binary against registries the
//! tests start on 127.0.0.1 (`niso registry serve`, nginx, and a plain
//! static host, `python3 -m http.server`), each client run with its own
//! HOME and XDG directories and no NISO_* variables from the machine.
//!
//! Every refusal test also checks that nothing was written: not the package
//! store, not the state of generations seen.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fixtures, p, Server, ADMIN_KEY};
use serde_json::Value;

// ---------------------------------------------------------------------------
// A client with its own home.

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

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn config_file(&self) -> PathBuf {
        self.config_dir().join("niso/config.toml")
    }
    fn store(&self) -> PathBuf {
        self.data_dir().join("niso/packages")
    }

    /// The command, with nothing from the machine's environment but PATH.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_niso"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home())
            .env("XDG_CONFIG_HOME", self.config_dir())
            .env("XDG_DATA_HOME", self.data_dir())
            .env("XDG_STATE_HOME", self.state_dir())
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run niso")
    }

    /// Runs and expects success; returns (stdout, stderr).
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

    /// Runs and expects exit status `code`; returns stderr.
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

    /// `registry add NAME URL --yes`, after seeing the fingerprint.
    fn add(&self, name: &str, url: &str, extra: &[&str]) {
        let mut args = vec!["registry", "add", name, url, "--yes"];
        args.extend_from_slice(extra);
        let (_, e) = self.ok(&args);
        assert!(e.contains("Registry key sha256:"), "{e}");
    }

    /// Everything the client has written (config aside): the package store
    /// and the state.
    fn written(&self) -> BTreeMap<String, Vec<u8>> {
        let mut all = BTreeMap::new();
        for d in [self.data_dir(), self.state_dir()] {
            if d.exists() {
                for (k, v) in common::snapshot(&d) {
                    all.insert(format!("{}/{k}", d.display()), v);
                }
            }
        }
        all
    }

    /// Runs a command that must be refused: exit 2, `needle` in the
    /// message, and nothing written.
    fn refused(&self, args: &[&str], needle: &str) -> String {
        let before = self.written();
        let e = self.fails(args, 2);
        assert!(e.contains(needle), "expected {needle:?} in:\n{e}");
        let last = e.lines().last().unwrap_or_default();
        assert!(last.starts_with("niso: "), "{e}");
        assert_eq!(before, self.written(), "a refused command wrote something");
        e
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join("niso").join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

const V100: &str = "my-app-1.0.0-x86_64.niso";
const V110: &str = "my-app-1.1.0-x86_64.niso";
const V110_ARM: &str = "my-app-1.1.0-aarch64.niso";

fn admin_client(s: &Server) -> Client {
    let c = Client::new();
    c.add("private", &s.url(""), &["--key", ADMIN_KEY]);
    c
}

// ---------------------------------------------------------------------------
// Registries to talk to.

/// A plain static web server over a directory: no niso code on the read path.
struct StaticHost {
    child: Child,
    port: u16,
    root: PathBuf,
}

impl StaticHost {
    fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root).unwrap();
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
            .expect("python3 is needed for the static-host tests");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected http.server banner: {line:?}"));
        Self {
            child,
            port,
            root: root.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves a copy of `tree` from now on (as a mirror being replaced).
    fn serve_copy_of(&self, tree: &Path) {
        copy_tree(tree, &self.root);
    }
}

impl Drop for StaticHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    // By content: a file rewritten at the same size within a second keeps
    // rsync's quick check (size and whole-second time) from seeing it.
    let status = Command::new("rsync")
        .arg("-a")
        .arg("--delete")
        .arg("--checksum")
        .arg(format!("{}/", from.display()))
        .arg(format!("{}/", to.display()))
        .status()
        .expect("rsync is needed for these tests");
    assert!(status.success());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal nginx serving a tree as plain files.
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
             http {{\n  access_log off;\n  etag on;\n  default_type application/octet-stream;\n\
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

/// A registry data directory filled offline with `registry publish`.
fn offline_registry(dir: &Path, name: &str, extra_init: &[&str], archives: &[&str]) -> PathBuf {
    let dd = dir.join(format!("dd-{name}-{}", dir.read_dir().unwrap().count()));
    let mut init = vec!["registry", "init", "--data-dir", p(&dd), "--name", name];
    init.extend_from_slice(extra_init);
    common::niso_ok(&init);
    publish(&dd, archives);
    dd
}

fn publish(dd: &Path, archives: &[&str]) {
    if archives.is_empty() {
        return;
    }
    let paths: Vec<PathBuf> = archives.iter().map(|a| fixture(a)).collect();
    let mut args = vec!["registry", "publish", "--data-dir", p(dd)];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    common::niso_ok(&args);
}

/// Re-signs `tree`'s freshness record after `change`, with the data
/// directory's own key: a record only the key's holder could make.
fn resign_freshness(dd: &Path, tree: &Path, change: impl FnOnce(&mut niso::index::pb::Freshness)) {
    use niso::index::{PublicKey, RepoKey, Signer};
    let key = RepoKey::from_file(&dd.join("keys/repository.pem")).unwrap();
    let bytes = std::fs::read(tree.join("freshness")).unwrap();
    let public: &PublicKey = key.public_key();
    let mut record: niso::index::pb::Freshness =
        niso::index::decode_index(&bytes, public, &read_repo_name(dd), 1 << 24).unwrap();
    change(&mut record);
    let out = niso::index::codec::encode_index_stored(&record, &key).unwrap();
    std::fs::write(tree.join("freshness"), out).unwrap();
}

fn read_repo_name(dd: &Path) -> String {
    let text = std::fs::read_to_string(dd.join("niso-registry.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["name"].as_str().unwrap().to_string()
}

/// A `.niso` archive made here with `niso package`: `name` `version`
/// (x86_64) whose payload is `payload`.
fn make_archive(dir: &Path, name: &str, version: &str, payload: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join(format!("src-{name}-{version}-{}", payload.len()));
    std::fs::create_dir_all(src.join("payload/bin")).unwrap();
    std::fs::write(
        src.join("niso.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"x86_64\"\n\
             description = \"Made by the client tests\"\n\n[binary]\nentrypoint = \"bin/{name}\"\n"
        ),
    )
    .unwrap();
    let bin = src.join("payload/bin").join(name);
    std::fs::write(&bin, payload).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join(format!("out-{}", payload.len()));
    let text = common::niso_ok(&["package", p(&src), "--out", p(&out)]);
    assert!(text.contains("Packaged"), "{text}");
    out.join(format!("{name}-{version}-x86_64.niso"))
}

/// Bytes gzip cannot shrink much (a linear congruential generator).
fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Registries and login.

#[test]
fn with_no_registry_each_command_says_how_to_add_one() {
    let c = Client::new();
    for args in [
        vec!["pull", "my-app"],
        vec!["push", p(&fixture(V100))],
        vec!["search", "app"],
        vec!["tag", "my-app:1.0.0", "my-app:stable"],
        vec!["registry", "list-tags", "my-app"],
        vec!["registry", "list-keys"],
    ] {
        let e = c.fails(&args, 2);
        assert!(e.contains("niso registry add NAME URL"), "{args:?}: {e}");
    }
    let (o, e) = c.ok(&["registry", "list"]);
    assert_eq!(o, "");
    assert!(e.contains("niso registry add NAME URL"), "{e}");
}

#[test]
fn registry_add_pins_the_key_it_shows_and_list_prints_the_manual_table() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = Client::new();
    let served_key = s.tree().join("public_key");
    let fingerprint = niso::index::PublicKey::from_file(&served_key)
        .unwrap()
        .fingerprint();

    // Without a terminal to confirm on and without --yes: refused, nothing kept.
    let e = c.refused(&["registry", "add", "private", &s.url("")], "--yes");
    assert!(e.contains(&format!("sha256:{fingerprint}")), "{e}");
    assert!(!c.config_file().exists());

    // The wrong --public-key is refused when adding: the tree does not verify.
    let other = tmp.path().join("other");
    common::niso_ok(&[
        "registry",
        "init",
        "--data-dir",
        p(&other),
        "--name",
        "acme",
    ]);
    let e = c.refused(
        &[
            "registry",
            "add",
            "private",
            &s.url(""),
            "--public-key",
            p(&other.join("public/public_key")),
        ],
        "not signed by the key",
    );
    assert!(
        e.contains("check the key with the registry's operator"),
        "{e}"
    );
    // So is a repository name the tree does not carry.
    c.refused(
        &[
            "registry",
            "add",
            "private",
            &s.url(""),
            "--yes",
            "--repository",
            "other",
        ],
        "serves repository acme, not other",
    );
    assert!(!c.config_file().exists());

    // With --yes the fetched key is pinned; with --public-key the file's.
    let (_, e) = c.ok(&[
        "registry",
        "add",
        "private",
        &s.url("/"),
        "--key",
        ADMIN_KEY,
        "--yes",
    ]);
    assert!(
        e.contains(&format!("Registry key sha256:{fingerprint}")),
        "{e}"
    );
    assert!(e.contains("Added registry private"), "{e}");
    c.ok(&[
        "registry",
        "add",
        "mirror",
        &s.url(""),
        "--public-key",
        p(&served_key),
    ]);

    let (o, _) = c.ok(&["registry", "list"]);
    let url = s.url("");
    let w = url.len();
    assert_eq!(
        o,
        format!(
            "NAME     {:<w$}  DEFAULT\nmirror   {url:<w$}  no\nprivate  {url:<w$}  yes\n",
            "URL"
        )
    );
    // --json: one line per registry; the API key never appears anywhere.
    let (o, _) = c.ok(&["registry", "list", "--json"]);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["type"], "registry");
    assert_eq!(lines[1]["name"], "private");
    assert_eq!(lines[1]["repository"], "acme");
    assert_eq!(lines[1]["default"], true);
    assert_eq!(lines[1]["api_key"], true);
    assert_eq!(lines[1]["key_fingerprint"], fingerprint.as_str());
    assert!(!o.contains(ADMIN_KEY));

    // The config file holds the key and is readable by the user alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.config_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(c.config_file()).unwrap();
    assert!(text.contains(ADMIN_KEY));
    assert!(text.contains("default = \"private\""));

    // --registry and NISO_REGISTRY choose; `registry remove` forgets.
    c.ok(&["push", p(&fixture(V100)), "--registry", "private"]);
    let (_, e) = c.ok(&["pull", "my-app", "--registry", "mirror"]);
    assert!(e.contains("Pulled my-app 1.0.0 (x86_64)"), "{e}");
    let mut c = c;
    c.env.push(("NISO_REGISTRY".into(), "nowhere".into()));
    let e = c.fails(&["pull", "my-app"], 2);
    assert!(
        e.contains("unknown registry \"nowhere\" (configured: mirror, private)"),
        "{e}"
    );
    c.env.clear();
    c.ok(&["registry", "remove", "mirror"]);
    let (o, _) = c.ok(&["registry", "list"]);
    assert_eq!(o.lines().count(), 2);
}

#[test]
fn login_stores_the_key_adding_the_registry_when_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let mut c = Client::new();
    // A new URL: added under its host name, the key pinned after --yes.
    let (_, e) = c.ok(&["login", &s.url(""), "--key", ADMIN_KEY, "--yes"]);
    let name = s.addr.replace(':', "-");
    assert!(e.contains(&format!("Logged in to {name}")), "{e}");
    assert!(!e.contains(ADMIN_KEY));
    c.ok(&["push", p(&fixture(V100))]);

    // A malformed key is refused without echoing it.
    let e = c.refused(
        &["login", &s.url(""), "--key", "niso_k1_short-secret"],
        "not a niso API key",
    );
    assert!(!e.contains("short-secret"), "{e}");

    // Logging in again replaces the stored key; NISO_KEY overrides it.
    let (_, key) = {
        let (o, _) = c.ok(&[
            "registry",
            "create-key",
            "--scope",
            "push:my-*",
            "--name",
            "ci",
            "--json",
        ]);
        let v = &json_lines(&o)[0];
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    };
    c.ok(&["login", &s.url(""), "--key", &key]);
    let e = c.fails(&["registry", "list-keys"], 2);
    assert!(e.contains("only a key with the admin scope"), "{e}");
    c.env.push(("NISO_KEY".into(), ADMIN_KEY.into()));
    c.ok(&["registry", "list-keys"]);
    // NISO_KEY also feeds `login` itself.
    c.env.push(("NISO_KEY".into(), key.clone()));
    c.ok(&["login", &name]);
    let text = std::fs::read_to_string(c.config_file()).unwrap();
    assert!(text.contains(&key));
}

// ---------------------------------------------------------------------------
// 2. push.

#[test]
fn push_uploads_says_so_and_an_identical_re_push_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    let (o, _) = c.ok(&["push", p(&fixture(V100))]);
    assert_eq!(o, "Uploaded my-app 1.0.0 (x86_64) — 286 B\n");
    // The same bytes again (CI re-running): a success that says so.
    let (o, _) = c.ok(&["push", p(&fixture(V100))]);
    assert_eq!(
        o,
        "my-app 1.0.0 (x86_64) is already published with these exact bytes; nothing to do\n"
    );
    let (o, _) = c.ok(&["push", p(&fixture(V100)), "--json"]);
    let v = &json_lines(&o)[0];
    assert_eq!(v["type"], "pushed");
    assert_eq!(v["already_published"], true);
    assert_eq!(v["size"], 286);
    // Other bytes under a published version: refused, with the next step.
    let other = make_archive(tmp.path(), "my-app", "1.0.0", b"#!/bin/sh\necho other\n");
    let e = c.fails(&["push", p(&other)], 2);
    assert!(
        e.contains("my-app 1.0.0 (x86_64) is already published with other bytes"),
        "{e}"
    );
    assert!(e.contains("bump the version and push again"), "{e}");
    // A Hex tarball too: name and version from its metadata, arch any.
    let (o, _) = c.ok(&["push", p(&fixtures().join("hex/jason-1.4.4.tar"))]);
    assert!(o.starts_with("Uploaded jason 1.4.4 (any) — "), "{o}");
    // Without an API key: refused before anything is sent.
    let anon = Client::new();
    anon.add("private", &s.url(""), &[]);
    let e = anon.fails(&["push", p(&fixture(V110))], 2);
    assert!(e.contains("needs an API key"), "{e}");
    // Not an archive: refused with the archive reader's reason.
    let junk = tmp.path().join("junk.niso");
    std::fs::write(&junk, b"junk").unwrap();
    let e = c.fails(&["push", p(&junk)], 2);
    assert!(e.contains("is not an archive the registry accepts"), "{e}");
    s.assert_tree_verifies();
}

#[test]
fn push_shows_a_progress_bar_for_a_large_file_on_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    let big = make_archive(tmp.path(), "big-app", "1.0.0", &noise(3 << 20));
    // `script` gives the command a terminal, as a person at a shell has.
    let cmd = format!("{} push {}", env!("CARGO_BIN_EXE_niso"), p(&big));
    let template = c.command(&[]);
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env_clear()
        .stdin(Stdio::null());
    for (k, v) in template.get_envs() {
        if let Some(v) = v {
            script.env(k, v);
        }
    }
    // A person's terminal has a TERM; without one it is taken as dumb.
    script.env("TERM", "xterm");
    let out = script
        .output()
        .expect("script (util-linux) is needed for this test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Uploading big-app 1.0.0 (x86_64)"),
        "no progress bar:\n{text}"
    );
    assert!(
        text.contains("Uploaded big-app 1.0.0 (x86_64) — 3."),
        "{text}"
    );
    // Redirected (not a terminal): no bar, only the result.
    let (o, e) = c.ok(&["push", p(&big)]);
    assert!(!e.contains("Uploading"), "{e}");
    assert!(o.contains("already published"), "{o}");
}

/// A TCP proxy that forwards everything, except that it drops the answer to
/// the first POST it sees (the upload lands, the client never hears so).
fn lossy_proxy(upstream: &str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dropped = Arc::new(AtomicUsize::new(0));
    let upstream = upstream.to_string();
    let d = dropped.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                return;
            };
            let dropped = d.clone();
            std::thread::spawn(move || relay(client, server, dropped));
        }
    });
    (format!("http://{addr}"), dropped)
}

fn relay(client: TcpStream, server: TcpStream, dropped: Arc<AtomicUsize>) {
    let post_seen = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let seen = post_seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match c_in.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if buf[..n].starts_with(b"POST ") {
                        seen.store(true, Ordering::SeqCst);
                    }
                    if s_out.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s_in.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                return;
            }
            Ok(n) => {
                if post_seen.load(Ordering::SeqCst) && dropped.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The answer to the first upload: lose it.
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = s_in.shutdown(std::net::Shutdown::Both);
                    return;
                }
                if c_out.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[test]
fn push_retries_a_lost_answer_and_the_retry_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let (url, dropped) = lossy_proxy(&s.addr);
    let c = Client::new();
    c.add("private", &url, &["--key", ADMIN_KEY]);
    let (o, e) = c.ok(&["push", p(&fixture(V100))]);
    assert!(
        dropped.load(Ordering::SeqCst) >= 1,
        "the proxy dropped nothing"
    );
    assert!(e.contains("retrying"), "{e}");
    assert_eq!(o, "Uploaded my-app 1.0.0 (x86_64) — 286 B\n");
    let (_, e) = c.ok(&["pull", "my-app:1.0.0"]);
    assert!(e.contains("Pulled my-app 1.0.0"), "{e}");
    s.assert_tree_verifies();
}

// ---------------------------------------------------------------------------
// 3. pull.

#[test]
fn pull_by_latest_version_tag_and_arch_stores_verified_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    for f in [V100, V110, V110_ARM] {
        c.ok(&["push", p(&fixture(f))]);
    }
    let store = c.store().join("private/my-app");
    // Latest for this machine's arch (x86_64 here, as the fixtures are).
    let arch = std::env::consts::ARCH;
    let (o, e) = c.ok(&["pull", "my-app", "--arch", "x86_64"]);
    let path = store.join("1.1.0").join(V110);
    assert_eq!(o, format!("{}\n", path.display()));
    assert_eq!(e, "Pulled my-app 1.1.0 (x86_64) — 334 B\n");
    assert_eq!(std::fs::read(&path).unwrap(), fixture_bytes(V110));
    if arch == "x86_64" {
        let (o2, _) = c.ok(&["pull", "my-app"]);
        assert_eq!(o, o2);
    }
    // A version, and another arch.
    let (o, _) = c.ok(&["pull", "my-app:1.0.0", "--arch", "x86_64"]);
    assert_eq!(o.trim(), p(&store.join("1.0.0").join(V100)));
    let (o, _) = c.ok(&["pull", "my-app", "--arch", "aarch64"]);
    assert_eq!(std::fs::read(o.trim()).unwrap(), fixture_bytes(V110_ARM));
    // A tag, from the signed index.
    c.ok(&["tag", "my-app:1.0.0", "my-app:stable"]);
    let (o, e) = c.ok(&["pull", "my-app:stable", "--arch", "x86_64", "--json"]);
    let v = &json_lines(&o)[0];
    assert_eq!(v["type"], "pulled");
    assert_eq!(v["version"], "1.0.0");
    assert_eq!(v["path"], p(&store.join("1.0.0").join(V100)));
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(e, "");
    // What is not there: one message each, nothing written.
    c.refused(
        &["pull", "my-app:9.9.9", "--arch", "x86_64"],
        "my-app has no version 9.9.9 (versions: 1.0.0, 1.1.0)",
    );
    c.refused(
        &["pull", "my-app:beta", "--arch", "x86_64"],
        "my-app has no tag beta (tags: stable)",
    );
    c.refused(
        &["pull", "my-app:1.0.0", "--arch", "riscv64"],
        "has no artifact for riscv64 (arches: x86_64)",
    );
    c.refused(
        &["pull", "nope", "--arch", "x86_64"],
        "no package nope in repository acme",
    );
    c.fails(&["pull", "My App"], 2);
    // The state remembers the newest generation it verified.
    let state =
        std::fs::read_to_string(c.state_dir().join("niso/registries/private.toml")).unwrap();
    assert!(state.contains("freshness = "), "{state}");
}

#[test]
fn pull_works_from_nginx_and_from_a_plain_static_host() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let writer = admin_client(&s);
    writer.ok(&["push", p(&fixture(V100))]);
    writer.ok(&["push", p(&fixture(V110))]);
    writer.ok(&["tag", "my-app:1.0.0", "my-app:stable"]);

    let nginx = Nginx::start(&s.tree(), &tmp.path().join("nginx"));
    let copy = StaticHost::start(&tmp.path().join("site"));
    copy.serve_copy_of(&s.tree());
    for (name, url) in [("nginx", nginx.url()), ("static", copy.url())] {
        let c = Client::new();
        c.add(name, &url, &[]);
        let (o, e) = c.ok(&["pull", "my-app:stable", "--arch", "x86_64"]);
        assert!(e.contains("Pulled my-app 1.0.0 (x86_64)"), "{name}: {e}");
        assert_eq!(
            std::fs::read(o.trim()).unwrap(),
            fixture_bytes(V100),
            "{name}"
        );
        let (o, _) = c.ok(&["pull", "my-app", "--arch", "x86_64"]);
        assert!(o.contains("/1.1.0/"), "{name}: {o}");
        let (o, _) = c.ok(&["search", "app"]);
        assert_eq!(o, "my-app  1.1.0  My application\n", "{name}");
        let (o, _) = c.ok(&["registry", "list-tags", "my-app"]);
        assert_eq!(
            o, "TAG     VERSION\nlatest  1.1.0\nstable  1.0.0\n",
            "{name}"
        );
    }
}

/// A static host serving a tree that the test can swap, with a client that
/// has pinned it and pulled from it once.
struct Swappable {
    tmp: tempfile::TempDir,
    dd: PathBuf,
    host: StaticHost,
    c: Client,
}

impl Swappable {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dd = offline_registry(tmp.path(), "acme", &[], &[V100]);
        let host = StaticHost::start(&tmp.path().join("site"));
        host.serve_copy_of(&dd.join("public"));
        let c = Client::new();
        c.add("mirror", &host.url(), &[]);
        let (_, e) = c.ok(&["pull", "my-app:1.0.0", "--arch", "x86_64"]);
        assert!(e.contains("Pulled"), "{e}");
        Self { tmp, dd, host, c }
    }

    fn site(&self) -> &Path {
        &self.host.root
    }

    /// Another registry's tree: `name`, signed with its own key unless
    /// `same_key`.
    fn other_tree(&self, name: &str, same_key: bool) -> PathBuf {
        let key = self.dd.join("keys/repository.pem");
        let extra: Vec<&str> = if same_key {
            vec!["--private-key", p(&key)]
        } else {
            vec![]
        };
        offline_registry(self.tmp.path(), name, &extra, &[V100, V110]).join("public")
    }
}

#[test]
fn pull_refuses_an_archive_that_does_not_match_the_index() {
    let w = Swappable::new();
    common::flip_byte(&w.site().join("archives").join(V100));
    let e = w.c.refused(
        &["pull", "my-app:1.0.0", "--arch", "x86_64"],
        "but the signed index says",
    );
    assert!(e.contains("SHA-256"), "{e}");
    // Longer than the index says: refused after that many bytes.
    let path = w.site().join("archives").join(V100);
    let mut bytes = fixture_bytes(V100);
    bytes.extend_from_slice(b"trailing");
    std::fs::write(&path, bytes).unwrap();
    w.c.refused(
        &["pull", "my-app:1.0.0", "--arch", "x86_64"],
        "larger than the 286 bytes the signed index says",
    );
}

#[test]
fn pull_refuses_a_tampered_or_replayed_index() {
    let w = Swappable::new();
    let old_index = std::fs::read(w.site().join("niso/packages/my-app")).unwrap();
    // A flipped byte.
    common::flip_byte(&w.site().join("niso/packages/my-app"));
    w.c.refused(
        &["pull", "my-app:1.0.0", "--arch", "x86_64"],
        "niso/packages/my-app: its bytes do not match the digest",
    );
    // A validly signed but older index, replayed under a newer record.
    publish(&w.dd, &[V110]);
    w.host.serve_copy_of(&w.dd.join("public"));
    std::fs::write(w.site().join("niso/packages/my-app"), &old_index).unwrap();
    w.c.refused(
        &["pull", "my-app", "--arch", "x86_64"],
        "stale, replayed or tampered",
    );
    // A tampered freshness record.
    w.host.serve_copy_of(&w.dd.join("public"));
    common::flip_byte(&w.site().join("freshness"));
    w.c.refused(&["pull", "my-app", "--arch", "x86_64"], "freshness");
}

#[test]
fn pull_refuses_a_tree_signed_with_another_key() {
    let w = Swappable::new();
    let other = w.other_tree("acme", false);
    w.host.serve_copy_of(&other);
    let e = w.c.refused(
        &["pull", "my-app:1.0.0", "--arch", "x86_64"],
        "the signature does not verify with the key pinned for this registry",
    );
    assert!(e.contains("niso registry add"), "{e}");
}

#[test]
fn pull_refuses_indexes_of_another_repository() {
    let w = Swappable::new();
    // Signed with the pinned key, but for repository "other".
    let other = w.other_tree("other", true);
    w.host.serve_copy_of(&other);
    w.c.refused(
        &["pull", "my-app:1.0.0", "--arch", "x86_64"],
        "index is for repository \"other\", expected \"acme\"",
    );
}

#[test]
fn pull_refuses_a_rolled_back_tree() {
    let w = Swappable::new();
    let old = w.tmp.path().join("old");
    copy_tree(&w.dd.join("public"), &old);
    publish(&w.dd, &[V110]);
    w.host.serve_copy_of(&w.dd.join("public"));
    w.c.ok(&["pull", "my-app", "--arch", "x86_64"]);
    // A mirror goes back to the older (validly signed) tree.
    w.host.serve_copy_of(&old);
    let e =
        w.c.refused(&["pull", "my-app:1.0.0", "--arch", "x86_64"], "a rollback");
    assert!(e.contains("older than generation"), "{e}");
    // --allow-expired does not excuse a rollback.
    w.c.refused(
        &[
            "pull",
            "my-app:1.0.0",
            "--arch",
            "x86_64",
            "--allow-expired",
        ],
        "a rollback",
    );
}

#[test]
fn pull_refuses_an_expired_record_unless_allowed_loudly() {
    let w = Swappable::new();
    resign_freshness(&w.dd, &w.dd.join("public"), |f| {
        f.expires_at = f.issued_at - 1;
    });
    w.host.serve_copy_of(&w.dd.join("public"));
    let e =
        w.c.refused(&["pull", "my-app:1.0.0", "--arch", "x86_64"], "expired at");
    assert!(e.contains("--allow-expired"), "{e}");
    let (o, e) = w.c.ok(&[
        "pull",
        "my-app:1.0.0",
        "--arch",
        "x86_64",
        "--allow-expired",
    ]);
    assert!(e.contains("WARNING"), "{e}");
    assert!(o.contains(V100), "{o}");
}

#[test]
fn organization_packages_are_pulled_with_the_stored_key() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    let (o, _) = c.ok(&["push", p(&fixture(V100)), "--org", "team"]);
    assert!(o.starts_with("Uploaded my-app 1.0.0 (x86_64)"), "{o}");
    c.ok(&["tag", "team/my-app:1.0.0", "team/my-app:stable"]);
    let (o, _) = c.ok(&["pull", "team/my-app:stable", "--arch", "x86_64"]);
    assert_eq!(
        o.trim(),
        p(&c.store().join("private/team/my-app/1.0.0").join(V100))
    );
    let (o, _) = c.ok(&["registry", "list-tags", "team/my-app"]);
    assert!(o.contains("stable  1.0.0"), "{o}");
    // Without a key, the organization's tree is closed.
    let anon = Client::new();
    anon.add("private", &s.url(""), &[]);
    anon.refused(
        &["pull", "team/my-app:1.0.0", "--arch", "x86_64"],
        "wants an API key",
    );
}

#[test]
fn pull_checks_publisher_signatures_when_asked() {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
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
    let stranger = tmp.path().join("stranger.pub");
    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    std::fs::write(
        &stranger,
        other
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap(),
    )
    .unwrap();
    // An admin registers the publisher key for the admin API key.
    use base64::Engine;
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let keys: serde_json::Value = http
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let r = http
        .post(s.url(&format!("/v1/auth/keys/{id}/publisher-key")))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({
            "public_key": base64::engine::general_purpose::STANDARD.encode(sk.verifying_key().as_bytes())
        }))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let (o, _) = c.ok(&["push", p(&fixture(V110)), "--sign", p(&private), "--json"]);
    assert_eq!(json_lines(&o)[0]["signed"], true);
    // A wrong key file for --sign says how to make one.
    let e = c.fails(&["push", p(&fixture(V100)), "--sign", p(&public)], 2);
    assert!(e.contains("openssl genpkey -algorithm ed25519"), "{e}");
    c.ok(&["push", p(&fixture(V100)), "--sign", p(&private)]);

    let (o, _) = c.ok(&[
        "pull",
        "my-app:1.1.0",
        "--arch",
        "x86_64",
        "--require-signature",
        "--publisher-key",
        p(&public),
        "--json",
    ]);
    assert!(json_lines(&o)[0]["publisher_key_id"]
        .as_str()
        .unwrap()
        .starts_with("ed25519:"));
    c.refused(
        &[
            "pull",
            "my-app:1.1.0",
            "--arch",
            "x86_64",
            "--require-signature",
            "--publisher-key",
            p(&stranger),
        ],
        "which is not one of the keys trusted",
    );
    // Without --publisher-key, the keys the registry lists in its signed
    // tree are trusted: the key registered above is there.
    let (o, _) = c.ok(&[
        "pull",
        "my-app:1.1.0",
        "--arch",
        "x86_64",
        "--require-signature",
        "--json",
    ]);
    let id = json_lines(&o)[0]["publisher_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        id.len(),
        "ed25519:".len() + 64,
        "the index names the key in full: {id}"
    );
    let keys = std::fs::read(s.tree().join("publisher-keys")).unwrap();
    let public_key = niso::index::PublicKey::from_file(&s.tree().join("public_key")).unwrap();
    let listed: niso::index::pb::PublisherKeys =
        niso::index::decode_index(&keys, &public_key, "acme", 1 << 20).unwrap();
    assert_eq!(listed.keys.len(), 1);
    assert_eq!(listed.keys[0].id, id);
    assert_eq!(
        listed.keys[0].public_key,
        sk.verifying_key().as_bytes().to_vec()
    );
    // The tree verifies, publisher signatures included.
    s.assert_tree_verifies();
}

#[test]
fn pull_refuses_an_unsigned_archive_when_a_signature_is_required() {
    use ed25519_dalek::pkcs8::EncodePublicKey;
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    c.ok(&["push", p(&fixture(V100))]);
    let public = tmp.path().join("publisher.pub");
    let sk = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    std::fs::write(
        &public,
        sk.verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap(),
    )
    .unwrap();
    c.refused(
        &[
            "pull",
            "my-app:1.0.0",
            "--arch",
            "x86_64",
            "--require-signature",
            "--publisher-key",
            p(&public),
        ],
        "has no publisher signature",
    );
}

// ---------------------------------------------------------------------------
// 4. search, tag, list-tags.

#[test]
fn search_prints_the_manual_table_from_verified_indexes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    c.ok(&["push", p(&fixture(V110))]);
    c.ok(&["push", p(&fixtures().join("hex/jason-1.4.4.tar"))]);
    c.ok(&["push", p(&fixtures().join("hex/decimal-2.1.1.tar"))]);
    let (o, _) = c.ok(&["search", "my"]);
    assert_eq!(o, "my-app  1.1.0  My application\n");
    // Description matches.
    let (o, _) = c.ok(&["search", "fixture"]);
    assert_eq!(
        o,
        "decimal  2.1.1  niso test fixture decimal\njason    1.4.4  niso test fixture jason\n"
    );
    // Exact name first, then names by prefix, then the rest; aligned.
    let (o, _) = c.ok(&["search", "jason"]);
    assert_eq!(o.lines().count(), 1, "{o}");
    let (o, _) = c.ok(&["search", "a"]);
    let names: Vec<&str> = o.lines().map(|l| l.split("  ").next().unwrap()).collect();
    assert_eq!(names, ["decimal", "jason", "my-app"], "{o}");
    let starts: Vec<usize> = o
        .lines()
        .map(|l| l.find(|c: char| c.is_ascii_digit()).unwrap())
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] == w[1]),
        "columns not aligned:\n{o}"
    );
    let (o, _) = c.ok(&["search", "APP", "--json"]);
    let v = &json_lines(&o)[0];
    assert_eq!(v["type"], "package");
    assert_eq!(v["name"], "my-app");
    assert_eq!(v["latest"], "1.1.0");
    assert_eq!(v["description"], "My application");
    // No match: the answer is no (exit 1).
    let e = c.fails(&["search", "postgres"], 1);
    assert!(e.contains("No packages match"), "{e}");
}

#[test]
fn tag_moves_a_channel_and_list_tags_prints_the_manual_table() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    c.ok(&["push", p(&fixture(V100))]);
    c.ok(&["push", p(&fixture(V110))]);
    let (o, _) = c.ok(&["tag", "my-app:1.0.0", "my-app:stable"]);
    assert_eq!(o, "Tagged my-app 1.0.0 as stable\n");
    // `latest` is no tag to set: it always names the newest release, and
    // list-tags shows it so.
    let e = c.fails(&["tag", "my-app:1.1.0", "my-app:latest"], 2);
    assert!(e.contains("reserved"), "{e}");
    let (o, _) = c.ok(&["registry", "list-tags", "my-app"]);
    assert_eq!(o, "TAG     VERSION\nlatest  1.1.0\nstable  1.0.0\n");
    // Moving a tag.
    c.ok(&["tag", "my-app:1.1.0", "my-app:stable"]);
    let (o, _) = c.ok(&["registry", "list-tags", "my-app", "--json"]);
    let tags = json_lines(&o);
    assert_eq!(tags[1]["tag"], "stable");
    assert_eq!(tags[1]["version"], "1.1.0");
    // Mistakes are caught before any request.
    let e = c.fails(&["tag", "my-app:stable", "my-app:beta"], 2);
    assert!(e.contains("name a version to tag"), "{e}");
    let e = c.fails(&["tag", "my-app:1.0.0", "other:beta"], 2);
    assert!(e.contains("name different packages"), "{e}");
    let e = c.fails(&["tag", "my-app:9.0.0", "my-app:beta"], 2);
    assert!(e.contains("9.0.0"), "{e}");
    s.assert_tree_verifies();
}

// ---------------------------------------------------------------------------
// 5. Keys.

#[test]
fn keys_are_created_listed_and_revoked_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = admin_client(&s);
    let (o, e) = c.ok(&[
        "registry",
        "create-key",
        "--scope",
        "push:my-*",
        "--name",
        "ci-deploy",
    ]);
    let key = o.strip_prefix("Created key: ").unwrap().trim().to_string();
    assert!(key.starts_with("niso_k1_") && key.len() == 40, "{o}");
    assert_eq!(
        e,
        "Store this key securely — it cannot be retrieved later.\n"
    );
    // The new key works for what its scope allows.
    let ci = Client::new();
    ci.add("private", &s.url(""), &["--key", &key]);
    ci.ok(&["push", p(&fixture(V100))]);

    let (o, _) = c.ok(&["registry", "list-keys"]);
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines.len(), 3, "{o}");
    let header = lines[0];
    assert!(header.starts_with("ID "), "{o}");
    let cols: Vec<usize> = ["NAME", "SCOPES", "LAST USED"]
        .iter()
        .map(|h| header.find(h).unwrap())
        .collect();
    let ci_row = lines.iter().find(|l| l.contains("ci-deploy")).unwrap();
    assert_eq!(&ci_row[cols[0]..cols[0] + 9], "ci-deploy");
    assert_eq!(&ci_row[cols[1]..cols[1] + 9], "push:my-*");
    let today = &niso::index::json::rfc3339(niso::publish::unix_now())[..10];
    assert_eq!(&ci_row[cols[2]..], today);
    assert!(!o.contains(&key));
    let id = ci_row.split_whitespace().next().unwrap().to_string();

    let (o, _) = c.ok(&["registry", "revoke-key", &id]);
    assert_eq!(o, format!("Revoked key {id}\n"));
    let e = ci.fails(&["push", p(&fixture(V110))], 2);
    assert!(e.contains("niso login"), "{e}");
    let (o, _) = c.ok(&["registry", "list-keys", "--json"]);
    assert!(json_lines(&o)
        .iter()
        .all(|k| k["type"] == "key" && k["id"] != id.as_str()));
    let e = c.fails(&["registry", "revoke-key", "../x"], 2);
    assert!(e.contains("is not a key id"), "{e}");
    let e = c.fails(
        &["registry", "create-key", "--scope", "fly:*", "--name", "x"],
        2,
    );
    assert!(e.contains("fly"), "{e}");
}

#[test]
fn keys_work_offline_on_a_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = Client::new();
    let dd = s.data_dir.clone();
    // No admin key left on the client side: the operator makes one offline.
    let (o, _) = c.ok(&[
        "registry",
        "create-key",
        "--scope",
        "admin",
        "--name",
        "ops",
        "--data-dir",
        p(&dd),
        "--json",
    ]);
    let v = &json_lines(&o)[0];
    assert_eq!(v["type"], "key_created");
    let key = v["key"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    // The running server takes it at once.
    c.add("private", &s.url(""), &["--key", &key]);
    c.ok(&["push", p(&fixture(V100))]);
    let (o, _) = c.ok(&["registry", "list-keys", "--data-dir", p(&dd)]);
    assert!(
        o.lines()
            .any(|l| l.starts_with(&id) && l.contains("ops") && l.contains("admin")),
        "{o}"
    );
    c.ok(&["registry", "revoke-key", &id, "--data-dir", p(&dd), "--yes"]);
    let e = c.fails(&["registry", "list-keys"], 2);
    assert!(e.contains("niso login"), "{e}");
    // Not a data directory: says how to make one.
    let e = c.fails(&["registry", "list-keys", "--data-dir", p(tmp.path())], 2);
    assert!(e.contains("niso registry init"), "{e}");
}

// ---------------------------------------------------------------------------
// 12. CLI fixes.

#[test]
fn serve_logs_without_colour_when_redirected_and_rounds_ms() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_niso"))
        .args(["registry", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("NISO_ADMIN_KEY", ADMIN_KEY)
        .env_remove("NISO_LOG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .find_map(|l| l.strip_prefix("Listening at http://"))
        {
            break a.trim().to_string();
        }
        assert!(Instant::now() < deadline, "serve did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for path in ["/health", "/names", "/v1/packages"] {
        let r = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}{path}"))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\x1b'),
        "escape codes in a redirected log:\n{text}"
    );
    let ms: Vec<&str> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("ms="))
        .collect();
    assert!(!ms.is_empty(), "no request lines:\n{text}");
    for m in ms {
        let decimals = m.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 2, "ms={m} in:\n{text}");
    }
}

#[test]
fn verify_stops_at_the_root_cause_of_a_wrong_key_or_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = offline_registry(tmp.path(), "acme", &[], &[V100, V110, V110_ARM]);
    let other = tmp.path().join("other");
    common::niso_ok(&[
        "registry",
        "init",
        "--data-dir",
        p(&other),
        "--name",
        "acme",
    ]);
    let good_key = dd.join("public/public_key");
    let wrong_key = other.join("public/public_key");
    let run = |key: &Path, name: &str| {
        let out = common::niso(&[
            "registry",
            "verify",
            p(&dd),
            "--public-key",
            p(key),
            "--name",
            name,
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
        texts(&out)
    };
    let (o, e) = run(&wrong_key, "acme");
    assert_eq!(o.lines().count(), 1, "one cause, once:\n{o}");
    assert!(
        o.starts_with("names: the signature does not verify with the key given"),
        "{o}"
    );
    assert!(o.contains("check --public-key"), "{o}");
    assert!(e.contains("Repository acme: 0 packages"), "{e}");
    let (o, _) = run(&good_key, "wrong");
    assert_eq!(o.lines().count(), 1, "{o}");
    assert!(
        o.contains("the tree is repository \"acme\", not \"wrong\": check --name"),
        "{o}"
    );
    // A real problem reads as a place in the tree, not as "acme: …".
    common::flip_byte(&dd.join("public/archives").join(V100));
    let (o, _) = run(&good_key, "acme");
    assert!(o.lines().all(|l| !l.starts_with("acme:")), "{o}");
    assert!(o.contains("my-app 1.0.0 (x86_64)"), "{o}");
    let out = common::niso(&[
        "registry",
        "verify",
        p(&dd),
        "--public-key",
        p(&good_key),
        "--name",
        "acme",
        "--json",
    ]);
    let lines = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(lines[0]["type"], "problem");
    assert_eq!(lines.last().unwrap()["type"], "summary");
}

#[test]
fn package_refuses_an_entrypoint_without_the_executable_bit_and_errors_say_things_once() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("pkg");
    copy_tree(&fixtures().join("src/my-app-1.0.0"), &src);
    let bin = src.join("payload/bin/my-app");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = common::niso(&["package", p(&src), "--out", p(&tmp.path().join("out"))]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("is not executable: run `chmod +x"), "{e}");
    assert!(!tmp.path().join("out").join(V100).exists());
    let out = common::niso(&["package", p(&tmp.path().join("missing"))]);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}

#[test]
fn help_describes_every_flag_the_fixed_commands_had_bare() {
    let help = common::niso_ok(&["registry", "publish", "--help"]);
    let data_dir = help
        .lines()
        .skip_while(|l| !l.contains("--data-dir"))
        .nth(1)
        .unwrap_or("");
    assert!(
        help.contains("The registry's data directory"),
        "{help}\n{data_dir}"
    );
    let help = common::niso_ok(&["registry", "init", "--help"]);
    assert!(!help.contains("printed below"), "{help}");
    assert!(help.contains("public key sha256:"), "{help}");
    for cmd in [
        vec!["push", "--help"],
        vec!["pull", "--help"],
        vec!["search", "--help"],
        vec!["tag", "--help"],
        vec!["login", "--help"],
        vec!["registry", "add", "--help"],
        vec!["registry", "list-keys", "--help"],
    ] {
        let help = common::niso_ok(&cmd);
        assert!(help.contains("$ niso "), "{cmd:?} has no example:\n{help}");
    }
}
