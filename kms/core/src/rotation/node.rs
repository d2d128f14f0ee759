//! The node's half of the rotation protocol: how a joined node converges on
//! the state the central service sends ([`super::cluster::Cluster::desired`]
//! on the other side), as one pure function from the keyring it holds to
//! the keyring it must store and publish.
//!
//! Rules, each refused case an error that names the version:
//! - every version the service sends is held afterwards, in the state it
//!   names (`pending`, `primary` or `decrypt-only`; the service decides);
//!   a version this node lacks must come with its key, which must match
//!   the key_id the service names;
//! - a version the node holds under another key_id than the one sent is
//!   refused: the two sides disagree about what the version is (a service
//!   restored from an older backup), and taking either would lose data;
//! - the service never sends `retiring` or `retired` as a state to hold;
//! - a version the service names as retired is destroyed here (its number
//!   and key_id are kept, its key is gone);
//! - a version the service does not mention is kept, demoted to
//!   decrypt-only if it was primary: keys are destroyed only when told.

use std::collections::BTreeSet;

use edgekms_hsm::Key256;

use super::VersionState;
use crate::keyring::{KeyVersion, Keyring, KeyringError};

/// One version as the central service sent it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub version: u32,
    pub state: VersionState,
    pub key_id: &'a str,
    /// The key wrapped to this node, or empty when the service knows the
    /// node holds it.
    pub wrapped_key: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvergeError {
    #[error("central service sent version {version} as {state}, which a node cannot hold (only pending, primary or decrypt-only)")]
    NotANodeState { version: u32, state: VersionState },
    #[error("central service names version {version} {sent:?} but this node holds it as {held:?} (was the service restored from a backup?)")]
    KeyIdMismatch {
        version: u32,
        sent: String,
        held: String,
    },
    #[error("central service did not send the key of version {version} that this node lacks")]
    MissingKey { version: u32 },
    #[error("central service sent version {version} twice")]
    Duplicate { version: u32 },
    #[error("the key delivered for version {version} does not open: {reason}")]
    Delivery { version: u32, reason: String },
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

/// What converging produced: the next keyring, and what changed.
#[derive(Debug)]
pub struct Converged {
    pub keyring: Keyring,
    /// The primary before and after, when it changed.
    pub promoted: Option<(Option<u32>, Option<u32>)>,
    /// Versions whose key was destroyed by this step.
    pub destroyed: Vec<u32>,
}

/// Converges `current` on what the service sent (`versions` to hold,
/// `retired` to destroy). `unwrap` opens a delivered key for a version;
/// it is called only for versions this node lacks.
pub fn converge(
    current: &Keyring,
    versions: &[Received<'_>],
    retired: &[u32],
    now_unix: u64,
    mut unwrap: impl FnMut(&Received<'_>) -> Result<Key256, String>,
) -> Result<Converged, ConvergeError> {
    let cluster = current.cluster();
    let mut next = Keyring::new(cluster)?;
    let mut mentioned = BTreeSet::new();
    for entry in versions {
        if !entry.state.held_by_nodes() {
            return Err(ConvergeError::NotANodeState {
                version: entry.version,
                state: entry.state,
            });
        }
        if !mentioned.insert(entry.version) {
            return Err(ConvergeError::Duplicate {
                version: entry.version,
            });
        }
        let held = current.get(entry.version).filter(|kv| kv.key().is_some());
        let kv = match held {
            Some(kv) if kv.key_id == entry.key_id => kv.in_state(entry.state),
            // A retired version sent again with its key is taken back: the
            // service is the authority on what nodes hold.
            _ if !entry.wrapped_key.is_empty() => {
                let key = unwrap(entry).map_err(|reason| ConvergeError::Delivery {
                    version: entry.version,
                    reason,
                })?;
                let kv = KeyVersion::new(cluster, entry.version, entry.state, key, now_unix);
                if kv.key_id != entry.key_id {
                    return Err(ConvergeError::KeyIdMismatch {
                        version: entry.version,
                        sent: entry.key_id.to_owned(),
                        held: kv.key_id,
                    });
                }
                kv
            }
            Some(kv) => {
                return Err(ConvergeError::KeyIdMismatch {
                    version: entry.version,
                    sent: entry.key_id.to_owned(),
                    held: kv.key_id.clone(),
                })
            }
            None => {
                return Err(ConvergeError::MissingKey {
                    version: entry.version,
                })
            }
        };
        next.insert(kv)?;
    }
    let mut destroyed = Vec::new();
    for kv in current.versions() {
        if mentioned.contains(&kv.version) {
            continue;
        }
        if retired.contains(&kv.version) || kv.state() == VersionState::Retired {
            if kv.key().is_some() {
                destroyed.push(kv.version);
            }
            next.insert(KeyVersion::retired(
                kv.version,
                kv.key_id.clone(),
                kv.created_unix,
            ))?;
        } else if kv.state() == VersionState::Primary {
            next.insert(kv.in_state(VersionState::DecryptOnly))?;
        } else {
            next.insert(kv.clone())?;
        }
    }
    if next.primary().is_some() {
        next.self_test()?;
    }
    let before = current.primary().map(|p| p.version);
    let after = next.primary().map(|p| p.version);
    Ok(Converged {
        keyring: next,
        promoted: (before != after).then_some((before, after)),
        destroyed,
    })
}
