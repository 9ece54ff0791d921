//! `niso registry serve`: the write API and the static tree on one port.
//!
//! * Reads (`GET`/`HEAD`) are files of the tree, served as a static host
//!   would, with ETags ([`files`]). `/v1/packages` and a package's
//!   `versions` also take seed 002's pagination parameters, and `/v1/search`
//!   searches the package list.
//! * Writes go through the [`committer`], which folds concurrent uploads
//!   into one index rewrite, and from there through the same publisher as
//!   `niso registry build`.
//! * Every request passes [`middleware`]: authentication (keys from the
//!   [`KeyStore`]), rate limiting, one log line; and, before routing, the
//!   [`door`], which refuses a bad path or rewrites it to its normal form.
//!
//! [`run`] takes a bound listener and a shutdown future, so tests bind port 0;
//! [`accept`] is its loop, which closes slow clients and caps connections.

pub mod accept;
pub mod committer;
pub mod door;
pub mod error;
pub mod files;
pub mod handlers;
pub mod middleware;
pub mod ratelimit;

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower::Layer;
use tower_http::cors::{Any, CorsLayer};
use tower_http::timeout::TimeoutLayer;

use crate::auth::KeyStore;
use crate::ident::RepoName;
use crate::index::Signer;
use crate::publish::{Layout, Options, PublishError, Publisher};
use crate::store::Store;
use committer::Committer;
use ratelimit::RateLimiter;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest upload accepted, in bytes.
    pub max_upload: u64,
    /// Requests a minute per API key (0: unlimited).
    pub rate_limit_key: u32,
    /// Requests a minute per client IP without a key (0: unlimited).
    pub rate_limit_ip: u32,
    /// Failed authentications a minute per client IP (0: unlimited). Once
    /// spent, every request from that IP that presents a key gets 429, even
    /// with a valid key, so keys cannot be guessed at speed.
    pub rate_limit_auth_failures: u32,
    /// Time allowed for a whole non-upload request.
    pub request_timeout: Duration,
    /// Longest pause between two chunks of an upload body.
    pub upload_idle_timeout: Duration,
    /// An upload must bring at least this many bytes a second, averaged
    /// over each `upload_rate_window` (0: no minimum).
    pub upload_min_rate: u64,
    /// The window over which `upload_min_rate` is measured.
    pub upload_rate_window: Duration,
    /// Time allowed to receive a whole upload body.
    pub upload_timeout: Duration,
    /// Time a client has to send a request head (also the keep-alive idle
    /// timeout).
    pub header_timeout: Duration,
    /// Time a write to a client may make no progress (the client stopped
    /// reading) before its connection is closed.
    pub send_timeout: Duration,
    /// Connections open at once (see [`accept::default_max_connections`]).
    pub max_connections: usize,
    /// Serve only the tree: no uploads, deletes, tags or key management.
    pub read_only: bool,
    /// Take the client address from `X-Forwarded-For` (behind nginx, every
    /// request comes from the proxy's address).
    pub trust_proxy: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_upload: 1 << 30,
            rate_limit_key: 6000,
            rate_limit_ip: 1200,
            rate_limit_auth_failures: 30,
            request_timeout: Duration::from_secs(30),
            upload_idle_timeout: Duration::from_secs(60),
            upload_min_rate: 4096,
            upload_rate_window: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(3600),
            header_timeout: Duration::from_secs(20),
            send_timeout: Duration::from_secs(60),
            max_connections: accept::default_max_connections(),
            read_only: false,
            trust_proxy: false,
        }
    }
}

/// Everything a request handler needs, built once.
pub struct App {
    pub settings: Settings,
    /// The tree: reads come from the store the publisher writes.
    pub store: Arc<dyn Store>,
    /// Where uploads are received before they are published.
    pub staging: PathBuf,
    pub repository: RepoName,
    /// API keys; `None` when read-only.
    pub keys: Option<KeyStore>,
    pub key_limiter: RateLimiter,
    pub ip_limiter: RateLimiter,
    /// Failed authentications, per client IP.
    pub auth_failure_limiter: RateLimiter,
    writer: Option<Writer>,
}

/// What the write side needs: the signer, and one committer per repository
/// (the root one and each organization's), made on first use.
struct Writer {
    signer: Arc<dyn Signer>,
    options: Options,
    committers: tokio::sync::Mutex<HashMap<Option<RepoName>, Arc<Committer>>>,
}

pub type AppState = Arc<App>;

/// What a writable server publishes with: the signing key and the publisher
/// options.
pub type WriteSide = (Arc<dyn Signer>, Options);

impl App {
    /// A server that reads (and, with `writer`, writes) the tree in
    /// `store`. Every repository
    /// already in the tree is opened and recovered (changes cut off by a
    /// crash are finished) before the server answers.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        staging: PathBuf,
        repository: RepoName,
        keys: Option<KeyStore>,
        writer: Option<WriteSide>,
    ) -> Result<Self, PublishError> {
        let writer = writer.map(|(signer, options)| Writer {
            signer,
            options,
            committers: tokio::sync::Mutex::new(HashMap::new()),
        });
        let app = Self {
            key_limiter: RateLimiter::new(settings.rate_limit_key),
            ip_limiter: RateLimiter::new(settings.rate_limit_ip),
            auth_failure_limiter: RateLimiter::new(settings.rate_limit_auth_failures),
            settings,
            store,
            staging,
            repository,
            keys,
            writer,
        };
        // Open every repository now, so a broken tree fails at start-up and
        // cut-off changes are finished before anyone reads.
        if app.writer.is_some() {
            app.committer(None).await?;
            let mut orgs = BTreeSet::new();
            for p in app.store.list(crate::index::layout::REPOS_DIR).await? {
                if let Some(org) = p.as_str().split('/').nth(1) {
                    orgs.insert(org.to_string());
                }
            }
            for org in orgs {
                if let Ok(org) = RepoName::new(&org) {
                    app.committer(Some(&org)).await?;
                }
            }
        }
        Ok(app)
    }

    /// The committer of the root repository (`org` = None) or of an
    /// organization's, opening its publisher on first use.
    pub async fn committer(&self, org: Option<&RepoName>) -> Result<Arc<Committer>, PublishError> {
        let w = self
            .writer
            .as_ref()
            .ok_or_else(|| PublishError::Invalid(error::READ_ONLY.into()))?;
        let mut map = w.committers.lock().await;
        if let Some(c) = map.get(&org.cloned()) {
            return Ok(c.clone());
        }
        let (repo, layout) = match org {
            Some(o) => (o.clone(), Layout::organization(o)),
            None => (self.repository.clone(), Layout::root()),
        };
        let publisher = Publisher::open(
            self.store.clone(),
            w.signer.clone(),
            repo,
            layout,
            w.options.clone(),
        )
        .await?;
        let report = publisher.recover().await?;
        if !report.adopted.is_empty() || !report.discarded.is_empty() || report.files_written > 0 {
            tracing::info!(
                repository = %publisher.repository(),
                adopted = report.adopted.len(),
                discarded = report.discarded.len(),
                written = report.files_written,
                removed = report.files_removed,
                "recovered the tree"
            );
        }
        if let Some(keys) = self.publisher_keys().await? {
            publisher.set_publisher_keys(keys).await?;
        }
        let c = Arc::new(Committer::start(Arc::new(publisher)));
        map.insert(org.cloned(), c.clone());
        Ok(c)
    }

    /// Every publisher key of the key store, as the tree lists them.
    async fn publisher_keys(
        &self,
    ) -> Result<Option<Vec<crate::index::pb::PublisherKey>>, PublishError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        // One small query: not worth a blocking thread.
        let records = keys
            .publisher_keys()
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        Ok(Some(records.iter().map(|r| r.to_index()).collect()))
    }

    /// Re-signs the freshness record of every open repository whose record
    /// expires within half its lifetime: a registry that takes no uploads
    /// for weeks must not let clients see an expired record.
    pub async fn refresh_expiring(&self) -> Result<(), PublishError> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        let margin = w.options.freshness_ttl / 2;
        let committers: Vec<Arc<Committer>> = w.committers.lock().await.values().cloned().collect();
        for c in committers {
            let p = c.publisher();
            if p.freshness_expires_within(margin).await? {
                tracing::info!(repository = %p.repository(), "re-signing the freshness record");
                p.refresh().await?;
            }
        }
        Ok(())
    }

    /// Publishes the key store's publisher keys in every repository open
    /// (after one is registered or retired).
    pub async fn republish_publisher_keys(&self) -> Result<(), PublishError> {
        let Some(keys) = self.publisher_keys().await? else {
            return Ok(());
        };
        let Some(w) = &self.writer else {
            return Ok(());
        };
        let committers: Vec<Arc<Committer>> = w.committers.lock().await.values().cloned().collect();
        for c in committers {
            c.publisher().set_publisher_keys(keys.clone()).await?;
        }
        Ok(())
    }
}

/// The route table.
pub fn router(state: AppState) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(Any)
        .allow_headers(Any);
    // Writes and key management, marked here once: a `--read-only` server
    // answers them 405 before authentication or a handler can say otherwise.
    // A route layer wraps only the methods added before it, so the GETs
    // added after (files of the tree) stay reads.
    let write = |allow: &'static str| {
        axum::middleware::from_fn_with_state(
            (state.clone(), allow),
            middleware::refuse_when_read_only,
        )
    };
    let reads = "GET, HEAD";
    let api = Router::new()
        .route("/health", get(handlers::health))
        .route("/v1/search", get(handlers::packages::search))
        .route("/repos/{org}/v1/search", get(handlers::packages::search))
        .route(
            "/v1/auth/keys",
            post(handlers::keys::create_key)
                .get(handlers::keys::list_keys)
                .route_layer(write("")),
        )
        .route(
            "/v1/auth/keys/{id}",
            axum::routing::delete(handlers::keys::revoke_key).route_layer(write("")),
        )
        .route(
            "/v1/auth/keys/{id}/publisher-key",
            post(handlers::keys::register_publisher_key).route_layer(write("")),
        )
        .route(
            "/v1/auth/publisher-keys",
            get(handlers::keys::list_publisher_keys).route_layer(write("")),
        )
        .route(
            "/v1/auth/publisher-key",
            post(handlers::keys::retired_publisher_key_route).route_layer(write("")),
        )
        .route("/v1/auth/check", get(handlers::check::check_pull))
        .route(
            "/v1/packages/{name}/tags",
            post(handlers::packages::set_tag)
                .route_layer(write(reads))
                .get(files::serve_tree),
        )
        .route(
            "/repos/{org}/v1/packages/{name}/tags",
            post(handlers::packages::set_tag)
                .route_layer(write(reads))
                .get(files::serve_tree),
        )
        .route(
            "/v1/packages/{name}/{version}/{arch}",
            axum::routing::delete(handlers::packages::delete_artifact).route_layer(write(reads)),
        )
        .route(
            "/repos/{org}/v1/packages/{name}/{version}/{arch}",
            axum::routing::delete(handlers::packages::delete_artifact).route_layer(write(reads)),
        )
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            state.settings.request_timeout,
        ));
    // Uploads stream with their own size limit and idle timeout. The GETs of
    // the same paths are the downloads, files of the tree.
    let uploads = Router::new()
        .route(
            "/v1/packages/{name}/{version}/{arch}",
            post(handlers::packages::upload)
                .route_layer(write(reads))
                .get(files::serve_tree),
        )
        .route(
            "/repos/{org}/v1/packages/{name}/{version}/{arch}",
            post(handlers::packages::upload)
                .route_layer(write(reads))
                .get(files::serve_tree),
        )
        .layer(DefaultBodyLimit::disable());
    let routes = Router::new()
        .merge(api)
        .merge(uploads)
        .fallback(get(files::serve_tree))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ))
        .with_state(state.clone());
    // The door runs before routing (a layer added with `Router::layer` runs
    // after it): the routes, their parameters and the handlers see only
    // the normal form of the path.
    let normalised = axum::middleware::from_fn(door::normalise_request).layer(routes);
    Router::new()
        .fallback_service(normalised)
        .layer(axum::middleware::from_fn(middleware::log_request))
        .layer(cors)
        .layer(axum::middleware::from_fn_with_state(
            state,
            files::fast_static,
        ))
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = accept::ConnLimits {
        header_timeout: state.settings.header_timeout,
        send_timeout: state.settings.send_timeout,
        max_connections: state.settings.max_connections,
    };
    accept::serve(listener, router(state), limits, shutdown).await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
