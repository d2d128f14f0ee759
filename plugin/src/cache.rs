//! The node's local cache: RocksDB under `<data-dir>/cache`, with a
//! second copy of every record that cannot be re-derived in
//! `<data-dir>/copies` (one checksummed, atomically replaced file per
//! record, [`edgekms_daemon::durable::RecordFiles`]).
//!
//! | RocksDB key | copy file | value |
//! | --- | --- | --- |
//! | `meta/cluster` | `copies/cluster` | the cluster name the cache belongs to |
//! | `meta/nsk` | `copies/nsk` | the node sealing key, sealed by the configured [`Sealer`](edgekms_hsm::Sealer) |
//! | `meta/recovery` | `copies/recovery` | the NSK wrapped under the recovery passphrase ([`crate::recovery`]) |
//! | `kek/<version u32 BE>` | `copies/kek-<version>` | a KEK version record (below) |
//! | `meta/fleet` | `copies/fleet` | after `join`: the central service's URLs, this node's name, its CA and certificate (public), JSON |
//! | `meta/fleet-keys` | `copies/fleet-keys` | after `join`: the node's TLS and delivery private keys, wrapped by the NSK |
//! | `meta/fleet-seq` | (none: re-derived from the central service) | the last central cluster state applied (u64 BE) |
//!
//! `<data-dir>/EDGEKMS-DATA-DIR` is the marker written before the first key
//! is stored: a data dir with it never starts afresh.
//!
//! Every write goes to the copies first, then to RocksDB in one synced
//! batch. At open ([`Cache::open_with`]) the two are reconciled: a copy
//! that verifies wins (it is never older than an acknowledged write), a
//! missing or damaged copy is rewritten from RocksDB, each repair logged
//! and counted in `edgekms_store_repairs_total`. When RocksDB refuses to
//! open and the copies hold a complete set, the damaged cache is moved
//! aside and rebuilt from them; otherwise the open fails with one line
//! naming what is damaged and how to recover.
//!
//! KEK record: `1 | state u8 | created_unix u64 BE | len u16 BE | key_id |
//! wrapped key`, the key wrapped with AES-256-GCM under the node sealing key
//! with associated data binding cluster, version and key_id (a record cannot
//! be moved to another slot). A retired version's record has no wrapped key
//! (it is the tombstone: a retired key never comes back).
//! Nothing in the cache or the copies is key material in the clear.

use std::path::{Path, PathBuf};

use edgekms_core::{KeyVersion, Keyring, KeyringError, VersionState};
use edgekms_daemon::durable::{self, DurableError, RecordFiles};
use edgekms_hsm::{aead, Key256, SealedBlob};
use rocksdb::{BlockBasedOptions, Options, WriteBatch, WriteOptions, DB};
use zeroize::Zeroizing;

const CLUSTER_KEY: &[u8] = b"meta/cluster";
const NSK_KEY: &[u8] = b"meta/nsk";
const RECOVERY_KEY: &[u8] = b"meta/recovery";
const KEK_PREFIX: &[u8] = b"kek/";
const FLEET_KEY: &[u8] = b"meta/fleet";
const FLEET_KEYS_KEY: &[u8] = b"meta/fleet-keys";
const FLEET_SEQ_KEY: &[u8] = b"meta/fleet-seq";
/// What the apiserver writes under: since (8 bytes), then the key_id.
const WRITES_KEY: &[u8] = b"meta/writes";
/// The newest census (a `fleet.v1.Census` protobuf): no key material.
const CENSUS_KEY: &[u8] = b"meta/census";
const RECORD_V1: u8 = 1;
/// A disabled version's record: V1 with its destruction time after the
/// creation time. Other states keep writing V1, readable by older plugins.
const RECORD_V2: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
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
    #[error(transparent)]
    Durable(#[from] DurableError),
    /// Damage the store cannot repair: the message is the one line an
    /// operator needs (what, which file, how to recover).
    #[error("{0}")]
    Damaged(String),
    #[error("--cluster is required: the data dir {path} does not name a cluster yet")]
    NoCluster { path: String },
}

/// What a joined node knows of the central service (public).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetRecord {
    /// The first of the service's URLs given at `join`: a plugin that
    /// predates `more_servers` reads only this one, and still syncs.
    pub server: String,
    /// The others, in the order given; absent in records of one URL (all
    /// records written before there could be several).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_servers: Vec<String>,
    pub node: String,
    pub ca_der: String,
    pub cert_der: String,
}

impl FleetRecord {
    /// Every URL of the central service, in the order to try them.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.server.as_str()).chain(self.more_servers.iter().map(String::as_str))
    }
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

/// The RocksDB-backed cache and its copies. Every write is durable in both
/// before it returns.
pub struct Cache {
    db: DB,
    cluster: String,
    copies: RecordFiles,
    data_dir: PathBuf,
}

/// The directory of the redundant record copies, inside the data dir.
pub const COPIES_DIR: &str = "copies";
/// The RocksDB directory, inside the data dir.
pub const CACHE_DIR: &str = "cache";

/// The copy file name of a RocksDB key; `None` for keys without a copy.
fn copy_name(key: &[u8]) -> Option<String> {
    Some(match key {
        CLUSTER_KEY => "cluster".into(),
        NSK_KEY => "nsk".into(),
        RECOVERY_KEY => "recovery".into(),
        FLEET_KEY => "fleet".into(),
        FLEET_KEYS_KEY => "fleet-keys".into(),
        _ => {
            let v: [u8; 4] = key.strip_prefix(KEK_PREFIX)?.try_into().ok()?;
            format!("kek-{}", u32::from_be_bytes(v))
        }
    })
}

/// The RocksDB key of a copy file name; `None` for names that are not ours.
fn rocks_key(name: &str) -> Option<Vec<u8>> {
    Some(match name {
        "cluster" => CLUSTER_KEY.to_vec(),
        "nsk" => NSK_KEY.to_vec(),
        "recovery" => RECOVERY_KEY.to_vec(),
        "fleet" => FLEET_KEY.to_vec(),
        "fleet-keys" => FLEET_KEYS_KEY.to_vec(),
        _ => {
            let v: u32 = name.strip_prefix("kek-")?.parse().ok()?;
            // One spelling per version ("kek-07" is not ours).
            (format!("kek-{v}") == name).then(|| kek_key(v))?
        }
    })
}

/// The metric label of a record (bounded: a kind, not a name).
fn record_kind(name: &str) -> &'static str {
    match name {
        "cluster" => "cluster",
        "nsk" => "nsk",
        "recovery" => "recovery",
        "fleet" => "fleet",
        "fleet-keys" => "fleet-keys",
        _ => "kek",
    }
}

fn rocks_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    // A few KiB of keys: keep RocksDB's memory and file count small.
    opts.set_write_buffer_size(1 << 20);
    opts.set_max_write_buffer_number(2);
    opts.set_max_open_files(64);
    opts.set_keep_log_file_num(3);
    opts.set_max_background_jobs(1);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(1 << 20));
    opts.set_block_based_table_factory(&table);
    durable::strict_rocksdb(&mut opts);
    opts
}

/// Another process holds the cache open: never a reason to rebuild it.
fn is_busy(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("lock") && (text.contains("unavailable") || text.contains("Resource"))
}

/// Files created by earlier versions were 0644: make them private.
fn chmod_files_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            let mode = meta.permissions().mode() & 0o700;
            if std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).is_ok() {
                tracing::info!(file = %path.display(), "made a key cache file private to this user (it was readable by others)");
            }
        }
    }
}

/// Why the copies cannot stand in for the cache, if they cannot: every
/// copy must verify, the cluster and the node key must be there, and a
/// standalone node's versions must run from 1 without a gap.
fn copies_incomplete(copies: &RecordFiles) -> Result<(), String> {
    let names = copies.names().map_err(|e| e.to_string())?;
    let mut versions = Vec::new();
    for name in &names {
        if rocks_key(name).is_none() {
            continue;
        }
        match copies.get(name) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("{} vanished", copies.path(name).display())),
            Err(e) => return Err(e.to_string()),
        }
        if let Some(v) = name
            .strip_prefix("kek-")
            .and_then(|v| v.parse::<u32>().ok())
        {
            versions.push(v);
        }
    }
    for needed in ["cluster", "nsk"] {
        if !names.iter().any(|n| n == needed) {
            return Err(format!("{} is missing", copies.path(needed).display()));
        }
    }
    if !names.iter().any(|n| n == "fleet") {
        versions.sort_unstable();
        if versions.is_empty() {
            return Err("no KEK version has a copy".into());
        }
        for (want, have) in (1..).zip(&versions) {
            if want != *have {
                return Err(format!(
                    "{} is missing",
                    copies.path(&format!("kek-{want}")).display()
                ));
            }
        }
    }
    Ok(())
}

/// A version state as the key cache and the node backup store it.
pub(crate) fn state_byte(state: VersionState) -> u8 {
    match state {
        VersionState::Pending => 0,
        VersionState::Primary => 1,
        VersionState::DecryptOnly => 2,
        VersionState::Disabled => 4,
        // A keyring never holds a retiring version (`Keyring::insert`
        // refuses it); were one written, it would read back as retired.
        VersionState::Retired | VersionState::Retiring => 3,
    }
}

pub(crate) fn byte_state(b: u8) -> Option<VersionState> {
    VersionState::ALL
        .into_iter()
        .filter(|s| *s != VersionState::Retiring)
        .find(|s| state_byte(*s) == b)
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
    let destroy_after = kv.destroy_after_unix();
    let format = if destroy_after.is_some() {
        RECORD_V2
    } else {
        RECORD_V1
    };
    let mut out = vec![format, state_byte(kv.state())];
    out.extend_from_slice(&kv.created_unix.to_be_bytes());
    if let Some(t) = destroy_after {
        out.extend_from_slice(&t.to_be_bytes());
    }
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
) -> Result<KeyVersion, CacheError> {
    let corrupt = |detail: &str| CacheError::Corrupt {
        key: format!("kek/{version}"),
        detail: detail.to_owned(),
    };
    let (destroy_after, raw) = match raw {
        [RECORD_V1, ..] if raw.len() >= 12 => (None, raw.to_vec()),
        // V2: the destruction time after the creation time; the rest as V1.
        [RECORD_V2, ..] if raw.len() >= 20 => {
            let mut t = [0u8; 8];
            t.copy_from_slice(&raw[10..18]);
            let mut v1 = raw[..10].to_vec();
            v1.extend_from_slice(&raw[18..]);
            (Some(u64::from_be_bytes(t)), v1)
        }
        _ => return Err(corrupt("bad header")),
    };
    let state = byte_state(raw[1]).ok_or_else(|| corrupt("unknown state"))?;
    if (state == VersionState::Disabled) != destroy_after.is_some() {
        return Err(corrupt(
            "a disabled version's record needs its destruction time",
        ));
    }
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
    if state == VersionState::Retired {
        // A retired record has no key. One that carries a wrapped key is a
        // live record whose state byte was damaged (1 or 2 -> 3 is one
        // bit): refuse it rather than drop the key.
        if !wrapped.is_empty() {
            return Err(corrupt("retired record carries a wrapped key"));
        }
        return Ok(KeyVersion::retired(version, key_id, created_unix));
    }
    let plain = aead::open(nsk, &wrap_aad(cluster, version, &key_id), wrapped)
        .map_err(|_| CacheError::Unwrap { version })?;
    let key = Key256::from_slice(&plain).ok_or_else(|| corrupt("wrapped key is not 32 bytes"))?;
    let kv = KeyVersion::new(cluster, version, state, key, created_unix)
        .with_destroy_after(destroy_after);
    if kv.key_id != key_id {
        return Err(corrupt("key_id does not match the key"));
    }
    Ok(kv)
}

impl Cache {
    /// Opens (creating) the cache under `data_dir` for `cluster`.
    pub fn open(data_dir: &Path, cluster: &str) -> Result<Self, CacheError> {
        Self::open_with(data_dir, Some(cluster))
    }

    /// Opens the cache under `data_dir`, reconciling it with its copies
    /// (see the module doc). `cluster` must match the one the data dir
    /// names; `None` takes the data dir's (and fails when it names none).
    pub fn open_with(data_dir: &Path, cluster: Option<&str>) -> Result<Self, CacheError> {
        let marked = durable::has_marker(data_dir);
        if cluster.is_none()
            && !data_dir.join(CACHE_DIR).exists()
            && !data_dir.join(COPIES_DIR).exists()
        {
            // Nothing here yet: create nothing.
            return Err(CacheError::NoCluster {
                path: data_dir.display().to_string(),
            });
        }
        let copies = RecordFiles::open(&data_dir.join(COPIES_DIR))?;
        let path = data_dir.join(CACHE_DIR);
        let db = match DB::open(&rocks_options(), &path) {
            Ok(db) => db,
            Err(source) if is_busy(&source) => {
                return Err(CacheError::Db {
                    path: path.display().to_string(),
                    source,
                })
            }
            Err(source) => Self::rebuild(&path, &copies, source)?,
        };
        chmod_files_private(&path);
        chmod_files_private(copies.dir());
        let mut store = Self {
            db,
            cluster: String::new(),
            copies: copies.clone(),
            data_dir: data_dir.to_owned(),
        };
        // Reading every record checks every block: a damaged SST that
        // opened fine fails here, and is treated as a refused open.
        if let Err(e) = store.reconcile(!marked) {
            let CacheError::Rocks(source) = e else {
                return Err(e);
            };
            drop(store);
            store = Self {
                db: Self::rebuild(&path, &copies, source)?,
                cluster: String::new(),
                copies,
                data_dir: data_dir.to_owned(),
            };
            store.reconcile(!marked)?;
        }
        match (store.db.get(CLUSTER_KEY)?, cluster) {
            (Some(stored), Some(configured)) if stored != configured.as_bytes() => {
                return Err(CacheError::ClusterMismatch {
                    stored: String::from_utf8_lossy(&stored).into_owned(),
                    configured: configured.to_owned(),
                })
            }
            (Some(stored), _) => {
                store.cluster = String::from_utf8(stored).map_err(|_| CacheError::Corrupt {
                    key: "meta/cluster".into(),
                    detail: "not UTF-8".into(),
                })?;
            }
            (None, Some(configured)) => {
                store.cluster = configured.to_owned();
                store.put(&[(CLUSTER_KEY.to_vec(), configured.as_bytes().to_vec())])?;
            }
            (None, None) => {
                return Err(CacheError::NoCluster {
                    path: data_dir.display().to_string(),
                })
            }
        }
        if !marked && store.holds_keys()? {
            // A data dir written before the marker existed.
            durable::write_marker(data_dir)?;
            tracing::info!(dir = %data_dir.display(), "marked the data dir as holding keys");
        }
        Ok(store)
    }

    /// RocksDB refused to open: rebuild it from the copies if they hold a
    /// complete set (the damaged directory is kept beside, renamed), else
    /// fail with the one line an operator needs.
    fn rebuild(
        path: &Path,
        copies: &RecordFiles,
        source: rocksdb::Error,
    ) -> Result<DB, CacheError> {
        if let Err(why) = copies_incomplete(copies) {
            return Err(CacheError::Damaged(format!(
                "the key cache {} is damaged ({source}) and cannot be rebuilt from {}: {why}. \
                 Restore the data dir from a backup, or run `edgekms-plugin restore` from a `kmsctl local backup` file, \
                 or (joined node) join again with an empty --data-dir. No key was made",
                path.display(),
                copies.dir().display()
            )));
        }
        let aside = path.with_file_name(format!(
            "{CACHE_DIR}.damaged-{}",
            edgekms_daemon::config::now_unix()
        ));
        std::fs::rename(path, &aside).map_err(|e| {
            CacheError::Damaged(format!(
                "the key cache {} is damaged ({source}) and cannot be moved aside to {}: {e}",
                path.display(),
                aside.display()
            ))
        })?;
        tracing::error!(
            cache = %path.display(),
            moved_to = %aside.display(),
            error = %source,
            "the key cache is damaged: moved it aside and rebuilding it from the verified copies in {}",
            copies.dir().display()
        );
        crate::metrics::record_store_repair("rocksdb");
        DB::open(&rocks_options(), path).map_err(|source| CacheError::Db {
            path: path.display().to_string(),
            source,
        })
    }

    /// Makes RocksDB and the copies agree; see the module doc. `backfill`:
    /// a data dir from before the copies existed, whose missing copies are
    /// written without a repair warning.
    fn reconcile(&self, backfill: bool) -> Result<(), CacheError> {
        let mut names: std::collections::BTreeSet<String> = self
            .copies
            .names()?
            .into_iter()
            .filter(|n| rocks_key(n).is_some())
            .collect();
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (key, _) = item?;
            names.extend(copy_name(&key));
        }
        let mut batch = WriteBatch::default();
        let mut backfilled = 0usize;
        for name in names {
            let Some(key) = rocks_key(&name) else {
                continue;
            };
            let rocks = self.db.get(&key)?;
            let file = self.copies.path(&name);
            match (self.copies.get(&name), rocks) {
                (Ok(Some(body)), rocks) => {
                    if rocks.as_deref() != Some(&body[..]) {
                        tracing::warn!(
                            record = %name,
                            file = %file.display(),
                            "the key cache {} this record: restored it from its copy",
                            if rocks.is_none() { "lacked" } else { "held another version of" }
                        );
                        crate::metrics::record_store_repair(record_kind(&name));
                        batch.put(&key, &body);
                    }
                }
                (Ok(None), Some(rocks)) => {
                    self.copies.put(&name, &rocks)?;
                    if backfill {
                        backfilled += 1;
                    } else {
                        tracing::warn!(record = %name, file = %file.display(), "the copy of this record was missing: rewrote it from the key cache");
                        crate::metrics::record_store_repair(record_kind(&name));
                    }
                }
                (Err(DurableError::Damaged { path, detail }), Some(rocks)) => {
                    self.copies.put(&name, &rocks)?;
                    tracing::warn!(record = %name, file = %path, %detail, "the copy of this record was damaged: rewrote it from the key cache");
                    crate::metrics::record_store_repair(record_kind(&name));
                }
                (Err(DurableError::Damaged { path, detail }), None) => {
                    return Err(CacheError::Damaged(format!(
                        "record file {path} is damaged ({detail}) and the key cache has no copy of record {name}: \
                         restore that file from a backup of the data dir, or run `edgekms-plugin restore` from a \
                         `kmsctl local backup` file, or (joined node) join again with an empty --data-dir. No key was made"
                    )));
                }
                (Err(e), _) => return Err(e.into()),
                (Ok(None), None) => {}
            }
        }
        if backfilled > 0 {
            tracing::info!(records = backfilled, dir = %self.copies.dir().display(), "wrote the redundant copies of the key cache records (data dir from an earlier version)");
        }
        if !batch.is_empty() {
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            self.db.write_opt(batch, &opts)?;
        }
        Ok(())
    }

    /// The cluster this cache belongs to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The copy file of record `name` (`nsk`, `kek-3`, ...).
    pub fn copy_path(&self, name: &str) -> PathBuf {
        self.copies.path(name)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether any key record (node key, recovery wrapper, KEK, join keys)
    /// is here: a data dir holding none of them is empty.
    pub fn holds_keys(&self) -> Result<bool, CacheError> {
        for key in [NSK_KEY, RECOVERY_KEY, FLEET_KEY, FLEET_KEYS_KEY] {
            if self.db.get(key)?.is_some() {
                return Ok(true);
            }
        }
        self.has_versions()
    }

    /// Writes `records` (RocksDB key, value): the copies first, then one
    /// synced RocksDB batch.
    fn put(&self, records: &[(Vec<u8>, Vec<u8>)]) -> Result<(), CacheError> {
        let named: Vec<(String, &[u8])> = records
            .iter()
            .filter_map(|(k, v)| copy_name(k).map(|n| (n, &v[..])))
            .collect();
        self.copies
            .put_all(named.iter().map(|(n, v)| (n.as_str(), *v)))?;
        let mut batch = WriteBatch::default();
        for (k, v) in records {
            batch.put(k, v);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// The sealed node sealing key, if this node has one yet.
    pub fn sealed_nsk(&self) -> Result<Option<SealedBlob>, CacheError> {
        match self.db.get(NSK_KEY)? {
            Some(raw) => Ok(Some(SealedBlob::decode(&raw)?)),
            None => Ok(None),
        }
    }

    pub fn put_sealed_nsk(&self, blob: &SealedBlob) -> Result<(), CacheError> {
        self.put(&[(NSK_KEY.to_vec(), blob.encode())])
    }

    /// First start: the sealed NSK, its recovery wrapper and the given
    /// versions of `keyring` (none for a joining node), together.
    pub fn put_new_nsk(
        &self,
        blob: &SealedBlob,
        recovery: &[u8],
        nsk: &Key256,
        keyring: &Keyring,
    ) -> Result<(), CacheError> {
        let mut records = self.version_records(
            nsk,
            keyring,
            &keyring.versions().map(|kv| kv.version).collect::<Vec<_>>(),
        );
        records.push((RECOVERY_KEY.to_vec(), recovery.to_vec()));
        // Last, so that a copy of the node key means the rest was written.
        records.push((NSK_KEY.to_vec(), blob.encode()));
        self.put(&records)
    }

    fn version_records(
        &self,
        nsk: &Key256,
        keyring: &Keyring,
        versions: &[u32],
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        versions
            .iter()
            .filter_map(|v| keyring.get(*v))
            .map(|kv| (kek_key(kv.version), encode_record(&self.cluster, nsk, kv)))
            .collect()
    }

    pub fn recovery_blob(&self) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.db.get(RECOVERY_KEY)?)
    }

    /// Writes the given versions of `keyring` in one synced batch.
    pub fn save_versions(
        &self,
        nsk: &Key256,
        keyring: &Keyring,
        versions: &[u32],
    ) -> Result<(), CacheError> {
        self.put(&self.version_records(nsk, keyring, versions))
    }

    /// Writes the given versions and the applied central state `seq` in
    /// one synced batch.
    pub fn save_versions_at(
        &self,
        nsk: &Key256,
        keyring: &Keyring,
        versions: &[u32],
        seq: u64,
    ) -> Result<(), CacheError> {
        let mut records = self.version_records(nsk, keyring, versions);
        records.push((FLEET_SEQ_KEY.to_vec(), seq.to_be_bytes().to_vec()));
        self.put(&records)
    }

    /// The last central state applied (0: none).
    pub fn fleet_seq(&self) -> Result<u64, CacheError> {
        Ok(match self.db.get(FLEET_SEQ_KEY)? {
            Some(raw) => raw
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| CacheError::Corrupt {
                    key: "meta/fleet-seq".into(),
                    detail: "not 8 bytes".into(),
                })?,
            None => 0,
        })
    }

    /// The key_id the apiserver last had a DEK seed encrypted under, and
    /// since when (`None`: never).
    pub fn writes(&self) -> Result<Option<(String, u64)>, CacheError> {
        let Some(raw) = self.db.get(WRITES_KEY)? else {
            return Ok(None);
        };
        let corrupt = |detail: &str| CacheError::Corrupt {
            key: "meta/writes".into(),
            detail: detail.into(),
        };
        let (since, id) = raw
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt("shorter than 8 bytes"))?;
        let key_id = std::str::from_utf8(id).map_err(|_| corrupt("key_id is not UTF-8"))?;
        Ok(Some((key_id.to_owned(), u64::from_be_bytes(*since))))
    }

    pub fn put_writes(&self, key_id: &str, since_unix: u64) -> Result<(), CacheError> {
        let mut raw = since_unix.to_be_bytes().to_vec();
        raw.extend_from_slice(key_id.as_bytes());
        self.put(&[(WRITES_KEY.to_vec(), raw)])
    }

    /// The newest census, encoded (`None`: none taken).
    pub fn census(&self) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.db.get(CENSUS_KEY)?)
    }

    pub fn put_census(&self, encoded: &[u8]) -> Result<(), CacheError> {
        self.put(&[(CENSUS_KEY.to_vec(), encoded.to_vec())])
    }

    /// Whether the cache holds any KEK version.
    pub fn has_versions(&self) -> Result<bool, CacheError> {
        Ok(self
            .db
            .prefix_iterator(KEK_PREFIX)
            .next()
            .transpose()?
            .is_some_and(|(k, _)| k.starts_with(KEK_PREFIX)))
    }

    pub fn fleet(&self) -> Result<Option<FleetRecord>, CacheError> {
        match self.db.get(FLEET_KEY)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| CacheError::Corrupt {
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
    ) -> Result<(), CacheError> {
        let json = serde_json::to_vec(record).map_err(|e| CacheError::Corrupt {
            key: "meta/fleet".into(),
            detail: e.to_string(),
        })?;
        let mut plain = Zeroizing::new(Vec::new());
        plain.extend_from_slice(&(keys.tls_key.len() as u32).to_be_bytes());
        plain.extend_from_slice(&keys.tls_key);
        plain.extend_from_slice(&keys.delivery_key);
        let wrapped = aead::seal(nsk, &fleet_keys_aad(&self.cluster), &plain);
        self.put(&[
            (FLEET_KEY.to_vec(), json),
            (FLEET_KEYS_KEY.to_vec(), wrapped),
        ])
    }

    pub fn fleet_keys(&self, nsk: &Key256) -> Result<FleetKeys, CacheError> {
        let corrupt = |detail: &str| CacheError::Corrupt {
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
    pub fn load_keyring(&self, nsk: &Key256) -> Result<Keyring, CacheError> {
        let mut ring = Keyring::new(&self.cluster)?;
        let mut kvs = Vec::new();
        for item in self.db.prefix_iterator(KEK_PREFIX) {
            let (key, value) = item?;
            if !key.starts_with(KEK_PREFIX) {
                break;
            }
            let version_bytes: [u8; 4] =
                key[KEK_PREFIX.len()..]
                    .try_into()
                    .map_err(|_| CacheError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        detail: "bad version key".into(),
                    })?;
            let version = u32::from_be_bytes(version_bytes);
            kvs.push(decode_record(&self.cluster, nsk, version, &value)?);
        }
        // The copies of one write are replaced one file at a time: a crash
        // in a rotation can leave the new primary and the old one both
        // marked primary. The rotation landed: the newest one is primary.
        let newest = kvs
            .iter()
            .filter(|kv| kv.state() == VersionState::Primary)
            .map(|kv| kv.version)
            .max();
        for kv in kvs {
            let kv = if kv.state() == VersionState::Primary && Some(kv.version) != newest {
                tracing::warn!(
                    version = kv.version,
                    primary = newest.unwrap_or(0),
                    "two versions were marked primary (a rotation was interrupted): keeping the newest"
                );
                kv.demoted()?
            } else {
                kv
            };
            ring.insert(kv)?;
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
        let kv = KeyVersion::new("edge-1", 4, VersionState::Primary, Key256::generate(), 77);
        let raw = encode_record("edge-1", &nsk, &kv);
        let back = decode_record("edge-1", &nsk, 4, &raw).unwrap();
        assert_eq!(
            (back.version, back.state(), back.created_unix),
            (4, VersionState::Primary, 77)
        );
        assert_eq!(back.key_id, kv.key_id);
        assert!(back.key().unwrap() == kv.key().unwrap());
        assert!(!raw.windows(32).any(|w| w == kv.key().unwrap().expose()));
        assert!(matches!(
            decode_record("edge-1", &nsk, 5, &raw),
            Err(CacheError::Unwrap { version: 5 })
        ));
        assert!(decode_record("edge-2", &nsk, 4, &raw).is_err());
        assert!(matches!(
            decode_record("edge-1", &Key256::generate(), 4, &raw),
            Err(CacheError::Unwrap { .. })
        ));
        for len in 0..raw.len() {
            assert!(decode_record("edge-1", &nsk, 4, &raw[..len]).is_err());
        }
    }

    #[test]
    fn fleet_keys_are_wrapped_by_the_nsk() {
        let dir = tempfile::tempdir().unwrap();
        let nsk = Key256::generate();
        let store = Cache::open(dir.path(), "edge-1").unwrap();
        assert!(store.fleet().unwrap().is_none());
        let rec = FleetRecord {
            server: "https://127.0.0.1:1".into(),
            more_servers: vec!["https://kms.example:8443".into()],
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

    #[test]
    fn a_join_record_of_one_url_still_loads_and_a_new_one_loads_in_an_older_plugin() {
        // As every plugin wrote it before a node could list several URLs.
        let old =
            br#"{"server":"https://kms.example:8443","node":"n1","ca_der":"00","cert_der":"11"}"#;
        let dir = tempfile::tempdir().unwrap();
        let store = Cache::open(dir.path(), "edge-1").unwrap();
        store.db.put(FLEET_KEY, old).unwrap();
        let rec = store.fleet().unwrap().unwrap();
        assert!(rec.more_servers.is_empty());
        assert_eq!(
            rec.servers().collect::<Vec<_>>(),
            ["https://kms.example:8443"]
        );
        // Written back unchanged: one URL adds no field.
        assert_eq!(serde_json::to_vec(&rec).unwrap(), old);

        // An older plugin's record type (no `more_servers`) reads a record
        // of several URLs, with the first.
        #[derive(serde::Deserialize)]
        struct Older {
            server: String,
            node: String,
            ca_der: String,
            cert_der: String,
        }
        let rec = FleetRecord {
            server: "https://a:1".into(),
            more_servers: vec!["https://b:1".into(), "https://c:1".into()],
            ..rec
        };
        assert_eq!(
            rec.servers().collect::<Vec<_>>(),
            ["https://a:1", "https://b:1", "https://c:1"]
        );
        let older: Older = serde_json::from_slice(&serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(
            [older.server, older.node, older.ca_der, older.cert_der],
            ["https://a:1", "n1", "00", "11"]
        );
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
        assert_eq!(back.state(), VersionState::Retired);
        assert!(back.key().is_none());
    }

    #[test]
    fn cache_persists_and_is_bound_to_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let nsk = Key256::generate();
        {
            let store = Cache::open(dir.path(), "edge-1").unwrap();
            let mut ring = Keyring::new("edge-1").unwrap();
            let v = ring.add_pending(Key256::generate(), 1).unwrap();
            ring.promote(v).unwrap();
            store.save_versions(&nsk, &ring, &[v]).unwrap();
        }
        let store = Cache::open(dir.path(), "edge-1").unwrap();
        assert_eq!(
            store.load_keyring(&nsk).unwrap().primary().unwrap().version,
            1
        );
        drop(store);
        assert!(matches!(
            Cache::open(dir.path(), "edge-2"),
            Err(CacheError::ClusterMismatch { .. })
        ));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes as a KEK record: an error or a version, never a panic.
        #[test]
        fn kek_records_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..160), version in any::<u32>()) {
            let nsk = Key256::from_bytes(&[7; 32]);
            let _ = decode_record("edge-1", &nsk, version, &raw);
        }

        /// A record round trips; a flipped byte never yields another key.
        #[test]
        fn kek_records_round_trip(version in 1u32.., created in any::<u64>(), flip in any::<proptest::sample::Index>()) {
            let nsk = Key256::from_bytes(&[7; 32]);
            let kv = KeyVersion::new("edge-1", version, VersionState::DecryptOnly, Key256::from_bytes(&[9; 32]), created);
            let raw = encode_record("edge-1", &nsk, &kv);
            let back = decode_record("edge-1", &nsk, version, &raw).unwrap();
            prop_assert_eq!((back.version, back.state(), back.created_unix, &back.key_id), (version, VersionState::DecryptOnly, created, &kv.key_id));
            let mut bad = raw.clone();
            bad[flip.index(raw.len())] ^= 0x01;
            if let Ok(other) = decode_record("edge-1", &nsk, version, &bad) {
                // Only the state or creation time are outside the AEAD.
                prop_assert_eq!(&other.key_id, &kv.key_id);
                prop_assert!(other.key() == kv.key() || other.key().is_none());
            }
        }

        /// Copy names and RocksDB keys map one to one.
        #[test]
        fn copy_names_round_trip(version in any::<u32>(), name in "[a-z0-9-]{0,12}") {
            let key = kek_key(version);
            prop_assert_eq!(rocks_key(&copy_name(&key).unwrap()), Some(key));
            if let Some(key) = rocks_key(&name) {
                prop_assert_eq!(copy_name(&key), Some(name));
            }
        }
    }
}

#[cfg(test)]
mod proptests;
