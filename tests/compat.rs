//! Data dirs written by an older build open with this one: the fixture in
//! tests/fixtures/datadirs-v0.1 was made by main before the crate split
//! (its make.sh says how): a central service with cluster c1 rotated once,
//! a node joined to it, and a standalone node, each node with one seed it
//! encrypted then. The on-disk formats must stay readable for ever; this
//! test fails the day one is not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use base64::Engine;
use edgekms_e2e::fleet::{node_args, version_states, Server};
use edgekms_e2e::{copy_dir, decrypt, key_id, Plugin};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/datadirs-v0.1")
}

/// Copies fixture `name` to `to`, private as a data dir must be (git
/// keeps no modes).
fn copy_private(name: &str, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    copy_dir(&fixture().join(name), to);
    fn walk(p: &Path) {
        let mode = if p.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path());
            }
        }
    }
    walk(to);
}

/// `(ciphertext, key_id)` of the joined node's seed and the standalone's.
fn ciphertexts() -> Vec<(Vec<u8>, String)> {
    let text = std::fs::read_to_string(fixture().join("ciphertexts.txt")).unwrap();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map(|v| {
            let v = v.unwrap();
            let ct = base64::engine::general_purpose::STANDARD
                .decode(v["ciphertext"].as_str().unwrap())
                .unwrap();
            (ct, v["key_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_central_data_dir_of_the_previous_layout_serves_and_rotates() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("server");
    copy_private("server", &data_dir);
    let server = Server::serve(&data_dir).await;
    let status = server.kmsctl_json(&["status", "c1"]);
    let c = &status["clusters"][0];
    assert_eq!(c["primary"], 2, "{status}");
    assert_eq!(
        version_states(c),
        [(1, "decrypt-only".to_owned()), (2, "primary".to_owned())]
    );
    assert_eq!(c["nodes"][0]["name"], "n1", "{status}");
    assert_eq!(c["nodes"][0]["state"], "active", "{status}");
    // Its keys unwrap: a rotation and a backup read and write them.
    let out = server.kmsctl(&["-o", "json", "rotate", "c1"]);
    assert!(out.status.success(), "{out:?}");
    let key = tmp.path().join("backup.key");
    std::fs::write(&key, "5a".repeat(32)).unwrap();
    let file = tmp.path().join("backup.ekbk");
    let out = server.kmsctl(&[
        "backup",
        file.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn node_data_dirs_of_the_previous_layout_decrypt_what_they_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let cts = ciphertexts();
    assert_eq!(cts.len(), 2);

    // The joined node: its service is not running (the fixture's port is
    // gone), and it serves from its cache, as an edge node cut off does.
    let dir = tmp.path().join("n1");
    copy_private("node", &dir.join("data"));
    let joined = Plugin::spawn(&dir, node_args(&dir, "c1", "n1"));
    joined.wait_healthy().await;
    let mut kms = joined.kms().await;
    let (ct, id) = &cts[0];
    assert_eq!(key_id(&mut kms).await, *id);
    assert_eq!(
        decrypt(&mut kms, ct, id).await.unwrap(),
        b"joined node seed"
    );

    // The standalone node decrypts its seed and still rotates.
    let dir = tmp.path().join("s1");
    copy_private("standalone", &dir.join("data"));
    let standalone = Plugin::start(&dir, "s1").await;
    let mut kms = standalone.kms().await;
    let (ct, id) = &cts[1];
    assert_eq!(key_id(&mut kms).await, *id);
    assert_eq!(decrypt(&mut kms, ct, id).await.unwrap(), b"standalone seed");
    let rotated = standalone
        .admin()
        .await
        .rotate(edgekms_proto::admin::RotateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.version, 3);
    assert_eq!(decrypt(&mut kms, ct, id).await.unwrap(), b"standalone seed");
}
