//! The plugin with `--sealer tpm` against a real swtpm started here: restart
//! and unseal, a data dir copied to another TPM, a changed PCR and the
//! recovery passphrase (with /readyz and the metrics following), and no key
//! bytes on disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use edgekms_e2e::*;
use edgekms_proto::admin::ResealRequest;
use tonic::Code;

fn tpm_args(dir: &Path, tpm: &Swtpm, pcrs: Option<&str>) -> Vec<String> {
    let mut args = Plugin::soft_args(dir, "edge-1");
    let i = args.iter().position(|a| a == "soft").unwrap();
    args[i] = "tpm".into();
    args.extend(["--tpm-tcti".into(), tpm.tcti()]);
    if let Some(p) = pcrs {
        args.extend(["--tpm-pcrs".into(), p.into()]);
    }
    args
}

/// The recovery passphrase the plugin printed once at first start.
fn recovery_passphrase(log: &str) -> String {
    let mut lines = log.lines();
    lines.find(|l| l.contains("recovery passphrase")).unwrap();
    lines.next().unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_restart_unseal_and_decrypt_everything() {
    let Some((dir, tpm)) = swtpm::fresh() else {
        return;
    };
    let mut p = Plugin::spawn(dir.path(), tpm_args(dir.path(), &tpm, None));
    p.wait_healthy().await;
    let mut kms = p.kms().await;
    let mut written = Vec::new();
    for i in 0..10u8 {
        written.push(([i; 32], encrypt(&mut kms, &[i; 32]).await));
    }
    let tpm_info = kmsctl_json(&[
        "local",
        "--admin-socket",
        &p.admin_socket.display().to_string(),
        "tpm",
    ]);
    assert_eq!(tpm_info["sealer"]["backend"], "tpm");
    assert_eq!(tpm_info["unsealed"], true);
    // The node's sealed key and its storage key are exempt from
    // dictionary-attack lockout.
    assert_eq!(
        tpm_info["sealed_key"]["sealed_object_noda"], "yes",
        "{tpm_info}"
    );
    assert_eq!(
        tpm_info["sealed_key"]["storage_key_noda"], "yes",
        "{tpm_info}"
    );
    let human = edgekms_e2e::kmsctl(&[
        "local",
        "--admin-socket",
        &p.admin_socket.display().to_string(),
        "tpm",
    ]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("sealed_object_noda") && l.ends_with("yes")),
        "{human}"
    );
    assert_eq!(tpm_info["hardware_backed"], true);
    assert!(tpm_info["sealer"]["tcti"]
        .as_str()
        .unwrap()
        .starts_with("swtpm:"));
    assert!(
        !tpm_info["sealer"]["manufacturer"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{tpm_info}"
    );
    assert!(
        tpm_info["sealer"]["firmware_version"].is_string(),
        "{tpm_info}"
    );
    assert!(!p.log_text().contains("INSECURE"));

    p.restart().await;
    let mut kms = p.kms().await;
    for (plain, (ct, id)) in &written {
        assert_eq!(&decrypt(&mut kms, ct, id).await.unwrap(), plain);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_copied_to_another_tpm_is_refused() {
    if !swtpm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm_a = Swtpm::start(&dir.path().join("tpm-a"));
    let node_a = dir.path().join("a");
    let mut p = Plugin::spawn(&node_a, tpm_args(&node_a, &tpm_a, None));
    p.wait_healthy().await;
    assert_eq!(p.stop(), Some(0));

    let node_b = dir.path().join("b");
    copy_dir(&node_a.join("data"), &node_b.join("data"));
    let tpm_b = Swtpm::start(&dir.path().join("tpm-b"));
    let mut stolen = Plugin::spawn(&node_b, tpm_args(&node_b, &tpm_b, None));
    assert_ne!(stolen.wait_exit(), Some(0));
    let log = stolen.log_text();
    assert!(log.contains("another TPM"), "{log}");
    assert!(!stolen.socket.exists(), "no key material may be served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_pcr_refuses_then_recovery_passphrase_reseals() {
    let Some((dir, tpm)) = swtpm::fresh() else {
        return;
    };
    let args = tpm_args(dir.path(), &tpm, Some("sha256:7"));
    let mut p = Plugin::spawn(dir.path(), args.clone());
    p.wait_healthy().await;
    let passphrase = recovery_passphrase(&p.log_text());
    let mut kms = p.kms().await;
    let (ct, id) = encrypt(&mut kms, b"written before the PCR changed").await;
    assert_eq!(p.stop(), Some(0));

    tpm.extend_pcr(7);
    p = Plugin::spawn(dir.path(), args.clone());
    p.wait_serving().await;
    let mut kms = p.kms().await;
    let status = kms
        .status(edgekms_proto::kms_v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .healthz
            .contains("TPM policy check failed: PCR 7 changed"),
        "{}",
        status.healthz
    );
    // /readyz and edgekms_ready say what Status says.
    assert_eq!(p.http_get("/readyz").await, (503, status.healthz.clone()));
    assert_eq!(p.http_get("/healthz").await, (200, "ok".into()));
    let scrape = p.scrape().await;
    assert_eq!(sample(&scrape, "edgekms_ready", &[]), Some(0.0));
    assert_eq!(
        sample(&scrape, "edgekms_primary_key_version", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&scrape, "edgekms_cached_key_versions", &[]),
        Some(0.0)
    );
    let tpm_ops = |s: &prometheus_parse::Scrape, op| {
        sample(
            s,
            "edgekms_tpm_operation_duration_seconds_count",
            &[("op", op), ("backend", "tpm")],
        )
    };
    assert_eq!(tpm_ops(&scrape, "unseal"), Some(1.0), "the refused unseal");
    assert_eq!(tpm_ops(&scrape, "seal"), None);
    let err = kms
        .encrypt(edgekms_proto::kms_v2::EncryptRequest {
            plaintext: vec![1; 32].into(),
            uid: "t".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        decrypt(&mut kms, &ct, &id).await.unwrap_err().code(),
        Code::Unavailable
    );
    let admin = p.admin_socket.display().to_string();
    let info = kmsctl_json(&["local", "--admin-socket", &admin, "tpm"]);
    assert_eq!(info["unsealed"], false);
    assert_eq!(info["sealer"]["pcr_policy"], "sha256:7");
    // Logged once at start; Status polls add nothing.
    kms.status(edgekms_proto::kms_v2::StatusRequest {})
        .await
        .unwrap();
    assert_eq!(
        p.log_text().matches("not serving key material").count(),
        1,
        "logged once"
    );

    // A wrong passphrase is refused and changes nothing.
    let mut admin_client = p.admin().await;
    let wrong = admin_client
        .reseal(ResealRequest {
            recovery_passphrase: "0000-0000-0000-0000-0000-0000-0000-0000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    assert_eq!(p.http_get("/readyz").await.0, 503);

    // The operator checked the node: reseal with the passphrase, via kmsctl.
    let pass_file = dir.path().join("pass.txt");
    std::fs::write(&pass_file, &passphrase).unwrap();
    let out = kmsctl(&[
        "local",
        "--admin-socket",
        &admin,
        "reseal",
        "--passphrase-file",
        &pass_file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(key_id(&mut kms).await, id);
    assert_eq!(
        decrypt(&mut kms, &ct, &id).await.unwrap(),
        b"written before the PCR changed"
    );
    assert_eq!(p.http_get("/readyz").await, (200, "ok".into()));
    let scrape = p.scrape().await;
    assert_eq!(sample(&scrape, "edgekms_ready", &[]), Some(1.0));
    assert_eq!(
        sample(&scrape, "edgekms_primary_key_version", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&scrape, "edgekms_cached_key_versions", &[]),
        Some(1.0)
    );
    assert_eq!(tpm_ops(&scrape, "seal"), Some(1.0), "the reseal");

    // Sealed to the present PCR values: the next start unseals by itself.
    p.restart().await;
    let mut kms = p.kms().await;
    assert_eq!(
        decrypt(&mut kms, &ct, &id).await.unwrap(),
        b"written before the PCR changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_data_dir_is_never_used_by_a_tpm_config_or_back() {
    if !swtpm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut p = Plugin::start(dir.path(), "edge-1").await; // soft
    assert_eq!(p.stop(), Some(0));
    let tpm = Swtpm::start(&dir.path().join("tpm"));
    let mut t = Plugin::spawn(dir.path(), tpm_args(dir.path(), &tpm, None));
    assert_ne!(t.wait_exit(), Some(0));
    assert!(t.log_text().contains("backend"), "{}", t.log_text());

    let dir2 = tempfile::tempdir().unwrap();
    let mut t = Plugin::spawn(dir2.path(), tpm_args(dir2.path(), &tpm, None));
    t.wait_healthy().await;
    assert_eq!(t.stop(), Some(0));
    let mut s = Plugin::spawn(dir2.path(), Plugin::soft_args(dir2.path(), "edge-1"));
    assert_ne!(s.wait_exit(), Some(0));
    assert!(
        s.log_text().contains("refusing to switch backends"),
        "{}",
        s.log_text()
    );
}

/// Library-level: the real node code with the TPM sealer on swtpm, so the
/// test can see the raw NSK and KEKs and look for them in every file.
#[test]
fn no_raw_key_bytes_in_a_tpm_data_dir() {
    use edgekms_plugin::config::{SealerKind, Settings};
    use edgekms_plugin::node::{sealer_from_config, Node};
    let Some((dir, tpm)) = swtpm::fresh() else {
        return;
    };
    let cfg = Settings {
        data_dir: Some(dir.path().join("data")),
        cluster: Some("edge-1".into()),
        node: Some("n1".into()),
        sealer: Some(SealerKind::Tpm),
        tpm_tcti: Some(tpm.tcti()),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let mut keys = Vec::new();
    {
        let node = Node::open(&cfg, sealer_from_config(&cfg).unwrap()).unwrap();
        node.rotate().unwrap();
        for kv in node.snapshot().keyring.versions() {
            keys.push(kv.key().unwrap().expose().to_vec());
        }
    }
    let store = edgekms_plugin::cache::Cache::open(&cfg.data_dir, "edge-1").unwrap();
    let blob = store.sealed_nsk().unwrap().unwrap();
    drop(store);
    let sealer = sealer_from_config(&cfg).unwrap();
    assert_eq!(sealer.name(), "tpm");
    keys.push(sealer.unseal(&blob).unwrap().expose().to_vec());
    assert_eq!(keys.len(), 3);
    for key in &keys {
        assert!(
            files_containing(&cfg.data_dir, key).is_empty(),
            "raw key in the data dir"
        );
    }
}

/// A joined node whose PCRs changed serves nothing and acks nothing (so a
/// rotation waits for it); once resealed it syncs and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_with_changed_pcrs_syncs_again_after_reseal() {
    use edgekms_e2e::fleet::{node_args, text, Server};
    if !swtpm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let tpm = Swtpm::start(&dir.path().join("tpm"));
    let node_dir = dir.path().join("node");
    let mut args = node_args(&node_dir, "edge-1", "n1");
    let i = args.iter().position(|a| a == "soft").unwrap();
    args[i] = "tpm".into();
    args.extend([
        "--tpm-tcti".into(),
        tpm.tcti(),
        "--tpm-pcrs".into(),
        "sha256:7".into(),
    ]);
    let (token, hash) = server.add_node("edge-1", "n1");
    std::fs::create_dir_all(&node_dir).unwrap();
    let out = edgekms_e2e::without_terminal(std::process::Command::new(bin("edgekms-plugin")))
        .args(["join", "--server", &server.url(), "--token", &token])
        .args(["--ca-hash", &hash])
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let passphrase = recovery_passphrase(&String::from_utf8_lossy(&out.stderr));

    tpm.extend_pcr(7);
    let p = Plugin::spawn(&node_dir, args);
    p.wait_serving().await;
    let healthz = p
        .kms()
        .await
        .status(edgekms_proto::kms_v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .healthz;
    assert!(healthz.contains("PCR"), "{healthz}");
    // The rotation cannot complete without it.
    server.kmsctl_json(&["rotate", "edge-1"]);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(server.cluster("edge-1")["pending"], 2);

    let pass_file = dir.path().join("pass.txt");
    std::fs::write(&pass_file, &passphrase).unwrap();
    let admin = p.admin_socket.display().to_string();
    let out = kmsctl(&[
        "local",
        "--admin-socket",
        &admin,
        "reseal",
        "--passphrase-file",
        &pass_file.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let c = server
        .wait_cluster("edge-1", "promotion after the reseal", |c| {
            c["primary"] == 2
        })
        .await;
    let want = c["versions"][1]["key_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while key_id(&mut p.kms().await).await != want {
        assert!(std::time::Instant::now() < deadline, "{}", p.log_text());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The central service takes the nodes' TPM options: `init --tpm-pcrs`
/// binds the root key to PCR 7 of a real swtpm, serving with them comes up
/// ready, and once PCR 7 changes serving refuses with the policy failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_seals_its_root_key_to_tpm_pcrs() {
    use std::process::{Child, Command, Stdio};
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    if !swtpm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&dir.path().join("tpm"));
    let data_dir = dir.path().join("server");
    let data = data_dir.display().to_string();
    let tcti = tpm.tcti();
    let sealer = [
        "--sealer",
        "tpm",
        "--tpm-tcti",
        &tcti,
        "--tpm-pcrs",
        "sha256:7",
    ];
    let out = Command::new(bin("edgekms-server"))
        .args(["init", "--data-dir", &data])
        .args(sealer)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "init failed: {shown}");
    assert!(shown.contains("root key sealed by: tpm"), "{shown}");

    let log = dir.path().join("server.log");
    let serve = || {
        let out = std::fs::File::create(&log).unwrap();
        let ops = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin("edgekms-server"))
            .args(["--data-dir", &data])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-addr", &ops])
            .args(sealer)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        (Killed(child), ops.parse::<std::net::SocketAddr>().unwrap())
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let (server, ops) = serve();
    poll_until(
        "the server on swtpm not ready",
        30,
        log_text,
        || async move { matches!(http_get(ops, "/readyz").await, Ok((200, _))) },
    )
    .await;
    drop(server);

    // Bound to PCR 7 as it was at init: a change stops the root key.
    tpm.extend_pcr(7);
    let (mut server, _) = serve();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{}", log_text());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{}", log_text());
    assert!(
        log_text().contains("TPM policy check failed") && log_text().contains("PCR 7"),
        "{}",
        log_text()
    );
}
