//! `edgekms.admin.v1.NodeAdmin` for `kmsctl local`, on the 0600 admin socket.

use std::sync::Arc;

use edgekms_proto::admin::node_admin_server::NodeAdmin;
use edgekms_proto::admin::{
    BackupRequest, BackupResponse, KeyVersion, NodeStatus, RecordCensusResponse, ResealRequest,
    ResealResponse, RestoreVersionRequest, RestoreVersionResponse, RetireRequest, RetireResponse,
    RotateRequest, RotateResponse, StatusRequest,
};
use edgekms_proto::fleet::Census;
use tonic::{Request, Response, Status};

use crate::node::Node;

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// Runs a blocking node operation (RocksDB sync writes, TPM calls) off the
/// async workers, so Status stays fast meanwhile.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::error::NodeError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl NodeAdmin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        let r = self.node.local_status();
        let (primary_version, primary_key_id) = r.primary.unwrap_or_default();
        Ok(Response::new(NodeStatus {
            cluster: r.cluster,
            node: r.node,
            healthz: r.healthz,
            primary_version,
            primary_key_id,
            versions: r
                .versions
                .into_iter()
                .map(
                    |(version, state, key_id, created_unix, destroy_after_unix)| KeyVersion {
                        version,
                        state: state.into(),
                        key_id,
                        created_unix,
                        destroy_after_unix,
                    },
                )
                .collect(),
            sealer: r.sealer.into_iter().collect(),
            sealed_key: r.sealed_key.into_iter().collect(),
            hardware_backed: r.hardware_backed,
            unsealed: r.unsealed,
            central_reconciling: r.central_reconciling,
            writes_key_id: r.writes.0,
            writes_since_unix: r.writes.1,
            census: r.census,
        }))
    }

    async fn rotate(&self, _: Request<RotateRequest>) -> Result<Response<RotateResponse>, Status> {
        let node = self.node.clone();
        let kv = blocking(move || node.rotate()).await?;
        Ok(Response::new(RotateResponse {
            version: kv.version,
            key_id: kv.key_id,
        }))
    }

    async fn retire(
        &self,
        request: Request<RetireRequest>,
    ) -> Result<Response<RetireResponse>, Status> {
        let node = self.node.clone();
        let r = request.into_inner();
        let destroy_after_unix =
            blocking(move || node.retire(r.version, r.grace_seconds, r.skip_census)).await?;
        Ok(Response::new(RetireResponse { destroy_after_unix }))
    }

    async fn restore_version(
        &self,
        request: Request<RestoreVersionRequest>,
    ) -> Result<Response<RestoreVersionResponse>, Status> {
        let node = self.node.clone();
        let version = request.into_inner().version;
        blocking(move || node.restore_version(version)).await?;
        Ok(Response::new(RestoreVersionResponse {}))
    }

    async fn record_census(
        &self,
        request: Request<Census>,
    ) -> Result<Response<RecordCensusResponse>, Status> {
        let node = self.node.clone();
        let census = request.into_inner();
        blocking(move || node.record_census(census)).await?;
        Ok(Response::new(RecordCensusResponse {}))
    }

    async fn reseal(
        &self,
        request: Request<ResealRequest>,
    ) -> Result<Response<ResealResponse>, Status> {
        let node = self.node.clone();
        let passphrase = zeroize::Zeroizing::new(request.into_inner().recovery_passphrase);
        blocking(move || node.reseal(&passphrase)).await?;
        Ok(Response::new(ResealResponse {}))
    }

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupResponse>, Status> {
        let node = self.node.clone();
        let raw = zeroize::Zeroizing::new(request.into_inner().key.to_vec());
        let key = edgekms_hsm::Key256::from_slice(&raw)
            .ok_or_else(|| Status::invalid_argument("the backup key must be 32 bytes"))?;
        let (blob, dump) = blocking(move || crate::backup::make(&node, &key)).await?;
        tracing::info!(target: "audit", op = "backup", versions = dump.keyring.versions().count(), result = "ok");
        Ok(Response::new(BackupResponse {
            blob: blob.into(),
            cluster: dump.cluster,
            key_versions: u32::try_from(dump.keyring.versions().count()).unwrap_or(u32::MAX),
            primary_version: dump.keyring.primary().map_or(0, |p| p.version),
            created_unix: dump.created_unix,
        }))
    }
}
