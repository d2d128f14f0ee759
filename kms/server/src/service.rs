//! The gRPC face of [`Central`]: who may call what, and the node sync stream.
//!
//! `Join` is the only call allowed without a client certificate. `Sync`
//! needs the live certificate of an active node; `Operator` calls need an
//! operator certificate. Every refusal is audited.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use edgekms_proto::fleet as pb;
use edgekms_proto::fleet::fleet_server::{Fleet, FleetServer};
use edgekms_proto::fleet::operator_server::{Operator, OperatorServer};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::audit::AuditRecord;
use super::error::ServerError;
use super::{Central, DEFAULT_TOKEN_TTL};
use edgekms_daemon::conn::{ConnTable, Limits};
use edgekms_daemon::pki::{self, Identity};
use edgekms_daemon::tls::{self, PeerInfo};

fn peer<T>(req: &Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

fn peer_addr(peer: &Option<PeerInfo>) -> String {
    peer.as_ref()
        .map(|p| p.addr.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Refuses and audits, counted per peer address and kind (anyone who
/// reaches the port can be refused as often as they like).
fn refuse(core: &Central, peer: &Option<PeerInfo>, what: &'static str, e: ServerError) -> Status {
    core.audit_log()
        .refused(peer.as_ref().map(|p| p.addr), what, e.class(), || {
            let actor = match peer.as_ref().and_then(|p| p.identity.as_ref()) {
                Some(id) => format!("{id} at {}", peer_addr(peer)),
                None => format!("peer {}", peer_addr(peer)),
            };
            AuditRecord::new("refused", &actor)
                .result(&e.to_string())
                .detail(what)
        });
    e.into()
}

#[derive(Clone)]
pub struct OperatorService {
    core: Arc<Central>,
}

impl OperatorService {
    /// The calling operator's name, or a refusal.
    fn operator<T>(&self, req: &Request<T>, what: &'static str) -> Result<String, Status> {
        let peer = peer(req);
        match peer.as_ref().map(|p| (&p.cert_der, &p.identity)) {
            Some((Some(_), Some(Identity::Operator { name }))) => Ok(format!("operator {name}")),
            Some((Some(_), Some(other))) => Err(refuse(
                &self.core,
                &peer,
                what,
                ServerError::PermissionDenied(format!(
                    "{other} may not call the operator API: an operator certificate is required"
                )),
            )),
            _ => Err(refuse(
                &self.core,
                &peer,
                what,
                ServerError::Unauthenticated(
                    "the operator API needs an operator certificate (kmsctl --operator-dir)".into(),
                ),
            )),
        }
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        let actor = self.operator(&req, "node add")?;
        let r = req.into_inner();
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => std::time::Duration::from_secs(s),
        };
        let inv = blocking(|| self.core.add_node(&actor, &r.cluster, &r.node, ttl))?;
        Ok(Response::new(pb::AddNodeResponse {
            token: inv.token,
            expires_unix: inv.expires_unix,
            ca_hash: inv.ca_hash,
            cluster_created: inv.cluster_created,
        }))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let actor = self.operator(&req, "node remove")?;
        let r = req.into_inner();
        blocking(|| self.core.remove_node(&actor, &r.cluster, &r.node))?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let actor = self.operator(&req, "rotate")?;
        let r = req.into_inner();
        let r = blocking(|| self.core.rotate(&actor, &r.cluster))?;
        Ok(Response::new(pb::RotateResponse {
            version: r.version,
            key_id: r.key_id,
            created: r.created,
            promoted: r.promoted,
        }))
    }

    async fn force_promote(
        &self,
        req: Request<pb::ForcePromoteRequest>,
    ) -> Result<Response<pb::ForcePromoteResponse>, Status> {
        let actor = self.operator(&req, "rotate --force")?;
        let r = req.into_inner();
        let stale_nodes = blocking(|| self.core.force_promote(&actor, &r.cluster, r.version))?;
        Ok(Response::new(pb::ForcePromoteResponse { stale_nodes }))
    }

    async fn retire(
        &self,
        req: Request<pb::RetireRequest>,
    ) -> Result<Response<pb::RetireResponse>, Status> {
        let actor = self.operator(&req, "retire")?;
        let r = req.into_inner();
        let retired = blocking(|| {
            self.core.retire(
                &actor,
                &r.cluster,
                r.version,
                r.grace_seconds,
                r.skip_census,
            )
        })?;
        Ok(Response::new(pb::RetireResponse {
            destroyed: retired.destroyed,
            waiting_for: retired.waiting_for,
            destroy_after_unix: retired.destroy_after_unix,
            census_skipped: if r.skip_census {
                "retired without a census showing the version unused (--skip-census); audited"
                    .into()
            } else {
                String::new()
            },
        }))
    }

    async fn add_replica(
        &self,
        req: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::AddReplicaResponse>, Status> {
        let actor = self.operator(&req, "replica add")?;
        let r = req.into_inner();
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => std::time::Duration::from_secs(s),
        };
        let inv = blocking(|| self.core.add_replica(&actor, &r.name, ttl))?;
        Ok(Response::new(pb::AddReplicaResponse {
            token: inv.token,
            expires_unix: inv.expires_unix,
            ca_hash: inv.ca_hash,
            etcd_prefix: inv.prefix,
        }))
    }

    async fn remove_replica(
        &self,
        req: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::RemoveReplicaResponse>, Status> {
        let actor = self.operator(&req, "replica remove")?;
        blocking(|| self.core.remove_replica(&actor, &req.get_ref().name))?;
        Ok(Response::new(pb::RemoveReplicaResponse {}))
    }

    async fn restore_version(
        &self,
        req: Request<pb::RestoreVersionRequest>,
    ) -> Result<Response<pb::RestoreVersionResponse>, Status> {
        let actor = self.operator(&req, "restore-version")?;
        let r = req.into_inner();
        blocking(|| self.core.restore_version(&actor, &r.cluster, r.version))?;
        Ok(Response::new(pb::RestoreVersionResponse {}))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.operator(&req, "status")?;
        Ok(Response::new(blocking(|| {
            self.core.status(&req.get_ref().cluster)
        })?))
    }

    type AuditStream = AuditPages;

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<AuditPages>, Status> {
        self.operator(&req, "audit")?;
        let r = req.into_inner();
        // Two pages in flight at most: a slow reader holds the scan, not
        // the log in memory.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let log = core.audit_log();
            let result = log.stream_audit(r.since_unix, r.limit, r.after_seq, |records| {
                tx.blocking_send(Ok(pb::AuditResponse { records })).is_ok()
            });
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e.into()));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupResponse>, Status> {
        let actor = self.operator(&req, "backup")?;
        let r = req.into_inner();
        let key = edgekms_hsm::Key256::from_slice(&r.key).ok_or_else(|| {
            Status::from(ServerError::InvalidArgument(
                "the backup key must be 32 bytes".into(),
            ))
        })?;
        let (blob, s) = blocking(|| self.core.backup(&actor, &key, !r.skip_audit))?;
        Ok(Response::new(pb::BackupResponse {
            blob: blob.into(),
            clusters: s.clusters,
            key_versions: s.key_versions,
            audit_records: s.audit_records,
            created_unix: s.created_unix,
        }))
    }

    type WatchRotationStream = ProgressStream;

    async fn watch_rotation(
        &self,
        req: Request<pb::WatchRotationRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let actor = self.operator(&req, "rotate --wait")?;
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let core = self.core.clone();
        tokio::spawn(async move {
            let result = core
                .watch_rotation(&actor, &r, |msg| {
                    let tx = tx.clone();
                    async move { tx.send(Ok(msg)).await.is_ok() }
                })
                .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn end_reconcile(
        &self,
        req: Request<pb::EndReconcileRequest>,
    ) -> Result<Response<pb::EndReconcileResponse>, Status> {
        let actor = self.operator(&req, "reconcile")?;
        let r = req.into_inner();
        blocking(|| self.core.end_reconcile(&actor, &r.cluster, &r.without))?;
        Ok(Response::new(pb::EndReconcileResponse {}))
    }
}

#[derive(Clone)]
pub struct FleetService {
    core: Arc<Central>,
}

type StateStream = Pin<Box<dyn Stream<Item = Result<pb::ClusterState, Status>> + Send>>;
type AuditPages = Pin<Box<dyn Stream<Item = Result<pb::AuditResponse, Status>> + Send>>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::RotationProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let addr = peer(&req)
            .map(|p| p.addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (cert, ca) = blocking(|| self.core.join(addr, req.get_ref()))?;
        Ok(Response::new(pb::JoinResponse {
            certificate_der: cert.into(),
            ca_der: ca.into(),
        }))
    }

    async fn join_replica(
        &self,
        req: Request<pb::JoinReplicaRequest>,
    ) -> Result<Response<pb::JoinReplicaResponse>, Status> {
        let addr = peer(&req)
            .map(|p| p.addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let core = self.core.clone();
        let resp = tokio::task::spawn_blocking(move || core.join_replica(addr, req.get_ref()))
            .await
            .map_err(|e| Status::internal(format!("join task failed: {e}")))??;
        Ok(Response::new(resp))
    }

    type SyncStream = StateStream;

    async fn sync(
        &self,
        req: Request<Streaming<pb::NodeReport>>,
    ) -> Result<Response<StateStream>, Status> {
        let peer = peer(&req);
        let (cluster, node, cert) = match peer.as_ref().map(|p| (&p.cert_der, &p.identity)) {
            Some((Some(cert), Some(Identity::Node { cluster, node }))) => {
                // Hashed once: the stream re-checks it at every event.
                (cluster.clone(), node.clone(), pki::fingerprint(cert))
            }
            Some((Some(_), Some(other))) => {
                return Err(refuse(
                    &self.core,
                    &peer,
                    "sync",
                    ServerError::PermissionDenied(format!("{other} is not a node")),
                ))
            }
            _ => {
                return Err(refuse(
                    &self.core,
                    &peer,
                    "sync",
                    ServerError::Unauthenticated(
                        "sync needs the node certificate issued at join".into(),
                    ),
                ))
            }
        };
        if let Err(e) = self.core.authorize_node(&cluster, &node, &cert) {
            return Err(refuse(&self.core, &peer, "sync", e));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let core = self.core.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            let id = core.connect(&cluster, &node);
            tracing::debug!(%cluster, %node, "node connected");
            run_stream(&core, &cluster, &node, &cert, inbound, &tx).await;
            core.disconnect(&cluster, &node, id);
            tracing::debug!(%cluster, %node, "node disconnected");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

type Tx = tokio::sync::mpsc::Sender<Result<pb::ClusterState, Status>>;

/// Runs `f`, which may wait on the store (a replicated store's round
/// trip), without holding up the other streams on this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// One node's stream: reports in, cluster state out whenever the node is
/// behind, heartbeats in between. Ends on disconnect, revocation or
/// shutdown.
async fn run_stream(
    core: &Central,
    cluster: &str,
    node: &str,
    cert_sha256: &str,
    mut inbound: Streaming<pb::NodeReport>,
    tx: &Tx,
) {
    let mut changes = core.subscribe(cluster);
    let mut shutdown = core.shutdown_signal();
    // tokio's interval panics on zero; the flag refuses 0s, and this keeps
    // a Central built another way from killing every stream.
    let mut heartbeat =
        tokio::time::interval(core.heartbeat.max(std::time::Duration::from_millis(100)));
    heartbeat.tick().await;
    let mut last: crate::nodes::LastSent = None;
    let mut reported = false;
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(report)) => {
                    reported = true;
                    if let Err(e) = blocking(|| core.report(cluster, node, &report)) {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = heartbeat.tick() => {
                let beat = pb::ClusterState { heartbeat: true, ..Default::default() };
                if tx.send(Ok(beat)).await.is_err() {
                    return;
                }
                continue;
            }
            _ = shutdown.changed() => {
                let _ = tx.send(Err(ServerError::ShuttingDown.into())).await;
                return;
            }
        }
        if let Err(e) = core.authorize_node(cluster, node, cert_sha256) {
            core.audit_log().record(
                AuditRecord::new("refused", &format!("node {cluster}/{node}"))
                    .cluster(cluster)
                    .node(node)
                    .result(&e.to_string())
                    .detail("sync stream ended"),
            );
            let _ = tx.send(Err(e.into())).await;
            return;
        }
        // Nothing goes out before the node said what it holds.
        if !reported {
            continue;
        }
        match blocking(|| core.next_message(cluster, node, &mut last)) {
            Ok(Some(state)) => {
                if tx.send(Ok(state)).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(%cluster, %node, error = %e, "cannot build the node's state");
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
}

/// Streams one connection may hold open: a node's sync stream plus an
/// operator's calls need a few; 100 leaves room and bounds what one
/// connection (with or without a certificate) can make the server hold.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Handshaking or certificate-less connections one peer address may hold by
/// default (more close its oldest).
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_PEER: usize = 128;

/// The connection limits for this process's open-file limit.
pub fn default_limits() -> Limits {
    Limits::central(
        edgekms_daemon::conn::default_max_connections(edgekms_daemon::conn::fd_limit()),
        DEFAULT_MAX_UNAUTHENTICATED_PER_PEER,
    )
}

/// Serves both services on `listener` until `shutdown` resolves, with
/// [`default_limits`].
pub async fn serve(
    core: Arc<Central>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_with(core, listener, default_limits(), shutdown).await
}

/// Serves both services on `listener` until `shutdown` resolves, holding
/// connections to `limits`.
pub async fn serve_with(
    core: Arc<Central>,
    listener: TcpListener,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let table = ConnTable::new("central", limits);
    let (ca, cert, key) = core.tls_identity()?;
    let cfg = tls::server_config(&ca, &cert, &key)?;
    let audit_core = core.clone();
    let incoming = tls::serve_incoming(
        listener,
        cfg,
        Arc::new(move |addr, reason: String| {
            let class = if reason.contains("timed out") {
                "handshake-timeout"
            } else {
                "handshake-failed"
            };
            audit_core
                .audit_log()
                .refused(Some(addr), "connection", class, || {
                    AuditRecord::new("refused", &format!("peer {addr}"))
                        .result(&reason)
                        .detail("connection")
                });
        }),
        table,
    );
    let stop_core = core.clone();
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    // Every request is decoded before its handler can look at the caller,
    // and any TLS peer may call any method (only the handlers refuse). No
    // legitimate request of either service comes near 64 KiB (a JoinRequest
    // is about 1 KiB: a P-256 CSR, a 65-byte public key, a token and two
    // names of at most 63 bytes; a NodeReport a few version numbers; the
    // operator calls names, numbers and a 32-byte key), so one limit for
    // both services bounds what an unauthenticated caller makes the server
    // buffer, without a second listener or a body-size layer.
    let server = edgekms_daemon::conn::grpc_server(MAX_CONCURRENT_STREAMS)
        .layer(super::metrics::CountRequests)
        .add_service(
            FleetServer::new(FleetService { core: core.clone() })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            OperatorServer::new(OperatorService { core })
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            // Long-lived sync streams end now, so the server can drain.
            stop_core.shut_down();
            let _ = stopping_tx.send(());
        });
    // A peer that never reads its stream would hold the drain forever.
    let deadline = async {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result?,
        _ = deadline => tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; stopping anyway"),
    }
    Ok(())
}

/// The largest request message either service decodes (see [`serve`]).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
