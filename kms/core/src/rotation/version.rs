//! Where a KEK version is in its life: the one enum that the keyring, the
//! central service's records, the node and (through one mapping at the
//! proto edge) the wire all use.
//!
//! ```text
//!   pending ──promote──▶ primary ──(next promote)──▶ decrypt-only
//!      │                                              │     ▲
//!      │                                       retire │     │ restore-version
//!      │                                              ▼     │
//!      │                                            disabled (grace period:
//!      │                                              │     │  Decrypt refused)
//!      │                  (central) grace period over │     │ grace period over
//!      │                                              ▼     │ (standalone node)
//!      │                                          retiring  │
//!      │                                              │     │
//!      └─────────retire (abandon)──▶ retired ◀────────┴─────┘
//! ```
//!
//! Retiring never destroys at once: a retired version is first disabled
//! (kept, refused for Decrypt, restorable) and destroyed only once its
//! grace period is over ([`MIN_GRACE_SECS`], [`DEFAULT_GRACE_SECS`]). A
//! pending version was never written under, so abandoning it destroys it
//! at once.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The shortest grace period a retired version is kept disabled for.
pub const MIN_GRACE_SECS: u64 = 3600;
/// The grace period when the operator names none: 7 days.
pub const DEFAULT_GRACE_SECS: u64 = 7 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VersionState {
    /// Delivered (or being delivered) but not yet used for writing;
    /// readable. Becomes primary once every node holds it.
    Pending,
    /// The one version Encrypt uses.
    Primary,
    /// A former primary, kept so that old data stays readable.
    DecryptOnly,
    /// Retired by the operator, not yet destroyed: held everywhere, but
    /// Decrypt under it is refused until it is restored or destroyed.
    Disabled,
    /// Central only: nodes are told to destroy it; the central copy goes
    /// once they all did.
    Retiring,
    /// Destroyed. Terminal.
    Retired,
}

impl VersionState {
    pub const ALL: [VersionState; 6] = [
        VersionState::Pending,
        VersionState::Primary,
        VersionState::DecryptOnly,
        VersionState::Disabled,
        VersionState::Retiring,
        VersionState::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Pending => "pending",
            VersionState::Primary => "primary",
            VersionState::DecryptOnly => "decrypt-only",
            VersionState::Disabled => "disabled",
            VersionState::Retiring => "retiring",
            VersionState::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether `self -> to` is a legal step of an operation (promote,
    /// retire). A node converging on the central service's state follows
    /// [`crate::rotation::node`]'s rules instead.
    pub fn can_become(self, to: VersionState) -> bool {
        use VersionState::*;
        matches!(
            (self, to),
            (Pending, Primary)
                | (Pending, Retired)
                | (Primary, DecryptOnly)
                | (DecryptOnly, Disabled)
                | (Disabled, DecryptOnly)
                | (Disabled, Retiring)
                | (Disabled, Retired)
                | (Retiring, Retired)
        )
    }

    /// Whether nodes must hold this version's key.
    pub fn held_by_nodes(self) -> bool {
        matches!(
            self,
            VersionState::Pending
                | VersionState::Primary
                | VersionState::DecryptOnly
                | VersionState::Disabled
        )
    }

    /// Whether data under a version in this state can be decrypted.
    pub fn can_decrypt(self) -> bool {
        self.held_by_nodes() && self != VersionState::Disabled
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
