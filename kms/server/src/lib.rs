//! The central key service (`edgekms-server`): the daemon around the
//! cluster half of the rotation protocol
//! ([`edgekms_core::rotation::cluster`]).
//!
//! - [`state_store`]: the seam to where the state lives (the
//!   [`StateStore`] trait); [`rocks`] is its embedded RocksDB
//!   implementation, the default, and [`etcd`] the replicated one.
//! - [`replication`]: replicas of a service on etcd (add, join, remove,
//!   status) and which of them runs the once-only jobs.
//! - [`commit`]: the one path by which the state changes, and the view
//!   this process serves from.
//! - [`operator`]: what operators do (enrol, revoke, rotate, retire,
//!   back up), each audited once.
//! - [`nodes`]: what nodes do (join, report) and their sync streams.
//! - [`views`]: what operators and metrics read (status, rotation
//!   progress, gauges).
//! - [`audit`]: the audit record and the audit log.
//! - [`service`]: the gRPC face (who may call what), [`error`] the one
//!   mapping to gRPC codes, [`metrics`] the Prometheus metrics.
//! - [`init`], [`backup`], [`restore`]: making, backing up and restoring a
//!   data dir.

pub mod audit;
pub mod backup;
pub mod commit;
pub mod error;
pub mod etcd;
pub mod init;
pub mod metrics;
pub mod nodes;
pub mod operator;
pub mod replication;
pub mod restore;
pub mod rocks;
pub mod service;
pub mod state_store;
pub mod views;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgekms_daemon::pki::{self, Ca};
use edgekms_hsm::Key256;
use tokio::sync::watch;

use self::audit::AuditLog;
pub use self::audit::{AuditRecord, Retention};
use self::commit::{Commit, Ops};
use self::error::ServerError;
use self::nodes::Streams;
pub use self::state_store::StateStore;
use edgekms_core::rotation::cluster::{Cluster, Event};
pub use edgekms_daemon::config::now_unix;

pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Automatic rotation: a default interval and per-cluster overrides
/// (`None`: off).
#[derive(Debug, Clone, Default)]
pub struct AutoRotate {
    pub default: Option<Duration>,
    pub clusters: BTreeMap<String, Option<Duration>>,
}

impl AutoRotate {
    pub fn interval(&self, cluster: &str) -> Option<Duration> {
        match self.clusters.get(cluster) {
            Some(choice) => *choice,
            None => self.default,
        }
    }
}

/// The central service: its parts, each owning one concern.
pub struct Central {
    commit: Arc<Commit>,
    audit: AuditLog,
    streams: Streams,
    ca: Ca,
    ca_hash: String,
    shutdown: watch::Sender<bool>,
    pub auto_rotate: AutoRotate,
    pub heartbeat: Duration,
    /// The shortest grace period a retire may ask for.
    pub min_grace_secs: u64,
    /// Replicated mode: the etcd store, for what only it does (replicas).
    replication: Option<Arc<etcd::EtcdStore>>,
    /// Whether this process runs the once-only jobs (always, on RocksDB).
    leadership: etcd::liveness::Leadership,
    /// The key nodes return versions to when this service heals
    /// ([`edgekms_core::rotation::cluster`]'s reconciliation). One per
    /// process, never stored: a node wraps to the key of the stream it
    /// answers on.
    service_key: edgekms_core::delivery::DeliveryKey,
}

impl Central {
    /// Serves the state in `store`, whose keys are wrapped by `root`.
    pub fn load(store: Arc<dyn StateStore>, root: Key256) -> Result<Self, ServerError> {
        let identity = store.identity(&root)?;
        let ca = Ca::load(&identity.ca_cert, &identity.ca_key)?;
        let ca_hash = ca.pin()?;
        Ok(Self {
            audit: AuditLog::new(store.clone()),
            commit: Arc::new(Commit::load(store, root)?),
            streams: Streams::default(),
            ca,
            ca_hash,
            shutdown: watch::channel(false).0,
            auto_rotate: AutoRotate::default(),
            heartbeat: Duration::from_secs(15),
            min_grace_secs: edgekms_core::rotation::MIN_GRACE_SECS,
            replication: None,
            leadership: etcd::liveness::Leadership::sole(),
            service_key: edgekms_core::delivery::DeliveryKey::generate(),
        })
    }

    pub fn store(&self) -> &dyn StateStore {
        self.commit.store()
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Follows changes other writers make to the store (see
    /// [`Commit::follow`]).
    pub fn follow_store(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.commit.clone().follow()
    }

    /// The server's TLS material: `(CA cert, server cert, server key)`.
    pub fn tls_identity(&self) -> Result<(Vec<u8>, Vec<u8>, pki::PrivateKey), ServerError> {
        let id = self.store().identity(self.commit.root())?;
        Ok((id.ca_cert, id.server_cert, id.server_key))
    }

    /// Ends every node stream (shutdown).
    pub fn shut_down(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Changes `cluster` through [`Commit::mutate`], then audits what the
    /// protocol did (acks, promotions, destructions).
    fn mutate<T>(
        &self,
        cluster: &str,
        f: impl FnMut(&mut Cluster, &mut Ops) -> Result<(T, Vec<Event>), ServerError>,
    ) -> Result<(T, Vec<Event>), ServerError> {
        let (out, events) = self.commit.mutate(cluster, f)?;
        for rec in audit::protocol_events(cluster, &events) {
            self.audit.record(rec);
        }
        Ok((out, events))
    }

    /// A receiver that changes whenever `cluster` changes.
    pub fn subscribe(&self, cluster: &str) -> watch::Receiver<u64> {
        self.commit.subscribe(cluster)
    }
}
