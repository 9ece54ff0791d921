//! `niso package DIR`: make a `.niso` archive.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
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

/// The entrypoint is what the runtime executes: without an executable bit
/// the package would install and then fail to start, so refuse it here.
/// (A manifest that does not parse is left to `create`, which says why.)
fn check_entrypoint_is_executable(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(text) = std::fs::read(dir.join(niso::MANIFEST)) else {
        return Ok(());
    };
    let Ok(manifest) = niso::Manifest::parse(&text) else {
        return Ok(());
    };
    let path = dir.join(niso::PAYLOAD).join(&manifest.entrypoint);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 == 0 => bail!(
            "the entrypoint {} is not executable: run `chmod +x {}` and package again",
            path.display(),
            path.display()
        ),
        _ => Ok(()),
    }
}

impl PackageArgs {
    pub fn run(self, ctx: &super::Ctx) -> anyhow::Result<Outcome> {
        check_entrypoint_is_executable(&self.dir)?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let (path, manifest) = niso::create(&self.dir, &self.out, &Limits::default())
            .with_context(|| format!("cannot package {}", self.dir.display()))?;
        if ctx.json {
            ctx.emit(
                "packaged",
                serde_json::json!({
                    "name": manifest.name.as_str(), "version": manifest.version.as_str(),
                    "arch": manifest.arch.as_str(), "path": path.display().to_string(),
                }),
            );
            return Ok(Outcome::Success);
        }
        eprintln!(
            "Packaged {} {} ({})",
            manifest.name, manifest.version, manifest.arch
        );
        super::output::line(&path.display().to_string());
        Ok(Outcome::Success)
    }
}
