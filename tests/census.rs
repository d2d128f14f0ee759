//! The storage census against real stores: Debian's etcd (plain, and TLS
//! with client certificates) and the kine-subset endpoint on a unix socket
//! (support/kine.rs), with values in exactly the formats kube-apiserver
//! writes; and `kmsctl local census`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgekms_census::{
    take, take_observed, take_with, Census, CensusError, EtcdTarget, Limits, Spec,
};
use edgekms_e2e::kine::Kine;
use edgekms_testkit::etcd::Etcd;
use prost::Message;

/// What kube-apiserver stores for an object the KMS v2 provider `provider`
/// encrypted under `key_id`.
fn kms_v2(provider: &str, key_id: &str, size: usize) -> Vec<u8> {
    let object = edgekms_census::value::EncryptedObject {
        encrypted_data: vec![0xa5; size],
        key_id: key_id.into(),
        encrypted_dek_source: vec![7; 60],
        annotations: [("kms.kubernetes.io/edgekms".to_string(), b"v1".to_vec())].into(),
        encrypted_dek_source_type: 1,
    };
    let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    v.extend(object.encode_to_vec());
    v
}

const CONFIG: &str = r#"apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets, configmaps, widgets.example.com]
    providers:
      - kms: {apiVersion: v2, name: edgekms, endpoint: "unix:///var/run/edgekms/kms.sock", timeout: 3s}
      - identity: {}
"#;

type Items = Vec<(Vec<u8>, Vec<u8>)>;

/// A mixed store: what each key_id, identity and other provider holds.
fn dataset() -> Items {
    let mut items = Items::new();
    let mut add = |key: String, value: Vec<u8>| items.push((key.into_bytes(), value));
    for i in 0..30 {
        add(
            format!("/registry/secrets/ns{}/s{i}", i % 3),
            kms_v2("edgekms", "kid-one", 40),
        );
    }
    for i in 0..10 {
        add(
            format!("/registry/secrets/ns/t{i}"),
            kms_v2("edgekms", "kid-two", 40),
        );
    }
    for i in 0..5 {
        add(
            format!("/registry/configmaps/ns/c{i}"),
            kms_v2("edgekms", "kid-one", 40),
        );
    }
    for i in 0..3 {
        add(
            format!("/registry/example.com/widgets/ns/w{i}"),
            kms_v2("edgekms", "kid-two", 40),
        );
    }
    for i in 0..4 {
        add(
            format!("/registry/secrets/plain/p{i}"),
            b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret".to_vec(),
        );
    }
    add(
        "/registry/configmaps/plain/json".into(),
        br#"{"kind":"ConfigMap"}"#.to_vec(),
    );
    for i in 0..6 {
        add(
            format!("/registry/pods/ns/p{i}"),
            b"k8s\x00\x0a\x09\x0a\x02v1\x12\x03Pod".to_vec(),
        );
    }
    add("/registry/deployments/ns/d".into(), b"k8s\x00apps".to_vec());
    for i in 0..2 {
        add(
            format!("/registry/secrets/ns/vault{i}"),
            kms_v2("vault", "vault-kid", 40),
        );
    }
    for i in 0..2 {
        add(
            format!("/registry/secrets/ns/cbc{i}"),
            b"k8s:enc:aescbc:v1:key1:\x00\x01\x02".to_vec(),
        );
    }
    add(
        "/registry/secrets/ns/old".into(),
        b"k8s:enc:kms:v1:legacy:\x00\x01".to_vec(),
    );
    for (i, junk) in [
        &b"k8s:enc:kms:v2:edgekms:"[..],
        b"k8s:enc:kms:v2:edgekms:\xff\xff\xff",
        b"k8s:enc:kms:v2:edgekms:\x0a\x01x",
    ]
    .into_iter()
    .enumerate()
    {
        add(format!("/registry/secrets/junk/j{i}"), junk.to_vec());
    }
    add(
        "/registry/secrets/ns/weird".into(),
        b"\x00\x01 not a format".to_vec(),
    );
    // Outside the prefix: never read.
    for i in 0..5 {
        add(
            format!("/other/secrets/ns/x{i}"),
            kms_v2("edgekms", "kid-one", 40),
        );
    }
    add("/registry".into(), b"k8s\x00".to_vec());
    items
}

fn map<const N: usize>(pairs: [(&str, u64); N]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The census [`dataset`] must give, but for the time and revision.
fn expected(spec: &Spec) -> Census {
    let mut c = Census::new(spec, 0);
    c.scanned = 69;
    c.under
        .insert("kid-one".into(), map([("configmaps", 5), ("secrets", 30)]));
    c.under.insert(
        "kid-two".into(),
        map([("secrets", 10), ("widgets.example.com", 3)]),
    );
    c.identity = map([("configmaps", 1), ("secrets", 4)]);
    c.other.insert("kms:v2:vault".into(), map([("secrets", 2)]));
    c.other
        .insert("aescbc:v1:key1".into(), map([("secrets", 2)]));
    c.other
        .insert("kms:v1:legacy".into(), map([("secrets", 1)]));
    c.other.insert("unrecognised".into(), map([("secrets", 1)]));
    c.unreadable = map([("secrets", 3)]);
    c
}

fn without_time(mut c: Census) -> Census {
    c.taken_unix = 0;
    c.revision = 0;
    c
}

fn plain(endpoint: &str) -> EtcdTarget {
    EtcdTarget {
        endpoints: vec![endpoint.to_string()],
        ..EtcdTarget::default()
    }
}

fn short() -> Limits {
    Limits {
        connect: Duration::from_secs(3),
        request: Duration::from_secs(3),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_every_format_kube_apiserver_writes() {
    let Some(etcd) = Etcd::fresh_plain() else {
        return;
    };
    let rev = etcd.put_all(&dataset());
    let spec = Spec::from_encryption_config(CONFIG, None).unwrap();
    let census = take(&plain(&etcd.endpoint), &spec).await.unwrap();
    assert_eq!(census.revision, rev);
    assert!(census.taken_unix > 1_700_000_000);
    assert_eq!(without_time(census.clone()), expected(&spec));
    assert_eq!(census.objects_under("kid-one"), 35);
    assert_eq!(census.objects_under("kid-two"), 13);
    assert_eq!(census.objects_under("kid-three"), 0);
    assert_eq!(
        census.resources_under("kid-two"),
        [
            ("secrets".to_string(), 10),
            ("widgets.example.com".to_string(), 3)
        ]
    );

    // Without an EncryptionConfiguration every identity object counts.
    let all = take(&plain(&etcd.endpoint), &Spec::default())
        .await
        .unwrap();
    assert_eq!(
        all.identity,
        map([
            ("configmaps", 1),
            ("deployments", 1),
            ("pods", 6),
            ("secrets", 4)
        ])
    );
    // Another provider's view of the same store.
    let vault = Spec {
        provider: "vault".into(),
        ..Spec::default()
    };
    let v = take(&plain(&etcd.endpoint), &vault).await.unwrap();
    assert_eq!(v.objects_under("vault-kid"), 2);
    assert_eq!(v.other["kms:v2:edgekms"].values().sum::<u64>(), 48 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_read_one_revision_whatever_is_written_meanwhile() {
    let Some(etcd) = Etcd::fresh_plain() else {
        return;
    };
    let items: Items = (0..100)
        .map(|i| {
            (
                format!("/registry/secrets/ns/s{i:03}").into_bytes(),
                kms_v2("edgekms", &format!("kid-{}", i % 4), 100),
            )
        })
        .collect();
    let rev = etcd.put_all(&items);
    let spec = Spec {
        page_size: 7,
        ..Spec::default()
    };
    let mut pages = 0;
    let mut seen = Vec::new();
    let census = take_observed(&plain(&etcd.endpoint), &spec, &short(), &mut |c| {
        pages += 1;
        seen.push(c.scanned);
        if pages == 1 {
            // Between pages: new objects before and after the cursor, one
            // rewritten under another key, all at later revisions.
            let mut late: Items = (0..20)
                .map(|i| {
                    (
                        format!("/registry/secrets/ns/s{:03}x", i * 5).into_bytes(),
                        kms_v2("edgekms", "kid-late", 10),
                    )
                })
                .collect();
            late.push((
                b"/registry/secrets/ns/s050".to_vec(),
                kms_v2("edgekms", "kid-late", 10),
            ));
            etcd.put_all(&late);
        }
    })
    .await
    .unwrap();
    assert_eq!(census.revision, rev);
    assert_eq!(pages, 15, "100 objects in pages of 7: {seen:?}");
    assert_eq!(seen.first(), Some(&7));
    assert_eq!(census.scanned, 100);
    assert_eq!(census.objects_under("kid-late"), 0);
    for k in 0..4 {
        assert_eq!(census.objects_under(&format!("kid-{k}")), 25);
    }
    // The same figures in one page; and afterwards, the late writes.
    let one = take(&plain(&etcd.endpoint), &Spec::default())
        .await
        .unwrap();
    assert_eq!(one.scanned, 120);
    assert_eq!(one.objects_under("kid-late"), 21);
    assert!(one.revision > census.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_what_etcd_refuses() {
    let Some(etcd) = Etcd::fresh_tls() else {
        return;
    };
    let tls = etcd.tls.clone().unwrap();
    etcd.put_all(&dataset());
    let spec = Spec::from_encryption_config(CONFIG, None).unwrap();
    let good = EtcdTarget {
        endpoints: vec![etcd.endpoint.clone()],
        cacert: Some(tls.ca.clone()),
        cert: Some(tls.cert.clone()),
        key: Some(tls.key.clone()),
    };
    let census = take_with(&good, &spec, &short()).await.unwrap();
    assert_eq!(without_time(census), expected(&spec));

    let wrong_ca = EtcdTarget {
        cacert: Some(tls.other_ca.clone()),
        ..good.clone()
    };
    let e = take_with(&wrong_ca, &spec, &short()).await.unwrap_err();
    assert!(matches!(e, CensusError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("--etcd-cacert"), "{e}");

    let no_cert = EtcdTarget {
        cert: None,
        key: None,
        ..good.clone()
    };
    let e = take_with(&no_cert, &spec, &short()).await.unwrap_err();
    assert!(matches!(e, CensusError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("client certificate"), "{e}");

    let other_cert = EtcdTarget {
        cert: Some(tls.other_cert.clone()),
        key: Some(tls.other_key.clone()),
        ..good.clone()
    };
    let e = take_with(&other_cert, &spec, &short()).await.unwrap_err();
    assert!(matches!(e, CensusError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("client certificate"), "{e}");

    let no_ca = EtcdTarget {
        cacert: None,
        ..good.clone()
    };
    let e = take_with(&no_ca, &spec, &short()).await.unwrap_err();
    assert!(e.to_string().contains("--etcd-cacert"), "{e}");
    let half = EtcdTarget {
        key: None,
        ..good.clone()
    };
    let e = take_with(&half, &spec, &short()).await.unwrap_err();
    assert!(e.to_string().contains("go together"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_silent_and_not_etcd_fail_clearly_and_in_time() {
    let spec = Spec::default();
    // Nothing listening.
    let port = edgekms_testkit::net::free_port();
    let e = take_with(&plain(&format!("http://127.0.0.1:{port}")), &spec, &short())
        .await
        .unwrap_err();
    assert!(matches!(e, CensusError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot reach etcd"), "{e}");
    // No such socket.
    let e = take_with(&plain("unix:///nonexistent/kine.sock"), &spec, &short())
        .await
        .unwrap_err();
    assert!(matches!(e, CensusError::Unreachable { .. }), "{e:?}");

    // A peer that accepts and never answers: a timeout, bounded.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(10));
        drop(conns);
    });
    let t = Instant::now();
    let e = take_with(&plain(&format!("http://{addr}")), &spec, &short())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(matches!(e, CensusError::Timeout { .. }), "{e:?}");
    drop(held);

    // An HTTP/1.1 server: not etcd.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in http.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let e = take_with(&plain(&format!("http://{addr}")), &spec, &short())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CensusError::NotEtcd { .. } | CensusError::Unreachable { .. }
        ),
        "{e:?}"
    );

    // Bad endpoints are refused before any connection.
    for bad in ["127.0.0.1:2379", "https://127.0.0.1", "etcd://x:1"] {
        let e = take(&plain(bad), &spec).await.unwrap_err();
        assert!(matches!(e, CensusError::Endpoint { .. }), "{bad}: {e:?}");
    }
    let e = take(&EtcdTarget::default(), &spec).await.unwrap_err();
    assert!(matches!(e, CensusError::NoEndpoint), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_endpoint_that_answers_is_read() {
    let Some(etcd) = Etcd::fresh_plain() else {
        return;
    };
    etcd.put_all(&dataset());
    let dead = format!("http://127.0.0.1:{}", edgekms_testkit::net::free_port());
    let target = EtcdTarget {
        endpoints: vec![dead, etcd.endpoint.clone()],
        ..EtcdTarget::default()
    };
    let spec = Spec::from_encryption_config(CONFIG, None).unwrap();
    let c = take_with(&target, &spec, &short()).await.unwrap();
    assert_eq!(without_time(c), expected(&spec));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_on_a_unix_socket_gives_the_same_census_as_etcd() {
    let Some(etcd) = Etcd::fresh_plain() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // As MicroK8s names its k8s-dqlite socket: the ":12379" is part of the file name.
    let kine = Kine::start(&dir.path().join("kine.sock:12379"));
    let items = dataset();
    etcd.put_all(&items);
    for (k, v) in &items {
        kine.put(k, v);
    }
    // History kine must see through: a deleted key and an overwritten one.
    kine.put(
        b"/registry/secrets/gone/g",
        &kms_v2("edgekms", "kid-one", 5),
    );
    kine.delete(b"/registry/secrets/gone/g");
    etcd.put(
        b"/registry/secrets/ns/s0x",
        &kms_v2("edgekms", "kid-one", 5),
    );
    kine.put(
        b"/registry/secrets/ns/s0x",
        &kms_v2("edgekms", "kid-zero", 5),
    );
    kine.put(
        b"/registry/secrets/ns/s0x",
        &kms_v2("edgekms", "kid-one", 5),
    );

    let spec = Spec::from_encryption_config(CONFIG, None).unwrap();
    for page_size in [1, 7, 500] {
        let spec = Spec {
            page_size,
            ..spec.clone()
        };
        let from_etcd = take_with(&plain(&etcd.endpoint), &spec, &short())
            .await
            .unwrap();
        let from_kine = take_with(&plain(&kine.endpoint()), &spec, &short())
            .await
            .unwrap();
        assert_eq!(from_kine.revision, kine.revision());
        assert_eq!(
            without_time(from_kine),
            without_time(from_etcd),
            "page size {page_size}"
        );
    }
    // The ":12379" suffix also finds a socket named without it.
    let dir2 = tempfile::tempdir().unwrap();
    let kine2 = Kine::start(&dir2.path().join("kine.sock"));
    kine2.put(b"/registry/secrets/a/b", &kms_v2("edgekms", "k", 5));
    let target = plain(&format!("unix://{}:12379", kine2.socket.display()));
    assert_eq!(
        take_with(&target, &spec, &short())
            .await
            .unwrap()
            .objects_under("k"),
        1
    );

    // What kine refuses, it refuses as kine does (the census never asks it).
    let channel = edgekms_proto::uds::connect(kine.socket.clone())
        .await
        .unwrap();
    let mut client = edgekms_e2e::kine::pb::kv_client::KvClient::new(channel);
    let request = edgekms_e2e::kine::pb::RangeRequest {
        key: b"/registry/".to_vec(),
        range_end: b"/registry0".to_vec(),
        keys_only: true,
        ..Default::default()
    };
    let s = client.range(request).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (tonic::Code::Unknown, "keysOnly is unsupported")
    );
}

fn kmsctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(edgekms_testkit::process::target_bin("kmsctl"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_local_census_human_and_json() {
    let Some(etcd) = Etcd::fresh_tls() else {
        return;
    };
    let tls = etcd.tls.clone().unwrap();
    etcd.put_all(&dataset());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("encryption-config.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let admin = dir.path().join("no-plugin-here.sock");
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
    );
    let base = [
        "local",
        "--admin-socket",
        admin.to_str().unwrap(),
        "census",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-cacert",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
        "--encryption-config",
        config.to_str().unwrap(),
        "--page-size",
        "9",
    ];

    let out = kmsctl(&[&["-o", "json"], &base[..]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let census: Census = serde_json::from_slice(&out.stdout).unwrap();
    let spec = Spec::from_encryption_config(CONFIG, None).unwrap();
    assert_eq!(without_time(census), expected(&spec));

    let out = kmsctl(&base);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}");
    for want in [
        "KEY ID",
        "VERSION",
        "RESOURCE",
        "OBJECTS",
        "kid-one",
        "kid-two",
        "widgets.example.com",
        "identity",
        "kms:v2:vault",
        "aescbc:v1:key1",
        "unreadable",
        "revision",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // No plugin on the admin socket: versions are unknown.
    let row = text
        .lines()
        .find(|l| l.contains("kid-one") && l.contains("secrets"))
        .unwrap();
    assert!(row.contains(" ? "), "{row}");
    assert!(row.trim_end().ends_with("30"), "{row}");

    // Unreachable etcd: exit 2 with the reason; a wrong CA too.
    let port = edgekms_testkit::net::free_port();
    let out = kmsctl(&[
        "local",
        "census",
        "--etcd-endpoints",
        &format!("http://127.0.0.1:{port}"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach etcd"));
    let other = tls.other_ca.display().to_string();
    let out = kmsctl(&[
        "local",
        "census",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-cacert",
        &other,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--etcd-cacert"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_census_shows_each_key_ids_version_on_this_node() {
    let Some(etcd) = Etcd::fresh_plain() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plugin = edgekms_e2e::Plugin::start(dir.path(), "census-1").await;
    let admin = plugin.admin_socket.display().to_string();
    let first = edgekms_e2e::kmsctl_json(&["local", "--admin-socket", &admin, "status"]);
    let old = first["primary_key_id"].as_str().unwrap().to_string();
    assert!(
        edgekms_e2e::kmsctl(&["local", "--admin-socket", &admin, "rotate"])
            .status
            .success()
    );
    let now = edgekms_e2e::kmsctl_json(&["local", "--admin-socket", &admin, "status"]);
    let new = now["primary_key_id"].as_str().unwrap().to_string();
    assert_ne!(old, new);
    etcd.put_all(&[
        (
            b"/registry/secrets/a/old".to_vec(),
            kms_v2("edgekms", &old, 10),
        ),
        (
            b"/registry/secrets/a/new".to_vec(),
            kms_v2("edgekms", &new, 10),
        ),
        (
            b"/registry/secrets/a/new2".to_vec(),
            kms_v2("edgekms", &new, 10),
        ),
        (
            b"/registry/secrets/a/foreign".to_vec(),
            kms_v2("edgekms", "someone-elses", 10),
        ),
    ]);
    let out = kmsctl(&[
        "local",
        "--admin-socket",
        &admin,
        "census",
        "--etcd-endpoints",
        &etcd.endpoint,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |id: &str| {
        text.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} in\n{text}"))
            .to_string()
    };
    assert!(row(&old).contains("1 (decrypt-only)"), "{text}");
    assert!(
        row(&new).contains("2 (primary)") && row(&new).trim_end().ends_with('2'),
        "{text}"
    );
    assert!(row("someone-elses").contains("not held"), "{text}");
}

/// Objects under `key_id` per resource in a central `kmsctl status`
/// cluster's census (absent: none).
fn central_objects(cluster: &serde_json::Value, key_id: &str) -> BTreeMap<String, u64> {
    cluster["census"]["under"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["key_id"] == key_id)
                .map(|r| {
                    (
                        r["resource"].as_str().unwrap().to_owned(),
                        r["objects"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A joined plugin with `census_every` counts the cluster's storage and
/// reports it; the central service shows it and refuses to retire a
/// version while it counts objects under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_census_reaches_the_central_service_and_gates_its_retire() {
    use edgekms_e2e::fleet::{join, node_args, text, Server};
    use edgekms_e2e::Plugin;
    let Some(etcd) = Etcd::fresh_plain() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let node_dir = dir.path().join("n1");
    let (token, hash) = server.add_node("a", "n1");
    let out = join(&server, &node_dir, "a", "n1", &token, &hash);
    assert!(out.status.success(), "{}", text(&out));
    let mut args = node_args(&node_dir, "a", "n1");
    args.extend([
        "--census-every".into(),
        "1s".into(),
        "--census-etcd-endpoints".into(),
        etcd.endpoint.clone(),
    ]);
    let plugin = Plugin::spawn(&node_dir, args);
    plugin.wait_healthy().await;

    server.kmsctl_json(&["rotate", "a"]);
    let c = server
        .wait_cluster("a", "v2 primary", |c| c["primary"] == 2)
        .await;
    let key = |v: usize| c["versions"][v - 1]["key_id"].as_str().unwrap().to_owned();
    let (v1, v2) = (key(1), key(2));
    let secrets = |key_id: &str| -> Items {
        (0..3)
            .map(|i| {
                let name = format!("/registry/secrets/default/s{i}").into_bytes();
                (name, kms_v2("edgekms", key_id, 64))
            })
            .collect()
    };
    etcd.put_all(&secrets(&v1));
    let c = server
        .wait_cluster("a", "a census counting 3 under v1", |c| {
            central_objects(c, &v1).get("secrets") == Some(&3)
        })
        .await;
    assert_eq!(c["census"]["node"], "n1", "{c:#}");
    let out = server.kmsctl(&["status", "a"]);
    assert!(text(&out).contains("CENSUS counted"), "{}", text(&out));
    let out = server.kmsctl(&["retire", "a", "1", "--grace", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("secrets 3"), "{}", text(&out));

    // Rewritten under v2 (what a migration does): the next census counts
    // none under v1, and the retire goes through.
    etcd.put_all(&secrets(&v2));
    server
        .wait_cluster("a", "a census counting none under v1", |c| {
            central_objects(c, &v1).is_empty() && central_objects(c, &v2).get("secrets") == Some(&3)
        })
        .await;
    server.kmsctl_json(&["retire", "a", "1", "--grace", "1s"]);
    server
        .wait_cluster("a", "v1 destroyed", |c| {
            c["versions"][0]["state"] == "retired"
        })
        .await;
}
