//! Wire definitions, generated at build time from `proto/`.
//!
//! - [`kms_v2`]: the Kubernetes KMS v2 plugin API (`package v2`), byte for
//!   byte what kube-apiserver speaks.
//! - [`admin`]: the node plugin's local admin API used by `kmsctl local`.
//! - [`fleet`]: the central key service: node join and sync, operator API.
//! - [`convert`]: the one mapping of version states (and of retire
//!   orders) between the core and the wire.

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod kms_v2 {
    tonic::include_proto!("v2");
}

/// Nested as the packages are, so that the admin API's references to
/// fleet messages (`edgekms.fleet.v1.Census`) resolve.
#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod edgekms {
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("edgekms.admin.v1");
        }
    }
    pub mod fleet {
        pub mod v1 {
            tonic::include_proto!("edgekms.fleet.v1");
        }
    }
}

pub use edgekms::admin::v1 as admin;
pub use edgekms::fleet::v1 as fleet;

pub mod convert;
pub mod uds;
