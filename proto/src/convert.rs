//! The one mapping between edgekms' version states and the wire's.

use edgekms_core::rotation::node::Retire;
use edgekms_core::VersionState;

use crate::fleet::{ClusterState, VersionState as Wire};

/// The state a node is told to hold a version in. Only the states a node
/// holds exist on the wire; the central service never sends the others
/// (it sends them as retired numbers instead).
pub fn wire_state(state: VersionState) -> Option<Wire> {
    match state {
        VersionState::Pending => Some(Wire::Pending),
        VersionState::Primary => Some(Wire::Primary),
        VersionState::DecryptOnly => Some(Wire::DecryptOnly),
        VersionState::Retiring | VersionState::Retired => None,
    }
}

/// A received state; `None` for an unspecified one.
pub fn version_state(wire: Wire) -> Option<VersionState> {
    match wire {
        Wire::Pending => Some(VersionState::Pending),
        Wire::Primary => Some(VersionState::Primary),
        Wire::DecryptOnly => Some(VersionState::DecryptOnly),
        Wire::Unspecified => None,
    }
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
}
