//! Property tests for the soft sealer's two inputs: the key file (any
//! content other than 32 bytes is refused, never a panic) and the sealed
//! bytes handed to [`SoftSealer::unseal`] (arbitrary bytes are refused; a
//! seal round-trips; every flipped bit or truncation is refused, the bytes
//! being AES-GCM under the key file).

use std::os::unix::fs::OpenOptionsExt;

use proptest::prelude::*;

use super::*;
use crate::proptests::config;

fn write_0600(path: &Path, bytes: &[u8]) {
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn key_file_of_any_content_opens_only_at_32_bytes(
        content in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            proptest::collection::vec(any::<u8>(), 32),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        write_0600(&path, &content);
        match SoftSealer::open_or_create(&path) {
            Ok(s) => {
                prop_assert_eq!(content.len(), 32);
                prop_assert!(s.wrapping_key.expose()[..] == content[..]);
            }
            Err(e) => {
                prop_assert_ne!(content.len(), 32);
                prop_assert!(matches!(e, SealError::CorruptBlob { .. }), "{e:?}");
            }
        }
        // Never replaced: the file is as it was.
        prop_assert_eq!(fs::read(&path).unwrap(), content);
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_sealed_bytes_are_refused(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        backend in prop_oneof![Just("soft".to_owned()), "\\PC{0,8}"],
    ) {
        let sealer = SoftSealer { path: "soft.key".into(), wrapping_key: Key256::from_bytes(&[3; 32]) };
        let blob = SealedBlob { backend, bytes };
        prop_assert!(sealer.unseal(&blob).is_err());
    }

    #[test]
    fn seal_round_trips_and_damage_is_refused(
        key in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let sealer = SoftSealer { path: "soft.key".into(), wrapping_key: Key256::from_bytes(&[4; 32]) };
        let key = Key256::from_bytes(&key);
        let blob = sealer.seal(&key).unwrap();
        prop_assert!(sealer.unseal(&blob).unwrap() == key);
        // And through the on-disk framing.
        let framed = SealedBlob::decode(&blob.encode()).unwrap();
        prop_assert!(sealer.unseal(&framed).unwrap() == key);

        let mut bad = blob.clone();
        bad.bytes[at.index(blob.bytes.len())] ^= 1 << bit;
        prop_assert!(sealer.unseal(&bad).is_err());
        let mut short = blob.clone();
        short.bytes.truncate(cut.index(blob.bytes.len()));
        prop_assert!(sealer.unseal(&short).is_err());
    }
}
