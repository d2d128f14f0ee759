//! Property tests for every record decoder of the node's cache:
//! [`decode_record`] (`kek/<version>`), the fleet record (`meta/fleet`,
//! JSON), the wrapped fleet keys (`meta/fleet-keys`), `meta/fleet-seq`,
//! the sealed NSK (`meta/nsk`) and the version keys themselves, the last
//! ones on a real RocksDB. Arbitrary bytes give an error or a value, never
//! a panic; every record round-trips.
//!
//! Damage to a KEK record: the wrapped key, the key_id and the format byte
//! are authenticated (refused); so is the state byte where it matters most,
//! since a retired record carrying a wrapped key is refused (a live record
//! never decodes as retired). A flip of the state between pending, primary
//! and decrypt-only, or of `created_unix`, decodes to a different but valid
//! record with the same key: neither is in the associated data (a format
//! change would be needed); the storage layer's checksums catch those.

use std::sync::{Mutex, OnceLock};

use proptest::prelude::*;

use super::*;
use crate::proptests::{config, name};

fn live_state() -> impl Strategy<Value = VersionState> {
    prop_oneof![
        Just(VersionState::Pending),
        Just(VersionState::Primary),
        Just(VersionState::DecryptOnly)
    ]
}

/// Any version the plugin can write: a live one (key_id derived from its
/// key) or a retired one (any key_id up to kube-apiserver's limit).
fn key_version(cluster: String) -> impl Strategy<Value = KeyVersion> {
    prop_oneof![
        (any::<u32>(), live_state(), any::<[u8; 32]>(), any::<u64>()).prop_map(
            move |(v, state, key, created)| {
                KeyVersion::new(&cluster, v, state, Key256::from_bytes(&key), created)
            }
        ),
        (
            any::<u32>(),
            // At most 1000 bytes: key ids are under kube-apiserver's 1 KiB.
            prop_oneof!["\\PC{0,40}", "\\PC{0,250}"],
            any::<u64>()
        )
            .prop_map(|(v, id, created)| KeyVersion::retired(v, id, created)),
    ]
}

type Seen = (u32, VersionState, String, u64, Option<[u8; 32]>);

fn seen(kv: &KeyVersion) -> Seen {
    (
        kv.version,
        kv.state(),
        kv.key_id.clone(),
        kv.created_unix,
        kv.key().map(|k| *k.expose()),
    )
}

proptest! {
    #![proptest_config(config(1024))]

    /// Only a retired record can decode from bytes made without the NSK,
    /// and then it is canonical (re-encodes to the same bytes).
    #[test]
    fn arbitrary_records_never_panic(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..120),
            (0u8..5, any::<u64>(), 0u16..80, proptest::collection::vec(any::<u8>(), 0..100)).prop_map(
                |(state, created, len, tail)| {
                    let mut raw = vec![RECORD_V1, state];
                    raw.extend_from_slice(&created.to_be_bytes());
                    raw.extend_from_slice(&len.to_be_bytes());
                    raw.extend_from_slice(&tail);
                    raw
                }
            ),
        ],
        version in any::<u32>(),
    ) {
        let nsk = Key256::from_bytes(&[1; 32]);
        if let Ok(kv) = decode_record("edge-1", &nsk, version, &raw) {
            prop_assert_eq!(kv.state(), VersionState::Retired);
            prop_assert_eq!(encode_record("edge-1", &nsk, &kv), raw);
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn records_round_trip_and_damage_never_loses_a_key(
        (cluster, kv) in name().prop_flat_map(|c| (Just(c.clone()), key_version(c))),
        nsk in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let nsk = Key256::from_bytes(&nsk);
        let raw = encode_record(&cluster, &nsk, &kv);
        let back = decode_record(&cluster, &nsk, kv.version, &raw).unwrap();
        prop_assert_eq!(seen(&back), seen(&kv));
        // Another slot, cluster or NSK: refused (retired records hold no key).
        if kv.state() != VersionState::Retired {
            prop_assert!(decode_record(&cluster, &nsk, kv.version.wrapping_add(1), &raw).is_err());
            let other = format!("{cluster}x");
            prop_assert!(decode_record(&other, &nsk, kv.version, &raw).is_err());
            prop_assert!(decode_record(&cluster, &Key256::from_bytes(&[0; 32]), kv.version, &raw).is_err());
        }

        let i = at.index(raw.len());
        let mut bad = raw.clone();
        bad[i] ^= 1 << bit;
        if let Ok(got) = decode_record(&cluster, &nsk, kv.version, &bad) {
            prop_assert_ne!(seen(&got), seen(&kv));
            match kv.state() {
                VersionState::Retired => {
                    prop_assert_eq!(got.state(), VersionState::Retired);
                }
                _ => {
                    // Only the state (among live ones) or the creation time changed.
                    prop_assert!(i == 1 || (2..10).contains(&i), "byte {i}");
                    prop_assert_ne!(got.state(), VersionState::Retired);
                    prop_assert_eq!(&got.key_id, &kv.key_id);
                    prop_assert_eq!(got.key().map(|k| *k.expose()), kv.key().map(|k| *k.expose()));
                }
            }
        }
        prop_assert!(decode_record(&cluster, &nsk, kv.version, &raw[..cut.index(raw.len())]).is_err());
    }

    #[test]
    fn fleet_record_json_never_panics_and_round_trips(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "\\PC{0,200}".prop_map(String::into_bytes),
        ],
        rec in (
            "\\PC{0,40}",
            proptest::collection::vec("\\PC{0,40}", 0..3),
            "\\PC{0,20}",
            "[0-9a-f]{0,100}",
            "[0-9a-f]{0,100}",
        ).prop_map(
            |(server, more_servers, node, ca_der, cert_der)| FleetRecord { server, more_servers, node, ca_der, cert_der },
        ),
        cut in any::<prop::sample::Index>(),
    ) {
        let _ = serde_json::from_slice::<FleetRecord>(&raw);
        let json = serde_json::to_vec(&rec).unwrap();
        prop_assert_eq!(serde_json::from_slice::<FleetRecord>(&json).unwrap(), rec);
        prop_assert!(serde_json::from_slice::<FleetRecord>(&json[..cut.index(json.len())]).is_err());
    }
}

/// One cache for the suite (opening RocksDB is not under test), used by
/// one case at a time.
fn store() -> std::sync::MutexGuard<'static, (tempfile::TempDir, Cache)> {
    static STORE: OnceLock<Mutex<(tempfile::TempDir, Cache)>> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Cache::open(dir.path(), "edge-1").unwrap();
            Mutex::new((dir, store))
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn clear_keks(s: &Cache) {
    let keys: Vec<_> =
        s.db.prefix_iterator(KEK_PREFIX)
            .map(|item| item.unwrap().0)
            .take_while(|k| k.starts_with(KEK_PREFIX))
            .collect();
    for key in keys {
        s.db.delete(key).unwrap();
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// The fleet keys' plaintext (a u32 length, the TLS key, the delivery
    /// key), any length field included; and any bytes in their slot.
    #[test]
    fn fleet_keys_of_any_content_never_panic(
        plain in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(n, t)| {
                [&n.to_be_bytes()[..], &t[..]].concat()
            }),
            (0u32..80, proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(n, t)| {
                [&n.to_be_bytes()[..], &t[..]].concat()
            }),
        ],
        raw in proptest::collection::vec(any::<u8>(), 0..80),
        tls in proptest::collection::vec(any::<u8>(), 0..200),
        delivery in proptest::collection::vec(any::<u8>(), 0..40),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let guard = store();
        let s = &guard.1;
        let nsk = Key256::from_bytes(&[5; 32]);
        let sealed = aead::seal(&nsk, &fleet_keys_aad("edge-1"), &plain);
        s.db.put(FLEET_KEYS_KEY, &sealed).unwrap();
        if let Ok(keys) = s.fleet_keys(&nsk) {
            let n = u32::from_be_bytes(plain[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(&keys.tls_key[..], &plain[4..4 + n]);
            prop_assert_eq!(&keys.delivery_key[..], &plain[4 + n..]);
        }
        s.db.put(FLEET_KEYS_KEY, &raw).unwrap();
        prop_assert!(s.fleet_keys(&nsk).is_err());

        // Round trip through put_fleet, then damage: refused.
        let rec = FleetRecord { server: "https://h:1".into(), more_servers: Vec::new(), node: "n1".into(), ca_der: "00".into(), cert_der: "11".into() };
        let keys = FleetKeys { tls_key: Zeroizing::new(tls.clone()), delivery_key: Zeroizing::new(delivery.clone()) };
        s.put_fleet(&nsk, &rec, &keys).unwrap();
        let back = s.fleet_keys(&nsk).unwrap();
        prop_assert_eq!((&back.tls_key[..], &back.delivery_key[..]), (&tls[..], &delivery[..]));
        prop_assert_eq!(s.fleet().unwrap(), Some(rec));
        let good = s.db.get(FLEET_KEYS_KEY).unwrap().unwrap();
        let mut bad = good.clone();
        bad[at.index(good.len())] ^= 1 << bit;
        s.db.put(FLEET_KEYS_KEY, &bad).unwrap();
        prop_assert!(s.fleet_keys(&nsk).is_err());
    }

    #[test]
    fn small_slots_of_any_content_never_panic(
        seq in proptest::collection::vec(any::<u8>(), 0..16),
        nsk_blob in proptest::collection::vec(any::<u8>(), 0..80),
        fleet in proptest::collection::vec(any::<u8>(), 0..80),
        n in any::<u64>(),
    ) {
        let guard = store();
        let s = &guard.1;
        s.db.put(FLEET_SEQ_KEY, &seq).unwrap();
        match s.fleet_seq() {
            Ok(v) => prop_assert_eq!(v.to_be_bytes().to_vec(), seq),
            Err(_) => prop_assert_ne!(seq.len(), 8),
        }
        s.db.put(FLEET_SEQ_KEY, n.to_be_bytes()).unwrap();
        prop_assert_eq!(s.fleet_seq().unwrap(), n);
        s.db.put(NSK_KEY, &nsk_blob).unwrap();
        let _ = s.sealed_nsk();
        s.db.put(FLEET_KEY, &fleet).unwrap();
        let _ = s.fleet();
    }

    /// Version keys of any length and records of any content: loading the
    /// keyring refuses them (or loads retired versions), never panics.
    #[test]
    fn load_keyring_of_any_content_never_panics(
        entries in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..7), proptest::collection::vec(any::<u8>(), 0..60)),
            0..4,
        ),
    ) {
        let guard = store();
        let s = &guard.1;
        clear_keks(s);
        let nsk = Key256::from_bytes(&[6; 32]);
        for (key, value) in &entries {
            s.db.put([KEK_PREFIX, &key[..]].concat(), value).unwrap();
        }
        if let Ok(ring) = s.load_keyring(&nsk) {
            prop_assert!(ring.versions().all(|kv| kv.state() == VersionState::Retired));
        }
        let _ = s.has_versions();
        clear_keks(s);
    }
}

/// A primary or decrypt-only record whose state byte lost one bit (1 or 2
/// to 3) decoded as retired: its data stopped decrypting and the next
/// sync wrote the record back without its key (found by `records_round_trip_and_damage_never_loses_a_key`).
#[test]
fn a_live_record_with_a_damaged_state_byte_is_not_read_as_retired() {
    let nsk = Key256::generate();
    for state in [VersionState::Primary, VersionState::DecryptOnly] {
        let kv = KeyVersion::new("edge-1", 2, state, Key256::generate(), 7);
        let mut raw = encode_record("edge-1", &nsk, &kv);
        raw[1] = state_byte(VersionState::Retired);
        assert!(matches!(
            decode_record("edge-1", &nsk, 2, &raw),
            Err(CacheError::Corrupt { .. })
        ));
    }
}
