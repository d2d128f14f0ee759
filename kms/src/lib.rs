//! edgekms key management, free of I/O, and the daemons' shared ops endpoint.
//!
//! - [`envelope`]: the ciphertext format returned to kube-apiserver.
//! - [`keyring`]: KEK versions and the state machine between pending,
//!   primary, decrypt-only and retired.
//! - [`keyid`]: how a KEK version's `key_id` is derived, and cluster names.
//! - [`ops`]: the daemons' `/metrics`, `/healthz` and `/readyz` HTTP
//!   endpoint (the one module here that does I/O).
//!
//! Daemons (the node plugin, the central service) and `kmsctl` are thin
//! shells around these types.

pub mod envelope;
pub mod keyid;
pub mod keyring;
pub mod ops;

pub use keyring::{KeyState, KeyVersion, Keyring, KeyringError};
