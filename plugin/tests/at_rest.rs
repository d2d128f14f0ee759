//! Nothing secret on disk: after first start, rotations and traffic, no file
//! under the data dir (RocksDB SSTs, WAL, MANIFEST, LOG, the sealed blob)
//! holds a KEK version, the node sealing key, or a plaintext, raw or hex.
//! Runs the real node code against a real RocksDB; this test can see the
//! raw keys, which the end-to-end tests cannot.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use edgekms_hsm::soft::SoftSealer;
use edgekms_hsm::Sealer;
use edgekms_plugin::cache::Cache;
use edgekms_plugin::config::{SealerKind, Settings};
use edgekms_plugin::node::{sealer_from_config, Node};

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hits.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            hits.push(path.display().to_string());
        }
    }
    hits
}

#[test]
fn no_key_or_plaintext_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Settings {
        data_dir: Some(dir.path().join("data")),
        cluster: Some("edge-1".into()),
        node: Some("n1".into()),
        sealer: Some(SealerKind::Soft),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let known = b"KNOWN PLAINTEXT 0f1e2d3c never on disk";
    let mut keys: Vec<Vec<u8>> = Vec::new();
    {
        let node = Node::open(&cfg, sealer_from_config(&cfg).unwrap()).unwrap();
        for _ in 0..3 {
            node.encrypt(known).unwrap();
            node.rotate().unwrap();
        }
        node.retire(1, 0, true).unwrap();
        assert_eq!(node.destroy_due(u64::MAX).unwrap(), [1]);
        for kv in node.snapshot().keyring.versions() {
            if let Some(key) = kv.key() {
                keys.push(key.expose().to_vec());
            }
        }
        assert_eq!(keys.len(), 3, "v2..v4 hold keys, v1 is retired");
    }
    // The NSK, recovered the way the plugin does it.
    let store = Cache::open(&cfg.data_dir, "edge-1").unwrap();
    let blob = store.sealed_nsk().unwrap().unwrap();
    drop(store);
    let soft = SoftSealer::open_or_create(&cfg.data_dir.join("soft-sealer.key")).unwrap();
    keys.push(soft.unseal(&blob).unwrap().expose().to_vec());

    for key in &keys {
        assert!(
            files_containing(&cfg.data_dir, key).is_empty(),
            "raw key on disk"
        );
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            files_containing(&cfg.data_dir, hex.as_bytes()).is_empty(),
            "hex key on disk"
        );
    }
    assert!(
        files_containing(&cfg.data_dir, known).is_empty(),
        "plaintext on disk"
    );
}
