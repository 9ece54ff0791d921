//! `niso registry gc` end to end, with the built binary: on a data
//! directory, and through the API of a `niso registry serve` started on
//! 127.0.0.1. The same registry content in both: `.niso` packages with
//! several arches, pre-releases and semver orders text would get wrong,
//! Hex tarballs, tags, and an organization repository.
//!
//! After a gc each test checks, from the signed indexes in the tree: the
//! versions kept are exactly the N newest, the tagged ones and `latest`;
//! every removed artifact has a tombstone with its SHA-256 and its file is
//! gone; an upload of other bytes to a removed version is refused; the
//! tree verifies; a dry run changed no byte; a second gc removes nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use common::{p, Server, ADMIN_KEY};
use niso::ident::{PackageName, RepoName, TagName, Version};
use niso::index::{pb, PublicKey};
use niso::publish::{Layout, Options};
use serde_json::Value;

// ---------------------------------------------------------------------------
// The registry's content.

/// `.niso` releases of the root repository: (name, version, arches).
const NISO: &[(&str, &str, &[&str])] = &[
    ("my-app", "0.9.0", &["x86_64"]),
    ("my-app", "1.0.0", &["aarch64", "x86_64"]),
    ("my-app", "1.1.0", &["x86_64"]),
    ("my-app", "1.2.0", &["x86_64"]),
    ("my-app", "1.10.0", &["aarch64", "x86_64"]),
    ("my-app", "2.0.0-rc.1", &["x86_64"]),
    ("beta-tool", "1.0.0", &["x86_64"]),
    ("beta-tool", "2.0.0-rc.1", &["x86_64"]),
    ("beta-tool", "2.0.0-rc.2", &["x86_64"]),
    ("beta-tool", "2.0.0-rc.3", &["x86_64"]),
];

/// Hex tarballs of the root repository (arch `any`).
const HEX: &[(&str, &str)] = &[
    ("decimal", "1.0.0"),
    ("decimal", "1.1.0"),
    ("decimal", "1.2.0"),
    ("decimal", "1.3.0"),
    ("small", "1.0.0"),
];

/// `.niso` releases of organization `team` (x86_64).
const TEAM: &[(&str, &str)] = &[
    ("tool", "1.0.0"),
    ("tool", "1.1.0"),
    ("tool", "1.2.0"),
    ("tool", "1.3.0"),
];

/// (org, package, tag, version).
const TAGS: &[(Option<&str>, &str, &str, &str)] = &[
    (None, "my-app", "lts", "0.9.0"),
    (None, "decimal", "stable", "1.1.0"),
    (Some("team"), "tool", "old", "1.0.0"),
];

const KEEP: &str = "2";

/// What `gc --keep-versions 2` removes from the root repository, in the
/// order it prints them: packages by name, newest version first.
const ROOT_REMOVED: &[&str] = &[
    "beta-tool 2.0.0-rc.1 (x86_64)",
    "decimal 1.0.0 (any)",
    "my-app 1.2.0 (x86_64)",
    "my-app 1.1.0 (x86_64)",
    "my-app 1.0.0 (aarch64)",
    "my-app 1.0.0 (x86_64)",
];
const TEAM_REMOVED: &[&str] = &["team/tool 1.1.0 (x86_64)"];

/// The versions kept, per package: the 2 newest by semver (1.10.0 above
/// 1.2.0; a pre-release counts), the tagged ones, and `latest` (beta-tool
/// 1.0.0: its two newest are release candidates).
fn expected_kept() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        ("my-app", vec!["0.9.0", "1.10.0", "2.0.0-rc.1"]),
        ("beta-tool", vec!["1.0.0", "2.0.0-rc.2", "2.0.0-rc.3"]),
        ("decimal", vec!["1.1.0", "1.2.0", "1.3.0"]),
        ("small", vec!["1.0.0"]),
        ("team/tool", vec!["1.0.0", "1.2.0", "1.3.0"]),
    ])
}

/// Every archive, made once per test in `dir`: (org, file).
fn archives(dir: &Path) -> Vec<(Option<&'static str>, PathBuf)> {
    let mut out = Vec::new();
    for (name, version, arches) in NISO {
        for arch in *arches {
            out.push((None, niso_archive(dir, name, version, arch, "payload")));
        }
    }
    for (name, version) in HEX {
        let f = dir.join(format!("{name}-{version}.tar"));
        std::fs::write(&f, common::hex_tarball(name, version)).unwrap();
        out.push((None, f));
    }
    for (name, version) in TEAM {
        out.push((
            Some("team"),
            niso_archive(dir, name, version, "x86_64", "payload"),
        ));
    }
    out
}

/// A `.niso` archive made with the library's `niso package`.
fn niso_archive(dir: &Path, name: &str, version: &str, arch: &str, payload: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join(format!("src-{name}-{version}-{arch}-{payload}"));
    std::fs::create_dir_all(src.join("payload/bin")).unwrap();
    std::fs::write(
        src.join("niso.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"{arch}\"\n\
             description = \"Made by the gc tests\"\n\n[binary]\nentrypoint = \"bin/{name}\"\n"
        ),
    )
    .unwrap();
    let bin = src.join("payload/bin").join(name);
    std::fs::write(&bin, format!("#!/bin/sh\necho {payload}\n")).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join(format!("out-{payload}"));
    std::fs::create_dir_all(&out).unwrap();
    niso::archive::niso::create(&src, &out, &niso::limits::Limits::default())
        .unwrap()
        .0
}

// ---------------------------------------------------------------------------
// Reading the tree.

/// One artifact as a signed index names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Art {
    /// `team/tool` or `my-app`.
    package: String,
    version: String,
    arch: String,
    /// From the repository's root (`repos/team/archives/…`).
    path: String,
    sha256: Vec<u8>,
}

impl Art {
    fn what(&self) -> String {
        format!("{} {} ({})", self.package, self.version, self.arch)
    }
}

/// Every package's niso index, verified, by `team/tool` or `my-app` (a
/// repository without packages has no `niso/packages/`).
fn indexes(tree: &Path) -> BTreeMap<String, pb::Package> {
    let key = PublicKey::from_file(&tree.join("public_key")).unwrap();
    let mut out = BTreeMap::new();
    for (prefix, repo, label) in [("", "acme", ""), ("repos/team/", "team", "team/")] {
        let dir = tree.join(format!("{prefix}niso/packages"));
        if !dir.exists() {
            continue;
        }
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let pkg: pb::Package = niso::index::decode_index(&bytes, &key, repo, 1 << 24)
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            out.insert(format!("{label}{}", pkg.name), pkg);
        }
    }
    out
}

fn artifacts(tree: &Path) -> BTreeSet<Art> {
    let mut out = BTreeSet::new();
    for (label, pkg) in indexes(tree) {
        let prefix = if label.starts_with("team/") {
            "repos/team/"
        } else {
            ""
        };
        for r in &pkg.releases {
            for a in &r.artifacts {
                out.insert(Art {
                    package: label.clone(),
                    version: r.version.clone(),
                    arch: a.arch.clone(),
                    path: format!("{prefix}{}", a.path),
                    sha256: a.sha256.clone(),
                });
            }
        }
    }
    out
}

/// Generation of a repository's freshness record.
fn generation(tree: &Path, prefix: &str, repo: &str) -> u64 {
    let key = PublicKey::from_file(&tree.join("public_key")).unwrap();
    let bytes = std::fs::read(tree.join(format!("{prefix}freshness"))).unwrap();
    let f: pb::Freshness = niso::index::decode_index(&bytes, &key, repo, 1 << 24).unwrap();
    f.generation
}

fn verify(data_dir: &Path) {
    let out = common::niso(&[
        "registry",
        "verify",
        p(data_dir),
        "--public-key",
        p(&data_dir.join("public/public_key")),
        "--name",
        "acme",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the tree does not verify:\n{}",
        common::text(&out)
    );
}

/// The tree after a gc removed `removed` of `before`: exactly the expected
/// versions are left, each removed artifact has its tombstone and no file.
fn check_collected(tree: &Path, before: &BTreeSet<Art>, removed: &[&str]) {
    let removed: BTreeSet<String> = removed.iter().map(|s| s.to_string()).collect();
    let after = artifacts(tree);
    let expected: BTreeSet<Art> = before
        .iter()
        .filter(|a| !removed.contains(&a.what()))
        .cloned()
        .collect();
    assert_eq!(after, expected, "the artifacts left are not the ones kept");
    let mut kept: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in &after {
        kept.entry(a.package.clone())
            .or_default()
            .insert(a.version.clone());
    }
    let want = expected_kept();
    for (package, versions) in &kept {
        let w: BTreeSet<String> = want[package.as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(versions, &w, "{package}");
    }
    // Tombstones: exactly the removed artifacts, with their bytes' digest.
    let mut tombstones = BTreeSet::new();
    for (label, pkg) in indexes(tree) {
        for t in &pkg.tombstones {
            let what = format!("{label} {} ({})", t.version, t.arch);
            let art = before.iter().find(|a| a.what() == what).unwrap();
            assert_eq!(t.sha256, art.sha256, "{what}");
            tombstones.insert(what);
        }
    }
    assert_eq!(tombstones, removed);
    for a in before {
        assert_eq!(
            tree.join(&a.path).exists(),
            !removed.contains(&a.what()),
            "{}",
            a.path
        );
    }
}

// ---------------------------------------------------------------------------
// Running the client with its own home.

struct Client {
    dir: tempfile::TempDir,
}

impl Client {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        Command::new(env!("CARGO_BIN_EXE_niso"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_DATA_HOME", d.join("data"))
            .env("XDG_STATE_HOME", d.join("state"))
            .stdin(Stdio::null())
            .output()
            .expect("run niso")
    }

    /// Expects success; returns (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let (o, e) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "niso {args:?} failed:\nstdout:\n{o}\nstderr:\n{e}"
        );
        (o, e)
    }

    /// Expects exit status 2; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (o, e) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "niso {args:?} should fail:\nstdout:\n{o}\nstderr:\n{e}"
        );
        e
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(verb: &str, what: &[&str]) -> String {
    what.iter().map(|w| format!("{verb} {w}\n")).collect()
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

// ---------------------------------------------------------------------------
// On a data directory.

/// Sets tags with the library's publisher (there is no offline `tag`).
fn tag_offline(dd: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let d = niso::datadir::DataDir::open(dd).unwrap();
        for (org, name, tag, version) in TAGS {
            let layout = match org {
                Some(o) => Layout::organization(&RepoName::new(o).unwrap()),
                None => Layout::root(),
            };
            let publisher = d
                .publisher(Arc::new(d.key().unwrap()), layout, Options::default(), None)
                .await
                .unwrap();
            publisher
                .set_tag(
                    &PackageName::new(name).unwrap(),
                    &TagName::new(tag).unwrap(),
                    &Version::new(version).unwrap(),
                )
                .await
                .unwrap();
        }
    });
}

#[test]
fn gc_on_a_data_directory_keeps_the_newest_and_the_tagged_and_tombstones_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = common::init(tmp.path(), "acme");
    let tree = dd.join("public");
    let files = archives(&tmp.path().join("archives"));
    for org in [None, Some("team")] {
        let mut args = vec!["registry", "publish", "--data-dir", p(&dd)];
        if let Some(o) = org {
            args.extend(["--org", o]);
        }
        args.extend(files.iter().filter(|(o, _)| *o == org).map(|(_, f)| p(f)));
        common::niso_ok(&args);
    }
    tag_offline(&dd);
    let before = artifacts(&tree);
    assert_eq!(before.len(), 21);
    let c = Client::new();

    // N = 0 is refused, naming why; nothing changes.
    let snap = common::snapshot(&dd);
    let e = c.fails(&[
        "registry",
        "gc",
        "--keep-versions",
        "0",
        "--data-dir",
        p(&dd),
    ]);
    assert!(e.contains("must be at least 1"), "{e}");
    // An organization the data directory does not have.
    let e = c.fails(&[
        "registry",
        "gc",
        "--keep-versions",
        KEEP,
        "--data-dir",
        p(&dd),
        "--org",
        "nobody",
    ]);
    assert!(
        e.contains("no organization repository nobody") && e.contains("organizations: team"),
        "{e}"
    );

    // A dry run prints the plan and changes no byte of the data directory.
    let all: Vec<&str> = ROOT_REMOVED.iter().chain(TEAM_REMOVED).copied().collect();
    let gc = [
        "registry",
        "gc",
        "--keep-versions",
        KEEP,
        "--data-dir",
        p(&dd),
    ];
    let dry: Vec<&str> = gc.iter().copied().chain(["--dry-run"]).collect();
    let (o, e) = c.ok(&dry);
    assert_eq!(o, lines("Would remove", &all));
    assert_eq!(
        e,
        "Would remove 7 artifacts of 4 packages; would keep 13 versions (dry run: nothing was changed)\n"
    );
    assert_eq!(snap, common::snapshot(&dd), "a dry run changed the tree");

    // The real run: the same artifacts, one change per repository.
    let generations = (
        generation(&tree, "", "acme"),
        generation(&tree, "repos/team/", "team"),
    );
    let (o, e) = c.ok(&gc);
    assert_eq!(o, lines("Removing", &all));
    assert_eq!(e, "Removed 7 artifacts of 4 packages; kept 13 versions\n");
    assert_eq!(
        (
            generation(&tree, "", "acme"),
            generation(&tree, "repos/team/", "team")
        ),
        (generations.0 + 1, generations.1 + 1),
        "gc should be one change per repository"
    );
    check_collected(&tree, &before, &all);
    verify(&dd);

    // A removed version never takes other bytes; its own bytes restore it.
    let other = niso_archive(tmp.path(), "my-app", "1.0.0", "x86_64", "other");
    let out = common::niso(&["registry", "publish", "--data-dir", p(&dd), p(&other)]);
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("my-app 1.0.0 (x86_64) was deleted"), "{text}");

    // Again: nothing more to remove, and no byte changes.
    let snap = common::snapshot(&dd);
    let (o, e) = c.ok(&gc);
    assert_eq!(o, "");
    assert_eq!(e, "Nothing to remove; kept 13 versions\n");
    assert_eq!(snap, common::snapshot(&dd), "a second gc changed the tree");
    // Fewer versions to keep removes more, and --json says what.
    let (o, _) = c.ok(&[
        "registry",
        "gc",
        "--keep-versions",
        "1",
        "--data-dir",
        p(&dd),
        "--org",
        "team",
        "--json",
    ]);
    let msgs = json_lines(&o);
    let kinds: Vec<&str> = msgs.iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["keep", "keep", "remove", "summary"], "{o}");
    assert_eq!(msgs[0]["org"], "team");
    assert_eq!(msgs[0]["version"], "1.3.0");
    assert_eq!(msgs[0]["reasons"], serde_json::json!(["newest", "latest"]));
    assert_eq!(msgs[1]["version"], "1.0.0");
    assert_eq!(msgs[1]["reasons"], serde_json::json!(["tag:old"]));
    assert_eq!(msgs[2]["version"], "1.2.0");
    assert_eq!(msgs[2]["dry_run"], false);
    assert_eq!(
        msgs[3],
        serde_json::json!({"type": "summary", "removed": 1, "packages": 1, "kept_versions": 2, "dry_run": false})
    );
    verify(&dd);
}

// ---------------------------------------------------------------------------
// Through the API.

#[test]
fn gc_through_the_api_needs_the_delete_scope_and_removes_what_a_data_directory_gc_would() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let tree = s.tree();
    let admin = Client::new();
    admin.ok(&[
        "registry",
        "add",
        "r",
        &s.url(""),
        "--key",
        ADMIN_KEY,
        "--yes",
    ]);
    for (org, f) in archives(&tmp.path().join("archives")) {
        let mut args = vec!["push", p(&f)];
        if let Some(o) = org {
            args.extend(["--org", o]);
        }
        admin.ok(&args);
    }
    for (org, name, tag, version) in TAGS {
        let pkg = match org {
            Some(o) => format!("{o}/{name}"),
            None => name.to_string(),
        };
        admin.ok(&["tag", &format!("{pkg}:{version}"), &format!("{pkg}:{tag}")]);
    }
    let before = artifacts(&tree);
    assert_eq!(before.len(), 21);
    let key = |scopes: &[&str]| {
        let mut args = vec!["registry", "create-key", "--name", "gc", "--json"];
        for sc in scopes {
            args.extend(["--scope", sc]);
        }
        let (o, _) = admin.ok(&args);
        json_lines(&o)[0]["key"].as_str().unwrap().to_string()
    };
    let client_with = |key: &str| {
        let c = Client::new();
        c.ok(&["registry", "add", "r", &s.url(""), "--key", key, "--yes"]);
        c
    };
    let gc = ["registry", "gc", "--keep-versions", KEEP];

    // A dry run reads the signed indexes and changes nothing.
    let snap = common::snapshot(&tree);
    let pusher = client_with(&key(&["push:*", "pull:*"]));
    let dry: Vec<&str> = gc.iter().copied().chain(["--dry-run"]).collect();
    let (o, e) = pusher.ok(&dry);
    assert_eq!(o, lines("Would remove", ROOT_REMOVED));
    assert_eq!(
        e,
        "Would remove 6 artifacts of 3 packages; would keep 10 versions (dry run: nothing was changed)\n"
    );
    // With --json: what is kept and why, then what goes.
    let with_json: Vec<&str> = dry.iter().copied().chain(["--json"]).collect();
    let (o, _) = pusher.ok(&with_json);
    let msgs = json_lines(&o);
    let kept: Vec<(String, String, Value)> = msgs
        .iter()
        .filter(|m| m["type"] == "keep" && m["name"] == "my-app")
        .map(|m| {
            (
                m["version"].as_str().unwrap().to_string(),
                m["org"].to_string(),
                m["reasons"].clone(),
            )
        })
        .collect();
    assert_eq!(
        kept,
        vec![
            (
                "2.0.0-rc.1".into(),
                "null".into(),
                serde_json::json!(["newest"])
            ),
            (
                "1.10.0".into(),
                "null".into(),
                serde_json::json!(["newest", "latest"])
            ),
            (
                "0.9.0".into(),
                "null".into(),
                serde_json::json!(["tag:lts"])
            ),
        ]
    );
    let removes: Vec<String> = msgs
        .iter()
        .filter(|m| m["type"] == "remove")
        .map(|m| {
            assert_eq!(m["dry_run"], true);
            format!(
                "{} {} ({})",
                m["name"].as_str().unwrap(),
                m["version"].as_str().unwrap(),
                m["arch"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(removes, ROOT_REMOVED);
    assert_eq!(snap, common::snapshot(&tree), "a dry run changed the tree");

    // A key without the delete: scope is refused at the first artifact,
    // and told which scope it lacks; nothing is removed.
    let e = pusher.fails(&gc);
    assert!(
        e.contains("cannot remove beta-tool 2.0.0-rc.1 (x86_64) (gc needs an API key with the scope delete:beta-tool or delete:*); removed 0 of 6 artifacts before this"),
        "{e}"
    );
    assert!(
        e.contains("does not have the scope to delete beta-tool"),
        "{e}"
    );
    assert_eq!(snap, common::snapshot(&tree));
    // Without any key, only a dry run is possible.
    let anonymous = Client::new();
    anonymous.ok(&["registry", "add", "r", &s.url(""), "--yes"]);
    let e = anonymous.fails(&gc);
    assert!(e.contains("needs an API key with a delete: scope"), "{e}");

    // With delete:*: the root repository only, as the dry run said.
    let deleter = client_with(&key(&["delete:*", "pull:team/*"]));
    let (o, e) = deleter.ok(&gc);
    assert_eq!(o, lines("Removing", ROOT_REMOVED));
    assert_eq!(e, "Removed 6 artifacts of 3 packages; kept 10 versions\n");
    // An organization's packages need their own scope.
    let e = deleter.fails(&[&gc[..], &["--org", "team"]].concat());
    assert!(e.contains("delete:team/tool or delete:team/*"), "{e}");
    let team = client_with(&key(&["delete:team/*", "pull:team/*"]));
    let (o, e) = team.ok(&[&gc[..], &["--org", "team"]].concat());
    assert_eq!(o, lines("Removing", TEAM_REMOVED));
    assert_eq!(e, "Removed 1 artifact of 1 package; kept 3 versions\n");

    let all: Vec<&str> = ROOT_REMOVED.iter().chain(TEAM_REMOVED).copied().collect();
    check_collected(&tree, &before, &all);
    s.assert_tree_verifies();

    // The server refuses other bytes for a removed version.
    let other = niso_archive(tmp.path(), "my-app", "1.1.0", "x86_64", "other");
    let e = admin.fails(&["push", p(&other)]);
    assert!(e.contains("my-app 1.1.0 (x86_64) was deleted"), "{e}");

    // Again: nothing more to remove, no byte changed.
    let snap = common::snapshot(&tree);
    let (o, e) = deleter.ok(&gc);
    assert_eq!(o, "");
    assert_eq!(e, "Nothing to remove; kept 10 versions\n");
    assert_eq!(
        snap,
        common::snapshot(&tree),
        "a second gc changed the tree"
    );
}

// ---------------------------------------------------------------------------
// The publisher's side: many deletes, one change.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_many_is_one_change_and_answers_for_each_item() {
    use niso::archive::inspect_file;
    use niso::ident::Arch;
    use niso::publish::{PublishError, Publisher, StagedFile, Upload};
    use niso::store::LocalStore;

    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let key = Arc::new(niso::index::RepoKey::generate().unwrap());
    std::fs::create_dir_all(&tree).unwrap();
    let publisher = Publisher::open(
        Arc::new(LocalStore::new(&tree)),
        key.clone(),
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .await
    .unwrap();
    for f in common::niso_fixtures() {
        let staged = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        std::fs::copy(&f, &staged).unwrap();
        publisher
            .publish(Upload {
                info: inspect_file(&staged, &niso::limits::Limits::default()).unwrap(),
                staged: StagedFile::Owned(staged),
                uploaded_at: niso::publish::unix_now(),
                signature: None,
            })
            .await
            .unwrap();
    }
    let before = artifacts(&tree);
    assert_eq!(before.len(), 3);
    let generation_before = generation(&tree, "", "acme");

    let id = |n: &str, v: &str, a: &str| {
        (
            PackageName::new(n).unwrap(),
            Version::new(v).unwrap(),
            Arch::new(a).unwrap(),
        )
    };
    let out = publisher
        .delete_many(&[
            id("my-app", "1.0.0", "x86_64"),
            id("my-app", "1.1.0", "aarch64"),
            id("my-app", "1.1.0", "aarch64"), // named twice
            id("my-app", "9.9.9", "x86_64"),  // not published
            id("nope", "1.0.0", "x86_64"),    // no such package
        ])
        .await
        .unwrap();
    let verdicts: Vec<bool> = out.iter().map(Result::is_ok).collect();
    assert_eq!(verdicts, [true, true, false, false, false]);
    for r in &out[2..] {
        assert!(
            matches!(r, Err(PublishError::NotFound(m)) if m.contains("is not published")),
            "{r:?}"
        );
    }
    assert_eq!(generation(&tree, "", "acme"), generation_before + 1);
    let left: Vec<String> = artifacts(&tree).iter().map(Art::what).collect();
    assert_eq!(left, ["my-app 1.1.0 (x86_64)"]);
    let pkg = &indexes(&tree)["my-app"];
    let tombstones: Vec<(&str, &str)> = pkg
        .tombstones
        .iter()
        .map(|t| (t.version.as_str(), t.arch.as_str()))
        .collect();
    assert_eq!(tombstones, [("1.0.0", "x86_64"), ("1.1.0", "aarch64")]);

    // Nothing left to do: no change at all.
    let snap = common::snapshot(&tree);
    let out = publisher
        .delete_many(&[id("my-app", "1.0.0", "x86_64")])
        .await
        .unwrap();
    assert!(matches!(out[..], [Err(PublishError::NotFound(_))]));
    assert_eq!(snap, common::snapshot(&tree));
}
