//! A gRPC channel to a daemon's unix socket (the plugin's KMS v2 and admin
//! sockets), as kube-apiserver and `kmsctl local` reach them. The typed
//! clients live with the protocol (edgekms-proto) and are built on this
//! channel by the caller: this crate knows no edgekms crate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// [`connect`], retried every 10 ms until the socket answers; fails with
/// the last error after `within`.
pub async fn connect_when_up(path: &Path, within: Duration) -> Channel {
    let deadline = Instant::now() + within;
    loop {
        match connect(path).await {
            Ok(channel) => return channel,
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "nothing answers on {} after {within:?}: {e}",
                    path.display()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
