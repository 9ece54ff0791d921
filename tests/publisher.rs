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
    verify_ok(dir.path());
}

/// A local store whose `apply` fails at one stage, after applying the
/// stages before it (a disk that fills up half-way through a change).
struct FailingStore {
    inner: LocalStore,
    fail_at_stage: std::sync::atomic::AtomicUsize,
}

impl Store for FailingStore {
    fn get(
        &self,
        path: &niso::store::TreePath,
    ) -> Result<Option<Vec<u8>>, niso::store::StoreError> {
        self.inner.get(path)
    }
    fn exists(&self, path: &niso::store::TreePath) -> Result<bool, niso::store::StoreError> {
        self.inner.exists(path)
    }
    fn apply(&self, stages: &[Vec<niso::store::Op>]) -> Result<(), niso::store::StoreError> {
        let at = self.fail_at_stage.load(std::sync::atomic::Ordering::SeqCst);
        if at >= stages.len() {
            return self.inner.apply(stages);
        }
        self.inner.apply(&stages[..at])?;
        Err(niso::store::StoreError::Io {
            action: "write",
            path: "the disk".into(),
            source: std::io::Error::other("no space left on device (simulated)"),
        })
    }
    fn list(&self, prefix: &str) -> Result<Vec<niso::store::TreePath>, niso::store::StoreError> {
        self.inner.list(prefix)
    }
    fn local_path(&self, path: &niso::store::TreePath) -> Option<std::path::PathBuf> {
        self.inner.local_path(path)
    }
}

fn verify_ok(root: &Path) {
    let out = niso(&[
        "registry",
        "verify",
        p(root),
        "--public-key",
        p(&root.join("public_key")),
        "--name",
        "acme",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn a_failed_write_aborts_the_changes_prepared_on_it_and_the_model_reloads() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore {
        inner: LocalStore::new(dir.path()),
        fail_at_stage: usize::MAX.into(),
    });
    let p = Publisher::open(
        store.clone(),
        key(),
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .unwrap()
    .with_clock(fixed_clock);
    let (n, hex) = (niso_fixtures(), hex_fixtures());
    p.publish(upload(&n[0])).unwrap(); // my-app 1.0.0

    // Two batches prepared back to back, as the server's pipeline does;
    // the first fails after its archives and package index are written.
    let first = p.prepare_batch(vec![upload(&n[2])]); // my-app 1.1.0
    let second = p.prepare_batch(vec![upload(&hex[0])]); // decimal
    assert_eq!(
        p.package_names(),
        ["decimal", "my-app"],
        "the model runs ahead"
    );
    store.fail_at_stage.store(2, Ordering::SeqCst);
    let r = p.commit_batch(first);
    assert!(
        matches!(&r[0], Err(PublishError::Aborted(m)) if m.contains("no space left")),
        "{r:?}"
    );
    store.fail_at_stage.store(usize::MAX, Ordering::SeqCst);
    std::thread::scope(|s| {
        // A change started after the failure reloads the model from the
        // tree, then waits for its turn, behind `second`...
        let refresh = s.spawn(|| p.refresh());
        std::thread::sleep(std::time::Duration::from_millis(200));
        // ...which was built on the failed change: never written, even
        // though the disk is back and the model has been reloaded.
        let r = p.commit_batch(second);
        assert!(matches!(&r[0], Err(PublishError::Aborted(_))), "{r:?}");
        refresh.join().unwrap().unwrap();
    });
    assert!(!dir.path().join("tarballs/decimal-2.0.0.tar").exists());

    // The next change starts from the tree: the package index that was
    // written holds my-app 1.1.0, decimal was never written.
    p.publish(upload(&hex[0])).unwrap();
    assert_eq!(p.package_names(), ["decimal", "my-app"]);
    let e = p.publish(upload(&n[2])).unwrap_err();
    assert!(matches!(e, PublishError::Conflict(_)), "{e}");
    verify_ok(dir.path());
    // And the tree is what a rebuild makes of it.
    let before = snapshot(dir.path());
    p.rebuild().unwrap();
    for (path, bytes) in snapshot(dir.path()) {
        if path != "freshness" {
            assert_eq!(
                Some(&bytes),
                before.get(&path),
                "{path} differs after rebuild"
            );
        }
    }
}

#[test]
fn a_publish_rewrites_only_the_freshness_bin_of_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    let (n, hex) = (niso_fixtures(), hex_fixtures());
    for f in [&n[0], &hex[0], &hex[2], &hex[3]] {
        p.publish(upload(f)).unwrap();
    }
    let bins = |root: &Path| -> std::collections::BTreeMap<String, Vec<u8>> {
        snapshot(root)
            .into_iter()
            .filter(|(path, _)| path.starts_with("freshness-bins/"))
            .collect()
    };
    let before = bins(dir.path());
    // One bin per package here (their names hash to different first bytes).
    let bin_of = |name: &str| {
        use sha2::Digest;
        format!("freshness-bins/{:02x}", sha2::Sha256::digest(name)[0])
    };
    let expected: std::collections::BTreeSet<String> =
        ["my-app", "decimal", "jason", "plug"].map(bin_of).into();
    assert_eq!(
        before
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        expected
    );

    p.publish(upload(&n[2])).unwrap(); // my-app 1.1.0
    let after = bins(dir.path());
    for (path, bytes) in &before {
        if *path == bin_of("my-app") {
            assert_ne!(&after[path], bytes, "{path} was not rewritten");
        } else {
            assert_eq!(&after[path], bytes, "{path} changed for another package");
        }
    }
    // Deleting a package's last release empties and removes its bin.
    let name = PackageName::new("jason").unwrap();
    p.delete(
        &name,
        &Version::new("1.4.4").unwrap(),
        &Arch::new("any").unwrap(),
    )
    .unwrap();
    assert!(!dir.path().join(bin_of("jason")).exists());
    verify_ok(dir.path());
}

#[test]
fn a_tree_without_freshness_bins_gets_them_with_the_next_change() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = open(dir.path());
        for f in all_fixtures() {
            p.publish(upload(&f)).unwrap();
        }
    }
    // As a tree written before bins existed (or a bin lost) would be.
    std::fs::remove_dir_all(dir.path().join("freshness-bins")).unwrap();
    let p = open(dir.path());
    p.refresh().unwrap();
    verify_ok(dir.path());
}

#[test]
fn an_archive_no_index_names_is_refused_on_upload_and_adopted_by_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path());
    let hex = hex_fixtures();
    p.publish(upload(&hex[0])).unwrap();
    // Left by a publish interrupted between its archive and its indexes.
    std::fs::copy(&hex[2], dir.path().join("tarballs/jason-1.4.4.tar")).unwrap();
    let e = p.publish(upload(&hex[2])).unwrap_err();
    assert!(
        matches!(&e, PublishError::Conflict(m) if m.contains("no index names it") && m.contains("niso registry build")),
        "{e}"
    );
    p.rebuild().unwrap();
    assert_eq!(p.package_names(), ["decimal", "jason"]);
    verify_ok(dir.path());
}
