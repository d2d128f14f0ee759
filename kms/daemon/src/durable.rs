//! What both daemons need to keep keys through a damaged disk: the data-dir
//! checks, the creation marker, strict RocksDB options, and the redundant
//! record files that hold a second copy of every record that cannot be
//! re-derived (sealed keys, wrapped KEK versions).
//!
//! The rules the stores build on:
//! - A key (node sealing key, root key, KEK v1) is made only in a provably
//!   empty data dir: no [`MARKER`], no record file, no key record in
//!   RocksDB. The marker is written, synced, before the first key is made,
//!   so a data dir that ever held keys never silently starts afresh.
//! - Every write goes to the record files first (each one atomically
//!   replaced and synced), then to RocksDB in one synced batch. At start a
//!   record file that verifies wins over RocksDB: it is never older than an
//!   acknowledged write. A record file that is missing or damaged is
//!   rewritten from RocksDB. A destroyed record leaves a tombstone file, so
//!   a missing file never brings a destroyed key back.
//! - RocksDB opens with paranoid checks and tolerates only a torn tail of
//!   its write-ahead log (a write that was never acknowledged, since every
//!   write is synced); any other corruption fails the open.
//!
//! Record file: `EKRC | 1 | name len u16 BE | name | body len u32 BE |
//! body | SHA-256 of everything before`. The name inside binds the file
//! to its slot, so a file renamed over another is refused.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The file whose presence says "this data dir has held keys".
pub const MARKER: &str = "EDGEKMS-DATA-DIR";
const MAGIC: &[u8; 4] = b"EKRC";
const FORMAT_V1: u8 = 1;
const TMP_SUFFIX: &str = ".tmp";
/// Larger bodies are refused when read: no record of ours comes close.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("record file {path} is damaged ({detail})")]
    Damaged { path: String, detail: String },
    #[error("data dir {path} {detail}: refusing to use it (fix with `chown` / `chmod 0700`)")]
    NotPrivate { path: String, detail: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DurableError + 'a {
    move |source| DurableError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// [`private_dir`] for a daemon's data dir, saying so when it had to
/// tighten the mode.
pub fn private_data_dir(dir: &Path) -> Result<(), DurableError> {
    if private_dir(dir)? {
        tracing::warn!(dir = %dir.display(), "the data dir was readable by other users: made it 0700");
    }
    Ok(())
}

/// Creates `dir` with mode 0700, or checks an existing one: it must be owned
/// by this process's user and not writable by group or others. Read or
/// search bits for group and others are removed. Returns whether the mode
/// was tightened, for the caller to log.
pub fn private_dir(dir: &Path) -> Result<bool, DurableError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create", dir))?;
    let meta = std::fs::metadata(dir).map_err(io("stat", dir))?;
    let not_private = |detail: String| DurableError::NotPrivate {
        path: dir.display().to_string(),
        detail,
    };
    if !meta.is_dir() {
        return Err(not_private("is not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(not_private(format!(
            "is owned by uid {}, not by this process (uid {me})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(not_private(format!(
            "has mode {mode:04o}: group or others may write to it"
        )));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(io("chmod", dir))?;
        return Ok(true);
    }
    Ok(false)
}

/// Makes every file this process creates from now on private to its user
/// (RocksDB creates its files with the default 0644).
pub fn private_umask() {
    // SAFETY: umask has no preconditions; it only changes this process's mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Whether `dir` carries the [`MARKER`].
pub fn has_marker(dir: &Path) -> bool {
    dir.join(MARKER).exists()
}

/// Writes the [`MARKER`] (synced, with its directory) before the first key
/// is made.
pub fn write_marker(dir: &Path) -> Result<(), DurableError> {
    let path = dir.join(MARKER);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("create", &path))?;
    f.write_all(b"This directory holds edgekms keys. Never delete it to start afresh.\n")
        .and_then(|()| f.sync_all())
        .map_err(io("write", &path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// RocksDB options that fail closed: paranoid checks, and WAL recovery that
/// tolerates only a torn last record.
pub fn strict_rocksdb(opts: &mut rocksdb::Options) {
    opts.set_paranoid_checks(true);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
}

/// Encodes one record file's bytes.
pub fn encode_record(name: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 1 + 2 + name.len() + 4 + body.len() + 32);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_V1);
    // Names are ours (a record kind and a DNS-label cluster): far below 64 KiB.
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Decodes a record file's bytes, checking the checksum and that it is the
/// record `name`. Returns the body; the error says what is wrong.
pub fn decode_record<'a>(name: &str, raw: &'a [u8]) -> Result<&'a [u8], String> {
    if raw.len() < 4 + 1 + 2 + 4 + 32 {
        return Err(format!("{} bytes is too short", raw.len()));
    }
    let (signed, sum) = raw.split_at(raw.len() - 32);
    if Sha256::digest(signed).as_slice() != sum {
        return Err("checksum mismatch".into());
    }
    if &signed[..4] != MAGIC || signed[4] != FORMAT_V1 {
        return Err("not an edgekms record file".into());
    }
    let name_len = u16::from_be_bytes([signed[5], signed[6]]) as usize;
    let rest = &signed[7..];
    let (stored, rest) = rest.split_at_checked(name_len).ok_or("truncated name")?;
    if stored != name.as_bytes() {
        return Err(format!(
            "holds record {:?}, not {name:?}",
            String::from_utf8_lossy(&stored[..stored.len().min(64)])
        ));
    }
    let (len, body) = rest.split_at_checked(4).ok_or("truncated length")?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len != body.len() || len > MAX_BODY {
        return Err(format!("length {len} does not match the file"));
    }
    Ok(body)
}

/// A file name for a record name: `[A-Za-z0-9._-]` kept, anything else as
/// `%XX`, so names with `/` stay in one directory.
fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn record_name(file: &str) -> Option<String> {
    let mut out = Vec::with_capacity(file.len());
    let bytes = file.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = file.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A directory of record files, one per record, each replaced atomically.
#[derive(Debug, Clone)]
pub struct RecordFiles {
    dir: PathBuf,
}

impl RecordFiles {
    /// Opens (creating, mode 0700) the record directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, DurableError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of record `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(file_name(name))
    }

    /// Writes each record (temp file, fsync, rename), then syncs the
    /// directory once: when this returns, every record is durable.
    pub fn put_all<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<(), DurableError> {
        let mut wrote = false;
        for (name, body) in records {
            let path = self.path(name);
            let tmp = self.dir.join(format!("{}{TMP_SUFFIX}", file_name(name)));
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(&encode_record(name, body))
                .and_then(|()| f.sync_all())
                .map_err(io("write", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
            wrote = true;
        }
        if wrote {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Writes one record; see [`RecordFiles::put_all`].
    pub fn put(&self, name: &str, body: &[u8]) -> Result<(), DurableError> {
        self.put_all([(name, body)])
    }

    /// Reads record `name`: `None` when there is no file, an error naming
    /// the file when it does not verify.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>, DurableError> {
        let path = self.path(name);
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        decode_record(name, &raw)
            .map(|body| Some(body.to_vec()))
            .map_err(|detail| DurableError::Damaged {
                path: path.display().to_string(),
                detail,
            })
    }

    /// The names of every record file present (damaged ones included),
    /// sorted; temp files left by a crash are ignored.
    pub fn names(&self) -> Result<Vec<String>, DurableError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))? {
            let entry = entry.map_err(io("list", &self.dir))?;
            let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if file.ends_with(TMP_SUFFIX) {
                continue;
            }
            if let Some(name) = record_name(&file) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes record `name` (absent is fine), syncing the directory.
    pub fn remove(&self, name: &str) -> Result<(), DurableError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_damage_and_other_slots() {
        let raw = encode_record("kek/c1/2", b"wrapped");
        assert_eq!(decode_record("kek/c1/2", &raw).unwrap(), b"wrapped");
        assert!(decode_record("kek/c1/3", &raw).is_err());
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            assert!(decode_record("kek/c1/2", &bad).is_err(), "flip at {i}");
        }
        for len in 0..raw.len() {
            assert!(decode_record("kek/c1/2", &raw[..len]).is_err());
        }
    }

    #[test]
    fn files_are_private_atomic_and_listed_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let files = RecordFiles::open(&dir.path().join("copies")).unwrap();
        files.put("meta/nsk", b"one").unwrap();
        files.put("meta/nsk", b"two").unwrap();
        files
            .put_all([("kek/1", &b"a"[..]), ("kek/2", b"b")])
            .unwrap();
        assert_eq!(files.get("meta/nsk").unwrap().unwrap(), b"two");
        assert_eq!(files.get("kek/3").unwrap(), None);
        assert_eq!(files.names().unwrap(), ["kek/1", "kek/2", "meta/nsk"]);
        let mode = std::fs::metadata(files.path("kek/1")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(files.dir().join("kek%2F9.tmp"), b"torn").unwrap();
        assert_eq!(files.names().unwrap().len(), 3);
        std::fs::write(files.path("kek/2"), b"garbage").unwrap();
        assert!(matches!(
            files.get("kek/2"),
            Err(DurableError::Damaged { .. })
        ));
        std::fs::copy(files.path("kek/1"), files.path("kek/2")).unwrap();
        assert!(files.get("kek/2").is_err(), "a file moved to another slot");
        files.remove("kek/2").unwrap();
        files.remove("kek/2").unwrap();
        assert_eq!(files.get("kek/2").unwrap(), None);
    }

    #[test]
    fn file_names_round_trip() {
        for name in [
            "meta/nsk",
            "kek/edge-1/\u{0}\u{0}\u{0}\u{2}",
            "a%b",
            "x.y_z-1",
        ] {
            let file = file_name(name);
            assert!(!file.contains('/'));
            assert_eq!(record_name(&file).as_deref(), Some(name));
        }
    }

    #[test]
    fn private_dir_creates_tightens_and_refuses_writable() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        assert!(!private_dir(&d).unwrap());
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(private_dir(&d).unwrap());
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(
            private_dir(&d),
            Err(DurableError::NotPrivate { .. })
        ));
    }

    #[test]
    fn marker_is_written_and_seen() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_marker(dir.path()));
        write_marker(dir.path()).unwrap();
        assert!(has_marker(dir.path()));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes: an error or a body, never a panic.
        #[test]
        fn decode_record_never_panics(name in "[a-z/0-9-]{0,12}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&name, &raw);
        }

        /// A round trip returns its body; any one flipped byte is refused.
        #[test]
        fn decode_record_round_trips(name in "[a-z/0-9-]{1,12}", body in proptest::collection::vec(any::<u8>(), 0..300), flip in any::<proptest::sample::Index>()) {
            let raw = encode_record(&name, &body);
            prop_assert_eq!(decode_record(&name, &raw).unwrap(), &body[..]);
            let mut bad = raw.clone();
            bad[flip.index(raw.len())] ^= 0x80;
            prop_assert!(decode_record(&name, &bad).is_err());
        }
    }
}
