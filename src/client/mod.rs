//! The client side of a registry.
//!
//! * [`transport`]: where a tree is read from (a directory, HTTP), one seam.
//! * [`verify`]: `niso registry verify`, a whole tree checked.
//! * [`config`]: the registries a user has added, with their pinned keys.
//! * [`state`]: the freshness generations already seen (rollback refusal).
//! * [`freshness`]: every freshness and digest check, free of I/O.
//! * [`fetch`]: verified reads of one repository (indexes, archives) and
//!   version resolution; [`session`] ties them to a configured registry.
//! * [`api`]: the write API (keys, tags, uploads), sans-IO plus a thin
//!   HTTP client; [`upload`]: `push`, safe to re-run.
//! * [`signing`]: Ed25519 publisher signatures.
//! * [`store`]: the local package store that `pull` writes into.

pub mod api;
pub mod config;
pub mod fetch;
pub mod freshness;
pub mod gc;
pub mod mirror;
pub mod session;
pub mod signing;
pub mod state;
pub mod store;
pub mod store_transport;
pub mod transport;
pub mod upload;
pub mod verify;

pub use store_transport::StoreTransport;
pub use transport::{DirTransport, HttpTransport, Transport, TransportError};
