//! API keys and what they may do.
//!
//! * [`scope`]: `push:GLOB`, `pull:GLOB`, `delete:GLOB`, `admin`, parsed and
//!   compiled once, when a key is made.
//! * [`keystore`]: keys in SQLite, outside the served tree, stored only as
//!   SHA-256 hashes; the plaintext is shown once, at creation.

pub mod keystore;
pub mod scope;

pub use keystore::{
    publisher_key_fingerprint, publisher_key_id, ApiKey, KeyRecord, KeyStore, KeyStoreError,
    NewKey, PublisherKeyRecord,
};
pub use scope::{Action, Scope, ScopeError, Scopes};
