//! Honest logs and operator hygiene, with the real binaries: caller input
//! cannot forge or flood log lines; the recovery passphrase can go to a
//! file of its own; a damaged or deleted soft key file is named and
//! recovered with the passphrase; zero durations are refused; a flag wins
//! over the config file; `kmsctl ... | head` exits quietly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::Duration;

use edgekms_e2e::{bin, decrypt, encrypt, free_port, http_get, kmsctl, mode, Plugin};
use edgekms_proto::kms_v2::{DecryptRequest, EncryptRequest};

/// The longest line a request may make in the plugin's log.
const LINE_BOUND: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_input_cannot_forge_or_flood_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-log").await;
    let mut kms = p.kms().await;
    let (ct, key_id) = encrypt(&mut kms, b"seed").await;
    let before = p.log_text().lines().count();

    let forged_uid =
        "apiserver\n2026-01-01T00:00:00.000000Z  INFO audit: op=\"rotate\" version=9 result=\"ok\" forged\r\x1b[2K\x1b[1A\u{202e}";
    kms.encrypt(EncryptRequest {
        plaintext: b"x".to_vec().into(),
        uid: forged_uid.into(),
    })
    .await
    .unwrap();
    // Nearly 4 MiB (tonic's default request limit) of key_id, echoed by the
    // error: once in the audit line's key_id, once in its result.
    let huge_key_id = format!(
        "{key_id}\n INFO audit: forged {}",
        "k".repeat((4 << 20) - 64 * 1024)
    );
    let err = kms
        .decrypt(DecryptRequest {
            ciphertext: ct.clone().into(),
            uid: forged_uid.into(),
            key_id: huge_key_id,
            annotations: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        &err.message()[..200.min(err.message().len())]
    );
    assert!(
        err.message().len() < 1024,
        "status message of {} bytes",
        err.message().len()
    );
    assert!(err.message().contains("…[truncated"), "{}", err.message());
    assert!(!err.message().contains('\n'));
    // Still serving.
    assert_eq!(decrypt(&mut kms, &ct, &key_id).await.unwrap(), b"seed");

    let log = std::fs::read(p.log()).unwrap();
    assert!(!log.contains(&0x1b), "a raw ESC reached the log");
    let log = String::from_utf8(log).unwrap();
    let new: Vec<&str> = log.lines().skip(before).collect();
    for line in &new {
        assert!(line.len() <= LINE_BOUND, "a line of {} bytes", line.len());
        if line.contains("forged") {
            // Only inside the event that carried it, escaped.
            assert!(
                line.contains("uid=apiserver\\n2026"),
                "forged line: {line:.300}"
            );
        }
        assert!(
            !line.contains('\r') && !line.contains('\u{202e}'),
            "{line:.300}"
        );
    }
    // One line per event: one audit line for each of the three requests
    // (encrypt, refused decrypt, decrypt), nothing else.
    let audit: Vec<&&str> = new.iter().filter(|l| l.contains("audit:")).collect();
    assert_eq!(audit.len(), 3, "{new:#?}");
    assert_eq!(new.len(), 3, "{new:#?}");
    assert!(
        audit[0].contains("op=\"encrypt\"") || audit[0].contains("op=encrypt"),
        "{}",
        audit[0]
    );
    assert!(
        audit[1].contains("key_id=") && audit[1].contains("…[truncated"),
        "{:.400}",
        audit[1]
    );
    let total: usize = new.iter().map(|l| l.len() + 1).sum();
    eprintln!(
        "{} new log lines, {total} bytes, for a 4 MiB key_id",
        new.len()
    );
    assert!(total < 4 * LINE_BOUND, "{total} log bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_passphrase_goes_to_a_new_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("recovery.txt");
    let mut args = Plugin::soft_args(dir.path(), "edge-pass");
    args.extend([
        "--recovery-passphrase-file".into(),
        pass_file.display().to_string(),
    ]);
    let mut p = Plugin::spawn(dir.path(), args.clone());
    p.wait_healthy().await;
    assert_eq!(mode(&pass_file), 0o600);
    let passphrase = std::fs::read_to_string(&pass_file).unwrap();
    let passphrase = passphrase.trim();
    assert_eq!(passphrase.len(), 39, "{passphrase:?}");
    let log = p.log_text();
    assert!(!log.contains(passphrase), "the passphrase reached the log");
    assert!(!log.contains("==== edgekms recovery passphrase"), "{log}");
    assert!(log.contains("recovery passphrase written"), "{log}");
    let mut kms = p.kms().await;
    let (ct, key_id) = encrypt(&mut kms, b"before").await;

    // A restart with the same setting (the file exists, the node key too)
    // starts and leaves the file alone.
    p.restart().await;
    assert_eq!(
        std::fs::read_to_string(&pass_file).unwrap().trim(),
        passphrase
    );

    // The file is the passphrase `kmsctl local reseal` reads: delete the
    // soft key file, the plugin starts but serves nothing and says why;
    // reseal with the passphrase file, and the old ciphertext opens.
    assert_eq!(p.stop(), Some(0));
    let key_file = p.data_dir.join("soft-sealer.key");
    std::fs::remove_file(&key_file).unwrap();
    let p = Plugin::spawn(dir.path(), args.clone());
    p.wait_serving().await;
    let mut kms = p.kms().await;
    let healthz = kms
        .status(edgekms_proto::kms_v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .healthz;
    assert!(
        healthz.contains("soft-sealer key file") && healthz.contains("is missing"),
        "{healthz}"
    );
    assert!(!healthz.contains("TPM"), "{healthz}");
    assert!(
        !key_file.exists(),
        "a new key file was made before recovery"
    );
    let admin_socket = p.admin_socket.display().to_string();
    let out = kmsctl(&[
        "local",
        "--admin-socket",
        &admin_socket,
        "reseal",
        "--passphrase-file",
        pass_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(decrypt(&mut kms, &ct, &key_id).await.unwrap(), b"before");
    assert!(key_file.exists());
    drop(p);

    // A new data dir with an existing passphrase file: refused before any
    // key is made.
    let other = tempfile::tempdir().unwrap();
    let mut args = Plugin::soft_args(other.path(), "edge-pass");
    args.extend([
        "--recovery-passphrase-file".into(),
        pass_file.display().to_string(),
    ]);
    let mut refused = Plugin::spawn(other.path(), args);
    assert_ne!(refused.wait_exit(), Some(0));
    let log = refused.log_text();
    assert!(
        log.contains("exists") && log.contains("no node key was created"),
        "{log}"
    );
    assert!(!log.contains("created and sealed"), "{log}");
    assert!(!other.path().join("data/soft-sealer.key").exists(), "{log}");
    assert_eq!(
        std::fs::read_to_string(&pass_file).unwrap().trim(),
        passphrase
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_file_or_terminal_the_passphrase_warns_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-warn").await;
    let log = p.log_text();
    // Kept for compatibility (tests and scripts read it there), with a
    // warning naming the way out.
    assert!(log.contains("==== edgekms recovery passphrase"), "{log}");
    assert!(log.contains("--recovery-passphrase-file"), "{log}");
}

#[test]
fn zero_durations_are_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    for flag in ["--heartbeat", "--auto-rotate-every"] {
        let out = Command::new(bin("edgekms-server"))
            .args([
                "--data-dir",
                &data,
                "--listen",
                "127.0.0.1:1",
                "--no-metrics",
            ])
            .args([flag, "0s"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(flag) && err.contains("at least 1s"), "{err}");
    }
    let out = Command::new(bin("edgekms-plugin"))
        .args([
            "--cluster",
            "c",
            "--sealer",
            "soft",
            "--sync-backoff-max",
            "0s",
        ])
        .args(["--data-dir", &data, "--no-metrics"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--sync-backoff-max") && err.contains("at least 1s"),
        "{err}"
    );
    for args in [
        vec!["node", "add", "c", "n", "--ttl", "0s"],
        vec!["audit", "--since", "0m"],
        vec!["rotate", "c", "--timeout", "0s"],
    ] {
        let mut all = args.clone();
        all.extend(["--server", "https://127.0.0.1:1", "--operator-dir"]);
        all.push(dir.path().to_str().unwrap());
        let out = kmsctl(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("at least 1s"), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_flag_wins_over_no_metrics_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("plugin.toml");
    std::fs::write(&cfg, "no_metrics = true\n").unwrap();
    let port = free_port();
    let mut args = Plugin::soft_args(dir.path(), "edge-flag");
    args.extend([
        "--config".into(),
        cfg.display().to_string(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{port}"),
    ]);
    let p = Plugin::spawn(dir.path(), args);
    p.wait_healthy().await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        http_get(addr, "/readyz").await,
        Ok((200, "ok".into())),
        "{}",
        p.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-pipe").await;
    let admin_socket = p.admin_socket.display().to_string();
    let socket = p.socket.display().to_string();
    for args in [
        vec!["local", "--admin-socket", &admin_socket, "status"],
        vec!["local", "--admin-socket", &admin_socket, "tpm"],
        vec!["kms", "--socket", &socket, "roundtrip"],
    ] {
        // The reader is gone before kmsctl writes: as `kmsctl ... | head -0`.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin("kmsctl"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
    // Slow reader (`| head -1`): the first line arrives, then quiet.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} local --admin-socket {admin_socket} status | head -1",
            bin("kmsctl").display()
        ))
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cluster:"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
