//! Property tests for the soft sealer's two inputs: the key file (any
//! content other than a 32-byte first-format key or a 64-byte key with its
//! check value is refused, never a panic) and the sealed
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
    fn key_file_of_any_content_opens_only_as_a_key_file(
        content in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            proptest::collection::vec(any::<u8>(), 32),
            proptest::collection::vec(any::<u8>(), 64),
            any::<[u8; 32]>().prop_map(|k| {
                let mut v = k.to_vec();
                v.extend_from_slice(&check_value(&Key256::from_bytes(&k)));
                v
            }),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("soft.key");
        write_0600(&path, &content);
        match SoftSealer::open_or_create(&path) {
            Ok(s) => {
                let guard = s.wrapping_key.lock().unwrap();
                let key = &guard.as_ref().unwrap().key;
                prop_assert!(content.len() == 32 || content.len() == 64);
                prop_assert!(key.expose()[..] == content[..32]);
                if content.len() == 64 {
                    prop_assert!(check_value(key)[..] == content[32..]);
                }
            }
            Err(e) => {
                prop_assert!(matches!(e, SealError::SoftKeyFile { .. }), "{e:?}");
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
        let sealer = SoftSealer {
            path: "soft.key".into(),
            wrapping_key: Mutex::new(Some(FileKey { key: Key256::from_bytes(&[3; 32]), checked: true })),
        };
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
        let sealer = SoftSealer {
            path: "soft.key".into(),
            wrapping_key: Mutex::new(Some(FileKey { key: Key256::from_bytes(&[4; 32]), checked: true })),
        };
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
