//! The secret key type: 256 bits that zeroize on drop, print as
//! `[redacted]`, cannot be cloned or displayed, and sit in locked memory where
//! the system allows it.

use std::fmt;

use rand::RngCore;
use zeroize::Zeroizing;

/// A 256-bit secret key (NSK, KEK version, root key).
///
/// Boxed so that moves do not leave copies on the stack; the box's page is
/// locked against swapping (see [`crate::memory::lock`]).
pub struct Key256(Box<Zeroizing<[u8; 32]>>);

impl Key256 {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = Self::zeroed();
        rand::rngs::OsRng.fill_bytes(&mut key.0[..]);
        key
    }

    /// Takes a key from bytes; the caller's copy should itself be zeroizing.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self::from_bytes)
    }

    /// [`Key256::from_slice`] for a slice known to be 32 bytes long.
    /// A key written as 64 hex digits (a backup key file), surrounding
    /// white space ignored.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 64 {
            return None;
        }
        let bytes = Zeroizing::new(hex::decode(text).ok()?);
        Self::from_slice(&bytes)
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(bytes);
        key
    }

    fn zeroed() -> Self {
        let boxed = Box::new(Zeroizing::new([0u8; 32]));
        crate::memory::lock(boxed.as_ptr(), 32);
        Self(boxed)
    }

    /// The key bytes, for the AEAD module and sealers only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256([redacted])")
    }
}

impl PartialEq for Key256 {
    /// Constant-time, so that comparing keys in tests and self-checks leaks
    /// nothing through timing.
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let key = Key256::from_slice(&[0xAB; 32]).unwrap_or_else(Key256::generate);
        let shown = format!("{key:?}");
        assert_eq!(shown, "Key256([redacted])");
        assert!(!shown.to_lowercase().contains("ab"));
    }

    #[test]
    fn generated_keys_differ_and_lengths_are_checked() {
        assert!(Key256::generate() != Key256::generate());
        assert!(Key256::from_slice(&[0; 31]).is_none());
        assert!(Key256::from_slice(&[0; 33]).is_none());
    }
}
