//! The central backup file and its codec, pure: [`make`] writes one from
//! a [`Snapshot`] of the state (`kmsctl backup`, the `Backup` RPC), [`open`]
//! reads and checks one; [`crate::restore`] writes it into a new data dir
//! (`edgekms-server restore`).
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

use edgekms_hsm::Key256;
use zeroize::Zeroizing;

use crate::error::ServerError;
use crate::state_store::{Kek, Snapshot, StoreError};
use edgekms_core::keyid;
use edgekms_core::rotation::cluster::Cluster;
use edgekms_daemon::pki::{self, Ca, PrivateKey};

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
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0} already holds an initialized edgekms-server state; refusing to overwrite it (restore into a new, empty --data-dir)")]
    Initialized(PathBuf),
    #[error("{0} holds a partial edgekms-server state (an interrupted `init`?); refusing to overwrite it (restore into a new, empty --data-dir)")]
    Partial(PathBuf),
    #[error("{dir} is not empty (it holds {holds}); refusing to restore into it: nothing was written (restore into a new or empty --data-dir)")]
    NotEmpty { dir: PathBuf, holds: String },
    #[error("{dir} {problem}; refusing to restore into it: nothing was written")]
    BadTarget { dir: PathBuf, problem: String },
    #[error("{op} {path}: {source}; nothing was put in place")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move the restored data dir into {dir}: {reason}; nothing was put in place")]
    Rename { dir: PathBuf, reason: String },
    #[error("{dir} is restored and in place, but syncing {parent} failed ({source}): it may not survive a power cut; run `sync` before relying on it")]
    SyncParent {
        dir: PathBuf,
        parent: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
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

/// An opened backup. Holds key material: no Clone, redacted Debug, every
/// key zeroized on drop.
pub struct Dump {
    pub created_unix: u64,
    pub(crate) ca_cert: Vec<u8>,
    pub(crate) ca_key: PrivateKey,
    pub(crate) server_cert: Vec<u8>,
    pub(crate) server_key: PrivateKey,
    pub clusters: Vec<Cluster>,
    pub(crate) keks: Vec<Kek>,
    pub(crate) audit: Vec<Vec<u8>>,
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
    BackupError::File(FileError::Corrupt(detail.into()))
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

/// The backup of `snapshot`, encrypted under `key`, made at `created_unix`.
pub fn make(snapshot: &Snapshot, key: &Key256, created_unix: u64) -> (Vec<u8>, Summary) {
    let id = &snapshot.identity;
    let clusters: Vec<Vec<u8>> = snapshot
        .clusters
        .iter()
        // A cluster record always serializes (plain strings and numbers).
        .filter_map(|c| serde_json::to_vec(c).ok())
        .collect();
    let (keks, audit) = (&snapshot.keks, &snapshot.audit);
    let field = |b: &[u8]| 4 + b.len();
    let size = 8
        + field(&id.ca_cert)
        + field(id.ca_key.der())
        + field(&id.server_cert)
        + field(id.server_key.der())
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
    w.bytes(&id.ca_cert);
    w.bytes(id.ca_key.der());
    w.bytes(&id.server_cert);
    w.bytes(id.server_key.der());
    w.u32(count(clusters.len()));
    for c in &clusters {
        w.bytes(c);
    }
    w.u32(count(keks.len()));
    for k in keks {
        w.bytes(k.cluster.as_bytes());
        w.u32(k.version);
        w.bytes(k.key_id.as_bytes());
        w.0.extend_from_slice(k.key.expose());
    }
    w.u32(count(audit.len()));
    for a in audit {
        w.bytes(a);
    }
    let blob = sealedfile::seal(key, MAGIC, &w.0);
    let summary = Summary {
        clusters: count(clusters.len()),
        key_versions: count(keks.len()),
        audit_records: count(audit.len()),
        created_unix,
    };
    (blob, summary)
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

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::{init, Central};
    use edgekms_hsm::soft::SoftSealer;
    use std::path::Path;

    pub(crate) fn soft(dir: &Path) -> SoftSealer {
        std::fs::create_dir_all(dir).unwrap();
        SoftSealer::open_or_create(&dir.join("soft-sealer.key")).unwrap()
    }

    /// A server with two clusters, one rotated, and one version retired.
    pub(crate) fn server(dir: &Path) -> Central {
        let sealer = soft(dir);
        init::init(dir, &sealer, &["localhost".to_owned()]).unwrap();
        let mut core = init::open(dir, &sealer).unwrap();
        let day = std::time::Duration::from_secs(86_400);
        core.add_node("op", "edge-1", "cp-1", day).unwrap();
        core.add_node("op", "edge-2", "cp-1", day).unwrap();
        core.rotate("op", "edge-1").unwrap();
        core.rotate("op", "edge-1").unwrap();
        // No node joined: v2 and v3 promoted at once; v1 and v2 decrypt-only.
        core.min_grace_secs = 1;
        let retired = core.retire("op", "edge-1", 1, 1, true).unwrap();
        assert!(!retired.destroyed, "disabled first");
        core.destroy_due_at(retired.destroy_after_unix);
        core
    }

    /// A backup of `core` under `key`.
    pub(crate) fn make(core: &Central, key: &Key256, with_audit: bool) -> (Vec<u8>, Summary) {
        core.backup("test", key, with_audit).unwrap()
    }

    #[test]
    fn wrong_key_truncation_tampering_and_other_files_are_refused_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(tmp.path());
        let key = Key256::generate();
        let (blob, _) = make(&core, &key, false);

        let err = open(&blob, &Key256::generate()).unwrap_err();
        assert!(matches!(err, BackupError::File(FileError::WrongKey)));
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
            assert!(
                matches!(err, BackupError::File(FileError::Truncated(_))),
                "cut {cut}: {err}"
            );
            assert!(err.to_string().starts_with("backup is truncated"), "{err}");
        }
        for i in [HEADER_LEN, HEADER_LEN + 20, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            let err = open(&bad, &key).unwrap_err();
            assert!(
                matches!(err, BackupError::File(FileError::Corrupt(_))),
                "byte {i}: {err}"
            );
        }
        // The body length is authenticated too.
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(
            open(&longer, &key),
            Err(BackupError::File(FileError::Corrupt(_)))
        ));
        let mut other_format = blob.clone();
        other_format[4] = 2;
        assert!(matches!(
            open(&other_format, &key),
            Err(BackupError::File(FileError::Format(2)))
        ));
        assert!(matches!(
            open(b"{\"not\":1}", &key),
            Err(BackupError::NotABackup)
        ));
        assert!(matches!(
            open(b"", &key),
            Err(BackupError::File(FileError::Truncated(_)))
        ));
    }

    #[test]
    fn debug_never_shows_keys_and_key_files_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(tmp.path());
        let key = Key256::from_slice(&[0x5a; 32]).unwrap();
        let (blob, _) = make(&core, &key, false);
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
}

#[cfg(test)]
mod proptests;
