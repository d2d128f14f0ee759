//! The central service's rotation protocol, as a state machine over one
//! cluster: its KEK versions and its nodes. No I/O; the server persists a
//! [`Cluster`] after every transition and only then tells anyone.
//!
//! Invariants the transitions keep:
//! - a version becomes primary only once every joined (active) node reports
//!   holding it, unless an operator forces it, and then the nodes left out
//!   are named;
//! - a retired version is first disabled (held, Decrypt refused,
//!   restorable) and becomes retiring only once its grace period is over;
//!   retiring needs a census showing it unused (unless skipped: audited);
//! - a retiring version is destroyed only once no active node holds it, and
//!   the primary or a pending version cannot be retired;
//! - version numbers only grow, so a key_id is never reused;
//! - `seq` grows with every change of the versions, so a node that applied
//!   `seq` has the state the server last published.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::retire::{self, CensusCounts, InUse, Writer};
use super::VersionState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub state: VersionState,
    pub key_id: String,
    pub created_unix: u64,
    /// When it last changed state.
    pub changed_unix: u64,
    /// Disabled: when its grace period ends and it is destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_after_unix: Option<u64>,
    /// When it stopped being primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demoted_unix: Option<u64>,
}

impl VersionMeta {
    /// A version created now in `state`.
    pub fn new(state: VersionState, key_id: String, now: u64) -> Self {
        Self {
            state,
            key_id,
            created_unix: now,
            changed_unix: now,
            destroy_after_unix: None,
            demoted_unix: None,
        }
    }

    /// When it stopped being used for writing (records older than
    /// `demoted_unix`: its last change, as good a bound as there is).
    pub fn superseded_unix(&self) -> u64 {
        self.demoted_unix.unwrap_or(self.changed_unix)
    }
}

/// How an operator retires a version ([`Cluster::retire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retirement {
    /// How long it stays disabled before it is destroyed (the caller
    /// checks it against the minimum).
    pub grace_secs: u64,
    /// Retire without a census showing it unused (the caller audits it).
    pub skip_census: bool,
}

impl Retirement {
    /// No grace period and no census: what retiring did before disabling
    /// existed. For tests and records made by hand.
    pub const AT_ONCE: Retirement = Retirement {
        grace_secs: 0,
        skip_census: true,
    };
}

/// The newest census a node reported, with who counted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CensusRecord {
    pub node: String,
    pub counts: CensusCounts,
}

/// How far in the future a reported census time may lie (clock skew): a
/// later one would shadow every true census after it.
const CENSUS_SKEW_SECS: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Has a join token, has not joined.
    Invited,
    Active,
    /// Removed: refused from now on.
    Revoked,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Invited => "invited",
            NodeState::Active => "active",
            NodeState::Revoked => "revoked",
        }
    }
}

/// A version as a node reported holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Empty only from a node too old to report key_ids: matched by
    /// number alone.
    pub key_id: String,
    pub state: VersionState,
}

/// One report from a node: what it holds (by key_id), what it destroyed,
/// and how far it applied the service's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub held: BTreeMap<u32, Held>,
    /// Tombstones: versions the node destroyed, with their key_ids.
    pub destroyed: BTreeMap<u32, String>,
    pub applied_seq: u64,
    pub primary: u32,
    /// The key_id the node's kube-apiserver last had a DEK seed encrypted
    /// under (empty: none seen), and since when.
    pub writes_key_id: String,
    pub writes_since_unix: u64,
    /// The newest census the node holds.
    pub census: Option<CensusCounts>,
}

impl Report {
    /// What a node holding `keyring` reports: every version whose key it
    /// holds, and its tombstones.
    pub fn of(keyring: &crate::keyring::Keyring, applied_seq: u64) -> Self {
        let mut held = BTreeMap::new();
        let mut destroyed = BTreeMap::new();
        for kv in keyring.versions() {
            if kv.key().is_some() {
                let state = kv.state();
                let key_id = kv.key_id.clone();
                held.insert(kv.version, Held { key_id, state });
            } else {
                destroyed.insert(kv.version, kv.key_id.clone());
            }
        }
        Self {
            held,
            destroyed,
            applied_seq,
            primary: keyring.primary().map_or(0, |p| p.version),
            ..Self::default()
        }
    }

    /// The versions held, by number alone (what services older than
    /// key_ids read).
    pub fn numbers(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// A report of numbers alone (a node older than key_ids in reports).
    pub fn legacy(held: BTreeSet<u32>, applied_seq: u64, primary: u32) -> Self {
        let state = |v: u32| {
            if v == primary {
                VersionState::Primary
            } else {
                VersionState::DecryptOnly
            }
        };
        Self {
            held: held
                .into_iter()
                .map(|v| {
                    (
                        v,
                        Held {
                            key_id: String::new(),
                            state: state(v),
                        },
                    )
                })
                .collect(),
            destroyed: BTreeMap::new(),
            applied_seq,
            primary,
            ..Self::default()
        }
    }
}

/// A join token's server side: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub expires_unix: u64,
    pub used: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub state: NodeState,
    pub token: Option<TokenRecord>,
    /// SHA-256 of the one certificate issued at join.
    pub cert_sha256: String,
    /// The node's delivery public key, hex.
    pub delivery_public_key: String,
    /// Versions the node holds under the key_id this service knows them
    /// by: what counts as the node holding a version (acks, promotion).
    pub held: BTreeSet<u32>,
    /// What the node last reported holding that `held` leaves out:
    /// versions this service does not know, or knows under another key_id.
    /// Empty in normal operation, so the record stays small.
    #[serde(default)]
    pub unmatched: BTreeMap<u32, Held>,
    /// The node's tombstones this service has not retired (under the same
    /// key_id) yet: versions the node destroyed. Empty in normal operation.
    #[serde(default)]
    pub destroyed: BTreeMap<u32, String>,
    /// Left out of a reconciliation by the operator
    /// ([`Cluster::end_reconcile`]).
    #[serde(default)]
    pub excused: bool,
    /// What its kube-apiserver writes under ([`Report::writes_key_id`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub writes_key_id: String,
    #[serde(default)]
    pub writes_since_unix: u64,
    pub applied_seq: u64,
    pub primary: u32,
    pub last_contact_unix: u64,
    pub joined_unix: u64,
}

impl NodeRecord {
    fn invited(token: TokenRecord) -> Self {
        Self {
            state: NodeState::Invited,
            token: Some(token),
            cert_sha256: String::new(),
            delivery_public_key: String::new(),
            held: BTreeSet::new(),
            unmatched: BTreeMap::new(),
            destroyed: BTreeMap::new(),
            excused: false,
            writes_key_id: String::new(),
            writes_since_unix: 0,
            applied_seq: 0,
            primary: 0,
            last_contact_unix: 0,
            joined_unix: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("cluster {0:?} does not exist")]
    UnknownCluster(String),
    #[error("node {cluster}/{node} does not exist")]
    UnknownNode { cluster: String, node: String },
    #[error("node {cluster}/{node} is already enrolled; `kmsctl node remove` it first to enrol it again")]
    AlreadyEnrolled { cluster: String, node: String },
    #[error("the join token is not valid (unknown, mistyped or forged); ask the operator for a new one (`kmsctl node add`)")]
    BadToken,
    #[error("the join token expired at {expired_unix} (unix time); ask the operator for a new one (`kmsctl node add`)")]
    TokenExpired { expired_unix: u64 },
    #[error("the join token was already used; a token enrols one node once (`kmsctl node add` issues a new one)")]
    TokenUsed,
    #[error("the join token was issued for node {expected}, not {requested}")]
    TokenForOtherNode { expected: String, requested: String },
    #[error("node {cluster}/{node} was removed from the fleet (revoked)")]
    Revoked { cluster: String, node: String },
    #[error("node {cluster}/{node} has not joined")]
    NotJoined { cluster: String, node: String },
    #[error(
        "this certificate is not the one issued to node {cluster}/{node} (re-enrolled since?)"
    )]
    StaleCertificate { cluster: String, node: String },
    #[error("cluster {cluster} has no version {version}")]
    UnknownVersion { cluster: String, version: u32 },
    #[error("version {version} is the primary of cluster {cluster}: rotate first, migrate the data, then retire it")]
    RetirePrimary { cluster: String, version: u32 },
    #[error("version {version} of cluster {cluster} is pending: let it be promoted (or force it) before retiring older versions")]
    RetirePending { cluster: String, version: u32 },
    #[error("version {version} of cluster {cluster} is already disabled, to be destroyed at {}; `kmsctl restore-version {cluster} {version}` brings it back", crate::utc::format(*destroy_after_unix))]
    AlreadyDisabled {
        cluster: String,
        version: u32,
        destroy_after_unix: u64,
    },
    #[error("version {version} of cluster {cluster} is {state}, not disabled: only a disabled version can be restored")]
    NotDisabled {
        cluster: String,
        version: u32,
        state: &'static str,
    },
    #[error("cluster {cluster}: {source} (version {version} is kept)")]
    InUse {
        cluster: String,
        version: u32,
        source: InUse,
    },
    #[error("version {version} of cluster {cluster} is already {state}")]
    AlreadyRetired {
        cluster: String,
        version: u32,
        state: &'static str,
    },
    #[error("version {version} of cluster {cluster} is not pending (it is {state})")]
    NotPending {
        cluster: String,
        version: u32,
        state: &'static str,
    },
    #[error("cluster {0} has used every version number")]
    VersionsExhausted(String),
    #[error("cluster {cluster} is reconciling ({reason}): nothing is rotated, promoted or retired until every node has reported; waiting for: {waiting} (see `kmsctl status {cluster}`; `kmsctl reconcile {cluster} --without NODE,...` goes on without them)")]
    Reconciling {
        cluster: String,
        reason: String,
        waiting: String,
    },
    #[error("cluster {0} is not reconciling")]
    NotReconciling(String),
    #[error("the nodes holding up cluster {cluster}'s reconciliation are [{expected}]: name exactly these with --without (given: [{given}])")]
    WrongExcuse {
        cluster: String,
        expected: String,
        given: String,
    },
    #[error("cluster {cluster} did not ask node {node} for version {version} {key_id:?} (it knows the version, or the nodes disagree on its key)")]
    NotWanted {
        cluster: String,
        node: String,
        version: u32,
        key_id: String,
    },
}

/// What a transition did, for the audit log and the server's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Acked {
        node: String,
        version: u32,
    },
    Dropped {
        node: String,
        version: u32,
    },
    Promoted {
        version: u32,
        without: Vec<String>,
    },
    /// The central copy must be destroyed now.
    Destroyed {
        version: u32,
    },
    /// Retired by the operator: disabled until `destroy_after_unix`.
    Disabled {
        version: u32,
        destroy_after_unix: u64,
        census_skipped: bool,
    },
    /// A disabled version brought back to decrypt-only.
    Restored {
        version: u32,
    },
    /// A disabled version's grace period ended: nodes destroy it now.
    GraceOver {
        version: u32,
    },
    /// A node reported a newer census.
    Census {
        node: String,
        taken_unix: u64,
    },
    /// The cluster started reconciling.
    ReconcileStarted {
        reason: String,
    },
    /// A node holds a version under another key than this service's (or
    /// nodes disagree on a version the service lacks: `service_key_id`
    /// empty). Newly seen in this report.
    Clash {
        node: String,
        version: u32,
        service_key_id: String,
        node_key_id: String,
    },
    /// A version the service lacked came back from a node.
    Healed {
        node: String,
        version: u32,
    },
    /// A node reported destroying a version: it goes on being retired.
    LearnedDestroyed {
        node: String,
        version: u32,
    },
    /// Reconciliation ended; the cluster's primary is `primary`.
    Reconciled {
        primary: u32,
        without: Vec<String>,
    },
}

/// One version of the state a node must converge to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVersion {
    pub version: u32,
    pub state: VersionState,
    pub key_id: String,
    /// The node does not hold it yet: ship the key.
    pub needs_key: bool,
    /// Disabled: when it is destroyed.
    pub destroy_after_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub seq: u64,
    pub versions: Vec<DesiredVersion>,
    /// Versions to destroy, with their key_ids.
    pub retired: Vec<(u32, String)>,
    /// The cluster is reconciling: the node is sent nothing to apply,
    /// only `wanted`.
    pub reconciling: bool,
    /// Versions this node holds that the service lacks: to return.
    pub wanted: Vec<(u32, String)>,
}

/// How far the rotation to one version has come, as an operator waits
/// for it ([`Cluster::progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Pending: the active nodes that hold it, and those that do not yet.
    Pending {
        holding: Vec<String>,
        missing: Vec<String>,
    },
    /// Primary: the counted active nodes (those a forced promotion left
    /// out are not counted) that serve it as their primary, and the rest.
    Primary {
        serving: Vec<String>,
        waiting: Vec<String>,
    },
    /// Primary, and served by every counted node: writes under it can be
    /// read everywhere, so the storage migration can start.
    Settled,
    /// No longer in this rotation: superseded or retired, in this state.
    Gone(VersionState),
}

/// One cluster: the unit the server persists. Its fields change only
/// through the transitions below; readers get shared references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    name: String,
    seq: u64,
    next_version: u32,
    versions: BTreeMap<u32, VersionMeta>,
    nodes: BTreeMap<String, NodeRecord>,
    created_unix: u64,
    /// Set while the cluster reconciles ([`reconcile`]).
    #[serde(default)]
    reconciling: Option<Reconciling>,
    /// The newest census of the cluster's storage any node reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    census: Option<CensusRecord>,
}

/// How far a node's report may push the next version number.
const MAX_VERSION_SKIP: u32 = 1000;

/// SHA-256 of a token secret, hex.
pub fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl Cluster {
    /// A new cluster whose version 1 (key `v1_key_id`) is primary at once:
    /// no node exists yet that could lack it.
    pub fn new(name: &str, v1_key_id: String, now: u64) -> Self {
        let mut versions = BTreeMap::new();
        versions.insert(1, VersionMeta::new(VersionState::Primary, v1_key_id, now));
        Self {
            name: name.to_owned(),
            seq: 1,
            next_version: 2,
            versions,
            nodes: BTreeMap::new(),
            created_unix: now,
            reconciling: None,
            census: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A record made of these parts, unchecked: for tests that need
    /// records no transition makes (damaged, restored, arbitrary).
    #[cfg(any(test, feature = "strategies"))]
    pub fn from_parts(
        name: String,
        seq: u64,
        next_version: u32,
        versions: BTreeMap<u32, VersionMeta>,
        nodes: BTreeMap<String, NodeRecord>,
        created_unix: u64,
    ) -> Self {
        Self {
            name,
            seq,
            next_version,
            versions,
            nodes,
            created_unix,
            reconciling: None,
            census: None,
        }
    }

    /// The versions, to edit unchecked: for tests only, as
    /// [`Cluster::from_parts`].
    #[cfg(any(test, feature = "strategies"))]
    pub fn versions_mut(&mut self) -> &mut BTreeMap<u32, VersionMeta> {
        &mut self.versions
    }

    /// Grows with every change of the versions.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn created_unix(&self) -> u64 {
        self.created_unix
    }

    pub fn versions(&self) -> &BTreeMap<u32, VersionMeta> {
        &self.versions
    }

    pub fn nodes(&self) -> &BTreeMap<String, NodeRecord> {
        &self.nodes
    }

    pub fn node(&self, node: &str) -> Option<&NodeRecord> {
        self.nodes.get(node)
    }

    /// Active nodes that hold `version`.
    pub fn holders(&self, version: u32) -> Vec<String> {
        self.active()
            .filter(|(_, n)| n.held.contains(&version))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Records that `node` was heard from (a stream closed, say).
    pub fn touch(&mut self, node: &str, now: u64) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.last_contact_unix = now;
        }
    }

    /// A report that changes nothing the protocol acts on (an active node,
    /// holding what it held, its apiserver writing under the same key_id,
    /// no newer census): its progress is noted and `true` returned.
    /// Anything else returns `false` untouched, for [`Cluster::report`].
    pub fn note_progress(&mut self, node: &str, report: &Report, now: u64) -> bool {
        let awaited = self
            .reconciling
            .as_ref()
            .is_some_and(|r| !r.reported.contains(node));
        let newer_census = report.census.as_ref().is_some_and(|c| {
            self.census
                .as_ref()
                .is_none_or(|kept| c.taken_unix > kept.counts.taken_unix)
        });
        let (held, unmatched, destroyed) = self.sort_report(&report.held, &report.destroyed);
        match self.nodes.get_mut(node) {
            Some(n)
                if n.state == NodeState::Active
                    && !awaited
                    && !newer_census
                    && n.writes_key_id == report.writes_key_id
                    && n.held == held
                    && n.unmatched == unmatched
                    && n.destroyed == destroyed =>
            {
                n.applied_seq = report.applied_seq;
                n.primary = report.primary;
                n.last_contact_unix = now;
                true
            }
            _ => false,
        }
    }

    /// Whether `node` holds exactly what it must and applied the latest
    /// state: nothing needs sending.
    pub fn settled_for(&self, node: &str) -> bool {
        let Some(rec) = self.nodes.get(node) else {
            return true;
        };
        !self.behind(node)
            && rec.held.iter().all(|v| {
                self.versions
                    .get(v)
                    .is_some_and(|m| m.state.held_by_nodes())
            })
    }

    pub fn primary(&self) -> Option<(u32, &VersionMeta)> {
        self.versions
            .iter()
            .find(|(_, m)| m.state == VersionState::Primary)
            .map(|(v, m)| (*v, m))
    }

    pub fn pending(&self) -> Option<(u32, &VersionMeta)> {
        self.versions
            .iter()
            .find(|(_, m)| m.state == VersionState::Pending)
            .map(|(v, m)| (*v, m))
    }

    fn active(&self) -> impl Iterator<Item = (&String, &NodeRecord)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
    }

    fn node_mut(&mut self, node: &str) -> Result<&mut NodeRecord, FleetError> {
        let cluster = self.name.clone();
        self.nodes
            .get_mut(node)
            .ok_or_else(|| FleetError::UnknownNode {
                cluster,
                node: node.to_owned(),
            })
    }

    fn version_mut(&mut self, version: u32) -> Result<&mut VersionMeta, FleetError> {
        let cluster = self.name.clone();
        self.versions
            .get_mut(&version)
            .ok_or(FleetError::UnknownVersion { cluster, version })
    }

    /// Issues (or re-issues) a join token for `node`.
    pub fn invite(&mut self, node: &str, token: TokenRecord) -> Result<(), FleetError> {
        if let Some(rec) = self.nodes.get(node) {
            if rec.state == NodeState::Active {
                return Err(FleetError::AlreadyEnrolled {
                    cluster: self.name.clone(),
                    node: node.to_owned(),
                });
            }
        }
        self.nodes
            .insert(node.to_owned(), NodeRecord::invited(token));
        Ok(())
    }

    /// Withdraws every join token not yet used, returning the nodes whose
    /// token it was. A restore does this: the backup cannot tell whether a
    /// token was used after it was taken, and a used token must never enrol
    /// a node again. The nodes stay invited; `kmsctl node add` issues anew.
    pub fn invalidate_unused_tokens(&mut self) -> Vec<String> {
        let mut withdrawn = Vec::new();
        for (name, rec) in &mut self.nodes {
            if rec.state == NodeState::Invited && rec.token.as_ref().is_some_and(|t| !t.used) {
                rec.token = None;
                withdrawn.push(name.clone());
            }
        }
        withdrawn
    }

    /// Checks a join token for `node` without changing anything.
    pub fn check_token(&self, node: &str, secret: &str, now: u64) -> Result<(), FleetError> {
        let rec = self.nodes.get(node).ok_or(FleetError::BadToken)?;
        let token = rec.token.as_ref().ok_or(FleetError::BadToken)?;
        if token.secret_sha256 != token_hash(secret) {
            return Err(FleetError::BadToken);
        }
        if token.used || rec.state != NodeState::Invited {
            return Err(FleetError::TokenUsed);
        }
        if now >= token.expires_unix {
            return Err(FleetError::TokenExpired {
                expired_unix: token.expires_unix,
            });
        }
        Ok(())
    }

    /// Enrols `node` with its certificate and delivery key; the token is
    /// spent.
    pub fn join(
        &mut self,
        node: &str,
        secret: &str,
        now: u64,
        cert_sha256: String,
        delivery_public_key: String,
    ) -> Result<(), FleetError> {
        self.check_token(node, secret, now)?;
        let rec = self.node_mut(node)?;
        if let Some(t) = rec.token.as_mut() {
            t.used = true;
        }
        rec.state = NodeState::Active;
        rec.cert_sha256 = cert_sha256;
        rec.delivery_public_key = delivery_public_key;
        rec.joined_unix = now;
        rec.last_contact_unix = now;
        rec.held.clear();
        rec.unmatched.clear();
        rec.destroyed.clear();
        rec.excused = false;
        rec.applied_seq = 0;
        Ok(())
    }

    /// Revokes `node`; a rotation waiting only for it may now complete.
    pub fn revoke(&mut self, node: &str, now: u64) -> Result<Vec<Event>, FleetError> {
        let rec = self.node_mut(node)?;
        rec.state = NodeState::Revoked;
        rec.token = None;
        rec.cert_sha256.clear();
        Ok(self.settle(now))
    }

    /// Checks that `cert_sha256` is the live certificate of an active node.
    pub fn authorize(&self, node: &str, cert_sha256: &str) -> Result<(), FleetError> {
        let err_node = || (self.name.clone(), node.to_owned());
        let rec = self.nodes.get(node).ok_or_else(|| {
            let (cluster, node) = err_node();
            FleetError::UnknownNode { cluster, node }
        })?;
        match rec.state {
            NodeState::Revoked => {
                let (cluster, node) = err_node();
                Err(FleetError::Revoked { cluster, node })
            }
            NodeState::Invited => {
                let (cluster, node) = err_node();
                Err(FleetError::NotJoined { cluster, node })
            }
            NodeState::Active if rec.cert_sha256 != cert_sha256 => {
                let (cluster, node) = err_node();
                Err(FleetError::StaleCertificate { cluster, node })
            }
            NodeState::Active => Ok(()),
        }
    }

    /// Records a node's report of what it holds and applied. A version
    /// counts as held only under the key_id this service knows it by; a
    /// report that disagrees with the service (versions it does not know,
    /// other key_ids, tombstones of live versions, a newer primary) starts
    /// a reconciliation ([`reconcile`]).
    pub fn report(
        &mut self,
        node: &str,
        report: Report,
        now: u64,
    ) -> Result<Vec<Event>, FleetError> {
        let cluster = self.name.clone();
        let rec = self.node_mut(node)?;
        match rec.state {
            NodeState::Active => {}
            NodeState::Revoked => {
                let node = node.to_owned();
                return Err(FleetError::Revoked { cluster, node });
            }
            NodeState::Invited => {
                let node = node.to_owned();
                return Err(FleetError::NotJoined { cluster, node });
            }
        }
        let clashes_before: BTreeSet<u32> = self
            .clashes_of(node)
            .into_iter()
            .map(|c| c.version)
            .collect();
        let (held, unmatched, destroyed) = self.sort_report(&report.held, &report.destroyed);
        let rec = self.node_mut(node)?;
        let mut events: Vec<Event> = held
            .difference(&rec.held)
            .map(|&version| Event::Acked {
                node: node.to_owned(),
                version,
            })
            .collect();
        events.extend(rec.held.difference(&held).map(|&version| Event::Dropped {
            node: node.to_owned(),
            version,
        }));
        // A node holding a version this service never issued saw a service
        // that was later restored from an older backup: never mint that
        // number again (bounded, so a node cannot exhaust the numbers).
        let top = report
            .held
            .keys()
            .chain(report.destroyed.keys())
            .copied()
            .max();
        if let Some(top) = top {
            if top >= self.next_version && top < self.next_version.saturating_add(MAX_VERSION_SKIP)
            {
                self.next_version = top + 1;
            }
        }
        let rec = self.node_mut(node)?;
        rec.held = held;
        rec.unmatched = unmatched;
        rec.destroyed = destroyed;
        rec.applied_seq = report.applied_seq;
        rec.primary = report.primary;
        rec.last_contact_unix = now;
        rec.writes_key_id = report.writes_key_id;
        rec.writes_since_unix = report.writes_since_unix;
        events.extend(
            self.clashes_of(node)
                .into_iter()
                .filter(|c| !clashes_before.contains(&c.version))
                .map(|c| Event::Clash {
                    node: c.node,
                    version: c.version,
                    service_key_id: c.service_key_id,
                    node_key_id: c.node_key_id,
                }),
        );
        if let Some(counts) = report.census {
            events.extend(self.note_census(node, counts, now));
        }
        events.extend(self.after_report(node, now));
        Ok(events)
    }

    /// Keeps `counts` if it is the newest census of this cluster (and not
    /// from the future: a clock far ahead would shadow every later one).
    fn note_census(&mut self, node: &str, counts: CensusCounts, now: u64) -> Option<Event> {
        let newer = self
            .census
            .as_ref()
            .is_none_or(|c| counts.taken_unix > c.counts.taken_unix);
        if !newer || counts.taken_unix > now.saturating_add(CENSUS_SKEW_SECS) {
            return None;
        }
        let taken_unix = counts.taken_unix;
        self.census = Some(CensusRecord {
            node: node.to_owned(),
            counts,
        });
        Some(Event::Census {
            node: node.to_owned(),
            taken_unix,
        })
    }

    /// The newest census any node reported.
    pub fn census(&self) -> Option<&CensusRecord> {
        self.census.as_ref()
    }

    /// Splits a report into the versions this service knows under the
    /// same key_id (or by number alone, from a node too old to send
    /// key_ids), the rest, and the tombstones of versions this service has
    /// not retired under that key_id.
    #[allow(clippy::type_complexity)]
    fn sort_report(
        &self,
        reported: &BTreeMap<u32, Held>,
        destroyed: &BTreeMap<u32, String>,
    ) -> (BTreeSet<u32>, BTreeMap<u32, Held>, BTreeMap<u32, String>) {
        let mut held = BTreeSet::new();
        let mut unmatched = BTreeMap::new();
        for (&v, h) in reported {
            let known = self
                .versions
                .get(&v)
                .is_some_and(|m| h.key_id.is_empty() || h.key_id == m.key_id);
            if known {
                held.insert(v);
            } else {
                unmatched.insert(v, h.clone());
            }
        }
        let destroyed = destroyed
            .iter()
            .filter(|(v, key_id)| {
                self.versions
                    .get(v)
                    .is_none_or(|m| &&m.key_id != key_id || m.state.held_by_nodes())
            })
            .map(|(v, k)| (*v, k.clone()))
            .collect();
        (held, unmatched, destroyed)
    }

    /// Starts a rotation: version `next_version` becomes pending with
    /// `key_id`. Returns the version and whether it was created (a pending
    /// rotation is returned as is; `key_id` is then unused).
    pub fn rotate(
        &mut self,
        key_id: String,
        now: u64,
    ) -> Result<(u32, bool, Vec<Event>), FleetError> {
        self.refuse_while_reconciling()?;
        if let Some((v, _)) = self.pending() {
            return Ok((v, false, Vec::new()));
        }
        let version = self.next_version;
        self.next_version = version
            .checked_add(1)
            .ok_or_else(|| FleetError::VersionsExhausted(self.name.clone()))?;
        self.versions.insert(
            version,
            VersionMeta::new(VersionState::Pending, key_id, now),
        );
        self.seq += 1;
        let events = self.advance(now);
        Ok((version, true, events))
    }

    /// The version number the next rotation will create.
    pub fn upcoming_version(&self) -> u32 {
        self.next_version
    }

    /// Active nodes that do not hold `version` (not counting those left
    /// out of a reconciliation: they are out until they agree again).
    pub fn lacking(&self, version: u32) -> Vec<String> {
        self.active()
            .filter(|(_, n)| !n.excused && !n.held.contains(&version))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn promote(&mut self, version: u32, now: u64) -> Event {
        let without = self.lacking(version);
        for meta in self.versions.values_mut() {
            if meta.state == VersionState::Primary {
                meta.state = VersionState::DecryptOnly;
                meta.changed_unix = now;
                meta.demoted_unix = Some(now);
            }
        }
        if let Some(meta) = self.versions.get_mut(&version) {
            meta.state = VersionState::Primary;
            meta.changed_unix = now;
        }
        self.seq += 1;
        Event::Promoted { version, without }
    }

    /// Promotes pending `version` now, whoever lacks it (`--force`).
    pub fn force_promote(&mut self, version: u32, now: u64) -> Result<Vec<Event>, FleetError> {
        self.refuse_while_reconciling()?;
        let name = self.name.clone();
        let meta = self.version_mut(version)?;
        if meta.state != VersionState::Pending {
            return Err(FleetError::NotPending {
                cluster: name,
                version,
                state: meta.state.as_str(),
            });
        }
        let mut events = vec![self.promote(version, now)];
        events.extend(self.advance(now));
        Ok(events)
    }

    /// Retires decrypt-only `version`: it is disabled on every node (held,
    /// Decrypt refused, restorable) until `how.grace_secs` from now, then
    /// destroyed on the nodes and then centrally ([`Cluster::advance`]).
    /// Refused while the newest census does not show it unused, unless
    /// `how.skip_census` ([`retire::check_unused`]).
    pub fn retire(
        &mut self,
        version: u32,
        now: u64,
        how: Retirement,
    ) -> Result<(Vec<Event>, u64), FleetError> {
        self.refuse_while_reconciling()?;
        let cluster = self.name.clone();
        let meta = self.version_mut(version)?;
        match meta.state {
            VersionState::Primary => return Err(FleetError::RetirePrimary { cluster, version }),
            VersionState::Pending => return Err(FleetError::RetirePending { cluster, version }),
            VersionState::Disabled => {
                return Err(FleetError::AlreadyDisabled {
                    cluster,
                    version,
                    destroy_after_unix: meta.destroy_after_unix.unwrap_or_default(),
                })
            }
            VersionState::Retiring | VersionState::Retired => {
                return Err(FleetError::AlreadyRetired {
                    cluster,
                    version,
                    state: meta.state.as_str(),
                })
            }
            VersionState::DecryptOnly => {}
        }
        if !how.skip_census {
            let (key_id, superseded) = (meta.key_id.clone(), meta.superseded_unix());
            let writers: Vec<Writer> = self
                .active()
                .map(|(name, n)| Writer {
                    node: name.clone(),
                    key_id: n.writes_key_id.clone(),
                    since_unix: n.writes_since_unix,
                })
                .collect();
            let census = self.census.as_ref().map(|c| &c.counts);
            retire::check_unused(version, &key_id, superseded, census, &writers).map_err(
                |source| FleetError::InUse {
                    cluster: cluster.clone(),
                    version,
                    source,
                },
            )?;
        }
        let destroy_after_unix = now.saturating_add(how.grace_secs);
        let meta = self.version_mut(version)?;
        meta.state = VersionState::Disabled;
        meta.changed_unix = now;
        meta.destroy_after_unix = Some(destroy_after_unix);
        self.seq += 1;
        let mut events = vec![Event::Disabled {
            version,
            destroy_after_unix,
            census_skipped: how.skip_census,
        }];
        events.extend(self.advance(now));
        Ok((events, destroy_after_unix))
    }

    /// Brings disabled `version` back to decrypt-only on every node.
    pub fn restore_version(&mut self, version: u32, now: u64) -> Result<Vec<Event>, FleetError> {
        self.refuse_while_reconciling()?;
        let cluster = self.name.clone();
        let meta = self.version_mut(version)?;
        if meta.state != VersionState::Disabled {
            return Err(FleetError::NotDisabled {
                cluster,
                version,
                state: meta.state.as_str(),
            });
        }
        meta.state = VersionState::DecryptOnly;
        meta.changed_unix = now;
        meta.destroy_after_unix = None;
        self.seq += 1;
        let mut events = vec![Event::Restored { version }];
        events.extend(self.advance(now));
        Ok(events)
    }

    /// The earliest end of a disabled version's grace period, if any.
    pub fn next_destruction(&self) -> Option<u64> {
        self.versions
            .values()
            .filter(|m| m.state == VersionState::Disabled)
            .filter_map(|m| m.destroy_after_unix)
            .min()
    }

    /// Moves the cluster forward as far as the nodes' reports allow (not
    /// at all while it reconciles: the reports are not yet trusted).
    pub fn advance(&mut self, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        if self.reconciling.is_some() {
            return events;
        }
        if let Some((v, _)) = self.pending() {
            if self.lacking(v).is_empty() {
                events.push(self.promote(v, now));
            }
        }
        let mut grace_over = false;
        for (&v, meta) in self.versions.iter_mut() {
            // A disabled version without a time (a record made by hand)
            // waits for the operator rather than going at once.
            let due = meta.state == VersionState::Disabled
                && meta.destroy_after_unix.is_some_and(|t| t <= now);
            if due {
                meta.state = VersionState::Retiring;
                meta.changed_unix = now;
                grace_over = true;
                events.push(Event::GraceOver { version: v });
            }
        }
        if grace_over {
            self.seq += 1;
        }
        let retiring: Vec<u32> = self
            .versions
            .iter()
            .filter(|(_, m)| m.state == VersionState::Retiring)
            .map(|(v, _)| *v)
            .collect();
        for v in retiring {
            if self.active().all(|(_, n)| !n.held.contains(&v)) {
                if let Some(meta) = self.versions.get_mut(&v) {
                    meta.state = VersionState::Retired;
                    meta.changed_unix = now;
                }
                events.push(Event::Destroyed { version: v });
            }
        }
        events
    }

    /// What `node` must converge to.
    pub fn desired(&self, node: &str) -> Desired {
        if self.reconciling.is_some() {
            return Desired {
                seq: self.seq,
                versions: Vec::new(),
                retired: Vec::new(),
                reconciling: true,
                wanted: self.wanted_from(node),
            };
        }
        let held = self.nodes.get(node).map(|n| &n.held);
        let has = |v: u32| held.is_some_and(|h| h.contains(&v));
        Desired {
            reconciling: false,
            wanted: Vec::new(),
            seq: self.seq,
            versions: self
                .versions
                .iter()
                .filter(|(_, m)| m.state.held_by_nodes())
                .map(|(&version, m)| DesiredVersion {
                    version,
                    state: m.state,
                    key_id: m.key_id.clone(),
                    needs_key: !has(version),
                    destroy_after_unix: m.destroy_after_unix,
                })
                .collect(),
            retired: self
                .versions
                .iter()
                .filter(|(_, m)| !m.state.held_by_nodes())
                .map(|(&v, m)| (v, m.key_id.clone()))
                .collect(),
        }
    }

    /// Whether `node` lacks anything the server has published.
    pub fn behind(&self, node: &str) -> bool {
        let Some(rec) = self.nodes.get(node) else {
            return false;
        };
        if rec.state != NodeState::Active {
            return false;
        }
        rec.applied_seq < self.seq
            || self
                .versions
                .iter()
                .any(|(v, m)| m.state.held_by_nodes() && !rec.held.contains(v))
    }

    /// How far the rotation to `version` has come; `left_out` are the
    /// nodes a forced promotion went without.
    pub fn progress(&self, version: u32, left_out: &[String]) -> Result<Progress, FleetError> {
        let meta = self
            .versions
            .get(&version)
            .ok_or(FleetError::UnknownVersion {
                cluster: self.name.clone(),
                version,
            })?;
        let active = || self.active().map(|(name, n)| (name.clone(), n));
        Ok(match meta.state {
            VersionState::Pending => {
                let (holding, missing): (Vec<_>, Vec<_>) =
                    active().partition(|(_, n)| n.held.contains(&version));
                Progress::Pending {
                    holding: holding.into_iter().map(|(name, _)| name).collect(),
                    missing: missing.into_iter().map(|(name, _)| name).collect(),
                }
            }
            VersionState::Primary => {
                let (serving, waiting): (Vec<_>, Vec<_>) = active()
                    .filter(|(name, _)| !left_out.contains(name))
                    .partition(|(_, n)| n.primary == version);
                if waiting.is_empty() {
                    Progress::Settled
                } else {
                    Progress::Primary {
                        serving: serving.into_iter().map(|(name, _)| name).collect(),
                        waiting: waiting.into_iter().map(|(name, _)| name).collect(),
                    }
                }
            }
            state => Progress::Gone(state),
        })
    }

    /// Whether a forced promotion of pending `version` need wait no
    /// longer: no node that `is_connected` still lacks it (connected nodes
    /// ack within moments; unreachable ones are what forcing is for).
    pub fn only_unreachable_lack(&self, version: u32, is_connected: impl Fn(&str) -> bool) -> bool {
        self.active()
            .all(|(name, n)| n.held.contains(&version) || !is_connected(name))
    }

    /// Age of the oldest pending delivery some active node has not acked.
    pub fn oldest_unacked_since(&self) -> Option<u64> {
        let (v, meta) = self.pending()?;
        (!self.lacking(v).is_empty()).then_some(meta.created_unix)
    }
}

mod reconcile;
pub use reconcile::{Clash, Reconciling};

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, secret: &str, expires: u64) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_sha256: token_hash(secret),
            expires_unix: expires,
            used: false,
        }
    }

    /// Cluster "a" with active nodes n1 and n2, both holding v1.
    fn two_nodes() -> Cluster {
        let mut c = Cluster::new("a", "a/v1/x".into(), 100);
        for n in ["n1", "n2"] {
            c.invite(n, token(n, &format!("s-{n}"), 1000)).unwrap();
            c.join(n, &format!("s-{n}"), 110, format!("cert-{n}"), "pk".into())
                .unwrap();
            c.report(n, Report::legacy([1].into(), 1, 1), 120).unwrap();
        }
        c
    }

    fn states(c: &Cluster) -> Vec<(u32, &'static str)> {
        c.versions
            .iter()
            .map(|(v, m)| (*v, m.state.as_str()))
            .collect()
    }

    #[test]
    fn tokens_work_once_before_expiry_for_their_node() {
        let mut c = Cluster::new("a", "a/v1/x".into(), 100);
        c.invite("n1", token("t1", "secret", 200)).unwrap();
        assert_eq!(c.check_token("n1", "wrong", 150), Err(FleetError::BadToken));
        assert_eq!(
            c.check_token("n2", "secret", 150),
            Err(FleetError::BadToken)
        );
        assert_eq!(
            c.check_token("n1", "secret", 200),
            Err(FleetError::TokenExpired { expired_unix: 200 })
        );
        c.join("n1", "secret", 150, "c".into(), "pk".into())
            .unwrap();
        assert_eq!(
            c.join("n1", "secret", 151, "c2".into(), "pk".into()),
            Err(FleetError::TokenUsed)
        );
        assert!(matches!(
            c.invite("n1", token("t2", "s2", 300)),
            Err(FleetError::AlreadyEnrolled { .. })
        ));
        assert_eq!(c.authorize("n1", "c"), Ok(()));
        assert!(matches!(
            c.authorize("n1", "other"),
            Err(FleetError::StaleCertificate { .. })
        ));
    }

    #[test]
    fn invalidated_tokens_are_refused_and_new_ones_work() {
        let mut c = two_nodes();
        c.invite("n3", token("t3", "s3", 1000)).unwrap();
        assert_eq!(c.invalidate_unused_tokens(), ["n3"]);
        assert_eq!(c.check_token("n3", "s3", 150), Err(FleetError::BadToken));
        // Active nodes keep their records; a new invitation works.
        assert_eq!(c.authorize("n1", "cert-n1"), Ok(()));
        c.invite("n3", token("t4", "s4", 1000)).unwrap();
        assert_eq!(c.check_token("n3", "s4", 150), Ok(()));
    }

    #[test]
    fn revoked_nodes_are_refused_and_can_be_invited_again() {
        let mut c = two_nodes();
        c.revoke("n2", 130).unwrap();
        assert!(matches!(
            c.authorize("n2", "cert-n2"),
            Err(FleetError::Revoked { .. })
        ));
        c.invite("n2", token("t3", "again", 1000)).unwrap();
        // The old certificate stays refused after re-invitation.
        assert!(matches!(
            c.authorize("n2", "cert-n2"),
            Err(FleetError::NotJoined { .. })
        ));
    }

    #[test]
    fn rotation_waits_for_every_active_node() {
        let mut c = two_nodes();
        let seq = c.seq;
        let (v, created, events) = c.rotate("a/v2/y".into(), 200).unwrap();
        assert_eq!((v, created), (2, true));
        assert!(events.is_empty());
        assert_eq!(c.seq, seq + 1);
        assert_eq!(states(&c), [(1, "primary"), (2, "pending")]);
        // A second rotate returns the pending one.
        assert_eq!(c.rotate("a/v3/z".into(), 201).unwrap().0, 2);

        let d = c.desired("n1");
        assert!(d.versions.iter().any(|dv| dv.version == 2 && dv.needs_key));
        assert!(d.versions.iter().all(|dv| dv.version != 1 || !dv.needs_key));

        let events = c
            .report("n1", Report::legacy([1, 2].into(), c.seq, 1), 210)
            .unwrap();
        assert_eq!(
            events,
            [Event::Acked {
                node: "n1".into(),
                version: 2
            }]
        );
        assert_eq!(c.pending().map(|p| p.0), Some(2));
        assert_eq!(c.lacking(2), ["n2"]);
        assert!(c.oldest_unacked_since().is_some());

        let events = c
            .report("n2", Report::legacy([1, 2].into(), c.seq, 1), 220)
            .unwrap();
        assert!(events.contains(&Event::Promoted {
            version: 2,
            without: vec![]
        }));
        assert_eq!(states(&c), [(1, "decrypt-only"), (2, "primary")]);
        assert!(c.behind("n1") && c.behind("n2"));
        c.report("n1", Report::legacy([1, 2].into(), c.seq, 2), 230)
            .unwrap();
        assert!(!c.behind("n1"));
        assert_eq!(c.oldest_unacked_since(), None);
    }

    #[test]
    fn invited_and_revoked_nodes_do_not_hold_up_promotion() {
        let mut c = two_nodes();
        c.invite("n3", token("t3", "s3", 1000)).unwrap();
        c.rotate("a/v2/y".into(), 200).unwrap();
        c.report("n1", Report::legacy([1, 2].into(), c.seq, 1), 210)
            .unwrap();
        let events = c.revoke("n2", 220).unwrap();
        assert!(matches!(events[..], [Event::Promoted { version: 2, .. }]));
    }

    #[test]
    fn a_cluster_without_nodes_promotes_at_once() {
        let mut c = Cluster::new("a", "a/v1/x".into(), 100);
        let (v, _, events) = c.rotate("a/v2/y".into(), 200).unwrap();
        assert_eq!(
            events,
            [Event::Promoted {
                version: v,
                without: vec![]
            }]
        );
    }

    #[test]
    fn force_promotion_names_the_stale_nodes() {
        let mut c = two_nodes();
        c.rotate("a/v2/y".into(), 200).unwrap();
        c.report("n1", Report::legacy([1, 2].into(), c.seq, 1), 210)
            .unwrap();
        let events = c.force_promote(2, 220).unwrap();
        assert_eq!(
            events,
            [Event::Promoted {
                version: 2,
                without: vec!["n2".into()]
            }]
        );
        assert!(matches!(
            c.force_promote(2, 230),
            Err(FleetError::NotPending { .. })
        ));
        // n2 still gets the key, now as primary.
        let d = c.desired("n2");
        assert!(d
            .versions
            .iter()
            .any(|dv| dv.version == 2 && dv.needs_key && dv.state == VersionState::Primary));
    }

    #[test]
    fn retirement_refuses_primary_and_pending_and_waits_for_every_node() {
        let mut c = two_nodes();
        assert!(matches!(
            c.retire(1, 150, Retirement::AT_ONCE),
            Err(FleetError::RetirePrimary { .. })
        ));
        assert!(matches!(
            c.retire(9, 150, Retirement::AT_ONCE),
            Err(FleetError::UnknownVersion { .. })
        ));
        c.rotate("a/v2/y".into(), 200).unwrap();
        assert!(matches!(
            c.retire(2, 150, Retirement::AT_ONCE),
            Err(FleetError::RetirePending { .. })
        ));
        for n in ["n1", "n2"] {
            c.report(n, Report::legacy([1, 2].into(), c.seq, 1), 210)
                .unwrap();
        }
        let (events, destroy_after) = c.retire(1, 300, Retirement::AT_ONCE).unwrap();
        assert_eq!(destroy_after, 300);
        assert!(events.contains(&Event::GraceOver { version: 1 }));
        assert_eq!(c.desired("n1").retired, [(1, "a/v1/x".to_owned())]);
        assert!(c.desired("n1").versions.iter().all(|dv| dv.version != 1));
        assert!(
            c.report("n1", Report::legacy([2].into(), c.seq, 2), 310)
                .unwrap()
                == [Event::Dropped {
                    node: "n1".into(),
                    version: 1
                }]
        );
        let events = c
            .report("n2", Report::legacy([2].into(), c.seq, 2), 320)
            .unwrap();
        assert!(events.contains(&Event::Destroyed { version: 1 }));
        assert_eq!(states(&c), [(1, "retired"), (2, "primary")]);
        assert!(matches!(
            c.retire(1, 330, Retirement::AT_ONCE),
            Err(FleetError::AlreadyRetired { .. })
        ));
    }

    #[test]
    fn a_new_census_or_a_switch_of_the_apiserver_is_not_mere_progress() {
        let mut c = two_nodes();
        let mut r = Report::legacy([1].into(), c.seq, 1);
        c.report("n1", r.clone(), 200).unwrap();
        assert!(c.note_progress("n1", &r, 201));
        r.writes_key_id = "a/v1/x".into();
        assert!(!c.note_progress("n1", &r, 202), "a switch is committed");
        c.report("n1", r.clone(), 202).unwrap();
        assert!(c.note_progress("n1", &r, 203));
        r.census = Some(CensusCounts {
            taken_unix: 203,
            ..CensusCounts::default()
        });
        assert!(
            !c.note_progress("n1", &r, 203),
            "a newer census is committed"
        );
        c.report("n1", r.clone(), 203).unwrap();
        assert_eq!(c.census().unwrap().counts.taken_unix, 203);
        assert!(
            c.note_progress("n1", &r, 204),
            "the same census again is progress"
        );
    }

    #[test]
    fn version_numbers_are_never_reused() {
        let mut c = Cluster::new("a", "a/v1/x".into(), 100);
        c.rotate("a/v2/y".into(), 200).unwrap();
        c.retire(1, 210, Retirement::AT_ONCE).unwrap();
        let (v, ..) = c.rotate("a/v3/z".into(), 220).unwrap();
        assert_eq!(v, 3);
        assert_eq!(c.upcoming_version(), 4);
    }

    #[test]
    fn versions_nodes_hold_from_before_a_restore_are_never_minted_again() {
        let mut c = two_nodes();
        // The service was restored to before it issued v2 and v3.
        c.report("n1", Report::legacy([1, 2, 3].into(), c.seq, 3), 300)
            .unwrap();
        assert_eq!(c.upcoming_version(), 4);
        // A report cannot push numbers arbitrarily far.
        c.report("n2", Report::legacy([1, 1_000_000].into(), c.seq, 1), 310)
            .unwrap();
        assert_eq!(c.upcoming_version(), 4);
    }

    #[test]
    fn records_round_trip_through_json() {
        let c = two_nodes();
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            !text.contains("s-n1"),
            "token secrets are stored only hashed"
        );
        let back: Cluster = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
    }
}

/// Strategies for [`Cluster`] records, for this and other crates' tests.
#[cfg(any(test, feature = "strategies"))]
pub mod proptests;
