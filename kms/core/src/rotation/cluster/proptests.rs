//! Property tests for the [`Cluster`] record as the central store and the
//! backup keep it (JSON): arbitrary bytes return an error or a cluster,
//! never a panic; every cluster round-trips; every truncation is refused.
//! The JSON itself is not authenticated: a flipped byte gives an error or
//! a valid cluster (possibly a different one, or the same one when it hits
//! the name of a null optional field); the store's checksummed record
//! copies and the backup's AES-GCM are what catch damage.

use proptest::prelude::*;

use super::*;
#[cfg(test)]
use edgekms_testkit::proptest_policy::config;
use edgekms_testkit::proptest_policy::name;

/// Any version state.
pub fn version_state() -> impl Strategy<Value = VersionState> {
    prop_oneof![
        Just(VersionState::Pending),
        Just(VersionState::Primary),
        Just(VersionState::DecryptOnly),
        Just(VersionState::Disabled),
        Just(VersionState::Retiring),
        Just(VersionState::Retired),
    ]
}

fn node_record() -> impl Strategy<Value = NodeRecord> {
    (
        prop_oneof![
            Just(NodeState::Invited),
            Just(NodeState::Active),
            Just(NodeState::Revoked)
        ],
        proptest::option::of(
            ("\\PC{0,12}", "[0-9a-f]{64}", any::<u64>(), any::<bool>()).prop_map(
                |(id, secret_sha256, expires_unix, used)| TokenRecord {
                    id,
                    secret_sha256,
                    expires_unix,
                    used,
                },
            ),
        ),
        "[0-9a-f]{0,64}",
        "[0-9a-f]{0,130}",
        proptest::collection::btree_set(any::<u32>(), 0..4),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(state, token, cert_sha256, delivery_public_key, held, (a, p, l, j))| NodeRecord {
                state,
                token,
                cert_sha256,
                delivery_public_key,
                unmatched: held
                    .iter()
                    .map(|&v| {
                        let state = VersionState::DecryptOnly;
                        (
                            v,
                            Held {
                                key_id: format!("c/v{v}/0011"),
                                state,
                            },
                        )
                    })
                    .collect(),
                destroyed: held.iter().map(|&v| (v, format!("c/v{v}/dead"))).collect(),
                excused: a % 2 == 0,
                writes_key_id: if a % 3 == 0 {
                    format!("c/v{p}/00")
                } else {
                    String::new()
                },
                writes_since_unix: l,
                held,
                applied_seq: a,
                primary: p,
                last_contact_unix: l,
                joined_unix: j,
            },
        )
}

/// Any cluster record, its versions' key_ids arbitrary text.
pub fn cluster() -> impl Strategy<Value = Cluster> {
    cluster_with(
        proptest::collection::btree_map(
            any::<u32>(),
            (version_state(), "\\PC{0,40}", any::<u64>(), any::<u64>()).prop_map(
                |(state, key_id, created_unix, changed_unix)| VersionMeta {
                    changed_unix,
                    destroy_after_unix: (state == VersionState::Disabled).then_some(changed_unix),
                    ..VersionMeta::new(state, key_id, created_unix)
                },
            ),
            0..5,
        )
        .boxed(),
    )
}

/// A cluster record with the given versions and arbitrary everything else.
pub fn cluster_with(
    versions: BoxedStrategy<BTreeMap<u32, VersionMeta>>,
) -> impl Strategy<Value = Cluster> {
    (
        name(),
        any::<u64>(),
        any::<u32>(),
        versions,
        proptest::collection::btree_map(name(), node_record(), 0..3),
        any::<u64>(),
        proptest::option::of((
            "\\PC{0,20}",
            any::<u64>(),
            proptest::collection::btree_set(name(), 0..3),
        )),
    )
        .prop_map(
            |(name, seq, next_version, versions, nodes, created_unix, reconciling)| Cluster {
                name,
                seq,
                next_version,
                versions,
                nodes,
                created_unix,
                census: reconciling
                    .as_ref()
                    .map(|(reason, since_unix, _)| CensusRecord {
                        node: reason.clone(),
                        counts: CensusCounts {
                            taken_unix: *since_unix,
                            under: [(reason.clone(), [("secrets".to_owned(), seq)].into())].into(),
                        },
                    }),
                reconciling: reconciling.map(|(reason, since_unix, reported)| Reconciling {
                    reason,
                    since_unix,
                    reported,
                }),
            },
        )
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "\\PC{0,300}".prop_map(String::into_bytes),
        ],
    ) {
        let _ = serde_json::from_slice::<Cluster>(&raw);
    }

    #[test]
    fn round_trip_and_damage(
        c in cluster(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let json = serde_json::to_vec(&c).unwrap();
        prop_assert_eq!(&serde_json::from_slice::<Cluster>(&json).unwrap(), &c);
        let mut bad = json.clone();
        bad[at.index(json.len())] = byte;
        let _ = serde_json::from_slice::<Cluster>(&bad);
        prop_assert!(serde_json::from_slice::<Cluster>(&json[..cut.index(json.len())]).is_err());
    }
}
