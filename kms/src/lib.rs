//! edgekms key management: the pure core (formats, state machines, key
//! delivery) and, around it, the central key service.
//!
//! - [`envelope`]: the ciphertext format returned to kube-apiserver.
//! - [`keyring`]: KEK versions and the state machine between pending,
//!   primary, decrypt-only and retired.
//! - [`keyid`]: how a KEK version's `key_id` is derived, and cluster names.
//! - [`delivery`]: how a KEK version travels wrapped to one node.
//! - [`fleet`]: the central service's rotation protocol, PKI and TLS.
//! - [`server`]: the central key service daemon (`edgekms-server`).
//! - [`durable`]: data-dir checks, the creation marker, strict RocksDB
//!   options and redundant record files, for both daemons' stores.
//! - [`duration`]: `30d`-style durations.
//! - [`logfmt`]: escaped, bounded log fields and caller-facing messages.
//! - [`cli`]: start-up and shutdown shared by the binaries.
//! - [`failpoint`]: crash points for the crash-safety tests.
//! - [`ops`]: the daemons' `/metrics`, `/healthz` and `/readyz` HTTP
//!   endpoint.
//!
//! Daemons (the node plugin, the central service) and `kmsctl` are thin
//! shells around the pure types; [`server`], [`ops`], [`durable`],
//! [`cli`] and `fleet::tls` do I/O.

pub mod cli;
pub mod conn;
pub mod delivery;
pub mod durable;
pub mod duration;
pub mod envelope;
pub mod failpoint;
pub mod fleet;
pub mod keyid;
pub mod keyring;
pub mod logfmt;
pub mod ops;
pub mod server;

pub use keyring::{KeyState, KeyVersion, Keyring, KeyringError};

#[cfg(test)]
mod proptests;
