//! `niso registry verify`: checks a whole tree the way a careful client would.
//!
//! Every problem is collected (not just the first), so one run tells an
//! operator everything that is wrong:
//!
//! * every index's signature and `repository` field (a wrong key or name is
//!   reported once, as the cause, not as every file it breaks);
//! * each package's `niso/packages/NAME` (every release) and Hex's view of
//!   it: `packages/NAME`, `names` and `versions` hold exactly the releases
//!   with a Hex tarball; no artifact has other bytes than a tombstone says;
//! * every archive an index names exists, has the recorded size and SHA-256,
//!   passes the archive checks, and holds the name, version and arch the index
//!   says (and, for Hex tarballs, the recorded inner checksum);
//! * the `v1/` documents and links match the indexes;
//! * the freshness sidecar is signed, unexpired, and lists the exact digest of
//!   every index file (the package indexes through their freshness bins);
//!   the packages are found from it, so a tree served over HTTP is walked
//!   whole;
//! * for a local tree, no archive or index lies in the tree unreferenced.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Seek;

use sha2::{Digest, Sha256};

use super::transport::{Transport, TransportError};
use crate::archive;
use crate::index::codec::{decode_index, CodecError, IndexMessage};
use crate::index::json;
use crate::index::layout::{self, Layout};
use crate::index::view as render;
use crate::index::{pb, PublicKey};
use crate::limits::Limits;

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
    /// An expired freshness record is a warning, not a problem (an offline
    /// copy checked knowingly).
    pub allow_expired: bool,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub problems: Vec<String>,
    /// What was allowed but should be known (an expired record).
    pub warnings: Vec<String>,
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
    /// From the signed `publisher-keys`: what checks artifacts' publisher
    /// signatures.
    publisher_keys: Vec<pb::PublisherKey>,
}

pub fn verify(transport: &dyn Transport, options: &VerifyOptions) -> VerifyReport {
    let mut v = Verifier {
        t: transport,
        o: options,
        report: VerifyReport::default(),
        seen: BTreeSet::new(),
        publisher_keys: Vec::new(),
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
                Ok(k) => {
                    // The root cause of every other failure: say it once.
                    return self.problem(format!(
                        "{}: the tree is signed by key {}, not by the key given ({}); \
                         check --public-key",
                        layout::PUBLIC_KEY,
                        k.fingerprint(),
                        self.o.public_key.fingerprint()
                    ));
                }
                Err(e) => self.problem(format!("{}: {e}", layout::PUBLIC_KEY)),
            }
        }
        // The signed record first: it names every index file, through the
        // bins, so the tree can be walked from it even over HTTP.
        let fresh = match self.fetch(layout::FRESHNESS) {
            Some(bytes) => match decode_index::<pb::Freshness>(
                &bytes,
                &self.o.public_key,
                &self.o.repository,
                self.o.limits.max_index,
            ) {
                Ok(f) => Some(f),
                Err(e @ (CodecError::Signature(_) | CodecError::Repository { .. })) => {
                    return self.problem(format!(
                        "{}: {e}; check --public-key and --name",
                        layout::FRESHNESS
                    ));
                }
                Err(e) => {
                    self.problem(format!("{}: {e}", layout::FRESHNESS));
                    None
                }
            },
            None => None,
        };
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
        let versions: Vec<pb::VersionsPackage> =
            versions.map(|(v, _)| v.packages).unwrap_or_default();
        if names.windows(2).any(|w| w[0] >= w[1]) {
            self.problem(format!(
                "{}: packages are not sorted and unique",
                layout::NAMES
            ));
        }

        // Every package: from the bins of the signed record (or, without
        // one, from the v1 list, to check what can be checked).
        let bins = match &fresh {
            Some(f) => self.check_freshness(f, &digests),
            None => BTreeMap::new(),
        };
        let packages: BTreeSet<String> = if fresh.is_some() {
            bins.keys()
                .filter_map(|p| p.strip_prefix(&format!("{}/", layout::NISO_PACKAGES_DIR)))
                .map(str::to_string)
                .collect()
        } else {
            self.fetch(layout::V1_INDEX)
                .and_then(|b| serde_json::from_slice::<json::PackageList>(&b).ok())
                .map(|l| l.packages.into_iter().map(|p| p.name).collect())
                .unwrap_or_default()
        };

        let mut summaries = Vec::new();
        let mut hex_names = Vec::new();
        let mut hex_versions = Vec::new();
        for name in &packages {
            let path = format!("{}/{name}", layout::NISO_PACKAGES_DIR);
            let Some((pkg, bytes)) = self.index::<pb::Package>(&path) else {
                continue;
            };
            self.check_listed(&bins, &path, &bytes);
            if &pkg.name != name {
                self.problem(format!("{path}: names package {:?}", pkg.name));
            }
            if !pkg.releases.is_empty() {
                self.report.packages += 1;
                summaries.push(render::summary(&pkg));
            }
            self.check_package(&pkg);
            // Hex's view: exactly the releases with a Hex tarball.
            let hex_path = format!("{}/{name}", layout::PACKAGES_DIR);
            match render::hex_view(&pkg) {
                Some(view) => {
                    if let Some((hex, bytes)) = self.index::<pb::Package>(&hex_path) {
                        self.check_listed(&bins, &hex_path, &bytes);
                        if hex != view {
                            self.problem(format!(
                                "{hex_path}: is not Hex's view of {path} (the releases with a \
                                 Hex tarball)"
                            ));
                        }
                    }
                    hex_names.push(name.clone());
                    hex_versions.push(render::versions_entry(&view));
                }
                None => {
                    if bins.contains_key(&hex_path) {
                        self.problem(format!(
                            "{hex_path}: listed, but {name} has no release with a Hex tarball"
                        ));
                    }
                }
            }
        }
        if fresh.is_some() {
            if names != hex_names {
                self.problem(format!(
                    "{}: lists {:?}, but the packages with Hex releases are {:?}",
                    layout::NAMES,
                    cut_list(&names),
                    cut_list(&hex_names)
                ));
            }
            if versions != hex_versions {
                self.problem(format!(
                    "{}: does not list the Hex releases of the package indexes",
                    layout::VERSIONS
                ));
            }
        }
        self.check_bytes(
            layout::V1_INDEX,
            &json::to_bytes(&json::PackageList {
                packages: summaries,
            }),
        );
        self.check_unreferenced();
    }

    /// A file's bytes must match its digest in its freshness bin.
    fn check_listed(&mut self, bins: &BTreeMap<String, pb::FileDigest>, path: &str, bytes: &[u8]) {
        if bins.is_empty() {
            return;
        }
        let d = render::Digest256::of(bytes);
        match bins.get(path) {
            None => self.problem(format!("{path}: not listed in its freshness bin")),
            Some(l) if l.sha256 != d.sha256 || l.length != d.length => self.problem(format!(
                "{path}: does not match its digest in {} (stale or replayed index)",
                layout::FRESHNESS
            )),
            Some(_) => {}
        }
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
                if pkg
                    .tombstones
                    .iter()
                    .any(|t| t.version == r.version && t.arch == a.arch && t.sha256 != a.sha256)
                {
                    self.problem(format!(
                        "{name} {} ({}): published with other bytes than the deleted ones",
                        r.version, a.arch
                    ));
                }
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
        let files = match render::v1_files(&Layout::root(), pkg) {
            Ok(f) => f,
            Err(e) => return self.problem(format!("niso/packages/{name}: {e}")),
        };
        for f in files {
            match f.content {
                render::Content::Bytes(bytes) => self.check_bytes(f.path.as_str(), &bytes),
                render::Content::Copy(from) => {
                    let artifact = pkg
                        .releases
                        .iter()
                        .flat_map(|r| r.artifacts.iter())
                        .find(|a| a.path == from.as_str());
                    if let Some(a) = artifact {
                        self.check_same_bytes(f.path.as_str(), a);
                    }
                }
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
        if let (Some(sig), Some(id)) = (&a.publisher_signature, &a.publisher_key_id) {
            self.check_publisher_signature(&what, a, sig, id, &tmp);
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

    /// A publisher signature must be by a key the signed `publisher-keys`
    /// lists, registered when the artifact was uploaded, and verify.
    fn check_publisher_signature(
        &mut self,
        what: &str,
        a: &pb::Artifact,
        sig: &[u8],
        id: &str,
        file: &std::fs::File,
    ) {
        let key = self.publisher_keys.iter().find_map(|k| {
            let bytes: [u8; 32] = k.public_key.clone().try_into().ok()?;
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()?;
            crate::client::signing::names_key(id, &vk).then_some((vk, k.clone()))
        });
        let Some((vk, listed)) = key else {
            return self.problem(format!(
                "{what}: signed by publisher key {id}, which {} does not list",
                layout::PUBLISHER_KEYS
            ));
        };
        if a.uploaded_at < listed.registered_at
            || listed.retired_at.is_some_and(|r| a.uploaded_at > r)
        {
            self.problem(format!(
                "{what}: uploaded when publisher key {id} was not registered"
            ));
        }
        let ok = ed25519_dalek::Signature::from_slice(sig)
            .ok()
            .map(|s| crate::client::signing::verify_file(&vk, &s, file));
        match ok {
            Some(Ok(true)) => {}
            Some(Err(e)) => self.problem(format!("{what}: {e}")),
            _ => self.problem(format!(
                "{what}: the publisher signature does not verify with key {id}"
            )),
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

    /// Checks the signed record: unexpired, listing `names`, `versions` (whose
    /// actual digests are `top`) and the bins, each bin matching its digest
    /// and listing only its own packages. Returns every index file the bins
    /// list, by path.
    fn check_freshness(
        &mut self,
        f: &pb::Freshness,
        top: &BTreeMap<String, render::Digest256>,
    ) -> BTreeMap<String, pb::FileDigest> {
        if f.expires_at <= self.o.now {
            let text = format!(
                "{}: expired at {} (re-sign it with `niso registry build`)",
                layout::FRESHNESS,
                json::rfc3339(f.expires_at)
            );
            if self.o.allow_expired {
                self.report.warnings.push(text);
            } else {
                self.problem(format!(
                    "{text}; an offline copy older than that is checked with --allow-expired"
                ));
            }
        }
        let matches = |l: &pb::FileDigest, d: &render::Digest256| {
            l.sha256 == d.sha256 && l.length == d.length
        };
        let mut binned: BTreeMap<String, pb::FileDigest> = BTreeMap::new();
        for (path, d) in top {
            match f.files.iter().find(|l| l.path == *path) {
                None => self.problem(format!("{path}: not listed in {}", layout::FRESHNESS)),
                Some(l) if !matches(l, d) => self.problem(format!(
                    "{path}: does not match its digest in {} (stale or replayed index)",
                    layout::FRESHNESS
                )),
                Some(_) => {}
            }
        }
        for l in &f.files {
            let path = l.path.as_str();
            if top.contains_key(path) || path == layout::NAMES || path == layout::VERSIONS {
                continue;
            }
            if path == layout::PUBLISHER_KEYS {
                if let Some((keys, bytes)) = self.index::<pb::PublisherKeys>(path) {
                    if !matches(l, &render::Digest256::of(&bytes)) {
                        self.problem(format!(
                            "{path}: does not match its digest in {} (stale or replayed)",
                            layout::FRESHNESS
                        ));
                    }
                    self.publisher_keys = keys.keys;
                }
                continue;
            }
            let Some(bin) = path
                .strip_prefix(&format!("{}/", layout::FRESHNESS_BINS_DIR))
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .filter(|b| Layout::freshness_bin_rel(*b) == path)
            else {
                self.problem(format!(
                    "{path}: listed in {} but not an index of this tree",
                    layout::FRESHNESS
                ));
                continue;
            };
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
                Ok(b) if b.bin != u32::from(bin) => {
                    self.problem(format!("{path}: says it is bin {}", b.bin))
                }
                Ok(b) => {
                    for d in b.files {
                        let name = d
                            .path
                            .strip_prefix(&format!("{}/", layout::NISO_PACKAGES_DIR))
                            .or_else(|| d.path.strip_prefix(&format!("{}/", layout::PACKAGES_DIR)));
                        if name.is_none_or(|n| render::bin_of(n) != bin) {
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
        binned
    }

    fn check_unreferenced(&mut self) {
        let Some(listing) = self.o.listing.clone() else {
            return;
        };
        for path in listing {
            let derived = path.starts_with("v1/")
                || path.starts_with("packages/")
                || path.starts_with("niso/")
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

/// The first names of a long list, for messages.
fn cut_list(names: &[String]) -> Vec<&str> {
    names.iter().take(20).map(String::as_str).collect()
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
