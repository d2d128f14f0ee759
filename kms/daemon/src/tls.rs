//! Mutual TLS 1.3 for the central service, on rustls with the ring provider.
//!
//! The server runs its own accept loop ([`serve_incoming`]) rather than
//! tonic's, so that a refused handshake reaches the audit log and handlers
//! see the peer's verified certificate ([`PeerInfo`]). Clients connect
//! through [`connect`], or to one address of a server URL's host through
//! [`connect_addr`]; a node that has not joined yet trusts the server
//! only through the CA pin ([`PinnedCa`]), as `kubeadm join` does.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::conn::{ConnTable, Stage, Tracked};
use crate::pki::{self, Identity, PrivateKey};

/// A TLS handshake not finished by then is dropped (and counted refused).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
}

/// The one ring provider, built once: verifiers use it on every handshake.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn key_der(key: &PrivateKey) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.der().to_vec()))
}

/// The server side: its certificate chain (leaf, CA) and a client verifier
/// that accepts certificates of this CA, or none (only `Join` allows none).
pub fn server_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key: &PrivateKey,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![
                CertificateDer::from(cert_der.to_vec()),
                CertificateDer::from(ca_der.to_vec()),
            ],
            key_der(key),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// How a client trusts the server.
pub enum Trust<'a> {
    /// The CA certificate (after join, and for operators).
    Ca(&'a [u8]),
    /// Only a `sha256:` pin of the CA's public key (join).
    Pin(String),
}

/// A client config: TLS 1.3, ALPN h2, optional client certificate.
pub fn client_config(
    trust: Trust<'_>,
    identity: Option<(&[u8], &PrivateKey)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        Trust::Ca(ca_der) => {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(ca_der.to_vec()))?;
            builder.with_root_certificates(roots)
        }
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { pin })),
    };
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![CertificateDer::from(cert.to_vec())], key_der(key))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Trusts a server whose chain carries a CA with the pinned public key, and
/// whose leaf that CA signed for the host name dialled.
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::spki_pin(c).ok().as_deref() == Some(self.pin.as_str()))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA does not match --ca-hash {} (wrong server, or a machine in the middle)",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Splits `https://host:port` into the dial address and the TLS name.
fn parse_url(url: &str) -> Result<(String, u16, ServerName<'static>), TlsError> {
    let bad = |reason: &str| TlsError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|_| bad("not a URL; expected https://HOST:PORT"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad(
            "must start with https:// (the service speaks only TLS)",
        ));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(host.clone()).map_err(|_| bad("host is not a valid name"))?;
    Ok((host, port, name))
}

/// A server URL taken apart: the host to resolve and dial, and the name the
/// server's certificate must carry, kept when dialling one of the host's
/// addresses ([`connect_addr`]).
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    host: String,
    port: u16,
    name: ServerName<'static>,
}

/// A host name lookup that takes longer is a failed one (the resolver's own
/// retries can take much longer, and the caller has other servers to try).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

impl Target {
    /// `https://host:port` (port 443 when absent).
    pub fn parse(url: &str) -> Result<Self, TlsError> {
        let (host, port, name) = parse_url(url)?;
        Ok(Self {
            url: url.to_owned(),
            host,
            port,
            name,
        })
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The host's addresses in the resolver's order, each once; an IP
    /// literal is its own one address.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, TlsError> {
        let failed = |detail: String| TlsError::Connect {
            url: self.url.clone(),
            detail,
        };
        let found = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| failed(format!("resolving {} timed out", self.host)))?
        .map_err(|e| failed(format!("cannot resolve {}: {e}", self.host)))?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(failed(format!("{} resolves to no address", self.host)));
        }
        Ok(addrs)
    }

    /// How logs and errors name the server reached through `addr`: the
    /// URL, and the address when the host is a name (it may have several).
    pub fn describe(&self, addr: Option<SocketAddr>) -> String {
        match addr {
            Some(addr) if self.host.parse::<std::net::IpAddr>().is_err() => {
                format!("{} ({addr})", self.url)
            }
            _ => self.url.clone(),
        }
    }
}

/// Connects a gRPC channel over TLS to `url` (`https://host:port`).
pub async fn connect(url: &str, cfg: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    dial(&Target::parse(url)?, None, cfg).await
}

/// Connects to `addr`, one of `target`'s addresses, verifying the server's
/// certificate for `target`'s host name, not for the address: each address
/// of a name that resolves to several is a server of its own.
pub async fn connect_addr(
    target: &Target,
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> Result<Channel, TlsError> {
    dial(target, Some(addr), cfg).await
}

/// Dials `addr`, or else the host as the system resolves it.
async fn dial(
    target: &Target,
    addr: Option<SocketAddr>,
    cfg: Arc<ClientConfig>,
) -> Result<Channel, TlsError> {
    let connector = TlsConnector::from(cfg);
    let (host, port, name) = (target.host.clone(), target.port, target.name.clone());
    // tonic sees plain HTTP/2 over the TLS stream made here.
    let endpoint = Endpoint::from_shared(format!("http://{}", authority(&host, port)))
        .map_err(|e| TlsError::Url {
            url: target.url.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let name = name.clone();
            let host = host.clone();
            async move {
                let tcp = match addr {
                    Some(addr) => TcpStream::connect(addr).await?,
                    None => TcpStream::connect((host.as_str(), port)).await?,
                };
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| TlsError::Connect {
            url: target.describe(addr),
            detail: error_chain(&e),
        })
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An error with its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The verified client certificate, if one was presented.
    pub cert_der: Option<Vec<u8>>,
    pub identity: Option<Identity>,
}

/// An accepted TLS connection, handing [`PeerInfo`] to tonic handlers.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<Tracked<TcpStream>>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently;
/// `on_refused(peer, reason)` hears of every failed handshake. Every
/// connection is registered in `table` from accept on (which sheds others
/// when full, see [`crate::conn`]); accept errors back off instead of
/// spinning.
pub fn serve_incoming(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    on_refused: Arc<dyn Fn(SocketAddr, String) + Send + Sync>,
    table: Arc<ConnTable>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let acceptor = TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let (tcp, addr) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: shed one, wait, go on.
                    let wait = table.on_accept_error(&e, failures);
                    if failures == 0 {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            failures = 0;
            let Some(reg) = table.admit(Some(addr.ip()), Stage::Handshake) else {
                // Full of nodes and operators: this one is closed at once.
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shed = reg.watch();
            let tcp = reg.wrap(tcp);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let on_refused = on_refused.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let cert_der = inner
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.to_vec());
                        let identity = cert_der.as_deref().and_then(pki::identity_of);
                        inner
                            .get_ref()
                            .0
                            .registration()
                            .set_stage(if cert_der.is_some() {
                                Stage::Trusted
                            } else {
                                Stage::Unauthenticated
                            });
                        let conn = TlsConn {
                            inner,
                            peer: PeerInfo {
                                addr,
                                cert_der,
                                identity,
                            },
                        };
                        let _ = conn_tx.send(Ok(conn)).await;
                    }
                    // Shed to make room: counted and logged by the table.
                    Ok(Err(_)) if shed.is_shed() => {}
                    Ok(Err(e)) => on_refused(addr, format!("TLS handshake failed: {e}")),
                    Err(_) => on_refused(addr, "TLS handshake timed out".into()),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (host, port, _) = parse_url("https://127.0.0.1:8443").unwrap();
        assert_eq!((host.as_str(), port), ("127.0.0.1", 8443));
        let (host, port, _) = parse_url("https://[::1]:9").unwrap();
        assert_eq!((host.as_str(), port), ("::1", 9));
        assert_eq!(authority("::1", 9), "[::1]:9");
        let (_, port, _) = parse_url("https://kms.example").unwrap();
        assert_eq!(port, 443);
        for bad in ["http://x:1", "x:1", "https://", "nonsense"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_ip_literal_resolves_to_itself_and_a_name_to_its_addresses() {
        let t = Target::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(t.url(), "https://127.0.0.1:8443");
        let want: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert_eq!(t.resolve().await.unwrap(), [want]);
        assert_eq!(t.describe(Some(want)), "https://127.0.0.1:8443");
        let t = Target::parse("https://localhost:9").unwrap();
        let addrs = t.resolve().await.unwrap();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
        assert_eq!(
            t.describe(Some(addrs[0])),
            format!("https://localhost:9 ({})", addrs[0])
        );
        assert!(Target::parse("http://localhost:9").is_err());
    }

    /// The address is dialled, the certificate checked for the URL's host:
    /// the handshake completes for the name the certificate carries and
    /// fails for another one, both dialled at the same address.
    #[tokio::test]
    async fn an_address_is_dialled_with_the_url_host_as_tls_name() {
        let ca = pki::new_ca().unwrap();
        let leaf = pki::Ca::load(&ca.cert_der, &ca.key)
            .unwrap()
            .issue_server(&["kms.test".to_owned()])
            .unwrap();
        let acceptor =
            TlsAcceptor::from(server_config(&ca.cert_der, &leaf.cert_der, &leaf.key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The server's side of each handshake: the name the client sent,
        // when the client accepted the certificate (TLS 1.3: the server
        // finishes only after the client verified it).
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut open = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        seen.push(tls.get_ref().1.server_name().map(str::to_owned));
                        open.push(tls);
                    }
                    Err(_) => seen.push(None),
                }
            }
            seen
        });
        let cfg = client_config(Trust::Ca(&ca.cert_der), None).unwrap();
        let other = Target::parse(&format!("https://kms.other:{}", addr.port())).unwrap();
        let err = connect_addr(&other, addr, cfg.clone()).await.unwrap_err();
        assert!(err.to_string().contains(&format!("({addr})")), "{err}");
        let right = Target::parse(&format!("https://kms.test:{}", addr.port())).unwrap();
        // Only the handshake is under test: the server speaks no HTTP/2.
        let _ = tokio::time::timeout(Duration::from_secs(2), connect_addr(&right, addr, cfg)).await;
        assert_eq!(server.await.unwrap(), [None, Some("kms.test".to_owned())]);
    }
}
