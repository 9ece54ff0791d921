//! Hostile and careless clients against the built server (issue 16, items
//! 6, 8 and 9): slow headers, slow uploads, floods of connections under a
//! low descriptor limit, key guessing, the health check, locking oneself out,
//! and who may register publisher keys.
//!
//! The server binary is `NISO_TEST_BIN` when set (to run these tests against
//! an older build and watch them fail), else the one cargo built.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{fixtures, snapshot, Server, ADMIN_KEY};
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn niso_bin() -> PathBuf {
    std::env::var_os("NISO_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_niso")))
}

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(dir).join(name)).unwrap()
}

/// How to start a server: a command in front (`prlimit …`), the admin key
/// in the environment, and extra flags.
struct Start<'a> {
    prefix: &'a [&'a str],
    admin_key: Option<&'a str>,
    extra: &'a [&'a str],
}

impl Default for Start<'_> {
    fn default() -> Self {
        Self {
            prefix: &[],
            admin_key: Some(ADMIN_KEY),
            extra: &[],
        }
    }
}

/// Starts `niso registry serve` on `data_dir`; also returns what it printed
/// on stderr before it listened.
fn start(data_dir: &Path, how: Start) -> (Server, Vec<String>) {
    use std::io::BufRead;
    let mut cmd = match how.prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(niso_bin());
            c
        }
        None => Command::new(niso_bin()),
    };
    cmd.args(["registry", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--name", "acme"])
        .args(how.extra)
        .env_remove("NISO_ADMIN_KEY")
        .env("NISO_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(k) = how.admin_key {
        cmd.env("NISO_ADMIN_KEY", k);
    }
    let mut child = cmd.spawn().expect("start niso registry serve");
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
                panic!("server exited before listening:\n{}", seen.join("\n"));
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let server = Server {
        child,
        addr,
        data_dir: data_dir.to_path_buf(),
        admin: ADMIN_KEY.to_string(),
    };
    (server, seen)
}

fn start_default(dir: &Path, extra: &[&str]) -> Server {
    start(
        &dir.join("data"),
        Start {
            extra,
            ..Start::default()
        },
    )
    .0
}

/// Asserts the JSON error envelope and returns its message.
fn error_of(r: Response, status: StatusCode) -> String {
    assert_eq!(r.status(), status);
    let v: Value = r.json().unwrap();
    assert_eq!(v["status"], status.as_u16(), "{v}");
    v["error"].as_str().expect("error message").to_string()
}

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(&s.addr).unwrap();
    c.set_nodelay(true).unwrap();
    c
}

/// Reads until the server closes the connection or a whole response (head
/// and Content-Length body) has arrived, for at most `limit`. `None` when
/// nothing at all came.
fn read_response(c: &mut TcpStream, limit: Duration) -> Option<String> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if response_complete(&got) {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

fn response_complete(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}

/// Whether the server has closed `c` (EOF or reset) within `limit`.
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A GET /health on a new connection, answered within `limit`.
fn health_within(s: &Server, limit: Duration) -> Option<String> {
    let mut c = connect(s);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    read_response(&mut c, limit)
}

fn staging_is_empty(s: &Server) -> bool {
    std::fs::read_dir(s.data_dir.join("staging"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

// ---------------------------------------------------------------- item 6

#[test]
fn a_client_slow_to_send_its_headers_is_closed_after_the_header_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(tmp.path(), &["--header-timeout", "1"]);
    let mut c = connect(&s);
    let began = Instant::now();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    // One header byte every 100 ms: always some progress, never a whole head.
    let mut closed = false;
    for _ in 0..40 {
        if c.write_all(b"X").is_err() || closed_within(&mut c, Duration::from_millis(100)) {
            closed = true;
            break;
        }
    }
    let took = began.elapsed();
    assert!(
        closed,
        "a slow-header client is still connected after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}, expected about 1 s"
    );

    // The same timeout closes a keep-alive connection left idle.
    let mut c = connect(&s);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = read_response(&mut c, Duration::from_secs(2)).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let began = Instant::now();
    assert!(closed_within(&mut c, Duration::from_secs(4)));
    assert!(began.elapsed() >= Duration::from_millis(800));
}

#[test]
fn a_flood_of_slow_connections_under_a_low_descriptor_limit_does_not_starve_health() {
    let tmp = tempfile::tempdir().unwrap();
    // 128 descriptors: the default cap is then 32 connections. The header
    // timeout is left at its default (20 s), so what keeps /health prompt is
    // the cap and the eviction of idle connections, not the timeout.
    let (s, _) = start(
        &tmp.path().join("data"),
        Start {
            prefix: &["prlimit", "--nofile=128:128"],
            ..Start::default()
        },
    );
    let mut slow: Vec<TcpStream> = (0..150)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            c
        })
        .collect();
    for round in 0..3 {
        let began = Instant::now();
        let answer = health_within(&s, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("/health did not answer in 3 s (round {round})"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(r#"{"status":"ok"}"#), "{answer}");
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "/health took {:?}",
            began.elapsed()
        );
        // The attackers keep trickling.
        for c in &mut slow {
            let _ = c.write_all(b"a");
        }
    }
    // The server still works for a whole request with a key.
    let r = client()
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn a_connection_in_the_middle_of_an_upload_is_never_closed_to_make_room() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(tmp.path(), &["--max-connections", "2"]);
    let body = fixture("niso", "my-app-1.0.0-x86_64.niso");
    let mut up = connect(&s);
    write!(
        up,
        "POST /v1/packages/my-app/1.0.0/x86_64 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        s.admin,
        body.len()
    )
    .unwrap();
    let half = body.len() / 2;
    up.write_all(&body[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Idle connections come and go through the one free slot.
    let _idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    let answer = health_within(&s, Duration::from_secs(3)).expect("/health answers");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    up.write_all(&body[half..]).unwrap();
    let answer = read_response(&mut up, Duration::from_secs(5)).expect("upload answered");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

#[test]
fn a_client_that_stops_reading_a_download_is_closed_after_the_send_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(tmp.path(), &["--send-timeout", "1"]);
    // Larger than what the loopback's socket buffers hold.
    let size = 48 << 20;
    // A file where the door serves archives (it serves no other names).
    std::fs::create_dir_all(s.tree().join("tarballs")).unwrap();
    std::fs::write(s.tree().join("tarballs/big-1.0.0.tar"), vec![7u8; size]).unwrap();
    let mut c = connect(&s);
    c.write_all(b"GET /tarballs/big-1.0.0.tar HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // Read nothing while the send timeout passes, then everything there is.
    std::thread::sleep(Duration::from_secs(3));
    let began = Instant::now();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let closed = loop {
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => received += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false
            }
            Err(_) => break true,
        }
        assert!(began.elapsed() < Duration::from_secs(20), "still reading");
    };
    assert!(
        closed,
        "the connection is still open after {received} bytes"
    );
    assert!(
        received < size,
        "the whole file came ({received} bytes): the server waited for the reader"
    );
}

/// Sends an upload's head and first bytes, then trickles 10 bytes every
/// `every`; returns the answer and how long it took to come.
fn trickle_upload(s: &Server, every: Duration) -> (String, Duration) {
    let mut c = connect(s);
    write!(
        c,
        "POST /v1/packages/my-app/1.0.0/x86_64 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100000\r\n\r\n",
        s.admin
    )
    .unwrap();
    let began = Instant::now();
    c.write_all(&[0u8; 100]).unwrap();
    while began.elapsed() < Duration::from_secs(6) {
        if let Some(answer) = read_response(&mut c, every) {
            return (answer, began.elapsed());
        }
        if c.write_all(&[0u8; 10]).is_err() {
            break;
        }
    }
    let answer = read_response(&mut c, Duration::from_millis(500)).unwrap_or_default();
    (answer, began.elapsed())
}

#[test]
fn an_upload_slower_than_the_minimum_rate_gets_408_and_publishes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(
        tmp.path(),
        &["--upload-min-rate", "1000", "--upload-rate-window", "1"],
    );
    let before = snapshot(&s.tree());
    // 10 bytes every 200 ms: 50 bytes a second, never idle.
    let (answer, took) = trickle_upload(&s, Duration::from_millis(200));
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {took:?}: {answer:?}"
    );
    assert!(answer.contains("upload too slow"), "{answer}");
    assert!(answer.contains(r#""status":408"#), "{answer}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(snapshot(&s.tree()), before, "the tree changed");
    assert!(staging_is_empty(&s), "the staged upload was left behind");
    // A normal upload still goes through.
    let r = client()
        .post(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .bearer_auth(&s.admin)
        .body(fixture("niso", "my-app-1.0.0-x86_64.niso"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[test]
fn an_upload_past_its_deadline_gets_408_and_publishes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(
        tmp.path(),
        &["--upload-timeout", "1", "--upload-min-rate", "0"],
    );
    let before = snapshot(&s.tree());
    let (answer, took) = trickle_upload(&s, Duration::from_millis(100));
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {took:?}: {answer:?}"
    );
    assert!(answer.contains("not finished within 1 s"), "{answer}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(snapshot(&s.tree()), before, "the tree changed");
    assert!(staging_is_empty(&s), "the staged upload was left behind");
}

#[test]
fn failed_authentication_is_limited_per_address_and_says_so_in_headers() {
    let tmp = tempfile::tempdir().unwrap();
    // The defaults: 30 failures a minute.
    let s = start_default(tmp.path(), &[]);
    let c = client();
    for i in 0..30u32 {
        let guess = format!("niso_k1_{i:032}");
        let r = c
            .get(s.url("/v1/auth/keys"))
            .bearer_auth(&guess)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "guess {i}");
        assert_eq!(r.headers()["x-ratelimit-limit"], "30", "guess {i}");
        assert_eq!(
            r.headers()["x-ratelimit-remaining"].to_str().unwrap(),
            (29 - i).to_string()
        );
        assert!(r.headers().contains_key("x-ratelimit-reset"));
    }
    // Malformed keys count too, and the budget is spent.
    let r = c
        .get(s.url("/v1/auth/keys"))
        .bearer_auth("hunter2")
        .send()
        .unwrap();
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(error_of(r, StatusCode::TOO_MANY_REQUESTS).contains("failed authentications"));
    // Now even the right key is refused from this address…
    let r = c
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    error_of(r, StatusCode::TOO_MANY_REQUESTS);
    // …while anonymous reads and the health check go on,
    let r = c.get(s.url("/v1/packages")).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c.get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // and another address is not affected.
    let other = Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = other
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn health_is_never_rate_limited_or_authenticated() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(tmp.path(), &["--rate-limit-ip", "2"]);
    let c = client();
    for i in 0..10 {
        let r = c.get(s.url("/health")).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "health check {i}");
        assert!(!r.headers().contains_key("x-ratelimit-limit"));
    }
    // A wrong key does not fail a health check either.
    let r = c.get(s.url("/health")).bearer_auth("nope").send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Other paths are still limited.
    for _ in 0..2 {
        assert_eq!(
            c.get(s.url("/v1/packages")).send().unwrap().status(),
            StatusCode::OK
        );
    }
    error_of(
        c.get(s.url("/v1/packages")).send().unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
    );
    assert_eq!(
        c.get(s.url("/health")).send().unwrap().status(),
        StatusCode::OK
    );
}

// ---------------------------------------------------------------- item 9

fn admin_id(s: &Server, key: &str) -> String {
    let keys: Value = client()
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "admin")
        .expect("the bootstrap admin key")["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_last_admin_key_cannot_be_revoked_and_the_data_directory_makes_another() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(tmp.path(), &[]);
    let c = client();
    let id = admin_id(&s, &s.admin);
    let revoke = |id: &str, key: &str| {
        c.delete(s.url(&format!("/v1/auth/keys/{id}")))
            .bearer_auth(key)
            .send()
            .unwrap()
    };
    let msg = error_of(revoke(&id, &s.admin), StatusCode::CONFLICT);
    assert!(msg.contains("only admin key"), "{msg}");
    assert!(msg.contains(&id), "{msg}");
    assert_eq!(
        c.get(s.url("/v1/auth/keys"))
            .bearer_auth(&s.admin)
            .send()
            .unwrap()
            .status(),
        StatusCode::OK,
        "the key still works"
    );

    // The way back, with the server running: only the data directory.
    let dd = niso::datadir::DataDir::open(&s.data_dir).unwrap();
    let rescue = dd
        .key_store()
        .unwrap()
        .create(
            "rescue",
            &niso::auth::Scopes::parse(&["admin"]).unwrap(),
            niso::publish::unix_now(),
            None,
        )
        .unwrap();
    let rescue_key = rescue.key.expose().to_string();
    // With two admins, one may go; then the other is the last.
    assert_eq!(revoke(&id, &rescue_key).status(), StatusCode::OK);
    error_of(
        c.get(s.url("/v1/auth/keys"))
            .bearer_auth(&s.admin)
            .send()
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    );
    let msg = error_of(revoke(&rescue.record.id, &rescue_key), StatusCode::CONFLICT);
    assert!(msg.contains("only admin key"), "{msg}");
}

#[test]
fn a_malformed_admin_key_in_the_environment_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = Command::new(niso_bin())
        .args(["registry", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("NISO_ADMIN_KEY", "hunter2")
        .env_remove("NISO_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!data.exists(), "a registry was created: {stderr}");
    assert!(
        stderr.contains("NISO_ADMIN_KEY is refused, nothing was changed")
            && stderr.contains("is not a niso API key"),
        "{stderr}"
    );
}

#[test]
fn an_admin_key_in_the_environment_of_a_registry_that_has_keys_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    drop(start(&data, Start::default()));
    // The same key again: a restart with the same environment, nothing to say.
    let (_s, said) = start(&data, Start::default());
    assert!(!said.join("\n").contains("NISO_ADMIN_KEY"), "{said:?}");
    drop(_s);
    let other = "niso_k1_AnotherAdminKey00000000000000000";
    let (s, said) = start(
        &data,
        Start {
            admin_key: Some(other),
            ..Start::default()
        },
    );
    let said = said.join("\n");
    assert!(
        said.contains("warning: NISO_ADMIN_KEY is ignored")
            && said.contains("niso registry create-key --data-dir"),
        "{said}"
    );
    error_of(
        client()
            .get(s.url("/v1/auth/keys"))
            .bearer_auth(other)
            .send()
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    );
}

// ---------------------------------------------------------------- item 8

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn create_key(s: &Server, name: &str, scopes: &[&str]) -> (String, String) {
    let r = client()
        .post(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .json(&json!({ "name": name, "scopes": scopes }))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().unwrap();
    (
        v["id"].as_str().unwrap().into(),
        v["key"].as_str().unwrap().into(),
    )
}

fn read_package(tree: &Path, name: &str) -> niso::index::pb::Package {
    let key = niso::index::PublicKey::from_file(&tree.join("public_key")).unwrap();
    let bytes = std::fs::read(tree.join("niso/packages").join(name)).unwrap();
    niso::index::decode_index(&bytes, &key, "acme", 1 << 24).unwrap()
}

#[test]
fn publisher_keys_are_registered_by_an_admin_required_on_upload_and_listed() {
    use ed25519_dalek::Signer as _;
    let tmp = tempfile::tempdir().unwrap();
    let s = start_default(tmp.path(), &[]);
    let c = client();
    let (id, key) = create_key(&s, "ci", &["push:*"]);
    let first = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let second = ed25519_dalek::SigningKey::from_bytes(&[43; 32]);
    let register = |as_key: &str, for_id: &str, public: &[u8]| {
        c.post(s.url(&format!("/v1/auth/keys/{for_id}/publisher-key")))
            .bearer_auth(as_key)
            .json(&json!({ "public_key": b64(public) }))
            .send()
            .unwrap()
    };
    let public = first.verifying_key().to_bytes();

    // A key may not choose its own publisher key, by either route.
    let msg = error_of(register(&key, &id, &public), StatusCode::FORBIDDEN);
    assert!(msg.contains("admin"), "{msg}");
    let r = c
        .post(s.url("/v1/auth/publisher-key"))
        .bearer_auth(&key)
        .json(&json!({ "public_key": b64(&public) }))
        .send()
        .unwrap();
    let msg = error_of(r, StatusCode::GONE);
    assert!(
        msg.contains("POST /v1/auth/keys/{id}/publisher-key"),
        "{msg}"
    );
    // Bad requests by an admin change nothing.
    error_of(
        register(&s.admin, "key_nope", &public),
        StatusCode::NOT_FOUND,
    );
    let msg = error_of(
        register(&s.admin, &id, &public[..31]),
        StatusCode::BAD_REQUEST,
    );
    assert!(msg.contains("32 bytes"), "{msg}");
    let listed: Value = c
        .get(s.url("/v1/auth/publisher-keys"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(listed, json!({ "publisher_keys": [] }));

    // The admin registers it.
    let r = register(&s.admin, &id, &public);
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().unwrap();
    assert_eq!(v["id"], id.as_str());
    let index_key_id = v["publisher_key_id"].as_str().unwrap().to_string();

    // From now on this key must sign.
    let body = fixture("niso", "my-app-1.0.0-x86_64.niso");
    let before = snapshot(&s.tree());
    let r = c
        .post(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .bearer_auth(&key)
        .body(body.clone())
        .send()
        .unwrap();
    let msg = error_of(r, StatusCode::BAD_REQUEST);
    assert!(
        msg.contains("has a publisher key") && msg.contains("X-Niso-Signature"),
        "{msg}"
    );
    assert_eq!(snapshot(&s.tree()), before, "the tree changed");
    let r = c
        .post(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .bearer_auth(&key)
        .header("x-niso-signature", b64(&first.sign(&body).to_bytes()))
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Listed with the whole public key and the id the index stores.
    let listed: Value = c
        .get(s.url("/v1/auth/publisher-keys"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let entry = &listed["publisher_keys"][0];
    assert_eq!(entry["api_key_id"], id.as_str());
    assert_eq!(entry["api_key_name"], "ci");
    assert_eq!(entry["public_key"], b64(&public));
    assert_eq!(entry["index_key_id"], index_key_id.as_str());
    assert_eq!(entry["retired_at"], Value::Null);
    let artifact = &read_package(&s.tree(), "my-app").releases[0].artifacts[0];
    assert_eq!(
        artifact.publisher_key_id.as_deref(),
        Some(index_key_id.as_str())
    );

    // Replacing it retires the old one, which stays listed: the release it
    // signed is still in the index.
    assert_eq!(
        register(&s.admin, &id, &second.verifying_key().to_bytes()).status(),
        StatusCode::OK
    );
    let listed: Value = c
        .get(s.url("/v1/auth/publisher-keys"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let keys = listed["publisher_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0]["retired_at"].is_string(), "{listed}");
    assert_eq!(
        keys[1]["public_key"],
        b64(&second.verifying_key().to_bytes())
    );
    assert_eq!(keys[1]["retired_at"], Value::Null);
    // The library call the publisher uses says the same.
    let from_lib = niso::datadir::DataDir::open(&s.data_dir)
        .unwrap()
        .key_store()
        .unwrap()
        .publisher_keys()
        .unwrap();
    assert_eq!(from_lib.len(), 2);
    assert_eq!(from_lib[0].public_key, public);
    assert_eq!(from_lib[0].index_key_id(), index_key_id);
    assert!(from_lib[0].retired_at.is_some() && from_lib[1].retired_at.is_none());
    s.assert_tree_verifies();
}
