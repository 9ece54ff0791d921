//! `niso registry gc`: which versions of a package to keep, and the
//! remote half of removing the others.
//!
//! The plan is a pure function of a package's niso index ([`plan`]), so a
//! data directory (through the publisher's model) and a remote registry
//! (through the verified, signed index) decide alike. Kept, per package:
//!
//! * the N newest versions, by semver (pre-releases are versions too; a
//!   version's artifacts of every arch stay or go together);
//! * every version a tag points at;
//! * the version `latest` names (the newest stable release, what
//!   `niso pull NAME` takes and `list-tags` shows): with `1.0.0`,
//!   `2.0.0-rc.1` and `2.0.0-rc.2`, keeping 2 must not turn
//!   `niso pull NAME` into a pull of a release candidate.
//!
//! Everything else is removed through the publisher's delete, which leaves
//! a tombstone per artifact: a removed version never comes back with other
//! bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use super::api::{self, ApiClient, ApiError, Call, Method};
use crate::ident::{Arch, PackageName, RepoName, Version};
use crate::index::pb;
use crate::index::view::version_key;

/// Why a version is kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// One of the N newest.
    Newest,
    /// What `latest` resolves to.
    Latest,
    /// A tag points at it.
    Tag(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Newest => f.write_str("newest"),
            Reason::Latest => f.write_str("latest"),
            Reason::Tag(t) => write!(f, "tag:{t}"),
        }
    }
}

/// A version gc keeps, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub version: String,
    pub reasons: Vec<Reason>,
}

/// One artifact gc removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub version: String,
    pub arch: String,
}

/// What gc does to one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackagePlan {
    pub name: String,
    /// Newest first.
    pub keep: Vec<Kept>,
    /// Newest version first, arches in index order.
    pub remove: Vec<Removal>,
}

/// Decides what to keep of `pkg` when keeping the `keep_versions` newest
/// versions (at least 1: see the CLI for why 0 is refused).
pub fn plan(pkg: &pb::Package, keep_versions: usize) -> PackagePlan {
    let mut releases: Vec<&pb::Release> = pkg.releases.iter().collect();
    // Newest first; the text breaks ties so the order never depends on the
    // index's (an unparsable version, never written by us, sorts oldest).
    releases.sort_by(|a, b| {
        (version_key(&b.version), &b.version).cmp(&(version_key(&a.version), &a.version))
    });
    let mut reasons: BTreeMap<&str, Vec<Reason>> = BTreeMap::new();
    for r in releases.iter().take(keep_versions) {
        reasons.entry(&r.version).or_default().push(Reason::Newest);
    }
    // `latest` as `view::latest` picks it (the newest stable, else the
    // newest), from this order rather than the index's.
    let newest_stable = releases
        .iter()
        .find(|r| version_key(&r.version).is_some_and(|v| v.pre.is_empty()));
    if keep_versions > 0 {
        if let Some(r) = newest_stable.or(releases.first()) {
            reasons.entry(&r.version).or_default().push(Reason::Latest);
        }
    }
    for t in &pkg.tags {
        if let Some(r) = releases.iter().find(|r| r.version == t.version) {
            reasons
                .entry(&r.version)
                .or_default()
                .push(Reason::Tag(t.tag.clone()));
        }
    }
    let mut keep = Vec::new();
    let mut remove = Vec::new();
    for r in releases {
        match reasons.remove(r.version.as_str()) {
            Some(mut why) => {
                why.sort();
                why.dedup();
                keep.push(Kept {
                    version: r.version.clone(),
                    reasons: why,
                });
            }
            None => remove.extend(r.artifacts.iter().map(|a| Removal {
                version: r.version.clone(),
                arch: a.arch.clone(),
            })),
        }
    }
    PackagePlan {
        name: pkg.name.clone(),
        keep,
        remove,
    }
}

/// `DELETE [/repos/ORG]/v1/packages/{name}/{version}/{arch}`.
pub fn delete_call(
    org: Option<&RepoName>,
    name: &PackageName,
    version: &Version,
    arch: &Arch,
) -> Call {
    Call {
        method: Method::Delete,
        path: api::upload_path(org, name, version, arch),
        body: None,
    }
}

/// How a remote delete ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// This call removed it.
    Removed,
    /// It was gone already (another writer, or a retry whose first try
    /// was answered but the answer lost).
    Gone,
}

/// How often a delete is sent again after a lost answer or a 429/50x.
const ATTEMPTS: u32 = 4;
const FIRST_WAIT: Duration = Duration::from_millis(500);
/// A server asking to wait longer than this is not waited for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Sends a delete, retrying what may succeed when sent again. A 404 means
/// the artifact is not published (any more): the goal of the call.
pub fn delete_remote(api: &ApiClient, call: &Call) -> Result<Deleted, ApiError> {
    let mut wait = FIRST_WAIT;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match api.call::<serde_json::Value>(call) {
            Ok(_) => return Ok(Deleted::Removed),
            Err(ApiError::NotFound { .. }) => return Ok(Deleted::Gone),
            Err(e) => e,
        };
        if !error.is_retryable() || attempt >= ATTEMPTS {
            return Err(error);
        }
        let pause = match &error {
            ApiError::RateLimited { retry_after, .. } => Duration::from_secs(*retry_after),
            _ => wait,
        };
        if pause > MAX_WAIT {
            return Err(error);
        }
        tracing::warn!(
            "{} failed ({error}); retrying ({attempt} of {ATTEMPTS} tries made)",
            call.path
        );
        std::thread::sleep(pause);
        wait *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(v: &str, arches: &[&str]) -> pb::Release {
        pb::Release {
            version: v.into(),
            artifacts: arches
                .iter()
                .map(|a| pb::Artifact {
                    arch: (*a).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn package(versions: &[(&str, &[&str])], tags: &[(&str, &str)]) -> pb::Package {
        pb::Package {
            name: "p".into(),
            releases: versions.iter().map(|(v, a)| release(v, a)).collect(),
            tags: tags
                .iter()
                .map(|(t, v)| pb::Tag {
                    tag: (*t).into(),
                    version: (*v).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn kept(p: &PackagePlan) -> Vec<(&str, String)> {
        p.keep
            .iter()
            .map(|k| {
                let why: Vec<String> = k.reasons.iter().map(ToString::to_string).collect();
                (k.version.as_str(), why.join(","))
            })
            .collect()
    }

    fn removed(p: &PackagePlan) -> Vec<String> {
        p.remove
            .iter()
            .map(|r| format!("{} {}", r.version, r.arch))
            .collect()
    }

    #[test]
    fn keeps_the_newest_by_semver_and_every_tagged_version() {
        let p = package(
            &[
                ("0.9.0", &["x86_64"]),
                ("1.0.0", &["aarch64", "x86_64"]),
                ("1.2.0", &["x86_64"]),
                ("1.10.0", &["x86_64"]),
                ("2.0.0-rc.1", &["x86_64"]),
            ],
            &[("lts", "0.9.0"), ("stable", "1.10.0")],
        );
        let plan = plan(&p, 2);
        // 1.10.0 is newer than 1.2.0 (semver, not text); the pre-release
        // takes a place; the tagged 0.9.0 stays.
        assert_eq!(
            kept(&plan),
            vec![
                ("2.0.0-rc.1", "newest".into()),
                ("1.10.0", "newest,latest,tag:stable".into()),
                ("0.9.0", "tag:lts".into()),
            ]
        );
        // A version's artifacts go together.
        assert_eq!(
            removed(&plan),
            vec!["1.2.0 x86_64", "1.0.0 aarch64", "1.0.0 x86_64"]
        );
    }

    #[test]
    fn latest_stays_when_newer_versions_are_all_pre_releases() {
        let p = package(
            &[
                ("1.0.0", &["x86_64"]),
                ("0.1.0", &["x86_64"]),
                ("2.0.0-rc.1", &["x86_64"]),
                ("2.0.0-rc.2", &["x86_64"]),
            ],
            &[],
        );
        let plan = plan(&p, 1);
        assert_eq!(
            kept(&plan),
            vec![("2.0.0-rc.2", "newest".into()), ("1.0.0", "latest".into())]
        );
        assert_eq!(removed(&plan), vec!["2.0.0-rc.1 x86_64", "0.1.0 x86_64"]);
    }

    #[test]
    fn few_versions_or_a_large_n_keep_everything() {
        let p = package(&[("1.0.0", &["x86_64"]), ("1.1.0", &["x86_64"])], &[]);
        for n in [2, 3, 1000] {
            let plan = plan(&p, n);
            assert!(plan.remove.is_empty(), "{n}");
            assert_eq!(plan.keep.len(), 2);
        }
        let empty = package(&[], &[("stable", "1.0.0")]);
        let plan = plan(&empty, 1);
        assert!(plan.keep.is_empty() && plan.remove.is_empty());
    }

    #[test]
    fn delete_calls_name_the_artifact_and_the_organization() {
        let name = PackageName::new("my-app").unwrap();
        let v = Version::new("1.0.0").unwrap();
        let a = Arch::new("x86_64").unwrap();
        let c = delete_call(None, &name, &v, &a);
        assert_eq!(c.method, Method::Delete);
        assert_eq!(c.path, "/v1/packages/my-app/1.0.0/x86_64");
        let org = RepoName::new("team").unwrap();
        let c = delete_call(Some(&org), &name, &v, &a);
        assert_eq!(c.path, "/repos/team/v1/packages/my-app/1.0.0/x86_64");
    }
}
