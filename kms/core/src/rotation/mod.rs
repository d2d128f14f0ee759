//! The rotation protocol, both halves: [`cluster`] is what the central
//! service decides per cluster; [`node`] is how a node converges on what
//! it is sent. Both speak [`VersionState`], the one enum for where a KEK
//! version is in its life, mapped to the wire once, at the proto edge.

pub mod cluster;
pub mod node;
pub mod retire;
mod version;

pub use version::{VersionState, DEFAULT_GRACE_SECS, MIN_GRACE_SECS};

#[cfg(test)]
mod tests;
