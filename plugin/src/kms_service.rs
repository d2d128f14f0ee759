//! `v2.KeyManagementService` for kube-apiserver: a thin adapter from the
//! wire messages to [`Node`], with one audit line per Encrypt/Decrypt
//! (uid, key version, result; never key material or plaintext), and each
//! call counted and timed by method and result code ([`crate::metrics`]).

use std::sync::Arc;
use std::time::Instant;

use edgekms_proto::kms_v2::key_management_service_server::KeyManagementService;
use edgekms_proto::kms_v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::error::NodeError;
use crate::metrics::{self, KmsMethod};
use crate::node::Node;
use edgekms_core::KeyringError;

pub struct KmsService {
    node: Arc<Node>,
}

impl KmsService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Runs one call's handler, counting and timing it by its result code.
    fn observed<T>(
        method: KmsMethod,
        handler: impl FnOnce() -> Result<T, Status>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let result = handler();
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        metrics::observe_kms(method, code, start.elapsed());
        result
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Self::observed(KmsMethod::Status, || {
            let (healthz, key_id) = self.node.status();
            Ok(Response::new(StatusResponse {
                version: "v2".into(),
                healthz,
                key_id,
            }))
        })
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let req = request.into_inner();
        Self::observed(KmsMethod::Encrypt, || {
            match self.node.encrypt(&req.plaintext) {
                Ok((ciphertext, key_id, version)) => {
                    tracing::info!(target: "audit", op = "encrypt", uid = %req.uid, version, result = "ok");
                    Ok(Response::new(EncryptResponse {
                        ciphertext: ciphertext.into(),
                        key_id,
                        annotations: Default::default(),
                    }))
                }
                Err(e) => {
                    tracing::warn!(target: "audit", op = "encrypt", uid = %req.uid, result = %e);
                    Err(e.into())
                }
            }
        })
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let req = request.into_inner();
        Self::observed(KmsMethod::Decrypt, || {
            match self.node.decrypt(&req.ciphertext, &req.key_id) {
                Ok((plaintext, version)) => {
                    tracing::info!(target: "audit", op = "decrypt", uid = %req.uid, version, result = "ok");
                    // The response buffer is handed to tonic, which does not
                    // zeroize; the seed is the apiserver's own and leaves at once.
                    Ok(Response::new(DecryptResponse {
                        plaintext: plaintext.to_vec().into(),
                    }))
                }
                Err(e) => {
                    if let NodeError::Keyring(KeyringError::Disabled { version, .. }) = &e {
                        metrics::record_disabled_read(*version);
                    }
                    tracing::warn!(target: "audit", op = "decrypt", uid = %req.uid, key_id = %req.key_id, result = %e);
                    Err(e.into())
                }
            }
        })
    }
}
