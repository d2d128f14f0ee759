//! Property tests for [`open`], under every wrapped record in both stores,
//! the soft sealer, the recovery wrapper, the delivery blob and the backup:
//! arbitrary bytes are refused without a panic; every plaintext round-trips
//! under its associated data; every flipped bit, truncation and extension
//! is refused (the format is authenticated end to end).

use proptest::prelude::*;

use super::*;
use crate::proptests::config;

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_bytes_are_refused(
        sealed in proptest::collection::vec(any::<u8>(), 0..200),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let key = Key256::from_bytes(&[0x11; 32]);
        prop_assert_eq!(open(&key, &aad, &sealed), Err(OpenError));
    }

    #[test]
    fn round_trip(
        key in any::<[u8; 32]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        plain in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let key = Key256::from_bytes(&key);
        let sealed = seal(&key, &aad, &plain);
        prop_assert_eq!(sealed.len(), plain.len() + OVERHEAD);
        let back = open(&key, &aad, &sealed).unwrap();
        prop_assert_eq!(back.as_slice(), plain.as_slice());
    }

    #[test]
    fn every_damage_is_refused(
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        plain in proptest::collection::vec(any::<u8>(), 0..100),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..4),
    ) {
        let key = Key256::from_bytes(&[0x22; 32]);
        let sealed = seal(&key, &aad, &plain);
        let mut bad = sealed.clone();
        bad[at.index(sealed.len())] ^= 1 << bit;
        prop_assert_eq!(open(&key, &aad, &bad), Err(OpenError));
        prop_assert_eq!(open(&key, &aad, &sealed[..cut.index(sealed.len())]), Err(OpenError));
        let mut longer = sealed.clone();
        longer.extend_from_slice(&extra);
        prop_assert_eq!(open(&key, &aad, &longer), Err(OpenError));
        let mut other_aad = aad.clone();
        other_aad.push(0);
        prop_assert_eq!(open(&key, &other_aad, &sealed), Err(OpenError));
    }
}
