//! The census' one error type, and how a transport failure or a gRPC status
//! becomes one of its variants (each message says what to check).

use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

/// Why a census could not be taken. Values of unexpected shape are never
/// an error: they are counted.
#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("no etcd endpoint given (--etcd-endpoints)")]
    NoEndpoint,
    #[error("bad census request: {0}")]
    Spec(String),
    #[error("cannot read the {what} {path}: {source}")]
    File {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    TlsConfig(String),
    #[error("encryption configuration: {0}")]
    Config(String),
    #[error("cannot reach etcd at {endpoint}: {detail} (is etcd, kine or k8s-dqlite listening there? the address is kube-apiserver's --etcd-servers)")]
    Unreachable { endpoint: String, detail: String },
    #[error("TLS with etcd at {endpoint} failed: {detail} ({hint})")]
    Tls {
        endpoint: String,
        detail: String,
        hint: &'static str,
    },
    #[error("etcd at {endpoint}: {what} took longer than {after:?}; gave up")]
    Timeout {
        endpoint: String,
        what: &'static str,
        after: Duration,
    },
    #[error("{endpoint} is not an etcd v3 endpoint: {detail}")]
    NotEtcd { endpoint: String, detail: String },
    #[error("etcd at {endpoint} compacted revision {revision} while the census read it: run the census again")]
    Compacted { endpoint: String, revision: i64 },
    #[error("etcd at {endpoint} refused the range request: {code:?}: {detail}")]
    Refused {
        endpoint: String,
        code: tonic::Code,
        detail: String,
    },
}

/// The rustls error somewhere in `e`'s source chain, if any.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r);
            }
        }
        cur = err.source();
    }
    None
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

fn tls_error(endpoint: &str, r: &rustls::Error) -> CensusError {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let hint = match r {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "etcd's certificate is not signed by --etcd-cacert: is it etcd's CA (kubeadm: /etc/kubernetes/pki/etcd/ca.crt)?"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "etcd's certificate does not name this host: use the address its certificate was made for"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "etcd's certificate has expired"
        }
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA)
        | E::AlertReceived(A::HandshakeFailure) => {
            "etcd refused our client certificate: pass the one kube-apiserver uses (--etcd-cert, --etcd-key; kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt and .key)"
        }
        _ => "check --etcd-cacert, --etcd-cert and --etcd-key",
    };
    CensusError::Tls {
        endpoint: endpoint.to_string(),
        detail: r.to_string(),
        hint,
    }
}

/// A failure to connect.
pub(crate) fn classify_connect(endpoint: &str, e: &tonic::transport::Error) -> CensusError {
    if let Some(r) = rustls_error(e) {
        return tls_error(endpoint, r);
    }
    CensusError::Unreachable {
        endpoint: endpoint.to_string(),
        detail: chain(e),
    }
}

/// A failed Range call. `tls`: whether the connection is TLS; `client_cert`:
/// whether we presented one.
pub(crate) fn classify_status(
    endpoint: &str,
    status: &tonic::Status,
    tls: bool,
    client_cert: bool,
    revision: i64,
) -> CensusError {
    if let Some(r) = status.source().and_then(rustls_error) {
        return tls_error(endpoint, r);
    }
    let message = status.message();
    let detail = match status.source() {
        Some(src) => format!("{message}: {}", chain(src)),
        None => message.to_string(),
    };
    match status.code() {
        tonic::Code::Unimplemented => CensusError::NotEtcd {
            endpoint: endpoint.to_string(),
            detail: format!("it speaks gRPC but has no etcdserverpb.KV/Range ({detail})"),
        },
        _ if message.contains("compacted") => CensusError::Compacted {
            endpoint: endpoint.to_string(),
            revision,
        },
        // The peer dropped the connection rather than answering; depending
        // on when the close lands, tonic reports a transport error or the
        // request as cancelled.
        tonic::Code::Unknown
        | tonic::Code::Unavailable
        | tonic::Code::Internal
        | tonic::Code::Cancelled
            if message.contains("transport error")
                || message.contains("operation was canceled")
                || message.contains("h2 protocol error")
                || message.contains("connection") =>
        {
            // With TLS 1.3 a server refuses a client certificate (or its
            // absence) after the handshake: by closing the connection.
            if tls {
                CensusError::Tls {
                    endpoint: endpoint.to_string(),
                    detail,
                    hint: if client_cert {
                        "etcd closed the connection: it refuses this client certificate; pass the one kube-apiserver uses (--etcd-cert, --etcd-key; kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt and .key)"
                    } else {
                        "etcd closed the connection: it requires a client certificate (--etcd-cert, --etcd-key)"
                    },
                }
            } else {
                CensusError::NotEtcd {
                    endpoint: endpoint.to_string(),
                    detail: format!("no gRPC answer over HTTP/2 ({detail})"),
                }
            }
        }
        tonic::Code::Internal | tonic::Code::Unknown
            if message.contains("protocol error")
                || message.contains("content-type")
                || message.contains("HTTP status") =>
        {
            CensusError::NotEtcd {
                endpoint: endpoint.to_string(),
                detail,
            }
        }
        code => CensusError::Refused {
            endpoint: endpoint.to_string(),
            code,
            detail,
        },
    }
}
