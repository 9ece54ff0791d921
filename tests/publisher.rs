//! The publisher through the library: ordering, tags, deletes, group commit
//! and the rules that keep a repository consistent.

mod common;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use common::*;
use niso::archive::inspect_file;
use niso::ident::{Arch, PackageName, RepoName, TagName, Version};
use niso::index::{pb, RepoKey, Signer};
use niso::limits::Limits;
use niso::publish::{Layout, Options, PublishError, Publisher, Upload};
use niso::store::{LocalStore, Store};

fn key() -> Arc<RepoKey> {
    static KEY: OnceLock<Arc<RepoKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(RepoKey::generate().unwrap()))
        .clone()
}

fn fixed_clock() -> i64 {
    // Far enough ahead that the freshness record has not expired.
    4_000_000_000
}

fn open(root: &Path) -> Publisher {
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(root));
    let signer: Arc<dyn Signer> = key();
    Publisher::open(
        store,
        signer,
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .unwrap()
    .with_clock(fixed_clock)
}

fn upload(path: &Path) -> Upload {
    // Stage a copy: the store hard-links the staged file into the tree.
    let staged = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    std::fs::copy(path, &staged).unwrap();
    Upload {
        info: inspect_file(&staged, &Limits::default()).unwrap(),
        staged,
        uploaded_at: fixed_clock(),
        signature: None,
    }
}

fn all_fixtures() -> Vec<std::path::PathBuf> {
    hex_fixtures().into_iter().chain(niso_fixtures()).collect()
}

#[test]
fn publish_order_does_not_change_the_indexes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = open(a.path());
    for f in all_fixtures() {
        pa.publish(upload(&f)).unwrap();
    }
    let pb_ = open(b.path());
    let mut files = all_fixtures();
    files.reverse();
    for f in files {
        pb_.publish(upload(&f)).unwrap();
    }
    let (sa, sb) = (snapshot(a.path()), snapshot(b.path()));
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (path, bytes) in &sa {
        if path != "freshness" {
            assert_eq!(bytes, &sb[path], "{path} depends on publish order");
        }
    }
    // And a rebuild of either gives the same bytes again.
    pa.rebuild().unwrap();
    for (path, bytes) in snapshot(a.path()) {
        if path != "freshness" {
            assert_eq!(bytes, sb[&path], "{path} differs after rebuild");
        }
    }
}

#[test]
fn group_commit_publishes_each_upload_on_its_own_merits() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    let hex = hex_fixtures();
    p.publish(upload(&hex[0])).unwrap();
    let results = p.publish_batch(vec![upload(&hex[1]), upload(&hex[0]), upload(&hex[2])]);
    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(PublishError::Conflict(m)) if m.contains("already published"))
    );
    assert!(results[2].is_ok());
    let names = p.package_names();
    assert_eq!(names, ["decimal", "jason"]);
    assert_eq!(p.package("decimal").unwrap().releases.len(), 2);
}

#[test]
fn tags_point_only_at_published_versions_and_follow_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    for f in niso_fixtures() {
        p.publish(upload(&f)).unwrap();
    }
    let name = PackageName::new("my-app").unwrap();
    let stable = TagName::new("stable").unwrap();
    let v100 = Version::new("1.0.0").unwrap();
    let v110 = Version::new("1.1.0").unwrap();
    p.set_tag(&name, &stable, &v100).unwrap();
    p.set_tag(&name, &TagName::new("beta").unwrap(), &v110)
        .unwrap();
    let e = p
        .set_tag(&name, &stable, &Version::new("9.0.0").unwrap())
        .unwrap_err();
    assert!(matches!(e, PublishError::NotFound(_)), "{e}");
    let tags = std::fs::read_to_string(dir.path().join("v1/packages/my-app/tags")).unwrap();
    assert_eq!(tags, "{\"tags\":[{\"tag\":\"beta\",\"version\":\"1.1.0\"},{\"tag\":\"stable\",\"version\":\"1.0.0\"}]}\n");
    // The tags are inside the signed package index.
    let pkg: pb::Package = p.package("my-app").unwrap();
    assert_eq!(pkg.tags.len(), 2);

    // latest/x86_64 is 1.1.0; deleting it moves latest back and drops `beta`.
    let latest = dir.path().join("v1/packages/my-app/latest/x86_64");
    let x86 = Arch::new("x86_64").unwrap();
    assert_eq!(
        std::fs::read(&latest).unwrap(),
        std::fs::read(dir.path().join("archives/my-app-1.1.0-x86_64.niso")).unwrap()
    );
    p.delete(&name, &v110, &x86).unwrap();
    assert_eq!(
        std::fs::read(&latest).unwrap(),
        std::fs::read(dir.path().join("archives/my-app-1.0.0-x86_64.niso")).unwrap()
    );
    assert!(!dir
        .path()
        .join("archives/my-app-1.1.0-x86_64.niso")
        .exists());
    assert!(!dir.path().join("v1/packages/my-app/1.1.0/x86_64").exists());
    // 1.1.0 still has aarch64, so its tag stays; delete that too.
    assert_eq!(p.package("my-app").unwrap().tags.len(), 2);
    p.delete(&name, &v110, &Arch::new("aarch64").unwrap())
        .unwrap();
    let tags = std::fs::read_to_string(dir.path().join("v1/packages/my-app/tags")).unwrap();
    assert_eq!(
        tags,
        "{\"tags\":[{\"tag\":\"stable\",\"version\":\"1.0.0\"}]}\n"
    );
    assert!(!dir
        .path()
        .join("v1/packages/my-app/1.1.0")
        .join("manifest")
        .exists());
    assert!(!dir
        .path()
        .join("v1/packages/my-app/latest/aarch64")
        .exists());
    // Deleting the last artifact removes the package everywhere.
    p.delete(&name, &v100, &x86).unwrap();
    assert!(p.package("my-app").is_none());
    assert!(!dir.path().join("packages/my-app").exists());
    let leftover: Vec<_> = snapshot(dir.path())
        .into_keys()
        .filter(|k| k.contains("my-app"))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    let e = p.delete(&name, &v100, &x86).unwrap_err();
    assert!(matches!(e, PublishError::NotFound(_)));
}

#[test]
fn look_alike_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    p.publish(upload(&niso_fixtures()[0])).unwrap();
    let src = tempfile::tempdir().unwrap();
    let pkg = src.path().join("pkg");
    std::fs::create_dir_all(pkg.join("payload")).unwrap();
    std::fs::write(pkg.join("payload/run"), "x").unwrap();
    std::fs::write(
        pkg.join("niso.toml"),
        "[package]\nname = \"my_app\"\nversion = \"2.0.0\"\narch = \"x86_64\"\n[binary]\nentrypoint = \"run\"\n",
    )
    .unwrap();
    let (archive, _) = niso::archive::niso::create(&pkg, src.path(), &Limits::default()).unwrap();
    let before = snapshot(dir.path());
    let e = p.publish(upload(&archive)).unwrap_err();
    assert!(
        matches!(&e, PublishError::Conflict(m) if m.contains("too similar to the existing package my-app")),
        "{e}"
    );
    assert_eq!(before, snapshot(dir.path()));
}

#[test]
fn artifacts_of_one_release_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    let n = niso_fixtures();
    p.publish(upload(&n[1])).unwrap(); // my-app 1.1.0 aarch64
    let src = tempfile::tempdir().unwrap();
    let pkg = src.path().join("pkg");
    std::fs::create_dir_all(pkg.join("payload/bin")).unwrap();
    std::fs::write(pkg.join("payload/bin/my-app"), "x").unwrap();
    std::fs::write(
        pkg.join("niso.toml"),
        "[package]\nname = \"my-app\"\nversion = \"1.1.0\"\narch = \"riscv64\"\ndescription = \"Something else\"\n[binary]\nentrypoint = \"bin/my-app\"\n",
    )
    .unwrap();
    let (archive, _) = niso::archive::niso::create(&pkg, src.path(), &Limits::default()).unwrap();
    let e = p.publish(upload(&archive)).unwrap_err();
    assert!(
        matches!(&e, PublishError::Conflict(m) if m.contains("description")),
        "{e}"
    );
}

#[test]
fn reopening_reads_the_state_back_from_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = open(dir.path());
        for f in all_fixtures() {
            p.publish(upload(&f)).unwrap();
        }
    }
    let p = open(dir.path());
    assert_eq!(p.package_names(), ["decimal", "jason", "my-app", "plug"]);
    // A tampered index is refused on open, naming the file.
    flip_byte(&dir.path().join("packages/plug"));
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    let e = Publisher::open(
        store,
        key(),
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .err()
    .expect("open must fail");
    assert!(e.to_string().contains("packages/plug"), "{e}");
}

#[test]
fn rebuild_refuses_look_alike_names_in_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("archives")).unwrap();
    for name in ["my_app", "my-app"] {
        let pkg = src.path().join(name);
        std::fs::create_dir_all(pkg.join("payload")).unwrap();
        std::fs::write(pkg.join("payload/run"), "x").unwrap();
        std::fs::write(
            pkg.join("niso.toml"),
            format!("[package]\nname = \"{name}\"\nversion = \"1.0.0\"\narch = \"x86_64\"\n[binary]\nentrypoint = \"run\"\n"),
        )
        .unwrap();
        niso::archive::niso::create(&pkg, &dir.path().join("archives"), &Limits::default())
            .unwrap();
    }
    let p = open(dir.path());
    let e = p.rebuild().unwrap_err().to_string();
    assert!(e.contains("too similar"), "{e}");
    assert!(
        !dir.path().join("names").exists(),
        "a refused rebuild wrote indexes"
    );
}

#[test]
fn names_is_rewritten_only_when_the_set_of_packages_changes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    let ino = || std::fs::metadata(dir.path().join("names")).unwrap().ino();
    let n = niso_fixtures();
    p.publish(upload(&n[0])).unwrap(); // my-app 1.0.0: a new package
    let first = ino();
    p.publish(upload(&n[2])).unwrap(); // my-app 1.1.0: same package
    assert_eq!(ino(), first, "names was rewritten for a new version");
    p.publish(upload(&hex_fixtures()[0])).unwrap(); // decimal: new package
    assert_ne!(ino(), first, "names was not rewritten for a new package");
    // Every index still verifies, freshness included.
    let out = niso(&[
        "registry",
        "verify",
        p_(dir.path()),
        "--public-key",
        p_(&dir.path().join("public_key")),
        "--name",
        "acme",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

fn p_(path: &Path) -> &str {
    path.to_str().unwrap()
}
