//! The central service's errors, and their one mapping to gRPC status.

use tonic::{Code, Status};

use crate::state_store::StoreError;
use edgekms_core::delivery::DeliveryError;
use edgekms_core::keyid::InvalidName;
use edgekms_core::rotation::cluster::FleetError;
use edgekms_daemon::pki::PkiError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error(transparent)]
    Seal(#[from] edgekms_hsm::SealError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("client certificate required: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ServerError {
    pub fn code(&self) -> Code {
        match self {
            ServerError::Fleet(e) => match e {
                FleetError::UnknownCluster(_)
                | FleetError::UnknownNode { .. }
                | FleetError::UnknownVersion { .. } => Code::NotFound,
                FleetError::AlreadyEnrolled { .. } => Code::AlreadyExists,
                FleetError::BadToken
                | FleetError::TokenExpired { .. }
                | FleetError::TokenUsed
                | FleetError::TokenForOtherNode { .. }
                | FleetError::Revoked { .. }
                | FleetError::NotJoined { .. }
                | FleetError::StaleCertificate { .. } => Code::PermissionDenied,
                FleetError::RetirePrimary { .. }
                | FleetError::RetirePending { .. }
                | FleetError::AlreadyRetired { .. }
                | FleetError::AlreadyDisabled { .. }
                | FleetError::NotDisabled { .. }
                | FleetError::InUse { .. }
                | FleetError::NotPending { .. }
                | FleetError::Reconciling { .. }
                | FleetError::NotReconciling(_)
                | FleetError::WrongExcuse { .. } => Code::FailedPrecondition,
                FleetError::NotWanted { .. } => Code::InvalidArgument,
                FleetError::VersionsExhausted(_) => Code::ResourceExhausted,
            },
            ServerError::Store(
                StoreError::Unavailable(_) | StoreError::Unconfirmed(_) | StoreError::Removed(_),
            ) => Code::Unavailable,
            ServerError::Store(StoreError::Conflict { .. }) => Code::Aborted,
            ServerError::Store(_) | ServerError::Seal(_) => Code::Internal,
            ServerError::Pki(PkiError::BadCsr(_)) | ServerError::Pki(PkiError::BadPin(_)) => {
                Code::InvalidArgument
            }
            ServerError::Pki(PkiError::Generate(_))
            | ServerError::Pki(PkiError::BadCertificate) => Code::Internal,
            ServerError::Delivery(DeliveryError::BadPublicKey) => Code::InvalidArgument,
            ServerError::Delivery(
                DeliveryError::BadPrivateKey
                | DeliveryError::Malformed { .. }
                | DeliveryError::Open { .. }
                | DeliveryError::KeyIdMismatch { .. },
            ) => Code::Internal,
            ServerError::Name(_) | ServerError::InvalidArgument(_) => Code::InvalidArgument,
            ServerError::Unauthenticated(_) => Code::Unauthenticated,
            ServerError::PermissionDenied(_) => Code::PermissionDenied,
            ServerError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServerError::ShuttingDown => Code::Unavailable,
        }
    }
}

impl ServerError {
    /// A short fixed name of the kind of failure, for counting refusals
    /// (never caller text).
    pub fn class(&self) -> &'static str {
        match self {
            ServerError::Fleet(e) => match e {
                FleetError::UnknownCluster(_) => "unknown-cluster",
                FleetError::UnknownNode { .. } => "unknown-node",
                FleetError::UnknownVersion { .. } => "unknown-version",
                FleetError::AlreadyEnrolled { .. } => "already-enrolled",
                FleetError::BadToken => "bad-token",
                FleetError::TokenExpired { .. } => "token-expired",
                FleetError::TokenUsed => "token-used",
                FleetError::TokenForOtherNode { .. } => "token-for-other-node",
                FleetError::Revoked { .. } => "revoked",
                FleetError::NotJoined { .. } => "not-joined",
                FleetError::StaleCertificate { .. } => "stale-certificate",
                _ => "fleet",
            },
            ServerError::Name(_) => "invalid-name",
            ServerError::Unauthenticated(_) => "unauthenticated",
            ServerError::PermissionDenied(_) => "permission-denied",
            ServerError::FailedPrecondition(_) => "failed-precondition",
            ServerError::InvalidArgument(_) => "invalid-argument",
            ServerError::Pki(_) => "bad-csr",
            ServerError::Delivery(_) => "bad-delivery-key",
            ServerError::Store(StoreError::Unavailable(_) | StoreError::Unconfirmed(_)) => {
                "store-unavailable"
            }
            ServerError::Store(_) | ServerError::Seal(_) => "internal",
            ServerError::ShuttingDown => "shutting-down",
        }
    }
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        // Errors can quote caller input (a cluster name of any length):
        // the caller gets it back escaped and bounded.
        Status::new(code, edgekms_daemon::logfmt::bounded(&e.to_string(), 512))
    }
}
