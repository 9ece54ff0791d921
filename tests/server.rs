//! The write API end to end: the built binary serving on 127.0.0.1 with a
//! real TCP port, driven over HTTP exactly as seed 000 describes, and the
//! tree checked with `niso registry verify` after every test.

mod common;

use std::path::Path;

use base64::Engine;
use common::*;
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(dir).join(name)).unwrap()
}

fn upload(s: &Server, key: &str, path: &str, body: Vec<u8>) -> Response {
    client()
        .post(s.url(path))
        .bearer_auth(key)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .unwrap()
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

/// Asserts the JSON error envelope and returns its message.
fn error_of(r: Response, status: StatusCode) -> String {
    assert_eq!(r.status(), status);
    let v: Value = r.json().unwrap();
    assert_eq!(v["status"], status.as_u16(), "{v}");
    v["error"].as_str().expect("error message").to_string()
}

#[test]
fn every_endpoint_as_seed_000_shows_and_reads_equal_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = client();
    assert_eq!(
        c.get(s.url("/health"))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap(),
        json!({"status": "ok"})
    );

    let (_, key) = create_key(&s, "ci-deploy", &["push:*", "delete:*"]);
    for (name, arch) in [
        ("my-app-1.0.0-x86_64.niso", "x86_64"),
        ("my-app-1.1.0-x86_64.niso", "x86_64"),
        ("my-app-1.1.0-aarch64.niso", "aarch64"),
    ] {
        let version = if name.contains("1.0.0") {
            "1.0.0"
        } else {
            "1.1.0"
        };
        let r = upload(
            &s,
            &key,
            &format!("/v1/packages/my-app/{version}/{arch}"),
            fixture("niso", name),
        );
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["name"], "my-app");
        assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    }
    let r = upload(
        &s,
        &key,
        "/v1/packages/jason/1.4.4/any",
        fixture("hex", "jason-1.4.4.tar"),
    );
    assert_eq!(r.status(), StatusCode::CREATED);

    let list: Value = c.get(s.url("/v1/packages")).send().unwrap().json().unwrap();
    assert_eq!(
        list,
        json!({"packages": [
            {"name": "jason", "versions": ["1.4.4"], "latest": "1.4.4", "description": "niso test fixture jason"},
            {"name": "my-app", "versions": ["1.0.0", "1.1.0"], "latest": "1.1.0", "description": "My application"}
        ]})
    );
    let versions: Value = c
        .get(s.url("/v1/packages/my-app/versions"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(versions["name"], "my-app");
    assert_eq!(versions["versions"].as_array().unwrap().len(), 3);
    assert_eq!(versions["versions"][0]["version"], "1.0.0");
    assert_eq!(versions["versions"][0]["arch"], "x86_64");
    assert_eq!(
        versions["versions"][0]["size"],
        fixture("niso", "my-app-1.0.0-x86_64.niso").len()
    );
    assert!(versions["versions"][0]["uploaded_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    let manifest: Value = c
        .get(s.url("/v1/packages/my-app/1.1.0/manifest"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        manifest,
        json!({"package": {"name": "my-app", "version": "1.1.0", "description": "My application"},
               "binary": {"entrypoint": "bin/my-app"}, "isolation": {"preset": "server"}})
    );

    let r = c
        .get(s.url("/v1/packages/my-app/1.1.0/x86_64"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"my-app-1.1.0-x86_64.niso\""
    );
    assert!(r.headers().contains_key("etag"));
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        fixture("niso", "my-app-1.1.0-x86_64.niso")
    );
    let r = c
        .get(s.url("/v1/packages/my-app/latest/x86_64"))
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"my-app-1.1.0-x86_64.niso\""
    );
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        fixture("niso", "my-app-1.1.0-x86_64.niso")
    );
    let r = c.get(s.url("/v1/packages/jason/1.4.4/any")).send().unwrap();
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"jason-1.4.4.tar\""
    );

    // Tags.
    let r = c
        .post(s.url("/v1/packages/my-app/tags"))
        .bearer_auth(&key)
        .json(&json!({"tag": "stable", "version": "1.0.0"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .post(s.url("/v1/packages/my-app/tags"))
        .bearer_auth(&key)
        .json(&json!({"tag": "beta", "version": "1.1.0"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tags: Value = c
        .get(s.url("/v1/packages/my-app/tags"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        tags,
        json!({"tags": [{"tag": "beta", "version": "1.1.0"}, {"tag": "stable", "version": "1.0.0"}]})
    );
    let r = c
        .post(s.url("/v1/packages/my-app/tags"))
        .bearer_auth(&key)
        .json(&json!({"tag": "x", "version": "9.9.9"}))
        .send()
        .unwrap();
    assert!(error_of(r, StatusCode::NOT_FOUND).contains("9.9.9"));

    // Every GET is the file in the tree, byte for byte.
    for (url, file) in [
        ("/v1/packages", "v1/packages/index.json"),
        (
            "/v1/packages/my-app/versions",
            "v1/packages/my-app/versions",
        ),
        ("/v1/packages/my-app/tags", "v1/packages/my-app/tags"),
        (
            "/v1/packages/my-app/1.1.0/manifest",
            "v1/packages/my-app/1.1.0/manifest",
        ),
        (
            "/v1/packages/my-app/1.1.0/aarch64",
            "v1/packages/my-app/1.1.0/aarch64",
        ),
        (
            "/v1/packages/my-app/latest/aarch64",
            "v1/packages/my-app/latest/aarch64",
        ),
        ("/names", "names"),
        ("/versions", "versions"),
        ("/niso/packages/my-app", "niso/packages/my-app"),
        ("/tarballs/jason-1.4.4.tar", "tarballs/jason-1.4.4.tar"),
        ("/public_key", "public_key"),
    ] {
        let body = c.get(s.url(url)).send().unwrap().bytes().unwrap();
        assert_eq!(
            body.as_ref(),
            std::fs::read(s.tree().join(file)).unwrap(),
            "{url}"
        );
    }
    // ETags: a second GET with If-None-Match is a 304.
    let r = c.get(s.url("/names")).send().unwrap();
    let etag = r.headers()["etag"].clone();
    let r = c
        .get(s.url("/names"))
        .header("if-none-match", etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");

    // Delete: latest and tags follow.
    let r = c
        .delete(s.url("/v1/packages/my-app/1.1.0/x86_64"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(s.url("/v1/packages/my-app/latest/x86_64"))
        .send()
        .unwrap();
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        fixture("niso", "my-app-1.0.0-x86_64.niso")
    );
    let r = c
        .get(s.url("/v1/packages/my-app/1.1.0/x86_64"))
        .send()
        .unwrap();
    assert!(error_of(r, StatusCode::NOT_FOUND).contains("no such file"));
    let r = c
        .delete(s.url("/v1/packages/my-app/1.1.0/aarch64"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tags: Value = c
        .get(s.url("/v1/packages/my-app/tags"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        tags,
        json!({"tags": [{"tag": "stable", "version": "1.0.0"}]})
    );
    let r = c
        .delete(s.url("/v1/packages/my-app/1.1.0/aarch64"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    error_of(r, StatusCode::NOT_FOUND);
    s.assert_tree_verifies();
}

#[test]
fn search_and_pagination_follow_seed_002() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    for f in hex_fixtures() {
        let name = f
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(".tar")
            .to_string();
        let (pkg, version) = name.split_once('-').unwrap();
        let r = upload(
            &s,
            &s.admin,
            &format!("/v1/packages/{pkg}/{version}/any"),
            std::fs::read(&f).unwrap(),
        );
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
    }
    let c = client();
    let page: Value = c
        .get(s.url("/v1/packages?page=1&per_page=2"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let names: Vec<&str> = page["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["decimal", "jason"]);
    assert_eq!(page["pagination"]["total"], 3);
    assert_eq!(page["pagination"]["prev"], Value::Null);
    // Links are relative: never built from Host, right behind any proxy.
    let next = page["pagination"]["next"].as_str().unwrap().to_string();
    assert_eq!(next, "/v1/packages?page=2&per_page=2");
    let page2: Value = c
        .get(s.url(&next))
        .header("host", "evil.example")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(page2["packages"][0]["name"], "plug");
    assert_eq!(page2["pagination"]["next"], Value::Null);
    assert_eq!(
        page2["pagination"]["prev"],
        "/v1/packages?page=1&per_page=2"
    );
    let desc: Value = c
        .get(s.url("/v1/packages?sort_by=name&order=desc"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(desc["packages"][0]["name"], "plug");
    let r = c.get(s.url("/v1/packages?order=sideways")).send().unwrap();
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("asc or desc"));
    let r = c.get(s.url("/v1/packages?per_page=0")).send().unwrap();
    error_of(r, StatusCode::BAD_REQUEST);

    let v: Value = c
        .get(s.url("/v1/packages/plug/versions?order=desc&per_page=1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["versions"][0]["version"], "1.17.0-rc.0");
    assert_eq!(v["pagination"]["total"], 2);

    let found: Value = c
        .get(s.url("/v1/search?q=jas"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(found["term"], "jas");
    assert_eq!(found["results"].as_array().unwrap().len(), 1);
    assert_eq!(found["results"][0]["name"], "jason");
    // Descriptions match too, after names.
    let found: Value = c
        .get(s.url("/v1/search?q=fixture"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(found["results"].as_array().unwrap().len(), 3);
    let r = c.get(s.url("/v1/search?q=")).send().unwrap();
    error_of(r, StatusCode::BAD_REQUEST);
    s.assert_tree_verifies();
}

#[test]
fn scopes_allow_and_deny_as_seed_001_says() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = client();
    let (_, push_my) = create_key(&s, "push-my", &["push:my-*"]);
    let (_, pull_only) = create_key(&s, "reader", &["pull:*"]);
    let (_, deleter) = create_key(&s, "deleter", &["delete:my-*"]);
    let body = fixture("niso", "my-app-1.0.0-x86_64.niso");

    // No key, a malformed key, an unknown key.
    let r = c
        .post(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .body(body.clone())
        .send()
        .unwrap();
    assert!(error_of(r, StatusCode::UNAUTHORIZED).contains("authentication required"));
    let r = upload(
        &s,
        "niso_k1_short",
        "/v1/packages/my-app/1.0.0/x86_64",
        body.clone(),
    );
    error_of(r, StatusCode::UNAUTHORIZED);
    let r = upload(
        &s,
        "niso_k1_UnknownKey0000000000000000000000",
        "/v1/packages/my-app/1.0.0/x86_64",
        body.clone(),
    );
    assert!(error_of(r, StatusCode::UNAUTHORIZED).contains("invalid or revoked"));
    // Wrong scopes.
    let r = upload(
        &s,
        &pull_only,
        "/v1/packages/my-app/1.0.0/x86_64",
        body.clone(),
    );
    assert!(error_of(r, StatusCode::FORBIDDEN).contains("push my-app"));
    let r = upload(
        &s,
        &push_my,
        "/v1/packages/jason/1.4.4/any",
        fixture("hex", "jason-1.4.4.tar"),
    );
    assert!(error_of(r, StatusCode::FORBIDDEN).contains("push jason"));
    // The right scope, also as a bare key the way Hex clients send it.
    let r = c
        .post(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .header("authorization", &push_my)
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Deleting needs delete:, pushing does not give it.
    let r = c
        .delete(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .bearer_auth(&push_my)
        .send()
        .unwrap();
    error_of(r, StatusCode::FORBIDDEN);
    // Only admin manages keys.
    for k in [&push_my, &pull_only, &deleter] {
        let r = c.get(s.url("/v1/auth/keys")).bearer_auth(k).send().unwrap();
        assert!(error_of(r, StatusCode::FORBIDDEN).contains("admin"));
        let r = c
            .post(s.url("/v1/auth/keys"))
            .bearer_auth(k)
            .json(&json!({"name": "x", "scopes": ["admin"]}))
            .send()
            .unwrap();
        error_of(r, StatusCode::FORBIDDEN);
    }
    let r = c
        .post(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .json(&json!({"name": "x", "scopes": ["write:*"]}))
        .send()
        .unwrap();
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("write:*"));
    let r = c
        .delete(s.url("/v1/packages/my-app/1.0.0/x86_64"))
        .bearer_auth(&deleter)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The key list never shows a key.
    let listed = c
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let v: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v["keys"].as_array().unwrap().len(), 4);
    assert_eq!(v["keys"][1]["name"], "push-my");
    assert_eq!(v["keys"][1]["scopes"], json!(["push:my-*"]));
    assert!(v["keys"][1]["last_used"].is_string());
    for k in [&push_my, &pull_only, &deleter, &s.admin] {
        assert!(!listed.contains(k.as_str()));
    }
    s.assert_tree_verifies();
}

#[test]
fn organization_repositories_are_private_to_pull_scopes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = client();
    let (_, team_push) = create_key(&s, "team-ci", &["push:team/*"]);
    let (_, team_pull) = create_key(&s, "team-dev", &["pull:team/*"]);
    let (_, other_pull) = create_key(&s, "other-dev", &["pull:other/*", "pull:*"]);
    let r = upload(
        &s,
        &team_push,
        "/repos/team/v1/packages/jason/1.4.4/any",
        fixture("hex", "jason-1.4.4.tar"),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    // team/* does not reach the root repository.
    let r = upload(
        &s,
        &team_push,
        "/v1/packages/jason/1.4.4/any",
        fixture("hex", "jason-1.4.4.tar"),
    );
    error_of(r, StatusCode::FORBIDDEN);

    for path in [
        "/repos/team/names",
        "/repos/team/packages/jason",
        "/repos/team/tarballs/jason-1.4.4.tar",
        "/repos/team/v1/packages",
    ] {
        let r = c.get(s.url(path)).send().unwrap();
        error_of(r, StatusCode::UNAUTHORIZED);
        let r = c.get(s.url(path)).bearer_auth(&other_pull).send().unwrap();
        error_of(r, StatusCode::FORBIDDEN);
        let r = c.get(s.url(path)).bearer_auth(&team_pull).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        // Hex clients send the bare key.
        let r = c
            .get(s.url(path))
            .header("authorization", &team_pull)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // The check nginx's auth_request asks.
    let check = |key: Option<&str>, uri: &str| {
        let mut req = c.get(s.url("/v1/auth/check")).header("x-original-uri", uri);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().unwrap().status()
    };
    assert_eq!(
        check(None, "/repos/team/packages/jason"),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        check(Some(&other_pull), "/repos/team/packages/jason"),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        check(Some(&team_pull), "/repos/team/tarballs/jason-1.4.4.tar"),
        StatusCode::OK
    );
    // nginx sends its normalised `$uri`, which has no query.
    assert_eq!(
        check(Some(&team_pull), "/repos/team/tarballs/jason-1.4.4.tar?x=1"),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(check(None, "/packages/jason"), StatusCode::OK);
    s.assert_tree_verifies();
}

#[test]
fn a_revoked_key_is_refused_on_its_next_request() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = client();
    let (id, key) = create_key(&s, "temp", &["push:*"]);
    let r = upload(
        &s,
        &key,
        "/v1/packages/decimal/2.0.0/any",
        fixture("hex", "decimal-2.0.0.tar"),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .delete(s.url(&format!("/v1/auth/keys/{id}")))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = upload(
        &s,
        &key,
        "/v1/packages/decimal/2.1.1/any",
        fixture("hex", "decimal-2.1.1.tar"),
    );
    assert!(error_of(r, StatusCode::UNAUTHORIZED).contains("revoked"));
    let r = c
        .delete(s.url(&format!("/v1/auth/keys/{id}")))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    error_of(r, StatusCode::NOT_FOUND);
    s.assert_tree_verifies();
}

#[test]
fn publisher_signatures_are_checked_and_kept_in_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let c = client();
    let (key_id, key) = create_key(&s, "signer", &["push:*"]);
    let body = fixture("niso", "my-app-1.0.0-x86_64.niso");
    let sk = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    use ed25519_dalek::Signer as _;
    let sig = base64::engine::general_purpose::STANDARD.encode(sk.sign(&body).to_bytes());
    let send = |sig: &str, body: Vec<u8>, path: &str| {
        c.post(s.url(path))
            .bearer_auth(&key)
            .header("x-niso-signature", sig)
            .body(body)
            .send()
            .unwrap()
    };
    // No publisher key registered yet.
    let r = send(&sig, body.clone(), "/v1/packages/my-app/1.0.0/x86_64");
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("no publisher key"));
    // An admin registers it for the key.
    let r = c
        .post(s.url(&format!("/v1/auth/keys/{key_id}/publisher-key")))
        .bearer_auth(&s.admin)
        .json(&json!({"public_key": base64::engine::general_purpose::STANDARD.encode(sk.verifying_key().as_bytes())}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let key_id = r.json::<Value>().unwrap()["publisher_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    // A signature over other bytes, and garbage, are 400s.
    let other = fixture("niso", "my-app-1.1.0-x86_64.niso");
    let r = send(&sig, other, "/v1/packages/my-app/1.1.0/x86_64");
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("does not verify"));
    let r = send(
        "not base64!",
        body.clone(),
        "/v1/packages/my-app/1.0.0/x86_64",
    );
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("base64"));
    let r = send(&sig, body.clone(), "/v1/packages/my-app/1.0.0/x86_64");
    assert_eq!(r.status(), StatusCode::CREATED);
    // The signature and key id are in the signed package index.
    let pkg = read_package(&s.tree(), "my-app");
    let a = &pkg.releases[0].artifacts[0];
    assert_eq!(
        a.publisher_signature.as_deref(),
        Some(sk.sign(&body).to_bytes().as_slice())
    );
    assert_eq!(a.publisher_key_id.as_deref(), Some(key_id.as_str()));
    s.assert_tree_verifies();
}

fn read_package(tree: &Path, name: &str) -> niso::index::pb::Package {
    let key = niso::index::PublicKey::from_file(&tree.join("public_key")).unwrap();
    let bytes = std::fs::read(tree.join("niso/packages").join(name)).unwrap();
    niso::index::decode_index(&bytes, &key, "acme", 1 << 24).unwrap()
}

#[test]
fn bad_uploads_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--max-upload", "4096"]);
    let body = fixture("niso", "my-app-1.0.0-x86_64.niso");
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/my-app/1.0.0/x86_64",
        body.clone(),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let before = snapshot(&s.tree());
    // Metadata that does not match the URL.
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/my-app/2.0.0/x86_64",
        fixture("niso", "my-app-1.1.0-x86_64.niso"),
    );
    assert!(error_of(r, StatusCode::BAD_REQUEST)
        .contains("holds my-app 1.1.0 (x86_64) but the URL names my-app 2.0.0 (x86_64)"));
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/my-app/1.1.0/aarch64",
        fixture("niso", "my-app-1.1.0-x86_64.niso"),
    );
    error_of(r, StatusCode::BAD_REQUEST);
    // Not an archive; an empty body; a bad name in the URL.
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/my-app/1.2.0/x86_64",
        b"hello".to_vec(),
    );
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("invalid archive"));
    let r = upload(&s, &s.admin, "/v1/packages/my-app/1.2.0/x86_64", Vec::new());
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("empty"));
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/My-App/1.2.0/x86_64",
        body.clone(),
    );
    assert!(error_of(r, StatusCode::BAD_REQUEST).contains("invalid package name"));
    // Over --max-upload: 413, by Content-Length and by streaming.
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/jason/1.4.4/any",
        fixture("hex", "jason-1.4.4.tar"),
    );
    assert!(error_of(r, StatusCode::PAYLOAD_TOO_LARGE).contains("4096"));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..5).map(|_| Ok(vec![0u8; 1024])).collect();
    let r = client()
        .post(s.url("/v1/packages/jason/1.4.4/any"))
        .bearer_auth(&s.admin)
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            chunks
                .into_iter()
                .flat_map(|c| c.unwrap())
                .collect::<Vec<u8>>(),
        )))
        .send()
        .unwrap();
    error_of(r, StatusCode::PAYLOAD_TOO_LARGE);
    // The same bytes again: the first answer again (a safe retry), no change.
    let r = upload(&s, &s.admin, "/v1/packages/my-app/1.0.0/x86_64", body);
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["x-niso-already-published"].to_str().unwrap(),
        "true"
    );
    // Other bytes for a published version.
    let other = niso_archive("my-app", "1.0.0", "x86_64", "other bytes");
    let r = upload(&s, &s.admin, "/v1/packages/my-app/1.0.0/x86_64", other);
    assert!(error_of(r, StatusCode::CONFLICT).contains("already published with other bytes"));
    assert_eq!(
        before,
        snapshot(&s.tree()),
        "a refused upload changed the tree"
    );
    // Nothing is left in staging either.
    let staged: Vec<_> = std::fs::read_dir(s.data_dir.join("staging"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    s.assert_tree_verifies();
}

/// A `.niso` archive of `name` `version` `arch` whose payload says `text`.
fn niso_archive(name: &str, version: &str, arch: &str, text: &str) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    let pkg = src.path().join("pkg");
    std::fs::create_dir_all(pkg.join("payload/bin")).unwrap();
    std::fs::write(pkg.join("payload/bin/run"), text).unwrap();
    std::fs::write(
        pkg.join("niso.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"{arch}\"\n\
             description = \"My application\"\n[binary]\nentrypoint = \"bin/run\"\n"
        ),
    )
    .unwrap();
    let (path, _) =
        niso::archive::niso::create(&pkg, src.path(), &niso::limits::Limits::default()).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn concurrent_uploads_of_one_version_have_exactly_one_winner() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    // The same bytes twelve times at once: all succeed, one of them made it.
    let body = fixture("hex", "plug-1.16.0.tar");
    let answers: Vec<(StatusCode, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                scope.spawn(|| {
                    let r = upload(&s, &s.admin, "/v1/packages/plug/1.16.0/any", body.clone());
                    (
                        r.status(),
                        r.headers().contains_key("x-niso-already-published"),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|a| a.0 == StatusCode::CREATED),
        "{answers:?}"
    );
    assert_eq!(answers.iter().filter(|a| !a.1).count(), 1, "{answers:?}");
    // Two different archives of one version at once: one wins, the other
    // is refused every time it is sent.
    let (a, b) = (
        niso_archive("race", "1.0.0", "x86_64", "a"),
        niso_archive("race", "1.0.0", "x86_64", "b"),
    );
    let statuses: Vec<(usize, StatusCode)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let body = if i % 2 == 0 { a.clone() } else { b.clone() };
                let s = &s;
                scope.spawn(move || {
                    (
                        i % 2,
                        upload(s, &s.admin, "/v1/packages/race/1.0.0/x86_64", body).status(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = statuses[0].1 == StatusCode::CREATED;
    for (side, status) in &statuses {
        let expected = if (*side == 0) == won {
            StatusCode::CREATED
        } else {
            StatusCode::CONFLICT
        };
        assert_eq!(*status, expected, "{statuses:?}");
    }
    // Different packages at once all succeed (and share index rewrites).
    let files = hex_fixtures();
    let statuses: Vec<StatusCode> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .iter()
            .filter(|f| !f.ends_with("plug-1.16.0.tar"))
            .map(|f| {
                let s = &s;
                scope.spawn(move || {
                    let stem = f
                        .file_name()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .trim_end_matches(".tar")
                        .to_string();
                    let (name, version) = stem.split_once('-').unwrap();
                    upload(
                        s,
                        &s.admin,
                        &format!("/v1/packages/{name}/{version}/any"),
                        std::fs::read(f).unwrap(),
                    )
                    .status()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    s.assert_tree_verifies();
    let public = s.tree();
    let (ok, out) = hex_client_check(&public, "acme", &public.join("public_key"));
    assert!(ok, "{out}");
}

#[test]
fn a_burst_over_the_rate_limit_gets_429_with_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        &["--rate-limit-ip", "10", "--rate-limit-key", "5"],
    );
    let c = client();
    // (Not /health: a load balancer's check is never limited.)
    for i in 0..10 {
        let r = c.get(s.url("/v1/packages")).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        assert_eq!(r.headers()["x-ratelimit-limit"], "10");
        assert_eq!(
            r.headers()["x-ratelimit-remaining"].to_str().unwrap(),
            (9 - i).to_string()
        );
        assert!(r.headers().contains_key("x-ratelimit-reset"));
    }
    let r = c.get(s.url("/v1/packages")).send().unwrap();
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    assert!(error_of(r, StatusCode::TOO_MANY_REQUESTS).contains("rate limit"));
    // A key has its own budget.
    for _ in 0..5 {
        let r = c
            .get(s.url("/v1/auth/keys"))
            .bearer_auth(&s.admin)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = c
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    error_of(r, StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn read_only_serves_the_tree_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let data = {
        let s = Server::start(tmp.path(), &[]);
        let r = upload(
            &s,
            &s.admin,
            "/v1/packages/jason/1.4.4/any",
            fixture("hex", "jason-1.4.4.tar"),
        );
        assert_eq!(r.status(), StatusCode::CREATED);
        s.data_dir.clone()
    };
    let s = Server::start_on(&data, &["--read-only"]);
    let c = client();
    let r = c.get(s.url("/v1/packages")).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = upload(
        &s,
        ADMIN_KEY,
        "/v1/packages/decimal/2.0.0/any",
        fixture("hex", "decimal-2.0.0.tar"),
    );
    error_of(r, StatusCode::METHOD_NOT_ALLOWED);
    // It has no keys: key management is refused as writes are, even with
    // the key of the registry it copies (tests/polish.rs has every route).
    let r = c
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .unwrap();
    assert!(error_of(r, StatusCode::METHOD_NOT_ALLOWED).starts_with("this registry is read-only"));
    s.assert_tree_verifies();

    // A mirror's tree changes under the server (rsync renames new files into
    // place, or rewrites one in place): every read answers the file as it
    // is now, never a remembered copy.
    let tags = data.join("public/v1/packages/jason/tags");
    let get = |path: &str| {
        let r = c.get(s.url(path)).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let etag = r.headers()["etag"].clone();
        (r.text().unwrap(), etag)
    };
    let (first, etag1) = get("/v1/packages/jason/tags");
    assert_eq!(first, std::fs::read_to_string(&tags).unwrap());
    let renamed = "{\"tags\":[{\"tag\":\"x\",\"version\":\"1.4.4\"}]}\n";
    let tmp_file = data.join("public/v1/packages/jason/.tmp-rsync");
    std::fs::write(&tmp_file, renamed).unwrap();
    std::fs::rename(&tmp_file, &tags).unwrap();
    let (second, etag2) = get("/v1/packages/jason/tags");
    assert_eq!(second, renamed);
    assert_ne!(etag1, etag2);
    // Same size, same inode, rewritten in place.
    let in_place = renamed.replace("\"x\"", "\"y\"");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&tags, &in_place).unwrap();
    assert_eq!(get("/v1/packages/jason/tags").0, in_place);
    std::fs::remove_file(&tags).unwrap();
    let r = c.get(s.url("/v1/packages/jason/tags")).send().unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[test]
fn reads_without_rate_limits_take_the_fast_path_with_the_same_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--rate-limit-ip", "0"]);
    let c = client();
    let r = upload(
        &s,
        &s.admin,
        "/v1/packages/jason/1.4.4/any",
        fixture("hex", "jason-1.4.4.tar"),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    // Anonymous (fast path) and with a key (full path) give the same answer.
    for path in [
        "/v1/packages",
        "/v1/packages/jason/1.4.4/any",
        "/names",
        "/tarballs/jason-1.4.4.tar",
    ] {
        let fast = c.get(s.url(path)).send().unwrap();
        let full = c.get(s.url(path)).bearer_auth(&s.admin).send().unwrap();
        assert_eq!(fast.status(), StatusCode::OK, "{path}");
        assert!(!fast.headers().contains_key("x-ratelimit-limit"));
        for h in [
            "etag",
            "content-type",
            "content-disposition",
            "cache-control",
            "access-control-allow-origin",
        ] {
            assert_eq!(fast.headers().get(h), full.headers().get(h), "{path}: {h}");
        }
        assert_eq!(fast.bytes().unwrap(), full.bytes().unwrap(), "{path}");
    }
    let r = c.get(s.url("/v1/packages/jason/1.4.4/any")).send().unwrap();
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"jason-1.4.4.tar\""
    );
    let etag = r.headers()["etag"].clone();
    let r = c
        .get(s.url("/v1/packages/jason/1.4.4/any"))
        .header("if-none-match", etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // What the fast path cannot answer still gets the normal answer.
    let r = c.get(s.url("/no/such/file")).send().unwrap();
    assert!(error_of(r, StatusCode::NOT_FOUND).contains("no such file"));
    s.assert_tree_verifies();
}

#[test]
fn a_deleted_version_never_serves_other_bytes_and_the_same_bytes_restore_it() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let first = niso_archive("tool", "1.0.0", "x86_64", "first");
    let url = "/v1/packages/tool/1.0.0/x86_64";
    assert_eq!(
        upload(&s, &s.admin, url, first.clone()).status(),
        StatusCode::CREATED
    );
    let r = client()
        .delete(s.url(url))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        client().get(s.url(url)).send().unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // Other bytes under the deleted name: refused, now and after a restart.
    let other = niso_archive("tool", "1.0.0", "x86_64", "second");
    let r = upload(&s, &s.admin, url, other.clone());
    assert!(error_of(r, StatusCode::CONFLICT).contains("was deleted"));
    let data_dir = s.data_dir.clone();
    drop(s);
    let s = Server::start_on(&data_dir, &[]);
    let r = upload(&s, &s.admin, url, other);
    assert!(error_of(r, StatusCode::CONFLICT).contains("was deleted"));
    // The deleted bytes come back, served with what they always were.
    assert_eq!(
        upload(&s, &s.admin, url, first.clone()).status(),
        StatusCode::CREATED
    );
    let got = client().get(s.url(url)).send().unwrap().bytes().unwrap();
    assert_eq!(got.as_ref(), first.as_slice());
    s.assert_tree_verifies();
}

#[test]
fn build_and_publish_run_while_serve_runs_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let dd = s.data_dir.clone();
    // Uploads through the server while `publish` and `build` write the
    // same tree from other processes.
    let published: Vec<String> = std::thread::scope(|scope| {
        let uploads = scope.spawn(|| {
            let mut ok = Vec::new();
            for i in 0..12 {
                let v = format!("1.0.{i}");
                let r = upload(
                    &s,
                    &s.admin,
                    &format!("/v1/packages/served/{v}/x86_64"),
                    niso_archive("served", &v, "x86_64", &v),
                );
                assert_eq!(r.status(), StatusCode::CREATED, "served {v}");
                ok.push(format!("served {v}"));
            }
            ok
        });
        let offline = scope.spawn(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut ok = Vec::new();
            for i in 0..4 {
                let v = format!("2.0.{i}");
                let path = dir.path().join(format!("offline-{v}-x86_64.niso"));
                std::fs::write(&path, niso_archive("offline", &v, "x86_64", &v)).unwrap();
                niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(&path)]);
                ok.push(format!("offline {v}"));
                niso_ok(&["registry", "build", "--data-dir", p(&dd)]);
            }
            ok
        });
        let mut all = uploads.join().unwrap();
        all.extend(offline.join().unwrap());
        all
    });
    // Every acknowledged release is in the tree, seen by the server too.
    for what in &published {
        let (name, version) = what.split_once(' ').unwrap();
        let r = client()
            .get(s.url(&format!("/v1/packages/{name}/{version}/x86_64")))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{what}");
    }
    let pkg = read_package(&s.tree(), "served");
    assert_eq!(pkg.releases.len(), 12);
    assert_eq!(read_package(&s.tree(), "offline").releases.len(), 4);
    s.assert_tree_verifies();
}
