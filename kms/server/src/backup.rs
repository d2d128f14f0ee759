//! Backup and restore of the central service's state: `kmsctl backup`
//! (the `Backup` RPC, [`make`]) and `edgekms-server restore` ([`open`],
//! [`restore`]).
//!
//! A backup holds what a new host needs to take over, encrypted under a
//! 256-bit key the operator supplies and keeps apart from the backups: every
//! cluster record, every KEK version that still has a central copy, the CA
//! and server certificates with their private keys, and (unless left out)
//! the audit log. The root key is NOT in it: it is sealed to the old host's
//! TPM. Restoring makes a new root key, seals it with the new host's
//! sealer, and writes every record wrapped under it. The CA is the same, so
//! nodes and operators keep their certificates.
//!
//! The file is [`edgekms_core::sealedfile`] with magic `EKBK`.
//!
//! The dump (plaintext; only ever in a zeroizing buffer) is a sequence of
//! fields, `bytes` being a u32 length and the bytes:
//! `created_unix` u64, CA cert `bytes`, CA key (PKCS#8) `bytes`, server
//! cert `bytes`, server key `bytes`; u32 count of clusters, each a `bytes`
//! of the [`Cluster`] record as the store keeps it (JSON); u32 count of
//! KEKs, each cluster `bytes`, version u32, key_id `bytes`, 32 key bytes;
//! u32 count of audit records, each a `bytes` of its JSON.

use std::path::{Path, PathBuf};

use edgekms_hsm::{Key256, Sealer};
use zeroize::Zeroizing;

use super::audit::AuditRecord;
use super::error::ServerError;
use super::store::{self, Change, Probe, Store, StoreError};
use super::{init, lock, now_unix, Core};
use edgekms_core::keyid;
use edgekms_core::rotation::cluster::Cluster;
use edgekms_daemon::pki::{self, Ca, PrivateKey};
use edgekms_daemon::tls;

/// The file's first bytes.
pub const MAGIC: &[u8; 4] = b"EKBK";
use edgekms_core::sealedfile::{self, FileError};
pub use edgekms_core::sealedfile::{FORMAT, HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("not an edgekms backup (it does not start with \"EKBK\")")]
    NotABackup,
    #[error("backup format {0} is not supported: this edgekms-server reads format {FORMAT}; restore with the version that wrote it, or a newer one")]
    Format(u8),
    #[error(
        "backup does not open with this key: it was made under another key file (check --key-file)"
    )]
    WrongKey,
    #[error("backup is truncated: {0}; use a complete copy")]
    Truncated(String),
    #[error("backup is corrupt: {0}; use another copy")]
    Corrupt(String),
    #[error("{0} already holds an initialized edgekms-server state; refusing to overwrite it (restore into a new, empty --data-dir)")]
    Initialized(PathBuf),
    #[error("{0} holds a partial state (an interrupted restore?); remove it and restore again")]
    Partial(PathBuf),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl From<FileError> for BackupError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Format(f) => BackupError::Format(f),
            FileError::WrongKey => BackupError::WrongKey,
            FileError::Truncated(d) => BackupError::Truncated(d),
            FileError::Corrupt(d) => BackupError::Corrupt(d),
        }
    }
}

impl From<StoreError> for BackupError {
    fn from(e: StoreError) -> Self {
        BackupError::Server(e.into())
    }
}

impl From<edgekms_hsm::SealError> for BackupError {
    fn from(e: edgekms_hsm::SealError) -> Self {
        BackupError::Server(e.into())
    }
}

impl From<pki::PkiError> for BackupError {
    fn from(e: pki::PkiError) -> Self {
        BackupError::Server(e.into())
    }
}

/// Reads a backup key file (`openssl rand -hex 32 > backup.key`).
pub fn read_key_file(path: &Path) -> Result<Key256, BackupError> {
    edgekms_daemon::config::read_key_file(path).map_err(|e| BackupError::KeyFile {
        path: e.path,
        reason: e.reason,
    })
}

/// What a backup holds, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub clusters: u32,
    pub key_versions: u32,
    pub audit_records: u32,
    pub created_unix: u64,
}

/// One KEK version with a central copy.
struct Kek {
    cluster: String,
    version: u32,
    key_id: String,
    key: Key256,
}

/// An opened backup. Holds key material: no Clone, redacted Debug, every
/// key zeroized on drop.
pub struct Dump {
    pub created_unix: u64,
    ca_cert: Vec<u8>,
    ca_key: PrivateKey,
    server_cert: Vec<u8>,
    server_key: PrivateKey,
    pub clusters: Vec<Cluster>,
    keks: Vec<Kek>,
    audit: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Dump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dump")
            .field("created_unix", &self.created_unix)
            .field("clusters", &self.clusters.len())
            .field("keks", &format_args!("{} [redacted]", self.keks.len()))
            .field("audit", &self.audit.len())
            .finish_non_exhaustive()
    }
}

impl Dump {
    pub fn summary(&self) -> Summary {
        Summary {
            clusters: count(self.clusters.len()),
            key_versions: count(self.keks.len()),
            audit_records: count(self.audit.len()),
            created_unix: self.created_unix,
        }
    }

    /// The SHA-256 pin of the CA in the backup (`sha256:...`).
    pub fn ca_hash(&self) -> Result<String, BackupError> {
        Ok(pki::spki_pin(&self.ca_cert)?)
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn corrupt(detail: impl Into<String>) -> BackupError {
    BackupError::Corrupt(detail.into())
}

// ---- writing ----

/// Appends fields to a buffer reserved up front, so that no reallocation
/// leaves a stray copy of key material behind.
struct Writer(Zeroizing<Vec<u8>>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u32(count(b.len()));
        self.0.extend_from_slice(b);
    }
}

fn store_err(key: &str, e: impl std::fmt::Display) -> ServerError {
    StoreError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    }
    .into()
}

/// The `Backup` RPC: the whole state, one consistent cut of it, encrypted
/// under `key`.
pub fn make(
    core: &Core,
    key: &Key256,
    with_audit: bool,
) -> Result<(Vec<u8>, Summary), ServerError> {
    let created_unix = now_unix();
    let (ca_cert, ca_key, server_cert, server_key, clusters, keks) = {
        // Every change commits under this lock: clusters and KEKs read
        // while holding it belong together.
        let state = lock(&core.state);
        let (ca_cert, ca_key, server_cert, server_key) = core.store.identity(&core.root)?;
        let mut clusters = Vec::with_capacity(state.clusters.len());
        let mut keks = Vec::new();
        for c in state.clusters.values() {
            clusters.push(
                serde_json::to_vec(c)
                    .map_err(|e| store_err(&format!("cluster/{}", c.name()), e))?,
            );
            for (&version, meta) in c.versions() {
                // Retired versions have no central copy any more.
                if let Some(kek) = core
                    .store
                    .kek(&core.root, c.name(), version, &meta.key_id)?
                {
                    keks.push(Kek {
                        cluster: c.name().to_owned(),
                        version,
                        key_id: meta.key_id.clone(),
                        key: kek,
                    });
                }
            }
        }
        (ca_cert, ca_key, server_cert, server_key, clusters, keks)
    };
    let mut audit = Vec::new();
    if with_audit {
        core.store.audit_records(|raw| {
            audit.push(raw.to_vec());
            true
        })?;
    }

    let field = |b: &[u8]| 4 + b.len();
    let size = 8
        + field(&ca_cert)
        + field(ca_key.der())
        + field(&server_cert)
        + field(server_key.der())
        + 4
        + clusters.iter().map(|c| field(c)).sum::<usize>()
        + 4
        + keks
            .iter()
            .map(|k| field(k.cluster.as_bytes()) + 4 + field(k.key_id.as_bytes()) + 32)
            .sum::<usize>()
        + 4
        + audit.iter().map(|a| field(a)).sum::<usize>();
    let mut w = Writer(Zeroizing::new(Vec::with_capacity(size)));
    w.u64(created_unix);
    w.bytes(&ca_cert);
    w.bytes(ca_key.der());
    w.bytes(&server_cert);
    w.bytes(server_key.der());
    w.u32(count(clusters.len()));
    for c in &clusters {
        w.bytes(c);
    }
    w.u32(count(keks.len()));
    for k in &keks {
        w.bytes(k.cluster.as_bytes());
        w.u32(k.version);
        w.bytes(k.key_id.as_bytes());
        w.0.extend_from_slice(k.key.expose());
    }
    w.u32(count(audit.len()));
    for a in &audit {
        w.bytes(a);
    }
    let blob = sealedfile::seal(key, MAGIC, &w.0);
    let summary = Summary {
        clusters: count(clusters.len()),
        key_versions: count(keks.len()),
        audit_records: count(audit.len()),
        created_unix,
    };
    Ok((blob, summary))
}

impl Core {
    /// `kmsctl backup`: [`make`], audited as event `backup`.
    pub fn backup(
        &self,
        actor: &str,
        key: &Key256,
        with_audit: bool,
    ) -> Result<(Vec<u8>, Summary), ServerError> {
        let rec = AuditRecord::new("backup", actor);
        match make(self, key, with_audit) {
            Ok((blob, summary)) => {
                self.audit(rec.detail(format!(
                    "{} clusters, {} key versions, {} audit records, {} bytes",
                    summary.clusters,
                    summary.key_versions,
                    summary.audit_records,
                    blob.len()
                )));
                Ok((blob, summary))
            }
            Err(e) => {
                self.audit(rec.result(&e.to_string()));
                Err(e)
            }
        }
    }
}

// ---- reading ----

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], BackupError> {
        if self.rest.len() < n {
            return Err(corrupt(format!("the contents end inside {what}")));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u32(&mut self, what: &str) -> Result<u32, BackupError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, BackupError> {
        let mut out = [0u8; 8];
        out.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(out))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], BackupError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    fn string(&mut self, what: &str) -> Result<String, BackupError> {
        String::from_utf8(self.bytes(what)?.to_vec())
            .map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }
}

/// Opens a backup with `key` and checks everything in it: a clear error for
/// a file that is no backup, of another format, for another key,
/// truncated, or altered.
pub fn open(blob: &[u8], key: &Key256) -> Result<Dump, BackupError> {
    let magic_len = blob.len().min(MAGIC.len());
    if blob[..magic_len] != MAGIC[..magic_len] {
        return Err(BackupError::NotABackup);
    }
    parse(&sealedfile::open(blob, key)?)
}

fn parse(plain: &[u8]) -> Result<Dump, BackupError> {
    let mut r = Reader { rest: plain };
    let created_unix = r.u64("the creation time")?;
    let ca_cert = r.bytes("the CA certificate")?.to_vec();
    let ca_key = PrivateKey::from_der(r.bytes("the CA key")?.to_vec());
    let server_cert = r.bytes("the server certificate")?.to_vec();
    let server_key = PrivateKey::from_der(r.bytes("the server key")?.to_vec());
    let n = r.u32("the cluster count")?;
    let mut clusters: Vec<Cluster> = Vec::new();
    for _ in 0..n {
        let raw = r.bytes("a cluster record")?;
        let c: Cluster = serde_json::from_slice(raw)
            .map_err(|e| corrupt(format!("a cluster record does not parse: {e}")))?;
        keyid::validate_name(c.name()).map_err(|e| corrupt(e.to_string()))?;
        if clusters.iter().any(|o| o.name() == c.name()) {
            return Err(corrupt(format!("cluster {} appears twice", c.name())));
        }
        clusters.push(c);
    }
    let n = r.u32("the KEK count")?;
    let mut keks: Vec<Kek> = Vec::new();
    for _ in 0..n {
        let cluster = r.string("a KEK's cluster")?;
        let version = r.u32("a KEK's version")?;
        let key_id = r.string("a KEK's key_id")?;
        let key = Key256::from_slice(r.take(32, "a KEK")?)
            .ok_or_else(|| corrupt("a KEK is not 256 bits"))?;
        // The key_id hashes the key: a KEK that does not match its key_id
        // (or its cluster's record) is refused rather than restored.
        let known = clusters
            .iter()
            .find(|c| c.name() == cluster)
            .and_then(|c| c.versions().get(&version))
            .is_some_and(|m| m.key_id == key_id);
        if !known || keyid::derive(&cluster, version, &key) != key_id {
            return Err(corrupt(format!(
                "KEK {cluster} v{version} does not match its key_id {key_id}"
            )));
        }
        if keks
            .iter()
            .any(|k| k.cluster == cluster && k.version == version)
        {
            return Err(corrupt(format!("KEK {cluster} v{version} appears twice")));
        }
        keks.push(Kek {
            cluster,
            version,
            key_id,
            key,
        });
    }
    let n = r.u32("the audit record count")?;
    let mut audit = Vec::new();
    for _ in 0..n {
        audit.push(r.bytes("an audit record")?.to_vec());
    }
    if !r.rest.is_empty() {
        return Err(corrupt(format!(
            "{} unexplained bytes at the end",
            r.rest.len()
        )));
    }
    // The primary and every version nodes must hold need their key.
    for c in &clusters {
        for (&version, meta) in c.versions() {
            let has = keks
                .iter()
                .any(|k| k.cluster == c.name() && k.version == version);
            if meta.state.held_by_nodes() && !has {
                return Err(corrupt(format!(
                    "cluster {} version {version} ({}) has no key in the backup",
                    c.name(),
                    meta.state.as_str()
                )));
            }
        }
    }
    Ca::load(&ca_cert, &ca_key).map_err(|e| corrupt(format!("the CA: {e}")))?;
    Ok(Dump {
        created_unix,
        ca_cert,
        ca_key,
        server_cert,
        server_key,
        clusters,
        keks,
        audit,
    })
}

// ---- restoring ----

/// Refuses a data dir that is initialized or holds anything. Creates
/// nothing.
pub fn check_target(data_dir: &Path) -> Result<(), BackupError> {
    match store::probe(data_dir)? {
        Probe::Empty => Ok(()),
        Probe::Initialized(_) => Err(BackupError::Initialized(data_dir.to_owned())),
        Probe::Partial(_) => Err(BackupError::Partial(data_dir.to_owned())),
    }
}

/// What [`restore`] made.
#[derive(Debug)]
pub struct Restored {
    pub summary: Summary,
    pub ca_hash: String,
    /// The server certificate's names when it was issued anew (`--san`);
    /// `None`: the backed-up server certificate is kept.
    pub reissued: Option<Vec<String>>,
}

/// Writes `dump` into the new `data_dir` under a new root key sealed by
/// `sealer`, then opens the result as the server would, to check it.
///
/// With `names`, the server certificate is issued anew by the same CA for
/// these names (a new host name); otherwise the backed-up one is kept.
///
/// Version numbers continue from each cluster's restored `next_version`.
/// The old server may have minted versions after this backup was taken;
/// the restored one mints the same numbers again, with new keys, and so
/// with other key_ids (a key_id hashes its key, see `keyid.rs`): one
/// key_id never stands for two keys (DESIGN §4), even when an old KEK
/// comes back from a backup.
pub fn restore(
    dump: &Dump,
    data_dir: &Path,
    sealer: &dyn Sealer,
    names: Option<&[String]>,
) -> Result<Restored, BackupError> {
    check_target(data_dir)?;
    init::private_dir(data_dir)?;
    let ca = Ca::load(&dump.ca_cert, &dump.ca_key)?;
    let reissued = match names {
        Some(names) => Some(ca.issue_server(names)?),
        None => None,
    };
    let (server_cert, server_key) = match &reissued {
        Some(issued) => (&issued.cert_der, &issued.key),
        None => (&dump.server_cert, &dump.server_key),
    };
    tls::server_config(&dump.ca_cert, server_cert, server_key)
        .map_err(|e| corrupt(format!("the server certificate or key: {e}")))?;

    let root = Key256::generate();
    let sealed = sealer.seal(&root)?;
    // The marker and the copies too: a restored dir is a normal one.
    let store = Store::create(data_dir)?;
    let summary = dump.summary();
    let mut seq = 0;
    for rec in &dump.audit {
        seq += 1;
        store.put_audit(seq, rec)?;
    }
    let note = AuditRecord::new("restore", "edgekms-server restore").detail(format!(
        "from a backup made at {} (unix): {} clusters, {} key versions; new root key sealed by {}",
        dump.created_unix,
        summary.clusters,
        summary.key_versions,
        sealer.name()
    ));
    store.put_audit(seq + 1, &note.to_json())?;
    let mut change = Change::default();
    for c in &dump.clusters {
        change.put_cluster(c)?;
    }
    for k in &dump.keks {
        change.put_kek(&root, &k.cluster, k.version, &k.key_id, &k.key);
    }
    store.commit(change)?;
    init::write_file(
        &data_dir.join("ca.pem"),
        pki::cert_pem(&dump.ca_cert).as_bytes(),
        0o644,
    )?;
    // Last: until this lands, the data dir counts as not initialized.
    store.put_init(
        &sealed,
        &root,
        &dump.ca_cert,
        &dump.ca_key,
        server_cert,
        server_key,
    )?;
    drop(store);

    // Open it as `edgekms-server` will: unseal, load, unwrap every KEK.
    let core = init::open(data_dir, sealer)?;
    let loaded = core.store().clusters()?;
    let unreadable = |what: String| {
        corrupt(format!(
            "the restored {} does not read back ({what}); remove it and restore again",
            data_dir.display()
        ))
    };
    if loaded.len() != dump.clusters.len() {
        return Err(unreadable(format!(
            "{} clusters written, {} read",
            dump.clusters.len(),
            loaded.len()
        )));
    }
    for k in &dump.keks {
        let back = core
            .store()
            .kek(core.root(), &k.cluster, k.version, &k.key_id)?;
        if back.as_ref() != Some(&k.key) {
            return Err(unreadable(format!("KEK {} v{}", k.cluster, k.version)));
        }
    }
    Ok(Restored {
        summary,
        ca_hash: ca.pin()?,
        reissued: names.map(<[String]>::to_vec),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::init;
    use edgekms_hsm::soft::SoftSealer;

    fn soft(dir: &Path) -> SoftSealer {
        std::fs::create_dir_all(dir).unwrap();
        SoftSealer::open_or_create(&dir.join("soft-sealer.key")).unwrap()
    }

    /// A server with two clusters, one rotated, and one version retired.
    fn server(dir: &Path) -> Core {
        let sealer = soft(dir);
        init::init(dir, &sealer, &["localhost".to_owned()]).unwrap();
        let core = init::open(dir, &sealer).unwrap();
        let day = std::time::Duration::from_secs(86_400);
        core.add_node("op", "edge-1", "cp-1", day).unwrap();
        core.add_node("op", "edge-2", "cp-1", day).unwrap();
        core.rotate("op", "edge-1").unwrap();
        core.rotate("op", "edge-1").unwrap();
        // No node joined: v2 and v3 promoted at once; v1 and v2 decrypt-only.
        let (destroyed, _) = core.retire("op", "edge-1", 1).unwrap();
        assert!(destroyed);
        core
    }

    #[test]
    fn round_trip_keeps_records_keys_and_ca_under_a_new_root_key() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(&tmp.path().join("old"));
        let key = Key256::generate();
        let (blob, summary) = make(&core, &key, true).unwrap();
        assert_eq!(summary.clusters, 2);
        // edge-1 v2, v3 and edge-2 v1: the retired edge-1 v1 has no copy.
        assert_eq!(summary.key_versions, 3);
        assert!(summary.audit_records > 0);
        assert_eq!(&blob[..5], b"EKBK\x01");

        let dump = open(&blob, &key).unwrap();
        assert_eq!(dump.summary(), summary);
        let new_dir = tmp.path().join("new");
        let sealer = soft(&new_dir);
        let restored = restore(&dump, &new_dir, &sealer, None).unwrap();
        assert_eq!(restored.summary, summary);

        let back = init::open(&new_dir, &sealer).unwrap();
        assert!(back.root() != core.root(), "a new root key");
        assert_eq!(
            back.status("").unwrap().clusters,
            core.status("").unwrap().clusters
        );
        assert_eq!(
            back.tls_identity().unwrap().0,
            core.tls_identity().unwrap().0
        );
        for (cluster, version) in [("edge-1", 2), ("edge-1", 3), ("edge-2", 1)] {
            let s = core.status(cluster).unwrap();
            let key_id = &s.clusters[0]
                .versions
                .iter()
                .find(|v| v.version == version)
                .unwrap()
                .key_id;
            let old = core
                .store()
                .kek(core.root(), cluster, version, key_id)
                .unwrap()
                .unwrap();
            let new = back
                .store()
                .kek(back.root(), cluster, version, key_id)
                .unwrap()
                .unwrap();
            assert!(old == new, "{cluster} v{version}");
        }
        assert!(!back.store().has_kek("edge-1", 1).unwrap());
        let events: Vec<String> = back
            .audit_since(0)
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect();
        assert_eq!(events.last().map(String::as_str), Some("restore"));
        assert!(events.contains(&"retirement".to_owned()));
        assert_eq!(
            std::fs::read(new_dir.join("ca.pem")).unwrap(),
            std::fs::read(tmp.path().join("old/ca.pem")).unwrap()
        );

        // The restored server mints v4 next, never reusing v2 or v3.
        let (v, key_id, created, _) = back.rotate("op", "edge-1").unwrap();
        assert_eq!((v, created), (4, true));
        assert!(key_id.starts_with("edge-1/v4/"));

        // A second restore into the now initialized dir is refused.
        drop(back);
        let err = restore(&dump, &new_dir, &sealer, None).unwrap_err();
        assert!(matches!(err, BackupError::Initialized(_)), "{err}");
    }

    #[test]
    fn wrong_key_truncation_tampering_and_other_files_are_refused_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(tmp.path());
        let key = Key256::generate();
        let (blob, _) = make(&core, &key, false).unwrap();

        let err = open(&blob, &Key256::generate()).unwrap_err();
        assert!(matches!(err, BackupError::WrongKey));
        assert!(
            err.to_string().contains("does not open with this key"),
            "{err}"
        );

        for cut in [
            blob.len() - 1,
            blob.len() / 2,
            HEADER_LEN,
            HEADER_LEN - 1,
            4,
        ] {
            let err = open(&blob[..cut], &key).unwrap_err();
            assert!(matches!(err, BackupError::Truncated(_)), "cut {cut}: {err}");
            assert!(err.to_string().starts_with("backup is truncated"), "{err}");
        }
        for i in [HEADER_LEN, HEADER_LEN + 20, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            let err = open(&bad, &key).unwrap_err();
            assert!(matches!(err, BackupError::Corrupt(_)), "byte {i}: {err}");
        }
        // The body length is authenticated too.
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(open(&longer, &key), Err(BackupError::Corrupt(_))));
        let mut other_format = blob.clone();
        other_format[4] = 2;
        assert!(matches!(
            open(&other_format, &key),
            Err(BackupError::Format(2))
        ));
        assert!(matches!(
            open(b"{\"not\":1}", &key),
            Err(BackupError::NotABackup)
        ));
        assert!(matches!(open(b"", &key), Err(BackupError::Truncated(_))));
    }

    #[test]
    fn debug_never_shows_keys_and_key_files_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(tmp.path());
        let key = Key256::from_slice(&[0x5a; 32]).unwrap();
        let (blob, _) = make(&core, &key, false).unwrap();
        let shown = format!("{:?}", open(&blob, &key).unwrap());
        assert!(shown.contains("redacted"), "{shown}");

        let hex_key = "5a".repeat(32);
        assert!(Key256::from_hex(&format!("{hex_key}\n")).unwrap() == key);
        assert!(Key256::from_hex(&hex_key[..62]).is_none());
        assert!(Key256::from_hex(&"zz".repeat(32)).is_none());
        let file = tmp.path().join("backup.key");
        std::fs::write(&file, "not hex\n").unwrap();
        let err = read_key_file(&file).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        assert!(
            !err.contains("not hex"),
            "the file's contents are never echoed: {err}"
        );
    }

    #[test]
    fn restore_refuses_a_dir_with_state() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("old");
        let key = Key256::generate();
        let (blob, _) = make(&server(&old), &key, false).unwrap();
        let dump = open(&blob, &key).unwrap();
        let err = restore(&dump, &old, &soft(&old), None).unwrap_err();
        assert!(matches!(err, BackupError::Initialized(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        // A partial state (an interrupted restore) is refused too.
        let partial = tmp.path().join("partial");
        std::fs::create_dir_all(&partial).unwrap();
        Store::create(&partial)
            .unwrap()
            .put_audit(1, b"{}")
            .unwrap();
        let err = restore(&dump, &partial, &soft(&partial), None).unwrap_err();
        assert!(matches!(err, BackupError::Partial(_)), "{err}");
        // Nothing was written to either.
        assert!(!partial.join("ca.pem").exists());
    }
}

#[cfg(test)]
mod proptests;
