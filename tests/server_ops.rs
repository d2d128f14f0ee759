//! The central key service's operations, on real processes over loopback:
//! `kmsctl backup` and `edgekms-server restore` onto a new data dir (same
//! clusters, versions, key_ids and CA; the same keys delivered to nodes;
//! wrong keys, truncated and altered files refused), and the server's
//! `/metrics`, `/healthz` and `/readyz`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgekms_core::delivery::{Binding, DeliveryKey};
use edgekms_daemon::{pki, tls};
use edgekms_e2e::fleet::Server;
use edgekms_e2e::{bin, free_port, http_get, mode, sample, tcp_listen_ports};
use edgekms_hsm::Key256;
use edgekms_proto::fleet as pb;
use edgekms_proto::fleet::fleet_client::FleetClient;
use serde_json::Value;

// ---- helpers: a minimal node ----

/// Runs `edgekms-server` with `args` to completion (init, restore).
fn server_cmd(args: &[&str]) -> Output {
    Command::new(bin("edgekms-server"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// What must survive a restore: per cluster, its versions (state, key_id,
/// times) and its nodes (state, versions held).
fn durable(status: &Value) -> Value {
    let clusters = status["clusters"].as_array().unwrap();
    Value::Array(
        clusters
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c["name"], "seq": c["seq"], "primary": c["primary"],
                    "pending": c["pending"], "versions": c["versions"],
                    "nodes": c["nodes"].as_array().unwrap().iter().map(|n| serde_json::json!({
                        "name": n["name"], "state": n["state"], "held": n["held"],
                        "token_expires_unix": n["token_expires_unix"],
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// A node as the plugin will be, reduced to what these tests need: join
/// with a token, then open one sync stream and unwrap what it delivers.
struct TestNode {
    cluster: String,
    node: String,
    key: pki::PrivateKey,
    cert: Vec<u8>,
    ca: Vec<u8>,
    delivery: DeliveryKey,
}

impl TestNode {
    async fn join(url: &str, token: &str, ca_hash: &str, cluster: &str, node: &str) -> Self {
        let (key, csr) = pki::node_key_and_csr().unwrap();
        let delivery = DeliveryKey::generate();
        let cfg =
            tls::client_config(tls::Trust::Pin(pki::parse_pin(ca_hash).unwrap()), None).unwrap();
        let mut client = FleetClient::new(tls::connect(url, cfg).await.unwrap());
        let r = client
            .join(pb::JoinRequest {
                token: token.into(),
                cluster: cluster.into(),
                node: node.into(),
                csr_der: csr.into(),
                delivery_public_key: delivery.public_key().into(),
            })
            .await
            .unwrap()
            .into_inner();
        Self {
            cluster: cluster.into(),
            node: node.into(),
            key,
            cert: r.certificate_der.to_vec(),
            ca: r.ca_der.to_vec(),
            delivery,
        }
    }

    /// Opens a sync stream and sends `first` on it.
    async fn open_stream(
        &self,
        url: &str,
        first: pb::NodeReport,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<pb::NodeReport>,
            tonic::Streaming<pb::ClusterState>,
        ),
        tonic::Status,
    > {
        let cfg =
            tls::client_config(tls::Trust::Ca(&self.ca), Some((&self.cert, &self.key))).unwrap();
        let mut client = FleetClient::new(tls::connect(url, cfg).await.unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(first).await.unwrap();
        let stream = client
            .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, stream))
    }

    /// Opens a sync stream, reports `held`, and returns the first
    /// non-heartbeat message (or the stream's error).
    async fn sync(&self, url: &str, held: &[u32]) -> Result<pb::ClusterState, tonic::Status> {
        let first = pb::NodeReport {
            held: held.to_vec(),
            ..Default::default()
        };
        let (tx, mut stream) = self.open_stream(url, first).await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("no message from the server in 10 s")?
                .expect("the server ended the stream");
            if !msg.heartbeat {
                drop(tx);
                return Ok(msg);
            }
        }
    }

    /// The keys a state delivers, by version: (key_id, key).
    fn open(&self, state: &pb::ClusterState) -> BTreeMap<u32, (String, Key256)> {
        state
            .versions
            .iter()
            .filter(|v| !v.wrapped_key.is_empty())
            .map(|v| {
                let binding = Binding {
                    cluster: &self.cluster,
                    node: &self.node,
                    version: v.version,
                    key_id: &v.key_id,
                };
                let key = self.delivery.unwrap(binding, &v.wrapped_key).unwrap();
                (v.version, (v.key_id.clone(), key))
            })
            .collect()
    }
}

fn write_key(path: &Path, byte: u8) {
    std::fs::write(path, format!("{}\n", hex(&[byte; 32]))).unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn restore(file: &Path, key_file: &Path, data_dir: &Path) -> Output {
    server_cmd(&[
        "restore",
        file.to_str().unwrap(),
        "--key-file",
        key_file.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--sealer",
        "soft",
    ])
}

/// A refused restore: non-zero exit, `needle` in the one error line, and
/// no data dir created.
fn assert_refused(out: &Output, needle: &str, data_dir: &Path) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "restore succeeded: {}",
        text(&out.stdout)
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!data_dir.exists(), "{} was created", data_dir.display());
}

// ---- tests ----

#[tokio::test]
async fn backup_and_restore_keep_clusters_versions_key_ids_and_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let old_dir = tmp.path().join("old");
    let operator = old_dir.join("operator");
    Server::init(&old_dir);
    let mut old = Server::serve(&old_dir).await;

    // Two clusters; three invitations issued before the backup.
    let add =
        |cluster: &str, node: &str| old.kmsctl_json_as(&operator, &["node", "add", cluster, node]);
    let cp1 = add("edge-1", "cp-1");
    assert_eq!(cp1["cluster_created"], true);
    add("edge-1", "cp-2");
    add("edge-2", "cp-1");
    // No node joined yet: the rotation promotes at once.
    let rotated = old.kmsctl_json_as(&operator, &["rotate", "edge-1"]);
    assert_eq!(
        (rotated["version"].as_u64(), rotated["state"].as_str()),
        (Some(2), Some("primary"))
    );

    // cp-1 of edge-1 joins the old server and receives v1 and v2.
    let ca_hash = cp1["ca_hash"].as_str().unwrap();
    let node1 = TestNode::join(
        &old.url(),
        cp1["token"].as_str().unwrap(),
        ca_hash,
        "edge-1",
        "cp-1",
    )
    .await;
    let first = node1.sync(&old.url(), &[]).await.unwrap();
    let keys_old = node1.open(&first);
    assert_eq!(keys_old.keys().copied().collect::<Vec<_>>(), [1, 2]);
    // It reports holding them (a second stream), as a plugin would.
    node1.sync(&old.url(), &[1, 2]).await.unwrap();
    let before = old.kmsctl_json_as(&operator, &["status"]);
    let cp1_held = &before["clusters"][0]["nodes"][0];
    assert_eq!(
        (cp1_held["name"].as_str(), cp1_held["held"].clone()),
        (Some("cp-1"), serde_json::json!([1, 2]))
    );

    // Back up.
    let key_file = tmp.path().join("backup.key");
    write_key(&key_file, 0x42);
    let file = tmp.path().join("edgekms.bak");
    let b = old.kmsctl_json_as(
        &operator,
        &[
            "backup",
            file.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        (b["clusters"].as_u64(), b["key_versions"].as_u64()),
        (Some(2), Some(3)),
        "{b}"
    );
    assert!(b["audit_records"].as_u64().unwrap() > 0);
    assert_eq!(mode(&file), 0o600);
    let blob = std::fs::read(&file).unwrap();
    assert_eq!(&blob[..5], b"EKBK\x01");
    assert_eq!(blob.len() as u64, b["bytes"].as_u64().unwrap());
    // No key_id's fingerprint, node name or cluster name in the clear.
    let key_id = rotated["key_id"].as_str().unwrap();
    let fingerprint = key_id.rsplit('/').next().unwrap();
    for needle in [fingerprint, "edge-1", "cp-2"] {
        assert!(
            !blob.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} in the clear"
        );
    }
    // An existing file is never overwritten; a bad key file is refused.
    let again = old.kmsctl_as(
        &operator,
        &[
            "backup",
            file.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
        ],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("refusing to overwrite"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(&file).unwrap(), blob);
    let short_key = tmp.path().join("short.key");
    std::fs::write(&short_key, "abcd\n").unwrap();
    let other = tmp.path().join("other.bak");
    let bad = old.kmsctl_as(
        &operator,
        &[
            "backup",
            other.to_str().unwrap(),
            "--key-file",
            short_key.to_str().unwrap(),
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("64 hex digits"),
        "{}",
        text(&bad.stderr)
    );
    assert!(!other.exists());
    // The backup is audited on the server it was taken from.
    let audit = old.kmsctl_json_as(&operator, &["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["event"] == "backup" && r["actor"] == "operator admin"),
        "{audit:#}"
    );
    assert_eq!(old.stop().await, Some(0));

    // Restores that must be refused, each with a clear message and a
    // non-zero exit, creating nothing.
    let new_dir = tmp.path().join("new");
    let wrong_key = tmp.path().join("wrong.key");
    write_key(&wrong_key, 0x43);
    assert_refused(
        &restore(&file, &wrong_key, &new_dir),
        "backup does not open with this key",
        &new_dir,
    );
    let truncated = tmp.path().join("truncated.bak");
    std::fs::write(&truncated, &blob[..blob.len() - 100]).unwrap();
    assert_refused(
        &restore(&truncated, &key_file, &new_dir),
        "backup is truncated",
        &new_dir,
    );
    let altered = tmp.path().join("altered.bak");
    let mut flipped = blob.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&altered, &flipped).unwrap();
    assert_refused(
        &restore(&altered, &key_file, &new_dir),
        "backup is corrupt",
        &new_dir,
    );
    let not_backup = tmp.path().join("not.bak");
    std::fs::write(&not_backup, b"hello").unwrap();
    assert_refused(
        &restore(&not_backup, &key_file, &new_dir),
        "not an edgekms backup",
        &new_dir,
    );
    assert_refused(
        &restore(&file, &key_file, &old_dir),
        "refusing to overwrite",
        &tmp.path().join("absent"),
    );

    // The restore.
    let out = restore(&file, &key_file, &new_dir);
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("2 clusters, 3 key versions"), "{said}");
    assert!(
        said.contains("join tokens withdrawn: 2 (edge-1/cp-2, edge-2/cp-1)"),
        "{said}"
    );
    assert!(said.contains(ca_hash), "{said}");
    assert_eq!(
        std::fs::read(new_dir.join("ca.pem")).unwrap(),
        std::fs::read(old_dir.join("ca.pem")).unwrap()
    );
    // Not twice.
    let twice = restore(&file, &key_file, &new_dir);
    assert!(!twice.status.success());
    assert!(
        text(&twice.stderr).contains("refusing to overwrite"),
        "{}",
        text(&twice.stderr)
    );

    // The restored server: the same operator credentials work (same CA),
    // the same clusters, versions, states and key_ids.
    let new = Server::serve(&new_dir).await;
    let after = new.kmsctl_json_as(&operator, &["status"]);
    // The same, but for the join tokens unused at backup time (withdrawn)
    // and each cluster reconciling (one more seq) until its nodes report;
    // one without an active node has nobody to wait for (two more).
    let mut expected = durable(&before);
    for (c, now) in expected
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(after["clusters"].as_array().unwrap())
    {
        let active = c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["state"] == "active");
        if active {
            assert!(
                now["reconciling"]["reason"]
                    .as_str()
                    .unwrap()
                    .starts_with("restored from a backup"),
                "{now:#}"
            );
        } else {
            assert!(now["reconciling"].is_null(), "{now:#}");
        }
        let moved = if active { 1 } else { 2 };
        c["seq"] = (c["seq"].as_u64().unwrap() + moved).into();
        for n in c["nodes"].as_array_mut().unwrap() {
            if n["state"] == "invited" {
                n["token_expires_unix"] = 0.into();
            }
        }
    }
    assert_eq!(durable(&after), expected);
    let v2 = &after["clusters"][0]["versions"][1];
    assert_eq!(
        (
            v2["version"].as_u64(),
            v2["state"].as_str(),
            v2["key_id"].as_str()
        ),
        (Some(2), Some("primary"), Some(key_id))
    );

    // cp-1 keeps its certificate: the restored server accepts its stream.
    let state = node1.sync(&new.url(), &[1, 2]).await.unwrap();
    assert!(node1.open(&state).is_empty(), "it holds everything already");
    // cp-2's token from before the backup was withdrawn; with a new one
    // it joins, and receives the very keys cp-1 got from the old server.
    let cp2 = new.kmsctl_json_as(&operator, &["node", "add", "edge-1", "cp-2"]);
    let node2 = TestNode::join(
        &new.url(),
        cp2["token"].as_str().unwrap(),
        ca_hash,
        "edge-1",
        "cp-2",
    )
    .await;
    let keys_new = node2.open(&node2.sync(&new.url(), &[]).await.unwrap());
    assert_eq!(keys_new.len(), 2);
    for (version, (key_id, key)) in &keys_old {
        let (new_id, new_key) = &keys_new[version];
        assert_eq!(new_id, key_id);
        assert!(new_key == key, "v{version} differs after restore");
    }

    // Versions continue: the next rotation makes v3, a new key_id.
    let next = new.kmsctl_json_as(&operator, &["rotate", "edge-1"]);
    assert_eq!(next["version"].as_u64(), Some(3));
    assert!(next["key_id"].as_str().unwrap().starts_with("edge-1/v3/"));
    let audit = new.kmsctl_json_as(&operator, &["audit"]);
    let events: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["event"].as_str())
        .collect();
    assert!(
        events.contains(&"restore") && events.contains(&"enrol-invite"),
        "{events:?}"
    );
}

#[tokio::test]
async fn metrics_count_nodes_and_calls_and_readyz_follows_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let operator = dir.join("operator");
    Server::init(&dir);
    let mut s = Server::serve(&dir).await;
    assert_eq!(
        http_get(s.ops, "/healthz").await.unwrap(),
        (200, "ok".into())
    );
    assert_eq!(
        http_get(s.ops, "/readyz").await.unwrap(),
        (200, "ok".into())
    );

    let nodes = |scrape: &prometheus_parse::Scrape, state: &str| {
        sample(scrape, "edgekms_server_nodes", &[("state", state)])
    };
    let m = s.scrape().await;
    for state in ["invited", "active", "revoked", "connected"] {
        assert_eq!(nodes(&m, state), Some(0.0), "{state}");
    }
    assert_eq!(
        sample(&m, "edgekms_server_clusters_pending_rotation", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "edgekms_server_oldest_unacked_delivery_seconds", &[]),
        Some(0.0)
    );
    let calls = |scrape: &prometheus_parse::Scrape, method: &str, code: &str| {
        sample(
            scrape,
            "edgekms_server_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(calls(&m, "AddNode", "OK"), Some(0.0));

    let added = s.kmsctl_json_as(&operator, &["node", "add", "edge-1", "cp-1"]);
    s.kmsctl_json_as(&operator, &["node", "add", "edge-1", "cp-2"]);
    let m = s.scrape().await;
    assert_eq!(nodes(&m, "invited"), Some(2.0));
    assert_eq!(calls(&m, "AddNode", "OK"), Some(2.0));

    // A refused call counts under its code.
    let out = s.kmsctl_as(&operator, &["rotate", "no-such-cluster"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(calls(&s.scrape().await, "Rotate", "NotFound"), Some(1.0));

    // A joined node that has not acked a pending version: a rotation
    // waits, and the delivery's age shows.
    let node = TestNode::join(
        &s.url(),
        added["token"].as_str().unwrap(),
        added["ca_hash"].as_str().unwrap(),
        "edge-1",
        "cp-1",
    )
    .await;
    s.kmsctl_json_as(&operator, &["node", "remove", "edge-1", "cp-2"]);
    let m = s.scrape().await;
    assert_eq!(
        (
            nodes(&m, "invited"),
            nodes(&m, "active"),
            nodes(&m, "revoked")
        ),
        (Some(0.0), Some(1.0), Some(1.0))
    );
    assert_eq!(calls(&m, "Join", "OK"), Some(1.0));
    let r = s.kmsctl_json_as(&operator, &["rotate", "edge-1"]);
    assert_eq!(r["state"], "pending");
    let m = s.scrape().await;
    assert_eq!(
        sample(&m, "edgekms_server_clusters_pending_rotation", &[]),
        Some(1.0)
    );
    // The node acks v1 and v2 on its stream: the rotation completes.
    let state = node.sync(&s.url(), &[]).await.unwrap();
    assert_eq!(node.open(&state).len(), 2);
    node.sync(&s.url(), &[1, 2]).await.unwrap();
    let m = s.scrape().await;
    assert_eq!(
        sample(&m, "edgekms_server_clusters_pending_rotation", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "edgekms_server_oldest_unacked_delivery_seconds", &[]),
        Some(0.0)
    );
    assert!(calls(&m, "Sync", "OK").unwrap() >= 2.0);
    assert_eq!(s.stop().await, Some(0));

    // --no-metrics binds only the gRPC port.
    let quiet = Server::spawn(&dir, &["--no-metrics"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !tcp_listen_ports(quiet.pid()).contains(&quiet.listen.port()) {
        assert!(Instant::now() < deadline, "{}", quiet.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(tcp_listen_ports(quiet.pid()), [quiet.listen.port()]);
    drop(quiet);

    // The config file's metrics_addr works like the flag.
    let port = free_port();
    let config = tmp.path().join("server.toml");
    std::fs::write(
        &config,
        format!("metrics_addr = \"127.0.0.1:{port}\"\nno_metrics = false\n"),
    )
    .unwrap();
    let from_file = Server::spawn(&dir, &["--config", config.to_str().unwrap()]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(addr, "/readyz").await != Ok((200, "ok".into())) {
        assert!(Instant::now() < deadline, "{}", from_file.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(from_file);

    // A taken metrics port stops the start, naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut busy = Server::spawn(&dir, &["--metrics-addr", &addr]);
    assert_eq!(
        busy.exited_within(Duration::from_secs(15))
            .and_then(|status| status.code()),
        Some(1)
    );
    let log = busy.log_text();
    assert!(log.contains(&addr) && log.contains("--no-metrics"), "{log}");
}

/// A node that lies while its cluster reconciles: it reports a version the
/// service never made, then returns a key for it that does not match its
/// key_id, a key for a version nobody asked for, and a blob that opens to
/// nothing. Each is refused with InvalidArgument and audited; the cluster
/// keeps waiting, and no version appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_returning_forged_keys_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let add = server.kmsctl_json(&["node", "add", "c", "n1"]);
    let node = TestNode::join(
        &server.url(),
        add["token"].as_str().unwrap(),
        add["ca_hash"].as_str().unwrap(),
        "c",
        "n1",
    )
    .await;
    let state = node.sync(&server.url(), &[]).await.unwrap();
    let (v1_id, _) = node.open(&state).remove(&1).unwrap();

    // v5 under a key only this node knows: the service starts reconciling
    // and asks for it.
    let k5 = Key256::generate();
    let v5_id = edgekms_core::keyid::derive("c", 5, &k5);
    let held = |version: u32, key_id: &str, state: pb::VersionState| pb::HeldVersion {
        version,
        key_id: key_id.into(),
        state: state as i32,
    };
    let report = pb::NodeReport {
        held: vec![1, 5],
        primary: 5,
        versions: vec![
            held(1, &v1_id, pb::VersionState::DecryptOnly),
            held(5, &v5_id, pb::VersionState::Primary),
        ],
        ..Default::default()
    };
    let service_key = {
        let (_tx, mut stream) = node
            .open_stream(&server.url(), report.clone())
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if msg.reconciling && !msg.wanted.is_empty() {
                assert_eq!(msg.wanted[0].key_id, v5_id);
                break msg.service_delivery_key.to_vec();
            }
        }
    };
    let wrap = |version, key_id: &str, key: &Key256| {
        let binding = Binding {
            cluster: "c",
            node: "n1",
            version,
            key_id,
        };
        edgekms_core::delivery::return_key(&service_key, binding, key).unwrap()
    };
    let v6_key = Key256::generate();
    let v6_id = edgekms_core::keyid::derive("c", 6, &v6_key);
    let forged = [
        (
            "another key",
            5,
            v5_id.clone(),
            wrap(5, &v5_id, &Key256::generate()),
        ),
        ("not asked for", 6, v6_id.clone(), wrap(6, &v6_id, &v6_key)),
        ("garbage", 5, v5_id.clone(), vec![1; 114]),
    ];
    for (what, version, key_id, wrapped_key) in forged {
        let mut lie = report.clone();
        lie.returned = vec![pb::ReturnedKey {
            version,
            key_id,
            wrapped_key: wrapped_key.into(),
        }];
        let (_tx, mut stream) = node.open_stream(&server.url(), lie).await.unwrap();
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap()
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{what}: the stream ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        let c = server.cluster("c");
        assert!(!c["reconciling"].is_null(), "{what}: {c:#}");
        let versions: Vec<u64> = c["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1], "{what}");
    }
    let refused = server
        .audit()
        .iter()
        .filter(|r| r["event"] == "heal" && r["result"] != "ok")
        .count();
    assert_eq!(refused, 3);
}
