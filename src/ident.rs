//! Validated identifiers: package names, versions, arches, repository and tag
//! names.
//!
//! Every name that reaches a path in the tree or a field of an index is parsed
//! into one of these newtypes once, at the boundary (CLI argument, URL segment,
//! archive metadata). After that the rest of the code cannot build a path from
//! an unchecked string, which is what keeps `..`, `/` and look-alike names out
//! of the served tree.

use std::fmt;
use std::str::FromStr;

use crate::limits::{Clipped, Quoted};

/// Why an identifier was rejected. The message names the rule it broke, and
/// shows the rejected text cut to a few hundred bytes (it may come from a
/// URL or an archive of any size).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("invalid package name {}: {rule}", Quoted(name))]
    PackageName { name: String, rule: &'static str },
    #[error("invalid version {}: {}", Quoted(version), Clipped(reason))]
    Version { version: String, reason: String },
    #[error("invalid arch {}: {rule}", Quoted(arch))]
    Arch { arch: String, rule: &'static str },
    #[error("invalid repository name {}: {rule}", Quoted(name))]
    RepoName { name: String, rule: &'static str },
    #[error("invalid tag {}: {rule}", Quoted(tag))]
    Tag { tag: String, rule: &'static str },
}

/// The rule a Windows device name breaks, as the error states it.
const WINDOWS_DEVICE_RULE: &str =
    "is a reserved device name on Windows (con, prn, aux, nul, com0-com9, lpt0-lpt9): \
     a tree holding it could not be copied to a Windows machine";

/// Whether Windows reserves `name` for a device. Such a name cannot be a
/// file or directory there, in any case and even with an extension
/// (`con.txt`); package, repository and tag names become directories
/// (`packages/con`, `repos/aux/`) and arches file names
/// (`v1/packages/NAME/VERSION/com1`), so a tree holding one could not be
/// copied to a Windows machine, as air-gapped sites often need. The list is
/// Microsoft's ("Naming Files, Paths, and Namespaces"), which also names
/// `COM0` and `LPT0`.
pub fn is_windows_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).to_ascii_lowercase();
    match stem.as_bytes() {
        b"con" | b"prn" | b"aux" | b"nul" => true,
        [a, b, c, digit] => {
            let prefix = [*a, *b, *c];
            (&prefix == b"com" || &prefix == b"lpt") && digit.is_ascii_digit()
        }
        _ => false,
    }
}

/// Longest package name accepted. Hex has no documented cap; 64 keeps file
/// names and URLs short everywhere.
pub const MAX_NAME_LEN: usize = 64;

/// A package name: 1 to 64 characters of lowercase ASCII letters, digits, `_`
/// and `-`, starting with a letter and not ending with `_` or `-`, and not a
/// device name on Windows (`con`, `nul`, `com1`, …; see
/// [`is_windows_device_name`]).
///
/// This is Hex's rule (`[a-z][a-z0-9_]*`) widened by `-`, so every Hex package
/// name is valid and niso packages may be called `my-app`. Names that differ
/// only by `-` versus `_` are the same *normalised* name (see
/// [`PackageName::normalized`]); the publisher refuses a second such name, so
/// `my-app` and `my_app` can never be two packages.
///
/// ```
/// use niso::ident::PackageName;
/// assert!(PackageName::new("my-app").is_ok());
/// assert!(PackageName::new("phoenix_html").is_ok());
/// assert!(PackageName::new("My App").is_err());
/// assert!(PackageName::new("../etc").is_err());
/// assert!(PackageName::new("con").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackageName(String);

impl PackageName {
    pub fn new(name: &str) -> Result<Self, IdentError> {
        let checked = Self::reference(name)?;
        if is_windows_device_name(name) {
            return Err(IdentError::PackageName {
                name: name.to_string(),
                rule: WINDOWS_DEVICE_RULE,
            });
        }
        Ok(checked)
    }

    /// A name that only refers to a package, such as a Hex requirement's,
    /// which may live in another repository and never becomes a path in
    /// this tree: the syntax rule alone, without the Windows device names.
    pub fn reference(name: &str) -> Result<Self, IdentError> {
        let err = |rule| IdentError::PackageName {
            name: name.to_string(),
            rule,
        };
        let bytes = name.as_bytes();
        match bytes.first() {
            None => return Err(err("must not be empty")),
            Some(b) if !b.is_ascii_lowercase() => {
                return Err(err("must start with a lowercase ASCII letter"))
            }
            _ => {}
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(err("must be at most 64 characters"));
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
        {
            return Err(err(
                "may contain only lowercase ASCII letters, digits, '_' and '-'",
            ));
        }
        if matches!(bytes.last(), Some(b'_' | b'-')) {
            return Err(err("must not end with '_' or '-'"));
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form used for look-alike checks and scope globs: `_` becomes `-`.
    pub fn normalized(&self) -> String {
        self.0.replace('_', "-")
    }
}

/// A release version: semantic versioning 2.0 (`MAJOR.MINOR.PATCH`, optional
/// `-pre.release`), at most 64 characters. Build metadata (`+build`) is
/// refused: semver ignores it when ordering, so `1.0.0+a` and `1.0.0+b` would
/// be two releases that no client can tell apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    raw: String,
    parsed: semver::Version,
}

impl Version {
    pub fn new(version: &str) -> Result<Self, IdentError> {
        let err = |reason: String| IdentError::Version {
            version: version.to_string(),
            reason,
        };
        if version.len() > 64 {
            return Err(err("must be at most 64 characters".into()));
        }
        let parsed = semver::Version::parse(version)
            .map_err(|e| err(format!("not a semantic version (MAJOR.MINOR.PATCH): {e}")))?;
        if !parsed.build.is_empty() {
            return Err(err("build metadata ('+...') is not allowed".into()));
        }
        // semver accepts leading zeros nowhere, so parsed.to_string() == version.
        Ok(Self {
            raw: version.to_string(),
            parsed,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn semver(&self) -> &semver::Version {
        &self.parsed
    }

    pub fn is_prerelease(&self) -> bool {
        !self.parsed.pre.is_empty()
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parsed.cmp(&other.parsed)
    }
}

/// Path segments an arch may not take, because the `v1/` tree already uses
/// them beside the arch files (`v1/packages/NAME/VERSION/manifest`).
const RESERVED_ARCHES: &[&str] = &["manifest", "latest", "versions", "tags"];

/// A target architecture: 1 to 32 characters of lowercase ASCII letters,
/// digits and `_` (`x86_64`, `aarch64`, `riscv64`), not a reserved word nor a
/// device name on Windows (it is a file name in `v1/packages/NAME/VERSION/`).
/// `any` is the arch of Hex tarballs and of arch-independent `.niso` archives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Arch(String);

impl Arch {
    pub const ANY: &'static str = "any";

    pub fn new(arch: &str) -> Result<Self, IdentError> {
        let err = |rule| IdentError::Arch {
            arch: arch.to_string(),
            rule,
        };
        if arch.is_empty() || arch.len() > 32 {
            return Err(err("must be 1 to 32 characters"));
        }
        if !arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(err(
                "may contain only lowercase ASCII letters, digits and '_'",
            ));
        }
        if RESERVED_ARCHES.contains(&arch) {
            return Err(err("is a reserved word (manifest, latest, versions, tags)"));
        }
        if is_windows_device_name(arch) {
            return Err(err(WINDOWS_DEVICE_RULE));
        }
        Ok(Self(arch.to_string()))
    }

    pub fn any() -> Self {
        Self(Self::ANY.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A repository name, as written in every index's `repository` field and used
/// for organization repositories under `repos/NAME/`: the package-name rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoName(String);

impl RepoName {
    pub fn new(name: &str) -> Result<Self, IdentError> {
        PackageName::new(name)
            .map(|n| Self(n.0))
            .map_err(|e| match e {
                IdentError::PackageName { name, rule } => IdentError::RepoName { name, rule },
                other => other,
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Tag names that would contradict the v1 URL space, where a tag stands
/// in for a version (`pkg:stable`): `latest` already means the newest
/// version (`v1/packages/NAME/latest/ARCH`, and the `latest` row of
/// `list-tags`), and `manifest`, `versions`, `tags` are paths beside the
/// versions (`v1/packages/NAME/versions`, `…/VERSION/manifest`).
const RESERVED_TAGS: &[&str] = &["latest", "manifest", "versions", "tags"];

/// A tag (release channel) name: the package-name rule, minus
/// [`RESERVED_TAGS`]. A tag may not look like a version, so `pkg:1.0.0`
/// always means the version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TagName(String);

impl TagName {
    pub fn new(tag: &str) -> Result<Self, IdentError> {
        PackageName::new(tag).map_err(|e| match e {
            IdentError::PackageName { name, rule } => IdentError::Tag { tag: name, rule },
            other => other,
        })?;
        if RESERVED_TAGS.contains(&tag) {
            return Err(IdentError::Tag {
                tag: tag.to_string(),
                rule: "is reserved (latest, manifest, versions, tags): latest always means the newest version, and the others are paths of the v1 API",
            });
        }
        Ok(Self(tag.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_and_parse {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = IdentError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    )*};
}
display_and_parse!(PackageName, Version, Arch, RepoName, TagName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_follow_the_rule() {
        for ok in [
            "a",
            "my-app",
            "my_app",
            "phoenix_html",
            "x86",
            &"a".repeat(64),
        ] {
            assert!(PackageName::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "1app",
            "-app",
            "_app",
            "App",
            "my app",
            "my.app",
            "my/app",
            "..",
            "app-",
            "app_",
            "ünï",
            &"a".repeat(65),
        ] {
            assert!(PackageName::new(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn package_name_errors_name_the_rule() {
        let e = PackageName::new("My").unwrap_err().to_string();
        assert!(e.contains("\"My\"") && e.contains("lowercase"), "{e}");
    }

    #[test]
    fn normalized_names_fold_underscore_and_dash() {
        let a = PackageName::new("my_app").unwrap();
        let b = PackageName::new("my-app").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.normalized(), b.normalized());
    }

    #[test]
    fn versions_are_semver_without_build_metadata() {
        for ok in ["0.0.0", "1.2.3", "1.0.0-rc.1", "10.20.30-alpha"] {
            assert_eq!(Version::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "1",
            "1.0",
            "v1.0.0",
            "01.0.0",
            "1.0.0+build",
            "1.0.0 ",
            "../1.0.0",
            "",
        ] {
            assert!(Version::new(bad).is_err(), "{bad:?} should be invalid");
        }
        assert!(Version::new(&format!("1.0.0-{}", "a".repeat(60))).is_err());
    }

    #[test]
    fn versions_order_by_semver_not_text() {
        let mut v: Vec<Version> = ["1.10.0", "1.2.0", "1.2.0-rc.1", "0.9.9"]
            .iter()
            .map(|s| Version::new(s).unwrap())
            .collect();
        v.sort();
        let s: Vec<&str> = v.iter().map(Version::as_str).collect();
        assert_eq!(s, ["0.9.9", "1.2.0-rc.1", "1.2.0", "1.10.0"]);
    }

    #[test]
    fn arches_are_checked_and_reserved_words_refused() {
        for ok in ["x86_64", "aarch64", "any", "riscv64"] {
            assert!(Arch::new(ok).is_ok());
        }
        for bad in [
            "", "X86", "x86-64", "manifest", "latest", "tags", "versions", "a/b", "..",
        ] {
            assert!(Arch::new(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn windows_device_names_are_refused_everywhere_they_become_paths() {
        let mut devices = vec!["con", "prn", "aux", "nul"];
        let numbered: Vec<String> = (0..10)
            .flat_map(|n| [format!("com{n}"), format!("lpt{n}")])
            .collect();
        devices.extend(numbered.iter().map(String::as_str));
        for name in devices {
            let e = PackageName::new(name).unwrap_err().to_string();
            assert!(e.contains("Windows") && e.contains(name), "{e}");
            assert!(
                matches!(RepoName::new(name), Err(IdentError::RepoName { rule, .. }) if rule.contains("Windows"))
            );
            assert!(
                matches!(TagName::new(name), Err(IdentError::Tag { rule, .. }) if rule.contains("Windows"))
            );
            assert!(
                matches!(Arch::new(name), Err(IdentError::Arch { rule, .. }) if rule.contains("Windows"))
            );
            // A reference (a requirement) is only a name, not a path.
            assert!(PackageName::reference(name).is_ok());
        }
        for ok in ["console", "aux2", "com10", "lpt", "nul_x", "prn-a", "icon"] {
            assert!(PackageName::new(ok).is_ok(), "{ok}");
            assert!(Arch::new(&ok.replace('-', "_")).is_ok(), "{ok}");
        }
        assert!(is_windows_device_name("CON.txt") && is_windows_device_name("Lpt1"));
        // The syntax rule still applies to references.
        assert!(PackageName::reference("Con").is_err());
    }

    #[test]
    fn errors_show_at_most_a_few_hundred_bytes_of_the_input() {
        let huge = "A".repeat(1 << 20);
        for e in [
            PackageName::new(&huge).unwrap_err(),
            Version::new(&huge).unwrap_err(),
            Arch::new(&huge).unwrap_err(),
            RepoName::new(&huge).unwrap_err(),
            TagName::new(&huge).unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(text.len() < 600, "{} bytes: {text:.100}", text.len());
            assert!(text.contains("1048576 bytes"), "{text:.400}");
        }
    }

    #[test]
    fn repo_and_tag_names_use_the_package_rule() {
        assert!(RepoName::new("acme").is_ok());
        assert!(matches!(
            RepoName::new("Acme"),
            Err(IdentError::RepoName { .. })
        ));
        assert!(TagName::new("stable").is_ok());
        assert!(matches!(TagName::new("1.0.0"), Err(IdentError::Tag { .. })));
        for reserved in ["latest", "manifest", "versions", "tags"] {
            let e = TagName::new(reserved).unwrap_err().to_string();
            assert!(e.contains(reserved) && e.contains("reserved"), "{e}");
        }
        assert!(TagName::new("latest-stable").is_ok());
    }
}
