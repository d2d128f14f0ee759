//! Property tests for the TPM blob decoder ([`TpmBlob::decode`]): arbitrary
//! bytes return an error or a blob, never panic; what decodes re-encodes to
//! the same bytes; every valid blob round-trips; every truncation and every
//! appended byte is refused.

use proptest::prelude::*;

use super::*;
use crate::proptests::config;

fn bank() -> impl Strategy<Value = PcrBank> {
    prop_oneof![
        Just(PcrBank::Sha1),
        Just(PcrBank::Sha256),
        Just(PcrBank::Sha384)
    ]
}

/// 1 to 24 distinct PCRs, in order.
fn pcr_selection() -> impl Strategy<Value = Vec<u8>> {
    proptest::sample::subsequence((0..=MAX_PCR).collect::<Vec<u8>>(), 1..=24)
}

fn record() -> impl Strategy<Value = PcrRecord> {
    (bank(), pcr_selection()).prop_flat_map(|(bank, pcrs)| {
        let n = pcrs.len();
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), bank.digest_len()), n)
            .prop_map(move |values| PcrRecord {
                policy: PcrPolicy::new(bank, pcrs.clone()).unwrap(),
                values,
            })
    })
}

fn blob() -> impl Strategy<Value = TpmBlob> {
    (
        any::<[u8; 32]>(),
        proptest::option::of(record()),
        proptest::collection::vec(any::<u8>(), 1..400),
        proptest::collection::vec(any::<u8>(), 1..400),
    )
        .prop_map(|(primary, pcrs, public, private)| TpmBlob {
            primary,
            pcrs,
            public,
            private,
        })
}

fn is_corrupt(bytes: &[u8]) -> bool {
    matches!(TpmBlob::decode(bytes), Err(SealError::CorruptBlob { .. }))
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..700)) {
        match TpmBlob::decode(&raw) {
            Ok(blob) => prop_assert_eq!(blob.encode().unwrap(), raw),
            Err(e) => prop_assert!(matches!(e, SealError::CorruptBlob { .. }), "{e:?}"),
        }
    }

    /// Garbage behind a valid magic, version and primary, so that the PCR
    /// and TPM2B paths are reached; accepted input is canonical.
    #[test]
    fn framed_garbage_never_panics(
        alg in prop_oneof![Just(0x0004u16), Just(0x000B), Just(0x000C), Just(0x0010), any::<u16>()],
        tail in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let mut raw = b"EKTP\x01".to_vec();
        raw.extend_from_slice(&[0xA5; 32]);
        raw.extend_from_slice(&alg.to_be_bytes());
        raw.extend_from_slice(&tail);
        match TpmBlob::decode(&raw) {
            Ok(blob) => prop_assert_eq!(blob.encode().unwrap(), raw),
            Err(e) => prop_assert!(matches!(e, SealError::CorruptBlob { .. }), "{e:?}"),
        }
    }

    #[test]
    fn round_trip(blob in blob()) {
        let bytes = blob.encode().unwrap();
        prop_assert_eq!(TpmBlob::decode(&bytes).unwrap(), blob);
    }

    /// The format is not authenticated here (the TPM authenticates the
    /// sealed object when it loads it, and unseal checks the recorded PCR
    /// values against its policy): a flipped bit is refused, or decodes to
    /// a different blob, never to the original. Every truncation and every
    /// extension is refused.
    #[test]
    fn damage_is_refused_or_visible(
        blob in blob(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..8),
    ) {
        let good = blob.encode().unwrap();
        let mut bad = good.clone();
        bad[at.index(good.len())] ^= 1 << bit;
        prop_assert_ne!(TpmBlob::decode(&bad).ok(), Some(blob.clone()));
        prop_assert!(is_corrupt(&good[..cut.index(good.len())]));
        let mut longer = good;
        longer.extend_from_slice(&extra);
        prop_assert!(is_corrupt(&longer));
    }
}
