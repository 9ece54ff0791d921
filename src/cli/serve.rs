//! `niso registry serve`: a complete registry on one port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use super::Outcome;
use crate::auth::{ApiKey, KeyStore, Scopes};
use crate::datadir::DataDir;
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
///
/// Slow clients are closed: a request head must arrive within
/// --header-timeout (also the keep-alive idle timeout), an upload must keep
/// --upload-min-rate and finish within --upload-timeout, other requests
/// within --request-timeout, and a client that stops reading its answer is
/// closed after --send-timeout. At most --max-connections are open at once;
/// when all are, the one idle longest is closed for a new one.
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
    /// Failed authentications a minute allowed per client IP (0: no limit);
    /// beyond it, every request from that IP that sends a key gets 429.
    #[arg(long, default_value_t = 30)]
    rate_limit_auth_failures: u32,
    /// Seconds a client has to send a request's headers; also how long an
    /// idle keep-alive connection stays open.
    #[arg(long, value_name = "SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout: u64,
    /// Seconds a client may leave its answer unread (a download stalled)
    /// before its connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    send_timeout: u64,
    /// Seconds allowed for a whole request other than an upload.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
    /// Slowest upload accepted, in bytes a second, averaged over each
    /// --upload-rate-window (0: no minimum). A slower one gets 408.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    upload_min_rate: u64,
    /// Seconds over which --upload-min-rate is averaged.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    upload_rate_window: u64,
    /// Seconds allowed to receive a whole upload.
    #[arg(long, value_name = "SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    upload_timeout: u64,
    /// Connections open at once [default: half the open-file limit left
    /// after a reserve for the server's own files; 448 for 1024 files].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// The store holding the tree, instead of the data directory's
    /// configured one (s3://BUCKET/PREFIX or a directory).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl ServeArgs {
    pub fn run(self) -> anyhow::Result<Outcome> {
        let settings = Settings {
            max_upload: self.max_upload,
            rate_limit_key: self.rate_limit_key,
            rate_limit_ip: self.rate_limit_ip,
            rate_limit_auth_failures: self.rate_limit_auth_failures,
            read_only: self.read_only,
            trust_proxy: self.trust_proxy,
            header_timeout: Duration::from_secs(self.header_timeout),
            send_timeout: Duration::from_secs(self.send_timeout),
            request_timeout: Duration::from_secs(self.request_timeout),
            upload_min_rate: self.upload_min_rate,
            upload_rate_window: Duration::from_secs(self.upload_rate_window),
            upload_timeout: Duration::from_secs(self.upload_timeout),
            max_connections: match self.max_connections {
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
                None => server::accept::default_max_connections(),
            },
            ..Settings::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(self.serve(settings))
    }

    async fn serve(self, settings: Settings) -> anyhow::Result<Outcome> {
        let app = if self.read_only {
            // A data directory (its configured store), a store URL, or a
            // plain directory holding a tree (a mirror, an air-gapped copy).
            let (store, name): (Arc<dyn crate::store::Store>, RepoName) =
                if DataDir::is_data_dir(&self.data_dir) {
                    let dd = DataDir::open(&self.data_dir)?;
                    (dd.store(self.store.as_deref())?, dd.repository().clone())
                } else if let Some(url) = &self.store {
                    (crate::store::open(url)?, self.name.clone())
                } else {
                    let tree = crate::store::LocalStore::new(self.data_dir.clone());
                    (Arc::new(tree), self.name.clone())
                };
            let names = crate::store::TreePath::new(crate::index::layout::NAMES)?;
            if store.head(&names).await?.is_none() {
                bail!(
                    "{} holds no registry tree (no names index)",
                    store.describe()
                );
            }
            let staging = std::env::temp_dir();
            App::new(settings, store, staging, name, None, None).await?
        } else {
            // Checked before anything is written: a bad key must not leave a
            // half-made registry behind.
            let preset = admin_key_from_env()?;
            let dd = if DataDir::is_data_dir(&self.data_dir) {
                DataDir::open(&self.data_dir)?
            } else {
                let dd = DataDir::init(&self.data_dir, &self.name, None, self.store.as_deref())
                    .await
                    .with_context(|| {
                        format!("cannot create a registry in {}", self.data_dir.display())
                    })?;
                eprintln!(
                    "Created repository {} in {}",
                    self.name,
                    self.data_dir.display()
                );
                dd
            };
            let cleaned = dd.clean_staging()?;
            if cleaned > 0 {
                tracing::info!(cleaned, "removed uploads a stopped server left in staging");
            }
            let keys = dd.key_store()?;
            if keys.is_empty()? {
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
            } else if let Some(preset) = preset {
                warn_unused_admin_key(&keys, &preset, &self.data_dir)?;
            }
            let signer: Arc<dyn Signer> = Arc::new(dd.key()?);
            App::new(
                settings,
                dd.store(self.store.as_deref())?,
                dd.staging_dir(),
                dd.repository().clone(),
                Some(keys),
                Some((
                    signer,
                    Options {
                        limits: self.limits.apply(Limits::default()),
                        ..Options::default()
                    },
                )),
            )
            .await?
        };
        let app = Arc::new(app);
        if !self.read_only {
            // At start, then hourly: never let the record expire.
            let app = app.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
                loop {
                    every.tick().await;
                    if let Err(e) = app.refresh_expiring().await {
                        tracing::error!(error = %e, "re-signing the freshness record failed");
                    }
                }
            });
        }
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!("Listening at http://{addr}");
        eprintln!("Listening at http://{addr}");
        server::run(listener, app, server::shutdown_signal()).await?;
        Ok(Outcome::Success)
    }
}

/// The bootstrap admin key from `NISO_ADMIN_KEY`, if set; an error if it is
/// set to something that is not a key.
fn admin_key_from_env() -> anyhow::Result<Option<ApiKey>> {
    match std::env::var(ADMIN_KEY_ENV) {
        Ok(k) => Ok(Some(ApiKey::parse(&k).with_context(|| {
            format!("{ADMIN_KEY_ENV} is refused, nothing was changed")
        })?)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{ADMIN_KEY_ENV} is refused, nothing was changed: it is not UTF-8, so not a niso API key")
        }
    }
}

/// `NISO_ADMIN_KEY` only makes the first key of a registry. On one that has
/// keys, say so unless it is a live admin key already (a restart with the
/// same environment), rather than let the operator believe it works.
fn warn_unused_admin_key(
    keys: &KeyStore,
    preset: &ApiKey,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    match keys.find(preset)? {
        Some(k) if k.scopes.is_admin() => {}
        Some(k) => eprintln!(
            "niso: warning: {ADMIN_KEY_ENV} is the key {} ({}), which is not an admin key; it was left as it is",
            k.id, k.name
        ),
        None => eprintln!(
            "niso: warning: {ADMIN_KEY_ENV} is ignored: {} already has API keys and this is not one of them \
             (it was revoked, or set after the first start). To add an admin key: \
             niso registry create-key --data-dir {} --scope admin --name NAME",
            data_dir.display(),
            data_dir.display()
        ),
    }
    Ok(())
}
