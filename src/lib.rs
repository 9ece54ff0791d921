//! niso registry: a package registry that any static host can serve.
//!
//! # Layout
//!
//! * [`ident`]: validated names (package, version, arch, repository, tag).
//! * [`limits`]: bounds on untrusted input.
//! * [`index`]: Hex registry v2 protobufs, signed+gzipped encoding, the RSA
//!   repository key, and the `v1/` JSON documents.
//! * [`archive`]: reading Hex tarballs and `.niso` archives safely; making
//!   `.niso` archives.
//! * [`store`]: where the served tree lives (a local directory today).
//! * [`publish`]: the one code path that changes the tree.
//! * [`datadir`]: a registry's data directory (config, private key, tree).
//! * [`auth`]: API keys (hashed, in SQLite) and their scopes.
//! * [`server`]: `niso registry serve`, the write API and the static tree.
//! * [`client`]: reading a tree back, from a directory or over HTTP, and
//!   verifying it.
//! * [`cli`]: the `niso` command line.
//!
//! # Testing
//!
//! `scripts/test` runs everything (it installs the external tools the
//! end-to-end tests need). `cargo test` alone runs the unit and integration
//! tests; the Hex-client check needs `escript` and rebar3 on the PATH.

pub mod archive;
pub mod auth;
pub mod cli;
pub mod client;
pub mod datadir;
pub mod ident;
pub mod index;
pub mod limits;
pub mod publish;
pub mod server;
pub mod store;
