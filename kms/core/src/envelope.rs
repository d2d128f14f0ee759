//! The envelope: what Encrypt returns to kube-apiserver as `ciphertext`.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "EK"
//! 2       1     format version (1)
//! 3       4     KEK version, big-endian u32
//! 7       12    random nonce
//! 19      n     AES-256-GCM(KEK, plaintext)
//! 19+n    16    GCM tag
//! ```
//!
//! The associated data binds the cluster, the key_id and the 7-byte header,
//! so a blob cannot be replayed under another cluster or key, nor have its
//! header rewritten. kube-apiserver rejects ciphertexts over 1 KiB, which
//! caps the plaintext at [`MAX_PLAINTEXT`] bytes (DEK seeds are 32).

use edgekms_hsm::{aead, Key256};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 2] = b"EK";
pub const FORMAT_V1: u8 = 1;
pub const HEADER_LEN: usize = 7;
/// Bytes added to the plaintext.
pub const OVERHEAD: usize = HEADER_LEN + aead::OVERHEAD;
/// kube-apiserver's limit on a KMS v2 ciphertext.
pub const MAX_CIPHERTEXT: usize = 1024;
pub const MAX_PLAINTEXT: usize = MAX_CIPHERTEXT - OVERHEAD;

const AAD_DOMAIN: &[u8] = b"edgekms envelope v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("plaintext is empty")]
    EmptyPlaintext,
    #[error("plaintext is {len} bytes; at most {MAX_PLAINTEXT} fit in the 1 KiB ciphertext kube-apiserver accepts")]
    PlaintextTooLarge { len: usize },
    #[error("ciphertext is {len} bytes, shorter than the smallest edgekms envelope ({min} bytes): truncated?", min = OVERHEAD + 1)]
    Truncated { len: usize },
    #[error("ciphertext is {len} bytes, over the 1 KiB that kube-apiserver allows")]
    CiphertextTooLarge { len: usize },
    #[error("ciphertext does not start with the edgekms envelope header: not made by edgekms?")]
    BadMagic,
    #[error("ciphertext uses envelope format {0}, which this version of edgekms does not know (upgrade the plugin)")]
    UnsupportedFormat(u8),
    #[error("ciphertext under KEK version {version} failed authentication: tampered, or from another cluster or key")]
    AuthenticationFailed { version: u32 },
}

/// The parsed fixed-size header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kek_version: u32,
}

/// Reads the header, checking length, magic and format; does not decrypt.
pub fn parse_header(ciphertext: &[u8]) -> Result<Header, EnvelopeError> {
    if ciphertext.len() > MAX_CIPHERTEXT {
        return Err(EnvelopeError::CiphertextTooLarge {
            len: ciphertext.len(),
        });
    }
    if ciphertext.len() < 3 || &ciphertext[..2] != MAGIC {
        if ciphertext.len() >= 2 && &ciphertext[..2] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        return Err(EnvelopeError::Truncated {
            len: ciphertext.len(),
        });
    }
    if ciphertext[2] != FORMAT_V1 {
        return Err(EnvelopeError::UnsupportedFormat(ciphertext[2]));
    }
    if ciphertext.len() <= OVERHEAD {
        return Err(EnvelopeError::Truncated {
            len: ciphertext.len(),
        });
    }
    let version = [ciphertext[3], ciphertext[4], ciphertext[5], ciphertext[6]];
    Ok(Header {
        kek_version: u32::from_be_bytes(version),
    })
}

fn header(version: u32) -> [u8; HEADER_LEN] {
    let v = version.to_be_bytes();
    [MAGIC[0], MAGIC[1], FORMAT_V1, v[0], v[1], v[2], v[3]]
}

fn aad(cluster: &str, key_id: &str, header: &[u8]) -> Vec<u8> {
    let mut aad =
        Vec::with_capacity(AAD_DOMAIN.len() + 8 + cluster.len() + key_id.len() + HEADER_LEN);
    aad.extend_from_slice(AAD_DOMAIN);
    for part in [cluster.as_bytes(), key_id.as_bytes()] {
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(header);
    aad
}

/// Encrypts `plaintext` under KEK `version`.
pub fn seal(
    kek: &Key256,
    version: u32,
    cluster: &str,
    key_id: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if plaintext.is_empty() {
        return Err(EnvelopeError::EmptyPlaintext);
    }
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EnvelopeError::PlaintextTooLarge {
            len: plaintext.len(),
        });
    }
    let header = header(version);
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(&header);
    aead::seal_into(kek, &aad(cluster, key_id, &header), plaintext, &mut out);
    Ok(out)
}

/// Decrypts an envelope whose header names the KEK `kek` belongs to.
pub fn open(
    kek: &Key256,
    cluster: &str,
    key_id: &str,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let header = parse_header(ciphertext)?;
    let (head, body) = ciphertext.split_at(HEADER_LEN);
    aead::open(kek, &aad(cluster, key_id, head), body).map_err(|_| {
        EnvelopeError::AuthenticationFailed {
            version: header.kek_version,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "edge-1";
    const KEY_ID: &str = "edge-1/v3/0011223344556677";

    fn sealed(key: &Key256) -> Vec<u8> {
        seal(key, 3, CLUSTER, KEY_ID, &[7u8; 32]).unwrap()
    }

    #[test]
    fn layout_is_as_documented() {
        let key = Key256::generate();
        let ct = sealed(&key);
        assert_eq!(ct.len(), 32 + OVERHEAD);
        assert_eq!(&ct[..7], &[b'E', b'K', 1, 0, 0, 0, 3]);
        assert_eq!(parse_header(&ct).unwrap().kek_version, 3);
        assert_eq!(OVERHEAD, 35);
        assert_eq!(MAX_PLAINTEXT, 989);
    }

    #[test]
    fn round_trip_and_largest_plaintext_fits_the_apiserver_limit() {
        let key = Key256::generate();
        assert_eq!(
            open(&key, CLUSTER, KEY_ID, &sealed(&key))
                .unwrap()
                .as_slice(),
            &[7u8; 32]
        );
        let big = seal(&key, 1, CLUSTER, KEY_ID, &[1u8; MAX_PLAINTEXT]).unwrap();
        assert_eq!(big.len(), MAX_CIPHERTEXT);
        assert_eq!(
            open(&key, CLUSTER, KEY_ID, &big).unwrap().len(),
            MAX_PLAINTEXT
        );
    }

    #[test]
    fn known_answer_for_fixed_nonce() {
        // Pins the AAD construction: changing it would orphan every stored
        // Secret, so it must not change silently.
        let key = Key256::from_slice(&[0x42; 32]).unwrap();
        let head = header(1);
        let mut out = head.to_vec();
        aead::seal_with_nonce(&key, &[9; 12], &aad("c", "k", &head), b"seed", &mut out);
        assert_eq!(
            hex::encode(&out),
            KNOWN_ANSWER,
            "envelope bytes changed: this breaks every stored ciphertext"
        );
        assert_eq!(open(&key, "c", "k", &out).unwrap().as_slice(), b"seed");
    }
    const KNOWN_ANSWER: &str = include_str!("envelope_kat.hex");

    #[test]
    fn bad_plaintexts_are_refused() {
        let key = Key256::generate();
        assert_eq!(
            seal(&key, 1, CLUSTER, KEY_ID, b""),
            Err(EnvelopeError::EmptyPlaintext)
        );
        assert_eq!(
            seal(&key, 1, CLUSTER, KEY_ID, &[0; MAX_PLAINTEXT + 1]),
            Err(EnvelopeError::PlaintextTooLarge {
                len: MAX_PLAINTEXT + 1
            })
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let key = Key256::generate();
        let ct = sealed(&key);
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x80;
            assert!(open(&key, CLUSTER, KEY_ID, &bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn truncations_and_garbage_are_refused_without_panic() {
        let key = Key256::generate();
        let ct = sealed(&key);
        for len in 0..ct.len() {
            assert!(
                open(&key, CLUSTER, KEY_ID, &ct[..len]).is_err(),
                "len {len}"
            );
        }
        assert_eq!(parse_header(b"XYZ"), Err(EnvelopeError::BadMagic));
        assert_eq!(
            parse_header(&[b'E', b'K', 9, 0, 0, 0, 0]),
            Err(EnvelopeError::UnsupportedFormat(9))
        );
        assert_eq!(
            parse_header(&[b'E'; 2000]),
            Err(EnvelopeError::CiphertextTooLarge { len: 2000 })
        );
    }

    #[test]
    fn context_is_bound() {
        let key = Key256::generate();
        let ct = sealed(&key);
        assert!(open(&key, "edge-2", KEY_ID, &ct).is_err());
        assert!(open(&key, CLUSTER, "edge-1/v3/ffffffffffffffff", &ct).is_err());
        assert!(open(&Key256::generate(), CLUSTER, KEY_ID, &ct).is_err());
    }
}

#[cfg(test)]
mod proptests;
