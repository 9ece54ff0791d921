//! The tree in a real S3-compatible server (moto's server mode, one
//! process per test): `init --store s3://…`, `serve`, `build` and `publish`
//! on a bucket, two servers on one bucket, conditional puts refusing a
//! stale writer, and the bucket read anonymously over plain HTTP answering
//! as `serve` does.
//!
//! moto checks `If-None-Match: *` and `If-Match` but does not lock between
//! the check and the write, so the races here show that the protocol works,
//! not that S3 serialises; `tests/publisher.rs` runs the retry loop on
//! object_store's in-memory store too.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use common::moto::Moto;
use common::*;
use niso::archive::inspect_file;
use niso::client::verify::{verify, VerifyOptions};
use niso::client::StoreTransport;
use niso::ident::RepoName;
use niso::index::{RepoKey, Signer};
use niso::limits::Limits;
use niso::publish::{Layout, Options, Publisher, StagedFile, Upload};
use niso::store::{
    Attributes, Body, ByteStream, Object, ObjectMeta, ObjectVersion, PutMode, Store, StoreError,
    TreePath,
};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

fn client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

fn upload(s: &Server, path: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    client()
        .post(s.url(path))
        .bearer_auth(&s.admin)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .unwrap()
}

/// A copy of a data directory (config, keys, key store, staging): what an
/// operator starts a second server from.
fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let dest = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A data directory whose tree is `s3://BUCKET/PREFIX`, made by `init`.
fn init_on(moto: &Moto, dir: &Path, url: &str) -> PathBuf {
    let dd = dir.join("data");
    let out = moto.niso_ok(&[
        "registry",
        "init",
        "--data-dir",
        p(&dd),
        "--name",
        "acme",
        "--store",
        url,
    ]);
    assert!(out.contains(&format!("The tree is in {url}")), "{out}");
    let config = std::fs::read_to_string(dd.join("niso-registry.toml")).unwrap();
    assert!(config.contains(&format!("store = \"{url}\"")), "{config}");
    dd
}

/// The repository's public key, read from the bucket, as a file.
fn public_key_file(moto: &Moto, bucket: &str, prefix: &str, dir: &Path) -> PathBuf {
    let r = client()
        .get(format!("{}/{bucket}/{prefix}/public_key", moto.endpoint))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let path = dir.join("acme.pem");
    std::fs::write(&path, r.bytes().unwrap()).unwrap();
    path
}

fn verify_args<'a>(target: &'a str, key: &'a Path) -> Vec<&'a str> {
    vec![
        "registry",
        "verify",
        target,
        "--public-key",
        p(key),
        "--name",
        "acme",
    ]
}

/// Every object of the tree, read through the store (path -> bytes).
fn bucket_snapshot(store: &Arc<dyn Store>) -> BTreeMap<String, Vec<u8>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut out = BTreeMap::new();
        for path in store.list("").await.unwrap() {
            let obj = store.get(&path).await.unwrap().expect("listed object");
            out.insert(path.to_string(), obj.bytes.to_vec());
        }
        out
    })
}

/// The URL `serve` answers for the object at `key` (the one a static host
/// cannot map by itself: `GET /v1/packages` is `v1/packages/index.json`).
fn serve_path(key: &str) -> String {
    match key.strip_suffix("/index.json") {
        Some(dir) => format!("/{dir}"),
        None => format!("/{key}"),
    }
}

#[test]
fn a_bucket_tree_answers_like_serve_and_verifies_over_http_and_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    moto.create_bucket("reg", Some("tree"));
    let dd = init_on(&moto, tmp.path(), "s3://reg/tree");
    let s = moto.serve(&dd, &[]);

    for f in niso_fixtures() {
        let name = f.file_name().unwrap().to_str().unwrap();
        // my-app-1.1.0-x86_64.niso
        let rest = name.trim_end_matches(".niso").trim_start_matches("my-app-");
        let (version, arch) = rest.split_once('-').unwrap();
        let r = upload(
            &s,
            &format!("/v1/packages/my-app/{version}/{arch}"),
            std::fs::read(&f).unwrap(),
        );
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
    }
    for f in hex_fixtures() {
        let name = f.file_name().unwrap().to_str().unwrap();
        let (pkg, version) = name.trim_end_matches(".tar").split_once('-').unwrap();
        let r = upload(
            &s,
            &format!("/v1/packages/{pkg}/{version}/any"),
            std::fs::read(&f).unwrap(),
        );
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
    }
    // An organization repository, in the same bucket.
    let r = upload(
        &s,
        "/repos/team/v1/packages/jason/1.4.4/any",
        std::fs::read(fixtures().join("hex/jason-1.4.4.tar")).unwrap(),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let c = client();
    let r = c
        .post(s.url("/v1/packages/my-app/tags"))
        .bearer_auth(&s.admin)
        .json(&serde_json::json!({"tag": "stable", "version": "1.0.0"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A delete: its archive and v1 files leave the bucket.
    let r = c
        .delete(s.url("/v1/packages/plug/1.17.0-rc.0/any"))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The tree is in the bucket, under the prefix, and nowhere else.
    let store = moto.store("reg", "tree");
    let objects = bucket_snapshot(&store);
    for key in [
        "names",
        "versions",
        "public_key",
        "freshness",
        "packages/jason",
        "niso/packages/my-app",
        "tarballs/jason-1.4.4.tar",
        "archives/my-app-1.1.0-x86_64.niso",
        "v1/packages/index.json",
        "v1/packages/my-app/versions",
        "v1/packages/my-app/tags",
        "v1/packages/my-app/1.1.0/manifest",
        "v1/packages/my-app/1.1.0/aarch64",
        "v1/packages/my-app/latest/x86_64",
        "v1/packages/jason/1.4.4/any",
        "repos/team/names",
        "repos/team/tarballs/jason-1.4.4.tar",
        "repos/team/v1/packages/index.json",
    ] {
        assert!(objects.contains_key(key), "{key} is not in the bucket");
    }
    assert!(!objects.contains_key("tarballs/plug-1.17.0-rc.0.tar"));
    assert!(!objects.contains_key("v1/packages/plug/1.17.0-rc.0/any"));
    assert!(objects.keys().any(|k| k.starts_with("freshness-bins/")));
    let whole = bucket_snapshot(&moto.store("reg", ""));
    assert!(
        whole.keys().all(|k| k.starts_with("tree/")),
        "objects outside the prefix: {:?}",
        whole
            .keys()
            .filter(|k| !k.starts_with("tree/"))
            .collect::<Vec<_>>()
    );
    assert!(
        snapshot(&dd.join("public")).is_empty(),
        "the tree must not be written to the data directory"
    );

    // Every object of the root repository, read anonymously from the
    // bucket over plain HTTP, answers as serve answers its URL; those of
    // an organization are not anyone's to read, and serve sends them with
    // the attributes the bucket keeps.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut immutable = 0;
    let mut private = 0;
    for (key, bytes) in &objects {
        let from_bucket = c
            .get(format!("{}/reg/tree/{key}", moto.endpoint))
            .send()
            .unwrap();
        let (rel, org) = niso::index::layout::split_repository(key);
        let from_serve = if org {
            assert_eq!(from_bucket.status(), StatusCode::FORBIDDEN, "bucket {key}");
            private += 1;
            c.get(s.url(&serve_path(key)))
                .bearer_auth(&s.admin)
                .send()
                .unwrap()
        } else {
            c.get(s.url(&serve_path(key))).send().unwrap()
        };
        assert_eq!(from_serve.status(), StatusCode::OK, "serve {key}");
        let stored = rt
            .block_on(store.head(&TreePath::new(key.as_str()).unwrap()))
            .unwrap()
            .unwrap()
            .attributes
            .unwrap();
        let header = |r: &reqwest::blocking::Response, h: &str| {
            r.headers().get(h).map(|v| v.to_str().unwrap().to_string())
        };
        let (cache, disposition) = (
            header(&from_serve, "cache-control").unwrap(),
            header(&from_serve, "content-disposition"),
        );
        assert_eq!(stored.cache_control, cache, "{key}");
        assert_eq!(stored.content_disposition, disposition, "{key}");
        assert_eq!(
            Some(stored.content_type),
            header(&from_serve, "content-type"),
            "{key}"
        );
        if !org {
            assert_eq!(from_bucket.status(), StatusCode::OK, "bucket {key}");
            assert!(from_bucket.headers().contains_key("etag"), "{key}: no ETag");
            // The same ETag too: serve's is the object's.
            for h in [
                "content-type",
                "cache-control",
                "content-disposition",
                "etag",
            ] {
                assert_eq!(
                    header(&from_bucket, h),
                    header(&from_serve, h),
                    "{key}: {h}"
                );
            }
            assert_eq!(
                &from_bucket.bytes().unwrap()[..],
                &bytes[..],
                "bucket {key}"
            );
        }
        let visibility = if org { "private" } else { "public" };
        use niso::index::layout::FileKind as K;
        match K::of(rel) {
            K::Archive | K::Download => {
                assert_eq!(
                    cache,
                    format!("{visibility}, max-age=31536000, immutable"),
                    "{key}"
                );
                let d = disposition.unwrap_or_default();
                assert!(d.starts_with("attachment; filename="), "{key}: {d}");
                immutable += 1;
            }
            K::Latest => {
                assert_eq!(cache, format!("{visibility}, no-cache"), "{key}");
                assert!(disposition.is_some(), "{key}");
            }
            _ => assert_eq!(cache, format!("{visibility}, no-cache"), "{key}"),
        }
        assert_eq!(&from_serve.bytes().unwrap()[..], &bytes[..], "serve {key}");
    }
    assert!(private >= 10, "only {private} objects of the organization");
    assert!(immutable >= 12, "only {immutable} archives and downloads");
    // A private bucket's objects are not anyone's to read.
    moto.create_bucket("closed", None);
    let closed = moto.store("closed", "");
    rt.block_on(closed.put(
        &TreePath::new("names").unwrap(),
        b"x".to_vec().into(),
        &niso::index::layout::attributes("names", None),
        PutMode::Overwrite,
    ))
    .unwrap();
    let r = c
        .get(format!("{}/closed/names", moto.endpoint))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // verify, over anonymous HTTP, through S3, and through the data
    // directory's configured store.
    let key = public_key_file(&moto, "reg", "tree", tmp.path());
    let http = format!("{}/reg/tree", moto.endpoint);
    for target in [http.as_str(), "s3://reg/tree", p(&dd)] {
        let out = moto.niso(&verify_args(target, &key));
        assert_eq!(out.status.code(), Some(0), "{target}:\n{}", text(&out));
        assert!(text(&out).contains("0 problems"), "{}", text(&out));
        // Through a store the organization is found and checked too.
        let org = text(&out).contains("Repository team: 1 packages, 1 releases");
        assert_eq!(org, !target.starts_with("http"), "{}", text(&out));
    }
    // ... and verify sees a broken bucket.
    rt.block_on(store.put(
        &TreePath::new("tarballs/jason-1.4.4.tar").unwrap(),
        b"not the tarball".to_vec().into(),
        &niso::index::layout::attributes("tarballs/jason-1.4.4.tar", None),
        PutMode::Overwrite,
    ))
    .unwrap();
    for target in [http.as_str(), "s3://reg/tree"] {
        let out = moto.niso(&verify_args(target, &key));
        assert_eq!(out.status.code(), Some(1), "{target}:\n{}", text(&out));
        assert!(text(&out).contains("jason"), "{}", text(&out));
    }
    rt.block_on(store.put(
        &TreePath::new("tarballs/jason-1.4.4.tar").unwrap(),
        objects["tarballs/jason-1.4.4.tar"].clone().into(),
        &niso::index::layout::attributes("tarballs/jason-1.4.4.tar", None),
        PutMode::Overwrite,
    ))
    .unwrap();

    // niso's own client adds the bucket as a registry and pulls from it.
    let home = tmp.path().join("client");
    let client_cmd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_niso"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_STATE_HOME", home.join("state"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}:\n{}", text(&out));
        text(&out)
    };
    client_cmd(&["registry", "add", "bucket", &http, "--yes"]);
    let out = client_cmd(&["pull", "my-app:stable", "--arch", "x86_64"]);
    assert!(out.contains("Pulled my-app 1.0.0 (x86_64)"), "{out}");

    // A real Hex client reads a copy of the bucket.
    let copy = tmp.path().join("copy");
    for (k, bytes) in &objects {
        let dest = copy.join(k);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
    let (ok, out) = hex_client_check(&copy, "acme", &key);
    assert!(ok, "{out}");
}

#[test]
fn init_refuses_a_bucket_it_cannot_use_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    let dd = tmp.path().join("data");
    let init = |url: &str| {
        moto.niso(&[
            "registry",
            "init",
            "--data-dir",
            p(&dd),
            "--name",
            "acme",
            "--store",
            url,
        ])
    };
    // No such bucket: S3's own words, once, cut to what matters.
    let out = init("s3://nothere/tree");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("NoSuchBucket: The specified bucket does not exist"),
        "{msg}"
    );
    assert!(!msg.contains("<?xml"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(!dd.exists(), "a refused init left {}", dd.display());
    // A plain http:// endpoint without AWS_ALLOW_HTTP.
    moto.create_bucket("reg", None);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_niso"))
        .args(["registry", "init", "--data-dir", p(&dd), "--name", "acme"])
        .args(["--store", "s3://reg/tree"])
        .envs(moto.env())
        .env_remove("AWS_ALLOW_HTTP")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("set AWS_ALLOW_HTTP=true"),
        "{}",
        text(&out)
    );
    assert!(!dd.exists());
    // A prefix that holds another repository's tree (another key).
    let other = tmp.path().join("other");
    moto.niso_ok(&[
        "registry",
        "init",
        "--data-dir",
        p(&other),
        "--name",
        "acme",
        "--store",
        "s3://reg/taken",
    ]);
    let out = init("s3://reg/taken");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("s3://reg/taken: freshness: signature does not verify"),
        "{}",
        text(&out)
    );
    assert!(!dd.exists());
    // And once the bucket is right, init works.
    init_on(&moto, tmp.path(), "s3://reg/tree");
}

/// A Hex tarball upload through `s`: (status, name, version, bytes).
fn push(s: &Server, name: &str, version: &str) -> (u16, bool, Vec<u8>) {
    let bytes = hex_tarball(name, version);
    let r = upload(
        s,
        &format!("/v1/packages/{name}/{version}/any"),
        bytes.clone(),
    );
    let again = r.headers().contains_key("x-niso-already-published");
    (r.status().as_u16(), again, bytes)
}

/// Every (name, version) the tree lists, from niso's own indexes.
fn listed(s: &Server) -> BTreeMap<String, Vec<String>> {
    let list: Value = client()
        .get(s.url("/v1/packages"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    list["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let versions = p["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), versions)
        })
        .collect()
}

#[test]
fn two_servers_on_one_bucket_lose_no_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    moto.create_bucket("reg", Some("tree"));
    let dd = init_on(&moto, tmp.path(), "s3://reg/tree");
    let dd2 = tmp.path().join("data2");
    copy_dir(&dd, &dd2);
    let a = Arc::new(moto.serve(&dd, &[]));
    let b = Arc::new(moto.serve(&dd2, &[]));

    // Four clients, two on each server, at once: the same packages in
    // distinct versions on both servers (so both rewrite the same package
    // indexes and every shared file), and the same bytes on both.
    let mut threads = Vec::new();
    for t in 0..4usize {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        threads.push(std::thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0..6usize {
                let name = format!("pkg{}", i % 3);
                let version = format!("{}.{}.0", t + 1, i);
                done.push((name.clone(), version.clone(), push(&s, &name, &version)));
                if i % 3 == 0 {
                    let (n, v) = ("same".to_string(), format!("1.{i}.0"));
                    done.push((n.clone(), v.clone(), push(&s, &n, &v)));
                }
            }
            done
        }));
    }
    let mut acknowledged = Vec::new();
    for t in threads {
        for (name, version, (status, again, bytes)) in t.join().unwrap() {
            assert!(
                status == 201 || (status == 200 && again),
                "{name} {version}: {status}"
            );
            acknowledged.push((name, version, bytes));
        }
    }
    assert_eq!(acknowledged.len(), 32);

    // Every acknowledged upload is in the final tree, seen by both
    // servers, and its tarball in the bucket holds its bytes.
    let (la, lb) = (listed(&a), listed(&b));
    assert_eq!(la, lb, "the servers disagree");
    let c = client();
    for (name, version, bytes) in &acknowledged {
        assert!(
            la.get(name).is_some_and(|v| v.contains(version)),
            "{name} {version} was acknowledged but is not listed: {la:?}"
        );
        let r = c
            .get(format!(
                "{}/reg/tree/tarballs/{name}-{version}.tar",
                moto.endpoint
            ))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{name} {version}");
        assert_eq!(&r.bytes().unwrap()[..], &bytes[..], "{name} {version}");
    }
    assert_eq!(la.values().map(Vec::len).sum::<usize>(), 24 + 2);
    let key = public_key_file(&moto, "reg", "tree", tmp.path());
    for target in [
        format!("{}/reg/tree", moto.endpoint),
        "s3://reg/tree".into(),
    ] {
        let out = moto.niso(&verify_args(&target, &key));
        assert_eq!(out.status.code(), Some(0), "{target}:\n{}", text(&out));
    }
}

#[test]
fn build_and_publish_work_on_the_bucket_while_serve_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    moto.create_bucket("reg", Some("tree"));
    let dd = init_on(&moto, tmp.path(), "s3://reg/tree");
    // A second data directory whose config names no store: `--store`
    // points it at the bucket.
    let dd2 = tmp.path().join("data2");
    copy_dir(&dd, &dd2);
    std::fs::write(dd2.join("niso-registry.toml"), "name = \"acme\"\n").unwrap();
    let s = Arc::new(moto.serve(&dd, &[]));

    let files: Vec<PathBuf> = (0..4)
        .map(|i| {
            let f = tmp.path().join(format!("offline-1.{i}.0.tar"));
            std::fs::write(&f, hex_tarball("offline", &format!("1.{i}.0"))).unwrap();
            f
        })
        .collect();
    let uploads = {
        let s = s.clone();
        std::thread::spawn(move || {
            (0..8)
                .map(|i| {
                    let v = format!("1.{i}.0");
                    push(&s, if i % 2 == 0 { "online" } else { "offline" }, &v).0
                })
                .collect::<Vec<_>>()
        })
    };
    let mut args = vec!["registry", "publish", "--data-dir", p(&dd2)];
    args.extend(["--store", "s3://reg/tree"]);
    let names: Vec<&str> = files.iter().map(|f| p(f)).collect();
    args.extend(names);
    let publish = {
        let moto_env = moto.env();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_niso"))
                .args(&args)
                .envs(moto_env)
                .output()
                .unwrap()
        })
    };
    let build = moto.niso(&["registry", "build", "--data-dir", p(&dd)]);
    assert_eq!(build.status.code(), Some(0), "{}", text(&build));
    let published = publish.join().unwrap();
    assert_eq!(published.status.code(), Some(0), "{}", text(&published));
    // `offline` 1.1.0 and 1.3.0 came through both doors: whichever was
    // second found the same bytes in place.
    for status in uploads.join().unwrap() {
        assert!(status == 201 || status == 200, "{status}");
    }
    // And a build after all of them changes nothing it does not have to.
    moto.niso_ok(&["registry", "build", "--data-dir", p(&dd)]);

    let l = listed(&s);
    assert_eq!(
        l.get("online").map(Vec::len),
        Some(4),
        "online releases: {l:?}"
    );
    assert_eq!(
        l.get("offline").map(Vec::len),
        Some(6),
        "offline releases: {l:?}"
    );
    let key = public_key_file(&moto, "reg", "tree", tmp.path());
    let out = moto.niso(&verify_args("s3://reg/tree", &key));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

// ---------------------------------------------------------------------
// The store and the publisher in this process, on moto.

fn key() -> Arc<RepoKey> {
    static KEY: OnceLock<Arc<RepoKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(RepoKey::generate().unwrap()))
        .clone()
}

async fn open_publisher(store: Arc<dyn Store>) -> Publisher {
    let signer: Arc<dyn Signer> = key();
    Publisher::open(
        store,
        signer,
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .await
    .unwrap()
}

fn staged(bytes: &[u8]) -> Upload {
    let path = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::write(&path, bytes).unwrap();
    Upload {
        info: inspect_file(&path, &Limits::default()).unwrap(),
        staged: StagedFile::Owned(path),
        uploaded_at: niso::publish::unix_now(),
        signature: None,
    }
}

async fn problems(store: Arc<dyn Store>) -> Vec<String> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let t = StoreTransport::new(store, "", handle);
        verify(
            &t,
            &VerifyOptions {
                repository: "acme".into(),
                public_key: key().public_key().clone(),
                limits: Limits::default(),
                now: niso::publish::unix_now(),
                listing: None,
                allow_expired: false,
            },
        )
        .problems
    })
    .await
    .unwrap()
}

/// A store that counts reads, and the conditional puts of indexes the
/// server refused (an update of a version another writer replaced, or a
/// create of what another writer created).
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn Store>,
    refused: AtomicUsize,
    /// Objects read (each a request on S3).
    reads: AtomicUsize,
}

impl Watched {
    fn note<T>(&self, path: &TreePath, r: Result<T, StoreError>) -> Result<T, StoreError> {
        let archive =
            path.as_str().starts_with("tarballs/") || path.as_str().starts_with("archives/");
        if let Err(StoreError::Precondition { .. } | StoreError::AlreadyExists { .. }) = &r {
            if !archive {
                self.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
        r
    }
}

#[async_trait::async_trait]
impl Store for Watched {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn get(&self, path: &TreePath) -> Result<Option<Object>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(path).await
    }
    async fn get_stream(
        &self,
        path: &TreePath,
    ) -> Result<Option<(ObjectMeta, ByteStream)>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_stream(path).await
    }
    async fn head(&self, path: &TreePath) -> Result<Option<ObjectMeta>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.head(path).await
    }
    async fn put(
        &self,
        path: &TreePath,
        body: Body,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let r = self.inner.put(path, body, attributes, mode).await;
        self.note(path, r)
    }
    async fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        let r = self.inner.copy(from, to, attributes, mode).await;
        self.note(to, r)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn list_versions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(TreePath, ObjectVersion)>, StoreError> {
        self.inner.list_versions(prefix).await
    }
    async fn delete(&self, path: &TreePath) -> Result<(), StoreError> {
        self.inner.delete(path).await
    }
}

fn tp(s: &str) -> TreePath {
    TreePath::new(s).unwrap()
}

#[test]
fn conditional_puts_on_s3_refuse_a_stale_writer_and_it_recovers() {
    let moto = Moto::start();
    moto.create_bucket("reg", None);
    let store = moto.store("reg", "tree");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(stale_writers(store));
}

async fn stale_writers(store: Arc<dyn Store>) {
    let attrs = niso::index::layout::attributes("names", None);

    // The store's contract, on a real S3 protocol.
    let names = tp("names");
    let v1 = store
        .put(&names, b"one".to_vec().into(), &attrs, PutMode::Create)
        .await
        .unwrap();
    assert!(matches!(
        store
            .put(&names, b"two".to_vec().into(), &attrs, PutMode::Create)
            .await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let v2 = store
        .put(
            &names,
            b"two".to_vec().into(),
            &attrs,
            PutMode::Update(v1.clone()),
        )
        .await
        .unwrap();
    assert_ne!(v1, v2);
    let stale = store
        .put(
            &names,
            b"three".to_vec().into(),
            &attrs,
            PutMode::Update(v1.clone()),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::Precondition { .. })),
        "{stale:?}"
    );
    // An update of an object another writer removed is a conflict too.
    let gone = store
        .put(
            &tp("versions"),
            b"x".to_vec().into(),
            &attrs,
            PutMode::Update(v1),
        )
        .await;
    assert!(
        matches!(gone, Err(StoreError::Precondition { .. })),
        "{gone:?}"
    );
    let got = store.get(&names).await.unwrap().unwrap();
    assert_eq!(&got.bytes[..], b"two");
    assert_eq!(got.meta.version, v2);
    assert_eq!(got.meta.attributes.as_ref(), Some(&attrs));
    let head = store.head(&names).await.unwrap().unwrap();
    assert_eq!((head.version, head.size), (v2.clone(), 3));
    // A listing names the same versions a read does (a reload compares
    // them to skip what did not change).
    assert_eq!(
        store.list_versions("").await.unwrap(),
        vec![(names.clone(), v2.clone())]
    );

    // Copies: a v1 download (same attributes: server-side) and `latest`
    // (other attributes: through this process, and through a temp file
    // when large), each keeping its own attributes.
    for (version, size) in [("1.0.0", 4096), ("2.0.0", 9 << 20)] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let file = format!("a-{version}-x86_64.niso");
        let archive = tp(&format!("archives/{file}"));
        let archive_attrs = niso::index::layout::attributes(archive.as_str(), None);
        let av = store
            .put(
                &archive,
                body.clone().into(),
                &archive_attrs,
                PutMode::Create,
            )
            .await
            .unwrap();
        for to in [
            format!("v1/packages/a/{version}/x86_64"),
            "v1/packages/a/latest/x86_64".to_string(),
        ] {
            let to = tp(&to);
            let a = niso::index::layout::attributes(to.as_str(), Some(&file));
            let v = store
                .copy(&archive, &to, &a, PutMode::Overwrite)
                .await
                .unwrap();
            // The same bytes in one PUT or copy: the same ETag, which is
            // how recovery sees that a copy is current.
            assert_eq!(v, av, "{to}");
            let got = store.get(&to).await.unwrap().unwrap();
            assert_eq!(got.meta.attributes.as_ref(), Some(&a), "{to}");
            assert!(got.bytes[..] == body[..], "{to}: other bytes");
            assert!(matches!(
                store.copy(&archive, &to, &a, PutMode::Create).await,
                Err(StoreError::AlreadyExists { .. })
            ));
        }
    }
    for p in store.list("").await.unwrap() {
        store.delete(&p).await.unwrap();
    }
    store.delete(&names).await.unwrap();
    assert!(store.list("").await.unwrap().is_empty());

    // Two publishers; the second is stale when it writes, its conditional
    // puts are refused, and it reloads and retries.
    let watch = || {
        Arc::new(Watched {
            inner: store.clone(),
            refused: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        })
    };
    let (wa, wb) = (watch(), watch());
    let a = open_publisher(wa.clone()).await;
    let b = open_publisher(wb.clone()).await;
    a.publish(staged(&hex_tarball("shared", "1.0.0")))
        .await
        .unwrap();
    a.publish(staged(&hex_tarball("only-a", "1.0.0")))
        .await
        .unwrap();
    assert_eq!(wa.refused.load(Ordering::SeqCst), 0);
    let before = wb.reads.load(Ordering::SeqCst);
    let r = b
        .publish(staged(&hex_tarball("shared", "2.0.0")))
        .await
        .unwrap();
    assert!(r.created);
    // Its reload read what changed, not every one of the 256 freshness
    // bins (each read is a request on S3).
    let reads = wb.reads.load(Ordering::SeqCst) - before;
    assert!(reads < 40, "{reads} reads for one publish after a conflict");
    assert!(
        wb.refused.load(Ordering::SeqCst) > 0,
        "the stale writer's puts were not refused"
    );
    let c = open_publisher(store.clone()).await;
    assert_eq!(c.package("shared").await.unwrap().releases.len(), 2);
    assert!(c.package("only-a").await.is_some());
    let found = problems(store.clone()).await;
    assert!(found.is_empty(), "{found:#?}");
    // And now A is the stale one.
    a.publish(staged(&hex_tarball("shared", "3.0.0")))
        .await
        .unwrap();
    assert!(wa.refused.load(Ordering::SeqCst) > 0);
    let c = open_publisher(store.clone()).await;
    assert_eq!(c.package("shared").await.unwrap().releases.len(), 3);
    assert!(problems(store).await.is_empty());
}

/// A store that stops a writer at its first put under `prefix` until the
/// test lets it go: a slow writer, at the worst moment, made deterministic.
#[derive(Debug)]
struct Gate {
    inner: Arc<dyn Store>,
    prefix: &'static str,
    arrived: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
    used: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn new(inner: Arc<dyn Store>, prefix: &'static str) -> Arc<Self> {
        Arc::new(Self {
            inner,
            prefix,
            arrived: Arc::default(),
            go: Arc::default(),
            used: Default::default(),
        })
    }
}

#[async_trait::async_trait]
impl Store for Gate {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn get(&self, path: &TreePath) -> Result<Option<Object>, StoreError> {
        self.inner.get(path).await
    }
    async fn get_stream(
        &self,
        path: &TreePath,
    ) -> Result<Option<(ObjectMeta, ByteStream)>, StoreError> {
        self.inner.get_stream(path).await
    }
    async fn head(&self, path: &TreePath) -> Result<Option<ObjectMeta>, StoreError> {
        self.inner.head(path).await
    }
    async fn put(
        &self,
        path: &TreePath,
        body: Body,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        if path.as_str().starts_with(self.prefix) && !self.used.swap(true, Ordering::SeqCst) {
            self.arrived.notify_one();
            self.go.notified().await;
        }
        self.inner.put(path, body, attributes, mode).await
    }
    async fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        self.inner.copy(from, to, attributes, mode).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<TreePath>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn list_versions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(TreePath, ObjectVersion)>, StoreError> {
        self.inner.list_versions(prefix).await
    }
    async fn delete(&self, path: &TreePath) -> Result<(), StoreError> {
        self.inner.delete(path).await
    }
}

/// Two writers of one package, the first stopped at `prefix`, the second
/// stopped there too (for a freshness bin) or run through: whatever order
/// their writes land in, the tree ends up agreeing with itself.
async fn interleaved(store: Arc<dyn Store>, prefix: &'static str, stop_both: bool) {
    for p in store.list("").await.unwrap() {
        store.delete(&p).await.unwrap();
    }
    let ga = Gate::new(store.clone(), prefix);
    let gb = Gate::new(store.clone(), if stop_both { prefix } else { "-" });
    let a = Arc::new(open_publisher(ga.clone()).await);
    let b = Arc::new(open_publisher(gb.clone()).await);
    let pa = {
        let a = a.clone();
        tokio::spawn(async move { a.publish(staged(&hex_tarball("shared", "1.0.0"))).await })
    };
    ga.arrived.notified().await;
    let pb = {
        let b = b.clone();
        tokio::spawn(async move { b.publish(staged(&hex_tarball("shared", "2.0.0"))).await })
    };
    if stop_both {
        gb.arrived.notified().await;
        ga.go.notify_one();
        pa.await.unwrap().unwrap();
        gb.go.notify_one();
        pb.await.unwrap().unwrap();
    } else {
        pb.await.unwrap().unwrap();
        ga.go.notify_one();
        pa.await.unwrap().unwrap();
    }
    let c = open_publisher(store.clone()).await;
    assert_eq!(c.package("shared").await.unwrap().releases.len(), 2);
    let found = problems(store).await;
    assert!(found.is_empty(), "stopped at {prefix}: {found:#?}");
}

#[test]
fn a_writer_overtaken_half_way_leaves_no_stale_file_behind() {
    let moto = Moto::start();
    moto.create_bucket("reg", None);
    let store = moto.store("reg", "tree");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A has written the package's niso index and is slow to write its Hex
    // index; B reads A's, adds its release and finishes; then A's Hex index
    // lands over B's.
    rt.block_on(interleaved(store.clone(), "packages/", false));
    // The same with a v1 document (what `GET /v1/packages/NAME/versions`
    // answers).
    rt.block_on(interleaved(
        store.clone(),
        "v1/packages/shared/versions",
        false,
    ));
    // A and B both stop before the package's freshness bin, B having
    // replaced A's index; A's bin (naming A's index) lands first, then
    // B's is refused.
    rt.block_on(interleaved(store, "freshness-bins/", true));
}
