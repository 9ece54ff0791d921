//! A verified read session on one repository of a configured registry: the
//! reader, the pinned key, and the generation this client has already seen,
//! so every command that reads (`pull`, `search`, `list-tags`, `push`'s
//! check) refuses rollbacks the same way.

use super::config::Registry;
use super::fetch::{ReadError, RepoReader};
use super::freshness::{Allow, Fresh};
use super::state::{RegistryState, StateError};
use super::transport::{HttpTransport, TransportError};
use crate::ident::RepoName;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Read(#[from] ReadError),
}

pub struct Session {
    pub reader: RepoReader,
    state: RegistryState,
    allow: Allow,
    now: i64,
}

impl Session {
    /// Reads the root repository of `registry`, or organization `org`'s
    /// (`repos/ORG/`, sent with the API key: they are private).
    pub fn open(
        registry: &Registry,
        org: Option<&RepoName>,
        allow: Allow,
        now: i64,
    ) -> Result<Self, SessionError> {
        let (base, repository, key) = match org {
            Some(o) => (
                format!("{}/repos/{o}", registry.url),
                o.clone(),
                registry.key.as_deref(),
            ),
            // Public reads go without the key: a CDN or mirror in front of
            // the registry has no business seeing it.
            None => (registry.url.clone(), registry.repository.clone(), None),
        };
        let transport = HttpTransport::with_key(&base, key)?;
        let reader = RepoReader::new(
            Box::new(transport),
            registry.public_key.clone(),
            &repository,
            org,
        );
        let state = RegistryState::open(&registry.name, &registry.public_key.fingerprint())?;
        Ok(Self {
            reader,
            state,
            allow,
            now,
        })
    }

    /// The verified freshness record, refused if older than one seen
    /// before. Nothing is recorded yet: see [`Self::remember`].
    pub fn fresh(&self) -> Result<Fresh, SessionError> {
        let seen = self.state.seen(self.reader.freshness_path())?;
        Ok(self.reader.fresh(self.now, seen, self.allow)?)
    }

    /// Records the record's generation as seen, once the command that read
    /// it has succeeded (a refused command writes nothing).
    pub fn remember(&self, fresh: &Fresh) -> Result<(), SessionError> {
        Ok(self
            .state
            .record(self.reader.freshness_path(), fresh.generation)?)
    }
}
