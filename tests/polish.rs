//! What a newcomer met (issue 18, item 12): the answers a first user gets
//! when they get something wrong, end to end through the built binary.
//! Every refusal must say what is wrong in the API's own words, with the
//! status the README gives, and change nothing.

mod common;

use common::*;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(dir).join(name)).unwrap()
}

/// Asserts the status and the JSON error envelope; returns the message.
fn error_of(r: Response, status: StatusCode) -> String {
    let got = r.status();
    let text = r.text().unwrap();
    assert_eq!(got, status, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["status"], status.as_u16(), "{v}");
    v["error"].as_str().expect("error message").to_string()
}

/// Asserts two snapshots are equal, naming only the files that differ.
fn assert_unchanged(
    before: &std::collections::BTreeMap<String, Vec<u8>>,
    after: &std::collections::BTreeMap<String, Vec<u8>>,
) {
    let differ: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(differ.is_empty(), "a refused request changed {differ:?}");
}

/// The registry's keys and publisher keys as the admin sees them, without
/// `last_used` (which every authenticated request moves).
fn keys_of(s: &Server) -> (Value, Value) {
    let c = client();
    let mut keys: Value = c
        .get(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap()
        .json()
        .unwrap();
    for k in keys["keys"].as_array_mut().unwrap() {
        k.as_object_mut().unwrap().remove("last_used");
    }
    let publisher: Value = c
        .get(s.url("/v1/auth/publisher-keys"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    (keys, publisher)
}

/// A registry with jason 1.4.4 published, in the root repository and in
/// organization acme.
fn registry_with_jason(dir: &std::path::Path, extra: &[&str]) -> Server {
    let s = Server::start(dir, extra);
    for path in [
        "/v1/packages/jason/1.4.4/any",
        "/repos/acme/v1/packages/jason/1.4.4/any",
    ] {
        let r = client()
            .post(s.url(path))
            .bearer_auth(&s.admin)
            .body(fixture("hex", "jason-1.4.4.tar"))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{path}");
    }
    s
}

/// Item 1: a `--read-only` server has no keys, so every write and every
/// key-management request is a 405 saying so, whatever Authorization says
/// (no header, a valid key of the registry it copies, a malformed one), and
/// the tree is left as it was. Reads go on, and ignore the header.
#[test]
fn read_only_answers_every_write_and_key_request_405_whatever_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = registry_with_jason(tmp.path(), &[]).data_dir.clone();
    let s = Server::start_on(&data, &["--read-only"]);
    let before = snapshot(&s.tree());
    let c = client();
    let archive = fixture("hex", "decimal-2.0.0.tar");
    let tag = json!({"tag": "stable", "version": "1.4.4"}).to_string();
    let new_key = json!({"name": "ci", "scopes": ["push:*"]}).to_string();
    let publisher_key = json!({"public_key": "AAAA"}).to_string();
    // (method, path, body, what the path still answers to)
    let requests: Vec<(Method, &str, Vec<u8>, &str)> = vec![
        (
            Method::POST,
            "/v1/packages/decimal/2.0.0/any",
            archive.clone(),
            "GET, HEAD",
        ),
        (
            Method::POST,
            "/repos/acme/v1/packages/decimal/2.0.0/any",
            archive.clone(),
            "GET, HEAD",
        ),
        (
            Method::DELETE,
            "/v1/packages/jason/1.4.4/any",
            vec![],
            "GET, HEAD",
        ),
        (
            Method::DELETE,
            "/repos/acme/v1/packages/jason/1.4.4/any",
            vec![],
            "GET, HEAD",
        ),
        (
            Method::POST,
            "/v1/packages/jason/tags",
            tag.clone().into(),
            "GET, HEAD",
        ),
        (
            Method::POST,
            "/repos/acme/v1/packages/jason/tags",
            tag.clone().into(),
            "GET, HEAD",
        ),
        (Method::POST, "/v1/auth/keys", new_key.into(), ""),
        (Method::GET, "/v1/auth/keys", vec![], ""),
        (Method::DELETE, "/v1/auth/keys/key_abc", vec![], ""),
        (
            Method::POST,
            "/v1/auth/keys/key_abc/publisher-key",
            publisher_key.clone().into(),
            "",
        ),
        (Method::GET, "/v1/auth/publisher-keys", vec![], ""),
        (
            Method::POST,
            "/v1/auth/publisher-key",
            publisher_key.into(),
            "",
        ),
    ];
    let auths: [(&str, Option<String>); 4] = [
        ("no key", None),
        ("the admin key", Some(format!("Bearer {ADMIN_KEY}"))),
        ("a bare key", Some(ADMIN_KEY.to_string())),
        ("a malformed header", Some("Basic dXNlcjpwYXNz".to_string())),
    ];
    for (method, path, body, allow) in &requests {
        for (who, auth) in &auths {
            let mut req: RequestBuilder = c.request(method.clone(), s.url(path)).body(body.clone());
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().unwrap();
            assert_eq!(
                r.headers().get("allow").map(|v| v.to_str().unwrap()),
                Some(*allow),
                "{method} {path} with {who}"
            );
            let m = error_of(r, StatusCode::METHOD_NOT_ALLOWED);
            assert!(
                m.starts_with("this registry is read-only (a mirror): "),
                "{method} {path} with {who}: {m}"
            );
        }
    }
    assert_eq!(
        snapshot(&s.tree()),
        before,
        "a refused request changed the tree"
    );
    // Reads are served to anyone, whatever the header says.
    for (who, auth) in &auths {
        let mut req = c.get(s.url("/repos/acme/packages/jason"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        assert_eq!(req.send().unwrap().status(), StatusCode::OK, "{who}");
    }
}

/// Item 2: a tag may not take a name the v1 URL space already gives a
/// meaning (`latest`, and the paths beside versions).
#[test]
fn reserved_tag_names_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let s = registry_with_jason(tmp.path(), &[]);
    let c = client();
    let tags = s.tree().join("v1/packages/jason/tags");
    let before = std::fs::read(&tags).unwrap();
    for tag in ["latest", "manifest", "versions", "tags"] {
        for base in ["", "/repos/acme"] {
            let r = c
                .post(s.url(&format!("{base}/v1/packages/jason/tags")))
                .bearer_auth(&s.admin)
                .json(&json!({"tag": tag, "version": "1.4.4"}))
                .send()
                .unwrap();
            let m = error_of(r, StatusCode::BAD_REQUEST);
            assert!(
                m.starts_with(&format!("invalid tag \"{tag}\": is reserved")),
                "{tag}: {m}"
            );
            assert!(m.contains("latest always means the newest version"), "{m}");
        }
    }
    assert_eq!(std::fs::read(&tags).unwrap(), before);
    // A name that only starts like one is a tag like any other.
    let r = c
        .post(s.url("/v1/packages/jason/tags"))
        .bearer_auth(&s.admin)
        .json(&json!({"tag": "latest-stable", "version": "1.4.4"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.assert_tree_verifies();
}

/// Item 3: every JSON body is refused in the API's words: which field, what
/// is wrong, and what the body must look like. serde's own words (Rust type
/// names, "invalid length", backticks) never reach the client.
#[test]
fn json_body_errors_say_what_the_body_must_be_never_serde_type_names() {
    let tmp = tempfile::tempdir().unwrap();
    let s = registry_with_jason(tmp.path(), &[]);
    let c = client();
    let r = c
        .post(s.url("/v1/auth/keys"))
        .bearer_auth(&s.admin)
        .json(&json!({"name": "ci", "scopes": ["push:*"]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = (snapshot(&s.tree()), keys_of(&s));
    let tag_example = r#"{"tag": "stable", "version": "1.1.0"}"#;
    let key_example = r#"{"name": "ci-deploy", "scopes": ["push:my-*"]}"#;
    let pk_path = format!("/v1/auth/keys/{id}/publisher-key");
    let pk_example = r#"{"public_key": "<base64 of the 32-byte Ed25519 public key>"}"#;
    let long = "a".repeat(10_000);
    let cases: Vec<(&str, &str, String, &str)> = vec![
        // (path, example, body, what the message must say)
        (
            "/v1/packages/jason/tags",
            tag_example,
            r#"["x"]"#.into(),
            "the request body is an array, not an object",
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            r#"{"tag": 1, "version": "1.4.4"}"#.into(),
            r#"the field "tag" must be a string, not a number"#,
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            r#"{"tag": "stable"}"#.into(),
            r#"the request body lacks the field "version""#,
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            r#"{"tag": "stable", "version": "1.4.4", "force": true}"#.into(),
            r#"the request body has an unknown field "force""#,
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            r#"{"tag": "a", "tag": "b", "version": "1.4.4"}"#.into(),
            r#"the request body gives the field "tag" twice"#,
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            String::new(),
            "the request body is empty",
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            r#"{"tag": "stable", "version": "1.4.4"#.into(),
            "the request body ends before its JSON does",
        ),
        (
            "/v1/packages/jason/tags",
            tag_example,
            format!(r#"{{"tag": "{long}", "version": "1.4.4"}}"#),
            r#"the field "tag" is longer than 256 bytes"#,
        ),
        (
            "/v1/auth/keys",
            key_example,
            r#"{name: "ci"}"#.into(),
            "the request body is not valid JSON (line 1, column 2)",
        ),
        (
            "/v1/auth/keys",
            key_example,
            r#"{"name": "ci"}"#.into(),
            r#"the request body lacks the field "scopes""#,
        ),
        (
            "/v1/auth/keys",
            key_example,
            r#"{"name": "ci", "scopes": "push:*"}"#.into(),
            r#"the field "scopes" must be an array of strings, not a string"#,
        ),
        (
            "/v1/auth/keys",
            key_example,
            r#"{"name": "ci", "scopes": ["push:*", null]}"#.into(),
            r#"the field "scopes" must be an array of strings, but item 2 is null"#,
        ),
        (
            &pk_path,
            pk_example,
            "null".into(),
            "the request body is null, not an object",
        ),
        (
            &pk_path,
            pk_example,
            r#"{"key": "AAAA"}"#.into(),
            r#"the request body has an unknown field "key""#,
        ),
    ];
    for (path, example, body, says) in &cases {
        let r = c
            .post(s.url(path))
            .bearer_auth(&s.admin)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .unwrap();
        let m = error_of(r, StatusCode::BAD_REQUEST);
        assert!(m.starts_with(says), "{path} {body:.60}: {m}");
        assert!(
            m.ends_with(&format!(": the body must be a JSON object like {example}")),
            "{path}: {m}"
        );
        for serde_word in [
            "struct",
            "TagRequest",
            "CreateKey",
            "PublisherKey",
            "invalid length",
            "invalid type",
            "`",
        ] {
            assert!(!m.contains(serde_word), "{path} {body:.60}: {m}");
        }
        assert!(m.len() < 400, "{path}: a long message: {m}");
    }
    // A value that fits the shape but breaks its rule is quoted, cut.
    let r = c
        .post(s.url("/v1/packages/jason/tags"))
        .bearer_auth(&s.admin)
        .json(&json!({"tag": "stable", "version": "x".repeat(200)}))
        .send()
        .unwrap();
    let m = error_of(r, StatusCode::BAD_REQUEST);
    assert!(m.starts_with("invalid version \"xxx"), "{m}");
    assert!(m.contains('…') && m.len() < 300, "{m}");
    assert_unchanged(&before.0, &snapshot(&s.tree()));
    assert_eq!(keys_of(&s), before.1);
}

/// Item 4: a bad query parameter is named, with what it accepts; a bad path
/// says which byte is wrong, as the client wrote it.
#[test]
fn bad_query_parameters_and_paths_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let s = registry_with_jason(tmp.path(), &[]);
    let c = client();
    for (query, says) in [
        (
            "page=-1",
            r#"page must be a whole number from 1 to 1000000000, not "-1""#,
        ),
        (
            "page=0",
            r#"page must be a whole number from 1 to 1000000000, not "0""#,
        ),
        (
            "page=99999999999999999999999",
            "page must be a whole number from 1 to 1000000000",
        ),
        (
            "page=",
            r#"page must be a whole number from 1 to 1000000000, not """#,
        ),
        (
            "per_page=1001",
            r#"per_page must be a whole number from 1 to 1000, not "1001""#,
        ),
        (
            "per_page=ten",
            r#"per_page must be a whole number from 1 to 1000, not "ten""#,
        ),
        ("order=up", r#"order must be asc or desc, not "up""#),
        (
            "page=1&page=2",
            "the query parameter page is given more than once: give it once",
        ),
    ] {
        for path in [
            "/v1/packages",
            "/v1/packages/jason/versions",
            "/repos/acme/v1/packages",
        ] {
            let r = c
                .get(s.url(&format!("{path}?{query}")))
                .bearer_auth(&s.admin)
                .send()
                .unwrap();
            let m = error_of(r, StatusCode::BAD_REQUEST);
            assert!(m.starts_with(says), "{path}?{query}: {m}");
        }
        let r = c
            .get(s.url(&format!("/v1/search?q=jason&{query}")))
            .send()
            .unwrap();
        let m = error_of(r, StatusCode::BAD_REQUEST);
        assert!(m.starts_with(says), "search ?{query}: {m}");
    }
    for (path, says) in [
        (
            "/v1/packages?sort_by=size",
            "sort_by must be name or description, not \"size\"",
        ),
        (
            "/v1/packages/jason/versions?sort_by=name",
            "sort_by must be version or uploaded_at, not \"name\"",
        ),
    ] {
        let m = error_of(c.get(s.url(path)).send().unwrap(), StatusCode::BAD_REQUEST);
        assert_eq!(m, says, "{path}");
    }
    // A long value is quoted cut.
    let long = "z".repeat(5000);
    let m = error_of(
        c.get(s.url(&format!("/v1/packages?sort_by={long}")))
            .send()
            .unwrap(),
        StatusCode::BAD_REQUEST,
    );
    assert!(m.len() < 300 && m.contains('…'), "{m}");
    // Good parameters still work, and unknown ones are ignored.
    let r = c
        .get(s.url("/v1/packages?page=1&per_page=1000&order=desc&utm_source=x"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Paths: the door names the byte as it was sent.
    for (path, says) in [
        (
            "/v1/packages/my%FFapp/versions",
            "not the non-ASCII byte 0xff (sent as %FF)",
        ),
        (
            "/v1/packages/caf%C3%A9/versions",
            "not the non-ASCII byte 0xc3 (sent as %C3)",
        ),
        (
            "/v1/packages/my%20app/versions",
            "not a space (sent as %20)",
        ),
        (
            "/v1/packages/my%0Aapp/versions",
            "not the control byte 0x0a (sent as %0A)",
        ),
        ("/v1/packages/a%3Bb/versions", "not ';' (sent as %3B)"),
    ] {
        for method in [Method::GET, Method::POST] {
            let r = c
                .request(method.clone(), s.url(path))
                .bearer_auth(&s.admin)
                .send()
                .unwrap();
            let m = error_of(r, StatusCode::BAD_REQUEST);
            assert!(
                m.starts_with("the request path may contain only ASCII letters, digits, '.', '_', '-' and '/'"),
                "{method} {path}: {m}"
            );
            assert!(m.ends_with(says), "{method} {path}: {m}");
        }
    }
}

/// Item 5: an invalid organization name in a write is a 400 with the name
/// rule, as an invalid package name is; a read of a path that cannot exist
/// is a 404 that says why, the same for every kind of read.
#[test]
fn invalid_names_are_400_in_writes_and_404_saying_why_in_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let s = registry_with_jason(tmp.path(), &[]);
    let c = client();
    let before = snapshot(&s.tree());
    let org_rule = "invalid repository name \"Team\": must start with a lowercase ASCII letter";
    let name_rule = "invalid package name \"Jason\": must start with a lowercase ASCII letter";
    let archive = fixture("hex", "jason-1.4.4.tar");
    let tag = json!({"tag": "stable", "version": "1.4.4"})
        .to_string()
        .into_bytes();
    for (method, path, body, rule) in [
        (
            Method::POST,
            "/repos/Team/v1/packages/jason/1.4.4/any",
            archive.clone(),
            org_rule,
        ),
        (
            Method::POST,
            "/v1/packages/Jason/1.4.4/any",
            archive.clone(),
            name_rule,
        ),
        (
            Method::DELETE,
            "/repos/Team/v1/packages/jason/1.4.4/any",
            vec![],
            org_rule,
        ),
        (
            Method::DELETE,
            "/v1/packages/Jason/1.4.4/any",
            vec![],
            name_rule,
        ),
        (
            Method::POST,
            "/repos/Team/v1/packages/jason/tags",
            tag.clone(),
            org_rule,
        ),
        (
            Method::POST,
            "/v1/packages/Jason/tags",
            tag.clone(),
            name_rule,
        ),
    ] {
        // With a key and without: the request is wrong either way.
        for key in [Some(&s.admin), None] {
            let mut req = c.request(method.clone(), s.url(path)).body(body.clone());
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let m = error_of(req.send().unwrap(), StatusCode::BAD_REQUEST);
            assert_eq!(m, rule, "{method} {path}");
        }
    }
    assert_unchanged(&before, &snapshot(&s.tree()));

    for (path, says) in [
        ("/repos/Team/names", format!("no such file: {org_rule}")),
        (
            "/repos/Team/v1/packages/jason/versions",
            format!("no such file: {org_rule}"),
        ),
        (
            "/repos/Team/v1/packages/jason/tags",
            format!("no such file: {org_rule}"),
        ),
        (
            "/repos/Team/v1/search?q=jason",
            format!("no such repository: {org_rule}"),
        ),
        (
            "/v1/packages/Jason/versions",
            format!("no such file: {name_rule}"),
        ),
        (
            "/repos/acme/packages/Jason",
            format!("no such file: {name_rule}"),
        ),
        (
            "/v1/packages/jason/stable/any",
            "no such file: invalid version \"stable\": not a semantic version".to_string(),
        ),
        (
            "/v1/packages/jason/",
            "no such file: a path ending in '/' names no file (ask for /v1/packages/jason)"
                .to_string(),
        ),
        ("/v1/packages/jason/1.4.5/any", "no such file".to_string()),
        ("/no/such/file", "no such file".to_string()),
    ] {
        // Anonymous (the fast path when it can) and with a key: one answer.
        for key in [None, Some(&s.admin)] {
            let mut req = c.get(s.url(path));
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let m = error_of(req.send().unwrap(), StatusCode::NOT_FOUND);
            assert!(m.starts_with(&says), "GET {path}: {m}");
            if !says.contains(':') {
                assert_eq!(m, says, "GET {path}");
            }
        }
    }
    // nginx's check gives the same answer for the same path.
    let r = c
        .get(s.url("/v1/auth/check"))
        .header("x-original-uri", "/repos/Team/names")
        .send()
        .unwrap();
    assert_eq!(
        error_of(r, StatusCode::NOT_FOUND),
        format!("no such file: {org_rule}")
    );
    s.assert_tree_verifies();
}
