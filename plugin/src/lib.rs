//! The edgekms node plugin.
//!
//! - [`config`]: flags and TOML config, validated into [`config::Config`].
//! - [`cache`]: the local RocksDB cache of KEK versions (wrapped by the node
//!   sealing key) and the sealed node sealing key itself.
//! - [`node`]: the node's key manager: unseal at start, publish one keyring
//!   snapshot that Status/Encrypt/Decrypt read, rotate and retire, and apply
//!   the central service's state by the rules of
//!   `edgekms_core::rotation::node`.
//! - [`backup`]: a standalone node's encrypted local backup and its restore.
//! - [`recovery`]: the recovery passphrase that re-seals after a PCR change.
//! - [`error`]: the node's error type and its one mapping to gRPC status.
//! - [`kms_service`] / [`admin_service`]: thin tonic adapters.
//! - [`metrics`]: every Prometheus metric the plugin exports, in one place.
//! - [`socket`]: the unix-socket server (stale sockets, modes, shutdown).
//! - [`sync`]: `join` and the sync stream to the central key service.

pub mod admin_service;
pub mod backup;
pub mod cache;
pub mod census;
pub mod config;
pub mod error;
pub mod kms_service;
pub mod metrics;
pub mod node;
pub mod recovery;
pub mod socket;
pub mod sync;

#[cfg(test)]
mod proptests;
