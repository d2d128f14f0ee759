//! The one place that calls AES-256-GCM (the aes-gcm API changes between
//! major versions; keeping every call here keeps that churn in one file).
//!
//! Output layout: `nonce (12 bytes) | ciphertext | tag (16 bytes)`, with a
//! fresh random nonce per call. Callers bind context through the associated
//! data.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::Key256;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes that [`seal`] adds to the plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Authentication failed: wrong key, wrong associated data, or tampered bytes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed (wrong key, wrong context, or the ciphertext was altered)")]
pub struct OpenError;

/// Encrypts `plaintext` under `key`, appending to `out`.
pub fn seal_into(key: &Key256, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from
    // the OS: unique random nonces without a getrandom(2) call per request.
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    seal_with_nonce(key, &nonce, aad, plaintext, out);
}

/// [`seal_into`] returning a fresh vector.
pub fn seal(key: &Key256, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    seal_into(key, aad, plaintext, &mut out);
    out
}

/// Deterministic variant for known-answer tests only; production code always
/// uses a random nonce.
pub fn seal_with_nonce(
    key: &Key256,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) {
    let cipher = Aes256Gcm::new(key.expose().into());
    let sealed = cipher.encrypt(
        Nonce::from_slice(nonce),
        Payload {
            msg: plaintext,
            aad,
        },
    );
    // aes-gcm fails only for plaintexts over 64 GiB, which no caller can send
    // (the gRPC layer caps messages far below); an empty body would fail open.
    if let Ok(body) = sealed {
        out.extend_from_slice(nonce);
        out.extend_from_slice(&body);
    }
}

/// Decrypts what [`seal`] produced.
pub fn open(key: &Key256, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    if sealed.len() < OVERHEAD {
        return Err(OpenError);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(key.expose().into());
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
        .map(Zeroizing::new)
        .map_err(|_| OpenError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// NIST GCM test vector (gcmEncryptExtIV256.rsp, Count 0 of
    /// [Keylen = 256] [IVlen = 96] [PTlen = 128] [AADlen = 128]).
    #[test]
    fn nist_known_answer() {
        let key = Key256::from_slice(&unhex(
            "92e11dcdaa866f5ce790fd24501f92509aacf4cb8b1339d50c9c1240935dd08b",
        ))
        .unwrap();
        let nonce: [u8; 12] = unhex("ac93a1a6145299bde902f21a").try_into().unwrap();
        let pt = unhex("2d71bcfa914e4ac045b2aa60955fad24");
        let aad = unhex("1e0889016f67601c8ebea4943bc23ad6");
        let mut out = Vec::new();
        seal_with_nonce(&key, &nonce, &aad, &pt, &mut out);
        assert_eq!(
            hex::encode(&out[NONCE_LEN..]),
            "8995ae2e6df3dbf96fac7b7137bae67feca5aa77d51d4a0a14d9c51e1da474ab"
        );
        assert_eq!(open(&key, &aad, &out).unwrap().as_slice(), pt.as_slice());
    }

    #[test]
    fn every_flipped_byte_and_wrong_context_is_refused() {
        let key = Key256::generate();
        let sealed = seal(&key, b"ctx", b"secret seed");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(open(&key, b"ctx", &bad), Err(OpenError), "byte {i}");
        }
        assert_eq!(open(&key, b"other", &sealed), Err(OpenError));
        assert_eq!(open(&Key256::generate(), b"ctx", &sealed), Err(OpenError));
        assert_eq!(open(&key, b"ctx", &sealed[..OVERHEAD - 1]), Err(OpenError));
    }

    #[test]
    fn nonces_are_fresh() {
        let key = Key256::generate();
        assert_ne!(seal(&key, b"", b"x"), seal(&key, b"", b"x"));
    }
}

#[cfg(test)]
mod proptests;
