//! gRPC clients over a unix socket: how `kmsctl`, the tests and the
//! benchmarks reach the plugin, exactly as kube-apiserver does.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects a channel to the gRPC server listening on `path`.
pub async fn connect(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    // The URI is required by the API but unused: every connection goes to
    // the socket.
    Endpoint::from_static("http://edgekms.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
