//! Shared by the benchmarks: run the real plugin binary, wait for healthz
//! "ok", time start-ups, grow the cache to N versions.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgekms_proto::admin::node_admin_client::NodeAdminClient;
use edgekms_proto::admin::RotateRequest;
use edgekms_proto::kms_v2::key_management_service_client::KeyManagementServiceClient;
use edgekms_proto::kms_v2::StatusRequest;
use edgekms_testkit::process::Daemon;

/// The plugin on `dir/kms.sock` with data in `dir/data`, logging to
/// `dir/plugin.log`; `sealer` are the sealer flags (`--sealer soft`, or
/// tpm with its TCTI).
pub fn spawn_plugin(dir: &Path, sealer: &[String]) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgekms-plugin"));
    cmd.args(["--cluster", "bench", "--node", "n1"])
        .args(sealer)
        .arg("--socket")
        .arg(dir.join("kms.sock"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "info");
    Daemon::spawn("plugin", cmd, &dir.join("plugin.log"))
}

pub fn soft() -> Vec<String> {
    vec!["--sealer".into(), "soft".into()]
}

pub async fn client(
    socket: &Path,
) -> Option<KeyManagementServiceClient<tonic::transport::Channel>> {
    Some(KeyManagementServiceClient::new(
        edgekms_proto::uds::connect(socket).await.ok()?,
    ))
}

/// Polls Status until healthz "ok"; returns the time from `start`.
pub async fn until_healthy(socket: &Path, start: Instant) -> Duration {
    loop {
        if let Some(mut c) = client(socket).await {
            if c.status(StatusRequest {})
                .await
                .is_ok_and(|r| r.get_ref().healthz == "ok")
            {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server at {} never became healthy",
            socket.display()
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// SIGTERM and wait.
pub fn stop(mut p: Daemon) {
    p.stop(Duration::from_secs(60));
}

/// Median start-up (spawn to healthz "ok") over `runs` starts.
pub async fn startup(dir: &Path, sealer: &[String], runs: usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let p = spawn_plugin(dir, sealer);
        times.push(until_healthy(&dir.join("kms.sock"), start).await);
        stop(p);
    }
    times.sort();
    times[times.len() / 2]
}

/// Rotates until the cache holds `versions` KEK versions.
pub async fn grow_to(dir: &Path, sealer: &[String], versions: u32) {
    let p = spawn_plugin(dir, sealer);
    until_healthy(&dir.join("kms.sock"), Instant::now()).await;
    let mut admin = NodeAdminClient::new(
        edgekms_proto::uds::connect(dir.join("admin.sock"))
            .await
            .unwrap(),
    );
    let status = admin
        .status(edgekms_proto::admin::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    for _ in status.versions.len() as u32..versions {
        admin.rotate(RotateRequest {}).await.unwrap();
    }
    stop(p);
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}
