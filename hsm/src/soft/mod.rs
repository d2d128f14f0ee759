//! Software sealing backend, for development and CI only.
//!
//! The node sealing key is wrapped with AES-256-GCM under a key kept in a
//! file of mode 0600. Anyone who can read that file can unseal: this backend
//! is **not** hardware-protected, reports `is_hardware_backed() == false`
//! and logs a warning every time it is opened.
//!
//! The key file is the 32-byte key followed by a 32-byte check value
//! (SHA-256 over a label and the key), so a damaged file is told apart from
//! a file that belongs to other sealed data. Files of the first format
//! (the bare 32-byte key) are still read. The file is created only when
//! the first key is sealed: opening or unsealing never creates one, so a
//! deleted file is reported as missing instead of silently replaced by a
//! key that opens nothing.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::{aead, Key256, SealError, SealedBlob, Sealer, SealerInfo};

const AAD: &[u8] = b"edgekms soft-sealer v1";
const CHECK_LABEL: &[u8] = b"edgekms soft-sealer key check v1\0";

/// The wrapping key as read from its file.
struct FileKey {
    key: Key256,
    /// False for a first-format file (no check value): a damaged one then
    /// shows only when a blob does not open.
    checked: bool,
}

/// The software sealer: see the module documentation.
pub struct SoftSealer {
    path: PathBuf,
    /// `None` until the file exists: made by the first seal.
    wrapping_key: Mutex<Option<FileKey>>,
}

impl std::fmt::Debug for SoftSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftSealer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn check_value(key: &Key256) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHECK_LABEL);
    h.update(key.expose());
    h.finalize().into()
}

impl SoftSealer {
    /// Opens the key file at `path`. A missing file is not created here:
    /// the first [`Sealer::seal`] creates it (mode 0600); an
    /// [`Sealer::unseal`] without it fails with
    /// [`SealError::SoftKeyFile`].
    pub fn open_or_create(path: &Path) -> Result<Self, SealError> {
        let key = Self::read(path)?;
        tracing::warn!(
            key_file = %path.display(),
            "INSECURE: the soft sealer is in use; the key it seals is protected only by a file on disk, not by a TPM. Use --sealer tpm outside development."
        );
        Ok(Self {
            path: path.to_owned(),
            wrapping_key: Mutex::new(key),
        })
    }

    fn key_file_error(&self, problem: impl Into<String>) -> SealError {
        SealError::SoftKeyFile {
            path: self.path.display().to_string(),
            problem: problem.into(),
        }
    }

    /// Reads and checks the key file; `None` when it does not exist.
    fn read(path: &Path) -> Result<Option<FileKey>, SealError> {
        let io = |op: &str| {
            let op = format!("{op} {}", path.display());
            move |source| SealError::Io { op, source }
        };
        let bytes = match fs::read(path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read")(e)),
        };
        let mode = fs::metadata(path).map_err(io("stat"))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SealError::Config(format!(
                "{} is readable by other users (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
        let damaged = |detail: String| SealError::SoftKeyFile {
            path: path.display().to_string(),
            problem: format!("is damaged ({detail})"),
        };
        let (key, checked) = match bytes.len() {
            32 => (Key256::from_slice(&bytes), false),
            64 => {
                let key = Key256::from_slice(&bytes[..32]);
                if let Some(k) = &key {
                    if check_value(k).as_slice() != &bytes[32..] {
                        return Err(damaged("its check value does not match the key".into()));
                    }
                }
                (key, true)
            }
            n => {
                return Err(damaged(format!(
                    "{n} bytes; a key file has 64, or 32 in the first format"
                )))
            }
        };
        let key = key.ok_or_else(|| damaged("unreadable key".into()))?;
        Ok(Some(FileKey { key, checked }))
    }

    /// Creates the key file with a new key: only for the first seal.
    fn create(&self) -> Result<FileKey, SealError> {
        let io = |op: &str| {
            let op = format!("{op} {}", self.path.display());
            move |source| SealError::Io { op, source }
        };
        let key = Key256::generate();
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io("create"))?;
        let mut contents = Zeroizing::new(key.expose().to_vec());
        contents.extend_from_slice(&check_value(&key));
        file.write_all(&contents).map_err(io("write"))?;
        file.sync_all().map_err(io("sync"))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync the directory of"))?;
        }
        tracing::info!(key_file = %self.path.display(), "created the soft-sealer key file");
        Ok(FileKey { key, checked: true })
    }
}

impl Sealer for SoftSealer {
    fn name(&self) -> &'static str {
        "soft"
    }

    fn is_hardware_backed(&self) -> bool {
        false
    }

    fn seal(&self, key: &Key256) -> Result<SealedBlob, SealError> {
        let mut held = self
            .wrapping_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if held.is_none() {
            // Restored (or made by another process) since we opened?
            *held = match Self::read(&self.path)? {
                Some(found) => Some(found),
                None => Some(self.create()?),
            };
        }
        let wrapping = held
            .as_ref()
            .map(|k| &k.key)
            .ok_or_else(|| self.key_file_error("is missing"))?;
        Ok(SealedBlob {
            backend: self.name().into(),
            bytes: aead::seal(wrapping, AAD, key.expose()),
        })
    }

    fn unseal(&self, blob: &SealedBlob) -> Result<Key256, SealError> {
        crate::check_backend(self, blob)?;
        let mut held = self
            .wrapping_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if held.is_none() {
            // Never created here: sealed data needs the file it was sealed
            // with, not a new one.
            *held = Self::read(&self.path)?;
        }
        let Some(wrapping) = held.as_ref() else {
            return Err(self.key_file_error(
                "is missing (deleted, or not copied with the data dir), and a key is sealed under it",
            ));
        };
        let plain = aead::open(&wrapping.key, AAD, &blob.bytes).map_err(|_| {
            self.key_file_error(if wrapping.checked {
                "is intact but is not the file this key was sealed with (it was replaced, or the data dir was copied without it), or the sealed key is damaged"
            } else {
                "does not open this sealed key: the file (first format, without a check value) is damaged or was replaced, or the sealed key is damaged"
            })
        })?;
        Key256::from_slice(&plain).ok_or_else(|| SealError::CorruptBlob {
            detail: "unsealed data is not a 32-byte key".into(),
        })
    }

    fn info(&self) -> SealerInfo {
        SealerInfo::from([
            ("backend".into(), "soft".into()),
            ("hardware_backed".into(), "false".into()),
            ("key_file".into(), self.path.display().to_string()),
            (
                "warning".into(),
                "INSECURE: not hardware-protected, for development only".into(),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_unseal_and_key_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        let sealer = SoftSealer::open_or_create(&path).unwrap();
        // Made by the first seal, not by opening.
        assert!(!path.exists());
        sealer.seal(&Key256::generate()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!sealer.is_hardware_backed());
        let nsk = Key256::generate();
        let blob = sealer.seal(&nsk).unwrap();
        assert!(!blob.bytes.windows(32).any(|w| w == nsk.expose().as_slice()));
        // Reopening reads the same key file.
        let again = SoftSealer::open_or_create(&path).unwrap();
        assert!(again.unseal(&blob).unwrap() == nsk);
    }

    #[test]
    fn other_key_file_and_wrong_backend_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = SoftSealer::open_or_create(&dir.path().join("a")).unwrap();
        let b = SoftSealer::open_or_create(&dir.path().join("b")).unwrap();
        let blob = a.seal(&Key256::generate()).unwrap();
        b.seal(&Key256::generate()).unwrap();
        match b.unseal(&blob) {
            Err(e @ SealError::SoftKeyFile { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("is intact but is not the file"), "{msg}");
                assert!(!msg.contains("TPM"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let tpm_blob = SealedBlob {
            backend: "tpm".into(),
            bytes: blob.bytes,
        };
        assert!(matches!(
            a.unseal(&tpm_blob),
            Err(SealError::WrongBackend { .. })
        ));
    }

    #[test]
    fn world_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        SoftSealer::open_or_create(&path)
            .unwrap()
            .seal(&Key256::generate())
            .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SoftSealer::open_or_create(&path),
            Err(SealError::Config(_))
        ));
    }

    fn expect_key_file_error(result: Result<impl std::fmt::Debug, SealError>, needle: &str) {
        match result {
            Err(e @ SealError::SoftKeyFile { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{msg}");
                assert!(msg.contains("kmsctl local reseal"), "{msg}");
                assert!(msg.contains("edgekms-server restore"), "{msg}");
                assert!(!msg.contains("another TPM"), "{msg}");
            }
            other => panic!("expected SoftKeyFile ({needle}), got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_key_file_is_named_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        let nsk = Key256::generate();
        let blob = SoftSealer::open_or_create(&path)
            .unwrap()
            .seal(&nsk)
            .unwrap();
        let good = fs::read(&path).unwrap();
        assert_eq!(good.len(), 64);
        // Every flipped bit, in the key or in its check value.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            fs::write(&path, &bad).unwrap();
            expect_key_file_error(SoftSealer::open_or_create(&path), "is damaged");
        }
        // Truncated or grown.
        for len in [0, 1, 31, 33, 63, 65] {
            let mut bad = good.clone();
            bad.resize(len, 0);
            fs::write(&path, &bad).unwrap();
            expect_key_file_error(SoftSealer::open_or_create(&path), "is damaged");
        }
        fs::write(&path, &good).unwrap();
        let sealer = SoftSealer::open_or_create(&path).unwrap();
        assert!(sealer.unseal(&blob).unwrap() == nsk);
    }

    #[test]
    fn a_deleted_key_file_is_missing_and_never_recreated_by_unseal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        let nsk = Key256::generate();
        let blob = SoftSealer::open_or_create(&path)
            .unwrap()
            .seal(&nsk)
            .unwrap();
        let saved = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();

        let sealer = SoftSealer::open_or_create(&path).unwrap();
        expect_key_file_error(sealer.unseal(&blob), "is missing");
        expect_key_file_error(sealer.unseal(&blob), "is missing");
        assert!(!path.exists(), "unseal must not create a key file");

        // Restoring the file is a recovery path, without a restart.
        fs::write(&path, &saved).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(sealer.unseal(&blob).unwrap() == nsk);
    }

    #[test]
    fn first_format_key_files_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        let wrapping = Key256::generate();
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(wrapping.expose()).unwrap();
        drop(file);
        let nsk = Key256::generate();
        // A blob made by the first format's sealer: same AEAD, same AAD.
        let blob = SealedBlob {
            backend: "soft".into(),
            bytes: aead::seal(&wrapping, AAD, nsk.expose()),
        };
        let sealer = SoftSealer::open_or_create(&path).unwrap();
        assert!(sealer.unseal(&blob).unwrap() == nsk);
        // Damage in a first-format file shows at unseal, named as such.
        let mut bad = wrapping.expose().to_vec();
        bad[0] ^= 1;
        fs::write(&path, &bad).unwrap();
        let sealer = SoftSealer::open_or_create(&path).unwrap();
        expect_key_file_error(sealer.unseal(&blob), "first format");
    }
}

#[cfg(test)]
mod proptests;
