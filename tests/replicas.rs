//! The central service replicated on etcd, end to end: a real three-member
//! etcd cluster, two or three real `edgekms-server` replicas on loopback,
//! real plugins, `kmsctl` as the operator; each failure done for real
//! (kill -9 of a replica, of the etcd leader, two etcd members stopped).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use edgekms_e2e::fleet::{text, version_states};
use edgekms_e2e::replicas::{refs, store_args, Replicated};
use edgekms_e2e::{decrypt, encrypt, http_get, key_id, sample, Plugin};
use serde_json::Value;

/// Polls `f` until it returns `Some` (30 s at most), then returns it.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kmsctl -o json ARGS` through replica `i`, `None` while it fails (a
/// replica down, etcd electing).
fn try_json(r: &Replicated, i: usize, args: &[&str]) -> Option<Value> {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = r.kmsctl(i, &all);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn cluster_of(status: &Value) -> Value {
    status["clusters"][0].clone()
}

/// Waits until replica `i` shows `cluster` with `version` primary and no
/// pending version; returns the cluster status.
async fn promoted(r: &Replicated, i: usize, cluster: &str, version: u64) -> Value {
    eventually(&format!("v{version} promoted, seen by replica {i}"), || {
        let c = cluster_of(&try_json(r, i, &["status", cluster])?);
        (c["primary"] == version && c["pending"] == 0).then_some(c)
    })
    .await
}

async fn serving(p: &Plugin, want_prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = key_id(&mut p.kms().await).await;
        if got.starts_with(want_prefix) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "plugin still serves {got}, not {want_prefix}…\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A round trip through the plugin's KMS socket.
async fn round_trip(p: &Plugin) {
    let mut kms = p.kms().await;
    let (ct, id) = encrypt(&mut kms, b"still serving").await;
    assert_eq!(decrypt(&mut kms, &ct, &id).await.unwrap(), b"still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_started_on_one_replica_reaches_a_node_on_another() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    // The node knows only replica 2.
    let node = r.enrol("a", "n1", &r.replicas[1].url()).await;
    let rot = r.kmsctl_json(0, &["rotate", "a"]);
    assert_eq!(rot["version"], 2);
    let c0 = promoted(&r, 0, "a", 2).await;
    serving(&node, "a/v2/").await;
    let c1 = promoted(&r, 1, "a", 2).await;
    assert_eq!(version_states(&c0), version_states(&c1));
    // Both replicas see the node as connected (to replica 2) and on v2.
    for i in 0..2 {
        eventually(&format!("replica {i} to see n1 on v2"), || {
            let c = cluster_of(&try_json(&r, i, &["status", "a"])?);
            let n = c["nodes"][0].clone();
            (n["connected"] == true && n["primary"] == 2 && n["behind"] == false).then_some(())
        })
        .await;
    }
    assert_eq!(
        version_states(&c0),
        [(1, "decrypt-only".into()), (2, "primary".into())]
    );
    // Every replica lists both, alive, one of them elected.
    for i in 0..2 {
        let s = r.kmsctl_json(i, &["status"]);
        assert_eq!(s["store"], "etcd");
        assert_eq!(s["answered_by"], format!("r{}", i + 1));
        let reps = s["replicas"].as_array().unwrap().clone();
        let names: Vec<&str> = reps.iter().map(|x| x["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["r1", "r2"]);
        assert!(reps.iter().all(|x| x["state"] == "active"));
        let alive = eventually("heartbeats", || {
            let s = try_json(&r, i, &["replica", "list"])?;
            let reps = s["replicas"].as_array()?.clone();
            let ok = reps.iter().all(|x| x["heartbeat_unix"].as_u64() > Some(0))
                && reps.iter().filter(|x| x["leader"] == true).count() == 1
                && reps
                    .iter()
                    .all(|x| !x["etcd_member"].as_str().unwrap().is_empty());
            ok.then_some(reps)
        })
        .await;
        assert_eq!(alive.len(), 2);
    }
    round_trip(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_replica_a_node_uses_mid_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut r) = Replicated::start(tmp.path(), 3).await else {
        return;
    };
    // The node tries replica 2 first, then 3, then 1.
    let node = r.enrol("a", "n1", &r.urls_from(1)).await;
    let mut stopped = r.enrol("a", "n2", &r.urls_from(1)).await;
    stopped.stop();
    // v2 waits for n2; n1 holds it through replica 2.
    let rot = r.kmsctl_json(0, &["rotate", "a"]);
    assert_eq!(rot["version"], 2);
    eventually("n1 holds v2", || {
        let c = cluster_of(&try_json(&r, 0, &["status", "a"])?);
        let n1 = c["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "n1")?
            .clone();
        (n1["held"] == serde_json::json!([1, 2])).then_some(())
    })
    .await;
    r.replicas[1].kill();
    // n2 comes back on replica 3 (replica 2 is dead): v2 is promoted.
    stopped = Plugin::spawn(&stopped.dir.clone(), stopped.args.clone());
    stopped.wait_healthy().await;
    let c = promoted(&r, 2, "a", 2).await;
    assert_eq!(
        version_states(&c),
        [(1, "decrypt-only".into()), (2, "primary".into())],
        "no version lost, skipped or duplicated"
    );
    serving(&node, "a/v2/").await;
    serving(&stopped, "a/v2/").await;
    assert!(
        node.log_text().contains(&r.replicas[2].url())
            || node.log_text().contains(&r.replicas[0].url()),
        "n1 moved to another replica:\n{}",
        node.log_text()
    );
    // One rotation record for v2 in the shared audit log.
    let audit = r.kmsctl_json(2, &["audit"]);
    let rotations = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["event"] == "rotation" && x["version"] == 2)
        .count();
    assert_eq!(rotations, 1);
    round_trip(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_etcd_leader_during_a_rotation_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    let node = r.enrol("a", "n1", &r.urls_from(0)).await;
    // The leader dies while the rotation is being acked and promoted.
    let rot = r.kmsctl_json(0, &["rotate", "a"]);
    assert_eq!(rot["version"], 2);
    let leader = r.etcd.leader().unwrap();
    r.etcd.kill(leader);
    let c = promoted(&r, 1, "a", 2).await;
    assert_eq!(
        version_states(&c),
        [(1, "decrypt-only".into()), (2, "primary".into())]
    );
    serving(&node, "a/v2/").await;
    // A rotation asked of each replica while etcd elects: every one it
    // acknowledged is there, numbered without a gap, none twice.
    let mut acked = Vec::new();
    for i in [0, 1, 0] {
        let rot = eventually("a rotation accepted", || try_json(&r, i, &["rotate", "a"])).await;
        acked.push((rot["version"].as_u64().unwrap(), rot["key_id"].clone()));
        let v = rot["version"].as_u64().unwrap();
        promoted(&r, 1 - i, "a", v).await;
    }
    let c = r.cluster(1, "a");
    let versions = c["versions"].as_array().unwrap();
    let numbers: Vec<u64> = versions
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    let top = *numbers.last().unwrap();
    assert_eq!(
        numbers,
        (1..=top).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    for (v, key_id) in &acked {
        let kept = versions.iter().find(|x| x["version"] == *v).unwrap();
        assert_eq!(
            &kept["key_id"], key_id,
            "acknowledged v{v} kept as acknowledged"
        );
    }
    let ids: std::collections::BTreeSet<&str> = versions
        .iter()
        .map(|v| v["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), versions.len(), "no key_id reused");
    serving(&node, &format!("a/v{top}/")).await;
    r.etcd.start_again(leader);
    round_trip(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_quorum_writes_are_refused_readiness_fails_and_plugins_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    let node = r.enrol("a", "n1", &r.urls_from(0)).await;
    r.etcd.stop(1);
    r.etcd.stop(2);
    // Writes: refused, with a clear reason: either nothing was changed, or
    // (the one member left took the write before it noticed it had no
    // quorum) it may still land once quorum returns.
    let out = r.kmsctl(0, &["rotate", "a"]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        (err.contains("state store is unavailable") || err.contains("did not confirm"))
            && err.contains("nodes keep serving"),
        "{err}"
    );
    let maybe_landed = err.contains("did not confirm");
    // Readiness: 503, saying why.
    for s in &r.replicas {
        let (code, body) = eventually("readyz 503", || {
            let (code, body) = blocking_get(s.ops, "/readyz");
            (code == 503).then_some((code, body))
        })
        .await;
        assert_eq!(code, 503);
        assert!(body.contains("etcd"), "{body}");
    }
    for s in &r.replicas {
        let up = sample(&s.scrape().await, "edgekms_server_store_up", &[]);
        assert_eq!(up, Some(0.0), "the metric says the store is down");
    }
    // The plugin serves from its cache.
    round_trip(&node).await;
    // Members back: the service resumes by itself.
    r.etcd.start_again(1);
    r.etcd.start_again(2);
    for s in &r.replicas {
        s.wait_ready().await;
        let up = sample(&s.scrape().await, "edgekms_server_store_up", &[]);
        assert_eq!(up, Some(1.0));
    }
    let rot = eventually("a rotation accepted", || try_json(&r, 0, &["rotate", "a"])).await;
    let v = rot["version"].as_u64().unwrap();
    if maybe_landed {
        assert!(v == 2 || v == 3, "{rot}");
    } else {
        assert_eq!(v, 2, "a refused write changed nothing");
    }
    let c = promoted(&r, 1, "a", v).await;
    assert_eq!(c["versions"].as_array().unwrap().len() as u64, v);
    serving(&node, &format!("a/v{v}/")).await;
}

fn blocking_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(http_get(addr, path))).unwrap_or_else(|e| (0, e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_rotations_through_two_replicas_make_one_version() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    // A node that stays away keeps the new version pending.
    let mut away = r.enrol("a", "n1", &r.urls_from(0)).await;
    away.stop();
    for round in 0..3 {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| r.kmsctl(0, &["-o", "json", "rotate", "a"]));
            let b = s.spawn(|| r.kmsctl(1, &["-o", "json", "rotate", "a"]));
            (a.join().unwrap(), b.join().unwrap())
        });
        for out in [&a, &b] {
            assert!(out.status.success(), "round {round}: {}", text(out));
        }
        let va: Value = serde_json::from_slice(&a.stdout).unwrap();
        let vb: Value = serde_json::from_slice(&b.stdout).unwrap();
        assert_eq!(va["version"], 2, "{va}");
        assert_eq!(va["version"], vb["version"]);
        assert_eq!(va["key_id"], vb["key_id"]);
    }
    let c = r.cluster(0, "a");
    assert_eq!(
        version_states(&c),
        [(1, "primary".into()), (2, "pending".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joins_with_a_token_and_a_removed_one_can_no_longer_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    let node = r.enrol("a", "n1", &r.urls_from(0)).await;
    // A bad token, then a good one used twice.
    let inv = r.kmsctl_json(0, &["replica", "add", "r3"]);
    let bad = std::process::Command::new(edgekms_e2e::bin("edgekms-server"))
        .args(["join", "--sealer", "soft", "--server"])
        .arg(r.replicas[0].url())
        .args(["--token", "r3.0000", "--ca-hash"])
        .arg(inv["ca_hash"].as_str().unwrap())
        .arg("--data-dir")
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(text(&bad).contains("token is not valid"), "{}", text(&bad));
    let i = r.add("r3").await;
    let rot = r.kmsctl_json(i, &["rotate", "a"]);
    assert_eq!(rot["version"], 2);
    promoted(&r, 0, "a", 2).await;
    serving(&node, "a/v2/").await;

    // Removed: it stops at once, erases its sealed root key, and cannot
    // start again; the others carry on.
    let sealed = r.replicas[i].data_dir.join("replica").join("root");
    assert!(sealed.exists(), "the sealed root key is in {sealed:?}");
    let out = r.kmsctl(0, &["replica", "remove", "r3"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = r.replicas[i].exited_within(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a removed replica must stop:\n{}",
        r.replicas[i].log_text()
    );
    assert!(r.replicas[i].log_text().contains("removed"));
    let root = r.replicas[i].data_dir.join("replica");
    assert!(
        !std::fs::read_dir(&root).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("root")),
        "its sealed root key is erased"
    );
    r.replicas[i].respawn();
    let status = r.replicas[i].exited_within(Duration::from_secs(15));
    assert!(status.is_some_and(|s| !s.success()));
    let s = r.kmsctl_json(0, &["replica", "list"]);
    let r3 = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "r3")
        .unwrap()
        .clone();
    assert_eq!(r3["state"], "removed");
    // The last active replicas cannot all go.
    assert!(r.kmsctl(0, &["replica", "remove", "r2"]).status.success());
    let out = r.kmsctl(0, &["replica", "remove", "r1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("last active replica"), "{}", text(&out));
    let rot = r.kmsctl_json(0, &["rotate", "a"]);
    assert_eq!(rot["version"], 3);
    serving(&node, "a/v3/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_a_rocksdb_service_and_nodes_carry_on() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(etcd) = edgekms_testkit::etcd_cluster::EtcdCluster::fresh(3) else {
        return;
    };
    let mut server = edgekms_e2e::fleet::Server::start(tmp.path()).await;
    let node = edgekms_e2e::fleet::enrol(&server, tmp.path(), "a", "n1").await;
    server.kmsctl_json(&["rotate", "a"]);
    server
        .wait_cluster("a", "v2 promoted", |c| c["primary"] == 2)
        .await;
    let (ct, id) = encrypt(&mut node.kms().await, b"kept").await;
    let _ = server.stop().await;

    let replica = tmp.path().join("replica");
    let out = std::process::Command::new(edgekms_e2e::bin("edgekms-server"))
        .args([
            "migrate-store",
            "--sealer",
            "soft",
            "--name",
            "r1",
            "--etcd-insecure",
        ])
        .arg(format!("--from=rocksdb:{}", server.data_dir.display()))
        .arg(format!("--to=etcd:{}", etcd.endpoints().join(",")))
        .arg("--data-dir")
        .arg(&replica)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 clusters, 2 key versions"),
        "{}",
        text(&out)
    );
    // A second migration into the same prefix is refused.
    let again = std::process::Command::new(edgekms_e2e::bin("edgekms-server"))
        .args(["migrate-store", "--sealer", "soft", "--etcd-insecure"])
        .arg(format!("--from=rocksdb:{}", server.data_dir.display()))
        .arg(format!("--to=etcd:{}", etcd.endpoints().join(",")))
        .arg("--data-dir")
        .arg(tmp.path().join("again"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        text(&again).contains("already initialized"),
        "{}",
        text(&again)
    );

    // The replica serves on the old address: the node, never re-enrolled,
    // carries on (a new rotation reaches it).
    let mut served = edgekms_e2e::fleet::Server::spawn(&replica, &refs(&store_args(&etcd)));
    served.kill();
    served.listen = server.listen;
    served.respawn();
    served.wait_ready().await;
    let ops = server.operator_dir();
    let status = served.kmsctl_json_as(&ops, &["status", "a"]);
    assert_eq!(status["clusters"][0]["primary"], 2);
    let rot = served.kmsctl_json_as(&ops, &["rotate", "a"]);
    assert_eq!(rot["version"], 3);
    serving(&node, "a/v3/").await;
    let mut kms = node.kms().await;
    assert_eq!(decrypt(&mut kms, &ct, &id).await.unwrap(), b"kept");
    let audit = served.kmsctl_json_as(&ops, &["audit"]);
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["event"] == "enrol" && x["node"] == "n1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_a_replica_restores_into_an_empty_etcd_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    let node = r.enrol("a", "n1", &r.urls_from(0)).await;
    r.kmsctl_json(1, &["rotate", "a"]);
    promoted(&r, 0, "a", 2).await;
    serving(&node, "a/v2/").await;
    // One consistent cut, through the second replica.
    let key_file = tmp.path().join("backup.key");
    std::fs::write(&key_file, format!("{}\n", "42".repeat(32))).unwrap();
    let file = tmp.path().join("edgekms.bak");
    let b = r.kmsctl_json(
        1,
        &[
            "backup",
            file.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
        ],
    );
    assert_eq!(b["clusters"], 1);
    assert_eq!(b["key_versions"], 2);
    assert!(b["audit_records"].as_u64().unwrap() > 0);

    let restored = tmp.path().join("restored");
    let out = std::process::Command::new(edgekms_e2e::bin("edgekms-server"))
        .args(["restore", file.to_str().unwrap(), "--key-file"])
        .arg(&key_file)
        .args(["--sealer", "soft", "--store", "etcd", "--name", "q1"])
        .args(["--etcd-prefix", "/restored/", "--etcd-insecure"])
        .arg(format!("--etcd-endpoints={}", r.etcd.endpoints().join(",")))
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !tmp.path().join("restored.restore-staging").exists(),
        "the staging dir is removed"
    );
    let mut args = store_args(&r.etcd);
    args.extend(["--etcd-prefix".into(), "/restored/".into()]);
    let q1 = edgekms_e2e::fleet::Server::spawn(&restored, &refs(&args));
    q1.wait_ready().await;
    let c = q1.kmsctl_json_as(&r.operator_dir(), &["status", "a"])["clusters"][0].clone();
    assert_eq!(c["primary"], 2);
    assert!(c["reconciling"].is_object(), "{c}");
    assert_eq!(version_states(&c).len(), 2);
    // The original service is untouched.
    assert!(r.cluster(0, "a")["reconciling"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joined_with_one_url_is_given_the_replicas_by_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut r) = Replicated::start(tmp.path(), 2).await else {
        return;
    };
    let mut node = r.enrol("a", "n1", &r.replicas[0].url()).await;
    // Restarted with both replicas, then the one it joined through dies.
    node.stop();
    let mut args = node.args.clone();
    args.extend(["--servers".into(), r.urls_from(0)]);
    let node = Plugin::spawn(&node.dir.clone(), args);
    node.wait_healthy().await;
    r.replicas[0].kill();
    let rot = eventually("a rotation through replica 2", || {
        try_json(&r, 1, &["rotate", "a"])
    })
    .await;
    assert_eq!(rot["version"], 2);
    promoted(&r, 1, "a", 2).await;
    serving(&node, "a/v2/").await;
}

/// The replica running the once-only jobs dies: another takes the lease
/// over within its TTL (10 s) and a tick, and exactly one leads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leading_replica_dies_another_takes_the_jobs_over_within_the_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut r) = Replicated::start(tmp.path(), 3).await else {
        return;
    };
    let leaders = |r: &Replicated, i: usize| -> Option<Vec<String>> {
        let s = try_json(r, i, &["replica", "list"])?;
        Some(
            s["replicas"]
                .as_array()?
                .iter()
                .filter(|x| x["leader"] == true)
                .map(|x| x["name"].as_str().unwrap().to_owned())
                .collect(),
        )
    };
    let first = eventually("one leader", || {
        let l = leaders(&r, 0)?;
        (l.len() == 1).then(|| l[0].clone())
    })
    .await;
    let i: usize = first.trim_start_matches('r').parse::<usize>().unwrap() - 1;
    for (k, s) in r.replicas.iter().enumerate() {
        let lead = sample(&s.scrape().await, "edgekms_server_leader", &[]);
        assert_eq!(lead, Some(if k == i { 1.0 } else { 0.0 }), "replica {k}");
    }
    let killed = Instant::now();
    r.replicas[i].kill();
    let other = (i + 1) % 3;
    let next = eventually("a new leader", || {
        let l = leaders(&r, other)?;
        (l.len() == 1 && l[0] != first).then(|| l[0].clone())
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "{next} took the lease over after {took:?}"
    );
}
