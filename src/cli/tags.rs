//! `niso tag NAME:VERSION NAME:TAG` and `niso registry list-tags NAME`.

use anyhow::bail;
use clap::Args;

use super::output::{line, print_table, Ctx};
use super::Outcome;
use crate::client::api::{self, ApiClient, TagSet};
use crate::client::fetch::{PackageRef, Want};
use crate::client::freshness::Allow;
use crate::client::session::Session;
use crate::publish::unix_now;

/// Point a tag (a release channel) at a published version.
///
/// Tags are mutable pointers: setting one that exists moves it. Needs an
/// API key with a push: scope for the package.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  $ niso tag my-api:1.0.0 my-api:stable
  Tagged my-api 1.0.0 as stable
  $ niso pull my-api:stable
  $ niso tag team/tool:2.0.0 team/tool:beta

With --json: {\"type\":\"tagged\",\"name\":\"my-api\",\"tag\":\"stable\",\"version\":\"1.0.0\"}")]
pub struct TagArgs {
    /// The version to tag: NAME:VERSION (NAME may be ORG/NAME).
    source: PackageRef,
    /// The tag: NAME:TAG, the same NAME.
    target: PackageRef,
}

impl TagArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        let Want::Version(version) = &self.source.want else {
            bail!(
                "{}: name a version to tag, as in `niso tag {}:1.0.0 {}:stable`",
                self.source,
                self.source.name,
                self.source.name
            );
        };
        let Want::Tag(tag) = &self.target.want else {
            bail!(
                "{}: name the tag to set, as in `niso tag {}:{version} {}:stable`",
                self.target,
                self.source.name,
                self.source.name
            );
        };
        if self.source.org != self.target.org || self.source.name != self.target.name {
            bail!(
                "a tag belongs to one package: {} and {} name different packages",
                self.source,
                self.target
            );
        }
        let registry = ctx.registry()?;
        if registry.key.is_none() {
            bail!(
                "tagging needs an API key with a push: scope: run `niso login {} --key KEY`, or set NISO_KEY",
                registry.url
            );
        }
        let api = ApiClient::new(&registry.url, registry.key.clone())?;
        let set: TagSet = api.call(&api::set_tag(
            self.source.org.as_ref(),
            &self.source.name,
            tag,
            version,
        ))?;
        if ctx.json {
            ctx.emit(
                "tagged",
                serde_json::json!({ "name": self.source.name.as_str(), "tag": set.tag, "version": set.version }),
            );
        } else {
            line(&format!(
                "Tagged {} {} as {}",
                self.source.name, set.version, set.tag
            ));
        }
        Ok(Outcome::Success)
    }
}

/// List a package's tags, from its signed index.
///
/// `latest` is listed too: it is no tag anyone sets (the name is reserved)
/// but always the newest release, the one `niso pull NAME` takes.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ niso registry list-tags my-api
  TAG     VERSION
  beta    1.1.0-rc1
  latest  1.1.0
  stable  1.0.0

With --json, one line per tag: {\"type\":\"tag\",\"name\":\"my-api\",\"tag\":\"stable\",\"version\":\"1.0.0\"}")]
pub struct ListTagsArgs {
    /// The package (NAME or ORG/NAME).
    package: PackageRef,
}

impl ListTagsArgs {
    pub fn run(self, ctx: &Ctx) -> anyhow::Result<Outcome> {
        if self.package.want != Want::Latest {
            bail!("list-tags takes a package name, not {}", self.package);
        }
        let registry = ctx.registry()?;
        let session = Session::open(
            &registry,
            self.package.org.as_ref(),
            Allow::default(),
            unix_now(),
        )?;
        let fresh = session.fresh()?;
        let pkg = session.reader.require_package(&fresh, &self.package.name)?;
        session.remember(&fresh)?;
        let mut tags: Vec<(String, String)> = pkg
            .tags
            .iter()
            .map(|t| (t.tag.clone(), t.version.clone()))
            .collect();
        if let Some(r) = crate::index::view::latest(&pkg, |_| true) {
            tags.push(("latest".into(), r.version.clone()));
        }
        tags.sort();
        if ctx.json {
            for (tag, version) in &tags {
                ctx.emit(
                    "tag",
                    serde_json::json!({ "name": pkg.name, "tag": tag, "version": version }),
                );
            }
        } else if tags.is_empty() {
            eprintln!(
                "{} has no releases; push one with `niso push FILE`",
                pkg.name
            );
        } else {
            let rows: Vec<Vec<String>> = tags.into_iter().map(|(t, v)| vec![t, v]).collect();
            print_table(&["TAG", "VERSION"], &rows);
        }
        Ok(Outcome::Success)
    }
}
