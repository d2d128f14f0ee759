//! Helpers for the central service's abuse tests: clients with and without
//! a certificate, resource measurements (disk, log, peak memory of the
//! server and of `kmsctl`), and audit records seeded straight into a
//! stopped server's RocksDB store.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use edgekms_daemon::pki::{self, PrivateKey};
use edgekms_daemon::tls;
use edgekms_proto::fleet::fleet_client::FleetClient;
use edgekms_proto::fleet::operator_client::OperatorClient;
use edgekms_server::rocks::Store;
use edgekms_server::AuditRecord;
use tonic::transport::Channel;

use edgekms_testkit::procfs::status_kib;

use super::bin;
use super::fleet::Server;

fn ca_der(server: &Server) -> Vec<u8> {
    let pem = std::fs::read_to_string(server.operator_dir().join("ca.pem")).unwrap();
    pki::pem_decode("CERTIFICATE", &pem).unwrap()
}

/// A TLS client config that trusts the server and presents no
/// certificate: what anyone who reaches the port can use.
pub fn no_cert_config(server: &Server) -> std::sync::Arc<rustls::ClientConfig> {
    tls::client_config(tls::Trust::Ca(&ca_der(server)), None).unwrap()
}

pub async fn no_cert_channel(server: &Server) -> Channel {
    tls::connect(&server.url(), no_cert_config(server))
        .await
        .unwrap()
}

pub async fn no_cert_fleet(server: &Server) -> FleetClient<Channel> {
    // The client would send any size; the server must refuse.
    FleetClient::new(no_cert_channel(server).await).max_encoding_message_size(usize::MAX)
}

/// The operator's client, over gRPC directly (for requests kmsctl would
/// not send).
pub async fn operator(server: &Server) -> OperatorClient<Channel> {
    let dir = server.operator_dir();
    let cert = pki::pem_decode(
        "CERTIFICATE",
        &std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
    )
    .unwrap();
    let key = PrivateKey::from_der(
        pki::pem_decode(
            "PRIVATE KEY",
            &std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        )
        .unwrap(),
    );
    let cfg = tls::client_config(tls::Trust::Ca(&ca_der(server)), Some((&cert, &key))).unwrap();
    OperatorClient::new(tls::connect(&server.url(), cfg).await.unwrap())
}

/// Bytes of every file under `dir` (apparent size, as `du -b`).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += dir_bytes(&entry.path());
        } else {
            total += meta.len();
        }
    }
    total
}

pub fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A `/proc/<pid>/status` field in KiB (VmHWM: peak resident set).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    status_kib(pid, field).unwrap()
}

/// What a `kmsctl` run streamed, and what it cost.
#[derive(Debug)]
pub struct Streamed {
    pub success: bool,
    pub stderr: String,
    /// Lines on stdout.
    pub lines: u64,
    pub bytes: u64,
    /// Stdout lines that `keep` kept (tests look at a few, never all).
    pub kept: Vec<String>,
    /// Peak resident set of the `kmsctl` process, KiB (its VmHWM, sampled
    /// while it streams).
    pub max_rss_kib: u64,
}

/// Runs `kmsctl ARGS` against `server`, reading its stdout line by line as
/// it comes (never all of it at once).
pub fn kmsctl_streamed(server: &Server, args: &[&str], keep: impl Fn(&str) -> bool) -> Streamed {
    let mut child = Command::new(bin("kmsctl"))
        .args(["--server", &server.url(), "--operator-dir"])
        .arg(server.operator_dir())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut out = BufReader::with_capacity(1 << 16, child.stdout.take().unwrap());
    let pid = child.id();
    let mut peak = 0;
    let (mut lines, mut bytes, mut kept) = (0, 0, Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        if n == 0 {
            break;
        }
        lines += 1;
        bytes += n as u64;
        // VmHWM of the process itself (a fresh address space since exec;
        // getrusage would count the test process it was forked from).
        if lines % 512 == 1 {
            if let Some(kib) = status_kib(pid, "VmHWM") {
                peak = peak.max(kib);
            }
        }
        if keep(line.trim_end()) {
            kept.push(line.trim_end().to_owned());
        }
    }
    let status = child.wait().unwrap();
    Streamed {
        success: status.success(),
        stderr: stderr.join().unwrap(),
        lines,
        bytes,
        kept,
        max_rss_kib: peak,
    }
}

/// Appends `n` audit records to the (stopped) server's store at `data_dir`,
/// `time_ms(i)` each, detail padded to `pad` bytes, as the server writes
/// them. Returns the first sequence number used.
pub fn seed_audit(data_dir: &Path, n: u64, pad: usize, time_ms: impl Fn(u64) -> u64) -> u64 {
    let store = Store::open(data_dir).unwrap();
    let first = store.last_audit_seq().unwrap() + 1;
    let padding = "p".repeat(pad);
    // One record made by the server's own type, then copied with its time
    // and number changed: fast enough for a million.
    let template = String::from_utf8(
        AuditRecord::new("seed", "test")
            .cluster("seeded")
            .detail("DETAIL")
            .to_json(),
    )
    .unwrap();
    let (head, tail) = template.split_once("\"DETAIL\"").unwrap();
    let (_, head) = head.split_once(',').unwrap();
    let mut i = 0;
    while i < n {
        let chunk: Vec<Vec<u8>> = (i..n.min(i + 10_000))
            .map(|j| {
                format!("{{\"time_ms\":{},{head}\"{j} {padding}\"{tail}", time_ms(j)).into_bytes()
            })
            .collect();
        store
            .put_audit_batch(first + i, chunk.iter().map(Vec::as_slice))
            .unwrap();
        i += chunk.len() as u64;
    }
    first
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
