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
//! - [`duration`]: `30d`-style durations.
//! - [`cli`]: start-up and shutdown shared by the binaries.
//! - [`failpoint`]: crash points for the crash-safety tests.
//! - [`ops`]: the daemons' `/metrics`, `/healthz` and `/readyz` HTTP
//!   endpoint.
//!
//! Daemons (the node plugin, the central service) and `kmsctl` are thin
//! shells around the pure types; only [`server`] and [`ops`] do I/O.

pub mod cli;
pub mod conn;
pub mod delivery;
pub mod duration;
pub mod envelope;
pub mod failpoint;
pub mod fleet;
pub mod keyid;
pub mod keyring;
pub mod ops;
pub mod server;

pub use keyring::{KeyState, KeyVersion, Keyring, KeyringError};
