//! Property tests for the delivery blob (bytes from the central service,
//! through any TLS-terminating proxy, to [`DeliveryKey::unwrap`]) and the
//! other delivery inputs: the node's public key sent at join
//! ([`check_public_key`], [`wrap`]) and the stored private scalar
//! ([`DeliveryKey::from_bytes`]). Arbitrary bytes return an error, never
//! a panic; every KEK round-trips under its binding; every flipped bit,
//! truncation and extension is refused (the blob is authenticated, and
//! the ephemeral point is bound by the HKDF info).

use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use crate::proptests::{config, name};

/// One node key for the whole suite: key generation is not under test.
fn node() -> &'static DeliveryKey {
    static NODE: OnceLock<DeliveryKey> = OnceLock::new();
    NODE.get_or_init(DeliveryKey::generate)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_wrapped_bytes_are_refused(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec(any::<u8>(), WRAPPED_LEN),
            // A valid format byte and point prefix, so ECDH runs.
            proptest::collection::vec(any::<u8>(), WRAPPED_LEN - 2).prop_map(|tail| {
                let mut raw = vec![FORMAT, 4];
                raw.extend_from_slice(&tail);
                raw
            }),
        ],
        version in any::<u32>(),
    ) {
        let b = Binding { cluster: "a", node: "n1", version, key_id: "a/v1/00" };
        prop_assert!(node().unwrap(b, &raw).is_err());
    }

    #[test]
    fn arbitrary_public_and_private_keys_never_panic(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..100),
            proptest::collection::vec(any::<u8>(), 32),
            proptest::collection::vec(any::<u8>(), 64).prop_map(|t| [&[4u8][..], &t[..]].concat()),
            proptest::collection::vec(any::<u8>(), 32).prop_map(|t| [&[2u8][..], &t[..]].concat()),
        ],
    ) {
        if let Ok(k) = DeliveryKey::from_bytes(&raw) {
            prop_assert_eq!(&k.to_bytes()[..], &raw[..]);
        }
        let checked = check_public_key(&raw).is_ok();
        let b = Binding { cluster: "a", node: "n1", version: 1, key_id: "a/v1/00" };
        prop_assert_eq!(wrap(&raw, b, &Key256::from_bytes(&[1; 32])).is_ok(), checked);
    }
}

proptest! {
    // Two P-256 scalar multiplications a case, slow in debug builds.
    #![proptest_config(config(64))]

    #[test]
    fn round_trip_and_every_damage_is_refused(
        cluster in name(),
        node_name in name(),
        version in any::<u32>(),
        kek in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let kek = Key256::from_bytes(&kek);
        let key_id = crate::keyid::derive(&cluster, version, &kek);
        let b = Binding { cluster: &cluster, node: &node_name, version, key_id: &key_id };
        let wrapped = wrap(&node().public_key(), b, &kek).unwrap();
        prop_assert_eq!(wrapped.len(), WRAPPED_LEN);
        prop_assert!(node().unwrap(b, &wrapped).unwrap() == kek);

        let mut bad = wrapped.clone();
        bad[at.index(wrapped.len())] ^= 1 << bit;
        prop_assert!(node().unwrap(b, &bad).is_err());
        prop_assert!(matches!(
            node().unwrap(b, &wrapped[..cut.index(wrapped.len())]),
            Err(DeliveryError::Malformed { .. })
        ), "not refused as malformed");
        let mut longer = wrapped.clone();
        longer.push(0);
        prop_assert!(matches!(node().unwrap(b, &longer), Err(DeliveryError::Malformed { .. })), "not refused as expected");
    }
}

/// p256 zero-pads a 24- to 31-byte scalar: a shortened stored delivery
/// key loaded as another key instead of being refused (found by
/// `arbitrary_public_and_private_keys_never_panic`).
#[test]
fn a_short_private_scalar_is_refused() {
    let full = DeliveryKey::generate().to_bytes();
    for len in 24..32 {
        assert_eq!(
            DeliveryKey::from_bytes(&full[32 - len..]).err(),
            Some(DeliveryError::BadPrivateKey),
            "{len} bytes"
        );
    }
    assert!(DeliveryKey::from_bytes(&full).is_ok());
}
