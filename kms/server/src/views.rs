//! What operators and metrics read: `kmsctl status`, a rotation's
//! progress, and the gauges `/metrics` computes at scrape time. Read only.

use std::collections::BTreeMap;

use edgekms_core::keyid;
use edgekms_core::rotation::cluster::{Cluster, NodeState, Progress};
use edgekms_daemon::config::now_unix;
use edgekms_proto::fleet as pb;

use crate::error::ServerError;
use crate::Central;

impl Central {
    /// `kmsctl status`: every cluster, or the one named.
    pub fn status(&self, only: &str) -> Result<pb::StatusResponse, ServerError> {
        // Replicated: the live replicas (read once), and the nodes with a
        // stream open to any of them.
        let (alive, elsewhere) = match &self.replication {
            Some(store) => {
                let alive = store.alive()?;
                let open = store.open_streams(&alive)?;
                (alive, open)
            }
            None => Default::default(),
        };
        let clusters = if only.is_empty() {
            self.commit
                .read_all(|all| all.map(|c| self.cluster_status(c, &elsewhere)).collect())
        } else {
            keyid::validate_name(only)?;
            vec![self
                .commit
                .read(only, |c| self.cluster_status(c, &elsewhere))?]
        };
        Ok(pb::StatusResponse {
            clusters,
            server_time_unix: now_unix(),
            replicas: self.replica_status(&alive)?,
            answered_by: self
                .replication()
                .and_then(|s| s.replica_name())
                .unwrap_or_default(),
            store: if self.replication().is_some() {
                "etcd"
            } else {
                "rocksdb"
            }
            .into(),
        })
    }

    fn cluster_status(
        &self,
        c: &Cluster,
        elsewhere: &std::collections::HashSet<(String, String)>,
    ) -> pb::ClusterStatus {
        pb::ClusterStatus {
            name: c.name().to_owned(),
            seq: c.seq(),
            primary: c.primary().map(|p| p.0).unwrap_or(0),
            pending: c.pending().map(|p| p.0).unwrap_or(0),
            versions: c
                .versions()
                .iter()
                .map(|(&version, m)| pb::VersionStatus {
                    version,
                    state: m.state.as_str().into(),
                    key_id: m.key_id.clone(),
                    created_unix: m.created_unix,
                    held_by: c.holders(version).len() as u32,
                    destroy_after_unix: m.destroy_after_unix.unwrap_or_default(),
                    demoted_unix: m.demoted_unix.unwrap_or_default(),
                })
                .collect(),
            nodes: c
                .nodes()
                .iter()
                .map(|(name, n)| pb::NodeStatus {
                    name: name.clone(),
                    state: n.state.as_str().into(),
                    connected: self.streams.is_open(c.name(), name)
                        || elsewhere.contains(&(c.name().to_owned(), name.clone())),
                    last_contact_unix: n.last_contact_unix,
                    held: n.held.iter().copied().collect(),
                    primary: n.primary,
                    applied_seq: n.applied_seq,
                    behind: c.behind(name),
                    token_expires_unix: match n.state {
                        NodeState::Invited => n.token.as_ref().map(|t| t.expires_unix).unwrap_or(0),
                        _ => 0,
                    },
                    excused: n.excused,
                    writes_key_id: n.writes_key_id.clone(),
                    writes_since_unix: n.writes_since_unix,
                })
                .collect(),
            census: c.census().map(|r| pb::Census {
                taken_unix: r.counts.taken_unix,
                under: r
                    .counts
                    .under
                    .iter()
                    .flat_map(|(key_id, per)| {
                        per.iter()
                            .map(|(res, n)| edgekms_proto::convert::census_count(key_id, res, *n))
                    })
                    .collect(),
                ..Default::default()
            }),
            census_node: c.census().map(|r| r.node.clone()).unwrap_or_default(),
            reconciling: c.reconciling().is_some(),
            reconciling_reason: c
                .reconciling()
                .map(|r| r.reason.clone())
                .unwrap_or_default(),
            reconciling_since_unix: c.reconciling().map_or(0, |r| r.since_unix),
            reconciling_waiting_for: c.reconcile_waiting(),
            reconciling_wanted: match c.reconciling() {
                Some(_) => c
                    .wanted()
                    .into_iter()
                    .map(|(version, key_id)| pb::KeyRef { version, key_id })
                    .collect(),
                None => Vec::new(),
            },
            clashes: c
                .clashes()
                .into_iter()
                .map(|x| pb::Clash {
                    node: x.node,
                    version: x.version,
                    service_key_id: x.service_key_id,
                    node_key_id: x.node_key_id,
                })
                .collect(),
        }
    }

    /// What the metrics gauges show, gathered in one pass.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            nodes: BTreeMap::from([("invited", 0), ("active", 0), ("revoked", 0)]),
            ..Gauges::default()
        };
        let mut oldest: Option<u64> = None;
        self.commit.read_all(|all| {
            for c in all {
                for n in c.nodes().values() {
                    *g.nodes.entry(n.state.as_str()).or_insert(0) += 1;
                }
                if c.pending().is_some() {
                    g.pending += 1;
                }
                if c.reconciling().is_some() {
                    g.reconciling += 1;
                }
                g.clashes += c.clashes().len() as u64;
                if let Some(since) = c.oldest_unacked_since() {
                    oldest = Some(oldest.map_or(since, |o| o.min(since)));
                }
            }
        });
        g.nodes.insert("connected", self.streams.count() as u64);
        g.oldest_unacked = oldest.map_or(0, |since| now_unix().saturating_sub(since));
        g
    }
}

/// The metrics gauges' values.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Nodes per state, and those with a stream open (`connected`).
    pub nodes: BTreeMap<&'static str, u64>,
    /// Clusters with a rotation pending.
    pub pending: u64,
    /// Age of the oldest un-acked delivery, seconds.
    pub oldest_unacked: u64,
    /// Clusters reconciling.
    pub reconciling: u64,
    /// (node, version) pairs held under another key than the service's.
    pub clashes: u64,
}

/// A rotation's progress as `kmsctl` receives it; `done` once settled or
/// gone.
pub fn progress_message(
    version: u32,
    progress: &Progress,
    stale: &[String],
    state: String,
) -> pb::RotationProgress {
    let base = pb::RotationProgress {
        version,
        stale_nodes: stale.to_vec(),
        state,
        ..Default::default()
    };
    match progress {
        Progress::Pending { holding, missing } => pb::RotationProgress {
            phase: "pending".into(),
            holding: holding.clone(),
            missing: missing.clone(),
            ..base
        },
        Progress::Primary { serving, waiting } => pb::RotationProgress {
            phase: "primary".into(),
            serving: serving.clone(),
            waiting: waiting.clone(),
            ..base
        },
        Progress::Settled => pb::RotationProgress {
            phase: "settled".into(),
            done: true,
            ..base
        },
        Progress::Gone(_) => pb::RotationProgress {
            phase: "gone".into(),
            done: true,
            ..base
        },
    }
}
