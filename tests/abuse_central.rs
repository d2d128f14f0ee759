//! Abuse of the central key service by anyone who can reach its port, on a
//! real `edgekms-server` over loopback: huge names in unauthenticated
//! Joins, floods of refused handshakes and calls, and an audit log far
//! too long for one message. Each case measures the resource at stake
//! (store bytes, log bytes, records, peak memory) before and after.
//!
//! The one-million-record case is `#[ignore]`d (about two minutes on two
//! busy cores, debug build); run it with
//! `cargo test --workspace --test abuse_central -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use edgekms_daemon::tls;
use edgekms_e2e::abuse::{
    dir_bytes, file_bytes, kmsctl_streamed, no_cert_config, no_cert_fleet, now_ms, operator,
    proc_kib, seed_audit,
};
use edgekms_e2e::fleet::{text, Server};
use edgekms_proto::fleet as pb;
use edgekms_proto::fleet::operator_client::OperatorClient;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MB: u64 = 1 << 20;

/// Every audit record, via `kmsctl -o json audit ARGS`.
fn audit(server: &Server, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    server.kmsctl_json(&all).as_array().unwrap().clone()
}

/// Sum of `count` (1 when absent) over `records` that `f` picks.
fn events(records: &[Value], f: impl Fn(&Value) -> bool) -> (usize, u64) {
    let picked: Vec<&Value> = records.iter().filter(|r| f(r)).collect();
    let total = picked
        .iter()
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    (picked.len(), total)
}

/// Stops the server (which keeps what it only counted so far) and serves
/// the same data dir again.
async fn restart(server: &mut Server) {
    assert_eq!(server.stop().await, Some(0), "{}", server.log_text());
    server.respawn();
    server.wait_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_with_huge_names_are_refused_at_bounded_cost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let state = server.data_dir.join("state");
    let (disk0, log0) = (dir_bytes(&state), file_bytes(server.log()));
    let started = Instant::now();

    // The reproduction: 20 Joins without a certificate, each with
    // a 4 MB cluster name. Refused before decoding.
    let huge = "a".repeat(4 * MB as usize);
    for _ in 0..20 {
        let mut fleet = no_cert_fleet(&server).await;
        let err = fleet
            .join(pb::JoinRequest {
                token: "abcdef.0123456789abcdef".into(),
                cluster: huge.clone(),
                node: "n1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
        assert!(err.message().len() < 512, "{} bytes", err.message().len());
    }
    // Names under the size limit but no DNS label (one forging a log
    // line): refused by name, echoed only as a short escaped preview.
    let forged = format!(
        "x\nINFO audit: event=rotation actor=operator {}",
        "b".repeat(60 << 10)
    );
    let mut fleet = no_cert_fleet(&server).await;
    for _ in 0..20 {
        let err = fleet
            .join(pb::JoinRequest {
                token: "abcdef.0123456789abcdef".into(),
                cluster: forged.clone(),
                node: "n1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().len() < 512, "{} bytes", err.message().len());
        assert!(!err.message().contains('\n'), "{}", err.message());
    }
    let took = started.elapsed();

    // `kmsctl audit --since 1h` works, and holds one record for the 20
    // refused names (the first; the rest are being counted).
    let out = server.kmsctl(&["audit", "--since", "1h"]);
    assert!(out.status.success(), "{}", text(&out));
    let is_bad_name = |r: &Value| {
        r["event"] == "enrol" && r["result"].as_str().unwrap().contains("invalid cluster")
    };
    let records = audit(&server, &["--since", "1h"]);
    assert_eq!(events(&records, is_bad_name), (1, 1), "{records:#?}");

    let (disk1, log1) = (dir_bytes(&state), file_bytes(server.log()));
    eprintln!(
        "40 refused Joins (20 x 4 MiB, 20 x 60 KiB names) in {took:?}: store {disk0} -> {disk1} bytes, log {log0} -> {log1} bytes"
    );
    assert!(
        disk1.saturating_sub(disk0) < MB,
        "store grew {disk0} -> {disk1}"
    );
    assert!(log1 - log0 < 64 << 10, "log grew {log0} -> {log1}");
    assert!(!server.log_text().contains("event=rotation actor=operator"));

    // Over 64 KiB: counted under method Join as OutOfRange, not stored.
    let scrape = server.scrape().await;
    let refused_big = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "edgekms_server_requests_total"
                && s.labels.get("method") == Some("Join")
                && s.labels.get("code") == Some("OutOfRange")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        });
    assert_eq!(refused_big, Some(20.0));

    // The count reaches the store when the window ends (here: at stop).
    restart(&mut server).await;
    let records = audit(&server, &[]);
    let (n, total) = events(&records, is_bad_name);
    assert_eq!(total, 20, "{records:#?}");
    assert!(n <= 3, "{n} records for 20 refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshake_and_call_floods_are_counted_not_stored_each() {
    const GARBAGE: u64 = 1000;
    const NO_CERT: u64 = 1000;
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let state = server.data_dir.join("state");
    let (disk0, log0) = (dir_bytes(&state), file_bytes(server.log()));
    let started = Instant::now();

    // Plain-text garbage where a TLS handshake should be, each read until
    // the server has answered and closed (so it has seen it).
    for _ in 0..GARBAGE {
        let mut tcp = tokio::net::TcpStream::connect(server.listen).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        while matches!(
            tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await,
            Ok(Ok(n)) if n > 0
        ) {}
    }
    // TLS without a client certificate, a new connection for each
    // operator call, four at a time.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, cfg) = (server.url(), no_cert_config(&server));
        tasks.push(tokio::spawn(async move {
            for _ in 0..NO_CERT / 4 {
                let channel = tls::connect(&url, cfg.clone()).await.unwrap();
                let err = OperatorClient::new(channel)
                    .status(pb::StatusRequest::default())
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::Unauthenticated);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let from_flood = |what: &'static str| {
        move |r: &Value| {
            r["event"] == "refused"
                && r["detail"].as_str().unwrap().contains(what)
                && r["actor"].as_str().unwrap().contains("127.0.0.1")
        }
    };
    // While the window is open: one record per kind.
    let records = audit(&server, &[]);
    assert_eq!(events(&records, from_flood("connection")), (1, 1));
    assert_eq!(events(&records, from_flood("status")), (1, 1));
    let (disk1, log1) = (dir_bytes(&state), file_bytes(server.log()));
    eprintln!(
        "{GARBAGE} garbage handshakes + {NO_CERT} no-certificate calls in {took:?}: store {disk0} -> {disk1} bytes, log {log0} -> {log1} bytes, {} audit records",
        records.len()
    );
    assert!(
        disk1.saturating_sub(disk0) < MB,
        "store grew {disk0} -> {disk1}"
    );
    assert!(log1 - log0 < 64 << 10, "log grew {log0} -> {log1}");

    // The counts are exact once kept.
    restart(&mut server).await;
    let records = audit(&server, &[]);
    let (n, total) = events(&records, from_flood("connection"));
    assert_eq!(total, GARBAGE, "{records:#?}");
    assert!(n <= 3, "{n} records for {GARBAGE} handshakes");
    let (n, total) = events(&records, from_flood("status"));
    assert_eq!(total, NO_CERT, "{records:#?}");
    assert!(n <= 3, "{n} records for {NO_CERT} calls");
    let summary = records
        .iter()
        .find(|r| from_flood("connection")(r) && r["count"].as_u64().is_some())
        .unwrap();
    assert!(
        summary["result"]
            .as_str()
            .unwrap()
            .contains("TLS handshake failed"),
        "{summary:#}"
    );
    // Human output shows the count.
    let out = server.kmsctl(&["audit"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(" x{}", GARBAGE - 1)),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_deletes_the_oldest_by_age_and_by_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("server");
    Server::init(&data_dir);
    // 1,000 records of three days ago, then 300 of the last minute.
    let now = now_ms();
    seed_audit(&data_dir, 1000, 0, |i| now - 3 * 86_400_000 + i);
    seed_audit(&data_dir, 300, 0, |i| now - 60_000 + i);
    let mut server = Server::spawn(&data_dir, &["--audit-retention", "2d"]);
    server.wait_up().await;
    let seeded = |r: &Value| r["event"] == "seed";
    let records = audit(&server, &[]);
    assert_eq!(events(&records, seeded).0, 300);
    let cutoff = now - 2 * 86_400_000;
    assert!(records
        .iter()
        .all(|r| r["time_ms"].as_u64().unwrap() >= cutoff));
    assert!(server.log_text().contains("audit retention: deleted"));

    // By count, from the config file: the newest 100 stay.
    server.stop().await;
    let config = tmp.path().join("server.toml");
    std::fs::write(&config, "audit_max_records = 100\n").unwrap();
    server.extra_args = vec![
        "--config".into(),
        config.display().to_string(),
        "--metrics-addr".into(),
        server.ops.to_string(),
    ];
    server.respawn();
    server.wait_up().await;
    let records = audit(&server, &[]);
    assert_eq!(records.len(), 100, "{:#?}", &records[..3]);
    // The newest survived: the last seeded record and what came after.
    assert!(records
        .iter()
        .any(|r| r["detail"].as_str().unwrap_or("").starts_with("299 ")));

    // Zero keeps nothing useful: refused at start.
    server.stop().await;
    for bad in [["--audit-retention", "0s"], ["--audit-max-records", "0"]] {
        let out = std::process::Command::new(edgekms_e2e::bin("edgekms-server"))
            .args(["--sealer", "soft", "--listen", "127.0.0.1:1", "--data-dir"])
            .arg(&data_dir)
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(text(&out).contains(bad[0]), "{}", text(&out));
    }
}

/// Seeds `n` records, then reads them back with `kmsctl -o json audit`
/// (streamed), checking the count is exact and that neither the server
/// nor kmsctl held the log in memory.
async fn large_audit_log(n: u64, pad: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("server");
    Server::init(&data_dir);
    let started = Instant::now();
    let now = now_ms();
    // Two hours old: `--since 1h` must skip every one of them.
    seed_audit(&data_dir, n, pad, |i| now - 7_200_000 + i / 1000);
    let seeding = started.elapsed();
    let server = Server::spawn(&data_dir, &[]);
    // Opening replays the seeded write-ahead log: longer than wait_up's 15 s
    // for a million records on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !server.kmsctl(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "not up: {}", server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = started.elapsed() - seeding;
    let hwm0 = proc_kib(server.pid(), "VmHWM");

    let started = Instant::now();
    let all = kmsctl_streamed(&server, &["-o", "json", "audit"], |l| {
        l.contains("\"detail\":\"0 ") || l.contains(&format!("\"detail\":\"{} ", n - 1))
    });
    let reading = started.elapsed();
    assert!(all.success, "{}", all.stderr);
    let hwm1 = proc_kib(server.pid(), "VmHWM");
    // "[", one line per record, "]".
    let records = all.lines - 2;
    assert!(records >= n, "{records} records for {n} seeded");
    assert_eq!(all.kept.len(), 2, "first and last seeded record");
    for line in &all.kept {
        let v: Value = serde_json::from_str(line.trim_end_matches(',')).unwrap();
        assert_eq!(v["event"], "seed");
    }
    eprintln!(
        "{n} records ({} MiB of JSON): seeded in {seeding:?}, server up in {up:?}, streamed in {reading:?}; kmsctl peak RSS {} KiB, server VmHWM {hwm0} -> {hwm1} KiB",
        all.bytes / MB,
        all.max_rss_kib
    );
    // Far below what holding the log would take, on either side.
    let bound_kib = (all.bytes / 1024 / 4).max(48 << 10);
    assert!(
        all.max_rss_kib < bound_kib,
        "kmsctl peak RSS {} KiB",
        all.max_rss_kib
    );
    assert!(hwm1 - hwm0 < bound_kib, "server VmHWM {hwm0} -> {hwm1} KiB");

    // --limit: the newest N, exactly; --since: none of the old ones.
    let out = server.kmsctl_json(&["audit", "--limit", "10"]);
    assert_eq!(out.as_array().unwrap().len(), 10);
    let recent = audit(&server, &["--since", "1h"]);
    assert!(recent.iter().all(|r| r["event"] != "seed"), "{recent:#?}");
    // Stdout closed after one line (`| head -1`): kmsctl ends quietly.
    let mut child = std::process::Command::new(edgekms_e2e::bin("kmsctl"))
        .args(["--server", &server.url(), "--operator-dir"])
        .arg(server.operator_dir())
        .arg("audit")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_record_audit_log_streams_with_bounded_memory() {
    large_audit_log(100_000, 600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about two minutes: cargo test --workspace --test abuse_central -- --ignored"]
async fn a_million_record_audit_log_streams_with_bounded_memory() {
    large_audit_log(1_000_000, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_with_an_endless_token_lifetime_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let mut op = operator(&server).await;
    let err = op
        .add_node(pb::AddNodeRequest {
            cluster: "a".into(),
            node: "n1".into(),
            ttl_seconds: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("too long"), "{err:?}");
    // Still serving, and the refused call created nothing.
    let status = op
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.clusters.is_empty(), "{status:?}");
    // Invalid names on every operator call: refused, not echoed whole.
    let long = "Z".repeat(60 << 10);
    let err = op
        .status(pb::StatusRequest {
            cluster: long.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().len() < 512);
    let err = op
        .rotate(pb::RotateRequest { cluster: long })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // A normal token is 128 bits of id.
    let (token, _) = server.add_node("a", "n1");
    assert_eq!(token.split('.').next().unwrap().len(), 32, "{token}");
}
