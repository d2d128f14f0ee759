//! edgekms' pure core: formats, state machines and key delivery, with no
//! I/O (this crate's Cargo.toml has no async runtime, gRPC, protobuf,
//! database or HTTP dependency, so the build enforces it).
//!
//! - [`envelope`]: the ciphertext format returned to kube-apiserver.
//! - [`keyring`]: a node's KEK versions, the keys themselves, and the
//!   transitions between version states.
//! - [`rotation`]: the whole rotation protocol: the one [`VersionState`]
//!   enum, the cluster side (who must ack before promotion, when a retiring
//!   version may be destroyed) and the node's converge rules.
//! - [`keyid`]: how a KEK version's `key_id` is derived, and name rules.
//! - [`delivery`]: how a KEK version travels wrapped to one node.
//! - [`utc`]: unix times as messages show them.
//! - [`sealedfile`]: the encrypted file format of both backups, and the
//!   backup key.

pub mod delivery;
pub mod envelope;
pub mod keyid;
pub mod keyring;
pub mod rotation;
pub mod sealedfile;
pub mod utc;

pub use keyring::{KeyVersion, Keyring, KeyringError};
pub use rotation::VersionState;

#[cfg(test)]
mod proptests;
