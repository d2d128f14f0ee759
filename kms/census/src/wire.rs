//! A census as the plugin keeps it and reports it to the central service
//! (`edgekms.fleet.v1.Census`): the same counts, flattened.

use std::collections::BTreeMap;

use edgekms_proto::convert::census_count;
use edgekms_proto::fleet as pb;

use crate::Census;

impl Census {
    /// The wire form.
    pub fn to_wire(&self) -> pb::Census {
        let nested = |m: &BTreeMap<String, BTreeMap<String, u64>>| {
            m.iter()
                .flat_map(|(k, per)| per.iter().map(move |(r, n)| census_count(k, r, *n)))
                .collect()
        };
        let flat =
            |m: &BTreeMap<String, u64>| m.iter().map(|(r, n)| census_count("", r, *n)).collect();
        pb::Census {
            taken_unix: self.taken_unix,
            revision: self.revision,
            provider: self.provider.clone(),
            prefix: self.prefix.clone(),
            scanned: self.scanned,
            under: nested(&self.under),
            identity: flat(&self.identity),
            other: nested(&self.other),
            unreadable: flat(&self.unreadable),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_wire_form_keeps_every_count() {
        let c = Census {
            taken_unix: 7,
            revision: 9,
            provider: "edgekms".into(),
            prefix: "/registry/".into(),
            scanned: 6,
            under: [("k1".into(), [("secrets".into(), 3)].into())].into(),
            identity: [("configmaps".into(), 1)].into(),
            other: [("aescbc:v1:a".into(), [("secrets".into(), 1)].into())].into(),
            unreadable: [("secrets".into(), 1)].into(),
        };
        let w = c.to_wire();
        assert_eq!(w.under, vec![census_count("k1", "secrets", 3)]);
        assert_eq!(w.identity, vec![census_count("", "configmaps", 1)]);
        assert_eq!(w.other, vec![census_count("aescbc:v1:a", "secrets", 1)]);
        assert_eq!(w.unreadable, vec![census_count("", "secrets", 1)]);
        let counts = edgekms_proto::convert::census_counts(&w).unwrap();
        assert_eq!(counts.taken_unix, 7);
        assert_eq!(counts.resources_under("k1"), [("secrets".to_owned(), 3)]);
    }
}
