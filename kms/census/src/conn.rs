//! Reaching etcd (or kine, or k8s-dqlite) as kube-apiserver's
//! `--etcd-servers` names it: `http://HOST:PORT`, `https://HOST:PORT` (TLS
//! with `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`) or
//! `unix://PATH`. We build the connection ourselves (rustls with ring, and
//! unix sockets, which etcd-client cannot do) and hand etcd-client the
//! channel.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{CensusError, EtcdTarget};

/// Where one endpoint is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16, tls: bool },
    Unix(PathBuf),
}

/// Parses one `--etcd-servers` entry.
pub fn parse(endpoint: &str) -> Result<Address, CensusError> {
    let bad = |reason: &str| CensusError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    if let Some(path) = endpoint.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(bad("no socket path after unix://"));
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    let (tls, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad(
            "expected https://HOST:PORT, http://HOST:PORT or unix://PATH",
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, port) = v6
            .split_once("]:")
            .ok_or_else(|| bad("expected [IPv6]:PORT"))?;
        (host, port)
    } else {
        rest.rsplit_once(':').ok_or_else(|| bad("no :PORT"))?
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad("no host"));
    }
    let port = port.parse().map_err(|_| bad("the port is not a number"))?;
    Ok(Address::Tcp {
        host: host.to_string(),
        port,
        tls,
    })
}

/// The socket file of a `unix://` endpoint. MicroK8s names it
/// `unix://…/kine.sock:12379`, a `:PORT` that etcd's Go client (and so
/// kube-apiserver) keeps as part of the path: the file is literally named
/// `kine.sock:12379`. We do the same, and only when no such file exists
/// but one without the `:PORT` does, use that one.
pub fn socket_path(path: &Path) -> PathBuf {
    if path.exists() {
        return path.to_path_buf();
    }
    let text = path.to_string_lossy();
    if let Some((base, port)) = text.rsplit_once(':') {
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && Path::new(base).exists()
        {
            return PathBuf::from(base);
        }
    }
    path.to_path_buf()
}

/// The TLS client configuration from the three files (CA required for
/// `https://`; the client certificate and key go together).
pub fn tls_config(target: &EtcdTarget) -> Result<Arc<rustls::ClientConfig>, CensusError> {
    let cacert = target.cacert.as_ref().ok_or_else(|| {
        CensusError::TlsConfig(
            "an https:// endpoint needs the CA that signed etcd's certificate (--etcd-cacert)"
                .into(),
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(cacert, "CA certificate")? {
        roots.add(cert).map_err(|e| {
            CensusError::TlsConfig(format!("{}: not a usable CA: {e}", cacert.display()))
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CensusError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&target.cert, &target.key) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                CensusError::TlsConfig(format!("{}: no private key in PEM: {e}", key.display()))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                CensusError::TlsConfig(format!(
                    "{} and its key do not go together: {e}",
                    cert.display()
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(CensusError::TlsConfig(
                "--etcd-cert and --etcd-key go together: give both or neither".into(),
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, CensusError> {
    let bytes = std::fs::read(path).map_err(|source| CensusError::File {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| CensusError::TlsConfig(format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(CensusError::TlsConfig(format!(
            "{}: no certificate in it ({what})",
            path.display()
        )));
    }
    Ok(certs)
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Pin<Box<dyn Io>>;

/// A channel to `address`, connected (TCP, TLS handshake, HTTP/2) within
/// `timeout`.
pub async fn connect(
    endpoint: &str,
    address: &Address,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<Channel, CensusError> {
    let uri = match address {
        Address::Tcp { host, port, .. } if host.contains(':') => format!("http://[{host}]:{port}"),
        Address::Tcp { host, port, .. } => format!("http://{host}:{port}"),
        Address::Unix(_) => "http://localhost".to_string(),
    };
    let ep = Endpoint::from_shared(uri)
        .map_err(|e| CensusError::Endpoint {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(timeout);
    let address = address.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let address = address.clone();
        let tls = tls.clone();
        async move { open(&address, tls).await.map(TokioIo::new) }
    });
    match tokio::time::timeout(timeout, ep.connect_with_connector(connector)).await {
        Err(_) => Err(CensusError::Timeout {
            endpoint: endpoint.to_string(),
            what: "connecting",
            after: timeout,
        }),
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(crate::error::classify_connect(endpoint, &e)),
    }
}

async fn open(
    address: &Address,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<BoxIo, std::io::Error> {
    match address {
        Address::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(socket_path(path)).await?;
            Ok(Box::pin(stream))
        }
        Address::Tcp {
            host,
            port,
            tls: false,
        } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(Box::pin(stream))
        }
        Address::Tcp {
            host,
            port,
            tls: true,
        } => {
            let config = tls.ok_or_else(|| std::io::Error::other("no TLS configuration"))?;
            let name = match host.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            };
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(Box::pin(tls))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse("https://127.0.0.1:2379").unwrap(),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 2379,
                tls: true
            }
        );
        assert_eq!(
            parse("http://etcd.local:2379/").unwrap(),
            Address::Tcp {
                host: "etcd.local".into(),
                port: 2379,
                tls: false
            }
        );
        assert_eq!(
            parse("https://[::1]:2379").unwrap(),
            Address::Tcp {
                host: "::1".into(),
                port: 2379,
                tls: true
            }
        );
        assert_eq!(
            parse("unix:///var/lib/rancher/k3s/server/kine.sock").unwrap(),
            Address::Unix("/var/lib/rancher/k3s/server/kine.sock".into())
        );
        for bad in [
            "127.0.0.1:2379",
            "https://127.0.0.1",
            "http://:2379",
            "http://h:x",
            "unix://",
            "ftp://h:1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn microk8s_port_suffix() {
        let dir = tempfile_dir();
        let literal = dir.join("kine.sock:12379");
        // Neither exists: the path as given.
        assert_eq!(socket_path(&literal), literal);
        // Only the one without :PORT exists: that one.
        std::fs::write(dir.join("kine.sock"), b"").unwrap();
        assert_eq!(socket_path(&literal), dir.join("kine.sock"));
        // The literal name exists (as MicroK8s makes it): the literal name.
        std::fs::write(&literal, b"").unwrap();
        assert_eq!(socket_path(&literal), literal);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("census-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
