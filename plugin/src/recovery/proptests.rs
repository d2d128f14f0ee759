//! Property tests for the recovery wrapper (`meta/recovery`, opened by
//! `kmsctl local reseal` with a typed passphrase): arbitrary bytes and
//! passphrases are refused without a panic; every NSK round-trips under
//! its passphrase (typed in any case, with any separators) and cluster;
//! every flipped bit, truncation and extension is refused (AES-GCM under
//! the derived key; the salt feeds the key, the version byte is checked).

use proptest::prelude::*;

use super::*;
use crate::proptests::{config, name};

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_blobs_and_passphrases_are_refused(
        blob in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..120),
            proptest::collection::vec(any::<u8>(), 16 + 28 + 32).prop_map(|t| [&[VERSION][..], &t[..]].concat()),
        ],
        pass in "\\PC{0,50}",
        cluster in "\\PC{0,20}",
    ) {
        prop_assert!(unwrap(&blob, &pass, &cluster).is_none());
    }

    #[test]
    fn round_trip_and_every_damage_is_refused(
        nsk in any::<[u8; 32]>(),
        cluster in name(),
        lower in any::<bool>(),
        sep in "[ -]{0,2}",
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let nsk = Key256::from_bytes(&nsk);
        let pass = generate_passphrase();
        let blob = wrap(&nsk, &pass, &cluster);
        let mut typed = pass.replace('-', &sep);
        if lower {
            typed = typed.to_lowercase();
        }
        prop_assert!(unwrap(&blob, &typed, &cluster).unwrap() == nsk);

        let mut bad = blob.clone();
        bad[at.index(blob.len())] ^= 1 << bit;
        prop_assert!(unwrap(&bad, &pass, &cluster).is_none());
        prop_assert!(unwrap(&blob[..cut.index(blob.len())], &pass, &cluster).is_none());
        let mut longer = blob.clone();
        longer.push(0);
        prop_assert!(unwrap(&longer, &pass, &cluster).is_none());
        let other = format!("{cluster}x");
        prop_assert!(unwrap(&blob, &pass, &other).is_none());
    }
}
