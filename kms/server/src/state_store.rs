//! The seam between the central service and where its state lives: the
//! [`StateStore`] trait. Everything above it (the commit path, node
//! streams, operator views, backup) names no database; [`crate::rocks`]
//! is the embedded default, and a replicated store (etcd) implements the
//! same trait.
//!
//! The contract is the one etcd gives, so that several service replicas
//! can share one store:
//! - every read of a cluster comes with the [`Revision`] it was read at;
//! - a [`Batch`] of typed operations is applied atomically, and only if
//!   every cluster it names is still at the revision the caller read
//!   (optimistic concurrency: otherwise [`StoreError::Conflict`], and the
//!   caller reads again and retries);
//! - [`StateStore::watch`] tells every subscriber which cluster changed,
//!   whoever changed it;
//! - audit records get their sequence numbers from the store;
//! - [`StateStore::snapshot`] is one consistent cut, for backups.
//!
//! Key material crosses this seam only as [`Key256`]; the store wraps
//! every key under the root key before it reaches the disk.

use edgekms_core::rotation::cluster::Cluster;
use edgekms_daemon::durable::DurableError;
use edgekms_daemon::pki::PrivateKey;
use edgekms_hsm::Key256;
use tokio::sync::broadcast;

/// A cluster record's revision: grows with every write of the record; 0
/// means "does not exist".
pub type Revision = u64;

/// One operation of a [`Batch`].
pub enum Op {
    /// Writes a cluster record.
    PutCluster(Cluster),
    /// Stores a new KEK version's key (wrapped by the store under the root
    /// key, bound to its slot and key_id).
    PutKek {
        cluster: String,
        version: u32,
        key_id: String,
        key: Key256,
    },
    /// Destroys the central copy of a KEK version.
    DeleteKek { cluster: String, version: u32 },
}

/// Operations applied together or not at all, if every `(cluster,
/// revision)` in `expect` still holds.
#[derive(Default)]
pub struct Batch {
    pub expect: Vec<(String, Revision)>,
    pub ops: Vec<Op>,
}

/// A cluster changed (or was created) at `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub cluster: String,
    pub revision: Revision,
    /// The record as of `revision`, when the store has it at hand (an
    /// etcd watch event carries it): a follower need not read it again.
    pub record: Option<std::sync::Arc<Cluster>>,
}

/// The service's TLS identity: CA and server certificates and keys.
pub struct Identity {
    pub ca_cert: Vec<u8>,
    pub ca_key: PrivateKey,
    pub server_cert: Vec<u8>,
    pub server_key: PrivateKey,
}

/// A KEK version's central copy, unwrapped (a backup holds it).
pub struct Kek {
    pub cluster: String,
    pub version: u32,
    pub key_id: String,
    pub key: Key256,
}

/// One consistent cut of the whole state.
pub struct Snapshot {
    pub identity: Identity,
    pub clusters: Vec<Cluster>,
    pub keks: Vec<Kek>,
    /// Audit records, oldest first (empty unless asked for).
    pub audit: Vec<Vec<u8>>,
}

/// A visitor of audit records `(seq, json)`; returns whether to go on.
pub type AuditVisitor<'a> = &'a mut dyn FnMut(u64, &[u8]) -> bool;

pub trait StateStore: Send + Sync {
    /// The service's identity, its private keys unwrapped with `root`.
    fn identity(&self, root: &Key256) -> Result<Identity, StoreError>;

    /// Every cluster with its revision.
    fn clusters(&self) -> Result<Vec<(Cluster, Revision)>, StoreError>;

    /// One cluster with its revision.
    fn cluster(&self, name: &str) -> Result<Option<(Cluster, Revision)>, StoreError>;

    /// KEK `version` of `cluster`, unwrapped with `root`; `None` once
    /// destroyed.
    fn kek(
        &self,
        root: &Key256,
        cluster: &str,
        version: u32,
        key_id: &str,
    ) -> Result<Option<Key256>, StoreError>;

    /// Applies `batch` atomically and durably, or refuses it with
    /// [`StoreError::Conflict`] when a cluster it expects moved on.
    /// Returns the new revision of every cluster written.
    fn apply(&self, root: &Key256, batch: Batch) -> Result<Vec<Changed>, StoreError>;

    /// Every change applied from now on, by anyone.
    fn watch(&self) -> broadcast::Receiver<Changed>;

    /// Appends an audit record; returns its sequence number.
    fn append_audit(&self, json: &[u8]) -> Result<u64, StoreError>;

    /// Audit records from `from` on, oldest first.
    fn audit_scan(&self, from: u64, visit: AuditVisitor<'_>) -> Result<(), StoreError>;

    /// Audit records from `upto` down, newest first.
    fn audit_scan_back(&self, upto: u64, visit: AuditVisitor<'_>) -> Result<(), StoreError>;

    /// The oldest and the newest audit sequence numbers kept.
    fn audit_bounds(&self) -> Result<Option<(u64, u64)>, StoreError>;

    /// Deletes the audit records below `below` (retention).
    fn delete_audit_below(&self, below: u64) -> Result<(), StoreError>;

    /// The whole state at one point, unwrapped with `root`.
    fn snapshot(&self, root: &Key256, with_audit: bool) -> Result<Snapshot, StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("state store: {0}")]
    Backend(String),
    #[error("state record {key} is corrupted: {detail}")]
    Corrupt { key: String, detail: String },
    #[error(
        "state record {key} does not open with the root key (tampered, or from another server)"
    )]
    Unwrap { key: String },
    #[error(transparent)]
    Seal(#[from] edgekms_hsm::SealError),
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("{0} is not initialized: run `edgekms-server init --data-dir {0}` first")]
    NotInitialized(String),
    #[error("{dir} is not empty ({why}); refusing to overwrite its keys: a new root key is made only in an empty directory. To keep its keys, serve it; to start afresh, move it away and use a new directory")]
    NotEmpty { dir: String, why: String },
    #[error("refusing to start: {what} (file {file}); {recover}", recover = crate::rocks::copies::RECOVER)]
    Unrecoverable { what: String, file: String },
    #[error("cluster {cluster} changed while this change was being made; try again")]
    Conflict { cluster: String },
    /// The replicated store cannot be reached or has no quorum: nothing
    /// was changed, and nodes keep serving their cached keys.
    #[error("the state store is unavailable ({0}); nothing was changed, and nodes keep serving their cached keys; try again once it is back")]
    Unavailable(String),
    /// A write was sent but not confirmed (a replicated store that lost
    /// quorum meanwhile): it may still be applied once the store is back.
    #[error("the state store did not confirm this change ({0}): it may still be applied once the store has quorum again, so check `kmsctl status` before repeating it; nodes keep serving their cached keys")]
    Unconfirmed(String),
    /// This replica was removed (`kmsctl replica remove`): the store
    /// refuses its writes.
    #[error("this replica ({0}) was removed from the service; the store refuses its writes")]
    Removed(String),
}

/// The behaviour every [`StateStore`] must show, run against each
/// implementation's own test (`rocks.rs`; a replicated store's too).
#[cfg(test)]
pub(crate) mod conformance {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use edgekms_core::rotation::cluster::Cluster;

    fn put(c: &Cluster, expect: Revision) -> Batch {
        Batch {
            expect: vec![(c.name().to_owned(), expect)],
            ops: vec![Op::PutCluster(c.clone())],
        }
    }

    /// The next change announced, waiting up to 5 s.
    fn next_change(rx: &mut broadcast::Receiver<Changed>) -> Changed {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match rx.try_recv() {
                Ok(c) => return c,
                Err(broadcast::error::TryRecvError::Empty)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("no change announced: {e}"),
            }
        }
    }

    /// `store` is initialized with its identity wrapped by `root`, and
    /// holds no cluster and no audit record yet.
    pub fn run(store: &dyn StateStore, root: &Key256) {
        let mut changes = store.watch();
        assert!(store.clusters().unwrap().is_empty());
        assert!(store.cluster("a").unwrap().is_none());

        // Created only if absent; a second create conflicts.
        let a = Cluster::new("a", "a/v1/x".into(), 1);
        let kek = Key256::generate();
        let mut batch = put(&a, 0);
        batch.ops.push(Op::PutKek {
            cluster: "a".into(),
            version: 1,
            key_id: "a/v1/x".into(),
            key: Key256::from_bytes(kek.expose()),
        });
        let changed = store.apply(root, batch).unwrap();
        assert_eq!(changed.len(), 1);
        let rev = changed[0].revision;
        assert!(rev > 0);
        // Announced (at once, or through the store's own watch), with the
        // record when the store has it at hand.
        let heard = next_change(&mut changes);
        assert_eq!((&heard.cluster, heard.revision), (&changed[0].cluster, rev));
        assert!(heard.record.as_deref().is_none_or(|c| *c == a));
        assert!(matches!(
            store.apply(root, put(&a, 0)),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(store.cluster("a").unwrap(), Some((a.clone(), rev)));
        assert!(store.kek(root, "a", 1, "a/v1/x").unwrap().unwrap() == kek);
        assert!(store.kek(root, "a", 2, "a/v2/x").unwrap().is_none());

        // A write conditioned on a stale revision changes nothing.
        let mut a2 = a.clone();
        a2.rotate("a/v2/y".into(), 2).unwrap();
        let rev2 = store.apply(root, put(&a2, rev)).unwrap()[0].revision;
        assert!(rev2 > rev);
        let mut stale = a.clone();
        stale.rotate("a/v2/z".into(), 3).unwrap();
        assert!(matches!(
            store.apply(root, put(&stale, rev)),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(store.cluster("a").unwrap(), Some((a2.clone(), rev2)));
        // Nor does any operation of a refused batch.
        let mut refused = put(&stale, rev);
        refused.ops.push(Op::DeleteKek {
            cluster: "a".into(),
            version: 1,
        });
        assert!(store.apply(root, refused).is_err());
        assert!(store.kek(root, "a", 1, "a/v1/x").unwrap().is_some());

        // Destroyed keys are gone; other clusters are independent.
        let b = Cluster::new("b", "b/v1/x".into(), 1);
        let batch = Batch {
            expect: vec![("a".into(), rev2), ("b".into(), 0)],
            ops: vec![
                Op::DeleteKek {
                    cluster: "a".into(),
                    version: 1,
                },
                Op::PutCluster(a2.clone()),
                Op::PutCluster(b.clone()),
            ],
        };
        let changed = store.apply(root, batch).unwrap();
        assert_eq!(changed.len(), 2);
        assert!(store.kek(root, "a", 1, "a/v1/x").unwrap().is_none());
        let names: Vec<String> = store
            .clusters()
            .unwrap()
            .into_iter()
            .map(|(c, _)| c.name().to_owned())
            .collect();
        assert_eq!(names, ["a", "b"]);

        // Audit: numbered by the store, read both ways, trimmed.
        assert_eq!(store.audit_bounds().unwrap(), None);
        let seqs: Vec<u64> = (0..5)
            .map(|i| {
                store
                    .append_audit(format!("{{\"n\":{i}}}").as_bytes())
                    .unwrap()
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(store.audit_bounds().unwrap(), Some((seqs[0], seqs[4])));
        let mut forward = Vec::new();
        store
            .audit_scan(seqs[1], &mut |seq, _| {
                forward.push(seq);
                true
            })
            .unwrap();
        assert_eq!(forward, seqs[1..]);
        let mut back = Vec::new();
        store
            .audit_scan_back(u64::MAX, &mut |seq, _| {
                back.push(seq);
                back.len() < 2
            })
            .unwrap();
        assert_eq!(back, [seqs[4], seqs[3]]);
        store.delete_audit_below(seqs[2]).unwrap();
        assert_eq!(store.audit_bounds().unwrap(), Some((seqs[2], seqs[4])));

        // One consistent cut, keys unwrapped.
        let snap = store.snapshot(root, true).unwrap();
        assert_eq!(snap.clusters, [a2, b]);
        assert_eq!(
            snap.keks.len(),
            0,
            "a's v1 was destroyed, none other stored"
        );
        assert_eq!(snap.audit.len(), 3);
        assert!(store.snapshot(root, false).unwrap().audit.is_empty());
    }
}
