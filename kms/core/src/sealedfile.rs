//! The encrypted file format of both backups (the central service's
//! `EKBK`, a standalone node's `EKNB`). Pure: callers read and write the
//! files; the key is a [`Key256`] (a key file holds it as hex, see
//! [`Key256::from_hex`]).
//!
//! Format 1 (integers big-endian):
//!
//! | bytes | what |
//! | --- | --- |
//! | 4 | magic, which names the kind of file (`EKBK`, `EKNB`) |
//! | 1 | format: 1 |
//! | 8 | key check: SHA-256(`"edgekms backup key check v1\0"` ‖ key)\[..8\] |
//! | 8 | length of the rest, u64 |
//! | rest | [`aead::seal`] of the body under the key (nonce ‖ ciphertext ‖ tag), associated data = the 21 header bytes |
//!
//! The key check tells a wrong key from a damaged file before decrypting;
//! 64 bits of a hash of a uniformly random 256-bit key reveal nothing
//! usable about it. The length tells a truncated file from a damaged one.

use edgekms_hsm::{aead, Key256};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The only format this version writes and reads.
pub const FORMAT: u8 = 1;
pub const KEY_CHECK_LEN: usize = 8;
/// Magic, format, key check, body length.
pub const HEADER_LEN: usize = 4 + 1 + KEY_CHECK_LEN + 8;

/// Why a backup does not open (or, `Corrupt`, does not parse once open).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("backup format {0} is not supported: this version reads format {FORMAT}; restore with the version that wrote it, or a newer one")]
    Format(u8),
    #[error(
        "backup does not open with this key: it was made under another key file (check --key-file)"
    )]
    WrongKey,
    #[error("backup is truncated: {0}; use a complete copy")]
    Truncated(String),
    #[error("backup is corrupt: {0}; use another copy")]
    Corrupt(String),
}

/// The header's key check of `key`.
pub fn key_check(key: &Key256) -> [u8; KEY_CHECK_LEN] {
    let mut h = Sha256::new();
    h.update(b"edgekms backup key check v1\0");
    h.update(key.expose());
    let digest = h.finalize();
    let mut out = [0u8; KEY_CHECK_LEN];
    out.copy_from_slice(&digest[..KEY_CHECK_LEN]);
    out
}

/// Encrypts `plain` under `key`, with `magic` as the file's first bytes.
pub fn seal(key: &Key256, magic: &[u8; 4], plain: &[u8]) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(magic);
    header[4] = FORMAT;
    header[5..13].copy_from_slice(&key_check(key));
    let body_len = (plain.len() + aead::OVERHEAD) as u64;
    header[13..].copy_from_slice(&body_len.to_be_bytes());
    let mut blob = Vec::with_capacity(HEADER_LEN + plain.len() + aead::OVERHEAD);
    blob.extend_from_slice(&header);
    aead::seal_into(key, &header, plain, &mut blob);
    blob
}

/// Checks the header of a file [`seal`] wrote (its magic already checked
/// by the caller) and decrypts the rest: a distinct error for another
/// format, another key, a truncated or an altered file.
pub fn open(blob: &[u8], key: &Key256) -> Result<Zeroizing<Vec<u8>>, FileError> {
    if blob.len() < HEADER_LEN {
        return Err(FileError::Truncated(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            blob.len()
        )));
    }
    let (header, body) = blob.split_at(HEADER_LEN);
    if header[4] != FORMAT {
        return Err(FileError::Format(header[4]));
    }
    if header[5..13] != key_check(key) {
        return Err(FileError::WrongKey);
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[13..]);
    let expected = u64::from_be_bytes(len);
    let found = body.len() as u64;
    if found < expected {
        return Err(FileError::Truncated(format!(
            "{found} of {expected} bytes after the header"
        )));
    }
    if found > expected {
        return Err(FileError::Corrupt(format!(
            "{} bytes more than the header announces",
            found - expected
        )));
    }
    aead::open(key, header, body)
        .map_err(|_| FileError::Corrupt("authentication failed (the file was altered)".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_tells_each_failure_apart() {
        let key = Key256::generate();
        let blob = seal(&key, b"TEST", b"body");
        assert_eq!(open(&blob, &key).unwrap().as_slice(), b"body");
        assert_eq!(open(&blob, &Key256::generate()), Err(FileError::WrongKey));
        assert!(matches!(
            open(&blob[..10], &key),
            Err(FileError::Truncated(_))
        ));
        assert!(matches!(
            open(&blob[..blob.len() - 1], &key),
            Err(FileError::Truncated(_))
        ));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(open(&longer, &key), Err(FileError::Corrupt(_))));
        let mut flipped = blob.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        assert!(matches!(open(&flipped, &key), Err(FileError::Corrupt(_))));
        let mut other = blob;
        other[4] = 2;
        assert_eq!(open(&other, &key), Err(FileError::Format(2)));
    }
}
