//! `niso package DIR`: make a `.niso` archive.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::Outcome;
use crate::archive::niso;
use crate::limits::Limits;

/// Make a .niso archive from a package directory.
///
/// DIR must hold `niso.toml` (the manifest), the files to install under
/// `payload/`, and optionally a `README.md`. The archive is written as
/// `NAME-VERSION-ARCH.niso`, deterministically: the same directory always
/// gives the same bytes.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Example:
  $ cat my-app/niso.toml
  [package]
  name = \"my-app\"
  version = \"1.1.0\"
  arch = \"x86_64\"
  description = \"My application\"

  [binary]
  entrypoint = \"bin/my-app\"

  [isolation]
  preset = \"server\"
  $ niso package my-app --out dist
  dist/my-app-1.1.0-x86_64.niso")]
pub struct PackageArgs {
    /// The package directory.
    dir: PathBuf,
    /// Where to write the archive.
    #[arg(long, short, default_value = ".")]
    out: PathBuf,
}

impl PackageArgs {
    pub fn run(self) -> anyhow::Result<Outcome> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let (path, manifest) = niso::create(&self.dir, &self.out, &Limits::default())
            .with_context(|| format!("cannot package {}", self.dir.display()))?;
        eprintln!(
            "Packaged {} {} ({})",
            manifest.name, manifest.version, manifest.arch
        );
        println!("{}", path.display());
        Ok(Outcome::Success)
    }
}
