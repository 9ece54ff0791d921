//! `niso registry create-key | list-keys | revoke-key`: API keys, through
//! the chosen registry's API (an admin key), or offline on a data directory
//! with --data-dir (the operator's way back in when no admin key is left).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::output::{confirm, line, print_table, Ctx};
use super::Outcome;
use crate::auth::{KeyStore, Scopes};
use crate::client::api::{self, ApiClient, CreatedKey, KeyInfo, KeyList};
use crate::datadir::DataDir;
use crate::index::json::rfc3339;
use crate::publish::unix_now;

/// The key store of a data directory, for offline key management.
fn offline_store(data_dir: &Path) -> anyhow::Result<KeyStore> {
    // Opening a directory that is not one fails with how to make one.
    let dd = DataDir::open(data_dir)?;
    Ok(KeyStore::open(&dd.root().join("keys.sqlite"))?)
}

/// The chosen registry's API, with its admin key.
fn admin_api(ctx: &Ctx) -> anyhow::Result<ApiClient> {
    let registry = ctx.registry()?;
    if registry.key.is_none() {
        bail!(
            "managing keys needs an admin API key for {}: run `niso login {} --key KEY`, set NISO_KEY, or work offline on the registry's data directory with --data-dir",
            registry.name,
            registry.url
        );
    }
    Ok(ApiClient::new(&registry.url, registry.key.clone())?)
}

/// Create an API key.
///
/// The key is shown once: store it securely, it cannot be retrieved later.
/// Scopes: push:GLOB, pull:GLOB, delete:GLOB (a bare push, pull or delete
/// means GLOB *), admin. Through the registry's API this needs an admin key;
/// with --data-dir it works offline on the data directory (on the registry's
/// machine), e.g. to make a new admin key when none is left.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry create-key --scope \"push:my-*\" --name ci-deploy
  Created key: niso_k1_abc123...
  Store this key securely — it cannot be retrieved later.
  $ niso registry create-key --scope push:my-* --scope delete:my-* --name release
  $ sudo -u niso niso registry create-key --scope admin --name ops --data-dir /var/lib/niso-registry

With --json: {\"type\":\"key_created\",\"id\":\"key_…\",\"name\":\"ci-deploy\",\"scopes\":[\"push:my-*\"],\"key\":\"niso_k1_…\"}")]
pub struct CreateKeyArgs {
    /// A scope (repeat for several): push:GLOB, pull:GLOB, delete:GLOB, admin.
    #[arg(long = "scope", required = true, value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A name to recognise the key by in list-keys.
    #[arg(long)]
    name: String,
    /// Work offline on this registry data directory instead of the API.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl CreateKeyArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let created = match &self.data_dir {
            Some(dir) => {
                let scopes = Scopes::parse(&self.scopes)?;
                let new = offline_store(dir)?.create(&self.name, &scopes, unix_now(), None)?;
                CreatedKey {
                    id: new.record.id.clone(),
                    name: new.record.name.clone(),
                    scopes: new.record.scopes.to_strings(),
                    key: new.key.expose().to_string(),
                }
            }
            None => admin_api(ctx)?.call(&api::create_key(&self.name, &self.scopes))?,
        };
        if ctx.json {
            ctx.emit("key_created", serde_json::to_value(&created)?);
        } else {
            line(&format!("Created key: {}", created.key));
            eprintln!("Store this key securely — it cannot be retrieved later.");
        }
        Ok(Outcome::Success)
    }
}

/// List API keys (never the keys themselves).
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry list-keys
  ID          NAME       SCOPES     LAST USED
  key_abc123  ci-deploy  push:my-*  2026-04-12
  $ niso registry list-keys --data-dir /var/lib/niso-registry

With --json, one line per key: {\"type\":\"key\",\"id\":…,\"name\":…,\"scopes\":[…],\"created_at\":…,\"last_used\":…}")]
pub struct ListKeysArgs {
    /// Work offline on this registry data directory instead of the API.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl ListKeysArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let keys: Vec<KeyInfo> = match &self.data_dir {
            Some(dir) => offline_store(dir)?
                .list()?
                .into_iter()
                .map(|k| KeyInfo {
                    publisher_key_id: k.publisher_key_id(),
                    id: k.id,
                    name: k.name,
                    scopes: k.scopes.to_strings(),
                    created_at: rfc3339(k.created_at),
                    last_used: k.last_used.map(rfc3339),
                })
                .collect(),
            None => admin_api(ctx)?.call::<KeyList>(&api::list_keys())?.keys,
        };
        if ctx.json {
            for k in &keys {
                ctx.emit("key", serde_json::to_value(k)?);
            }
            return Ok(Outcome::Success);
        }
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                vec![
                    k.id.clone(),
                    k.name.clone(),
                    k.scopes.join(","),
                    // The day is what the manual shows; --json has the time.
                    k.last_used
                        .as_deref()
                        .map(|t| t.get(..10).unwrap_or(t).to_string())
                        .unwrap_or_else(|| "never".into()),
                ]
            })
            .collect();
        print_table(&["ID", "NAME", "SCOPES", "LAST USED"], &rows);
        Ok(Outcome::Success)
    }
}

/// Revoke an API key; it is refused from its next request on.
///
/// Asks for confirmation when run on a terminal; --yes skips the question
/// (scripts never get asked).
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry revoke-key key_abc123
  Revoked key key_abc123
  $ niso registry revoke-key key_abc123 --data-dir /var/lib/niso-registry --yes")]
pub struct RevokeKeyArgs {
    /// The key's id, from list-keys (key_…).
    id: String,
    /// Work offline on this registry data directory instead of the API.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

impl RevokeKeyArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let call = api::revoke_key(&self.id)?;
        if !self.yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            let ok = confirm(
                &format!("Revoke key {}? Clients using it will be refused.", self.id),
                "",
            )?;
            if !ok {
                bail!("not revoked");
            }
        }
        match &self.data_dir {
            Some(dir) => offline_store(dir)?
                .revoke(&self.id, unix_now())
                .with_context(|| {
                    format!("cannot revoke {}; see `niso registry list-keys`", self.id)
                })?,
            None => {
                admin_api(ctx)?.call::<serde_json::Value>(&call)?;
            }
        }
        if ctx.json {
            ctx.emit("key_revoked", serde_json::json!({ "id": self.id }));
        } else {
            line(&format!("Revoked key {}", self.id));
        }
        Ok(Outcome::Success)
    }
}
