//! The unix-socket server: binds the KMS and admin sockets (mode 0600,
//! stale files replaced, live ones never stolen), serves until shutdown,
//! drains in-flight calls, and removes the socket files.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgekms_daemon::conn::{self, ConnTable, Limits};
use edgekms_proto::admin::node_admin_server::NodeAdminServer;
use edgekms_proto::kms_v2::key_management_service_server::KeyManagementServiceServer;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::admin_service::AdminService;
use crate::kms_service::KmsService;
use crate::node::Node;

/// How long shutdown waits for in-flight calls before giving up on them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams on one KMS connection. kube-apiserver (grpc-go) multiplexes all
/// its Encrypt/Decrypt calls on one connection and queues calls beyond this
/// on its side rather than failing them; each call here is a few
/// microseconds of AES-GCM, so 1000 in flight is far above what an
/// apiserver reaches (its own in-flight request limits are 400 + 200) while
/// bounding what one connection can make the plugin hold (a few MiB).
pub const KMS_MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Streams on one admin connection: `kmsctl local` makes one call at a time.
pub const ADMIN_MAX_CONCURRENT_STREAMS: u32 = 100;

/// The connection limits of both sockets together: `max_connections`, or
/// the open-file limit minus [`conn::RESERVED_FDS`].
pub fn limits(max_connections: Option<usize>) -> Limits {
    Limits::local(
        max_connections.unwrap_or_else(|| conn::default_max_connections(conn::fd_limit())),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is in use by a running process (another plugin?); refusing to take it over")]
    InUse(String),
    #[error("{0} exists and is not a socket; refusing to delete it")]
    NotASocket(String),
    #[error("serving {path}: {source}")]
    Serve {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A bound socket that removes its file when dropped, if the file is still
/// the one it bound (same inode).
pub struct BoundSocket {
    path: PathBuf,
    inode: u64,
    listener: Option<UnixListener>,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with mode 0600. A socket file nobody listens on (left by a
/// crash) is replaced; a live socket or any other file is refused.
pub fn bind(path: &Path) -> Result<BoundSocket, ServerError> {
    let err = |source| ServerError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.display().to_string())),
                Err(_) => {
                    tracing::info!(socket = %path.display(), "replacing stale socket");
                    std::fs::remove_file(path).map_err(err)?;
                }
            }
        }
        Ok(_) => return Err(ServerError::NotASocket(path.display().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // With the default umask only the owner may write (so connect) between
    // bind and this chmod.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let inode = std::fs::metadata(path).map_err(err)?.ino();
    Ok(BoundSocket {
        path: path.to_owned(),
        inode,
        listener: Some(listener),
    })
}

/// Serves KMS v2 on `kms` and the admin API on `admin` until `shutdown`
/// resolves, then drains in-flight calls (up to [`DRAIN_TIMEOUT`]) and
/// removes both socket files. Connections of both sockets share one table
/// held to `limits`: when it is full, or accept() runs out of descriptors,
/// the connection idle longest is closed.
pub async fn serve(
    node: Arc<Node>,
    mut kms: BoundSocket,
    mut admin: BoundSocket,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let table = ConnTable::new("plugin", limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let serve_one = |sock: &mut BoundSocket, router: tonic::transport::server::Router, rx| {
        let path = sock.path.display().to_string();
        let listener = sock.listener.take();
        let table = table.clone();
        async move {
            let Some(listener) = listener else {
                return Ok(());
            };
            router
                .serve_with_incoming_shutdown(conn::unix_incoming(listener, table), stopped(rx))
                .await
                .map_err(|source| ServerError::Serve { path, source })
        }
    };
    let kms_router = conn::grpc_server(KMS_MAX_CONCURRENT_STREAMS).add_service(
        KeyManagementServiceServer::new(KmsService::new(node.clone())),
    );
    let admin_router = conn::grpc_server(ADMIN_MAX_CONCURRENT_STREAMS)
        .add_service(NodeAdminServer::new(AdminService::new(node.clone())));
    let kms_task = serve_one(&mut kms, kms_router, stop_rx.clone());
    let admin_task = serve_one(&mut admin, admin_router, stop_rx);
    tracing::info!(kms = %kms.path.display(), admin = %admin.path.display(), "serving");

    let servers = async { tokio::try_join!(kms_task, admin_task).map(|_| ()) };
    tokio::pin!(servers);
    tokio::select! {
        res = &mut servers => return res,
        () = shutdown => {}
    }
    tracing::info!("shutting down: draining in-flight calls");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(DRAIN_TIMEOUT, servers).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(
                "in-flight calls did not finish within {DRAIN_TIMEOUT:?}; exiting anyway"
            );
            Ok(())
        }
    }
    // `kms` and `admin` drop here and remove their socket files.
}
