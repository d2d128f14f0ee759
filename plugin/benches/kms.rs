//! `cargo bench -p edgekms-plugin --bench kms`: the plugin against a bare
//! tonic echo server speaking the same KMS v2 service with the same payload
//! sizes, both separate processes on unix sockets, driven by 1, 16 and 64
//! concurrent clients. Prints calls/s and p50/p99 latency per method with
//! the plugin/echo ratio, start-up to healthz "ok" with 1 and 1,000 cached
//! KEK versions, and the plugin's peak memory. Targets (issue #2):
//! throughput ratio >= 0.9, p99 ratio <= 1.2, start-up < 100 ms with 1,000
//! versions, peak RSS < 30 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use edgekms_proto::kms_v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use edgekms_proto::kms_v2::*;
use edgekms_testkit::process::Daemon;
use tonic::{Request, Response, Status};

const SEED: [u8; 32] = [7; 32];
const RUN: Duration = Duration::from_millis(2000);
const ROUNDS: usize = 5;
const WARMUP: Duration = Duration::from_millis(200);

/// The bare server: same service, same response sizes, no crypto.
struct Echo;

#[tonic::async_trait]
impl KeyManagementService for Echo {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "bench/v1/0123456789abcdef".into(),
        }))
    }
    async fn encrypt(
        &self,
        r: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let mut ct = r.into_inner().plaintext.to_vec();
        ct.resize(ct.len() + edgekms_core::envelope::OVERHEAD, 0);
        Ok(Response::new(EncryptResponse {
            ciphertext: ct.into(),
            key_id: "bench/v1/0123456789abcdef".into(),
            annotations: Default::default(),
        }))
    }
    async fn decrypt(
        &self,
        r: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let mut pt = r.into_inner().ciphertext.to_vec();
        pt.truncate(pt.len().saturating_sub(edgekms_core::envelope::OVERHEAD));
        Ok(Response::new(DecryptResponse {
            plaintext: pt.into(),
        }))
    }
}

fn run_echo_server(socket: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tonic::transport::Server::builder()
            .add_service(KeyManagementServiceServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

#[derive(Clone, Copy, Debug)]
enum Method {
    Status,
    Encrypt,
    Decrypt,
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// One timed run: calls per second and every call's latency.
struct Run {
    per_sec: f64,
    latencies: Vec<Duration>,
}

async fn drive(socket: &Path, method: Method, clients: usize) -> Run {
    let mut c0 = client(socket).await.unwrap();
    let enc = c0
        .encrypt(EncryptRequest {
            plaintext: SEED.to_vec().into(),
            uid: "bench".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..clients {
        let mut c = client(socket).await.unwrap();
        let (ct, key_id) = (enc.ciphertext.clone(), enc.key_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                if t - start > WARMUP + RUN {
                    break;
                }
                match method {
                    Method::Status => drop(c.status(StatusRequest {}).await.unwrap()),
                    Method::Encrypt => drop(
                        c.encrypt(EncryptRequest {
                            plaintext: SEED.to_vec().into(),
                            uid: "bench".into(),
                        })
                        .await
                        .unwrap(),
                    ),
                    Method::Decrypt => drop(
                        c.decrypt(DecryptRequest {
                            ciphertext: ct.clone(),
                            uid: "bench".into(),
                            key_id: key_id.clone(),
                            annotations: Default::default(),
                        })
                        .await
                        .unwrap(),
                    ),
                }
                if t - start >= WARMUP {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    Run {
        per_sec: all.len() as f64 / RUN.as_secs_f64(),
        latencies: all,
    }
}

/// Throughput: the median round. Latency percentiles: over every call of
/// every round, so one noisy round moves them little.
fn summarize(rounds: Vec<Run>) -> Figures {
    let mut per_sec: Vec<f64> = rounds.iter().map(|r| r.per_sec).collect();
    per_sec.sort_by(f64::total_cmp);
    let mut all: Vec<Duration> = rounds.into_iter().flat_map(|r| r.latencies).collect();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Figures {
        per_sec: per_sec[per_sec.len() / 2],
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--echo-server") {
        run_echo_server(Path::new(&args[i + 1]));
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let echo_sock: PathBuf = dir.path().join("echo.sock");
    let mut echo = Command::new(std::env::current_exe().unwrap());
    echo.arg("--echo-server").arg(&echo_sock);
    let _echo = Daemon::spawn("echo server", echo, &dir.path().join("echo.log"));
    let plugin_dir = dir.path().join("plugin");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let plugin = spawn_plugin(&plugin_dir, &soft());
    let plugin_sock = plugin_dir.join("kms.sock");
    until_healthy(&echo_sock, Instant::now()).await;
    until_healthy(&plugin_sock, Instant::now()).await;

    println!("edgekms KMS v2 benchmark: plugin vs bare tonic echo, unix sockets, 32-byte DEK seed,\n{ROUNDS} alternating rounds of {} ms each (calls/s: median round; p50/p99: all calls)", RUN.as_millis());
    println!("machine: {}", machine());
    println!();
    println!(
        "{:<8} {:>4}  {:>10} {:>10} {:>6}  {:>8} {:>8} {:>8} {:>8} {:>6}",
        "method",
        "conc",
        "plugin/s",
        "echo/s",
        "ratio",
        "p50 ms",
        "echo p50",
        "p99 ms",
        "echo p99",
        "p99 x"
    );
    let mut worst_tput: f64 = f64::MAX;
    let mut worst_p99: f64 = 0.0;
    for clients in [1, 16, 64] {
        for method in [Method::Status, Method::Encrypt, Method::Decrypt] {
            // Alternate the two servers over several rounds, so that a noisy
            // moment on a 2-core machine does not decide a ratio.
            let (mut es, mut ps) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                es.push(drive(&echo_sock, method, clients).await);
                ps.push(drive(&plugin_sock, method, clients).await);
            }
            let (e, p) = (summarize(es), summarize(ps));
            let ratio = p.per_sec / e.per_sec;
            let p99x = p.p99.as_secs_f64() / e.p99.as_secs_f64();
            if !matches!(method, Method::Status) {
                worst_tput = worst_tput.min(ratio);
                worst_p99 = worst_p99.max(p99x);
            }
            println!(
                "{:<8} {:>4}  {:>10.0} {:>10.0} {:>6.2}  {:>8} {:>8} {:>8} {:>8} {:>6.2}",
                format!("{method:?}"),
                clients,
                p.per_sec,
                e.per_sec,
                ratio,
                ms(p.p50),
                ms(e.p50),
                ms(p.p99),
                ms(e.p99),
                p99x
            );
        }
    }
    let rss = peak_rss_kib(plugin.pid());
    stop(plugin);

    // Start-up: 1 version, then 1,000 cached versions.
    let one = startup(&plugin_dir, &soft(), 5).await;
    grow_to(&plugin_dir, &soft(), 1000).await;
    let thousand = startup(&plugin_dir, &soft(), 5).await;

    println!();
    println!(
        "Encrypt/Decrypt worst throughput ratio plugin/echo: {worst_tput:.2} (target >= 0.90)"
    );
    println!("Encrypt/Decrypt worst p99 ratio plugin/echo:        {worst_p99:.2} (target <= 1.20)");
    println!(
        "start-up to healthz ok, 1 KEK version:      {} ms (median of 5)",
        ms(one)
    );
    println!(
        "start-up to healthz ok, 1,000 KEK versions: {} ms (median of 5, target < 100 ms)",
        ms(thousand)
    );
    println!(
        "plugin peak RSS under load: {:.1} MiB (target < 30 MiB)",
        rss as f64 / 1024.0
    );
}
