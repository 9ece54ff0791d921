//! `niso pull NAME[:VERSION|:TAG]`: download a package, verified, into the
//! local package store.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ed25519_dalek::Signature;

use super::output::{human_size, line, Ctx};
use super::Outcome;
use crate::client::fetch::{self, PackageRef};
use crate::client::freshness::Allow;
use crate::client::session::Session;
use crate::client::signing;
use crate::client::store::PackageStore;
use crate::ident::Arch;
use crate::index::json::rfc3339;
use crate::index::layout::download_name;
use crate::publish::unix_now;

/// Download a package into the local package store, verified.
///
/// Reads the registry's signed freshness record and the package's signed
/// index from its static tree, and checks both against the key pinned when
/// the registry was added (signature, repository name, digests); resolves
/// the version (NAME alone: the newest stable release for the arch; a tag
/// from the signed index); downloads the archive and checks its size and
/// SHA-256 against the index. Refuses, writing nothing, any mismatch, a tree
/// older than one already seen (a rollback) and an expired freshness record.
/// Prints the path of the stored archive:
/// $XDG_DATA_HOME/niso/packages/REGISTRY/[ORG/]NAME/VERSION/FILE.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso pull my-api                      # newest stable release for this machine's arch
  Pulled my-api 1.1.0 (x86_64) — 8.2 MB
  /home/me/.local/share/niso/packages/private/my-api/1.1.0/my-api-1.1.0-x86_64.niso
  $ niso pull my-api:1.0.0
  $ niso pull my-api:stable --arch aarch64
  $ niso pull team/tool:2.0.0             # an organization's package, with your API key
  $ niso pull my-api --require-signature                   # a key the registry lists
  $ niso pull my-api --require-signature --publisher-key alice.pub   # only alice's

With --json: {\"type\":\"pulled\",\"name\":…,\"version\":…,\"arch\":…,\"size\":…,\"sha256\":…,\"path\":…}")]
pub struct PullArgs {
    /// NAME, NAME:VERSION or NAME:TAG (NAME may be ORG/NAME).
    package: PackageRef,
    /// The arch to pull (default: this machine's).
    #[arg(long)]
    arch: Option<Arch>,
    /// Refuse an archive without a valid publisher signature: by one of the
    /// --publisher-key keys if given, else by a publisher key the registry
    /// lists in its signed tree (`publisher-keys`), registered when the
    /// archive was uploaded.
    #[arg(long)]
    require_signature: bool,
    /// An Ed25519 publisher public key (PEM) to accept signatures from
    /// (repeat for several): only these, whatever the registry lists.
    #[arg(
        long = "publisher-key",
        value_name = "FILE",
        requires = "require_signature"
    )]
    publisher_keys: Vec<PathBuf>,
    /// Accept an expired freshness record (an offline copy of a tree, used
    /// knowingly). Everything else is still checked.
    #[arg(long)]
    allow_expired: bool,
}

fn host_arch() -> anyhow::Result<Arch> {
    Arch::new(std::env::consts::ARCH)
        .with_context(|| "cannot name this machine's arch; pass --arch ARCH")
}

impl PullArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let registry = ctx.registry()?;
        let arch = match self.arch {
            Some(a) => a,
            None => host_arch()?,
        };
        let publisher_keys = self
            .publisher_keys
            .iter()
            .map(|p| signing::load_verifying_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        let want = &self.package;
        let org = want.org.as_ref();
        let session = Session::open(
            &registry,
            org,
            Allow {
                expired: self.allow_expired,
            },
            unix_now(),
        )?;
        let fresh = session.fresh()?;
        if fresh.expired {
            eprintln!(
                "niso: WARNING: the freshness record of {} expired at {}; using it anyway because of --allow-expired. This copy may be stale or frozen by an attacker.",
                registry.name,
                rfc3339(fresh.expires_at)
            );
        }
        let pkg = session.reader.require_package(&fresh, &want.name)?;
        let chosen = fetch::resolve(&pkg, &want.want, &arch)?;
        let (release, artifact) = (chosen.release, chosen.artifact);
        let what = format!("{} {} ({})", pkg.name, release.version, artifact.arch);
        if release.retired.is_some() {
            eprintln!("niso: warning: {what} is retired by its publisher");
        }
        let store = PackageStore::open_default()?;
        let dest = store.destination(
            &registry.name,
            org,
            &want.name,
            &release.version,
            download_name(&artifact.path),
        )?;
        let mut download = store.download_file()?;
        session
            .reader
            .download(&pkg, release, artifact, &mut download)?;
        if self.require_signature {
            let keys = if publisher_keys.is_empty() {
                trusted_keys(&session.reader.publisher_keys(&fresh)?, artifact)
            } else {
                publisher_keys.clone()
            };
            check_signature(&what, artifact, &keys, &download)?;
        }
        store.install_download(&mut download, &dest)?;
        session.remember(&fresh)?;
        if ctx.json {
            ctx.emit(
                "pulled",
                serde_json::json!({
                    "name": pkg.name, "org": org.map(|o| o.as_str()),
                    "version": release.version, "arch": artifact.arch,
                    "size": artifact.size, "sha256": hex::encode(&artifact.sha256),
                    "path": dest.display().to_string(),
                    "publisher_key_id": artifact.publisher_key_id,
                    "generation": fresh.generation,
                }),
            );
        } else {
            eprintln!("Pulled {what} — {}", human_size(artifact.size));
            line(&dest.display().to_string());
        }
        Ok(Outcome::Success)
    }
}

/// The keys the registry vouches for that may have signed `artifact`: those
/// registered before it was uploaded and not retired before then.
fn trusted_keys(
    listed: &[crate::index::pb::PublisherKey],
    artifact: &crate::index::pb::Artifact,
) -> Vec<ed25519_dalek::VerifyingKey> {
    listed
        .iter()
        .filter(|k| {
            k.registered_at <= artifact.uploaded_at
                && k.retired_at.is_none_or(|r| artifact.uploaded_at <= r)
        })
        .filter_map(|k| {
            let bytes: [u8; 32] = k.public_key.clone().try_into().ok()?;
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
        })
        .collect()
}

/// The artifact must carry a signature that verifies with one of the
/// trusted publisher keys; the index's key id picks which.
fn check_signature(
    what: &str,
    artifact: &crate::index::pb::Artifact,
    keys: &[ed25519_dalek::VerifyingKey],
    file: &std::fs::File,
) -> anyhow::Result<()> {
    let (Some(sig), Some(id)) = (&artifact.publisher_signature, &artifact.publisher_key_id) else {
        bail!("{what} has no publisher signature, and --require-signature was given; refusing it");
    };
    let Some(key) = keys.iter().find(|k| signing::names_key(id, k)) else {
        let trusted: Vec<String> = keys.iter().map(signing::key_id).collect();
        bail!(
            "{what} is signed by publisher key {id}, which is not one of the keys trusted ({}); refusing it. If you trust that publisher, pass their public key with --publisher-key",
            if trusted.is_empty() { "none".to_string() } else { trusted.join(", ") }
        );
    };
    let sig = Signature::from_slice(sig).map_err(|_| {
        anyhow::anyhow!("{what}: the publisher signature in the index is malformed; refusing it")
    })?;
    if !signing::verify_file(key, &sig, file).context("cannot read the download")? {
        bail!("{what}: the publisher signature does not verify with key {id}; refusing it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;
    use std::io::Write;

    #[test]
    fn a_signature_must_be_present_known_and_valid() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let vk = sk.verifying_key();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"archive bytes").unwrap();
        let artifact = |sig: Option<Vec<u8>>| crate::index::pb::Artifact {
            publisher_signature: sig,
            publisher_key_id: Some(signing::key_id(&vk)),
            ..Default::default()
        };
        let good = sk.sign(b"archive bytes").to_bytes().to_vec();
        check_signature("x", &artifact(Some(good)), &[vk], &file).unwrap();
        let other = sk.sign(b"other bytes").to_bytes().to_vec();
        let e = check_signature("x", &artifact(Some(other)), &[vk], &file).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        let e = check_signature("x", &artifact(Some(vec![1, 2])), &[vk], &file).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
        let e = check_signature("x", &artifact(None), &[vk], &file).unwrap_err();
        assert!(e.to_string().contains("no publisher signature"), "{e}");
    }
}
