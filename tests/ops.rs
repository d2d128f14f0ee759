//! The plugin's metrics and health endpoint, on a real process: `/metrics`
//! scraped and parsed as the Prometheus text format around KMS calls,
//! `/readyz` before and after the TPM unseals, `--no-metrics` binding
//! nothing. (The PCR-failure readiness case is in `tpm.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

use edgekms_e2e::*;
use edgekms_proto::kms_v2::EncryptRequest;
use prometheus_parse::{Scrape, Value};
use tonic::Code;

fn requests(s: &Scrape, method: &str, code: &str) -> f64 {
    sample(
        s,
        "edgekms_kms_requests_total",
        &[("method", method), ("code", code)],
    )
    .unwrap_or(0.0)
}

fn timed(s: &Scrape, method: &str, code: &str) -> f64 {
    sample(
        s,
        "edgekms_kms_request_duration_seconds_count",
        &[("method", method), ("code", code)],
    )
    .unwrap_or(0.0)
}

fn gauge(s: &Scrape, name: &str) -> Option<f64> {
    sample(s, name, &[])
}

#[tokio::test]
async fn kms_calls_move_the_counters_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-1").await;
    assert_eq!(p.http_get("/healthz").await, (200, "ok".into()));
    assert_eq!(p.http_get("/readyz").await, (200, "ok".into()));
    assert_eq!(p.http_get("/nothing-here").await.0, 404);

    let before = p.scrape().await;
    assert_eq!(gauge(&before, "edgekms_ready"), Some(1.0));
    assert_eq!(gauge(&before, "edgekms_primary_key_version"), Some(1.0));
    assert_eq!(gauge(&before, "edgekms_cached_key_versions"), Some(1.0));
    // First start: the new node sealing key was sealed once, by the soft sealer.
    assert_eq!(
        sample(
            &before,
            "edgekms_tpm_operation_duration_seconds_count",
            &[("op", "seal"), ("backend", "soft")]
        ),
        Some(1.0)
    );
    // No central key service in this test: never contacted.
    assert_eq!(gauge(&before, "edgekms_sync_last_contact_seconds"), None);
    for method in ["Status", "Encrypt", "Decrypt"] {
        assert!(
            sample(
                &before,
                "edgekms_kms_requests_total",
                &[("method", method), ("code", "OK")]
            )
            .is_some(),
            "{method} OK is exported before the first call"
        );
    }

    let mut kms = p.kms().await;
    for i in 0..3u8 {
        let (ct, id) = encrypt(&mut kms, &[i; 32]).await;
        assert_eq!(decrypt(&mut kms, &ct, &id).await.unwrap(), [i; 32]);
    }
    let (ct, id) = encrypt(&mut kms, b"tampered").await;
    let mut bad = ct.clone();
    *bad.last_mut().unwrap() ^= 1;
    let err = decrypt(&mut kms, &bad, &id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = kms
        .encrypt(EncryptRequest {
            plaintext: Vec::new().into(),
            uid: "empty".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    key_id(&mut kms).await; // one Status

    let after = p.scrape().await;
    let moved = |method, code| requests(&after, method, code) - requests(&before, method, code);
    assert_eq!(moved("Encrypt", "OK"), 4.0);
    assert_eq!(moved("Decrypt", "OK"), 3.0);
    assert_eq!(moved("Decrypt", "InvalidArgument"), 1.0);
    assert_eq!(moved("Encrypt", "InvalidArgument"), 1.0);
    assert_eq!(moved("Status", "OK"), 1.0);
    assert_eq!(moved("Decrypt", "NotFound"), 0.0);
    for (method, code) in [
        ("Encrypt", "OK"),
        ("Decrypt", "OK"),
        ("Decrypt", "InvalidArgument"),
        ("Status", "OK"),
    ] {
        assert_eq!(
            timed(&after, method, code),
            requests(&after, method, code),
            "one latency observation per {method} {code} call"
        );
    }
    // The latency histogram resolves below a millisecond.
    let buckets = after
        .samples
        .iter()
        .find(|s| {
            s.metric == "edgekms_kms_request_duration_seconds"
                && s.labels.get("method") == Some("Decrypt")
                && s.labels.get("code") == Some("OK")
        })
        .map(|s| match &s.value {
            Value::Histogram(b) => b.clone(),
            other => panic!("not a histogram: {other:?}"),
        })
        .unwrap();
    assert!(
        buckets.iter().filter(|b| b.less_than < 0.001).count() >= 5,
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap().count, 3.0);

    // A rotation publishes a new snapshot, and the key gauges follow it.
    let admin = p.admin_socket.display().to_string();
    kmsctl_json(&["local", "--admin-socket", &admin, "rotate"]);
    let rotated = p.scrape().await;
    assert_eq!(gauge(&rotated, "edgekms_primary_key_version"), Some(2.0));
    assert_eq!(gauge(&rotated, "edgekms_cached_key_versions"), Some(2.0));
    kmsctl_json(&[
        "local",
        "--admin-socket",
        &admin,
        "retire",
        "1",
        "--skip-census",
        "--grace",
        "1s",
    ]);
    // Disabled, it keeps its key until the grace period is over.
    poll_until(
        "v1 destroyed",
        20,
        || p.log_text(),
        || async { gauge(&p.scrape().await, "edgekms_cached_key_versions") == Some(1.0) },
    )
    .await;
    let retired = p.scrape().await;
    assert_eq!(gauge(&retired, "edgekms_primary_key_version"), Some(2.0));
    assert_eq!(
        gauge(&retired, "edgekms_cached_key_versions"),
        Some(1.0),
        "a retired version keeps no key material"
    );
}

// Multi-threaded so that the client connections close while `stop` blocks
// (the plugin drains them before it exits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_starting_until_the_tpm_unseals() {
    if !swtpm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&dir.path().join("tpm"));
    let mut args = Plugin::soft_args(dir.path(), "edge-1");
    let i = args.iter().position(|a| a == "soft").unwrap();
    args[i] = "tpm".into();
    args.extend(["--tpm-tcti".into(), tpm.tcti()]);
    let mut p = Plugin::spawn(dir.path(), args.clone());
    p.wait_healthy().await;
    assert_eq!(p.stop(), Some(0));

    // A TPM that answers nothing: the plugin cannot unseal yet.
    tpm.pause();
    p = Plugin::spawn(dir.path(), args);
    p.wait_live().await;
    for _ in 0..5 {
        assert_eq!(p.http_get("/readyz").await, (503, "starting".into()));
        assert_eq!(p.http_get("/healthz").await, (200, "ok".into()));
        let s = p.scrape().await;
        assert_eq!(gauge(&s, "edgekms_ready"), Some(0.0));
        assert_eq!(gauge(&s, "edgekms_primary_key_version"), Some(0.0));
        assert!(
            !p.socket.exists(),
            "the KMS socket is bound only once keys are loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tpm.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.http_get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready: {}", p.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.http_get("/readyz").await, (200, "ok".into()));
    p.wait_healthy().await;
    let s = p.scrape().await;
    assert_eq!(gauge(&s, "edgekms_ready"), Some(1.0));
    assert_eq!(gauge(&s, "edgekms_primary_key_version"), Some(1.0));
    let unseals = sample(
        &s,
        "edgekms_tpm_operation_duration_seconds_count",
        &[("op", "unseal"), ("backend", "tpm")],
    );
    assert_eq!(unseals, Some(1.0));
    let unseal_secs = sample(
        &s,
        "edgekms_tpm_operation_duration_seconds_sum",
        &[("op", "unseal"), ("backend", "tpm")],
    )
    .unwrap();
    assert!(unseal_secs > 0.0);
}

#[tokio::test]
async fn no_metrics_binds_no_port() {
    let dir = tempfile::tempdir().unwrap();
    // Control: with the endpoint on, the plugin listens on exactly its port.
    let on = Plugin::start(&dir.path().join("on"), "edge-1").await;
    assert_eq!(tcp_listen_ports(on.pid()), vec![on.ops_addr().port()]);

    let off_dir = dir.path().join("off");
    let mut args = Plugin::soft_args(&off_dir, "edge-1");
    args.push("--no-metrics".into());
    let off = Plugin::spawn(&off_dir, args);
    off.wait_healthy().await;
    assert_eq!(off.metrics_addr, None);
    assert_eq!(tcp_listen_ports(off.pid()), Vec::<u16>::new());
    assert!(off.log_text().contains("serving"));
    assert!(!off.log_text().contains("/metrics"));
}

#[tokio::test]
async fn a_taken_metrics_port_stops_the_start_with_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut args = Plugin::soft_args(dir.path(), "edge-1");
    args.extend(["--metrics-addr".into(), format!("127.0.0.1:{port}")]);
    let mut p = Plugin::spawn(dir.path(), args);
    assert_ne!(p.wait_exit(), Some(0));
    let log = p.log_text();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    assert!(log.contains("--no-metrics"), "{log}");
    assert!(!p.socket.exists());
    assert!(!p.data_dir.exists(), "nothing unsealed or created: {log}");
}

#[test]
fn metrics_flags_are_documented_and_exclusive() {
    let plugin = bin("edgekms-plugin");
    let help = Command::new(&plugin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--metrics-addr <ADDR:PORT>"), "{help}");
    assert!(help.contains("127.0.0.1:9464"), "{help}");
    assert!(help.contains("--no-metrics"), "{help}");

    let out = Command::new(&plugin)
        .args([
            "--cluster",
            "c",
            "--metrics-addr",
            "127.0.0.1:1",
            "--no-metrics",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--no-metrics"), "{err}");

    let out = Command::new(&plugin)
        .args(["--cluster", "c", "--metrics-addr", "localhost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
