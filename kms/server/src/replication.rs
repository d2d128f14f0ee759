//! Replicas of a service on etcd: serving as one, inviting, admitting and
//! removing them, listing them, and which one runs the once-only jobs.
//! The records and their rules live in [`crate::etcd::replicas`].
//!
//! A new replica receives the root key the way a node receives a KEK:
//! wrapped to a one-time P-256 key it made ([`edgekms_core::delivery`]),
//! bound to its name, over TLS it checked against the CA pin. It seals the
//! root key with its own sealer; the CA key and every KEK stay in etcd,
//! wrapped by the root key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgekms_core::delivery::{self, Binding};
use edgekms_core::keyid;
use edgekms_core::rotation::cluster::token_hash;
use edgekms_hsm::Key256;
use edgekms_proto::fleet as pb;

use crate::audit::AuditRecord;
use crate::error::ServerError;
use crate::etcd::replicas::{Alive, ReplicaError, ReplicaState};
use crate::etcd::{EtcdStore, ServerReplicaError};
use crate::{now_unix, Central};

/// What binds a wrapped root key to the replica it was issued for.
pub const ROOT_BINDING_CLUSTER: &str = "replica";

pub fn root_binding<'a>(name: &'a str, key_id: &'a str) -> Binding<'a> {
    Binding {
        cluster: ROOT_BINDING_CLUSTER,
        node: name,
        version: 0,
        key_id,
    }
}

/// At most this many names in a replica's server certificate.
const MAX_SERVER_NAMES: usize = 32;

/// What `kmsctl replica add` gets.
#[derive(Debug, Clone)]
pub struct ReplicaInvitation {
    pub token: String,
    pub expires_unix: u64,
    pub ca_hash: String,
    pub prefix: String,
}

impl From<ServerReplicaError> for ServerError {
    fn from(e: ServerReplicaError) -> Self {
        match e {
            ServerReplicaError::Store(e) => e.into(),
            ServerReplicaError::Replica(
                e @ (ReplicaError::BadToken | ReplicaError::Expired(_)),
            ) => ServerError::PermissionDenied(e.to_string()),
            ServerReplicaError::Replica(e @ ReplicaError::Unknown(_)) => {
                ServerError::InvalidArgument(e.to_string())
            }
            ServerReplicaError::Replica(e) => ServerError::FailedPrecondition(e.to_string()),
        }
    }
}

impl Central {
    /// Serves `store` as replica `name` (advertising `address`): binds
    /// the replica (its writes are conditioned on it from now on), follows
    /// what other replicas change, and starts its heartbeat and election.
    pub fn load_replica(
        store: Arc<EtcdStore>,
        root: Key256,
        name: &str,
        address: String,
    ) -> Result<Self, ServerError> {
        store.bind(name)?;
        store.start_following()?;
        let mut core = Central::load(store.clone(), root)?;
        core.leadership = store.start_liveness(name, address);
        core.replication = Some(store);
        Ok(core)
    }

    /// Whether this process runs the once-only jobs (automatic rotation,
    /// audit retention, scheduled destruction) now.
    pub fn leads(&self) -> bool {
        self.leadership.is_leader()
    }

    /// The etcd store, in replicated mode.
    pub fn replication(&self) -> Option<&Arc<EtcdStore>> {
        self.replication.as_ref()
    }

    /// Why this replica is not ready, if it is not: etcd without quorum.
    pub fn store_health(&self) -> Result<(), String> {
        match &self.replication {
            Some(store) => store.health(),
            None => Ok(()),
        }
    }

    fn replicated(&self) -> Result<&Arc<EtcdStore>, ServerError> {
        self.replication
            .as_ref()
            .ok_or_else(|| ServerError::FailedPrecondition(ReplicaError::NotReplicated.to_string()))
    }

    /// `kmsctl replica add NAME`: a one-time token for a new replica.
    pub fn add_replica(
        &self,
        actor: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<ReplicaInvitation, ServerError> {
        self.check_names("replica-invite", actor, &[name])?;
        let rec = AuditRecord::new("replica-invite", actor).detail(format!("replica {name}"));
        let result = (|| -> Result<ReplicaInvitation, ServerError> {
            let store = self.replicated()?;
            let now = now_unix();
            let expires_unix = now
                .checked_add(ttl.as_secs())
                .ok_or_else(|| ServerError::InvalidArgument("token lifetime too long".into()))?;
            let secret = hex::encode(rand::random::<[u8; 20]>());
            store.invite_replica(name, &token_hash(&secret), now, expires_unix)?;
            Ok(ReplicaInvitation {
                token: format!("{name}.{secret}"),
                expires_unix,
                ca_hash: self.ca_hash.clone(),
                prefix: store.prefix().to_owned(),
            })
        })();
        match &result {
            Ok(inv) => self
                .audit
                .record(rec.result(&format!("ok; token expires at {}", inv.expires_unix))),
            Err(e) => self.audit.record(rec.result(&e.to_string())),
        }
        result
    }

    /// `kmsctl replica remove NAME`.
    pub fn remove_replica(&self, actor: &str, name: &str) -> Result<(), ServerError> {
        self.check_names("replica-remove", actor, &[name])?;
        let result = self
            .replicated()
            .and_then(|s| s.remove_replica(name).map_err(ServerError::from));
        let rec = AuditRecord::new("replica-remove", actor).detail(format!("replica {name}"));
        self.audit.record(match &result {
            Ok(()) => rec,
            Err(e) => rec.result(&e.to_string()),
        });
        result
    }

    /// `edgekms-server join`: admits a replica with its token, issues its
    /// server certificate, and returns the root key wrapped to it.
    pub fn join_replica(
        &self,
        peer: SocketAddr,
        req: &pb::JoinReplicaRequest,
    ) -> Result<pb::JoinReplicaResponse, ServerError> {
        let result = self.join_replica_checked(req);
        let actor = format!("replica at {peer}");
        match &result {
            Ok(resp) => self.audit.record(
                AuditRecord::new("replica-join", &actor).detail(format!("replica {}", resp.name)),
            ),
            Err(e) => self
                .audit
                .refused(Some(peer), "replica join", e.class(), || {
                    AuditRecord::new("replica-join", &actor).result(&e.to_string())
                }),
        }
        result
    }

    fn join_replica_checked(
        &self,
        req: &pb::JoinReplicaRequest,
    ) -> Result<pb::JoinReplicaResponse, ServerError> {
        let store = self.replicated()?;
        let bad = || ServerError::from(ServerReplicaError::Replica(ReplicaError::BadToken));
        let (name, secret) = req.token.trim().split_once('.').ok_or_else(bad)?;
        keyid::validate_name(name).map_err(|_| bad())?;
        delivery::check_public_key(&req.delivery_public_key)?;
        if req.server_names.len() > MAX_SERVER_NAMES
            || req
                .server_names
                .iter()
                .any(|n| n.is_empty() || n.len() > 253 || n.chars().any(|c| c.is_control()))
        {
            return Err(ServerError::InvalidArgument(format!(
                "server names: at most {MAX_SERVER_NAMES}, each 1 to 253 printable characters"
            )));
        }
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
        for n in &req.server_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        // The token first: a forged one costs a read, not a key pair.
        store.check_replica_token(name, &token_hash(secret), now_unix())?;
        let server = self.ca.issue_server(&names)?;
        let root = self.commit.root();
        store.admit_replica(
            root,
            name,
            &token_hash(secret),
            now_unix(),
            &server.cert_der,
            &server.key,
        )?;
        let key_id = keyid::derive(ROOT_BINDING_CLUSTER, 0, root);
        let wrapped = delivery::wrap(&req.delivery_public_key, root_binding(name, &key_id), root)?;
        Ok(pb::JoinReplicaResponse {
            name: name.to_owned(),
            wrapped_root: wrapped.into(),
            ca_der: self.ca.cert_der.clone().into(),
            etcd_prefix: store.prefix().to_owned(),
            root_key_id: key_id,
        })
    }

    /// Every replica with its heartbeat among `alive` (empty on RocksDB).
    pub fn replica_status(
        &self,
        alive: &[(String, Alive)],
    ) -> Result<Vec<pb::ReplicaStatus>, ServerError> {
        let Some(store) = &self.replication else {
            return Ok(Vec::new());
        };
        let leader = store.leader()?;
        Ok(store
            .replica_records()?
            .into_iter()
            .map(|r| {
                let a = alive
                    .iter()
                    .find(|(n, _)| *n == r.name)
                    .map(|(_, a)| a.clone())
                    .filter(|_| r.state == ReplicaState::Active)
                    .unwrap_or_default();
                pb::ReplicaStatus {
                    leader: leader.as_deref() == Some(r.name.as_str()),
                    name: r.name,
                    state: r.state.as_str().to_owned(),
                    heartbeat_unix: a.heartbeat_unix,
                    etcd_member: a.etcd_member,
                    address: a.address,
                    added_unix: r.added_unix,
                }
            })
            .collect())
    }
}
