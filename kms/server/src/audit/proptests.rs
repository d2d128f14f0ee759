//! Property tests for the stored audit record (JSON, read back by
//! `kmsctl audit` and by the backup): arbitrary bytes return an error or a
//! record, never a panic; every record round-trips, control characters and
//! all; every truncation is refused. Not authenticated (see the store).

use proptest::prelude::*;

use super::*;
use edgekms_testkit::proptest_policy::config;

fn record() -> impl Strategy<Value = AuditRecord> {
    (
        any::<u64>(),
        ("\\PC{0,12}", ".{0,20}", "\\PC{0,12}", "\\PC{0,12}"),
        (any::<u32>(), any::<u64>()),
        (".{0,20}", ".{0,30}"),
    )
        .prop_map(
            |(time_ms, (event, actor, cluster, node), (version, count), (result, detail))| {
                AuditRecord {
                    time_ms,
                    event,
                    actor,
                    cluster,
                    node,
                    version,
                    result,
                    detail,
                    count,
                }
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
        let _ = serde_json::from_slice::<AuditRecord>(&raw);
    }

    #[test]
    fn round_trip_and_truncation(rec in record(), cut in any::<prop::sample::Index>()) {
        let json = rec.to_json();
        prop_assert_eq!(&serde_json::from_slice::<AuditRecord>(&json).unwrap(), &rec);
        prop_assert!(serde_json::from_slice::<AuditRecord>(&json[..cut.index(json.len())]).is_err());
    }
}
