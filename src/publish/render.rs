//! Turning the in-memory model into files: the one place that decides the
//! bytes of every index and `v1/` document (with [`crate::index::view`],
//! which holds the rules readers check too). Incremental publishes and full
//! rebuilds both come through here, which is why they agree byte for byte.

use std::collections::BTreeMap;
use std::ops::Bound;

use sha2::{Digest, Sha256};

use super::PublishError;
use crate::ident::PackageName;
use crate::index::codec::{encode_segmented, SegmentCache};
use crate::index::layout::{self, Layout};
pub use crate::index::view::*;
use crate::index::{encode_index, pb, Signer};

/// TEMPORARY, for the bench comparison only: `NISO_BENCH_MECH` = `scratch`
/// (regroup every row on each change), `nocache` (deflate every group on
/// each change) or `both`.
fn bench_mech() -> (bool, bool) {
    static MECH: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    *MECH.get_or_init(|| match std::env::var("NISO_BENCH_MECH").as_deref() {
        Ok("scratch") => (true, false),
        Ok("nocache") => (false, true),
        Ok("both") => (true, true),
        _ => (false, false),
    })
}

/// The files of one package: its `v1/` documents and downloads, Hex's
/// `packages/NAME` (when it has Hex releases) and `niso/packages/NAME`, in
/// that order (the signed indexes after what they describe). Returns them
/// with the digests of the two indexes, by path relative to the repository.
pub fn package_files(
    layout: &Layout,
    pkg: &pb::Package,
    signer: &dyn Signer,
) -> Result<(Vec<FileOut>, BTreeMap<String, Digest256>), PublishError> {
    let name = PackageName::new(&pkg.name)?;
    let mut files = v1_files(layout, pkg)?;
    let mut digests = BTreeMap::new();
    if let Some(view) = hex_view(pkg) {
        let index = encode_index(&view, signer)?;
        digests.insert(
            format!("{}/{name}", layout::PACKAGES_DIR),
            Digest256::of(&index),
        );
        files.push(FileOut::bytes(layout.package(&name)?, index));
    }
    let index = encode_index(pkg, signer)?;
    digests.insert(
        format!("{}/{name}", layout::NISO_PACKAGES_DIR),
        Digest256::of(&index),
    );
    files.push(FileOut::bytes(layout.niso_package(&name)?, index));
    Ok((files, digests))
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
    /// Whether a group of packages ends after this one (see [`Rows`]).
    pub(super) cut: bool,
}

/// One package in this many ends a group: a few hundred packages a group,
/// tens of kilobytes of `versions`.
const GROUP_ROWS: u8 = 255;

/// A group ends after this many packages whatever the names (a run of
/// unlucky names cannot make one huge group).
const GROUP_MAX_ROWS: usize = 2048;

pub fn row(pkg: &pb::Package) -> Row {
    // `versions` and `names` are Hex's view: a package without Hex releases
    // has no entry in them (an empty row adds nothing).
    let mut versions = Vec::new();
    let mut names = Vec::new();
    if let Some(view) = hex_view(pkg) {
        prost::encoding::message::encode(1, &versions_entry(&view), &mut versions);
        prost::encoding::message::encode(
            1,
            &pb::NamesPackage {
                name: pkg.name.clone(),
            },
            &mut names,
        );
    }
    // A package with nothing published (only tombstones left) is not
    // listed. A summary always serializes (string fields only).
    let json = if pkg.releases.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&summary(pkg)).expect("summaries serialize")
    };
    // A cut depends on the name alone, so adding or changing a package
    // moves no other group's boundaries.
    let cut = Sha256::digest(pkg.name.as_bytes())[1] == GROUP_ROWS;
    Row {
        versions,
        names,
        json,
        cut,
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

/// The deflated groups of the last `versions` and `names`, for the next
/// ones to reuse (see [`encode_segmented`]).
#[derive(Default)]
pub struct GlobalCache {
    versions: SegmentCache,
    names: SegmentCache,
}

/// A group of packages' rows, concatenated (JSON entries joined by commas).
pub struct RowGroup {
    versions: Vec<u8>,
    names: Vec<u8>,
    json: Vec<u8>,
}

impl RowGroup {
    fn new(rows: &[&Row]) -> Self {
        let mut g = RowGroup {
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

/// Appends `items` to `out`, separated by commas (JSON array elements);
/// empty items (unlisted packages, groups of them) are left out.
fn push_joined<'a>(out: &mut Vec<u8>, items: impl IntoIterator<Item = &'a [u8]>) {
    let mut first = true;
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(item);
    }
}

/// Groups `rows` (in name order): a group ends after a row that cuts, after
/// [`GROUP_MAX_ROWS`] rows, and at the end. Each group is keyed by the name
/// of its first row.
fn group<'a>(rows: impl Iterator<Item = (&'a str, &'a Row)>, out: &mut Vec<(String, RowGroup)>) {
    let mut first = "";
    let mut current: Vec<&Row> = Vec::new();
    for (name, row) in rows {
        if current.is_empty() {
            first = name;
        }
        current.push(row);
        if row.cut || current.len() >= GROUP_MAX_ROWS {
            out.push((first.to_string(), RowGroup::new(&current)));
            current.clear();
        }
    }
    if !current.is_empty() {
        out.push((first.to_string(), RowGroup::new(&current)));
    }
}

/// Every package's [`Row`] by name, gathered into groups (see [`group`]):
/// the global files are the groups' bytes concatenated, and copying a
/// group in one piece is much cheaper than gathering ten thousand small
/// rows from all over the heap.
///
/// A change regroups only the rows between the nearest unchanged rows that
/// cut on either side of it (a few hundred rows): a row that cuts ends a
/// group however the rows before it changed, so the groups outside that
/// stretch stay as they are. The groups are therefore always the ones
/// grouping every row from the start gives ([`Rows::new`]), which keeps a
/// rebuild and a sequence of publishes byte-identical.
#[derive(Default)]
pub struct Rows {
    rows: BTreeMap<String, Row>,
    /// By the name of their first row.
    groups: BTreeMap<String, RowGroup>,
}

/// Rows to change, by package name: the new row, or `None` to remove it.
pub type RowChanges = BTreeMap<String, Option<Row>>;

/// The groups a [`RowChanges`] replaces and the ones it makes, worked out
/// by [`Rows::regroup`] before the change is applied.
#[derive(Default)]
pub struct Regrouped {
    removed: Vec<String>,
    added: Vec<(String, RowGroup)>,
}

impl Regrouped {
    /// How many groups the change builds again.
    pub fn rebuilt(&self) -> usize {
        self.added.len()
    }
}

impl Rows {
    pub fn new(rows: BTreeMap<String, Row>) -> Self {
        let mut groups = Vec::new();
        group(rows.iter().map(|(n, r)| (n.as_str(), r)), &mut groups);
        Self {
            rows,
            groups: groups.into_iter().collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Row> {
        self.rows.get(name)
    }

    /// The groups that `changes` replaces, and the ones it makes instead.
    pub fn regroup(&self, changes: &RowChanges) -> Regrouped {
        let mut out = Regrouped::default();
        // An unchanged row that cuts: a group boundary before and after.
        let fixed = |(name, row): &(&String, &Row)| row.cut && !changes.contains_key(*name);
        // The end of the last stretch regrouped (`Unbounded`: to the end).
        let mut done: Option<Bound<&str>> = None;
        for name in changes.keys() {
            let name = name.as_str();
            match done {
                Some(Bound::Unbounded) => break,
                Some(Bound::Included(end)) if name <= end => continue,
                _ => {}
            }
            let before = (Bound::Unbounded, Bound::Excluded(name));
            let start = match self.rows.range::<str, _>(before).rev().find(fixed) {
                Some((n, _)) if !bench_mech().0 => Bound::Excluded(n.as_str()),
                _ => Bound::Unbounded,
            };
            let end = match self
                .rows
                .range::<str, _>((Bound::Excluded(name), Bound::Unbounded))
                .find(fixed)
            {
                Some((n, _)) if !bench_mech().0 => Bound::Included(n.as_str()),
                _ => Bound::Unbounded,
            };
            let stretch = (start, end);
            out.removed.extend(
                self.groups
                    .range::<str, _>(stretch)
                    .map(|(first, _)| first.clone()),
            );
            // The stretch's rows after the change, in name order.
            let mut old = self
                .rows
                .range::<str, _>(stretch)
                .filter(|(n, _)| !changes.contains_key(*n))
                .map(|(n, r)| (n.as_str(), r))
                .peekable();
            let mut new = changes
                .range::<str, _>(stretch)
                .filter_map(|(n, r)| r.as_ref().map(|r| (n.as_str(), r)))
                .peekable();
            let merged = std::iter::from_fn(|| match (old.peek(), new.peek()) {
                (Some(a), Some(b)) if a.0 < b.0 => old.next(),
                (Some(_), Some(_)) | (None, _) => new.next(),
                (Some(_), None) => old.next(),
            });
            group(merged, &mut out.added);
            done = Some(end);
        }
        out
    }

    /// Every group in name order, as they are once `regrouped` is applied.
    pub fn groups_with<'a>(&'a self, regrouped: &'a Regrouped) -> Vec<&'a RowGroup> {
        let mut removed = regrouped.removed.iter().peekable();
        let mut added = regrouped.added.iter().peekable();
        let mut out = Vec::with_capacity(self.groups.len() + regrouped.added.len());
        for (first, g) in &self.groups {
            while let Some((a, ag)) = added.peek() {
                if a < first {
                    out.push(ag);
                    added.next();
                } else {
                    break;
                }
            }
            if removed.peek() == Some(&first) {
                removed.next();
            } else {
                out.push(g);
            }
        }
        out.extend(added.map(|(_, g)| g));
        out
    }

    /// Every group in name order.
    pub fn groups(&self) -> Vec<&RowGroup> {
        self.groups.values().collect()
    }

    /// Applies `changes`, with the groups [`Rows::regroup`] worked out for
    /// them.
    pub fn apply(&mut self, changes: RowChanges, regrouped: Regrouped) {
        for (name, row) in changes {
            match row {
                Some(r) => self.rows.insert(name, r),
                None => self.rows.remove(&name),
            };
        }
        for first in regrouped.removed {
            self.groups.remove(&first);
        }
        self.groups.extend(regrouped.added);
    }
}

/// The global files from the groups of every package's [`Row`], in name
/// order. The payloads are byte for byte what encoding the whole
/// `Versions`/`Names` messages and the `PackageList` document gives (a unit
/// test holds it to that). `versions` and `names` are signed on two
/// threads, and deflated by group, so that a publish deflates again only
/// the groups it changed.
pub fn global_files(
    repository: &str,
    groups: &[&RowGroup],
    wanted: Wanted,
    signer: &dyn Signer,
    cache: &mut GlobalCache,
) -> Result<GlobalFiles, PublishError> {
    // Field 2, after the repeated field 1, as prost orders fields.
    let repository = repository.to_string();
    let GlobalCache {
        versions: versions_cache,
        names: names_cache,
    } = cache;
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
        if bench_mech().1 {
            let mut fresh = SegmentCache::default();
            return Ok(Some(encode_segmented(payload, &cuts, signer, &mut fresh)?));
        }
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

/// `freshness-bins/XX`: the digest of every package index (`packages/NAME`
/// and `niso/packages/NAME`) of the packages in bin `bin`, by path relative
/// to the repository. Plain protobuf: the signed `freshness` holds its
/// digest.
pub fn freshness_bin(repository: &str, bin: u8, digests: &BTreeMap<String, Digest256>) -> Vec<u8> {
    use prost::Message;
    pb::FreshnessBin {
        repository: repository.to_string(),
        bin: u32::from(bin),
        files: digests
            .iter()
            .map(|(path, d)| pb::FileDigest {
                path: path.clone(),
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
    use crate::index::{decode_index, json, RepoKey};
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
                    // A Hex tarball: the release is in Hex's view.
                    artifacts: vec![pb::Artifact {
                        arch: "any".into(),
                        path: format!("tarballs/{name}-{v}.tar"),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The global files of `pkgs` from an empty cache.
    fn cold(pkgs: &[pb::Package], wanted: Wanted, key: &RepoKey) -> GlobalFiles {
        let rows = rows_of(pkgs);
        global_files(
            "acme",
            &rows.groups(),
            wanted,
            key,
            &mut GlobalCache::default(),
        )
        .unwrap()
    }

    fn rows_of(pkgs: &[pb::Package]) -> Rows {
        Rows::new(pkgs.iter().map(|p| (p.name.clone(), row(p))).collect())
    }

    #[test]
    fn rows_concatenate_to_the_whole_messages() {
        let key = RepoKey::generate().unwrap();
        let pkgs = [
            package("alpha", &["1.0.0", "1.1.0-rc.1", "1.1.0"], &[0]),
            package("beta", &["0.1.0"], &[]),
            package("gamma_x", &[], &[]),
        ];
        let g = cold(&pkgs, Wanted::ALL, &key);
        // gamma_x has nothing published: in no list.
        let listed: Vec<&pb::Package> = pkgs.iter().filter(|p| !p.releases.is_empty()).collect();
        let versions: pb::Versions = decode_index(
            g.versions.as_ref().unwrap(),
            key.public_key(),
            "acme",
            1 << 20,
        )
        .unwrap();
        let whole = pb::Versions {
            packages: listed
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
            packages: listed
                .iter()
                .map(|p| pb::NamesPackage {
                    name: p.name.clone(),
                })
                .collect(),
            repository: "acme".into(),
        };
        assert_eq!(payload(&g.names), names.encode_to_vec());
        let list = json::PackageList {
            packages: listed.iter().map(|p| summary(p)).collect(),
        };
        assert_eq!(g.v1_index.unwrap(), json::to_bytes(&list));
        // Enough packages for many deflate groups: from a warm cache after
        // a change, the same files as from a cold one.
        let mut many: Vec<pb::Package> = (0..3000)
            .map(|i| package(&format!("pkg_{i:04}"), &["1.0.0", "2.0.0"], &[]))
            .collect();
        let mut rows = rows_of(&many);
        assert!(rows.groups().len() > 3);
        let mut cache = GlobalCache::default();
        global_files("acme", &rows.groups(), Wanted::ALL, &key, &mut cache).unwrap();
        many[1500] = package("pkg_1500", &["1.0.0", "2.0.0", "3.0.0"], &[]);
        let change: RowChanges = [("pkg_1500".to_string(), Some(row(&many[1500])))].into();
        let regrouped = rows.regroup(&change);
        assert_eq!(
            regrouped.rebuilt(),
            1,
            "only the changed package's group is gathered again"
        );
        let warm = global_files(
            "acme",
            &rows.groups_with(&regrouped),
            Wanted::ALL,
            &key,
            &mut cache,
        )
        .unwrap();
        rows.apply(change, regrouped);
        let fresh = cold(&many, Wanted::ALL, &key);
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
        assert_eq!(
            group_bytes(&rows.groups()),
            group_bytes(&rows_of(&many).groups())
        );
    }

    /// The bytes of each group, in order.
    fn group_bytes(groups: &[&RowGroup]) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        groups
            .iter()
            .map(|g| (g.versions.clone(), g.names.clone(), g.json.clone()))
            .collect()
    }

    #[test]
    fn regrouping_a_change_gives_the_groups_of_all_rows_from_the_start() {
        // Names of two kinds: ones that cut, and more than GROUP_MAX_ROWS
        // that do not (forced group ends), so changes add, remove and
        // change rows that cut, and shift the forced ends.
        let mut cutting = Vec::new();
        let mut plain = Vec::new();
        let mut i = 0;
        while cutting.len() < 12 || plain.len() < GROUP_MAX_ROWS + 700 {
            let name = format!("p{i:06}");
            if row(&package(&name, &["1.0.0"], &[])).cut {
                cutting.push(name);
            } else {
                plain.push(name);
            }
            i += 1;
        }
        // A deterministic xorshift: the same sequence on every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let universe: Vec<String> = cutting.iter().chain(plain.iter()).cloned().collect();
        // Most plain names first, in one run with few cuts: forced ends.
        let mut present: BTreeMap<String, pb::Package> = plain
            .iter()
            .take(GROUP_MAX_ROWS + 300)
            .chain(cutting.iter().take(6))
            .map(|n| (n.clone(), package(n, &["1.0.0"], &[])))
            .collect();
        let mut rows = Rows::new(present.iter().map(|(n, p)| (n.clone(), row(p))).collect());
        let mut version = 1;
        for round in 0..60 {
            let mut changes = RowChanges::new();
            for _ in 0..1 + next(4) {
                // Every other pick among the names that cut.
                let name = if next(2) == 0 {
                    &cutting[next(cutting.len())]
                } else {
                    &universe[next(universe.len())]
                };
                if present.contains_key(name) && next(3) == 0 {
                    present.remove(name);
                    changes.insert(name.clone(), None);
                } else {
                    version += 1;
                    let p = package(name, &["1.0.0", &format!("{version}.0.0")], &[]);
                    changes.insert(name.clone(), Some(row(&p)));
                    present.insert(name.clone(), p);
                }
            }
            let regrouped = rows.regroup(&changes);
            let planned = group_bytes(&rows.groups_with(&regrouped));
            rows.apply(changes, regrouped);
            let fresh = Rows::new(present.iter().map(|(n, p)| (n.clone(), row(p))).collect());
            let expected = group_bytes(&fresh.groups());
            assert_eq!(planned, expected, "round {round}: planned groups differ");
            assert_eq!(
                group_bytes(&rows.groups()),
                expected,
                "round {round}: applied groups differ"
            );
            assert_eq!(
                rows.groups.keys().collect::<Vec<_>>(),
                fresh.groups.keys().collect::<Vec<_>>(),
                "round {round}: group keys differ"
            );
        }
        assert!(rows.groups().len() > 6, "the rows were cut into groups");
    }
}
