//! The second copy of every central record that cannot be re-derived, and
//! what opening the state does with it (the rules are in
//! [`edgekms_daemon::durable`]).
//!
//! Each record has a slot: its RocksDB key and the name of its record file
//! in `<data-dir>/copies/` (`meta/root`, `meta/ca-cert`, `meta/ca-key`,
//! `meta/server-cert`, `meta/server-key`, `cluster/<name>`,
//! `kek/<cluster>/<version>`). A record file holds the RocksDB value byte
//! for byte, except a destroyed KEK version, whose file holds
//! [`TOMBSTONE`] while its RocksDB record is deleted.
//!
//! At open: if RocksDB opens and its records read, every slot is
//! reconciled (a copy that verifies wins; a missing or damaged copy is
//! rewritten from RocksDB). If RocksDB does not open or read, and the
//! copies form a complete, verified set, the damaged store is moved aside
//! and rebuilt from them. Anything else is refused with one error naming
//! what is damaged, which file, and how to recover. Nothing is written
//! before the outcome is known.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use edgekms_hsm::{aead, SealedBlob};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, DB};

use super::{
    cluster_key, kek_key, printable, Store, CA_CERT, CA_KEY, CLUSTER_PREFIX, KEK_PREFIX, ROOT,
    SERVER_CERT, SERVER_KEY,
};
use crate::metrics;
use crate::state_store::StoreError;
use edgekms_core::rotation::cluster::Cluster;
use edgekms_core::VersionState;
use edgekms_daemon::durable::{self, DurableError, RecordFiles};

/// RocksDB's directory inside the data dir.
pub const STATE_DIR: &str = "state";
/// The record files' directory inside the data dir.
pub const COPIES_DIR: &str = "copies";
/// The body of a destroyed KEK version's record file.
pub const TOMBSTONE: &[u8] = b"edgekms central: key version destroyed\n";
/// A wrapped KEK: nonce, 32 key bytes, tag.
const WRAPPED_KEK_LEN: usize = 32 + aead::OVERHEAD;
const META: [&[u8]; 5] = [ROOT, CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY];
const META_PREFIX: &[u8] = b"meta/";

/// What an operator does when a start is refused.
pub const RECOVER: &str = "nothing was changed. Recover: put the damaged or missing file back from a file-system backup, or restore the last `kmsctl backup` into a new data dir (`edgekms-server restore FILE --key-file KEY --data-dir NEW-DIR`)";

/// One record's place: its RocksDB key and its record file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Meta(&'static [u8]),
    Cluster(String),
    Kek(String, u32),
}

fn cluster_name_ok(name: &str) -> bool {
    edgekms_core::keyid::validate_name(name).is_ok()
}

impl Slot {
    pub fn db_key(&self) -> Vec<u8> {
        match self {
            Slot::Meta(key) => key.to_vec(),
            Slot::Cluster(c) => cluster_key(c),
            Slot::Kek(c, v) => kek_key(c, *v),
        }
    }

    /// The record file's name (also what log lines call the record).
    pub fn name(&self) -> String {
        match self {
            Slot::Meta(key) => printable(key),
            Slot::Cluster(c) => format!("cluster/{c}"),
            Slot::Kek(c, v) => format!("kek/{c}/{v}"),
        }
    }

    /// The bounded `record` label of `edgekms_store_repairs_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Slot::Meta(key) if *key == ROOT => "root",
            Slot::Meta(_) => "identity",
            Slot::Cluster(_) => "cluster",
            Slot::Kek(..) => "kek",
        }
    }

    /// The slot of a RocksDB key; `None` for audit records and anything
    /// that is not ours.
    pub fn from_db_key(key: &[u8]) -> Option<Self> {
        if let Some(meta) = META.iter().find(|m| **m == key) {
            return Some(Slot::Meta(meta));
        }
        if let Some(rest) = key.strip_prefix(CLUSTER_PREFIX) {
            let name = std::str::from_utf8(rest).ok()?;
            return cluster_name_ok(name).then(|| Slot::Cluster(name.to_owned()));
        }
        let rest = key.strip_prefix(KEK_PREFIX)?;
        let split = rest.len().checked_sub(4)?;
        let (cluster, version) = rest.split_at(split);
        let cluster = std::str::from_utf8(cluster.strip_suffix(b"/")?).ok()?;
        let version = u32::from_be_bytes(version.try_into().ok()?);
        cluster_name_ok(cluster).then(|| Slot::Kek(cluster.to_owned(), version))
    }

    /// The slot of a record file's name.
    pub fn from_name(name: &str) -> Option<Self> {
        if let Some(meta) = META.iter().find(|m| **m == name.as_bytes()) {
            return Some(Slot::Meta(meta));
        }
        if let Some(cluster) = name.strip_prefix("cluster/") {
            return cluster_name_ok(cluster).then(|| Slot::Cluster(cluster.to_owned()));
        }
        let (cluster, version) = name.strip_prefix("kek/")?.split_once('/')?;
        let v: u32 = version.parse().ok()?;
        // One spelling per version, so two files never claim one slot.
        (cluster_name_ok(cluster) && v.to_string() == version)
            .then(|| Slot::Kek(cluster.to_owned(), v))
    }
}

/// What a slot holds once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Live(Vec<u8>),
    /// A destroyed KEK version (tombstone file, no RocksDB record).
    Destroyed,
}

/// Decodes a cluster record, which must be the record of `name`.
pub fn decode_cluster(name: &str, raw: &[u8]) -> Result<Cluster, String> {
    let cluster: Cluster = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    if cluster.name() != name {
        return Err(format!("holds cluster {:?}", cluster.name()));
    }
    Ok(cluster)
}

/// Checks a RocksDB value for its slot.
pub fn check_value(slot: &Slot, raw: &[u8]) -> Result<(), String> {
    match slot {
        Slot::Meta(key) if *key == ROOT => SealedBlob::decode(raw)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Slot::Meta(key) if *key == CA_KEY || *key == SERVER_KEY => (raw.len() > aead::OVERHEAD)
            .then_some(())
            .ok_or_else(|| format!("{} bytes is too short for a wrapped key", raw.len())),
        Slot::Meta(_) => (!raw.is_empty())
            .then_some(())
            .ok_or_else(|| "empty".to_owned()),
        Slot::Cluster(name) => decode_cluster(name, raw).map(|_| ()),
        Slot::Kek(..) => (raw.len() == WRAPPED_KEK_LEN)
            .then_some(())
            .ok_or_else(|| format!("{} bytes is not a wrapped key", raw.len())),
    }
}

/// Decodes a record file's body for its slot.
pub fn decode_copy(slot: &Slot, body: &[u8]) -> Result<Value, String> {
    if matches!(slot, Slot::Kek(..)) && body == TOMBSTONE {
        return Ok(Value::Destroyed);
    }
    check_value(slot, body).map(|()| Value::Live(body.to_vec()))
}

/// The record file body of a value.
pub fn encode_copy(value: &Value) -> &[u8] {
    match value {
        Value::Live(raw) => raw,
        Value::Destroyed => TOMBSTONE,
    }
}

/// RocksDB options: strict (see [`durable::strict_rocksdb`]), and created
/// only by `init` and `restore`.
pub fn db_options(create: bool) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.set_keep_log_file_num(3);
    opts.set_max_background_jobs(2);
    durable::strict_rocksdb(&mut opts);
    opts
}

/// What a data dir holds, for `init` and `restore`, which need an empty one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Empty,
    /// It holds a root key: why we think so.
    Initialized(String),
    /// It holds something else (an interrupted `init` or `restore`).
    Partial(String),
}

/// Looks at a data dir without creating or changing anything.
pub fn probe(data_dir: &Path) -> Result<Probe, StoreError> {
    let copies = data_dir.join(COPIES_DIR);
    let state = data_dir.join(STATE_DIR);
    let files = if copies.is_dir() {
        RecordFiles::open(&copies)?.names()?
    } else {
        Vec::new()
    };
    if files.iter().any(|n| n.as_bytes() == ROOT) {
        return Ok(Probe::Initialized(format!(
            "{} holds the sealed root key",
            copies.display()
        )));
    }
    if state.exists() {
        let db = DB::open_for_read_only(&db_options(false), &state, false).map_err(|e| {
            StoreError::Open {
                path: state.display().to_string(),
                detail: e.to_string(),
            }
        })?;
        if db.get(ROOT)?.is_some() {
            return Ok(Probe::Initialized(format!(
                "{} holds a root key",
                state.display()
            )));
        }
        let first = db.iterator(IteratorMode::Start).next();
        if let Some(item) = first {
            item?;
            return Ok(Probe::Partial(format!("{} holds records", state.display())));
        }
    }
    if !files.is_empty() {
        return Ok(Probe::Partial(format!(
            "{} holds record copies",
            copies.display()
        )));
    }
    if durable::has_marker(data_dir) {
        return Ok(Probe::Partial(format!(
            "it has the marker file {}: an earlier `init` or `restore` stopped before it finished, or its keys were lost",
            durable::MARKER
        )));
    }
    Ok(Probe::Empty)
}

/// Makes every file in `dir` private (data dirs written before the umask
/// was set have 0644 RocksDB files). Returns how many were changed.
fn make_files_private(dir: &Path) -> Result<usize, StoreError> {
    let mut changed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("list", dir, e))?;
        let meta = entry
            .metadata()
            .map_err(|e| io_err("stat", &entry.path(), e))?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            let mode = meta.permissions().mode() & 0o700;
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_err("chmod", &entry.path(), e))?;
            changed += 1;
        }
    }
    Ok(changed)
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Durable(DurableError::Io {
        op,
        path: path.display().to_string(),
        source,
    })
}

fn unrecoverable(what: String, file: &Path) -> StoreError {
    StoreError::Unrecoverable {
        what,
        file: file.display().to_string(),
    }
}

/// Reads every record with a copy: meta, clusters, KEKs (audit records are
/// read when asked for).
fn scan(db: &DB) -> Result<BTreeMap<Slot, Vec<u8>>, rocksdb::Error> {
    let mut out = BTreeMap::new();
    for prefix in [META_PREFIX, CLUSTER_PREFIX, KEK_PREFIX] {
        for item in db.iterator(IteratorMode::From(prefix, Direction::Forward)) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            if let Some(slot) = Slot::from_db_key(&key) {
                out.insert(slot, value.to_vec());
            }
        }
    }
    Ok(out)
}

/// Checks that the records are a whole state: the root key and the
/// identity, and a key for every version a cluster still uses. `Err` is
/// (what is missing, which copy file).
fn check_complete(
    records: &BTreeMap<Slot, Value>,
    files: &RecordFiles,
) -> Result<(), (String, PathBuf)> {
    for meta in META {
        let slot = Slot::Meta(meta);
        if !matches!(records.get(&slot), Some(Value::Live(_))) {
            return Err((
                format!(
                    "record {} is in neither the state store nor its copy",
                    slot.name()
                ),
                files.path(&slot.name()),
            ));
        }
    }
    let mut clusters = BTreeSet::new();
    for (slot, value) in records {
        let (Slot::Cluster(name), Value::Live(raw)) = (slot, value) else {
            continue;
        };
        clusters.insert(name.clone());
        let cluster = decode_cluster(name, raw).map_err(|e| (e, files.path(&slot.name())))?;
        for (&version, meta) in cluster.versions() {
            let kek = Slot::Kek(name.clone(), version);
            let ok = match meta.state {
                VersionState::Pending
                | VersionState::Primary
                | VersionState::DecryptOnly
                | VersionState::Disabled => {
                    matches!(records.get(&kek), Some(Value::Live(_)))
                }
                VersionState::Retiring => records.contains_key(&kek),
                VersionState::Retired => true,
            };
            if !ok {
                return Err((
                    format!(
                        "cluster {name} version {version} is {} but its key is in neither the state store nor its copy",
                        meta.state.as_str()
                    ),
                    files.path(&kek.name()),
                ));
            }
        }
    }
    // Every cluster has a key version, so key copies without their cluster
    // mean a lost cluster record; version 1 alone is a cluster whose
    // creation never finished (its key is written first).
    let mut orphans: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for slot in records.keys() {
        if let Slot::Kek(c, v) = slot {
            if !clusters.contains(c) {
                orphans.entry(c.as_str()).or_default().push(*v);
            }
        }
    }
    for (cluster, versions) in orphans {
        if versions != [1] {
            let slot = Slot::Cluster(cluster.to_owned());
            return Err((
                format!(
                    "cluster {cluster} has key versions {versions:?} but its record is in neither the state store nor its copy"
                ),
                files.path(&slot.name()),
            ));
        }
    }
    Ok(())
}

/// One side of a slot.
enum Side {
    Good(Value),
    Missing,
    Bad(String),
}

fn sync_opts() -> rocksdb::WriteOptions {
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    opts
}

fn count_repair(kind: &'static str) {
    metrics::observe_repair(kind);
}

/// Opens the state of an initialized data dir for serving.
pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
    let state = data_dir.join(STATE_DIR);
    let copies = data_dir.join(COPIES_DIR);
    let marked = durable::has_marker(data_dir);
    let have_copies = copies.is_dir() && !RecordFiles::open(&copies)?.names()?.is_empty();
    if !state.exists() && !have_copies {
        if marked {
            return Err(unrecoverable(
                format!(
                    "{} held keys (it has {}) but its state store and its record copies are gone",
                    data_dir.display(),
                    durable::MARKER
                ),
                &state,
            ));
        }
        return Err(StoreError::NotInitialized(data_dir.display().to_string()));
    }
    let private = make_files_private(&state)? + make_files_private(&copies)?;
    if private > 0 {
        tracing::info!(
            files = private,
            "made state files private (mode 0600); they were readable by others"
        );
    }
    let files = RecordFiles::open(&copies)?;
    let opened =
        DB::open(&db_options(false), &state).and_then(|db| scan(&db).map(|records| (db, records)));
    let (db, records) = match opened {
        Ok(opened) => opened,
        Err(e) => return rebuild(data_dir, files, e.to_string()),
    };
    if !marked && !records.contains_key(&Slot::Meta(ROOT)) && !have_copies {
        return Err(StoreError::NotInitialized(data_dir.display().to_string()));
    }
    reconcile(&db, &files, records, !marked && !have_copies)?;
    if !marked {
        durable::write_marker(data_dir)?;
        if have_copies {
            tracing::warn!(
                file = %data_dir.join(durable::MARKER).display(),
                "the data dir marker was missing; written again"
            );
        }
    }
    Store::assemble(db, files)
}

/// Brings RocksDB and the copies into agreement (see the module doc).
/// `backfill`: a data dir from before copies existed, whose missing copies
/// are no damage.
fn reconcile(
    db: &DB,
    files: &RecordFiles,
    records: BTreeMap<Slot, Vec<u8>>,
    backfill: bool,
) -> Result<(), StoreError> {
    let mut slots: BTreeSet<Slot> = records.keys().cloned().collect();
    let mut copied = BTreeSet::new();
    for name in files.names()? {
        match Slot::from_name(&name) {
            Some(slot) => {
                slots.insert(slot.clone());
                copied.insert(slot);
            }
            None => tracing::warn!(
                file = %files.path(&name).display(),
                "ignoring a file in the copies directory that is no record copy"
            ),
        }
    }
    let state = db.path().to_owned();
    let mut batch = WriteBatch::default();
    let mut rewrite: Vec<(String, Value)> = Vec::new();
    let mut repairs: Vec<(&'static str, String, PathBuf, String)> = Vec::new();
    let mut agreed = BTreeMap::new();
    for slot in slots {
        let name = slot.name();
        let path = files.path(&name);
        let copy = match files.get(&name) {
            Ok(Some(body)) => match decode_copy(&slot, &body) {
                Ok(v) => Side::Good(v),
                Err(detail) => Side::Bad(detail),
            },
            Ok(None) => Side::Missing,
            Err(DurableError::Damaged { detail, .. }) => Side::Bad(detail),
            Err(e) => return Err(e.into()),
        };
        let stored = match records.get(&slot) {
            None => Side::Missing,
            Some(raw) => match check_value(&slot, raw) {
                Ok(()) => Side::Good(Value::Live(raw.clone())),
                Err(detail) => Side::Bad(detail),
            },
        };
        let value = match (copy, stored) {
            (Side::Good(c), stored) => {
                let agrees = match (&c, &stored) {
                    (Value::Live(a), Side::Good(Value::Live(b))) => a == b,
                    (Value::Destroyed, Side::Missing) => true,
                    _ => false,
                };
                if !agrees {
                    let was = match &stored {
                        Side::Missing => "missing".to_owned(),
                        Side::Bad(d) => format!("damaged ({d})"),
                        Side::Good(_) => "older or different".to_owned(),
                    };
                    match &c {
                        Value::Live(raw) => batch.put(slot.db_key(), raw),
                        Value::Destroyed => batch.delete(slot.db_key()),
                    }
                    repairs.push((
                        slot.kind(),
                        name.clone(),
                        path.clone(),
                        format!("state store record was {was}; replaced by its copy"),
                    ));
                }
                c
            }
            (Side::Missing | Side::Bad(_), Side::Good(v)) if newer_keys(&slot, &v, &copied) => {
                return Err(unrecoverable(
                    format!(
                        "record copy {name} is missing or damaged, and the state store's record is older than the key copies of that cluster: its last rotations would be lost"
                    ),
                    &path,
                ));
            }
            (Side::Missing, Side::Good(v)) => {
                if !backfill {
                    repairs.push((
                        slot.kind(),
                        name.clone(),
                        path.clone(),
                        "record copy was missing; written again from the state store".into(),
                    ));
                }
                rewrite.push((name.clone(), v.clone()));
                v
            }
            (Side::Bad(detail), Side::Good(v)) => {
                repairs.push((
                    slot.kind(),
                    name.clone(),
                    path.clone(),
                    format!(
                        "record copy was damaged ({detail}); written again from the state store"
                    ),
                ));
                rewrite.push((name.clone(), v.clone()));
                v
            }
            (Side::Bad(detail), Side::Missing | Side::Bad(_)) => {
                return Err(unrecoverable(
                    format!("record {name} is damaged: its copy does not verify ({detail}) and the state store {} has no good twin", state.display()),
                    &path,
                ));
            }
            (Side::Missing, Side::Bad(detail)) => {
                return Err(unrecoverable(
                    format!(
                        "state store record {name} is damaged ({detail}) and its copy is missing"
                    ),
                    &path,
                ));
            }
            (Side::Missing, Side::Missing) => continue,
        };
        agreed.insert(slot, value);
    }
    check_complete(&agreed, files).map_err(|(what, file)| unrecoverable(what, &file))?;
    files.put_all(rewrite.iter().map(|(n, v)| (n.as_str(), encode_copy(v))))?;
    db.write_opt(batch, &sync_opts())?;
    for (kind, name, path, what) in repairs {
        tracing::warn!(record = %name, file = %path.display(), "repaired: {what}");
        count_repair(kind);
    }
    if backfill && !rewrite.is_empty() {
        tracing::info!(
            records = rewrite.len(),
            dir = %files.dir().display(),
            "wrote a copy of every key record (first start of this version on this data dir)"
        );
    }
    Ok(())
}

/// Whether `value`, a cluster record from RocksDB, predates a key version
/// that has a copy (so the cluster's copy, now lost, was newer).
fn newer_keys(slot: &Slot, value: &Value, copied: &BTreeSet<Slot>) -> bool {
    let (Slot::Cluster(name), Value::Live(raw)) = (slot, value) else {
        return false;
    };
    let Ok(cluster) = decode_cluster(name, raw) else {
        return false;
    };
    copied.iter().any(|s| match s {
        Slot::Kek(c, v) => c == name && *v >= cluster.upcoming_version(),
        _ => false,
    })
}

/// RocksDB does not open or read: rebuild it from the copies if they are a
/// complete, verified set, moving the damaged store aside; else refuse.
fn rebuild(data_dir: &Path, files: RecordFiles, cause: String) -> Result<Store, StoreError> {
    let state = data_dir.join(STATE_DIR);
    let fail = |why: String, file: &Path| {
        unrecoverable(
            format!(
                "state store {} cannot be opened ({cause}) and the record copies in {} cannot replace it: {why}",
                state.display(),
                files.dir().display()
            ),
            file,
        )
    };
    let mut records = BTreeMap::new();
    for name in files.names()? {
        let Some(slot) = Slot::from_name(&name) else {
            continue;
        };
        let path = files.path(&name);
        let body = match files.get(&name) {
            Ok(Some(body)) => body,
            Ok(None) => continue,
            Err(DurableError::Damaged { detail, .. }) => {
                return Err(fail(format!("copy {name} is damaged ({detail})"), &path))
            }
            Err(e) => return Err(e.into()),
        };
        let value = decode_copy(&slot, &body)
            .map_err(|detail| fail(format!("copy {name} is damaged ({detail})"), &path))?;
        records.insert(slot, value);
    }
    check_complete(&records, &files).map_err(|(why, file)| fail(why, &file))?;
    let aside = if state.exists() {
        let mut aside = data_dir.join(format!(
            "{STATE_DIR}.damaged-{}",
            edgekms_daemon::config::now_unix()
        ));
        let mut n = 1;
        while aside.exists() {
            aside = data_dir.join(format!(
                "{STATE_DIR}.damaged-{}-{n}",
                edgekms_daemon::config::now_unix()
            ));
            n += 1;
        }
        std::fs::rename(&state, &aside).map_err(|e| io_err("rename", &state, e))?;
        Some(aside)
    } else {
        None
    };
    let db = DB::open(&db_options(true), &state).map_err(|e| StoreError::Open {
        path: state.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut batch = WriteBatch::default();
    for (slot, value) in &records {
        if let Value::Live(raw) = value {
            batch.put(slot.db_key(), raw);
        }
    }
    db.write_opt(batch, &sync_opts())?;
    tracing::error!(
        state = %state.display(),
        moved_to = %aside.as_ref().map(|a| a.display().to_string()).unwrap_or_else(|| "(it was missing)".into()),
        records = records.len(),
        "the state store was damaged ({cause}); moved it aside and rebuilt it from the record copies in {}; no key was lost, audit records written before now stay in the moved-aside store",
        files.dir().display()
    );
    count_repair("store");
    Store::assemble(db, files)
}

/// Creates the state of a new data dir (`init`, `restore`): refuses one
/// that is not provably empty, then writes the marker before anything else.
pub fn create(data_dir: &Path) -> Result<Store, StoreError> {
    match probe(data_dir)? {
        Probe::Empty => {}
        Probe::Initialized(why) | Probe::Partial(why) => {
            return Err(StoreError::NotEmpty {
                dir: data_dir.display().to_string(),
                why,
            })
        }
    }
    durable::write_marker(data_dir)?;
    let files = RecordFiles::open(&data_dir.join(COPIES_DIR))?;
    let state = data_dir.join(STATE_DIR);
    let db = DB::open(&db_options(true), &state).map_err(|e| StoreError::Open {
        path: state.display().to_string(),
        detail: e.to_string(),
    })?;
    Store::assemble(db, files)
}
