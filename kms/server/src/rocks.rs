//! The embedded [`StateStore`]: RocksDB under `<data-dir>/state`, and a
//! second copy of every record that cannot be re-derived under
//! `<data-dir>/copies` (one checksummed file per record, see
//! [`edgekms_daemon::durable`] and [`copies`]).
//!
//! | key | value | copy (`copies/…`) |
//! | --- | --- | --- |
//! | `meta/root` | the central root key, sealed by the configured sealer | `meta%2Froot` |
//! | `meta/ca-cert`, `meta/server-cert` | DER certificates | `meta%2Fca-cert`, `meta%2Fserver-cert` |
//! | `meta/ca-key`, `meta/server-key` | PKCS#8 private keys wrapped by the root key | `meta%2Fca-key`, `meta%2Fserver-key` |
//! | `cluster/<name>` | a [`Cluster`] record, JSON (metadata only) | `cluster%2F<name>` |
//! | `kek/<cluster>/<version u32 BE>` | a KEK version wrapped by the root key | `kek%2F<cluster>%2F<version>`; a tombstone once destroyed |
//! | `audit/<seq u64 BE>` | one audit record, JSON | none |
//!
//! Wrapping is AES-256-GCM under the root key, with associated data naming
//! the record, so a wrapped value cannot be moved to another slot. Every
//! state change writes the record copies first (synced), then one synced
//! RocksDB batch: a cluster record and the KEK records it implies land
//! together or not at all, and a copy is never older than an acknowledged
//! write. [`Store::open`] reconciles the two, or rebuilds RocksDB from the
//! copies, or refuses to start (see [`copies`]).

pub mod copies;

use std::path::Path;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use edgekms_hsm::{aead, Key256, SealedBlob};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use tokio::sync::broadcast;

pub use self::copies::{probe, Probe, COPIES_DIR, STATE_DIR};
use self::copies::{Slot, Value};
use crate::state_store::{
    AuditVisitor, Batch, Changed, Identity, Kek, Op, Revision, Snapshot, StateStore, StoreError,
};
use edgekms_core::rotation::cluster::Cluster;
use edgekms_daemon::durable::RecordFiles;
use edgekms_daemon::pki::PrivateKey;

const ROOT: &[u8] = b"meta/root";
const CA_CERT: &[u8] = b"meta/ca-cert";
const CA_KEY: &[u8] = b"meta/ca-key";
const SERVER_CERT: &[u8] = b"meta/server-cert";
const SERVER_KEY: &[u8] = b"meta/server-key";
const CLUSTER_PREFIX: &[u8] = b"cluster/";
const KEK_PREFIX: &[u8] = b"kek/";
const AUDIT_PREFIX: &[u8] = b"audit/";

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The embedded state store. Writes are synced before they return.
pub struct Store {
    db: DB,
    files: RecordFiles,
    /// Serializes [`StateStore::apply`]'s check-then-write, and holds each
    /// cluster's revision (counted from this process's start: one process
    /// owns a RocksDB store, so no other writer can move them).
    revisions: Mutex<Revisions>,
    audit_seq: AtomicU64,
    changes: broadcast::Sender<Changed>,
}

#[derive(Default)]
struct Revisions {
    last: Revision,
    of: HashMap<String, Revision>,
}

impl Revisions {
    fn of(&mut self, cluster: &str) -> Revision {
        if let Some(r) = self.of.get(cluster) {
            return *r;
        }
        // First read of a stored record: any revision above every one
        // handed out so far.
        self.last += 1;
        self.of.insert(cluster.to_owned(), self.last);
        self.last
    }
}

/// How many changes a slow watcher may lag before it is told to reload.
const WATCH_BACKLOG: usize = 4096;

fn kek_key(cluster: &str, version: u32) -> Vec<u8> {
    let mut key = KEK_PREFIX.to_vec();
    key.extend_from_slice(cluster.as_bytes());
    key.push(b'/');
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn audit_key(seq: u64) -> Vec<u8> {
    let mut key = AUDIT_PREFIX.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn audit_seq_of(key: &[u8]) -> Option<u64> {
    key.strip_prefix(AUDIT_PREFIX)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

fn cluster_key(cluster: &str) -> Vec<u8> {
    let mut key = CLUSTER_PREFIX.to_vec();
    key.extend_from_slice(cluster.as_bytes());
    key
}

pub(crate) fn aad(record: &[u8], key_id: &str) -> Vec<u8> {
    let mut aad = b"edgekms central v1\0".to_vec();
    aad.extend_from_slice(&(record.len() as u32).to_be_bytes());
    aad.extend_from_slice(record);
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

fn printable(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// One atomic change: cluster records, KEKs added and destroyed.
#[derive(Default)]
pub struct Change {
    batch: WriteBatch,
    /// Record copies, written before the batch.
    copies: Vec<(Slot, Value)>,
}

impl Change {
    pub fn put_cluster(&mut self, cluster: &Cluster) -> Result<(), StoreError> {
        let json = serde_json::to_vec(cluster).map_err(|e| StoreError::Corrupt {
            key: printable(&cluster_key(cluster.name())),
            detail: e.to_string(),
        })?;
        self.batch.put(cluster_key(cluster.name()), &json);
        self.copies
            .push((Slot::Cluster(cluster.name().to_owned()), Value::Live(json)));
        Ok(())
    }

    pub fn put_kek(
        &mut self,
        root: &Key256,
        cluster: &str,
        version: u32,
        key_id: &str,
        kek: &Key256,
    ) {
        let key = kek_key(cluster, version);
        let wrapped = aead::seal(root, &aad(&key, key_id), kek.expose());
        self.batch.put(key, &wrapped);
        self.copies
            .push((Slot::Kek(cluster.to_owned(), version), Value::Live(wrapped)));
    }

    /// Destroys the central copy of a KEK version; its record file becomes
    /// a tombstone, so a lost RocksDB write cannot bring it back.
    pub fn delete_kek(&mut self, cluster: &str, version: u32) {
        self.batch.delete(kek_key(cluster, version));
        self.copies
            .push((Slot::Kek(cluster.to_owned(), version), Value::Destroyed));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    fn assemble(db: DB, files: RecordFiles) -> Result<Self, StoreError> {
        let store = Self {
            db,
            files,
            revisions: Mutex::new(Revisions::default()),
            audit_seq: AtomicU64::new(0),
            changes: broadcast::channel(WATCH_BACKLOG).0,
        };
        store
            .audit_seq
            .store(store.last_audit_seq()?, Ordering::SeqCst);
        Ok(store)
    }

    /// Opens an initialized data dir's state for serving: strict RocksDB,
    /// reconciled with the record copies, or rebuilt from them (see
    /// [`copies`]); never creates a key.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        copies::open(data_dir)
    }

    /// Creates the state of a new data dir (`init`, `restore`). Refuses a
    /// dir that is not provably empty; writes the marker first.
    pub fn create(data_dir: &Path) -> Result<Self, StoreError> {
        copies::create(data_dir)
    }

    fn sync() -> WriteOptions {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        opts
    }

    /// Writes the change's record copies, then its RocksDB batch. Order:
    /// new KEKs, clusters, tombstones; so a crash in between never leaves a
    /// cluster copy naming a version whose key copy is not written yet or
    /// already a tombstone (a kill -9 in the rotation loop found the
    /// latter).
    pub fn commit(&self, change: Change) -> Result<(), StoreError> {
        let mut records = change.copies;
        records.sort_by_key(|(slot, value)| match (slot, value) {
            (_, Value::Destroyed) => 2,
            (Slot::Cluster(_), _) => 1,
            _ => 0,
        });
        let named: Vec<(String, &[u8])> = records
            .iter()
            .map(|(slot, value)| (slot.name(), copies::encode_copy(value)))
            .collect();
        self.files
            .put_all(named.iter().map(|(n, b)| (n.as_str(), *b)))?;
        self.db.write_opt(change.batch, &Self::sync())?;
        Ok(())
    }

    pub fn initialized(&self) -> Result<bool, StoreError> {
        Ok(self.db.get(ROOT)?.is_some())
    }

    /// Whether the store holds no record at all (a restore's target).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        match self.db.iterator(IteratorMode::Start).next() {
            None => Ok(true),
            Some(item) => item.map(|_| false).map_err(StoreError::from),
        }
    }

    /// Writes what `init` made, in one batch.
    pub fn put_init(
        &self,
        sealed_root: &SealedBlob,
        root: &Key256,
        ca_cert: &[u8],
        ca_key: &PrivateKey,
        server_cert: &[u8],
        server_key: &PrivateKey,
    ) -> Result<(), StoreError> {
        let records: [(&[u8], Vec<u8>); 5] = [
            (ROOT, sealed_root.encode()),
            (CA_CERT, ca_cert.to_vec()),
            (CA_KEY, aead::seal(root, &aad(CA_KEY, ""), ca_key.der())),
            (SERVER_CERT, server_cert.to_vec()),
            (
                SERVER_KEY,
                aead::seal(root, &aad(SERVER_KEY, ""), server_key.der()),
            ),
        ];
        let names: Vec<String> = records.iter().map(|(k, _)| printable(k)).collect();
        self.files.put_all(
            names
                .iter()
                .zip(&records)
                .map(|(name, (_, value))| (name.as_str(), &value[..])),
        )?;
        let mut batch = WriteBatch::default();
        for (key, value) in &records {
            batch.put(key, value);
        }
        self.db.write_opt(batch, &Self::sync())?;
        Ok(())
    }

    fn required(&self, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.db.get(key)?.ok_or_else(|| StoreError::Corrupt {
            key: printable(key),
            detail: "missing (was `edgekms-server init` run on this data dir?)".into(),
        })
    }

    pub fn sealed_root(&self) -> Result<SealedBlob, StoreError> {
        Ok(SealedBlob::decode(&self.required(ROOT)?)?)
    }

    fn unwrap_key(&self, root: &Key256, key: &[u8]) -> Result<PrivateKey, StoreError> {
        let plain = aead::open(root, &aad(key, ""), &self.required(key)?).map_err(|_| {
            StoreError::Unwrap {
                key: printable(key),
            }
        })?;
        Ok(PrivateKey::from_der(plain.to_vec()))
    }

    /// `(CA cert, CA key, server cert, server key)`.
    pub fn identity(
        &self,
        root: &Key256,
    ) -> Result<(Vec<u8>, PrivateKey, Vec<u8>, PrivateKey), StoreError> {
        Ok((
            self.required(CA_CERT)?,
            self.unwrap_key(root, CA_KEY)?,
            self.required(SERVER_CERT)?,
            self.unwrap_key(root, SERVER_KEY)?,
        ))
    }

    /// Every cluster record.
    pub fn cluster_records(&self) -> Result<Vec<Cluster>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(CLUSTER_PREFIX, Direction::Forward))
        {
            let (key, value) = item?;
            if !key.starts_with(CLUSTER_PREFIX) {
                break;
            }
            out.push(
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    key: printable(&key),
                    detail: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// KEK `version` of `cluster`, unwrapped; None once destroyed.
    pub fn read_kek(
        &self,
        root: &Key256,
        cluster: &str,
        version: u32,
        key_id: &str,
    ) -> Result<Option<Key256>, StoreError> {
        let key = kek_key(cluster, version);
        let Some(wrapped) = self.db.get(&key)? else {
            return Ok(None);
        };
        let plain =
            aead::open(root, &aad(&key, key_id), &wrapped).map_err(|_| StoreError::Unwrap {
                key: format!("kek/{cluster}/{version}"),
            })?;
        Key256::from_slice(&plain)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("kek/{cluster}/{version}"),
                detail: "not a 256-bit key".into(),
            })
    }

    /// Whether the central copy of a KEK version still exists.
    pub fn has_kek(&self, cluster: &str, version: u32) -> Result<bool, StoreError> {
        Ok(self.db.get_pinned(kek_key(cluster, version))?.is_some())
    }

    /// Appends an audit record. Not synced on its own: the next state
    /// change syncs the log up to it.
    pub fn put_audit(&self, seq: u64, json: &[u8]) -> Result<(), StoreError> {
        self.db.put(audit_key(seq), json)?;
        Ok(())
    }

    /// Appends many audit records in one unsynced batch (a restore, tests
    /// that need a long log fast), numbered from `first`.
    pub fn put_audit_batch<'a>(
        &self,
        first: u64,
        records: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (i, json) in records.into_iter().enumerate() {
            batch.put(audit_key(first + i as u64), json);
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// The last audit sequence number used.
    pub fn last_audit_seq(&self) -> Result<u64, StoreError> {
        let mut upper = AUDIT_PREFIX.to_vec();
        upper.extend_from_slice(&u64::MAX.to_be_bytes());
        for item in self
            .db
            .iterator(IteratorMode::From(&upper, Direction::Reverse))
        {
            let (key, _) = item?;
            if !key.starts_with(AUDIT_PREFIX) {
                break;
            }
            // A damaged key is passed over: answering 0 would make the next
            // records overwrite the oldest ones.
            if let Some(seq) = audit_seq_of(&key) {
                return Ok(seq);
            }
        }
        Ok(0)
    }

    /// Every audit record, oldest first, passed to `f` until it says stop.
    pub fn audit_records(&self, mut f: impl FnMut(&[u8]) -> bool) -> Result<(), StoreError> {
        self.audit_scan(0, |_, raw| f(raw))
    }

    /// Audit records from sequence number `from` on, oldest first, passed
    /// with their sequence number to `f` until it says stop. One iterator:
    /// memory stays flat however long the log.
    pub fn audit_scan(
        &self,
        from: u64,
        mut f: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let start = audit_key(from);
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item?;
            if !key.starts_with(AUDIT_PREFIX) {
                break;
            }
            // A damaged key hides only its own record, not the rest.
            let Some(seq) = audit_seq_of(&key) else {
                continue;
            };
            if !f(seq, &value) {
                break;
            }
        }
        Ok(())
    }

    /// Audit records newest first, from sequence number `upto` down,
    /// passed to `f` until it says stop.
    pub fn audit_scan_back(
        &self,
        upto: u64,
        mut f: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let start = audit_key(upto);
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Reverse))
        {
            let (key, value) = item?;
            let Some(seq) = audit_seq_of(&key) else {
                break;
            };
            if !f(seq, &value) {
                break;
            }
        }
        Ok(())
    }

    /// The oldest audit sequence number kept, if any.
    pub fn first_audit_seq(&self) -> Result<Option<u64>, StoreError> {
        let mut first = None;
        self.audit_scan(0, |seq, _| {
            first = Some(seq);
            false
        })?;
        Ok(first)
    }

    /// Deletes every audit record below sequence number `below` (oldest
    /// first: retention), in one synced range delete, then compacts the
    /// range so that the disk space comes back now rather than at some
    /// later compaction.
    pub fn delete_audit_below(&self, below: u64) -> Result<(), StoreError> {
        let (from, to) = (audit_key(0), audit_key(below));
        let mut batch = WriteBatch::default();
        batch.delete_range(&from, &to);
        self.db.write_opt(batch, &Self::sync())?;
        self.db.compact_range(Some(&from), Some(&to));
        Ok(())
    }
}

impl StateStore for Store {
    fn identity(&self, root: &Key256) -> Result<Identity, StoreError> {
        let (ca_cert, ca_key, server_cert, server_key) = Store::identity(self, root)?;
        Ok(Identity {
            ca_cert,
            ca_key,
            server_cert,
            server_key,
        })
    }

    fn clusters(&self) -> Result<Vec<(Cluster, Revision)>, StoreError> {
        let mut revisions = lock(&self.revisions);
        Ok(self
            .cluster_records()?
            .into_iter()
            .map(|c| {
                let rev = revisions.of(c.name());
                (c, rev)
            })
            .collect())
    }

    fn cluster(&self, name: &str) -> Result<Option<(Cluster, Revision)>, StoreError> {
        let mut revisions = lock(&self.revisions);
        let key = cluster_key(name);
        let Some(raw) = self.db.get(&key)? else {
            return Ok(None);
        };
        let c = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt {
            key: printable(&key),
            detail: e.to_string(),
        })?;
        Ok(Some((c, revisions.of(name))))
    }

    fn kek(
        &self,
        root: &Key256,
        cluster: &str,
        version: u32,
        key_id: &str,
    ) -> Result<Option<Key256>, StoreError> {
        self.read_kek(root, cluster, version, key_id)
    }

    fn apply(&self, root: &Key256, batch: Batch) -> Result<Vec<Changed>, StoreError> {
        let mut revisions = lock(&self.revisions);
        for (cluster, expected) in &batch.expect {
            let exists = self.db.get_pinned(cluster_key(cluster))?.is_some();
            let now = if exists { revisions.of(cluster) } else { 0 };
            if now != *expected {
                return Err(StoreError::Conflict {
                    cluster: cluster.clone(),
                });
            }
        }
        let mut change = Change::default();
        let mut written = Vec::new();
        for op in &batch.ops {
            match op {
                Op::PutCluster(c) => {
                    change.put_cluster(c)?;
                    written.push(c.name().to_owned());
                }
                Op::PutKek {
                    cluster,
                    version,
                    key_id,
                    key,
                } => change.put_kek(root, cluster, *version, key_id, key),
                Op::DeleteKek { cluster, version } => change.delete_kek(cluster, *version),
            }
        }
        self.commit(change)?;
        let changed: Vec<Changed> = written
            .into_iter()
            .map(|cluster| {
                revisions.last += 1;
                let revision = revisions.last;
                revisions.of.insert(cluster.clone(), revision);
                Changed {
                    cluster,
                    revision,
                    record: None,
                }
            })
            .collect();
        drop(revisions);
        for c in &changed {
            // No subscriber is not an error.
            let _ = self.changes.send(c.clone());
        }
        Ok(changed)
    }

    fn watch(&self) -> broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    fn append_audit(&self, json: &[u8]) -> Result<u64, StoreError> {
        let seq = self.audit_seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.put_audit(seq, json)?;
        Ok(seq)
    }

    fn audit_scan(&self, from: u64, visit: AuditVisitor<'_>) -> Result<(), StoreError> {
        Store::audit_scan(self, from, visit)
    }

    fn audit_scan_back(&self, upto: u64, visit: AuditVisitor<'_>) -> Result<(), StoreError> {
        Store::audit_scan_back(self, upto, visit)
    }

    fn audit_bounds(&self) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(match self.first_audit_seq()? {
            Some(first) => Some((first, self.last_audit_seq()?)),
            None => None,
        })
    }

    fn delete_audit_below(&self, below: u64) -> Result<(), StoreError> {
        Store::delete_audit_below(self, below)
    }

    fn snapshot(&self, root: &Key256, with_audit: bool) -> Result<Snapshot, StoreError> {
        // Every apply holds this lock: what is read under it is one cut.
        let revisions = lock(&self.revisions);
        let identity = StateStore::identity(self, root)?;
        let clusters = self.cluster_records()?;
        let mut keks = Vec::new();
        for c in &clusters {
            for (&version, meta) in c.versions() {
                // Retired versions have no central copy any more.
                if let Some(key) = self.read_kek(root, c.name(), version, &meta.key_id)? {
                    keks.push(Kek {
                        cluster: c.name().to_owned(),
                        version,
                        key_id: meta.key_id.clone(),
                        key,
                    });
                }
            }
        }
        drop(revisions);
        let mut audit = Vec::new();
        if with_audit {
            Store::audit_scan(self, 0, |_, raw| {
                audit.push(raw.to_vec());
                true
            })?;
        }
        Ok(Snapshot {
            identity,
            clusters,
            keks,
            audit,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A created store with a (fake) root record and identity, so that it
    /// opens again.
    fn initialized(dir: &Path) -> Store {
        let store = Store::create(dir).unwrap();
        let root = Key256::generate();
        let blob = SealedBlob {
            backend: "soft".into(),
            bytes: vec![7; 40],
        };
        let key = PrivateKey::from_der(vec![1; 50]);
        store
            .put_init(&blob, &root, b"ca", &key, b"server", &key)
            .unwrap();
        store
    }

    #[test]
    fn the_embedded_store_meets_the_state_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        let root = Key256::generate();
        let blob = SealedBlob {
            backend: "soft".into(),
            bytes: vec![7; 40],
        };
        let key = PrivateKey::from_der(vec![1; 50]);
        store
            .put_init(&blob, &root, b"ca", &key, b"server", &key)
            .unwrap();
        crate::state_store::conformance::run(&store, &root);
    }

    #[test]
    fn keks_are_wrapped_bound_and_destroyable() {
        let dir = tempfile::tempdir().unwrap();
        let store = initialized(dir.path());
        let root = Key256::generate();
        let kek = Key256::generate();
        let cluster = Cluster::new("a", "a/v1/x".into(), 1);
        let mut change = Change::default();
        change.put_cluster(&cluster).unwrap();
        change.put_kek(&root, "a", 1, "a/v1/x", &kek);
        store.commit(change).unwrap();
        assert_eq!(store.kek(&root, "a", 1, "a/v1/x").unwrap().unwrap(), kek);
        assert!(matches!(
            store.kek(&root, "a", 1, "a/v1/other"),
            Err(StoreError::Unwrap { .. })
        ));
        assert!(matches!(
            store.kek(&Key256::generate(), "a", 1, "a/v1/x"),
            Err(StoreError::Unwrap { .. })
        ));
        assert_eq!(store.cluster_records().unwrap(), [cluster]);
        let mut change = Change::default();
        change.delete_kek("a", 1);
        store.commit(change).unwrap();
        assert!(store.kek(&root, "a", 1, "a/v1/x").unwrap().is_none());
        assert!(!store.has_kek("a", 1).unwrap());
    }

    #[test]
    fn audit_sequence_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = initialized(dir.path());
            assert_eq!(store.last_audit_seq().unwrap(), 0);
            store.put_audit(1, b"{}").unwrap();
            store.put_audit(2, b"{\"x\":1}").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_audit_seq().unwrap(), 2);
        let mut seen = Vec::new();
        store
            .audit_records(|r| {
                seen.push(r.to_vec());
                true
            })
            .unwrap();
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn a_damaged_audit_key_does_not_reset_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        store.put_audit(1, b"{}").unwrap();
        store.put_audit(2, b"{}").unwrap();
        // Nine bytes after the prefix: sorts after audit/2, parses as nothing.
        let mut bad = audit_key(2);
        bad.push(0);
        store.db.put(bad, b"{}").unwrap();
        assert_eq!(store.last_audit_seq().unwrap(), 2);
    }

    #[test]
    fn audit_range_delete_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        for seq in 1..=1000 {
            store.put_audit(seq, b"{}").unwrap();
        }
        store.delete_audit_below(901).unwrap();
        assert_eq!(store.first_audit_seq().unwrap(), Some(901));
        assert_eq!(store.last_audit_seq().unwrap(), 1000);
        let mut n = 0;
        store
            .audit_records(|_| {
                n += 1;
                true
            })
            .unwrap();
        assert_eq!(n, 100);
        let mut back = Vec::new();
        store
            .audit_scan_back(950, |seq, _| {
                back.push(seq);
                back.len() < 3
            })
            .unwrap();
        assert_eq!(back, [950, 949, 948]);
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod recovery_tests {
    //! Opening a damaged state: real RocksDB, real record files.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::copies::{Slot, TOMBSTONE};
    use super::*;
    use edgekms_core::VersionState;

    struct Fixture {
        dir: tempfile::TempDir,
        root: Key256,
    }

    impl Fixture {
        /// A data dir with cluster `a`: v1 destroyed, v2 decrypt-only, v3
        /// primary.
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::create(dir.path()).unwrap();
            let root = Key256::generate();
            let blob = SealedBlob {
                backend: "soft".into(),
                bytes: vec![7; 40],
            };
            let key = PrivateKey::from_der(vec![1; 50]);
            store
                .put_init(&blob, &root, b"ca", &key, b"server", &key)
                .unwrap();
            let mut cluster = Cluster::new("a", "a/v1/x".into(), 1);
            let mut change = Change::default();
            change.put_kek(&root, "a", 1, "a/v1/x", &Key256::generate());
            change.put_cluster(&cluster).unwrap();
            store.commit(change).unwrap();
            for v in 2..=3 {
                cluster.rotate(format!("a/v{v}/x"), 2).unwrap();
                let mut change = Change::default();
                change.put_kek(&root, "a", v, &format!("a/v{v}/x"), &Key256::generate());
                change.put_cluster(&cluster).unwrap();
                store.commit(change).unwrap();
            }
            cluster
                .retire(1, 3, edgekms_core::rotation::cluster::Retirement::AT_ONCE)
                .unwrap();
            let mut change = Change::default();
            change.delete_kek("a", 1);
            change.put_cluster(&cluster).unwrap();
            store.commit(change).unwrap();
            Self { dir, root }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        fn copy(&self, name: &str) -> PathBuf {
            RecordFiles::open(&self.path().join(COPIES_DIR))
                .unwrap()
                .path(name)
        }

        /// Opens and checks that nothing was lost.
        fn assert_intact(&self) -> Store {
            let store = Store::open(self.path()).unwrap();
            let c = store.cluster_records().unwrap();
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].primary().unwrap().0, 3);
            assert_eq!(c[0].versions()[&1].state, VersionState::Retired);
            assert!(store.kek(&self.root, "a", 1, "a/v1/x").unwrap().is_none());
            for v in 2..=3 {
                assert!(store
                    .kek(&self.root, "a", v, &format!("a/v{v}/x"))
                    .unwrap()
                    .is_some());
            }
            assert!(store.sealed_root().is_ok());
            store
        }
    }

    use std::path::PathBuf;

    fn refused(dir: &Path) -> String {
        match Store::open(dir) {
            Err(e @ StoreError::Unrecoverable { .. }) => e.to_string(),
            Err(e) => panic!("not the refusal: {e}"),
            Ok(_) => panic!("opened"),
        }
    }

    /// Puts cluster `a` back at v1 primary in RocksDB only, as a lost WAL
    /// would.
    fn rewind_cluster(store: &Store) {
        let old = Cluster::new("a", "a/v1/x".into(), 1);
        store
            .db
            .put(cluster_key("a"), serde_json::to_vec(&old).unwrap())
            .unwrap();
    }

    #[test]
    fn a_copy_that_verifies_wins_over_an_older_rocksdb_record() {
        let f = Fixture::new();
        {
            // RocksDB lost the last writes (as with a deleted WAL): the
            // cluster is back at v1 primary and v1's key is still there.
            let store = Store::open(f.path()).unwrap();
            rewind_cluster(&store);
            let wrapped = aead::seal(
                &f.root,
                &aad(&kek_key("a", 1), "a/v1/x"),
                Key256::generate().expose(),
            );
            store.db.put(kek_key("a", 1), wrapped).unwrap();
            store.db.delete(kek_key("a", 3)).unwrap();
        }
        f.assert_intact();
    }

    #[test]
    fn a_missing_or_damaged_copy_is_written_again_from_rocksdb() {
        let f = Fixture::new();
        let kek = f.copy("kek/a/3");
        let good = std::fs::read(&kek).unwrap();
        std::fs::remove_file(&kek).unwrap();
        let cluster = f.copy("cluster/a");
        let mut raw = std::fs::read(&cluster).unwrap();
        raw[10] ^= 0x01;
        std::fs::write(&cluster, raw).unwrap();
        drop(f.assert_intact());
        assert_eq!(std::fs::read(&kek).unwrap(), good);
        assert!(edgekms_daemon::durable::decode_record(
            "cluster/a",
            &std::fs::read(&cluster).unwrap()
        )
        .is_ok());
        // The tombstone too.
        let tomb = f.copy("kek/a/1");
        std::fs::remove_file(&tomb).unwrap();
        drop(f.assert_intact());
        // (RocksDB has no record of a destroyed version: nothing to rewrite.)
        assert!(!tomb.exists());
    }

    #[test]
    fn a_damaged_copy_without_a_good_twin_is_refused() {
        let f = Fixture::new();
        {
            let store = Store::open(f.path()).unwrap();
            store.db.delete(kek_key("a", 3)).unwrap();
        }
        let kek = f.copy("kek/a/3");
        std::fs::write(&kek, b"garbage").unwrap();
        let err = refused(f.path());
        assert!(err.contains("kek/a/3"), "{err}");
        assert!(err.contains("edgekms-server restore"), "{err}");
        // Nothing was changed.
        assert_eq!(std::fs::read(&kek).unwrap(), b"garbage");
    }

    #[test]
    fn a_lost_cluster_copy_with_an_older_rocksdb_record_is_refused() {
        let f = Fixture::new();
        {
            let store = Store::open(f.path()).unwrap();
            rewind_cluster(&store);
        }
        std::fs::remove_file(f.copy("cluster/a")).unwrap();
        let err = refused(f.path());
        assert!(err.contains("last rotations would be lost"), "{err}");
    }

    #[test]
    fn a_tombstone_keeps_a_destroyed_key_destroyed() {
        let f = Fixture::new();
        assert_eq!(
            edgekms_daemon::durable::decode_record(
                "kek/a/1",
                &std::fs::read(f.copy("kek/a/1")).unwrap()
            )
            .unwrap(),
            TOMBSTONE
        );
        f.assert_intact();
    }

    #[test]
    fn an_unopenable_rocksdb_is_moved_aside_and_rebuilt_from_the_copies() {
        let f = Fixture::new();
        std::fs::remove_file(f.path().join(STATE_DIR).join("CURRENT")).unwrap();
        f.assert_intact();
        let aside: Vec<_> = std::fs::read_dir(f.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.damaged-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
    }

    #[test]
    fn an_unopenable_rocksdb_without_complete_copies_is_refused_unchanged() {
        for lost in ["meta/root", "meta/ca-key", "kek/a/3", "cluster/a"] {
            let f = Fixture::new();
            std::fs::remove_file(f.path().join(STATE_DIR).join("CURRENT")).unwrap();
            std::fs::remove_file(f.copy(lost)).unwrap();
            let err = refused(f.path());
            assert!(err.contains("cannot replace it"), "{lost}: {err}");
            assert!(f.path().join(STATE_DIR).exists());
            assert_eq!(std::fs::read_dir(f.path()).unwrap().count(), 3, "{lost}");
        }
    }

    #[test]
    fn serving_and_creating_never_make_a_fresh_state() {
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::open(empty.path()),
            Err(StoreError::NotInitialized(_))
        ));
        let f = Fixture::new();
        assert!(matches!(
            Store::create(f.path()),
            Err(StoreError::NotEmpty { .. })
        ));
        // Only the marker left: neither served nor created anew.
        std::fs::remove_dir_all(f.path().join(STATE_DIR)).unwrap();
        std::fs::remove_dir_all(f.path().join(COPIES_DIR)).unwrap();
        assert!(refused(f.path()).contains("gone"));
        assert!(matches!(
            Store::create(f.path()),
            Err(StoreError::NotEmpty { .. })
        ));
    }

    #[test]
    fn a_data_dir_from_before_copies_is_backfilled() {
        let f = Fixture::new();
        std::fs::remove_dir_all(f.path().join(COPIES_DIR)).unwrap();
        std::fs::remove_file(f.path().join(edgekms_daemon::durable::MARKER)).unwrap();
        let state = f.path().join(STATE_DIR);
        let mut old = Vec::new();
        for e in std::fs::read_dir(&state).unwrap() {
            let p = e.unwrap().path();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            old.push(p);
        }
        drop(f.assert_intact());
        assert!(edgekms_daemon::durable::has_marker(f.path()));
        assert!(f.copy("meta/root").exists());
        assert!(f.copy("kek/a/3").exists());
        // (Files RocksDB makes anew or replaces, like LOG and OPTIONS,
        // follow the umask: 077 in the daemon, see tests/faults_server.rs.)
        for p in old
            .iter()
            .filter(|p| p.exists() && p.extension().is_some_and(|e| e == "sst" || e == "log"))
        {
            let meta = std::fs::metadata(p).unwrap();
            if meta.is_file() {
                assert_eq!(
                    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077,
                    0
                );
            }
        }
        // Damage found after the backfill is repaired as usual.
        std::fs::remove_file(f.copy("kek/a/2")).unwrap();
        f.assert_intact();
        assert!(f.copy("kek/a/2").exists());
    }

    #[test]
    fn slots_are_named_alike_in_rocksdb_and_in_files() {
        let slot = Slot::Kek("edge-1".into(), 258);
        assert_eq!(slot.name(), "kek/edge-1/258");
        assert_eq!(Slot::from_db_key(&slot.db_key()), Some(slot.clone()));
        assert_eq!(Slot::from_name("kek/edge-1/0258"), None);
        assert_eq!(Slot::from_name("kek/Edge/1"), None);
        assert_eq!(Slot::from_db_key(b"audit/\0\0\0\0\0\0\0\x01"), None);
    }
}

#[cfg(test)]
mod copies_proptests {
    //! The record decoders never panic on arbitrary bytes, and round trip.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::copies::{self, Slot, Value};
    use edgekms_core::rotation::cluster::{Cluster, VersionMeta};
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?"
    }

    fn slot() -> impl Strategy<Value = Slot> {
        prop_oneof![
            Just(Slot::Meta(super::ROOT)),
            Just(Slot::Meta(super::CA_KEY)),
            Just(Slot::Meta(super::SERVER_CERT)),
            name().prop_map(Slot::Cluster),
            (name(), any::<u32>()).prop_map(|(c, v)| Slot::Kek(c, v)),
        ]
    }

    use edgekms_core::rotation::cluster::proptests::version_state as state;

    fn cluster() -> impl Strategy<Value = Cluster> {
        (
            name(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::btree_map(any::<u32>(), (state(), any::<u64>()), 0..8),
        )
            .prop_map(|(name, seq, next, versions)| {
                let versions = versions
                    .into_iter()
                    .map(|(v, (state, t))| {
                        (v, VersionMeta::new(state, format!("{name}/v{v}/x"), t))
                    })
                    .collect();
                Cluster::from_parts(name, seq, next, versions, Default::default(), seq)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn slot_parsers_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..64), s in ".{0,40}") {
            let _ = Slot::from_db_key(&raw);
            let _ = Slot::from_name(&s);
        }

        #[test]
        fn slots_round_trip(slot in slot()) {
            prop_assert_eq!(Slot::from_name(&slot.name()), Some(slot.clone()));
            prop_assert_eq!(Slot::from_db_key(&slot.db_key()), Some(slot));
        }

        #[test]
        fn record_decoders_never_panic(slot in slot(), raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = copies::decode_copy(&slot, &raw);
            let _ = copies::check_value(&slot, &raw);
            let _ = copies::decode_cluster("a", &raw);
        }

        #[test]
        fn kek_copies_round_trip(wrapped in proptest::collection::vec(any::<u8>(), 60), c in name(), v in any::<u32>()) {
            let slot = Slot::Kek(c, v);
            for value in [Value::Live(wrapped.clone()), Value::Destroyed] {
                prop_assert_eq!(copies::decode_copy(&slot, copies::encode_copy(&value)), Ok(value.clone()));
            }
        }

        #[test]
        fn cluster_records_round_trip(c in cluster()) {
            let raw = serde_json::to_vec(&c).unwrap();
            prop_assert_eq!(copies::decode_cluster(c.name(), &raw), Ok(c.clone()));
            let slot = Slot::Cluster(c.name().to_owned());
            prop_assert_eq!(copies::decode_copy(&slot, &raw), Ok(Value::Live(raw.clone())));
            // A record is bound to its slot.
            prop_assert!(copies::decode_cluster("other-name", &raw).is_err() || c.name() == "other-name");
        }
    }
}
