//! Connection abuse against both daemons, real processes over real sockets:
//! idle connections by the thousand, streams by the hundred thousand, the
//! open-file limit reached, and gRPC clients whose `:authority` on a unix
//! socket is the socket path (Python grpcio with default options). Each case
//! measures the daemon's descriptors, memory or CPU before, during and after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use edgekms_e2e::conn::{
    anonymous_tls, assert_memory_bounded, clk_tck, closed_by_server, flood, idle_tls, idle_unix,
    plugin_with_nofile, python_with_grpcio, raise_own_fd_limit, tls_connect, unary_with_authority,
    usage, Sampler,
};
use edgekms_e2e::fleet::{enrol, text, Server};
use edgekms_e2e::{decrypt, encrypt, key_id, Plugin};

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Polls `f` every 100 ms for up to `secs` seconds.
async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

/// 3,000 completed TLS handshakes without a client certificate, then
/// silence, from ten addresses, against a server limited to 1,100 open
/// files: it holds at most its cap (shedding the oldest unauthenticated
/// connections, per peer and overall), an operator and a node (a fresh sync
/// connection, then a rotation) still get through, and once the attackers'
/// connections idle past 10 s the server closes them and its descriptors and
/// memory return to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_sheds_idle_unauthenticated_connections_and_serves_operators_and_nodes() {
    raise_own_fd_limit(4000);
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("server");
    Server::init(&data_dir);
    let server = Server::spawn_with_nofile(&data_dir, &[], 1100);
    server.wait_up().await;
    let mut node = enrol(&server, tmp.path(), "edge", "n1").await;
    let pid = server.pid();
    let before = usage(pid);

    let cfg = anonymous_tls(&server.operator_dir().join("ca.pem"));
    let sources: Vec<IpAddr> = (2..12).map(loopback).collect();
    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let (idle, failed) = idle_tls(server.listen, &sources, 3000, cfg.clone()).await;
    let opened_in = started.elapsed();
    let during = usage(pid);
    let (idle, shed_by_now) = closed_by_server(idle).await;

    // While they are open: the operator...
    let t = Instant::now();
    let out = server.kmsctl(&["status"]);
    assert!(out.status.success(), "kmsctl status: {}", text(&out));
    let status_took = t.elapsed();
    // ...and a node: restarted, it syncs again over a fresh connection and
    // follows a rotation.
    node.stop();
    node = Plugin::spawn(&node.dir.clone(), node.args.clone());
    node.wait_healthy().await;
    let r = server.kmsctl_json(&["rotate", "edge"]);
    assert_eq!(r["version"], 2);
    let c = server
        .wait_cluster("edge", "promotion of v2", |c| c["primary"] == 2)
        .await;
    let v2 = c["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 2)
        .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    while key_id_of(&node).await != v2 {
        assert!(
            Instant::now() < deadline,
            "the node did not follow the rotation; log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (peak_fds, peak_rss) = sampler.finish();

    // Left alone, the attackers' connections are closed (10 s idle).
    let baseline_fds = before.fds;
    assert!(
        eventually(25, || usage(pid).fds <= baseline_fds + 8).await,
        "descriptors did not return to {} (now {}); log:\n{}",
        baseline_fds,
        usage(pid).fds,
        server.log_text()
    );
    let (idle, closed_all) = closed_by_server(idle).await;
    drop(idle);
    let scrape = server.scrape().await;
    let closed_metric = |reason: &str| {
        edgekms_e2e::sample(
            &scrape,
            "edgekms_connections_closed_total",
            &[("server", "central"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    let (by_cap, by_timeout) = (closed_metric("full"), closed_metric("timeout"));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = usage(pid);
    eprintln!(
        "central, 3000 idle TLS: fds {} -> peak {} (sampled {peak_fds}) -> {}; rss {} KiB -> peak {peak_rss} KiB -> {} KiB; \
         opened in {opened_in:?}, {failed} handshakes cut short, {shed_by_now} shed while opening, \
         {closed_all} closed by the server at the end ({by_cap} to make room, {by_timeout} idle); \
         kmsctl status took {status_took:?}",
        before.fds, during.fds, after.fds, before.rss_kib, after.rss_kib
    );
    // The cap (1,100 - 128 = 972) holds, give or take the connections
    // accepted while the ones they displaced are still closing: never the
    // limit itself.
    assert!(
        peak_fds <= 972 + before.fds + 64,
        "peak {peak_fds} descriptors"
    );
    assert!(shed_by_now + failed > 0, "nothing was shed");
    assert_eq!(closed_all, 3000 - failed, "connections left open");
    assert_memory_bounded(before, peak_rss, after, 200, 48);
    // Shed to make room (when they come faster than 10 s of idleness
    // closes them) or for idleness: either way counted and logged.
    assert!(by_cap + by_timeout >= (shed_by_now + failed) as f64);
    let log = server.log_text();
    assert!(
        log.contains("connection limit reached")
            || log.contains("closed idle unauthenticated or silent connections")
    );
    // The node still works with its keys.
    let (ct, id) = encrypt(&mut node.kms().await, b"after the flood").await;
    assert_eq!(
        decrypt(&mut node.kms().await, &ct, &id).await.unwrap(),
        b"after the flood"
    );
}

async fn key_id_of(p: &Plugin) -> String {
    match p.try_kms().await {
        Ok(mut kms) => key_id(&mut kms).await,
        Err(_) => String::new(),
    }
}

/// Four connections without a client certificate each open 50,000 `Join`
/// streams and never finish them (ignoring SETTINGS), a fifth opens and
/// resets streams as fast as it can: the server advertises 100 streams per
/// connection, refuses the rest, closes the floods with GOAWAY, stays within
/// a few MiB, and answers an operator meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_stream_flood_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path()).await;
    let pid = server.pid();
    let before = usage(pid);
    let cfg = anonymous_tls(&server.operator_dir().join("ca.pem"));
    let sampler = Sampler::start(pid);
    let mut floods = Vec::new();
    for i in 0..5 {
        let conn = tls_connect(server.listen, loopback(1), cfg.clone())
            .await
            .unwrap();
        let rapid = i == 4;
        floods.push(tokio::spawn(flood(
            conn,
            "/edgekms.fleet.v1.Fleet/Join",
            50_000,
            rapid,
            Duration::from_secs(3),
        )));
    }
    let out = server.kmsctl(&["status"]);
    assert!(out.status.success(), "kmsctl status: {}", text(&out));
    let mut seen = Vec::new();
    for f in floods {
        seen.push(f.await.unwrap());
    }
    let (_, peak_rss) = sampler.finish();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = usage(pid);
    eprintln!(
        "central stream flood: rss {} KiB -> peak {peak_rss} KiB -> {} KiB; fds {} -> {}; {:?}",
        before.rss_kib, after.rss_kib, before.fds, after.fds, seen
    );
    for (s, written) in &seen {
        assert_eq!(s.max_concurrent_streams, Some(100), "{s:?}");
        assert_eq!(s.settings_max_header_list_size, Some(16 * 1024), "{s:?}");
        // Closed with GOAWAY (ENHANCE_YOUR_CALM or PROTOCOL_ERROR) long
        // before the flood's end.
        assert!(
            s.goaway.is_some() || s.closed,
            "{s:?} after {written} streams"
        );
    }
    assert_memory_bounded(before, peak_rss, after, 64, 16);
    assert!(
        after.fds <= before.fds + 2,
        "{} -> {}",
        before.fds,
        after.fds
    );
    let out = server.kmsctl(&["status"]);
    assert!(out.status.success(), "kmsctl status: {}", text(&out));
}

/// Two connections open 50,000 Status streams each on the KMS socket and
/// never finish them: the plugin advertises 1,000 per connection, closes the
/// floods, keeps encrypting and decrypting meanwhile, and stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_stream_flood_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(tmp.path(), "flood").await;
    let pid = plugin.pid();
    let before = usage(pid);
    let sampler = Sampler::start(pid);
    let mut floods = Vec::new();
    for _ in 0..2 {
        let conn = tokio::net::UnixStream::connect(&plugin.socket)
            .await
            .unwrap();
        floods.push(tokio::spawn(flood(
            conn,
            "/v2.KeyManagementService/Status",
            50_000,
            false,
            Duration::from_secs(3),
        )));
    }
    let (ct, id) = encrypt(&mut plugin.kms().await, b"during the flood").await;
    assert_eq!(
        decrypt(&mut plugin.kms().await, &ct, &id).await.unwrap(),
        b"during the flood"
    );
    let mut seen = Vec::new();
    for f in floods {
        seen.push(f.await.unwrap());
    }
    let (_, peak_rss) = sampler.finish();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = usage(pid);
    eprintln!(
        "plugin stream flood: rss {} KiB -> peak {peak_rss} KiB -> {} KiB; fds {} -> {}; {:?}",
        before.rss_kib, after.rss_kib, before.fds, after.fds, seen
    );
    for (s, written) in &seen {
        assert_eq!(s.max_concurrent_streams, Some(1000), "{s:?}");
        assert!(
            s.goaway.is_some() || s.closed,
            "{s:?} after {written} streams"
        );
    }
    assert_memory_bounded(before, peak_rss, after, 64, 16);
    assert!(
        after.fds <= before.fds + 2,
        "{} -> {}",
        before.fds,
        after.fds
    );
}

/// 1,100 idle connections to a plugin whose open-file limit is 1,024 (soft
/// and hard). With `extra` flags: the default cap (limit - 128) or a cap
/// above the limit, so that accept() itself fails with EMFILE. Either way
/// Status answers once an idle connection is shed, and the plugin does not
/// spin: its CPU time over 3 s with the listener full stays low.
async fn plugin_at_fd_limit(extra: &[&str]) {
    raise_own_fd_limit(2000);
    let tmp = tempfile::tempdir().unwrap();
    let plugin = plugin_with_nofile(tmp.path(), "fdlimit", extra, 1024).await;
    let pid = plugin.pid();
    let before = usage(pid);
    let (idle, failed) = idle_unix(&plugin.socket, 1100).await;
    let during = usage(pid);
    // Idle for more than a second: now they may be shed for newcomers.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let cpu0 = usage(pid).cpu_ticks;
    let t0 = Instant::now();
    // More connections keep arriving while it is full.
    let (more, _) = idle_unix(&plugin.socket, 50).await;
    let t = Instant::now();
    let mut kms = tokio::time::timeout(Duration::from_secs(10), plugin.try_kms())
        .await
        .expect("connect took over 10 s")
        .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        kms.status(edgekms_proto::kms_v2::StatusRequest {}),
    )
    .await
    .expect("Status took over 10 s")
    .unwrap()
    .into_inner();
    assert_eq!(status.healthz, "ok");
    let status_took = t.elapsed();
    let elapsed = t0.elapsed().max(Duration::from_secs(3));
    tokio::time::sleep(elapsed.saturating_sub(t0.elapsed())).await;
    let cpu = usage(pid).cpu_ticks - cpu0;
    let cpu_share = cpu as f64 / clk_tck() as f64 / elapsed.as_secs_f64();
    let peak = usage(pid);
    drop(idle);
    drop(more);
    let baseline = before.fds;
    let back = eventually(10, || usage(pid).fds <= baseline + 4).await;
    let after = usage(pid);
    eprintln!(
        "plugin at 1024 fds {extra:?}: fds {} -> {} (then {}) -> {}; rss {} KiB -> {} KiB; {failed} connects failed; \
         Status in {status_took:?}; CPU {:.1}% of a core over {elapsed:?}",
        before.fds,
        during.fds,
        peak.fds,
        after.fds,
        before.rss_kib,
        after.rss_kib,
        cpu_share * 100.0
    );
    assert!(
        cpu_share < 0.25,
        "the plugin used {:.0}% CPU",
        cpu_share * 100.0
    );
    assert!(
        back,
        "descriptors did not return to {baseline}: {}",
        after.fds
    );
    assert!(plugin.log_text().contains("connection limit reached"));
    let (ct, id) = encrypt(&mut plugin.kms().await, b"after").await;
    assert_eq!(
        decrypt(&mut plugin.kms().await, &ct, &id).await.unwrap(),
        b"after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_at_its_fd_limit_sheds_idle_connections_without_spinning() {
    plugin_at_fd_limit(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_out_of_fds_backs_off_and_sheds_instead_of_spinning() {
    plugin_at_fd_limit(&["--max-connections", "100000"]).await;
}

/// The `:authority` values real gRPC clients send on unix sockets (the
/// %-encoded path of grpc-core 1.57+, the raw path of grpc-java) are served
/// like `localhost`, on both sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_path_authorities_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(tmp.path(), "authority").await;
    let encoded = plugin.socket.display().to_string().replace('/', "%2F");
    let raw = plugin.socket.display().to_string();
    for (socket, path) in [
        (&plugin.socket, "/v2.KeyManagementService/Status"),
        (&plugin.admin_socket, "/edgekms.admin.v1.NodeAdmin/Status"),
    ] {
        for authority in ["localhost", encoded.as_str(), raw.as_str()] {
            let seen = unary_with_authority(socket, path, authority).await;
            assert!(
                seen.headers > 0 && seen.resets.is_empty(),
                "{path} with :authority {authority:?}: {seen:?}"
            );
        }
    }
}

/// Python grpcio from PyPI with default channel options
/// (`grpc.insecure_channel('unix:PATH')`) calls Status, Encrypt and Decrypt
/// on the KMS socket and Status on the admin socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_default_channel_reaches_kms_and_admin_sockets() {
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&tmp.path().join("p"), "py").await;
    let stubs = tmp.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let out = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        // The admin API imports the fleet API's Census.
        .args([
            "kms/v2/api.proto",
            "edgekms/admin/v1/admin.proto",
            "edgekms/fleet/v1/fleet.proto",
        ])
        .current_dir(&proto)
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {}", text(&out));
    let script = r#"
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
from kms.v2 import api_pb2, api_pb2_grpc
from edgekms.admin.v1 import admin_pb2, admin_pb2_grpc

kms = api_pb2_grpc.KeyManagementServiceStub(grpc.insecure_channel("unix:" + sys.argv[2]))
status = kms.Status(api_pb2.StatusRequest(), timeout=10)
enc = kms.Encrypt(api_pb2.EncryptRequest(plaintext=b"from python", uid="py-1"), timeout=10)
dec = kms.Decrypt(
    api_pb2.DecryptRequest(
        ciphertext=enc.ciphertext, uid="py-2", key_id=enc.key_id, annotations=enc.annotations
    ),
    timeout=10,
)
admin = admin_pb2_grpc.NodeAdminStub(grpc.insecure_channel("unix:" + sys.argv[3]))
node = admin.Status(admin_pb2.StatusRequest(), timeout=10)
print(json.dumps({
    "grpc": grpc.__version__,
    "healthz": status.healthz,
    "key_id": enc.key_id,
    "plaintext": dec.plaintext.decode(),
    "admin": str(node).count("\n") > 0,
}))
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&stubs)
        .arg(&plugin.socket)
        .arg(&plugin.admin_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client: {}\nplugin log:\n{}",
        text(&out),
        plugin.log_text()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("python grpcio: {v}");
    assert_eq!(v["healthz"], "ok");
    assert_eq!(v["plaintext"], "from python");
    assert_eq!(
        v["key_id"].as_str().unwrap(),
        key_id(&mut plugin.kms().await).await
    );
    assert_eq!(v["admin"], true);
    // The C core sends the %-encoded socket path as :authority from 1.57 on.
    let version: Vec<u32> = v["grpc"]
        .as_str()
        .unwrap()
        .split('.')
        .take(2)
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    assert!(
        version >= vec![1, 57],
        "grpcio {} is older than 1.57 and does not show the problem",
        v["grpc"]
    );
}
