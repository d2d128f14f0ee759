//! A standalone node's local backup (`kmsctl local backup`, the admin
//! `Backup` RPC: [`make`]) and its restore into an empty data dir
//! (`edgekms-plugin restore`: [`open`], [`restore`]).
//!
//! The file is the backups' format ([`edgekms_core::sealedfile`]:
//! header, key check, AES-256-GCM under a 256-bit key the operator keeps
//! apart) with the magic `EKNB`. The node sealing key is NOT in it (it is
//! sealed to this node's TPM): a restore makes a new one, sealed by the new
//! node's sealer, and rewraps every KEK version under it. So a backup
//! brings a node's keys back after its data dir or its TPM is lost.
//!
//! Dump (plaintext, only in zeroizing buffers; integers big-endian, `bytes`
//! = u32 length and the bytes): `created_unix` u64, cluster `bytes`, u32
//! count of versions, each: version u32, state u8 (0 pending, 1 primary,
//! 2 decrypt-only, 3 retired), created_unix u64, key_id `bytes`, then 32
//! key bytes unless retired.
//!
//! Version numbers: a node may have rotated after the backup was made, and
//! apiservers may hold ciphertexts under those versions. A restored node
//! must never mint those numbers again, so the restore records a retired
//! placeholder [`RESTORE_SKIP`] versions above the highest backed-up one:
//! the next rotation is above every version the lost node could plausibly
//! have made (key_ids hash their key, so even a reused number would never
//! reuse a key_id).

use std::path::{Path, PathBuf};

use edgekms_core::sealedfile::{self, FileError};
use edgekms_core::{KeyVersion, Keyring, VersionState};
use edgekms_hsm::{Key256, Sealer};
use zeroize::Zeroizing;

use crate::cache::{byte_state, state_byte, Cache, CacheError};
use crate::error::NodeError;
use crate::node::Node;
use crate::recovery;

/// The file's first bytes ("edgekms node backup").
pub const MAGIC: &[u8; 4] = b"EKNB";
/// How far above the highest backed-up version a restored node's next
/// version starts.
pub const RESTORE_SKIP: u32 = 1000;

/// What a node backup holds.
pub struct NodeDump {
    pub created_unix: u64,
    pub cluster: String,
    pub keyring: Keyring,
}

impl std::fmt::Debug for NodeDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDump")
            .field("cluster", &self.cluster)
            .field("versions", &self.keyring.versions().count())
            .finish_non_exhaustive()
    }
}

/// Encodes a dump (plaintext).
pub fn encode(created_unix: u64, keyring: &Keyring) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::new());
    out.extend_from_slice(&created_unix.to_be_bytes());
    let cluster = keyring.cluster().as_bytes();
    out.extend_from_slice(&(cluster.len() as u32).to_be_bytes());
    out.extend_from_slice(cluster);
    let versions: Vec<&KeyVersion> = keyring.versions().collect();
    out.extend_from_slice(&(versions.len() as u32).to_be_bytes());
    for kv in versions {
        out.extend_from_slice(&kv.version.to_be_bytes());
        out.push(state_byte(kv.state()));
        out.extend_from_slice(&kv.created_unix.to_be_bytes());
        out.extend_from_slice(&(kv.key_id.len() as u32).to_be_bytes());
        out.extend_from_slice(kv.key_id.as_bytes());
        if let Some(key) = kv.key() {
            out.extend_from_slice(key.expose());
        }
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| format!("{what} is cut short"))?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

/// Decodes a dump; every version's key_id must match its key.
pub fn decode(plain: &[u8]) -> Result<NodeDump, String> {
    let mut r = Reader(plain);
    let created_unix = r.u64("the creation time")?;
    let cluster = r.string("the cluster name")?;
    edgekms_core::keyid::validate_name(&cluster).map_err(|e| e.to_string())?;
    let mut keyring = Keyring::new(&cluster).map_err(|e| e.to_string())?;
    let count = r.u32("the version count")?;
    for _ in 0..count {
        let version = r.u32("a version number")?;
        let b = r.u8("a version state")?;
        let state =
            byte_state(b).ok_or_else(|| format!("version {version} has unknown state {b}"))?;
        let created = r.u64("a creation time")?;
        let key_id = r.string("a key_id")?;
        let kv = if state == VersionState::Retired {
            KeyVersion::retired(version, key_id, created)
        } else {
            let key = Key256::from_slice(r.take(32, "a key")?).ok_or("a key is not 32 bytes")?;
            let kv = KeyVersion::new(&cluster, version, state, key, created);
            if kv.key_id != key_id {
                return Err(format!("version {version}: key_id does not match its key"));
            }
            kv
        };
        keyring.insert(kv).map_err(|e| e.to_string())?;
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the last version", r.0.len()));
    }
    Ok(NodeDump {
        created_unix,
        cluster,
        keyring,
    })
}

/// The `Backup` admin RPC: every version of a standalone node, encrypted
/// under `key`.
pub fn make(node: &Node, key: &Key256) -> Result<(Vec<u8>, NodeDump), NodeError> {
    let snap = node.snapshot();
    if let Some(reason) = &snap.unavailable {
        return Err(NodeError::Unavailable(reason.clone()));
    }
    if node.cache().fleet()?.is_some() {
        return Err(NodeError::InvalidArgument(
            "this node's keys come from the central key service: back up the central service (`kmsctl backup`); a lost node joins again".into(),
        ));
    }
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let plain = encode(created_unix, &snap.keyring);
    Ok((
        sealedfile::seal(key, MAGIC, &plain),
        NodeDump {
            created_unix,
            cluster: node.cluster().to_owned(),
            keyring: snap.keyring.clone(),
        },
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("not an edgekms node backup (it does not start with \"EKNB\"; a central backup is restored with `edgekms-server restore`)")]
    NotABackup,
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "the backup is of cluster {backup:?}, not {configured:?}: check --cluster or the file"
    )]
    Cluster { backup: String, configured: String },
    #[error("{0} is not empty; restore into a new, empty --data-dir (never over a node's keys)")]
    NotEmpty(PathBuf),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<CacheError> for RestoreError {
    fn from(e: CacheError) -> Self {
        RestoreError::Node(e.into())
    }
}

/// Opens a node backup with `key`.
pub fn open(blob: &[u8], key: &Key256) -> Result<NodeDump, RestoreError> {
    let n = blob.len().min(MAGIC.len());
    if blob[..n] != MAGIC[..n] {
        return Err(RestoreError::NotABackup);
    }
    let plain = sealedfile::open(blob, key)?;
    decode(&plain).map_err(|e| FileError::Corrupt(e).into())
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> RestoreError {
    move |e| RestoreError::Io(format!("{what}: {e}"))
}

/// Refuses a data dir that exists and holds anything.
pub fn check_target(data_dir: &Path) -> Result<(), RestoreError> {
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(RestoreError::NotEmpty(data_dir.to_owned())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("read {}", data_dir.display()))(e)),
    }
}

/// What [`restore`] made.
pub struct Restored {
    pub versions: usize,
    pub primary: Option<(u32, String)>,
    pub next_version: u32,
    /// The new recovery passphrase (the node key is new).
    pub passphrase: Zeroizing<String>,
}

/// Writes `dump` into the empty `data_dir`: a new NSK sealed by the sealer
/// `make_sealer` builds for the directory it is given, the marker, every
/// version rewrapped, with copies. Built in a directory beside and renamed
/// into place: on failure nothing is left behind.
pub fn restore(
    dump: &NodeDump,
    data_dir: &Path,
    make_sealer: impl FnOnce(&Path) -> Result<Box<dyn Sealer>, NodeError>,
) -> Result<Restored, RestoreError> {
    check_target(data_dir)?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| RestoreError::Io(format!("{} has no file name", data_dir.display())))?;
    let building = data_dir.with_file_name(format!(
        ".{}.restoring-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = build(dump, &building, make_sealer);
    let restored = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    // An empty target dir (e.g. a mount point's subdir) is replaced.
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).map_err(io(format!("remove {}", data_dir.display())))?;
    }
    if let Err(e) = std::fs::rename(&building, data_dir) {
        let _ = std::fs::remove_dir_all(&building);
        return Err(io(format!("rename into {}", data_dir.display()))(e));
    }
    if let Some(parent) = data_dir.parent() {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(restored)
}

fn build(
    dump: &NodeDump,
    dir: &Path,
    make_sealer: impl FnOnce(&Path) -> Result<Box<dyn Sealer>, NodeError>,
) -> Result<Restored, RestoreError> {
    crate::node::private_data_dir(dir)?;
    let sealer = make_sealer(dir)?;
    let mut ring = dump.keyring.clone();
    let top = ring.versions().map(|kv| kv.version).max().unwrap_or(0);
    let skip = top.saturating_add(RESTORE_SKIP);
    if skip > top {
        ring.insert(KeyVersion::retired(
            skip,
            format!("{}/v{skip}/restore-gap", dump.cluster),
            dump.created_unix,
        ))
        .map_err(NodeError::from)?;
    }
    let store = Cache::open_with(dir, Some(&dump.cluster))?;
    let nsk = Key256::generate();
    let passphrase = recovery::generate_passphrase();
    let wrapped = recovery::wrap(&nsk, &passphrase, &dump.cluster);
    let blob = sealer.seal(&nsk).map_err(NodeError::from)?;
    edgekms_daemon::durable::write_marker(dir).map_err(CacheError::from)?;
    store.put_new_nsk(&blob, &wrapped, &nsk, &ring)?;
    // Read back as the plugin will.
    let back = store.load_keyring(&nsk)?;
    if back.versions().count() != ring.versions().count() {
        return Err(RestoreError::File(FileError::Corrupt(
            "the restored cache does not read back".into(),
        )));
    }
    Ok(Restored {
        versions: dump.keyring.versions().count(),
        primary: dump
            .keyring
            .primary()
            .map(|p| (p.version, p.key_id.clone())),
        next_version: ring.next_version().map_err(NodeError::from)?,
        passphrase,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> Keyring {
        let mut ring = Keyring::new("edge-1").unwrap();
        for _ in 0..3 {
            let v = ring.add_pending(Key256::generate(), 5).unwrap();
            ring.promote(v).unwrap();
        }
        ring.disable(1, 0).unwrap();
        ring.retire(1).unwrap();
        ring
    }

    #[test]
    fn dumps_round_trip_and_files_refuse_other_keys_and_damage() {
        let ring = ring();
        let plain = encode(9, &ring);
        let back = decode(&plain).unwrap();
        assert_eq!(back.cluster, "edge-1");
        assert_eq!(back.created_unix, 9);
        for (a, b) in ring.versions().zip(back.keyring.versions()) {
            assert_eq!(
                (a.version, a.state(), &a.key_id),
                (b.version, b.state(), &b.key_id)
            );
            assert!(a.key() == b.key());
        }
        let key = Key256::generate();
        let blob = sealedfile::seal(&key, MAGIC, &plain);
        assert!(open(&blob, &key).is_ok());
        assert!(matches!(
            open(&blob, &Key256::generate()),
            Err(RestoreError::File(FileError::WrongKey))
        ));
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(open(&bad, &key).is_err());
        assert!(matches!(
            open(b"EKBK....", &key),
            Err(RestoreError::NotABackup)
        ));
        for k in ring.versions().filter_map(|kv| kv.key()) {
            assert!(
                !blob.windows(32).any(|w| w == k.expose()),
                "key in the clear"
            );
        }
    }

    #[test]
    fn restore_goes_into_an_empty_dir_only_and_skips_versions() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"").unwrap();
        let dump = decode(&encode(1, &ring())).unwrap();
        let soft = |d: &Path| -> Result<Box<dyn Sealer>, NodeError> {
            Ok(Box::new(edgekms_hsm::soft::SoftSealer::open_or_create(
                &d.join("soft-sealer.key"),
            )?))
        };
        assert!(matches!(
            restore(&dump, &target, soft),
            Err(RestoreError::NotEmpty(_))
        ));
        std::fs::remove_file(target.join("x")).unwrap();
        let r = restore(&dump, &target, soft).unwrap();
        assert_eq!(r.next_version, 3 + RESTORE_SKIP + 1);
        assert!(edgekms_daemon::durable::has_marker(&target));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing left beside"
        );
        // A failing sealer leaves nothing behind.
        let other = dir.path().join("other");
        let failing = |_: &Path| -> Result<Box<dyn Sealer>, NodeError> {
            Err(NodeError::Unavailable("no TPM".into()))
        };
        assert!(restore(&dump, &other, failing).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_dumps_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&raw);
        }

        #[test]
        fn arbitrary_files_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..120)) {
            let key = Key256::from_bytes(&[1; 32]);
            let _ = open(&raw, &key);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&raw);
            let _ = open(&with_magic, &key);
        }

        #[test]
        fn dumps_round_trip(n in 1usize..6, created in any::<u64>()) {
            let mut ring = Keyring::new("c").unwrap();
            for _ in 0..n {
                let v = ring.add_pending(Key256::generate(), created).unwrap();
                ring.promote(v).unwrap();
            }
            let back = decode(&encode(created, &ring)).unwrap();
            prop_assert_eq!(back.keyring.versions().count(), n);
            prop_assert_eq!(back.keyring.primary().map(|p| p.key_id.clone()), ring.primary().map(|p| p.key_id.clone()));
        }
    }
}
