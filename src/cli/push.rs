//! `niso push FILE`: upload an archive to a registry.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use clap::Args;

use super::output::{human_size, line, Ctx};
use super::Outcome;
use crate::client::api::ApiClient;
use crate::client::freshness::Allow;
use crate::client::session::Session;
use crate::client::signing;
use crate::client::upload::{self, Progress, Pushed, Pusher};
use crate::ident::RepoName;
use crate::limits::Limits;
use crate::publish::unix_now;

/// Files at least this large get a progress bar (on a terminal).
const PROGRESS_FROM: u64 = 1 << 20;

/// Upload a .niso archive or a Hex tarball.
///
/// Name, version and arch are read from the archive itself, after the same
/// checks the registry makes. Pushing bytes identical to a published
/// version succeeds and says so (safe to re-run in CI); other bytes for a
/// published version are refused (published versions never change). A lost
/// answer is retried safely. Needs an API key with a push: scope (`niso
/// login`, or NISO_KEY).
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso push my-api-1.0.0-x86_64.niso
  Uploaded my-api 1.0.0 (x86_64) — 8.2 MB
  $ niso push my-api-1.0.0-x86_64.niso --registry private
  $ niso push my-api-1.0.0-x86_64.niso          # again, in CI
  my-api 1.0.0 (x86_64) is already published with these exact bytes; nothing to do
  $ niso push phoenix-1.7.0.tar --sign publisher.pem
  $ NISO_REGISTRY=private NISO_KEY=niso_k1_… niso push dist/*.niso

With --json: {\"type\":\"pushed\",\"name\":…,\"version\":…,\"arch\":…,\"size\":…,\"sha256\":…,\"already_published\":false,\"retried\":false,\"signed\":false}")]
pub struct PushArgs {
    /// The archive: NAME-VERSION-ARCH.niso or a Hex tarball NAME-VERSION.tar.
    file: PathBuf,
    /// Sign the archive with this Ed25519 private key (PEM, PKCS#8, as
    /// `openssl genpkey -algorithm ed25519` makes); the registry checks it
    /// against the publisher key registered for your API key.
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
    /// Push into this organization repository (`repos/ORG/`).
    #[arg(long)]
    org: Option<RepoName>,
}

impl PushArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let registry = ctx.registry()?;
        if registry.key.is_none() {
            bail!(
                "pushing to {} needs an API key with a push: scope: run `niso login {} --key KEY`, or set NISO_KEY",
                registry.name,
                registry.url
            );
        }
        let signer = self
            .sign
            .as_deref()
            .map(signing::load_signing_key)
            .transpose()?;
        let prepared = upload::prepare(&self.file, &Limits::default())?;
        let session = Session::open(
            &registry,
            self.org.as_ref(),
            Allow { expired: true },
            unix_now(),
        )?;
        let api = ApiClient::new(&registry.url, registry.key.clone())?;
        let info = &prepared.info;
        let bar = (!ctx.json && info.size >= PROGRESS_FROM && std::io::stderr().is_terminal())
            .then(|| progress_bar(info.size, &prepared.what()));
        let progress: Option<Progress> = bar.clone().map(|b| {
            let p: Progress = Arc::new(move |sent| b.set_position(sent));
            p
        });
        let result = Pusher {
            session: &session,
            api: &api,
            org: self.org.as_ref(),
        }
        .push(&prepared, signer.as_ref(), progress);
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let pushed = result?;
        let already = pushed == Pushed::AlreadyPublished;
        if ctx.json {
            ctx.emit(
                "pushed",
                serde_json::json!({
                    "name": info.name.as_str(), "version": info.version.as_str(),
                    "arch": info.arch.as_str(), "size": info.size,
                    "sha256": hex::encode(info.sha256), "already_published": already,
                    "retried": pushed == Pushed::Uploaded { retried: true },
                    "signed": signer.is_some(),
                }),
            );
        } else if already {
            line(&format!(
                "{} is already published with these exact bytes; nothing to do",
                prepared.what()
            ));
        } else {
            line(&format!(
                "Uploaded {} — {}",
                prepared.what(),
                human_size(info.size)
            ));
        }
        Ok(Outcome::Success)
    }
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(format!("Uploading {what}"));
    bar
}
