//! The recovery passphrase: a second, offline way to the node sealing key.
//!
//! At first start the plugin makes a random passphrase (160 bits, shown once,
//! stored nowhere on the node; see [`PassphraseOut`] for where it goes), and stores the NSK wrapped under a key derived
//! from it. When the TPM later refuses to unseal because a bound PCR changed,
//! an operator who has checked the node runs `kmsctl local reseal`: the
//! passphrase opens this wrapper and the NSK is sealed again to the present
//! PCR values. The passphrase is random, not chosen, so one SHA-256 over a
//! random salt is a sufficient KDF (there is nothing to brute-force).

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use edgekms_hsm::{aead, Key256, SealError};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const SALT_LEN: usize = 16;
const VERSION: u8 = 1;

/// Eight groups of four characters from an unambiguous alphabet (Crockford
/// base32, 5 bits each: 160 bits).
pub fn generate_passphrase() -> Zeroizing<String> {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut raw[..]);
    let mut out = Zeroizing::new(String::with_capacity(39));
    for (i, b) in raw.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        out.push(ALPHABET[(b & 31) as usize] as char);
    }
    out
}

/// Canonical form: case and separators do not matter when typing it back.
fn normalize(passphrase: &str) -> Zeroizing<String> {
    Zeroizing::new(
        passphrase
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase())
            .collect(),
    )
}

fn derive(salt: &[u8], passphrase: &str) -> Key256 {
    let mut h = Sha256::new();
    h.update(b"edgekms recovery v1\0");
    h.update(salt);
    h.update(normalize(passphrase).as_bytes());
    let digest = Zeroizing::new(h.finalize().to_vec());
    // SHA-256 output is always 32 bytes.
    Key256::from_slice(&digest).unwrap_or_else(Key256::generate)
}

/// `1 | salt (16) | AES-GCM(derived key, aad = cluster, nsk)`.
pub fn wrap(nsk: &Key256, passphrase: &str, cluster: &str) -> Vec<u8> {
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let mut out = vec![VERSION];
    out.extend_from_slice(&salt);
    aead::seal_into(
        &derive(&salt, passphrase),
        cluster.as_bytes(),
        nsk.expose(),
        &mut out,
    );
    out
}

/// Opens what [`wrap`] made; `None` for a wrong passphrase or damaged blob.
pub fn unwrap(blob: &[u8], passphrase: &str, cluster: &str) -> Option<Key256> {
    let (&version, rest) = blob.split_first()?;
    if version != VERSION || rest.len() < SALT_LEN {
        return None;
    }
    let (salt, sealed) = rest.split_at(SALT_LEN);
    let plain = aead::open(&derive(salt, passphrase), cluster.as_bytes(), sealed).ok()?;
    Key256::from_slice(&plain)
}

/// Where a new recovery passphrase is shown, chosen before the node key is
/// made: a refusal (the file exists) must leave nothing behind.
///
/// - `--recovery-passphrase-file PATH`: a new file, mode 0600, fsynced
///   (and its directory) before the node key is stored, so that no key
///   exists whose passphrase was not written.
/// - otherwise stderr when it is a terminal (an operator is watching);
/// - otherwise the controlling terminal, `/dev/tty`, when there is one
///   (stderr goes to a log collector, the operator is at the console);
/// - otherwise stderr as before, with a warning naming the flag.
#[derive(Debug)]
pub enum PassphraseOut {
    File { path: PathBuf, file: File },
    Terminal,
}

impl PassphraseOut {
    /// Opens the passphrase file (refusing one that exists), or picks the
    /// terminal.
    pub fn prepare(file: Option<&Path>) -> Result<Self, SealError> {
        let Some(path) = file else {
            return Ok(PassphraseOut::Terminal);
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| SealError::Io {
                op: if source.kind() == std::io::ErrorKind::AlreadyExists {
                    format!(
                        "--recovery-passphrase-file {} exists; refusing to overwrite a passphrase (move it away; no node key was created)",
                        path.display()
                    )
                } else {
                    format!("create --recovery-passphrase-file {}", path.display())
                },
                source,
            })?;
        Ok(PassphraseOut::File {
            path: path.to_owned(),
            file,
        })
    }

    /// Writes the passphrase where [`PassphraseOut::prepare`] chose.
    pub fn write(self, passphrase: &str) -> Result<(), SealError> {
        match self {
            PassphraseOut::File { path, mut file } => {
                let io = |what: &str| {
                    let op = format!("{what} --recovery-passphrase-file {}", path.display());
                    move |source| SealError::Io { op, source }
                };
                let line = Zeroizing::new(format!("{passphrase}\n"));
                file.write_all(line.as_bytes()).map_err(io("write"))?;
                file.sync_all().map_err(io("fsync"))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io("fsync the directory of"))?;
                }
                tracing::info!(
                    file = %path.display(),
                    "recovery passphrase written (mode 0600); move it offline"
                );
            }
            PassphraseOut::Terminal => {
                let banner = banner(passphrase);
                if std::io::stderr().is_terminal() {
                    eprint!("{}", *banner);
                } else if let Ok(mut tty) = OpenOptions::new().write(true).open("/dev/tty") {
                    if tty.write_all(banner.as_bytes()).is_ok() {
                        tracing::info!(
                            "recovery passphrase shown on the terminal (/dev/tty), not in the log"
                        );
                    } else {
                        to_stderr(&banner);
                    }
                } else {
                    to_stderr(&banner);
                }
            }
        }
        Ok(())
    }

    /// Removes a passphrase file whose node key was not stored after all.
    pub fn abandon(path: Option<&Path>) {
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn to_stderr(banner: &str) {
    eprint!("{banner}");
    tracing::warn!("the recovery passphrase went to stderr, with the log; start with --recovery-passphrase-file PATH (or from a terminal) to keep it out of log collectors");
}

fn banner(passphrase: &str) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "\n==== edgekms recovery passphrase (shown once, stored nowhere) ====\n{passphrase}\n\
         Record it offline. `kmsctl local reseal` needs it if the TPM refuses\n\
         to unseal after a PCR change.\n===================================================================\n\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_passphrase_opens_wrong_one_does_not() {
        let nsk = Key256::generate();
        let pass = generate_passphrase();
        assert_eq!(pass.len(), 39);
        let blob = wrap(&nsk, &pass, "edge-1");
        assert!(!blob.windows(32).any(|w| w == nsk.expose().as_slice()));
        assert!(unwrap(&blob, &pass, "edge-1").unwrap() == nsk);
        assert!(unwrap(&blob, &pass.to_lowercase().replace('-', " "), "edge-1").unwrap() == nsk);
        assert!(unwrap(&blob, &generate_passphrase(), "edge-1").is_none());
        assert!(unwrap(&blob, &pass, "edge-2").is_none());
        for len in 0..blob.len() {
            assert!(unwrap(&blob[..len], &pass, "edge-1").is_none());
        }
    }

    #[test]
    fn passphrase_file_is_new_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        let pass = generate_passphrase();
        PassphraseOut::prepare(Some(&path))
            .unwrap()
            .write(&pass)
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", *pass)
        );
        let err = PassphraseOut::prepare(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("exists") && err.contains("no node key was created"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", *pass)
        );
    }
}

#[cfg(test)]
mod proptests;
