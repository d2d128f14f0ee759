//! KEK delivery: how the central service wraps a KEK version to one node.
//!
//! Each node holds a P-256 delivery key that never leaves it. The server
//! makes an ephemeral P-256 key per delivery, derives an AES-256 key with
//! HKDF-SHA256 from the ECDH shared secret, and seals the KEK with
//! AES-256-GCM. A TLS-terminating proxy or a log of the stream sees only
//! this blob, which only the node can open.
//!
//! Blob: `1 | ephemeral public key (65, SEC1 uncompressed) | nonce (12) |
//! ciphertext (32) | tag (16)`. The HKDF info and the AEAD associated data
//! both bind cluster, node, version and key_id, so a blob opens only as
//! what it was made for.
//!
//! The same scheme runs the other way when a restored central service
//! heals from its fleet: a node returns a KEK the service lacks, wrapped to
//! the service's own delivery key ([`return_key`], [`DeliveryKey::open_returned`]).
//! The direction is bound too, so a blob made for one way never opens as
//! the other.

use edgekms_hsm::{aead, Key256};
use hkdf::Hkdf;
use p256::ecdh::EphemeralSecret;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use sha2::Sha256;
use zeroize::Zeroizing;

const FORMAT: u8 = 1;
const POINT_LEN: usize = 65;
/// Length of a wrapped KEK.
pub const WRAPPED_LEN: usize = 1 + POINT_LEN + aead::OVERHEAD + 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("node delivery public key is not a valid P-256 point")]
    BadPublicKey,
    #[error("stored delivery key is not a valid P-256 private key")]
    BadPrivateKey,
    #[error("wrapped KEK version {version} is malformed ({len} bytes)")]
    Malformed { version: u32, len: usize },
    #[error("wrapped KEK version {version} does not open with this node's delivery key (wrapped for another node, or altered)")]
    Open { version: u32 },
    #[error("delivered KEK version {version} does not match its key_id {key_id:?}")]
    KeyIdMismatch { version: u32, key_id: String },
}

/// What a delivery is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub version: u32,
    pub key_id: &'a str,
}

/// Which way a blob travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToNode,
    ToService,
}

impl Direction {
    fn tags(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Direction::ToNode => (b"edgekms delivery v1\0", b"edgekms delivery aad v1\0"),
            Direction::ToService => (b"edgekms return v1\0", b"edgekms return aad v1\0"),
        }
    }
}

impl Binding<'_> {
    fn encode(&self, tag: &[u8]) -> Vec<u8> {
        let mut out = tag.to_vec();
        for part in [self.cluster, self.node] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(self.key_id.as_bytes());
        out
    }
}

/// A node's delivery key pair. The secret is zeroized on drop.
pub struct DeliveryKey {
    secret: SecretKey,
}

impl std::fmt::Debug for DeliveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryKey([redacted])")
    }
}

impl DeliveryKey {
    pub fn generate() -> Self {
        Self {
            secret: SecretKey::random(&mut rand::rngs::OsRng),
        }
    }

    /// From the 32-byte scalar, as stored (wrapped) on the node.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DeliveryError> {
        // p256 also takes 24 to 31 bytes, zero-padded: a shortened record
        // would load as another key instead of being refused.
        if bytes.len() != 32 {
            return Err(DeliveryError::BadPrivateKey);
        }
        SecretKey::from_slice(bytes)
            .map(|secret| Self { secret })
            .map_err(|_| DeliveryError::BadPrivateKey)
    }

    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.secret.to_bytes().to_vec())
    }

    /// SEC1 uncompressed public point, as sent at join.
    pub fn public_key(&self) -> Vec<u8> {
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// Opens a delivery, and checks the key matches its key_id.
    pub fn unwrap(&self, binding: Binding<'_>, wrapped: &[u8]) -> Result<Key256, DeliveryError> {
        self.open(Direction::ToNode, binding, wrapped)
    }

    /// Opens a key a node returned to this (service) key ([`return_key`]),
    /// and checks it matches its key_id: `binding.node` is the node that
    /// returned it.
    pub fn open_returned(
        &self,
        binding: Binding<'_>,
        wrapped: &[u8],
    ) -> Result<Key256, DeliveryError> {
        self.open(Direction::ToService, binding, wrapped)
    }

    fn open(
        &self,
        direction: Direction,
        binding: Binding<'_>,
        wrapped: &[u8],
    ) -> Result<Key256, DeliveryError> {
        let malformed = DeliveryError::Malformed {
            version: binding.version,
            len: wrapped.len(),
        };
        if wrapped.len() != WRAPPED_LEN || wrapped[0] != FORMAT {
            return Err(malformed);
        }
        let (point, sealed) = wrapped[1..].split_at(POINT_LEN);
        let eph = PublicKey::from_sec1_bytes(point).map_err(|_| malformed)?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), eph.as_affine());
        let kek = derive(
            shared.raw_secret_bytes(),
            point,
            &self.public_key(),
            binding,
            direction,
        );
        let open = DeliveryError::Open {
            version: binding.version,
        };
        let plain = aead::open(&kek, &binding.encode(direction.tags().1), sealed)
            .map_err(|_| open.clone())?;
        let key = Key256::from_slice(&plain).ok_or(open)?;
        if crate::keyid::derive(binding.cluster, binding.version, &key) != binding.key_id {
            return Err(DeliveryError::KeyIdMismatch {
                version: binding.version,
                key_id: binding.key_id.to_owned(),
            });
        }
        Ok(key)
    }
}

fn derive(
    shared: &[u8],
    eph_point: &[u8],
    node_point: &[u8],
    binding: Binding<'_>,
    direction: Direction,
) -> Key256 {
    let mut info = binding.encode(direction.tags().0);
    info.extend_from_slice(eph_point);
    info.extend_from_slice(node_point);
    let hk = Hkdf::<Sha256>::new(None, shared);
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
    let _ = hk.expand(&info, &mut okm[..]);
    Key256::from_bytes(&okm)
}

/// Checks a node's delivery public key at enrolment.
pub fn check_public_key(node_public: &[u8]) -> Result<(), DeliveryError> {
    PublicKey::from_sec1_bytes(node_public)
        .map(|_| ())
        .map_err(|_| DeliveryError::BadPublicKey)
}

/// Wraps `kek` to the node whose delivery public key is `node_public`.
pub fn wrap(
    node_public: &[u8],
    binding: Binding<'_>,
    kek: &Key256,
) -> Result<Vec<u8>, DeliveryError> {
    seal(Direction::ToNode, node_public, binding, kek)
}

/// Wraps `kek`, which node `binding.node` holds, back to the central
/// service whose delivery public key is `service_public`.
pub fn return_key(
    service_public: &[u8],
    binding: Binding<'_>,
    kek: &Key256,
) -> Result<Vec<u8>, DeliveryError> {
    seal(Direction::ToService, service_public, binding, kek)
}

fn seal(
    direction: Direction,
    node_public: &[u8],
    binding: Binding<'_>,
    kek: &Key256,
) -> Result<Vec<u8>, DeliveryError> {
    let node = PublicKey::from_sec1_bytes(node_public).map_err(|_| DeliveryError::BadPublicKey)?;
    let eph = EphemeralSecret::random(&mut rand::rngs::OsRng);
    let eph_point = eph.public_key().to_encoded_point(false);
    let shared = eph.diffie_hellman(&node);
    let node_point = node.to_encoded_point(false);
    let key = derive(
        shared.raw_secret_bytes(),
        eph_point.as_bytes(),
        node_point.as_bytes(),
        binding,
        direction,
    );
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(FORMAT);
    out.extend_from_slice(eph_point.as_bytes());
    aead::seal_into(
        &key,
        &binding.encode(direction.tags().1),
        kek.expose(),
        &mut out,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(key_id: &str) -> Binding<'_> {
        Binding {
            cluster: "a",
            node: "n1",
            version: 2,
            key_id,
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let node = DeliveryKey::generate();
        let kek = Key256::generate();
        let key_id = crate::keyid::derive("a", 2, &kek);
        let wrapped = wrap(&node.public_key(), binding(&key_id), &kek).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert!(!wrapped.windows(32).any(|w| w == kek.expose().as_slice()));
        let got = node.unwrap(binding(&key_id), &wrapped).unwrap();
        assert_eq!(got, kek);

        // Another node, another version or another node name: refused.
        let other = DeliveryKey::generate();
        assert!(matches!(
            other.unwrap(binding(&key_id), &wrapped),
            Err(DeliveryError::Open { .. })
        ));
        let mut b = binding(&key_id);
        b.node = "n2";
        assert!(node.unwrap(b, &wrapped).is_err());
        let mut b = binding(&key_id);
        b.version = 3;
        assert!(node.unwrap(b, &wrapped).is_err());
    }

    #[test]
    fn a_returned_key_opens_only_as_a_return() {
        let service = DeliveryKey::generate();
        let kek = Key256::generate();
        let key_id = crate::keyid::derive("a", 2, &kek);
        let returned = return_key(&service.public_key(), binding(&key_id), &kek).unwrap();
        assert_eq!(returned.len(), WRAPPED_LEN);
        assert_eq!(
            service.open_returned(binding(&key_id), &returned).unwrap(),
            kek
        );
        // Never as a delivery, and a delivery never as a return.
        assert!(matches!(
            service.unwrap(binding(&key_id), &returned),
            Err(DeliveryError::Open { .. })
        ));
        let delivered = wrap(&service.public_key(), binding(&key_id), &kek).unwrap();
        assert!(matches!(
            service.open_returned(binding(&key_id), &delivered),
            Err(DeliveryError::Open { .. })
        ));
        // A key that is not the key_id's is refused.
        let other = Key256::generate();
        let forged = return_key(&service.public_key(), binding(&key_id), &other).unwrap();
        assert!(matches!(
            service.open_returned(binding(&key_id), &forged),
            Err(DeliveryError::KeyIdMismatch { .. })
        ));
    }

    #[test]
    fn tampering_and_truncation_are_refused() {
        let node = DeliveryKey::generate();
        let kek = Key256::generate();
        let key_id = crate::keyid::derive("a", 2, &kek);
        let wrapped = wrap(&node.public_key(), binding(&key_id), &kek).unwrap();
        for i in [0, 1, 70, WRAPPED_LEN - 1] {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert!(node.unwrap(binding(&key_id), &bad).is_err(), "byte {i}");
        }
        assert!(matches!(
            node.unwrap(binding(&key_id), &wrapped[..WRAPPED_LEN - 1]),
            Err(DeliveryError::Malformed { .. })
        ));
    }

    #[test]
    fn a_key_that_does_not_match_its_key_id_is_refused() {
        let node = DeliveryKey::generate();
        let kek = Key256::generate();
        let wrong_id = crate::keyid::derive("a", 2, &Key256::generate());
        let wrapped = wrap(&node.public_key(), binding(&wrong_id), &kek).unwrap();
        assert!(matches!(
            node.unwrap(binding(&wrong_id), &wrapped),
            Err(DeliveryError::KeyIdMismatch { .. })
        ));
    }

    #[test]
    fn private_key_survives_storage_and_bad_points_are_refused() {
        let node = DeliveryKey::generate();
        let again = DeliveryKey::from_bytes(&node.to_bytes()).unwrap();
        assert_eq!(node.public_key(), again.public_key());
        assert!(check_public_key(&node.public_key()).is_ok());
        assert_eq!(check_public_key(&[4; 65]), Err(DeliveryError::BadPublicKey));
        assert!(format!("{node:?}").contains("redacted"));
    }
}

#[cfg(test)]
mod proptests;
