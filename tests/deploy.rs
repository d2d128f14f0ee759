//! The files under `deploy/` agree with each other and with the plugin's
//! defaults: the socket the apiserver is pointed at is the one the plugin
//! binds, every manifest mounts the directories the plugin uses, probes hit
//! the health endpoint, and the encryption config path is the same for
//! kubeadm, K3s and MicroK8s. (`.ci/check-manifests` checks syntax,
//! `systemd-analyze verify` included.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use edgekms_plugin::config::{SealerKind, Settings, DEFAULT_DATA_DIR, DEFAULT_SOCKET};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// The plugin's metrics/health endpoint (loopback by default).
const PLUGIN_HEALTH_PORT: u64 = 9464;
/// The central server's metrics/health endpoint.
const SERVER_HEALTH_PORT: u64 = 9465;
/// The central server's mTLS port.
const SERVER_PORT: u64 = 8443;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_doc(rel: &str) -> Value {
    let mut docs = yaml_docs(&deploy(rel));
    assert_eq!(docs.len(), 1, "{rel}: expected one document");
    docs.remove(0)
}

fn doc_of_kind(rel: &str, kind: &str) -> Value {
    let docs = yaml_docs(&deploy(rel));
    let mut found = docs
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind));
    let doc = found.next().unwrap_or_else(|| panic!("{rel}: no {kind}"));
    assert!(found.next().is_none(), "{rel}: more than one {kind}");
    doc
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn seq(v: &Value) -> &Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a sequence: {v:?}"))
}

fn socket_dir() -> &'static str {
    Path::new(DEFAULT_SOCKET)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The path the EncryptionConfiguration is installed at, as kubeadm's
/// ClusterConfiguration passes it to kube-apiserver.
fn kubeadm_encryption_config_path() -> String {
    let cfg = yaml_doc("kubeadm/kubeadm-config.yaml");
    let args = seq(&cfg["apiServer"]["extraArgs"]);
    let values: Vec<&str> = args
        .iter()
        .filter(|a| a["name"].as_str() == Some("encryption-provider-config"))
        .map(|a| s(&a["value"]))
        .collect();
    assert_eq!(values.len(), 1, "one encryption-provider-config: {args:?}");
    values[0].to_owned()
}

/// `key=value` lines of a systemd unit, in order (comments dropped).
fn unit_entries(rel: &str) -> Vec<(String, String)> {
    read(&deploy(rel))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: not key=value: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn unit_values(entries: &[(String, String)], key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

fn unit_value(entries: &[(String, String)], key: &str) -> String {
    let v = unit_values(entries, key);
    assert_eq!(v.len(), 1, "{key}: {v:?}");
    v[0].clone()
}

/// Words of every `key=` line (systemd lists are space-separated and may
/// repeat the key).
fn unit_words(entries: &[(String, String)], key: &str) -> BTreeSet<String> {
    unit_values(entries, key)
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// `/var/run/x` is `/run/x` on every systemd host.
fn run_path(p: &str) -> String {
    p.strip_prefix("/var/run/")
        .map(|rest| format!("/run/{rest}"))
        .unwrap_or_else(|| p.to_owned())
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&repo().join("deploy"), &mut files);
    let yamls: Vec<_> = files
        .iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    for expected in [
        "encryption-config.yaml",
        "kubeadm/edgekms-plugin.yaml",
        "kubeadm/kubeadm-config.yaml",
        "k3s/config.yaml",
        "server/kubernetes.yaml",
        "server/replicated.yaml",
        "prometheus-alerts.yaml",
    ] {
        assert!(
            yamls.iter().any(|p| p.ends_with(expected)),
            "deploy/{expected} missing"
        );
    }
    for path in yamls {
        let docs = yaml_docs(path);
        assert!(!docs.is_empty(), "{}: empty", path.display());
        for doc in docs {
            assert!(doc.is_mapping(), "{}: {doc:?}", path.display());
            assert_eq!(
                doc.get("apiVersion").is_some(),
                doc.get("kind").is_some(),
                "{}: apiVersion and kind go together",
                path.display()
            );
        }
    }
}

#[test]
fn encryption_config_endpoint_is_the_plugin_socket() {
    let cfg = yaml_doc("encryption-config.yaml");
    assert_eq!(s(&cfg["kind"]), "EncryptionConfiguration");
    assert_eq!(s(&cfg["apiVersion"]), "apiserver.config.k8s.io/v1");
    let resources = seq(&cfg["resources"]);
    assert_eq!(resources.len(), 1);
    assert!(seq(&resources[0]["resources"]).contains(&Value::from("secrets")));
    let providers = seq(&resources[0]["providers"]);
    let kms = &providers[0]["kms"];
    assert_eq!(s(&kms["apiVersion"]), "v2");
    assert_eq!(
        s(&kms["name"]),
        "edgekms",
        "the name is in every stored prefix"
    );
    let endpoint = s(&kms["endpoint"]);
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("not a unix endpoint: {endpoint}"));
    assert_eq!(path, DEFAULT_SOCKET);
    assert!(kms["timeout"].as_str().is_some());
    // identity last: reads what was written before encryption was enabled.
    assert!(providers.last().unwrap().get("identity").is_some());
    // The header names the path every distribution passes to the apiserver.
    let flag = format!(
        "--encryption-provider-config={}",
        kubeadm_encryption_config_path()
    );
    assert!(
        read(&deploy("encryption-config.yaml")).contains(&flag),
        "encryption-config.yaml's comment should say {flag}"
    );
}

#[test]
fn static_pod_mounts_the_plugin_defaults_and_probes_its_health_endpoint() {
    let pod = yaml_doc("kubeadm/edgekms-plugin.yaml");
    assert_eq!(s(&pod["kind"]), "Pod");
    assert_eq!(s(&pod["metadata"]["namespace"]), "kube-system");
    let spec = &pod["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    assert_eq!(s(&spec["priorityClassName"]), "system-node-critical");

    let volumes = seq(&spec["volumes"]);
    let host_path_of = |path: &str| {
        volumes
            .iter()
            .find(|v| v["hostPath"]["path"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("no hostPath volume for {path}"))
    };
    let socket_vol = host_path_of(socket_dir());
    let data_vol = host_path_of(DEFAULT_DATA_DIR);
    let tpm_vol = host_path_of("/dev/tpmrm0");
    assert_eq!(s(&tpm_vol["hostPath"]["type"]), "CharDevice");

    let containers = seq(&spec["containers"]);
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    // Each host directory is mounted at the same path, so the plugin's
    // defaults (and kmsctl's) work unchanged inside the container.
    let mounts = seq(&c["volumeMounts"]);
    for (vol, path) in [
        (socket_vol, socket_dir()),
        (data_vol, DEFAULT_DATA_DIR),
        (tpm_vol, "/dev/tpmrm0"),
    ] {
        let name = s(&vol["name"]);
        let m = mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("volume {name} not mounted"));
        assert_eq!(s(&m["mountPath"]), path);
        assert_ne!(m["readOnly"].as_bool(), Some(true), "{name} read-only");
    }
    assert_eq!(
        c["securityContext"]["privileged"].as_bool(),
        Some(true),
        "/dev/tpmrm0 cannot be opened from an unprivileged container"
    );

    // Arguments: a cluster, the TPM, and no socket/data dir that would
    // disagree with the mounts.
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .map(str::to_owned)
    };
    assert!(arg("--cluster").is_some_and(|v| !v.is_empty()), "{args:?}");
    assert_eq!(arg("--sealer").as_deref(), Some("tpm"));
    assert!(
        args.iter().all(|a| a.starts_with("--") && a.contains('=')),
        "{args:?}"
    );
    if let Some(sock) = arg("--socket") {
        assert_eq!(sock, DEFAULT_SOCKET);
    }
    if let Some(dir) = arg("--data-dir") {
        assert_eq!(dir, DEFAULT_DATA_DIR);
    }

    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"].as_u64(), Some(PLUGIN_HEALTH_PORT), "{probe}");
        assert_eq!(s(&get["path"]), path, "{probe}");
        // The endpoint listens on loopback; with hostNetwork the kubelet
        // reaches it only by asking for 127.0.0.1.
        assert_eq!(s(&get["host"]), "127.0.0.1", "{probe}");
    }
}

#[test]
fn kubeadm_config_mounts_the_encryption_config_and_the_socket_dir() {
    let cfg = yaml_doc("kubeadm/kubeadm-config.yaml");
    assert_eq!(s(&cfg["kind"]), "ClusterConfiguration");
    assert_eq!(s(&cfg["apiVersion"]), "kubeadm.k8s.io/v1beta4");
    let path = kubeadm_encryption_config_path();
    assert!(
        path.ends_with("/encryption-config.yaml"),
        "installed under deploy/'s file name: {path}"
    );
    let vols = seq(&cfg["apiServer"]["extraVolumes"]);
    // Same path inside the apiserver container as on the host.
    let vol_at = |dir: &str| {
        let v = vols
            .iter()
            .find(|v| v["mountPath"].as_str() == Some(dir))
            .unwrap_or_else(|| panic!("no extraVolume mounted at {dir}"));
        assert_eq!(s(&v["hostPath"]), dir, "{v:?}");
        v
    };
    let enc_dir = Path::new(&path).parent().unwrap().to_str().unwrap();
    assert_eq!(vol_at(enc_dir)["readOnly"].as_bool(), Some(true));
    assert_ne!(vol_at(socket_dir())["readOnly"].as_bool(), Some(true));
}

#[test]
fn k3s_and_microk8s_name_the_same_encryption_config() {
    let path = kubeadm_encryption_config_path();

    let k3s = yaml_doc("k3s/config.yaml");
    let args: Vec<&str> = seq(&k3s["kube-apiserver-arg"]).iter().map(s).collect();
    assert!(
        args.contains(&format!("encryption-provider-config={path}").as_str()),
        "{args:?}"
    );
    assert!(
        k3s.get("secrets-encryption").is_none(),
        "K3s's own secrets-encryption must stay off"
    );

    let microk8s = read(&deploy("microk8s/kube-apiserver-args"));
    let flags: Vec<&str> = microk8s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        flags,
        [format!("--encryption-provider-config={path}").as_str()]
    );
}

#[test]
fn systemd_unit_and_plugin_toml_use_the_plugin_defaults() {
    let settings = Settings::from_file(&deploy("systemd/plugin.toml")).unwrap();
    let cfg = settings.validate().unwrap();
    assert_eq!(cfg.socket, Path::new(DEFAULT_SOCKET));
    assert_eq!(cfg.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(cfg.sealer.kind, SealerKind::Tpm);

    let unit = unit_entries("systemd/edgekms-plugin.service");
    let exec = unit_value(&unit, "ExecStart");
    assert!(
        exec.starts_with("/usr/local/bin/edgekms-plugin ")
            && exec.contains("--config /etc/edgekms/plugin.toml"),
        "{exec}"
    );
    assert_eq!(unit_value(&unit, "ConfigurationDirectory"), "edgekms");
    // systemd's directories are the plugin's defaults.
    assert_eq!(
        format!("/run/{}", unit_value(&unit, "RuntimeDirectory")),
        run_path(socket_dir())
    );
    assert_eq!(unit_value(&unit, "RuntimeDirectoryMode"), "0700");
    assert_eq!(unit_value(&unit, "RuntimeDirectoryPreserve"), "yes");
    assert_eq!(
        format!("/var/lib/{}", unit_value(&unit, "StateDirectory")),
        DEFAULT_DATA_DIR
    );
    let rw = unit_words(&unit, "ReadWritePaths");
    assert!(
        rw.contains(DEFAULT_DATA_DIR) && rw.contains(&run_path(socket_dir())),
        "{rw:?}"
    );
    // Started (socket bound) before any apiserver.
    assert!(unit_value(&unit, "ExecStartPost").contains(DEFAULT_SOCKET));
    let before = unit_words(&unit, "Before");
    let wanted = unit_words(&unit, "WantedBy");
    for dist in [
        "k3s.service",
        "snap.microk8s.daemon-kubelite.service",
        "kubelet.service",
    ] {
        assert!(before.contains(dist), "Before= lacks {dist}");
        assert!(wanted.contains(dist), "WantedBy= lacks {dist}");
    }
    assert_eq!(unit_value(&unit, "Type"), "simple");
    assert_eq!(unit_value(&unit, "Restart"), "always");
    assert!(unit_value(&unit, "DeviceAllow").starts_with("/dev/tpmrm0"));
    assert_eq!(unit_value(&unit, "ProtectSystem"), "strict");
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    assert_eq!(unit_value(&unit, "LimitCORE"), "0");
}

#[test]
fn central_server_manifests_agree() {
    let deployment = doc_of_kind("server/kubernetes.yaml", "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(1), "RocksDB: one writer");
    assert_eq!(s(&spec["strategy"]["type"]), "Recreate");
    let pod = &spec["template"]["spec"];
    let c = &seq(&pod["containers"])[0];
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
    };
    assert!(arg("--listen").ends_with(&format!(":{SERVER_PORT}")));
    assert_eq!(
        arg("--metrics-addr"),
        format!("0.0.0.0:{SERVER_HEALTH_PORT}"),
        "probes reach the pod IP, not its loopback"
    );
    let data_dir = arg("--data-dir");
    // The init container initialises the same data dir.
    let init = seq(&pod["initContainers"])
        .iter()
        .map(|c| serde_yaml_ng::to_string(&c["command"]).unwrap())
        .collect::<String>();
    assert!(
        init.contains("edgekms-server init") && init.contains(&format!("--data-dir {data_dir}")),
        "{init}"
    );
    assert_server_probes(c);
    let services: Vec<Value> = yaml_docs(&deploy("server/kubernetes.yaml"))
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some("Service"))
        .collect();
    assert!(services.iter().any(|svc| seq(&svc["spec"]["ports"])
        .iter()
        .any(|p| p["port"].as_u64() == Some(SERVER_PORT))));

    let unit = unit_entries("server/edgekms-server.service");
    let exec = unit_value(&unit, "ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    let flag = |f: &str| {
        words
            .iter()
            .position(|w| *w == f)
            .map(|i| words[i + 1])
            .unwrap_or_else(|| panic!("no {f} in {exec}"))
    };
    assert_eq!(
        flag("--data-dir"),
        format!("/var/lib/{}", unit_value(&unit, "StateDirectory"))
    );
    assert!(flag("--listen").ends_with(&format!(":{SERVER_PORT}")));
}

/// The server container's probes: /healthz to start and live, /readyz to
/// take traffic, on the named port `metrics` = 9465.
fn assert_server_probes(c: &Value) {
    let ports = seq(&c["ports"]);
    let port_no = |p: &Value| -> u64 {
        p.as_u64().unwrap_or_else(|| {
            let name = s(p);
            ports
                .iter()
                .find(|q| q["name"].as_str() == Some(name))
                .and_then(|q| q["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no port {name}"))
        })
    };
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(port_no(&get["port"]), SERVER_HEALTH_PORT, "{probe}");
        assert_eq!(s(&get["path"]), path, "{probe}");
    }
}

/// The value of `--flag=value` among a container's arguments.
fn container_arg<'a>(args: &[&'a str], flag: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
}

/// Every key `edgekms-server` takes in its `--config` file: the flags of
/// the README's table and the etcd ones of the replicated mode.
// The server's own test (`the_shipped_etcd_config_is_valid`, in its
// main.rs) parses server-etcd.toml with the real settings; this list keeps
// the manifests' checks free of the server's private types.
const SERVER_CONFIG_KEYS: &[&str] = &[
    "data_dir",
    "listen",
    "sealer",
    "tpm_tcti",
    "tpm_pcrs",
    "tpm_owner_auth_file",
    "auto_rotate_every",
    "cluster_auto_rotate",
    "heartbeat",
    "audit_retention",
    "audit_max_records",
    "log_format",
    "metrics_addr",
    "no_metrics",
    "max_connections",
    "max_unauthenticated_per_peer",
    "store",
    "etcd_endpoints",
    "etcd_cacert",
    "etcd_cert",
    "etcd_key",
    "etcd_prefix",
    "etcd_insecure",
];

#[test]
fn replicated_central_server_manifests_agree() {
    let rel = "server/replicated.yaml";
    let docs = yaml_docs(&deploy(rel));
    let set = doc_of_kind(rel, "StatefulSet");
    let spec = &set["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(3));
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    let pod = &spec["template"]["spec"];

    // One replica per host, required rather than preferred: two on one
    // host are lost together.
    let anti =
        seq(&pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]);
    assert!(
        anti.iter().any(
            |t| t["topologyKey"].as_str() == Some("kubernetes.io/hostname")
                && &t["labelSelector"]["matchLabels"] == labels
        ),
        "{anti:?}"
    );
    let pdb = doc_of_kind(rel, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    // A headless Service (the StatefulSet's) and a client Service on 8443,
    // both selecting the replicas.
    let services: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Service"))
        .collect();
    let headless = services
        .iter()
        .find(|svc| svc["metadata"]["name"] == spec["serviceName"])
        .unwrap_or_else(|| panic!("no Service {:?}", spec["serviceName"]));
    assert_eq!(s(&headless["spec"]["clusterIP"]), "None");
    assert_eq!(&headless["spec"]["selector"], labels);
    assert!(
        services.iter().any(|svc| {
            svc["spec"]["clusterIP"].as_str() != Some("None")
                && &svc["spec"]["selector"] == labels
                && seq(&svc["spec"]["ports"])
                    .iter()
                    .any(|p| p["port"].as_u64() == Some(SERVER_PORT))
        }),
        "no client Service on {SERVER_PORT}"
    );

    let c = &seq(&pod["containers"])[0];
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    let arg = |flag: &str| container_arg(&args, flag);
    assert_eq!(arg("--store"), "etcd");
    for url in arg("--etcd-endpoints").split(',') {
        assert!(url.starts_with("https://"), "{url}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--etcd-insecure")),
        "--etcd-insecure is for tests"
    );
    assert!(arg("--listen").ends_with(&format!(":{SERVER_PORT}")));
    assert_eq!(
        arg("--metrics-addr"),
        format!("0.0.0.0:{SERVER_HEALTH_PORT}"),
        "probes reach the pod IP, not its loopback"
    );
    assert_eq!(arg("--sealer"), "tpm");
    assert_server_probes(c);

    let volumes = seq(&pod["volumes"]);
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    // The mount `path` is under, in container `c`.
    let mount_of = |c: &Value, path: &str| -> Value {
        seq(&c["volumeMounts"])
            .iter()
            .find(|m| path.starts_with(&format!("{}/", s(&m["mountPath"]))))
            .unwrap_or_else(|| panic!("{path} is on no volume of {}", s(&c["name"])))
            .clone()
    };
    // etcd's CA and client certificates from a Secret, read-only.
    for flag in ["--etcd-cacert", "--etcd-cert", "--etcd-key"] {
        let m = mount_of(c, arg(flag));
        assert_eq!(m["readOnly"].as_bool(), Some(true), "{flag}");
        assert!(
            volume(s(&m["name"]))["secret"]["secretName"]
                .as_str()
                .is_some(),
            "{flag}: not from a Secret"
        );
    }
    // The data dir is on the claim template: a local volume per host, so a
    // replica stays on the host whose TPM sealed its root key.
    let data_dir = arg("--data-dir");
    let claims = seq(&spec["volumeClaimTemplates"]);
    assert_eq!(claims.len(), 1);
    assert_eq!(mount_of(c, data_dir)["name"], claims[0]["metadata"]["name"]);
    let class = s(&claims[0]["spec"]["storageClassName"]);
    let storage_class = doc_of_kind(rel, "StorageClass");
    assert_eq!(s(&storage_class["metadata"]["name"]), class);
    assert_eq!(
        s(&storage_class["volumeBindingMode"]),
        "WaitForFirstConsumer"
    );
    let pvs: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str() == Some("PersistentVolume")
                && d["spec"]["storageClassName"].as_str() == Some(class)
        })
        .collect();
    assert!(pvs.len() >= 3, "a local volume per replica");
    for pv in pvs {
        assert!(pv["spec"]["local"]["path"].as_str().is_some(), "{pv:?}");
        let term = &seq(&pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"])[0];
        assert_eq!(
            s(&seq(&term["matchExpressions"])[0]["key"]),
            "kubernetes.io/hostname"
        );
    }
    // The TPM as kubernetes.yaml has it.
    let tpm = volume("tpm");
    assert_eq!(s(&tpm["hostPath"]["path"]), "/dev/tpmrm0");
    assert_eq!(s(&tpm["hostPath"]["type"]), "CharDevice");
    assert_eq!(
        s(&seq(&c["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some("tpm"))
            .expect("tpm mounted")["mountPath"]),
        "/dev/tpmrm0"
    );
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));

    // The init container makes the data dir the server then serves: `init
    // --store etcd` for the first replica, `join` for the others, with the
    // server's etcd flags.
    let inits = seq(&pod["initContainers"]);
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    let script = seq(&init["command"])
        .iter()
        .map(s)
        .collect::<Vec<_>>()
        .join(" ")
        .replace('"', "");
    for part in [
        "edgekms-server init",
        "--store etcd",
        "edgekms-server join",
        &format!("dir={data_dir}\n"),
    ] {
        assert!(
            script.contains(part),
            "init container lacks {part:?}:\n{script}"
        );
    }
    assert_eq!(script.matches("--data-dir $dir").count(), 2, "{script}");
    for flag in [
        "--etcd-endpoints",
        "--etcd-cacert",
        "--etcd-cert",
        "--etcd-key",
    ] {
        // $(POD_NAME) is the kubelet's expansion, $POD_NAME the shell's.
        let value = arg(flag).replace("$(POD_NAME)", "$POD_NAME");
        assert!(
            script.contains(&format!("{flag} {value}")),
            "init's {flag} is not the server's {value}"
        );
        if flag != "--etcd-endpoints" {
            assert_eq!(
                mount_of(init, &value)["name"],
                mount_of(c, arg(flag))["name"]
            );
        }
    }
    assert_eq!(
        mount_of(init, data_dir)["name"],
        claims[0]["metadata"]["name"]
    );
    assert_eq!(init["securityContext"]["privileged"].as_bool(), Some(true));
}

#[test]
fn etcd_server_unit_and_toml_agree() {
    let unit = unit_entries("server/edgekms-server-etcd.service");
    let exec = unit_value(&unit, "ExecStart");
    let conf_dir = format!("/etc/{}", unit_value(&unit, "ConfigurationDirectory"));
    assert_eq!(
        exec,
        format!("/usr/local/bin/edgekms-server --config {conf_dir}/server-etcd.toml")
    );
    // The single-host unit has the same data dir and port.
    assert!(unit_words(&unit, "Conflicts").contains("edgekms-server.service"));
    assert_eq!(unit_value(&unit, "Restart"), "always");
    assert!(unit_value(&unit, "DeviceAllow").starts_with("/dev/tpmrm0"));
    assert_eq!(unit_value(&unit, "ProtectSystem"), "strict");
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    assert_eq!(unit_value(&unit, "LimitCORE"), "0");

    // Read as the server reads its config file.
    let cfg: serde_json::Value =
        edgekms_daemon::config::read_toml(&deploy("server/server-etcd.toml")).unwrap();
    for key in cfg.as_object().unwrap().keys() {
        assert!(
            SERVER_CONFIG_KEYS.contains(&key.as_str()),
            "unknown key {key}"
        );
    }
    let get = |key: &str| {
        cfg[key]
            .as_str()
            .unwrap_or_else(|| panic!("server-etcd.toml: no {key}"))
    };
    assert_eq!(get("store"), "etcd");
    assert_eq!(get("sealer"), "tpm");
    assert!(cfg.get("etcd_insecure").is_none(), "for tests only");
    let data_dir = get("data_dir");
    assert_eq!(
        data_dir,
        format!("/var/lib/{}", unit_value(&unit, "StateDirectory"))
    );
    assert!(unit_words(&unit, "ReadWritePaths").contains(data_dir));
    assert!(get("listen").ends_with(&format!(":{SERVER_PORT}")));
    let endpoints = cfg["etcd_endpoints"].as_array().unwrap();
    assert!(!endpoints.is_empty());
    for url in endpoints {
        assert!(url.as_str().unwrap().starts_with("https://"), "{url}");
    }
    for key in ["etcd_cacert", "etcd_cert", "etcd_key"] {
        assert!(get(key).starts_with(&format!("{conf_dir}/")), "{key}");
    }
}

/// Metric names the plugin and the server export (docs/operator-guide.md).
const METRICS: &[&str] = &[
    "edgekms_kms_requests_total",
    "edgekms_kms_request_duration_seconds",
    "edgekms_ready",
    "edgekms_primary_key_version",
    "edgekms_cached_key_versions",
    "edgekms_sync_last_contact_seconds",
    "edgekms_sync_errors_total",
    "edgekms_sync_refused_states_total",
    "edgekms_sync_central_reconciling",
    "edgekms_tpm_operation_duration_seconds",
    "edgekms_server_nodes",
    "edgekms_server_clusters_pending_rotation",
    "edgekms_server_oldest_unacked_delivery_seconds",
    "edgekms_store_repairs_total",
    "edgekms_server_clusters_reconciling",
    "edgekms_server_key_clashes",
    "edgekms_server_store_up",
    "edgekms_server_leader",
    "edgekms_decrypt_disabled_total",
];

#[test]
fn alerts_use_known_metrics_and_each_is_explained_in_the_guide() {
    let rule = yaml_doc("prometheus-alerts.yaml");
    assert_eq!(s(&rule["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(s(&rule["kind"]), "PrometheusRule");
    let guide = read(&repo().join("docs/operator-guide.md"));
    let mut names = BTreeSet::new();
    for group in seq(&rule["spec"]["groups"]) {
        for r in seq(&group["rules"]) {
            let name = s(&r["alert"]);
            assert!(names.insert(name.to_owned()), "{name} twice");
            let expr = s(&r["expr"]);
            for word in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("edgekms_"))
            {
                let base = word.strip_suffix("_bucket").unwrap_or(word);
                assert!(METRICS.contains(&base), "{name}: unknown metric {word}");
            }
            assert!(
                ["critical", "warning", "info"].contains(&s(&r["labels"]["severity"])),
                "{name}"
            );
            assert!(
                s(&r["annotations"]["summary"]).len() > 10,
                "{name}: summary"
            );
            assert!(
                s(&r["annotations"]["description"]).len() > 80,
                "{name}: the description says what it means and what to do"
            );
            assert!(
                guide.contains(&format!("### {name}\n")),
                "docs/operator-guide.md has no `### {name}` section"
            );
        }
    }
    for required in [
        "EdgekmsPluginNotReady",
        "EdgekmsKmsErrors",
        "EdgekmsSyncStale",
        "EdgekmsSyncErrors",
        "EdgekmsRotationStuck",
    ] {
        assert!(names.contains(required), "{required} missing");
    }
}
