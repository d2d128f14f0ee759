//! Property tests for [`validate_name`], which every cluster and node name
//! from a request or a flag goes through: any text is accepted or refused
//! without a panic, exactly by the DNS-1123 label rule; every key_id
//! derived from a valid name has the documented shape and fits
//! kube-apiserver's limit.

use proptest::prelude::*;

use super::*;
use crate::proptests::{config, name};

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_CLUSTER_NAME
        && b.iter()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn any_text_is_judged_by_the_label_rule(
        text in prop_oneof!["\\PC{0,80}", "[a-z0-9-]{0,70}", name()],
    ) {
        prop_assert_eq!(validate_name(&text).is_ok(), is_label(&text));
    }

    #[test]
    fn key_ids_have_the_documented_shape(cluster in name(), version in any::<u32>(), key in any::<[u8; 32]>()) {
        let id = derive(&cluster, version, &Key256::from_bytes(&key));
        prop_assert!(id.len() < MAX_KEY_ID);
        let (rest, fp) = id.rsplit_once('/').unwrap();
        prop_assert_eq!(rest, format!("{cluster}/v{version}"));
        prop_assert!(fp.len() == 16 && fp.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
