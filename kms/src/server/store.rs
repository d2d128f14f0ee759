//! The central service's state, in RocksDB under `<data-dir>/state`.
//!
//! | key | value |
//! | --- | --- |
//! | `meta/root` | the central root key, sealed by the configured sealer |
//! | `meta/ca-cert`, `meta/server-cert` | DER certificates |
//! | `meta/ca-key`, `meta/server-key` | PKCS#8 private keys wrapped by the root key |
//! | `cluster/<name>` | a [`Cluster`] record, JSON (metadata only) |
//! | `kek/<cluster>/<version u32 BE>` | a KEK version wrapped by the root key |
//! | `audit/<seq u64 BE>` | one audit record, JSON |
//!
//! Wrapping is AES-256-GCM under the root key, with associated data naming
//! the record, so a wrapped value cannot be moved to another slot. Every
//! state change is one synced write batch: a cluster record and the KEK
//! records it implies land together or not at all.

use std::path::Path;

use edgekms_hsm::{aead, Key256, SealedBlob};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::fleet::pki::PrivateKey;
use crate::fleet::state::Cluster;

const ROOT: &[u8] = b"meta/root";
const CA_CERT: &[u8] = b"meta/ca-cert";
const CA_KEY: &[u8] = b"meta/ca-key";
const SERVER_CERT: &[u8] = b"meta/server-cert";
const SERVER_KEY: &[u8] = b"meta/server-key";
const CLUSTER_PREFIX: &[u8] = b"cluster/";
const KEK_PREFIX: &[u8] = b"kek/";
const AUDIT_PREFIX: &[u8] = b"audit/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("state store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("state record {key} is corrupted: {detail}")]
    Corrupt { key: String, detail: String },
    #[error(
        "state record {key} does not open with the root key (tampered, or from another server)"
    )]
    Unwrap { key: String },
    #[error(transparent)]
    Seal(#[from] edgekms_hsm::SealError),
}

/// The state store. Writes are synced before they return.
pub struct Store {
    db: DB,
}

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

fn aad(record: &[u8], key_id: &str) -> Vec<u8> {
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
}

impl Change {
    pub fn put_cluster(&mut self, cluster: &Cluster) -> Result<(), StoreError> {
        let json = serde_json::to_vec(cluster).map_err(|e| StoreError::Corrupt {
            key: printable(&cluster_key(&cluster.name)),
            detail: e.to_string(),
        })?;
        self.batch.put(cluster_key(&cluster.name), json);
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
        self.batch.put(key, wrapped);
    }

    /// Destroys the central copy of a KEK version.
    pub fn delete_kek(&mut self, cluster: &str, version: u32) {
        self.batch.delete(kek_key(cluster, version));
    }
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("state");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(3);
        opts.set_max_background_jobs(2);
        let db = DB::open(&opts, &path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { db })
    }

    fn sync() -> WriteOptions {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        opts
    }

    pub fn commit(&self, change: Change) -> Result<(), StoreError> {
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
        let mut batch = WriteBatch::default();
        batch.put(ROOT, sealed_root.encode());
        batch.put(CA_CERT, ca_cert);
        batch.put(CA_KEY, aead::seal(root, &aad(CA_KEY, ""), ca_key.der()));
        batch.put(SERVER_CERT, server_cert);
        batch.put(
            SERVER_KEY,
            aead::seal(root, &aad(SERVER_KEY, ""), server_key.der()),
        );
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

    pub fn clusters(&self) -> Result<Vec<Cluster>, StoreError> {
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
    pub fn kek(
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
        let mut iter = self
            .db
            .iterator(IteratorMode::From(&upper, Direction::Reverse));
        match iter.next() {
            Some(item) => {
                let (key, _) = item?;
                match key
                    .strip_prefix(AUDIT_PREFIX)
                    .and_then(|s| s.try_into().ok())
                {
                    Some(bytes) => Ok(u64::from_be_bytes(bytes)),
                    None => Ok(0),
                }
            }
            None => Ok(0),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keks_are_wrapped_bound_and_destroyable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
        assert_eq!(store.clusters().unwrap(), [cluster]);
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
            let store = Store::open(dir.path()).unwrap();
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
    fn audit_range_delete_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
