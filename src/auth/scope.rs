//! Key scopes, as seed 001 lists them:
//!
//! * `push:GLOB` — upload (and tag) packages whose name matches GLOB;
//! * `pull:GLOB` — download private packages whose name matches GLOB;
//! * `delete:GLOB` — delete versions of matching packages;
//! * `admin` — everything, including creating, listing and revoking keys.
//!
//! A bare `push`, `pull` or `delete` means `…:*`. Globs use `*` (any run of
//! characters but `/`) and `?` (one character) over *normalised* package names
//! (`_` read as `-`, see `PackageName::normalized`), so `push:my-*` also
//! covers `my_app`. Packages of an organization repository are named
//! `ORG/NAME` for scopes: `pull:acme/*` pulls every package of `acme`, and
//! `*` alone never crosses into an organization. `**` is refused: globset
//! reads it as "any run of characters, `/` included", which would make
//! `pull:**` cross into every organization.
//!
//! An organization's listings (`names`, `versions`, `v1/packages`, search)
//! name every package in it, so reading them needs a scope that covers the
//! whole organization ([`Scopes::allows_all_in`]), not one that covers some
//! of its packages.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Push,
    Pull,
    Delete,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Push => "push",
            Action::Pull => "pull",
            Action::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope {scope:?}: {reason}")]
pub struct ScopeError {
    pub scope: String,
    pub reason: &'static str,
}

/// One scope of a key.
#[derive(Clone)]
pub enum Scope {
    Admin,
    Grant {
        action: Action,
        pattern: String,
        matcher: GlobMatcher,
    },
    /// A stored scope that today's rules refuse (a key made before `**` was
    /// refused): it allows nothing, and is shown as it was stored so an
    /// admin can see the key and revoke it.
    Disabled {
        text: String,
    },
}

impl PartialEq for Scope {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({self})")
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Grant {
                action, pattern, ..
            } => write!(f, "{}:{pattern}", action.as_str()),
            Scope::Disabled { text } => f.write_str(text),
        }
    }
}

impl Scope {
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let err = |reason| ScopeError {
            scope: text.to_string(),
            reason,
        };
        if text == "admin" {
            return Ok(Scope::Admin);
        }
        let (action, pattern) = match text.split_once(':') {
            Some((a, p)) => (a, p),
            None => (text, "*"),
        };
        let action = match action {
            "push" => Action::Push,
            "pull" => Action::Pull,
            "delete" => Action::Delete,
            _ => {
                return Err(err(
                    "must be admin, or push, pull or delete with an optional :GLOB",
                ))
            }
        };
        if pattern.is_empty() || pattern.len() > 130 {
            return Err(err("the glob must be 1 to 130 characters"));
        }
        if !pattern.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'-' | b'*' | b'?' | b'/')
        }) {
            return Err(err("the glob may contain only lowercase ASCII letters, digits, '_', '-', '/', '*' and '?'"));
        }
        if pattern.matches('/').count() > 1 {
            return Err(err("the glob may contain at most one '/' (ORG/NAME)"));
        }
        if pattern.contains("**") {
            return Err(err(
                "'**' is not allowed: '*' never crosses '/'; name the organization (pull:acme/*) or use */*",
            ));
        }
        let pattern = pattern.replace('_', "-");
        let matcher = GlobBuilder::new(&pattern)
            .literal_separator(true)
            .build()
            .map_err(|_| err("not a valid glob"))?
            .compile_matcher();
        Ok(Scope::Grant {
            action,
            pattern,
            matcher,
        })
    }

    /// Whether this scope allows `action` on `subject`, a normalised package
    /// name (`my-app`) or `ORG/NAME`.
    pub fn allows(&self, action: Action, subject: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Grant {
                action: a, matcher, ..
            } => *a == action && matcher.is_match(subject),
            Scope::Disabled { .. } => false,
        }
    }

    /// Whether this scope allows `action` on every package of organization
    /// `org`: its organization part matches `org` and its name part is `*`
    /// (`pull:acme/*`, `pull:*/*`), or it is `admin`.
    pub fn allows_all_in(&self, action: Action, org: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Grant {
                action: a, pattern, ..
            } => {
                *a == action
                    && match pattern.split_once('/') {
                        Some((o, "*")) => org_matches(o, org),
                        _ => false,
                    }
            }
            Scope::Disabled { .. } => false,
        }
    }

    /// Whether this scope allows `action` on some package of organization
    /// `org` (for files of the organization that name no package).
    pub fn allows_some_in(&self, action: Action, org: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Grant {
                action: a,
                pattern,
                matcher,
            } => {
                *a == action
                    && match pattern.split_once('/') {
                        Some((o, _)) => org_matches(o, org) || matcher.is_match(format!("{org}/x")),
                        None => false,
                    }
            }
            Scope::Disabled { .. } => false,
        }
    }
}

/// Whether the organization part of a glob matches `org`.
fn org_matches(glob: &str, org: &str) -> bool {
    GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher().is_match(org))
        .unwrap_or(false)
}

/// The scopes of one key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scopes(pub Vec<Scope>);

impl Scopes {
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Self, ScopeError> {
        if list.is_empty() {
            return Err(ScopeError {
                scope: String::new(),
                reason: "a key needs at least one scope",
            });
        }
        list.iter()
            .map(|s| Scope::parse(s.as_ref()))
            .collect::<Result<_, _>>()
            .map(Scopes)
    }

    pub fn is_admin(&self) -> bool {
        self.0.iter().any(|s| matches!(s, Scope::Admin))
    }

    pub fn allows(&self, action: Action, subject: &str) -> bool {
        self.0.iter().any(|s| s.allows(action, subject))
    }

    pub fn allows_some_in(&self, action: Action, org: &str) -> bool {
        self.0.iter().any(|s| s.allows_some_in(action, org))
    }

    pub fn allows_all_in(&self, action: Action, org: &str) -> bool {
        self.0.iter().any(|s| s.allows_all_in(action, org))
    }

    /// Scopes read back from the key store. One that today's rules refuse
    /// becomes [`Scope::Disabled`] instead of failing: the key keeps
    /// working for what its other scopes allow, and can still be listed
    /// and revoked.
    pub fn parse_stored<S: AsRef<str>>(list: &[S]) -> Self {
        Scopes(
            list.iter()
                .map(|s| {
                    Scope::parse(s.as_ref()).unwrap_or_else(|_| Scope::Disabled {
                        text: s.as_ref().to_string(),
                    })
                })
                .collect(),
        )
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Scope {
        Scope::parse(text).unwrap()
    }

    #[test]
    fn scope_matrix() {
        use Action::*;
        let cases: &[(&str, Action, &str, bool)] = &[
            ("push:*", Push, "my-app", true),
            ("push:*", Pull, "my-app", false),
            ("push:*", Push, "acme/my-app", false),
            ("push:my-*", Push, "my-app", true),
            ("push:my-*", Push, "your-app", false),
            ("push:my_*", Push, "my-app", true),
            ("push:my-?pp", Push, "my-app", true),
            ("pull:acme/*", Pull, "acme/x", true),
            ("pull:acme/*", Pull, "x", false),
            ("pull:*/*", Pull, "acme/x", true),
            ("delete:*", Delete, "x", true),
            ("delete:*", Push, "x", false),
            ("push", Push, "anything", true),
            ("delete", Delete, "anything", true),
            ("admin", Push, "x", true),
            ("admin", Pull, "acme/x", true),
            ("admin", Delete, "x", true),
        ];
        for (scope, action, subject, expected) in cases {
            assert_eq!(
                s(scope).allows(*action, subject),
                *expected,
                "{scope} {action:?} {subject}"
            );
        }
    }

    #[test]
    fn organization_wide_checks() {
        assert!(s("pull:acme/*").allows_some_in(Action::Pull, "acme"));
        assert!(s("pull:acme/web-*").allows_some_in(Action::Pull, "acme"));
        assert!(!s("pull:acme/*").allows_some_in(Action::Pull, "other"));
        assert!(!s("pull:*").allows_some_in(Action::Pull, "acme"));
        assert!(s("pull:*/*").allows_some_in(Action::Pull, "acme"));
        assert!(s("admin").allows_some_in(Action::Pull, "acme"));
    }

    #[test]
    fn listings_need_a_scope_that_covers_the_whole_organization() {
        for (scope, org, expected) in [
            ("pull:acme/*", "acme", true),
            ("pull:*/*", "acme", true),
            ("pull:ac*/*", "acme", true),
            ("admin", "acme", true),
            ("pull:acme/web-*", "acme", false),
            ("pull:acme/x", "acme", false),
            ("pull:acme/*", "other", false),
            ("pull:*", "acme", false),
            ("push:acme/*", "acme", false),
        ] {
            assert_eq!(
                s(scope).allows_all_in(Action::Pull, org),
                expected,
                "{scope} on {org}"
            );
        }
    }

    #[test]
    fn a_stored_scope_refused_today_allows_nothing_and_is_kept() {
        let scopes = Scopes::parse_stored(&["pull:**", "push:my-*"]);
        assert_eq!(scopes.to_strings(), ["pull:**", "push:my-*"]);
        assert!(!scopes.allows(Action::Pull, "acme/x"));
        assert!(!scopes.allows(Action::Pull, "x"));
        assert!(!scopes.allows_some_in(Action::Pull, "acme"));
        assert!(!scopes.allows_all_in(Action::Pull, "acme"));
        assert!(scopes.allows(Action::Push, "my-app"));
    }

    #[test]
    fn bad_scopes_are_refused_with_the_reason() {
        for bad in [
            "",
            "write:*",
            "push:",
            "push:My-*",
            "push:a b",
            "push:[ab]",
            "push:a/b/c",
            "admin:*",
            "push:**",
            "pull:**",
            "pull:acme/**",
            "pull:**/x",
            "delete:a**b",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
        let e = Scope::parse("write:*").unwrap_err().to_string();
        assert!(
            e.contains("write:*") && e.contains("push, pull or delete"),
            "{e}"
        );
        assert!(Scopes::parse::<&str>(&[]).is_err());
        let e = Scope::parse("pull:**").unwrap_err().to_string();
        assert!(e.contains("'**' is not allowed"), "{e}");
    }

    #[test]
    fn scopes_print_normalised() {
        assert_eq!(s("push:my_*").to_string(), "push:my-*");
        assert_eq!(s("push").to_string(), "push:*");
        assert_eq!(s("admin").to_string(), "admin");
    }
}
