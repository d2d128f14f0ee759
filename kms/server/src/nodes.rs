//! What nodes do: join with a token, report what they hold, and receive
//! over their sync stream the state they must converge to, with every KEK
//! version they lack wrapped to their delivery key. The open streams are
//! registered here ([`Streams`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use edgekms_core::delivery;
use edgekms_core::keyid;
use edgekms_core::rotation::cluster::{FleetError, Report};
use edgekms_daemon::config::now_unix;
use edgekms_daemon::pki;
use edgekms_proto::fleet as pb;

use edgekms_hsm::Key256;

use crate::audit::AuditRecord;
use crate::error::ServerError;
use crate::state_store::Op;
use crate::Central;

/// The open node streams: `(cluster, node)` -> stream id. The newest
/// stream of a node wins; an older one closing does not unregister it.
#[derive(Default)]
pub struct Streams {
    open: Mutex<HashMap<(String, String), u64>>,
    next: AtomicU64,
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), u64>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_open(&self, cluster: &str, node: &str) -> bool {
        self.lock()
            .contains_key(&(cluster.to_owned(), node.to_owned()))
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

/// What was last sent on one stream: the cluster's seq, what the node
/// held then and what was asked of it. Nothing is sent again until one of
/// them moves.
pub type LastSent = Option<(u64, BTreeSet<u32>, Vec<(u32, String)>)>;

impl Central {
    /// Enrols a node. Returns `(certificate DER, CA DER)`.
    pub fn join(
        &self,
        peer: SocketAddr,
        req: &pb::JoinRequest,
    ) -> Result<(Vec<u8>, Vec<u8>), ServerError> {
        // Names first: a refused name reaches no record, no log line.
        let result = keyid::validate_name(&req.cluster)
            .and_then(|()| keyid::validate_name(&req.node))
            .map_err(ServerError::from)
            .and_then(|()| self.join_checked(req));
        let actor = format!("node at {peer}");
        match &result {
            Ok(_) => self.audit.record(
                AuditRecord::new("enrol", &actor)
                    .cluster(&req.cluster)
                    .node(&req.node),
            ),
            // Anyone can call Join: failures are counted per peer.
            Err(e) => self.audit.refused(Some(peer), "join", e.class(), || {
                let rec = AuditRecord::new("enrol", &actor).result(&e.to_string());
                if matches!(e, ServerError::Name(_)) {
                    rec
                } else {
                    rec.cluster(&req.cluster).node(&req.node)
                }
            }),
        }
        result
    }

    fn join_checked(&self, req: &pb::JoinRequest) -> Result<(Vec<u8>, Vec<u8>), ServerError> {
        let (id, secret) = req.token.split_once('.').ok_or(FleetError::BadToken)?;
        let (cluster, node) = self.commit.token(id).ok_or(FleetError::BadToken)?;
        // The secret first, even for a token of another node: a forged
        // token learns nothing.
        self.commit
            .read(&cluster, |c| c.check_token(&node, secret, now_unix()))??;
        if (cluster.as_str(), node.as_str()) != (req.cluster.as_str(), req.node.as_str()) {
            return Err(FleetError::TokenForOtherNode {
                expected: format!("{cluster}/{node}"),
                requested: format!("{}/{}", req.cluster, req.node),
            }
            .into());
        }
        delivery::check_public_key(&req.delivery_public_key)?;
        let cert = self.ca.sign_node_csr(&req.csr_der, &cluster, &node)?;
        let fingerprint = pki::fingerprint(&cert);
        let public = hex::encode(&req.delivery_public_key);
        self.mutate(&cluster, |c, _| {
            c.join(
                &node,
                secret,
                now_unix(),
                fingerprint.clone(),
                public.clone(),
            )?;
            Ok(((), Vec::new()))
        })?;
        // The token stays known, so a second use is refused as "already
        // used".
        Ok((cert, self.ca.cert_der.clone()))
    }

    /// Checks that `cert_sha256` ([`pki::fingerprint`] of the peer's
    /// certificate) is the live certificate of an active node.
    pub fn authorize_node(
        &self,
        cluster: &str,
        node: &str,
        cert_sha256: &str,
    ) -> Result<(), ServerError> {
        self.commit
            .read(cluster, |c| c.authorize(node, cert_sha256))??;
        Ok(())
    }

    /// Registers an open stream; returns its id.
    pub fn connect(&self, cluster: &str, node: &str) -> u64 {
        let id = self.streams.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.streams
            .lock()
            .insert((cluster.to_owned(), node.to_owned()), id);
        if let Some(store) = &self.replication {
            store.note_stream(cluster, node, true);
        }
        id
    }

    /// Unregisters stream `id` and notes the node's last contact (view
    /// only: see [`crate::commit`]).
    pub fn disconnect(&self, cluster: &str, node: &str, id: u64) {
        let mut open = self.streams.lock();
        let key = (cluster.to_owned(), node.to_owned());
        if open.get(&key) == Some(&id) {
            open.remove(&key);
            if let Some(store) = &self.replication {
                store.note_stream(cluster, node, false);
            }
        }
        drop(open);
        self.commit.absorb(cluster, |c| c.touch(node, now_unix()));
    }

    /// A node's report. One that changes what the node holds is committed;
    /// one that only moves its progress (`applied_seq`, `primary`) is
    /// absorbed into the view (see [`crate::commit`]). Keys it returns
    /// (asked for while the cluster reconciles) are checked against their
    /// key_ids and taken in the same commit as the version's record.
    pub fn report(
        &self,
        cluster: &str,
        node: &str,
        report: &pb::NodeReport,
    ) -> Result<(), ServerError> {
        let parsed = edgekms_proto::convert::report(cluster, report)
            .map_err(|e| ServerError::InvalidArgument(e.to_string()))?;
        // Replicated, progress that moved is committed: the other
        // replicas' views (their status, `rotate --wait`) see it only
        // through the store. A report that moved nothing is absorbed.
        let shared = self.replication.is_some();
        let absorbed = report.returned.is_empty()
            && self
                .commit
                .absorb(cluster, |c| {
                    let moved = c.nodes().get(node).is_some_and(|n| {
                        (n.applied_seq, n.primary) != (parsed.applied_seq, parsed.primary)
                    });
                    !(shared && moved) && c.note_progress(node, &parsed, now_unix())
                })
                .ok_or_else(|| FleetError::UnknownCluster(cluster.to_owned()))?;
        if absorbed {
            return Ok(());
        }
        let result = self.commit_report(cluster, node, parsed, &report.returned);
        if let Err(e) = &result {
            if !report.returned.is_empty() {
                // A refused key is worth a record: a node returning keys
                // the service cannot check is broken or hostile.
                self.audit.record(
                    AuditRecord::new("heal", &format!("node {cluster}/{node}"))
                        .cluster(cluster)
                        .node(node)
                        .result(&e.to_string()),
                );
            }
        }
        result
    }

    fn commit_report(
        &self,
        cluster: &str,
        node: &str,
        parsed: Report,
        returned_keys: &[pb::ReturnedKey],
    ) -> Result<(), ServerError> {
        let mut returned = Vec::with_capacity(returned_keys.len());
        for r in returned_keys {
            let binding = delivery::Binding {
                cluster,
                node,
                version: r.version,
                key_id: &r.key_id,
            };
            let key = self
                .service_key
                .open_returned(binding, &r.wrapped_key)
                .map_err(|e| ServerError::InvalidArgument(format!("returned key refused: {e}")))?;
            returned.push((r.version, r.key_id.clone(), key));
        }
        self.mutate(cluster, |c, ops| {
            let now = now_unix();
            let mut events = c.report(node, parsed.clone(), now)?;
            for (version, key_id, key) in &returned {
                events.extend(c.adopt_returned(node, *version, key_id, now)?);
                ops.push(Op::PutKek {
                    cluster: c.name().to_owned(),
                    version: *version,
                    key_id: key_id.clone(),
                    key: Key256::from_bytes(key.expose()),
                });
            }
            Ok(((), events))
        })?;
        Ok(())
    }

    /// The next message for a node's stream, if it needs one: the cluster
    /// state, with every version the node lacks wrapped to it.
    pub fn next_message(
        &self,
        cluster: &str,
        node: &str,
        last: &mut LastSent,
    ) -> Result<Option<pb::ClusterState>, ServerError> {
        let found = self.commit.read(cluster, |c| {
            let rec = c.node(node)?;
            let wanted = c.wanted_from(node);
            let key = (c.seq(), rec.held.clone(), wanted);
            if last.as_ref() == Some(&key) {
                return None;
            }
            let settled = c.settled_for(node) && c.reconciling().is_none();
            *last = Some(key);
            (!settled).then(|| {
                (
                    c.desired(node),
                    rec.delivery_public_key.clone(),
                    rec.held.clone(),
                )
            })
        })?;
        let Some((desired, public, held_now)) = found else {
            return Ok(None);
        };
        if desired.reconciling {
            // Nothing to apply while the service is not sure of its state:
            // a heartbeat, so that no node (of any version) acts on it.
            let ask = |(version, key_id)| pb::KeyRef { version, key_id };
            return Ok(Some(pb::ClusterState {
                heartbeat: true,
                reconciling: true,
                wanted: desired.wanted.into_iter().map(ask).collect(),
                service_delivery_key: self.service_key.public_key().into(),
                ..Default::default()
            }));
        }
        let public = hex::decode(&public).map_err(|_| delivery::DeliveryError::BadPublicKey)?;
        let mut versions = Vec::with_capacity(desired.versions.len());
        for dv in desired.versions {
            // `desired` lists only states nodes hold; the others go as
            // retired numbers.
            let Some(state) = edgekms_proto::convert::wire_state(dv.state) else {
                continue;
            };
            let mut wrapped = Vec::new();
            if dv.needs_key && !held_now.contains(&dv.version) {
                let kek = self.commit.kek(cluster, dv.version, &dv.key_id)?.ok_or(
                    FleetError::UnknownVersion {
                        cluster: cluster.to_owned(),
                        version: dv.version,
                    },
                )?;
                let binding = delivery::Binding {
                    cluster,
                    node,
                    version: dv.version,
                    key_id: &dv.key_id,
                };
                wrapped = delivery::wrap(&public, binding, &kek)?;
                self.audit.record(
                    AuditRecord::new("delivery", "server")
                        .cluster(cluster)
                        .node(node)
                        .version(dv.version),
                );
            }
            versions.push(pb::VersionEntry {
                version: dv.version,
                state: state as i32,
                key_id: dv.key_id,
                wrapped_key: wrapped.into(),
                destroy_after_unix: dv.destroy_after_unix.unwrap_or_default(),
            });
        }
        Ok(Some(pb::ClusterState {
            seq: desired.seq,
            versions,
            retired: desired.retired.iter().map(|(v, _)| *v).collect(),
            retired_keys: desired
                .retired
                .into_iter()
                .map(|(version, key_id)| pb::KeyRef { version, key_id })
                .collect(),
            ..Default::default()
        }))
    }
}
