//! The recovery passphrase: a second, offline way to the node sealing key.
//!
//! At first start the plugin makes a random passphrase (128 bits, shown once
//! on stderr, stored nowhere), and stores the NSK wrapped under a key derived
//! from it. When the TPM later refuses to unseal because a bound PCR changed,
//! an operator who has checked the node runs `kmsctl local reseal`: the
//! passphrase opens this wrapper and the NSK is sealed again to the present
//! PCR values. The passphrase is random, not chosen, so one SHA-256 over a
//! random salt is a sufficient KDF (there is nothing to brute-force).

use edgekms_hsm::{aead, Key256};
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
}

#[cfg(test)]
mod proptests;
