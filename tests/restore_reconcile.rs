//! A central service restored from an older backup, with real processes:
//! `edgekms-server restore` of a `kmsctl backup` taken before rotations or
//! a retirement, served on the old address, and real plugins that sync
//! with it. The restored service reconciles: it changes nothing until its
//! nodes have reported, takes back the versions they hold and it lacks
//! (checked against their key_ids), never rolls a primary back, never
//! revives a destroyed version, and never counts a clash as a node holding
//! a version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgekms_e2e::fleet::{
    enrol, join, local_status, text, version_key_ids, version_states, Server,
};
use edgekms_e2e::{bin, decrypt, encrypt, key_id, Plugin};

/// `kmsctl backup` of `server` into `dir/name.bak`; returns (file, key file).
fn backup(server: &Server, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&key, format!("{}\n", "42".repeat(32))).unwrap();
    let file = dir.join(format!("{name}.bak"));
    server.kmsctl_json(&[
        "backup",
        file.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    (file, key)
}

/// Stops `server`, restores `backup` into a new data dir and serves it on
/// the old address (the nodes know the service by its URL), with `args`.
async fn restore_in_place(server: &mut Server, (file, key): &(PathBuf, PathBuf), args: &[&str]) {
    let operator = server.operator_dir();
    server.stop().await;
    let dir = server.data_dir.with_file_name("restored");
    let out = Command::new(bin("edgekms-server"))
        .args(["restore", file.to_str().unwrap(), "--key-file"])
        .arg(key)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--sealer", "soft"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "restore: {}", text(&out));
    // The operator's credentials stay valid: same CA.
    let to = dir.join("operator");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(operator.join(f), to.join(f)).unwrap();
    }
    server.data_dir = dir;
    server.extra_args.extend(args.iter().map(|a| a.to_string()));
    server.respawn();
    server.wait_up().await;
}

/// `kmsctl rotate CLUSTER --wait --settle 0s`: the new version is primary
/// on every node when it returns.
fn rotate_settled(server: &Server, cluster: &str) -> u64 {
    let r = server.kmsctl_json(&[
        "rotate",
        cluster,
        "--wait",
        "--settle",
        "0s",
        "--timeout",
        "30s",
    ]);
    r["version"].as_u64().unwrap()
}

/// The version of a key_id ("c/v3/..." -> 3).
fn version_of(key_id: &str) -> u64 {
    key_id.split('/').nth(1).unwrap()[1..].parse().unwrap()
}

/// Polls every plugin's primary until `done`, checking on each sample that
/// no plugin's primary is older than `floor`.
async fn watch_primaries(plugins: &[&Plugin], floor: u64, done: impl Fn(&[u64]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut now = Vec::new();
        for p in plugins {
            let v = version_of(&key_id(&mut p.kms().await).await);
            assert!(
                v >= floor,
                "a primary rolled back to v{v} (was v{floor}); log:\n{}",
                p.log_text()
            );
            now.push(v);
        }
        if done(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "primaries stuck at {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every ciphertext decrypts on every plugin.
async fn all_decrypt_everywhere(plugins: &[&Plugin], written: &[(Vec<u8>, String, String)]) {
    for p in plugins {
        for (ct, id, plain) in written {
            let got = decrypt(&mut p.kms().await, ct, id).await;
            assert_eq!(
                got.map_err(|s| s.message().to_owned()),
                Ok(plain.as_bytes().to_vec()),
                "{} cannot read {id}",
                p.dir.display()
            );
        }
    }
}

/// Starts a stopped plugin again, healthy.
async fn start_again(p: &mut Plugin) {
    *p = Plugin::spawn(&p.dir.clone(), p.args.clone());
    p.wait_healthy().await;
}

async fn write(p: &Plugin, text: &str, written: &mut Vec<(Vec<u8>, String, String)>) {
    let (ct, id) = encrypt(&mut p.kms().await, text.as_bytes()).await;
    written.push((ct, id, text.to_owned()));
}

fn events(server: &Server) -> Vec<String> {
    server
        .audit()
        .iter()
        .map(|r| r["event"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Points 1 and 2 of the issue: a restore from before two rotations, with
/// automatic rotation on. The restored service neither mints a second v2
/// or v3 (a split) nor moves any primary back to v1 (a rollback): the
/// nodes return v2 and v3, and v3 stays primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_before_two_rotations_splits_nothing_and_rolls_nothing_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        nodes.push(enrol(&server, tmp.path(), "c2", n).await);
    }
    let all: Vec<&Plugin> = nodes.iter().collect();
    let mut written = Vec::new();
    write(&nodes[0], "under v1", &mut written).await;
    let saved = backup(&server, tmp.path(), "old");
    let (unused, ca_hash) = server.add_node("c2", "n4");

    assert_eq!(rotate_settled(&server, "c2"), 2);
    write(&nodes[1], "under v2", &mut written).await;
    assert_eq!(rotate_settled(&server, "c2"), 3);
    write(&nodes[2], "under v3", &mut written).await;
    let before = version_key_ids(&server.cluster("c2"));
    watch_primaries(&all, 3, |v| v.iter().all(|v| *v == 3)).await;

    // Restored with automatic rotation every 2 s: it must not fire while
    // the cluster reconciles.
    restore_in_place(&mut server, &saved, &["--auto-rotate-every", "2s"]).await;
    let c = server
        .wait_cluster("c2", "reconciled", |c| {
            c["reconciling"].is_null() && c["primary"] == 3
        })
        .await;
    watch_primaries(&all, 3, |_| true).await;
    // v1, v2 and v3 under the key_ids they had: nothing minted twice.
    let after = version_key_ids(&c);
    for (v, _, id) in &before {
        assert!(
            after.iter().any(|(av, _, aid)| av == v && aid == id),
            "v{v} {id} lost or replaced: {after:?}"
        );
    }
    let ev = events(&server);
    let restored = ev.iter().position(|e| e == "restore").unwrap();
    let reconciled = ev.iter().position(|e| e == "reconciled").unwrap();
    assert!(ev.iter().filter(|e| *e == "heal").count() >= 2, "{ev:?}");
    assert!(
        !ev[restored..reconciled].iter().any(|e| e == "rotation"),
        "rotated before reconciling: {ev:?}"
    );
    // A token unused at backup time is withdrawn by the restore (it may
    // have been used since); a new one works.
    let n4_dir = tmp.path().join("c2-n4");
    let out = join(&server, &n4_dir, "c2", "n4", &unused, &ca_hash);
    assert!(!out.status.success(), "an old token enrolled a node");
    assert!(text(&out).contains("join token"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&n4_dir);
    let n4 = enrol(&server, tmp.path(), "c2", "n4").await;

    // Automatic rotation goes on from here, past v3.
    let c = server
        .wait_cluster("c2", "an automatic rotation past v3", |c| {
            c["primary"].as_u64().unwrap() >= 4
        })
        .await;
    assert!(c["versions"].as_array().unwrap().len() >= 4);
    let mut all = all;
    all.push(&n4);
    watch_primaries(&all, 3, |v| v.iter().all(|v| *v >= 4)).await;
    write(&nodes[0], "after the restore", &mut written).await;
    write(&n4, "from the new node", &mut written).await;
    all_decrypt_everywhere(&all, &written).await;
}

/// Point 3: a version retired after the backup stays destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_retired_after_the_backup_is_never_revived() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let n1 = enrol(&server, tmp.path(), "c", "n1").await;
    let n2 = enrol(&server, tmp.path(), "c", "n2").await;
    let all = [&n1, &n2];
    assert_eq!(rotate_settled(&server, "c"), 2);
    let saved = backup(&server, tmp.path(), "old");
    server.kmsctl_json(&["retire", "c", "1", "--skip-census", "--grace", "1s"]);
    server
        .wait_cluster("c", "v1 retired", |c| {
            version_states(c).contains(&(1, "retired".into()))
        })
        .await;

    restore_in_place(&mut server, &saved, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // On every sample, no node holds v1's key again.
        for p in all {
            let local = version_states(&local_status(p));
            assert!(
                local.contains(&(1, "retired".into())),
                "v1 came back on {}: {local:?}",
                p.dir.display()
            );
        }
        let c = server.cluster("c");
        if c["reconciling"].is_null() && version_states(&c).contains(&(1, "retired".into())) {
            break;
        }
        assert!(Instant::now() < deadline, "not reconciled: {c:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(events(&server).contains(&"learned-destroyed".to_owned()));
    // Retiring it again is refused: it is gone.
    let out = server.kmsctl(&["retire", "c", "1"]);
    assert!(!out.status.success());
}

/// A restore from an old backup while two of three nodes are offline:
/// nothing moves until each is back; at the end every ciphertext written
/// at any point decrypts on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_coming_back_one_by_one_heal_the_restored_service() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        nodes.push(enrol(&server, tmp.path(), "c", n).await);
    }
    let mut written = Vec::new();
    write(&nodes[0], "v1 era", &mut written).await;
    let saved = backup(&server, tmp.path(), "old");
    assert_eq!(rotate_settled(&server, "c"), 2);
    write(&nodes[1], "v2 era", &mut written).await;
    assert_eq!(rotate_settled(&server, "c"), 3);
    write(&nodes[2], "v3 era", &mut written).await;

    nodes[1].stop();
    nodes[2].stop();
    restore_in_place(&mut server, &saved, &[]).await;
    let c = server
        .wait_cluster("c", "n1 reported, waiting for n2 and n3", |c| {
            c["reconciling"]["waiting_for"] == serde_json::json!(["n2", "n3"])
        })
        .await;
    assert!(
        c["reconciling"]["reason"]
            .as_str()
            .unwrap()
            .contains("restored"),
        "{c:#}"
    );
    // Nothing changes while it reconciles, and the operator is told why.
    let out = server.kmsctl(&["rotate", "c"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("reconciling"), "{}", text(&out));
    let plain = text(&server.kmsctl(&["status", "c"]));
    assert!(plain.contains("RECONCILING since"), "{plain}");
    assert!(plain.contains("waiting for: n2, n3"), "{plain}");
    assert!(
        plain.contains("kmsctl reconcile c --without n2,n3"),
        "{plain}"
    );
    // n1 keeps serving its own keys, writing under v3.
    write(&nodes[0], "written while reconciling", &mut written).await;
    assert!(written.last().unwrap().1.starts_with("c/v3/"));
    // kill -9 of the service mid-reconciliation: it comes back reconciling,
    // with what it healed (v2, v3 from n1) and still waiting for n2, n3.
    server.kill();
    server.respawn();
    server.wait_up().await;
    let c = server
        .wait_cluster("c", "n1 reported again after the restart", |c| {
            c["reconciling"]["waiting_for"] == serde_json::json!(["n2", "n3"])
        })
        .await;
    let known: Vec<u64> = version_key_ids(&c).iter().map(|v| v.0).collect();
    assert_eq!(known, [1, 2, 3], "{c:#}");

    start_again(&mut nodes[1]).await;
    server
        .wait_cluster("c", "waiting only for n3", |c| {
            c["reconciling"]["waiting_for"] == serde_json::json!(["n3"])
        })
        .await;
    start_again(&mut nodes[2]).await;
    server
        .wait_cluster("c", "reconciled with v3 primary", |c| {
            c["reconciling"].is_null() && c["primary"] == 3
        })
        .await;
    let all: Vec<&Plugin> = nodes.iter().collect();
    watch_primaries(&all, 3, |v| v.iter().all(|v| *v == 3)).await;
    all_decrypt_everywhere(&all, &written).await;
}

/// A reconciliation ended without a node (the operator names it) lets the
/// restored service mint a version number that node holds under another
/// key: when it comes back, that is a clash: shown, audited, exported,
/// never counted as the node holding the version; the node refuses the
/// service's key and keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clash_is_shown_and_never_counted_as_held() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(tmp.path()).await;
    let n1 = enrol(&server, tmp.path(), "c", "n1").await;
    let mut n2 = enrol(&server, tmp.path(), "c", "n2").await;
    let saved = backup(&server, tmp.path(), "old");
    // v2 reaches n2 only: n1 is away, so it stays pending.
    let mut n1 = n1;
    n1.stop();
    let r = server.kmsctl_json(&["rotate", "c"]);
    assert_eq!(r["version"], 2);
    let old_v2 = r["key_id"].as_str().unwrap().to_owned();
    server
        .wait_cluster("c", "n2 holds v2", |c| {
            c["nodes"][1]["held"] == serde_json::json!([1, 2])
        })
        .await;

    n2.stop();
    restore_in_place(&mut server, &saved, &[]).await;
    start_again(&mut n1).await;
    server
        .wait_cluster("c", "waiting for n2", |c| {
            c["reconciling"]["waiting_for"] == serde_json::json!(["n2"])
        })
        .await;
    // Naming the wrong nodes is refused; naming n2 ends it.
    assert!(!server
        .kmsctl(&["reconcile", "c", "--without", "n1"])
        .status
        .success());
    server.kmsctl_json(&["reconcile", "c", "--without", "n2"]);
    let r = server.kmsctl_json(&["rotate", "c"]);
    assert_eq!(r["version"], 2);
    let new_v2 = r["key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_v2, old_v2);

    start_again(&mut n2).await;
    let c = server
        .wait_cluster("c", "the clash", |c| {
            !c["clashes"].as_array().unwrap().is_empty()
        })
        .await;
    assert_eq!(
        c["clashes"][0],
        serde_json::json!({
            "node": "n2", "version": 2,
            "service_key_id": new_v2, "node_key_id": old_v2,
        })
    );
    let v2 = &c["versions"].as_array().unwrap()[1];
    assert_eq!(v2["held_by"], 1, "n2 counted as holding v2: {c:#}");
    assert!(!c["nodes"][1]["held"]
        .as_array()
        .unwrap()
        .contains(&2.into()));
    let plain = text(&server.kmsctl(&["status", "c"]));
    assert!(
        plain.contains(&format!(
            "node n2 holds v2 as {old_v2}; the service knows {new_v2}"
        )),
        "{plain}"
    );
    let scrape = server.scrape().await;
    let clashes = scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgekms_server_key_clashes")
        .unwrap();
    assert_eq!(clashes.value, prometheus_parse::Value::Gauge(1.0));
    assert!(events(&server).contains(&"clash".to_owned()));
    // n2 kept its own v2 and refuses the service's.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !n2.log_text().contains(&old_v2) {
        assert!(Instant::now() < deadline, "n2 log:\n{}", n2.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let local = local_status(&n2);
    let held_v2 = local["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 2)
        .unwrap()["key_id"]
        .clone();
    assert_eq!(held_v2, old_v2.as_str());
}
