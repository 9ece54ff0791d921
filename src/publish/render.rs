//! Turning the in-memory model into files: the one place that decides the
//! bytes of every index and `v1/` document (with [`crate::index::view`],
//! which holds the rules readers check too). Incremental publishes and full
//! rebuilds both come through here, which is why they agree byte for byte.

use std::collections::BTreeMap;

use super::PublishError;
use crate::ident::PackageName;
use crate::index::codec::encode_payload;
use crate::index::layout::{self, Layout};
pub use crate::index::view::*;
use crate::index::{encode_index, pb, Signer};

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
}

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
    Row {
        versions,
        names,
        json,
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

/// Every package's [`Row`], by name.
pub type Rows = BTreeMap<String, Row>;

/// Rows to change, by package name: the new row, or `None` to remove it.
pub type RowChanges = BTreeMap<String, Option<Row>>;

/// The rows, in name order, once `changes` is applied (without applying
/// them: the model changes only once the files are written).
pub fn rows_with<'a>(rows: &'a Rows, changes: &'a RowChanges) -> Vec<&'a Row> {
    let mut out = Vec::with_capacity(rows.len() + changes.len());
    let mut changed = changes.iter().peekable();
    for (name, row) in rows {
        while let Some((_, new)) = changed.next_if(|(n, _)| *n < name) {
            out.extend(new.as_ref());
        }
        match changed.next_if(|(n, _)| *n == name) {
            Some((_, new)) => out.extend(new.as_ref()),
            None => out.push(row),
        }
    }
    out.extend(changed.filter_map(|(_, new)| new.as_ref()));
    out
}

/// Applies `changes` to `rows`.
pub fn apply(rows: &mut Rows, changes: RowChanges) {
    for (name, row) in changes {
        match row {
            Some(r) => rows.insert(name, r),
            None => rows.remove(&name),
        };
    }
}

/// The global files from every package's [`Row`], in name order. The
/// payloads are byte for byte what encoding the whole `Versions`/`Names`
/// messages and the `PackageList` document gives (a unit test holds it to
/// that). `versions` and `names` are signed on two threads.
pub fn global_files(
    repository: &str,
    rows: &[&Row],
    wanted: Wanted,
    signer: &dyn Signer,
) -> Result<GlobalFiles, PublishError> {
    // Field 2, after the repeated field 1, as prost orders fields.
    let repository = repository.to_string();
    let signed = |wanted: bool, part: fn(&Row) -> &[u8]| -> Result<Option<Vec<u8>>, PublishError> {
        if !wanted {
            return Ok(None);
        }
        let mut payload =
            Vec::with_capacity(rows.iter().map(|r| part(r).len()).sum::<usize>() + 64);
        for r in rows {
            payload.extend_from_slice(part(r));
        }
        prost::encoding::string::encode(2, &repository, &mut payload);
        Ok(Some(encode_payload(payload, signer)?))
    };
    let list = || {
        wanted.v1_index.then(|| {
            let len = rows.iter().map(|r| r.json.len() + 1).sum::<usize>();
            let mut list = Vec::with_capacity(len + 16);
            list.extend_from_slice(b"{\"packages\":[");
            push_joined(&mut list, rows.iter().map(|r| r.json.as_slice()));
            list.extend_from_slice(b"]}\n");
            list
        })
    };
    let ((versions, names), v1_index) = rayon::join(
        || {
            rayon::join(
                || signed(wanted.versions, |r| &r.versions),
                || signed(wanted.names, |r| &r.names),
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

    /// The global files of `pkgs`.
    fn files_of(pkgs: &[pb::Package], wanted: Wanted, key: &RepoKey) -> GlobalFiles {
        let rows = rows_of(pkgs);
        let all: Vec<&Row> = rows.values().collect();
        global_files("acme", &all, wanted, key).unwrap()
    }

    fn rows_of(pkgs: &[pb::Package]) -> Rows {
        pkgs.iter().map(|p| (p.name.clone(), row(p))).collect()
    }

    #[test]
    fn rows_concatenate_to_the_whole_messages() {
        let key = RepoKey::generate().unwrap();
        let pkgs = [
            package("alpha", &["1.0.0", "1.1.0-rc.1", "1.1.0"], &[0]),
            package("beta", &["0.1.0"], &[]),
            package("gamma_x", &[], &[]),
        ];
        let g = files_of(&pkgs, Wanted::ALL, &key);
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
        // A change seen through `rows_with` (added, changed and removed
        // rows) gives the files of the rows after it.
        let mut many: Vec<pb::Package> = (0..3000)
            .map(|i| package(&format!("pkg_{i:04}"), &["1.0.0", "2.0.0"], &[]))
            .collect();
        let mut rows = rows_of(&many);
        many[1500] = package("pkg_1500", &["1.0.0", "2.0.0", "3.0.0"], &[]);
        let added = package("pkg_9999", &["0.1.0"], &[]);
        let changes: RowChanges = [
            ("pkg_0000".to_string(), None),
            ("pkg_1500".to_string(), Some(row(&many[1500]))),
            ("pkg_9999".to_string(), Some(row(&added))),
            (
                "a_first".to_string(),
                Some(row(&package("a_first", &["1.0.0"], &[]))),
            ),
        ]
        .into();
        let planned = global_files("acme", &rows_with(&rows, &changes), Wanted::ALL, &key).unwrap();
        apply(&mut rows, changes);
        many.remove(0);
        many.push(added);
        many.insert(0, package("a_first", &["1.0.0"], &[]));
        let fresh = files_of(&many, Wanted::ALL, &key);
        assert_eq!(planned.versions, fresh.versions);
        assert_eq!(planned.names, fresh.names);
        assert_eq!(planned.v1_index, fresh.v1_index);
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            rows_of(&many).keys().collect::<Vec<_>>()
        );
        let decoded: pb::Versions = decode_index(
            planned.versions.as_ref().unwrap(),
            key.public_key(),
            "acme",
            1 << 24,
        )
        .unwrap();
        assert_eq!(decoded.packages.len(), 3001);
        assert_eq!(decoded.packages[0].name, "a_first");
        assert_eq!(decoded.packages[1500].versions.len(), 3);
        // And an empty repository, where only the list is wanted.
        let only_list = Wanted {
            versions: false,
            names: false,
            v1_index: true,
        };
        let g = files_of(&[], only_list, &key);
        assert!(g.names.is_none() && g.versions.is_none());
        assert_eq!(g.v1_index.unwrap(), b"{\"packages\":[]}\n");
    }
}
