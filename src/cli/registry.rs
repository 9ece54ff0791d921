//! `niso registry …`: create, build, verify and publish into a registry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::Outcome;
use crate::archive;
use crate::client::verify::{verify, VerifyOptions};
use crate::client::{DirTransport, HttpTransport, Transport};
use crate::datadir::{self, DataDir};
use crate::ident::RepoName;
use crate::index::{PublicKey, RepoKey, Signer};
use crate::limits::{LimitArgs, Limits};
use crate::publish::{unix_now, Layout, Options, Publisher, Upload};
use crate::store::{LocalStore, Store};

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    Serve(super::serve::ServeArgs),
    Init(InitArgs),
    Build(BuildArgs),
    Verify(VerifyArgs),
    Publish(PublishArgs),
}

impl RegistryCommand {
    pub fn run(self) -> anyhow::Result<Outcome> {
        match self {
            Self::Serve(a) => a.run(),
            Self::Init(a) => a.run(),
            Self::Build(a) => a.run(),
            Self::Verify(a) => a.run(),
            Self::Publish(a) => a.run(),
        }
    }
}

/// Create a registry data directory with a new signing key.
///
/// Writes `niso-registry.toml`, the RSA signing key `keys/repository.pem`
/// (mode 0600, outside the served tree), and an empty signed repository in
/// `public/` (the directory to serve).
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso registry init --data-dir /var/lib/niso-registry --name acme
  Created repository acme in /var/lib/niso-registry
  Serve /var/lib/niso-registry/public; clients pin public_key (sha256 fingerprint printed below).")]
pub struct InitArgs {
    /// The data directory to create.
    #[arg(long)]
    data_dir: PathBuf,
    /// The repository name, written into every index (Hex clients check it).
    #[arg(long)]
    name: RepoName,
    /// Use this existing RSA private key (PEM, PKCS#1 or PKCS#8) instead of
    /// generating one.
    #[arg(long)]
    private_key: Option<PathBuf>,
}

impl InitArgs {
    fn run(self) -> anyhow::Result<Outcome> {
        let dd = DataDir::init(&self.data_dir, &self.name, self.private_key.as_deref())
            .with_context(|| format!("cannot create a registry in {}", self.data_dir.display()))?;
        let key = dd.key()?;
        eprintln!(
            "Created repository {} in {}",
            self.name,
            self.data_dir.display()
        );
        eprintln!("Serve {}", dd.public_dir().display());
        println!("public key sha256:{}", key.public_key().fingerprint());
        Ok(Outcome::Success)
    }
}

/// Regenerate every index from the archives in the tree.
///
/// Reads `tarballs/*.tar` and `archives/*.niso` (and each organization
/// repository under `repos/ORG/`), checks every archive, and rewrites the
/// signed indexes, the `v1/` documents and the freshness sidecar. Files that
/// do not change are not rewritten. A bad archive refuses the whole build and
/// changes nothing.
///
/// Works on a data directory made by `registry init`, or, given `--name` and
/// `--private-key`, on a plain directory holding `tarballs/*.tar`, as
/// `mix hex.registry build` does.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry build --data-dir /var/lib/niso-registry
  $ niso registry build --data-dir ./public --name acme --private-key acme.pem")]
pub struct BuildArgs {
    /// A data directory, or a plain tree directory (with --name and --private-key).
    #[arg(long)]
    data_dir: PathBuf,
    /// Repository name (plain directory only).
    #[arg(long, requires = "private_key")]
    name: Option<RepoName>,
    /// RSA private key, PEM (plain directory only).
    #[arg(long, requires = "name")]
    private_key: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl BuildArgs {
    fn run(self) -> anyhow::Result<Outcome> {
        let (tree, key, name, _lock) = if DataDir::is_data_dir(&self.data_dir) {
            if self.name.is_some() {
                bail!(
                    "{} is a registry data directory: its name and key are in its config; drop --name and --private-key",
                    self.data_dir.display()
                );
            }
            let dd = DataDir::open(&self.data_dir)?;
            let lock = dd.lock()?;
            (
                dd.public_dir(),
                dd.key()?,
                dd.repository().clone(),
                Some(lock),
            )
        } else {
            let (Some(name), Some(key_path)) = (self.name, self.private_key) else {
                bail!(
                    "{} is not a registry data directory; to build a plain directory of tarballs give --name and --private-key",
                    self.data_dir.display()
                );
            };
            if !self.data_dir.is_dir() {
                bail!("{} is not a directory", self.data_dir.display());
            }
            (
                self.data_dir.clone(),
                RepoKey::from_file(&key_path)?,
                name,
                None,
            )
        };
        let signer: Arc<dyn Signer> = Arc::new(key);
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(&tree));
        let mut repos = vec![(name, Layout::root())];
        for org in datadir::organizations_in(&tree)? {
            let layout = Layout::organization(&org);
            repos.push((org, layout));
        }
        for (repo, layout) in repos {
            let publisher = Publisher::open(
                store.clone(),
                signer.clone(),
                repo.clone(),
                layout,
                Options {
                    limits: self.limits.apply(Limits::default()),
                    ..Options::default()
                },
            )
            .with_context(|| format!("cannot read the current indexes of {repo}"))?;
            let report = publisher.rebuild()?;
            eprintln!(
                "Built {repo}: {} packages, {} releases, {} archives ({} files written, {} removed)",
                report.packages, report.releases, report.artifacts, report.files_written, report.files_removed
            );
        }
        Ok(Outcome::Success)
    }
}

/// Check a registry tree: signatures, agreement, archives, freshness.
///
/// TARGET is a directory (a tree, or a data directory) or an http(s) URL. Every
/// problem found is printed on its own line; the exit status is 0 when there
/// are none, 1 when there are, 2 when the check could not run.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry verify /var/lib/niso-registry/public --public-key acme.pub --name acme
  $ niso registry verify https://registry.example.com --public-key acme.pub --name acme --org team")]
pub struct VerifyArgs {
    /// Directory or URL of the tree.
    target: String,
    /// The repository's public key (PEM) to verify against.
    #[arg(long)]
    public_key: PathBuf,
    /// The repository name the indexes must carry.
    #[arg(long)]
    name: RepoName,
    /// Also verify this organization repository (`repos/ORG/`); found
    /// automatically in a local directory.
    #[arg(long = "org")]
    orgs: Vec<RepoName>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl VerifyArgs {
    fn run(self) -> anyhow::Result<Outcome> {
        let key = PublicKey::from_file(&self.public_key)?;
        let is_url = self.target.starts_with("http://") || self.target.starts_with("https://");
        let local = (!is_url).then(|| {
            let p = PathBuf::from(&self.target);
            if DataDir::is_data_dir(&p) {
                p.join(datadir::PUBLIC_DIR)
            } else {
                p
            }
        });
        if let Some(dir) = &local {
            if !dir.is_dir() {
                bail!("{} is not a directory or an http(s) URL", dir.display());
            }
        }
        let mut repos = vec![(self.name.clone(), Layout::root())];
        let orgs = match &local {
            Some(dir) => datadir::organizations_in(dir)?,
            None => self.orgs.clone(),
        };
        repos.extend(orgs.into_iter().map(|o| {
            let l = Layout::organization(&o);
            (o, l)
        }));
        let mut total = 0;
        for (repo, layout) in repos {
            let (transport, listing): (Box<dyn Transport>, Option<Vec<String>>) = match &local {
                Some(dir) => {
                    let root = dir.join(layout.prefix());
                    let listing = LocalStore::new(&root)
                        .list("")?
                        .into_iter()
                        .map(|p| p.to_string())
                        .filter(|p| !p.starts_with("repos/"))
                        .collect();
                    (Box::new(DirTransport::new(root)), Some(listing))
                }
                None => {
                    let base = format!("{}/{}", self.target.trim_end_matches('/'), layout.prefix());
                    (
                        Box::new(HttpTransport::new(base.trim_end_matches('/'))?),
                        None,
                    )
                }
            };
            let report = verify(
                transport.as_ref(),
                &VerifyOptions {
                    repository: repo.to_string(),
                    public_key: key.clone(),
                    limits: self.limits.apply(Limits::default()),
                    now: unix_now(),
                    listing,
                },
            );
            for p in &report.problems {
                println!("{repo}: {p}");
            }
            total += report.problems.len();
            eprintln!(
                "{repo}: {} packages, {} releases, {} archives checked, {} problems",
                report.packages,
                report.releases,
                report.artifacts,
                report.problems.len()
            );
        }
        Ok(if total == 0 {
            Outcome::Success
        } else {
            Outcome::No
        })
    }
}

/// Publish archives into a registry directly, without a server.
///
/// Each archive is copied into the data directory's staging area, checked,
/// and published: archive first, then its indexes. A version that is already
/// published is refused (published versions never change). Use this on the
/// machine that holds the data directory, e.g. to fill an air-gapped copy; a
/// running `niso registry serve` holds the lock, so publish through it then.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso registry publish --data-dir /var/lib/niso-registry my-app-1.1.0-x86_64.niso phoenix-1.7.0.tar")]
pub struct PublishArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Publish into this organization repository (`repos/ORG/`).
    #[arg(long)]
    org: Option<RepoName>,
    /// Archives: Hex tarballs (.tar) or .niso archives.
    #[arg(required = true)]
    archives: Vec<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl PublishArgs {
    fn run(self) -> anyhow::Result<Outcome> {
        let dd = DataDir::open(&self.data_dir)?;
        let _lock = dd.lock()?;
        let layout = match &self.org {
            Some(org) => Layout::organization(org),
            None => Layout::root(),
        };
        let publisher = dd.publisher(
            Arc::new(dd.key()?),
            layout,
            Options {
                limits: self.limits.apply(Limits::default()),
                ..Options::default()
            },
        )?;
        let limits = *publisher.limits();
        let mut failed = 0;
        for path in &self.archives {
            match publish_file(&dd, &publisher, path, &limits) {
                Ok(p) => eprintln!(
                    "Published {} {} ({}) — {} bytes",
                    p.name, p.version, p.arch, p.size
                ),
                Err(e) => {
                    failed += 1;
                    eprintln!("niso: {}: {e:#}", path.display());
                }
            }
        }
        if failed > 0 {
            bail!(
                "{failed} of {} archives were not published",
                self.archives.len()
            );
        }
        Ok(Outcome::Success)
    }
}

fn publish_file(
    dd: &DataDir,
    publisher: &Publisher,
    path: &Path,
    limits: &Limits,
) -> anyhow::Result<crate::publish::Published> {
    // Copy first and check the copy: the caller's file could change after
    // the check, and the tree must never share an inode with it.
    let staging = dd.staging_dir();
    std::fs::create_dir_all(&staging)?;
    let staged = tempfile::Builder::new()
        .prefix("publish-")
        .tempfile_in(&staging)?;
    std::fs::copy(path, staged.path())
        .with_context(|| format!("cannot read {}", path.display()))?;
    let info = archive::inspect_file(staged.path(), limits)?;
    Ok(publisher.publish(Upload {
        info,
        staged: staged.path().to_path_buf(),
        uploaded_at: unix_now(),
        signature: None,
    })?)
}
