//! The publisher through the library: ordering, tags, deletes and
//! tombstones, group commit, retries, recovery, failures injected at every
//! write of a change, and two writers on one store.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use common::*;
use niso::archive::inspect_file;
use niso::client::verify::{verify, VerifyOptions};
use niso::client::StoreTransport;
use niso::ident::{Arch, PackageName, RepoName, TagName, Version};
use niso::index::{pb, RepoKey, Signer};
use niso::limits::Limits;
use niso::publish::{Layout, Options, PublishError, Publisher, StagedFile, Upload};
use niso::store::{
    Attributes, Body, ByteStream, LocalStore, Object, ObjectBackend, ObjectMeta, ObjectVersion,
    PutMode, Store, StoreError, TreePath,
};

fn key() -> Arc<RepoKey> {
    static KEY: OnceLock<Arc<RepoKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(RepoKey::generate().unwrap()))
        .clone()
}

fn fixed_clock() -> i64 {
    // Far enough ahead that the freshness record has not expired.
    4_000_000_000
}

async fn open_store(store: Arc<dyn Store>) -> Publisher {
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
    .with_clock(fixed_clock)
}

async fn open(root: &Path) -> Publisher {
    open_store(Arc::new(LocalStore::new(root))).await
}

fn upload(path: &Path) -> Upload {
    // Stage a copy: a local store links the staged file into the tree.
    let staged = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::copy(path, &staged).unwrap();
    Upload {
        info: inspect_file(&staged, &Limits::default()).unwrap(),
        staged: StagedFile::Owned(staged),
        uploaded_at: fixed_clock(),
        signature: None,
    }
}

fn all_fixtures() -> Vec<std::path::PathBuf> {
    hex_fixtures().into_iter().chain(niso_fixtures()).collect()
}

/// Every problem `verify` finds in the tree of `store` (none: it verifies).
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
                now: fixed_clock() - 10,
                listing: None,
                allow_expired: false,
            },
        )
        .problems
    })
    .await
    .unwrap()
}

async fn assert_verifies(store: Arc<dyn Store>) {
    let p = problems(store).await;
    assert!(p.is_empty(), "verify found problems: {p:#?}");
}

fn local(root: &Path) -> Arc<dyn Store> {
    Arc::new(LocalStore::new(root))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_order_does_not_change_the_indexes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = open(a.path()).await;
    for f in all_fixtures() {
        pa.publish(upload(&f)).await.unwrap();
    }
    let pb_ = open(b.path()).await;
    let mut files = all_fixtures();
    files.reverse();
    for f in files {
        pb_.publish(upload(&f)).await.unwrap();
    }
    let (sa, sb) = (snapshot(a.path()), snapshot(b.path()));
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (path, bytes) in &sa {
        if path != "freshness" {
            assert_eq!(bytes, &sb[path], "{path} depends on publish order");
        }
    }
    // And a rebuild of either gives the same bytes again.
    pa.rebuild().await.unwrap();
    for (path, bytes) in snapshot(a.path()) {
        if path != "freshness" {
            assert_eq!(bytes, sb[&path], "{path} differs after rebuild");
        }
    }
    assert_verifies(local(a.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_publishes_each_upload_on_its_own_merits_and_retries_are_successes() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    let hex = hex_fixtures();
    let first = p.publish(upload(&hex[0])).await.unwrap();
    assert!(first.created);
    // Other bytes under the name of an archive that is published.
    let mut other = upload(&hex[1]);
    other.info.version = Version::new("2.0.0").unwrap();
    other.info.sha256[0] ^= 1;
    let results = p
        .publish_batch(vec![
            upload(&hex[1]),
            upload(&hex[0]),
            other,
            upload(&hex[2]),
        ])
        .await;
    assert!(results[0].as_ref().is_ok_and(|r| r.created));
    // The same bytes again: a success that says so, with the first upload's
    // answer, so a client can retry a lost answer.
    let again = results[1].as_ref().unwrap();
    assert!(!again.created);
    assert_eq!(again.uploaded_at, first.uploaded_at);
    assert!(
        matches!(&results[2], Err(PublishError::Conflict(m)) if m.contains("already published with other bytes")),
        "{:?}",
        results[2]
    );
    assert!(results[3].is_ok());
    assert_eq!(p.package_names().await, ["decimal", "jason"]);
    assert_eq!(p.package("decimal").await.unwrap().releases.len(), 2);
    assert_verifies(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_follow_deletes_and_deletes_leave_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    for f in niso_fixtures() {
        p.publish(upload(&f)).await.unwrap();
    }
    let name = PackageName::new("my-app").unwrap();
    let stable = TagName::new("stable").unwrap();
    let v100 = Version::new("1.0.0").unwrap();
    let v110 = Version::new("1.1.0").unwrap();
    p.set_tag(&name, &stable, &v100).await.unwrap();
    p.set_tag(&name, &TagName::new("beta").unwrap(), &v110)
        .await
        .unwrap();
    let e = p
        .set_tag(&name, &stable, &Version::new("9.0.0").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, PublishError::NotFound(_)), "{e}");
    let tags = std::fs::read_to_string(dir.path().join("v1/packages/my-app/tags")).unwrap();
    assert_eq!(tags, "{\"tags\":[{\"tag\":\"beta\",\"version\":\"1.1.0\"},{\"tag\":\"stable\",\"version\":\"1.0.0\"}]}\n");
    let pkg: pb::Package = p.package("my-app").await.unwrap();
    assert_eq!(pkg.tags.len(), 2);

    // latest/x86_64 is 1.1.0; deleting it moves latest back.
    let latest = dir.path().join("v1/packages/my-app/latest/x86_64");
    let x86 = Arch::new("x86_64").unwrap();
    assert_eq!(
        std::fs::read(&latest).unwrap(),
        std::fs::read(dir.path().join("archives/my-app-1.1.0-x86_64.niso")).unwrap()
    );
    let deleted_bytes = std::fs::read(&niso_fixtures()[2]).unwrap();
    p.delete(&name, &v110, &x86).await.unwrap();
    assert_eq!(
        std::fs::read(&latest).unwrap(),
        std::fs::read(dir.path().join("archives/my-app-1.0.0-x86_64.niso")).unwrap()
    );
    assert!(!dir
        .path()
        .join("archives/my-app-1.1.0-x86_64.niso")
        .exists());
    assert!(!dir.path().join("v1/packages/my-app/1.1.0/x86_64").exists());
    assert_eq!(p.package("my-app").await.unwrap().tombstones.len(), 1);

    // The deleted version never serves other bytes again...
    let src = tempfile::tempdir().unwrap();
    let pkgdir = src.path().join("pkg");
    std::fs::create_dir_all(pkgdir.join("payload/bin")).unwrap();
    std::fs::write(pkgdir.join("payload/bin/my-app"), "other bytes").unwrap();
    std::fs::write(
        pkgdir.join("niso.toml"),
        "[package]\nname = \"my-app\"\nversion = \"1.1.0\"\narch = \"x86_64\"\ndescription = \"My application\"\n[binary]\nentrypoint = \"bin/my-app\"\n",
    )
    .unwrap();
    let (forged, _) = niso::archive::niso::create(&pkgdir, src.path(), &Limits::default()).unwrap();
    assert_ne!(std::fs::read(&forged).unwrap(), deleted_bytes);
    let before = snapshot(dir.path());
    let e = p.publish(upload(&forged)).await.unwrap_err();
    assert!(
        matches!(&e, PublishError::Conflict(m) if m.contains("was deleted")),
        "{e}"
    );
    assert_eq!(
        before,
        snapshot(dir.path()),
        "a refused upload changed the tree"
    );
    // ...not after a restart or a rebuild either.
    let p = open(dir.path()).await;
    p.rebuild().await.unwrap();
    assert!(p.publish(upload(&forged)).await.is_err());
    // The deleted bytes themselves may come back.
    let restored = p.publish(upload(&niso_fixtures()[2])).await.unwrap();
    assert!(restored.created);
    assert!(p.package("my-app").await.unwrap().tombstones.is_empty());
    p.delete(&name, &v110, &x86).await.unwrap();

    // 1.1.0 still has aarch64, so its tag stays; delete that too.
    assert_eq!(p.package("my-app").await.unwrap().tags.len(), 2);
    p.delete(&name, &v110, &Arch::new("aarch64").unwrap())
        .await
        .unwrap();
    let tags = std::fs::read_to_string(dir.path().join("v1/packages/my-app/tags")).unwrap();
    assert_eq!(
        tags,
        "{\"tags\":[{\"tag\":\"stable\",\"version\":\"1.0.0\"}]}\n"
    );
    assert!(!dir.path().join("v1/packages/my-app/1.1.0").exists());
    assert!(!dir
        .path()
        .join("v1/packages/my-app/latest/aarch64")
        .exists());
    // Deleting the last artifact removes the package from every view; its
    // tombstones stay in niso's index.
    p.delete(&name, &v100, &x86).await.unwrap();
    let left = p.package("my-app").await.unwrap();
    assert!(left.releases.is_empty());
    assert_eq!(left.tombstones.len(), 3);
    let leftover: Vec<_> = snapshot(dir.path())
        .into_keys()
        .filter(|k| k.contains("my-app") && k != "niso/packages/my-app")
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    let e = p.delete(&name, &v100, &x86).await.unwrap_err();
    assert!(matches!(e, PublishError::NotFound(_)));
    assert_verifies(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    p.publish(upload(&niso_fixtures()[0])).await.unwrap();
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
    let e = p.publish(upload(&archive)).await.unwrap_err();
    assert!(
        matches!(&e, PublishError::Conflict(m) if m.contains("too similar to the existing package my-app")),
        "{e}"
    );
    assert_eq!(before, snapshot(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_of_one_release_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    let n = niso_fixtures();
    p.publish(upload(&n[1])).await.unwrap(); // my-app 1.1.0 aarch64
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
    let before = snapshot(dir.path());
    let e = p.publish(upload(&archive)).await.unwrap_err();
    assert!(
        matches!(&e, PublishError::Conflict(m) if m.contains("description")),
        "{e}"
    );
    // Its archive, written before the indexes were checked, is gone again.
    assert_eq!(before, snapshot(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_reads_the_state_back_from_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = open(dir.path()).await;
        for f in all_fixtures() {
            p.publish(upload(&f)).await.unwrap();
        }
    }
    let p = open(dir.path()).await;
    assert_eq!(
        p.package_names().await,
        ["decimal", "jason", "my-app", "plug"]
    );
    // A tampered index is refused on open, naming the file.
    flip_byte(&dir.path().join("niso/packages/plug"));
    let e = Publisher::open(
        local(dir.path()),
        key(),
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .await
    .err()
    .expect("open must fail");
    assert!(e.to_string().contains("niso/packages/plug"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_refuses_look_alike_names_in_the_tree() {
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
    let p = open(dir.path()).await;
    let e = p.rebuild().await.unwrap_err().to_string();
    assert!(e.contains("too similar"), "{e}");
    assert!(
        !dir.path().join("names").exists(),
        "a refused rebuild wrote indexes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_is_rewritten_only_when_the_set_of_hex_packages_changes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    let ino = || std::fs::metadata(dir.path().join("names")).unwrap().ino();
    let hex = hex_fixtures();
    p.publish(upload(&hex[0])).await.unwrap(); // decimal 2.0.0: a new package
    let first = ino();
    p.publish(upload(&hex[1])).await.unwrap(); // decimal 2.1.1: same package
    assert_eq!(ino(), first, "names was rewritten for a new version");
    p.publish(upload(&niso_fixtures()[0])).await.unwrap(); // my-app: no Hex release
    assert_eq!(
        ino(),
        first,
        "names was rewritten for a package Hex cannot see"
    );
    p.publish(upload(&hex[2])).await.unwrap(); // jason: new package
    assert_ne!(ino(), first, "names was not rewritten for a new package");
    assert_verifies(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hex_sees_only_releases_with_a_hex_tarball_and_niso_sees_all() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    for f in all_fixtures() {
        p.publish(upload(&f)).await.unwrap();
    }
    let root = dir.path();
    // my-app has only .niso releases: Hex's view has no trace of it.
    assert!(!root.join("packages/my-app").exists());
    assert!(!root.join("tarballs/my-app-1.1.0.tar").exists());
    assert!(root.join("niso/packages/my-app").exists());
    let names = std::fs::read(root.join("names")).unwrap();
    let names: pb::Names =
        niso::index::decode_index(&names, key().public_key(), "acme", 1 << 20).unwrap();
    let listed: Vec<&str> = names.packages.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(listed, ["decimal", "jason", "plug"]);
    // A real Hex client accepts every index of the tree.
    let pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pem.path(), key().public_key().to_pem()).unwrap();
    let (ok, out) = hex_client_check(root, "acme", pem.path());
    assert!(ok, "{out}");
    assert_verifies(local(root)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_rewrites_only_the_freshness_bin_of_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    let (n, hex) = (niso_fixtures(), hex_fixtures());
    for f in [&n[0], &hex[0], &hex[2], &hex[3]] {
        p.publish(upload(f)).await.unwrap();
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
    p.publish(upload(&n[2])).await.unwrap(); // my-app 1.1.0
    let after = bins(dir.path());
    for (path, bytes) in &before {
        if *path == bin_of("my-app") {
            assert_ne!(&after[path], bytes, "{path} was not rewritten");
        } else {
            assert_eq!(&after[path], bytes, "{path} changed for another package");
        }
    }
    assert_verifies(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_adopts_an_archive_no_index_names_and_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path()).await;
    let hex = hex_fixtures();
    p.publish(upload(&hex[0])).await.unwrap();
    // Left by a publish cut off between its archive and its indexes, with
    // a temp file of a writer that is gone.
    std::fs::copy(&hex[2], dir.path().join("tarballs/jason-1.4.4.tar")).unwrap();
    std::fs::write(dir.path().join("tarballs/.tmp-4194304000-3-x.tar"), b"x").unwrap();
    // A retry before any recovery finds its bytes in place: a success.
    let r = p.publish(upload(&hex[2])).await.unwrap();
    assert!(r.created, "new to the indexes");
    assert_eq!(p.package_names().await, ["decimal", "jason"]);
    // Another cut-off upload, then a restart: recovery publishes it.
    std::fs::copy(&hex[3], dir.path().join("tarballs/plug-1.16.0.tar")).unwrap();
    let p = open(dir.path()).await;
    let report = p.recover().await.unwrap();
    assert_eq!(report.adopted, ["tarballs/plug-1.16.0.tar"]);
    assert!(!dir.path().join("tarballs/.tmp-4194304000-3-x.tar").exists());
    assert_eq!(p.package_names().await, ["decimal", "jason", "plug"]);
    assert_verifies(local(dir.path())).await;
    // A cut-off delete: the archive of a tombstoned version goes.
    p.delete(
        &PackageName::new("jason").unwrap(),
        &Version::new("1.4.4").unwrap(),
        &Arch::new("any").unwrap(),
    )
    .await
    .unwrap();
    std::fs::copy(&hex[2], dir.path().join("tarballs/jason-1.4.4.tar")).unwrap();
    let report = open(dir.path()).await.recover().await.unwrap();
    assert_eq!(report.discarded, ["tarballs/jason-1.4.4.tar"]);
    assert!(!dir.path().join("tarballs/jason-1.4.4.tar").exists());
    assert_verifies(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_without_niso_indexes_or_bins_is_completed_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = open(dir.path()).await;
        for f in hex_fixtures() {
            p.publish(upload(&f)).await.unwrap();
        }
    }
    // As a tree written before niso's indexes and the bins existed.
    std::fs::remove_dir_all(dir.path().join("niso")).unwrap();
    std::fs::remove_dir_all(dir.path().join("freshness-bins")).unwrap();
    let p = open(dir.path()).await;
    assert_eq!(p.package_names().await.len(), 3);
    p.recover().await.unwrap();
    assert!(dir.path().join("niso/packages/plug").exists());
    assert_verifies(local(dir.path())).await;
}

/// A store whose `fail_at`-th write (put, copy or delete) fails, as a disk
/// that fills up half way through a change would.
#[derive(Debug)]
struct FaultyStore {
    inner: Arc<dyn Store>,
    writes: AtomicUsize,
    fail_at: AtomicUsize,
}

impl FaultyStore {
    fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            writes: AtomicUsize::new(0),
            fail_at: AtomicUsize::new(usize::MAX),
        }
    }

    fn write(&self, path: &TreePath) -> Result<(), StoreError> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(StoreError::Injected(format!("write {n} ({path})")));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for FaultyStore {
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
        self.write(path)?;
        self.inner.put(path, body, attributes, mode).await
    }
    async fn copy(
        &self,
        from: &TreePath,
        to: &TreePath,
        attributes: &Attributes,
        mode: PutMode,
    ) -> Result<ObjectVersion, StoreError> {
        self.write(to)?;
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
        self.write(path)?;
        self.inner.delete(path).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_any_write_of_a_change_leaves_a_tree_the_next_change_completes() {
    let (n, hex) = (niso_fixtures(), hex_fixtures());
    // How many writes each kind of change makes, counted on a clean run.
    let mut k = 0;
    loop {
        let memory: Arc<dyn Store> = Arc::new(ObjectBackend::memory());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let p = open_store(faulty.clone()).await;
        p.publish(upload(&n[0])).await.unwrap();
        p.publish(upload(&hex[0])).await.unwrap();
        p.set_tag(
            &PackageName::new("my-app").unwrap(),
            &TagName::new("stable").unwrap(),
            &Version::new("1.0.0").unwrap(),
        )
        .await
        .unwrap();
        let start = faulty.writes.load(Ordering::SeqCst);
        faulty.fail_at.store(start + k, Ordering::SeqCst);
        // A change of each kind, in one go: a batch of two uploads, a
        // delete and a tag.
        let batch = p.publish_batch(vec![upload(&n[2]), upload(&hex[1])]).await;
        // Every upload that was acknowledged is in the model.
        for (i, r) in batch.iter().enumerate() {
            if r.is_ok() {
                let name = if i == 0 { "my-app" } else { "decimal" };
                assert_eq!(
                    p.package(name).await.unwrap().releases.len(),
                    2,
                    "write {k}: an acknowledged upload is missing"
                );
            }
        }
        let failed = batch.iter().any(Result::is_err)
            || p.delete(
                &PackageName::new("my-app").unwrap(),
                &Version::new("1.0.0").unwrap(),
                &Arch::new("x86_64").unwrap(),
            )
            .await
            .is_err()
            || p.set_tag(
                &PackageName::new("decimal").unwrap(),
                &TagName::new("stable").unwrap(),
                &Version::new("2.1.1").unwrap(),
            )
            .await
            .is_err();
        let total = faulty.writes.load(Ordering::SeqCst) - start;
        if k >= total {
            assert!(!failed, "a change failed with no write failing");
            break;
        }
        // A failed removal of a file no index names any more is the only
        // failure a change may finish without (recovery removes the file).
        // The disk is back: the next change (its reconcile first) completes
        // the tree.
        faulty.fail_at.store(usize::MAX, Ordering::SeqCst);
        p.refresh()
            .await
            .unwrap_or_else(|e| panic!("write {k}: {e}"));
        let found = problems(memory.clone()).await;
        assert!(found.is_empty(), "write {k}: {found:#?}");
        // And a retry of everything succeeds.
        for r in p.publish_batch(vec![upload(&n[2]), upload(&hex[1])]).await {
            r.unwrap_or_else(|e| panic!("write {k}: retry: {e}"));
        }
        assert!(problems(memory).await.is_empty());
        k += 1;
    }
    assert!(k > 20, "only {k} writes were tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_store_lose_nothing() {
    let memory: Arc<dyn Store> = Arc::new(ObjectBackend::memory());
    let a = Arc::new(open_store(memory.clone()).await);
    let b = Arc::new(open_store(memory.clone()).await);
    let (n, hex) = (niso_fixtures(), hex_fixtures());
    // Each writer publishes half, at the same time, with a tag between.
    let ta = {
        let a = a.clone();
        let files: Vec<_> = vec![hex[0].clone(), n[0].clone(), hex[2].clone()];
        tokio::spawn(async move {
            for f in files {
                a.publish(upload(&f)).await.unwrap();
            }
        })
    };
    let tb = {
        let b = b.clone();
        let files: Vec<_> = vec![hex[1].clone(), n[1].clone(), hex[3].clone(), n[2].clone()];
        tokio::spawn(async move {
            for f in files {
                b.publish(upload(&f)).await.unwrap();
            }
        })
    };
    ta.await.unwrap();
    tb.await.unwrap();
    // A third writer reads everything both acknowledged.
    let c = open_store(memory.clone()).await;
    let pkg = |name: &str| {
        let c = &c;
        let name = name.to_string();
        async move { c.package(&name).await.map(|p| p.releases.len()) }
    };
    assert_eq!(pkg("decimal").await, Some(2));
    assert_eq!(pkg("jason").await, Some(1));
    assert_eq!(pkg("plug").await, Some(1));
    assert_eq!(pkg("my-app").await, Some(2));
    // The last writer to finish wrote shared files that include the other's
    // releases: after one more change by either, the tree verifies.
    a.refresh().await.unwrap();
    assert_verifies(memory).await;
}

/// A `.niso` archive of `name` `version` for x86_64, staged for upload.
fn niso_upload(name: &str, version: &str) -> Upload {
    let src = tempfile::tempdir().unwrap();
    let pkg = src.path().join("pkg");
    std::fs::create_dir_all(pkg.join("payload/bin")).unwrap();
    std::fs::write(pkg.join("payload/bin/run"), version).unwrap();
    std::fs::write(
        pkg.join("niso.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"x86_64\"\n\
             [binary]\nentrypoint = \"bin/run\"\n"
        ),
    )
    .unwrap();
    let (path, _) = niso::archive::niso::create(&pkg, src.path(), &Limits::default()).unwrap();
    upload(&path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_on_the_same_packages_lose_nothing_acknowledged() {
    let memory: Arc<dyn Store> = Arc::new(ObjectBackend::memory());
    let writers: Vec<Arc<Publisher>> = vec![
        Arc::new(open_store(memory.clone()).await),
        Arc::new(open_store(memory.clone()).await),
        Arc::new(open_store(memory.clone()).await),
    ];
    // Each writer publishes versions of the same three packages, tags, and
    // deletes one of its own versions, all at once.
    let mut tasks = Vec::new();
    for (w, p) in writers.iter().enumerate() {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..6 {
                let name = ["alpha", "beta", "gamma"][i % 3];
                let version = format!("{w}.{i}.0");
                p.publish(niso_upload(name, &version)).await.unwrap();
                acknowledged.push((name, version.clone()));
                p.set_tag(
                    &PackageName::new(name).unwrap(),
                    &TagName::new(&format!("w{w}")).unwrap(),
                    &Version::new(&version).unwrap(),
                )
                .await
                .unwrap();
            }
            // The first version of its own: deleted.
            p.delete(
                &PackageName::new("alpha").unwrap(),
                &Version::new(&format!("{w}.0.0")).unwrap(),
                &Arch::new("x86_64").unwrap(),
            )
            .await
            .unwrap();
            acknowledged.remove(0);
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    // One more change by any writer brings every shared file up to date;
    // then a fresh reader sees everything acknowledged, and no deleted one.
    writers[0].refresh().await.unwrap();
    let reader = open_store(memory.clone()).await;
    for (name, version) in &acknowledged {
        let pkg = reader.package(name).await.unwrap();
        assert!(
            pkg.releases.iter().any(|r| r.version == *version),
            "{name} {version} was acknowledged but is missing"
        );
    }
    let alpha = reader.package("alpha").await.unwrap();
    for w in 0..3 {
        assert!(!alpha
            .releases
            .iter()
            .any(|r| r.version == format!("{w}.0.0")));
        assert!(alpha
            .tombstones
            .iter()
            .any(|t| t.version == format!("{w}.0.0")));
    }
    assert_verifies(memory).await;
}
