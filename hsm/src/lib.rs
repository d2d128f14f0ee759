//! Sealing of edgekms key material to the machine it runs on.
//!
//! This crate owns the secret key type ([`Key256`]), the one module that
//! calls AES-256-GCM ([`aead`]), process memory hygiene ([`memory`]) and the
//! [`Sealer`] trait with its backends: [`tpm`] (TPM 2.0 through tss-esapi,
//! behind the default `tpm` feature) and [`soft`] (a key file, for
//! development only, which says so loudly). [`config`] is the one place a
//! daemon's sealer choice becomes a sealer ([`open`]).
//!
//! A sealer protects exactly one key per machine: a node's node sealing key
//! (NSK), or the central service's root key. Everything else (KEK versions,
//! node identity keys, the central state) is wrapped by that key with
//! [`aead`], so that start-up costs one seal-backend operation whatever the
//! number of keys.

pub mod aead;
pub mod config;
pub mod key;
pub mod memory;
pub mod soft;
#[cfg(feature = "tpm")]
pub mod tpm;

pub use config::{
    open, ConfigProblems, SealerConfig, SealerKind, SoftKeyFile, DEFAULT_TCTI, SOFT_KEY_FILE,
};
pub use key::Key256;

use std::collections::BTreeMap;
use std::fmt;

/// A sealed node sealing key as stored on disk: opaque bytes, framed with the
/// backend that made them so that a blob is never handed to the wrong one.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob {
    /// `"soft"` or `"tpm"`: which backend can unseal it.
    pub backend: String,
    /// Backend-specific bytes. Never the key in the clear.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedBlob({}, {} bytes)",
            self.backend,
            self.bytes.len()
        )
    }
}

const BLOB_MAGIC: &[u8; 4] = b"EKSB";

impl SealedBlob {
    /// `EKSB | len(backend) u8 | backend | bytes`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.backend.len() + self.bytes.len());
        out.extend_from_slice(BLOB_MAGIC);
        // Backend names are short constants; saturate rather than panic.
        let name = &self.backend.as_bytes()[..self.backend.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.bytes);
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Self, SealError> {
        let corrupt = || SealError::CorruptBlob {
            detail: "not an edgekms sealed blob (bad header)".into(),
        };
        let rest = raw.strip_prefix(BLOB_MAGIC).ok_or_else(corrupt)?;
        let (&len, rest) = rest.split_first().ok_or_else(corrupt)?;
        if rest.len() < len as usize {
            return Err(corrupt());
        }
        let (name, bytes) = rest.split_at(len as usize);
        let backend = std::str::from_utf8(name).map_err(|_| corrupt())?.to_owned();
        Ok(Self {
            backend,
            bytes: bytes.to_vec(),
        })
    }
}

/// What a sealer reports about itself, for `kmsctl local tpm` and logs.
/// Never contains secrets.
pub type SealerInfo = BTreeMap<String, String>;

/// Seals and unseals the node sealing key.
///
/// Calls block (a TPM operation takes milliseconds to seconds); async callers
/// run them on a blocking thread. A backend that cannot do an operation fails
/// with [`SealError::Unsupported`].
pub trait Sealer: Send + Sync {
    /// Backend name, as written in the config (`soft`, `tpm`).
    fn name(&self) -> &'static str;
    /// True only when the key is protected by hardware (or a real TPM stack).
    fn is_hardware_backed(&self) -> bool;
    /// Seal `key` so that only this backend on this machine can unseal it.
    fn seal(&self, key: &Key256) -> Result<SealedBlob, SealError>;
    /// Recover the key sealed by [`Sealer::seal`].
    fn unseal(&self, blob: &SealedBlob) -> Result<Key256, SealError>;
    /// Facts for operators: backend, device, manufacturer, policy.
    fn info(&self) -> SealerInfo;
    /// Facts for operators about one sealed key (TPM: the sealed object's
    /// attributes, such as noDA); read from the blob, so cheap.
    fn describe_sealed(&self, _sealed: &SealedBlob) -> SealerInfo {
        SealerInfo::new()
    }
}

/// Checks that `blob` was made by `sealer`'s backend.
pub fn check_backend(sealer: &dyn Sealer, blob: &SealedBlob) -> Result<(), SealError> {
    if blob.backend == sealer.name() {
        Ok(())
    } else {
        Err(SealError::WrongBackend {
            blob: blob.backend.clone(),
            configured: sealer.name().to_owned(),
        })
    }
}

/// Every way sealing can fail, each with what to check.
///
/// Worded for any backend and either daemon: "the machine" is a node
/// (`edgekms-plugin`) or the central service's host (`edgekms-server`).
/// Where a recovery is named, both are: a node recovers its key with the
/// recovery passphrase (`kmsctl local reseal`) or by re-joining; the central
/// service by `edgekms-server restore` of a `kmsctl backup`.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no TPM reachable through {tcti}: {detail} (is the device present and readable, e.g. /dev/tpmrm0, or is the TCTI string (--tpm-tcti) right?)")]
    NoDevice { tcti: String, detail: String },
    #[error("the TPM is in dictionary-attack lockout: {detail} (wait for the lockout to expire or clear it with the lockout auth)")]
    Lockout { detail: String },
    #[error("the TPM refused the owner authorization: {detail} (check the configured owner auth, --tpm-owner-auth-file)")]
    AuthFailed { detail: String },
    #[error("the sealed key belongs to another TPM: {detail} (was the data dir copied from another machine? a node recovers with `kmsctl local reseal` and its recovery passphrase, or by re-joining; the central service by `edgekms-server restore` of a `kmsctl backup`)")]
    ForeignBlob { detail: String },
    #[error("the soft-sealer key file {path} {problem}: restore that file from a backup; else a node recovers with its recovery passphrase (move the file away and run `kmsctl local reseal`, which seals the node key under a new key file) or by re-joining, and the central service by `edgekms-server restore` of a `kmsctl backup`")]
    SoftKeyFile { path: String, problem: String },
    #[error("the sealed key blob is corrupted: {detail} (restore the data dir from a backup; else a node recovers with `kmsctl local reseal` and its recovery passphrase, or by re-joining, and the central service by `edgekms-server restore` of a `kmsctl backup`)")]
    CorruptBlob { detail: String },
    #[error("TPM policy check failed: {reason} (check the machine: firmware, boot loader, Secure Boot; then a node reseals with `kmsctl local reseal`, and the central service recovers by `edgekms-server restore` of a `kmsctl backup`)")]
    PolicyCheckFailed { reason: String },
    #[error("the sealed key was made by the {blob:?} backend but the {configured:?} backend is configured (refusing to switch backends silently: set --sealer to the one the key was sealed with)")]
    WrongBackend { blob: String, configured: String },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TPM {op} failed: {detail}")]
    Tpm { op: &'static str, detail: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trips_and_rejects_garbage() {
        let blob = SealedBlob {
            backend: "tpm".into(),
            bytes: vec![1, 2, 3],
        };
        assert_eq!(SealedBlob::decode(&blob.encode()).ok(), Some(blob));
        assert!(matches!(
            SealedBlob::decode(b"XXXX\x03tpm"),
            Err(SealError::CorruptBlob { .. })
        ));
        assert!(matches!(
            SealedBlob::decode(b"EKSB\x09tpm"),
            Err(SealError::CorruptBlob { .. })
        ));
        assert!(SealedBlob::decode(b"").is_err());
    }
}

#[cfg(test)]
mod proptests;
