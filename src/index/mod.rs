//! The registry indexes: Hex registry v2 protobuf messages, their signed and
//! gzipped encoding, and the repository key that signs them.
//!
//! * [`pb`] holds the prost types generated from `proto/niso_registry.proto`
//!   (Hex's field numbers, niso's additions from 100 up).
//! * [`codec`] turns a message into the bytes of an index file and back:
//!   `gzip(Signed{payload, signature})`, verified before the payload is decoded.
//! * [`keys`] loads, generates and uses the RSA repository key.
//! * [`layout`] says where each file of a repository's tree goes, for the
//!   publisher that writes them and every reader that checks them.
//! * [`view`] says what each file must hold, derived from a package's index.
//! * [`json`] holds the JSON documents of the `v1/` API, shared by the
//!   publisher that writes them and the clients that read them.

pub mod codec;
pub mod json;
pub mod keys;
pub mod layout;
pub mod view;

/// Generated protobuf types. See `proto/niso_registry.proto` for the field docs.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/niso.registry.rs"));
}

pub use codec::{decode_index, encode_index, CodecError};
pub use keys::{KeyError, PublicKey, RepoKey, Signer};
