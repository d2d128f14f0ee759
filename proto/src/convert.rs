//! The one mapping between the protocol's types and the wire's: version
//! states, retire orders, and a node's report in both directions.

use std::collections::BTreeMap;

use edgekms_core::keyid;
use edgekms_core::rotation::cluster::{Held, Report};
use edgekms_core::rotation::node::{Received, Retire};
use edgekms_core::rotation::retire::CensusCounts;
use edgekms_core::VersionState;

use crate::fleet::{
    Census, CensusCount, ClusterState, HeldVersion, KeyRef, NodeReport, ReturnedKey,
    VersionState as Wire,
};

/// The state a node is told to hold a version in. Only the states a node
/// holds exist on the wire; the central service never sends the others
/// (it sends them as retired numbers instead).
pub fn wire_state(state: VersionState) -> Option<Wire> {
    match state {
        VersionState::Pending => Some(Wire::Pending),
        VersionState::Primary => Some(Wire::Primary),
        VersionState::DecryptOnly => Some(Wire::DecryptOnly),
        VersionState::Disabled => Some(Wire::Disabled),
        VersionState::Retiring | VersionState::Retired => None,
    }
}

/// A received state; `None` for an unspecified one.
pub fn version_state(wire: Wire) -> Option<VersionState> {
    match wire {
        Wire::Pending => Some(VersionState::Pending),
        Wire::Primary => Some(VersionState::Primary),
        Wire::DecryptOnly => Some(VersionState::DecryptOnly),
        Wire::Disabled => Some(VersionState::Disabled),
        Wire::Unspecified => None,
    }
}

/// A version sent without a state a node can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("central service sent version {0} without a state")]
pub struct NoState(pub u32);

/// The versions a state tells a node to hold, as its converge rules take
/// them ([`edgekms_core::rotation::node::converge`]).
pub fn received(state: &ClusterState) -> Result<Vec<Received<'_>>, NoState> {
    state
        .versions
        .iter()
        .map(|entry| {
            Ok(Received {
                version: entry.version,
                state: version_state(entry.state()).ok_or(NoState(entry.version))?,
                key_id: &entry.key_id,
                wrapped_key: &entry.wrapped_key,
                destroy_after_unix: (entry.destroy_after_unix != 0)
                    .then_some(entry.destroy_after_unix),
            })
        })
        .collect()
}

/// The versions a state retires, named by key_id (`retired_keys`); by
/// number alone only from a service that sends no `retired_keys` (older
/// than key_ids on retires), never mixing the two.
pub fn retire_orders(state: &ClusterState) -> Vec<Retire<'_>> {
    if state.retired_keys.is_empty() {
        state
            .retired
            .iter()
            .map(|&version| Retire {
                version,
                key_id: None,
            })
            .collect()
    } else {
        state
            .retired_keys
            .iter()
            .map(|k| Retire {
                version: k.version,
                key_id: Some(&k.key_id),
            })
            .collect()
    }
}

/// A node's report on the wire: every version by number (for services
/// older than key_ids) and by key_id with its state, its tombstones, the
/// keys it returns to a reconciling service, what its apiserver writes
/// under and its newest census (sent whole: `census` is the wire's).
pub fn node_report(r: &Report, returned: Vec<ReturnedKey>, census: Option<Census>) -> NodeReport {
    NodeReport {
        writes_key_id: r.writes_key_id.clone(),
        writes_since_unix: r.writes_since_unix,
        census,
        held: r.held.keys().copied().collect(),
        applied_seq: r.applied_seq,
        primary: r.primary,
        versions: r
            .held
            .iter()
            .map(|(&version, h)| HeldVersion {
                version,
                key_id: h.key_id.clone(),
                // A held version is pending, primary, decrypt-only or
                // disabled, all of which exist on the wire.
                state: wire_state(h.state).unwrap_or(Wire::Unspecified) as i32,
            })
            .collect(),
        destroyed: r
            .destroyed
            .iter()
            .map(|(&version, key_id)| KeyRef {
                version,
                key_id: key_id.clone(),
            })
            .collect(),
        returned,
    }
}

/// A report refused as the central service reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("version {0} reported without a state")]
    NoState(u32),
    #[error(
        "version {version} reported with a key_id {preview} that is not one of cluster {cluster}'s"
    )]
    ForeignKeyId {
        version: u32,
        /// Escaped and cut short: it comes from the node.
        preview: String,
        cluster: String,
    },
    #[error("version {0} reported twice")]
    Twice(u32),
    #[error("the report's {what} is too large ({len} > {max})")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

/// The most (key_id, resource) counts a census on the wire may carry: a
/// cluster has few key_ids and resources, so more is not a census.
pub const MAX_CENSUS_COUNTS: usize = 4096;

/// What the retire rule reads of a census: when it was taken and the
/// objects per key_id and resource. Bounded: it comes from a node.
pub fn census_counts(c: &Census) -> Result<CensusCounts, ReportError> {
    if c.under.len() > MAX_CENSUS_COUNTS {
        return Err(ReportError::TooLarge {
            what: "census",
            len: c.under.len(),
            max: MAX_CENSUS_COUNTS,
        });
    }
    let mut counts = CensusCounts {
        taken_unix: c.taken_unix,
        ..CensusCounts::default()
    };
    for n in &c.under {
        for (what, text) in [
            ("census key_id", &n.key_id),
            ("census resource", &n.resource),
        ] {
            if text.len() > keyid::MAX_KEY_ID {
                return Err(ReportError::TooLarge {
                    what,
                    len: text.len(),
                    max: keyid::MAX_KEY_ID,
                });
            }
        }
        let slot = counts
            .under
            .entry(n.key_id.clone())
            .or_default()
            .entry(n.resource.clone())
            .or_default();
        *slot = slot.saturating_add(n.objects);
    }
    Ok(counts)
}

/// One count of a census, for building one on the wire.
pub fn census_count(key_id: &str, resource: &str, objects: u64) -> CensusCount {
    CensusCount {
        key_id: key_id.to_owned(),
        resource: resource.to_owned(),
        objects,
    }
}

/// A node of `cluster`'s report as the protocol reads it. A report without
/// key_ids comes from a plugin older than them: its numbers are taken as
/// they are ([`Report::legacy`]). Every key_id must be one of `cluster`'s
/// for its version.
pub fn report(cluster: &str, r: &NodeReport) -> Result<Report, ReportError> {
    if r.versions.is_empty() && r.destroyed.is_empty() {
        let held = r.held.iter().copied().collect();
        return Ok(Report::legacy(held, r.applied_seq, r.primary));
    }
    let check = |version: u32, key_id: &str| {
        if keyid::is_for(key_id, cluster, version) {
            Ok(())
        } else {
            Err(ReportError::ForeignKeyId {
                version,
                preview: keyid::preview(key_id, 80),
                cluster: cluster.to_owned(),
            })
        }
    };
    let mut held = BTreeMap::new();
    for v in &r.versions {
        let state = version_state(v.state()).ok_or(ReportError::NoState(v.version))?;
        check(v.version, &v.key_id)?;
        let key_id = v.key_id.clone();
        if held.insert(v.version, Held { key_id, state }).is_some() {
            return Err(ReportError::Twice(v.version));
        }
    }
    let mut destroyed = BTreeMap::new();
    for d in &r.destroyed {
        check(d.version, &d.key_id)?;
        destroyed.insert(d.version, d.key_id.clone());
    }
    if r.writes_key_id.len() > keyid::MAX_KEY_ID {
        return Err(ReportError::TooLarge {
            what: "writes_key_id",
            len: r.writes_key_id.len(),
            max: keyid::MAX_KEY_ID,
        });
    }
    Ok(Report {
        held,
        destroyed,
        applied_seq: r.applied_seq,
        primary: r.primary,
        writes_key_id: r.writes_key_id.clone(),
        writes_since_unix: r.writes_since_unix,
        census: r.census.as_ref().map(census_counts).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_state_round_trips_and_no_other_reaches_the_wire() {
        for state in VersionState::ALL {
            match wire_state(state) {
                Some(wire) => assert_eq!(version_state(wire), Some(state)),
                None => assert!(!state.held_by_nodes(), "{state}"),
            }
        }
        assert_eq!(version_state(Wire::Unspecified), None);
    }

    #[test]
    fn retires_go_by_key_id_and_by_number_only_from_an_older_service() {
        use crate::fleet::KeyRef;
        let old = ClusterState {
            retired: vec![1, 2],
            ..Default::default()
        };
        assert_eq!(
            retire_orders(&old),
            [1, 2].map(|version| Retire {
                version,
                key_id: None
            })
        );
        let new = ClusterState {
            retired: vec![1, 2],
            retired_keys: vec![KeyRef {
                version: 1,
                key_id: "c/v1/ab".into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            retire_orders(&new),
            [Retire {
                version: 1,
                key_id: Some("c/v1/ab")
            }]
        );
    }

    fn held(version: u32, key_id: &str, state: Wire) -> HeldVersion {
        HeldVersion {
            version,
            key_id: key_id.into(),
            state: state as i32,
        }
    }

    const V1: &str = "c/v1/0123456789abcdef";
    const V2: &str = "c/v2/fedcba9876543210";

    #[test]
    fn a_report_round_trips_and_garbage_is_refused_naming_it() {
        let wire = NodeReport {
            held: vec![2],
            applied_seq: 5,
            primary: 2,
            versions: vec![held(2, V2, Wire::Primary)],
            destroyed: vec![KeyRef {
                version: 1,
                key_id: V1.into(),
            }],
            returned: vec![],
            writes_key_id: V2.into(),
            writes_since_unix: 40,
            census: Some(Census {
                taken_unix: 50,
                under: vec![
                    census_count(V1, "secrets", 3),
                    census_count(V2, "secrets", 4),
                ],
                ..Census::default()
            }),
        };
        let r = report("c", &wire).unwrap();
        assert_eq!(r.held[&2].key_id, V2);
        assert_eq!(r.held[&2].state, VersionState::Primary);
        assert_eq!(r.destroyed[&1], V1);
        assert_eq!((r.applied_seq, r.primary), (5, 2));
        assert_eq!((r.writes_key_id.as_str(), r.writes_since_unix), (V2, 40));
        let census = r.census.clone().unwrap();
        assert_eq!(census.taken_unix, 50);
        assert_eq!(census.resources_under(V1), [("secrets".to_owned(), 3)]);
        assert_eq!(node_report(&r, vec![], wire.census.clone()), wire);

        // A census too large for any cluster, a huge writes_key_id: refused.
        let mut huge = wire.clone();
        huge.census.as_mut().unwrap().under =
            vec![census_count(V1, "secrets", 1); MAX_CENSUS_COUNTS + 1];
        assert!(matches!(
            report("c", &huge),
            Err(ReportError::TooLarge { .. })
        ));
        let mut huge = wire.clone();
        huge.writes_key_id = "x".repeat(keyid::MAX_KEY_ID + 1);
        assert!(matches!(
            report("c", &huge),
            Err(ReportError::TooLarge { .. })
        ));

        // Another cluster's key_id, another version's, a huge one, no
        // state, the same version twice: refused, naming what is wrong.
        let bad = [
            held(2, &V2.replacen("c/", "d/", 1), Wire::Primary),
            held(3, V2, Wire::Primary),
            held(2, &"x".repeat(1 << 20), Wire::Primary),
            held(2, V2, Wire::Unspecified),
        ];
        for v in bad {
            let mut w = wire.clone();
            w.versions = vec![v];
            let e = report("c", &w).unwrap_err();
            assert!(e.to_string().len() < 300, "{e}");
        }
        let mut twice = wire.clone();
        twice.versions.push(held(2, V2, Wire::Primary));
        assert_eq!(report("c", &twice), Err(ReportError::Twice(2)));
    }

    #[test]
    fn a_report_without_key_ids_is_taken_by_number() {
        let wire = NodeReport {
            held: vec![1, 2],
            applied_seq: 3,
            primary: 2,
            ..Default::default()
        };
        let r = report("c", &wire).unwrap();
        assert_eq!(r, Report::legacy([1, 2].into(), 3, 2));
        assert!(r.held.values().all(|h| h.key_id.is_empty()));
    }
}
