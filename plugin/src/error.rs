//! The node's error type and its one mapping to gRPC status codes.
//!
//! Every variant of every wrapped error is matched by name (no `_` arm), so a
//! new error cannot reach kube-apiserver as UNKNOWN by accident. Messages say
//! what was wrong and what to check; they never contain key material.

use edgekms_core::envelope::EnvelopeError;
use edgekms_core::rotation::node::ConvergeError;
use edgekms_core::KeyringError;
use edgekms_hsm::SealError;
use tonic::{Code, Status};

use crate::cache::CacheError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("key material is not available: {0}")]
    Unavailable(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// Refused in the present state (a retire the census does not allow).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("recovery refused: {0}")]
    Recovery(String),
}

/// A refused instruction of the central service is the service's bad
/// argument; a keyring error keeps its own code.
impl From<ConvergeError> for NodeError {
    fn from(e: ConvergeError) -> Self {
        match e {
            ConvergeError::Keyring(e) => NodeError::Keyring(e),
            ConvergeError::NotANodeState { .. }
            | ConvergeError::KeyIdMismatch { .. }
            | ConvergeError::Destroyed { .. }
            | ConvergeError::RetireKeyIdMismatch { .. }
            | ConvergeError::Rollback { .. }
            | ConvergeError::PrimaryDropped { .. }
            | ConvergeError::MissingKey { .. }
            | ConvergeError::Duplicate { .. }
            | ConvergeError::Delivery { .. } => NodeError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<EnvelopeError> for NodeError {
    fn from(e: EnvelopeError) -> Self {
        NodeError::Keyring(e.into())
    }
}

fn envelope_code(e: &EnvelopeError) -> Code {
    match e {
        EnvelopeError::EmptyPlaintext
        | EnvelopeError::PlaintextTooLarge { .. }
        | EnvelopeError::Truncated { .. }
        | EnvelopeError::CiphertextTooLarge { .. }
        | EnvelopeError::BadMagic
        | EnvelopeError::UnsupportedFormat(_)
        | EnvelopeError::AuthenticationFailed { .. } => Code::InvalidArgument,
    }
}

fn keyring_code(e: &KeyringError) -> Code {
    match e {
        KeyringError::Envelope(e) => envelope_code(e),
        KeyringError::KeyIdMismatch { .. } => Code::InvalidArgument,
        KeyringError::UnknownVersion { .. } => Code::NotFound,
        KeyringError::Retired { .. }
        | KeyringError::Disabled { .. }
        | KeyringError::NotDisabled { .. }
        | KeyringError::IllegalTransition { .. }
        | KeyringError::RetirePrimary { .. } => Code::FailedPrecondition,
        KeyringError::DuplicateVersion { .. } => Code::AlreadyExists,
        KeyringError::VersionsExhausted => Code::ResourceExhausted,
        KeyringError::NoPrimary => Code::Unavailable,
        KeyringError::InvalidCluster(_)
        | KeyringError::TwoPrimaries(..)
        | KeyringError::CentralOnly { .. }
        | KeyringError::SelfTest(_) => Code::Internal,
    }
}

fn seal_code(e: &SealError) -> Code {
    match e {
        SealError::NoDevice { .. } | SealError::Lockout { .. } => Code::Unavailable,
        SealError::AuthFailed { .. } => Code::PermissionDenied,
        SealError::PolicyCheckFailed { .. } | SealError::SoftKeyFile { .. } => {
            Code::FailedPrecondition
        }
        SealError::ForeignBlob { .. }
        | SealError::CorruptBlob { .. }
        | SealError::WrongBackend { .. }
        | SealError::Io { .. }
        | SealError::Tpm { .. }
        | SealError::Config(_) => Code::Internal,
        SealError::Unsupported(_) => Code::Unimplemented,
    }
}

fn store_code(e: &CacheError) -> Code {
    match e {
        CacheError::Keyring(e) => keyring_code(e),
        CacheError::Seal(e) => seal_code(e),
        CacheError::Db { .. }
        | CacheError::Rocks(_)
        | CacheError::ClusterMismatch { .. }
        | CacheError::Corrupt { .. }
        | CacheError::Unwrap { .. }
        | CacheError::Durable(_)
        | CacheError::Damaged(_)
        | CacheError::NoCluster { .. } => Code::Internal,
    }
}

impl NodeError {
    pub fn code(&self) -> Code {
        match self {
            NodeError::Keyring(e) => keyring_code(e),
            NodeError::Cache(e) => store_code(e),
            NodeError::Seal(e) => seal_code(e),
            NodeError::Unavailable(_) => Code::Unavailable,
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::Recovery(_) => Code::PermissionDenied,
        }
    }
}

/// Longest status message sent back: errors can quote caller input (an
/// unknown `key_id` of any length), which the caller already has.
pub const STATUS_MESSAGE_LIMIT: usize = 512;

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        Status::new(
            e.code(),
            edgekms_daemon::logfmt::bounded(&e.to_string(), STATUS_MESSAGE_LIMIT),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_invalid_argument_and_names_the_problem() {
        let s: Status = NodeError::from(EnvelopeError::PlaintextTooLarge { len: 2000 }).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("2000"));
        let s: Status = NodeError::from(KeyringError::Retired {
            version: 3,
            key_id: "c/v3/ab".into(),
        })
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("retired"));
    }

    #[test]
    fn caller_input_in_a_status_is_bounded_and_escaped() {
        let key_id = format!("c/v1/\n{}", "a".repeat(4 << 20));
        let s: Status = NodeError::from(KeyringError::KeyIdMismatch {
            version: 1,
            actual: "c/v1/ab".into(),
            requested: key_id,
        })
        .into();
        assert!(
            s.message().len() < STATUS_MESSAGE_LIMIT + 64,
            "{}",
            s.message().len()
        );
        assert!(s.message().contains("…[truncated"), "{}", s.message());
        assert!(!s.message().contains('\n'));
    }
}
