//! The door: the one way a request path becomes a tree path and an
//! authorization decision.
//!
//! [`open`] turns the bytes of a path into a [`Target`]: the path in normal
//! form, the repository it is in, what it names (a file of the tree and its
//! kind, search, the API, or nothing) and, through [`Target::access`], the
//! scope a reader needs. Everything that reads a path asks it, and nothing
//! else looks at a path:
//!
//! * [`normalise_request`] runs before routing: a refused path is a 400 for
//!   every method, and the router, the handlers and their `Path` parameters
//!   see only the normal form (so axum's own percent-decoding of parameters
//!   never meets an escape: it is not a second door);
//! * the fast static path of `serve` ([`super::files::fast_static`]);
//! * `GET /v1/auth/check`, which nginx asks with its normalised `$uri`
//!   ([`Spelling::Normalised`]).
//!
//! The rules, and why:
//!
//! * percent-escapes are decoded once, here; an escaped `/` or `\` is
//!   refused (a proxy or a file system may read either as a separator);
//! * after decoding, a path holds only ASCII letters, digits, `.`, `_`, `-`
//!   and `/`: every name in the tree does, and this keeps NUL, control
//!   bytes (header injection into nginx's subrequest), `;`, `?`, `#`, `%`,
//!   `\` and non-UTF-8 out of every later step;
//! * `.` and `..` segments are resolved as RFC 3986 and nginx do, never
//!   above the root, and `//` collapses to `/` (nginx's `merge_slashes`),
//!   so `serve` and nginx resolve every spelling to the same file;
//! * a path ending in `/` names no file;
//! * case is kept: the tree's names are lowercase, so `/REPOS/…` is no
//!   repository and names nothing.

use axum::extract::Request;
use axum::http::uri::PathAndQuery;
use axum::http::Uri;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{cut_ident, ApiError};
use super::middleware::Caller;
use super::AppState;
use crate::auth::{Action, Scopes};
use crate::ident::{Arch, IdentError, PackageName, RepoName, Version};
use crate::index::layout;
use crate::store::TreePath;

/// Longest request path accepted (the tree's own paths are shorter).
pub const MAX_PATH: usize = 1024;

/// How the bytes given to [`open`] are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// A request-target's path as a client sent it: percent-decoded here.
    Raw,
    /// A path a proxy has already decoded and normalised (nginx's `$uri`):
    /// not decoded again, and refused unless it is already in normal form.
    /// Decoding it again would judge `%2572…` as `r…` while nginx serves
    /// the file `%72…`.
    Normalised,
}

/// Why a path was refused. Every refusal is a 400, the same everywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the request path must start with '/'")]
    NotAbsolute,
    #[error("the request path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("the request path has a malformed percent-escape")]
    BadEscape,
    #[error("the request path may not encode '/' or '\\' (%2F, %5C)")]
    EncodedSeparator,
    #[error(
        "the request path may contain only ASCII letters, digits, '.', '_', '-' and '/' (every name in the registry is made of these), not {0}"
    )]
    BadByte(String),
    #[error("the request path climbs above the root with '..'")]
    AboveRoot,
    #[error("the path is not normalised: it has a '.', '..' or empty segment")]
    NotNormal,
}

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// A request path through the door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The normal form (`/repos/acme/packages/jason`): only the bytes the
    /// door allows, so it is also a valid URI path as it stands.
    pub path: String,
    /// The organization repository, `None` for the root repository.
    pub repo: Option<RepoName>,
    pub resource: Resource,
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A file of the tree.
    File(TreeFile),
    /// `v1/search` of a repository.
    Search,
    /// The write API, key management, `/health`: their handlers decide.
    Api,
    /// Nothing: answered 404 without looking at the disk.
    Nothing,
}

/// A file of the tree: where it is and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Its path in the tree (`repos/acme/v1/packages/index.json`).
    pub path: TreePath,
    pub kind: FileKind,
}

/// The kinds of file in a repository's tree (see [`layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    Names,
    Versions,
    PublicKey,
    Freshness,
    /// `publisher-keys`
    PublisherKeys,
    FreshnessBin,
    /// `packages/NAME`
    Package(PackageName),
    /// `niso/packages/NAME`
    NisoPackage(PackageName),
    /// `tarballs/NAME-VERSION.tar`
    Tarball(PackageName, Version),
    /// `archives/NAME-VERSION-ARCH.niso`
    Archive(PackageName, Version, Arch),
    /// `v1/packages` (the file `v1/packages/index.json`)
    V1Index,
    V1Versions(PackageName),
    V1Tags(PackageName),
    V1Manifest(PackageName, Version),
    /// `v1/packages/NAME/VERSION/ARCH`, or `…/latest/ARCH` (`version` None).
    V1Download {
        name: PackageName,
        version: Option<Version>,
        arch: Arch,
    },
}

impl FileKind {
    /// The package the file belongs to, if any.
    pub fn package(&self) -> Option<&PackageName> {
        match self {
            FileKind::Package(n)
            | FileKind::NisoPackage(n)
            | FileKind::Tarball(n, _)
            | FileKind::Archive(n, _, _)
            | FileKind::V1Versions(n)
            | FileKind::V1Tags(n)
            | FileKind::V1Manifest(n, _)
            | FileKind::V1Download { name: n, .. } => Some(n),
            FileKind::Names
            | FileKind::Versions
            | FileKind::PublicKey
            | FileKind::Freshness
            | FileKind::PublisherKeys
            | FileKind::FreshnessBin
            | FileKind::V1Index => None,
        }
    }

    /// Files that never change once written: archives, and downloads of a
    /// named version (`latest` moves).
    pub fn is_immutable(&self) -> bool {
        matches!(
            self,
            FileKind::Tarball(..)
                | FileKind::Archive(..)
                | FileKind::V1Download {
                    version: Some(_),
                    ..
                }
        )
    }

    pub fn content_type(&self) -> &'static str {
        match self {
            FileKind::PublicKey => "application/x-pem-file",
            FileKind::V1Index
            | FileKind::V1Versions(_)
            | FileKind::V1Tags(_)
            | FileKind::V1Manifest(..) => "application/json",
            _ => "application/octet-stream",
        }
    }
}

/// What a reader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Some `pull:` scope in the organization: files that name no package
    /// and list none (`public_key`, `freshness`).
    Repository(RepoName),
    /// A `pull:` scope covering every package of the organization
    /// (`pull:ORG/*`): the listings (`names`, `versions`, `freshness-bins`,
    /// `v1/packages`, search), which name every package.
    Listing(RepoName),
    /// `pull:ORG/NAME`: the package's own files.
    Package(RepoName, PackageName),
}

impl Target {
    pub fn file(&self) -> Option<&TreeFile> {
        match &self.resource {
            Resource::File(f) => Some(f),
            _ => None,
        }
    }

    /// What a reader of this path needs. The API's own routes (writes, key
    /// management) decide in their handlers, so they are `Public` here.
    pub fn access(&self) -> Access {
        let Some(org) = &self.repo else {
            return Access::Public;
        };
        let org = org.clone();
        match &self.resource {
            Resource::Search => Access::Listing(org),
            Resource::File(f) => match &f.kind {
                FileKind::Names
                | FileKind::Versions
                | FileKind::FreshnessBin
                | FileKind::V1Index => Access::Listing(org),
                FileKind::PublicKey | FileKind::Freshness | FileKind::PublisherKeys => {
                    Access::Repository(org)
                }
                kind => match kind.package() {
                    Some(name) => Access::Package(org, name.clone()),
                    None => Access::Listing(org),
                },
            },
            Resource::Api | Resource::Nothing => Access::Public,
        }
    }

    /// Why this path names nothing, when a segment breaks a naming rule
    /// (`/repos/Team/…`, `/v1/packages/My-App/versions`) or it ends in `/`;
    /// `None` when it merely names no kind of file. Worked out again from
    /// the normal path, only for a 404, by the same rules as [`open`].
    pub fn why_nothing(&self) -> Option<String> {
        if self.file().is_some() {
            return None;
        }
        let inner = self.path.strip_prefix('/').unwrap_or(&self.path);
        if inner.is_empty() {
            return None;
        }
        if let Some(dir) = inner.strip_suffix('/') {
            return Some(format!(
                "a path ending in '/' names no file (ask for /{dir})"
            ));
        }
        let segments: Vec<&str> = inner.split('/').collect();
        let rest = match segments.as_slice() {
            ["repos", org, rest @ ..] => match RepoName::new(org) {
                Ok(_) => rest,
                Err(e) => return Some(cut_ident(e).to_string()),
            },
            ["repos"] => return Some("a repository's files are under /repos/ORG/".into()),
            all => all,
        };
        match file_kind(rest) {
            Err(Some(e)) => Some(cut_ident(e).to_string()),
            _ => None,
        }
    }

    /// The 404 of a read of this path when it names no file: "no such
    /// file", and why when [`Target::why_nothing`] can tell. `serve`, the
    /// nginx check and search all answer it, so a path that cannot exist
    /// gets the same answer everywhere.
    pub fn not_found(&self) -> ApiError {
        match self.why_nothing() {
            Some(why) => ApiError::not_found(format!("no such file: {why}")),
            None => ApiError::not_found("no such file"),
        }
    }

    /// `Cache-Control` of a file: organization files are `private` (a read
    /// needs a key, so no shared cache may keep it for others), archives
    /// cache for a year, everything else revalidates (cheap, with ETags).
    pub fn cache_control(&self) -> &'static str {
        let immutable = self.file().is_some_and(|f| f.kind.is_immutable());
        match (self.repo.is_some(), immutable) {
            (false, true) => "public, max-age=31536000, immutable",
            (false, false) => "public, no-cache",
            (true, true) => "private, max-age=31536000, immutable",
            (true, false) => "private, no-cache",
        }
    }
}

/// Why a reader was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key: 401.
    NoKey,
    /// The key lacks the scope: 403, with the reason.
    Scope(String),
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::NoKey => ApiError::unauthorized(),
            Denied::Scope(m) => ApiError::forbidden(m),
        }
    }
}

/// Whether a caller with `scopes` (None: no key) may read what `access`
/// guards. `keys` is false on a `--read-only` server, which has no keys and
/// serves everything in its tree.
pub fn authorize(access: &Access, keys: bool, scopes: Option<&Scopes>) -> Result<(), Denied> {
    if *access == Access::Public || !keys {
        return Ok(());
    }
    let scopes = scopes.ok_or(Denied::NoKey)?;
    let refusal = match access {
        Access::Public => None,
        Access::Repository(org) => (!scopes.allows_some_in(Action::Pull, org.as_str()))
            .then(|| format!("this key may not pull from repository {org}")),
        Access::Listing(org) => (!scopes.allows_all_in(Action::Pull, org.as_str())).then(|| {
            format!(
                "listing the packages of {org} needs a scope that covers all of them (pull:{org}/*)"
            )
        }),
        Access::Package(org, name) => {
            let subject = format!("{org}/{}", name.normalized());
            (!scopes.allows(Action::Pull, &subject))
                .then(|| format!("this key may not pull {subject}"))
        }
    };
    refusal.map_or(Ok(()), |m| Err(Denied::Scope(m)))
}

/// [`authorize`] for a request's caller.
pub fn authorize_caller(app: &AppState, caller: &Caller, access: &Access) -> Result<(), ApiError> {
    authorize(access, app.keys.is_some(), caller.key().map(|k| &k.scopes)).map_err(ApiError::from)
}

/// The door itself: `path` (no query) spelled as `spelling` says.
pub fn open(path: &[u8], spelling: Spelling) -> Result<Target, Refused> {
    if path.len() > MAX_PATH {
        return Err(Refused::TooLong);
    }
    if path.first() != Some(&b'/') {
        return Err(Refused::NotAbsolute);
    }
    let decoded = match spelling {
        Spelling::Raw => decode(path)?,
        Spelling::Normalised => path.to_vec(),
    };
    if let Some(&b) = decoded.iter().find(|b| !allowed(**b)) {
        return Err(Refused::BadByte(describe(b)));
    }
    // Only allowed bytes are left: ASCII, so this cannot fail.
    let decoded = String::from_utf8(decoded).map_err(|_| Refused::BadByte("non-UTF-8".into()))?;
    let (segments, trailing) = resolve(&decoded, spelling)?;
    let mut normal = String::with_capacity(decoded.len());
    for s in &segments {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || segments.is_empty() {
        normal.push('/');
    }
    let (repo, resource) = classify(&segments, trailing);
    Ok(Target {
        path: normal,
        repo,
        resource,
    })
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/')
}

fn describe(b: u8) -> String {
    if b == b' ' {
        "a space".to_string()
    } else if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else if b.is_ascii() {
        format!("the control byte 0x{b:02x}")
    } else {
        format!("the non-ASCII byte 0x{b:02x}")
    }
}

/// Percent-decodes once, refusing the first byte the door does not allow
/// as it comes; one that came from an escape is named as the client wrote
/// it (`%FF`), since that is what they will look for.
fn decode(path: &[u8]) -> Result<Vec<u8>, Refused> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b != b'%' {
            if !allowed(b) {
                return Err(Refused::BadByte(describe(b)));
            }
            out.push(b);
            i += 1;
            continue;
        }
        let hex = |j: usize| {
            path.get(j)
                .and_then(|c| (*c as char).to_digit(16))
                .ok_or(Refused::BadEscape)
        };
        let byte = (hex(i + 1)? * 16 + hex(i + 2)?) as u8;
        if byte == b'/' || byte == b'\\' {
            return Err(Refused::EncodedSeparator);
        }
        if !allowed(byte) {
            let sent = String::from_utf8_lossy(&path[i..i + 3]);
            return Err(Refused::BadByte(format!(
                "{} (sent as {sent})",
                describe(byte)
            )));
        }
        out.push(byte);
        i += 3;
    }
    Ok(out)
}

/// The segments of a decoded path, dot segments and empty segments
/// resolved (`Raw`) or refused (`Normalised`), and whether it ends in `/`.
fn resolve(path: &str, spelling: Spelling) -> Result<(Vec<&str>, bool), Refused> {
    let parts: Vec<&str> = path[1..].split('/').collect();
    let last = parts.len() - 1;
    let mut segments: Vec<&str> = Vec::with_capacity(parts.len());
    let mut trailing = false;
    for (i, part) in parts.into_iter().enumerate() {
        let is_last = i == last;
        match part {
            // `/a/` ends in an empty segment: that is the trailing slash,
            // normal in both spellings.
            "" if is_last => trailing = true,
            "" | "." | ".." if spelling == Spelling::Normalised => return Err(Refused::NotNormal),
            "" => {}
            "." => trailing = is_last,
            ".." => {
                segments.pop().ok_or(Refused::AboveRoot)?;
                trailing = is_last;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let trailing = trailing && !segments.is_empty();
    Ok((segments, trailing))
}

/// What the segments of a normal path name.
fn classify(segments: &[&str], trailing: bool) -> (Option<RepoName>, Resource) {
    let (repo, rest) = match segments {
        ["repos", org, rest @ ..] => match RepoName::new(org) {
            Ok(org) => (Some(org), rest),
            Err(_) => return (None, Resource::Nothing),
        },
        ["repos"] => return (None, Resource::Nothing),
        _ => (None, segments),
    };
    if trailing {
        return (repo, Resource::Nothing);
    }
    let resource = match rest {
        ["health"] | ["v1", "auth", ..] if repo.is_none() => Resource::Api,
        ["v1", "search"] => Resource::Search,
        _ => match file_kind(rest) {
            Ok(kind) => {
                let rel = match kind {
                    FileKind::V1Index => layout::V1_INDEX.to_string(),
                    _ => rest.join("/"),
                };
                let full = match &repo {
                    Some(org) => format!("{}/{org}/{rel}", layout::REPOS_DIR),
                    None => rel,
                };
                match TreePath::new(full) {
                    Ok(path) => Resource::File(TreeFile { path, kind }),
                    Err(_) => Resource::Nothing,
                }
            }
            Err(_) => Resource::Nothing,
        },
    };
    (repo, resource)
}

/// The kind of file `rest` (a path inside a repository) names; otherwise
/// the rule a segment breaks, if one does (see [`Target::not_found`]).
fn file_kind(rest: &[&str]) -> Result<FileKind, Option<IdentError>> {
    let name = |n: &str| PackageName::new(n).map_err(Some);
    let version = |v: &str| Version::new(v).map_err(Some);
    let arch = |a: &str| Arch::new(a).map_err(Some);
    Ok(match rest {
        ["names"] => FileKind::Names,
        ["versions"] => FileKind::Versions,
        ["public_key"] => FileKind::PublicKey,
        ["freshness"] => FileKind::Freshness,
        ["publisher-keys"] => FileKind::PublisherKeys,
        ["freshness-bins", bin]
            if bin.len() == 2
                && bin
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            FileKind::FreshnessBin
        }
        ["packages", n] => FileKind::Package(name(n)?),
        ["niso", "packages", n] => FileKind::NisoPackage(name(n)?),
        ["tarballs", file] => {
            let (n, v) = split_name_version(file.strip_suffix(".tar").ok_or(None)?).ok_or(None)?;
            FileKind::Tarball(n, v)
        }
        ["archives", file] => {
            let (stem, a) = file
                .strip_suffix(".niso")
                .and_then(|f| f.rsplit_once('-'))
                .ok_or(None)?;
            let (n, v) = split_name_version(stem).ok_or(None)?;
            FileKind::Archive(n, v, arch(a)?)
        }
        ["v1", "packages"] | ["v1", "packages", "index.json"] => FileKind::V1Index,
        ["v1", "packages", n, "versions"] => FileKind::V1Versions(name(n)?),
        ["v1", "packages", n, "tags"] => FileKind::V1Tags(name(n)?),
        ["v1", "packages", n, v, "manifest"] => FileKind::V1Manifest(name(n)?, version(v)?),
        ["v1", "packages", n, "latest", a] => FileKind::V1Download {
            name: name(n)?,
            version: None,
            arch: arch(a)?,
        },
        ["v1", "packages", n, v, a] => FileKind::V1Download {
            name: name(n)?,
            version: Some(version(v)?),
            arch: arch(a)?,
        },
        _ => return Err(None),
    })
}

/// `NAME-VERSION`: names hold no `.` and versions start `MAJOR.`, so at most
/// one `-` splits it into a valid pair.
fn split_name_version(stem: &str) -> Option<(PackageName, Version)> {
    stem.match_indices('-').find_map(|(i, _)| {
        let name = PackageName::new(&stem[..i]).ok()?;
        let version = Version::new(&stem[i + 1..]).ok()?;
        Some((name, version))
    })
}

/// Runs before routing: refuses a path the door refuses (400, whatever the
/// method), rewrites the request to the normal form of its path, and hands
/// the [`Target`] to the handlers. Routes and `Path` parameters then only
/// ever see a normal path.
pub async fn normalise_request(mut req: Request, next: Next) -> Response {
    let target = match open(req.uri().path().as_bytes(), Spelling::Raw) {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if target.path != req.uri().path() {
        let rebuilt = match req.uri().query() {
            Some(q) => format!("{}?{q}", target.path),
            None => target.path.clone(),
        };
        let mut parts = req.uri().clone().into_parts();
        match PathAndQuery::try_from(rebuilt) {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(e) => return ApiError::internal(e).into_response(),
        }
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return ApiError::internal(e).into_response(),
        }
    }
    req.extensions_mut().insert(target);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(p: &str) -> Result<Target, Refused> {
        open(p.as_bytes(), Spelling::Raw)
    }

    #[test]
    fn every_spelling_of_a_private_file_is_that_file_or_refused() {
        let names = "repos/acme/names";
        for p in [
            "/repos/acme/names",
            "/%72epos/acme/names",
            "/%72%65%70%6F%73/%61cme/names",
            "//repos/acme/names",
            "/repos//acme///names",
            "/./repos/acme/names",
            "/repos/./acme/./names",
            "/x/../repos/acme/names",
            "/tarballs/../repos/acme/names",
            "/repos/other/../acme/names",
            "/repos/acme/x/y/../../names",
            "/%2e/repos/acme/names",
            "/a/%2E%2E/repos/acme/names",
            "/repos/acme/%2e%2e/acme/names",
        ] {
            let t = raw(p).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(t.path, "/repos/acme/names", "{p}");
            assert_eq!(t.file().map(|f| f.path.as_str()), Some(names), "{p}");
            assert_eq!(t.access(), Access::Listing(RepoName::new("acme").unwrap()));
        }
        for (p, refused) in [
            ("/repos%2Facme/names", Refused::EncodedSeparator),
            ("/repos%2facme/names", Refused::EncodedSeparator),
            ("/repos/acme%5Cnames", Refused::EncodedSeparator),
            ("/repos/acme\\names", Refused::BadByte("'\\'".into())),
            (
                "/repos/acme/na%00mes",
                Refused::BadByte("the control byte 0x00 (sent as %00)".into()),
            ),
            (
                "/repos/acme/names%0d%0aX: y",
                Refused::BadByte("the control byte 0x0d (sent as %0d)".into()),
            ),
            ("/repos/acme/names;x", Refused::BadByte("';'".into())),
            (
                "/repos/acme/names%3Fx",
                Refused::BadByte("'?' (sent as %3F)".into()),
            ),
            (
                "/repos/acme/names%23",
                Refused::BadByte("'#' (sent as %23)".into()),
            ),
            (
                "/repos/acme/names%2541",
                Refused::BadByte("'%' (sent as %25)".into()),
            ),
            (
                "/repos/acme/n%C3%A9",
                Refused::BadByte("the non-ASCII byte 0xc3 (sent as %C3)".into()),
            ),
            (
                "/repos/acme/n%FF",
                Refused::BadByte("the non-ASCII byte 0xff (sent as %FF)".into()),
            ),
            ("/repos/acme/names%", Refused::BadEscape),
            ("/repos/acme/names%4", Refused::BadEscape),
            ("/repos/acme/names%zz", Refused::BadEscape),
            ("/../repos/acme/names", Refused::AboveRoot),
            ("/repos/../../acme/names", Refused::AboveRoot),
            ("repos/acme/names", Refused::NotAbsolute),
        ] {
            assert_eq!(raw(p), Err(refused), "{p}");
        }
        assert_eq!(raw(&"/a".repeat(600)), Err(Refused::TooLong));
    }

    #[test]
    fn a_trailing_slash_or_another_case_names_no_file() {
        for p in [
            "/repos/acme/packages/jason/",
            "/repos/acme/packages/jason/.",
            "/repos/acme/packages/jason/x/..",
            "/repos/acme/archives/jason-1.0.0-x86_64.niso/",
            "/repos/acme/tarballs/jason-1.0.0.tar/",
            "/repos/acme/names//",
            "/REPOS/acme/names",
            "/repos/ACME/names",
            "/repos/acme/NAMES",
            "/repos/acme/packages/Jason",
            "/repos/acme/.names",
            "/repos/acme/",
            "/repos/",
            "/",
            "/repos/acme/packages/other/..",
        ] {
            let t = raw(p).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(t.resource, Resource::Nothing, "{p}");
        }
        assert_eq!(
            raw("/repos/acme/packages/jason/").unwrap().path,
            "/repos/acme/packages/jason/"
        );
        assert_eq!(raw("/").unwrap().path, "/");
        assert_eq!(raw("/a/..").unwrap().path, "/");
        // `other/../NAME` is NAME's file, and needs NAME's scope.
        let t = raw("/repos/acme/packages/other/../jason").unwrap();
        assert_eq!(t.file().unwrap().path.as_str(), "repos/acme/packages/jason");
        assert_eq!(
            t.access(),
            Access::Package(
                RepoName::new("acme").unwrap(),
                PackageName::new("jason").unwrap()
            )
        );
    }

    #[test]
    fn normalised_spelling_is_taken_as_is_or_refused() {
        let n = |p: &[u8]| open(p, Spelling::Normalised);
        assert_eq!(n(b"/repos/acme/names").unwrap().path, "/repos/acme/names");
        // nginx decoded `%2572` into `%72`: that is not `r`.
        assert_eq!(
            n(b"/%72epos/acme/names"),
            Err(Refused::BadByte("'%'".into()))
        );
        for p in [
            &b"/repos/acme/../acme/names"[..],
            b"/repos/./acme/names",
            b"//repos/acme/names",
            b"/repos/acme//names",
        ] {
            assert_eq!(n(p), Err(Refused::NotNormal), "{p:?}");
        }
        assert_eq!(
            n(b"/repos/acme/n\xc3\xa9"),
            Err(Refused::BadByte("the non-ASCII byte 0xc3".into()))
        );
        assert_eq!(
            n(b"/repos/acme/names\r\nX: y"),
            Err(Refused::BadByte("the control byte 0x0d".into()))
        );
        assert_eq!(
            n(b"/repos/acme/jason/").unwrap().resource,
            Resource::Nothing
        );
    }

    #[test]
    fn every_kind_of_file_is_classified_with_its_scope() {
        let acme = || RepoName::new("acme").unwrap();
        let jason = || PackageName::new("jason").unwrap();
        let v = |s: &str| Version::new(s).unwrap();
        let x86 = || Arch::new("x86_64").unwrap();
        for (rel, kind, tree) in [
            ("names", FileKind::Names, "names"),
            ("versions", FileKind::Versions, "versions"),
            ("public_key", FileKind::PublicKey, "public_key"),
            ("freshness", FileKind::Freshness, "freshness"),
            (
                "freshness-bins/0a",
                FileKind::FreshnessBin,
                "freshness-bins/0a",
            ),
            (
                "packages/jason",
                FileKind::Package(jason()),
                "packages/jason",
            ),
            (
                "tarballs/jason-1.4.4.tar",
                FileKind::Tarball(jason(), v("1.4.4")),
                "tarballs/jason-1.4.4.tar",
            ),
            (
                "archives/jason-1.0.0-rc-1-x86_64.niso",
                FileKind::Archive(jason(), v("1.0.0-rc-1"), x86()),
                "archives/jason-1.0.0-rc-1-x86_64.niso",
            ),
            ("v1/packages", FileKind::V1Index, "v1/packages/index.json"),
            (
                "v1/packages/index.json",
                FileKind::V1Index,
                "v1/packages/index.json",
            ),
            (
                "v1/packages/jason/versions",
                FileKind::V1Versions(jason()),
                "v1/packages/jason/versions",
            ),
            (
                "v1/packages/jason/tags",
                FileKind::V1Tags(jason()),
                "v1/packages/jason/tags",
            ),
            (
                "v1/packages/jason/1.0.0/manifest",
                FileKind::V1Manifest(jason(), v("1.0.0")),
                "v1/packages/jason/1.0.0/manifest",
            ),
            (
                "v1/packages/jason/1.0.0/x86_64",
                FileKind::V1Download {
                    name: jason(),
                    version: Some(v("1.0.0")),
                    arch: x86(),
                },
                "v1/packages/jason/1.0.0/x86_64",
            ),
            (
                "v1/packages/jason/latest/x86_64",
                FileKind::V1Download {
                    name: jason(),
                    version: None,
                    arch: x86(),
                },
                "v1/packages/jason/latest/x86_64",
            ),
        ] {
            let root = raw(&format!("/{rel}")).unwrap();
            assert_eq!(
                root.file().map(|f| (&f.kind, f.path.as_str())),
                Some((&kind, tree)),
                "{rel}"
            );
            assert_eq!(root.access(), Access::Public, "{rel}");
            let org = raw(&format!("/repos/acme/{rel}")).unwrap();
            let full = format!("repos/acme/{tree}");
            assert_eq!(
                org.file().map(|f| (&f.kind, f.path.as_str())),
                Some((&kind, full.as_str()))
            );
            let expected = match &kind {
                FileKind::PublicKey | FileKind::Freshness => Access::Repository(acme()),
                k => match k.package() {
                    Some(_) => Access::Package(acme(), jason()),
                    None => Access::Listing(acme()),
                },
            };
            assert_eq!(org.access(), expected, "{rel}");
        }
        for rel in [
            "packages/jason/x",
            "freshness-bins/0A",
            "freshness-bins/abc",
            "tarballs/jason.tar",
            "tarballs/jason-1.0.tar",
            "archives/jason-1.0.0.niso",
            "v1/packages/jason/1.0.0/latest",
            "v1/packages/jason/x/x86_64",
            "v1/packages/jason/1.0.0/manifest/x",
            "v1/other",
            "no/such/file",
        ] {
            assert_eq!(
                raw(&format!("/{rel}")).unwrap().resource,
                Resource::Nothing,
                "{rel}"
            );
        }
        assert_eq!(raw("/v1/search").unwrap().resource, Resource::Search);
        let s = raw("/repos/acme/v1/search").unwrap();
        assert_eq!(
            (s.resource.clone(), s.access()),
            (Resource::Search, Access::Listing(acme()))
        );
        for p in ["/health", "/v1/auth/check", "/v1/auth/keys/key_x"] {
            assert_eq!(raw(p).unwrap().resource, Resource::Api, "{p}");
        }
        assert_eq!(
            raw("/repos/acme/v1/auth/keys").unwrap().resource,
            Resource::Nothing
        );
    }

    #[test]
    fn authorization_follows_the_access() {
        let scopes = |s: &[&str]| Scopes::parse(s).unwrap();
        let acme = RepoName::new("acme").unwrap();
        let web = Access::Package(acme.clone(), PackageName::new("web_app").unwrap());
        let other = Access::Package(acme.clone(), PackageName::new("other").unwrap());
        let listing = Access::Listing(acme.clone());
        let repo = Access::Repository(acme.clone());
        let narrow = scopes(&["pull:acme/web-*"]);
        let whole = scopes(&["pull:acme/*"]);
        let root_only = scopes(&["pull:*", "push:acme/*"]);
        assert_eq!(authorize(&Access::Public, true, None), Ok(()));
        assert_eq!(authorize(&web, true, None), Err(Denied::NoKey));
        assert_eq!(authorize(&web, false, None), Ok(()), "read-only: no keys");
        assert_eq!(authorize(&web, true, Some(&narrow)), Ok(()));
        assert!(authorize(&other, true, Some(&narrow)).is_err());
        assert_eq!(authorize(&repo, true, Some(&narrow)), Ok(()));
        assert!(matches!(
            authorize(&listing, true, Some(&narrow)),
            Err(Denied::Scope(m)) if m.contains("pull:acme/*")
        ));
        for a in [&web, &other, &listing, &repo] {
            assert_eq!(authorize(a, true, Some(&whole)), Ok(()));
            assert!(authorize(a, true, Some(&root_only)).is_err());
        }
    }

    #[test]
    fn a_path_that_names_nothing_says_why_when_a_name_is_wrong() {
        let why = |p: &str| raw(p).unwrap().why_nothing();
        let reason = |p: &str| why(p).unwrap_or_else(|| panic!("{p}: no reason"));
        assert!(reason("/repos/Team/names").starts_with("invalid repository name \"Team\""));
        assert!(reason("/repos/acme/v1/packages/My/versions")
            .starts_with("invalid package name \"My\""));
        assert!(reason("/v1/packages/jason/stable/any").starts_with("invalid version \"stable\""));
        assert!(reason("/archives/jason-1.0.0-X86.niso").starts_with("invalid arch \"X86\""));
        assert!(reason("/v1/packages/jason/").contains("ending in '/'"));
        assert!(reason("/repos").contains("/repos/ORG/"));
        let long = format!("/v1/packages/{}/versions", "A".repeat(900));
        assert!(reason(&long).len() < 300, "the name is cut");
        for p in [
            "/names",
            "/v1/packages/jason/1.0.0/any",
            "/no/such/file",
            "/",
            "/v1/other",
        ] {
            assert_eq!(why(p), None, "{p}");
        }
    }

    #[test]
    fn caching_is_private_for_organizations() {
        let c = |p: &str| raw(p).unwrap().cache_control();
        assert_eq!(c("/names"), "public, no-cache");
        assert_eq!(
            c("/tarballs/jason-1.4.4.tar"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(c("/v1/packages/jason/latest/any"), "public, no-cache");
        assert_eq!(c("/repos/acme/names"), "private, no-cache");
        assert_eq!(
            c("/repos/acme/v1/packages/jason/1.4.4/any"),
            "private, max-age=31536000, immutable"
        );
    }
}
