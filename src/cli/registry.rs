//! `niso registry …`: create, build, verify and publish into a registry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::Outcome;
use crate::archive;
use crate::client::verify::{verify, VerifyOptions};
use crate::client::{HttpTransport, StoreTransport, Transport};
use crate::datadir::{self, DataDir};
use crate::ident::RepoName;
use crate::index::{PublicKey, RepoKey, Signer};
use crate::limits::{LimitArgs, Limits};
use crate::publish::{unix_now, Layout, Options, Publisher, StagedFile, Upload};
use crate::store::{LocalStore, Store};

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Add a registry to talk to, pinning its repository key.
    Add(super::registries::AddArgs),
    /// List the configured registries.
    List(super::registries::ListArgs),
    /// Remove a configured registry.
    Remove(super::registries::RemoveArgs),
    /// List a package's tags.
    ListTags(super::tags::ListTagsArgs),
    /// Create an API key.
    CreateKey(super::keys::CreateKeyArgs),
    /// List API keys.
    ListKeys(super::keys::ListKeysArgs),
    /// Revoke an API key.
    RevokeKey(super::keys::RevokeKeyArgs),
    /// Serve the write API and the static tree on one port.
    Serve(super::serve::ServeArgs),
    /// Create a registry data directory with a new signing key.
    Init(InitArgs),
    /// Regenerate every index from the archives in the tree.
    Build(BuildArgs),
    /// Check a registry tree: signatures, agreement, archives, freshness.
    Verify(VerifyArgs),
    /// Publish archives into a registry directly, without a server.
    Publish(PublishArgs),
    /// Copy a registry, verified: into a directory or another registry.
    Mirror(super::mirror::MirrorArgs),
    /// Remove old versions: keep the N newest of every package and every tagged one.
    Gc(super::gc::GcArgs),
}

impl RegistryCommand {
    pub fn run(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        match self {
            Self::Add(a) => a.run(ctx),
            Self::List(a) => a.run(ctx),
            Self::Remove(a) => a.run(ctx),
            Self::ListTags(a) => a.run(ctx),
            Self::CreateKey(a) => a.run(ctx),
            Self::ListKeys(a) => a.run(ctx),
            Self::RevokeKey(a) => a.run(ctx),
            Self::Serve(a) => a.run(),
            Self::Init(a) => a.run(ctx),
            Self::Build(a) => a.run(ctx),
            Self::Verify(a) => a.run(ctx),
            Self::Publish(a) => a.run(ctx),
            Self::Mirror(a) => a.run(ctx),
            Self::Gc(a) => a.run(ctx),
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
Examples:
  $ niso registry init --data-dir /var/lib/niso-registry --name acme
  Created repository acme in /var/lib/niso-registry
  Serve /var/lib/niso-registry/public
  public key sha256:3f1c…9a0b

The last line (on stdout) is the SHA-256 fingerprint of public_key: give it
to your users, who compare it when `niso registry add` shows it.

  # The tree in a bucket (settings from AWS_ENDPOINT_URL, AWS_REGION,
  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP):
  $ niso registry init --data-dir /var/lib/niso-registry --name acme --store s3://acme-registry/tree")]
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
    /// Keep the tree in this store instead of DATA_DIR/public:
    /// s3://BUCKET/PREFIX, or a directory. Config, keys and the key store
    /// stay in the data directory.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

impl InitArgs {
    fn run(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        let dd = super::block_on(DataDir::init(
            &self.data_dir,
            &self.name,
            self.private_key.as_deref(),
            self.store.as_deref(),
        ))?
        .with_context(|| format!("cannot create a registry in {}", self.data_dir.display()))?;
        let key = dd.key()?;
        let fingerprint = key.public_key().fingerprint();
        if ctx.json {
            ctx.emit(
                "initialized",
                serde_json::json!({
                    "repository": self.name.as_str(),
                    "data_dir": self.data_dir.display().to_string(),
                    "serve": dd.public_dir().display().to_string(),
                    "key_fingerprint": fingerprint,
                }),
            );
            return Ok(Outcome::Success);
        }
        eprintln!(
            "Created repository {} in {}",
            self.name,
            self.data_dir.display()
        );
        match &self.store {
            Some(url) => eprintln!("The tree is in {url}"),
            None => eprintln!("Serve {}", dd.public_dir().display()),
        }
        super::output::line(&format!("public key sha256:{fingerprint}"));
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
    /// The store holding the tree, instead of the data directory's
    /// configured one (s3://BUCKET/PREFIX or a directory).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl BuildArgs {
    fn run(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        super::block_on(self.build(ctx))?
    }

    async fn build(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        let mut keys = None;
        let (store, key, name) = if DataDir::is_data_dir(&self.data_dir) {
            if self.name.is_some() {
                bail!(
                    "{} is a registry data directory: its name and key are in its config; drop --name and --private-key",
                    self.data_dir.display()
                );
            }
            let dd = DataDir::open(&self.data_dir)?;
            keys = dd.publisher_keys()?;
            (
                dd.store(self.store.as_deref())?,
                dd.key()?,
                dd.repository().clone(),
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
            let store: Arc<dyn Store> = match &self.store {
                Some(url) => crate::store::open(url)?,
                None => Arc::new(LocalStore::new(&self.data_dir)),
            };
            (store, RepoKey::from_file(&key_path)?, name)
        };
        let signer: Arc<dyn Signer> = Arc::new(key);
        let mut repos = vec![(name, Layout::root())];
        for org in datadir::organizations(store.as_ref()).await? {
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
            .await
            .with_context(|| format!("cannot read the current indexes of {repo}"))?;
            let report = publisher.rebuild().await?;
            if let Some(keys) = &keys {
                publisher.set_publisher_keys(keys.clone()).await?;
            }
            if ctx.json {
                ctx.emit(
                    "built",
                    serde_json::json!({
                        "repository": repo.as_str(), "packages": report.packages,
                        "releases": report.releases, "archives": report.artifacts,
                        "files_written": report.files_written, "files_removed": report.files_removed,
                    }),
                );
                continue;
            }
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
/// TARGET is a directory (a tree, or a data directory, whose configured store
/// is read), an http(s) URL, or a store URL (s3://BUCKET/PREFIX, settings
/// from the AWS_* environment variables). Every problem found is printed on
/// its own line; the exit status is 0 when there are none, 1 when there are,
/// 2 when the check could not run.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry verify /var/lib/niso-registry/public --public-key acme.pub --name acme
  $ niso registry verify https://registry.example.com --public-key acme.pub --name acme --org team
  $ niso registry verify s3://acme-registry/tree --public-key acme.pub --name acme
  # An air-gapped copy older than its freshness record's expiry (30 days):
  $ niso registry verify /mnt/usb/registry --public-key acme.pub --name acme --allow-expired

An organization's files are read over HTTP with --key, NISO_KEY, or the key
of the configured registry at that URL, sent to that host only.

With --json, one line per problem and per repository:
  {\"type\":\"problem\",\"repository\":\"acme\",\"prefix\":\"\",\"message\":\"names: …\"}
  {\"type\":\"summary\",\"repository\":\"acme\",\"packages\":3,\"releases\":5,\"archives\":6,\"problems\":1}")]
pub struct VerifyArgs {
    /// Directory, http(s) URL or store URL of the tree.
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
    /// The API key to read organization repositories over HTTP with (they
    /// are private). Default: NISO_KEY, else the key of the configured
    /// registry whose URL this is. Sent only to TARGET's host, and only for
    /// the organizations' files.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Report an expired freshness record as a warning, not a problem: an
    /// offline copy older than its expiry, checked knowingly.
    #[arg(long)]
    allow_expired: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

impl VerifyArgs {
    /// The key for organizations: --key, else NISO_KEY, else the key of
    /// the configured registry at this URL.
    fn api_key(&self, ctx: &super::Ctx) -> anyhow::Result<Option<String>> {
        if let Some(k) = &self.key {
            return Ok(Some(k.clone()));
        }
        if let Ok(k) = std::env::var(crate::client::config::KEY_ENV) {
            if !k.is_empty() {
                return Ok(Some(k));
            }
        }
        let (config, path) = ctx.config()?;
        Ok(match config.find(&self.target) {
            Some(name) => config.select(Some(name.as_str()), &path)?.key,
            None => None,
        })
    }

    fn run(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        let key = PublicKey::from_file(&self.public_key)?;
        let rt = super::runtime()?;
        let is_http = self.target.starts_with("http://") || self.target.starts_with("https://");
        // A store to read through (a bucket, or a data directory's
        // configured one); otherwise a directory or HTTP.
        let store: Option<Arc<dyn Store>> = if self.target.contains("://") && !is_http {
            Some(crate::store::open(&self.target)?)
        } else if DataDir::is_data_dir(Path::new(&self.target)) {
            Some(DataDir::open(Path::new(&self.target))?.store(None)?)
        } else if !is_http {
            let dir = PathBuf::from(&self.target);
            if !dir.is_dir() {
                bail!(
                    "{} is not a directory, an http(s) URL or a store URL",
                    dir.display()
                );
            }
            Some(Arc::new(LocalStore::new(dir)))
        } else {
            None
        };
        let mut repos = vec![(self.name.clone(), Layout::root())];
        let orgs = match &store {
            Some(s) => rt.block_on(datadir::organizations(s.as_ref()))?,
            None => self.orgs.clone(),
        };
        repos.extend(orgs.into_iter().map(|o| {
            let l = Layout::organization(&o);
            (o, l)
        }));
        // Organizations are private: over HTTP they are read with a key.
        let api_key = match (&store, self.orgs.is_empty()) {
            (None, false) => self.api_key(ctx)?,
            _ => None,
        };
        let mut total = 0;
        for (repo, layout) in repos {
            let (transport, listing): (Box<dyn Transport>, Option<Vec<String>>) = match &store {
                Some(s) => {
                    let prefix = match layout.prefix() {
                        "" => String::new(),
                        p => format!("{p}/"),
                    };
                    let listing = rt
                        .block_on(s.list(layout.prefix()))?
                        .into_iter()
                        .filter_map(|p| p.as_str().strip_prefix(&prefix).map(str::to_string))
                        .filter(|p| !p.starts_with("repos/"))
                        .collect();
                    let t = StoreTransport::new(s.clone(), layout.prefix(), rt.handle().clone());
                    (Box::new(t), Some(listing))
                }
                None => {
                    let base = format!("{}/{}", self.target.trim_end_matches('/'), layout.prefix());
                    // The root repository is public: no key for it.
                    let key = match layout.prefix() {
                        "" => None,
                        _ => api_key.as_deref(),
                    };
                    (
                        Box::new(HttpTransport::with_key(base.trim_end_matches('/'), key)?),
                        None,
                    )
                }
            };
            // Problems name a place in the tree (`names: …`, `my-app 1.0.0
            // (x86_64): …`), under `repos/ORG/` for an organization; never
            // the repository name alone, which would read like the `niso:`
            // error prefix.
            let place = match layout.prefix() {
                "" => String::new(),
                p => format!("{p}/"),
            };
            let report = verify(
                transport.as_ref(),
                &VerifyOptions {
                    repository: repo.to_string(),
                    public_key: key.clone(),
                    limits: self.limits.apply(Limits::default()),
                    now: unix_now(),
                    listing,
                    allow_expired: self.allow_expired,
                },
            );
            for w in &report.warnings {
                eprintln!(
                    "niso: WARNING: {place}{w}; allowed by --allow-expired: this copy may be stale"
                );
            }
            for p in &report.problems {
                if ctx.json {
                    ctx.emit(
                        "problem",
                        serde_json::json!({ "repository": repo.as_str(), "prefix": layout.prefix(), "message": p }),
                    );
                } else {
                    super::output::line(&format!("{place}{p}"));
                }
            }
            total += report.problems.len();
            if ctx.json {
                ctx.emit(
                    "summary",
                    serde_json::json!({
                        "repository": repo.as_str(), "packages": report.packages,
                        "releases": report.releases, "archives": report.artifacts,
                        "problems": report.problems.len(),
                    }),
                );
            } else {
                eprintln!(
                    "Repository {repo}: {} packages, {} releases, {} archives checked, {} problems",
                    report.packages,
                    report.releases,
                    report.artifacts,
                    report.problems.len(),
                );
            }
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
/// and published: archive first, then its indexes. A version already
/// published with the same bytes is left as it is; other bytes are refused
/// (published versions never change). Use this on the machine that holds
/// the data directory, e.g. to fill an air-gapped copy. It may run while
/// `niso registry serve` runs on the same data directory or bucket: each
/// writer reloads what the other changed.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso registry publish --data-dir /var/lib/niso-registry my-app-1.1.0-x86_64.niso phoenix-1.7.0.tar")]
pub struct PublishArgs {
    /// The registry's data directory (made by `registry init` or `serve`).
    #[arg(long)]
    data_dir: PathBuf,
    /// The store holding the tree, instead of the data directory's
    /// configured one.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
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
    fn run(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        super::block_on(self.publish(ctx))?
    }

    async fn publish(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        let dd = DataDir::open(&self.data_dir)?;
        let layout = match &self.org {
            Some(org) => Layout::organization(org),
            None => Layout::root(),
        };
        let publisher = dd
            .publisher(
                Arc::new(dd.key()?),
                layout,
                Options {
                    limits: self.limits.apply(Limits::default()),
                    ..Options::default()
                },
                self.store.as_deref(),
            )
            .await?;
        dd.clean_staging()?;
        publisher.recover().await?;
        if let Some(keys) = dd.publisher_keys()? {
            publisher.set_publisher_keys(keys).await?;
        }
        let limits = *publisher.limits();
        let mut failed = 0;
        for path in &self.archives {
            match publish_file(&dd, &publisher, path, &limits).await {
                Ok(p) if ctx.json => ctx.emit(
                    "published",
                    serde_json::json!({
                        "name": p.name.as_str(), "version": p.version.as_str(),
                        "arch": p.arch.as_str(), "size": p.size, "created": p.created,
                    }),
                ),
                Ok(p) if p.created => eprintln!(
                    "Published {} {} ({}) — {} bytes",
                    p.name, p.version, p.arch, p.size
                ),
                Ok(p) => eprintln!(
                    "Already published: {} {} ({}), the same bytes",
                    p.name, p.version, p.arch
                ),
                Err(e) => {
                    failed += 1;
                    eprintln!("niso: {}: {}", path.display(), super::error_text(&e));
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

async fn publish_file(
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
        .prefix(&datadir::staging_prefix("publish"))
        .tempfile_in(&staging)?;
    std::fs::copy(path, staged.path())
        .with_context(|| format!("cannot read {}", path.display()))?;
    let info = archive::inspect_file(staged.path(), limits)?;
    Ok(publisher
        .publish(Upload {
            info,
            staged: StagedFile::Owned(staged.into_temp_path()),
            uploaded_at: unix_now(),
            signature: None,
        })
        .await?)
}
