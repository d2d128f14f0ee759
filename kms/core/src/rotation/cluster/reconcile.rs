//! Reconciliation: how a cluster's record and its nodes agree again after
//! they diverged, because the service was restored from an older backup or
//! a node holds versions the service does not know (or knows under another
//! key_id). The service knows versions by key_id, never by number alone.
//!
//! While a cluster reconciles, nothing is rotated, promoted or retired
//! (by an operator or automatically), and nodes are sent nothing to apply:
//! only requests to return the versions the service lacks, wrapped to the
//! service's delivery key (the fleet heals the center). A returned version
//! is taken only when every node that reports it agrees on its key_id (the
//! server checks the key against the key_id before it gets here).
//!
//! It ends once every active node has reported since it started, nothing
//! is still wanted and no node clashes; or when the operator names the
//! nodes to go on without ([`Cluster::end_reconcile`]). At the end the
//! record takes the furthest state its nodes reached:
//! - the primary is the newest version any node serves as its primary, and
//!   never older than the service's own: a restore never rolls keys back;
//! - a version some node destroyed is retired: destroyed stays destroyed;
//! - version numbers continue past every version any node holds or
//!   destroyed ([`Cluster::report`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Cluster, Event, FleetError, VersionMeta};
use crate::rotation::VersionState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciling {
    /// Why it started, in plain words.
    pub reason: String,
    pub since_unix: u64,
    /// Active nodes that have reported since it started.
    pub reported: BTreeSet<String>,
}

/// Two keys under one version number: what the service knows the version
/// as, and what a node holds (or destroyed) under it. `service_key_id` is
/// empty when the service lacks the version and its nodes disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clash {
    pub node: String,
    pub version: u32,
    pub service_key_id: String,
    pub node_key_id: String,
}

impl Cluster {
    pub fn reconciling(&self) -> Option<&Reconciling> {
        self.reconciling.as_ref()
    }

    /// Starts reconciling (a restore does this for every cluster); `seq`
    /// moves so that every node stream hears of it at once. A cluster with
    /// no active node has nobody to wait for and ends it at once.
    pub fn start_reconciling(&mut self, reason: &str, now: u64) -> Vec<Event> {
        if self.reconciling.is_some() {
            return Vec::new();
        }
        self.reconciling = Some(Reconciling {
            reason: reason.to_owned(),
            since_unix: now,
            reported: BTreeSet::new(),
        });
        self.seq += 1;
        let mut events = vec![Event::ReconcileStarted {
            reason: reason.to_owned(),
        }];
        events.extend(self.settle(now));
        events
    }

    pub(super) fn refuse_while_reconciling(&self) -> Result<(), FleetError> {
        match &self.reconciling {
            None => Ok(()),
            Some(r) => {
                let waiting = self.reconcile_waiting();
                Err(FleetError::Reconciling {
                    cluster: self.name.clone(),
                    reason: r.reason.clone(),
                    waiting: if waiting.is_empty() {
                        "nothing (it ends with the next report)".into()
                    } else {
                        waiting.join(", ")
                    },
                })
            }
        }
    }

    /// Every clash of an active node.
    pub fn clashes(&self) -> Vec<Clash> {
        self.active()
            .flat_map(|(name, _)| self.clashes_of(name))
            .collect()
    }

    /// What `node` holds or destroyed under another key_id than this
    /// service's, versions the service lacks on which it disagrees with
    /// another active node or that lie beyond the numbers a report may
    /// move it to (`MAX_VERSION_SKIP`). None of these can be settled by
    /// taking a key back: each needs an operator.
    pub fn clashes_of(&self, node: &str) -> Vec<Clash> {
        let Some(rec) = self.nodes.get(node) else {
            return Vec::new();
        };
        let clash = |version: u32, service_key_id: &str, node_key_id: &str| Clash {
            node: node.to_owned(),
            version,
            service_key_id: service_key_id.to_owned(),
            node_key_id: node_key_id.to_owned(),
        };
        let mut out = Vec::new();
        for (&v, held) in &rec.unmatched {
            if held.key_id.is_empty() {
                continue;
            }
            match self.versions.get(&v) {
                Some(m) if m.key_id != held.key_id => out.push(clash(v, &m.key_id, &held.key_id)),
                Some(_) => {}
                None => {
                    let disagree = self.active().any(|(other, o)| {
                        other != node
                            && o.unmatched
                                .get(&v)
                                .is_some_and(|h| !h.key_id.is_empty() && h.key_id != held.key_id)
                    });
                    // Numbers a report could not move `next_version` past:
                    // taking such a key would let one node use up the rest.
                    if disagree || v >= self.next_version {
                        out.push(clash(v, "", &held.key_id));
                    }
                }
            }
        }
        for (&v, key_id) in &rec.destroyed {
            if let Some(m) = self.versions.get(&v) {
                if &m.key_id != key_id {
                    out.push(clash(v, &m.key_id, key_id));
                }
            }
        }
        out
    }

    /// Versions the active nodes (those not left out) hold and the service
    /// lacks, on whose key_id they all agree: to be returned.
    pub fn wanted(&self) -> BTreeMap<u32, String> {
        let mut seen: BTreeMap<u32, Option<String>> = BTreeMap::new();
        for (_, rec) in self.counted() {
            for (&v, held) in &rec.unmatched {
                if held.key_id.is_empty() || self.versions.contains_key(&v) {
                    continue;
                }
                if v >= self.next_version {
                    continue;
                }
                let entry = seen.entry(v).or_insert_with(|| Some(held.key_id.clone()));
                if entry.as_deref() != Some(held.key_id.as_str()) {
                    *entry = None;
                }
            }
        }
        seen.into_iter()
            .filter_map(|(v, k)| k.map(|k| (v, k)))
            .collect()
    }

    /// What [`Cluster::wanted`] asks of `node`: versions it reported.
    pub fn wanted_from(&self, node: &str) -> Vec<(u32, String)> {
        // Every sync stream asks this on every change: a node that holds
        // nothing the service lacks (the normal case) costs no scan.
        let Some(rec) = self
            .nodes
            .get(node)
            .filter(|n| !n.excused && !n.unmatched.is_empty())
        else {
            return Vec::new();
        };
        self.wanted()
            .into_iter()
            .filter(|(v, k)| rec.unmatched.get(v).is_some_and(|h| &h.key_id == k))
            .collect()
    }

    /// The nodes the reconciliation waits for: active nodes not left out
    /// that have not reported since it started, clash, or hold a version
    /// the service still wants back.
    pub fn reconcile_waiting(&self) -> Vec<String> {
        let Some(r) = &self.reconciling else {
            return Vec::new();
        };
        let wanted = self.wanted();
        self.counted()
            .filter(|(name, rec)| {
                !r.reported.contains(*name)
                    || !self.clashes_of(name).is_empty()
                    || rec.unmatched.keys().any(|v| wanted.contains_key(v))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Active nodes not left out of a reconciliation.
    fn counted(&self) -> impl Iterator<Item = (&String, &super::NodeRecord)> {
        self.active().filter(|(_, n)| !n.excused)
    }

    /// Whether `node`'s report disagrees with this record in a way only a
    /// reconciliation settles. In normal operation none of these happen:
    /// versions are never forgotten, a node destroys only what the service
    /// retired, and a node promotes only what the service promoted first.
    fn diverges(&self, node: &str) -> bool {
        let Some(rec) = self.nodes.get(node) else {
            return false;
        };
        let service_primary = self.primary().map_or(0, |(v, _)| v);
        rec.unmatched
            .iter()
            .any(|(v, h)| !h.key_id.is_empty() && !self.versions.contains_key(v))
            || !self.clashes_of(node).is_empty()
            || rec.primary > service_primary
            // Not the primary: after a restore a node may have destroyed
            // the backup's primary, which the reconciliation demotes and
            // then retires; once it has ended, a node that destroyed the
            // primary is broken and refuses it (its own metrics say so).
            || rec.destroyed.iter().any(|(v, key_id)| {
                self.versions.get(v).is_some_and(|m| {
                    &m.key_id == key_id
                        && m.state.held_by_nodes()
                        && m.state != VersionState::Primary
                })
            })
    }

    /// After `node`'s report is recorded: starts a reconciliation if it
    /// diverges, notes it as reported, and moves on as far as allowed.
    pub(super) fn after_report(&mut self, node: &str, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let clashing = !self.clashes_of(node).is_empty();
        let diverges = self.diverges(node);
        // A node left out stays out while it clashes; once it agrees (or
        // only holds what can be returned) it counts again.
        let excused = match self.nodes.get_mut(node) {
            Some(rec) => {
                rec.excused = rec.excused && clashing;
                rec.excused
            }
            None => return events,
        };
        if !excused && diverges && self.reconciling.is_none() {
            let reason = format!(
                "node {node} reports versions this service does not know, knows under other key_ids, or retired"
            );
            events.extend(self.start_reconciling(&reason, now));
        }
        if let Some(r) = self.reconciling.as_mut() {
            if !excused {
                r.reported.insert(node.to_owned());
            }
        }
        events.extend(self.settle(now));
        events
    }

    /// Ends the reconciliation if nothing holds it up; outside one, moves
    /// the rotation forward.
    pub(super) fn settle(&mut self, now: u64) -> Vec<Event> {
        if self.reconciling.is_none() {
            return self.advance(now);
        }
        if self.reconcile_waiting().is_empty() {
            return self.finish(Vec::new(), now);
        }
        Vec::new()
    }

    /// Takes back `version` (`key_id`), which `node` returned and the
    /// server checked against the key_id. Refused unless the service wants
    /// exactly that version from that node.
    pub fn adopt_returned(
        &mut self,
        node: &str,
        version: u32,
        key_id: &str,
        now: u64,
    ) -> Result<Vec<Event>, FleetError> {
        if self.reconciling.is_none() {
            return Err(FleetError::NotReconciling(self.name.clone()));
        }
        let wanted = self.wanted_from(node);
        if !wanted.iter().any(|(v, k)| *v == version && k == key_id) {
            return Err(FleetError::NotWanted {
                cluster: self.name.clone(),
                node: node.to_owned(),
                version,
                key_id: key_id.to_owned(),
            });
        }
        // Its state is settled when the reconciliation ends.
        self.versions.insert(
            version,
            VersionMeta::new(VersionState::DecryptOnly, key_id.to_owned(), now),
        );
        for rec in self.nodes.values_mut() {
            if rec
                .unmatched
                .get(&version)
                .is_some_and(|h| h.key_id == key_id)
            {
                rec.unmatched.remove(&version);
                rec.held.insert(version);
            }
        }
        self.seq += 1;
        let mut events = vec![Event::Healed {
            node: node.to_owned(),
            version,
        }];
        events.extend(self.settle(now));
        Ok(events)
    }

    /// Ends the reconciliation without the nodes that hold it up, which
    /// the operator must name exactly: they are left out (not counted for
    /// promotion) until they agree with the service again.
    pub fn end_reconcile(
        &mut self,
        without: &[String],
        now: u64,
    ) -> Result<Vec<Event>, FleetError> {
        if self.reconciling.is_none() {
            return Err(FleetError::NotReconciling(self.name.clone()));
        }
        let expected: BTreeSet<String> = self.reconcile_waiting().into_iter().collect();
        let given: BTreeSet<String> = without.iter().cloned().collect();
        if expected != given {
            let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
            return Err(FleetError::WrongExcuse {
                cluster: self.name.clone(),
                expected: list(&expected),
                given: list(&given),
            });
        }
        for name in &expected {
            if let Some(rec) = self.nodes.get_mut(name) {
                rec.excused = true;
            }
        }
        Ok(self.finish(expected.into_iter().collect(), now))
    }

    /// Takes the furthest state the counted nodes reached (module doc).
    fn finish(&mut self, without: Vec<String>, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let service_primary = self.primary().map(|(v, _)| v);
        let mut reported_primary = None;
        let mut reported_pending = BTreeSet::new();
        let mut tombstones: Vec<(String, u32, String)> = Vec::new();
        let live = |v: &u32| {
            self.versions
                .get(v)
                .is_some_and(|m| m.state.held_by_nodes())
        };
        for (name, rec) in self.counted() {
            // `held` is what agrees with this record. A node's versions
            // newer than its primary can only be pending on it.
            if rec.held.contains(&rec.primary) && live(&rec.primary) {
                reported_primary = reported_primary.max(Some(rec.primary));
            }
            reported_pending.extend(rec.held.iter().filter(|v| **v > rec.primary && live(v)));
            for (&v, key_id) in &rec.destroyed {
                tombstones.push((name.clone(), v, key_id.clone()));
            }
        }
        let primary = service_primary.max(reported_primary);
        if let Some(p) = primary.filter(|p| Some(*p) != service_primary) {
            for (&v, meta) in self.versions.iter_mut() {
                let state = if v == p {
                    VersionState::Primary
                } else if meta.state == VersionState::Primary
                    || (meta.state == VersionState::Pending && v < p)
                {
                    // Superseded: a rotation the nodes completed.
                    VersionState::DecryptOnly
                } else {
                    continue;
                };
                meta.state = state;
                meta.changed_unix = now;
            }
        }
        // A rotation that was in flight (its version returned by nodes
        // that hold it as pending) goes on.
        let p = primary.unwrap_or(0);
        if self.pending().is_none() {
            if let Some(&v) = reported_pending.iter().rev().find(|v| **v > p) {
                if let Some(meta) = self.versions.get_mut(&v) {
                    if meta.state == VersionState::DecryptOnly {
                        meta.state = VersionState::Pending;
                        meta.changed_unix = now;
                    }
                }
            }
        }
        for (node, v, key_id) in tombstones {
            match self.versions.get_mut(&v) {
                Some(meta) if meta.key_id == key_id && meta.state.held_by_nodes() && v != p => {
                    meta.state = VersionState::Retiring;
                    meta.changed_unix = now;
                    events.push(Event::LearnedDestroyed { node, version: v });
                }
                Some(_) => {}
                None => {
                    self.versions
                        .insert(v, VersionMeta::new(VersionState::Retired, key_id, now));
                    events.push(Event::LearnedDestroyed { node, version: v });
                }
            }
        }
        if let Some(&top) = self.versions.keys().next_back() {
            self.next_version = self.next_version.max(top.saturating_add(1));
        }
        self.reconciling = None;
        self.seq += 1;
        events.push(Event::Reconciled {
            primary: p,
            without,
        });
        events.extend(self.advance(now));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::super::{token_hash, Held, Report, TokenRecord};
    use super::*;

    const KEY_1: &str = "a/v1/0000000000000001";

    /// Cluster "a" (v1 = [`KEY_1`]) with active nodes n1 and n2.
    fn cluster() -> Cluster {
        let mut c = Cluster::new("a", KEY_1.into(), 100);
        for n in ["n1", "n2"] {
            let token = TokenRecord {
                id: n.into(),
                secret_sha256: token_hash(n),
                expires_unix: 1000,
                used: false,
            };
            c.invite(n, token).unwrap();
            c.join(n, n, 110, format!("cert-{n}"), "pk".into()).unwrap();
        }
        c
    }

    fn report(held: &[(u32, &str, VersionState)], primary: u32) -> Report {
        Report {
            held: held
                .iter()
                .map(|&(v, key_id, state)| {
                    let key_id = key_id.to_owned();
                    (v, Held { key_id, state })
                })
                .collect(),
            destroyed: BTreeMap::new(),
            applied_seq: 1,
            primary,
            ..Report::default()
        }
    }

    #[test]
    fn an_agreeing_report_changes_nothing_and_only_state_moves_are_absorbed() {
        let mut c = cluster();
        let r = report(&[(1, KEY_1, VersionState::Primary)], 1);
        c.report("n1", r.clone(), 120).unwrap();
        assert!(c.reconciling().is_none());
        assert!(c.node("n1").unwrap().unmatched.is_empty());
        assert!(c.note_progress("n1", &r, 130));
        // A legacy report (numbers only) agrees by number.
        c.report("n2", Report::legacy([1].into(), 1, 1), 120)
            .unwrap();
        assert!(c.reconciling().is_none());
        assert_eq!(c.holders(1), ["n1", "n2"]);
    }

    #[test]
    fn a_diverging_report_starts_a_reconciliation_that_the_rest_must_join() {
        for (what, r) in [
            (
                "an unknown version",
                report(
                    &[
                        (1, KEY_1, VersionState::Primary),
                        (3, "a/v3/0000000000000003", VersionState::Pending),
                    ],
                    1,
                ),
            ),
            (
                "another key_id",
                report(&[(1, "a/v1/00000000000000ff", VersionState::Primary)], 1),
            ),
            (
                "a newer primary",
                report(&[(1, KEY_1, VersionState::DecryptOnly)], 3),
            ),
            (
                "a tombstone of a decrypt-only version",
                Report {
                    destroyed: [(1, KEY_1.to_owned())].into(),
                    ..report(&[], 0)
                },
            ),
        ] {
            // v1 decrypt-only, v2 primary (forced: no node holds it).
            let mut c = cluster();
            c.rotate("a/v2/0000000000000002".into(), 110).unwrap();
            c.force_promote(2, 110).unwrap();
            let events = c.report("n1", r, 120).unwrap();
            assert!(
                events
                    .iter()
                    .any(|e| matches!(e, Event::ReconcileStarted { .. })),
                "{what}: {events:?}"
            );
            assert_eq!(
                c.reconcile_waiting().last().map(String::as_str),
                Some("n2"),
                "{what}"
            );
            // Not absorbed while awaited: n2's report goes through.
            assert!(
                !c.note_progress("n2", &Report::legacy([1].into(), 1, 1), 130),
                "{what}"
            );
            assert!(
                matches!(
                    c.rotate("a/v9/x".into(), 130),
                    Err(FleetError::Reconciling { .. })
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn only_a_wanted_version_is_adopted_and_disagreeing_nodes_clash() {
        let mut c = cluster();
        c.start_reconciling("restored", 100);
        let v2 = "a/v2/0000000000000002";
        let other = "a/v2/00000000000000ee";
        c.report(
            "n1",
            report(
                &[
                    (1, KEY_1, VersionState::DecryptOnly),
                    (2, v2, VersionState::Primary),
                ],
                2,
            ),
            120,
        )
        .unwrap();
        assert_eq!(c.wanted(), BTreeMap::from([(2, v2.to_owned())]));
        assert!(matches!(
            c.adopt_returned("n1", 2, other, 130),
            Err(FleetError::NotWanted { .. })
        ));
        assert!(matches!(
            c.adopt_returned("n2", 2, v2, 130),
            Err(FleetError::NotWanted { .. })
        ));
        // n2 holds another v2: the nodes disagree, nothing is wanted, both
        // clash, and the reconciliation waits.
        c.report(
            "n2",
            report(
                &[
                    (1, KEY_1, VersionState::DecryptOnly),
                    (2, other, VersionState::Primary),
                ],
                2,
            ),
            120,
        )
        .unwrap();
        assert!(c.wanted().is_empty());
        assert_eq!(c.clashes().len(), 2);
        assert_eq!(c.reconcile_waiting(), ["n1", "n2"]);
        assert!(c.adopt_returned("n1", 2, v2, 130).is_err());
        // Left out by name, n2 no longer counts: v2 is wanted from n1.
        let events = c.end_reconcile(&["n1".into(), "n2".into()], 140).unwrap();
        assert!(matches!(events.last(), Some(Event::Reconciled { .. })));
        assert!(c.node("n2").unwrap().excused);
        assert_eq!(c.upcoming_version(), 3, "past every version a node holds");
    }

    #[test]
    fn a_cluster_without_active_nodes_has_nothing_to_reconcile() {
        let mut c = Cluster::new("a", KEY_1.into(), 100);
        let events = c.start_reconciling("restored", 100);
        assert!(
            matches!(events.last(), Some(Event::Reconciled { .. })),
            "{events:?}"
        );
        assert!(c.reconciling().is_none());
        assert!(c.rotate("a/v2/0000000000000002".into(), 110).is_ok());
    }

    #[test]
    fn a_node_cannot_use_up_the_version_numbers() {
        let mut c = cluster();
        let far = format!("a/v{}/0000000000000009", u32::MAX - 1);
        c.report(
            "n1",
            report(&[(u32::MAX - 1, &far, VersionState::Primary)], u32::MAX - 1),
            120,
        )
        .unwrap();
        assert!(c.wanted().is_empty(), "never asked back");
        assert_eq!(c.clashes_of("n1").len(), 1);
        assert_eq!(c.upcoming_version(), 2);
        c.report("n2", Report::legacy([1].into(), 1, 1), 130)
            .unwrap();
        // It holds the reconciliation up until the operator acts.
        assert_eq!(c.reconcile_waiting(), ["n1"]);
    }
}
