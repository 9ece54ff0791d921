//! End-to-end tests of the repository engine through the built binary:
//! `niso registry init | build | publish | verify` and `niso package`, with a
//! real Hex client (rebar3's hex_core) reading what niso writes.

mod common;

use std::path::Path;

use common::*;

fn publish_all_fixtures(dd: &Path) {
    let mut args = vec![
        "registry".to_string(),
        "publish".into(),
        "--data-dir".into(),
        p(dd).into(),
    ];
    for f in hex_fixtures().iter().chain(niso_fixtures().iter()) {
        args.push(p(f).into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    niso_ok(&args);
}

fn verify(dd: &Path, name: &str) -> (Option<i32>, String) {
    let key = dd.join("public/public_key");
    let out = niso(&[
        "registry",
        "verify",
        p(dd),
        "--public-key",
        p(&key),
        "--name",
        name,
    ]);
    (out.status.code(), text(&out))
}

#[test]
fn init_build_verify_on_real_archives_and_a_hex_client_accepts_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    let public = dd.join("public");
    std::fs::create_dir_all(public.join("tarballs")).unwrap();
    std::fs::create_dir_all(public.join("archives")).unwrap();
    for f in hex_fixtures() {
        std::fs::copy(&f, public.join("tarballs").join(f.file_name().unwrap())).unwrap();
    }
    for f in niso_fixtures() {
        std::fs::copy(&f, public.join("archives").join(f.file_name().unwrap())).unwrap();
    }
    let out = niso_ok(&["registry", "build", "--data-dir", p(&dd)]);
    assert!(
        out.contains("Built acme: 4 packages, 7 releases, 8 archives"),
        "{out}"
    );
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("0 problems"), "{out}");

    let (ok, out) = hex_client_check(&public, "acme", &public.join("public_key"));
    assert!(ok, "Hex client rejected the tree:\n{out}");
    // Hex's view holds the Hex releases only: my-app (.niso) is not in it.
    assert!(out.contains("ok 3 packages 5 releases"), "{out}");
    // The Hex client must see every Hex release.
    for rel in [
        "decimal-2.0.0",
        "decimal-2.1.1",
        "jason-1.4.4",
        "plug-1.16.0",
        "plug-1.17.0-rc.0",
    ] {
        assert!(
            out.contains(&format!("tarball {rel}.tar ok")),
            "{rel} not checked:\n{out}"
        );
    }
    // A wrong repository name is refused by the Hex client too.
    let (ok, _) = hex_client_check(&public, "hexpm", &public.join("public_key"));
    assert!(!ok);
}

#[test]
fn rebuild_after_incremental_publishes_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    // One invocation per archive: each one is a separate incremental publish.
    for f in hex_fixtures().iter().chain(niso_fixtures().iter()) {
        niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(f)]);
    }
    let before = snapshot(&dd.join("public"));
    let out = niso_ok(&["registry", "build", "--data-dir", p(&dd)]);
    let after = snapshot(&dd.join("public"));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "rebuild changed the set of files"
    );
    for (path, bytes) in &before {
        if path == "freshness" {
            // Re-signed with a higher generation on every change.
            assert_ne!(bytes, &after[path]);
            continue;
        }
        assert_eq!(bytes, &after[path], "{path} differs after rebuild");
    }
    assert!(out.contains("0 removed"), "{out}");
}

#[test]
fn verify_detects_a_tampered_archive_and_so_does_the_hex_client() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let public = dd.join("public");
    flip_byte(&public.join("tarballs/plug-1.16.0.tar"));
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plug 1.16.0 (any)"), "{out}");
    let (ok, out) = hex_client_check(&public, "acme", &public.join("public_key"));
    assert!(!ok, "{out}");
    assert!(out.contains("plug 1.16.0"), "{out}");
}

#[test]
fn verify_detects_a_tampered_niso_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    // A hard link in v1/ shares the bytes: tampering shows in both places.
    flip_byte(&dd.join("public/archives/my-app-1.1.0-x86_64.niso"));
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("my-app 1.1.0 (x86_64)"), "{out}");
}

#[test]
fn verify_detects_a_tampered_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let public = dd.join("public");
    for index in ["packages/jason", "versions", "names"] {
        let path = public.join(index);
        let original = std::fs::read(&path).unwrap();
        flip_byte(&path);
        let (code, out) = verify(&dd, "acme");
        assert_eq!(code, Some(1), "tampered {index} passed:\n{out}");
        assert!(out.contains(index), "{out}");
        let (ok, _) = hex_client_check(&public, "acme", &public.join("public_key"));
        assert!(!ok, "Hex client accepted a tampered {index}");
        std::fs::write(&path, original).unwrap();
    }
    assert_eq!(verify(&dd, "acme").0, Some(0));
}

#[test]
fn verify_detects_a_replayed_old_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    let niso = niso_fixtures();
    niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(&niso[0])]);
    let public = dd.join("public");
    let bin = {
        use sha2::Digest;
        format!("freshness-bins/{:02x}", sha2::Sha256::digest("my-app")[0])
    };
    let old = std::fs::read(public.join("niso/packages/my-app")).unwrap();
    let old_bin = std::fs::read(public.join(&bin)).unwrap();
    niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(&niso[1])]);
    // The old index is validly signed: only the freshness sidecar tells.
    std::fs::write(public.join("niso/packages/my-app"), old).unwrap();
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("niso/packages/my-app: does not match its digest in freshness"),
        "{out}"
    );
    // Replaying the package's freshness bin with it does not help: the
    // signed record holds the bin's digest.
    std::fs::write(public.join(&bin), old_bin).unwrap();
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("{bin}: does not match its digest in freshness")),
        "{out}"
    );
}

#[test]
fn a_bad_archive_is_refused_with_a_precise_error_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let before = snapshot(&dd.join("public"));
    let bad = tmp.path().join("bad.tar");
    let mut bytes = std::fs::read(&hex_fixtures()[0]).unwrap();
    bytes[600] ^= 0x20; // inside VERSION/CHECKSUM's data blocks
    std::fs::write(&bad, bytes).unwrap();
    let out = niso(&["registry", "publish", "--data-dir", p(&dd), p(&bad)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("bad.tar"), "{}", text(&out));
    let garbage = tmp.path().join("garbage.niso");
    std::fs::write(&garbage, b"\x1f\x8bnot really gzip").unwrap();
    let out = niso(&["registry", "publish", "--data-dir", p(&dd), p(&garbage)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("not a valid gzip-compressed tar"),
        "{}",
        text(&out)
    );
    assert_eq!(
        before,
        snapshot(&dd.join("public")),
        "a refused archive changed the tree"
    );
}

#[test]
fn a_published_version_is_immutable() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    let f = &niso_fixtures()[0]; // my-app 1.0.0 x86_64
    niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(f)]);
    let before = snapshot(&dd.join("public"));
    // The same bytes again: a success that changes nothing (safe to re-run).
    let out = niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(f)]);
    assert!(out.contains("Already published"), "{out}");
    assert_eq!(before, snapshot(&dd.join("public")));
    // Other bytes under the same name, version and arch: refused.
    let src = tempfile::tempdir().unwrap();
    let pkg = src.path().join("pkg");
    std::fs::create_dir_all(pkg.join("payload/bin")).unwrap();
    std::fs::write(pkg.join("payload/bin/my-app"), "other bytes").unwrap();
    std::fs::write(
        pkg.join("niso.toml"),
        "[package]\nname = \"my-app\"\nversion = \"1.0.0\"\narch = \"x86_64\"\ndescription = \"My application\"\n[binary]\nentrypoint = \"bin/my-app\"\n",
    )
    .unwrap();
    let (other, _) =
        niso::archive::niso::create(&pkg, src.path(), &niso::limits::Limits::default()).unwrap();
    let out = niso(&["registry", "publish", "--data-dir", p(&dd), p(&other)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("my-app 1.0.0 (x86_64) is already published with other bytes"),
        "{}",
        text(&out)
    );
    assert_eq!(before, snapshot(&dd.join("public")));
}

#[test]
fn build_works_on_a_plain_directory_of_tarballs_with_an_imported_pkcs1_key() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("public");
    std::fs::create_dir_all(tree.join("tarballs")).unwrap();
    for f in hex_fixtures() {
        std::fs::copy(&f, tree.join("tarballs").join(f.file_name().unwrap())).unwrap();
    }
    let key = fixtures().join("keys/pkcs1.pem");
    let public = fixtures().join("keys/pkcs1.pub.pem");
    // Without a name and key it says what to do.
    let out = niso(&["registry", "build", "--data-dir", p(&tree)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("give --name and --private-key"),
        "{}",
        text(&out)
    );

    niso_ok(&[
        "registry",
        "build",
        "--data-dir",
        p(&tree),
        "--name",
        "acme",
        "--private-key",
        p(&key),
    ]);
    let first = snapshot(&tree);
    let out = niso(&[
        "registry",
        "verify",
        p(&tree),
        "--public-key",
        p(&public),
        "--name",
        "acme",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (ok, out) = hex_client_check(&tree, "acme", &public);
    assert!(ok, "{out}");
    // Building again changes nothing but the freshness sidecar.
    niso_ok(&[
        "registry",
        "build",
        "--data-dir",
        p(&tree),
        "--name",
        "acme",
        "--private-key",
        p(&key),
    ]);
    let second = snapshot(&tree);
    for (path, bytes) in &first {
        if path != "freshness" {
            assert_eq!(bytes, &second[path], "{path} changed on a no-op rebuild");
        }
    }
    // A wrong key is reported.
    let other = tmp.path().join("other");
    init(&other, "acme");
    let out = niso(&[
        "registry",
        "verify",
        p(&tree),
        "--public-key",
        p(&other.join("data/public/public_key")),
        "--name",
        "acme",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("signature does not verify"),
        "{}",
        text(&out)
    );
}

#[test]
fn init_keeps_the_private_key_outside_the_tree_and_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    let key = dd.join("keys/repository.pem");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let tree = snapshot(&dd.join("public"));
    assert!(tree
        .values()
        .all(|b| !String::from_utf8_lossy(b).contains("PRIVATE KEY")));
    for f in [
        "names",
        "versions",
        "public_key",
        "freshness",
        "v1/packages/index.json",
    ] {
        assert!(tree.contains_key(f), "{f} missing from a new repository");
    }
    // An empty repository verifies, for niso and for the Hex client.
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(0), "{out}");
    let public = dd.join("public");
    let (ok, out) = hex_client_check(&public, "acme", &public.join("public_key"));
    assert!(ok, "{out}");
    // init refuses to overwrite.
    let out = niso(&["registry", "init", "--data-dir", p(&dd), "--name", "acme"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(common::text(&out).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
}

#[test]
fn organization_repositories_live_under_repos_and_carry_their_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let f = &hex_fixtures()[2];
    niso_ok(&[
        "registry",
        "publish",
        "--data-dir",
        p(&dd),
        "--org",
        "team",
        p(f),
    ]);
    let org = dd.join("public/repos/team");
    assert!(org.join("tarballs/jason-1.4.4.tar").is_file());
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("team: 1 packages, 1 releases, 1 archives checked, 0 problems"),
        "{out}"
    );
    let key = dd.join("public/public_key");
    let (ok, out) = hex_client_check(&org, "team", &key);
    assert!(ok, "{out}");
    // An index of the organization is refused as the root repository's.
    let (ok, _) = hex_client_check(&org, "acme", &key);
    assert!(!ok);
    // A rebuild keeps both repositories identical.
    let before = snapshot(&dd.join("public"));
    niso_ok(&["registry", "build", "--data-dir", p(&dd)]);
    let after = snapshot(&dd.join("public"));
    for (path, bytes) in &before {
        if !path.ends_with("freshness") {
            assert_eq!(bytes, &after[path], "{path}");
        }
    }
}

#[test]
fn rebuild_refuses_a_bad_archive_in_the_tree_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let public = dd.join("public");
    // A valid archive under the wrong name, and a broken one.
    std::fs::copy(
        &hex_fixtures()[0],
        public.join("tarballs/decimal-9.9.9.tar"),
    )
    .unwrap();
    std::fs::write(public.join("archives/junk-1.0.0-x86_64.niso"), b"junk").unwrap();
    let before = snapshot(&public);
    let out = niso(&["registry", "build", "--data-dir", p(&dd)]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains("tarballs/decimal-9.9.9.tar: holds decimal 2.0.0 (any), so it must be named tarballs/decimal-2.0.0.tar"), "{t}");
    assert!(t.contains("archives/junk-1.0.0-x86_64.niso"), "{t}");
    assert_eq!(before, snapshot(&public));
    // verify reports the files no index names.
    let (code, out) = verify(&dd, "acme");
    assert_eq!(code, Some(1));
    assert!(
        out.contains("tarballs/decimal-9.9.9.tar: in the tree but not referenced by any index"),
        "{out}"
    );
}

#[test]
fn package_makes_a_deterministic_archive_the_registry_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("src/my-app-1.1.0");
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let out = niso_ok(&["package", p(&src), "--out", p(&a)]);
    assert!(out.contains("my-app-1.1.0-x86_64.niso"), "{out}");
    niso_ok(&["package", p(&src), "--out", p(&b)]);
    let name = "my-app-1.1.0-x86_64.niso";
    assert_eq!(
        std::fs::read(a.join(name)).unwrap(),
        std::fs::read(b.join(name)).unwrap()
    );
    assert_eq!(
        std::fs::read(a.join(name)).unwrap(),
        std::fs::read(fixtures().join("niso").join(name)).unwrap(),
        "fixtures/niso is out of date: run fixtures/make-fixtures"
    );
    // A directory without a manifest gets a precise error.
    let out = niso(&["package", p(tmp.path()), "--out", p(&a)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("niso.toml"), "{}", text(&out));
}

#[test]
fn verify_reads_a_tree_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let public = dd.join("public");
    let (addr, _server) = serve_dir(&public);
    let url = format!("http://{addr}");
    let key = public.join("public_key");
    let out = niso(&[
        "registry",
        "verify",
        &url,
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("4 packages, 7 releases, 8 archives checked, 0 problems"));
    flip_byte(&public.join("packages/plug"));
    let out = niso(&[
        "registry",
        "verify",
        &url,
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// Serves `dir` as plain files on 127.0.0.1 (port chosen by the OS), like
/// any static host would.
fn serve_dir(dir: &Path) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let dir = dir.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let app =
                axum::Router::new().fallback_service(tower_http::services::ServeDir::new(dir));
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), handle)
}

#[test]
fn verify_detects_a_v1_document_that_disagrees_with_the_indexes() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    publish_all_fixtures(&dd);
    let public = dd.join("public");
    for doc in [
        "v1/packages/index.json",
        "v1/packages/my-app/versions",
        "v1/packages/my-app/1.1.0/manifest",
        "v1/packages/my-app/tags",
        "v1/packages/my-app/latest/x86_64",
    ] {
        let path = public.join(doc);
        let original = std::fs::read(&path).unwrap();
        // Replace rather than edit: v1 downloads are hard links to archives.
        std::fs::remove_file(&path).unwrap();
        let mut changed = original.clone();
        changed.push(b' ');
        std::fs::write(&path, changed).unwrap();
        let (code, out) = verify(&dd, "acme");
        assert_eq!(code, Some(1), "changed {doc} passed:\n{out}");
        assert!(out.contains(doc), "{out}");
        std::fs::write(&path, original).unwrap();
    }
    assert_eq!(verify(&dd, "acme").0, Some(0));
}

#[test]
fn a_hex_client_reads_a_versions_index_deflated_in_parallel_chunks() {
    // Above 128 KiB an index is deflated in chunks on several threads;
    // 3,000 packages make `versions` about 150 KB.
    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    // Hex tarballs: only they are in Hex's `versions`.
    let tarballs = dd.join("public/tarballs");
    std::fs::create_dir_all(&tarballs).unwrap();
    for i in 0..3000 {
        let name = format!("a_package_with_a_rather_long_name_{i:05}");
        let version = format!("1.0.{}", i % 10);
        std::fs::write(
            tarballs.join(format!("{name}-{version}.tar")),
            hex_tarball(&name, &version),
        )
        .unwrap();
    }
    niso_ok(&["registry", "build", "--data-dir", p(&dd)]);
    let public = dd.join("public");
    let versions = std::fs::read(public.join("versions")).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&versions[..]), &mut raw).unwrap();
    assert!(
        raw.len() > 128 * 1024,
        "versions is only {} bytes",
        raw.len()
    );
    let (ok, out) = hex_client_check(&public, "acme", &public.join("public_key"));
    assert!(ok, "{out}");
    assert!(out.contains("ok 3000 packages"), "{out}");
    assert_eq!(verify(&dd, "acme").0, Some(0));
}
