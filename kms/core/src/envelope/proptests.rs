//! Property tests for the envelope (the `ciphertext` kube-apiserver hands
//! back on Decrypt, so any bytes a caller sends): [`parse_header`] and
//! [`open`] return an error or a value, never a panic; every plaintext
//! round-trips under its cluster and key_id; every flipped bit,
//! truncation and extension is refused (header included: it is in the
//! associated data). Also [`crate::Keyring::decrypt`], the path a Decrypt
//! request takes.

use proptest::prelude::*;

use super::*;
use crate::proptests::{config, name};
use crate::Keyring;

fn plaintext() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..=64),
        proptest::collection::vec(any::<u8>(), 1..=MAX_PLAINTEXT),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// The header parser accepts exactly what the layout says.
    #[test]
    fn header_parser_never_panics_and_accepts_exactly_the_layout(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..1100),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..100)).prop_map(|(v, tail)| {
                let mut raw = header(v).to_vec();
                raw.extend_from_slice(&tail);
                raw
            }),
        ],
    ) {
        let valid = raw.len() > OVERHEAD
            && raw.len() <= MAX_CIPHERTEXT
            && raw[..2] == MAGIC[..]
            && raw[2] == FORMAT_V1;
        match parse_header(&raw) {
            Ok(h) => {
                prop_assert!(valid);
                prop_assert_eq!(&header(h.kek_version)[..], &raw[..HEADER_LEN]);
            }
            Err(_) => prop_assert!(!valid),
        }
        let key = Key256::from_bytes(&[7; 32]);
        prop_assert!(open(&key, "c", "k", &raw).is_err());
    }

    #[test]
    fn round_trip(
        key in any::<[u8; 32]>(),
        version in any::<u32>(),
        cluster in "\\PC{0,70}",
        key_id in "\\PC{0,100}",
        plain in plaintext(),
    ) {
        let key = Key256::from_bytes(&key);
        let ct = seal(&key, version, &cluster, &key_id, &plain).unwrap();
        prop_assert_eq!(ct.len(), plain.len() + OVERHEAD);
        prop_assert_eq!(parse_header(&ct).unwrap().kek_version, version);
        let back = open(&key, &cluster, &key_id, &ct).unwrap();
        prop_assert_eq!(back.as_slice(), plain.as_slice());
    }

    #[test]
    fn every_damage_is_refused(
        version in any::<u32>(),
        plain in proptest::collection::vec(any::<u8>(), 1..=64),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..4),
    ) {
        let key = Key256::from_bytes(&[9; 32]);
        let ct = seal(&key, version, "edge-1", "edge-1/v1/00", &plain).unwrap();
        let mut bad = ct.clone();
        bad[at.index(ct.len())] ^= 1 << bit;
        prop_assert!(open(&key, "edge-1", "edge-1/v1/00", &bad).is_err());
        prop_assert!(open(&key, "edge-1", "edge-1/v1/00", &ct[..cut.index(ct.len())]).is_err());
        let mut longer = ct.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(open(&key, "edge-1", "edge-1/v1/00", &longer).is_err());
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A Decrypt request: any ciphertext and key_id against a keyring with
    /// a primary, a decrypt-only, a disabled and a retired version, and a valid
    /// ciphertext with damage. Only the undamaged one under its own key_id
    /// decrypts.
    #[test]
    fn keyring_decrypt_of_any_request_never_panics(
        cluster in name(),
        raw in proptest::collection::vec(any::<u8>(), 0..200),
        header_version in 0u32..6,
        key_id in "\\PC{0,40}",
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut ring = Keyring::new(&cluster).unwrap();
        for _ in 0..4 {
            let v = ring.add_pending(Key256::generate(), 0).unwrap();
            ring.promote(v).unwrap();
        }
        ring.disable(1, 0).unwrap();
        ring.retire(1).unwrap();
        ring.disable(2, 0).unwrap();
        let (ct, kv) = ring.encrypt(b"a DEK seed").unwrap();
        let real_id = kv.key_id.clone();

        prop_assert!(ring.decrypt(&raw, &key_id).is_err());
        let mut framed = header(header_version).to_vec();
        framed.extend_from_slice(&raw);
        let _ = ring.decrypt(&framed, &key_id);
        prop_assert!(ring.decrypt(&framed, &real_id).is_err());

        let mut bad = ct.clone();
        bad[at.index(ct.len())] ^= 1 << bit;
        prop_assert!(ring.decrypt(&bad, &real_id).is_err());
        let (back, _) = ring.decrypt(&ct, &real_id).unwrap();
        prop_assert_eq!(back.as_slice(), b"a DEK seed");
    }
}
