//! `cargo bench -p edgekms-server --bench fleet [-- --nodes N --clusters M]`:
//! the central key service at fleet scale (issue #4).
//!
//! Starts the real `edgekms-server` (soft sealer, loopback, a fresh data
//! dir) as its own process, enrols N simulated nodes in M clusters through
//! the operator API, and runs every node in this process as a tokio task
//! with its own TCP + mutual TLS connection and `Sync` stream: it joins
//! with a one-time token (CA pin, no client certificate), opens its stream
//! with the issued certificate, and applies every state the server sends
//! as a plugin does: `edgekms_core::rotation::node::converge` on the
//! keyring it holds, unwrapping each delivered KEK with its delivery key
//! (real ECDH + AES-GCM); then it reports back what it holds.
//! Once every node serves version 1, it rotates every cluster and times
//! until every node reports version 2 as primary and the server's Status
//! agrees. Prints the server's peak RSS (VmHWM) and CPU time (utime +
//! stime) per run, and how each figure grows against the smallest run.
//!
//! Without arguments it runs 200/100, 1,000/500 and 2,000/1,000
//! nodes/clusters. Targets: 2,000 nodes in 1,000 clusters rotated and
//! promoted within 10 s, server peak RSS under 500 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgekms_core::delivery::{Binding, DeliveryKey};
use edgekms_core::rotation::node::{converge, Received};
use edgekms_core::Keyring;
use edgekms_daemon::pki::{self, PrivateKey};
use edgekms_daemon::tls;
use edgekms_proto::fleet as pb;
use edgekms_proto::fleet::fleet_client::FleetClient;
use edgekms_proto::fleet::operator_client::OperatorClient;
use edgekms_testkit::process::Daemon;
use edgekms_testkit::{net, procfs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::Channel;

/// Built by `cargo bench` with this bench; `EDGEKMS_SERVER=path` runs
/// another build instead (to compare two versions of the server).
const SERVER: &str = env!("CARGO_BIN_EXE_edgekms-server");

fn server_bin() -> PathBuf {
    std::env::var_os("EDGEKMS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SERVER))
}

/// Operator calls in flight at once (one HTTP/2 connection).
const OPERATOR_PARALLEL: usize = 32;
/// Nodes joining at once (join, connect, first sync).
const JOIN_PARALLEL: usize = 64;
/// How long any phase may take before the run is declared failed.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
const SERIES: [(usize, usize); 3] = [(200, 100), (1000, 500), (2000, 1000)];
const TARGET_NODES: usize = 2000;
const TARGET_ROTATE: Duration = Duration::from_secs(10);
const TARGET_RSS_MIB: f64 = 500.0;

// ---- the service: one server, or replicas on etcd ----

/// Where the service keeps its state (`--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// One server, embedded RocksDB.
    Rocksdb,
    /// [`REPLICAS`] replicas on a three-member etcd cluster.
    Etcd,
}

const REPLICAS: usize = 3;

/// `edgekms-server` processes on free loopback ports, in a temporary dir:
/// one on RocksDB, or [`REPLICAS`] on a real three-member etcd; stopped
/// (SIGTERM, then SIGKILL) and removed on drop.
struct Server {
    daemons: Vec<Daemon>,
    urls: Vec<String>,
    etcd: Option<edgekms_testkit::etcd_cluster::EtcdCluster>,
    dir: Option<tempfile::TempDir>,
    /// Keep the data dir and server.log (`--keep`).
    keep: bool,
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Server {
    async fn start(tmp: &Path, keep: bool, store: Store) -> Server {
        let dir = tempfile::tempdir_in(tmp).unwrap();
        let etcd = (store == Store::Etcd).then(|| {
            edgekms_testkit::etcd::require();
            edgekms_testkit::etcd_cluster::EtcdCluster::start(3)
        });
        let store_args: Vec<String> = match &etcd {
            None => Vec::new(),
            Some(e) => vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                e.endpoints().join(","),
                "--etcd-insecure".into(),
            ],
        };
        let data = dir.path().join("r1");
        let mut init = Command::new(server_bin());
        init.args(["init", "--sealer", "soft", "--data-dir"])
            .arg(&data)
            .args(&store_args);
        if etcd.is_some() {
            init.args(["--name", "r1"]);
        }
        run_ok(&mut init, "edgekms-server init");
        let mut me = Server {
            daemons: Vec::new(),
            urls: Vec::new(),
            etcd,
            dir: Some(dir),
            keep,
        };
        me.spawn(&data, &store_args);
        if me.etcd.is_some() {
            let mut op = operator(&me, 0).await;
            for i in 2..=REPLICAS {
                let name = format!("r{i}");
                let inv = op
                    .add_replica(pb::AddReplicaRequest {
                        name: name.clone(),
                        ttl_seconds: 600,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let data = me.path().join(&name);
                run_ok(
                    Command::new(server_bin())
                        .args(["join", "--sealer", "soft", "--server", &me.urls[0]])
                        .args(["--token", &inv.token, "--ca-hash", &inv.ca_hash])
                        .arg("--data-dir")
                        .arg(&data),
                    "edgekms-server join",
                );
                me.spawn(&data, &store_args);
                operator(&me, i - 1).await;
            }
        }
        me
    }

    fn spawn(&mut self, data: &Path, store_args: &[String]) {
        let listen = net::free_addr();
        let mut cmd = Command::new(server_bin());
        cmd.args(["--sealer", "soft", "--no-metrics", "--data-dir"])
            .arg(data)
            .arg("--listen")
            .arg(listen.to_string())
            .args(store_args)
            .env("RUST_LOG", "info");
        let log = data.with_extension("log");
        self.daemons
            .push(Daemon::spawn("edgekms-server", cmd, &log));
        self.urls.push(format!("https://{listen}"));
    }

    fn path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().to_owned())
            .unwrap_or_default()
    }

    fn operator_dir(&self) -> PathBuf {
        self.path().join("r1/operator")
    }

    fn log_tail(&self) -> String {
        self.daemons
            .iter()
            .map(|d| d.log_tail(20))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Peak resident set size of each replica, MiB.
    fn peak_rss_mib(&self) -> Vec<f64> {
        self.daemons
            .iter()
            .map(|d| procfs::status_kib(d.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0)
            .collect()
    }

    /// Sockets the replicas hold open (listener, operator, one per node).
    fn sockets(&self) -> usize {
        self.daemons
            .iter()
            .map(|d| procfs::socket_count(d.pid()))
            .sum()
    }

    /// User + system CPU time of every replica so far, seconds.
    fn cpu_seconds(&self) -> f64 {
        self.daemons
            .iter()
            .map(|d| procfs::cpu_seconds(d.pid()))
            .sum()
    }

    /// Raft proposals etcd committed so far (every write is one): the
    /// etcd transactions the service made.
    fn etcd_writes(&self) -> u64 {
        let Some(etcd) = &self.etcd else { return 0 };
        (0..etcd.size())
            .filter(|&i| etcd.is_up(i))
            .find_map(|i| etcd_metric(&etcd.endpoint(i), "etcd_server_proposals_committed_total"))
            .unwrap_or(0)
    }
}

/// One counter of an etcd member's `/metrics`.
fn etcd_metric(endpoint: &str, name: &str) -> Option<u64> {
    use std::io::Read;
    let addr = endpoint.strip_prefix("http://")?;
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

impl Drop for Server {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.terminate(Duration::from_secs(5));
        }
        if let (true, Some(dir)) = (self.keep, self.dir.take()) {
            println!("kept {}", dir.keep().display());
        }
    }
}

/// Median time of a 4 KiB write + fdatasync in `dir`, ms: what one synced
/// state commit of the server costs at least, on that file system, now.
fn sync_latency_ms(dir: &Path) -> f64 {
    let path = dir.join("sync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut times: Vec<f64> = (0..50)
        .map(|_| {
            let start = Instant::now();
            f.write_all(&[0u8; 4096]).unwrap();
            f.sync_data().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    drop(f);
    let _ = std::fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// This process's own user + system CPU time, seconds.
fn own_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// An operator client of replica `i`.
async fn operator(server: &Server, i: usize) -> OperatorClient<Channel> {
    let dir = server.operator_dir();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let ca = pki::pem_decode("CERTIFICATE", &read("ca.pem")).unwrap();
    let cert = pki::pem_decode("CERTIFICATE", &read("cert.pem")).unwrap();
    let key = PrivateKey::from_der(pki::pem_decode("PRIVATE KEY", &read("key.pem")).unwrap());
    let cfg = tls::client_config(tls::Trust::Ca(&ca), Some((&cert, &key))).unwrap();
    let start = Instant::now();
    loop {
        let answered = match tls::connect(&server.urls[i], cfg.clone()).await {
            Ok(channel) => {
                let mut op = OperatorClient::new(channel).max_decoding_message_size(256 << 20);
                // Serving once Status answers (a replica loads its state
                // before it listens, but the listener may lag the log).
                match op
                    .status(pb::StatusRequest {
                        cluster: "-".into(),
                    })
                    .await
                {
                    Err(e) if e.code() == tonic::Code::Unavailable => None,
                    _ => Some(op),
                }
            }
            Err(_) => None,
        };
        if let Some(op) = answered {
            return op;
        }
        if start.elapsed() > Duration::from_secs(30) {
            panic!("replica {i} never answered\n{}", server.log_tail())
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- simulated nodes ----

/// What the node tasks tell the driver.
#[derive(Default)]
struct Progress {
    /// Nodes that reported version 1 as their primary.
    on_v1: AtomicUsize,
    /// Nodes that reported version 2 as their primary.
    on_v2: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Progress {
    fn fail(&self, who: &str, e: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.first_error
            .lock()
            .unwrap()
            .get_or_insert_with(|| format!("{who}: {e}"));
    }
}

struct NodeSpec {
    cluster: String,
    node: String,
    token: String,
}

/// One node: join, open the mTLS sync stream, converge on every state the
/// server sends. Runs until the stream ends.
async fn run_node(
    url: String,
    join_cfg: Arc<rustls::ClientConfig>,
    spec: NodeSpec,
    permit: OwnedSemaphorePermit,
    progress: Arc<Progress>,
) {
    let who = format!("{}/{}", spec.cluster, spec.node);
    if let Err(e) = node_inner(&url, join_cfg, &spec, permit, &progress).await {
        progress.fail(&who, e);
    }
}

async fn node_inner(
    url: &str,
    join_cfg: Arc<rustls::ClientConfig>,
    spec: &NodeSpec,
    permit: OwnedSemaphorePermit,
    progress: &Progress,
) -> Result<(), String> {
    let mut permit = Some(permit);
    let (tls_key, csr_der) = pki::node_key_and_csr().map_err(|e| e.to_string())?;
    let delivery = DeliveryKey::generate();

    // Join: trusts the server through the CA pin only, no client cert.
    let joined = {
        let channel = tls::connect(url, join_cfg)
            .await
            .map_err(|e| format!("join connect: {e}"))?;
        FleetClient::new(channel)
            .join(pb::JoinRequest {
                token: spec.token.clone(),
                cluster: spec.cluster.clone(),
                node: spec.node.clone(),
                csr_der: csr_der.into(),
                delivery_public_key: delivery.public_key().into(),
            })
            .await
            .map_err(|e| format!("join: {e}"))?
            .into_inner()
    };

    // Sync: its own mutual TLS connection with the issued certificate.
    let cfg = tls::client_config(
        tls::Trust::Ca(&joined.ca_der),
        Some((&joined.certificate_der, &tls_key)),
    )
    .map_err(|e| e.to_string())?;
    let channel = tls::connect(url, cfg)
        .await
        .map_err(|e| format!("sync connect: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::NodeReport::default())
        .await
        .map_err(|_| "report channel closed")?;
    let mut inbound = FleetClient::new(channel)
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("sync: {e}"))?
        .into_inner();
    let mut keyring = Keyring::new(&spec.cluster).map_err(|e| e.to_string())?;
    let mut on_v2 = false;
    loop {
        let state = match inbound.message().await {
            Ok(Some(state)) => state,
            // The server stopped: the run is over.
            Ok(None) => return Ok(()),
            Err(e) if e.code() == tonic::Code::Unavailable => return Ok(()),
            Err(e) => return Err(format!("sync stream: {e}")),
        };
        if state.heartbeat {
            continue;
        }
        // As the plugin's `apply_cluster_state`, without the store: a
        // plugin would also wrap each new key under its NSK and persist it.
        keyring = apply(&keyring, &state, spec, &delivery)?;
        let primary = keyring.primary().map_or(0, |p| p.version);
        tx.send(pb::NodeReport {
            held: keyring
                .versions()
                .filter(|kv| kv.key().is_some())
                .map(|kv| kv.version)
                .collect(),
            applied_seq: state.seq,
            primary,
            ..Default::default()
        })
        .await
        .map_err(|_| "sync stream closed")?;
        match primary {
            1 if permit.is_some() => {
                permit = None;
                progress.on_v1.fetch_add(1, Ordering::SeqCst);
            }
            2 if !on_v2 => {
                on_v2 = true;
                progress.on_v2.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// The keyring `current` converged on `state` by the node's rules.
fn apply(
    current: &Keyring,
    state: &pb::ClusterState,
    spec: &NodeSpec,
    delivery: &DeliveryKey,
) -> Result<Keyring, String> {
    let received = edgekms_proto::convert::received(state).map_err(|e| e.to_string())?;
    let unwrap = |r: &Received<'_>| {
        let binding = Binding {
            cluster: &spec.cluster,
            node: &spec.node,
            version: r.version,
            key_id: r.key_id,
        };
        delivery
            .unwrap(binding, r.wrapped_key)
            .map_err(|e| e.to_string())
    };
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let retired = edgekms_proto::convert::retire_orders(state);
    converge(current, &received, &retired, now_unix, unwrap)
        .map(|step| step.keyring)
        .map_err(|e| format!("converge: {e}"))
}

// ---- one run ----

struct Figures {
    nodes: usize,
    clusters: usize,
    /// Peak RSS of each replica, MiB.
    rss_each: Vec<f64>,
    /// etcd writes during the rotation, per cluster rotated.
    etcd_per_rotation: f64,
    invite: Duration,
    enrol: Duration,
    rotate_calls: Duration,
    nodes_primary: Duration,
    server_agrees: Duration,
    rss_mib: f64,
    sockets: usize,
    sync_ms: f64,
    cpu_total: f64,
    cpu_rotation: f64,
    bench_cpu: f64,
}

/// Polls `done` every millisecond; fails the run on a node error or after
/// [`PHASE_TIMEOUT`].
async fn until(what: &str, server: &Server, progress: &Progress, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        if progress.failed.load(Ordering::SeqCst) > 0 {
            panic!(
                "{what}: {} node(s) failed, first: {}\nserver log:\n{}",
                progress.failed.load(Ordering::SeqCst),
                progress
                    .first_error
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_default(),
                server.log_tail()
            );
        }
        if start.elapsed() > PHASE_TIMEOUT {
            panic!(
                "{what}: timed out after {PHASE_TIMEOUT:?} (v1 {}, v2 {})\nserver log:\n{}",
                progress.on_v1.load(Ordering::SeqCst),
                progress.on_v2.load(Ordering::SeqCst),
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether the server's Status shows every cluster on `version` and every
/// node holding it as primary, up to date.
async fn server_agrees(
    op: &mut OperatorClient<Channel>,
    clusters: usize,
    nodes: usize,
    version: u32,
) -> bool {
    let status = op
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    status.clusters.len() == clusters
        && status.clusters.iter().map(|c| c.nodes.len()).sum::<usize>() == nodes
        && status.clusters.iter().all(|c| {
            c.primary == version
                && c.pending == 0
                && c.nodes.iter().all(|n| {
                    n.state == "active" && n.primary == version && !n.behind && n.connected
                })
        })
}

async fn run(nodes: usize, clusters: usize, tmp: &Path, keep: bool, store: Store) -> Figures {
    assert!(
        clusters >= 1 && nodes >= clusters,
        "need nodes >= clusters >= 1"
    );
    let cpu_bench_start = own_cpu_seconds();
    let sync_ms = sync_latency_ms(tmp);
    let server = Server::start(tmp, keep, store).await;
    let mut op = operator(&server, 0).await;
    let mut ops = Vec::new();
    for i in 0..server.urls.len() {
        ops.push(operator(&server, i).await);
    }
    let progress = Arc::new(Progress::default());

    // Invitations: node i is in cluster i % clusters.
    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(OPERATOR_PARALLEL));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..nodes {
        let cluster = format!("c{:05}", i % clusters);
        let node = format!("n{i:05}");
        let mut op = op.clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        calls.spawn(async move {
            let r = op
                .add_node(pb::AddNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    ttl_seconds: 3600,
                })
                .await
                .unwrap_or_else(|e| panic!("add_node {cluster}/{node}: {e}"))
                .into_inner();
            drop(permit);
            (
                NodeSpec {
                    cluster,
                    node,
                    token: r.token,
                },
                r.ca_hash,
            )
        });
    }
    let mut specs = Vec::with_capacity(nodes);
    let mut ca_hash = String::new();
    while let Some(done) = calls.join_next().await {
        let (spec, hash) = done.unwrap();
        ca_hash = hash;
        specs.push(spec);
    }
    let invite = start.elapsed();

    // Join and first sync, JOIN_PARALLEL at a time; every node keeps its
    // stream open.
    let join_cfg = tls::client_config(tls::Trust::Pin(ca_hash), None).unwrap();
    let sem = Arc::new(Semaphore::new(JOIN_PARALLEL));
    let mut node_tasks = tokio::task::JoinSet::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let permit = sem.clone().acquire_owned().await.unwrap();
        // Nodes spread over the replicas.
        node_tasks.spawn(run_node(
            server.urls[i % server.urls.len()].clone(),
            join_cfg.clone(),
            spec,
            permit,
            progress.clone(),
        ));
        if progress.failed.load(Ordering::SeqCst) > 0 {
            break;
        }
    }
    until("enrolment", &server, &progress, || {
        progress.on_v1.load(Ordering::SeqCst) == nodes
    })
    .await;
    while !server_agrees(&mut op, clusters, nodes, 1).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let enrol = start.elapsed();

    // Rotate every cluster; time until all nodes serve version 2.
    let cpu_before = server.cpu_seconds();
    let writes_before = server.etcd_writes();
    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(OPERATOR_PARALLEL));
    let mut calls = tokio::task::JoinSet::new();
    for c in 0..clusters {
        let cluster = format!("c{c:05}");
        // Operators spread over the replicas too.
        let mut op = ops[c % ops.len()].clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        calls.spawn(async move {
            let r = op
                .rotate(pb::RotateRequest {
                    cluster: cluster.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("rotate {cluster}: {e}"))
                .into_inner();
            drop(permit);
            assert!(r.created && r.version == 2, "rotate {cluster}: {r:?}");
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let rotate_calls = start.elapsed();
    until("rotation", &server, &progress, || {
        progress.on_v2.load(Ordering::SeqCst) == nodes
    })
    .await;
    let nodes_primary = start.elapsed();
    while !server_agrees(&mut op, clusters, nodes, 2).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(start.elapsed() < PHASE_TIMEOUT, "the server never agreed");
    }
    let server_agrees = start.elapsed();
    let etcd_per_rotation = (server.etcd_writes() - writes_before) as f64 / clusters as f64;
    let cpu_total = server.cpu_seconds();
    let rss_each = server.peak_rss_mib();
    let rss_mib = rss_each.iter().copied().fold(0.0, f64::max);
    let sockets = server.sockets();
    let bench_cpu = own_cpu_seconds() - cpu_bench_start;

    drop(op);
    drop(ops);
    drop(server);
    // The server is gone: every stream ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::time::timeout_at(deadline.into(), node_tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    node_tasks.abort_all();

    Figures {
        nodes,
        clusters,
        rss_each,
        etcd_per_rotation,
        invite,
        enrol,
        rotate_calls,
        nodes_primary,
        server_agrees,
        rss_mib,
        sockets,
        sync_ms,
        cpu_total,
        cpu_rotation: cpu_total - cpu_before,
        bench_cpu,
    }
}

// ---- report ----

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cores} cores, {model}, load average {}", load.join(" "))
}

fn print_table(runs: &[Figures], store: Store) {
    if store == Store::Etcd {
        println!();
        println!(
            "{:>6} {:>8} {:>12} {:>26}",
            "nodes", "clusters", "etcd w/rot", "replica peak RSS MiB"
        );
        for f in runs {
            let each: Vec<String> = f.rss_each.iter().map(|r| format!("{r:.1}")).collect();
            println!(
                "{:>6} {:>8} {:>12.2} {:>26}",
                f.nodes,
                f.clusters,
                f.etcd_per_rotation,
                each.join(" / ")
            );
        }
    }
    if let (Some(small), Some(big)) = (runs.first(), runs.last()) {
        if big.nodes > small.nodes {
            let sum = |f: &Figures| f.rss_each.iter().sum::<f64>();
            println!(
                "server memory per connected node (all replicas, {} -> {} nodes): {:.1} KiB",
                small.nodes,
                big.nodes,
                (sum(big) - sum(small)) * 1024.0 / (big.nodes - small.nodes) as f64
            );
        }
    }
    println!();
    println!(
        "{:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "nodes",
        "clusters",
        "enrol s",
        "rotate s",
        "nodes s",
        "primary s",
        "RSS MiB",
        "CPU s",
        "rot CPU s",
        "bench CPU",
        "sync ms"
    );
    for f in runs {
        println!(
            "{:>6} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>8.2}",
            f.nodes,
            f.clusters,
            secs(f.enrol),
            secs(f.rotate_calls),
            secs(f.nodes_primary),
            secs(f.server_agrees),
            f.rss_mib,
            f.cpu_total,
            f.cpu_rotation,
            f.bench_cpu,
            f.sync_ms,
        );
    }
    if runs.len() > 1 {
        let base = &runs[0];
        println!();
        println!("growth against the {}-node run:", base.nodes);
        println!(
            "{:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "nodes", "x nodes", "enrol", "primary", "RSS", "CPU", "rot CPU"
        );
        for f in runs {
            println!(
                "{:>6} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                f.nodes,
                f.nodes as f64 / base.nodes as f64,
                secs(f.enrol) / secs(base.enrol),
                secs(f.server_agrees) / secs(base.server_agrees),
                f.rss_mib / base.rss_mib,
                f.cpu_total / base.cpu_total,
                f.cpu_rotation / base.cpu_rotation,
            );
        }
    }
    if let Some(f) = runs.iter().find(|f| f.nodes == TARGET_NODES) {
        println!();
        let rot_ok = f.server_agrees <= TARGET_ROTATE;
        let rss_ok = f.rss_mib < TARGET_RSS_MIB;
        println!(
            "{} nodes in {} clusters: every cluster rotated and promoted in {:.3} s (target <= {} s): {}",
            f.nodes,
            f.clusters,
            secs(f.server_agrees),
            TARGET_ROTATE.as_secs(),
            if rot_ok { "met" } else { "MISSED" }
        );
        println!(
            "server peak RSS {:.1} MiB (target < {TARGET_RSS_MIB} MiB): {}",
            f.rss_mib,
            if rss_ok { "met" } else { "MISSED" }
        );
    }
}

fn usage() -> ! {
    eprintln!("usage: cargo bench -p edgekms-server --bench fleet [-- --nodes N --clusters M] [--store rocksdb|etcd] [--tmpdir DIR] [--keep]");
    std::process::exit(2);
}

fn main() {
    let mut nodes = None;
    let mut clusters = None;
    let mut keep = false;
    let mut store = Store::Rocksdb;
    let mut tmp = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> usize {
            args.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| usage())
        };
        match arg.as_str() {
            "--nodes" => nodes = Some(number()),
            "--clusters" => clusters = Some(number()),
            "--keep" => keep = true,
            "--store" => {
                store = match args.next().as_deref() {
                    Some("rocksdb") => Store::Rocksdb,
                    Some("etcd") => Store::Etcd,
                    _ => usage(),
                }
            }
            "--tmpdir" => tmp = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            _ => usage(),
        }
    }
    let series: Vec<(usize, usize)> = match (nodes, clusters) {
        (None, None) => SERIES.to_vec(),
        (Some(n), c) => vec![(n, c.unwrap_or((n / 2).max(1)))],
        (None, Some(c)) => vec![(c * 2, c)],
    };
    let fds = edgekms_daemon::cli::raise_fd_limit();
    println!("edgekms central service at scale: real edgekms-server (soft sealer) on loopback,");
    println!("simulated nodes in this process, one TCP + mTLS connection and Sync stream each");
    match store {
        Store::Rocksdb => println!("store: embedded RocksDB, one server"),
        Store::Etcd => println!(
            "store: etcd (three members, Debian's etcd-server, on this machine), {REPLICAS} replicas; nodes and operator calls spread over them; etcd w/rot = etcd writes (raft proposals) per cluster rotated; RSS = the largest replica's"
        ),
    }
    println!("machine: {}; open-file limit {fds}", machine());
    println!("server: {}", server_bin().display());
    println!(
        "columns: enrol = invite + join + first sync of every node; rotate = all Rotate calls answered;"
    );
    println!(
        "nodes = every node reports v2 primary; primary = server Status agrees (the figure for the target);"
    );
    println!("RSS = server peak (VmHWM); CPU = server user+system, whole run / rotation only;");
    println!(
        "sync ms = median 4 KiB write + fdatasync in the data dir's file system before the run"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runs = Vec::new();
    for (n, c) in series {
        let f = rt.block_on(run(n, c, &tmp, keep, store));
        println!(
            "{n} nodes / {c} clusters: invite {:.3} s, enrolled {:.3} s, rotated {:.3} s, all primary {:.3} s, RSS {:.1} MiB, CPU {:.2} s, server sockets {}, fdatasync {:.2} ms",
            secs(f.invite),
            secs(f.enrol),
            secs(f.rotate_calls),
            secs(f.server_agrees),
            f.rss_mib,
            f.cpu_total,
            f.sockets,
            f.sync_ms
        );
        runs.push(f);
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    print_table(&runs, store);
}
