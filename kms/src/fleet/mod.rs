//! The fleet half of edgekms: what the central service and the nodes share.
//!
//! - [`state`]: the rotation protocol as a pure state machine per cluster.
//! - [`pki`]: the service CA, certificates and the identities they name.
//! - [`tls`]: mutual TLS 1.3 configs, the CA pin, the accept loop.
//!
//! The KEK delivery format is [`crate::delivery`]; the daemon around all of
//! this is [`crate::server`].

pub mod pki;
pub mod state;
pub mod tls;
