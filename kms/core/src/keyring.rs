//! The keyring: a node's KEK versions with their keys, moved through the
//! states of [`VersionState`] (its module draws them) by checked
//! transitions. A keyring never holds a `retiring` version: that state
//! exists only centrally. A `disabled` version keeps its key (it can be
//! restored) but Decrypt under it is refused, naming the way back.
//!
//! Exactly one version is primary once any is; promoting a version demotes
//! the old primary in the same step, so readers of one [`Keyring`] value
//! never see two primaries or none. The primary cannot be retired. A retired
//! version keeps its number and key_id (so errors can name it) but its key is
//! gone. Versions are numbered from 1 and never reused.
//!
//! A `Keyring` is a value: callers clone it (keys are shared, not copied),
//! change the clone, persist it, then publish it whole. That is how Status
//! and Encrypt always agree on the key_id.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use edgekms_hsm::Key256;
use zeroize::Zeroizing;

use crate::envelope::{self, EnvelopeError};
use crate::keyid;
use crate::rotation::VersionState;

/// One KEK version.
#[derive(Clone)]
pub struct KeyVersion {
    pub version: u32,
    /// Changed only by [`Keyring`] transitions, which check them.
    state: VersionState,
    pub key_id: String,
    pub created_unix: u64,
    /// `None` once retired.
    key: Option<Arc<Key256>>,
    /// Disabled only: when it is destroyed (unix time).
    destroy_after_unix: Option<u64>,
}

impl fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyVersion")
            .field("version", &self.version)
            .field("state", &self.state)
            .field("key_id", &self.key_id)
            .field("destroy_after_unix", &self.destroy_after_unix)
            .field("key", &self.key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl KeyVersion {
    /// A version holding `key`; its key_id is derived from the key.
    pub fn new(
        cluster: &str,
        version: u32,
        state: VersionState,
        key: Key256,
        created_unix: u64,
    ) -> Self {
        Self {
            version,
            state,
            key_id: keyid::derive(cluster, version, &key),
            created_unix,
            key: state.held_by_nodes().then(|| Arc::new(key)),
            destroy_after_unix: None,
        }
    }

    /// The same version disabled until `destroy_after_unix` (a record read
    /// back from a cache). Only a disabled version has that time.
    pub fn with_destroy_after(self, destroy_after_unix: Option<u64>) -> Self {
        Self {
            destroy_after_unix: destroy_after_unix.filter(|_| self.state == VersionState::Disabled),
            ..self
        }
    }

    /// Disabled only: when it is destroyed.
    pub fn destroy_after_unix(&self) -> Option<u64> {
        self.destroy_after_unix
    }

    /// A retired version: number and id only.
    pub fn retired(version: u32, key_id: String, created_unix: u64) -> Self {
        Self {
            version,
            state: VersionState::Retired,
            key_id,
            created_unix,
            key: None,
            destroy_after_unix: None,
        }
    }

    /// The key, unless retired.
    pub fn key(&self) -> Option<&Key256> {
        self.key.as_deref()
    }

    pub fn state(&self) -> VersionState {
        self.state
    }

    /// A primary version demoted to decrypt-only (a store repairing two
    /// primaries left by an interrupted write keeps the newest).
    pub fn demoted(&self) -> Result<Self, KeyringError> {
        if self.state.can_become(VersionState::DecryptOnly) {
            Ok(self.in_state(VersionState::DecryptOnly))
        } else {
            Err(KeyringError::IllegalTransition {
                version: self.version,
                from: self.state,
                to: VersionState::DecryptOnly,
            })
        }
    }

    /// The same version in `state`, for [`crate::rotation::node`], whose
    /// rules decide which states a node may take from the central service.
    pub(crate) fn in_state(&self, state: VersionState) -> Self {
        Self {
            state,
            destroy_after_unix: self
                .destroy_after_unix
                .filter(|_| state == VersionState::Disabled),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error(transparent)]
    InvalidCluster(#[from] keyid::InvalidName),
    #[error("no primary KEK version is loaded")]
    NoPrimary,
    #[error("KEK version {version} is not known here (key_id {key_id:?}): it was never delivered to this node, or the data comes from another cluster")]
    UnknownVersion { version: u32, key_id: String },
    #[error("KEK version {version} ({key_id}) was retired and its key destroyed: data under it cannot be decrypted (re-encrypt data before retiring a version)")]
    Retired { version: u32, key_id: String },
    #[error("KEK version {version} ({key_id}) is disabled: it was retired and will be destroyed at {} unless restored, so decrypting under it is refused; data is still under it: bring the version back with `kmsctl restore-version CLUSTER {version}` (a standalone node: `kmsctl local restore-version {version}`), then run `kmsctl migrate`", crate::utc::format(*destroy_after_unix))]
    Disabled {
        version: u32,
        key_id: String,
        destroy_after_unix: u64,
    },
    #[error(
        "KEK version {version} is {state}, not disabled: only a disabled version can be restored"
    )]
    NotDisabled { version: u32, state: VersionState },
    #[error("KEK version {version} cannot go from {from} to {to}")]
    IllegalTransition {
        version: u32,
        from: VersionState,
        to: VersionState,
    },
    #[error("KEK version {version} is the primary and cannot be retired: rotate first")]
    RetirePrimary { version: u32 },
    #[error("KEK version {version} is already in the keyring")]
    DuplicateVersion { version: u32 },
    #[error("keyring would hold two primary versions ({0} and {1})")]
    TwoPrimaries(u32, u32),
    #[error("ciphertext is under KEK version {version} whose key_id is {actual:?}, but the request names key_id {requested:?}")]
    KeyIdMismatch {
        version: u32,
        actual: String,
        requested: String,
    },
    #[error("KEK version {version} is retiring, a state only the central service records: a node holds a version or has destroyed it")]
    CentralOnly { version: u32 },
    #[error("KEK version numbers are exhausted")]
    VersionsExhausted,
    #[error("self-test failed: {0}")]
    SelfTest(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// A cluster's KEK versions. See the module documentation.
#[derive(Debug, Clone)]
pub struct Keyring {
    cluster: String,
    versions: BTreeMap<u32, KeyVersion>,
}

impl Keyring {
    pub fn new(cluster: &str) -> Result<Self, KeyringError> {
        keyid::validate_name(cluster)?;
        Ok(Self {
            cluster: cluster.to_owned(),
            versions: BTreeMap::new(),
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Adds a version as stored (used when loading a cache).
    pub fn insert(&mut self, kv: KeyVersion) -> Result<(), KeyringError> {
        if self.versions.contains_key(&kv.version) {
            return Err(KeyringError::DuplicateVersion {
                version: kv.version,
            });
        }
        if kv.state == VersionState::Retiring {
            return Err(KeyringError::CentralOnly {
                version: kv.version,
            });
        }
        if kv.state == VersionState::Primary {
            if let Some(p) = self.primary() {
                return Err(KeyringError::TwoPrimaries(p.version, kv.version));
            }
        }
        self.versions.insert(kv.version, kv);
        Ok(())
    }

    /// The number the next new version gets: one past every version ever
    /// seen, retired ones included, so numbers are never reused.
    pub fn next_version(&self) -> Result<u32, KeyringError> {
        match self.versions.keys().next_back() {
            None => Ok(1),
            Some(v) => v.checked_add(1).ok_or(KeyringError::VersionsExhausted),
        }
    }

    /// Adds `key` as a new pending version and returns its number.
    pub fn add_pending(&mut self, key: Key256, created_unix: u64) -> Result<u32, KeyringError> {
        let version = self.next_version()?;
        let kv = KeyVersion::new(
            &self.cluster,
            version,
            VersionState::Pending,
            key,
            created_unix,
        );
        self.versions.insert(version, kv);
        Ok(version)
    }

    /// Makes pending `version` the primary; the old primary becomes
    /// decrypt-only in the same step.
    pub fn promote(&mut self, version: u32) -> Result<(), KeyringError> {
        self.check(version, VersionState::Primary)?;
        if let Some(old) = self.primary().map(|p| p.version) {
            self.set_state(old, VersionState::DecryptOnly);
        }
        self.set_state(version, VersionState::Primary);
        Ok(())
    }

    /// Destroys `version`'s key: a disabled version (its grace period is
    /// over) or a pending one (abandoned: never written under). The
    /// primary is refused; a decrypt-only version must be disabled first.
    pub fn retire(&mut self, version: u32) -> Result<(), KeyringError> {
        if self.primary().is_some_and(|p| p.version == version) {
            return Err(KeyringError::RetirePrimary { version });
        }
        self.check(version, VersionState::Retired)?;
        if let Some(kv) = self.versions.get_mut(&version) {
            kv.state = VersionState::Retired;
            kv.key = None;
            kv.destroy_after_unix = None;
        }
        Ok(())
    }

    /// Disables decrypt-only `version` until `destroy_after_unix`: it is
    /// kept, but Decrypt under it is refused. The primary is refused.
    pub fn disable(&mut self, version: u32, destroy_after_unix: u64) -> Result<(), KeyringError> {
        if self.primary().is_some_and(|p| p.version == version) {
            return Err(KeyringError::RetirePrimary { version });
        }
        self.check(version, VersionState::Disabled)?;
        if let Some(kv) = self.versions.get_mut(&version) {
            kv.state = VersionState::Disabled;
            kv.destroy_after_unix = Some(destroy_after_unix);
        }
        Ok(())
    }

    /// Brings disabled `version` back to decrypt-only.
    pub fn restore(&mut self, version: u32) -> Result<(), KeyringError> {
        match self.versions.get_mut(&version) {
            Some(kv) if kv.state == VersionState::Disabled => {
                kv.state = VersionState::DecryptOnly;
                kv.destroy_after_unix = None;
                Ok(())
            }
            Some(kv) => Err(KeyringError::NotDisabled {
                version,
                state: kv.state,
            }),
            None => Err(KeyringError::UnknownVersion {
                version,
                key_id: String::new(),
            }),
        }
    }

    /// Disabled versions whose grace period is over at `now`.
    pub fn due_for_destruction(&self, now: u64) -> Vec<u32> {
        self.versions
            .values()
            .filter(|kv| kv.state == VersionState::Disabled)
            .filter(|kv| kv.destroy_after_unix.is_some_and(|t| t <= now))
            .map(|kv| kv.version)
            .collect()
    }

    /// When `version` stopped being primary: on a standalone node, where
    /// every new version is promoted at once, the creation of the next one.
    pub fn superseded_unix(&self, version: u32) -> Option<u64> {
        self.versions
            .range(version.saturating_add(1)..)
            .next()
            .map(|(_, kv)| kv.created_unix)
    }

    fn check(&self, version: u32, to: VersionState) -> Result<(), KeyringError> {
        let kv = self
            .versions
            .get(&version)
            .ok_or(KeyringError::UnknownVersion {
                version,
                key_id: String::new(),
            })?;
        if kv.state.can_become(to) {
            Ok(())
        } else {
            Err(KeyringError::IllegalTransition {
                version,
                from: kv.state,
                to,
            })
        }
    }

    fn set_state(&mut self, version: u32, state: VersionState) {
        if let Some(kv) = self.versions.get_mut(&version) {
            kv.state = state;
        }
    }

    pub fn primary(&self) -> Option<&KeyVersion> {
        self.versions
            .values()
            .find(|kv| kv.state == VersionState::Primary)
    }

    pub fn get(&self, version: u32) -> Option<&KeyVersion> {
        self.versions.get(&version)
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> impl Iterator<Item = &KeyVersion> {
        self.versions.values()
    }

    /// Encrypts under the primary; returns the envelope and the primary's
    /// version (whose key_id the caller reports).
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<(Vec<u8>, &KeyVersion), KeyringError> {
        let primary = self.primary().ok_or(KeyringError::NoPrimary)?;
        let key = primary.key().ok_or(KeyringError::NoPrimary)?;
        let ct = envelope::seal(
            key,
            primary.version,
            &self.cluster,
            &primary.key_id,
            plaintext,
        )?;
        Ok((ct, primary))
    }

    /// Decrypts an envelope under whichever non-retired version its header
    /// names. `key_id` is what Encrypt returned with it.
    pub fn decrypt(
        &self,
        ciphertext: &[u8],
        key_id: &str,
    ) -> Result<(Zeroizing<Vec<u8>>, &KeyVersion), KeyringError> {
        let version = envelope::parse_header(ciphertext)?.kek_version;
        let kv = self
            .versions
            .get(&version)
            .ok_or_else(|| KeyringError::UnknownVersion {
                version,
                key_id: key_id.to_owned(),
            })?;
        let key = kv.key().ok_or_else(|| KeyringError::Retired {
            version,
            key_id: kv.key_id.clone(),
        })?;
        if kv.state == VersionState::Disabled {
            return Err(KeyringError::Disabled {
                version,
                key_id: kv.key_id.clone(),
                destroy_after_unix: kv.destroy_after_unix.unwrap_or_default(),
            });
        }
        if kv.key_id != key_id {
            return Err(KeyringError::KeyIdMismatch {
                version,
                actual: kv.key_id.clone(),
                requested: key_id.to_owned(),
            });
        }
        let plain = envelope::open(key, &self.cluster, &kv.key_id, ciphertext)?;
        Ok((plain, kv))
    }

    /// A round trip under the primary: what healthz "ok" promises.
    pub fn self_test(&self) -> Result<(), KeyringError> {
        const PROBE: &[u8; 32] = b"edgekms self-test probe 32 bytes";
        let (ct, primary) = self.encrypt(PROBE)?;
        let key_id = primary.key_id.clone();
        let (plain, _) = self.decrypt(&ct, &key_id)?;
        if plain.as_slice() == PROBE {
            Ok(())
        } else {
            Err(KeyringError::SelfTest(
                "round trip returned other bytes".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VersionState::*;

    fn ring_with(n: u32) -> Keyring {
        let mut ring = Keyring::new("edge-1").unwrap();
        for _ in 0..n {
            let v = ring.add_pending(Key256::generate(), 0).unwrap();
            ring.promote(v).unwrap();
        }
        ring
    }

    #[test]
    fn transition_table_is_exactly_the_documented_one() {
        let legal = [
            (Pending, Primary),
            (Pending, Retired),
            (Primary, DecryptOnly),
            (DecryptOnly, Disabled),
            (Disabled, DecryptOnly),
            (Disabled, Retiring),
            (Disabled, Retired),
            (Retiring, Retired),
        ];
        for from in VersionState::ALL {
            for to in VersionState::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn promote_demotes_the_old_primary_atomically() {
        let mut ring = ring_with(1);
        let v2 = ring.add_pending(Key256::generate(), 0).unwrap();
        assert_eq!(v2, 2);
        assert_eq!(ring.primary().unwrap().version, 1);
        ring.promote(v2).unwrap();
        assert_eq!(ring.primary().unwrap().version, 2);
        assert_eq!(ring.get(1).unwrap().state, DecryptOnly);
        assert_eq!(ring.versions().filter(|kv| kv.state == Primary).count(), 1);
    }

    #[test]
    fn every_illegal_transition_is_refused() {
        let mut ring = ring_with(2); // v1 decrypt-only, v2 primary
        let v3 = ring.add_pending(Key256::generate(), 0).unwrap();
        let v4 = ring.add_pending(Key256::generate(), 0).unwrap();
        ring.retire(v4).unwrap(); // pending -> retired is legal (abandon)
                                  // primary -> primary, decrypt-only -> primary, retired -> anything
        assert!(matches!(
            ring.promote(2),
            Err(KeyringError::IllegalTransition { from: Primary, .. })
        ));
        assert!(matches!(
            ring.promote(1),
            Err(KeyringError::IllegalTransition {
                from: DecryptOnly,
                ..
            })
        ));
        assert!(matches!(
            ring.promote(v4),
            Err(KeyringError::IllegalTransition { from: Retired, .. })
        ));
        assert!(matches!(
            ring.retire(v4),
            Err(KeyringError::IllegalTransition { from: Retired, .. })
        ));
        assert_eq!(
            ring.retire(2),
            Err(KeyringError::RetirePrimary { version: 2 })
        );
        assert!(matches!(
            ring.promote(99),
            Err(KeyringError::UnknownVersion { version: 99, .. })
        ));
        assert!(matches!(
            ring.retire(99),
            Err(KeyringError::UnknownVersion { version: 99, .. })
        ));
        // Nothing changed through the refusals.
        assert_eq!(ring.get(1).unwrap().state, DecryptOnly);
        assert_eq!(ring.get(2).unwrap().state, Primary);
        assert_eq!(ring.get(v3).unwrap().state, Pending);
        // A decrypt-only version is disabled before it is destroyed.
        assert!(matches!(
            ring.retire(1),
            Err(KeyringError::IllegalTransition {
                from: DecryptOnly,
                to: Retired,
                ..
            })
        ));
        assert_eq!(
            ring.disable(2, 10),
            Err(KeyringError::RetirePrimary { version: 2 })
        );
        ring.disable(1, 10).unwrap();
        ring.retire(1).unwrap();
        assert_eq!(ring.get(1).unwrap().state, Retired);
        assert!(ring.get(1).unwrap().key().is_none());
    }

    #[test]
    fn a_disabled_version_refuses_decrypt_until_restored_and_is_due_after_its_grace() {
        let mut ring = ring_with(1);
        let (ct, kv) = ring.encrypt(b"old seed").unwrap();
        let key_id = kv.key_id.clone();
        let v2 = ring.add_pending(Key256::generate(), 50).unwrap();
        ring.promote(v2).unwrap();
        assert_eq!(ring.superseded_unix(1), Some(50));
        assert_eq!(ring.superseded_unix(2), None);
        ring.disable(1, 1_000).unwrap();
        let err = ring.decrypt(&ct, &key_id).unwrap_err();
        assert!(matches!(
            err,
            KeyringError::Disabled {
                version: 1,
                destroy_after_unix: 1_000,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("kmsctl restore-version CLUSTER 1"), "{msg}");
        assert!(msg.contains("1970-01-01 00:16:40 UTC"), "{msg}");
        // The key is still held: a report names it, restore brings it back.
        assert!(ring.get(1).unwrap().key().is_some());
        assert!(ring.due_for_destruction(999).is_empty());
        assert_eq!(ring.due_for_destruction(1_000), vec![1]);
        ring.restore(1).unwrap();
        assert_eq!(ring.get(1).unwrap().destroy_after_unix(), None);
        assert_eq!(
            ring.decrypt(&ct, &key_id).unwrap().0.as_slice(),
            b"old seed"
        );
        assert!(ring.due_for_destruction(u64::MAX).is_empty());
        assert_eq!(
            ring.restore(1),
            Err(KeyringError::NotDisabled {
                version: 1,
                state: DecryptOnly
            })
        );
        assert_eq!(
            ring.restore(2),
            Err(KeyringError::NotDisabled {
                version: 2,
                state: Primary
            })
        );
    }

    #[test]
    fn version_numbers_are_never_reused() {
        let mut ring = ring_with(2);
        let v3 = ring.add_pending(Key256::generate(), 0).unwrap();
        ring.retire(v3).unwrap();
        assert_eq!(ring.next_version().unwrap(), 4);
        let mut loaded = Keyring::new("edge-1").unwrap();
        loaded
            .insert(KeyVersion::retired(7, "edge-1/v7/00".into(), 0))
            .unwrap();
        assert_eq!(loaded.next_version().unwrap(), 8);
        assert_eq!(
            loaded.insert(KeyVersion::retired(7, "x".into(), 0)),
            Err(KeyringError::DuplicateVersion { version: 7 })
        );
    }

    #[test]
    fn insert_refuses_two_primaries() {
        let mut ring = Keyring::new("edge-1").unwrap();
        ring.insert(KeyVersion::new("edge-1", 1, Primary, Key256::generate(), 0))
            .unwrap();
        assert_eq!(
            ring.insert(KeyVersion::new("edge-1", 2, Primary, Key256::generate(), 0)),
            Err(KeyringError::TwoPrimaries(1, 2))
        );
    }

    #[test]
    fn decrypt_under_every_non_retired_version() {
        let mut ring = ring_with(1);
        let (old, v1) = ring
            .encrypt(b"old seed")
            .map(|(c, kv)| (c, kv.key_id.clone()))
            .unwrap();
        let v2 = ring.add_pending(Key256::generate(), 0).unwrap();
        // Another node may already write under a version still pending here.
        let pending_ct = {
            let mut other = ring.clone();
            other.promote(v2).unwrap();
            other
                .encrypt(b"new seed")
                .map(|(c, kv)| (c, kv.key_id.clone()))
                .unwrap()
        };
        assert_eq!(
            ring.decrypt(&pending_ct.0, &pending_ct.1)
                .unwrap()
                .0
                .as_slice(),
            b"new seed"
        );
        ring.promote(v2).unwrap();
        assert_eq!(ring.decrypt(&old, &v1).unwrap().0.as_slice(), b"old seed");
        ring.disable(1, 0).unwrap();
        ring.retire(1).unwrap();
        assert!(matches!(
            ring.decrypt(&old, &v1),
            Err(KeyringError::Retired { version: 1, .. })
        ));
    }

    #[test]
    fn decrypt_errors_name_the_problem() {
        let ring = ring_with(1);
        let (ct, kv) = ring.encrypt(b"seed").unwrap();
        let key_id = kv.key_id.clone();
        assert!(matches!(
            ring.decrypt(&ct, "edge-1/v1/other"),
            Err(KeyringError::KeyIdMismatch { .. })
        ));
        let mut foreign = ct.clone();
        foreign[6] = 9; // header now names version 9
        assert!(matches!(
            ring.decrypt(&foreign, &key_id),
            Err(KeyringError::UnknownVersion { version: 9, .. })
        ));
        let other_cluster = ring_with(1);
        let (theirs, their_kv) = other_cluster.encrypt(b"seed").unwrap();
        assert!(ring.decrypt(&theirs, &their_kv.key_id).is_err());
        assert!(matches!(
            Keyring::new("edge-1").unwrap().encrypt(b"x"),
            Err(KeyringError::NoPrimary)
        ));
    }

    #[test]
    fn self_test_needs_a_primary() {
        assert!(ring_with(1).self_test().is_ok());
        let mut ring = Keyring::new("edge-1").unwrap();
        ring.add_pending(Key256::generate(), 0).unwrap();
        assert_eq!(ring.self_test(), Err(KeyringError::NoPrimary));
    }

    #[test]
    fn debug_redacts_keys() {
        let ring = ring_with(1);
        let shown = format!("{ring:?}");
        assert!(shown.contains("[redacted]"));
        assert!(!shown.contains(&hex::encode(
            ring.primary().unwrap().key().unwrap().expose()
        )));
    }
}
