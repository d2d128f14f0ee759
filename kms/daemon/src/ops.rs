//! The operations HTTP endpoint shared by the daemons: `/metrics`
//! (Prometheus text format), `/healthz` (the process lives) and `/readyz`
//! (the daemon can serve key material), on one TCP address.
//!
//! The daemon supplies two callbacks, so this module knows nothing about
//! keys or metrics: `ready` says whether the daemon is ready (or why not),
//! `metrics` renders the exposition. It binds only the address it is given
//! and serves until its task is dropped with the runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A client has this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the daemon is ready: `Ok(())`, or why not (the `/readyz` body).
pub type ReadyFn = dyn Fn() -> Result<(), String> + Send + Sync;
/// Renders `/metrics` in the Prometheus text format.
pub type MetricsFn = dyn Fn() -> String + Send + Sync;

/// What the endpoint answers with.
#[derive(Clone)]
pub struct Handlers {
    pub ready: Arc<ReadyFn>,
    pub metrics: Arc<MetricsFn>,
}

impl Handlers {
    pub fn new(
        ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
        metrics: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        Self {
            ready: Arc::new(ready),
            metrics: Arc::new(metrics),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for metrics and health: {source} (is another process using it? change --metrics-addr or pass --no-metrics)")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A bound, not yet serving, operations endpoint.
pub struct OpsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl OpsServer {
    /// Binds `addr` (port 0 picks a free port; see [`OpsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        let err = |source| BindError { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(Self { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves connections until the task is dropped. Never returns.
    pub async fn serve(self, handlers: Handlers) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, addr = %self.addr, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handlers = handlers.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handlers = handlers.clone();
                    async move { Ok::<_, Infallible>(respond(&handlers, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics endpoint: connection ended");
                }
            });
        }
    }
}

fn respond(handlers: &Handlers, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, (handlers.metrics)());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            resp
        }
        "/readyz" => match (handlers.ready)() {
            Ok(()) => text(StatusCode::OK, "ok".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        _ => text(StatusCode::OK, "ok".into()),
    }
}

/// The gRPC code name as gRPC spells it everywhere else (`OK`,
/// `InvalidArgument`, ...; grpc-go's `Code.String()`), for `code` labels.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 exchange over a fresh connection: (status, headers+body).
    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (status, out)
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n").unwrap().1
    }

    #[tokio::test]
    async fn routes_readiness_and_metrics_through_the_callbacks() {
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let handlers = Handlers::new(
            move || {
                if r.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("starting".into())
                }
            },
            || "# TYPE x counter\nx 1\n".into(),
        );
        let server = OpsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let task = tokio::spawn(server.serve(handlers));

        let (code, resp) = get(addr, "GET", "/healthz").await;
        assert_eq!((code, body(&resp)), (200, "ok"));
        let (code, resp) = get(addr, "GET", "/readyz").await;
        assert_eq!((code, body(&resp)), (503, "starting"));
        ready.store(true, Ordering::SeqCst);
        let (code, resp) = get(addr, "GET", "/readyz?verbose").await;
        assert_eq!((code, body(&resp)), (200, "ok"));

        let (code, resp) = get(addr, "GET", "/metrics").await;
        assert_eq!((code, body(&resp)), (200, "# TYPE x counter\nx 1\n"));
        assert!(
            resp.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{resp}"
        );
        let (code, resp) = get(addr, "HEAD", "/metrics").await;
        assert_eq!((code, body(&resp)), (200, ""));

        assert_eq!(get(addr, "GET", "/").await.0, 404);
        assert_eq!(get(addr, "GET", "/metricsx").await.0, 404);
        let (code, resp) = get(addr, "POST", "/readyz").await;
        assert_eq!(code, 405);
        assert!(resp.to_ascii_lowercase().contains("allow: get, head"));

        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        // Dropped with its task: the port is free again.
        tokio::net::TcpListener::bind(addr).await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_address_is_refused_with_the_address_and_the_fix() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = OpsServer::bind(addr).await.err().unwrap().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("--no-metrics"), "{err}");
    }
}
