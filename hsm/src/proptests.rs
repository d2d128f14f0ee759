//! Property tests for [`SealedBlob::decode`] (the framing of every sealed
//! key on disk). The case-count policy is the workspace's
//! ([`edgekms_testkit::proptest_policy`]).

use proptest::prelude::*;

pub(crate) use edgekms_testkit::proptest_policy::config;

use crate::SealedBlob;

/// Backend names as any encoder could write them: up to 255 bytes of UTF-8.
fn blob() -> impl Strategy<Value = SealedBlob> {
    (
        "\\PC{0,40}".prop_filter("at most 255 bytes", |s: &String| s.len() <= 255),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(backend, bytes)| SealedBlob { backend, bytes })
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any input returns; what is accepted is canonical (re-encodes to the
    /// same bytes), so no two inputs decode to the same blob.
    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_input_is_canonical(
        raw in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        if let Ok(blob) = SealedBlob::decode(&raw) {
            prop_assert_eq!(blob.encode(), raw);
        }
    }

    /// Same, with the magic in place so the length and name paths are hit.
    #[test]
    fn framed_garbage_never_panics(
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut raw = b"EKSB".to_vec();
        raw.extend_from_slice(&tail);
        if let Ok(blob) = SealedBlob::decode(&raw) {
            prop_assert_eq!(blob.encode(), raw);
        }
    }

    #[test]
    fn round_trip(blob in blob()) {
        prop_assert_eq!(SealedBlob::decode(&blob.encode()).ok(), Some(blob));
    }

    /// The framing is not authenticated (the backend authenticates its own
    /// bytes: AES-GCM for soft, the TPM for tpm). A damaged frame is
    /// refused or decodes to a different blob, never to the original, so
    /// the backend sees the damage.
    #[test]
    fn flips_and_truncations_never_decode_to_the_original(
        blob in blob(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let good = blob.encode();
        let mut bad = good.clone();
        let i = at.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert_ne!(SealedBlob::decode(&bad).ok(), Some(blob.clone()));
        let short = &good[..cut.index(good.len())];
        prop_assert_ne!(SealedBlob::decode(short).ok(), Some(blob));
    }
}
