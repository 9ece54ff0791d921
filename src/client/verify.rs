//! `niso registry verify`: checks a whole tree the way a careful client would.
//!
//! Every problem is collected (not just the first), so one run tells an
//! operator everything that is wrong:
//!
//! * every index's signature and `repository` field;
//! * `names`, `versions` and `packages/NAME` agree (same packages, same
//!   versions in the same order, same retirements);
//! * every archive an index names exists, has the recorded size and SHA-256,
//!   passes the archive checks, and holds the name, version and arch the index
//!   says (and, for Hex tarballs, the recorded inner checksum);
//! * the `v1/` documents and links match the indexes;
//! * the freshness sidecar is signed, unexpired, and lists the exact digest of
//!   every index file (`packages/NAME` through its freshness bin);
//! * for a local tree, no archive or index lies in the tree unreferenced.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Seek;

use sha2::{Digest, Sha256};

use super::transport::{Transport, TransportError};
use crate::archive;
use crate::index::codec::{decode_index, CodecError, IndexMessage};
use crate::index::json;
use crate::index::layout::{self, Layout};
use crate::index::{pb, PublicKey};
use crate::limits::Limits;
use crate::publish::render;
use crate::store::Op;

pub struct VerifyOptions {
    pub repository: String,
    pub public_key: PublicKey,
    pub limits: Limits,
    /// Unix seconds, to judge the sidecar's expiry.
    pub now: i64,
    /// Every file path in the tree (relative to the repository root), when
    /// the tree can be listed (a local directory): enables the check for
    /// unreferenced files.
    pub listing: Option<Vec<String>>,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub problems: Vec<String>,
    pub packages: usize,
    pub releases: usize,
    pub artifacts: usize,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Verifier<'a> {
    t: &'a dyn Transport,
    o: &'a VerifyOptions,
    report: VerifyReport,
    seen: BTreeSet<String>,
}

pub fn verify(transport: &dyn Transport, options: &VerifyOptions) -> VerifyReport {
    let mut v = Verifier {
        t: transport,
        o: options,
        report: VerifyReport::default(),
        seen: BTreeSet::new(),
    };
    v.run();
    v.report
}

impl Verifier<'_> {
    fn problem(&mut self, msg: String) {
        self.report.problems.push(msg);
    }

    fn fetch(&mut self, path: &str) -> Option<Vec<u8>> {
        self.seen.insert(path.to_string());
        match self.t.fetch(path, self.o.limits.max_index) {
            Ok(b) => Some(b),
            Err(TransportError::NotFound { location }) => {
                self.problem(format!("{path}: missing ({location})"));
                None
            }
            Err(e) => {
                self.problem(format!("{path}: {e}"));
                None
            }
        }
    }

    fn index<M: IndexMessage>(&mut self, path: &str) -> Option<(M, Vec<u8>)> {
        let bytes = self.fetch(path)?;
        match decode_index::<M>(
            &bytes,
            &self.o.public_key,
            &self.o.repository,
            self.o.limits.max_index,
        ) {
            Ok(m) => Some((m, bytes)),
            Err(e) => {
                self.problem(format!("{path}: {e}"));
                None
            }
        }
    }

    /// Whether the tree can be read at all with the key and repository name
    /// given. When `names` does not verify with the key, or names another
    /// repository, every other index fails the same way and every file then
    /// looks unreferenced: report that one cause and stop.
    fn root_cause(&mut self) -> bool {
        let Ok(bytes) = self.t.fetch(layout::NAMES, self.o.limits.max_index) else {
            // A missing or unreadable `names` is reported by the full run.
            return true;
        };
        let served = self
            .t
            .fetch(layout::PUBLIC_KEY, 1 << 20)
            .ok()
            .and_then(|b| PublicKey::from_pem(&b, layout::PUBLIC_KEY).ok());
        match decode_index::<pb::Names>(
            &bytes,
            &self.o.public_key,
            &self.o.repository,
            self.o.limits.max_index,
        ) {
            Err(CodecError::Signature(_)) => {
                let served = match served {
                    Some(k) if k != self.o.public_key => {
                        format!("; the tree's public_key is sha256:{}", k.fingerprint())
                    }
                    _ => String::new(),
                };
                self.problem(format!(
                    "{}: the signature does not verify with the key given (sha256:{}){served}: check --public-key. Nothing else was checked",
                    layout::NAMES,
                    self.o.public_key.fingerprint()
                ));
                false
            }
            Err(CodecError::Repository { expected, found }) => {
                self.problem(format!(
                    "{}: the tree is repository {found:?}, not {expected:?}: check --name. Nothing else was checked",
                    layout::NAMES
                ));
                false
            }
            _ => true,
        }
    }

    fn run(&mut self) {
        if !self.root_cause() {
            return;
        }
        if let Some(bytes) = self.fetch(layout::PUBLIC_KEY) {
            match PublicKey::from_pem(&bytes, layout::PUBLIC_KEY) {
                Ok(k) if k == self.o.public_key => {}
                Ok(k) => self.problem(format!(
                    "{}: is key {} but the key given is {}",
                    layout::PUBLIC_KEY,
                    k.fingerprint(),
                    self.o.public_key.fingerprint()
                )),
                Err(e) => self.problem(format!("{}: {e}", layout::PUBLIC_KEY)),
            }
        }
        let mut digests: BTreeMap<String, render::Digest256> = BTreeMap::new();
        let names = self.index::<pb::Names>(layout::NAMES);
        let versions = self.index::<pb::Versions>(layout::VERSIONS);
        if let Some((_, b)) = &names {
            digests.insert(layout::NAMES.into(), render::Digest256::of(b));
        }
        if let Some((_, b)) = &versions {
            digests.insert(layout::VERSIONS.into(), render::Digest256::of(b));
        }
        let names: Vec<String> = names
            .map(|(n, _)| n.packages.into_iter().map(|p| p.name).collect())
            .unwrap_or_default();
        let versions: BTreeMap<String, pb::VersionsPackage> = versions
            .map(|(v, _)| {
                v.packages
                    .into_iter()
                    .map(|p| (p.name.clone(), p))
                    .collect()
            })
            .unwrap_or_default();
        if names.windows(2).any(|w| w[0] >= w[1]) {
            self.problem(format!(
                "{}: packages are not sorted and unique",
                layout::NAMES
            ));
        }
        let name_set: BTreeSet<&String> = names.iter().collect();
        let version_set: BTreeSet<&String> = versions.keys().collect();
        for n in name_set.difference(&version_set) {
            self.problem(format!(
                "{n}: in {} but not in {}",
                layout::NAMES,
                layout::VERSIONS
            ));
        }
        for n in version_set.difference(&name_set) {
            self.problem(format!(
                "{n}: in {} but not in {}",
                layout::VERSIONS,
                layout::NAMES
            ));
        }

        let mut summaries = Vec::new();
        for name in &names {
            let path = format!("{}/{name}", layout::PACKAGES_DIR);
            let Some((pkg, bytes)) = self.index::<pb::Package>(&path) else {
                continue;
            };
            digests.insert(path.clone(), render::Digest256::of(&bytes));
            self.report.packages += 1;
            if &pkg.name != name {
                self.problem(format!("{path}: names package {:?}", pkg.name));
            }
            // What `versions` must say of this package, by the publisher's rule.
            let expected = render::versions_entry(&pkg);
            if let Some(v) = versions.get(name) {
                if v.versions != expected.versions {
                    self.problem(format!(
                        "{name}: {} lists versions {:?} but {path} has {:?}",
                        layout::VERSIONS,
                        v.versions,
                        expected.versions
                    ));
                }
                if v.retired != expected.retired {
                    self.problem(format!(
                        "{name}: retired releases differ between {} and {path}",
                        layout::VERSIONS
                    ));
                }
            }
            self.check_package(&pkg);
            summaries.push(render::summary(&pkg));
        }
        self.check_bytes(
            layout::V1_INDEX,
            &json::to_bytes(&json::PackageList {
                packages: summaries,
            }),
        );
        self.check_freshness(&digests);
        self.check_unreferenced();
    }

    fn check_package(&mut self, pkg: &pb::Package) {
        let name = &pkg.name;
        for r in &pkg.releases {
            self.report.releases += 1;
            if r.artifacts.is_empty() {
                self.problem(format!("{name} {}: release has no artifacts", r.version));
            }
            for a in &r.artifacts {
                self.report.artifacts += 1;
                self.check_artifact(pkg, r, a);
            }
        }
        for t in &pkg.tags {
            if !pkg.releases.iter().any(|r| r.version == t.version) {
                self.problem(format!(
                    "{name}: tag {} points at {}, which is not published",
                    t.tag, t.version
                ));
            }
        }
        // The v1 files must be exactly what the publisher renders from this
        // (verified) index: the same code decides both.
        let ops = match render::v1_files(&Layout::root(), pkg) {
            Ok(ops) => ops,
            Err(e) => return self.problem(format!("packages/{name}: {e}")),
        };
        for op in ops {
            match op {
                Op::Put { path, bytes } => self.check_bytes(path.as_str(), &bytes),
                Op::Link { from, to } => {
                    let artifact = pkg
                        .releases
                        .iter()
                        .flat_map(|r| r.artifacts.iter())
                        .find(|a| a.path == from.as_str());
                    if let Some(a) = artifact {
                        self.check_same_bytes(to.as_str(), a);
                    }
                }
                Op::Remove { .. } | Op::Create { .. } => {}
            }
        }
    }

    fn check_artifact(&mut self, pkg: &pb::Package, r: &pb::Release, a: &pb::Artifact) {
        let what = format!("{} {} ({})", pkg.name, r.version, a.arch);
        self.seen.insert(a.path.clone());
        let mut tmp = match tempfile::tempfile() {
            Ok(f) => f,
            Err(e) => return self.problem(format!("{what}: cannot create a temp file: {e}")),
        };
        match self
            .t
            .fetch_to(&a.path, &mut tmp, self.o.limits.max_archive)
        {
            Ok(_) => {}
            Err(TransportError::NotFound { .. }) => {
                return self.problem(format!("{what}: archive {} is missing", a.path))
            }
            Err(e) => return self.problem(format!("{what}: {e}")),
        }
        if let Err(e) = tmp.rewind() {
            return self.problem(format!("{what}: {e}"));
        }
        let info = match archive::inspect(std::io::BufReader::new(tmp), &self.o.limits) {
            Ok(i) => i,
            Err(e) => return self.problem(format!("{what}: archive {} is invalid: {e}", a.path)),
        };
        if info.size != a.size {
            self.problem(format!(
                "{what}: {} is {} bytes, the index says {}",
                a.path, info.size, a.size
            ));
        }
        if info.sha256.as_slice() != a.sha256.as_slice() {
            self.problem(format!(
                "{what}: {} has SHA-256 {}, the index says {}",
                a.path,
                hex::encode(info.sha256),
                hex::encode(&a.sha256)
            ));
        }
        if info.name.as_str() != pkg.name
            || info.version.as_str() != r.version
            || info.arch.as_str() != a.arch
        {
            self.problem(format!(
                "{what}: {} holds {} {} ({})",
                a.path, info.name, info.version, info.arch
            ));
        }
        if info.tree_path() != a.path {
            self.problem(format!(
                "{what}: archive should be at {}, not {}",
                info.tree_path(),
                a.path
            ));
        }
        if info.kind == archive::ArchiveKind::Hex {
            if r.outer_checksum.as_deref() != Some(a.sha256.as_slice()) {
                self.problem(format!("{what}: outer_checksum does not match the tarball"));
            }
            if r.inner_checksum != info.inner_checksum {
                self.problem(format!("{what}: inner_checksum does not match the tarball"));
            }
        }
    }

    /// A `v1/` archive link must hold exactly the artifact's bytes.
    fn check_same_bytes(&mut self, path: &str, a: &pb::Artifact) {
        self.seen.insert(path.to_string());
        let mut hasher = HashWriter(Sha256::new());
        match self
            .t
            .fetch_to(path, &mut hasher, self.o.limits.max_archive)
        {
            Ok(n) if n == a.size && hasher.0.finalize().as_slice() == a.sha256.as_slice() => {}
            Ok(_) => self.problem(format!("{path}: does not hold the bytes of {}", a.path)),
            Err(e) => self.problem(format!("{path}: {e}")),
        }
    }

    fn check_bytes(&mut self, path: &str, expected: &[u8]) {
        let Some(bytes) = self.fetch(path) else {
            return;
        };
        if bytes != expected {
            self.problem(format!("{path}: does not match the signed indexes"));
        }
    }

    /// `digests`: the actual digest of `names`, `versions` and every
    /// `packages/NAME`. The signed record must list `names`, `versions` and
    /// exactly the bins that hold packages; each bin must match its listed
    /// digest and list exactly its packages' actual digests.
    fn check_freshness(&mut self, digests: &BTreeMap<String, render::Digest256>) {
        let Some((f, _)) = self.index::<pb::Freshness>(layout::FRESHNESS) else {
            return;
        };
        if f.expires_at <= self.o.now {
            self.problem(format!(
                "{}: expired at {} (re-sign it with `niso registry build`)",
                layout::FRESHNESS,
                json::rfc3339(f.expires_at)
            ));
        }
        // What the record should list, and what the bins should hold.
        let mut expected: BTreeMap<String, Option<&render::Digest256>> = BTreeMap::new();
        let mut in_bins: BTreeMap<String, &render::Digest256> = BTreeMap::new();
        for (path, d) in digests {
            match path.strip_prefix(&format!("{}/", layout::PACKAGES_DIR)) {
                Some(name) => {
                    in_bins.insert(path.clone(), d);
                    expected.insert(Layout::freshness_bin_rel(render::bin_of(name)), None);
                }
                None => {
                    expected.insert(path.clone(), Some(d));
                }
            }
        }
        let listed: BTreeMap<&str, &pb::FileDigest> =
            f.files.iter().map(|d| (d.path.as_str(), d)).collect();
        let matches = |l: &pb::FileDigest, d: &render::Digest256| {
            l.sha256 == d.sha256 && l.length == d.length
        };
        let mut binned: BTreeMap<String, pb::FileDigest> = BTreeMap::new();
        for (path, want) in &expected {
            let Some(l) = listed.get(path.as_str()) else {
                self.problem(format!("{path}: not listed in {}", layout::FRESHNESS));
                continue;
            };
            match want {
                Some(d) if !matches(l, d) => self.problem(format!(
                    "{path}: does not match its digest in {} (stale or replayed index)",
                    layout::FRESHNESS
                )),
                Some(_) => {}
                None => {
                    let Some(bytes) = self.fetch(path) else {
                        continue;
                    };
                    if !matches(l, &render::Digest256::of(&bytes)) {
                        self.problem(format!(
                            "{path}: does not match its digest in {} (stale or replayed)",
                            layout::FRESHNESS
                        ));
                        continue;
                    }
                    match <pb::FreshnessBin as prost::Message>::decode(bytes.as_slice()) {
                        Ok(b) if b.repository != self.o.repository => {
                            self.problem(format!("{path}: is for repository {:?}", b.repository))
                        }
                        Ok(b) if Layout::freshness_bin_rel(b.bin as u8) != *path || b.bin > 255 => {
                            self.problem(format!("{path}: says it is bin {}", b.bin))
                        }
                        Ok(b) => {
                            for d in b.files {
                                let right_bin = d
                                    .path
                                    .strip_prefix(&format!("{}/", layout::PACKAGES_DIR))
                                    .is_some_and(|n| {
                                        Layout::freshness_bin_rel(render::bin_of(n)) == *path
                                    });
                                if !right_bin {
                                    self.problem(format!(
                                        "{path}: lists {}, which does not belong in it",
                                        d.path
                                    ));
                                }
                                binned.insert(d.path.clone(), d);
                            }
                        }
                        Err(e) => self.problem(format!("{path}: cannot be decoded: {e}")),
                    }
                }
            }
        }
        for path in listed.keys() {
            if !expected.contains_key(*path) {
                self.problem(format!(
                    "{path}: listed in {} but not an index of this tree",
                    layout::FRESHNESS
                ));
            }
        }
        for (path, d) in &in_bins {
            match binned.get(path) {
                None => self.problem(format!("{path}: not listed in its freshness bin")),
                Some(l) if !matches(l, d) => self.problem(format!(
                    "{path}: does not match its digest in {} (stale or replayed index)",
                    layout::FRESHNESS
                )),
                Some(_) => {}
            }
        }
        for path in binned.keys() {
            if !in_bins.contains_key(path) {
                self.problem(format!(
                    "{path}: listed in a freshness bin but not an index of this tree"
                ));
            }
        }
    }

    fn check_unreferenced(&mut self) {
        let Some(listing) = self.o.listing.clone() else {
            return;
        };
        for path in listing {
            let derived = path.starts_with("v1/")
                || path.starts_with("packages/")
                || path.starts_with("freshness-bins/")
                || path.starts_with("tarballs/")
                || path.starts_with("archives/");
            if derived && !self.seen.contains(&path) {
                self.problem(format!(
                    "{path}: in the tree but not referenced by any index"
                ));
            }
        }
    }
}

struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
