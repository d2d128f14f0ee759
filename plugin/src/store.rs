//! The node's local cache, in RocksDB under `<data-dir>/cache`.
//!
//! | key | value |
//! | --- | --- |
//! | `meta/cluster` | the cluster name the cache belongs to |
//! | `meta/nsk` | the node sealing key, sealed by the configured [`Sealer`](edgekms_hsm::Sealer) |
//! | `meta/recovery` | the NSK wrapped under the recovery passphrase ([`crate::recovery`]) |
//! | `kek/<version u32 BE>` | a KEK version record (below) |
//! | `meta/fleet` | after `join`: the central service's URL, its CA and this node's certificate (public), JSON |
//! | `meta/fleet-keys` | after `join`: the node's TLS and delivery private keys, wrapped by the NSK |
//! | `meta/fleet-seq` | the last central cluster state applied (u64 BE) |
//!
//! KEK record: `1 | state u8 | created_unix u64 BE | len u16 BE | key_id |
//! wrapped key`, the key wrapped with AES-256-GCM under the node sealing key
//! with associated data binding cluster, version and key_id (a record cannot
//! be moved to another slot). A retired version's record has no wrapped key.
//! Nothing in the cache is key material in the clear.

use std::path::Path;

use edgekms_hsm::{aead, Key256, SealedBlob};
use edgekms_kms::{KeyState, KeyVersion, Keyring, KeyringError};
use rocksdb::{BlockBasedOptions, Cache, Options, WriteBatch, WriteOptions, DB};
use zeroize::Zeroizing;

const CLUSTER_KEY: &[u8] = b"meta/cluster";
const NSK_KEY: &[u8] = b"meta/nsk";
const RECOVERY_KEY: &[u8] = b"meta/recovery";
const KEK_PREFIX: &[u8] = b"kek/";
const FLEET_KEY: &[u8] = b"meta/fleet";
const FLEET_KEYS_KEY: &[u8] = b"meta/fleet-keys";
const FLEET_SEQ_KEY: &[u8] = b"meta/fleet-seq";
const RECORD_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key cache {path}: {source}")]
    Db {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("key cache: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("the data dir belongs to cluster {stored:?}, not {configured:?}: wrong --data-dir or --cluster?")]
    ClusterMismatch { stored: String, configured: String },
    #[error("key cache record {key} is corrupted: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("KEK version {version} in the cache does not open with this node's sealing key (cache copied from another node, or tampered)")]
    Unwrap { version: u32 },
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Seal(#[from] edgekms_hsm::SealError),
}

/// What a joined node knows of the central service (public).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetRecord {
    pub server: String,
    pub node: String,
    pub ca_der: String,
    pub cert_der: String,
}

/// A joined node's private keys, unwrapped: PKCS#8 TLS key, delivery key.
pub struct FleetKeys {
    pub tls_key: Zeroizing<Vec<u8>>,
    pub delivery_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for FleetKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetKeys([redacted])")
    }
}

fn fleet_keys_aad(cluster: &str) -> Vec<u8> {
    let mut aad = b"edgekms fleet-keys v1\0".to_vec();
    aad.extend_from_slice(cluster.as_bytes());
    aad
}

/// The RocksDB-backed cache. Every write is synced before it returns.
pub struct Store {
    db: DB,
    cluster: String,
}

fn state_byte(state: KeyState) -> u8 {
    match state {
        KeyState::Pending => 0,
        KeyState::Primary => 1,
        KeyState::DecryptOnly => 2,
        KeyState::Retired => 3,
    }
}

fn byte_state(b: u8) -> Option<KeyState> {
    KeyState::ALL.into_iter().find(|s| state_byte(*s) == b)
}

fn kek_key(version: u32) -> Vec<u8> {
    let mut key = KEK_PREFIX.to_vec();
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn wrap_aad(cluster: &str, version: u32, key_id: &str) -> Vec<u8> {
    let mut aad = b"edgekms kek-cache v1\0".to_vec();
    aad.extend_from_slice(&(cluster.len() as u32).to_be_bytes());
    aad.extend_from_slice(cluster.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

/// Encodes one KEK version record, wrapping its key under `nsk`.
pub fn encode_record(cluster: &str, nsk: &Key256, kv: &KeyVersion) -> Vec<u8> {
    let mut out = vec![RECORD_V1, state_byte(kv.state)];
    out.extend_from_slice(&kv.created_unix.to_be_bytes());
    // key ids are under 1 KiB (keyid::MAX_KEY_ID), so they fit a u16.
    out.extend_from_slice(&(kv.key_id.len() as u16).to_be_bytes());
    out.extend_from_slice(kv.key_id.as_bytes());
    if let Some(key) = kv.key() {
        aead::seal_into(
            nsk,
            &wrap_aad(cluster, kv.version, &kv.key_id),
            key.expose(),
            &mut out,
        );
    }
    out
}

/// Decodes a record written by [`encode_record`].
pub fn decode_record(
    cluster: &str,
    nsk: &Key256,
    version: u32,
    raw: &[u8],
) -> Result<KeyVersion, StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        key: format!("kek/{version}"),
        detail: detail.to_owned(),
    };
    if raw.len() < 12 || raw[0] != RECORD_V1 {
        return Err(corrupt("bad header"));
    }
    let state = byte_state(raw[1]).ok_or_else(|| corrupt("unknown state"))?;
    let mut created = [0u8; 8];
    created.copy_from_slice(&raw[2..10]);
    let created_unix = u64::from_be_bytes(created);
    let id_len = u16::from_be_bytes([raw[10], raw[11]]) as usize;
    let rest = &raw[12..];
    if rest.len() < id_len {
        return Err(corrupt("truncated key_id"));
    }
    let (id, wrapped) = rest.split_at(id_len);
    let key_id = std::str::from_utf8(id)
        .map_err(|_| corrupt("key_id is not UTF-8"))?
        .to_owned();
    if state == KeyState::Retired {
        // A retired record has no key. One that carries a wrapped key is a
        // live record whose state byte was damaged (1 or 2 -> 3 is one
        // bit): refuse it rather than drop the key.
        if !wrapped.is_empty() {
            return Err(corrupt("retired record carries a wrapped key"));
        }
        return Ok(KeyVersion::retired(version, key_id, created_unix));
    }
    let plain = aead::open(nsk, &wrap_aad(cluster, version, &key_id), wrapped)
        .map_err(|_| StoreError::Unwrap { version })?;
    let key = Key256::from_slice(&plain).ok_or_else(|| corrupt("wrapped key is not 32 bytes"))?;
    let kv = KeyVersion::new(cluster, version, state, key, created_unix);
    if kv.key_id != key_id {
        return Err(corrupt("key_id does not match the key"));
    }
    Ok(kv)
}

impl Store {
    /// Opens (creating) the cache under `data_dir` for `cluster`.
    pub fn open(data_dir: &Path, cluster: &str) -> Result<Self, StoreError> {
        let path = data_dir.join("cache");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // A few KiB of keys: keep RocksDB's memory and file count small.
        opts.set_write_buffer_size(1 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(3);
        opts.set_max_background_jobs(1);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(1 << 20));
        opts.set_block_based_table_factory(&table);
        let db = DB::open(&opts, &path).map_err(|source| StoreError::Db {
            path: path.display().to_string(),
            source,
        })?;
        let store = Self {
            db,
            cluster: cluster.to_owned(),
        };
        match store.db.get(CLUSTER_KEY)? {
            Some(stored) if stored != cluster.as_bytes() => {
                return Err(StoreError::ClusterMismatch {
                    stored: String::from_utf8_lossy(&stored).into_owned(),
                    configured: cluster.to_owned(),
                })
            }
            Some(_) => {}
            None => store.write(|b| b.put(CLUSTER_KEY, cluster.as_bytes()))?,
        }
        Ok(store)
    }

    fn write(&self, fill: impl FnOnce(&mut WriteBatch)) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        fill(&mut batch);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// The sealed node sealing key, if this node has one yet.
    pub fn sealed_nsk(&self) -> Result<Option<SealedBlob>, StoreError> {
        match self.db.get(NSK_KEY)? {
            Some(raw) => Ok(Some(SealedBlob::decode(&raw)?)),
            None => Ok(None),
        }
    }

    pub fn put_sealed_nsk(&self, blob: &SealedBlob) -> Result<(), StoreError> {
        self.write(|b| b.put(NSK_KEY, blob.encode()))
    }

    /// First start: the sealed NSK and its recovery wrapper, together.
    pub fn put_new_nsk(&self, blob: &SealedBlob, recovery: &[u8]) -> Result<(), StoreError> {
        self.write(|b| {
            b.put(NSK_KEY, blob.encode());
            b.put(RECOVERY_KEY, recovery);
        })
    }

    pub fn recovery_blob(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(RECOVERY_KEY)?)
    }

    /// Writes the given versions of `keyring` in one synced batch.
    pub fn save_versions(
        &self,
        nsk: &Key256,
        keyring: &Keyring,
        versions: &[u32],
    ) -> Result<(), StoreError> {
        self.write(|b| {
            for kv in versions.iter().filter_map(|v| keyring.get(*v)) {
                b.put(kek_key(kv.version), encode_record(&self.cluster, nsk, kv));
            }
        })
    }

    /// Writes the given versions and the applied central state `seq` in
    /// one synced batch.
    pub fn save_versions_at(
        &self,
        nsk: &Key256,
        keyring: &Keyring,
        versions: &[u32],
        seq: u64,
    ) -> Result<(), StoreError> {
        self.write(|b| {
            for kv in versions.iter().filter_map(|v| keyring.get(*v)) {
                b.put(kek_key(kv.version), encode_record(&self.cluster, nsk, kv));
            }
            b.put(FLEET_SEQ_KEY, seq.to_be_bytes());
        })
    }

    /// The last central state applied (0: none).
    pub fn fleet_seq(&self) -> Result<u64, StoreError> {
        Ok(match self.db.get(FLEET_SEQ_KEY)? {
            Some(raw) => raw
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: "meta/fleet-seq".into(),
                    detail: "not 8 bytes".into(),
                })?,
            None => 0,
        })
    }

    /// Whether the cache holds any KEK version.
    pub fn has_versions(&self) -> Result<bool, StoreError> {
        Ok(self
            .db
            .prefix_iterator(KEK_PREFIX)
            .next()
            .transpose()?
            .is_some_and(|(k, _)| k.starts_with(KEK_PREFIX)))
    }

    pub fn fleet(&self) -> Result<Option<FleetRecord>, StoreError> {
        match self.db.get(FLEET_KEY)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: "meta/fleet".into(),
                    detail: e.to_string(),
                }),
        }
    }

    /// Records a join: public record and the private keys wrapped by `nsk`.
    pub fn put_fleet(
        &self,
        nsk: &Key256,
        record: &FleetRecord,
        keys: &FleetKeys,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            key: "meta/fleet".into(),
            detail: e.to_string(),
        })?;
        let mut plain = Zeroizing::new(Vec::new());
        plain.extend_from_slice(&(keys.tls_key.len() as u32).to_be_bytes());
        plain.extend_from_slice(&keys.tls_key);
        plain.extend_from_slice(&keys.delivery_key);
        let wrapped = aead::seal(nsk, &fleet_keys_aad(&self.cluster), &plain);
        self.write(|b| {
            b.put(FLEET_KEY, json);
            b.put(FLEET_KEYS_KEY, wrapped);
        })
    }

    pub fn fleet_keys(&self, nsk: &Key256) -> Result<FleetKeys, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            key: "meta/fleet-keys".into(),
            detail: detail.into(),
        };
        let wrapped = self
            .db
            .get(FLEET_KEYS_KEY)?
            .ok_or_else(|| corrupt("missing"))?;
        let plain = aead::open(nsk, &fleet_keys_aad(&self.cluster), &wrapped)
            .map_err(|_| corrupt("does not open with this node's sealing key"))?;
        let len_bytes: [u8; 4] = plain
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("truncated"))?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let tls = plain.get(4..4 + len).ok_or_else(|| corrupt("truncated"))?;
        let delivery = plain.get(4 + len..).ok_or_else(|| corrupt("truncated"))?;
        Ok(FleetKeys {
            tls_key: Zeroizing::new(tls.to_vec()),
            delivery_key: Zeroizing::new(delivery.to_vec()),
        })
    }

    /// Loads every cached version, unwrapping each with `nsk`.
    pub fn load_keyring(&self, nsk: &Key256) -> Result<Keyring, StoreError> {
        let mut ring = Keyring::new(&self.cluster)?;
        for item in self.db.prefix_iterator(KEK_PREFIX) {
            let (key, value) = item?;
            if !key.starts_with(KEK_PREFIX) {
                break;
            }
            let version_bytes: [u8; 4] =
                key[KEK_PREFIX.len()..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        detail: "bad version key".into(),
                    })?;
            let version = u32::from_be_bytes(version_bytes);
            ring.insert(decode_record(&self.cluster, nsk, version, &value)?)?;
        }
        Ok(ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_other_slots_and_keys() {
        let nsk = Key256::generate();
        let kv = KeyVersion::new("edge-1", 4, KeyState::Primary, Key256::generate(), 77);
        let raw = encode_record("edge-1", &nsk, &kv);
        let back = decode_record("edge-1", &nsk, 4, &raw).unwrap();
        assert_eq!(
            (back.version, back.state, back.created_unix),
            (4, KeyState::Primary, 77)
        );
        assert_eq!(back.key_id, kv.key_id);
        assert!(back.key().unwrap() == kv.key().unwrap());
        assert!(!raw.windows(32).any(|w| w == kv.key().unwrap().expose()));
        assert!(matches!(
            decode_record("edge-1", &nsk, 5, &raw),
            Err(StoreError::Unwrap { version: 5 })
        ));
        assert!(decode_record("edge-2", &nsk, 4, &raw).is_err());
        assert!(matches!(
            decode_record("edge-1", &Key256::generate(), 4, &raw),
            Err(StoreError::Unwrap { .. })
        ));
        for len in 0..raw.len() {
            assert!(decode_record("edge-1", &nsk, 4, &raw[..len]).is_err());
        }
    }

    #[test]
    fn fleet_keys_are_wrapped_by_the_nsk() {
        let dir = tempfile::tempdir().unwrap();
        let nsk = Key256::generate();
        let store = Store::open(dir.path(), "edge-1").unwrap();
        assert!(store.fleet().unwrap().is_none());
        let rec = FleetRecord {
            server: "https://127.0.0.1:1".into(),
            node: "n1".into(),
            ca_der: "00".into(),
            cert_der: "11".into(),
        };
        let keys = FleetKeys {
            tls_key: Zeroizing::new(vec![7; 138]),
            delivery_key: Zeroizing::new(vec![9; 32]),
        };
        store.put_fleet(&nsk, &rec, &keys).unwrap();
        assert_eq!(store.fleet().unwrap().unwrap(), rec);
        let back = store.fleet_keys(&nsk).unwrap();
        assert_eq!(
            (&back.tls_key[..], &back.delivery_key[..]),
            (&[7u8; 138][..], &[9u8; 32][..])
        );
        assert!(store.fleet_keys(&Key256::generate()).is_err());
        assert!(format!("{back:?}").contains("redacted"));
        drop(store);
        let files = files_with(dir.path(), &[7u8; 32]);
        assert!(files.is_empty(), "TLS key in the clear in {files:?}");
    }

    /// Files under `dir` containing `needle`.
    pub(crate) fn files_with(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files_with(&path, needle));
            } else if std::fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                out.push(path);
            }
        }
        out
    }

    #[test]
    fn retired_records_keep_no_key() {
        let nsk = Key256::generate();
        let kv = KeyVersion::retired(2, "edge-1/v2/ab".into(), 5);
        let back = decode_record("edge-1", &nsk, 2, &encode_record("edge-1", &nsk, &kv)).unwrap();
        assert_eq!(back.state, KeyState::Retired);
        assert!(back.key().is_none());
    }

    #[test]
    fn cache_persists_and_is_bound_to_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let nsk = Key256::generate();
        {
            let store = Store::open(dir.path(), "edge-1").unwrap();
            let mut ring = Keyring::new("edge-1").unwrap();
            let v = ring.add_pending(Key256::generate(), 1).unwrap();
            ring.promote(v).unwrap();
            store.save_versions(&nsk, &ring, &[v]).unwrap();
        }
        let store = Store::open(dir.path(), "edge-1").unwrap();
        assert_eq!(
            store.load_keyring(&nsk).unwrap().primary().unwrap().version,
            1
        );
        drop(store);
        assert!(matches!(
            Store::open(dir.path(), "edge-2"),
            Err(StoreError::ClusterMismatch { .. })
        ));
    }
}

#[cfg(test)]
mod proptests;
