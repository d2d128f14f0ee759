//! The node's half of the rotation protocol: how a joined node converges on
//! the state the central service sends ([`super::cluster::Cluster::desired`]
//! on the other side), as one pure function from the keyring it holds to
//! the keyring it must store and publish.
//!
//! A central service restored from an old backup may know versions by
//! number only, or not at all: it may mint another key under a number the
//! node already holds, revive a destroyed version or roll the primary back.
//! So the node names every version by number and key_id together, and
//! refuses (changing nothing) whatever would lose data or take back what it
//! destroyed. Rules, each refused case its own error naming the version(s)
//! and, where two disagree, both key_ids:
//! - every version the service sends is held afterwards, in the state it
//!   names (`pending`, `primary`, `decrypt-only` or `disabled`: held but
//!   refused for Decrypt until restored or destroyed; the service decides);
//!   a version this node lacks must come with its key, which must match
//!   the key_id the service names;
//! - a version the node holds under another key_id than the one sent is
//!   refused, with or without a key: the two sides disagree about what the
//!   version is, and taking either would lose data;
//! - destroyed stays destroyed: the node keeps a tombstone (number and
//!   key_id, no key) of every version it destroyed, and a version sent to
//!   hold that is a tombstone here is refused, whatever its key_id;
//! - the service never sends `retiring` or `retired` as a state to hold;
//! - a version the service names as retired is destroyed here (its
//!   tombstone kept), but only if it is retired under the key_id this node
//!   holds it under: a retire naming another key_id is refused. A retire
//!   without a key_id (a service older than key_ids on retires) goes by
//!   number;
//! - no rollback: a primary older than this node's, or none while this
//!   node has one, is refused (the service always has a primary);
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
    /// Disabled: when the service destroys it (shown, never acted on: the
    /// node destroys only when told).
    pub destroy_after_unix: Option<u64>,
}

/// One version the central service tells this node to destroy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retire<'a> {
    pub version: u32,
    /// The key_id it retires; `None` only from a service that sends
    /// numbers alone (no `retired_keys`).
    pub key_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvergeError {
    #[error("central service sent version {version} as {state}, which a node cannot hold (only pending, primary, decrypt-only or disabled)")]
    NotANodeState { version: u32, state: VersionState },
    #[error("central service names version {version} {sent:?} but this node holds it as {held:?} (was the service restored from a backup?)")]
    KeyIdMismatch {
        version: u32,
        sent: String,
        held: String,
    },
    #[error("central service sends version {version} {sent:?} to hold, but this node destroyed version {version} ({held:?}): a destroyed key is never taken back (was the service restored from a backup?)")]
    Destroyed {
        version: u32,
        sent: String,
        held: String,
    },
    #[error("central service retires version {version} {sent:?} but this node holds it as {held:?}: refusing to destroy a key the service does not name (was the service restored from a backup?)")]
    RetireKeyIdMismatch {
        version: u32,
        sent: String,
        held: String,
    },
    #[error("central service makes version {to} {to_key_id:?} primary, older than this node's primary version {from} {from_key_id:?}: refusing to roll back (was the service restored from an older backup?)")]
    Rollback {
        from: u32,
        from_key_id: String,
        to: u32,
        to_key_id: String,
    },
    #[error("central service sends no primary version, but this node's primary is version {version} {key_id:?}: refusing to stop encrypting under it (was the service restored from a backup?)")]
    PrimaryDropped { version: u32, key_id: String },
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
    retired: &[Retire<'_>],
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
        let kv = match current.get(entry.version) {
            Some(kv) if kv.key().is_none() => {
                return Err(ConvergeError::Destroyed {
                    version: entry.version,
                    sent: entry.key_id.to_owned(),
                    held: kv.key_id.clone(),
                })
            }
            Some(kv) if kv.key_id == entry.key_id => kv
                .in_state(entry.state)
                .with_destroy_after(entry.destroy_after_unix),
            // Even with a key sent: replacing a held key would lose what
            // was written under it.
            Some(kv) => {
                return Err(ConvergeError::KeyIdMismatch {
                    version: entry.version,
                    sent: entry.key_id.to_owned(),
                    held: kv.key_id.clone(),
                })
            }
            None if entry.wrapped_key.is_empty() => {
                return Err(ConvergeError::MissingKey {
                    version: entry.version,
                })
            }
            None => {
                let key = unwrap(entry).map_err(|reason| ConvergeError::Delivery {
                    version: entry.version,
                    reason,
                })?;
                let kv = KeyVersion::new(cluster, entry.version, entry.state, key, now_unix)
                    .with_destroy_after(entry.destroy_after_unix);
                if kv.key_id != entry.key_id {
                    return Err(ConvergeError::KeyIdMismatch {
                        version: entry.version,
                        sent: entry.key_id.to_owned(),
                        held: kv.key_id,
                    });
                }
                kv
            }
        };
        next.insert(kv)?;
    }
    let mut destroyed = Vec::new();
    for kv in current.versions() {
        if mentioned.contains(&kv.version) {
            continue;
        }
        let mut retire = kv.state() == VersionState::Retired;
        for order in retired.iter().filter(|r| r.version == kv.version) {
            match order.key_id {
                Some(sent) if sent != kv.key_id && kv.key().is_some() => {
                    return Err(ConvergeError::RetireKeyIdMismatch {
                        version: kv.version,
                        sent: sent.to_owned(),
                        held: kv.key_id.clone(),
                    })
                }
                _ => retire = true,
            }
        }
        if retire {
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
    if let Some(before) = current.primary() {
        match next.primary() {
            None => {
                return Err(ConvergeError::PrimaryDropped {
                    version: before.version,
                    key_id: before.key_id.clone(),
                })
            }
            Some(after) if after.version < before.version => {
                return Err(ConvergeError::Rollback {
                    from: before.version,
                    from_key_id: before.key_id.clone(),
                    to: after.version,
                    to_key_id: after.key_id.clone(),
                })
            }
            Some(_) => {}
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::keyid;
    use VersionState::*;

    const NOW: u64 = 1_000;

    /// The keys the "service" knows, by version; a sent entry's key is
    /// "delivered" by looking it up (real delivery is tested in
    /// `rotation::tests` and `delivery`).
    struct Service {
        keys: BTreeMap<u32, Key256>,
    }

    impl Service {
        fn new(versions: u32) -> Self {
            Self {
                keys: (1..=versions).map(|v| (v, Key256::generate())).collect(),
            }
        }

        fn key_id(&self, v: u32) -> String {
            keyid::derive("c", v, &self.keys[&v])
        }

        /// `v` in `state`, with its key when `with_key`.
        fn sent(
            &self,
            v: u32,
            state: VersionState,
            with_key: bool,
        ) -> (u32, VersionState, String, bool) {
            (v, state, self.key_id(v), with_key)
        }

        fn converge(
            &self,
            ring: &Keyring,
            sent: &[(u32, VersionState, String, bool)],
            retired: &[Retire<'_>],
        ) -> Result<Converged, ConvergeError> {
            let received: Vec<Received<'_>> = sent
                .iter()
                .map(|(version, state, key_id, with_key)| Received {
                    version: *version,
                    state: *state,
                    key_id,
                    wrapped_key: if *with_key { b"wrapped" } else { b"" },
                    destroy_after_unix: None,
                })
                .collect();
            converge(ring, &received, retired, NOW, |r| {
                self.keys
                    .get(&r.version)
                    .map(|k| Key256::from_bytes(k.expose()))
                    .ok_or_else(|| "no such key".to_owned())
            })
        }
    }

    fn states(ring: &Keyring) -> Vec<(u32, VersionState, bool)> {
        ring.versions()
            .map(|kv| (kv.version, kv.state(), kv.key().is_some()))
            .collect()
    }

    /// A node holding v1 decrypt-only and v2 primary of `service`, and a
    /// tombstone of v3 (a pending version abandoned).
    fn node_of(service: &Service) -> Keyring {
        let mut ring = Keyring::new("c").unwrap();
        let step = service
            .converge(
                &ring,
                &[
                    service.sent(1, DecryptOnly, true),
                    service.sent(2, Primary, true),
                    service.sent(3, Pending, true),
                ],
                &[],
            )
            .unwrap();
        ring = step.keyring;
        let step = service
            .converge(
                &ring,
                &[
                    service.sent(1, DecryptOnly, false),
                    service.sent(2, Primary, false),
                ],
                &[Retire {
                    version: 3,
                    key_id: Some(&service.key_id(3)),
                }],
            )
            .unwrap();
        assert_eq!(step.destroyed, [3]);
        step.keyring
    }

    #[test]
    fn a_destroyed_version_is_never_taken_back() {
        let service = Service::new(3);
        let ring = node_of(&service);
        let held = service.key_id(3);
        let other = keyid::derive("c", 3, &Key256::generate());
        for (what, sent) in [
            ("with its key", service.sent(3, Pending, true)),
            ("without a key", service.sent(3, DecryptOnly, false)),
            ("as the primary", service.sent(3, Primary, true)),
            ("under another key_id", (3, Pending, other.clone(), true)),
        ] {
            let all = [
                service.sent(1, DecryptOnly, false),
                service.sent(2, DecryptOnly, false),
                sent.clone(),
            ];
            let err = service.converge(&ring, &all, &[]).unwrap_err();
            assert_eq!(
                err,
                ConvergeError::Destroyed {
                    version: 3,
                    sent: sent.2.clone(),
                    held: held.clone()
                },
                "{what}"
            );
            let text = err.to_string();
            assert!(text.contains("version 3") && text.contains(&held), "{text}");
        }
        // Unmentioned, it stays a tombstone.
        let step = service
            .converge(
                &ring,
                &[
                    service.sent(1, DecryptOnly, false),
                    service.sent(2, Primary, false),
                ],
                &[],
            )
            .unwrap();
        assert_eq!(states(&step.keyring)[2], (3, Retired, false));
        assert_eq!(step.keyring.get(3).unwrap().key_id, held);
    }

    #[test]
    fn a_held_version_is_never_replaced_by_another_key() {
        let service = Service::new(2);
        let ring = node_of(&Service::new(3));
        // The service's v2 is another key than the node's: even delivered
        // with its key, it is refused and the node's v2 stays.
        let err = service
            .converge(&ring, &[service.sent(2, Primary, true)], &[])
            .unwrap_err();
        let ConvergeError::KeyIdMismatch {
            version,
            sent,
            held,
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!((*version, sent), (2, &service.key_id(2)));
        assert_eq!(held, &ring.get(2).unwrap().key_id);
        assert!(err.to_string().contains(held.as_str()));
    }

    #[test]
    fn a_retire_goes_by_key_id() {
        let service = Service::new(3);
        let ring = node_of(&service);
        let hold = [service.sent(2, Primary, false)];
        let other = keyid::derive("c", 1, &Key256::generate());
        let err = service
            .converge(
                &ring,
                &hold,
                &[Retire {
                    version: 1,
                    key_id: Some(&other),
                }],
            )
            .unwrap_err();
        assert_eq!(
            err,
            ConvergeError::RetireKeyIdMismatch {
                version: 1,
                sent: other.clone(),
                held: service.key_id(1)
            }
        );
        assert!(err.to_string().contains(&other) && err.to_string().contains(&service.key_id(1)));
        assert!(ring.get(1).unwrap().key().is_some(), "nothing destroyed");

        // Named by its key_id, or by number alone (an older service): gone.
        for key_id in [Some(service.key_id(1)), None] {
            let step = service
                .converge(
                    &ring,
                    &hold,
                    &[Retire {
                        version: 1,
                        key_id: key_id.as_deref(),
                    }],
                )
                .unwrap();
            assert_eq!(step.destroyed, [1]);
            assert_eq!(
                states(&step.keyring),
                [(1, Retired, false), (2, Primary, true), (3, Retired, false)]
            );
            assert_eq!(step.keyring.get(1).unwrap().key_id, service.key_id(1));
        }
        // A tombstone retired again under another key_id stays what it was:
        // nothing is destroyed either way.
        let other3 = keyid::derive("c", 3, &Key256::generate());
        let step = service
            .converge(
                &ring,
                &hold,
                &[Retire {
                    version: 3,
                    key_id: Some(&other3),
                }],
            )
            .unwrap();
        assert!(step.destroyed.is_empty());
        assert_eq!(step.keyring.get(3).unwrap().key_id, service.key_id(3));
    }

    #[test]
    fn the_primary_never_goes_back() {
        let service = Service::new(4);
        let ring = node_of(&service);
        // An older primary.
        let err = service
            .converge(
                &ring,
                &[
                    service.sent(1, Primary, false),
                    service.sent(2, DecryptOnly, false),
                ],
                &[],
            )
            .unwrap_err();
        assert_eq!(
            err,
            ConvergeError::Rollback {
                from: 2,
                from_key_id: service.key_id(2),
                to: 1,
                to_key_id: service.key_id(1)
            }
        );
        let text = err.to_string();
        assert!(
            text.contains(&service.key_id(1)) && text.contains(&service.key_id(2)),
            "{text}"
        );
        // No primary at all, or nothing at all.
        let sent_none: [&[_]; 2] = [&[service.sent(2, DecryptOnly, false)], &[]];
        for sent in sent_none {
            assert_eq!(
                service.converge(&ring, sent, &[]).unwrap_err(),
                ConvergeError::PrimaryDropped {
                    version: 2,
                    key_id: service.key_id(2)
                }
            );
        }
        // The same primary, or a newer one, is taken; a node without one
        // takes any.
        let step = service
            .converge(
                &ring,
                &[
                    service.sent(1, DecryptOnly, false),
                    service.sent(2, Primary, false),
                ],
                &[],
            )
            .unwrap();
        assert_eq!(step.promoted, None);
        let step = service
            .converge(
                &ring,
                &[
                    service.sent(2, DecryptOnly, false),
                    service.sent(4, Primary, true),
                ],
                &[],
            )
            .unwrap();
        assert_eq!(step.promoted, Some((Some(2), Some(4))));
        let empty = Keyring::new("c").unwrap();
        let step = service
            .converge(&empty, &[service.sent(1, Primary, true)], &[])
            .unwrap();
        assert_eq!(step.promoted, Some((None, Some(1))));
    }
}
