//! Mirrors by plain rsync: the recipe is the `sh` block of the README's
//! "Mirrors (rsync)" paragraph, run as it stands with the real rsync
//! against the tree of a real `niso registry serve`.
//!
//! * Quiet: a version uploaded within the same second as the sync before it,
//!   its files rewritten at the same size (which rsync's default quick check
//!   cannot see), reaches the mirror: it verifies and equals the source.
//! * Under load: while uploads (and deletes) land, no index on the mirror
//!   names an archive the mirror lacks, checked after every rsync the recipe
//!   runs (a shim first on `PATH` holds the recipe there) and all the while
//!   by a second thread; once uploads stop, one more run gives a mirror that
//!   verifies and equals the source.
//! * A delete reaches the mirror, and no step names the removed archive.
//!
//! `NISO_TEST_MIRROR_RECIPE=FILE` runs FILE (`sh FILE SRC DST`) instead of the
//! README's recipe: how the old recipe was shown to fail these tests.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use niso::index::json::VersionList;
use niso::index::{decode_index, pb, PublicKey};
use reqwest::blocking::Client;
use reqwest::StatusCode;

fn client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

fn upload(s: &Server, path: &str, body: Vec<u8>) {
    let r = client()
        .post(s.url(path))
        .bearer_auth(&s.admin)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "POST {path}");
}

fn delete(s: &Server, path: &str) {
    let r = client()
        .delete(s.url(path))
        .bearer_auth(&s.admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "DELETE {path}");
}

/// A `.niso` archive of `name` `version` for x86_64.
fn niso_archive(name: &str, version: &str) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    let pkg = src.path().join("pkg");
    std::fs::create_dir_all(pkg.join("payload/bin")).unwrap();
    std::fs::write(pkg.join("payload/bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(
        pkg.join("niso.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"x86_64\"\n\
             description = \"Load\"\n[binary]\nentrypoint = \"bin/run\"\n"
        ),
    )
    .unwrap();
    let (path, _) =
        niso::archive::niso::create(&pkg, src.path(), &niso::limits::Limits::default()).unwrap();
    std::fs::read(path).unwrap()
}

/// The recipe as the README gives it, saved as a script.
fn recipe(dir: &Path) -> PathBuf {
    if let Some(f) = std::env::var_os("NISO_TEST_MIRROR_RECIPE") {
        return PathBuf::from(f);
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let (_, section) = readme
        .split_once("**Mirrors (rsync).**")
        .expect("the README has a \"Mirrors (rsync)\" paragraph");
    let (_, block) = section
        .split_once("```sh\n")
        .expect("the rsync paragraph holds an sh block");
    let (block, _) = block.split_once("\n```").expect("the sh block ends");
    let path = dir.join("niso-mirror");
    std::fs::write(&path, format!("{block}\n")).unwrap();
    path
}

/// The rsync the recipe would run: a missing rsync is a failure.
fn real_rsync() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("rsync"))
        .find(|p| p.is_file())
        .expect("rsync is not installed: run scripts/install-test-deps")
}

/// The recipe, ready to run from `src` to `dst`; with a shim first on
/// `PATH` that, after each rsync, tells the test and waits for its answer.
struct Mirror {
    script: PathBuf,
    src: PathBuf,
    dst: PathBuf,
    shim_dir: PathBuf,
    step_fifo: PathBuf,
    ack_fifo: PathBuf,
    steps: mpsc::Receiver<String>,
    /// Held open for reading and writing, so neither side of a FIFO ever
    /// blocks on open or sees end-of-file between steps.
    ack: File,
}

impl Mirror {
    fn new(dir: &Path, src: &Path) -> Self {
        let shim_dir = dir.join("shim");
        std::fs::create_dir_all(&shim_dir).unwrap();
        let step_fifo = dir.join("step.fifo");
        let ack_fifo = dir.join("ack.fifo");
        for f in [&step_fifo, &ack_fifo] {
            let ok = Command::new("mkfifo").arg(f).status().unwrap().success();
            assert!(ok, "mkfifo {}", f.display());
        }
        let shim = shim_dir.join("rsync");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\n'{}' \"$@\"\nrc=$?\necho \"$rc $*\" >\"$NISO_STEP\"\n\
                 read -r _ <\"$NISO_ACK\"\nexit $rc\n",
                real_rsync().display()
            ),
        )
        .unwrap();
        let ok = Command::new("chmod")
            .arg("+x")
            .arg(&shim)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let rw = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap()
        };
        let step = rw(&step_fifo);
        let (tx, steps) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(step).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Mirror {
            script: recipe(dir),
            src: src.to_path_buf(),
            dst: dir.join("mirror"),
            ack: rw(&ack_fifo),
            shim_dir,
            step_fifo,
            ack_fifo,
            steps,
        }
    }

    /// One run of the recipe, `after_step` called after each of its rsyncs
    /// (the recipe waiting meanwhile). Returns the recipe's stderr.
    fn sync_with(&mut self, mut after_step: impl FnMut(&str)) -> String {
        let path = format!(
            "{}:{}",
            self.shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("sh")
            .arg(&self.script)
            .arg(&self.src)
            .arg(&self.dst)
            .env("PATH", path)
            .env("NISO_STEP", &self.step_fifo)
            .env("NISO_ACK", &self.ack_fifo)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sh");
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let status = loop {
            match self.steps.recv_timeout(Duration::from_millis(2)) {
                Ok(step) => {
                    after_step(&step);
                    self.ack.write_all(b"\n").unwrap();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        break status;
                    }
                }
                Err(e) => panic!("step channel: {e}"),
            }
        };
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        assert!(
            status.success(),
            "the recipe failed ({status}):\n{out}{err}"
        );
        err
    }

    /// A run that checks the mirror after every step.
    fn sync(&mut self, key: &PublicKey) -> String {
        let dst = self.dst.clone();
        let mut bad = Vec::new();
        let err = self.sync_with(|step| {
            for m in named_but_missing(&dst, key) {
                bad.push(format!("{m} (after `rsync {}`)", short(step)));
            }
        });
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        // The source was still: the copy of its indexes was a snapshot.
        assert!(!err.contains("kept changing"), "{err}");
        err
    }
}

fn short(step: &str) -> String {
    step.chars().take(120).collect()
}

/// An index on the mirror that names a file the mirror lacks.
struct Miss {
    index: PathBuf,
    bytes: Vec<u8>,
    missing: PathBuf,
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} names {}, which the mirror lacks",
            self.index.display(),
            self.missing.display()
        )
    }
}

/// Every archive and `v1/` download that an index of `mirror` names (niso's
/// `niso/packages/*`, Hex's `packages/*`, `v1/packages/*/versions`, in the
/// root repository and each organization's) and the mirror lacks.
fn named_but_missing(mirror: &Path, key: &PublicKey) -> Vec<Miss> {
    let mut repos = vec![("acme".to_string(), mirror.to_path_buf())];
    if let Ok(orgs) = std::fs::read_dir(mirror.join("repos")) {
        for org in orgs.flatten() {
            repos.push((org.file_name().to_string_lossy().into_owned(), org.path()));
        }
    }
    let mut out = Vec::new();
    for (repo, root) in repos {
        let mut need = |index: &Path, bytes: &[u8], rel: String| {
            let missing = root.join(rel);
            if !missing.is_file() {
                out.push(Miss {
                    index: index.to_path_buf(),
                    bytes: bytes.to_vec(),
                    missing,
                });
            }
        };
        for (index, bytes) in files_in(&root.join("niso/packages")) {
            let pkg = decode::<pb::Package>(&index, &bytes, key, &repo);
            for r in &pkg.releases {
                for a in &r.artifacts {
                    need(&index, &bytes, a.path.clone());
                    let v1 = format!("v1/packages/{}/{}/{}", pkg.name, r.version, a.arch);
                    need(&index, &bytes, v1);
                }
            }
        }
        for (index, bytes) in files_in(&root.join("packages")) {
            let pkg = decode::<pb::Package>(&index, &bytes, key, &repo);
            for r in &pkg.releases {
                // What a Hex client downloads.
                need(
                    &index,
                    &bytes,
                    format!("tarballs/{}-{}.tar", pkg.name, r.version),
                );
            }
        }
        let Ok(dirs) = std::fs::read_dir(root.join("v1/packages")) else {
            continue;
        };
        for d in dirs.flatten() {
            let index = d.path().join("versions");
            let Ok(bytes) = std::fs::read(&index) else {
                continue;
            };
            let list: VersionList = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", index.display()));
            for v in &list.versions {
                let rel = format!("v1/packages/{}/{}/{}", list.name, v.version, v.arch);
                need(&index, &bytes, rel);
            }
        }
    }
    out
}

/// The files of a directory (no temp files), read.
fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        // A file removed since the listing is no index any more.
        .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
        .collect()
}

fn decode<M: niso::index::codec::IndexMessage>(
    path: &Path,
    bytes: &[u8],
    key: &PublicKey,
    repo: &str,
) -> M {
    decode_index::<M>(bytes, key, repo, 1 << 26)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file of a tree but temp files (and other dot files), by path.
fn visible(root: &Path) -> BTreeMap<String, Vec<u8>> {
    snapshot(root)
        .into_iter()
        .filter(|(p, _)| !p.split('/').any(|c| c.starts_with('.')))
        .collect()
}

fn assert_same_files(src: &Path, dst: &Path) {
    let (a, b) = (visible(src), visible(dst));
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let differ: Vec<&String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "the mirror differs from the source in {} file(s): {differ:?}",
        differ.len()
    );
}

fn assert_verifies(mirror: &Path, key: &Path) {
    let out = niso(&[
        "registry",
        "verify",
        p(mirror),
        "--public-key",
        p(key),
        "--name",
        "acme",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the mirror does not verify:\n{}",
        text(&out)
    );
}

/// The key an operator pins, kept outside both trees.
fn pin_key(s: &Server, dir: &Path) -> (PathBuf, PublicKey) {
    let path = dir.join("acme.pem");
    std::fs::copy(s.tree().join("public_key"), &path).unwrap();
    let key = PublicKey::from_file(&path).unwrap();
    (path, key)
}

/// Files of `src` that the mirror holds with the same size and the same
/// modification time in whole seconds but other bytes: what rsync's default
/// quick check skips.
fn blind_to_quick_check(src: &Path, dst: &Path) -> Vec<String> {
    let (a, b) = (visible(src), visible(dst));
    a.iter()
        .filter(|(path, bytes)| {
            let Some(old) = b.get(*path) else {
                return false;
            };
            let (m1, m2) = (
                std::fs::metadata(src.join(path)).unwrap(),
                std::fs::metadata(dst.join(path)).unwrap(),
            );
            old != *bytes && m1.len() == m2.len() && m1.mtime() == m2.mtime()
        })
        .map(|(path, _)| path.clone())
        .collect()
}

fn sleep_to_start_of_a_second() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into());
    std::thread::sleep(left + Duration::from_millis(5));
}

#[test]
fn a_version_uploaded_in_the_same_second_as_a_sync_reaches_the_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let (key_path, key) = pin_key(&s, tmp.path());
    let mut m = Mirror::new(tmp.path(), &s.tree());
    // Archives of one size, so every file a version rewrites (`latest/any`,
    // the bin, `freshness`) keeps its size.
    let tarball = |v: u32| hex_tarball("quiet", &format!("1.0.{v}"));
    let sizes: BTreeSet<usize> = (10..40).map(|v| tarball(v).len()).collect();
    assert_eq!(sizes.len(), 1, "archives of different sizes: {sizes:?}");
    upload(&s, "/v1/packages/quiet/1.0.10/any", tarball(10));
    m.sync(&key);
    assert_verifies(&m.dst, &key_path);
    // Upload, sync, upload the next version, all in one second (tried
    // again, up to ten times, if the second ran out), then sync once more.
    let mut blind = Vec::new();
    for v in (11..31).step_by(2) {
        sleep_to_start_of_a_second();
        upload(&s, &format!("/v1/packages/quiet/1.0.{v}/any"), tarball(v));
        m.sync(&key);
        let w = v + 1;
        upload(&s, &format!("/v1/packages/quiet/1.0.{w}/any"), tarball(w));
        blind = blind_to_quick_check(&s.tree(), &m.dst);
        m.sync(&key);
        assert_verifies(&m.dst, &key_path);
        assert_same_files(&s.tree(), &m.dst);
        if !blind.is_empty() {
            break;
        }
    }
    assert!(
        !blind.is_empty(),
        "no upload landed in the same second as the sync before it: the case was never tested"
    );
    eprintln!("rewritten at the same size in the same second: {blind:?}");
}

#[test]
fn a_delete_reaches_the_mirror_after_the_indexes_stop_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let (key_path, key) = pin_key(&s, tmp.path());
    let mut m = Mirror::new(tmp.path(), &s.tree());
    upload(
        &s,
        "/v1/packages/gone/1.0.0/any",
        hex_tarball("gone", "1.0.0"),
    );
    upload(
        &s,
        "/v1/packages/gone/1.0.1/any",
        hex_tarball("gone", "1.0.1"),
    );
    upload(
        &s,
        "/v1/packages/app/1.0.0/x86_64",
        niso_archive("app", "1.0.0"),
    );
    upload(
        &s,
        "/v1/packages/app/1.1.0/x86_64",
        niso_archive("app", "1.1.0"),
    );
    upload(
        &s,
        "/repos/team/v1/packages/gone/1.0.0/any",
        hex_tarball("gone", "1.0.0"),
    );
    m.sync(&key);
    assert_verifies(&m.dst, &key_path);
    let removed = [
        "tarballs/gone-1.0.1.tar",
        "v1/packages/gone/1.0.1/any",
        "archives/app-1.1.0-x86_64.niso",
        "v1/packages/app/1.1.0/x86_64",
        "v1/packages/app/1.1.0/manifest",
        "repos/team/tarballs/gone-1.0.0.tar",
        "repos/team/v1/packages/gone/1.0.0/any",
    ];
    for f in removed {
        assert!(m.dst.join(f).is_file(), "{f} was not mirrored");
    }
    // `-H`: a download stays a link of its archive, as on the source.
    let inode = |f: &str| std::fs::metadata(m.dst.join(f)).unwrap().ino();
    assert_eq!(
        inode("tarballs/gone-1.0.0.tar"),
        inode("v1/packages/gone/1.0.0/any")
    );
    delete(&s, "/v1/packages/gone/1.0.1/any");
    delete(&s, "/v1/packages/app/1.1.0/x86_64");
    delete(&s, "/repos/team/v1/packages/gone/1.0.0/any");
    // `sync` checks after every step that no index names a removed file.
    m.sync(&key);
    assert_verifies(&m.dst, &key_path);
    assert_same_files(&s.tree(), &m.dst);
    for f in removed {
        assert!(!m.dst.join(f).exists(), "{f} is still on the mirror");
    }
    // The version directories go too.
    assert!(!m.dst.join("v1/packages/app/1.1.0").exists());
    assert!(!m.dst.join("v1/packages/gone/1.0.1").exists());
}

#[test]
fn under_load_no_index_on_the_mirror_names_a_missing_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Arc::new(Server::start(tmp.path(), &["--rate-limit-key", "0"]));
    let (key_path, key) = pin_key(&s, tmp.path());
    let mut m = Mirror::new(tmp.path(), &s.tree());
    let mirror = m.dst.clone();
    let stop = Arc::new(AtomicBool::new(false));
    // (upload path, the archive's path in the tree) of every upload.
    let uploaded = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let mut workers = Vec::new();
    type Make = fn(u32) -> (String, String, Vec<u8>);
    let kinds: [Make; 3] = [
        |n| {
            let v = format!("1.0.{n}");
            (
                format!("/v1/packages/load-hex/{v}/any"),
                format!("tarballs/load-hex-{v}.tar"),
                hex_tarball("load-hex", &v),
            )
        },
        |n| {
            let v = format!("1.{n}.0");
            (
                format!("/v1/packages/load-app/{v}/x86_64"),
                format!("archives/load-app-{v}-x86_64.niso"),
                niso_archive("load-app", &v),
            )
        },
        |n| {
            let v = format!("2.0.{n}");
            (
                format!("/repos/team/v1/packages/team-hex/{v}/any"),
                format!("repos/team/tarballs/team-hex-{v}.tar"),
                hex_tarball("team-hex", &v),
            )
        },
    ];
    for make in kinds {
        let (s, stop, uploaded) = (s.clone(), stop.clone(), uploaded.clone());
        workers.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (url, file, body) = make(n);
                upload(&s, &url, body);
                uploaded.lock().unwrap().push((url, file));
                n += 1;
            }
            n
        }));
    }
    // Deletes every third version the mirror already holds (an archive
    // uploaded and deleted between two runs never reaches the mirror).
    let deletes = Arc::new(AtomicUsize::new(0));
    {
        let (s, stop, uploaded, deletes) =
            (s.clone(), stop.clone(), uploaded.clone(), deletes.clone());
        let mirror = mirror.clone();
        workers.push(std::thread::spawn(move || {
            let mut done = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let list = uploaded.lock().unwrap().clone();
                for (i, (url, file)) in list.iter().enumerate() {
                    if i % 3 == 1 && !done.contains(url) && mirror.join(file).is_file() {
                        delete(&s, url);
                        done.insert(url.clone());
                        deletes.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            0
        }));
    }
    // Reads the mirror all the while, at any moment of any step. A miss is
    // confirmed by reading the index again (the same bytes) and the file
    // again: an index replaced between the two reads is no miss.
    let scanning = Arc::new(AtomicBool::new(true));
    let scanner = {
        let (scanning, mirror, key) = (scanning.clone(), mirror.clone(), key.clone());
        std::thread::spawn(move || {
            let (mut scans, mut misses) = (0usize, Vec::new());
            while scanning.load(Ordering::Relaxed) {
                for miss in named_but_missing(&mirror, &key) {
                    let same = std::fs::read(&miss.index).is_ok_and(|b| b == miss.bytes);
                    if same && !miss.missing.is_file() {
                        misses.push(miss.to_string());
                    }
                }
                scans += 1;
                // Leave the CPUs to the writers and the recipe.
                std::thread::sleep(Duration::from_millis(5));
            }
            (scans, misses)
        })
    };
    let started = Instant::now();
    let (mut runs, mut steps, mut fallbacks) = (0, 0, 0);
    let mut generations = BTreeSet::new();
    let mut step_misses = Vec::new();
    let mut check = |step: &str, runs: usize, steps: &mut usize| {
        *steps += 1;
        for miss in named_but_missing(&mirror, &key) {
            step_misses.push(format!(
                "{miss} (run {runs}, after `rsync {}`)",
                short(step)
            ));
        }
        if let Ok(b) = std::fs::read(mirror.join("freshness")) {
            generations.insert(b);
        }
    };
    // At least 5 s and 3 runs under load (a loaded machine runs slower).
    while started.elapsed() < Duration::from_secs(5) || runs < 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "runs too slow");
        let err = m.sync_with(|step| check(step, runs, &mut steps));
        fallbacks += usize::from(err.contains("kept changing"));
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u32> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // Uploads have stopped: one more run.
    m.sync_with(|step| check(step, runs, &mut steps));
    scanning.store(false, Ordering::Relaxed);
    let (scans, scan_misses) = scanner.join().unwrap();
    eprintln!(
        "uploads {counts:?}, deletes {}, runs {runs} (source never still: {fallbacks}), \
         steps checked {steps}, mirror generations seen {}, scans {scans}",
        deletes.load(Ordering::Relaxed),
        generations.len()
    );
    assert!(
        step_misses.is_empty(),
        "{} miss(es) after steps:\n{}",
        step_misses.len(),
        step_misses[..step_misses.len().min(20)].join("\n")
    );
    assert!(
        scan_misses.is_empty(),
        "{} miss(es) while the recipe ran:\n{}",
        scan_misses.len(),
        scan_misses[..scan_misses.len().min(20)].join("\n")
    );
    // The test saw the mirror move while uploads landed.
    assert!(runs >= 3, "only {runs} runs");
    assert!(
        generations.len() >= 3,
        "the mirror took only {} generations",
        generations.len()
    );
    assert!(deletes.load(Ordering::Relaxed) > 0, "nothing was deleted");
    assert_verifies(&mirror, &key_path);
    assert_same_files(&s.tree(), &mirror);
}

#[test]
fn a_second_run_at_once_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let (_, key) = pin_key(&s, tmp.path());
    let mut m = Mirror::new(tmp.path(), &s.tree());
    m.sync(&key);
    upload(
        &s,
        "/v1/packages/app/1.0.0/x86_64",
        niso_archive("app", "1.0.0"),
    );
    let before = snapshot(&m.dst);
    // Another run holds the lock.
    let lock = File::create(tmp.path().join("mirror.next/.lock")).unwrap();
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }
    let out = Command::new("sh")
        .arg(&m.script)
        .arg(&m.src)
        .arg(&m.dst)
        .output()
        .unwrap();
    drop(lock);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("another run holds"), "{}", text(&out));
    assert_eq!(before, snapshot(&m.dst), "a refused run changed the mirror");
}
