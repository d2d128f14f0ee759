//! Typed calls to the plugin's KMS v2 and admin sockets (edgekms-proto's
//! clients over `edgekms_proto::uds`'s unix-socket channel).

use std::path::Path;

use edgekms_proto::admin::node_admin_client::NodeAdminClient;
use edgekms_proto::kms_v2::key_management_service_client::KeyManagementServiceClient;
use edgekms_proto::kms_v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::Channel;

pub type Kms = KeyManagementServiceClient<Channel>;
pub type Admin = NodeAdminClient<Channel>;

/// A KMS v2 client on `socket`, or why it cannot connect.
pub async fn try_kms(socket: &Path) -> Result<Kms, tonic::transport::Error> {
    Ok(KeyManagementServiceClient::new(
        edgekms_proto::uds::connect(socket).await?,
    ))
}

/// An admin client on `socket`.
pub async fn admin(socket: &Path) -> Admin {
    NodeAdminClient::new(edgekms_proto::uds::connect(socket).await.unwrap())
}

pub async fn encrypt(kms: &mut Kms, plaintext: &[u8]) -> (Vec<u8>, String) {
    let r = kms
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec().into(),
            uid: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.ciphertext.to_vec(), r.key_id)
}

pub async fn decrypt(
    kms: &mut Kms,
    ciphertext: &[u8],
    key_id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    kms.decrypt(DecryptRequest {
        ciphertext: ciphertext.to_vec().into(),
        uid: "test".into(),
        key_id: key_id.into(),
        annotations: Default::default(),
    })
    .await
    .map(|r| r.into_inner().plaintext.to_vec())
}

pub async fn key_id(kms: &mut Kms) -> String {
    kms.status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id
}
