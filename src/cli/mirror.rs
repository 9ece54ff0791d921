//! `niso registry mirror --from SRC --to DST`: copy a registry, verified,
//! into a directory or into another registry (see `client::mirror`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use super::output::{human_size, line, Ctx};
use super::Outcome;
use crate::client::api::ApiClient;
use crate::client::config::{normalize_url, Config, Registry};
use crate::client::freshness::Allow;
use crate::client::mirror::{self, DirTarget, Options, Progress, RegistryTarget, Source, Summary};
use crate::client::session::Session;
use crate::client::state::RegistryState;
use crate::client::{DirTransport, HttpTransport, StoreTransport, Transport};
use crate::datadir::{self, DataDir};
use crate::ident::RepoName;
use crate::index::layout::{self, Layout};
use crate::index::{PublicKey, Signer};
use crate::limits::Limits;
use crate::publish::unix_now;
use crate::store::Store;

/// Copy a registry, verified: into a directory, or into another registry.
///
/// SRC is a configured registry (its name or URL), any http(s) URL of a
/// registry tree, or a directory (a tree, or a registry's data directory).
/// DST is a configured registry, which receives every release through its
/// API and signs its own indexes (its API key needs a push: scope), or a
/// directory, which becomes a verbatim copy of the tree: the source's
/// signed indexes, so it verifies with the source's key and name, serves
/// Hex clients and `niso pull` as the source does, and can be carried
/// where no network reaches.
///
/// The copy is a consistent snapshot even while the source takes uploads:
/// it starts from the source's signed freshness record, fetches exactly
/// the files it names and checks each against it (reading the source again
/// when it moved on meanwhile), checks every archive's size, SHA-256 and
/// contents, and writes a directory in the order readers need: archives
/// before the indexes that name them, the freshness record last, files the
/// source no longer has removed after that. Only what is missing or changed
/// is fetched and written, so running it again is cheap, and a run that was
/// interrupted resumes where it stopped.
///
/// A source that is not a configured registry needs --public-key and
/// --name (a data directory's own key and name are used). Organization
/// repositories are mirrored with --org (read with the source registry's
/// stored API key, NISO_KEY for a plain URL); a directory source's are all
/// mirrored. Into a registry, NISO_KEY (else the stored key) is the API key.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  # Everything of niso.dev into your private registry (both configured):
  $ niso registry mirror --from niso.dev --to private
  Mirrored niso (generation 812) into private: 4,120 archives (37 uploaded, 4,083 already there), 210.4 MB; 2 tags set, in 41.2 s

  # A verbatim copy on a disk, for an air-gapped site:
  $ niso registry mirror --from https://registry.example.com --to /mnt/usb/registry \\
      --public-key acme.pem --name acme
  $ niso registry verify /mnt/usb/registry --public-key acme.pem --name acme

  # Keep a mirror up to date (cron): only what changed is fetched.
  $ niso registry mirror --from private --to /srv/mirror --org team

Exit status: 0 when everything was mirrored; 2 otherwise (into a registry,
what could not be mirrored is listed and the rest is done).

With --json, one line per repository, and one per problem:
  {\"type\":\"mirrored\",\"repository\":\"acme\",\"generation\":12,\"to\":\"/srv/mirror\",\"packages\":3,\"releases\":5,\"archives\":6,\"kept\":4,\"fetched\":2,\"bytes\":1234,\"files_written\":37,\"files_removed\":0,\"tags_set\":0,\"restarts\":0,\"index_fetches\":9,\"expired\":false,\"seconds\":0.8,\"problems\":[]}
  {\"type\":\"problem\",\"repository\":\"acme\",\"message\":\"…\"}")]
pub struct MirrorArgs {
    /// What to copy: a configured registry (name or URL), a registry's
    /// http(s) URL, or a directory (a tree, or a data directory).
    #[arg(long, value_name = "SRC")]
    from: String,
    /// Where to: a configured registry (name or URL), or a directory
    /// (created if missing; write ./NAME for a directory named like a
    /// registry).
    #[arg(long, value_name = "DST")]
    to: String,
    /// The source's repository key (PEM), for a source that is not a
    /// configured registry.
    #[arg(long, value_name = "PEM", requires = "name")]
    public_key: Option<PathBuf>,
    /// The source's repository name, with --public-key.
    #[arg(long, value_name = "REPO", requires = "public_key")]
    name: Option<RepoName>,
    /// Also mirror this organization repository (`repos/ORG/`); repeatable.
    #[arg(long = "org", value_name = "ORG")]
    orgs: Vec<RepoName>,
    /// Downloads (and uploads) at once.
    #[arg(long, value_name = "N", default_value_t = mirror::DEFAULT_JOBS as u64,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// Copy a source whose freshness record has expired (an old offline
    /// copy); the mirror is then as stale as it, and says so.
    #[arg(long)]
    allow_expired: bool,
    /// Into a registry: upload archives without the publisher signatures
    /// they carry at the source (when the destination cannot check them).
    #[arg(long)]
    strip_signatures: bool,
}

/// Where the source's files are read from.
enum From {
    /// A configured registry.
    Registry(Registry),
    /// A URL with the key and name given.
    Url {
        url: String,
        key: PublicKey,
        name: RepoName,
    },
    /// A directory, or a store (a data directory's bucket).
    Store {
        store: Arc<dyn Store>,
        key: PublicKey,
        name: RepoName,
    },
}

enum To {
    Registry(Registry),
    Dir(PathBuf),
}

impl MirrorArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let (config, config_path) = ctx.config()?;
        let from = self.source(&config, &config_path)?;
        let to = destination(&self.to, &config, &config_path)?;
        // A runtime for stores that are read asynchronously (a bucket); the
        // download threads wait on it.
        let rt = super::runtime()?;
        let mut orgs = self.orgs.clone();
        if let From::Store { store, .. } = &from {
            orgs.extend(rt.block_on(datadir::organizations(store.as_ref()))?);
        }
        orgs.sort();
        orgs.dedup();
        if let (From::Registry(s), To::Registry(d)) = (&from, &to) {
            if s.url == d.url {
                bail!("--from and --to are the same registry ({})", s.url);
            }
        }
        if let (From::Store { store, .. }, To::Dir(d)) = (&from, &to) {
            let same = store
                .local_root()
                .and_then(|r| r.canonicalize().ok())
                .is_some_and(|r| d.canonicalize().ok().as_ref() == Some(&r));
            if same {
                bail!("--from and --to are the same directory ({})", d.display());
            }
        }
        let options = Options {
            jobs: usize::try_from(self.jobs).unwrap_or(mirror::DEFAULT_JOBS),
            limits: Limits::default(),
            strip_signatures: self.strip_signatures,
        };
        let bar = Bar::new(!ctx.json && std::io::stderr().is_terminal());
        let mut failures = 0;
        for org in std::iter::once(None).chain(orgs.iter().map(Some)) {
            let started = Instant::now();
            let source = self.open_source(&from, org, rt.handle())?;
            let place = org.map(|o| format!("repos/{o}/")).unwrap_or_default();
            let summary = match &to {
                To::Dir(dir) => {
                    let target = DirTarget::new(dir, org);
                    mirror::mirror_to_dir(&source, &target, &options, &bar).with_context(|| {
                        format!(
                            "cannot mirror {place}{} into {}",
                            source.repository,
                            dir.display()
                        )
                    })?
                }
                To::Registry(registry) => {
                    if registry.key.is_none() {
                        bail!(
                            "mirroring into {} needs an API key with a push: scope: run `niso login {} --key KEY`, or set NISO_KEY",
                            registry.name,
                            registry.url
                        );
                    }
                    let session =
                        Session::open(registry, org, Allow { expired: true }, unix_now())?;
                    let api = ApiClient::new(&registry.url, registry.key.clone())?;
                    let target = RegistryTarget {
                        session: &session,
                        api: &api,
                        org,
                    };
                    mirror::mirror_to_registry(&source, &target, &options, &bar).with_context(
                        || {
                            format!(
                                "cannot mirror {place}{} into {}",
                                source.repository, registry.name
                            )
                        },
                    )?
                }
            };
            if let From::Registry(r) = &from {
                // The source's generation is now one this client has seen:
                // an older one later is a rollback.
                let state = RegistryState::open(&r.name, &r.public_key.fingerprint())?;
                state.record(&freshness_path(org), summary.generation)?;
            }
            failures += summary.problems.len();
            self.report(ctx, &summary, &to, &place, started.elapsed().as_secs_f64());
        }
        if failures > 0 {
            let what = if failures == 1 {
                "archive or tag was"
            } else {
                "archives or tags were"
            };
            bail!("{failures} {what} not mirrored (listed above); everything else was");
        }
        Ok(Outcome::Success)
    }

    fn source(&self, config: &Config, config_path: &Path) -> anyhow::Result<From> {
        let pinned = match (&self.public_key, &self.name) {
            (Some(k), Some(n)) => Some((PublicKey::from_file(k)?, n.clone())),
            _ => None,
        };
        let is_url = self.from.starts_with("http://") || self.from.starts_with("https://");
        // A URL with its key and name given is read with those, configured
        // or not.
        let explicit_url = is_url && pinned.is_some();
        if let Some(name) = config.find(&self.from).filter(|_| !explicit_url) {
            if pinned.is_some() {
                bail!(
                    "{} is a configured registry, whose key and name are pinned: drop --public-key and --name",
                    self.from
                );
            }
            return Ok(From::Registry(
                config.select(Some(name.as_str()), config_path)?,
            ));
        }
        if is_url {
            let url = normalize_url(&self.from)?;
            let Some((key, name)) = pinned else {
                bail!(
                    "{url} is not a configured registry: give its key and name (--public-key FILE --name REPO) to verify what is copied, or add it first with `niso registry add NAME {url}`"
                );
            };
            return Ok(From::Url { url, key, name });
        }
        let dir = PathBuf::from(&self.from);
        if DataDir::is_data_dir(&dir) {
            let dd = DataDir::open(&dir)?;
            // The data directory's own private key: a trust anchor the
            // user holds, unlike the tree's public_key file.
            let own = (dd.key()?.public_key().clone(), dd.repository().clone());
            let (key, name) = match pinned {
                Some(p) => p,
                None => own,
            };
            return Ok(From::Store {
                store: dd.store(None)?,
                key,
                name,
            });
        }
        if !dir.is_dir() {
            bail!(
                "{} is neither a configured registry ({}), an http(s) URL nor a directory",
                self.from,
                known(config)
            );
        }
        let Some((key, name)) = pinned else {
            bail!(
                "{} is a plain directory: give its repository key and name (--public-key FILE --name REPO) to verify what is copied",
                dir.display()
            );
        };
        Ok(From::Store {
            store: Arc::new(crate::store::LocalStore::new(&dir)),
            key,
            name,
        })
    }

    fn open_source(
        &self,
        from: &From,
        org: Option<&RepoName>,
        handle: &tokio::runtime::Handle,
    ) -> anyhow::Result<Source> {
        let now = unix_now();
        let allow = Allow {
            expired: self.allow_expired,
        };
        let prefix = org.map(Layout::organization).unwrap_or_else(Layout::root);
        let (transport, key, repository, seen): (
            Box<dyn Transport>,
            PublicKey,
            String,
            Option<u64>,
        ) = match from {
            From::Registry(r) => {
                let base = format!("{}/{}", r.url, prefix.prefix());
                // An organization's files need the key; the public ones
                // go without it (a CDN in front has no business seeing it).
                // The stored key, not NISO_KEY: that one is for the
                // destination.
                let api_key = org.and(stored_key(r));
                let t = HttpTransport::with_key(base.trim_end_matches('/'), api_key.as_deref())?;
                let state = RegistryState::open(&r.name, &r.public_key.fingerprint())?;
                let seen = state.seen(&freshness_path(org))?;
                let repo = org.map_or_else(|| r.repository.to_string(), |o| o.to_string());
                (Box::new(t), r.public_key.clone(), repo, seen)
            }
            From::Url { url, key, name } => {
                let base = format!("{url}/{}", prefix.prefix());
                let api_key = org.and(std::env::var(crate::client::config::KEY_ENV).ok());
                let t = HttpTransport::with_key(base.trim_end_matches('/'), api_key.as_deref())?;
                let repo = org.map_or_else(|| name.to_string(), |o| o.to_string());
                (Box::new(t), key.clone(), repo, None)
            }
            From::Store {
                store, key, name, ..
            } => {
                let t: Box<dyn Transport> = match store.local_root() {
                    Some(root) => Box::new(DirTransport::new(root.join(prefix.prefix()))),
                    None => Box::new(StoreTransport::new(
                        store.clone(),
                        prefix.prefix(),
                        handle.clone(),
                    )),
                };
                let repo = org.map_or_else(|| name.to_string(), |o| o.to_string());
                (t, key.clone(), repo, None)
            }
        };
        Ok(Source {
            transport,
            key,
            repository,
            seen,
            allow,
            now,
        })
    }

    fn report(&self, ctx: &Ctx, s: &Summary, to: &To, place: &str, seconds: f64) {
        let dest = match to {
            To::Dir(d) => d.display().to_string(),
            To::Registry(r) => r.name.to_string(),
        };
        for p in &s.problems {
            if ctx.json {
                ctx.emit(
                    "problem",
                    serde_json::json!({ "repository": s.repository, "message": p }),
                );
            } else {
                eprintln!("niso: {place}{p}");
            }
        }
        if s.expired {
            eprintln!(
                "niso: WARNING: the freshness record of {place}{} has expired; it was copied anyway because of --allow-expired, and the copy is as stale as its source",
                s.repository
            );
        }
        if ctx.json {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert("to".into(), dest.into());
                m.insert("prefix".into(), place.trim_end_matches('/').into());
                m.insert(
                    "seconds".into(),
                    serde_json::json!((seconds * 1000.0).round() / 1000.0),
                );
            }
            ctx.emit("mirrored", v);
            return;
        }
        let who = if place.is_empty() {
            s.repository.clone()
        } else {
            format!("organization {}", s.repository)
        };
        let mut text = match to {
            To::Dir(_) => format!(
                "Mirrored {who} (generation {}) to {dest}: {} packages, {} releases, {} archives ({} fetched, {} already there), {}; {} files written, {} removed",
                s.generation,
                s.packages,
                s.releases,
                s.archives,
                s.fetched,
                s.kept,
                human_size(s.bytes),
                s.files_written,
                s.files_removed
            ),
            To::Registry(_) => format!(
                "Mirrored {who} (generation {}) into {dest}: {} archives ({} uploaded, {} already there), {}; {} tags set",
                s.generation,
                s.archives,
                s.fetched,
                s.kept,
                human_size(s.bytes),
                s.tags_set
            ),
        };
        if s.restarts > 0 {
            text.push_str(&format!(
                "; read again {} times as the source changed",
                s.restarts
            ));
        }
        text.push_str(&format!(", in {seconds:.1} s"));
        line(&text);
    }
}

fn freshness_path(org: Option<&RepoName>) -> String {
    org.map(Layout::organization)
        .unwrap_or_else(Layout::root)
        .dir(layout::FRESHNESS)
}

/// The API key stored for a registry (its config entry), ignoring NISO_KEY.
fn stored_key(r: &Registry) -> Option<String> {
    let path = crate::client::config::config_path().ok()?;
    let config = Config::load(&path).ok()?;
    config.registries.get(&r.name).and_then(|e| e.key.clone())
}

fn known(config: &Config) -> String {
    if config.registries.is_empty() {
        "none is configured".into()
    } else {
        let names: Vec<&str> = config.registries.keys().map(|n| n.as_str()).collect();
        format!("configured: {}", names.join(", "))
    }
}

/// `--to`: a configured registry (name or URL), else a directory. A bare
/// word that names neither is refused rather than made a directory, so a
/// misspelt registry name does not fill a new directory.
fn destination(to: &str, config: &Config, config_path: &Path) -> anyhow::Result<To> {
    if let Some(name) = config.find(to) {
        return Ok(To::Registry(
            config.select(Some(name.as_str()), config_path)?,
        ));
    }
    if to.starts_with("http://") || to.starts_with("https://") {
        bail!(
            "{to} is not a configured registry: add it first with `niso registry add NAME {to} --key KEY` (the mirror uploads with its API key and reads back what it has with its pinned key)"
        );
    }
    let path = PathBuf::from(to);
    if to.contains('/') || path.exists() {
        return Ok(To::Dir(path));
    }
    bail!(
        "{to} is not a configured registry ({}); to mirror into a directory of that name, write ./{to}",
        known(config)
    )
}

/// The progress bar: bytes of archives checked or fetched, on a terminal.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    fn new(show: bool) -> Self {
        let bar = show.then(|| {
            // Drawn from the first `fetching`, once there is something to show.
            let b = indicatif::ProgressBar::hidden();
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            b.set_style(style);
            b
        });
        Self { bar }
    }
}

impl Progress for Bar {
    fn fetching(&self, repository: &str, count: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.reset();
            b.set_length(bytes);
            b.set_message(format!("Mirroring {repository}: {count} archives"));
            if b.is_hidden() {
                b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
        }
    }

    fn fetched(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn finishing(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
