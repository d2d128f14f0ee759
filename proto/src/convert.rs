//! The one mapping between edgekms' version states and the wire's.

use edgekms_core::VersionState;

use crate::fleet::VersionState as Wire;

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
}
