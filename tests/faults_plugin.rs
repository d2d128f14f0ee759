//! The plugin's half of the fault suite: a real `edgekms-plugin` (soft
//! sealer; one case on swtpm) whose data dir is damaged between runs. Each
//! case asserts that every ciphertext written before decrypts and Status
//! names the last primary, or that the plugin refuses to start with the
//! expected line; and never that a key was made (no new node key, no new
//! recovery passphrase, no new v1).
//!
//! Soak: `EDGEKMS_SOAK_ROUNDS=2000 cargo test --workspace --test faults_plugin -- --ignored soak`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgekms_e2e::faults::{files, flip_inside, record_body, Fault, RocksFile};
use edgekms_e2e::fleet::{enrol, node_args, text, Server};
use edgekms_e2e::*;
use edgekms_proto::admin::RotateRequest;

const NEW_NSK: &str = "created and sealed a new node sealing key";
const PASSPHRASE: &str = "edgekms recovery passphrase";

/// A ciphertext the plugin acknowledged.
#[derive(Clone)]
struct Written {
    plain: Vec<u8>,
    ct: Vec<u8>,
    key_id: String,
}

/// A stopped plugin's data dir with versions 1..=3, an SST (a restart after
/// the first writes flushes the WAL) and the latest writes in the WAL.
struct Template {
    data: PathBuf,
    written: Vec<Written>,
    key_id: String,
}

async fn write(p: &Plugin, n: usize, out: &mut Vec<Written>) {
    let mut kms = p.kms().await;
    for _ in 0..n {
        let plain = format!("secret {}", out.len()).into_bytes();
        let (ct, key_id) = encrypt(&mut kms, &plain).await;
        out.push(Written { plain, ct, key_id });
    }
}

async fn rotate(p: &Plugin) -> String {
    p.admin()
        .await
        .rotate(RotateRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id
}

async fn template(root: &Path, killed: bool) -> Template {
    let dir = root.join(if killed { "t-killed" } else { "t-clean" });
    let mut p = Plugin::start(&dir, "edge-1").await;
    let mut written = Vec::new();
    write(&p, 2, &mut written).await;
    rotate(&p).await;
    write(&p, 2, &mut written).await;
    p.restart().await;
    let key_id = rotate(&p).await;
    write(&p, 2, &mut written).await;
    if killed {
        p.kill9();
    } else {
        assert_eq!(p.stop(), Some(0));
    }
    Template {
        data: dir.join("data"),
        written,
        key_id,
    }
}

enum Outcome {
    Served(Plugin),
    /// The plugin exited; its `edgekms-plugin: ...` line.
    Refused(String),
}

/// Starts a soft plugin on `dir` and waits until it serves or exits.
async fn start(dir: &Path, args: Vec<String>) -> Outcome {
    let mut p = Plugin::spawn(dir, args);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if p.died_within(Duration::from_millis(10)) {
            let log = p.log_text();
            let line = log
                .lines()
                .rev()
                .find(|l| l.starts_with("edgekms-plugin:"))
                .unwrap_or_else(|| panic!("exited without an error line:\n{log}"))
                .to_owned();
            return Outcome::Refused(line);
        }
        if let Ok(mut kms) = p.try_kms().await {
            // Served: answering Status (a joined node may still wait for
            // its keys; the callers check what it serves).
            if kms
                .status(edgekms_proto::kms_v2::StatusRequest {})
                .await
                .is_ok()
            {
                return Outcome::Served(p);
            }
        }
        assert!(
            Instant::now() < deadline,
            "neither served nor exited:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every ciphertext decrypts and Status names `key_id`, healthz "ok".
async fn assert_everything_decrypts(p: &Plugin, written: &[Written], key_id: &str) {
    let mut kms = p.kms().await;
    let status = kms
        .status(edgekms_proto::kms_v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.healthz, "ok", "{}", p.log_text());
    assert_eq!(
        edgekms_e2e::key_id(&mut kms).await,
        key_id,
        "{}",
        p.log_text()
    );
    for w in written {
        let plain = decrypt(&mut kms, &w.ct, &w.key_id)
            .await
            .unwrap_or_else(|e| panic!("{} no longer decrypts: {e}\n{}", w.key_id, p.log_text()));
        assert_eq!(plain, w.plain);
    }
}

fn assert_no_key_made(log: &str) {
    assert!(!log.contains(NEW_NSK), "a new node key was made:\n{log}");
    assert!(
        !log.contains(PASSPHRASE),
        "a new recovery passphrase:\n{log}"
    );
    assert!(!log.contains("created KEK version"), "a new v1:\n{log}");
}

fn repairs(scrape: &prometheus_parse::Scrape) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "edgekms_store_repairs_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .fold(0.0, |a, b| a + b)
}

/// A fresh copy of the template's data dir under `root/name`.
fn case_dir(root: &Path, t: &Template, name: &str) -> PathBuf {
    let dir = root.join(name);
    copy_dir(&t.data, &dir.join("data"));
    dir
}

/// Runs one case that must be survived: serves the old keys, repairs, and
/// writes the damaged file back as it was.
async fn survives(root: &Path, t: &Template, name: &str, damage: impl FnOnce(&Path)) -> String {
    let dir = case_dir(root, t, name);
    damage(&dir.join("data"));
    match start(&dir, Plugin::soft_args(&dir, "edge-1")).await {
        Outcome::Served(mut p) => {
            assert_everything_decrypts(&p, &t.written, &t.key_id).await;
            let repaired = repairs(&p.scrape().await);
            let log = p.log_text();
            assert_no_key_made(&log);
            assert_eq!(p.stop(), Some(0));
            // And the repaired dir starts clean, without a repair.
            let Outcome::Served(mut again) = start(&dir, Plugin::soft_args(&dir, "edge-1")).await
            else {
                panic!("{name}: the repaired data dir does not start");
            };
            assert_everything_decrypts(&again, &t.written, &t.key_id).await;
            assert_eq!(
                repairs(&again.scrape().await),
                0.0,
                "{name}: repaired twice"
            );
            assert_eq!(again.stop(), Some(0));
            assert_no_key_made(&again.log_text());
            let _ = std::fs::remove_dir_all(&dir);
            format!("{name}: served, {repaired} repairs")
        }
        Outcome::Refused(line) => panic!("{name}: refused: {line}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rocksdb_file_damaged_is_rebuilt_from_the_copies() {
    let root = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for killed in [false, true] {
        let t = template(root.path(), killed).await;
        let cache = t.data.join("cache");
        assert!(RocksFile::Sst.newest(&cache).is_some(), "no SST to damage");
        for kind in RocksFile::ALL {
            for fault in Fault::ALL {
                let name = format!(
                    "{kind:?}-{fault:?}-{}",
                    if killed { "kill9" } else { "stopped" }
                );
                let Some(file) = kind.newest(&cache) else {
                    table.push(format!("{name}: no such file"));
                    continue;
                };
                let file_name = file.file_name().unwrap().to_owned();
                table.push(
                    survives(root.path(), &t, &name, |data| {
                        fault.apply(&data.join("cache").join(&file_name))
                    })
                    .await,
                );
            }
        }
        // The whole cache gone.
        table.push(
            survives(
                root.path(),
                &t,
                &format!("cache-dir-deleted-{killed}"),
                |data| std::fs::remove_dir_all(data.join("cache")).unwrap(),
            )
            .await,
        );
    }
    eprintln!("{}", table.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_copy_damaged_is_rewritten_from_rocksdb() {
    let root = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for killed in [false, true] {
        let t = template(root.path(), killed).await;
        let copies = files(&t.data.join("copies"), |_| true);
        let names: Vec<String> = copies
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        for want in ["cluster", "nsk", "recovery", "kek-1", "kek-2", "kek-3"] {
            assert!(
                names.iter().any(|n| n == want),
                "no copy {want} in {names:?}"
            );
        }
        for name in &names {
            for fault in Fault::ALL {
                let case = format!("copy-{name}-{fault:?}-{killed}");
                let line = survives(root.path(), &t, &case, |data| {
                    fault.apply(&data.join("copies").join(name))
                })
                .await;
                assert!(!line.ends_with(" 0 repairs"), "{line}");
                table.push(line);
            }
        }
        // Every copy gone at once (a data dir from before the copies).
        table.push(
            survives(
                root.path(),
                &t,
                &format!("copies-dir-deleted-{killed}"),
                |data| std::fs::remove_dir_all(data.join("copies")).unwrap(),
            )
            .await,
        );
    }
    eprintln!("{}", table.join("\n"));
}

/// The sealed node key record, in RocksDB and in its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sealed_blob_is_repaired_from_its_twin_or_refused_never_remade() {
    let root = tempfile::tempdir().unwrap();
    let t = template(root.path(), true).await;
    let blob = record_body(&std::fs::read(t.data.join("copies/nsk")).unwrap());
    let in_rocks = |data: &Path| -> Vec<PathBuf> {
        files(&data.join("cache"), |_| true)
            .into_iter()
            .filter(|f| {
                std::fs::read(f)
                    .unwrap()
                    .windows(blob.len())
                    .any(|w| w == blob)
            })
            .collect()
    };
    assert!(
        !in_rocks(&t.data).is_empty(),
        "the sealed blob is not in the cache files"
    );

    // The reproduction: one byte of the sealed key in the WAL/SST.
    survives(root.path(), &t, "nsk-in-rocksdb", |data| {
        for f in in_rocks(data) {
            assert!(flip_inside(&f, &blob));
        }
    })
    .await;

    // Both places: refused, and stays refused; never a new key.
    for fault in Fault::ALL {
        let dir = case_dir(root.path(), &t, &format!("nsk-both-{fault:?}"));
        let data = dir.join("data");
        for f in in_rocks(&data) {
            assert!(flip_inside(&f, &blob));
        }
        fault.apply(&data.join("copies/nsk"));
        for _ in 0..2 {
            let Outcome::Refused(line) = start(&dir, Plugin::soft_args(&dir, "edge-1")).await
            else {
                panic!("nsk damaged in both places ({fault:?}) and served");
            };
            assert!(line.contains("copies/nsk"), "{line}");
            assert!(line.contains("No key was made"), "{line}");
            eprintln!("nsk-both-{fault:?}: {line}");
        }
        assert_no_key_made(&std::fs::read_to_string(dir.join("plugin.log")).unwrap());
    }

    // Everything but the marker gone: refused, never a fresh start.
    let dir = case_dir(root.path(), &t, "all-gone");
    std::fs::remove_dir_all(dir.join("data/cache")).unwrap();
    std::fs::remove_dir_all(dir.join("data/copies")).unwrap();
    let Outcome::Refused(line) = start(&dir, Plugin::soft_args(&dir, "edge-1")).await else {
        panic!("a data dir that held keys started afresh");
    };
    assert!(line.contains("has held keys"), "{line}");
    assert_no_key_made(&std::fs::read_to_string(dir.join("plugin.log")).unwrap());
    eprintln!("all-gone: {line}");

    // The primary's record lost in both places: refused, not a new v1.
    let dir = case_dir(root.path(), &t, "primary-gone");
    std::fs::remove_dir_all(dir.join("data/cache")).unwrap();
    std::fs::remove_file(dir.join("data/copies/kek-3")).unwrap();
    let Outcome::Refused(line) = start(&dir, Plugin::soft_args(&dir, "edge-1")).await else {
        panic!("a node without its primary served");
    };
    assert!(line.contains("no primary KEK"), "{line}");
    eprintln!("primary-gone: {line}");
}

/// kill -9 at random points of a rotation loop; after every restart every
/// acknowledged ciphertext decrypts and the primary is never older than
/// the last acknowledged rotation.
async fn kill_rotation_loop(rounds: usize) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("p");
    let args = Plugin::soft_args(&dir, "edge-1");
    let mut written: Vec<Written> = Vec::new();
    let mut acked_primary = String::new();
    let mut seen_key_ids = std::collections::BTreeSet::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let started = Instant::now();
    for round in 0..rounds {
        let mut p = match start(&dir, args.clone()).await {
            Outcome::Served(p) => p,
            Outcome::Refused(line) => panic!("round {round}: refused: {line}"),
        };
        let mut kms = p.kms().await;
        let now = edgekms_e2e::key_id(&mut kms).await;
        if !acked_primary.is_empty() {
            // A rotation that was not acknowledged may have landed.
            let v = |id: &str| {
                id.split('/')
                    .nth(1)
                    .unwrap()
                    .trim_start_matches('v')
                    .parse::<u32>()
                    .unwrap()
            };
            assert!(
                v(&now) >= v(&acked_primary),
                "round {round}: primary {now} older than {acked_primary}"
            );
        }
        for w in &written {
            let plain = decrypt(&mut kms, &w.ct, &w.key_id)
                .await
                .unwrap_or_else(|e| {
                    panic!("round {round}: {} lost: {e}\n{}", w.key_id, p.log_text())
                });
            assert_eq!(plain, w.plain);
        }
        // Work until killed at a random point.
        let kill_after = Duration::from_micros(rnd() % 40_000);
        let deadline = Instant::now() + kill_after;
        let mut admin = p.admin().await;
        loop {
            let rotated = admin.rotate(RotateRequest {}).await;
            if let Ok(r) = rotated {
                let id = r.into_inner().key_id;
                assert!(seen_key_ids.insert(id.clone()), "key_id {id} made twice");
                acked_primary = id;
            }
            let plain = format!("round {round} {}", written.len()).into_bytes();
            if let Ok(r) = kms
                .encrypt(edgekms_proto::kms_v2::EncryptRequest {
                    plaintext: plain.clone().into(),
                    uid: "t".into(),
                })
                .await
            {
                let r = r.into_inner();
                written.push(Written {
                    plain,
                    ct: r.ciphertext.to_vec(),
                    key_id: r.key_id,
                });
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        p.kill9();
        assert_no_key_made_after_first(&p.log_text());
    }
    eprintln!(
        "{rounds} kill -9 rounds, {} ciphertexts, {} rotations in {:?}",
        written.len(),
        seen_key_ids.len(),
        started.elapsed()
    );
}

fn assert_no_key_made_after_first(log: &str) {
    assert!(
        log.matches(NEW_NSK).count() <= 1,
        "a second node key:\n{log}"
    );
    assert!(log.matches(PASSPHRASE).count() <= 1, "a second passphrase");
    assert!(
        log.matches("created KEK version").count() <= 1,
        "a second v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_rotations_loses_nothing() {
    kill_rotation_loop(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: EDGEKMS_SOAK_ROUNDS=N cargo test --workspace --test faults_plugin -- --ignored soak"]
async fn soak_kill9_during_rotations() {
    let rounds = std::env::var("EDGEKMS_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    kill_rotation_loop(rounds).await;
}

/// Identity from the data dir: a joined node started with another --node
/// or --cluster is refused, naming both; without them it takes the data
/// dir's and syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_plugin_refuses_another_node_or_cluster_name() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let mut p = enrol(&server, root.path(), "edge-1", "n2").await;
    let dir = p.dir.clone();
    let key_id = edgekms_e2e::key_id(&mut p.kms().await).await;
    assert_eq!(p.stop(), Some(0));

    let with = |flag: &str, value: &str| {
        let mut args = node_args(&dir, "edge-1", "n2");
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.to_owned();
        args
    };
    let Outcome::Refused(line) = start(&dir, with("--node", "n3")).await else {
        panic!("started as another node");
    };
    assert!(line.contains("\"n2\"") && line.contains("\"n3\""), "{line}");
    let Outcome::Refused(line) = start(&dir, with("--cluster", "edge-9")).await else {
        panic!("started as another cluster");
    };
    assert!(
        line.contains("\"edge-1\"") && line.contains("\"edge-9\""),
        "{line}"
    );

    // Neither flag: both from the data dir, and it syncs a rotation.
    let mut args = node_args(&dir, "edge-1", "n2");
    for flag in ["--node", "--cluster"] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
    }
    let Outcome::Served(p) = start(&dir, args).await else {
        panic!("a joined node without --node/--cluster did not start");
    };
    assert_eq!(edgekms_e2e::key_id(&mut p.kms().await).await, key_id);
    let out = server.kmsctl(&["rotate", "edge-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = server.cluster("edge-1");
        let n = c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "n2")
            .unwrap()
            .clone();
        if n["held"].as_array().is_some_and(|h| h.len() >= 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n2 never got v2: {c}\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A joined node that lost its KEK versions (cache and copies) but kept its
/// identity is re-filled by the central service; it makes no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_that_lost_its_keks_is_refilled_from_the_central_service() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let mut p = enrol(&server, root.path(), "edge-1", "n1").await;
    let mut written = Vec::new();
    write(&p, 2, &mut written).await;
    let out = server.kmsctl(&["rotate", "edge-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kms = p.kms().await;
    let first = written[0].key_id.clone();
    while edgekms_e2e::key_id(&mut kms).await == first {
        assert!(Instant::now() < deadline, "no v2:\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write(&p, 2, &mut written).await;
    let key_id = edgekms_e2e::key_id(&mut kms).await;
    drop(kms);
    p.kill9();

    let data = p.data_dir.clone();
    for kind in ["all", "one"] {
        // Lose the cache, and the copies of every (or one) KEK version.
        let _ = std::fs::remove_dir_all(data.join("cache"));
        for f in files(&data.join("copies"), |n| n.starts_with("kek-")) {
            if kind == "all" || f.ends_with("kek-1") {
                std::fs::remove_file(f).unwrap();
            }
        }
        let Outcome::Served(mut q) = start(&p.dir, node_args(&p.dir, "edge-1", "n1")).await else {
            panic!("{kind}: a joined node without its KEKs refused to start");
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut kms = q.kms().await;
            if edgekms_e2e::key_id(&mut kms).await == key_id
                && decrypt(&mut kms, &written[0].ct, &written[0].key_id)
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{kind}: not re-filled:\n{}",
                q.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_everything_decrypts(&q, &written, &key_id).await;
        assert_no_key_made(&q.log_text().replace(&p.log_text(), ""));
        q.kill9();
    }
}

/// On a TPM: the sealed blob damaged in the cache and in its copy is
/// refused; the TPM never seals a new node key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_sealed_blob_damaged_in_both_places_is_refused() {
    let Some((root, tpm)) = swtpm::fresh() else {
        return;
    };
    let dir = root.path().join("p");
    let mut args = Plugin::soft_args(&dir, "edge-1");
    let i = args.iter().position(|a| a == "soft").unwrap();
    args[i] = "tpm".into();
    args.extend(["--tpm-tcti".into(), tpm.tcti()]);
    let mut p = Plugin::spawn(&dir, args.clone());
    p.wait_healthy().await;
    let mut written = Vec::new();
    write(&p, 2, &mut written).await;
    let key_id = written[0].key_id.clone();
    p.kill9();
    let data = dir.join("data");
    let blob = record_body(&std::fs::read(data.join("copies/nsk")).unwrap());

    // The copy alone: repaired from RocksDB.
    Fault::Flip.apply(&data.join("copies/nsk"));
    let Outcome::Served(mut q) = start(&dir, args.clone()).await else {
        panic!("the copy alone damaged was not repaired");
    };
    assert_everything_decrypts(&q, &written, &key_id).await;
    assert_eq!(q.stop(), Some(0));

    // Both.
    let mut hit = 0;
    for f in files(&data.join("cache"), |_| true) {
        hit += usize::from(flip_inside(&f, &blob));
    }
    assert!(hit > 0);
    Fault::Flip.apply(&data.join("copies/nsk"));
    let Outcome::Refused(line) = start(&dir, args.clone()).await else {
        panic!("a TPM node with its sealed blob damaged twice served");
    };
    assert!(line.contains("copies/nsk"), "{line}");
    let log = std::fs::read_to_string(dir.join("plugin.log")).unwrap();
    assert_eq!(log.matches(NEW_NSK).count(), 1, "{log}");
    assert_eq!(log.matches(PASSPHRASE).count(), 1);
    eprintln!("tpm nsk-both: {line}");
}

/// `kmsctl local backup` then `edgekms-plugin restore` after the whole data
/// dir (soft key included: as a lost TPM) is gone: every old ciphertext
/// decrypts, and the next rotation never reuses a version number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_backup_restores_a_lost_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("p");
    let mut p = Plugin::start(&dir, "edge-1").await;
    let mut written = Vec::new();
    write(&p, 2, &mut written).await;
    rotate(&p).await;
    write(&p, 2, &mut written).await;
    let key_id = edgekms_e2e::key_id(&mut p.kms().await).await;
    let key_file = root.path().join("backup.key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
    let file = root.path().join("node.ekbk");
    let admin = p.admin_socket.display().to_string();
    let args = [
        "local",
        "--admin-socket",
        &admin,
        "backup",
        file.to_str().unwrap(),
        "--key-file",
        key_file.to_str().unwrap(),
    ];
    let out = kmsctl(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&file), 0o600);
    assert!(
        !kmsctl(&args).status.success(),
        "overwrote an existing backup"
    );
    let blob = std::fs::read(&file).unwrap();
    assert_eq!(&blob[..4], b"EKNB");
    assert!(
        !blob.windows(key_id.len()).any(|w| w == key_id.as_bytes()),
        "key_id in the clear"
    );
    assert_eq!(p.stop(), Some(0));

    std::fs::remove_dir_all(&p.data_dir).unwrap();
    let restore = |extra: &[&str]| {
        std::process::Command::new(bin("edgekms-plugin"))
            .args(["restore", "--from", file.to_str().unwrap(), "--key-file"])
            .arg(&key_file)
            .args([
                "--data-dir",
                p.data_dir.to_str().unwrap(),
                "--sealer",
                "soft",
                "--no-metrics",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = restore(&["--cluster", "edge-2"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("\"edge-1\"") && text(&out).contains("\"edge-2\""),
        "{}",
        text(&out)
    );
    assert!(!p.data_dir.exists(), "a refused restore left a data dir");
    let out = restore(&[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("recovery passphrase"));
    let siblings: Vec<_> = std::fs::read_dir(dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !siblings
            .iter()
            .any(|n| n.to_string_lossy().contains("restoring")),
        "{siblings:?}"
    );
    // Never over a data dir that holds anything.
    let out = restore(&[]);
    assert!(
        !out.status.success() && text(&out).contains("not empty"),
        "{}",
        text(&out)
    );

    // Without --cluster: the data dir names it.
    let mut args = Plugin::soft_args(&dir, "edge-1");
    let i = args.iter().position(|a| a == "--cluster").unwrap();
    args.drain(i..i + 2);
    let Outcome::Served(p) = start(&dir, args).await else {
        panic!("the restored data dir does not start");
    };
    assert_everything_decrypts(&p, &written, &key_id).await;
    let next = p
        .admin()
        .await
        .rotate(RotateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        next.version > 1000,
        "the restored node reused version {}",
        next.version
    );
    assert!(written.iter().all(|w| w.key_id != next.key_id));
    assert_everything_decrypts(&p, &written, &next.key_id).await;
}

/// A data dir others may write to is refused; one others may read is made
/// private, with every cache file 0600 (older versions left them 0644).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_or_refused() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("p");
    let mut p = Plugin::start(&dir, "edge-1").await;
    let mut written = Vec::new();
    write(&p, 1, &mut written).await;
    let key_id = written[0].key_id.clone();
    assert_eq!(p.stop(), Some(0));
    let data = dir.join("data");
    for f in files(&data.join("cache"), |_| true) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    let set = |path: &Path, m: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set(&data, 0o770);
    let Outcome::Refused(line) = start(&dir, Plugin::soft_args(&dir, "edge-1")).await else {
        panic!("started on a group-writable data dir");
    };
    assert!(
        line.contains("group or others may write") && line.contains("0770"),
        "{line}"
    );
    set(&data, 0o755);
    // A file RocksDB keeps for the life of the database.
    let sst = data.join("cache/IDENTITY");
    set(&sst, 0o644);
    let Outcome::Served(mut p) = start(&dir, Plugin::soft_args(&dir, "edge-1")).await else {
        panic!("refused a world-readable data dir instead of tightening it");
    };
    assert_everything_decrypts(&p, &written, &key_id).await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&sst), 0o600);
    assert!(p.log_text().contains("made it 0700"));
    assert_eq!(p.stop(), Some(0));
}
