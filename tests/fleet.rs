//! The central key service end to end: a real `edgekms-server` on loopback,
//! real plugins that join it and sync over mTLS, `kmsctl` as the operator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use edgekms_e2e::fleet::{
    enrol, join, join_at, local_status, node_args, text, version_states, Server,
};
use edgekms_e2e::{decrypt, encrypt, free_port, key_id, Plugin};
use serde_json::Value;

/// The key_id of `version` in a cluster status.
fn version_key_id(c: &Value, version: u64) -> String {
    c["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == version)
        .map(|v| v["key_id"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn node<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap()
}

/// Waits until every plugin's Status reports `want`.
async fn wait_key_id(plugins: &[&Plugin], want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for p in plugins {
        loop {
            let got = key_id(&mut p.kms().await).await;
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "plugin at {} reports {got}, not {want}; log:\n{}",
                p.dir.display(),
                p.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The versions a plugin holds with key material, from `kmsctl local status`.
fn local_versions(p: &Plugin) -> Vec<(u64, String)> {
    version_states(&local_status(p))
}

/// The invariant: no node has a primary that another node of its cluster
/// lacks.
fn assert_no_primary_missing_elsewhere(plugins: &[&Plugin]) {
    let held: Vec<Vec<(u64, String)>> = plugins.iter().map(|p| local_versions(p)).collect();
    for (i, versions) in held.iter().enumerate() {
        for (v, state) in versions {
            if state != "primary" {
                continue;
            }
            for (j, other) in held.iter().enumerate() {
                assert!(
                    other.iter().any(|(ov, os)| ov == v && os != "retired"),
                    "node {i} has v{v} primary but node {j} lacks it: {held:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_share_keys_inside_and_nothing_across() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let a1 = enrol(&server, tmp.path(), "a", "n1").await;
    let a2 = enrol(&server, tmp.path(), "a", "n2").await;
    let b1 = enrol(&server, tmp.path(), "b", "n1").await;

    let a_id = key_id(&mut a1.kms().await).await;
    assert_eq!(key_id(&mut a2.kms().await).await, a_id);
    assert!(a_id.starts_with("a/v1/"));
    assert!(key_id(&mut b1.kms().await).await.starts_with("b/v1/"));

    let mut written = Vec::new();
    for (p, text) in [(&a1, "from a1"), (&a2, "from a2"), (&b1, "from b1")] {
        let (ct, id) = encrypt(&mut p.kms().await, text.as_bytes()).await;
        written.push((ct, id, text));
    }
    for (ct, id, text) in &written {
        let in_a = id.starts_with("a/");
        for p in [&a1, &a2] {
            let got = decrypt(&mut p.kms().await, ct, id).await;
            if in_a {
                assert_eq!(got.unwrap(), text.as_bytes());
            } else {
                assert!(got.is_err(), "cluster a opened cluster b's data");
            }
        }
        let got = decrypt(&mut b1.kms().await, ct, id).await;
        if in_a {
            assert!(got.is_err(), "cluster b opened cluster a's data");
        } else {
            assert_eq!(got.unwrap(), text.as_bytes());
        }
    }

    // The server's view: both clusters, every node active and holding v1.
    let a = server.cluster("a");
    assert_eq!(a["primary"], 1);
    for n in ["n1", "n2"] {
        assert_eq!(node(&a, n)["state"], "active");
        assert_eq!(node(&a, n)["held"], serde_json::json!([1]));
    }
    // Delivered keys are never in the clear anywhere on disk.
    let audit = server.audit();
    assert!(audit
        .iter()
        .any(|r| r["event"] == "delivery" && r["cluster"] == "a" && r["node"] == "n2"));
    assert!(audit
        .iter()
        .any(|r| r["event"] == "enrol" && r["result"] == "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_waits_for_a_disconnected_node_then_promotes_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let n1 = enrol(&server, tmp.path(), "a", "n1").await;
    let mut n2 = enrol(&server, tmp.path(), "a", "n2").await;
    let v1_id = key_id(&mut n1.kms().await).await;
    let (before, before_id) = encrypt(&mut n1.kms().await, b"before").await;

    n2.stop();
    let r = server.kmsctl_json(&["rotate", "a"]);
    assert_eq!(r["version"], 2);
    assert_eq!(r["state"], "pending");
    // n1 acks at once; v2 stays pending for n2.
    let c = server
        .wait_cluster("a", "n1 to hold v2", |c| {
            node(c, "n1")["held"] == serde_json::json!([1, 2])
        })
        .await;
    assert_eq!(c["pending"], 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.cluster("a")["pending"], 2, "promoted without n2");
    assert_eq!(key_id(&mut n1.kms().await).await, v1_id);

    // n2 comes back (its own key_id unchanged while it catches up).
    n2 = Plugin::spawn(&n2.dir.clone(), n2.args.clone());
    n2.wait_healthy().await;
    let c = server
        .wait_cluster("a", "promotion of v2", |c| c["primary"] == 2)
        .await;
    let v2_id = version_key_id(&c, 2);
    assert!(v2_id.starts_with("a/v2/"));
    wait_key_id(&[&n1, &n2], &v2_id).await;

    let (after, after_id) = encrypt(&mut n2.kms().await, b"after").await;
    assert_eq!(after_id, v2_id);
    for p in [&n1, &n2] {
        assert_eq!(
            decrypt(&mut p.kms().await, &before, &before_id)
                .await
                .unwrap(),
            b"before"
        );
        assert_eq!(
            decrypt(&mut p.kms().await, &after, &after_id)
                .await
                .unwrap(),
            b"after"
        );
    }
    let audit = server.audit();
    assert!(audit
        .iter()
        .any(|r| r["event"] == "promotion" && r["version"] == 2));
    assert!(audit
        .iter()
        .any(|r| r["event"] == "ack" && r["node"] == "n2" && r["version"] == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_through_a_server_outage_and_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let mut n1 = enrol(&server, tmp.path(), "a", "n1").await;
    let n2 = enrol(&server, tmp.path(), "a", "n2").await;
    let v1_id = key_id(&mut n1.kms().await).await;

    server.stop().await;
    // The whole outage: Status, Encrypt and Decrypt answer, with no error.
    let until = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < until {
        for p in [&n1, &n2] {
            let mut kms = p.kms().await;
            assert_eq!(key_id(&mut kms).await, v1_id);
            let (ct, id) = encrypt(&mut kms, b"offline").await;
            assert_eq!(decrypt(&mut kms, &ct, &id).await.unwrap(), b"offline");
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rounds > 10);
    // A restart while the service is down unseals from the cache.
    n1.restart().await;
    assert_eq!(key_id(&mut n1.kms().await).await, v1_id);
    assert!(n1
        .log_text()
        .contains("sync with the central key service interrupted"));

    // The service comes back; a rotation made now reaches both.
    server.respawn();
    server.wait_up().await;
    server.kmsctl_json(&["rotate", "a"]);
    let c = server
        .wait_cluster("a", "promotion after the outage", |c| c["primary"] == 2)
        .await;
    wait_key_id(&[&n1, &n2], &version_key_id(&c, 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_several_urls_joins_and_syncs_past_one_that_is_down() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    // Nothing listens there: refused at once, the next URL is tried.
    let closed = format!("https://127.0.0.1:{}", free_port());
    let dir = tmp.path().join("a-n1");
    let (token, hash) = server.add_node("a", "n1");
    let servers = format!("{closed},{}", server.url());
    let out = join_at(&servers, &dir, "a", "n1", &token, &hash);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("enrolled with {}", server.url())),
        "{}",
        text(&out)
    );
    let mut n1 = Plugin::spawn(&dir, node_args(&dir, "a", "n1"));
    n1.wait_healthy().await;
    assert!(key_id(&mut n1.kms().await).await.starts_with("a/v1/"));

    // Restarted, the plugin reads both URLs from its data dir, starts with
    // the closed one and moves on: a rotation reaches it.
    n1.restart().await;
    server.kmsctl_json(&["rotate", "a"]);
    let c = server
        .wait_cluster("a", "promotion of v2", |c| c["primary"] == 2)
        .await;
    wait_key_id(&[&n1], &version_key_id(&c, 2)).await;
    let log = n1.log_text();
    assert!(
        log.contains(&format!("server={closed}"))
            && log.contains("connected to the central key service"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_revoked_nodes_and_foreign_clients_are_refused_and_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let dir = tmp.path().join("joiner");
    let (token, hash) = server.add_node("a", "n1");

    // Forged: right id, wrong secret; and a made-up token.
    let forged = format!("{}.0000000000000000", token.split('.').next().unwrap());
    for bad in [forged.as_str(), "abcdef.0123456789abcdef", "garbage"] {
        let out = join(&server, &dir, "a", "n1", bad, &hash);
        assert!(!out.status.success());
        assert!(
            text(&out).contains("join token is not valid"),
            "{}",
            text(&out)
        );
    }
    // The wrong CA pin: refused before any token is sent.
    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let out = join(&server, &dir, "a", "n1", &token, &wrong_pin);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not match --ca-hash"),
        "{}",
        text(&out)
    );

    // Expired.
    let v = server.kmsctl_json(&["node", "add", "a", "n2", "--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = join(
        &server,
        &tmp.path().join("n2"),
        "a",
        "n2",
        v["token"].as_str().unwrap(),
        &hash,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("expired"), "{}", text(&out));

    // Good (from a file, out of the process list), then reused.
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let out = std::process::Command::new(edgekms_e2e::bin("edgekms-plugin"))
        .args([
            "join",
            "--server",
            &server.url(),
            "--ca-hash",
            &hash,
            "--token-file",
        ])
        .arg(&token_file)
        .args(node_args(&dir, "a", "n1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = join(&server, &tmp.path().join("again"), "a", "n1", &token, &hash);
    assert!(!out.status.success());
    assert!(text(&out).contains("already used"), "{}", text(&out));

    // Revoked: its plugin keeps serving cached keys but is refused.
    let mut n1 = Plugin::spawn(&dir, node_args(&dir, "a", "n1"));
    n1.wait_healthy().await;
    let out = server.kmsctl(&["node", "remove", "a", "n1"]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !n1.log_text().contains("was removed from the fleet") {
        assert!(
            Instant::now() < deadline,
            "no refusal in the plugin log:\n{}",
            n1.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n1.wait_healthy().await;
    n1.stop();

    // An operator call without a client certificate, and one with a
    // certificate from another CA.
    let other = Server::start(&tmp.path().join("other")).await;
    let no_cert = tmp.path().join("no-cert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(server.operator_dir().join("ca.pem"), no_cert.join("ca.pem")).unwrap();
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(other.operator_dir().join(f), foreign.join(f)).unwrap();
    }
    std::fs::copy(server.operator_dir().join("ca.pem"), foreign.join("ca.pem")).unwrap();
    let out = std::process::Command::new(edgekms_e2e::bin("kmsctl"))
        .args(["--server", &server.url(), "--operator-dir"])
        .arg(&foreign)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not issued by its CA"),
        "{}",
        text(&out)
    );
    let out = std::process::Command::new(edgekms_e2e::bin("kmsctl"))
        .args(["--server", &server.url(), "--operator-dir"])
        .arg(&no_cert)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cert.pem"), "{}", text(&out));
    no_cert_call_is_unauthenticated(&server).await;

    let audit = server.audit();
    let refused = |needle: &str| {
        audit.iter().any(|r| {
            r["result"].as_str().unwrap_or("").contains(needle)
                || r["detail"].as_str().unwrap_or("").contains(needle)
        })
    };
    assert!(refused("join token is not valid"), "{audit:#?}");
    assert!(refused("expired"));
    assert!(refused("already used"));
    assert!(refused("removed from the fleet"));
    assert!(
        refused("TLS handshake failed"),
        "foreign CA not audited: {audit:#?}"
    );
    assert!(refused("client certificate required"));
    assert!(audit
        .iter()
        .any(|r| r["event"] == "revocation" && r["node"] == "n1"));
}

/// A TLS client that trusts the server but presents no certificate.
async fn no_cert_call_is_unauthenticated(server: &Server) {
    use edgekms_daemon::{pki, tls};
    let ca_pem = std::fs::read_to_string(server.operator_dir().join("ca.pem")).unwrap();
    let ca = pki::pem_decode("CERTIFICATE", &ca_pem).unwrap();
    let cfg = tls::client_config(tls::Trust::Ca(&ca), None).unwrap();
    let channel = tls::connect(&server.url(), cfg).await.unwrap();
    let mut client = edgekms_proto::fleet::operator_client::OperatorClient::new(channel);
    let err = client
        .status(edgekms_proto::fleet::StatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("client certificate required"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_wait_force_and_retire_from_kmsctl() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let n1 = enrol(&server, tmp.path(), "a", "n1").await;
    let mut n2 = enrol(&server, tmp.path(), "a", "n2").await;
    let (old, old_id) = encrypt(&mut n1.kms().await, b"v1 data").await;

    // --wait returns once every node serves the new primary, with progress.
    let out = server.kmsctl(&["rotate", "a", "--wait", "--settle", "0s"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rotating a v2"), "{stderr}");
    let c = server.cluster("a");
    wait_key_id(&[&n1, &n2], &version_key_id(&c, 2)).await;

    // Retire refuses the primary, then retires v1 everywhere.
    let out = server.kmsctl(&["retire", "a", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("is the primary"), "{}", text(&out));
    // Without a census (and with n1's apiserver last seen writing under
    // v1) a retire is refused, naming what to do.
    let out = server.kmsctl(&["retire", "a", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("kmsctl local census"), "{}", text(&out));
    server.kmsctl_json(&["retire", "a", "1", "--skip-census", "--grace", "1s"]);
    let c = server
        .wait_cluster("a", "v1 destroyed", |c| {
            c["versions"][0]["state"] == "retired"
        })
        .await;
    assert_eq!(node(&c, "n1")["held"], serde_json::json!([2]));
    for p in [&n1, &n2] {
        let err = decrypt(&mut p.kms().await, &old, &old_id)
            .await
            .unwrap_err();
        assert!(err.message().contains("retired"), "{}", err.message());
    }

    // --wait gives up with exit code 3 while a node is away; --force then
    // promotes without it and names it.
    n2.stop();
    let out = server.kmsctl(&["rotate", "a", "--wait", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let out = server.kmsctl(&["-o", "json", "rotate", "a", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stale_nodes"], serde_json::json!(["n2"]));
    assert_eq!(v["state"], "primary");
    let c = server.cluster("a");
    assert!(node(&c, "n2")["behind"].as_bool().unwrap());
    // n2 catches up when it returns.
    n2 = Plugin::spawn(&n2.dir.clone(), n2.args.clone());
    n2.wait_healthy().await;
    wait_key_id(&[&n1, &n2], &version_key_id(&c, 3)).await;

    // Human status output: tables.
    let out = server.kmsctl(&["status", "a"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("CLUSTER a") && s.contains("VERSION") && s.contains("NODE"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_follows_the_configured_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--auto-rotate-every", "2s"]).await;
    server.add_node("a", "n1");
    let c = server
        .wait_cluster("a", "an automatic rotation", |c| {
            c["primary"].as_u64() >= Some(2)
        })
        .await;
    assert!(version_key_id(&c, 2).starts_with("a/v2/"));
    assert!(server
        .audit()
        .iter()
        .any(|r| r["event"] == "rotation" && r["actor"] == "auto-rotate"));
}

/// Rotates cluster a with n1 and n2 joined, crashing one process at
/// `failpoint`; then restarts everything and checks the invariants.
async fn crash_during_rotation(failpoint: &str, crash_server: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let n1 = enrol(&server, tmp.path(), "a", "n1").await;
    let mut n2 = enrol(&server, tmp.path(), "a", "n2").await;
    let (before, before_id) = encrypt(&mut n1.kms().await, b"before").await;

    if crash_server {
        server.stop().await;
        server.env = vec![("EDGEKMS_FAILPOINT".into(), failpoint.into())];
        server.respawn();
        server.wait_up().await;
    } else {
        let (dir, args) = (n2.dir.clone(), n2.args.clone());
        n2.stop();
        n2 = Plugin::spawn_with_env(&dir, args, &[("EDGEKMS_FAILPOINT", failpoint)]);
        n2.wait_healthy().await;
    }
    // Give the nodes a moment to be connected before rotating.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = server.kmsctl(&["rotate", "a"]);
    let died = if crash_server {
        server.exited_within(Duration::from_secs(10)).is_some()
    } else {
        n2.died_within(Duration::from_secs(10))
    };
    assert!(died, "failpoint {failpoint} was not reached");

    // Right after the crash: no node has a primary another lacks.
    assert_no_primary_missing_elsewhere(&[&n1]);
    if !crash_server {
        // n2 is down; n1 must not have moved to v2 without it.
        assert_eq!(key_id(&mut n1.kms().await).await, before_id);
    }

    // Restart whatever died, without the failpoint.
    if crash_server {
        server.env.clear();
        server.respawn();
        server.wait_up().await;
    } else {
        let (dir, args) = (n2.dir.clone(), n2.args.clone());
        n2 = Plugin::spawn(&dir, args);
        n2.wait_healthy().await;
    }
    // A rotation that was not recorded is started again.
    let c = server.cluster("a");
    if c["primary"] == 1 && c["pending"] == 0 {
        server.kmsctl_json(&["rotate", "a"]);
    }
    let c = server
        .wait_cluster("a", "promotion after the crash", |c| c["primary"] == 2)
        .await;
    let v2 = version_key_id(&c, 2);
    wait_key_id(&[&n1, &n2], &v2).await;
    assert_no_primary_missing_elsewhere(&[&n1, &n2]);
    for p in [&n1, &n2] {
        let mut kms = p.kms().await;
        assert_eq!(
            decrypt(&mut kms, &before, &before_id).await.unwrap(),
            b"before"
        );
        let (ct, id) = encrypt(&mut kms, b"after").await;
        for q in [&n1, &n2] {
            assert_eq!(
                decrypt(&mut q.kms().await, &ct, &id).await.unwrap(),
                b"after"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_a_plugin_before_it_stores_a_delivery() {
    crash_during_rotation("plugin-before-store", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_a_plugin_after_storing_before_acking() {
    crash_during_rotation("plugin-before-ack", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_the_server_before_it_records_a_rotation() {
    crash_during_rotation("server-rotate-before-commit", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_the_server_right_after_a_promotion() {
    crash_during_rotation("server-after-promote-commit", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_server_and_plugin_mid_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let mut n1 = enrol(&server, tmp.path(), "a", "n1").await;
    let n2 = enrol(&server, tmp.path(), "a", "n2").await;
    for round in 0..3u64 {
        let _ = server.kmsctl(&["rotate", "a"]);
        // Kill at a slightly different moment each round.
        tokio::time::sleep(Duration::from_millis(round * 15)).await;
        server.kill();
        n1.kill9();
        assert_no_primary_missing_elsewhere(&[&n2]);
        server.respawn();
        server.wait_up().await;
        n1 = Plugin::spawn(&n1.dir.clone(), n1.args.clone());
        n1.wait_healthy().await;
        let want = round + 2;
        let c = server.cluster("a");
        if c["primary"].as_u64() < Some(want) && c["pending"] == 0 {
            server.kmsctl_json(&["rotate", "a"]);
        }
        let c = server
            .wait_cluster("a", "promotion after kill -9", |c| {
                c["primary"].as_u64() == Some(want)
            })
            .await;
        wait_key_id(&[&n1, &n2], &version_key_id(&c, want)).await;
        assert_no_primary_missing_elsewhere(&[&n1, &n2]);
    }
}
