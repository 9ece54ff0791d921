//! Reading a registry tree back: from a directory or over HTTP, through one
//! [`Transport`] seam, and verifying everything in it ([`verify`]).

pub mod store_transport;
pub mod transport;
pub mod verify;

pub use store_transport::StoreTransport;
pub use transport::{DirTransport, HttpTransport, Transport, TransportError};
