//! Software sealing backend, for development and CI only.
//!
//! The node sealing key is wrapped with AES-256-GCM under a key kept in a
//! file of mode 0600. Anyone who can read that file can unseal: this backend
//! is **not** hardware-protected, reports `is_hardware_backed() == false`
//! and logs a warning every time it is opened.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{aead, Key256, SealError, SealedBlob, Sealer, SealerInfo};

const AAD: &[u8] = b"edgekms soft-sealer v1";

/// The software sealer: see the module documentation.
pub struct SoftSealer {
    path: PathBuf,
    wrapping_key: Key256,
}

impl std::fmt::Debug for SoftSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftSealer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SoftSealer {
    /// Opens the key file at `path`, creating it (mode 0600) on first use.
    pub fn open_or_create(path: &Path) -> Result<Self, SealError> {
        let io = |op: &str| {
            let op = format!("{op} {}", path.display());
            move |source| SealError::Io { op, source }
        };
        let wrapping_key = match fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let mode = fs::metadata(path).map_err(io("stat"))?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(SealError::Config(format!(
                        "{} is readable by other users (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    )));
                }
                Key256::from_slice(&bytes).ok_or_else(|| SealError::CorruptBlob {
                    detail: format!("{} is not a 32-byte key file", path.display()),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Key256::generate();
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io("create"))?;
                file.write_all(key.expose()).map_err(io("write"))?;
                file.sync_all().map_err(io("sync"))?;
                key
            }
            Err(e) => return Err(io("read")(e)),
        };
        tracing::warn!(
            key_file = %path.display(),
            "INSECURE: the soft sealer is in use; the key it seals is protected only by a file on disk, not by a TPM. Use --sealer tpm outside development."
        );
        Ok(Self {
            path: path.to_owned(),
            wrapping_key,
        })
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
        Ok(SealedBlob {
            backend: self.name().into(),
            bytes: aead::seal(&self.wrapping_key, AAD, key.expose()),
        })
    }

    fn unseal(&self, blob: &SealedBlob) -> Result<Key256, SealError> {
        crate::check_backend(self, blob)?;
        let plain = aead::open(&self.wrapping_key, AAD, &blob.bytes).map_err(|_| {
            SealError::ForeignBlob {
                detail: format!(
                    "it does not open with the soft-sealer key {}",
                    self.path.display()
                ),
            }
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
        assert!(matches!(
            b.unseal(&blob),
            Err(SealError::ForeignBlob { .. })
        ));
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
        drop(SoftSealer::open_or_create(&path).unwrap());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SoftSealer::open_or_create(&path),
            Err(SealError::Config(_))
        ));
    }
}

#[cfg(test)]
mod proptests;
