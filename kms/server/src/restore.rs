//! `edgekms-server restore`: a new data dir from a backup ([`crate::backup`]
//! opens and checks the file), under a new root key sealed on this host.
//!
//! A restore is all or nothing. The target must be missing or an empty
//! directory; anything else is refused before anything is written. The
//! data dir is built in a staging dir beside it (`<parent>/.<name>.restore-<pid>`,
//! mode 0700), with the sealer opened on the staging dir (the soft sealer
//! keeps its key file there), opened and checked as the server would open
//! it, and only then renamed into place (rename(2) onto the missing path or
//! the empty dir), the parent synced. Any failure removes the staging dir
//! and leaves the target as it was.
//!
//! A staging dir left by a killed restore is removed by the next restore
//! into the same target: each restore holds an flock(2) on its own staging
//! dir while it works, so only the dirs nobody holds (their process died)
//! are removed, never a restore that still runs.
//!
//! Every cluster starts reconciling (see [`restore`]).
//!
//! Every join token not yet used at backup time is withdrawn: the backup
//! cannot tell whether it was used after it was taken, and a used token
//! must never enrol a node again. The nodes stay invited; `kmsctl node add`
//! issues new tokens.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use edgekms_core::sealedfile::FileError;
use edgekms_hsm::{Key256, Sealer};

use crate::audit::AuditRecord;
use crate::backup::{BackupError, Dump, Summary};
use crate::error::ServerError;
use crate::init;
use crate::rocks::{self, Probe};
use crate::state_store::{Batch, Op, StateStore};
use edgekms_daemon::pki::{self, Ca};
use edgekms_daemon::{durable, failpoint, tls};

/// The failpoint just before the staging dir is renamed into place.
pub const FAILPOINT_BEFORE_RENAME: &str = "restore-before-rename";

/// How many withdrawn tokens [`Restored::tokens_line`] names.
const NAMED_TOKENS: usize = 20;

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_owned();
    move |source| BackupError::Io { op, path, source }
}

/// Refuses a target that exists and is not an empty directory (a symbolic
/// link too: the rename would replace the link, not fill what it points
/// to). Reads only the directory listing (and, for a data dir, what
/// [`rocks::probe`] reads); changes nothing.
pub fn check_target(data_dir: &Path) -> Result<(), BackupError> {
    let bad = |problem: &str| BackupError::BadTarget {
        dir: data_dir.to_owned(),
        problem: problem.to_owned(),
    };
    let meta = match std::fs::symlink_metadata(data_dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("stat", data_dir)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(bad(
            "is a symbolic link (give the directory it points to as --data-dir)",
        ));
    }
    if !meta.is_dir() {
        return Err(bad("exists and is not a directory"));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(data_dir).map_err(io("list", data_dir))? {
        names.push(entry.map_err(io("list", data_dir))?.file_name());
    }
    if names.is_empty() {
        return Ok(());
    }
    // A data dir gets the precise message; a probe that fails (a damaged
    // store) falls back to the plain one: the dir is refused either way.
    let looks_like_data_dir = durable::has_marker(data_dir)
        || names
            .iter()
            .any(|n| n == rocks::STATE_DIR || n == rocks::COPIES_DIR);
    if looks_like_data_dir {
        match rocks::probe(data_dir) {
            Ok(Probe::Initialized(_)) => return Err(BackupError::Initialized(data_dir.to_owned())),
            Ok(Probe::Partial(_)) => return Err(BackupError::Partial(data_dir.to_owned())),
            Ok(Probe::Empty) | Err(_) => {}
        }
    }
    names.sort();
    let mut holds: Vec<String> = names
        .iter()
        .take(5)
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    if names.len() > holds.len() {
        holds.push(format!("and {} more", names.len() - holds.len()));
    }
    Err(BackupError::NotEmpty {
        dir: data_dir.to_owned(),
        holds: holds.join(", "),
    })
}

/// What [`restore`] made.
#[derive(Debug)]
pub struct Restored {
    pub summary: Summary,
    pub ca_hash: String,
    /// The server certificate's names when it was issued anew (`--san`);
    /// `None`: the backed-up server certificate is kept.
    pub reissued: Option<Vec<String>>,
    /// The sealer the new root key is sealed by (`tpm`, `soft`).
    pub sealer: &'static str,
    /// `cluster/node` of every join token withdrawn (its length is the
    /// count): nodes invited but not joined at backup time.
    pub tokens_withdrawn: Vec<String>,
    /// Staging dirs of killed restores into the same target, removed first.
    pub stale_removed: Vec<PathBuf>,
}

impl Restored {
    /// `join tokens withdrawn: 2 (edge-1/n4, edge-2/n9): ...` for the
    /// summary; the first [`NAMED_TOKENS`] are named.
    pub fn tokens_line(&self) -> String {
        let n = self.tokens_withdrawn.len();
        if n == 0 {
            return "join tokens withdrawn: none (no token was unused at backup time)".into();
        }
        let mut named = self
            .tokens_withdrawn
            .iter()
            .take(NAMED_TOKENS)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if n > NAMED_TOKENS {
            named.push_str(&format!(" and {} more", n - NAMED_TOKENS));
        }
        format!("join tokens withdrawn: {n} ({named}): issue new ones with `kmsctl node add`")
    }
}

/// Builds the data dir for `dump` beside `data_dir` under a new root key
/// sealed by the sealer `make_sealer` opens on the staging dir, checks it
/// by opening it as the server would, then renames it into place. On any
/// failure the staging dir is removed and `data_dir` is left as it was
/// (parent dirs this call created are removed too).
///
/// With `names`, the server certificate is issued anew by the same CA for
/// these names (a new host name); otherwise the backed-up one is kept.
///
/// Every cluster is restored reconciling: the old server may have minted,
/// promoted or destroyed versions after this backup was taken, so nothing
/// is rotated, promoted or retired until the cluster's nodes have
/// reported what they hold (by key_id), and the versions they hold that
/// the backup lacks come back from them (`rotation::cluster`'s
/// reconciliation).
pub fn restore(
    dump: &Dump,
    data_dir: &Path,
    make_sealer: impl FnOnce(&Path) -> Result<Box<dyn Sealer>, ServerError>,
    names: Option<&[String]>,
) -> Result<Restored, BackupError> {
    check_target(data_dir)?;
    let (parent, name) = split(data_dir)?;
    let made_parents = make_parents(&parent)?;
    let result = restore_beside(dump, data_dir, &parent, &name, make_sealer, names);
    if result.is_err() {
        // Deepest first; a dir someone else filled meanwhile stays.
        for dir in made_parents.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

fn restore_beside(
    dump: &Dump,
    data_dir: &Path,
    parent: &Path,
    name: &OsStr,
    make_sealer: impl FnOnce(&Path) -> Result<Box<dyn Sealer>, ServerError>,
    names: Option<&[String]>,
) -> Result<Restored, BackupError> {
    let stale_removed = remove_stale(parent, name)?;
    let staging = Staging::create(parent, name)?;
    let mut restored = build(dump, &staging.path, make_sealer, names)?;
    restored.stale_removed = stale_removed;
    staging.sync()?;
    failpoint::hit(FAILPOINT_BEFORE_RENAME);
    staging.rename_onto(data_dir)?;
    // The rename is durable only once the parent's entry is.
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|source| BackupError::SyncParent {
            dir: data_dir.to_owned(),
            parent: parent.to_owned(),
            source,
        })?;
    Ok(restored)
}

/// The target's parent (`.` for a bare name) and its own name.
fn split(data_dir: &Path) -> Result<(PathBuf, OsString), BackupError> {
    let name = data_dir.file_name().ok_or_else(|| BackupError::BadTarget {
        dir: data_dir.to_owned(),
        problem: "has no final name (give a path such as /var/lib/edgekms-server)".into(),
    })?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_owned()))
}

/// Creates the missing ancestors of the target (mode 0700, as `init`
/// does), returning them top-down so that a failed restore can remove them.
fn make_parents(parent: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut missing: Vec<PathBuf> = parent
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    let mut made = Vec::new();
    for dir in missing {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => made.push(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                for d in made.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
                return Err(io("create", &dir)(e));
            }
        }
    }
    Ok(made)
}

/// `.<name>.restore-` : the staging dirs' names, the pid following.
fn staging_prefix(name: &OsStr) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".restore-");
    prefix
}

/// Takes the staging dir's lock without waiting: false when another
/// process holds it.
fn try_lock(dir: &File) -> std::io::Result<bool> {
    // SAFETY: flock(2) on a descriptor `dir` owns for the whole call; no
    // memory is involved.
    let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Removes the staging dirs of killed restores into the same target: those
/// whose lock nobody holds. One a running restore holds is left alone (its
/// rename will then find the target filled, and fail cleanly).
fn remove_stale(parent: &Path, name: &OsStr) -> Result<Vec<PathBuf>, BackupError> {
    let prefix = staging_prefix(name);
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(parent).map_err(io("list", parent))? {
        let entry = entry.map_err(io("list", parent))?;
        let file = entry.file_name();
        let Some(pid) = file.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        if pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
            continue;
        }
        // Never follow a link planted under that name.
        if !entry
            .file_type()
            .map_err(io("stat", &entry.path()))?
            .is_dir()
        {
            continue;
        }
        let path = entry.path();
        let dir = match File::open(&path) {
            Ok(dir) => dir,
            // Removed meanwhile by another restore.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("open", &path)(e)),
        };
        if !try_lock(&dir).map_err(io("lock", &path))? {
            tracing::warn!(dir = %path.display(), "a restore into the same data dir is running: its staging dir is left alone");
            continue;
        }
        std::fs::remove_dir_all(&path).map_err(io(
            "remove the staging dir of an interrupted restore",
            &path,
        ))?;
        tracing::info!(dir = %path.display(), "removed the staging dir of an interrupted restore");
        removed.push(path);
    }
    Ok(removed)
}

/// The staging dir, locked while this restore works in it, removed on drop
/// unless renamed into place.
struct Staging {
    path: PathBuf,
    /// Holds the flock(2): a later restore removes only unheld ones.
    lock: File,
    placed: bool,
}

impl Staging {
    fn create(parent: &Path, name: &OsStr) -> Result<Self, BackupError> {
        let mut file = staging_prefix(name);
        file.push(std::process::id().to_string());
        let path = parent.join(file);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io("create the staging dir", &path))?;
        // From here on, dropping `Staging` removes the dir.
        let lock = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                return Err(io("open the staging dir", &path)(e));
            }
        };
        let staging = Staging {
            path,
            lock,
            placed: false,
        };
        let locked = try_lock(&staging.lock).map_err(io("lock the staging dir", &staging.path))?;
        if !locked {
            // Only another restore into the same target, which found our
            // fresh dir before we locked it, could hold it.
            return Err(io("lock the staging dir", &staging.path)(
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another restore into the same data dir is running",
                ),
            ));
        }
        Ok(staging)
    }

    /// Makes the staging dir's own entries (ca.pem, the marker, the
    /// soft-sealer key file) durable before the rename publishes them.
    fn sync(&self) -> Result<(), BackupError> {
        self.lock
            .sync_all()
            .map_err(io("sync the staging dir", &self.path))
    }

    fn rename_onto(mut self, data_dir: &Path) -> Result<(), BackupError> {
        match std::fs::rename(&self.path, data_dir) {
            Ok(()) => {
                self.placed = true;
                Ok(())
            }
            Err(e) => Err(BackupError::Rename {
                dir: data_dir.to_owned(),
                reason: rename_problem(&e, data_dir),
            }),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What a failed rename(2) onto the target means for the operator.
fn rename_problem(e: &std::io::Error, data_dir: &Path) -> String {
    let inside = data_dir.join("data");
    match e.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EXDEV) => format!(
            "{e}: it is a mount point or on another file system than its parent, and a restore is built beside its target and renamed into place; restore into a new directory inside it, e.g. --data-dir {}",
            inside.display()
        ),
        Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => format!(
            "{e}: something was written into it during the restore; it was left as it is"
        ),
        _ => e.to_string(),
    }
}

/// Writes `dump` into the empty staging `dir` under a new root key, then
/// opens the result as the server would, to check it.
fn build(
    dump: &Dump,
    dir: &Path,
    make_sealer: impl FnOnce(&Path) -> Result<Box<dyn Sealer>, ServerError>,
    names: Option<&[String]>,
) -> Result<Restored, BackupError> {
    let ca = Ca::load(&dump.ca_cert, &dump.ca_key)?;
    let reissued = match names {
        Some(names) => Some(ca.issue_server(names)?),
        None => None,
    };
    let (server_cert, server_key) = match &reissued {
        Some(issued) => (&issued.cert_der, &issued.key),
        None => (&dump.server_cert, &dump.server_key),
    };
    tls::server_config(&dump.ca_cert, server_cert, server_key).map_err(|e| {
        BackupError::File(FileError::Corrupt(format!(
            "the server certificate or key: {e}"
        )))
    })?;

    // A token unused at backup time may have been used since: withdrawn.
    let mut clusters = dump.clusters.clone();
    let mut tokens_withdrawn = Vec::new();
    // Nodes may hold versions newer than the backup, or have destroyed
    // some it holds: each cluster trusts its own record only once they
    // have reported (rotation::cluster's reconciliation).
    let reason = format!(
        "restored from a backup made at {} (unix)",
        dump.created_unix
    );
    for c in &mut clusters {
        for node in c.invalidate_unused_tokens() {
            tokens_withdrawn.push(format!("{}/{node}", c.name()));
        }
        c.start_reconciling(&reason, edgekms_daemon::config::now_unix());
    }

    let sealer = make_sealer(dir)?;
    let root = Key256::generate();
    let sealed = sealer.seal(&root)?;
    // The marker and the copies too: a restored dir is a normal one.
    let store = rocks::Store::create(dir)?;
    let summary = dump.summary();
    let mut seq = 0;
    for rec in &dump.audit {
        seq += 1;
        store.put_audit(seq, rec)?;
    }
    let withdrawn = if tokens_withdrawn.is_empty() {
        "none".to_owned()
    } else {
        format!(
            "{} ({})",
            tokens_withdrawn.len(),
            tokens_withdrawn.join(", ")
        )
    };
    let note = AuditRecord::new("restore", "edgekms-server restore").detail(format!(
        "from a backup made at {} (unix): {} clusters, {} key versions; new root key sealed by {}; join tokens unused at backup time withdrawn: {withdrawn}; every cluster reconciling until its nodes have reported",
        dump.created_unix,
        summary.clusters,
        summary.key_versions,
        sealer.name()
    ));
    store.put_audit(seq + 1, &note.to_json())?;
    let mut batch = Batch::default();
    for c in clusters {
        batch.ops.push(Op::PutCluster(c));
    }
    for k in &dump.keks {
        batch.ops.push(Op::PutKek {
            cluster: k.cluster.clone(),
            version: k.version,
            key_id: k.key_id.clone(),
            key: Key256::from_bytes(k.key.expose()),
        });
    }
    store.apply(&root, batch)?;
    init::write_file(
        &dir.join("ca.pem"),
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
    let central = init::open(dir, sealer.as_ref())?;
    let loaded = central.store().clusters()?;
    let unreadable = |what: String| {
        BackupError::File(FileError::Corrupt(format!(
            "the restored data dir does not read back ({what})"
        )))
    };
    if loaded.len() != dump.clusters.len() {
        return Err(unreadable(format!(
            "{} clusters written, {} read",
            dump.clusters.len(),
            loaded.len()
        )));
    }
    for k in &dump.keks {
        let back = central
            .store()
            .kek(central.commit.root(), &k.cluster, k.version, &k.key_id)?;
        if back.as_ref() != Some(&k.key) {
            return Err(unreadable(format!("KEK {} v{}", k.cluster, k.version)));
        }
    }
    Ok(Restored {
        summary,
        ca_hash: ca.pin()?,
        reissued: names.map(<[String]>::to_vec),
        sealer: sealer.name(),
        tokens_withdrawn,
        stale_removed: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::backup::open;
    use crate::backup::tests::{make, server, soft};
    use crate::Central;
    use edgekms_core::rotation::cluster::FleetError;
    use edgekms_hsm::{SealError, SealedBlob, SealerInfo};
    use edgekms_testkit::files::tree;
    use std::time::Duration;

    /// The soft sealer opened on the dir restore gives it, as main does.
    fn soft_on(dir: &Path) -> Result<Box<dyn Sealer>, ServerError> {
        Ok(Box::new(soft(dir)))
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A backup of the test server under `dir/old` and its opened dump.
    fn dump(dir: &Path) -> Dump {
        let key = Key256::generate();
        let (blob, _) = make(&server(&dir.join("old")), &key, true);
        open(&blob, &key).unwrap()
    }

    /// The soft sealer whose unseal fails: the check after every write
    /// fails, as a store that does not read back would.
    struct UnsealFails(edgekms_hsm::soft::SoftSealer);

    impl Sealer for UnsealFails {
        fn name(&self) -> &'static str {
            self.0.name()
        }
        fn is_hardware_backed(&self) -> bool {
            false
        }
        fn seal(&self, key: &Key256) -> Result<SealedBlob, SealError> {
            self.0.seal(key)
        }
        fn unseal(&self, _: &SealedBlob) -> Result<Key256, SealError> {
            Err(SealError::Tpm {
                op: "unseal",
                detail: "injected".into(),
            })
        }
        fn info(&self) -> SealerInfo {
            self.0.info()
        }
    }

    #[test]
    fn round_trip_keeps_records_keys_and_ca_under_a_new_root_key() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(&tmp.path().join("old"));
        let key = Key256::generate();
        let (blob, summary) = make(&core, &key, true);
        assert_eq!(summary.clusters, 2);
        // edge-1 v2, v3 and edge-2 v1: the retired edge-1 v1 has no copy.
        assert_eq!(summary.key_versions, 3);
        assert!(summary.audit_records > 0);
        assert_eq!(&blob[..5], b"EKBK\x01");

        let dump = open(&blob, &key).unwrap();
        assert_eq!(dump.summary(), summary);
        let new_dir = tmp.path().join("new");
        let restored = restore(&dump, &new_dir, soft_on, None).unwrap();
        assert_eq!(restored.summary, summary);
        assert_eq!(restored.sealer, "soft");
        assert!(restored.stale_removed.is_empty());
        // The soft sealer's key file moved in with the data dir.
        let sealer = soft(&new_dir);
        assert_eq!(names(tmp.path()), ["new", "old"], "no staging dir left");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&new_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let back = init::open(&new_dir, &sealer).unwrap();
        assert!(back.commit.root() != core.commit.root(), "a new root key");
        let nodes = |c: &Central| -> Vec<(String, String)> {
            c.status("")
                .unwrap()
                .clusters
                .iter()
                .flat_map(|c| c.nodes.iter().map(|n| (n.name.clone(), n.state.clone())))
                .collect()
        };
        assert_eq!(nodes(&back), nodes(&core));
        let versions = |c: &Central| {
            c.status("")
                .unwrap()
                .clusters
                .into_iter()
                .map(|c| c.versions)
                .collect::<Vec<_>>()
        };
        assert_eq!(versions(&back), versions(&core));
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
                .kek(core.commit.root(), cluster, version, key_id)
                .unwrap()
                .unwrap();
            let new = back
                .store()
                .kek(back.commit.root(), cluster, version, key_id)
                .unwrap()
                .unwrap();
            assert!(old == new, "{cluster} v{version}");
        }
        assert!(matches!(
            back.store().kek(back.commit.root(), "edge-1", 1, ""),
            Ok(None)
        ));
        let events: Vec<String> = back
            .audit_log()
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
        let r = back.rotate("op", "edge-1").unwrap();
        assert_eq!((r.version, r.created), (4, true));
        assert!(r.key_id.starts_with("edge-1/v4/"));

        // A second restore into the now initialized dir is refused.
        drop(back);
        let err = restore(&dump, &new_dir, soft_on, None).unwrap_err();
        assert!(matches!(err, BackupError::Initialized(_)), "{err}");
    }

    #[test]
    fn a_missing_parent_is_made_and_an_empty_target_dir_is_filled() {
        let tmp = tempfile::tempdir().unwrap();
        let dump = dump(tmp.path());
        let deep = tmp.path().join("a/b/data");
        restore(&dump, &deep, soft_on, None).unwrap();
        init::open(&deep, &soft(&deep)).unwrap();
        assert_eq!(names(&tmp.path().join("a/b")), ["data"]);

        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        restore(&dump, &empty, soft_on, None).unwrap();
        init::open(&empty, &soft(&empty)).unwrap();
        assert_eq!(names(tmp.path()), ["a", "empty", "old"]);
        // A relative target: its parent is the working directory's.
        assert!(matches!(
            split(Path::new("data")),
            Ok((p, n)) if p == Path::new(".") && n == "data"
        ));
        assert!(matches!(
            split(Path::new("/")),
            Err(BackupError::BadTarget { .. })
        ));
    }

    #[test]
    fn a_target_that_holds_anything_is_refused_and_left_byte_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let dump = dump(tmp.path());
        let parent = tmp.path();

        // Any file: the reported bug (a ca.pem), and then a retry.
        let target = parent.join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("ca.pem"), b"not ours").unwrap();
        let before = tree(parent);
        for _ in 0..2 {
            let err = restore(&dump, &target, soft_on, None).unwrap_err();
            assert!(matches!(err, BackupError::NotEmpty { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("is not empty (it holds ca.pem)"), "{msg}");
            assert!(msg.contains("nothing was written"), "{msg}");
            assert_eq!(tree(parent), before, "something changed");
        }

        // An initialized data dir: named as such, left byte-identical too
        // (the probe opens its store read-only).
        let old = parent.join("old");
        let before = tree(parent);
        let err = restore(&dump, &old, soft_on, None).unwrap_err();
        assert!(matches!(err, BackupError::Initialized(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(tree(parent), before);

        // A partial state (an interrupted init) is refused too.
        let partial = parent.join("partial");
        std::fs::create_dir_all(&partial).unwrap();
        rocks::Store::create(&partial)
            .unwrap()
            .put_audit(1, b"{}")
            .unwrap();
        let err = restore(&dump, &partial, soft_on, None).unwrap_err();
        assert!(matches!(err, BackupError::Partial(_)), "{err}");
        assert!(!partial.join("ca.pem").exists());

        // A file, and a link to an empty dir.
        let file = parent.join("file");
        std::fs::write(&file, b"x").unwrap();
        let link = parent.join("link");
        std::fs::create_dir(parent.join("linked")).unwrap();
        std::os::unix::fs::symlink(parent.join("linked"), &link).unwrap();
        let before = tree(parent);
        for (path, needle) in [(&file, "not a directory"), (&link, "symbolic link")] {
            let err = restore(&dump, path, soft_on, None).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        assert_eq!(tree(parent), before);
    }

    #[test]
    fn a_failure_after_writes_or_in_the_sealer_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dump = dump(tmp.path());
        let parent = tmp.path();
        let before = names(parent);

        // The check after every write fails: a missing target stays
        // missing, an empty one stays empty, no staging dir is left.
        let unseal_fails = |dir: &Path| -> Result<Box<dyn Sealer>, ServerError> {
            Ok(Box::new(UnsealFails(soft(dir))))
        };
        let missing = parent.join("missing");
        let err = restore(&dump, &missing, unseal_fails, None).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!missing.exists());
        assert_eq!(names(parent), before);

        let empty = parent.join("empty");
        std::fs::create_dir(&empty).unwrap();
        let before = names(parent);
        restore(&dump, &empty, unseal_fails, None).unwrap_err();
        assert!(names(&empty).is_empty());
        assert_eq!(names(parent), before);

        // The sealer cannot be opened (an unreachable TPM): the parents
        // this restore made are removed as well.
        let unreachable = |_: &Path| -> Result<Box<dyn Sealer>, ServerError> {
            Err(SealError::NoDevice {
                tcti: "swtpm:host=127.0.0.1,port=1".into(),
                detail: "connection refused".into(),
            }
            .into())
        };
        let deep = parent.join("x/y/data");
        let err = restore(&dump, &deep, unreachable, None).unwrap_err();
        assert!(err.to_string().contains("no TPM reachable"), "{err}");
        assert_eq!(names(parent), before);
    }

    #[test]
    fn a_failed_rename_leaves_the_target_as_it_became_and_no_staging_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dump = dump(tmp.path());
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        // Someone writes into the target while the restore builds.
        let meddle = |dir: &Path| -> Result<Box<dyn Sealer>, ServerError> {
            std::fs::write(dir.parent().unwrap().join("target/late"), b"x").unwrap();
            soft_on(dir)
        };
        let err = restore(&dump, &target, meddle, None).unwrap_err();
        assert!(matches!(err, BackupError::Rename { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("written into it during the restore"),
            "{err}"
        );
        assert_eq!(names(&target), ["late"]);
        assert_eq!(names(tmp.path()), ["old", "target"]);
        let busy = std::io::Error::from_raw_os_error(libc::EBUSY);
        let why = rename_problem(&busy, Path::new("/mnt/kms"));
        assert!(
            why.contains("mount point") && why.contains("--data-dir /mnt/kms/data"),
            "{why}"
        );
    }

    #[test]
    fn staging_dirs_of_killed_restores_are_removed_and_running_ones_left() {
        let tmp = tempfile::tempdir().unwrap();
        let dump = dump(tmp.path());
        let parent = tmp.path();
        // A killed restore's: nobody holds its lock.
        let dead = parent.join(".new.restore-4000000");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("soft-sealer.key"), b"secret").unwrap();
        // A running one's: locked.
        let running = parent.join(".new.restore-4000001");
        std::fs::create_dir(&running).unwrap();
        let held = File::open(&running).unwrap();
        assert!(try_lock(&held).unwrap());
        // Not a staging dir of this target.
        let other = parent.join(".other.restore-4000002");
        std::fs::create_dir(&other).unwrap();
        let restored = restore(&dump, &parent.join("new"), soft_on, None).unwrap();
        assert_eq!(restored.stale_removed, std::slice::from_ref(&dead));
        assert_eq!(
            names(parent),
            [
                ".new.restore-4000001",
                ".other.restore-4000002",
                "new",
                "old"
            ]
        );
    }

    #[test]
    fn join_tokens_unused_at_backup_time_are_withdrawn() {
        let tmp = tempfile::tempdir().unwrap();
        let core = server(&tmp.path().join("old"));
        let day = Duration::from_secs(86_400);
        let invite = core.add_node("op", "edge-1", "cp-2", day).unwrap();
        let key = Key256::generate();
        let (blob, _) = make(&core, &key, false);
        let dump = open(&blob, &key).unwrap();
        let new_dir = tmp.path().join("new");
        let restored = restore(&dump, &new_dir, soft_on, None).unwrap();
        assert_eq!(
            restored.tokens_withdrawn,
            ["edge-1/cp-1", "edge-1/cp-2", "edge-2/cp-1"]
        );
        assert_eq!(
            restored.tokens_line(),
            "join tokens withdrawn: 3 (edge-1/cp-1, edge-1/cp-2, edge-2/cp-1): issue new ones with `kmsctl node add`"
        );

        let back = init::open(&new_dir, &soft(&new_dir)).unwrap();
        // A token is `id.secret`; the record keeps the secret's hash.
        let check = |c: &Central, token: &str| {
            let (_, secret) = token.split_once('.').unwrap();
            c.commit
                .read("edge-1", |c| c.check_token("cp-2", secret, 1))
                .unwrap()
        };
        assert_eq!(check(&core, &invite.token), Ok(()), "valid on the old one");
        assert_eq!(check(&back, &invite.token), Err(FleetError::BadToken));
        // The node stays invited, and a new token works.
        let again = back.add_node("op", "edge-1", "cp-2", day).unwrap();
        assert_eq!(check(&back, &again.token), Ok(()));
        let detail = back
            .audit_log()
            .audit_since(0)
            .unwrap()
            .into_iter()
            .rev()
            .find(|r| r.event == "restore")
            .unwrap()
            .detail;
        assert!(
            detail.contains("withdrawn: 3 (edge-1/cp-1, edge-1/cp-2, edge-2/cp-1)"),
            "{detail}"
        );
    }

    #[test]
    fn the_tokens_line_names_the_first_twenty() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = restore(&dump(tmp.path()), &tmp.path().join("n"), soft_on, None).unwrap();
        r.tokens_withdrawn.clear();
        assert!(r.tokens_line().contains("none"), "{}", r.tokens_line());
        r.tokens_withdrawn = (0..25).map(|i| format!("c/n{i}")).collect();
        let line = r.tokens_line();
        assert!(
            line.starts_with("join tokens withdrawn: 25 (c/n0, "),
            "{line}"
        );
        assert!(line.contains("c/n19 and 5 more)"), "{line}");
        assert!(!line.contains("c/n20"), "{line}");
    }
}
