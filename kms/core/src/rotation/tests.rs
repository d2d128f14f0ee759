//! The two halves of the rotation protocol tested together: a
//! [`Cluster`] as the central service keeps it, and nodes that converge on
//! what it sends ([`converge`]), with real key delivery in between. No
//! I/O: the "network" is a function call, the "store" a map.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use edgekms_hsm::Key256;

use super::cluster::{Cluster, Event, FleetError, Progress, Report, Retirement, TokenRecord};
use super::node::{converge, ConvergeError, Received, Retire};
use super::VersionState::{self, *};
use crate::delivery::{self, Binding, DeliveryKey};
use crate::keyid;
use crate::keyring::{KeyVersion, Keyring, KeyringError};

/// The central side: the cluster record and the keys it would store.
struct Center {
    cluster: Cluster,
    keys: BTreeMap<u32, Key256>,
}

/// One node: its delivery key and the keyring it serves from.
struct Node {
    name: &'static str,
    delivery: DeliveryKey,
    ring: Keyring,
}

impl Node {
    fn report(&self, applied_seq: u64) -> Report {
        Report::of(&self.ring, applied_seq)
    }
}

const NOW: u64 = 1_000;

/// One version as sent: number, state, key_id, wrapped key (or empty).
type Sent = (u32, VersionState, String, Vec<u8>);

impl Center {
    fn new() -> Self {
        let key = Key256::generate();
        let cluster = Cluster::new("c", keyid::derive("c", 1, &key), NOW);
        Self {
            cluster,
            keys: BTreeMap::from([(1, key)]),
        }
    }

    fn enrol(&mut self, name: &'static str) -> Node {
        let secret = format!("s-{name}");
        let token = TokenRecord {
            id: name.into(),
            secret_sha256: super::cluster::token_hash(&secret),
            expires_unix: NOW + 100,
            used: false,
        };
        self.cluster.invite(name, token).unwrap();
        let delivery = DeliveryKey::generate();
        let public = hex::encode(delivery.public_key());
        self.cluster
            .join(name, &secret, NOW, format!("cert-{name}"), public)
            .unwrap();
        Node {
            name,
            delivery,
            ring: Keyring::new("c").unwrap(),
        }
    }

    fn rotate(&mut self) -> u32 {
        let key = Key256::generate();
        let v = self.cluster.upcoming_version();
        let (v2, created, _) = self
            .cluster
            .rotate(keyid::derive("c", v, &key), NOW)
            .unwrap();
        assert_eq!((v2, created), (v, true));
        self.keys.insert(v, key);
        v
    }

    /// What the service sends `node`: its desired state, keys wrapped.
    fn send(&self, node: &Node) -> (Vec<Sent>, Vec<(u32, String)>) {
        let desired = self.cluster.desired(node.name);
        let public = node.delivery.public_key();
        let versions = desired
            .versions
            .into_iter()
            .map(|dv| {
                let wrapped = if dv.needs_key {
                    let binding = Binding {
                        cluster: "c",
                        node: node.name,
                        version: dv.version,
                        key_id: &dv.key_id,
                    };
                    delivery::wrap(&public, binding, &self.keys[&dv.version]).unwrap()
                } else {
                    Vec::new()
                };
                (dv.version, dv.state, dv.key_id, wrapped)
            })
            .collect();
        (versions, desired.retired)
    }

    /// One round: the node converges on what it is sent and reports.
    fn sync(&mut self, node: &mut Node) -> Vec<Event> {
        let (versions, retired) = self.send(node);
        node.ring = apply(node, &versions, &retires(&retired)).unwrap().keyring;
        let report = node.report(self.cluster.seq());
        self.cluster.report(node.name, report, NOW).unwrap()
    }
}

/// Retired by key_id, as a service that sends `retired_keys` does.
fn retires(retired: &[(u32, String)]) -> Vec<Retire<'_>> {
    retired
        .iter()
        .map(|(version, key_id)| Retire {
            version: *version,
            key_id: Some(key_id),
        })
        .collect()
}

fn apply(
    node: &Node,
    versions: &[Sent],
    retired: &[Retire<'_>],
) -> Result<super::node::Converged, ConvergeError> {
    let received: Vec<Received<'_>> = versions
        .iter()
        .map(|(version, state, key_id, wrapped)| Received {
            version: *version,
            state: *state,
            key_id,
            wrapped_key: wrapped,
            destroy_after_unix: None,
        })
        .collect();
    converge(&node.ring, &received, retired, NOW, |r| {
        let binding = Binding {
            cluster: "c",
            node: node.name,
            version: r.version,
            key_id: r.key_id,
        };
        node.delivery
            .unwrap(binding, r.wrapped_key)
            .map_err(|e| e.to_string())
    })
}

fn states(ring: &Keyring) -> Vec<(u32, VersionState)> {
    ring.versions().map(|kv| (kv.version, kv.state())).collect()
}

fn center_states(c: &Cluster) -> Vec<(u32, VersionState)> {
    c.versions().iter().map(|(v, m)| (*v, m.state)).collect()
}

#[test]
fn a_rotation_runs_end_to_end_and_both_sides_agree_at_every_step() {
    let mut center = Center::new();
    let mut n1 = center.enrol("n1");
    let mut n2 = center.enrol("n2");
    center.sync(&mut n1);
    center.sync(&mut n2);
    assert_eq!(states(&n1.ring), [(1, Primary)]);

    let v2 = center.rotate();
    // Pending reaches n1: it holds v2, still writes under v1.
    let events = center.sync(&mut n1);
    assert!(events.contains(&Event::Acked {
        node: "n1".into(),
        version: v2
    }));
    assert_eq!(states(&n1.ring), [(1, Primary), (2, Pending)]);
    assert_eq!(
        center.cluster.progress(v2, &[]).unwrap(),
        Progress::Pending {
            holding: vec!["n1".into()],
            missing: vec!["n2".into()]
        }
    );
    // n2 acks: promoted centrally, then on each node as it syncs.
    let events = center.sync(&mut n2);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Promoted { version, without } if *version == v2 && without.is_empty())));
    assert_eq!(
        center_states(&center.cluster),
        [(1, DecryptOnly), (2, Primary)]
    );
    center.sync(&mut n1);
    assert!(matches!(
        center.cluster.progress(v2, &[]).unwrap(),
        Progress::Primary { .. }
    ));
    center.sync(&mut n2);
    assert_eq!(center.cluster.progress(v2, &[]).unwrap(), Progress::Settled);
    for n in [&n1, &n2] {
        assert_eq!(states(&n.ring), [(1, DecryptOnly), (2, Primary)]);
        // Both nodes read each other's writes.
        let (ct, kv) = n.ring.encrypt(b"seed").unwrap();
        let other = if n.name == "n1" { &n2 } else { &n1 };
        assert_eq!(
            other.ring.decrypt(&ct, &kv.key_id).unwrap().0.as_slice(),
            b"seed"
        );
    }

    // Retire v1: nodes destroy it, then the center does.
    center.cluster.retire(1, NOW, Retirement::AT_ONCE).unwrap();
    center.sync(&mut n1);
    assert_eq!(states(&n1.ring), [(1, Retired), (2, Primary)]);
    assert!(n1.ring.get(1).unwrap().key().is_none());
    let events = center.sync(&mut n2);
    assert!(events.contains(&Event::Destroyed { version: 1 }));
    assert_eq!(center_states(&center.cluster), [(1, Retired), (2, Primary)]);
}

#[test]
fn a_retired_version_is_disabled_everywhere_restorable_and_destroyed_only_after_its_grace() {
    use super::retire::{CensusCounts, InUse};
    let mut center = Center::new();
    let mut n1 = center.enrol("n1");
    let mut n2 = center.enrol("n2");
    center.sync(&mut n1);
    center.sync(&mut n2);
    let (old_ct, old_id) = {
        let (ct, kv) = n1.ring.encrypt(b"seed").unwrap();
        (ct, kv.key_id.clone())
    };
    let v2 = center.rotate();
    for _ in 0..2 {
        center.sync(&mut n1);
        center.sync(&mut n2);
    }
    let new_id = center.cluster.versions()[&v2].key_id.clone();
    let checked = Retirement {
        grace_secs: 3_600,
        skip_census: false,
    };
    let refused = |c: &mut Cluster, at: u64| match c.retire(1, at, checked) {
        Err(FleetError::InUse { source, .. }) => source,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        refused(&mut center.cluster, NOW),
        InUse::NoCensus { .. }
    ));
    // n1's apiserver still writes under v1: refused whatever the census.
    // What n1 reports at `at`: its apiserver writes under `writes` since `since`.
    let with = |c: &mut Cluster, node: &Node, (writes, since): (&str, u64), census, at| {
        let mut r = node.report(c.seq());
        r.writes_key_id = writes.to_owned();
        r.writes_since_unix = since;
        r.census = census;
        c.report(node.name, r, at).unwrap();
    };
    let count = |taken_unix: u64, n: u64| CensusCounts {
        taken_unix,
        under: [(old_id.clone(), [("secrets".to_owned(), n)].into())].into(),
    };
    with(
        &mut center.cluster,
        &n1,
        (&old_id, NOW),
        Some(count(NOW + 1, 0)),
        NOW + 1,
    );
    assert!(matches!(
        refused(&mut center.cluster, NOW + 1),
        InUse::StillWritten { .. }
    ));
    // It switched, then a census after the switch still counts objects.
    with(
        &mut center.cluster,
        &n1,
        (&new_id, NOW + 2),
        Some(count(NOW + 3, 3)),
        NOW + 3,
    );
    assert!(refused(&mut center.cluster, NOW + 3)
        .to_string()
        .contains("secrets 3"));
    assert_eq!(
        center_states(&center.cluster),
        [(1, DecryptOnly), (2, Primary)]
    );
    // Migrated: a later census counts none. Retire disables it.
    with(
        &mut center.cluster,
        &n1,
        (&new_id, NOW + 2),
        Some(count(NOW + 4, 0)),
        NOW + 4,
    );
    let (events, destroy_after) = center.cluster.retire(1, NOW + 5, checked).unwrap();
    assert_eq!(destroy_after, NOW + 5 + 3_600);
    assert!(events.contains(&Event::Disabled {
        version: 1,
        destroy_after_unix: destroy_after,
        census_skipped: false
    }));
    for n in [&mut n1, &mut n2] {
        center.sync(n);
        assert_eq!(states(&n.ring), [(1, Disabled), (2, Primary)]);
        assert!(matches!(
            n.ring.decrypt(&old_ct, &old_id),
            Err(KeyringError::Disabled { version: 1, .. })
        ));
    }
    // Restored: readable again everywhere.
    center.cluster.restore_version(1, NOW + 6).unwrap();
    for n in [&mut n1, &mut n2] {
        center.sync(n);
        assert_eq!(
            n.ring.decrypt(&old_ct, &old_id).unwrap().0.as_slice(),
            b"seed"
        );
    }
    // Retired again; nothing is destroyed before the grace period ends.
    let (_, destroy_after) = center.cluster.retire(1, NOW + 7, checked).unwrap();
    assert!(center.cluster.advance(destroy_after - 1).is_empty());
    assert_eq!(center.cluster.next_destruction(), Some(destroy_after));
    let events = center.cluster.advance(destroy_after);
    assert_eq!(events, [Event::GraceOver { version: 1 }]);
    center.sync(&mut n1);
    assert_eq!(states(&n1.ring), [(1, Retired), (2, Primary)]);
    assert_eq!(
        center_states(&center.cluster),
        [(1, Retiring), (2, Primary)]
    );
    let events = center.sync(&mut n2);
    assert!(events.contains(&Event::Destroyed { version: 1 }));
    assert_eq!(center_states(&center.cluster), [(1, Retired), (2, Primary)]);
    assert!(center.cluster.restore_version(1, destroy_after).is_err());
}

#[test]
fn a_forced_promotion_reaches_the_stale_node_with_its_key() {
    let mut center = Center::new();
    let mut n1 = center.enrol("n1");
    let mut n2 = center.enrol("n2");
    center.sync(&mut n1);
    center.sync(&mut n2);
    let v2 = center.rotate();
    center.sync(&mut n1);
    assert!(center.cluster.only_unreachable_lack(v2, |n| n == "n1"));
    assert!(!center.cluster.only_unreachable_lack(v2, |_| true));
    let events = center.cluster.force_promote(v2, NOW).unwrap();
    assert_eq!(
        events,
        [Event::Promoted {
            version: v2,
            without: vec!["n2".into()]
        }]
    );
    // The node left out is not counted while it catches up.
    center.sync(&mut n1);
    assert_eq!(
        center.cluster.progress(v2, &["n2".into()]).unwrap(),
        Progress::Settled
    );
    // n2 was away for both steps: it goes from not holding v2 to primary.
    center.sync(&mut n2);
    assert_eq!(states(&n2.ring), [(1, DecryptOnly), (2, Primary)]);
    assert_eq!(center.cluster.progress(v2, &[]).unwrap(), Progress::Settled);
}

#[test]
fn a_superseded_version_is_gone_from_its_rotation() {
    let mut center = Center::new();
    let v2 = center.rotate();
    let v3 = center.rotate();
    assert_eq!(
        center.cluster.progress(v2, &[]).unwrap(),
        Progress::Gone(DecryptOnly)
    );
    assert_eq!(center.cluster.progress(v3, &[]).unwrap(), Progress::Settled);
}

#[test]
fn versions_the_service_does_not_mention_are_kept_and_demoted() {
    let mut center = Center::new();
    let mut n1 = center.enrol("n1");
    center.sync(&mut n1);
    // The service forgets v1 (restored without it) and sends v2 as the
    // primary: the node keeps v1's key, as decrypt-only.
    let v2 = center.rotate();
    let (sent, _) = center.send(&n1);
    let (_, _, v2_id, v2_wrapped) = sent.iter().find(|s| s.0 == v2).unwrap().clone();
    let step = apply(&n1, &[(v2, Primary, v2_id, v2_wrapped)], &[]).unwrap();
    assert_eq!(states(&step.keyring), [(1, DecryptOnly), (2, Primary)]);
    assert_eq!(step.promoted, Some((Some(1), Some(v2))));
    assert!(step.destroyed.is_empty());
    assert!(step.keyring.get(1).unwrap().key().is_some());
    // Forgetting every version is no reason to stop encrypting.
    let v1_id = n1.ring.get(1).unwrap().key_id.clone();
    assert_eq!(
        apply(&n1, &[], &[]).unwrap_err(),
        ConvergeError::PrimaryDropped {
            version: 1,
            key_id: v1_id
        }
    );
}

/// Every instruction a node refuses, each with its own error, and the
/// keyring left as it was (converge is a function: the caller publishes
/// only what it returns).
#[test]
fn a_node_refuses_every_illegal_instruction() {
    let mut center = Center::new();
    let mut n1 = center.enrol("n1");
    center.sync(&mut n1);
    let v2 = center.rotate();
    let (sent, _) = center.send(&n1);
    let before = states(&n1.ring);
    let v1_id = n1.ring.get(1).unwrap().key_id.clone();
    let (_, _, v2_id, v2_wrapped) = sent.iter().find(|s| s.0 == v2).unwrap().clone();

    // A state a node cannot hold.
    for state in [Retiring, Retired] {
        let err = apply(&n1, &[(1, state, v1_id.clone(), Vec::new())], &[]).unwrap_err();
        assert_eq!(err, ConvergeError::NotANodeState { version: 1, state });
    }
    // A version it holds, named under another key_id (a restored service).
    let err = apply(&n1, &[(1, Primary, "c/v1/other".into(), Vec::new())], &[]).unwrap_err();
    assert!(matches!(
        err,
        ConvergeError::KeyIdMismatch { version: 1, .. }
    ));
    // A version it lacks, without its key.
    let err = apply(&n1, &[(v2, Pending, v2_id.clone(), Vec::new())], &[]).unwrap_err();
    assert_eq!(err, ConvergeError::MissingKey { version: v2 });
    // A key that does not open (wrapped to another node, or altered).
    let mut bad = v2_wrapped.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = apply(&n1, &[(v2, Pending, v2_id.clone(), bad)], &[]).unwrap_err();
    assert!(matches!(err, ConvergeError::Delivery { version, .. } if version == v2));
    // A key under another version's id.
    let err = apply(
        &n1,
        &[(v2, Pending, v1_id.clone(), v2_wrapped.clone())],
        &[],
    )
    .unwrap_err();
    assert!(matches!(
        err,
        ConvergeError::Delivery { .. } | ConvergeError::KeyIdMismatch { .. }
    ));
    // The same version twice.
    let twice = [
        (1, Primary, v1_id.clone(), Vec::new()),
        (1, DecryptOnly, v1_id.clone(), Vec::new()),
    ];
    assert_eq!(
        apply(&n1, &twice, &[]).unwrap_err(),
        ConvergeError::Duplicate { version: 1 }
    );
    // Two primaries.
    let two = [
        (1, Primary, v1_id.clone(), Vec::new()),
        (v2, Primary, v2_id.clone(), v2_wrapped.clone()),
    ];
    assert_eq!(
        apply(&n1, &two, &[]).unwrap_err(),
        ConvergeError::Keyring(KeyringError::TwoPrimaries(1, v2))
    );
    assert_eq!(states(&n1.ring), before, "nothing changed");
    // And what the service did send is taken.
    assert!(apply(&n1, &sent, &[]).is_ok());
}

/// A node never holds `retiring` (a central state) at all, and a demotion
/// is checked like every transition.
#[test]
fn a_keyring_never_holds_a_central_only_state() {
    let mut ring = Keyring::new("c").unwrap();
    let kv = KeyVersion::new("c", 1, Retiring, Key256::generate(), NOW);
    assert_eq!(
        ring.insert(kv),
        Err(KeyringError::CentralOnly { version: 1 })
    );
    let primary = KeyVersion::new("c", 1, Primary, Key256::generate(), NOW);
    assert_eq!(primary.demoted().unwrap().state(), DecryptOnly);
    let pending = KeyVersion::new("c", 2, Pending, Key256::generate(), NOW);
    assert!(matches!(
        pending.demoted(),
        Err(KeyringError::IllegalTransition { from: Pending, .. })
    ));
}

/// The service's delivery key, for keys its nodes return.
fn service_key() -> &'static DeliveryKey {
    static KEY: std::sync::OnceLock<DeliveryKey> = std::sync::OnceLock::new();
    KEY.get_or_init(DeliveryKey::generate)
}

impl Center {
    /// A backup: the record and the keys as they are now.
    fn backup(&self) -> (Cluster, BTreeMap<u32, Key256>) {
        let keys = self
            .keys
            .iter()
            .map(|(v, k)| (*v, Key256::from_bytes(k.expose())))
            .collect();
        (self.cluster.clone(), keys)
    }

    /// A service restored from `backup`: reconciling until its nodes report.
    fn restored((mut cluster, keys): (Cluster, BTreeMap<u32, Key256>)) -> Self {
        let events = cluster.start_reconciling("restored from a backup", NOW);
        assert!(matches!(events[..], [Event::ReconcileStarted { .. }]));
        assert!(cluster.reconciling().is_some());
        Self { cluster, keys }
    }

    /// One round as a plugin runs it: report, then either return what a
    /// reconciling service asks for (wrapped to the service's key, opened
    /// and checked there) or converge on its state and report again.
    fn round(&mut self, node: &mut Node) -> Vec<Event> {
        let mut events = self
            .cluster
            .report(node.name, node.report(self.cluster.seq()), NOW)
            .unwrap();
        let desired = self.cluster.desired(node.name);
        if !desired.reconciling {
            events.extend(self.sync(node));
            return events;
        }
        assert!(desired.versions.is_empty() && desired.retired.is_empty());
        for (version, key_id) in desired.wanted {
            let kv = node.ring.get(version).unwrap();
            assert_eq!(kv.key_id, key_id, "asked for the key_id it holds");
            let binding = Binding {
                cluster: "c",
                node: node.name,
                version,
                key_id: &key_id,
            };
            let blob =
                delivery::return_key(&service_key().public_key(), binding, kv.key().unwrap())
                    .unwrap();
            let key = service_key().open_returned(binding, &blob).unwrap();
            events.extend(
                self.cluster
                    .adopt_returned(node.name, version, &key_id, NOW)
                    .unwrap(),
            );
            self.keys.insert(version, key);
        }
        events
    }
}

/// Every node can read what every other node writes now.
fn all_read_each_other(nodes: &[&Node]) {
    for writer in nodes {
        let (ct, kv) = writer.ring.encrypt(b"seed").unwrap();
        for reader in nodes {
            assert_eq!(
                reader.ring.decrypt(&ct, &kv.key_id).unwrap().0.as_slice(),
                b"seed",
                "{} reads {}'s write under {}",
                reader.name,
                writer.name,
                kv.key_id
            );
        }
    }
}

#[test]
fn a_restored_service_reconciles_heals_and_never_mints_a_held_number_again() {
    let mut center = Center::new();
    let (mut n1, mut n2) = (center.enrol("n1"), center.enrol("n2"));
    center.sync(&mut n1);
    center.sync(&mut n2);
    let backup = center.backup();
    let v2 = center.rotate();
    for _ in 0..2 {
        center.sync(&mut n1);
        center.sync(&mut n2);
    }
    let v2_key_id = n1.ring.get(v2).unwrap().key_id.clone();

    let mut restored = Center::restored(backup);
    // Nothing is rotated, promoted or retired before the nodes report.
    for refused in [
        restored
            .cluster
            .rotate("c/v2/other".into(), NOW)
            .map(|_| ()),
        restored
            .cluster
            .retire(1, NOW, Retirement::AT_ONCE)
            .map(|_| ()),
    ] {
        assert!(
            matches!(refused, Err(FleetError::Reconciling { .. })),
            "{refused:?}"
        );
    }
    let events = restored.round(&mut n1);
    assert!(events.contains(&Event::Healed {
        node: "n1".into(),
        version: v2
    }));
    // Still waiting for n2; the healed version is known by its key_id.
    assert_eq!(restored.cluster.reconcile_waiting(), ["n2"]);
    assert_eq!(restored.cluster.versions()[&v2].key_id, v2_key_id);
    let events = restored.round(&mut n2);
    assert!(events.contains(&Event::Reconciled {
        primary: v2,
        without: vec![]
    }));
    assert!(restored.cluster.reconciling().is_none());
    assert_eq!(
        center_states(&restored.cluster),
        [(1, DecryptOnly), (2, Primary)]
    );
    // The next rotation mints v3, and both nodes read each other.
    assert_eq!(restored.rotate(), 3);
    for _ in 0..2 {
        restored.sync(&mut n1);
        restored.sync(&mut n2);
    }
    assert_eq!(n1.ring.primary().unwrap().version, 3);
    all_read_each_other(&[&n1, &n2]);
}

#[test]
fn a_restore_from_before_two_rotations_rolls_no_primary_back() {
    let mut center = Center::new();
    let (mut n1, mut n2) = (center.enrol("n1"), center.enrol("n2"));
    center.sync(&mut n1);
    center.sync(&mut n2);
    let backup = center.backup();
    for _ in 0..2 {
        center.rotate();
        for _ in 0..2 {
            center.sync(&mut n1);
            center.sync(&mut n2);
        }
    }
    assert_eq!(n1.ring.primary().unwrap().version, 3);

    let mut restored = Center::restored(backup);
    restored.round(&mut n1);
    restored.round(&mut n2);
    assert_eq!(restored.cluster.primary().unwrap().0, 3);
    for _ in 0..2 {
        restored.sync(&mut n1);
        restored.sync(&mut n2);
    }
    for n in [&n1, &n2] {
        assert_eq!(
            states(&n.ring),
            [(1, DecryptOnly), (2, DecryptOnly), (3, Primary)]
        );
    }
    assert_eq!(restored.cluster.upcoming_version(), 4);
}

#[test]
fn a_version_destroyed_after_the_backup_stays_destroyed() {
    let mut center = Center::new();
    let (mut n1, mut n2) = (center.enrol("n1"), center.enrol("n2"));
    center.sync(&mut n1);
    center.sync(&mut n2);
    center.rotate();
    for _ in 0..2 {
        center.sync(&mut n1);
        center.sync(&mut n2);
    }
    let backup = center.backup();
    center.cluster.retire(1, NOW, Retirement::AT_ONCE).unwrap();
    center.sync(&mut n1);
    center.sync(&mut n2);
    assert_eq!(center.cluster.versions()[&1].state, Retired);

    let mut restored = Center::restored(backup);
    assert_eq!(restored.cluster.versions()[&1].state, DecryptOnly);
    restored.round(&mut n1);
    let events = restored.round(&mut n2);
    assert!(
        events.contains(&Event::Destroyed { version: 1 }),
        "{events:?}"
    );
    assert_eq!(restored.cluster.versions()[&1].state, Retired);
    assert!(restored
        .cluster
        .desired("n1")
        .versions
        .iter()
        .all(|dv| dv.version != 1));
}

#[test]
fn nodes_back_one_by_one_end_the_reconciliation_with_nothing_lost() {
    let mut center = Center::new();
    let (mut n1, mut n2, mut n3) = (center.enrol("n1"), center.enrol("n2"), center.enrol("n3"));
    for n in [&mut n1, &mut n2, &mut n3] {
        center.sync(n);
    }
    let backup = center.backup();
    // v2 reaches everyone; v3 is forced while n3 is away.
    center.rotate();
    for _ in 0..2 {
        for n in [&mut n1, &mut n2, &mut n3] {
            center.sync(n);
        }
    }
    let v3 = center.rotate();
    center.sync(&mut n1);
    center.sync(&mut n2);
    center.cluster.force_promote(v3, NOW).unwrap();
    center.sync(&mut n1);
    center.sync(&mut n2);

    let mut restored = Center::restored(backup);
    restored.round(&mut n1);
    assert_eq!(restored.cluster.reconcile_waiting(), ["n2", "n3"]);
    assert!(restored.cluster.rotate("c/v2/x".into(), NOW).is_err());
    restored.round(&mut n3);
    assert_eq!(restored.cluster.reconcile_waiting(), ["n2"]);
    restored.round(&mut n2);
    assert!(restored.cluster.reconciling().is_none());
    assert_eq!(restored.cluster.primary().unwrap().0, v3);
    for _ in 0..2 {
        for n in [&mut n1, &mut n2, &mut n3] {
            restored.sync(n);
        }
    }
    all_read_each_other(&[&n1, &n2, &n3]);
}

#[test]
fn a_forced_end_names_the_nodes_left_out_and_a_clash_is_never_an_ack() {
    let mut center = Center::new();
    let (mut n1, mut n2) = (center.enrol("n1"), center.enrol("n2"));
    center.sync(&mut n1);
    center.sync(&mut n2);
    let backup = center.backup();
    // v2 reaches only n2 before the service is lost.
    center.rotate();
    center.sync(&mut n2);
    let old_v2 = n2.ring.get(2).unwrap().key_id.clone();

    let mut restored = Center::restored(backup);
    restored.round(&mut n1);
    // n2 is away: the operator must name it, exactly.
    assert!(matches!(
        restored.cluster.end_reconcile(&[], NOW),
        Err(FleetError::WrongExcuse { .. })
    ));
    assert!(matches!(
        restored
            .cluster
            .end_reconcile(&["n1".into(), "n2".into()], NOW),
        Err(FleetError::WrongExcuse { .. })
    ));
    let events = restored.cluster.end_reconcile(&["n2".into()], NOW).unwrap();
    assert!(events.contains(&Event::Reconciled {
        primary: 1,
        without: vec!["n2".into()]
    }));
    // Only n2, left out, held v2: the service cannot know it and mints
    // v2 again, under another key (what forcing risks).
    let v = restored.rotate();
    assert_eq!(v, 2);
    assert_ne!(restored.cluster.versions()[&2].key_id, old_v2);
    // n2 comes back holding the old v2: a clash, never counted as holding.
    let events = restored
        .cluster
        .report("n2", n2.report(restored.cluster.seq()), NOW)
        .unwrap();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Clash { node, version: 2, node_key_id, .. } if node == "n2" && *node_key_id == old_v2
    )));
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::Acked { version: 2, .. })));
    assert_eq!(restored.cluster.holders(2), Vec::<String>::new());
    assert_eq!(restored.cluster.clashes().len(), 1);
    // The node refuses the service's v2 rather than taking either key.
    let (versions, retired) = restored.send(&n2);
    assert!(matches!(
        apply(&n2, &versions, &retires(&retired)),
        Err(ConvergeError::KeyIdMismatch { version: 2, .. })
    ));
}

#[test]
fn a_restore_from_before_a_rotation_and_a_retirement_retires_the_backups_primary() {
    let mut center = Center::new();
    let (mut n1, mut n2) = (center.enrol("n1"), center.enrol("n2"));
    center.sync(&mut n1);
    center.sync(&mut n2);
    let backup = center.backup();
    center.rotate();
    for _ in 0..2 {
        center.sync(&mut n1);
        center.sync(&mut n2);
    }
    center.cluster.retire(1, NOW, Retirement::AT_ONCE).unwrap();
    center.sync(&mut n1);
    center.sync(&mut n2);

    // The backup's primary is v1, which every node destroyed since.
    let mut restored = Center::restored(backup);
    restored.round(&mut n1);
    let events = restored.round(&mut n2);
    assert!(
        events.contains(&Event::Destroyed { version: 1 }),
        "{events:?}"
    );
    assert_eq!(
        center_states(&restored.cluster),
        [(1, Retired), (2, Primary)]
    );
    restored.sync(&mut n1);
    restored.sync(&mut n2);
    assert_eq!(states(&n1.ring), [(1, Retired), (2, Primary)]);
    all_read_each_other(&[&n1, &n2]);
}

/// Random histories, then a restore from a backup taken at a random point,
/// with every node back: the reconciliation ends, no node's primary goes
/// back, the service knows every version by the key_id its nodes hold, no
/// number is minted twice, and everything written under a version still
/// live decrypts on every node.
mod restore_proptests {
    use proptest::prelude::*;

    use super::*;
    use edgekms_testkit::proptest_policy::config;

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Rotate,
        Sync(usize),
        Force,
        RetireOldest,
        Write(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Rotate),
            (0..3usize).prop_map(Step::Sync),
            Just(Step::Force),
            Just(Step::RetireOldest),
            (0..3usize).prop_map(Step::Write),
        ]
    }

    fn run(center: &mut Center, nodes: &mut [Node], s: Step, written: &mut Vec<(Vec<u8>, String)>) {
        match s {
            Step::Rotate => {
                if center.cluster.pending().is_none() {
                    center.rotate();
                }
            }
            Step::Sync(i) => {
                center.sync(&mut nodes[i]);
            }
            Step::Force => {
                if let Some((v, _)) = center.cluster.pending() {
                    center.cluster.force_promote(v, NOW).unwrap();
                }
            }
            Step::RetireOldest => {
                let oldest = center
                    .cluster
                    .versions()
                    .iter()
                    .find(|(_, m)| m.state == DecryptOnly)
                    .map(|(v, _)| *v);
                if let Some(v) = oldest {
                    center.cluster.retire(v, NOW, Retirement::AT_ONCE).unwrap();
                }
            }
            Step::Write(i) => {
                if let Ok((ct, kv)) = nodes[i].ring.encrypt(b"seed") {
                    written.push((ct, kv.key_id.clone()));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(config(64))]

        #[test]
        fn a_restore_from_any_point_loses_nothing_and_rolls_nothing_back(
            before in proptest::collection::vec(step(), 0..12),
            after in proptest::collection::vec(step(), 0..24),
        ) {
            let mut center = Center::new();
            let mut nodes = vec![center.enrol("n1"), center.enrol("n2"), center.enrol("n3")];
            for n in nodes.iter_mut() {
                center.sync(n);
            }
            let mut written = Vec::new();
            for s in before {
                run(&mut center, &mut nodes, s, &mut written);
            }
            let backup = center.backup();
            for s in after {
                run(&mut center, &mut nodes, s, &mut written);
            }
            let primaries: Vec<u32> = nodes
                .iter()
                .map(|n| n.ring.primary().map_or(0, |p| p.version))
                .collect();

            let mut restored = Center::restored(backup);
            for n in nodes.iter_mut() {
                restored.round(n);
            }
            prop_assert!(restored.cluster.reconciling().is_none());
            for _ in 0..3 {
                for n in nodes.iter_mut() {
                    restored.sync(n);
                }
            }
            for (n, before) in nodes.iter().zip(&primaries) {
                let now = n.ring.primary().map_or(0, |p| p.version);
                prop_assert!(now >= *before, "{} went from v{before} to v{now}", n.name);
                for kv in n.ring.versions() {
                    let meta = &restored.cluster.versions()[&kv.version];
                    prop_assert_eq!(&meta.key_id, &kv.key_id, "v{} on {}", kv.version, n.name);
                }
            }
            prop_assert!(restored.cluster.clashes().is_empty());
            let next = restored.cluster.upcoming_version();
            prop_assert!(nodes.iter().all(|n| n.ring.versions().all(|kv| kv.version < next)));
            for (ct, key_id) in &written {
                let live = nodes.iter().any(|n| {
                    n.ring.versions().any(|kv| &kv.key_id == key_id && kv.key().is_some())
                });
                if !live {
                    continue;
                }
                for n in &nodes {
                    prop_assert!(n.ring.decrypt(ct, key_id).is_ok(), "{} cannot read {key_id}", n.name);
                }
            }
        }
    }
}
