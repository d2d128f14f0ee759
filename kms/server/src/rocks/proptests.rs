//! Property tests for every record decoder of the central store, run on a
//! real RocksDB: arbitrary bytes in the root key, CA and server key,
//! cluster, KEK and audit slots make the reader return an error or a value,
//! never panic. Wrapped records (KEKs, private keys) round-trip and refuse
//! every flipped bit, truncation, other slot and other key_id (AES-GCM,
//! the slot and key_id in the associated data). Cluster records are JSON,
//! not authenticated: see `fleet/state/proptests.rs`.

use std::sync::{Mutex, OnceLock};

use proptest::prelude::*;

use super::*;
use edgekms_core::rotation::cluster::proptests::cluster;
use edgekms_testkit::proptest_policy::{config, name};

/// One store for the suite (opening RocksDB is not under test), used by
/// one case at a time, emptied by each case.
fn store() -> std::sync::MutexGuard<'static, (tempfile::TempDir, Store)> {
    static STORE: OnceLock<Mutex<(tempfile::TempDir, Store)>> = OnceLock::new();
    let m = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        Mutex::new((dir, store))
    });
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn clear(store: &Store) {
    let keys: Vec<_> = store
        .db
        .iterator(IteratorMode::Start)
        .map(|item| item.unwrap().0)
        .collect();
    for key in keys {
        store.db.delete(key).unwrap();
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        "\\PC{0,120}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_in_every_slot_never_panic(
        root in bytes(), ca_key in bytes(), server_key in bytes(),
        cluster_name in name(), cluster_json in bytes(),
        kek_cluster in name(), version in any::<u32>(), kek in bytes(),
        audit_key in proptest::collection::vec(any::<u8>(), 0..12), audit in bytes(),
    ) {
        let guard = store();
        let s = &guard.1;
        clear(s);
        let root_key = Key256::from_bytes(&[1; 32]);
        s.db.put(ROOT, &root).unwrap();
        s.db.put(CA_CERT, b"cert").unwrap();
        s.db.put(CA_KEY, &ca_key).unwrap();
        s.db.put(SERVER_CERT, b"cert").unwrap();
        s.db.put(SERVER_KEY, &server_key).unwrap();
        s.db.put(cluster_key(&cluster_name), &cluster_json).unwrap();
        s.db.put(kek_key(&kek_cluster, version), &kek).unwrap();
        s.db.put([AUDIT_PREFIX, &audit_key[..]].concat(), &audit).unwrap();

        let _ = s.sealed_root();
        prop_assert!(s.identity(&root_key).is_err());
        let _ = s.clusters();
        prop_assert!(s.kek(&root_key, &kek_cluster, version, "id").is_err());
        let _ = s.last_audit_seq();
        let mut seen = 0;
        s.audit_records(|_| { seen += 1; true }).unwrap();
        // A record under a malformed key is skipped, never a panic.
        prop_assert_eq!(seen, usize::from(audit_key.len() == 8));
        prop_assert!(s.initialized().unwrap());
    }

    #[test]
    fn wrapped_records_round_trip_and_refuse_damage(
        c in cluster(),
        version in any::<u32>(),
        key_id in "\\PC{0,40}",
        kek in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let guard = store();
        let s = &guard.1;
        clear(s);
        let root = Key256::from_bytes(&[2; 32]);
        let kek = Key256::from_bytes(&kek);
        let mut change = Change::default();
        change.put_cluster(&c).unwrap();
        change.put_kek(&root, c.name(), version, &key_id, &kek);
        s.commit(change).unwrap();
        prop_assert_eq!(s.cluster_records().unwrap(), vec![c.clone()]);
        prop_assert!(s.kek(&root, c.name(), version, &key_id).unwrap() == Some(kek));
        let other_id = format!("{key_id}x");
        prop_assert!(s.kek(&root, c.name(), version, &other_id).is_err());

        let good = s.db.get(kek_key(c.name(), version)).unwrap().unwrap();
        // Moved to another version's slot: refused.
        let other = version.wrapping_add(1);
        s.db.put(kek_key(c.name(), other), &good).unwrap();
        prop_assert!(matches!(s.kek(&root, c.name(), other, &key_id), Err(StoreError::Unwrap { .. })), "not refused as expected");
        let mut bad = good.clone();
        bad[at.index(good.len())] ^= 1 << bit;
        s.db.put(kek_key(c.name(), version), &bad).unwrap();
        prop_assert!(matches!(s.kek(&root, c.name(), version, &key_id), Err(StoreError::Unwrap { .. })), "not refused as expected");
        s.db.put(kek_key(c.name(), version), &good[..cut.index(good.len())]).unwrap();
        prop_assert!(matches!(s.kek(&root, c.name(), version, &key_id), Err(StoreError::Unwrap { .. })), "not refused as expected");
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// The sealed root and the wrapped private keys as `init` writes them.
    #[test]
    fn init_records_round_trip_and_refuse_damage(
        sealed in proptest::collection::vec(any::<u8>(), 0..100),
        ca_key in proptest::collection::vec(any::<u8>(), 1..100),
        server_key in proptest::collection::vec(any::<u8>(), 1..100),
        which in prop_oneof![Just(CA_KEY), Just(SERVER_KEY)],
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let guard = store();
        let s = &guard.1;
        clear(s);
        let root = Key256::from_bytes(&[3; 32]);
        let blob = SealedBlob { backend: "soft".into(), bytes: sealed };
        s.put_init(&blob, &root, b"ca", &PrivateKey::from_der(ca_key.clone()), b"srv", &PrivateKey::from_der(server_key.clone())).unwrap();
        prop_assert_eq!(s.sealed_root().unwrap(), blob);
        let (ca, k1, srv, k2) = s.identity(&root).unwrap();
        prop_assert_eq!((ca, k1.der().to_vec(), srv, k2.der().to_vec()), (b"ca".to_vec(), ca_key, b"srv".to_vec(), server_key));
        prop_assert!(s.identity(&Key256::from_bytes(&[4; 32])).is_err());

        let good = s.db.get(which).unwrap().unwrap();
        let mut bad = good.clone();
        bad[at.index(good.len())] ^= 1 << bit;
        s.db.put(which, &bad).unwrap();
        prop_assert!(matches!(s.identity(&root), Err(StoreError::Unwrap { .. })), "not refused as expected");
        // The CA key in the server key's slot (or the reverse): refused.
        let other = if which == CA_KEY { SERVER_KEY } else { CA_KEY };
        s.db.put(which, s.db.get(other).unwrap().unwrap()).unwrap();
        prop_assert!(matches!(s.identity(&root), Err(StoreError::Unwrap { .. })), "not refused as expected");
    }
}
