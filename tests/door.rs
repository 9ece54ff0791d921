//! The door end to end: every spelling of a private path, sent byte for
//! byte (a raw TCP client: HTTP libraries normalise paths), against
//! `serve`'s full path, its fast static path, `/v1/auth/check` and real
//! nginx running `nginx.conf.example` as shipped; and nginx compared with
//! serve on every read endpoint.
//!
//! nginx must be installed (scripts/install-test-deps): a missing nginx
//! fails these tests.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One answer, as it came over the wire.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
        })
    }
}

/// Sends `METHOD TARGET HTTP/1.1` with `target` exactly as given.
fn raw(addr: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n").into_bytes();
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.extend_from_slice(format!("Host: {addr}\r\n").as_bytes());
    }
    for (n, v) in headers {
        req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("{method} {target} on {addr}: {e}"));
    parse_reply(&buf, method == "HEAD")
        .unwrap_or_else(|| panic!("{method} {target} on {addr}: bad reply {buf:?}"))
}

fn parse_reply(buf: &[u8], head: bool) -> Option<Reply> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head_text = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head_text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if head {
        body.clear();
    } else if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn get(addr: &str, target: &str, key: Option<&str>) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    raw(addr, "GET", target, &headers, b"")
}

/// nginx running `nginx.conf.example` as shipped, with only its ports and
/// paths changed, in a directory of its own; killed on drop.
struct Nginx {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, tree: &Path, api: &str) -> Self {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        // The listening socket is made here, on a port the OS picks, and
        // handed to nginx (its `NGINX` variable names inherited sockets):
        // no port is guessed, and none can be taken in between.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx.conf.example"),
        )
        .unwrap();
        let mut site = example;
        for (from, to) in [
            ("listen 80;", format!("listen {addr};")),
            ("server 127.0.0.1:5000;", format!("server {api};")),
            (
                "root /var/lib/niso-registry/public;",
                format!("root {};", tree.display()),
            ),
        ] {
            assert_eq!(
                site.matches(from).count(),
                1,
                "nginx.conf.example must have `{from}` once"
            );
            site = site.replace(from, &to);
        }
        std::fs::write(dir.join("niso.conf"), site).unwrap();
        let d = dir.display();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            // Workers would run as nobody, who cannot enter the 0700 temp dir.
            "user root root;\n"
        } else {
            ""
        };
        // A master process: only it takes over an inherited socket.
        let main = format!(
            "daemon off;\nworker_processes 1;\n{user}pid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n\
             \x20 client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20 scgi_temp_path {d}/tmp/scgi;\n  include {d}/niso.conf;\n}}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, main).unwrap();
        let nginx = |args: &[&str]| {
            let mut c = Command::new("nginx");
            c.arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf)
                .args(args);
            c
        };
        let test = nginx(&["-t"]).output().unwrap_or_else(|e| {
            panic!("cannot run nginx ({e}): install it with scripts/install-test-deps")
        });
        assert!(
            test.status.success(),
            "nginx -t refuses the configuration:\n{}",
            text(&test)
        );
        let fd = {
            use std::os::fd::AsRawFd;
            listener.as_raw_fd()
        };
        let mut cmd = nginx(&[]);
        cmd.env("NGINX", format!("{fd};"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: fcntl is async-signal-safe; it only clears
            // close-on-exec on the listening socket, in the child.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start nginx");
        drop(listener);
        let mut n = Nginx { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = n.child.try_wait().unwrap() {
                panic!("nginx exited ({status}):\n{}", n.log());
            }
            // The socket accepts before nginx runs; /health answers once
            // nginx does (through to serve).
            if get(&n.addr, "/health", None).status == 200 {
                return n;
            }
            assert!(Instant::now() < deadline, "nginx not ready:\n{}", n.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its worker too; SIGKILL if it hangs.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory preconditions; pid is our child's.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create_key(s: &Server, name: &str, scopes: &[&str]) -> String {
    let body = json!({ "name": name, "scopes": scopes }).to_string();
    let r = raw(
        &s.addr,
        "POST",
        "/v1/auth/keys",
        &[
            ("Authorization", &format!("Bearer {}", s.admin)),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["key"].as_str().unwrap().to_string()
}

fn upload(addr: &str, key: &str, path: &str, file: &Path) {
    let r = raw(
        addr,
        "POST",
        path,
        &[
            ("Authorization", &format!("Bearer {key}")),
            ("Content-Type", "application/octet-stream"),
        ],
        &std::fs::read(file).unwrap(),
    );
    assert_eq!(
        r.status,
        201,
        "upload {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

/// The registry both tests use: in the root repository and in organization
/// `team`, jason 1.4.4 (a Hex tarball) and my-app 1.0.0 and 1.1.0 for
/// x86_64 (.niso), uploaded through `via` (serve itself, or nginx).
fn publish_fixtures(via: &str, admin: &str) {
    let hex = fixtures().join("hex");
    let niso = fixtures().join("niso");
    for prefix in ["", "/repos/team"] {
        upload(
            via,
            admin,
            &format!("{prefix}/v1/packages/jason/1.4.4/any"),
            &hex.join("jason-1.4.4.tar"),
        );
        for v in ["1.0.0", "1.1.0"] {
            upload(
                via,
                admin,
                &format!("{prefix}/v1/packages/my-app/{v}/x86_64"),
                &niso.join(format!("my-app-{v}-x86_64.niso")),
            );
        }
    }
}

/// The ways to spell `/repos/team/FILE` (`f` is FILE) that a client might
/// send. Some name the file, some another path, some are refused.
fn spellings(f: &str) -> Vec<String> {
    let p = format!("/repos/team/{f}");
    let mut v = vec![
        p.clone(),
        format!("/%72epos/team/{f}"),
        format!("/%72%65%70%6F%73/%74%65%61%6d/{f}"),
        format!("/repos/t%65am/{f}"),
        format!("/%2572epos/team/{f}"),
        format!("//repos/team/{f}"),
        format!("///repos///team///{f}"),
        format!("/repos//team/{f}"),
        format!("/repos/team//{f}"),
        format!("/./repos/team/{f}"),
        format!("/repos/./team/./{f}"),
        format!("/x/../repos/team/{f}"),
        format!("/tarballs/../repos/team/{f}"),
        format!("/repos/other/../team/{f}"),
        format!("/repos/team/x/../{f}"),
        format!("/%2e/repos/team/{f}"),
        format!("/x/%2e%2e/repos/team/{f}"),
        format!("/x/%2E%2E/repos/team/{f}"),
        format!("/x/.%2e/repos/team/{f}"),
        format!("/repos/team/%2e%2e/team/{f}"),
        format!("/repos%2fteam/{f}"),
        format!("/repos%2Fteam/{f}"),
        format!("/%2Frepos/team/{f}"),
        format!("/repos%5cteam/{f}"),
        format!("/repos\\team/{f}"),
        format!("{p}/"),
        format!("{p}/."),
        format!("{p}//"),
        format!("{p}/x/.."),
        format!("{p};x"),
        format!("{p};/"),
        format!("{p}?x=1"),
        format!("{p}?"),
        format!("{p}#frag"),
        format!("{p}%3Fx"),
        format!("{p}%23"),
        format!("{p}%00"),
        format!("{p}%20"),
        format!("{p}%0d%0aX-Injected:%201"),
        format!("{p}%2f"),
        format!("{p}%"),
        format!("/REPOS/team/{f}"),
        format!("/Repos/team/{f}"),
        format!("/repos/TEAM/{f}"),
        format!("/repos/team/%c0%ae%c0%ae/team/{f}"),
    ];
    // Another package's path climbing back to this one.
    if let Some(rest) = f.strip_prefix("packages/") {
        v.push(format!("/repos/team/packages/other/../{rest}"));
    }
    v
}

/// Private files of `team`, and what serve answers for them with a key
/// that may read them.
const PRIVATE: &[&str] = &[
    "names",
    "packages/jason",
    "niso/packages/my-app",
    "tarballs/jason-1.4.4.tar",
    "archives/my-app-1.1.0-x86_64.niso",
    "v1/packages",
    "v1/packages/jason/versions",
    "v1/packages/my-app/latest/x86_64",
];

fn private_bytes(tree: &Path, f: &str) -> Vec<u8> {
    let rel = if f == "v1/packages" {
        "v1/packages/index.json"
    } else {
        f
    };
    std::fs::read(tree.join("repos/team").join(rel)).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_spelling_of_a_private_path_reads_it_without_the_scope() {
    let tmp = tempfile::tempdir().unwrap();
    // The full path (rate limits on, as by default), behind nginx too.
    let full = Server::start_on(
        &tmp.path().join("full"),
        &[
            "--trust-proxy",
            "--rate-limit-ip",
            "100000",
            "--rate-limit-key",
            "100000",
        ],
    );
    // The fast static path (no rate limits).
    let fast = Server::start_on(
        &tmp.path().join("fast"),
        &["--rate-limit-ip", "0", "--rate-limit-key", "0"],
    );
    publish_fixtures(&full.addr, &full.admin);
    publish_fixtures(&fast.addr, &fast.admin);
    let nginx = Nginx::start(tmp.path(), &full.tree(), &full.addr);
    let keys = |s: &Server| {
        (
            create_key(s, "narrow", &["pull:team/other-*", "pull:*"]),
            create_key(s, "all", &["pull:team/*"]),
        )
    };
    let (full_narrow, full_all) = keys(&full);
    let (fast_narrow, fast_all) = keys(&fast);

    let mut leaks = Vec::new();
    let mut checked = 0;
    for f in PRIVATE {
        // Each registry signs with its own key: its own bytes are secret.
        let full_secret = private_bytes(&full.tree(), f);
        let fast_secret = private_bytes(&fast.tree(), f);
        let spelled = spellings(f);
        assert!(spelled.len() >= 30);
        for path in &spelled {
            let targets: [(&str, &str, &str, &str, &[u8]); 3] = [
                ("serve", &full.addr, &full_narrow, &full_all, &full_secret),
                (
                    "serve fast path",
                    &fast.addr,
                    &fast_narrow,
                    &fast_all,
                    &fast_secret,
                ),
                ("nginx", &nginx.addr, &full_narrow, &full_all, &full_secret),
            ];
            let mut with_scope = Vec::new();
            for (name, addr, narrow, all, secret) in targets {
                for (who, key) in [("no key", None), ("narrow key", Some(narrow))] {
                    let r = get(addr, path, key);
                    checked += 1;
                    assert!(r.status < 500, "{name}, {who}: {path} answers {}", r.status);
                    if (200..300).contains(&r.status) || contains(&r.body, secret) {
                        leaks.push(format!("{name}, {who}: {path} -> {}", r.status));
                    }
                }
                let r = get(addr, path, Some(all));
                assert!(r.status < 500, "{name}, all: {path} answers {}", r.status);
                with_scope.push((name, r.status, r.body == secret));
            }
            // One door: every server answers a spelling the same way.
            let first = with_scope[0];
            for other in &with_scope[1..] {
                assert_eq!(
                    (first.1, first.2),
                    (other.1, other.2),
                    "{path} with pull:team/*: {} and {} differ",
                    first.0,
                    other.0
                );
            }
            // The check nginx asks, given the path itself.
            for (who, key) in [("no key", None), ("narrow key", Some(&full_narrow))] {
                let auth = key.map(|k| format!("Bearer {k}"));
                let mut headers = vec![("X-Original-URI", path.as_str())];
                if let Some(a) = &auth {
                    headers.push(("Authorization", a));
                }
                let r = raw(&full.addr, "GET", "/v1/auth/check", &headers, b"");
                checked += 1;
                if r.status == 200 {
                    leaks.push(format!("/v1/auth/check, {who}: {path} -> 200"));
                }
            }
        }
        // The spelling everyone writes reads the file with the scope.
        for (addr, key, secret) in [
            (&full.addr, &full_all, &full_secret),
            (&fast.addr, &fast_all, &fast_secret),
            (&nginx.addr, &full_all, &full_secret),
        ] {
            let r = get(addr, &format!("/repos/team/{f}"), Some(key));
            assert_eq!((r.status, &r.body == secret), (200, true), "{f} via {addr}");
        }
    }
    assert!(
        leaks.is_empty(),
        "{} of {checked} reads got private bytes:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// What to compare of two answers to one read: status, body (its length,
/// SHA-256 and start, so a difference prints legibly) and the headers a
/// client acts on.
fn comparable(r: &Reply) -> (u16, usize, String, String, [Option<String>; 4]) {
    use sha2::Digest;
    let h = |n: &str| r.header(n).map(str::to_string);
    (
        r.status,
        r.body.len(),
        hex::encode(sha2::Sha256::digest(&r.body)),
        String::from_utf8_lossy(&r.body[..r.body.len().min(120)]).into_owned(),
        [
            h("content-type"),
            h("content-disposition"),
            h("cache-control"),
            h("access-control-allow-origin"),
        ],
    )
}

#[test]
fn nginx_answers_every_read_as_serve_does() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--trust-proxy"]);
    let nginx = Nginx::start(tmp.path(), &s.tree(), &s.addr);
    // Uploads and tags go through nginx too.
    publish_fixtures(&nginx.addr, &s.admin);
    let tag = raw(
        &nginx.addr,
        "POST",
        "/repos/team/v1/packages/jason/tags",
        &[
            ("Authorization", &format!("Bearer {}", s.admin)),
            ("Content-Type", "application/json"),
        ],
        br#"{"tag": "stable", "version": "1.4.4"}"#,
    );
    assert_eq!(tag.status, 200, "{}", String::from_utf8_lossy(&tag.body));
    let narrow = create_key(&s, "narrow", &["pull:team/my-*"]);
    let whole = create_key(&s, "whole", &["pull:team/*"]);
    let bin = std::fs::read_dir(s.tree().join("repos/team/freshness-bins"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();

    let reads = [
        "names".to_string(),
        "versions".into(),
        "public_key".into(),
        "freshness".into(),
        format!("freshness-bins/{bin}"),
        "packages/jason".into(),
        "niso/packages/my-app".into(),
        "packages/nope".into(),
        "tarballs/jason-1.4.4.tar".into(),
        "tarballs/nope-1.0.0.tar".into(),
        "archives/my-app-1.1.0-x86_64.niso".into(),
        "archives/nope-1.0.0-x86_64.niso".into(),
        "v1/packages".into(),
        "v1/packages/index.json".into(),
        "v1/packages?page=1&per_page=1".into(),
        "v1/packages?sort_by=name&order=desc".into(),
        "v1/packages?per_page=0".into(),
        "v1/packages/my-app/versions".into(),
        "v1/packages/my-app/versions?page=2&per_page=1".into(),
        "v1/packages/jason/versions".into(),
        "v1/packages/jason/tags".into(),
        "v1/packages/my-app/1.1.0/manifest".into(),
        "v1/packages/my-app/1.1.0/x86_64".into(),
        "v1/packages/my-app/latest/x86_64".into(),
        "v1/packages/my-app/latest/aarch64".into(),
        "v1/packages/my-app/9.9.9/x86_64".into(),
        "v1/packages/jason/1.4.4/any".into(),
        "v1/packages/jason/latest/any".into(),
        "v1/packages/nope/latest/x86_64".into(),
        "v1/packages/nope/versions".into(),
        "v1/search?q=my".into(),
        "v1/search?q=a&per_page=1".into(),
        "v1/search?q=".into(),
        "no/such/file".into(),
        "packages/".into(),
        // Wrong names and parameters: the same message both ways.
        "packages/Jason".into(),
        "v1/packages/My-App/versions".into(),
        "v1/packages/jason/stable/any".into(),
        "repos/Team/names".into(),
        "v1/packages?page=-1".into(),
        "v1/packages/jason/versions?per_page=1&per_page=2".into(),
    ];
    let mut compared = 0;
    for prefix in ["", "/repos/team"] {
        let callers: &[(&str, Option<&str>)] = if prefix.is_empty() {
            &[("no key", None), ("admin", Some(ADMIN_KEY))]
        } else {
            &[
                ("no key", None),
                ("pull:team/my-*", Some(&narrow)),
                ("pull:team/*", Some(&whole)),
            ]
        };
        for read in &reads {
            let path = format!("{prefix}/{read}");
            for (who, key) in callers {
                for method in ["GET", "HEAD"] {
                    let auth = key.map(|k| format!("Bearer {k}"));
                    let headers: Vec<(&str, &str)> = auth
                        .as_deref()
                        .map(|a| vec![("Authorization", a)])
                        .unwrap_or_default();
                    let direct = raw(&s.addr, method, &path, &headers, b"");
                    let proxied = raw(&nginx.addr, method, &path, &headers, b"");
                    assert!(
                        proxied.status < 500 && direct.status < 500,
                        "{method} {path} ({who}): {} direct, {} through nginx",
                        direct.status,
                        proxied.status
                    );
                    assert_eq!(
                        comparable(&direct),
                        comparable(&proxied),
                        "{method} {path} ({who}): serve, then nginx"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 300, "{compared}");
    for p in ["/health", "/v1/auth/keys"] {
        assert_eq!(
            comparable(&get(&s.addr, p, None)),
            comparable(&get(&nginx.addr, p, None)),
            "{p}"
        );
    }

    // What the comparison stands on, through nginx.
    let n = |path: &str, key: Option<&str>| get(&nginx.addr, path, key);
    for prefix in ["", "/repos/team"] {
        let key = (!prefix.is_empty()).then_some(whole.as_str());
        let r = n(&format!("{prefix}/v1/packages/my-app/latest/x86_64"), key);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-disposition"),
            Some("attachment; filename=\"my-app-1.1.0-x86_64.niso\"")
        );
        let r = n(&format!("{prefix}/v1/packages/jason/1.4.4/any"), key);
        assert_eq!(
            r.header("content-disposition"),
            Some("attachment; filename=\"jason-1.4.4.tar\"")
        );
        let r = n(&format!("{prefix}/v1/packages/nope/1.0.0/x86_64"), key);
        assert_eq!((r.status, r.header("content-disposition")), (404, None));
        let r = n(&format!("{prefix}/tarballs/nope-1.0.0.tar"), key);
        assert_eq!((r.status, r.header("cache-control")), (404, None));
        let r = n(&format!("{prefix}/public_key"), key);
        assert_eq!(r.header("content-type"), Some("application/x-pem-file"));
        let r = n(&format!("{prefix}/v1/packages/jason/tags"), key);
        assert_eq!(r.header("content-type"), Some("application/json"));
        // Only the organization's jason was tagged.
        let tagged = (!prefix.is_empty()).then_some("stable");
        assert_eq!(r.json()["tags"][0]["tag"].as_str(), tagged);
        let r = n(&format!("{prefix}/v1/search?q=my"), key);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["results"][0]["name"], "my-app");
        // Pagination links are relative: a caller's Host is not echoed,
        // and the port survives the proxy.
        let mut headers = vec![("Host", "evil.example")];
        let auth = key.map(|k| format!("Bearer {k}"));
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let r = raw(
            &nginx.addr,
            "GET",
            &format!("{prefix}/v1/packages?page=1&per_page=1"),
            &headers,
            b"",
        );
        assert_eq!(
            r.json()["pagination"]["next"],
            format!("{prefix}/v1/packages?page=2&per_page=1")
        );
    }
    // Organization answers are private; root ones public.
    let r = n("/repos/team/tarballs/jason-1.4.4.tar", Some(&whole));
    assert_eq!(
        r.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    let r = n("/repos/team/niso/packages/my-app", Some(&narrow));
    assert_eq!(
        (r.status, r.header("cache-control")),
        (200, Some("private, no-cache"))
    );
    let r = n("/repos/team/v1/packages?page=1", Some(&whole));
    assert_eq!(r.header("cache-control"), Some("private, no-cache"));
    assert_eq!(
        n("/names", None).header("cache-control"),
        Some("public, no-cache")
    );
    // A key for some packages reads them, not the organization's lists.
    for (path, status) in [
        ("/repos/team/niso/packages/my-app", 200),
        ("/repos/team/v1/packages/my-app/versions", 200),
        ("/repos/team/public_key", 200),
        ("/repos/team/packages/jason", 403),
        ("/repos/team/names", 403),
        ("/repos/team/versions", 403),
        ("/repos/team/v1/packages", 403),
        ("/repos/team/v1/packages/index.json", 403),
        ("/repos/team/v1/packages?page=1", 403),
        ("/repos/team/v1/search?q=a", 403),
        (&format!("/repos/team/freshness-bins/{bin}"), 403),
    ] {
        for addr in [&s.addr, &nginx.addr] {
            let r = get(addr, path, Some(&narrow));
            assert_eq!(r.status, status, "{path} via {addr}");
            if status == 403 {
                assert!(r.json()["error"].as_str().unwrap().contains("team"));
            }
        }
    }
    s.assert_tree_verifies();
}

#[test]
fn the_checks_rate_limit_is_the_callers_and_reaches_the_caller() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--trust-proxy", "--rate-limit-ip", "10"]);
    let hex = fixtures().join("hex");
    upload(
        &s.addr,
        &s.admin,
        "/repos/team/v1/packages/jason/1.4.4/any",
        &hex.join("jason-1.4.4.tar"),
    );
    let nginx = Nginx::start(tmp.path(), &s.tree(), &s.addr);
    // Each read claims another X-Forwarded-For: the check must still count
    // them all against the one address nginx saw, and its 429 must reach
    // the caller as a 429 (auth_request alone would make it a 500).
    let mut statuses = Vec::new();
    for i in 0..40 {
        let forwarded = format!("10.0.0.{i}");
        let r = raw(
            &nginx.addr,
            "GET",
            "/repos/team/packages/jason",
            &[("X-Forwarded-For", &forwarded)],
            b"",
        );
        statuses.push(r.status);
        assert!(r.status == 401 || r.status == 429, "{statuses:?}");
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
            assert_eq!(r.json()["status"], 429);
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&401), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
}

#[test]
fn writes_are_routed_by_the_path_the_door_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let team = create_key(&s, "team-ci", &["push:team/*", "delete:team/*"]);
    let auth = format!("Bearer {team}");
    let body = std::fs::read(fixtures().join("hex/jason-1.4.4.tar")).unwrap();
    let send = |method: &str, path: &str, body: &[u8]| {
        raw(
            &s.addr,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/octet-stream"),
            ],
            body,
        )
    };
    // Refused spellings change nothing, whatever the method.
    let before = snapshot(&s.tree());
    for path in [
        "/repos%2Fteam/v1/packages/jason/1.4.4/any",
        "/repos/team/v1/packages/ja%00son/1.4.4/any",
        "/../repos/team/v1/packages/jason/1.4.4/any",
        "/repos/team/v1/packages/jason;x/1.4.4/any",
    ] {
        let r = send("POST", path, &body);
        assert_eq!(r.status, 400, "{path}");
        assert!(r.json()["error"].as_str().unwrap().contains("request path"));
    }
    assert_eq!(before, snapshot(&s.tree()));
    // Another spelling of a route is that route, for its parameters too.
    let r = send(
        "POST",
        "/x/../repos/t%65am/./v1/packages/jason/1.4.4/any",
        &body,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(s
        .tree()
        .join("repos/team/tarballs/jason-1.4.4.tar")
        .is_file());
    let r = send("DELETE", "//repos/team/v1/packages/%6Aason/1.4.4/any", b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!s
        .tree()
        .join("repos/team/v1/packages/jason/1.4.4/any")
        .exists());
    s.assert_tree_verifies();
}

#[test]
fn no_scope_crosses_into_every_organization_or_lists_one_it_only_partly_covers() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    for scope in ["pull:**", "push:**", "pull:team/**"] {
        let r = raw(
            &s.addr,
            "POST",
            "/v1/auth/keys",
            &[
                ("Authorization", &format!("Bearer {}", s.admin)),
                ("Content-Type", "application/json"),
            ],
            json!({ "name": "wide", "scopes": [scope] })
                .to_string()
                .as_bytes(),
        );
        assert_eq!(r.status, 400, "{scope}");
        assert!(r.json()["error"].as_str().unwrap().contains("'**'"));
    }
    publish_fixtures(&s.addr, &s.admin);
    let web = create_key(&s, "web", &["pull:team/my-*"]);
    for (path, status) in [
        ("/repos/team/niso/packages/my-app", 200),
        ("/repos/team/v1/packages/my-app/latest/x86_64", 200),
        ("/repos/team/public_key", 200),
        ("/repos/team/packages/jason", 403),
        ("/repos/team/names", 403),
        ("/repos/team/versions", 403),
        ("/repos/team/v1/packages", 403),
        ("/repos/team/v1/packages/index.json", 403),
        ("/repos/team/v1/packages?page=1&per_page=5", 403),
        ("/repos/team/v1/search?q=a", 403),
    ] {
        let r = get(&s.addr, path, Some(&web));
        assert_eq!(r.status, status, "{path}");
        if status == 403 && !path.contains("jason") {
            // No other package's name leaks into the refusal.
            let text = String::from_utf8_lossy(&r.body);
            assert!(!text.contains("jason"), "{path}: {text}");
        }
    }
}
