//! `niso search TERM`: find packages in a registry's static package list.

use anyhow::bail;
use clap::Args;

use super::output::{print_table, Ctx};
use super::Outcome;
use crate::client::fetch;
use crate::client::freshness::Allow;
use crate::client::session::Session;
use crate::ident::{PackageName, RepoName};
use crate::index::json::PackageSummary;
use crate::publish::unix_now;

/// Search a registry's packages by name and description.
///
/// Reads the registry's static package list (`v1/packages/index.json`), so
/// it works on any static host, and ranks matches as the server's
/// /v1/search does: the exact name, names starting with TERM, names
/// containing it, then descriptions containing it (case-insensitive). The
/// list is not signed, so it only nominates candidates: the version and
/// description shown for each come from the package's signed index,
/// verified like a pull. Exit status 1 when nothing matches.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso search postgres
  postgres  16.0.0  Official PostgreSQL package
  mariadb   11.0.0  Official MariaDB package

With --json, one line per package:
  {\"type\":\"package\",\"name\":\"postgres\",\"latest\":\"16.0.0\",\"description\":\"Official PostgreSQL package\"}")]
pub struct SearchArgs {
    /// Text to look for in package names and descriptions.
    term: String,
    /// Search this organization repository (`repos/ORG/`) instead.
    #[arg(long)]
    org: Option<RepoName>,
    /// Show at most this many packages.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// The server's ranking: 0 exact name, 1 prefix, 2 name contains, 3
/// description contains; `None` for no match.
pub fn rank(p: &PackageSummary, needle: &str) -> Option<u8> {
    let name = p.name.to_ascii_lowercase();
    let desc = p.description.as_deref().unwrap_or("").to_ascii_lowercase();
    if name == needle {
        Some(0)
    } else if name.starts_with(needle) {
        Some(1)
    } else if name.contains(needle) {
        Some(2)
    } else if desc.contains(needle) {
        Some(3)
    } else {
        None
    }
}

impl SearchArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let needle = self.term.trim().to_ascii_lowercase();
        if needle.is_empty() || needle.len() > 100 {
            bail!("the search term must be 1 to 100 characters");
        }
        let registry = ctx.registry()?;
        let session = Session::open(&registry, self.org.as_ref(), Allow::default(), unix_now())?;
        let fresh = session.fresh()?;
        let list = session.reader.package_list()?;
        let mut hits: Vec<(u8, String)> = list
            .packages
            .iter()
            .filter_map(|p| rank(p, &needle).map(|r| (r, p.name.clone())))
            .collect();
        hits.sort();
        let more = hits.len().saturating_sub(self.limit);
        let mut rows = Vec::new();
        for (_, name) in hits.into_iter().take(self.limit) {
            // A name the signed tree does not know is a lie of the list:
            // skip it rather than show it.
            let Ok(name) = PackageName::new(&name) else {
                continue;
            };
            let Some(pkg) = session.reader.package(&fresh, &name)? else {
                continue;
            };
            let latest = fetch::latest_version(&pkg).unwrap_or_default();
            let description = pkg.description.clone().unwrap_or_default();
            if ctx.json {
                ctx.emit(
                    "package",
                    serde_json::json!({ "name": pkg.name, "latest": latest, "description": description }),
                );
            }
            rows.push(vec![pkg.name, latest, description]);
        }
        session.remember(&fresh)?;
        if rows.is_empty() {
            if !ctx.json {
                eprintln!(
                    "No packages match {:?} in {}",
                    self.term,
                    session.reader.repository()
                );
            }
            return Ok(Outcome::No);
        }
        if !ctx.json {
            // The manual's table has no header line.
            print_table(&[], &rows);
            if more > 0 {
                eprintln!("… and {more} more; narrow the term or raise --limit");
            }
        }
        Ok(Outcome::Success)
    }
}
