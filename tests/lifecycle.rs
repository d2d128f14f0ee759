//! A version's whole life with a real kube-apiserver (the testbin's,
//! unmodified), real etcd and a real soft-sealed edgekms-plugin:
//! rotate → migrate → census → retire (disabled) → destroyed, and what
//! the apiserver sees of a disabled version.
//!
//! Skips (saying so) without kube-apiserver or etcd, unless
//! `EDGEKMS_REQUIRE_APISERVER=1` (as `.ci/test` sets).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use edgekms_e2e::k8s::client;
use edgekms_e2e::*;
use edgekms_testkit::apiserver::{self, kms_encryption_config, KubeApiServer};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};

fn data(name: &str) -> BTreeMap<String, ByteString> {
    BTreeMap::from([(
        "v".to_owned(),
        ByteString(format!("value of {name}").into_bytes()),
    )])
}

/// Creates Secrets `{prefix}-0..n` and ConfigMaps `{prefix}-cm-0..m`.
async fn create(client: &kube::Client, prefix: &str, secrets: usize, configmaps: usize) {
    let s: Api<Secret> = Api::namespaced(client.clone(), "default");
    let c: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    for i in 0..secrets {
        let name = format!("{prefix}-{i}");
        let obj = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            data: Some(data(&name)),
            ..Default::default()
        };
        s.create(&pp, &obj).await.unwrap();
    }
    for i in 0..configmaps {
        let obj = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}-cm-{i}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("k".to_owned(), format!("{i}"))])),
            ..Default::default()
        };
        c.create(&pp, &obj).await.unwrap();
    }
}

/// Every Secret in `default` reads back with the data it was made with.
async fn read_all(client: &kube::Client, names: &[String]) {
    let s: Api<Secret> = Api::namespaced(client.clone(), "default");
    for name in names {
        let got = s.get(name).await.unwrap();
        assert_eq!(got.data.unwrap(), data(name), "{name}");
    }
}

struct Node {
    admin: String,
    etcd: String,
    encryption_config: String,
}

impl Node {
    fn local(&self, args: &[&str]) -> std::process::Output {
        kmsctl(&[&["local", "--admin-socket", &self.admin][..], args].concat())
    }

    fn local_json(&self, args: &[&str]) -> serde_json::Value {
        kmsctl_json(&[&["local", "--admin-socket", &self.admin][..], args].concat())
    }

    /// `kmsctl local census`: printed as JSON, and kept by the plugin.
    fn census(&self) -> serde_json::Value {
        self.local_json(&[
            "census",
            "--etcd-endpoints",
            &self.etcd,
            "--encryption-config",
            &self.encryption_config,
        ])
    }
}

fn objects(census: &serde_json::Value, key_id: &str, resource: &str) -> u64 {
    census["under"][key_id][resource].as_u64().unwrap_or(0)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_migrate_census_then_retire_and_every_secret_still_reads() {
    if !apiserver::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&dir.path().join("plugin"), "edge-1").await;
    let config = kms_encryption_config(&["secrets", "configmaps"], &plugin.socket);
    let config_file = dir.path().join("encryption-config.yaml");
    std::fs::write(&config_file, &config).unwrap();
    let mut api = KubeApiServer::start(&dir.path().join("apiserver"), &config).await;
    let node = Node {
        admin: plugin.admin_socket.display().to_string(),
        etcd: api.etcd_endpoint.clone(),
        encryption_config: config_file.display().to_string(),
    };
    let kube = client(&api.kubeconfig).await;
    create(&kube, "old", 30, 10).await;
    let v1 = node.local_json(&["status"])["primary_key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v2 = node.local_json(&["rotate"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The apiserver takes up the new key at its next Status poll; a
    // restart makes that now.
    api.restart().await;
    create(&kube, "new", 5, 2).await;
    assert_eq!(node.local_json(&["status"])["writes_key_id"], v2.as_str());

    // The census counts per key_id and resource.
    let census = node.census();
    assert_eq!(objects(&census, &v1, "secrets"), 30, "{census:#}");
    assert!(objects(&census, &v1, "configmaps") >= 10, "{census:#}");
    assert_eq!(objects(&census, &v2, "secrets"), 5, "{census:#}");
    assert!(objects(&census, &v2, "configmaps") >= 2, "{census:#}");

    // Retire refuses, naming what is left.
    let out = node.local(&["retire", "1", "--grace", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("secrets 30"), "{}", stderr(&out));
    assert!(stderr(&out).contains("configmaps"), "{}", stderr(&out));

    // Migrate; the census after it counts nothing under v1.
    let kubeconfig = api.kubeconfig.display().to_string();
    let state = dir.path().join("migrate.json").display().to_string();
    let migrated = kmsctl_json(&[
        "migrate",
        "--kubeconfig",
        &kubeconfig,
        "--admin-socket",
        &node.admin,
        "--resources",
        "secrets,configmaps",
        "--state-file",
        &state,
    ]);
    assert!(migrated.to_string().contains("rewritten"), "{migrated:#}");
    let census = node.census();
    assert_eq!(objects(&census, &v1, "secrets"), 0, "{census:#}");
    assert_eq!(objects(&census, &v1, "configmaps"), 0, "{census:#}");
    assert_eq!(objects(&census, &v2, "secrets"), 35, "{census:#}");

    // Now the retire goes through: disabled, then destroyed.
    let retired = node.local_json(&["retire", "1", "--grace", "1s"]);
    assert!(retired["destroy_after_unix"].as_u64().unwrap() > 0);
    poll_until(
        "v1 destroyed",
        30,
        || plugin.log_text(),
        || async { node.local_json(&["status"])["versions"][0]["state"] == "retired" },
    )
    .await;

    // Every Secret still reads, after an apiserver restart too.
    let names: Vec<String> = (0..30)
        .map(|i| format!("old-{i}"))
        .chain((0..5).map(|i| format!("new-{i}")))
        .collect();
    read_all(&kube, &names).await;
    api.restart().await;
    read_all(&client(&api.kubeconfig).await, &names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_version_fails_the_apiservers_read_with_the_plugins_message_until_restored() {
    if !apiserver::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&dir.path().join("plugin"), "edge-1").await;
    let config = kms_encryption_config(&["secrets"], &plugin.socket);
    let mut api = KubeApiServer::start(&dir.path().join("apiserver"), &config).await;
    let admin = plugin.admin_socket.display().to_string();
    let local = |args: &[&str]| {
        kmsctl_json(&[&["local", "--admin-socket", admin.as_str()][..], args].concat())
    };
    create(&client(&api.kubeconfig).await, "old", 1, 0).await;
    local(&["rotate"]);
    api.restart().await;

    // Disabled with data still under it (the census skipped, loudly).
    local(&["retire", "1", "--skip-census", "--grace", "1h"]);
    // A restart empties the apiserver's cache of decrypted DEKs, so the
    // read reaches the plugin. It stays unready meanwhile: its Secret
    // informer cannot list what the disabled key encrypted (what an
    // operator would see: the alert, and this in /readyz).
    api.restart_until("kms-providers").await;
    let (code, body) = api.get("/readyz?verbose").await.unwrap();
    assert_ne!(code, 200, "{body}");
    let secrets: Api<Secret> = Api::namespaced(client(&api.kubeconfig).await, "default");
    let err = secrets.get("old-0").await.unwrap_err().to_string();
    assert!(
        err.contains("disabled") && err.contains("restore-version"),
        "the apiserver's error carries the plugin's message: {err}"
    );
    let refused = plugin.scrape().await;
    let count = refused
        .samples
        .iter()
        .find(|s| {
            s.metric == "edgekms_decrypt_disabled_total" && s.labels.get("version") == Some("1")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        });
    assert!(count.unwrap_or(0.0) >= 1.0, "counted: {count:?}");

    // Restored: the same read succeeds, and the apiserver becomes ready
    // by itself.
    local(&["restore-version", "1"]);
    let got = secrets.get("old-0").await.unwrap();
    assert_eq!(got.data.unwrap(), data("old-0"));
    api.wait_ready().await;
}
