//! End-to-end tests of `edgekms-plugin` with the soft sealer: the real
//! binary on temporary unix sockets, a tonic client as kube-apiserver, and
//! the real `kmsctl`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use edgekms_e2e::*;
use edgekms_proto::kms_v2::{EncryptRequest, StatusRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-1").await;
    let mut kms = p.kms().await;
    let status = kms.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.version, "v2");
    assert_eq!(status.healthz, "ok");
    assert!(status.key_id.starts_with("edge-1/v1/"), "{}", status.key_id);
    assert!(status.key_id.len() <= 1024);

    let seed = [0x5a; 32];
    let (ct, key_id) = encrypt(&mut kms, &seed).await;
    assert_eq!(
        key_id, status.key_id,
        "Encrypt's key_id must equal Status's"
    );
    assert!(ct.len() <= 1024);
    assert_ne!(&ct[..], &seed[..]);
    assert_eq!(decrypt(&mut kms, &ct, &key_id).await.unwrap(), seed);

    assert_eq!(mode(&p.socket), 0o600);
    assert_eq!(mode(&p.admin_socket), 0o600);
    assert!(
        p.log_text().contains("INSECURE"),
        "soft sealer must warn at start"
    );
    // A process holding keys writes no core file.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert_eq!(core.split_whitespace().nth(5), Some("0"), "{core}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_decrypts_everything_written_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Plugin::start(dir.path(), "edge-1").await;
    let mut kms = p.kms().await;
    let mut written = Vec::new();
    for i in 0..20u8 {
        written.push((vec![i; 32], encrypt(&mut kms, &[i; 32]).await));
    }
    let before = key_id(&mut kms).await;
    assert_eq!(p.stop(), Some(0));
    assert!(!p.socket.exists(), "socket file removed on SIGTERM");
    assert!(!p.admin_socket.exists());

    p = Plugin::spawn(dir.path(), Plugin::soft_args(dir.path(), "edge-1"));
    p.wait_healthy().await;
    let mut kms = p.kms().await;
    assert_eq!(key_id(&mut kms).await, before);
    for (plain, (ct, id)) in &written {
        assert_eq!(&decrypt(&mut kms, ct, id).await.unwrap(), plain);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_then_decrypt_old_and_new_and_retire() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Plugin::start(dir.path(), "edge-1").await;
    let admin = p.admin_socket.display().to_string();
    let mut kms = p.kms().await;
    let (old_ct, old_id) = encrypt(&mut kms, b"old seed").await;

    let rotated = kmsctl_json(&["local", "--admin-socket", &admin, "rotate"]);
    assert_eq!(rotated["version"], 2);
    // Status changes at once, and Encrypt agrees with it.
    let new_id = key_id(&mut kms).await;
    assert_eq!(rotated["key_id"], new_id.as_str());
    assert_ne!(new_id, old_id);
    let (new_ct, id) = encrypt(&mut kms, b"new seed").await;
    assert_eq!(id, new_id);
    assert_eq!(
        decrypt(&mut kms, &old_ct, &old_id).await.unwrap(),
        b"old seed"
    );
    assert_eq!(
        decrypt(&mut kms, &new_ct, &new_id).await.unwrap(),
        b"new seed"
    );

    let status = kmsctl_json(&["local", "--admin-socket", &admin, "status"]);
    assert_eq!(status["primary_version"], 2);
    assert_eq!(status["versions"][0]["state"], "decrypt-only");
    assert_eq!(status["versions"][1]["state"], "primary");

    // The primary cannot be retired; exit code 1 with a clear line.
    let out = kmsctl(&["local", "--admin-socket", &admin, "retire", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("primary"));

    // Survives a restart, then retire v1.
    p.restart().await;
    let mut kms = p.kms().await;
    assert_eq!(key_id(&mut kms).await, new_id);
    assert_eq!(
        decrypt(&mut kms, &old_ct, &old_id).await.unwrap(),
        b"old seed"
    );
    // No census was taken: refused, naming what to do.
    let out = kmsctl(&["local", "--admin-socket", &admin, "retire", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no census"));
    let retire = [
        "local",
        "--admin-socket",
        &admin,
        "retire",
        "1",
        "--skip-census",
    ];
    let out = kmsctl(&[&retire[..], &["--grace", "1m"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING: --skip-census"));
    // Disabled: refused, naming the way back; restore brings it back.
    let err = decrypt(&mut kms, &old_ct, &old_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("version 1")
            && err.message().contains("disabled")
            && err.message().contains("kmsctl local restore-version 1"),
        "{}",
        err.message()
    );
    kmsctl_json(&["local", "--admin-socket", &admin, "restore-version", "1"]);
    assert_eq!(
        decrypt(&mut kms, &old_ct, &old_id).await.unwrap(),
        b"old seed"
    );
    kmsctl_json(&[&retire[..], &["--grace", "1s"]].concat());
    // Destroyed by the plugin once the grace period is over.
    poll_until(
        "v1 destroyed",
        20,
        || p.log_text(),
        || {
            let mut kms = kms.clone();
            let (ct, id) = (old_ct.clone(), old_id.clone());
            async move {
                decrypt(&mut kms, &ct, &id)
                    .await
                    .is_err_and(|e| e.message().contains("its key destroyed"))
            }
        },
    )
    .await;
    let err = decrypt(&mut kms, &old_ct, &old_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        decrypt(&mut kms, &new_ct, &new_id).await.unwrap(),
        b"new seed"
    );

    // Retirement is durable.
    p.restart().await;
    let mut kms = p.kms().await;
    assert_eq!(
        decrypt(&mut kms, &old_ct, &old_id)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let human = kmsctl(&["local", "--admin-socket", &admin, "status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("retired") && text.contains("primary"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_never_affects_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-1").await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = Plugin::start(other_dir.path(), "edge-2").await;
    let mut kms = p.kms().await;
    let (good_ct, good_id) = encrypt(&mut kms, b"seed").await;

    async fn encrypt_err(kms: &mut Kms, plaintext: Vec<u8>) -> tonic::Status {
        kms.encrypt(EncryptRequest {
            plaintext: plaintext.into(),
            uid: "bad".into(),
        })
        .await
        .unwrap_err()
    }

    let mut cases: Vec<(&str, tonic::Status)> = Vec::new();
    cases.push(("empty plaintext", encrypt_err(&mut kms, vec![]).await));
    cases.push((
        "plaintext over the 1 KiB ciphertext limit",
        encrypt_err(&mut kms, vec![1; 990]).await,
    ));
    // The largest plaintext that fits makes exactly a 1 KiB ciphertext.
    let (max_ct, max_id) = encrypt(&mut kms, &[1; 989]).await;
    assert_eq!(max_ct.len(), 1024);
    assert_eq!(
        decrypt(&mut kms, &max_ct, &max_id).await.unwrap().len(),
        989
    );

    cases.push((
        "truncated",
        decrypt(&mut kms, &good_ct[..20], &good_id)
            .await
            .unwrap_err(),
    ));
    cases.push((
        "empty ciphertext",
        decrypt(&mut kms, &[], &good_id).await.unwrap_err(),
    ));
    let mut tampered = good_ct.clone();
    *tampered.last_mut().unwrap() ^= 1;
    cases.push((
        "tampered",
        decrypt(&mut kms, &tampered, &good_id).await.unwrap_err(),
    ));
    let mut other_kms = other.kms().await;
    let (foreign_ct, foreign_id) = encrypt(&mut other_kms, b"seed").await;
    cases.push((
        "foreign cluster's ciphertext",
        decrypt(&mut kms, &foreign_ct, &foreign_id)
            .await
            .unwrap_err(),
    ));
    cases.push((
        "wrong key_id",
        decrypt(&mut kms, &good_ct, "edge-1/v1/0000000000000000")
            .await
            .unwrap_err(),
    ));
    let mut unknown = good_ct.clone();
    unknown[6] = 99; // header names KEK version 99
    cases.push((
        "unknown version",
        decrypt(&mut kms, &unknown, &good_id).await.unwrap_err(),
    ));
    cases.push((
        "garbage",
        decrypt(&mut kms, b"not an envelope at all", &good_id)
            .await
            .unwrap_err(),
    ));
    cases.push((
        "oversized ciphertext",
        decrypt(&mut kms, &[b'E'; 4096], &good_id)
            .await
            .unwrap_err(),
    ));

    for (what, status) in &cases {
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
            ),
            "{what}: {status:?}"
        );
        assert!(!status.message().is_empty(), "{what}: empty message");
        // The next call works.
        assert_eq!(
            decrypt(&mut kms, &good_ct, &good_id).await.unwrap(),
            b"seed",
            "after {what}"
        );
    }
    let msg = |i: usize| cases[i].1.message().to_owned();
    assert!(msg(0).contains("empty"));
    assert!(
        msg(1).contains("990") && msg(1).contains("989"),
        "{}",
        msg(1)
    );
    assert!(msg(2).contains("truncated"), "{}", msg(2));
    assert!(msg(4).contains("tampered"), "{}", msg(4));
    assert!(msg(7).contains("version 99"), "{}", msg(7));

    // Garbage on the socket: raw bytes that are not HTTP/2 at all.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
    ] {
        let mut raw = std::os::unix::net::UnixStream::connect(&p.socket).unwrap();
        let _ = raw.write_all(junk);
        drop(raw);
    }
    assert_eq!(
        decrypt(&mut kms, &good_ct, &good_id).await.unwrap(),
        b"seed"
    );
    let mut fresh = p.kms().await;
    assert_eq!(
        fresh
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .healthz,
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_see_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path(), "edge-1").await;
    let mut tasks = Vec::new();
    for client in 0..64u32 {
        let kms = p.kms().await;
        tasks.push(tokio::spawn(async move {
            let mut kms = kms;
            for i in 0..25u32 {
                let seed = [(client ^ i) as u8; 32];
                let (ct, id) = encrypt(&mut kms, &seed).await;
                assert_eq!(decrypt(&mut kms, &ct, &id).await.unwrap(), seed);
                kms.status(StatusRequest {}).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap(); // 64 × 25 × 3 = 4,800 calls
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_stale_file_replaced_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    // A socket file left by a crashed process: bound, never removed.
    drop(std::os::unix::net::UnixListener::bind(run.join("kms.sock")).unwrap());
    assert!(run.join("kms.sock").exists());
    let p = Plugin::start(dir.path(), "edge-1").await;

    // A second plugin on the same, live socket must not steal it.
    let second_dir = tempfile::tempdir().unwrap();
    let mut args = Plugin::soft_args(second_dir.path(), "edge-1");
    args[1] = p.socket.display().to_string();
    let mut second = Plugin::spawn(second_dir.path(), args);
    assert_ne!(second.wait_exit(), Some(0));
    assert!(
        second.log_text().contains("in use"),
        "{}",
        second.log_text()
    );
    let mut kms = p.kms().await;
    assert_eq!(
        kms.status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .healthz,
        "ok"
    );

    // A regular file where the socket should be is never deleted.
    let third_dir = tempfile::tempdir().unwrap();
    let file = third_dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let mut args = Plugin::soft_args(third_dir.path(), "edge-1");
    args[1] = file.display().to_string();
    let mut third = Plugin::spawn(third_dir.path(), args);
    assert_ne!(third.wait_exit(), Some(0));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Plugin::start(dir.path(), "edge-1").await;
    let stop_at = Instant::now() + Duration::from_millis(300);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut kms = p.kms().await;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            loop {
                match kms
                    .encrypt(EncryptRequest {
                        plaintext: vec![1; 32].into(),
                        uid: "drain".into(),
                    })
                    .await
                {
                    Ok(r) => {
                        assert!(!r.get_ref().ciphertext.is_empty());
                        ok += 1;
                    }
                    // After shutdown starts, new calls are refused, never
                    // answered with garbage or a plugin error.
                    Err(s) => {
                        assert!(Instant::now() >= stop_at, "error before shutdown: {s:?}");
                        // A call that races the server's GOAWAY(NO_ERROR)
                        // is reported by the client as Internal: still a
                        // refusal by the shutdown, not a plugin error.
                        let goaway = s.code() == Code::Internal
                            && format!("{s:?}").contains("GoAway(b\"\", NO_ERROR, Remote)");
                        assert!(
                            goaway
                                || matches!(
                                    s.code(),
                                    Code::Unavailable | Code::Unknown | Code::Cancelled
                                ),
                            "{s:?}"
                        );
                        refused += 1;
                        break;
                    }
                }
            }
            (ok, refused)
        }));
    }
    tokio::time::sleep_until(stop_at.into()).await;
    let started = Instant::now();
    assert_eq!(tokio::task::block_in_place(|| p.stop()), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut total_ok = 0;
    for t in tasks {
        let (ok, _) = t.await.unwrap();
        total_ok += ok;
    }
    assert!(total_ok > 0);
    assert!(!p.socket.exists() && !p.admin_socket.exists());
    assert!(p.log_text().contains("draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Plugin::start(dir.path(), "edge-1").await;
    let admin = p.admin_socket.display().to_string();
    let mut kms = p.kms().await;
    let known = b"KNOWN-PLAINTEXT-7f3a9c-never-on-disk!!";
    let (ct, id) = encrypt(&mut kms, known).await;
    kmsctl_json(&["local", "--admin-socket", &admin, "rotate"]);
    encrypt(&mut kms, known).await;
    assert_eq!(p.stop(), Some(0));
    assert!(files_containing(&p.data_dir, known).is_empty());
    assert!(
        files_containing(&p.data_dir, &ct[7..]).is_empty(),
        "ciphertexts are not cached either"
    );
    assert!(!id.is_empty());
    // The raw key bytes are checked by plugin/tests/at_rest.rs, which can see them.
}

#[test]
fn command_line_errors_are_one_clear_line() {
    let plugin = bin("edgekms-plugin");
    let out = Command::new(&plugin)
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--no-such-flag"));

    let out = Command::new(&plugin)
        .args(["--sealer", "soft"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--cluster is required"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "sealr = \"soft\"\n").unwrap();
    let out = Command::new(&plugin)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("sealr"), "{err}");

    let help = Command::new(&plugin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--socket",
        "--data-dir",
        "--cluster",
        "--sealer",
        "--config",
        "--admin-socket",
        "--tpm-tcti",
        "--tpm-pcrs",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let help = kmsctl(&["local", "--help"]);
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for cmd in ["status", "rotate", "retire", "--admin-socket", "--output"] {
        assert!(help.contains(cmd), "kmsctl local --help lacks {cmd}");
    }
    // kmsctl against no plugin: exit 2 and one line.
    let out = kmsctl(&[
        "local",
        "--admin-socket",
        "/nonexistent/admin.sock",
        "status",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is edgekms-plugin running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_is_read_and_tpm_is_never_silently_replaced_by_soft() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("plugin.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"{0}/run/kms.sock\"\ndata_dir = \"{0}/data\"\ncluster = \"edge-cfg\"\nsealer = \"soft\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut p = Plugin::spawn(
        dir.path(),
        vec!["--config".into(), cfg.display().to_string()],
    );
    p.wait_healthy().await;
    let mut kms = p.kms().await;
    assert!(key_id(&mut kms).await.starts_with("edge-cfg/v1/"));
    assert_eq!(p.stop(), Some(0));

    // The same data dir with --sealer tpm and no TPM: a clear refusal, not a
    // soft fallback.
    let mut args = Plugin::soft_args(dir.path(), "edge-cfg");
    let i = args.iter().position(|a| a == "soft").unwrap();
    args[i] = "tpm".into();
    args.extend(["--tpm-tcti".into(), "device:/nonexistent/tpmrm0".into()]);
    let mut tpm = Plugin::spawn(dir.path(), args);
    assert_ne!(tpm.wait_exit(), Some(0));
    let log = tpm.log_text();
    assert!(log.contains("no TPM") || log.contains("TPM"), "{log}");
    assert!(!tpm.socket.exists());
}
