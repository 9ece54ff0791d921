//! Turning the in-memory model into files: the one place that decides the
//! bytes of every index and `v1/` document. Incremental publishes and full
//! rebuilds both come through here, which is why they agree byte for byte.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use super::layout::Layout;
use super::PublishError;
use crate::ident::{Arch, PackageName, Version};
use crate::index::codec::{encode_segmented, SegmentCache};
use crate::index::json::{self, Manifest, ManifestBinary, ManifestIsolation, ManifestPackage};
use crate::index::{encode_index, pb, Signer};
use crate::store::Op;

/// SHA-256 and length of a file, for the freshness sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest256 {
    pub sha256: [u8; 32],
    pub length: u64,
}

impl Digest256 {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            sha256: Sha256::digest(bytes).into(),
            length: bytes.len() as u64,
        }
    }
}

/// Puts a package's lists into their canonical order and recomputes the
/// package-level description, so equal content always encodes equally.
pub fn normalize(pkg: &mut pb::Package) {
    pkg.releases.sort_by_cached_key(|r| version_key(&r.version));
    for r in &mut pkg.releases {
        r.artifacts.sort_by(|a, b| a.arch.cmp(&b.arch));
    }
    pkg.tags.sort_by(|a, b| a.tag.cmp(&b.tag));
    pkg.description = pkg
        .releases
        .iter()
        .rev()
        .find_map(|r| r.description.clone());
}

/// Orders versions by semver; an unparsable one (never written by us) sorts
/// first so it cannot become `latest`.
pub fn version_key(v: &str) -> Option<semver::Version> {
    semver::Version::parse(v).ok()
}

/// The newest release, preferring releases that are not pre-releases, among
/// those `filter` accepts.
pub fn latest(pkg: &pb::Package, filter: impl Fn(&pb::Release) -> bool) -> Option<&pb::Release> {
    let candidates: Vec<&pb::Release> = pkg.releases.iter().filter(|r| filter(r)).collect();
    let stable = candidates
        .iter()
        .rev()
        .find(|r| version_key(&r.version).is_some_and(|v| v.pre.is_empty()));
    stable.or(candidates.last()).copied()
}

/// The files of one package: `packages/NAME` and its `v1/` documents and
/// archive links. Returns the ops and the digest of `packages/NAME`.
pub fn package_files(
    layout: &Layout,
    pkg: &pb::Package,
    signer: &dyn Signer,
) -> Result<(Vec<Op>, Digest256), PublishError> {
    let index = encode_index(pkg, signer)?;
    let digest = Digest256::of(&index);
    let mut ops = v1_files(layout, pkg)?;
    // The signed index last within the stage, after the files it describes.
    ops.push(Op::Put {
        path: layout.package(&PackageName::new(&pkg.name)?)?,
        bytes: index,
    });
    Ok((ops, digest))
}

/// The `v1/` documents and archive links of one package.
pub fn v1_files(layout: &Layout, pkg: &pb::Package) -> Result<Vec<Op>, PublishError> {
    let name = PackageName::new(&pkg.name)?;
    let mut ops = Vec::new();

    let mut entries = Vec::new();
    for r in &pkg.releases {
        let version = Version::new(&r.version)?;
        for a in &r.artifacts {
            entries.push(json::VersionEntry {
                version: r.version.clone(),
                arch: a.arch.clone(),
                size: a.size,
                sha256: hex::encode(&a.sha256),
                uploaded_at: json::rfc3339(a.uploaded_at),
                retired: r.retired.is_some(),
            });
            let arch = Arch::new(&a.arch)?;
            ops.push(Op::Link {
                from: layout.path(&a.path)?,
                to: layout.v1_archive(&name, &version, &arch)?,
            });
        }
        let manifest = Manifest {
            package: ManifestPackage {
                name: pkg.name.clone(),
                version: r.version.clone(),
                description: r.description.clone(),
            },
            binary: r
                .entrypoint
                .clone()
                .map(|entrypoint| ManifestBinary { entrypoint }),
            isolation: r
                .isolation_preset
                .clone()
                .map(|preset| ManifestIsolation { preset }),
        };
        ops.push(Op::Put {
            path: layout.v1_manifest(&name, &version)?,
            bytes: json::to_bytes(&manifest),
        });
    }

    // latest/ARCH follows the newest release that has ARCH.
    let mut arches: Vec<&str> = pkg
        .releases
        .iter()
        .flat_map(|r| r.artifacts.iter().map(|a| a.arch.as_str()))
        .collect();
    arches.sort_unstable();
    arches.dedup();
    for arch in arches {
        if let Some(r) = latest(pkg, |r| r.artifacts.iter().any(|a| a.arch == arch)) {
            if let Some(a) = r.artifacts.iter().find(|a| a.arch == arch) {
                ops.push(Op::Link {
                    from: layout.path(&a.path)?,
                    to: layout.v1_latest(&name, &Arch::new(arch)?)?,
                });
            }
        }
    }

    ops.push(Op::Put {
        path: layout.v1_versions(&name)?,
        bytes: json::to_bytes(&json::VersionList {
            name: pkg.name.clone(),
            versions: entries,
        }),
    });
    ops.push(Op::Put {
        path: layout.v1_tags(&name)?,
        bytes: json::to_bytes(&json::TagList {
            tags: pkg
                .tags
                .iter()
                .map(|t| json::TagEntry {
                    tag: t.tag.clone(),
                    version: t.version.clone(),
                })
                .collect(),
        }),
    });
    Ok(ops)
}

/// A package's entry in `GET /v1/packages`.
pub fn summary(pkg: &pb::Package) -> json::PackageSummary {
    json::PackageSummary {
        name: pkg.name.clone(),
        versions: pkg.releases.iter().map(|r| r.version.clone()).collect(),
        latest: latest(pkg, |_| true).map(|r| r.version.clone()),
        description: pkg.description.clone(),
    }
}

/// One package's share of the global files, encoded once, when the package
/// changes: its `versions` and `names` entries (protobuf field 1, key and
/// length included) and its `/v1/packages` JSON entry. A publish then builds
/// the global files by concatenation instead of re-encoding every package.
#[derive(Debug, Clone)]
pub struct Row {
    pub(super) versions: Vec<u8>,
    pub(super) names: Vec<u8>,
    pub(super) json: Vec<u8>,
    /// Whether a group of packages ends after this one (see
    /// [`global_files`]).
    pub(super) cut: bool,
    /// Unique to this encoding (copies share it): lets [`GlobalCache`]
    /// tell that a group holds the same rows as last time without reading
    /// them.
    id: u64,
}

/// One package in this many ends a group: a few hundred packages a group,
/// tens of kilobytes of `versions`.
const GROUP_ROWS: u8 = 255;

/// A group ends after this many packages whatever the names (a run of
/// unlucky names cannot make one huge group).
const GROUP_MAX_ROWS: usize = 2048;

static NEXT_ROW_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A package's entry in `versions`: its versions in index order, and the
/// positions of the retired ones.
pub fn versions_entry(pkg: &pb::Package) -> pb::VersionsPackage {
    pb::VersionsPackage {
        name: pkg.name.clone(),
        versions: pkg.releases.iter().map(|r| r.version.clone()).collect(),
        retired: pkg
            .releases
            .iter()
            .enumerate()
            .filter(|(_, r)| r.retired.is_some())
            .map(|(i, _)| i as i32)
            .collect(),
    }
}

pub fn row(pkg: &pb::Package) -> Row {
    let entry = versions_entry(pkg);
    let mut versions = Vec::new();
    prost::encoding::message::encode(1, &entry, &mut versions);
    let mut names = Vec::new();
    prost::encoding::message::encode(
        1,
        &pb::NamesPackage {
            name: pkg.name.clone(),
        },
        &mut names,
    );
    // A summary always serializes (string fields only).
    let json = serde_json::to_vec(&summary(pkg)).expect("summaries serialize");
    // A cut depends on the name alone, so adding or changing a package
    // moves no other group's boundaries.
    let cut = Sha256::digest(pkg.name.as_bytes())[1] == GROUP_ROWS;
    Row {
        versions,
        names,
        json,
        cut,
        id: NEXT_ROW_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    }
}

/// `versions`, `names` and `v1/packages/index.json` for the whole
/// repository; `None` for each one the caller knows did not change.
#[derive(Default)]
pub struct GlobalFiles {
    pub versions: Option<Vec<u8>>,
    pub names: Option<Vec<u8>>,
    pub v1_index: Option<Vec<u8>>,
}

/// Which global files to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub versions: bool,
    pub names: bool,
    pub v1_index: bool,
}

impl Wanted {
    pub const ALL: Wanted = Wanted {
        versions: true,
        names: true,
        v1_index: true,
    };
}

/// What the last global files were made of, for the next ones to reuse:
/// each group's rows concatenated, and the deflated groups of `versions`
/// and `names` (see [`encode_segmented`]).
#[derive(Default)]
pub struct GlobalCache {
    versions: SegmentCache,
    names: SegmentCache,
    groups: HashMap<u64, RowGroup>,
}

/// A group of packages' rows, concatenated (JSON entries joined by commas).
struct RowGroup {
    ids: Vec<u64>,
    versions: Vec<u8>,
    names: Vec<u8>,
    json: Vec<u8>,
}

impl RowGroup {
    fn new(rows: &[&Row]) -> Self {
        let mut g = RowGroup {
            ids: rows.iter().map(|r| r.id).collect(),
            versions: Vec::with_capacity(rows.iter().map(|r| r.versions.len()).sum()),
            names: Vec::with_capacity(rows.iter().map(|r| r.names.len()).sum()),
            json: Vec::with_capacity(rows.iter().map(|r| r.json.len() + 1).sum()),
        };
        for r in rows {
            g.versions.extend_from_slice(&r.versions);
            g.names.extend_from_slice(&r.names);
        }
        push_joined(&mut g.json, rows.iter().map(|r| r.json.as_slice()));
        g
    }
}

/// Appends `items` to `out`, separated by commas (JSON array elements).
fn push_joined<'a>(out: &mut Vec<u8>, items: impl IntoIterator<Item = &'a [u8]>) {
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
}

/// The groups of `rows`, in order: from the cache where a group holds the
/// same rows as last time (copying a group's bytes in one piece is much
/// cheaper than gathering ten thousand small rows from all over the heap),
/// built otherwise. The cache keeps the groups returned.
fn row_groups<'c>(rows: &[&Row], cache: &'c mut HashMap<u64, RowGroup>) -> Vec<&'c RowGroup> {
    let mut old = std::mem::take(cache);
    let mut order = Vec::new();
    let mut start = 0;
    for (i, r) in rows.iter().enumerate() {
        if r.cut || i + 1 == rows.len() || i + 1 - start >= GROUP_MAX_ROWS {
            let group = &rows[start..=i];
            let first = group[0].id;
            let reused = old
                .remove(&first)
                .filter(|g| g.ids.iter().copied().eq(group.iter().map(|r| r.id)));
            cache.insert(first, reused.unwrap_or_else(|| RowGroup::new(group)));
            order.push(first);
            start = i + 1;
        }
    }
    order.iter().filter_map(|id| cache.get(id)).collect()
}

/// The global files from every package's [`Row`], in name order. The
/// payloads are byte for byte what encoding the whole `Versions`/`Names`
/// messages and the `PackageList` document gives (a unit test holds it to
/// that). `versions` and `names` are signed on two threads, and deflated in
/// groups of packages cut by name, so that a publish deflates again only
/// the group it changed.
pub fn global_files(
    repository: &str,
    rows: &[&Row],
    wanted: Wanted,
    signer: &dyn Signer,
    cache: &mut GlobalCache,
) -> Result<GlobalFiles, PublishError> {
    // Field 2, after the repeated field 1, as prost orders fields.
    let repository = repository.to_string();
    let GlobalCache {
        versions: versions_cache,
        names: names_cache,
        groups,
    } = cache;
    let groups = row_groups(rows, groups);
    let groups = groups.as_slice();
    // Each list is built and signed on its own thread: at ten thousand
    // packages each is hundreds of kilobytes.
    let signed = |wanted: bool,
                  part: fn(&RowGroup) -> &[u8],
                  cache: &mut SegmentCache|
     -> Result<Option<Vec<u8>>, PublishError> {
        if !wanted {
            return Ok(None);
        }
        let mut payload =
            Vec::with_capacity(groups.iter().map(|g| part(g).len()).sum::<usize>() + 64);
        let mut cuts = Vec::with_capacity(groups.len());
        for g in groups {
            payload.extend_from_slice(part(g));
            cuts.push(payload.len());
        }
        prost::encoding::string::encode(2, &repository, &mut payload);
        Ok(Some(encode_segmented(payload, &cuts, signer, cache)?))
    };
    let list = || {
        wanted.v1_index.then(|| {
            let len = groups.iter().map(|g| g.json.len() + 1).sum::<usize>();
            let mut list = Vec::with_capacity(len + 16);
            list.extend_from_slice(b"{\"packages\":[");
            push_joined(&mut list, groups.iter().map(|g| g.json.as_slice()));
            list.extend_from_slice(b"]}\n");
            list
        })
    };
    let ((versions, names), v1_index) = rayon::join(
        || {
            rayon::join(
                || signed(wanted.versions, |g| &g.versions, versions_cache),
                || signed(wanted.names, |g| &g.names, names_cache),
            )
        },
        list,
    );
    Ok(GlobalFiles {
        versions: versions?,
        names: names?,
        v1_index,
    })
}

/// How many freshness bins a repository's package digests are spread over.
pub const FRESHNESS_BINS: usize = 256;

/// The freshness bin of a package: the first byte of the SHA-256 of its name
/// (uniform, and the same on every machine).
pub fn bin_of(name: &str) -> u8 {
    Sha256::digest(name.as_bytes())[0]
}

/// `freshness-bins/XX`: the digest of every `packages/NAME` in bin `bin`,
/// by package name. Plain protobuf: the signed `freshness` holds its digest.
pub fn freshness_bin(repository: &str, bin: u8, digests: &BTreeMap<String, Digest256>) -> Vec<u8> {
    use prost::Message;
    pb::FreshnessBin {
        repository: repository.to_string(),
        bin: u32::from(bin),
        files: digests
            .iter()
            .map(|(name, d)| pb::FileDigest {
                path: format!("{}/{name}", super::layout::PACKAGES_DIR),
                sha256: d.sha256.to_vec(),
                length: d.length,
            })
            .collect(),
    }
    .encode_to_vec()
}

/// The signed freshness sidecar over `digests` (path relative to the
/// repository root -> digest): `names`, `versions` and the bins.
pub fn freshness(
    repository: &str,
    generation: u64,
    issued_at: i64,
    expires_at: i64,
    digests: &BTreeMap<String, Digest256>,
    signer: &dyn Signer,
) -> Result<Vec<u8>, PublishError> {
    let msg = pb::Freshness {
        repository: repository.to_string(),
        generation,
        issued_at,
        expires_at,
        files: digests
            .iter()
            .map(|(path, d)| pb::FileDigest {
                path: path.clone(),
                sha256: d.sha256.to_vec(),
                length: d.length,
            })
            .collect(),
    };
    Ok(crate::index::codec::encode_index_stored(&msg, signer)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{decode_index, RepoKey};
    use prost::Message;

    fn package(name: &str, versions: &[&str], retired: &[usize]) -> pb::Package {
        pb::Package {
            name: name.into(),
            repository: "acme".into(),
            description: Some(format!("the {name} package")),
            releases: versions
                .iter()
                .enumerate()
                .map(|(i, v)| pb::Release {
                    version: v.to_string(),
                    retired: retired.contains(&i).then_some(pb::RetirementStatus {
                        reason: 2,
                        message: None,
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The global files from an empty cache.
    fn cold(rows: &[&Row], wanted: Wanted, key: &RepoKey) -> GlobalFiles {
        global_files("acme", rows, wanted, key, &mut GlobalCache::default()).unwrap()
    }

    #[test]
    fn rows_concatenate_to_the_whole_messages() {
        let key = RepoKey::generate().unwrap();
        let pkgs = [
            package("alpha", &["1.0.0", "1.1.0-rc.1", "1.1.0"], &[0]),
            package("beta", &["0.1.0"], &[]),
            package("gamma_x", &[], &[]),
        ];
        let rows: Vec<Row> = pkgs.iter().map(row).collect();
        let refs: Vec<&Row> = rows.iter().collect();
        let g = cold(&refs, Wanted::ALL, &key);
        let versions: pb::Versions = decode_index(
            g.versions.as_ref().unwrap(),
            key.public_key(),
            "acme",
            1 << 20,
        )
        .unwrap();
        let whole = pb::Versions {
            packages: pkgs
                .iter()
                .map(|p| pb::VersionsPackage {
                    name: p.name.clone(),
                    versions: p.releases.iter().map(|r| r.version.clone()).collect(),
                    retired: p
                        .releases
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.retired.is_some())
                        .map(|(i, _)| i as i32)
                        .collect(),
                })
                .collect(),
            repository: "acme".into(),
        };
        assert_eq!(versions, whole);
        let payload = |file: &Option<Vec<u8>>| {
            crate::index::codec::verified_payload(file.as_ref().unwrap(), key.public_key(), 1 << 20)
                .unwrap()
        };
        assert_eq!(payload(&g.versions), whole.encode_to_vec());
        let names = pb::Names {
            packages: pkgs
                .iter()
                .map(|p| pb::NamesPackage {
                    name: p.name.clone(),
                })
                .collect(),
            repository: "acme".into(),
        };
        assert_eq!(payload(&g.names), names.encode_to_vec());
        let list = json::PackageList {
            packages: pkgs.iter().map(summary).collect(),
        };
        assert_eq!(g.v1_index.unwrap(), json::to_bytes(&list));
        // Enough packages for many deflate groups: from a warm cache after
        // a change, the same files as from a cold one.
        let many: Vec<pb::Package> = (0..3000)
            .map(|i| package(&format!("pkg_{i:04}"), &["1.0.0", "2.0.0"], &[]))
            .collect();
        let mut rows: Vec<Row> = many.iter().map(row).collect();
        assert!(rows.iter().filter(|r| r.cut).count() > 3);
        let mut cache = GlobalCache::default();
        global_files(
            "acme",
            &rows.iter().collect::<Vec<_>>(),
            Wanted::ALL,
            &key,
            &mut cache,
        )
        .unwrap();
        rows[1500] = row(&package("pkg_1500", &["1.0.0", "2.0.0", "3.0.0"], &[]));
        let refs: Vec<&Row> = rows.iter().collect();
        let before: std::collections::HashSet<*const u8> =
            cache.groups.values().map(|g| g.versions.as_ptr()).collect();
        let warm = global_files("acme", &refs, Wanted::ALL, &key, &mut cache).unwrap();
        let rebuilt = cache
            .groups
            .values()
            .filter(|g| !before.contains(&g.versions.as_ptr()))
            .count();
        assert_eq!(
            rebuilt, 1,
            "only the changed package's group is gathered again"
        );
        let fresh = cold(&refs, Wanted::ALL, &key);
        assert_eq!(warm.versions, fresh.versions);
        assert_eq!(warm.names, fresh.names);
        let decoded: pb::Versions = decode_index(
            warm.versions.as_ref().unwrap(),
            key.public_key(),
            "acme",
            1 << 24,
        )
        .unwrap();
        assert_eq!(decoded.packages[1500].versions.len(), 3);
        // And an empty repository, where only the list is wanted.
        let only_list = Wanted {
            versions: false,
            names: false,
            v1_index: true,
        };
        let g = cold(&[], only_list, &key);
        assert!(g.names.is_none() && g.versions.is_none());
        assert_eq!(g.v1_index.unwrap(), b"{\"packages\":[]}\n");
    }
}
