//! `niso registry serve`: a complete registry on one port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::Outcome;
use crate::auth::{ApiKey, KeyStore, Scopes};
use crate::datadir::{self, DataDir};
use crate::ident::RepoName;
use crate::index::Signer;
use crate::limits::{LimitArgs, Limits};
use crate::publish::{unix_now, Options};
use crate::server::{self, App, Settings};

/// Environment variable that supplies the bootstrap admin key of a new
/// registry, for scripted set-ups (instead of printing a generated one).
pub const ADMIN_KEY_ENV: &str = "NISO_ADMIN_KEY";

/// Serve the write API and the static tree on one port.
///
/// On a new data directory it creates the repository and its signing key and
/// prints an admin API key once (or takes it from NISO_ADMIN_KEY). Uploads
/// (POST), deletes, tags and key management go through the API; every read
/// URL is a file of DATA_DIR/public, which any static host can serve too.
///
/// With --read-only it serves only the tree (a data directory, or any
/// directory holding one), for mirrors and air-gapped copies.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry serve --listen 0.0.0.0:5000 --data-dir /var/lib/niso-registry
  Admin key (shown once, store it securely): niso_k1_...
  $ curl -H 'Authorization: Bearer niso_k1_...' --data-binary @my-app-1.0.0-x86_64.niso \\
      http://localhost:5000/v1/packages/my-app/1.0.0/x86_64
  $ niso registry serve --read-only --listen 127.0.0.1:8080 --data-dir /mnt/usb/registry")]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// The registry's data directory (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// Repository name for a new data directory.
    #[arg(long, default_value = "niso")]
    name: RepoName,
    /// Serve the tree only: no uploads, deletes, tags or keys.
    #[arg(long)]
    read_only: bool,
    /// Largest upload accepted, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    max_upload: u64,
    /// Requests a minute allowed per API key (0: no limit).
    #[arg(long, default_value_t = 6000)]
    rate_limit_key: u32,
    /// Requests a minute allowed per client IP without a key (0: no limit).
    #[arg(long, default_value_t = 1200)]
    rate_limit_ip: u32,
    /// Behind a reverse proxy (nginx): rate-limit by the client address in
    /// X-Forwarded-For instead of the proxy's.
    #[arg(long)]
    trust_proxy: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

impl ServeArgs {
    pub fn run(self) -> anyhow::Result<Outcome> {
        let settings = Settings {
            max_upload: self.max_upload,
            rate_limit_key: self.rate_limit_key,
            rate_limit_ip: self.rate_limit_ip,
            read_only: self.read_only,
            trust_proxy: self.trust_proxy,
            ..Settings::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(self.serve(settings))
    }

    async fn serve(self, settings: Settings) -> anyhow::Result<Outcome> {
        let (app, _lock) = if self.read_only {
            let tree = if DataDir::is_data_dir(&self.data_dir) {
                self.data_dir.join(datadir::PUBLIC_DIR)
            } else {
                self.data_dir.clone()
            };
            if !tree.join("names").is_file() {
                bail!("{} holds no registry tree (no names index)", tree.display());
            }
            let name = DataDir::open(&self.data_dir)
                .map(|d| d.repository().clone())
                .unwrap_or(self.name.clone());
            let staging = std::env::temp_dir();
            (App::new(settings, tree, staging, name, None, None)?, None)
        } else {
            let dd = if DataDir::is_data_dir(&self.data_dir) {
                DataDir::open(&self.data_dir)?
            } else {
                let dd = DataDir::init(&self.data_dir, &self.name, None).with_context(|| {
                    format!("cannot create a registry in {}", self.data_dir.display())
                })?;
                eprintln!(
                    "Created repository {} in {}",
                    self.name,
                    self.data_dir.display()
                );
                dd
            };
            let lock = dd.lock()?;
            let keys = KeyStore::open(&dd.root().join("keys.sqlite"))?;
            if keys.is_empty()? {
                let preset = match std::env::var(ADMIN_KEY_ENV) {
                    Ok(k) => Some(
                        ApiKey::parse(&k)
                            .with_context(|| format!("{ADMIN_KEY_ENV} is not a niso API key"))?,
                    ),
                    Err(_) => None,
                };
                let from_env = preset.is_some();
                let new = keys.create("admin", &Scopes::parse(&["admin"])?, unix_now(), preset)?;
                if from_env {
                    eprintln!("Admin key {} created from {ADMIN_KEY_ENV}", new.record.id);
                } else {
                    println!(
                        "Admin key (shown once, store it securely): {}",
                        new.key.expose()
                    );
                }
            }
            let signer: Arc<dyn Signer> = Arc::new(dd.key()?);
            let app = App::new(
                settings,
                dd.public_dir(),
                dd.staging_dir(),
                dd.repository().clone(),
                Some(keys),
                Some((
                    dd.store(),
                    signer,
                    Options {
                        limits: self.limits.apply(Limits::default()),
                        ..Options::default()
                    },
                )),
            )?;
            (app, Some(lock))
        };
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!("Listening at http://{addr}");
        eprintln!("Listening at http://{addr}");
        server::run(listener, Arc::new(app), server::shutdown_signal()).await?;
        Ok(Outcome::Success)
    }
}
