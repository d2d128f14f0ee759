//! Every Prometheus metric `edgekms-server` exports, defined in this one
//! place (docs/operator-guide.md and deploy/prometheus-alerts.yaml use these
//! names), the tower layer that counts gRPC calls, and the text rendering
//! that `/metrics` serves through [`edgekms_daemon::ops`].
//!
//! The gauges are computed at scrape time from [`Central::gauges`], so they
//! cannot drift from the state; they are absent until the state is loaded.
//! Nothing recorded here carries key material, tokens or names of nodes.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tonic::codegen::http;
use tonic::Code;

use super::Central;
use edgekms_daemon::ops::grpc_code_name;

const NODES: &str = "edgekms_server_nodes";
const PENDING: &str = "edgekms_server_clusters_pending_rotation";
const OLDEST_UNACKED: &str = "edgekms_server_oldest_unacked_delivery_seconds";
const REQUESTS: &str = "edgekms_server_requests_total";
const REPAIRS: &str = "edgekms_store_repairs_total";
const RECONCILING: &str = "edgekms_server_clusters_reconciling";
const CLASHES: &str = "edgekms_server_key_clashes";
const STORE_UP: &str = "edgekms_server_store_up";
const LEADER: &str = "edgekms_server_leader";

/// The `record` label values of `edgekms_store_repairs_total`: a record
/// kind, or `store` for a RocksDB rebuilt from the copies.
pub const REPAIR_KINDS: [&str; 5] = ["root", "identity", "cluster", "kek", "store"];

/// The gRPC methods, as the `method` label spells them. Anything else (an
/// unknown path) counts as `other`, so no caller can mint new series.
pub const METHODS: [&str; 15] = [
    "Join",
    "Sync",
    "AddNode",
    "RemoveNode",
    "Rotate",
    "ForcePromote",
    "Retire",
    "Status",
    "Audit",
    "Backup",
    "WatchRotation",
    "EndReconcile",
    "JoinReplica",
    "AddReplica",
    "RemoveReplica",
];

/// The `method` label of a gRPC request path.
pub fn method_label(path: &str) -> &'static str {
    let method = path
        .strip_prefix("/edgekms.fleet.v1.Fleet/")
        .or_else(|| path.strip_prefix("/edgekms.fleet.v1.Operator/"));
    match method {
        Some(m) => METHODS
            .iter()
            .find(|k| **k == m)
            .copied()
            .unwrap_or("other"),
        None => "other",
    }
}

/// The server's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    nodes: IntGaugeVec,
    pending: IntGauge,
    oldest_unacked: IntGauge,
    reconciling: IntGauge,
    clashes: IntGauge,
    store_up: IntGauge,
    leader: IntGauge,
    requests: IntCounterVec,
    repairs: IntCounterVec,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let nodes = IntGaugeVec::new(
            Opts::new(
                NODES,
                "Nodes of every cluster by state (invited, active, revoked), and those with a sync stream open now (connected).",
            ),
            &["state"],
        )?;
        let pending = IntGauge::new(
            PENDING,
            "Clusters with a rotation pending: a new version waits for every node's ack before it becomes primary.",
        )?;
        let oldest_unacked = IntGauge::new(
            OLDEST_UNACKED,
            "Seconds the oldest delivered, not yet acked key version has waited for a node's ack; 0 when none waits.",
        )?;
        let reconciling = IntGauge::new(
            RECONCILING,
            "Clusters reconciling (restored from a backup, or nodes hold versions the service does not know): nothing is rotated, promoted or retired until every node reported.",
        )?;
        let clashes = IntGauge::new(
            CLASHES,
            "Versions a node holds under another key_id than the service's (two keys under one version number; never counted as held). Any non-zero value needs an operator: see kmsctl status.",
        )?;
        let store_up = IntGauge::new(
            STORE_UP,
            "1 while the state store answers (on etcd: a linearizable read, which needs quorum), 0 while writes would fail; /readyz says why. Nodes keep serving either way.",
        )?;
        let leader = IntGauge::new(
            LEADER,
            "1 on the replica that runs the once-only jobs (automatic rotation, audit retention, scheduled destruction); always 1 on RocksDB. Summed over replicas: 1, or 0 for at most the lease TTL.",
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS,
                "gRPC calls answered (Sync counted when its stream opens), by method and gRPC result code.",
            ),
            &["method", "code"],
        )?;
        let repairs = IntCounterVec::new(
            Opts::new(
                REPAIRS,
                "State records repaired at start: a damaged or missing record copy rewritten, a RocksDB record replaced by its copy (record = root, identity, cluster, kek), or the whole RocksDB store rebuilt from the copies (record = store). Any increase means a damaged disk: see the WARN/ERROR lines.",
            ),
            &["record"],
        )?;
        let registry = Registry::new();
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(oldest_unacked.clone()))?;
        registry.register(Box::new(reconciling.clone()))?;
        registry.register(Box::new(clashes.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(repairs.clone()))?;
        for kind in REPAIR_KINDS {
            repairs.with_label_values(&[kind]);
        }
        // Successful calls show as 0 from the start, so rates exist at once.
        for method in METHODS {
            requests.with_label_values(&[method, grpc_code_name(Code::Ok)]);
        }
        Ok(Self {
            registry,
            nodes,
            pending,
            oldest_unacked,
            reconciling,
            clashes,
            store_up,
            leader,
            requests,
            repairs,
        })
    }

    pub fn observe_repair(&self, record: &str) {
        let record = REPAIR_KINDS
            .iter()
            .find(|k| **k == record)
            .copied()
            .unwrap_or("store");
        self.repairs.with_label_values(&[record]).inc();
    }

    pub fn observe_request(&self, method: &str, code: Code) {
        self.requests
            .with_label_values(&[method, grpc_code_name(code)])
            .inc();
    }

    /// The text exposition; the gauges are read from `core` now, and left
    /// out while it is `None` (still starting).
    pub fn render(&self, core: Option<&Central>) -> String {
        let gauges = [
            NODES,
            PENDING,
            OLDEST_UNACKED,
            RECONCILING,
            CLASHES,
            STORE_UP,
            LEADER,
        ];
        if let Some(core) = core {
            let g = core.gauges();
            for (state, n) in g.nodes {
                self.nodes.with_label_values(&[state]).set(to_i64(n));
            }
            self.pending.set(to_i64(g.pending));
            self.oldest_unacked.set(to_i64(g.oldest_unacked));
            self.reconciling.set(to_i64(g.reconciling));
            self.clashes.set(to_i64(g.clashes));
            self.store_up.set(i64::from(core.store_health().is_ok()));
            self.leader.set(i64::from(core.leads()));
        }
        let mut families = self.registry.gather();
        if core.is_none() {
            families.retain(|f| !gauges.contains(&f.name()));
        }
        let mut out = Vec::new();
        match TextEncoder::new().encode(&families, &mut out) {
            Ok(()) => String::from_utf8(out).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot render metrics");
                String::new()
            }
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The process-wide metrics. Registration of fixed names into a fresh
/// registry cannot fail; should it ever, the server serves without metrics
/// rather than not at all.
static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match Metrics::new() {
    Ok(m) => Some(m),
    Err(e) => {
        tracing::error!(error = %e, "cannot register metrics; /metrics will be empty");
        None
    }
});

/// Counts one gRPC call.
pub fn observe_request(method: &str, code: Code) {
    if let Some(m) = METRICS.as_ref() {
        m.observe_request(method, code);
    }
}

/// Counts one repair of the state at start (`record`: one of
/// [`REPAIR_KINDS`]).
pub fn observe_repair(record: &str) {
    if let Some(m) = METRICS.as_ref() {
        m.observe_repair(record);
    }
}

/// The `/metrics` body; `core` is `None` until the state is loaded.
pub fn render(core: Option<&Central>) -> String {
    METRICS.as_ref().map(|m| m.render(core)).unwrap_or_default()
}

/// Counts every gRPC call in `edgekms_server_requests_total` (for
/// `tonic::transport::Server::layer`). The code is the response's
/// `grpc-status` header, where tonic puts a handler's error; a response
/// without one succeeded (its status comes later, in the trailers).
#[derive(Debug, Clone, Copy, Default)]
pub struct CountRequests;

impl<S> tower::Layer<S> for CountRequests {
    type Service = CountRequestsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountRequestsService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CountRequestsService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for CountRequestsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(resp) => tonic::Status::from_header_map(resp.headers())
                    .map(|s| s.code())
                    .unwrap_or(Code::Ok),
                Err(_) => Code::Unknown,
            };
            observe_request(method, code);
            res
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn methods_are_a_fixed_set() {
        assert_eq!(method_label("/edgekms.fleet.v1.Operator/Rotate"), "Rotate");
        assert_eq!(method_label("/edgekms.fleet.v1.Fleet/Sync"), "Sync");
        assert_eq!(method_label("/edgekms.fleet.v1.Operator/Sync"), "Sync");
        assert_eq!(method_label("/edgekms.fleet.v1.Operator/Whatever"), "other");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "other");
        assert_eq!(method_label("/"), "other");
    }

    #[test]
    fn gauges_are_absent_until_the_state_is_loaded_and_calls_count() {
        let m = Metrics::new().unwrap();
        let text = m.render(None);
        assert!(!text.contains(NODES), "{text}");
        assert!(!text.contains(OLDEST_UNACKED), "{text}");
        assert_eq!(
            value(
                &text,
                "edgekms_server_requests_total{code=\"OK\",method=\"Backup\"}"
            ),
            Some(0.0),
            "{text}"
        );
        m.observe_request("Rotate", Code::NotFound);
        m.observe_request("Rotate", Code::NotFound);
        let text = m.render(None);
        assert_eq!(
            value(
                &text,
                "edgekms_server_requests_total{code=\"NotFound\",method=\"Rotate\"}"
            ),
            Some(2.0)
        );
    }

    #[test]
    fn gauges_follow_the_core() {
        use edgekms_hsm::soft::SoftSealer;
        let dir = tempfile::tempdir().unwrap();
        let sealer = SoftSealer::open_or_create(&dir.path().join("soft-sealer.key")).unwrap();
        crate::init::init(dir.path(), &sealer, &["localhost".to_owned()]).unwrap();
        let core = crate::init::open(dir.path(), &sealer).unwrap();
        let m = Metrics::new().unwrap();
        let text = m.render(Some(&core));
        for state in ["invited", "active", "revoked", "connected"] {
            let series = format!("{NODES}{{state=\"{state}\"}}");
            assert_eq!(value(&text, &series), Some(0.0), "{text}");
        }
        assert_eq!(value(&text, PENDING), Some(0.0));
        assert_eq!(value(&text, OLDEST_UNACKED), Some(0.0));
        let day = std::time::Duration::from_secs(86_400);
        core.add_node("op", "edge-1", "cp-1", day).unwrap();
        core.add_node("op", "edge-1", "cp-2", day).unwrap();
        core.remove_node("op", "edge-1", "cp-2").unwrap();
        let text = m.render(Some(&core));
        assert_eq!(
            value(&text, &format!("{NODES}{{state=\"invited\"}}")),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("{NODES}{{state=\"revoked\"}}")),
            Some(1.0)
        );
        assert!(text.contains(&format!("# TYPE {NODES} gauge")));
    }
}
