//! `kmsctl migrate` end to end, all real processes: a soft-sealed
//! edgekms-plugin, etcd, the testbin's unmodified kube-apiserver encrypting
//! Secrets and ConfigMaps through the plugin (KMS v2), and the kmsctl
//! binary. What is stored under which key_id is read from etcd itself (the
//! `k8s:enc:kms:v2:edgekms:` prefix, then the EncryptedObject's key_id), not
//! through the apiserver.
//!
//! Skips (saying so) without kube-apiserver or etcd, unless
//! `EDGEKMS_REQUIRE_APISERVER=1` (as `.ci/test` sets).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use base64::Engine;
use edgekms_e2e::k8s::client;
use edgekms_e2e::*;
use edgekms_testkit::apiserver::{self, kms_encryption_config, KubeApiServer};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};

const SECRETS: usize = 300;
const CONFIGMAPS: usize = 40;
/// What kube-apiserver prefixes a value with under our provider.
const PREFIX: &[u8] = b"k8s:enc:kms:v2:edgekms:";

/// kube-apiserver's `EncryptedObject` (kmsv2 api.proto), the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
struct EncryptedObject {
    #[prost(bytes = "vec", tag = "1")]
    encrypted_data: Vec<u8>,
    #[prost(string, tag = "2")]
    key_id: String,
}

/// Every etcd key under `prefix` and the key_id its value is encrypted
/// under ("plaintext" when it is not ours).
async fn stored_key_ids(etcd: &str, prefix: &str) -> BTreeMap<String, String> {
    use http_body_util::BodyExt;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = serde_json::json!({"key": b64.encode(prefix), "range_end": b64.encode(&end)});
    let addr = etcd.strip_prefix("http://").unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v3/kv/range")
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
        let key = String::from_utf8(b64.decode(kv["key"].as_str().unwrap()).unwrap()).unwrap();
        let value = b64.decode(kv["value"].as_str().unwrap_or("")).unwrap();
        let key_id = match value.strip_prefix(PREFIX) {
            Some(rest) => {
                let obj: EncryptedObject = prost::Message::decode(rest).unwrap();
                assert!(!obj.encrypted_data.is_empty());
                obj.key_id
            }
            None => "plaintext".to_owned(),
        };
        out.insert(key, key_id);
    }
    out
}

/// How many of the Secrets and ConfigMaps are stored under each key_id.
async fn census(api: &KubeApiServer) -> BTreeMap<String, usize> {
    let mut by_key = BTreeMap::new();
    for prefix in ["/registry/secrets/", "/registry/configmaps/"] {
        for key_id in stored_key_ids(&api.etcd_endpoint, prefix)
            .await
            .into_values()
        {
            *by_key.entry(key_id).or_default() += 1;
        }
    }
    by_key
}

fn secret_data(i: usize) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        (
            "password".to_owned(),
            ByteString(format!("pw-{i}-{}", "x".repeat(i % 50)).into_bytes()),
        ),
        (
            "user".to_owned(),
            ByteString(format!("user-{i}").into_bytes()),
        ),
    ])
}

/// Creates the Secrets and ConfigMaps, 16 at a time.
async fn create_objects(client: &kube::Client) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SECRETS + CONFIGMAPS {
        if tasks.len() >= 16 {
            tasks.join_next().await.unwrap().unwrap();
        }
        let (secrets, configmaps) = (secrets.clone(), configmaps.clone());
        tasks.spawn(async move {
            let pp = PostParams::default();
            if i < SECRETS {
                let s = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("secret-{i:03}")),
                        ..Default::default()
                    },
                    data: Some(secret_data(i)),
                    ..Default::default()
                };
                secrets.create(&pp, &s).await.unwrap();
            } else {
                let c = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("config-{i:03}")),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([("k".to_owned(), format!("v{i}"))])),
                    ..Default::default()
                };
                configmaps.create(&pp, &c).await.unwrap();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
}

fn admin_status(plugin: &Plugin) -> serde_json::Value {
    let socket = plugin.admin_socket.display().to_string();
    kmsctl_json(&["local", "--admin-socket", &socket, "status"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_rewrites_every_object_under_the_new_key_and_resumes_after_ctrl_c_and_kill_9() {
    if !apiserver::available() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&dir.path().join("plugin"), "edge-1").await;
    let config = kms_encryption_config(&["secrets", "configmaps"], &plugin.socket);
    let mut api = KubeApiServer::start(&dir.path().join("apiserver"), &config).await;
    let client = client(&api.kubeconfig).await;
    create_objects(&client).await;
    eprintln!("set up in {:?}", t0.elapsed());

    let old = admin_status(&plugin)["primary_key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = census(&api).await;
    assert!(
        before.get(&old).copied().unwrap_or(0) >= SECRETS + CONFIGMAPS,
        "everything is written under {old} at first: {before:?}"
    );

    let admin = plugin.admin_socket.display().to_string();
    let rotated = kmsctl_json(&["local", "--admin-socket", &admin, "rotate"]);
    let new = rotated["key_id"].as_str().unwrap().to_owned();
    assert_ne!(new, old);

    let kubeconfig = api.kubeconfig.display().to_string();
    let state = dir.path().join("migrate-state.json");
    let state_arg = state.display().to_string();
    let migrate = |extra: &[&str]| -> Command {
        let mut cmd = Command::new(bin("kmsctl"));
        cmd.args([
            "migrate",
            "--kubeconfig",
            &kubeconfig,
            "--admin-socket",
            &admin,
        ])
        .args([
            "--resources",
            "secrets,configmaps",
            "--state-file",
            &state_arg,
        ])
        .args(extra)
        .stdin(Stdio::null());
        cmd
    };

    // Right after the rotation the apiserver still writes under the old
    // key_id (it polls Status every minute): refused, naming the node.
    let out = migrate(&[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("refused run's stderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "edge-1/node-1 ({admin}): its apiserver still writes under key_id {old}"
        )),
        "names the node and the key_id it writes under: {stderr}"
    );
    assert!(
        stderr.contains("restart that kube-apiserver"),
        "says what to do: {stderr}"
    );
    assert!(!state.exists(), "a refused run leaves no state");
    let out = migrate(&["--resources", "nosuchthings"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no resource nosuchthings"), "{stderr}");
    assert_eq!(census(&api).await, before, "a refused run writes nothing");

    // A restart makes the apiserver take up the new key_id at once.
    api.restart().await;
    let status = admin_status(&plugin);
    assert_eq!(
        status["writes_key_id"].as_str(),
        Some(new.as_str()),
        "{status}"
    );

    // A slow run, stopped by Ctrl-C (SIGINT) part-way; meanwhile an object
    // of its first page changes under it (a conflict it must retry on the
    // new version, not overwrite with its stale copy).
    let slow = |log: &Path| {
        migrate(&["--rate", "40", "--page-size", "50"])
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let rewritten_at_least = |n: usize, log: &Path| {
        let log = log.to_owned();
        let api = &api;
        let new = new.clone();
        async move {
            poll_until(
                &format!("{n} objects rewritten"),
                60,
                || std::fs::read_to_string(&log).unwrap_or_default(),
                || {
                    let new = new.clone();
                    async move { census(api).await.get(&new).copied().unwrap_or(0) >= n }
                },
            )
            .await
        }
    };
    let log1 = dir.path().join("migrate-1.log");
    let mut child = slow(&log1);
    rewritten_at_least(1, &log1).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let mut changed = secrets.get("secret-040").await.unwrap();
    changed
        .data
        .as_mut()
        .unwrap()
        .insert("password".into(), ByteString(b"changed".to_vec()));
    secrets
        .replace("secret-040", &PostParams::default(), &changed)
        .await
        .unwrap();
    rewritten_at_least(70, &log1).await;
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    let text1 = std::fs::read_to_string(&log1).unwrap();
    eprintln!("interrupted run's stderr:\n{text1}");
    assert_eq!(status.code(), Some(1), "{text1}");
    assert!(
        text1.contains("interrupted: run the same command again to resume"),
        "{text1}"
    );
    assert!(state.exists(), "the state of the interrupted run is kept");

    // Again, killed -9 part-way: it resumes, then leaves its state behind.
    let log2 = dir.path().join("migrate-2.log");
    let mut child = slow(&log2);
    rewritten_at_least(170, &log2).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let interrupted = census(&api).await;
    assert!(
        interrupted.get(&old).copied().unwrap_or(0) > 0,
        "killed before the end: {interrupted:?}"
    );
    assert!(state.exists(), "the state of the killed run is kept");
    let text2 = std::fs::read_to_string(&log2).unwrap();
    eprintln!("killed run's stderr:\n{text2}");
    assert!(text2.contains("resuming"), "{text2}");
    assert!(
        (text1.clone() + &text2)
            .lines()
            .any(|l| l.starts_with("migrate: secrets: ") && l.contains("/s")),
        "plain progress lines without a terminal: {text1}{text2}"
    );
    assert!(!text2.contains('\x1b'), "no terminal escapes: {text2}");

    // Run again: it resumes and finishes.
    let t1 = Instant::now();
    let out = migrate(&["--rate", "500", "-o", "json"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resumed run: {stderr}");
    assert!(stderr.contains("resuming"), "says it resumes: {stderr}");
    eprintln!("resumed run: {:?}\n{stderr}", t1.elapsed());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resumed"], true, "{report}");
    let secrets_report = &report["resources"][0];
    assert_eq!(secrets_report["resource"], "secrets");
    assert_eq!(secrets_report["listed"], SECRETS as u64, "{report}");
    assert_eq!(secrets_report["rewritten"], SECRETS as u64, "{report}");
    assert_eq!(report["total"]["failed"], 0, "{report}");
    assert!(
        secrets_report["conflicts"].as_u64().unwrap() >= 1,
        "the changed secret met a conflict, retried: {report}"
    );
    assert!(
        report["resources"][1]["listed"].as_u64().unwrap() >= CONFIGMAPS as u64,
        "{report}"
    );
    assert!(!state.exists(), "done: the state file is removed");

    // A grouped resource, found by discovery (nothing to rewrite here).
    let other_state = dir
        .path()
        .join("deployments-state.json")
        .display()
        .to_string();
    let out = Command::new(bin("kmsctl"))
        .args([
            "migrate",
            "--kubeconfig",
            &kubeconfig,
            "--admin-socket",
            &admin,
        ])
        .args([
            "--resources",
            "deployments.apps",
            "--state-file",
            &other_state,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("human report:\n{stdout}");
    assert!(stdout.contains("deployments.apps"), "{stdout}");

    let after = census(&api).await;
    assert_eq!(after.get(&old), None, "nothing left under {old}: {after:?}");
    assert!(after[&new] >= SECRETS + CONFIGMAPS, "{after:?}");

    // Every Secret reads back as written, through a fresh apiserver (no
    // cached DEK): the changed one with its change, not the stale copy.
    api.restart().await;
    let client = self::client(&api.kubeconfig).await;
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let list = secrets.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), SECRETS);
    for s in list.items {
        let name = s.metadata.name.clone().unwrap();
        let i: usize = name.strip_prefix("secret-").unwrap().parse().unwrap();
        let mut want = secret_data(i);
        if i == 40 {
            want.insert("password".into(), ByteString(b"changed".to_vec()));
        }
        assert_eq!(s.data.unwrap(), want, "{name}");
    }
    eprintln!("whole test: {:?}", t0.elapsed());
}
