//! `niso registry gc --keep-versions N [--dry-run]`: remove old versions,
//! on a data directory (one publisher change per repository) or through a
//! registry's API (one `DELETE` per artifact). What is kept is decided by
//! [`crate::client::gc::plan`], from the verified indexes.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::output::{confirm, line, Ctx};
use super::Outcome;
use crate::client::api::{ApiClient, ApiError};
use crate::client::freshness::{Allow, Fresh};
use crate::client::gc::{self, Deleted, PackagePlan, Removal};
use crate::client::session::Session;
use crate::datadir::{self, DataDir};
use crate::ident::{Arch, PackageName, RepoName, Version};
use crate::publish::{unix_now, Layout, Options, PublishError, Publisher};

/// Remove old versions: keep the N newest of every package and every tagged one.
///
/// Keeps, per package: the N newest versions by semver (pre-releases count
/// as versions; a version's artifacts of every arch stay or go together),
/// every version a tag points at, and the version `latest` names (the
/// newest stable release, which `niso pull NAME` takes). Removes every other
/// artifact through the registry's delete: each leaves a tombstone, so a
/// removed version can never be published again with other bytes (the same
/// bytes restore it). N must be at least 1.
///
/// With --data-dir, works on the registry's data directory (root repository
/// and every organization's, or only those named with --org), as one change
/// per repository; safe beside a running `registry serve`. Otherwise,
/// through the chosen registry's API: reads the signed indexes (verified as
/// `pull` does) and sends one DELETE per artifact, which needs an API key
/// with a delete: scope for the packages (delete:*); without --org, the
/// root repository only.
///
/// Prints each artifact it removes (or with --dry-run, would remove) on
/// stdout, and a summary on stderr. Asks for confirmation when run on a
/// terminal; --yes skips the question (scripts are never asked).
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso registry gc --keep-versions 5 --dry-run
  Would remove my-app 1.0.0 (aarch64)
  Would remove my-app 1.0.0 (x86_64)
  Would remove 2 artifacts of 1 package; would keep 5 versions (dry run: nothing was changed)
  $ niso registry gc --keep-versions 5
  $ niso registry gc --keep-versions 3 --org team
  $ sudo -u niso niso registry gc --keep-versions 5 --data-dir /var/lib/niso-registry --yes

With --json, one line per version kept, per artifact removed, and a summary:
  {\"type\":\"keep\",\"org\":null,\"name\":\"my-app\",\"version\":\"1.1.0\",\"reasons\":[\"newest\",\"latest\",\"tag:stable\"]}
  {\"type\":\"remove\",\"org\":null,\"name\":\"my-app\",\"version\":\"1.0.0\",\"arch\":\"x86_64\",\"dry_run\":false}
  {\"type\":\"summary\",\"removed\":2,\"packages\":1,\"kept_versions\":5,\"dry_run\":false}")]
pub struct GcArgs {
    /// Keep this many newest versions of every package (at least 1).
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_versions: usize,
    /// Say what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Work on this registry data directory instead of through the API.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The store holding the tree, instead of the data directory's
    /// configured one (s3://BUCKET/PREFIX or a directory).
    #[arg(long, value_name = "URL", requires = "data_dir")]
    store: Option<String>,
    /// Collect this organization's repository (`repos/ORG/`; repeat for
    /// several) instead of the default ones.
    #[arg(long = "org", value_name = "ORG")]
    orgs: Vec<RepoName>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

/// 0 is refused: it would remove every untagged version, the newest too,
/// which is deleting packages, not collecting garbage.
fn parse_keep(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1: 0 would remove every untagged version of every package, the newest too (to remove one version, DELETE it through the API)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a number of versions")),
    }
}

/// The plan of one repository.
struct RepoPlan {
    org: Option<RepoName>,
    packages: Vec<PackagePlan>,
}

impl RepoPlan {
    fn removals(&self) -> usize {
        self.packages.iter().map(|p| p.remove.len()).sum()
    }
}

/// `team/tool` or `tool`.
fn display_name(org: Option<&RepoName>, name: &str) -> String {
    match org {
        Some(o) => format!("{o}/{name}"),
        None => name.to_string(),
    }
}

fn what(org: Option<&RepoName>, name: &str, r: &Removal) -> String {
    format!("{} {} ({})", display_name(org, name), r.version, r.arch)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// What is printed, and counted for the summary.
struct Report<'a> {
    ctx: &'a Ctx,
    dry_run: bool,
    removed: usize,
    packages: BTreeSet<String>,
    kept: usize,
}

impl<'a> Report<'a> {
    fn new(ctx: &'a Ctx, dry_run: bool) -> Self {
        Self {
            ctx,
            dry_run,
            removed: 0,
            packages: BTreeSet::new(),
            kept: 0,
        }
    }

    fn kept(&mut self, repo: &RepoPlan) {
        for p in &repo.packages {
            self.kept += p.keep.len();
            if self.ctx.json {
                for k in &p.keep {
                    let reasons: Vec<String> = k.reasons.iter().map(ToString::to_string).collect();
                    self.ctx.emit(
                        "keep",
                        serde_json::json!({
                            "org": repo.org.as_ref().map(|o| o.as_str()), "name": p.name,
                            "version": k.version, "reasons": reasons,
                        }),
                    );
                }
            }
        }
    }

    /// Before an artifact is removed (for people: progress).
    fn removing(&self, org: Option<&RepoName>, name: &str, r: &Removal) {
        if !self.ctx.json {
            let verb = if self.dry_run {
                "Would remove"
            } else {
                "Removing"
            };
            line(&format!("{verb} {}", what(org, name, r)));
        }
    }

    /// Once it is removed (or, in a dry run, would be).
    fn removed(&mut self, org: Option<&RepoName>, name: &str, r: &Removal) {
        self.removed += 1;
        self.packages.insert(display_name(org, name));
        if self.ctx.json {
            self.ctx.emit(
                "remove",
                serde_json::json!({
                    "org": org.map(|o| o.as_str()), "name": name, "version": r.version,
                    "arch": r.arch, "dry_run": self.dry_run,
                }),
            );
        }
    }

    /// It was gone before this run removed it (another writer).
    fn gone(&self, org: Option<&RepoName>, name: &str, r: &Removal) {
        if !self.ctx.json {
            eprintln!(
                "niso: note: {} was already removed (by another writer)",
                what(org, name, r)
            );
        }
    }

    fn summary(&self) {
        if self.ctx.json {
            self.ctx.emit(
                "summary",
                serde_json::json!({
                    "removed": self.removed, "packages": self.packages.len(),
                    "kept_versions": self.kept, "dry_run": self.dry_run,
                }),
            );
            return;
        }
        let kept = plural(self.kept, "version", "versions");
        let artifacts = plural(self.removed, "artifact", "artifacts");
        let packages = plural(self.packages.len(), "package", "packages");
        if self.removed == 0 {
            eprintln!("Nothing to remove; kept {kept}");
        } else if self.dry_run {
            eprintln!("Would remove {artifacts} of {packages}; would keep {kept} (dry run: nothing was changed)");
        } else {
            eprintln!("Removed {artifacts} of {packages}; kept {kept}");
        }
    }
}

impl GcArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        match self.data_dir.clone() {
            Some(dir) => super::block_on(self.local(ctx, &dir))?,
            None => self.remote(ctx),
        }
    }

    /// On a terminal, unless --yes or --dry-run: shows the plan and asks.
    fn confirmed(&self, plans: &[RepoPlan]) -> anyhow::Result<bool> {
        let total: usize = plans.iter().map(RepoPlan::removals).sum();
        if self.dry_run || self.yes || total == 0 || !std::io::stdin().is_terminal() {
            return Ok(true);
        }
        for repo in plans {
            for p in &repo.packages {
                for r in &p.remove {
                    eprintln!("Would remove {}", what(repo.org.as_ref(), &p.name, r));
                }
            }
        }
        confirm(
            &format!(
                "Remove these {}? Their versions can never be published again with other bytes.",
                plural(total, "artifact", "artifacts")
            ),
            "",
        )
    }

    // -----------------------------------------------------------------
    // A data directory.

    async fn local(self, ctx: &Ctx, dir: &Path) -> anyhow::Result<Outcome> {
        let dd = DataDir::open(dir)?;
        let key = Arc::new(dd.key()?);
        let store = dd.store(self.store.as_deref())?;
        let found = datadir::organizations(store.as_ref()).await?;
        let repos: Vec<Option<RepoName>> = if self.orgs.is_empty() {
            std::iter::once(None)
                .chain(found.into_iter().map(Some))
                .collect()
        } else {
            for o in &self.orgs {
                if !found.contains(o) {
                    bail!(
                        "no organization repository {o} in {} (organizations: {})",
                        dir.display(),
                        if found.is_empty() {
                            "none".to_string()
                        } else {
                            found
                                .iter()
                                .map(RepoName::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    );
                }
            }
            self.orgs.iter().cloned().map(Some).collect()
        };
        let mut publishers = Vec::new();
        let mut plans = Vec::new();
        for org in repos {
            let layout = org
                .as_ref()
                .map(Layout::organization)
                .unwrap_or_else(Layout::root);
            let publisher = dd
                .publisher(
                    key.clone(),
                    layout,
                    Options::default(),
                    self.store.as_deref(),
                )
                .await
                .with_context(|| {
                    format!(
                        "cannot read the indexes of {}",
                        org.as_ref().unwrap_or(dd.repository())
                    )
                })?;
            // A dry run changes nothing, not even a cut-off change's leftovers.
            if !self.dry_run {
                publisher.recover().await?;
            }
            let mut packages = Vec::new();
            for name in publisher.package_names().await {
                if let Some(pkg) = publisher.package(&name).await {
                    packages.push(gc::plan(&pkg, self.keep_versions));
                }
            }
            plans.push(RepoPlan { org, packages });
            publishers.push(publisher);
        }
        if !self.confirmed(&plans)? {
            bail!("nothing was removed");
        }
        let mut report = Report::new(ctx, self.dry_run);
        for (repo, publisher) in plans.iter().zip(&publishers) {
            report.kept(repo);
            self.collect_local(&mut report, repo, publisher).await?;
        }
        report.summary();
        Ok(Outcome::Success)
    }

    /// Removes a repository's artifacts as one change.
    async fn collect_local(
        &self,
        report: &mut Report<'_>,
        repo: &RepoPlan,
        publisher: &Publisher,
    ) -> anyhow::Result<()> {
        let org = repo.org.as_ref();
        let mut items = Vec::new();
        let mut planned = Vec::new();
        for p in &repo.packages {
            for r in &p.remove {
                report.removing(org, &p.name, r);
                items.push(ids(&p.name, r)?);
                planned.push((p.name.as_str(), r));
            }
        }
        if self.dry_run {
            for (name, r) in planned {
                report.removed(org, name, r);
            }
            return Ok(());
        }
        if items.is_empty() {
            return Ok(());
        }
        let outcomes = publisher.delete_many(&items).await.with_context(|| {
            format!(
                "nothing was removed from {}",
                org.map(|o| format!("organization {o}"))
                    .unwrap_or_else(|| "the registry".into())
            )
        })?;
        for ((name, r), outcome) in planned.into_iter().zip(outcomes) {
            match outcome {
                Ok(()) => report.removed(org, name, r),
                Err(PublishError::NotFound(_)) => report.gone(org, name, r),
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context(format!("cannot remove {}", what(org, name, r))))
                }
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------
    // Through the API.

    fn remote(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let registry = ctx.registry()?;
        if registry.key.is_none() && !self.dry_run {
            bail!(
                "gc through the API needs an API key with a delete: scope for {}: run `niso login {} --key KEY`, set NISO_KEY, or work on the registry's data directory with --data-dir",
                registry.name,
                registry.url
            );
        }
        let api = ApiClient::new(&registry.url, registry.key.clone())?;
        let repos: Vec<Option<RepoName>> = if self.orgs.is_empty() {
            vec![None]
        } else {
            self.orgs.iter().cloned().map(Some).collect()
        };
        let mut sessions: Vec<(Session, Fresh)> = Vec::new();
        let mut plans = Vec::new();
        for org in repos {
            let session = Session::open(&registry, org.as_ref(), Allow::default(), unix_now())?;
            let fresh = session.fresh()?;
            // The list is not signed: it only names candidates, and each
            // plan comes from the package's verified index. A name the
            // signed tree does not know is skipped.
            let mut names: Vec<String> = session
                .reader
                .package_list()?
                .packages
                .into_iter()
                .map(|p| p.name)
                .collect();
            names.sort();
            names.dedup();
            let mut packages = Vec::new();
            for name in names {
                let Ok(name) = PackageName::new(&name) else {
                    continue;
                };
                if let Some(pkg) = session.reader.package(&fresh, &name)? {
                    packages.push(gc::plan(&pkg, self.keep_versions));
                }
            }
            plans.push(RepoPlan { org, packages });
            sessions.push((session, fresh));
        }
        if !self.confirmed(&plans)? {
            bail!("nothing was removed");
        }
        let mut report = Report::new(ctx, self.dry_run);
        for repo in &plans {
            report.kept(repo);
        }
        let total: usize = plans.iter().map(RepoPlan::removals).sum();
        for repo in &plans {
            let org = repo.org.as_ref();
            for p in &repo.packages {
                for r in &p.remove {
                    report.removing(org, &p.name, r);
                    if self.dry_run {
                        report.removed(org, &p.name, r);
                        continue;
                    }
                    let (name, version, arch) = ids(&p.name, r)?;
                    let call = gc::delete_call(org, &name, &version, &arch);
                    match gc::delete_remote(&api, &call) {
                        Ok(Deleted::Removed) => report.removed(org, &p.name, r),
                        Ok(Deleted::Gone) => report.gone(org, &p.name, r),
                        Err(e) => {
                            let scope = match &e {
                                ApiError::Forbidden { .. } => format!(
                                    " (gc needs an API key with the scope delete:{} or delete:{})",
                                    display_name(org, &name.normalized()),
                                    display_name(org, "*")
                                ),
                                _ => String::new(),
                            };
                            return Err(anyhow::Error::from(e).context(format!(
                                "cannot remove {}{scope}; removed {} of {total} artifacts before this",
                                what(org, &p.name, r),
                                report.removed
                            )));
                        }
                    }
                }
            }
        }
        for (session, fresh) in &sessions {
            session.remember(fresh)?;
        }
        report.summary();
        Ok(Outcome::Success)
    }
}

/// The identifiers of a planned removal (from a verified index: they
/// parse, or the index is not one this registry wrote).
fn ids(name: &str, r: &Removal) -> anyhow::Result<(PackageName, Version, Arch)> {
    let bad = || format!("the index of {name} names {} ({})", r.version, r.arch);
    Ok((
        PackageName::new(name).with_context(bad)?,
        Version::new(&r.version).with_context(bad)?,
        Arch::new(&r.arch).with_context(bad)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_versions_is_at_least_one() {
        assert_eq!(parse_keep("5"), Ok(5));
        assert!(parse_keep("0").unwrap_err().contains("at least 1"));
        assert!(parse_keep("-1").unwrap_err().contains("not a number"));
        assert!(parse_keep("five").is_err());
    }
}
