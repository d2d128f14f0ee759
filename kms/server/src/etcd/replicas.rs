//! The replicas of a replicated service: their records in etcd and the
//! rules for inviting, admitting and removing one (pure, no I/O).
//!
//! A replica is `invited` by `kmsctl replica add` (a one-time token, kept
//! only as a hash), `active` once it joined with that token (it then has a
//! server certificate, whose key is wrapped by the root key), and
//! `removed` by `kmsctl replica remove`: its certificate and key are
//! dropped, and since every write a replica makes is conditioned on its own
//! record being unchanged, the store refuses its writes from then on.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Invited,
    Active,
    Removed,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Invited => "invited",
            ReplicaState::Active => "active",
            ReplicaState::Removed => "removed",
        }
    }
}

/// `replica/<name>` in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub name: String,
    pub state: ReplicaState,
    pub added_unix: u64,
    /// Invited: SHA-256 of the token's secret, hex, and when it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub token_expires_unix: u64,
    /// Active: the server certificate (DER, hex) and its key wrapped by
    /// the root key (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key: Option<String>,
}

/// `alive/<name>`: written by a serving replica every few seconds under
/// its lease, so that it disappears when the replica stops renewing it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    pub heartbeat_unix: u64,
    /// The address it serves gRPC on.
    pub address: String,
    /// The etcd member that answered its last status request.
    pub etcd_member: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {0} is already active; remove it first (`kmsctl replica remove {0}`)")]
    AlreadyActive(String),
    #[error("no replica is named {0}")]
    Unknown(String),
    #[error("replica {0} was already removed")]
    AlreadyRemoved(String),
    #[error("replica {0} is the last active replica: removing it would leave no one to serve; add another first")]
    Last(String),
    #[error("the replica join token is not valid (unknown, mistyped, used or withdrawn); ask for a new one (`kmsctl replica add`)")]
    BadToken,
    #[error("the replica join token expired at {0} (unix time); ask for a new one (`kmsctl replica add`)")]
    Expired(u64),
    #[error("this service keeps its state in RocksDB, not etcd: replicas need `--store etcd` (see `edgekms-server migrate-store`)")]
    NotReplicated,
}

impl ReplicaRecord {
    /// A new invitation for `name`, replacing a removed record (a name
    /// may be used again once its replica is gone).
    pub fn invite(
        existing: Option<&ReplicaRecord>,
        name: &str,
        token_sha256: String,
        now: u64,
        expires_unix: u64,
    ) -> Result<ReplicaRecord, ReplicaError> {
        if existing.is_some_and(|r| r.state == ReplicaState::Active) {
            return Err(ReplicaError::AlreadyActive(name.to_owned()));
        }
        Ok(ReplicaRecord {
            name: name.to_owned(),
            state: ReplicaState::Invited,
            added_unix: now,
            token_sha256: Some(token_sha256),
            token_expires_unix: expires_unix,
            server_cert: None,
            server_key: None,
        })
    }

    /// Checks a join token's secret (its hash) against the invitation.
    pub fn check_token(&self, secret_sha256: &str, now: u64) -> Result<(), ReplicaError> {
        let matches = self.state == ReplicaState::Invited
            && self
                .token_sha256
                .as_deref()
                .is_some_and(|h| constant_time_eq(h.as_bytes(), secret_sha256.as_bytes()));
        if !matches {
            return Err(ReplicaError::BadToken);
        }
        if now >= self.token_expires_unix {
            return Err(ReplicaError::Expired(self.token_expires_unix));
        }
        Ok(())
    }

    /// The record once joined: the token is spent.
    pub fn admitted(&self, server_cert: &[u8], wrapped_server_key: &[u8]) -> ReplicaRecord {
        ReplicaRecord {
            state: ReplicaState::Active,
            token_sha256: None,
            token_expires_unix: 0,
            server_cert: Some(hex::encode(server_cert)),
            server_key: Some(hex::encode(wrapped_server_key)),
            ..self.clone()
        }
    }

    /// The record once removed, given every replica's record: its keys are
    /// dropped. The last active replica is never removed.
    pub fn removed(&self, all: &[ReplicaRecord]) -> Result<ReplicaRecord, ReplicaError> {
        match self.state {
            ReplicaState::Removed => return Err(ReplicaError::AlreadyRemoved(self.name.clone())),
            ReplicaState::Active => {
                let others = all
                    .iter()
                    .filter(|r| r.state == ReplicaState::Active && r.name != self.name)
                    .count();
                if others == 0 {
                    return Err(ReplicaError::Last(self.name.clone()));
                }
            }
            ReplicaState::Invited => {}
        }
        Ok(ReplicaRecord {
            state: ReplicaState::Removed,
            token_sha256: None,
            token_expires_unix: 0,
            server_cert: None,
            server_key: None,
            ..self.clone()
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn active(name: &str) -> ReplicaRecord {
        ReplicaRecord::invite(None, name, "h".into(), 1, 100)
            .unwrap()
            .admitted(b"cert", b"key")
    }

    #[test]
    fn a_token_admits_once_before_it_expires() {
        let inv = ReplicaRecord::invite(None, "r2", "abc".into(), 10, 100).unwrap();
        assert_eq!(inv.check_token("abd", 50), Err(ReplicaError::BadToken));
        assert_eq!(inv.check_token("abc", 100), Err(ReplicaError::Expired(100)));
        assert_eq!(inv.check_token("abc", 99), Ok(()));
        let joined = inv.admitted(b"c", b"k");
        assert_eq!(joined.state, ReplicaState::Active);
        assert_eq!(joined.check_token("abc", 50), Err(ReplicaError::BadToken));
        assert_eq!(
            ReplicaRecord::invite(Some(&joined), "r2", "x".into(), 1, 2),
            Err(ReplicaError::AlreadyActive("r2".into()))
        );
    }

    #[test]
    fn removal_drops_the_keys_and_never_empties_the_service() {
        let (a, b) = (active("a"), active("b"));
        let all = [a.clone(), b.clone()];
        let gone = a.removed(&all).unwrap();
        assert_eq!(gone.state, ReplicaState::Removed);
        assert!(gone.server_cert.is_none() && gone.server_key.is_none());
        assert_eq!(
            b.removed(&[gone.clone(), b.clone()]),
            Err(ReplicaError::Last("b".into()))
        );
        assert_eq!(
            gone.removed(&all),
            Err(ReplicaError::AlreadyRemoved("a".into()))
        );
        // A removed name can be invited again.
        assert!(ReplicaRecord::invite(Some(&gone), "a", "t".into(), 1, 2).is_ok());
    }

    #[test]
    fn records_round_trip_and_old_fields_default() {
        let r = active("a");
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<ReplicaRecord>(&json).unwrap(), r);
        let minimal: ReplicaRecord =
            serde_json::from_str(r#"{"name":"x","state":"removed","added_unix":3}"#).unwrap();
        assert_eq!(minimal.state, ReplicaState::Removed);
    }
}
