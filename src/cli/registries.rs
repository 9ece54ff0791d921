//! `niso registry add | list | remove` and `niso login`: the registries a
//! user talks to, each with its repository key pinned when it is added.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use prost::Message;

use super::output::{confirm, print_table, Ctx};
use super::Outcome;
use crate::auth::ApiKey;
use crate::client::config::{self, Config, RegistryEntry, RegistryName};
use crate::client::freshness::{self, Allow};
use crate::client::state::RegistryState;
use crate::client::{HttpTransport, Transport, TransportError};
use crate::ident::RepoName;
use crate::index::codec::verified_payload;
use crate::index::layout;
use crate::index::{pb, PublicKey};
use crate::limits::Limits;
use crate::publish::unix_now;

/// Add a registry, pinning its repository key.
///
/// The key every index must be signed with is pinned now: read from
/// --public-key FILE (best: a copy you got from the registry's operator), or
/// fetched from URL/public_key and shown with its SHA-256 fingerprint for you
/// to confirm (--yes accepts it without asking, for scripts: compare the
/// fingerprint out of band first). The registry's signed freshness record is
/// then read and checked with that key; the repository name it carries is
/// pinned too. The first registry added becomes the default.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry add private https://registry.example.com --key niso_k1_abc123 --default
  Registry key sha256:3f1c…9a0b (fetched from https://registry.example.com/public_key)
  Trust this key for private? [y/N] y
  Added registry private (https://registry.example.com, repository acme)

  $ niso registry add private https://registry.example.com --public-key acme.pub
  $ niso registry add ci \"$REGISTRY_URL\" --yes    # in CI, after checking the fingerprint")]
pub struct AddArgs {
    /// A local name for the registry (letters, digits, '.', '_', '-').
    name: RegistryName,
    /// The registry's base URL (http or https).
    url: String,
    /// An API key to send to this registry (niso_k1_…). Stored in the config
    /// file, readable by you alone.
    #[arg(long)]
    key: Option<String>,
    /// The repository's public key (PEM) to pin, instead of fetching it.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// The repository name the indexes must carry (default: the one the
    /// registry's signed freshness record names).
    #[arg(long)]
    repository: Option<RepoName>,
    /// Make this the default registry.
    #[arg(long)]
    default: bool,
    /// Trust the fetched key without asking (check its fingerprint first).
    #[arg(long, short = 'y')]
    yes: bool,
}

/// What adding a registry pinned.
struct Pinned {
    key: PublicKey,
    repository: RepoName,
    generation: u64,
}

/// Pins the key (given or fetched and confirmed) and checks the tree with
/// it: the freshness record must verify, and name the repository.
fn pin(
    name: &RegistryName,
    url: &str,
    public_key: Option<&PathBuf>,
    repository: Option<&RepoName>,
    yes: bool,
) -> anyhow::Result<Pinned> {
    let limits = Limits::default();
    let transport = HttpTransport::new(url)?;
    let key = match public_key {
        Some(file) => PublicKey::from_file(file)?,
        None => {
            let pem = match transport.fetch(layout::PUBLIC_KEY, 1 << 20) {
                Ok(b) => b,
                Err(TransportError::NotFound { location }) => bail!(
                    "{location}: not found: is {url} a niso registry? If it publishes its key elsewhere, pass it with --public-key FILE"
                ),
                Err(e) => return Err(e.into()),
            };
            let key = PublicKey::from_pem(&pem, &transport.location(layout::PUBLIC_KEY))?;
            eprintln!(
                "Registry key sha256:{} (fetched from {})",
                key.fingerprint(),
                transport.location(layout::PUBLIC_KEY)
            );
            let trusted = yes
                || confirm(
                    &format!("Trust this key for {name}?"),
                    "cannot ask to confirm the registry's key without a terminal: compare the fingerprint above with the one its operator gives, then run again with --yes (or pin the key with --public-key FILE)",
                )?;
            if !trusted {
                bail!("the key was not trusted; nothing was added");
            }
            key
        }
    };
    let bytes = match transport.fetch(layout::FRESHNESS, limits.max_index) {
        Ok(b) => b,
        Err(TransportError::NotFound { location }) => {
            bail!("{location}: not found: {url} is not the root of a niso registry; check the URL")
        }
        Err(e) => return Err(e.into()),
    };
    // The repository name is learnt from the record once its signature
    // verifies with the pinned key (so the key's holder chose it).
    let payload = verified_payload(&bytes, &key, limits.max_index).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}: the registry's indexes are not signed by the key sha256:{}; check the key with the registry's operator",
            transport.location(layout::FRESHNESS),
            key.fingerprint()
        )
    })?;
    let record = pb::Freshness::decode(payload.as_slice()).with_context(|| {
        format!(
            "{}: not a freshness record",
            transport.location(layout::FRESHNESS)
        )
    })?;
    let found = RepoName::new(&record.repository).with_context(|| {
        format!(
            "{}: bad repository name",
            transport.location(layout::FRESHNESS)
        )
    })?;
    if let Some(want) = repository {
        if *want != found {
            bail!(
                "{url} serves repository {found}, not {want}: check the URL, or drop --repository"
            );
        }
    }
    let fresh = freshness::check_record(
        &bytes,
        &key,
        found.as_str(),
        unix_now(),
        None,
        Allow { expired: true },
        limits.max_index,
    )?;
    if fresh.expired {
        eprintln!(
            "niso: warning: the registry's freshness record has expired: pulls will be refused until its operator re-signs it (`niso registry build`)"
        );
    }
    Ok(Pinned {
        key,
        repository: found,
        generation: fresh.generation,
    })
}

fn parse_key(key: Option<String>) -> anyhow::Result<Option<String>> {
    key.map(|k| ApiKey::parse(k.trim()).map(|k| k.expose().to_string()))
        .transpose()
        .context("--key")
}

/// Adds (or replaces) `name` in the config, pinned, and remembers the
/// generation it was added at.
fn add(
    ctx: &Ctx,
    name: &RegistryName,
    url: &str,
    pinned: Pinned,
    key: Option<String>,
    make_default: bool,
) -> anyhow::Result<()> {
    let (mut config, path) = ctx.config()?;
    let replaced = config.registries.insert(
        name.clone(),
        RegistryEntry {
            url: url.to_string(),
            repository: pinned.repository.to_string(),
            public_key: pinned.key.to_pem(),
            key,
        },
    );
    if make_default || config.default.is_none() {
        config.default = Some(name.clone());
    }
    config.save(&path)?;
    let state = RegistryState::open(name, &pinned.key.fingerprint())?;
    state.record(layout::FRESHNESS, pinned.generation)?;
    let is_default = config.default.as_ref() == Some(name);
    if ctx.json {
        ctx.emit(
            "registry_added",
            serde_json::json!({
                "name": name.as_str(), "url": url, "repository": pinned.repository.as_str(),
                "key_fingerprint": pinned.key.fingerprint(), "default": is_default,
                "replaced": replaced.is_some(),
            }),
        );
    } else {
        eprintln!(
            "{} registry {name} ({url}, repository {}){}",
            if replaced.is_some() {
                "Updated"
            } else {
                "Added"
            },
            pinned.repository,
            if is_default { ", the default" } else { "" }
        );
    }
    Ok(())
}

impl AddArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let url = config::normalize_url(&self.url)?;
        let key = parse_key(self.key)?;
        let pinned = pin(
            &self.name,
            &url,
            self.public_key.as_ref(),
            self.repository.as_ref(),
            self.yes,
        )?;
        add(ctx, &self.name, &url, pinned, key, self.default)?;
        Ok(Outcome::Success)
    }
}

/// List the configured registries.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso registry list
  NAME      URL                           DEFAULT
  niso.dev  https://registry.niso.dev     no
  private   https://registry.example.com  yes

With --json, one line per registry:
  {\"type\":\"registry\",\"name\":\"private\",\"url\":\"https://registry.example.com\",\"repository\":\"acme\",\"default\":true,\"key_fingerprint\":\"…\",\"api_key\":true}")]
pub struct ListArgs {}

impl ListArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let (config, path) = ctx.config()?;
        if config.registries.is_empty() && !ctx.json {
            eprintln!("No registries configured; add one with `niso registry add NAME URL`");
            return Ok(Outcome::Success);
        }
        let mut rows = Vec::new();
        for (name, e) in &config.registries {
            let is_default = config.default.as_ref() == Some(name);
            if ctx.json {
                let fingerprint = PublicKey::from_pem(e.public_key.as_bytes(), "pinned key")
                    .map(|k| k.fingerprint())
                    .with_context(|| format!("{}: registry {name}", path.display()))?;
                ctx.emit(
                    "registry",
                    serde_json::json!({
                        "name": name.as_str(), "url": e.url, "repository": e.repository,
                        "default": is_default, "key_fingerprint": fingerprint,
                        "api_key": e.key.is_some(),
                    }),
                );
            } else {
                rows.push(vec![
                    name.to_string(),
                    e.url.clone(),
                    if is_default { "yes" } else { "no" }.to_string(),
                ]);
            }
        }
        if !ctx.json {
            print_table(&["NAME", "URL", "DEFAULT"], &rows);
        }
        Ok(Outcome::Success)
    }
}

/// Remove a configured registry (and forget what was seen of it).
///
/// Packages already pulled from it stay in the package store.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso registry remove private
  Removed registry private")]
pub struct RemoveArgs {
    name: RegistryName,
}

impl RemoveArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let (mut config, path) = ctx.config()?;
        let Some(entry) = config.registries.remove(&self.name) else {
            bail!(
                "no registry {} is configured; see `niso registry list`",
                self.name
            );
        };
        if config.default.as_ref() == Some(&self.name) {
            config.default = None;
        }
        config.save(&path)?;
        if let Ok(k) = PublicKey::from_pem(entry.public_key.as_bytes(), "pinned key") {
            RegistryState::open(&self.name, &k.fingerprint())?.forget()?;
        }
        if ctx.json {
            ctx.emit(
                "registry_removed",
                serde_json::json!({ "name": self.name.as_str() }),
            );
        } else {
            eprintln!("Removed registry {}", self.name);
        }
        Ok(Outcome::Success)
    }
}

/// Store an API key for the registry at URL (adding the registry if needed).
///
/// If no configured registry has this URL, it is added first, under a name
/// made from the URL's host, pinning its key as `registry add` does (the
/// fingerprint is shown for you to confirm; --yes or --public-key for
/// scripts). The key is kept in the config file, readable by you alone, and
/// never printed. NISO_KEY supplies the key when --key is not given.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso login https://registry.example.com --key niso_k1_abc123
  Logged in to registry.example.com (https://registry.example.com)
  $ NISO_KEY=niso_k1_abc123 niso login https://registry.example.com --yes")]
pub struct LoginArgs {
    /// The registry's base URL (or the name of a configured registry).
    url: String,
    /// The API key (niso_k1_…).
    #[arg(long, env = config::KEY_ENV, hide_env_values = true)]
    key: String,
    /// When the registry is new: its public key (PEM) to pin.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// When the registry is new: trust its fetched key without asking.
    #[arg(long, short = 'y')]
    yes: bool,
}

/// A name for a registry known only by its URL: its host (and port).
fn name_for(url: &str, config: &Config) -> anyhow::Result<RegistryName> {
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default()
        .replace(':', "-");
    let base = RegistryName::new(&host).with_context(|| {
        format!("cannot name the registry at {url}; add it with `niso registry add NAME {url}`")
    })?;
    if !config.registries.contains_key(&base) {
        return Ok(base);
    }
    (2..100)
        .map(|i| RegistryName::new(&format!("{host}-{i}")))
        .find_map(|n| n.ok().filter(|n| !config.registries.contains_key(n)))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot name the registry at {url}; add it with `niso registry add NAME {url}`"
            )
        })
}

impl LoginArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let key = parse_key(Some(self.key))?;
        let (mut config, path) = ctx.config()?;
        let name = match config.find(&self.url) {
            Some(name) => {
                if let Some(e) = config.registries.get_mut(&name) {
                    e.key = key;
                }
                config.save(&path)?;
                name
            }
            None => {
                let url = config::normalize_url(&self.url)?;
                let name = name_for(&url, &config)?;
                let pinned = pin(&name, &url, self.public_key.as_ref(), None, self.yes)?;
                add(ctx, &name, &url, pinned, key, false)?;
                name
            }
        };
        let (config, _) = ctx.config()?;
        let url = config
            .registries
            .get(&name)
            .map(|e| e.url.clone())
            .unwrap_or_default();
        if ctx.json {
            ctx.emit(
                "logged_in",
                serde_json::json!({ "registry": name.as_str(), "url": url }),
            );
        } else {
            eprintln!("Logged in to {name} ({url})");
        }
        Ok(Outcome::Success)
    }
}
